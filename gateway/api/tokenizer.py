"""vLLM's tokenizer routes, ``POST /tokenize``, ``POST /detokenize`` and ``GET /tokenizer_info``, routed by model.

Tools that count tokens with the served model's own tokenizer (lm-eval's remote tokenizer, benchmark clients that
size prompts) call these on the server. The gateway picks a healthy backend of the model named in the body (or,
for ``/tokenizer_info``, in ``?model=``; either may be left out when the gateway serves one model) and passes the
body through with the model's id in place of an alias; the backend's answer, error or not, comes back as it is.
They cost no tokens: the guard admits them as one request of the key's rate (``middleware.Guard``), and they are
counted apart from model calls (``gateway_tokenizer_requests_total``) so request rates and error ratios stay
those of generation. ``/tokenizer_info`` exists on a vLLM started with ``--enable-tokenizer-info-endpoint``;
without it the backend's plain 404 becomes an OpenAI-shaped 404 saying so.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from gateway.api.openai import request_id_of
from gateway.api.responses import error_response
from gateway.auth import Client
from gateway.errors import GatewayError, InvalidRequest, ModelNotFound, NotFound
from gateway.metrics import NO_BACKEND, NO_MODEL
from gateway.protocol import dump_json, json_object
from gateway.relay.asgi import receive_body
from gateway.relay.proxy import count_failure, error_answer, read_upstream
from gateway.state import Gateway

router = APIRouter()


@router.post("/tokenize", response_model=None)
async def tokenize(request: Request) -> Response:
    """Token ids of a prompt or chat messages, as the model's backend counts them (vLLM's body and answer)."""
    return await _pass(request, "/tokenize")


@router.post("/detokenize", response_model=None)
async def detokenize(request: Request) -> Response:
    """The text of a list of token ids (vLLM's body and answer)."""
    return await _pass(request, "/detokenize")


@router.get("/tokenizer_info", response_model=None)
async def tokenizer_info(request: Request, model: str | None = None) -> Response:
    """The model's tokenizer configuration, from a vLLM started with ``--enable-tokenizer-info-endpoint``."""
    return await _pass(request, "/tokenizer_info", model)


async def _pass(request: Request, path: str, query_model: str | None = None) -> Response:
    gw: Gateway = request.app.state.gateway
    request_id = request_id_of(request)
    route = path.lstrip("/")
    model, backend = NO_MODEL, NO_BACKEND
    try:
        if request.method == "POST":
            body: dict[str, Any] | None = json_object(
                await receive_body(request.receive), gw.settings.gateway.request_limits
            )
            named = body.get("model") if body is not None else None
        else:
            body, named = None, query_model
        model = _model_of(gw, named)
        client: Client | None = request.scope.get("gateway.client")
        if client is not None:
            client.check_model(model)
        payload = b""
        if body is not None:
            body["model"] = model
            payload = dump_json(body)
        headers = {"content-type": "application/json", "x-request-id": request_id, "accept-encoding": "identity"}
        method = request.method
        upstream = await gw.pool.open(model, path, payload, headers, stream=False, method=method)
        backend = upstream.backend.name
        try:
            content = await read_upstream(upstream)
        finally:
            upstream.release()
    except GatewayError as err:
        count_failure(gw.metrics, backend, err)
        gw.metrics.tokenizer_requests.labels(model, backend, route, str(err.status)).inc()
        response = error_response(err, request_id)
        response.headers["x-gateway-backend"] = backend
        return response
    status = upstream.response.status_code
    bad = error_answer(backend, status, content) if status != 200 else None
    if bad is None and status == 404 and b'"error"' not in content:
        # FastAPI's own {"detail": "Not Found"}: the backend has no such route (/tokenizer_info needs a flag)
        hint = (
            " (vLLM serves it when started with --enable-tokenizer-info-endpoint)" if route == "tokenizer_info" else ""
        )
        bad = NotFound(f"backend {backend} does not serve /{route}{hint}")
    if bad is not None:
        count_failure(gw.metrics, backend, bad)
        status, content = bad.status, dump_json(bad.body())
    gw.metrics.tokenizer_requests.labels(model, backend, route, str(status)).inc()
    headers = {"x-request-id": request_id, "x-gateway-backend": backend, "x-gateway-model": model}
    return Response(content, status_code=status, media_type="application/json", headers=headers)


def _model_of(gw: Gateway, named: object) -> str:
    """The model a tokenizer call is for: the one named (an alias resolves), else the only model served."""
    if named is None:
        models = gw.pool.table.models
        if len(models) == 1:
            return models[0]
        raise InvalidRequest(
            f"`model` is required: this gateway serves {len(models)} models, each with its own tokenizer",
            param="model",
        )
    if not isinstance(named, str):
        raise InvalidRequest("`model` must be a string", param="model")
    model = gw.pool.table.resolve(named)
    if model is None:
        raise ModelNotFound(f"The model `{named}` does not exist.", param="model")
    return model
