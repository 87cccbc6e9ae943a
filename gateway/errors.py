"""The gateway's closed error hierarchy.

Every failure the gateway itself reports is one of these classes. Each class maps, once, to:

- an HTTP status (``status``) used when the failure happens before the first response byte;
- an OpenAI error object ``{"error": {"message", "type", "param", "code"}}`` (``body()``);
- an SSE error event followed by ``data: [DONE]`` (``sse_event()``) when streaming already began;
- an ``upstream_reason`` for ``gateway_upstream_errors_total{reason}`` when the failure is the backend's.

::

    GatewayError
    ├── ClientError                 4xx, the caller's fault; never retried
    │   ├── InvalidRequest          400  invalid JSON, wrong types, missing fields
    │   ├── Unauthorized            401  missing or unknown API key (when keys are configured)
    │   ├── PermissionDenied        403  the key may not use that model
    │   ├── NotFound                404  no such route
    │   │   └── ModelNotFound       404  no configured model or alias of that name
    │   ├── RequestTimeout          408  the request head or body did not arrive in time (connection closed)
    │   ├── PayloadTooLarge         413
    │   ├── UnsupportedMediaType    415  a body that is not application/json
    │   ├── RateLimited             429  the key's requests or tokens per minute are spent   (Retry-After)
    │   ├── Overloaded              429  every replica is at max_concurrency and the queue is full (Retry-After)
    │   └── HeadersTooLarge         431
    └── ServerError                 5xx, ours or a backend's
        ├── NoHealthyBackend        503  every replica is down or ejected               (Retry-After if ejected)
        ├── TooManyConnections      503  the listener is at gateway.max_connections     (Retry-After)
        ├── ShuttingDown            503  the gateway is draining
        ├── StoreUnavailable        503  the results store (PostgreSQL) cannot be reached: a read of stored results
        ├── UpstreamUnreachable     502  connection refused / reset before a response
        ├── UpstreamTimeout         504  connect or read timeout
        ├── UpstreamBadResponse     502  non-JSON error page, malformed stream
        └── UpstreamStreamError     502  the backend failed after the stream began

A backend's own 4xx (and OpenAI-shaped 5xx) is not wrapped: its status and body pass through unchanged.
"""

from __future__ import annotations

import json
import math
from typing import Any, ClassVar

DONE = b"data: [DONE]\n\n"


class GatewayError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "internal_error"
    code: ClassVar[str | None] = None
    upstream_reason: ClassVar[str | None] = None

    def __init__(self, message: str, *, param: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after  # seconds, sent as Retry-After (rounded up)
        self.counted = False  # already in gateway_upstream_errors_total (by the pool, with its backend)
        self.extra_headers: dict[str, str] = {}

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return dict(self.extra_headers)
        return {**self.extra_headers, "retry-after": str(max(1, math.ceil(self.retry_after)))}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code if self.code is not None else self.status,
            }
        }

    def body_bytes(self) -> bytes:
        return json.dumps(self.body(), ensure_ascii=False).encode()

    def sse_event(self) -> bytes:
        """The in-band form: one error event, then the stream terminator."""
        return b"data: " + self.body_bytes() + b"\n\n" + DONE


class ClientError(GatewayError):
    status = 400
    type = "invalid_request_error"


class InvalidRequest(ClientError):
    status = 400
    code = "invalid_request"


class Unauthorized(ClientError):
    status = 401
    code = "invalid_api_key"


class PermissionDenied(ClientError):
    status = 403
    type = "permission_error"
    code = "model_not_allowed"


class NotFound(ClientError):
    status = 404
    type = "not_found_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class RequestTimeout(ClientError):
    status = 408
    code = "request_timeout"


class PayloadTooLarge(ClientError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(ClientError):
    status = 415
    code = "unsupported_media_type"


class RateLimited(ClientError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class Overloaded(ClientError):
    """Not the client's fault, but 429 is what clients back off on (OpenAI's SDK retries it after Retry-After)."""

    status = 429
    type = "rate_limit_error"
    code = "overloaded"


class HeadersTooLarge(ClientError):
    status = 431
    code = "headers_too_large"


class ServerError(GatewayError):
    status = 500
    type = "server_error"


class NoHealthyBackend(ServerError):
    status = 503
    type = "service_unavailable"
    code = "no_healthy_backend"


class TooManyConnections(ServerError):
    status = 503
    type = "service_unavailable"
    code = "too_many_connections"


class ShuttingDown(ServerError):
    status = 503
    type = "service_unavailable"
    code = "shutting_down"


class StoreUnavailable(ServerError):
    """The results store cannot be reached (a PostgreSQL server down or unreachable). Only reads of stored results
    fail with it; a write is dropped and counted instead (``gateway.compare.writer``)."""

    status = 503
    type = "service_unavailable"
    code = "store_unavailable"


class UpstreamUnreachable(ServerError):
    status = 502
    type = "bad_gateway"
    code = "upstream_unreachable"
    upstream_reason = "connect"


class UpstreamTimeout(ServerError):
    status = 504
    type = "gateway_timeout"
    code = "upstream_timeout"
    upstream_reason = "timeout"


class UpstreamBadResponse(ServerError):
    status = 502
    type = "bad_gateway"
    code = "upstream_bad_response"
    upstream_reason = "bad_response"


class UpstreamStreamError(ServerError):
    status = 502
    type = "bad_gateway"
    code = "upstream_stream_error"
    upstream_reason = "stream_broken"


# The closed set of values of gateway_upstream_errors_total{reason}. "status_5xx"/"status_429" come from backend
# responses (a backend's other 4xx is the client's fault, not the backend's, and is not counted here);
# "stream_error" is an error event the backend itself put in a stream.
UPSTREAM_REASONS: tuple[str, ...] = (
    "connect",
    "timeout",
    "bad_response",
    "stream_broken",
    "stream_error",
    "status_429",
    "status_5xx",
)


def status_reason(status: int) -> str | None:
    if status == 429:
        return "status_429"
    return "status_5xx" if status >= 500 else None
