"""vLLM's error bodies, as its 0.32 server renders them.

Two renderings exist there and the emulator keeps both: a ``VLLMValidationError`` (the checks vLLM writes by hand)
goes through ``create_error_response`` — type ``BadRequestError``, ``param`` the parameter, and the message
followed by ``(parameter=..., value=...)``; a wrong JSON type fails pydantic first and goes through the
``RequestValidationError`` handler — type ``Bad Request``, ``param`` ``body.<field>``, and a message listing
pydantic's error (pydantic's wording is approximated). Refusals of parameters vLLM honours but the emulator does
not are the emulator's own words in the first rendering, naming the parameter.
"""

from __future__ import annotations

from typing import Any


class VllmError(Exception):
    def __init__(self, status: int, message: str, type_: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}


def bad_request(message: str, param: str | None = None, value: Any = None) -> VllmError:
    """A ``VLLMValidationError`` as vLLM answers it (``str()`` of the error appends its parameter and value)."""
    extras = [f"parameter={param}"] if param is not None else []
    if value is not None:
        extras.append(f"value={value}")
    return VllmError(400, f"{message} ({', '.join(extras)})" if extras else message, "BadRequestError", param)


def unsupported(param: str, what: str = "") -> VllmError:
    """A parameter vLLM honours and the emulator does not: refused rather than ignored."""
    detail = f" {what}" if what else ""
    return bad_request(f"The vLLM emulator does not implement `{param}`{detail}.", param)


def _summary(value: Any) -> str:
    if isinstance(value, str):
        return value if len(value) <= 200 else value[:200] + "...[truncated]"
    if isinstance(value, list | dict):
        return f"<{type(value).__name__} of {len(value)} items>"
    return str(value)


def invalid_type(field: str, kind: str, msg: str, value: Any) -> VllmError:
    """A field of the wrong JSON type: pydantic's error through vLLM's ``RequestValidationError`` handler."""
    error = {"type": kind, "loc": ("body", field), "msg": msg, "input": _summary(value)}
    return VllmError(400, f"1 validation error:\n  {error}", "Bad Request", f"body.{field}")


def model_not_found(model: object, served: str) -> VllmError:
    return VllmError(
        404, f"The model `{model}` does not exist. Valid aliases: {served}.", "NotFoundError", param="model"
    )
