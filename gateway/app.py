"""The application factory. Nothing is built at import time: ``create_app`` returns a FastAPI app whose lifespan
owns the backend clients and the health-check task."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Protocol

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, start_http_server
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import __version__
from gateway.auth import Keyring
from gateway.backends import BackendPool
from gateway.config import Settings
from gateway.errors import (
    GatewayError,
    HeadersTooLarge,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    ServerError,
    UnsupportedMediaType,
)
from gateway.metrics import NO_MODEL, Metrics, multiprocess
from gateway.mirror import Mirror
from gateway.proxy import Recorder
from gateway.store import Store

log = logging.getLogger("gateway.app")
GC_GEN0_THRESHOLD = 20_000  # CPython's default is 700 (2,000 in 3.13)


class Abortable(Protocol):
    def abort(self) -> None: ...


@dataclass(slots=True)
class Gateway:
    """Everything a request handler needs, built once per app."""

    settings: Settings
    metrics: Metrics
    pool: BackendPool
    recorder: Recorder
    store: Store
    mirror: Mirror
    keyring: Keyring
    started: int
    draining: bool = False  # SIGTERM received: /ready says 503, in-flight calls get drain_s to finish
    watches: set[Abortable] = field(default_factory=set)  # the calls in flight (aborted after drain_s)

    def begin_drain(self) -> None:
        """Called (in the event loop) when shutdown starts; after ``drain_s`` unfinished calls are ended with an
        explicit error (streams: an error event and [DONE]) rather than cut."""
        if self.draining:
            return
        self.draining = True
        log.info("shutting down: in-flight calls get %g s (gateway.drain_s)", self.settings.gateway.drain_s)
        asyncio.get_running_loop().call_later(self.settings.gateway.drain_s, self._abort_all)

    def _abort_all(self) -> None:
        for watch in list(self.watches):
            watch.abort()


def drain_on_signals(gateway: Gateway) -> None:
    """Chain the gateway's drain in front of the server's SIGTERM/SIGINT handlers (uvicorn's, in every worker):
    uvicorn stops accepting and waits for in-flight calls, the gateway turns /ready 503 and ends what is left after
    ``drain_s`` explicitly. Only in the main thread (where signals are delivered); tests in threads skip it."""
    if threading.current_thread() is not threading.main_thread():
        return
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue

        def handler(signum: int, frame: FrameType | None, previous: Callable[..., Any] = previous) -> None:
            loop.call_soon_threadsafe(gateway.begin_drain)
            previous(signum, frame)

        signal.signal(sig, handler)


async def send_error(send: Send, err: GatewayError, *, close: bool = False) -> None:
    """Answer with an OpenAI error from ASGI middleware (before any handler ran)."""
    body = err.body_bytes()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in err.headers().items()]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


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
        await send_error(send, err, close=True)


class FastPath:
    """Pure ASGI: ``POST /v1/chat/completions`` and ``/v1/completions`` go straight to the proxy, skipping
    FastAPI's router, dependency solving and exception middlewares (they cost more CPU than the proxying itself).
    Everything else goes on to FastAPI."""

    def __init__(self, app: ASGIApp, gateway: Gateway) -> None:
        from gateway.api.openai import PATHS, proxy

        self.app = app
        self.gateway = gateway
        self.paths = PATHS
        self.proxy = proxy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self.paths.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        try:
            response = await self.proxy(self.gateway, Request(scope, receive), endpoint)
        except Exception as exc:  # a bug of ours: an OpenAI-shaped 500, logged, as FastAPI's handler would
            log.exception("unexpected error on %s", scope["path"])
            response = error_response(ServerError(f"internal error: {type(exc).__name__}"))
        await response(scope, receive, send)


JSON_TYPES = (b"application/json", b"text/json")
ADMITTED_BY_HANDLER = frozenset(
    ("/v1/chat/completions", "/v1/completions", "/v1/compare/chat/completions", "/v1/compare/completions")
)
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/openapi.json"})  # FastAPI's, as create_app sets them
UI_PATHS = frozenset({"/ui"})


class Guard:
    """Pure ASGI middleware, before any handler: request head limits (431), API keys (401), per-key request rate
    (429), JSON content type on /v1 POSTs (415), and who may read /metrics. With keys on, /docs and /openapi.json
    need a key unless ``auth.public_docs``, and the /ui page unless ``auth.public_ui``."""

    def __init__(self, app: ASGIApp, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway
        g = gateway.settings.gateway
        self.max_headers, self.max_bytes = g.max_headers, g.max_header_bytes
        self.keyring = gateway.keyring
        self.metrics_elsewhere = g.metrics_port is not None
        self.keyed_pages: frozenset[str] = frozenset()  # outside /v1/, the paths that need a key when keys are on
        if not g.auth.public_docs:
            self.keyed_pages |= DOCS_PATHS
        if not g.auth.public_ui:
            self.keyed_pages |= UI_PATHS

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            send = self._check(scope, send)
        except GatewayError as err:
            reason = {401: "unauthorized", 403: "forbidden", 429: "rate_limited"}.get(err.status)
            if reason:
                self.gateway.metrics.rejected.labels(NO_MODEL, reason).inc()
            await send_error(send, err)
            return
        await self.app(scope, receive, send)

    def _check(self, scope: Scope, send: Send) -> Send:
        raw: list[tuple[bytes, bytes]] = scope["headers"]
        if len(raw) > self.max_headers:
            raise HeadersTooLarge(f"more than {self.max_headers} request headers")
        if sum(len(k) + len(v) for k, v in raw) > self.max_bytes:
            raise HeadersTooLarge(f"request headers larger than {self.max_bytes} bytes")
        path: str = scope["path"]
        if path == "/metrics":
            if self.metrics_elsewhere:
                raise NotFound("metrics are served on gateway.metrics_port")
            if self.keyring.enabled and self.keyring.protect_metrics:
                client = self.keyring.verify(_header(raw, b"authorization"))
                if not client.key.admin:
                    raise PermissionDenied("reading /metrics needs an admin key")
            return send
        if not path.startswith("/v1/"):
            if self.keyring.enabled and path in self.keyed_pages:
                self.keyring.verify(_header(raw, b"authorization"))
            return send
        if self.keyring.enabled:
            client = self.keyring.verify(_header(raw, b"authorization"))
            scope["gateway.client"] = client
            # Calls to models are admitted by their handler, once the body says what they may cost.
            limits = None if scope["method"] == "POST" and path in ADMITTED_BY_HANDLER else client.admit()
            if limits:
                send = _with_headers(send, [(k.encode(), v.encode()) for k, v in limits.items()])
        if scope["method"] == "POST":
            kind = (_header(raw, b"content-type") or "application/json").encode().split(b";")[0].strip().lower()
            if kind not in JSON_TYPES and not kind.endswith(b"+json"):
                raise UnsupportedMediaType(
                    f"Content-Type {kind.decode(errors='replace')!r} is not supported: send 'application/json'"
                )
        return send


def _header(raw: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in raw:
        if key == name:
            return value.decode("latin-1")
    return None


def _with_headers(send: Send, extra: list[tuple[bytes, bytes]]) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return wrapped


# What a cross-origin page may read of a response: the request id, and what to back off on.
EXPOSED_HEADERS = (
    "x-request-id",
    "x-comparison-id",
    "retry-after",
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
)


class Cors(CORSMiddleware):
    """Starlette's CORS middleware (pure ASGI), with a refused preflight answered by an OpenAI error like every
    other refusal (Starlette's own is plain text). A refused preflight carries no allow-origin header."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code == 200:
            return response
        what = bytes(response.body).decode().removeprefix("Disallowed CORS ")  # "origin", "method, headers", ...
        refused = error_response(InvalidRequest(f"CORS preflight refused: {what} not allowed (gateway.cors_origins)"))
        refused.headers.update(
            {k: v for k, v in response.headers.items() if k.startswith("access-control-") or k == "vary"}
        )
        return refused


def error_response(err: GatewayError, request_id: str | None = None) -> JSONResponse:
    headers = err.headers()
    if request_id:
        headers["x-request-id"] = request_id
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


class GatewayApp(FastAPI):
    """FastAPI with the gateway's own ASGI middlewares outside its middleware stack (see ``create_app``)."""

    wrap: Callable[[ASGIApp], ASGIApp] | None = None

    def build_middleware_stack(self) -> ASGIApp:
        inner = super().build_middleware_stack()
        return self.wrap(inner) if self.wrap is not None else inner


def app_from_env() -> FastAPI:
    """The app of one ``gateway serve --workers N`` worker: the settings come from the parent in the environment."""
    from gateway.config import Settings

    return create_app(Settings.model_validate_json(os.environ["GATEWAY_SETTINGS_JSON"]))


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
    keyring = Keyring(settings.gateway.auth, pool.table.resolve)
    gateway = Gateway(settings, metrics, pool, recorder, store, mirror, keyring, int(time.time()))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await pool.start()
        drain_on_signals(gateway)
        # Everything built so far lives as long as the process: keep it out of the collector's scans, and collect
        # the young generation less often (a request allocates a few hundred short-lived objects).
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])
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
            store.close()

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
