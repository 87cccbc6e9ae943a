"""The application factory. Nothing is built at import time: ``create_app`` returns a FastAPI app whose lifespan
owns the backend clients and the health-check task."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import __version__
from gateway.backends import BackendPool
from gateway.config import Settings
from gateway.errors import GatewayError, InvalidRequest, NotFound, PayloadTooLarge, ServerError
from gateway.metrics import Metrics
from gateway.mirror import Mirror
from gateway.proxy import Recorder
from gateway.store import Store


@dataclass(slots=True)
class Gateway:
    """Everything a request handler needs, built once per app."""

    settings: Settings
    metrics: Metrics
    pool: BackendPool
    recorder: Recorder
    store: Store
    mirror: Mirror
    started: int


class StampArrival:
    """Pure ASGI middleware: records when the request reached the gateway (t0 of every latency)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope["gateway.t0"] = time.perf_counter()
        await self.app(scope, receive, send)


class BodyLimit:
    """Pure ASGI middleware: a request body over ``limit`` bytes is answered 413 (an OpenAI error) without being
    read: at once from its Content-Length, or as soon as a chunked body passes the limit."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.limit:
                await self._refuse(send)
                return
            await self.app(scope, receive, send)
            return
        body, more, messages = 0, True, []
        while more:  # chunked: read up to the limit, then replay what was read
            message = await receive()
            messages.append(message)
            body += len(message.get("body", b""))
            more = message.get("more_body", False) and message["type"] == "http.request"
            if body > self.limit:
                await self._refuse(send)
                return

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        err = PayloadTooLarge(f"request body larger than {self.limit} bytes (gateway.max_body_bytes)")
        body = err.body_bytes()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]  # fmt: skip
        await send({"type": "http.response.start", "status": err.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def error_response(err: GatewayError, request_id: str | None = None) -> JSONResponse:
    headers = err.headers()
    if request_id:
        headers["x-request-id"] = request_id
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def create_app(
    settings: Settings,
    *,
    transports: Mapping[str, httpx.AsyncBaseTransport] | None = None,
    registry: CollectorRegistry | None = None,
) -> FastAPI:
    """Build the gateway. ``transports`` (by backend name) and ``registry`` are seams for tests."""
    from gateway.api import compare, openai, ops, ui

    metrics = Metrics(registry if registry is not None else CollectorRegistry())
    metrics.describe(settings)
    pool = BackendPool(settings, metrics, transports)
    store = Store(settings.gateway.results_db)
    recorder = Recorder(metrics)
    mirror = Mirror(settings, pool, metrics, store)
    recorder.on_pair = mirror.record_primary
    gateway = Gateway(settings, metrics, pool, recorder, store, mirror, int(time.time()))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await pool.start()
        try:
            yield
        finally:
            await mirror.close()
            await pool.close()
            store.close()

    app = FastAPI(
        title="LLM comparison gateway",
        version=__version__,
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.gateway = gateway
    app.include_router(openai.router)
    app.include_router(compare.router)
    app.include_router(ops.router)
    app.include_router(ui.router)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        err: GatewayError = (
            NotFound(f"no route {request.method} {request.url.path}")
            if exc.status_code == 404
            else InvalidRequest(str(exc.detail))
        )
        response = error_response(err)
        response.status_code = exc.status_code
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return error_response(ServerError(f"internal error: {type(exc).__name__}"))

    app.add_middleware(BodyLimit, limit=settings.gateway.max_body_bytes)
    app.add_middleware(StampArrival)
    return app
