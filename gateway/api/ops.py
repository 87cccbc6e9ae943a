"""Operational routes: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.errors import Unauthorized
from gateway.metrics import exposition
from gateway.state import Gateway

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the process serves requests. Says nothing about the backends (see /ready)."""
    return {"status": "ok"}


@router.get("/ready", response_model=None)
async def ready(request: Request) -> JSONResponse:
    """503 until every configured model has at least one healthy backend, and again once draining began.

    Probes need no key. With API keys on, which models and backends are up (their names) is for admin keys only:
    anyone else gets just ``ready`` and ``draining``."""
    gw: Gateway = request.app.state.gateway
    models = gw.pool.ready()
    ok = all(models.values()) and not gw.draining
    body: dict[str, object] = {"ready": ok, "draining": gw.draining}
    if _admin_or_open(gw, request.headers.get("authorization")):
        body["models"] = models
        body["backends"] = {b.name: b.healthy is True for b in gw.pool.backends.values()}
    return JSONResponse(body, status_code=200 if ok else 503)


def _admin_or_open(gw: Gateway, authorization: str | None) -> bool:
    if not gw.keyring.enabled:
        return True
    try:
        return gw.keyring.verify(authorization).key.admin
    except Unauthorized:  # no key or a wrong one: the short answer, never a refusal (probes send no key)
        return False


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    return Response(exposition(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)
