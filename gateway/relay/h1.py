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
import ssl
import time
from collections import deque
from urllib.parse import urlsplit

from gateway.relay.h1_conn import (
    HIGH_WATER,
    MAX_HEAD_BYTES,
    ConnectFailed,
    Connection,
    Malformed,
    PoolTimeout,
    ReadFailed,
    Response,
    UpstreamIOError,
    WriteTimeout,
)

__all__ = [
    "HIGH_WATER",
    "KEEPALIVE_S",
    "MAX_HEAD_BYTES",
    "BadRequestHead",
    "ConnectFailed",
    "Malformed",
    "Pool",
    "PoolTimeout",
    "ReadFailed",
    "Response",
    "UpstreamIOError",
    "WriteTimeout",
]

KEEPALIVE_S = 4.0  # idle connections older than this are closed, not reused (uvicorn/vLLM close theirs at 5 s)
_BAD_HEADER_CHARS = ("\r", "\n", "\0")


class BadRequestHead(ValueError):
    """A header name or value the gateway was about to send holds CR, LF or NUL (header injection)."""


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
        self.idle: list[Connection] = []
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
            response.written = time.perf_counter()
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

    async def _drained(self, conn: Connection) -> None:
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

    async def _acquire(self) -> tuple[Connection, bool]:
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
                    lambda: Connection(self.max_head), self.host, self.port, ssl=self.ssl
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

    def _give_back(self, conn: Connection, reusable: bool) -> None:
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
