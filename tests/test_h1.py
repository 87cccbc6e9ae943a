"""The relay's HTTP/1.1 client (gateway.relay.h1) against scripted raw-socket servers: a backend, or something in front
of one, that bends HTTP. The property at stake is that a pooled connection never hands one request's answer to
the next (response desync), plus the caps and timeouts that keep a bad backend from exhausting the gateway."""

from __future__ import annotations

import asyncio
import functools
import json
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import httpx
import pytest

from gateway.app import create_app
from gateway.devstack.supervisor import free_port
from gateway.relay import h1
from tests.conftest import card, settings_for
from tests.servers import ThreadServer

T = TypeVar("T")
Handler = Callable[[socket.socket, int], None]  # (connection, its index) -> serve it, then return


class Scripted:
    """A TCP server on a free loopback port; each connection is served by ``handler`` in a thread of its own."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.connections = 0
        self.requests: list[bytes] = []  # every request head and body read by ``read_request``, in order
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", self.port))
        self._sock.listen(64)
        self._sock.settimeout(0.1)
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            index = self.connections
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn, index), daemon=True).start()

    def _serve(self, conn: socket.socket, index: int) -> None:
        conn.settimeout(10)
        try:
            self.handler(conn, index)
        except OSError:
            pass
        finally:
            conn.close()

    def read_request(self, conn: socket.socket) -> bytes | None:
        """One request (head and Content-Length body) from ``conn``; None when the client closed it."""
        data = b""
        while b"\r\n\r\n" not in data:
            more = conn.recv(65536)
            if not more:
                return None
            data += more
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(
            (int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")),
            0,
        )
        while len(body) < length:
            more = conn.recv(65536)
            if not more:
                return None
            body += more
        self.requests.append(head + b"\r\n\r\n" + body)
        return body

    def __enter__(self) -> Scripted:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._thread.join(2)
        self._sock.close()


def ok(body: bytes, *extra: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: " + str(len(body)).encode() + b"\r\n"
    return head + b"".join(x + b"\r\n" for x in extra) + b"\r\n" + body


def pool(server: Scripted, **options: float) -> h1.Pool:
    return h1.Pool(server.url, max_connections=8, connect_timeout=2, pool_timeout=2, **options)  # type: ignore[arg-type]


def drive(p: h1.Pool, work: Callable[[h1.Pool], Awaitable[T]]) -> T:
    """Run ``work(p)`` in a new event loop, then close the pool's connections."""

    async def main() -> T:
        try:
            return await work(p)
        finally:
            p.close()
            await asyncio.sleep(0.01)  # the transports' close callbacks run

    return asyncio.run(main())


async def call(p: h1.Pool, body: bytes = b"{}", **headers: str) -> tuple[int, dict[str, str], bytes]:
    response = await p.request("POST", "/v1/x", {"content-type": "application/json", **headers}, body, 5)
    data = await response.aread()
    await response.aclose()
    return response.status_code, response.headers, data


async def a_then_b(p: h1.Pool) -> list[bytes]:
    """The bodies of two calls in turn (``a``, then ``b``), on the pool's connections."""
    return [(await call(p, b"a"))[2], (await call(p, b"b"))[2]]


def echo(server_of: Callable[[], Scripted], extra: Callable[[socket.socket, int, int], None] | None = None) -> Handler:
    """Answers each request with ``answer-to:<its body>``; ``extra(conn, connection index, request index)`` runs
    after each answer (to misbehave)."""

    def handler(conn: socket.socket, index: int) -> None:
        n = 0
        while (body := server_of().read_request(conn)) is not None:
            conn.sendall(ok(b"answer-to:" + body))
            if extra is not None:
                extra(conn, index, n)
            n += 1

    return handler


@contextmanager
def scripted(make: Callable[[Callable[[], Scripted]], Handler]) -> Iterator[Scripted]:
    box: list[Scripted] = []
    server = Scripted(make(lambda: box[0]))
    box.append(server)
    with server:
        yield server


# -- response desync ------------------------------------------------------------------------------------------------
def test_interim_responses_are_skipped_and_the_final_one_is_read() -> None:
    def make(server: Callable[[], Scripted]) -> Handler:
        def handler(conn: socket.socket, index: int) -> None:
            while (body := server().read_request(conn)) is not None:
                conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                time.sleep(0.05)  # the answer comes later, on its own
                conn.sendall(b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n")
                conn.sendall(ok(b"answer-to:" + body))

        return handler

    async def run(p: h1.Pool) -> list[tuple[int, bytes]]:
        return [(s, b) for s, _, b in [await call(p, b"tenant-a"), await call(p, b"tenant-b")]]

    with scripted(make) as server:
        answers = drive(pool(server), run)
    assert answers == [(200, b"answer-to:tenant-a"), (200, b"answer-to:tenant-b")]
    assert server.connections == 1  # read to its end: the connection was reused, and correctly


def test_bytes_arriving_on_an_idle_connection_close_it() -> None:
    def unsolicited(conn: socket.socket, index: int, n: int) -> None:
        time.sleep(0.05)
        conn.sendall(ok(b"someone-elses-answer"))

    async def run(p: h1.Pool, block: bool) -> bytes:
        await call(p, b"a")
        if block:  # the loop is blocked: the stray bytes wait in the socket, unread (the poll on reuse)
            time.sleep(0.3)  # noqa: ASYNC251
        else:
            await asyncio.sleep(0.3)  # the loop reads them while the connection is idle
        return (await call(p, b"b"))[2]

    for block in (False, True):
        with scripted(lambda server: echo(server, unsolicited)) as server:
            assert drive(pool(server), functools.partial(run, block=block)) == b"answer-to:b", block
            assert server.connections == 2


def test_bytes_beyond_the_end_of_a_message_close_the_connection() -> None:
    def make(server: Callable[[], Scripted]) -> Handler:
        def handler(conn: socket.socket, index: int) -> None:
            while (body := server().read_request(conn)) is not None:
                conn.sendall(ok(b"answer-to:" + body) + ok(b"a-smuggled-answer"))  # one write, two responses

        return handler

    with scripted(make) as server:
        assert drive(pool(server), a_then_b) == [b"answer-to:a", b"answer-to:b"]
        assert server.connections == 2


def test_a_response_not_read_to_its_end_closes_its_connection() -> None:
    closed = threading.Event()

    def make(server: Callable[[], Scripted]) -> Handler:
        def handler(conn: socket.socket, index: int) -> None:
            server().read_request(conn)
            conn.sendall(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
            conn.settimeout(5)
            if conn.recv(1) == b"":
                closed.set()

        return handler

    async def run(p: h1.Pool) -> None:
        response = await p.request("POST", "/v1/x", {}, b"{}", 5)
        assert await response.next_chunk(5) == b"first"
        await response.aclose()  # abandoned half way
        assert p.idle == [] and p.open == 0

    with scripted(make) as server:
        drive(pool(server), run)
        assert closed.wait(5), "the backend never saw the connection close"


def test_connection_close_is_honoured_and_a_backend_closing_idle_connections_is_harmless() -> None:
    def close_after(conn: socket.socket, index: int, n: int) -> None:
        conn.close()  # after every answer, as a server with a short keep-alive would

    def make(server: Callable[[], Scripted]) -> Handler:
        def handler(conn: socket.socket, index: int) -> None:
            while (body := server().read_request(conn)) is not None:
                conn.sendall(ok(b"answer-to:" + body, b"connection: close"))

        return handler

    async def run(p: h1.Pool, pause: float) -> list[bytes]:
        out = []
        for name in (b"a", b"b", b"c"):
            out.append((await call(p, name))[2])
            await asyncio.sleep(pause)
        return out

    with scripted(make) as server:
        assert drive(pool(server), lambda p: run(p, 0)) == [b"answer-to:a", b"answer-to:b", b"answer-to:c"]
        assert server.connections == 3
    with scripted(lambda server: echo(server, close_after)) as server:
        assert drive(pool(server), lambda p: run(p, 0.1)) == [b"answer-to:a", b"answer-to:b", b"answer-to:c"]
        assert server.connections == 3


def test_idle_connections_expire_before_the_backends_keep_alive_timeout() -> None:
    assert h1.KEEPALIVE_S < 5.0  # uvicorn's (and so vLLM's) default keep-alive

    async def run(p: h1.Pool) -> None:
        await call(p, b"a")
        await call(p, b"b")  # reused
        await asyncio.sleep(0.4)
        await call(p, b"c")  # older than keepalive_s: a new connection

    with scripted(echo) as server:
        drive(pool(server, keepalive_s=0.3), run)
        assert server.connections == 2


# -- framing ------------------------------------------------------------------------------------------------------
def test_chunked_edge_cases_are_read_and_the_connection_reused() -> None:
    def make(server: Callable[[], Scripted]) -> Handler:
        def handler(conn: socket.socket, index: int) -> None:
            server().read_request(conn)
            head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
            body = b"5;name=value\r\nhello\r\nA\r\n, world!!!\r\n0\r\nx-trailer: yes\r\n\r\n"  # extension, hex, trailer
            for i in range(len(head + body)):  # a byte at a time: sizes and CRLFs split across reads
                conn.sendall((head + body)[i : i + 1])
                if i % 7 == 0:
                    time.sleep(0.001)
            while (body2 := server().read_request(conn)) is not None:
                conn.sendall(ok(b"answer-to:" + body2))

        return handler

    with scripted(make) as server:
        assert drive(pool(server), a_then_b) == [b"hello, world!!!", b"answer-to:b"]
        assert server.connections == 1


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",  # not hex
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 7\r\n\r\nhello",  # conflicting lengths
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",  # both framings
        b"HTP/1.1 200 OK\r\n\r\n",
    ],
)
def test_malformed_responses_are_refused(answer: bytes) -> None:
    def make(server: Callable[[], Scripted]) -> Handler:
        def handler(conn: socket.socket, index: int) -> None:
            server().read_request(conn)
            conn.sendall(answer)
            time.sleep(0.5)

        return handler

    async def run(p: h1.Pool) -> None:
        with pytest.raises(h1.ReadFailed):
            await call(p)
        assert p.idle == []

    with scripted(make) as server:
        drive(pool(server), run)


def test_repeated_response_headers_are_kept() -> None:
    def make(server: Callable[[], Scripted]) -> Handler:
        def handler(conn: socket.socket, index: int) -> None:
            server().read_request(conn)
            conn.sendall(ok(b"x", b"x-dup: one", b"X-Dup: two", b"set-cookie: a=1"))

        return handler

    with scripted(make) as server:
        _, headers, _ = drive(pool(server), call)
    assert headers["x-dup"] == "one, two" and headers["set-cookie"] == "a=1"


# -- caps and timeouts -------------------------------------------------------------------------------------------
def test_an_oversized_response_head_is_refused() -> None:
    def make(server: Callable[[], Scripted]) -> Handler:
        def handler(conn: socket.socket, index: int) -> None:
            server().read_request(conn)
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            for i in range(10_000):  # 1 MB of headers, and more to come
                conn.sendall(b"x-filler-%05d: %s\r\n" % (i, b"y" * 80))

        return handler

    async def run(p: h1.Pool) -> None:
        with pytest.raises(h1.Malformed, match="response head larger than 65536 bytes"):
            await call(p)

    with scripted(make) as server:
        drive(pool(server), run)


def test_an_oversized_response_body_is_refused() -> None:
    def make(server: Callable[[], Scripted]) -> Handler:
        def handler(conn: socket.socket, index: int) -> None:
            server().read_request(conn)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 10000000\r\n\r\n")
            for _ in range(100):
                conn.sendall(b"z" * 100_000)

        return handler

    async def run(p: h1.Pool) -> None:
        response = await p.request("POST", "/v1/x", {}, b"{}", 5, max_body=1_000_000)
        with pytest.raises(h1.Malformed, match="response body larger than 1000000 bytes"):
            await response.aread()
        await response.aclose()
        assert p.open == 0

    with scripted(make) as server:
        drive(pool(server), run)


@pytest.mark.parametrize(
    "headers",
    [{"x-request-id": "a\r\nx-injected: 1"}, {"x-a": "b\nc"}, {"x-a\r\nx-b": "c"}, {"x-a": "nul\0"}, {"x-a:b": "c"}],
)
def test_header_names_and_values_with_cr_lf_are_refused_before_sending(headers: dict[str, str]) -> None:
    async def run(p: h1.Pool) -> None:
        with pytest.raises(h1.BadRequestHead):
            await p.request("POST", "/v1/x", headers, b"{}", 5)

    with scripted(echo) as server:
        drive(pool(server), run)
        time.sleep(0.1)
        assert server.connections == 0 and server.requests == []


def test_a_backend_that_does_not_read_the_request_hits_the_write_timeout() -> None:
    stop = threading.Event()

    def make(server: Callable[[], Scripted]) -> Handler:
        def handler(conn: socket.socket, index: int) -> None:
            stop.wait(10)  # accepts, never reads

        return handler

    async def run(p: h1.Pool) -> float:
        started = time.monotonic()
        with pytest.raises(h1.WriteTimeout):
            await p.request("POST", "/v1/x", {}, b"x" * (64 * 1024 * 1024), 30)
        return time.monotonic() - started

    with scripted(make) as server:
        try:
            took = drive(pool(server, write_timeout=0.5), run)
        finally:
            stop.set()
    assert 0.5 <= took < 5


# -- through the gateway ------------------------------------------------------------------------------------------
def test_tenants_behind_a_backend_sending_interim_responses_each_get_their_own_answer() -> None:
    """The reported desync, end to end: a backend (or a proxy in front of it) answers every request with
    ``100 Continue`` first. Each client must receive the answer to its own prompt, call after call."""

    def make(server: Callable[[], Scripted]) -> Handler:
        def handler(conn: socket.socket, index: int) -> None:
            while (body := server().read_request(conn)) is not None:
                if server().requests[-1].startswith(b"GET /health"):
                    conn.sendall(ok(b""))
                    continue
                prompt = json.loads(body)["messages"][0]["content"]
                conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                time.sleep(0.02)
                answer = {
                    "id": "x",
                    "object": "chat.completion",
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": f"private answer for {prompt}"}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }  # fmt: skip
                data = json.dumps(answer).encode()
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                    % (len(data), data)
                )

        return handler

    with scripted(make) as backend:
        settings = settings_for(
            [{"name": "b", "base_url": backend.url, "models": ["m"]}], [card("m", "llama", "Meta", "US")]
        )
        with ThreadServer(create_app(settings)) as gw:
            for tenant in ("tenant-a", "tenant-b", "tenant-c", "tenant-a", "tenant-b"):
                body = {"model": "m", "messages": [{"role": "user", "content": tenant}]}
                r = httpx.post(f"{gw.url}/v1/chat/completions", json=body, timeout=10)
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["message"]["content"] == f"private answer for {tenant}"
