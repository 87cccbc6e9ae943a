"""A small HTTP/1.1 client for the relay path: asyncio protocols, httptools' C parser, a keep-alive pool per
backend.

Why not httpx here: httpcore's pool walks every pooled connection (a ``poll`` syscall each) on every request and
every response close, so its cost grows with the number of streams; at 100 concurrent streams it was half of the
gateway's CPU. This client does O(1) work per request: an idle stack, a count, and a FIFO of waiters when the pool
is full. It does what the gateway needs and no more: POST/GET with a body, ``Content-Length`` or chunked
responses, keep-alive, back-pressure (reading pauses while the consumer is behind), and closing the connection
when a response is abandoned (that is what makes vLLM abort a generation).

Errors: :class:`ConnectFailed` (refused, unreachable, connect timeout), :class:`ReadFailed` (the connection broke
or the response was malformed), :class:`PoolTimeout`. Read deadlines are timers passed in by the caller (``within``).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import cast
from urllib.parse import urlsplit

import httptools

KEEPALIVE_S = 30.0  # idle connections older than this are closed, not reused (uvicorn/vLLM close theirs at 5 s)
HIGH_WATER = 256 * 1024  # bytes buffered for a slow consumer before reading from the backend pauses


class UpstreamIOError(Exception):
    pass


class ConnectFailed(UpstreamIOError):
    pass


class ReadFailed(UpstreamIOError):
    pass


class PoolTimeout(UpstreamIOError):
    pass


class _Connection(asyncio.Protocol):
    """One TCP connection and the response currently being read on it."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.response: Response | None = None
        self.parser = httptools.HttpResponseParser(self)
        self._headers: dict[str, str] = {}
        self._field = b""
        self.received_any = False

    # -- asyncio.Protocol ------------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio.Transport subclasses

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ReadFailed("unexpected protocol upgrade"))
        except httptools.HttpParserError as exc:
            self._fail(ReadFailed(f"malformed HTTP response: {exc}"))

    def eof_received(self) -> bool | None:
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
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

    # -- httptools callbacks ----------------------------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        response = self.response
        if response is None:
            return
        response.status_code = self.parser.get_status_code()
        response.headers = self._headers
        self._headers = {}
        if not response.head.done():
            response.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        response = self.response
        if response is None:
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
        if response is None:
            return
        response.complete = True
        response.keep_alive = self.parser.should_keep_alive()
        response.wake()

    # -------------------------------------------------------------------------------------------------------------
    def _fail(self, error: ReadFailed) -> None:
        response = self.response
        if response is not None:
            response.broken = error
            response.wake()
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.response = None
        self.received_any = False


class Response:
    """A response being read. ``status_code`` and ``headers`` are set once ``Pool.request`` returns."""

    def __init__(self, pool: Pool, conn: _Connection) -> None:
        self.pool = pool
        self.conn = conn
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

    def __init__(self, base_url: str, *, max_connections: int, connect_timeout: float, pool_timeout: float) -> None:
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
        self.idle: list[_Connection] = []
        self.open = 0  # connections open or being opened
        self.waiters: deque[asyncio.Future[None]] = deque()

    async def request(
        self, method: str, path: str, headers: dict[str, str], body: bytes, within: float | None = None
    ) -> Response:
        """Send a request; returns once the response head has arrived (the body is read from the response).
        TimeoutError when the head has not arrived ``within`` seconds (connecting included). Deadlines are plain
        timers, cheaper than cancel scopes on the hot path."""
        loop = asyncio.get_running_loop()
        deadline = None if within is None else loop.time() + within
        head = self._head(method, path, headers, body)
        for attempt in (0, 1):
            conn, reused = await self._acquire()
            response = Response(self, conn)
            conn.response = response
            assert conn.transport is not None
            conn.transport.write(head + body if len(body) < 65536 else head)
            if len(body) >= 65536:
                conn.transport.write(body)
            timer = None if deadline is None else loop.call_at(deadline, _expire, response.head)
            try:
                await response.head
            except ReadFailed:
                response.released = True
                conn.close()
                self._give_back(conn, False)
                # A kept-alive connection the backend closed just as it was reused: try once on a new one.
                if reused and attempt == 0 and not conn.received_any:
                    continue
                raise
            except BaseException:
                response.released = True
                conn.close()
                self._give_back(conn, False)
                raise
            finally:
                if timer is not None:
                    timer.cancel()
            return response
        raise AssertionError("unreachable")

    def _head(self, method: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
        lines = [f"{method} {self.prefix}{path} HTTP/1.1", f"host: {self.authority}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        lines.append(f"content-length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _acquire(self) -> tuple[_Connection, bool]:
        now = time.monotonic()
        while self.idle:
            conn = self.idle.pop()  # the most recently used: the likeliest to be warm and alive
            if conn.closed or now - conn.idle_since > KEEPALIVE_S:
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
                    _Connection, self.host, self.port, ssl=self.ssl
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
