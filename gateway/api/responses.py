"""OpenAI-shaped error responses for routes and middlewares."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from gateway.errors import GatewayError


def error_response(err: GatewayError, request_id: str | None = None) -> JSONResponse:
    headers = err.headers()
    if request_id:
        headers["x-request-id"] = request_id
    return JSONResponse(err.body(), status_code=err.status, headers=headers)
