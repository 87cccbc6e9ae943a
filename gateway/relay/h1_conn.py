"""One HTTP/1.1 connection of the relay's client (``gateway.relay.h1``) and the response being read on it: an
asyncio protocol fed to httptools' C parser. The rules that keep answers from mixing across requests are listed
in ``h1``'s docstring; this module is where they are enforced, in the parser's callbacks.

The hot path: while the relay waits in ``Response.next_chunk`` with nothing buffered, each piece of the body is
offered to ``Response.inline`` straight from ``data_received`` (``Response.offer``), which sends it to the client
without a task switch (see ``gateway.relay``).
"""

from __future__ import annotations

import asyncio
import select
import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol, cast

import httptools

HIGH_WATER = 256 * 1024  # bytes buffered for a slow consumer before reading from the backend pauses
MAX_HEAD_BYTES = 64 * 1024  # a response head larger than this is refused (Malformed)


class UpstreamIOError(Exception):
    pass


class ConnectFailed(UpstreamIOError):
    pass


class ReadFailed(UpstreamIOError):
    pass


class Malformed(ReadFailed):
    """The backend broke HTTP: a response head or body over its cap, a parse error, an unexpected upgrade."""


class PoolTimeout(UpstreamIOError):
    pass


class WriteTimeout(UpstreamIOError):
    """The backend did not take the request's bytes within the write timeout."""


class Giver(Protocol):
    """What a response needs of its pool: to give its connection back (reusable or not)."""

    def _give_back(self, conn: Connection, reusable: bool) -> None: ...


class Connection(asyncio.Protocol):
    """One TCP connection and the response currently being read on it."""

    def __init__(self, max_head: int = MAX_HEAD_BYTES) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.response: Response | None = None
        self.parser = httptools.HttpResponseParser(self)
        self._headers: dict[str, str] = {}
        self._interim = False  # the message being parsed is a 1xx: skipped
        self.max_head = max_head
        self.head_bytes = 0  # bytes received before the final response's head was complete
        self.received_any = False
        self.drained: asyncio.Future[None] | None = None  # set while writing is paused (the backend is not reading)

    # -- asyncio.Protocol ------------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio.Transport subclasses

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None or response.complete:
            # Bytes nobody asked for (while idle, or after the end of the answer): glued onto the next response
            # they would hand it someone else's answer. The connection is finished.
            self.close()
            return
        self.received_any = True
        if response.status_code == 0:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(Malformed("unexpected protocol upgrade"))
            return
        except httptools.HttpParserError as exc:
            if response.complete:  # the answer is whole; what follows it is garbage
                self.close()
            else:
                self._fail(Malformed(f"malformed HTTP response: {exc}"))
            return
        if response.status_code == 0 and self.head_bytes > self.max_head:
            self._fail(Malformed(f"response head larger than {self.max_head} bytes"))

    def eof_received(self) -> bool | None:
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        drained = self.drained
        if drained is not None and not drained.done():
            drained.set_result(None)  # the write wait ends; the read then reports the broken connection
        response = self.response
        if response is not None and not response.complete:
            framed = "content-length" in response.headers or "transfer-encoding" in response.headers
            if response.status_code and not framed:  # a body delimited by the connection's end
                response.complete = True
                response.wake()
            elif response.status_code == 0:
                response.broken = ReadFailed("connection closed before a response")
            else:
                response.broken = ReadFailed("connection closed mid-response")
            response.wake()

    def pause_writing(self) -> None:
        if self.drained is None or self.drained.done():
            self.drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        drained = self.drained
        if drained is not None and not drained.done():
            drained.set_result(None)

    # -- httptools callbacks ----------------------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        response = self.response
        if response is not None and response.complete:
            # A second message after the answer ended: the backend sent more than it was asked (a late or
            # unsolicited response). The answer stands; the connection goes.
            response.keep_alive = False
            self.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        seen = self._headers.get(key)
        # A repeated header is one list-valued field (RFC 9110 5.3): kept, joined, not overwritten.
        self._headers[key] = text if seen is None else f"{seen}, {text}"

    def on_headers_complete(self) -> None:
        response = self.response
        if response is None or response.complete:
            return
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:  # interim (100 Continue, 103 Early Hints): the answer follows
            self._interim = True
            self._headers = {}
            return
        response.status_code = status
        response.headers = self._headers
        self._headers = {}
        if not response.head.done():
            response.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        response = self.response
        if response is None or response.complete:
            return
        if response.max_body is not None:
            response.body_bytes += len(body)
            if response.body_bytes > response.max_body:
                self._fail(Malformed(f"response body larger than {response.max_body} bytes"))
                return
        if response.inline is not None and response.offer(body):
            return
        if not response.buffer:
            response.arrived = time.perf_counter()
        response.buffer.append(body)
        response.buffered += len(body)
        if response.buffered > HIGH_WATER and self.transport is not None and not response.paused:
            response.paused = True
            self.transport.pause_reading()
        response.wake()

    def on_message_complete(self) -> None:
        response = self.response
        if self._interim:
            self._interim = False
            return
        if response is None or response.complete or response.status_code == 0:
            return
        response.complete = True
        response.keep_alive = self.parser.should_keep_alive()
        response.wake()

    # -------------------------------------------------------------------------------------------------------------
    def _fail(self, error: ReadFailed) -> None:
        response = self.response
        if response is not None and not response.complete:
            response.broken = error
            response.wake()
        self.close()

    def close(self) -> None:
        self.closed = True
        transport = self.transport
        if transport is not None:
            if transport.get_write_buffer_size():
                transport.abort()  # close() would wait to send a request nobody will answer now
            else:
                transport.close()

    def reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.response = None
        self.received_any = False
        self.head_bytes = 0
        self._interim = False
        self._headers = {}

    def readable_while_idle(self) -> bool:
        """Has the backend sent anything (bytes or its close) that the event loop has not delivered yet? One
        zero-timeout poll of this connection's socket, made only when it is taken from the pool."""
        transport = self.transport
        if transport is None or transport.get_extra_info("sslcontext") is not None:
            return False  # TLS reads its own records (session tickets, say) behind our back: rely on data_received
        sock = transport.get_extra_info("socket")
        if sock is None:
            return False
        try:
            readable, _, _ = select.select([sock.fileno()], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)


class Response:
    """A response being read. ``status_code`` and ``headers`` are set once ``Pool.request`` returns."""

    def __init__(self, pool: Giver, conn: Connection, max_body: int | None = None) -> None:
        self.pool = pool
        self.conn = conn
        self.max_body = max_body  # bytes of body accepted (None: no cap; a stream's events are capped by its framer)
        self.body_bytes = 0
        self.status_code = 0
        self.headers: dict[str, str] = {}
        self.loop = asyncio.get_running_loop()  # once: each call of get_running_loop costs a getpid() system call
        self.head: asyncio.Future[None] = self.loop.create_future()
        self.buffer: list[bytes] = []
        self.buffered = 0
        self.paused = False
        self.complete = False
        self.keep_alive = False
        self.broken: ReadFailed | None = None
        self.released = False
        self._waiter: asyncio.Future[None] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        # Set by a reader that can take bytes as they arrive (``RelayResponse``): while the reader waits in
        # ``next_chunk`` with nothing buffered, each piece of the body is offered to it first; True means taken.
        self.inline: Callable[[bytes], bool] | None = None
        self._within = 0.0
        self._wait_started = 0.0
        # perf_counter stamps, for the gateway's own time (``gateway_overhead_seconds``): when the request's bytes
        # were handed to the transport, and when the oldest bytes now in ``buffer`` arrived.
        self.written = 0.0
        self.arrived = 0.0

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self.broken is not None and not self.head.done():
            self.head.set_exception(self.broken)

    async def next_chunk(self, within: float | None = None) -> bytes | None:
        """Everything received since the last call (at least one byte), or None at the end of the body.
        TimeoutError if nothing arrives ``within`` seconds (one timer per wait, none when data is ready)."""
        while not self.buffer:
            if self.broken is not None:
                raise self.broken
            if self.complete:
                self._release()
                return None
            loop = self.loop
            waiter = self._waiter = loop.create_future()
            if within is not None:
                self._arm(loop, within)
            try:
                await waiter
            finally:
                self._waiter = None
        data = self.buffer[0] if len(self.buffer) == 1 else b"".join(self.buffer)
        self.buffer.clear()
        self.buffered = 0
        if self.paused and self.conn.transport is not None:
            self.paused = False
            self.conn.transport.resume_reading()
        return data

    def offer(self, body: bytes) -> bool:
        """Hand ``body`` to ``inline`` if the reader is blocked in ``next_chunk`` with nothing buffered before it
        (so order is kept); True if it took the bytes."""
        waiter = self._waiter
        if self.inline is None or self.buffer or waiter is None or waiter.done() or not self.inline(body):
            return False
        self._wait_started = self.loop.time()  # bytes arrived: the silence being timed starts again
        return True

    def _arm(self, loop: asyncio.AbstractEventLoop, within: float) -> None:
        """One watchdog timer per response, re-armed only when it fires: a wait that started at ``t`` times out at
        ``t + within`` without creating and cancelling a timer for every chunk."""
        self._within = within
        self._wait_started = loop.time()
        if self._watchdog is None:
            self._watchdog = loop.call_at(self._wait_started + within, self._check, loop)

    def _check(self, loop: asyncio.AbstractEventLoop) -> None:
        self._watchdog = None
        waiter = self._waiter
        if waiter is None or waiter.done() or self.released:
            return  # not waiting now: the next wait arms it again
        due = self._wait_started + self._within
        if loop.time() >= due:
            waiter.set_exception(TimeoutError())
        else:
            self._watchdog = loop.call_at(due, self._check, loop)

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        while (chunk := await self.next_chunk()) is not None:
            yield chunk

    async def aread(self) -> bytes:
        return b"".join([chunk async for chunk in self.aiter_raw()])

    async def aclose(self) -> None:
        """Done with the response: a fully read keep-alive connection goes back to the pool; any other is closed
        (so the backend sees the client leave)."""
        self._release()

    def _release(self) -> None:
        if self.released:
            return
        self.released = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        conn = self.conn
        reusable = self.complete and self.keep_alive and self.broken is None and not conn.closed
        if not reusable:
            conn.close()
        self.pool._give_back(conn, reusable)
