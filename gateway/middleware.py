"""The gateway's own pure-ASGI middlewares, outermost first: ``StampArrival`` (t0 of every latency), ``Cors`` (when
``gateway.cors_origins`` is set), ``Guard`` (head limits, API keys, content type, who reads /metrics and the docs),
``BodyLimit`` (413), ``FastPath`` (the two proxied POST routes, before FastAPI's router). They wrap FastAPI's whole
stack (see ``app.create_app``), so the hot routes pay for nothing of FastAPI's. Pure ASGI, not
``BaseHTTPMiddleware``, which would wrap and slow every stream."""

from __future__ import annotations

import logging
import time

from fastapi import Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.api.openai import PATHS, proxy
from gateway.api.responses import error_response
from gateway.auth import Client
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
from gateway.metrics import NO_MODEL
from gateway.state import Gateway

log = logging.getLogger("gateway.middleware")


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
# vLLM's tokenizer routes (``api.tokenizer``): outside /v1/, guarded like it (a key, one request of its rate).
TOKENIZER_PATHS = frozenset({"/tokenize", "/detokenize", "/tokenizer_info"})
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
            send, admit = self._check(scope, send)
            # a /v1 route that costs no tokens: one request against the key's limit
            if admit is not None and (limits := await admit.admit()):
                send = _with_headers(send, [(k.encode(), v.encode()) for k, v in limits.items()])
        except GatewayError as err:
            reason = {401: "unauthorized", 403: "forbidden", 429: "rate_limited"}.get(err.status)
            if reason:
                self.gateway.metrics.rejected.labels(NO_MODEL, reason).inc()
            await send_error(send, err)
            return
        await self.app(scope, receive, send)

    def _check(self, scope: Scope, send: Send) -> tuple[Send, Client | None]:
        """The checks that need no waiting; returns the client to admit now, if any (see ``__call__``)."""
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
            return send, None
        if not path.startswith("/v1/") and path not in TOKENIZER_PATHS:
            if self.keyring.enabled and path in self.keyed_pages:
                self.keyring.verify(_header(raw, b"authorization"))
            return send, None
        admit = None
        if self.keyring.enabled:
            client = self.keyring.verify(_header(raw, b"authorization"))
            scope["gateway.client"] = client
            # Calls to models are admitted by their handler, once the body says what they may cost.
            if not (scope["method"] == "POST" and path in ADMITTED_BY_HANDLER):
                admit = client
        if scope["method"] == "POST":
            kind = (_header(raw, b"content-type") or "application/json").encode().split(b";")[0].strip().lower()
            if kind not in JSON_TYPES and not kind.endswith(b"+json"):
                raise UnsupportedMediaType(
                    f"Content-Type {kind.decode(errors='replace')!r} is not supported: send 'application/json'"
                )
        return send, admit


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
