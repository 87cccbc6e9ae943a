"""A small Redis client for the one thing the gateway asks Redis on its hot path: run a script (``EVALSHA``) and
read its answer. One connection, requests pipelined on it and answered in order (Redis answers a connection's
commands in the order they came), so concurrent calls share it without waiting for each other's round trips.

Why not redis-py: its asyncio client spent about 200 µs of CPU per script call here (130 µs with hiredis), more
than half of what the gateway spends on a whole non-streaming call; this one spends a few tens (README,
"Scale-out: shared state", has the side-by-side figures). It speaks RESP2: simple strings, errors, integers, bulk
strings and arrays, which is all a script's answer can be.

A request that gets no answer within its timeout closes the connection (the answers after it could no longer be
matched to their requests): the requests waiting on it fail, and the next request connects again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
from collections import deque
from typing import Any, cast
from urllib.parse import unquote, urlsplit


class RedisError(Exception):
    """An error answer from Redis (``-ERR ...``), or the connection failing."""


def encode(*args: str | int | bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


_INCOMPLETE = object()


def parse(buf: bytes | bytearray, pos: int) -> tuple[Any, int]:
    """One reply from ``buf`` at ``pos``: (value, position after it), or (_INCOMPLETE, pos) if it has not all
    arrived. Errors are returned as RedisError instances, not raised."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return _INCOMPLETE, pos
    kind, line = buf[pos : pos + 1], bytes(buf[pos + 1 : end])
    after = end + 2
    if kind == b"+":
        return line.decode(), after
    if kind == b"-":
        return RedisError(line.decode(errors="replace")), after
    if kind == b":":
        return int(line), after
    if kind == b"$":
        n = int(line)
        if n < 0:
            return None, after
        if len(buf) < after + n + 2:
            return _INCOMPLETE, pos
        return bytes(buf[after : after + n]), after + n + 2
    if kind == b"*":
        n = int(line)
        if n < 0:
            return None, after
        items = []
        for _ in range(n):
            item, after = parse(buf, after)
            if item is _INCOMPLETE:
                return _INCOMPLETE, pos
            items.append(item)
        return items, after
    raise RedisError(f"unexpected reply type {kind!r}")


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.buf = bytearray()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio.Transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        pos = 0
        try:
            while self.waiting:
                value, after = parse(self.buf, pos)
                if value is _INCOMPLETE:
                    break
                pos = after
                future = self.waiting.popleft()
                if not future.done():
                    future.set_result(value)
        except (RedisError, ValueError) as exc:  # not RESP: nothing after this can be trusted
            self.fail(RedisError(f"bad reply from Redis: {exc}"))
            return
        del self.buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisError(f"connection to Redis lost: {exc}" if exc else "connection to Redis closed"))

    def fail(self, exc: Exception) -> None:
        self.closed = True
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def send(self, data: bytes) -> asyncio.Future[Any]:
        if self.closed or self.transport is None:
            raise RedisError("connection to Redis closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.waiting.append(future)
        self.transport.write(data)
        return future


class Redis:
    """``redis://[user@]host[:port][/db]`` or ``rediss://`` (TLS); the password is given apart."""

    def __init__(self, url: str, *, password: str | None = None, timeout_s: float = 0.25) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 6379
        self.tls = parts.scheme == "rediss"
        self.user = unquote(parts.username) if parts.username else None
        self.db = int(parts.path.strip("/") or 0)
        self.password = password
        self.timeout_s = timeout_s
        self._conn: _Connection | None = None
        self._connecting = asyncio.Lock()

    async def _connection(self) -> _Connection:
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        async with self._connecting:
            if self._conn is not None and not self._conn.closed:
                return self._conn
            loop = asyncio.get_running_loop()
            _, conn = await loop.create_connection(
                _Connection, self.host, self.port, ssl=ssl.create_default_context() if self.tls else None
            )
            setup = []
            if self.password is not None:
                auth = ("AUTH", self.user, self.password) if self.user else ("AUTH", self.password)
                setup.append(conn.send(encode(*auth)))
            if self.db:
                setup.append(conn.send(encode("SELECT", self.db)))
            for answer in await asyncio.gather(*setup):
                if isinstance(answer, RedisError):
                    conn.fail(answer)
                    raise answer
            self._conn = conn
            return conn

    async def execute(self, *args: str | int | bytes) -> Any:
        """One command's answer (an error answer raises RedisError); within ``timeout_s``, connecting included."""
        try:
            async with asyncio.timeout(self.timeout_s):
                conn = await self._connection()
                answer = await conn.send(encode(*args))
        except TimeoutError:
            if self._conn is not None:  # the answer may still come: the connection's order is lost
                self._conn.fail(RedisError("Redis did not answer in time"))
            raise
        if isinstance(answer, RedisError):
            raise answer
        return answer

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.fail(RedisError("client closed"))
            self._conn = None


class Script:
    """A Lua script run by its SHA-1 (``EVALSHA``), loaded into Redis the first time Redis does not know it."""

    def __init__(self, redis: Redis, source: str) -> None:
        self.redis, self.source = redis, source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, keys: list[str], args: list[str | int]) -> Any:
        try:
            return await self.redis.execute("EVALSHA", self.sha, len(keys), *keys, *args)
        except RedisError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        with contextlib.suppress(RedisError):
            await self.redis.execute("SCRIPT", "LOAD", self.source)
        return await self.redis.execute("EVALSHA", self.sha, len(keys), *keys, *args)
