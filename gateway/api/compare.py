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
from gateway.compare.arms import Arm, ArmError, arms, check_variants
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
from gateway.metrics import NO_MODEL
from gateway.protocol import Endpoint, ParsedRequest, json_object, openapi_body, parse_body
from gateway.relay.asgi import race_disconnect
from gateway.state import Gateway

router = APIRouter()
log = logging.getLogger("gateway.api.compare")
QUEUE_EVENTS = 64  # events of a streaming fan-out waiting for its client, all models together


def _arms(gw: Gateway, body: dict[str, Any]) -> list[Arm]:
    """The arms asked for: ``models`` (names, ``model+variant``, or "all") with the ``variants`` defined."""
    wanted = body.get("models")
    if wanted == "all":
        wanted = [card.id for card in gw.settings.models]
    if not isinstance(wanted, list) or not wanted or not all(isinstance(m, str) for m in wanted):
        raise InvalidRequest('models: a non-empty list of model names, or "all"', param="models")
    try:
        found = arms(wanted, check_variants(body.get("variants")), gw.pool.table.resolve)
    except ArmError as err:
        if err.unknown_model:
            raise ModelNotFound(str(err), param="models") from None
        raise InvalidRequest(str(err), param="variants") from None
    limit = gw.settings.gateway.request_limits.max_fanout_models
    if len(found) > limit:
        raise InvalidRequest(
            f"models: more than {limit} models (gateway.request_limits.max_fanout_models)", param="models"
        )
    return found


def _parse(gw: Gateway, raw: bytes, endpoint: Endpoint) -> tuple[dict[str, Any], list[Arm], list[ParsedRequest]]:
    """The body without ``model``/``models``/``variants``, the arms, and each arm's request checked as an ordinary
    one (so a variant's fields are held to the same rules)."""
    limits = gw.settings.gateway.request_limits
    body = json_object(raw, limits)
    found = _arms(gw, body)
    for key in ("model", "models", "variants"):
        body.pop(key, None)
    parsed = []
    for arm in found:
        one = parse_body({**arm.body(body), "model": arm.model}, endpoint, limits)
        one.size = len(raw)
        parsed.append(one)
    return body, found, parsed


def _result(outcome: Outcome, endpoint: Endpoint) -> dict[str, Any]:
    return {
        "model": outcome.model,
        "variant": outcome.variant or None,
        "arm": outcome.arm,
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
    limit_headers: dict[str, str] = {}
    charges: list[Charge | None] = []
    try:
        body, found, parsed = _parse(gw, await request.body(), endpoint)
        stream, wants_usage = parsed[0].stream, parsed[0].client_wants_usage
        if client is not None:
            for arm in found:
                client.check_model(arm.model)
            # N arms are N requests, each with its own possible cost
            estimates = [gw.keyring.estimate(p) for p in parsed]
            grant = await client.reserve(len(found), sum(estimates))
            share = grant.tokens
            total = max(1, sum(estimates))
            charges = [
                Charge(client, share * e // total, p.prompt_estimate) for e, p in zip(estimates, parsed, strict=True)
            ]
            limit_headers = grant.headers
        else:
            charges = [None] * len(found)
    except GatewayError as err:
        gw.recorder.refused(NO_MODEL, err)  # a fan-out names several models
        return error_response(err, request_id)
    cards = [gw.settings.card(arm.model) for arm in found]
    bodies = [arm.body(body) for arm in found]
    comparison_id = f"cmp-{uuid.uuid4().hex}"
    headers = {"x-request-id": request_id, "x-comparison-id": comparison_id, **limit_headers}

    def store(outcomes: list[Outcome]) -> None:
        gw.store.add(o.to_result(comparison_id, "fanout", gw.settings.card(o.model), True) for o in outcomes)

    if not stream:

        async def everyone() -> list[Outcome]:
            return list(
                await asyncio.gather(
                    *(
                        call_model(gw.pool, gw.recorder, c, endpoint, b, request_id, charge=ch, variant=a.variant)
                        for a, c, b, ch in zip(found, cards, bodies, charges, strict=True)
                    )
                )
            )

        gone, outcomes = await race_disconnect(everyone, request.receive)
        if gone:
            return Response(status_code=499)
        store(outcomes)
        results = [_result(o, endpoint) for o in outcomes]
        return JSONResponse({"id": comparison_id, "object": "comparison", "results": results}, headers=headers)

    return StreamingResponse(
        _stream(gw, found, cards, endpoint, bodies, request_id, comparison_id, wants_usage, store, charges),
        media_type="text/event-stream",
        headers={**headers, "cache-control": "no-cache", "x-accel-buffering": "no"},
    )


async def _stream(
    gw: Gateway,
    found: list[Arm],
    cards: list[ModelCard],
    endpoint: Endpoint,
    bodies: list[dict[str, Any]],
    request_id: str,
    comparison_id: str,
    wants_usage: bool,
    store: Any,
    charges: list[Charge | None],
) -> AsyncIterator[bytes]:
    # Bounded: a client that reads slowly (or not at all) slows the models' reads down to its pace, through the
    # relay's own back-pressure to each backend, instead of the gateway holding their answers in memory.
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=QUEUE_EVENTS)

    heads = {
        arm.name: json.dumps({"model": arm.model, "arm": arm.name, "type": "chunk"})[:-1].encode() for arm in found
    }

    async def on_event(arm: str, chunk: bytes) -> None:
        await queue.put(b"data: " + heads[arm] + b', "chunk": ' + chunk + b"}\n\n")

    async def one(arm: Arm, card: ModelCard, body: dict[str, Any], charge: Charge | None) -> Outcome:
        outcome = await call_model(
            gw.pool, gw.recorder, card, endpoint, body, request_id, on_event=on_event, forward_usage=wants_usage,
            charge=charge, variant=arm.variant,
        )  # fmt: skip
        result = _result(outcome, endpoint)
        del result["response"]
        await queue.put(b"data: " + json.dumps({"type": "result", **result}).encode() + b"\n\n")
        return outcome

    tasks = [asyncio.create_task(one(*job)) for job in zip(found, cards, bodies, charges, strict=True)]
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
        listed = await gw.store.recent(max(1, min(limit, 500)))
    except GatewayError as err:  # StoreUnavailable: the PostgreSQL store cannot be reached (503)
        return error_response(err)
    return JSONResponse({"object": "list", "data": listed})


@router.get("/v1/compare/{comparison_id}", response_model=None)
async def one_comparison(request: Request, comparison_id: str) -> Response:
    gw: Gateway = request.app.state.gateway
    try:
        _admin_only(request)
        rows = await gw.store.comparison(comparison_id)
    except GatewayError as err:  # StoreUnavailable: the PostgreSQL store cannot be reached (503)
        return error_response(err)
    if not rows:
        return error_response(NotFound(f"no comparison {comparison_id!r}"))
    return JSONResponse({"id": comparison_id, "results": [as_dict(r) for r in rows]})
