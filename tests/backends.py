"""Small purpose-built backends for tests: a recorder that answers with fixed bytes, and misbehaving servers."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator
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
    chunks: list[bytes] = field(default_factory=list)
    chunk_delay: float = 0.0
    delay: float = 0.0
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
            if self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
            yield chunk


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
