"""Fan-out routes: ``POST /v1/compare/chat/completions`` and ``/v1/compare/completions`` send one request to
several models at once; ``GET /v1/compare`` lists recent comparisons and ``GET /v1/compare/{id}`` returns one.

Streaming (``"stream": true``) answers with SSE events tagged by model, in arrival order::

    data: {"model": "m1", "type": "chunk", "chunk": <vLLM's chunk, as it sent it>}
    data: {"model": "m1", "type": "result", "backend": "b1", "error": null, "metrics": {...}}
    ...
    data: {"type": "done", "id": "cmp-..."}
    data: [DONE]
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from gateway.api.openai import request_id_of
from gateway.api.responses import error_response
from gateway.auth import Client
from gateway.compare.fanout import Charge, Outcome, assemble, call_model
from gateway.compare.store import as_dict
from gateway.config import ModelCard
from gateway.errors import (
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    NotFound,
    PermissionDenied,
    ServerError,
    ShuttingDown,
)
from gateway.protocol import Endpoint, ParsedRequest, json_object, openapi_body, parse_body
from gateway.relay.asgi import race_disconnect
from gateway.state import Gateway

router = APIRouter()
log = logging.getLogger("gateway.api.compare")
QUEUE_EVENTS = 64  # events of a streaming fan-out waiting for its client, all models together


def _models(gw: Gateway, body: dict[str, Any]) -> list[ModelCard]:
    wanted = body.get("models")
    if wanted == "all":
        return list(gw.settings.models)
    if not isinstance(wanted, list) or not wanted or not all(isinstance(m, str) for m in wanted):
        raise InvalidRequest('models: a non-empty list of model names, or "all"', param="models")
    limit = gw.settings.gateway.request_limits.max_fanout_models
    if len(wanted) > limit:
        raise InvalidRequest(
            f"models: more than {limit} models (gateway.request_limits.max_fanout_models)", param="models"
        )
    cards: dict[str, ModelCard] = {}
    for name in wanted:
        model = gw.pool.table.resolve(name)
        if model is None:
            raise ModelNotFound(f"The model `{name}` does not exist.", param="models")
        cards.setdefault(model, gw.settings.card(model))
    return list(cards.values())


def _parse(gw: Gateway, raw: bytes, endpoint: Endpoint) -> tuple[dict[str, Any], list[ModelCard], ParsedRequest]:
    limits = gw.settings.gateway.request_limits
    body = json_object(raw, limits)
    cards = _models(gw, body)
    # the rest must be a valid ordinary request (a placeholder model stands in for the list)
    parsed = parse_body({**body, "model": cards[0].id}, endpoint, limits)
    parsed.size = len(raw)
    body.pop("model", None)
    return body, cards, parsed


def _result(outcome: Outcome, endpoint: Endpoint) -> dict[str, Any]:
    return {
        "model": outcome.model,
        "backend": outcome.backend,
        "response": assemble(outcome, endpoint),
        "error": outcome.error,
        "metrics": outcome.metrics(),
    }


@router.post("/v1/compare/chat/completions", openapi_extra=openapi_body("chat", fanout=True), response_model=None)
async def compare_chat(request: Request) -> Response:
    return await fanout(request, "chat")


@router.post("/v1/compare/completions", openapi_extra=openapi_body("completions", fanout=True), response_model=None)
async def compare_completions(request: Request) -> Response:
    return await fanout(request, "completions")


async def fanout(request: Request, endpoint: Endpoint) -> Response:
    gw: Gateway = request.app.state.gateway
    request_id = request_id_of(request)
    client: Client | None = request.scope.get("gateway.client")
    charge: Charge | None = None
    limit_headers: dict[str, str] = {}
    try:
        body, cards, parsed = _parse(gw, await request.body(), endpoint)
        stream, wants_usage = parsed.stream, parsed.client_wants_usage
        if client is not None:
            for card in cards:
                client.check_model(card.id)
            # N models are N requests, each with its own possible cost
            share = client.reserve(len(cards), gw.keyring.estimate(parsed) * len(cards))
            charge = Charge(client, share // len(cards), parsed.prompt_estimate)
            limit_headers = client.headers()
    except GatewayError as err:
        return error_response(err, request_id)
    comparison_id = f"cmp-{uuid.uuid4().hex}"
    headers = {"x-request-id": request_id, "x-comparison-id": comparison_id, **limit_headers}

    def store(outcomes: list[Outcome]) -> None:
        gw.store.add(o.to_result(comparison_id, "fanout", gw.settings.card(o.model), True) for o in outcomes)

    if not stream:

        async def everyone() -> list[Outcome]:
            return list(
                await asyncio.gather(
                    *(call_model(gw.pool, gw.recorder, c, endpoint, body, request_id, charge=charge) for c in cards)
                )
            )

        gone, outcomes = await race_disconnect(everyone, request.receive)
        if gone:
            return Response(status_code=499)
        store(outcomes)
        results = [_result(o, endpoint) for o in outcomes]
        return JSONResponse({"id": comparison_id, "object": "comparison", "results": results}, headers=headers)

    return StreamingResponse(
        _stream(gw, cards, endpoint, body, request_id, comparison_id, wants_usage, store, charge),
        media_type="text/event-stream",
        headers={**headers, "cache-control": "no-cache", "x-accel-buffering": "no"},
    )


async def _stream(
    gw: Gateway,
    cards: list[ModelCard],
    endpoint: Endpoint,
    body: dict[str, Any],
    request_id: str,
    comparison_id: str,
    wants_usage: bool,
    store: Any,
    charge: Charge | None,
) -> AsyncIterator[bytes]:
    # Bounded: a client that reads slowly (or not at all) slows the models' reads down to its pace, through the
    # relay's own back-pressure to each backend, instead of the gateway holding their answers in memory.
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=QUEUE_EVENTS)

    async def on_event(model: str, chunk: bytes) -> None:
        head = json.dumps({"model": model, "type": "chunk"})[:-1].encode()
        await queue.put(b"data: " + head + b', "chunk": ' + chunk + b"}\n\n")

    async def one(card: ModelCard) -> Outcome:
        outcome = await call_model(
            gw.pool, gw.recorder, card, endpoint, body, request_id, on_event=on_event, forward_usage=wants_usage,
            charge=charge,
        )  # fmt: skip
        result = _result(outcome, endpoint)
        del result["response"]
        await queue.put(b"data: " + json.dumps({"type": "result", **result}).encode() + b"\n\n")
        return outcome

    tasks = [asyncio.create_task(one(card)) for card in cards]
    drain = DrainStop(gw.watches)
    try:
        pending = set(tasks)
        while pending or not queue.empty():
            getter = asyncio.ensure_future(queue.get())
            waiting: set[asyncio.Future[Any]] = {getter, drain.stopped, *pending}
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            pending -= done
            if getter in done:
                yield getter.result()
            else:
                getter.cancel()
            if drain.stopped in done:  # the gateway's drain time is over: an explicit end, not a cut stream
                yield ShuttingDown("the gateway is shutting down and its drain time is over").sse_event()
                return
        store([t.result() for t in tasks])
        yield b"data: " + json.dumps({"type": "done", "id": comparison_id}).encode() + b"\n\n" + b"data: [DONE]\n\n"
    except Exception as exc:  # a bug of ours: still an explicit end, never a cut stream
        log.exception("fan-out %s failed", comparison_id)
        yield ServerError(f"internal error: {type(exc).__name__}").sse_event()
    finally:
        drain.close()
        for task in tasks:
            task.cancel()  # the client left: close every upstream call (vLLM aborts)
        await asyncio.gather(*tasks, return_exceptions=True)


class DrainStop:
    """A fan-out stream's entry in the gateway's registry of calls to end when the drain time is over."""

    def __init__(self, registry: set[Any]) -> None:
        self.stopped: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._registry = registry
        registry.add(self)

    def abort(self) -> None:
        if not self.stopped.done():
            self.stopped.set_result(None)

    def close(self) -> None:
        self._registry.discard(self)
        self.stopped.cancel()


def _admin_only(request: Request) -> None:
    """Stored comparisons hold other clients' prompts and answers: with API keys on, only admin keys read them."""
    client: Client | None = request.scope.get("gateway.client")
    if client is not None and not client.key.admin:
        raise PermissionDenied("reading stored comparisons needs an admin key")


@router.get("/v1/compare", response_model=None)
async def recent(request: Request, limit: int = 50) -> Response:
    gw: Gateway = request.app.state.gateway
    try:
        _admin_only(request)
    except GatewayError as err:
        return error_response(err)
    return JSONResponse({"object": "list", "data": await gw.store.recent(max(1, min(limit, 500)))})


@router.get("/v1/compare/{comparison_id}", response_model=None)
async def one_comparison(request: Request, comparison_id: str) -> Response:
    gw: Gateway = request.app.state.gateway
    try:
        _admin_only(request)
    except GatewayError as err:
        return error_response(err)
    rows = await gw.store.comparison(comparison_id)
    if not rows:
        return error_response(NotFound(f"no comparison {comparison_id!r}"))
    return JSONResponse({"id": comparison_id, "results": [as_dict(r) for r in rows]})
