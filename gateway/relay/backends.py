"""Backends: the replicas of each model, their health, and opening upstream requests.

Each vLLM server is a :class:`Backend`: calls go through the relay's own HTTP/1.1 keep-alive pool (``h1.Pool``);
an ``httpx.AsyncClient`` serves only its health checks (``GET /health``; the ``transports`` seam of tests
replaces that client's transport, not the relay's).

``BackendPool.open`` is the only place a request can fail over: it tries replicas (chosen by the router) until
one answers with a status other than a connection failure, timeout, 5xx or 429 (a stream: until its first chunk
arrived), and hands back the open response *before any byte has gone to the client*. Retries are bounded by
``retry.max_attempts`` and by the model's retry budget; consecutive failures eject a backend (its circuit breaker)
until a probe request succeeds. After the first byte, errors travel in-band (see ``proxy``).

Overload: a backend at ``max_concurrency`` takes no more; a request that finds every replica busy waits in the
model's FIFO queue (bounded by the replicas' ``max_queue`` and ``gateway.queue_timeout_s``), else gets 429.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import anyio
import httpx

from gateway.config import BackendConfig, Settings
from gateway.errors import (
    GatewayError,
    NoHealthyBackend,
    Overloaded,
    UpstreamBadResponse,
    UpstreamStreamError,
    UpstreamTimeout,
    UpstreamUnreachable,
    status_reason,
)
from gateway.metrics import Metrics
from gateway.relay import h1
from gateway.relay.resilience import CircuitBreaker, RetryBudget
from gateway.relay.routing import ModelTable, Replica, Router

log = logging.getLogger("gateway.relay.backends")


class Backend:
    def __init__(
        self,
        config: BackendConfig,
        breaker: CircuitBreaker,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        max_response_head_bytes: int = h1.MAX_HEAD_BYTES,
    ) -> None:
        self.config = config
        self.name = config.name
        t = config.timeouts
        headers = {"user-agent": "llm-compare-gateway"}
        key = config.api_key()
        if key:
            headers["authorization"] = f"Bearer {key}"
        self.client = httpx.AsyncClient(
            base_url=config.base_url,
            headers=headers,
            timeout=httpx.Timeout(connect=t.connect, read=t.read, write=t.write, pool=t.pool),
            limits=httpx.Limits(
                max_connections=config.max_connections,
                max_keepalive_connections=config.max_connections,
                keepalive_expiry=30.0,
            ),
            transport=transport,
        )
        # Requests go through the relay's own HTTP/1.1 pool (gateway.relay.h1); httpx serves the health checks.
        self.h1 = h1.Pool(config.base_url, max_connections=config.max_connections, connect_timeout=t.connect,
                          pool_timeout=t.pool, write_timeout=t.write, max_head=max_response_head_bytes)  # fmt: skip
        self.base_headers = {k: v for k, v in headers.items() if k != "user-agent"}
        self.base_headers["user-agent"] = "llm-compare-gateway"
        self.breaker = breaker
        self.healthy: bool | None = None  # None: not checked yet
        self.failed_checks = 0  # health checks failed in a row
        self.answered_at = -math.inf  # time.monotonic() of its last good answer to a real request
        self.in_flight = 0

    def has_slot(self) -> bool:
        limit = self.config.max_concurrency
        return limit is None or self.in_flight < limit

    def usable(self) -> bool:
        return self.healthy is True and self.breaker.available()

    def replica(self) -> Replica:
        return Replica(self.name, self.usable() and self.has_slot(), self.in_flight)


@dataclass(slots=True, eq=False)
class Upstream:
    """An open response. ``first`` is a stream's first chunk, read before anything went to the client; ``stall``
    bounds the silence between later chunks. ``release`` must be called exactly once when the call is over."""

    backend: Backend
    pool: BackendPool
    sent: h1.Response | None = None
    first: bytes | None = None
    first_at: float = 0.0  # perf_counter when ``first`` arrived
    stall: float | None = None
    released: bool = False

    @property
    def response(self) -> h1.Response:
        assert self.sent is not None, "no response yet"
        return self.sent

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.pool.release(self.backend)

    def broke(self, reason: str) -> None:
        """The backend failed after the response began: counted, and held against it by its breaker."""
        self.pool.failed(self.backend, reason)

    async def read(self) -> bytes | None:
        """The next bytes of the response (a stream's pre-read first chunk first), None at its end. A silence
        longer than the stall timeout and transport failures become gateway errors (for in-band reporting)."""
        first = self.first
        if first is not None:
            self.first = None
            if first:
                return first
        try:
            return await self.response.next_chunk(self.stall)
        except TimeoutError:
            raise UpstreamTimeout(
                f"backend {self.backend.name} stopped sending (nothing for {self.stall or 0:g} s)"
            ) from None
        except h1.Malformed as exc:
            raise UpstreamBadResponse(f"backend {self.backend.name} sent a bad response: {exc}") from None
        except h1.ReadFailed as exc:
            raise UpstreamStreamError(f"backend {self.backend.name} broke the response off ({exc})") from None


class BackendPool:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        transports: Mapping[str, httpx.AsyncBaseTransport] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        g = settings.gateway
        bp, rp = g.breaker, g.retry
        self.backends = {
            b.name: Backend(
                b,
                CircuitBreaker(bp.failures, bp.open_s, bp.max_open_s),
                (transports or {}).get(b.name),
                max_response_head_bytes=g.max_response_head_bytes,
            )
            for b in settings.backends
        }
        aliases: dict[str, str] = {}
        for card in settings.models:
            aliases[card.id] = card.id
            aliases.update(dict.fromkeys(card.aliases, card.id))
        self.table = ModelTable(
            aliases, {c.id: [b.name for b in settings.backends if c.id in b.models] for c in settings.models}
        )
        self.router = Router()
        self.budgets = {m: RetryBudget(rp.budget_ratio, rp.min_per_s) for m in self.table.models}
        self._waiters: dict[str, deque[asyncio.Future[None]]] = {m: deque() for m in self.table.models}
        self._models_of = {b.name: b.models for b in settings.backends}
        self._health_task: asyncio.Task[None] | None = None

    # -- health ------------------------------------------------------------------------------------------
    async def check(self, backend: Backend) -> bool:
        """One active health check. A backend goes out after ``unhealthy_threshold`` failed checks in a row (a
        busy server answering one check late is not down), and back in after one good check. The first check
        decides at once, so /ready is right from the start. A refused connection on a real request takes it out
        at once (see ``open``); a check that times out while real requests are being answered does not count."""
        g = self.settings.gateway
        try:
            r = await backend.client.get("/health", timeout=g.health_check_timeout_s)
            ok = r.status_code == 200
        except httpx.TimeoutException:
            # Passive health: a check that times out while the backend keeps answering real requests means it is
            # busy (a saturated server answers /health late), not down: inconclusive, not a failure.
            if time.monotonic() - backend.answered_at < g.health_check_interval_s + g.health_check_timeout_s:
                log.debug("backend %s: health check timed out, but it is answering requests", backend.name)
                return backend.healthy is True
            ok = False
        except httpx.HTTPError:
            ok = False
        backend.failed_checks = 0 if ok else backend.failed_checks + 1
        if ok or backend.healthy is None or backend.failed_checks >= g.unhealthy_threshold:
            self._set_health(backend, ok)
        return ok

    def _set_health(self, backend: Backend, ok: bool) -> None:
        if backend.healthy is not ok:
            log.log(
                logging.INFO if ok else logging.WARNING,
                "backend %s is %s",
                backend.name,
                "healthy" if ok else "unhealthy",
            )
        backend.healthy = ok
        self.metrics.backend_up.labels(backend.name).set(1 if ok else 0)

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(b) for b in self.backends.values()))

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.gateway.health_check_interval_s)
            await self.check_all()

    async def start(self) -> None:
        await self.check_all()
        self._health_task = asyncio.create_task(self._health_loop(), name="health-checks")

    async def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        await asyncio.gather(*(b.client.aclose() for b in self.backends.values()))
        for b in self.backends.values():
            b.h1.close()

    def ready(self) -> dict[str, bool]:
        """Per model: does it have at least one healthy backend?"""
        return {
            model: any(self.backends[b].healthy is True for b in self.table.backends_of(model))
            for model in self.table.models
        }

    # -- outcomes --------------------------------------------------------------------------------------------
    def failed(self, backend: Backend, reason: str) -> None:
        """A failure of the backend itself (not of the client's request): counted and held against it."""
        self.metrics.upstream_errors.labels(backend.name, reason).inc()
        if reason == "status_429":
            backend.breaker.release()  # busy, not broken
        elif backend.breaker.failure():
            log.warning("backend %s ejected for %g s after %d failures in a row (last: %s)", backend.name,
                        backend.breaker.open_s, backend.breaker.failures, reason)  # fmt: skip
        self.metrics.circuit_state.labels(backend.name).set(backend.breaker.state)

    def succeeded(self, backend: Backend) -> None:
        backend.answered_at = time.monotonic()
        if backend.breaker.success():
            log.info("backend %s is back in rotation (probe succeeded)", backend.name)
        self.metrics.circuit_state.labels(backend.name).set(backend.breaker.state)

    def release(self, backend: Backend) -> None:
        """A call on ``backend`` is over: free its slot and wake the first request waiting for one."""
        backend.in_flight -= 1
        backend.breaker.release()
        for model in self._models_of[backend.name]:
            waiters = self._waiters[model]
            while waiters:
                waiter = waiters.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    return

    # -- requests ----------------------------------------------------------------------------------------
    async def _pick(self, model: str, tried: list[str], *, retrying: bool, queue: bool = True) -> Backend:
        """A usable replica with a free slot, waiting in the model's queue when all are busy (first tries only).

        Raises NoHealthyBackend when no replica is usable, Overloaded when the queue is full or the wait too long.
        """
        names = self.table.backends_of(model)
        deadline: float | None = None
        while True:
            candidates = [self.backends[n] for n in names if n not in tried]
            name = self.router.pick(model, (b.replica() for b in candidates))
            if name is None and not retrying and not any(b.usable() for b in candidates):
                # Panic routing: every healthy replica is ejected; better their answers than none.
                panic = (Replica(b.name, b.healthy is True and b.has_slot(), b.in_flight) for b in candidates)
                name = self.router.pick(model, panic)
            if name is not None:
                backend = self.backends[name]
                backend.breaker.acquire()
                self.metrics.circuit_state.labels(name).set(backend.breaker.state)
                return backend
            usable = [b for b in candidates if b.usable()]
            if not usable or retrying:
                open_for = [b.breaker.retry_after() for b in candidates if b.healthy and not b.breaker.available()]
                raise NoHealthyBackend(
                    f"no healthy backend serves model {model!r}"
                    + (" (ejected after repeated failures)" if open_for else ""),
                    retry_after=min(open_for) if open_for else None,
                )
            waiters = self._waiters[model]
            if not queue:
                raise Overloaded(f"model {model!r} is at capacity (shadow traffic does not queue)")
            if len(waiters) >= sum(b.config.max_queue for b in usable):
                self.metrics.rejected.labels(model, "overloaded").inc()
                raise Overloaded(f"model {model!r} is at capacity and its queue is full", retry_after=1)
            loop = asyncio.get_running_loop()
            deadline = deadline or loop.time() + self.settings.gateway.queue_timeout_s
            waiter: asyncio.Future[None] = loop.create_future()
            waiters.append(waiter)
            gauge = self.metrics.queued.labels(model)
            gauge.inc()
            try:
                with anyio.fail_after(max(0.0, deadline - loop.time())):
                    await waiter
            except TimeoutError:
                self.metrics.rejected.labels(model, "queue_timeout").inc()
                raise Overloaded(
                    f"model {model!r} stayed at capacity for {self.settings.gateway.queue_timeout_s:g} s",
                    retry_after=1,
                ) from None
            finally:
                gauge.dec()
                if not waiter.done():
                    waiter.cancel()
                    with contextlib.suppress(ValueError):
                        waiters.remove(waiter)

    async def open(
        self,
        model: str,
        path: str,
        body: bytes,
        headers: dict[str, str],
        *,
        stream: bool,
        queue: bool = True,
        method: str = "POST",
    ) -> Upstream:
        """Send the request to a replica of ``model``, retrying another replica (within the retry budget) on a
        connect error, a timeout, a 5xx or 429, or a stream that broke before its first chunk.

        The returned upstream is open and holds a slot on its backend: the caller must ``close_upstream`` and
        ``release`` it. A stream's 200 response comes with its first chunk already read. ``queue=False`` (shadow
        traffic) never waits for a slot: Overloaded at once. When no retry is left, a
        backend's own error answer is returned as it is (its body goes to the client) and a failure is raised.
        """
        self.budgets[model].request()
        tried: list[str] = []
        while True:
            backend = await self._pick(model, tried, retrying=bool(tried), queue=queue)
            tried.append(backend.name)
            backend.in_flight += 1
            upstream = Upstream(backend, self)
            try:
                await self._send(upstream, method, path, body, headers, stream)
            except GatewayError as err:
                upstream.release()
                reason = err.upstream_reason or "bad_response"
                self.failed(backend, reason)
                if reason == "connect":
                    self._set_health(backend, False)
                err.counted = True
                if not self._may_retry(model, tried, reason):
                    raise
                continue
            except BaseException:
                await close_upstream(upstream)
                upstream.release()
                raise
            bad = status_reason(upstream.response.status_code)
            if bad is None:
                self.succeeded(backend)
                return upstream
            self.failed(backend, bad)
            if not self._may_retry(model, tried, bad):
                return upstream
            await close_upstream(upstream)
            upstream.release()

    def _may_retry(self, model: str, tried: list[str], reason: str) -> bool:
        """Another try is allowed: attempts left, an untried replica free right now (retries never queue), and
        budget left."""
        if len(tried) >= self.settings.gateway.retry.max_attempts:
            return False
        if not any(self.backends[n].replica().healthy for n in self.table.backends_of(model) if n not in tried):
            return False
        if not self.budgets[model].try_retry():
            self.metrics.retries_denied.labels(model).inc()
            return False
        self.metrics.retries.labels(model, reason).inc()
        return True

    async def _send(
        self, upstream: Upstream, method: str, path: str, body: bytes, headers: dict[str, str], stream: bool
    ) -> None:
        backend = upstream.backend
        name, t = backend.name, backend.config.timeouts
        headers = {**backend.base_headers, **headers}
        loop = asyncio.get_running_loop()
        limit = t.first_token if stream else t.read
        deadline = loop.time() + limit
        cap = self.settings.gateway.max_response_bytes
        try:
            upstream.sent = await backend.h1.request(method, path, headers, body, limit, max_body=cap)
            upstream.stall = t.stall if stream else t.read
            if stream and upstream.sent.status_code == 200:
                upstream.sent.max_body = None  # a stream can be long; each of its events is capped by the framer
                upstream.first = await upstream.sent.next_chunk(max(0.0, deadline - loop.time())) or b""
                upstream.first_at = upstream.sent.arrived
        except (TimeoutError, h1.PoolTimeout, h1.WriteTimeout) as exc:
            await close_upstream(upstream)
            what = (
                ("first token" if stream else "response")
                if isinstance(exc, TimeoutError)
                else ("writing the request" if isinstance(exc, h1.WriteTimeout) else "no free connection")
            )
            raise UpstreamTimeout(f"backend {name} timed out ({what})") from None
        except h1.ConnectFailed as exc:
            raise UpstreamUnreachable(f"backend {name} is unreachable ({exc})") from None
        except h1.Malformed as exc:
            await close_upstream(upstream)
            raise UpstreamBadResponse(f"backend {name} sent a bad response: {exc}") from None
        except h1.ReadFailed as exc:
            if upstream.sent is None:
                raise UpstreamUnreachable(f"backend {name} closed the connection ({exc})") from None
            await close_upstream(upstream)
            raise UpstreamStreamError(f"backend {name} broke the stream off before its first chunk") from None


async def close_upstream(upstream: Upstream) -> None:
    if upstream.sent is not None:
        await upstream.sent.aclose()


async def iter_body(upstream: Upstream) -> AsyncIterator[bytes]:
    """The response's bytes as they arrive (see ``Upstream.read``)."""
    while (chunk := await upstream.read()) is not None:
        yield chunk


async def read_body(upstream: Upstream) -> bytes:
    return b"".join([chunk async for chunk in iter_body(upstream)])
