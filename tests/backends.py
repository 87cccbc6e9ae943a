"""Small purpose-built backends for tests: a recorder that answers with fixed bytes, and misbehaving servers."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from gateway.devstack.supervisor import free_port


@dataclass
class Recorder:
    """Answers every POST with ``status``/``body`` (or streams ``chunks``), remembering what it received."""

    body: bytes = b'{"choices":[{"message":{"content":"ok"}}],"usage":{"prompt_tokens":2,"completion_tokens":3}}'
    status: int = 200
    content_type: str = "application/json"
    chunks: Sequence[bytes | Pause | Die] = field(default_factory=list)
    chunk_delay: float = 0.0
    delay: float = 0.0
    health_delay: float = 0.0  # seconds before /health answers (read per check: a test may change it)
    received: list[tuple[bytes, dict[str, str]]] = field(default_factory=list)

    def app(self) -> Starlette:
        async def post(request: Request) -> Response:
            self.received.append((await request.body(), dict(request.headers)))
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.chunks:
                return StreamingResponse(self._stream(), media_type="text/event-stream")
            return Response(self.body, status_code=self.status, media_type=self.content_type)

        async def health(request: Request) -> Response:
            if self.health_delay:
                await asyncio.sleep(self.health_delay)
            return Response(status_code=200)

        return Starlette(
            routes=[
                Route("/v1/chat/completions", post, methods=["POST"]),
                Route("/v1/completions", post, methods=["POST"]),
                Route("/health", health),
            ]
        )

    async def _stream(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            if isinstance(chunk, Pause):
                await asyncio.sleep(chunk.seconds)
                continue
            if isinstance(chunk, Die):
                raise ConnectionAbortedError("scripted death mid-stream")  # uvicorn drops the connection
            if self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
            yield chunk


@dataclass(frozen=True)
class Pause:
    """In ``Recorder.chunks``: wait this long before the next chunk (the response headers are already out)."""

    seconds: float


@dataclass(frozen=True)
class Die:
    """In ``Recorder.chunks``: the backend dies here, the connection closes without the chunked terminator."""


class SlamServer:
    """Answers GET /health with 200, and closes the connection on anything else without a response."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", self.port))
        self._sock.listen(64)
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        self._sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(2)
                try:
                    head = conn.recv(65536)
                except OSError:
                    continue
                if head.startswith(b"GET /health"):
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")

    def __enter__(self) -> SlamServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop = True
        self._thread.join(2)
        self._sock.close()


@dataclass
class TeeConn:
    """One connection through a :class:`TeeProxy`: what each side sent, and when the client side closed."""

    opened: float  # time.monotonic()
    request: bytearray = field(default_factory=bytearray)  # what the client (the gateway) sent
    response: bytearray = field(default_factory=bytearray)  # what the server sent back
    client_closed: float | None = None  # time.monotonic() when the client's side reached EOF or broke


class TeeProxy:
    """A TCP proxy in front of a real server that keeps every byte both sides sent, per connection, and the time
    the client closed its side, so a test can compare what a client received through the gateway with what the
    backend really sent, and see when the gateway let go of an upstream connection. Between ``hold()`` and
    ``release()`` the server's bytes are kept back from the client (the server still runs: a way to stop time
    before the first byte)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.conns: list[TeeConn] = []
        self._flowing = asyncio.Event()
        self._writers: list[asyncio.StreamWriter] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def received(self) -> list[bytearray]:
        """Per connection: the server's bytes, in order."""
        return [c.response for c in self.conns]

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._flowing.set()
        self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self._ready.set()
        self._loop.run_forever()
        tasks = asyncio.all_tasks(self._loop)
        for task in tasks:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        for writer in self._writers:
            writer.close()
        self._loop.run_until_complete(self._server.wait_closed())
        self._loop.close()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        conn = TeeConn(time.monotonic())
        self.conns.append(conn)
        gone = asyncio.Event()
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [client_w, server_w]

        async def upward() -> None:
            try:
                while data := await client_r.read(65536):
                    conn.request += data
                    server_w.write(data)
                    await server_w.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                conn.client_closed = time.monotonic()
                gone.set()
                server_w.close()  # the server sees the client leave, as it would without the tee
                client_w.close()

        async def downward() -> None:
            try:
                while data := await server_r.read(65536):
                    conn.response += data
                    if not self._flowing.is_set():
                        waits = [asyncio.ensure_future(self._flowing.wait()), asyncio.ensure_future(gone.wait())]
                        _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                        for task in pending:
                            task.cancel()
                    if conn.client_closed is not None:
                        continue  # nobody to give it to: keep reading so the server is not blocked
                    client_w.write(data)
                    await client_w.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                client_w.close()

        await asyncio.gather(upward(), downward())

    def hold(self) -> None:
        asyncio.run_coroutine_threadsafe(self._set_flowing(False), self._loop).result(5)

    def release(self) -> None:
        asyncio.run_coroutine_threadsafe(self._set_flowing(True), self._loop).result(5)

    async def _set_flowing(self, flowing: bool) -> None:
        if flowing:
            self._flowing.set()
        else:
            self._flowing.clear()

    def __enter__(self) -> TeeProxy:
        self._thread.start()
        self._ready.wait(5)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def bodies(self) -> list[tuple[dict[str, str], bytes]]:
        """Every HTTP/1.1 response the server sent: (headers, de-chunked body)."""
        out = []
        for raw in self.received:
            data = bytes(raw)
            while data:
                head, _, data = data.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")[1:]
                headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
                body = b""
                if headers.get("transfer-encoding") == "chunked":
                    while True:
                        size_line, _, data = data.partition(b"\r\n")
                        if not size_line:
                            # The capture ended before the body's last chunk (``0``): the gateway sends a stream's
                            # end to its client with [DONE], then reads the backend's end, which the test may not
                            # wait for.
                            break
                        size = int(size_line.split(b";")[0], 16)
                        body, data = body + data[:size], data[size + 2 :]
                        if size == 0:
                            break
                else:
                    n = int(headers.get("content-length", "0"))
                    body, data = data[:n], data[n:]
                out.append((headers, body))
        return out
