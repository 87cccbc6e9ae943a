"""The composition root: ``create_app(settings)`` wires the parts (metrics, backend pool, recorder, store, mirror,
keys, routes, the gateway's own middlewares outside FastAPI's stack) and returns a FastAPI app. Its lifespan owns
what runs: the results store's writer thread, the first health checks and their task, the drain on SIGTERM/SIGINT,
the separate metrics listener (``gateway.metrics_port``); at the end it stops the mirrors, the backend pool and
the store's writer (everything queued is written). Nothing is built at import time; ``app_from_env`` builds one
``--workers`` worker's app. Process-wide settings are ``gateway serve``'s (``server.tune_process``)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, start_http_server
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp

from gateway import __version__
from gateway.api.responses import error_response
from gateway.auth import Keyring
from gateway.compare.mirror import Mirror
from gateway.compare.store import open_store
from gateway.compare.writer import StoreWriter
from gateway.config import Settings
from gateway.errors import (
    GatewayError,
    InvalidRequest,
    NotFound,
    ServerError,
)
from gateway.limits import SharedLimits
from gateway.metrics import Metrics, multiprocess
from gateway.middleware import EXPOSED_HEADERS, BodyLimit, Cors, FastPath, Guard, StampArrival
from gateway.relay.backends import BackendPool
from gateway.relay.proxy import Recorder
from gateway.state import Gateway, drain_on_signals

log = logging.getLogger("gateway.app")


class GatewayApp(FastAPI):
    """FastAPI with the gateway's own ASGI middlewares outside its middleware stack (see ``create_app``)."""

    wrap: Callable[[ASGIApp], ASGIApp] | None = None

    def build_middleware_stack(self) -> ASGIApp:
        inner = super().build_middleware_stack()
        return self.wrap(inner) if self.wrap is not None else inner


def app_from_env() -> FastAPI:
    """The app of one ``gateway serve --workers N`` worker: the settings come from the parent in the environment."""
    from gateway.config import Settings
    from gateway.server import tune_process

    app = create_app(Settings.model_validate_json(os.environ["GATEWAY_SETTINGS_JSON"]))
    tune_process()
    return app


def create_app(
    settings: Settings,
    *,
    transports: Mapping[str, httpx.AsyncBaseTransport] | None = None,
    registry: CollectorRegistry | None = None,
) -> FastAPI:
    """Build the gateway. ``transports`` (by backend name: the health checks' httpx transport; calls use the relay's
    own client) and ``registry`` are seams for tests."""
    from gateway.api import compare, openai, ops, tokenizer, ui

    metrics = Metrics(registry if registry is not None else CollectorRegistry())
    metrics.describe(settings)
    pool = BackendPool(settings, metrics, transports)
    # A short busy timeout: the writer retries a locked file itself, and so notices a stop between tries. A
    # PostgreSQL store that cannot be reached at start does not stop the gateway: its rows are dropped and counted.
    results = open_store(
        settings.gateway.results_db, password_env=settings.gateway.results_db_password_env, busy_timeout_s=1.0,
        required=False,
    )  # fmt: skip
    store = StoreWriter(results, metrics, max_rows=settings.gateway.results_queue_rows)
    recorder = Recorder(metrics)
    mirror = Mirror(settings, pool, metrics, store)
    recorder.on_pair = mirror.record_primary
    g = settings.gateway
    shared = None
    if g.limits_backend != "local":
        shared = SharedLimits(
            g.limits_backend, metrics, password_env=g.limits_password_env, timeout_s=g.limits_timeout_s,
            on_failure=g.limits_on_failure,
        )  # fmt: skip
    keyring = Keyring(g.auth, pool.table.resolve, shared=shared)
    gateway = Gateway(settings, metrics, pool, recorder, store, mirror, keyring, int(time.time()))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store.start()
        await pool.start()
        drain_on_signals(gateway)
        exporter = None
        if settings.gateway.metrics_port is not None:
            exporter, _ = start_http_server(settings.gateway.metrics_port, settings.gateway.host, metrics.registry)
            log.info("metrics on http://%s:%d/metrics", settings.gateway.host, exporter.server_port)
        try:
            yield
        finally:
            if exporter is not None:
                exporter.shutdown()
                exporter.server_close()
            if multiprocess():
                from prometheus_client import multiprocess as mp

                mp.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]  # its live* gauges go away
            await mirror.close()
            await pool.close()
            if shared is not None:
                await shared.aclose()  # after the calls: their settlements are sent
            await asyncio.to_thread(store.stop)  # after the calls and mirrors: every row they added is written

    app = GatewayApp(
        title="LLM comparison gateway",
        version=__version__,
        lifespan=lifespan,
        # FastAPI's own OpenTelemetry hooks: the gateway exports Prometheus metrics instead, and the check of the
        # global providers costs a few microseconds on every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.gateway = gateway
    app.include_router(openai.router)
    app.include_router(compare.router)
    app.include_router(tokenizer.router)
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

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body"))
        message = f"{where}: {first.get('msg', 'invalid')}" if where else str(first.get("msg", "invalid request"))
        return error_response(InvalidRequest(message, param=where or None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return error_response(ServerError(f"internal error: {type(exc).__name__}"))

    def outside(inner: ASGIApp) -> ASGIApp:
        """Our middlewares wrap FastAPI's whole stack (its error middleware included), so the hot routes pay for
        nothing of FastAPI's: StampArrival, CORS (when configured), Guard, BodyLimit, FastPath, then FastAPI.
        CORS is outside Guard: a browser's preflight carries no key and must be answered, and the refusals
        (401, 413, 429, ...) must carry the allow-origin header, or the page cannot read them."""
        app_: ASGIApp = Guard(BodyLimit(FastPath(inner, gateway), settings.gateway.max_body_bytes), gateway)
        if settings.gateway.cors_origins:
            app_ = Cors(
                app_,
                allow_origins=settings.gateway.cors_origins,
                allow_methods=["GET", "POST"],
                # "*": whatever an allowed origin's client sends (the OpenAI SDKs add x-stainless-* headers); the
                # origin is the trust decision, and the key is still checked on the call itself.
                allow_headers=["*"],
                expose_headers=EXPOSED_HEADERS,
            )
        return StampArrival(app_)

    app.wrap = outside
    return app
