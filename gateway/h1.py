"""A small HTTP/1.1 client for the relay path: asyncio protocols, httptools' C parser, a keep-alive pool per
backend.

Why not httpx here: httpcore's pool walks every pooled connection (a ``poll`` syscall each) on every request and
every response close, so its cost grows with the number of streams; at 100 concurrent streams it was half of the
gateway's CPU. This client does O(1) work per request: an idle stack, a count, and a FIFO of waiters when the pool
is full. It does what the gateway needs and no more: POST/GET with a body, ``Content-Length`` or chunked
responses, keep-alive, back-pressure (reading pauses while the consumer is behind), and closing the connection
when a response is abandoned (that is what makes vLLM abort a generation).

Errors: :class:`ConnectFailed` (refused, unreachable, connect timeout), :class:`ReadFailed` (the connection broke),
:class:`Malformed` (the backend broke HTTP: a bad or oversized head, a body over its cap), :class:`WriteTimeout`,
:class:`PoolTimeout`. Read deadlines are timers passed in by the caller (``within``).

A pooled connection is shared by every tenant's requests in turn, so a byte out of place would hand one client's
answer to the next (response desync). The rules that prevent it:

- interim ``1xx`` responses (but ``101``) are skipped: the final response is the one read;
- a connection is reused only if its response was read to the end of its framing (``Content-Length`` or chunked)
  with nothing after it, the backend allowed keep-alive, and nothing arrived while it sat idle (a byte on an idle
  connection closes it; on reuse the socket is also polled once, to catch bytes the loop has not read yet);
- every other connection is closed: a response abandoned half way (that is also what makes vLLM abort), one with
  bytes beyond its end, a broken or malformed one;
- idle connections are dropped after :data:`KEEPALIVE_S`, shorter than uvicorn's (and so vLLM's) 5 s, so a reused
  connection is rarely one the backend is closing;
- the response head is capped (:data:`MAX_HEAD_BYTES`) and, for a non-streaming call, the body (``max_body``);
  header names and values with CR, LF or NUL are refused before anything is sent.
"""

from __future__ import annotations

import asyncio
import select
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import cast
from urllib.parse import urlsplit

import httptools

KEEPALIVE_S = 4.0  # idle connections older than this are closed, not reused (uvicorn/vLLM close theirs at 5 s)
HIGH_WATER = 256 * 1024  # bytes buffered for a slow consumer before reading from the backend pauses
MAX_HEAD_BYTES = 64 * 1024  # a response head larger than this is refused (Malformed)
_BAD_HEADER_CHARS = ("\r", "\n", "\0")


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


class BadRequestHead(ValueError):
    """A header name or value the gateway was about to send holds CR, LF or NUL (header injection)."""


class _Connection(asyncio.Protocol):
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

    def __init__(self, pool: Pool, conn: _Connection, max_body: int | None = None) -> None:
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


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class Pool:
    """Keep-alive connections to one origin, at most ``max_connections`` open at once."""

    def __init__(
        self,
        base_url: str,
        *,
        max_connections: int,
        connect_timeout: float,
        pool_timeout: float,
        write_timeout: float = 30.0,
        max_head: int = MAX_HEAD_BYTES,
        keepalive_s: float = KEEPALIVE_S,
    ) -> None:
        parts = urlsplit(base_url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() if parts.scheme == "https" else None
        default_port = (parts.scheme == "https" and self.port == 443) or (parts.scheme == "http" and self.port == 80)
        self.authority = self.host if default_port else f"{self.host}:{self.port}"
        self.prefix = parts.path.rstrip("/")
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.pool_timeout = pool_timeout
        self.write_timeout = write_timeout
        self.max_head = max_head
        self.keepalive_s = keepalive_s
        self.idle: list[_Connection] = []
        self.open = 0  # connections open or being opened
        self.waiters: deque[asyncio.Future[None]] = deque()

    async def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes,
        within: float | None = None,
        *,
        max_body: int | None = None,
    ) -> Response:
        """Send a request; returns once the response head has arrived (the body is read from the response).
        TimeoutError when the head has not arrived ``within`` seconds (connecting included); WriteTimeout when the
        backend does not take the request's bytes within ``write_timeout``. Deadlines are plain timers, cheaper
        than cancel scopes on the hot path. ``max_body`` caps the response body (Malformed beyond it)."""
        loop = asyncio.get_running_loop()
        deadline = None if within is None else loop.time() + within
        head = self._head(method, path, headers, body)
        for attempt in (0, 1):
            conn, reused = await self._acquire()
            response = Response(self, conn, max_body)
            conn.response = response
            assert conn.transport is not None
            conn.transport.write(head + body if len(body) < 65536 else head)
            if len(body) >= 65536:
                conn.transport.write(body)
            timer = None if deadline is None else loop.call_at(deadline, _expire, response.head)
            try:
                if conn.drained is not None and not conn.drained.done():
                    await self._drained(conn)
                await response.head
            except Malformed:
                self._discard(response)
                raise
            except ReadFailed:
                self._discard(response)
                # A kept-alive connection the backend closed just as it was reused: try once on a new one.
                if reused and attempt == 0 and not conn.received_any:
                    continue
                raise
            except BaseException:
                self._discard(response)
                raise
            finally:
                if timer is not None:
                    timer.cancel()
            return response
        raise AssertionError("unreachable")

    async def _drained(self, conn: _Connection) -> None:
        assert conn.drained is not None
        try:
            async with asyncio.timeout(self.write_timeout):
                await asyncio.shield(conn.drained)
        except TimeoutError:
            raise WriteTimeout(f"the backend did not read the request within {self.write_timeout:g} s") from None

    def _discard(self, response: Response) -> None:
        response.released = True
        response.conn.close()
        self._give_back(response.conn, False)

    def _head(self, method: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
        lines = [f"{method} {self.prefix}{path} HTTP/1.1", f"host: {self.authority}"]
        for k, v in headers.items():
            if any(c in k or c in v for c in _BAD_HEADER_CHARS) or ":" in k:
                raise BadRequestHead(f"header {k!r} holds a character that would split the request head")
            lines.append(f"{k}: {v}")
        lines.append(f"content-length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _acquire(self) -> tuple[_Connection, bool]:
        now = time.monotonic()
        while self.idle:
            conn = self.idle.pop()  # the most recently used: the likeliest to be warm and alive
            if conn.closed or now - conn.idle_since > self.keepalive_s or conn.readable_while_idle():
                conn.close()
                self.open -= 1
                continue
            conn.reset()
            return conn, True
        if self.open >= self.max_connections:
            waiter = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            try:
                async with asyncio.timeout(self.pool_timeout):
                    await waiter
            except TimeoutError:
                raise PoolTimeout(f"no free connection within {self.pool_timeout:g} s") from None
            finally:
                if not waiter.done():
                    waiter.cancel()
            return await self._acquire()
        self.open += 1
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await asyncio.get_running_loop().create_connection(
                    lambda: _Connection(self.max_head), self.host, self.port, ssl=self.ssl
                )
        except TimeoutError:
            self.open -= 1
            self._wake_one()
            raise ConnectFailed(f"connect timeout ({self.connect_timeout:g} s)") from None
        except OSError as exc:
            self.open -= 1
            self._wake_one()
            raise ConnectFailed(exc.strerror or type(exc).__name__) from None
        except BaseException:
            self.open -= 1
            self._wake_one()
            raise
        return conn, False

    def _give_back(self, conn: _Connection, reusable: bool) -> None:
        conn.response = None
        if reusable:
            conn.idle_since = time.monotonic()
            self.idle.append(conn)
        else:
            self.open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()
