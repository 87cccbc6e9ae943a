"""The HTTP server side: uvicorn's settings for the gateway, and the limits it puts on client connections.

uvicorn parses requests with httptools here, and httptools has no head-size limit (uvicorn's
``h11_max_incomplete_event_size`` applies to h11 only): a client could send a head of any size, buffered whole
before the app sees it, and connections that send nothing stay open for ever. :class:`GuardedHttpTools` is
uvicorn's httptools protocol with the limits a public listener needs, as nginx has them:

- a request head larger than ``gateway.max_header_bytes`` is refused with 431 and the connection closed as soon as
  that many bytes have arrived without the head's end (at most one socket read more is ever buffered);
- ``client_header_timeout_s``: the whole head must arrive within it, counted from the connection's (or the next
  request's) first byte; ``client_body_timeout_s``: the longest silence while a body is being sent. Either way the
  client gets 408 (nothing, if it never sent a byte) and the connection is closed;
- ``keepalive_timeout_s``: an idle kept-alive connection is closed (uvicorn's own timer);
- ``max_connections``: beyond it, a request gets 503 with ``Retry-After`` and its connection is closed.

The responses written here (before any app ran) are OpenAI error objects from the gateway's error tree.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import math
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, cast

from prometheus_client import disable_created_metrics
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from gateway.config import Settings
from gateway.errors import GatewayError, HeadersTooLarge, RequestTimeout, TooManyConnections

log = logging.getLogger("gateway.server")
LINGER_BYTES = 256 * 1024  # after a refusal: what a client may still send, read and dropped, before the close
LINGER_S = 1.0


@dataclass(frozen=True)
class ClientLimits:
    max_header_bytes: int = 32 * 1024
    header_timeout_s: float = 30.0
    body_timeout_s: float = 60.0
    max_connections: int = 4096

    @classmethod
    def of(cls, settings: Settings) -> ClientLimits:
        g = settings.gateway
        return cls(g.max_header_bytes, g.client_header_timeout_s, g.client_body_timeout_s, g.max_connections)


def _refusal(err: GatewayError) -> bytes:
    """A whole HTTP/1.1 response for ``err``, closing the connection."""
    body = err.body_bytes()
    head = [f"HTTP/1.1 {err.status} {HTTPStatus(err.status).phrase}", "content-type: application/json"]
    head += [f"content-length: {len(body)}", "connection: close"]
    head += [f"{k}: {v}" for k, v in err.headers().items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


IDLE, HEAD, BODY = 0, 1, 2  # what a connection is waiting for from its client: nothing (a request is being
# answered, or none has begun), the rest of a head, the rest of a body


class GuardedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with head-size, timeout and connection limits (see the module docstring).

    One timer per connection, moved lazily: a phase change only writes a deadline, and the timer, when it fires
    early, re-arms itself for the deadline it finds (a request costs no timer creation or cancellation)."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: ClientLimits,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits
        self.phase = IDLE
        self.deadline = 0.0
        self.head_bytes = 0
        self.over_limit = False
        self.refused = False
        self.linger = 0
        self.timer: asyncio.TimerHandle | None = None

    # -- connection ---------------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.over_limit = len(self.connections) > self.limits.max_connections
        self._expect(HEAD, self.limits.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self.phase = IDLE
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.refused:  # lingering: dropped, up to a point
            self.linger -= len(data)
            if self.linger <= 0:
                self.transport.close()
            return
        phase = self.phase
        if phase == BODY:
            self.deadline = self.loop.time() + self.limits.body_timeout_s  # the body moved: the silence restarts
        else:
            if phase == IDLE:  # the first byte of the next request on a kept-alive connection
                self._expect(HEAD, self.limits.header_timeout_s)
            self.head_bytes += len(data)
        super().data_received(data)
        if self.phase == HEAD and self.head_bytes > self.limits.max_header_bytes and not self.refused:
            limit = self.limits.max_header_bytes
            self._refuse(HeadersTooLarge(f"request head larger than {limit} bytes (gateway.max_header_bytes)"))

    # -- parser callbacks -----------------------------------------------------------------------------------------
    def on_headers_complete(self) -> None:
        self.head_bytes = 0
        if self.over_limit:
            limit = self.limits.max_connections
            self._refuse(TooManyConnections(f"the gateway is at its connection limit ({limit})", retry_after=1))
            return
        self._expect(BODY, self.limits.body_timeout_s)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self.refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self.refused:
            return
        self.phase = IDLE  # the request is whole: the client may wait as long as the answer takes
        super().on_message_complete()

    # -------------------------------------------------------------------------------------------------------------
    def _expect(self, phase: int, seconds: float) -> None:
        self.phase = phase
        self.deadline = self.loop.time() + seconds
        if self.timer is None:
            self.timer = self.loop.call_at(self.deadline, self._check)

    def _check(self) -> None:
        self.timer = None
        if self.phase == IDLE or self.refused or self.transport.is_closing():
            return
        if self.loop.time() < self.deadline:
            self.timer = self.loop.call_at(self.deadline, self._check)
        elif self.phase == HEAD:
            self._head_timed_out()
        else:
            self._body_timed_out()

    def _head_timed_out(self) -> None:
        if self.head_bytes == 0:  # nothing of a request: just close, as for an idle keep-alive connection
            self.transport.close()
            return
        self._refuse(RequestTimeout(f"request head not received within {self.limits.header_timeout_s:g} s"))

    def _body_timed_out(self) -> None:
        if self.flow.read_paused:  # the app is behind, not the client: wait for it
            self._expect(BODY, self.limits.body_timeout_s)
            return
        cycle = self.cycle
        if cycle is not None and cycle.response_started:
            self.transport.close()
            return
        self._refuse(RequestTimeout(f"request body stalled for {self.limits.body_timeout_s:g} s"))

    def _refuse(self, err: GatewayError) -> None:
        """Answer with ``err`` and close the connection, whatever the request was.

        A lingering close, as nginx does: the answer goes out with our half of the connection (FIN), then what the
        client still sends is read and dropped for a moment (at most ``LINGER_BYTES``, ``LINGER_S``). Closing at
        once with unread bytes would make the kernel reset the connection, and the client could lose the answer."""
        log.info("refused a client connection: %s", err.message)
        self.refused = True
        self.phase = IDLE
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False
        self.transport.write(_refusal(err))
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.linger = LINGER_BYTES
            self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()


GC_GEN0_THRESHOLD = 20_000  # CPython's default is 700 (2,000 in 3.13)


def tune_process() -> None:
    """Process-wide settings of a serving gateway, made by ``gateway serve`` (and each of its workers) once the app
    is built, never by a constructor: an app a test builds in a thread leaves its process alone.

    - prometheus-client's ``*_created`` series are off: they double the exposition and nothing here reads them;
    - the garbage collector: what is built so far lives as long as the process, so it is frozen out of the
      collector's scans, and the young generation is collected less often (a request allocates a few hundred
      short-lived objects)."""
    disable_created_metrics()  # type: ignore[no-untyped-call]
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])


def server_options(settings: Settings, host: str, port: int, *, access_log: bool = False) -> dict[str, Any]:
    """uvicorn's settings for the gateway, one process or several."""
    g = settings.gateway
    return {
        "host": host,
        "port": port,
        "log_level": g.log_level,
        "access_log": access_log,
        "http": cast(Any, functools.partial(GuardedHttpTools, limits=ClientLimits.of(settings))),
        "timeout_keep_alive": math.ceil(g.keepalive_timeout_s),
        "timeout_graceful_shutdown": math.ceil(g.drain_s) + 2,  # late calls end at drain_s
        "proxy_headers": False,  # the gateway never uses the client address: skip rewriting it per request
        "server_header": False,  # no "server: uvicorn" on every response
    }
