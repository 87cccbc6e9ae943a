"""Backends: one pooled ``httpx.AsyncClient`` per vLLM server, its health, and opening upstream requests.

``BackendPool.open`` is the only place a request can fail over: it tries replicas (chosen by the router) until
one answers with a status other than a connection failure, timeout or 5xx, and hands back the open response
*before any byte has gone to the client*. After that, errors travel in-band (see ``streaming``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import httpx

from gateway.config import BackendConfig, Settings
from gateway.errors import (
    GatewayError,
    NoHealthyBackend,
    UpstreamBadResponse,
    UpstreamStreamError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from gateway.metrics import Metrics
from gateway.routing import ModelTable, Replica, Router

log = logging.getLogger("gateway.backends")


class Backend:
    def __init__(self, config: BackendConfig, transport: httpx.AsyncBaseTransport | None = None) -> None:
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
        self.healthy: bool | None = None  # None: not checked yet
        self.failed_checks = 0  # health checks failed in a row
        self.in_flight = 0

    def replica(self) -> Replica:
        return Replica(self.name, self.healthy is True, self.in_flight)


@dataclass(slots=True)
class Upstream:
    backend: Backend
    response: httpx.Response


class BackendPool:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        transports: Mapping[str, httpx.AsyncBaseTransport] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.backends = {b.name: Backend(b, (transports or {}).get(b.name)) for b in settings.backends}
        aliases: dict[str, str] = {}
        for card in settings.models:
            aliases[card.id] = card.id
            aliases.update(dict.fromkeys(card.aliases, card.id))
        self.table = ModelTable(
            aliases, {c.id: [b.name for b in settings.backends if c.id in b.models] for c in settings.models}
        )
        self.router = Router()
        self._health_task: asyncio.Task[None] | None = None

    # -- health ------------------------------------------------------------------------------------------
    async def check(self, backend: Backend) -> bool:
        """One active health check. A backend goes out after ``unhealthy_threshold`` failed checks in a row (a
        busy server answering one check late is not down), and back in after one good check. The first check
        decides at once, so /ready is right from the start. A refused connection on a real request takes it out
        at once (see ``open``)."""
        try:
            r = await backend.client.get("/health", timeout=self.settings.gateway.health_check_timeout_s)
            ok = r.status_code == 200
        except httpx.HTTPError:
            ok = False
        backend.failed_checks = 0 if ok else backend.failed_checks + 1
        if ok or backend.healthy is None or backend.failed_checks >= self.settings.gateway.unhealthy_threshold:
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

    def ready(self) -> dict[str, bool]:
        """Per model: does it have at least one healthy backend?"""
        return {
            model: any(self.backends[b].healthy is True for b in self.table.backends_of(model))
            for model in self.table.models
        }

    # -- requests ----------------------------------------------------------------------------------------
    def _error(self, backend: Backend, reason: str) -> None:
        self.metrics.upstream_errors.labels(backend.name, reason).inc()

    async def open(self, model: str, path: str, body: bytes, headers: dict[str, str]) -> Upstream:
        """Send the request to a replica of ``model``; fail over on connect errors, timeouts and 5xx.

        The returned response is open (streaming) and must be closed by the caller; the chosen backend's
        ``in_flight`` has been incremented and must be decremented by the caller.
        """
        tried: list[str] = []
        last: GatewayError | None = None
        names = self.table.backends_of(model)
        while True:
            name = self.router.pick(model, (self.backends[n].replica() for n in names), tried)
            if name is None:
                if last is not None:
                    raise last
                raise NoHealthyBackend(f"no healthy backend serves model {model!r}")
            backend = self.backends[name]
            tried.append(name)
            backend.in_flight += 1
            request = backend.client.build_request("POST", path, content=body, headers=headers)
            try:
                response = await backend.client.send(request, stream=True)
            except httpx.TimeoutException as exc:
                backend.in_flight -= 1
                self._error(backend, "timeout")
                last = UpstreamTimeout(f"backend {name} timed out ({type(exc).__name__})")
                continue
            except httpx.TransportError as exc:
                backend.in_flight -= 1
                self._error(backend, "connect")
                self._set_health(backend, False)
                last = UpstreamUnreachable(f"backend {name} is unreachable ({type(exc).__name__})")
                continue
            except BaseException:
                backend.in_flight -= 1
                raise
            if response.status_code >= 500 and len(tried) < len(names):
                # Another replica may still answer: nothing has been sent to the client yet.
                self._error(backend, "status_5xx")
                await response.aclose()
                backend.in_flight -= 1
                last = UpstreamBadResponse(f"backend {name} answered {response.status_code}")
                continue
            return Upstream(backend, response)


async def iter_body(upstream: Upstream) -> AsyncIterator[bytes]:
    """The response's bytes as they arrive; transport failures become gateway errors (for in-band reporting)."""
    name = upstream.backend.name
    try:
        async for chunk in upstream.response.aiter_raw():
            yield chunk
    except httpx.TimeoutException:
        raise UpstreamTimeout(f"backend {name} stopped sending (read timeout)") from None
    except httpx.HTTPError as exc:
        raise UpstreamStreamError(f"backend {name} broke the response off ({type(exc).__name__})") from None


async def read_body(upstream: Upstream) -> bytes:
    return b"".join([chunk async for chunk in iter_body(upstream)])
