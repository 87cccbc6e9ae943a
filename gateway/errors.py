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
    │   ├── NotFound                404  no such route
    │   │   └── ModelNotFound       404  no configured model or alias of that name
    │   └── PayloadTooLarge         413
    └── ServerError                 5xx, ours or a backend's
        ├── NoHealthyBackend        503  every replica is down or ejected
        ├── UpstreamUnreachable     502  connection refused / reset before a response
        ├── UpstreamTimeout         504  connect or read timeout
        ├── UpstreamBadResponse     502  non-JSON error page, malformed stream
        └── UpstreamStreamError     502  the backend failed after the stream began

A backend's own 4xx (and OpenAI-shaped 5xx) is not wrapped: its status and body pass through unchanged.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

DONE = b"data: [DONE]\n\n"


class GatewayError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "internal_error"
    code: ClassVar[str | None] = None
    upstream_reason: ClassVar[str | None] = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

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


class NotFound(ClientError):
    status = 404
    type = "not_found_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class PayloadTooLarge(ClientError):
    status = 413
    code = "payload_too_large"


class ServerError(GatewayError):
    status = 500
    type = "server_error"


class NoHealthyBackend(ServerError):
    status = 503
    type = "service_unavailable"
    code = "no_healthy_backend"


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
