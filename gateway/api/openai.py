"""The OpenAI-compatible routes: validate -> route -> relay. No HTTP client code lives here."""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from gateway.api.responses import error_response
from gateway.auth import Client
from gateway.config import ModelCard
from gateway.errors import GatewayError, ModelNotFound, UpstreamBadResponse
from gateway.protocol import Endpoint, openapi_body, parse_request, upstream_body
from gateway.relay.asgi import ClientWatch, receive_body
from gateway.relay.backends import Upstream
from gateway.relay.proxy import (
    CLIENT_CLOSED,
    Exchange,
    RelayResponse,
    count_failure,
    error_answer,
    read_upstream,
    response_headers,
    server_timing,
)
from gateway.relay.sse import StreamObserver
from gateway.relay.validity import contract_of
from gateway.state import Gateway

router = APIRouter()

LARGE_BODY = 1024 * 1024  # bytes: above, the body's parse yields to other work first
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")


def request_id_of(request: Request) -> str:
    """The client's ``x-request-id`` when it is sane, else a new random one (unique enough to be vLLM's request id;
    not a secret, so the cheap generator rather than ``uuid4``'s system call)."""
    headers: list[tuple[bytes, bytes]] = request.scope["headers"]
    for key, value in headers:
        if key == b"x-request-id":
            given = value.decode("latin-1")
            if _REQUEST_ID.match(given):
                return given
            break
    return f"{random.getrandbits(128):032x}"


# These two routes are served by ``app.FastPath`` (before FastAPI's router and dependency machinery, which cost more
# than the whole proxy): they stay registered here for the OpenAPI document and as the fallback.
@router.post("/v1/chat/completions", openapi_extra=openapi_body("chat"), response_model=None)
async def chat_completions(request: Request) -> Response:
    return await proxy(request.app.state.gateway, request, "chat")


@router.post("/v1/completions", openapi_extra=openapi_body("completions"), response_model=None)
async def completions(request: Request) -> Response:
    return await proxy(request.app.state.gateway, request, "completions")


PATHS: dict[str, Endpoint] = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    """OpenAI's model list, with each model's card. A key with an allow-list sees only its models, and nothing
    names another (a mirror target is left out); backend names are shown only to admin keys, or with keys off."""
    gw: Gateway = request.app.state.gateway
    client: Client | None = request.scope.get("gateway.client")
    allowed = client.allowed if client is not None else None
    full = client is None or client.key.admin
    data = []
    for card in gw.settings.models:
        if allowed is not None and card.id not in allowed:
            continue
        entry: dict[str, Any] = {
            "id": card.id,
            "object": "model",
            "created": gw.started,
            "owned_by": card.vendor,
            "aliases": card.aliases,
            "family": card.family,
            "origin": card.origin,
            "emulated": card.emulated,
        }
        if full:
            entry["backends"] = list(gw.pool.table.backends_of(card.id))
        entry["card"] = card.model_dump(mode="json") if full else _card_for(card, allowed)
        data.append(entry)
    return {"object": "list", "data": data}


def _card_for(card: ModelCard, allowed: frozenset[str] | None) -> dict[str, Any]:
    out = card.model_dump(mode="json")
    if card.mirror is not None and allowed is not None:
        to = [m for m in card.mirror.to if m in allowed]
        out["mirror"] = {**out["mirror"], "to": to} if to else None
    return out


async def proxy(gw: Gateway, request: Request, endpoint: Endpoint) -> Response:
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    ex = Exchange(request_id_of(request), endpoint, request.scope.get("gateway.t0") or time.perf_counter())
    try:
        raw = await receive_body(request.receive)
        if len(raw) > LARGE_BODY:
            await asyncio.sleep(0)  # let the streams whose chunks are ready go first: parsing may take a while
        parsed = parse_request(raw, endpoint, gw.settings.gateway.request_limits)
        model = gw.pool.table.resolve(parsed.model)
        if model is None:
            raise ModelNotFound(f"The model `{parsed.model}` does not exist.", param="model")
        ex.model, ex.card = model, gw.settings.card(model)
        client = ex.client = request.scope.get("gateway.client")
        if client is not None:
            client.check_model(model)
            grant = await client.reserve(1, gw.keyring.estimate(parsed))
            ex.reserved, ex.limit_headers = grant.tokens, grant.headers
            ex.prompt_estimate = parsed.prompt_estimate
        ex.pair_id = gw.mirror.maybe(ex, parsed.body, endpoint)
        ex.contract = contract_of(parsed.body)
        headers = {
            "content-type": "application/json",
            "x-request-id": ex.request_id,
            "accept-encoding": "identity",
        }
        body = upstream_body(parsed, raw, model)
    except GatewayError as err:
        gw.recorder.refused(ex.model, err)
        gw.recorder.failed(ex, err.status)
        return error_response(err, ex.request_id)

    async def call() -> tuple[Upstream, bytes | None]:
        """Open upstream; for a stream that succeeded, hand it over open, else read the whole body."""
        upstream = await gw.pool.open(model, path, body, headers, stream=parsed.stream)
        ex.backend = upstream.backend.name
        series = gw.metrics.series(model, ex.backend)
        series.in_flight.inc()
        if parsed.stream and upstream.response.status_code == 200:
            return upstream, None  # RelayResponse releases it
        try:
            return upstream, await read_upstream(upstream)
        finally:
            upstream.release()
            series.in_flight.dec()

    # From here until the call ends, a client that leaves cancels the upstream call (and vLLM aborts).
    watch = ClientWatch(request.receive, gw.watches)
    try:
        gone, result = await watch.run(call)
    except GatewayError as err:
        watch.close()
        return _failed(gw, ex, err)
    if gone:
        watch.close()
        gw.recorder.failed(ex, CLIENT_CLOSED)
        return Response(status_code=CLIENT_CLOSED)
    upstream, content = result
    if content is None:
        inline = gw.settings.gateway.relay_inline
        strip = not parsed.client_wants_usage
        return RelayResponse(
            ex, upstream, gw.recorder, watch, strip_usage=strip, keep_text=ex.keeps_answer, inline=inline
        )
    watch.close()
    done = time.perf_counter()
    status = upstream.response.status_code
    if status != 200:
        return _upstream_error(gw, ex, status, content, upstream.response.headers.get("retry-after"))
    try:
        answer = json.loads(content)
    except ValueError:
        return _failed(gw, ex, UpstreamBadResponse(f"backend {ex.backend} sent a body that is not JSON"))
    e2e = done - ex.t0
    # what the answer says of itself: reasoning and answer, finish reason, and (stored with its mirrors) its text
    observer = StreamObserver(t0=ex.t0, keep_text=ex.keeps_answer)
    observer.observe_answer(answer)
    written = upstream.response.written
    ex.overhead = written - ex.t0 + time.perf_counter() - done
    gw.recorder.finished(ex, 200, e2e=e2e, usage=observer.usage, observer=observer)
    timing = f"e2e;dur={e2e * 1000:.3f}, {server_timing(ex.overhead, done - written)}"
    return _raw(ex, 200, content, {"server-timing": timing})


def _raw(ex: Exchange, status: int, body: bytes, extra: dict[str, str] | None = None) -> Response:
    response = Response(content=body, status_code=status)
    response.raw_headers = [
        *response_headers(ex, "application/json", extra),
        (b"content-length", str(len(body)).encode()),
    ]
    return response


def _failed(gw: Gateway, ex: Exchange, err: GatewayError) -> JSONResponse:
    count_failure(gw.metrics, ex.backend, err)
    gw.recorder.failed(ex, err.status)
    response = error_response(err, ex.request_id)
    response.headers["x-gateway-backend"] = ex.backend
    response.headers.update(ex.limit_headers or {})
    return response


def _upstream_error(gw: Gateway, ex: Exchange, status: int, body: bytes, retry_after: str | None) -> Response:
    """A backend's error status: passed through with its body when that body is an error object (see
    ``relay.proxy.error_answer``)."""
    err = error_answer(ex.backend, status, body)
    if err is not None:
        return _failed(gw, ex, err)
    gw.recorder.failed(ex, status)
    return _raw(ex, status, body, {"retry-after": retry_after} if retry_after else None)
