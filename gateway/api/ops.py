"""Operational routes: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.app import Gateway
from gateway.metrics import exposition

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the process serves requests. Says nothing about the backends (see /ready)."""
    return {"status": "ok"}


@router.get("/ready", response_model=None)
async def ready(request: Request) -> JSONResponse:
    """503 until every configured model has at least one healthy backend, and again once draining began."""
    gw: Gateway = request.app.state.gateway
    models = gw.pool.ready()
    backends = {b.name: b.healthy is True for b in gw.pool.backends.values()}
    ok = all(models.values()) and not gw.draining
    body = {"ready": ok, "draining": gw.draining, "models": models, "backends": backends}
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    return Response(exposition(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)
