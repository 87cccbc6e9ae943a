"""One proxied call, from an open upstream response to the client, and what it leaves in the metrics.

Streaming: ``RelayResponse`` is a plain ASGI response. It forwards every event's bytes as the backend sent them,
one ``send`` per upstream read, while a second task listens for the client's disconnect and cancels the relay
at once (so the upstream connection closes and vLLM aborts the generation). Whatever happens, the upstream
response is closed, the in-flight gauges go back down and the call is recorded exactly once.

An error after the first byte goes out in-band: an SSE error event, then ``data: [DONE]``. A stream that ends
without ``[DONE]`` is reported the same way: never a silent end that a client would take for a complete answer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway.asgi import ClientWatch
from gateway.auth import Client
from gateway.backends import Upstream, close_upstream, iter_body, read_body
from gateway.config import ModelCard
from gateway.cost import list_price_usd
from gateway.errors import GatewayError, ShuttingDown, UpstreamStreamError
from gateway.metrics import NO_BACKEND, NO_MODEL, Metrics
from gateway.protocol import Endpoint
from gateway.streaming import SSEFramer, StreamObserver, Usage

log = logging.getLogger("gateway.proxy")

CLIENT_CLOSED = 499  # status label of a call the client abandoned (nginx's convention)


@dataclass(slots=True)
class Exchange:
    """What the gateway knows about one call; labels default to the 'never resolved' values."""

    request_id: str
    endpoint: Endpoint
    t0: float
    model: str = NO_MODEL
    backend: str = NO_BACKEND
    card: ModelCard | None = None
    pair_id: str | None = None  # set when shadow mirroring sampled this call
    client: Client | None = None  # the API key's client, when keys are configured (charged for tokens)


PairHook = Callable[[str, Exchange, int, float | None, Usage | None, StreamObserver | None], None]


class Recorder:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.on_pair: PairHook | None = None  # shadow mirroring stores the client's side of each pair

    def failed(self, ex: Exchange, status: int) -> None:
        self.metrics.requests.labels(ex.model, ex.backend, ex.endpoint, str(status)).inc()

    def finished(
        self,
        ex: Exchange,
        status: int,
        *,
        e2e: float | None,
        usage: Usage | None,
        observer: StreamObserver | None = None,
    ) -> None:
        m = self.metrics
        m.requests.labels(ex.model, ex.backend, ex.endpoint, str(status)).inc()
        if ex.pair_id is not None and self.on_pair is not None:
            self.on_pair(ex.pair_id, ex, status, e2e, usage, observer)
        if ex.client is not None and usage is not None:
            ex.client.charge(usage.prompt_tokens + usage.completion_tokens)
        if status != 200:
            return
        s = m.series(ex.model, ex.backend)
        if e2e is not None:
            m.duration.labels(ex.model, ex.backend, ex.endpoint).observe(e2e)
        if observer is not None:
            if observer.ttft is not None:
                s.ttft.observe(observer.ttft)
            for gap in observer.gaps:
                s.itl.observe(gap)
            if observer.tpot is not None:
                s.tpot.observe(observer.tpot)
        if usage is not None:
            s.prompt_tokens.inc(usage.prompt_tokens)
            s.completion_tokens.inc(usage.completion_tokens)
            if ex.card is not None and ex.card.list_price is not None:
                s.cost_list_price.inc(list_price_usd(ex.card.list_price, usage.prompt_tokens, usage.completion_tokens))


def response_headers(ex: Exchange, content_type: str, extra: dict[str, str] | None = None) -> list[tuple[bytes, bytes]]:
    headers = {
        "content-type": content_type,
        "x-request-id": ex.request_id,
        "x-gateway-backend": ex.backend,
        "x-gateway-model": ex.model,
        **(extra or {}),
    }
    return [(k.encode(), v.encode()) for k, v in headers.items()]


class RelayResponse(Response):
    """Streams an open upstream SSE response to the client (see the module docstring).

    It subclasses ``Response`` only so that FastAPI passes it through untouched; ``Response.__init__`` is not
    called because this class sends its own start message and body.
    """

    def __init__(
        self,
        ex: Exchange,
        upstream: Upstream,
        recorder: Recorder,
        watch: ClientWatch,
        *,
        strip_usage: bool,
        keep_text: bool = False,
    ) -> None:
        self.ex = ex
        self.background = None
        self.upstream = upstream
        self.recorder = recorder
        self.strip_usage = strip_usage
        self.observer = StreamObserver(t0=ex.t0, keep_text=keep_text)
        self.settled: int | None = None
        self.watch = watch

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ex, observer = self.ex, self.observer
        status = 500  # stays so only if the relay itself fails unexpectedly
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": response_headers(
                        ex,
                        "text/event-stream; charset=utf-8",
                        {"cache-control": "no-cache", "x-accel-buffering": "no"},
                    ),
                }
            )
            try:
                disconnected, status_or_none = await self.watch.run(lambda: self._relay(send))
            except ShuttingDown as err:  # the drain time is over: end the stream explicitly, never just cut it
                disconnected, status_or_none = False, err.status
                if self.settled is None:
                    self.settled = err.status
                    await send({"type": "http.response.body", "body": err.sse_event(), "more_body": False})
            if disconnected and self.settled is not None:
                disconnected, status_or_none = False, self.settled
            status = CLIENT_CLOSED if disconnected else status_or_none
            if disconnected:
                log.info("client closed request %s to %s mid-stream", ex.request_id, ex.backend)
        except OSError:  # the client went away while we were sending
            status = CLIENT_CLOSED
        finally:
            self.watch.close()
            await close_upstream(self.upstream)
            self.upstream.release()
            self.recorder.metrics.series(ex.model, ex.backend).in_flight.dec()
            self.recorder.finished(
                ex,
                status,
                e2e=observer.e2e,
                usage=observer.usage if status == 200 else None,
                observer=observer,
            )

    async def _relay(self, send: Send) -> int:
        """Forward the stream; returns the status to record (200, or the in-band error's).

        ``self.settled`` is set as soon as the client has the whole answer (or the error event): a disconnect
        after that (clients often hang up on ``[DONE]``) does not make a delivered stream a 499."""
        observer, strip = self.observer, self.strip_usage
        framer = SSEFramer()
        backend = self.ex.backend
        try:
            async for data in iter_body(self.upstream):
                out = []
                for event in framer.feed(data):
                    if observer.observe(event) and strip:
                        continue
                    out.append(event.raw)
                if observer.done and self.settled is None:
                    if observer.error is not None:
                        self.upstream.broke("stream_error")
                    self.settled = 200 if observer.error is None else 500
                if out:
                    await send({"type": "http.response.body", "body": b"".join(out), "more_body": True})
            tail = framer.flush()
            if tail is not None:
                observer.observe(tail)
            if not observer.done:
                raise UpstreamStreamError(f"backend {backend} ended the stream without [DONE]")
        except GatewayError as err:
            return await self._fail(send, err, err.upstream_reason)
        except ValueError as err:  # an event larger than the framer accepts
            bad = UpstreamStreamError(f"backend {backend} sent a malformed stream: {err}")
            return await self._fail(send, bad, "bad_response")
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return self.settled or 200

    async def _fail(self, send: Send, err: GatewayError, reason: str | None) -> int:
        if reason:
            self.upstream.broke(reason)
        self.settled = err.status
        await send({"type": "http.response.body", "body": err.sse_event(), "more_body": False})
        return err.status


async def read_upstream(upstream: Upstream) -> bytes:
    try:
        return await read_body(upstream)
    finally:
        await close_upstream(upstream)
