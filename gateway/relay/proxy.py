"""One proxied call, from an open upstream response to the client, and what it leaves in the metrics.

Streaming: ``RelayResponse`` is a plain ASGI response. It forwards every event's bytes as the backend sent them,
one ``send`` per upstream read, while a second task listens for the client's disconnect and cancels the relay
at once (so the upstream connection closes and vLLM aborts the generation). Whatever happens, the upstream
response is closed, the in-flight gauges go back down and the call is recorded exactly once.

The steady part of a stream, one plain token event per read, does not wake the relay task at all: the upstream
connection offers each read to ``RelayResponse._inline`` first, which observes it and starts the client ``send``
right there (``asgi.send_now``; uvicorn writes to the socket at once). The task handles everything else (the
first chunk, partial or several events, usage, errors, ``[DONE]``, a send that has to wait for the client) in
arrival order. Measured side by side, this took about a fifth off the CPU per streamed chunk.

An error after the first byte goes out in-band: an SSE error event, then ``data: [DONE]``. A stream that ends
without ``[DONE]`` is reported the same way: never a silent end that a client would take for a complete answer.

What a backend's failure becomes (the error reported, the status recorded, the reason counted once in
``gateway_upstream_errors_total``) is decided by the functions at the end of this module, for every reader of an
upstream response: ``count_failure``, ``error_answer`` (an error status), ``stream_failure`` (a stream broken off,
stalled or malformed), ``unterminated`` (no ``[DONE]``), ``done_status`` (the backend's own error event) and
``read_to_end``.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway.auth import Client
from gateway.config import ModelCard
from gateway.cost import list_price_usd
from gateway.errors import (
    GatewayError,
    PermissionDenied,
    RateLimited,
    ShuttingDown,
    UpstreamBadResponse,
    UpstreamStreamError,
    status_reason,
)
from gateway.metrics import NO_BACKEND, NO_MODEL, Metrics, observe_all
from gateway.protocol import Endpoint
from gateway.relay.asgi import ClientWatch, send_now
from gateway.relay.backends import Upstream, close_upstream, read_body
from gateway.relay.sse import SSEFramer, StreamObserver, Usage
from gateway.relay.validity import Contract, check

log = logging.getLogger("gateway.relay.proxy")

CLIENT_CLOSED = 499  # status label of a call the client abandoned (nginx's convention)
STREAM_ERROR = 500  # status recorded for a stream that carried the backend's own error event (relayed as it was)


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
    keep_text: bool = False  # keep the answer's text for the store (a mirrored pair whose rule says keep_text)
    client: Client | None = None  # the API key's client, when keys are configured (charged for tokens)
    reserved: int = 0  # tokens reserved against the client's tpm when the call was admitted
    prompt_estimate: int = 0  # the prompt's tokens as estimated at admission (charged if no usage ever comes)
    limit_headers: dict[str, str] | None = None  # x-ratelimit-* for the response
    overhead: float | None = None  # seconds spent inside the gateway, once the first token (or the body) went out
    contract: Contract | None = None  # the request asked for tool calls or JSON: its answer is kept and checked

    @property
    def keeps_answer(self) -> bool:
        """The observer keeps the answer (parses every chunk): for the store, or to check it against the contract."""
        return self.keep_text or self.contract is not None


PairHook = Callable[[str, Exchange, int, float | None, Usage | None, StreamObserver | None], None]


class Recorder:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.on_pair: PairHook | None = None  # shadow mirroring stores the client's side of each pair

    def failed(self, ex: Exchange, status: int) -> None:
        self.metrics.requests_of(ex.model, ex.backend, ex.endpoint, status).inc()
        settle(ex, status, None)

    def refused(self, model: str, err: GatewayError) -> None:
        """Count a call its API key may not make (``gateway_rejected_total``): over its limits, or a model it may
        not use. The Guard counts the refusals it makes itself; these are the handlers', once the body is read."""
        reason = "rate_limited" if isinstance(err, RateLimited) else None
        if isinstance(err, PermissionDenied):
            reason = "forbidden"
        if reason is not None:
            self.metrics.rejected.labels(model, reason).inc()

    def finished(
        self,
        ex: Exchange,
        status: int,
        *,
        e2e: float | None,
        usage: Usage | None,
        observer: StreamObserver | None = None,
    ) -> None:
        """Record a call that reached a backend. A stream the client abandoned (499) is still a measurement: its
        TTFT and gaps, and the completion tokens it was sent (the backend's usage if it came, else the token chunks
        relayed: a lower bound when a chunk carries several tokens) count in the metrics and against its key."""
        m = self.metrics
        m.requests_of(ex.model, ex.backend, ex.endpoint, status).inc()
        if ex.pair_id is not None and self.on_pair is not None:
            self.on_pair(ex.pair_id, ex, status, e2e, usage, observer)
        sent = None  # what a call that did not end well had delivered
        if usage is None and observer is not None and observer.first_token is not None:
            sent = observer.usage or Usage(0, observer.token_chunks)
        settle(ex, status, usage or sent)
        partial = status == CLIENT_CLOSED and sent is not None
        if partial:
            usage = sent
        elif status != 200:
            return
        s = m.series(ex.model, ex.backend)
        if ex.contract is not None and observer is not None and status == 200:
            _check(m, ex, ex.contract, observer)
        if ex.overhead is not None:
            s.overhead.observe(ex.overhead)
        if e2e is not None and status == 200:
            m.duration_of(ex.model, ex.backend, ex.endpoint).observe(e2e)
        if observer is not None:
            if observer.ttft is not None:
                s.ttft.observe(observer.ttft)
                if observer.first_answer is not None:
                    s.ttfat.observe(observer.first_answer - ex.t0)
                if (thinking := observer.reasoning_s) is not None:
                    s.reasoning_s.observe(thinking)
            observe_all(s.itl, observer.gaps)
            if status == 200:
                if observer.tpot is not None:
                    s.tpot.observe(observer.tpot)
                if observer.empty_answer:
                    s.empty_answers.inc()
        if usage is not None:
            s.prompt_tokens.inc(usage.prompt_tokens)
            s.completion_tokens.inc(usage.completion_tokens)
            if observer is None:
                s.answer_tokens.inc(usage.completion_tokens)
            else:
                if reasoning := observer.reasoning_tokens:
                    s.reasoning_tokens.inc(reasoning)
                s.answer_tokens.inc(observer.answer_tokens(usage.completion_tokens))
            if ex.card is not None and ex.card.list_price is not None:
                s.cost_list_price.inc(list_price_usd(ex.card.list_price, usage.prompt_tokens, usage.completion_tokens))


def _check(m: Metrics, ex: Exchange, contract: Contract, observer: StreamObserver) -> None:
    """Count what the finished answer got wrong (``gateway.relay.validity``); a cut answer is not judged."""
    if observer.finish_reason == "length":
        return
    calls = [(name, arguments) for name, arguments in (observer.tool_calls[i] for i in sorted(observer.tool_calls))]
    verdict = check(contract, "".join(observer.text), calls)
    if contract.tools:
        m.tool_call_checks.labels(ex.model, ex.backend).inc()
        for kind in verdict.tool_errors:
            m.tool_call_errors.labels(ex.model, ex.backend, kind).inc()
    if contract.json and not calls:
        m.structured_output_checks.labels(ex.model, ex.backend).inc()
        if verdict.structured_error is not None:
            m.structured_output_errors.labels(ex.model, ex.backend, verdict.structured_error).inc()


def settle(ex: Exchange, status: int, delivered: Usage | None) -> None:
    """Settle the tokens reserved for ``ex`` against its key, once: what it delivered (its prompt estimated when the
    backend's usage never came), else, for a client that left, its prompt (sent, maybe prefilled), else nothing."""
    if ex.client is None:
        return
    if delivered is not None:
        used = (delivered.prompt_tokens or ex.prompt_estimate) + delivered.completion_tokens
    else:
        used = ex.prompt_estimate if status == CLIENT_CLOSED else 0
    ex.client.settle(ex.reserved, used)
    ex.client, ex.reserved = None, 0


def response_headers(ex: Exchange, content_type: str, extra: dict[str, str] | None = None) -> list[tuple[bytes, bytes]]:
    headers = {
        "content-type": content_type,
        "x-request-id": ex.request_id,
        "x-gateway-backend": ex.backend,
        "x-gateway-model": ex.model,
        **(extra or {}),
        **(ex.limit_headers or {}),
    }
    return [(k.encode(), v.encode()) for k, v in headers.items()]


def server_timing(gateway_s: float, upstream_s: float) -> str:
    """The ``server-timing`` header: the gateway's own time before the upstream request was written, and the
    upstream's, from then to its first bytes (a stream's first chunk, a non-streaming call's whole body)."""
    return f"gateway;dur={gateway_s * 1000:.3f}, upstream;dur={upstream_s * 1000:.3f}"


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
        inline: bool = True,
    ) -> None:
        self.ex = ex
        self.background = None
        self.upstream = upstream
        self.recorder = recorder
        self.strip_usage = strip_usage
        self.observer = StreamObserver(t0=ex.t0, keep_text=keep_text)
        self.settled: int | None = None
        self.watch = watch
        self.framer = SSEFramer()
        self._send: Send | None = None
        self._sending: asyncio.Future[None] | None = None  # a send started by ``_inline`` that has not finished
        self._inline_on = inline
        self._context: contextvars.Context | None = None  # this call's, for the sends made from ``_inline``
        # The gateway's own time (``Exchange.overhead``): before the upstream request was written, and when the
        # bytes being relayed arrived (until the first token chunk is out).
        self._before = upstream.response.written - ex.t0
        self._arrived = upstream.first_at
        self._pre_read = bool(upstream.first)  # the first read is the chunk read before the response began

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
                        {
                            "cache-control": "no-cache",
                            "x-accel-buffering": "no",
                            "server-timing": server_timing(
                                self._before, self._arrived - self.upstream.response.written
                            ),
                        },
                    ),
                }
            )
            try:
                disconnected, status_or_none = await self.watch.run(lambda: self._relay(send))
            except ShuttingDown as err:  # the drain time is over: end the stream explicitly, never just cut it
                disconnected, status_or_none = False, err.status
                if self.settled is None:
                    self.settled = err.status
                    await self._sent()
                    await send({"type": "http.response.body", "body": err.sse_event(), "more_body": False})
            if disconnected and self.settled is not None:
                disconnected, status_or_none = False, self.settled
            status = CLIENT_CLOSED if disconnected else status_or_none
            if disconnected:
                log.info("client closed request %s to %s mid-stream", ex.request_id, ex.backend)
        except OSError:  # the client went away while we were sending
            status = CLIENT_CLOSED
        finally:
            if self._sending is not None:  # the client is gone or the task was cancelled: nothing more to send
                if not self._sending.done():
                    self._sending.cancel()
                elif not self._sending.cancelled():
                    self._sending.exception()  # retrieved: its error is moot now
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

        Most token events go out from ``_inline``, as they arrive; this task forwards the rest in order. ``self.
        settled`` is set as soon as the client has the whole answer (or the error event): a disconnect after that
        (clients often hang up on ``[DONE]``) does not make a delivered stream a 499. The send that carries
        ``[DONE]`` also ends the response (one write, not two: ``_end``). ``_inline`` is only offered bytes while
        this task waits in ``upstream.read``, so it cannot send in between the task's own sends."""
        observer, strip, upstream, framer = self.observer, self.strip_usage, self.upstream, self.framer
        response = upstream.response
        self._send = send
        if self._inline_on:
            # _inline runs in the upstream connection's callbacks, whose context is that of the call that opened
            # the (pooled) connection: its sends run in this call's own context instead.
            self._context = contextvars.copy_context()
            response.inline = self._inline
        try:
            while (data := await upstream.read()) is not None:
                await self._sent()
                if self._pre_read:
                    self._pre_read = False  # it keeps its own stamp
                elif self.ex.overhead is None:
                    self._arrived = response.arrived
                out = []
                for raw in framer.feed_raw(data):
                    if observer.observe_raw(raw) and strip:
                        continue
                    out.append(raw)
                if observer.done:
                    return await self._end(send, b"".join(out))
                if out:
                    await send({"type": "http.response.body", "body": b"".join(out), "more_body": True})
                    self._first_out()
            await self._sent()
            unterminated(framer, observer, self.ex.backend)
            return await self._end(send, b"")  # ``[DONE]`` without its blank line, at the very end
        except (GatewayError, ValueError) as exc:
            return await self._fail(send, stream_failure(upstream, exc))
        finally:
            response.inline = None

    def _inline(self, data: bytes) -> bool:
        """Bytes offered by the upstream connection while the relay task waits for them. One plain token event
        (most of a stream) is observed and sent to the client right here, with no task switch in between. Anything
        else (part of an event, several, usage, an error, ``[DONE]``) is left to the task, and so is everything
        while an earlier send is unfinished. True when taken."""
        if (
            self._sending is not None
            or self._send is None
            or self.framer.pending
            or not self.observer.observe_plain(data)
        ):
            return False
        message = {"type": "http.response.body", "body": data, "more_body": True}
        assert self._context is not None
        self._sending = self._context.run(send_now, self._send, message)
        if self.ex.overhead is None and self.observer.first_token is not None:
            self._arrived = self.observer.first_token  # stamped as the bytes were offered, on arrival
            self._first_out()
        return True

    def _first_out(self) -> None:
        """After a send: if the first token chunk has gone out, the call's time inside the gateway is known."""
        if self.ex.overhead is None and self.observer.first_token is not None:
            self.ex.overhead = self._before + time.perf_counter() - self._arrived

    async def _sent(self) -> None:
        """Wait for a send ``_inline`` started and could not finish (raising what it raised)."""
        if self._sending is not None:
            sending, self._sending = self._sending, None
            await sending

    async def _end(self, send: Send, last: bytes) -> int:
        """``[DONE]`` has arrived: send the rest with the end of the response, then read what is left upstream
        (nothing but the end of the body, from vLLM) so its connection can be reused. The client already has its
        whole answer, so a failure now only counts against the backend."""
        upstream = self.upstream
        upstream.response.inline = None  # the reads below are the task's own
        self.settled = done_status(upstream, self.observer)
        await send({"type": "http.response.body", "body": last, "more_body": False})
        self._first_out()
        await read_to_end(upstream)
        return self.settled

    async def _fail(self, send: Send, err: GatewayError) -> int:
        await self._sent()
        self.settled = err.status
        await send({"type": "http.response.body", "body": err.sse_event(), "more_body": False})
        return err.status


async def read_upstream(upstream: Upstream) -> bytes:
    try:
        return await read_body(upstream)
    finally:
        await close_upstream(upstream)


# -- what a backend's failure becomes, for every reader of an upstream response ---------------------------------
def count_failure(metrics: Metrics, backend: str, err: GatewayError) -> None:
    """Count a backend's failure in ``gateway_upstream_errors_total`` unless it already was (by the pool, which
    counts what it sees itself and marks the error ``counted``)."""
    if err.upstream_reason and not err.counted:
        metrics.upstream_errors.labels(backend, err.upstream_reason).inc()
        err.counted = True


def error_answer(backend: str, status: int, body: bytes) -> GatewayError | None:
    """A backend's answer with an error status, once the pool has no retry left. None when its body is a JSON
    object: that goes to the client as it is, with its status. Anything else is a 502 ``UpstreamBadResponse``,
    to be counted as ``bad_response`` unless its status already was (a 5xx or 429: by the pool)."""
    try:
        if isinstance(json.loads(body), dict):
            return None
    except ValueError:
        pass
    err = UpstreamBadResponse(f"backend {backend} answered {status} with a non-JSON body")
    err.counted = status_reason(status) is not None
    return err


def stream_failure(upstream: Upstream, exc: GatewayError | ValueError) -> GatewayError:
    """A stream that failed after it began (a read that failed or timed out, no ``[DONE]``, an event larger than
    the framer takes): the error to report, with the backend's failure counted once and held against it."""
    if isinstance(exc, GatewayError):
        err, reason = exc, exc.upstream_reason
    else:
        err, reason = (
            UpstreamStreamError(f"backend {upstream.backend.name} sent a malformed stream: {exc}"),
            "bad_response",
        )
    if reason:
        upstream.broke(reason)
    return err


def unterminated(framer: SSEFramer, observer: StreamObserver, backend: str) -> None:
    """The backend's body ended: the event it left without its blank line is observed (it may be ``[DONE]``);
    a stream still without ``[DONE]`` is an ``UpstreamStreamError``, never taken for a complete answer."""
    tail = framer.flush()
    if tail is not None:
        observer.observe(tail)
    if not observer.done:
        raise UpstreamStreamError(f"backend {backend} ended the stream without [DONE]")


def done_status(upstream: Upstream, observer: StreamObserver) -> int:
    """``[DONE]`` has arrived: the status to record, 200, or ``STREAM_ERROR`` when the backend put its own error
    event in the stream (relayed as it was; counted once as ``stream_error``)."""
    if observer.error is None:
        return 200
    upstream.broke("stream_error")
    return STREAM_ERROR


async def read_to_end(upstream: Upstream) -> None:
    """After ``[DONE]``: read what is left (nothing but the end of the body, from vLLM) so the connection can be
    reused. The answer is complete, so a failure now only counts against the backend."""
    try:
        while await upstream.read() is not None:
            pass
    except GatewayError as err:
        if err.upstream_reason:
            upstream.broke(err.upstream_reason)
