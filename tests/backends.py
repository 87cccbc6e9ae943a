"""Small purpose-built backends for tests: a recorder that answers with fixed bytes, and misbehaving servers."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from gateway.supervisor import free_port


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


class TeeProxy:
    """A TCP proxy in front of a real server that keeps every byte the server sent back, per connection, so a
    test can compare what a client received through the gateway with what the backend really sent."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.received: list[bytearray] = []  # per connection: the server's bytes, in order
        self._writers: list[asyncio.StreamWriter] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
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
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [client_w, server_w]
        record = bytearray()
        self.received.append(record)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, keep: bytearray | None) -> None:
            try:
                while data := await src.read(65536):
                    if keep is not None:
                        keep += data
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(client_r, server_w, None), pipe(server_r, client_w, record))

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
