"""Wire models: strict on the few fields the gateway reads, ``extra="allow"`` on everything it forwards.

The gateway reads ``model``, ``stream`` and ``stream_options`` and checks that a chat request has ``messages``
and a completion request a ``prompt``. Every other field (``top_k``, ``guided_json``, ``chat_template_kwargs``,
...) is vLLM's to validate and reaches it byte for byte: the body is re-serialised only when the gateway must
change it (to ask for usage in a stream, or to replace an alias by the model id).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError, field_validator

from gateway.errors import InvalidRequest


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: StrictBool | None = None


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: StrictStr = Field(min_length=1, description="model id or alias, see GET /v1/models")
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None


class ChatCompletionRequest(_Request):
    messages: list[dict[str, Any]] = Field(min_length=1)


class CompletionRequest(_Request):
    prompt: Any = Field(description="a string, a list of strings, a list of token ids or a list of those")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: Any) -> Any:
        if not isinstance(value, str | list):
            raise ValueError("must be a string or a list")
        return value


Endpoint = Literal["chat", "completions"]
_MODELS: dict[str, type[_Request]] = {"chat": ChatCompletionRequest, "completions": CompletionRequest}


@dataclass(slots=True)
class ParsedRequest:
    body: dict[str, Any]
    model: str
    stream: bool
    client_wants_usage: bool


def json_object(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or InvalidRequest (400) saying what is wrong with it."""
    try:
        text = raw.decode("utf-8")  # strict: JSON exchanged between systems is UTF-8 (RFC 8259)
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"request body is not valid UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequest("request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    return body


def parse_request(raw: bytes, endpoint: Endpoint) -> ParsedRequest:
    return parse_body(json_object(raw), endpoint)


def parse_body(body: dict[str, Any], endpoint: Endpoint) -> ParsedRequest:
    try:
        head = _MODELS[endpoint].model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise InvalidRequest(f"{param}: {first['msg']}" if param else first["msg"], param=param) from None
    opts = head.stream_options
    return ParsedRequest(
        body=body,
        model=head.model,
        stream=bool(head.stream),
        client_wants_usage=bool(opts and opts.include_usage),
    )


_WANT_USAGE = b'{"stream_options":{"include_usage":true},'


def upstream_body(parsed: ParsedRequest, raw: bytes, model_id: str) -> bytes:
    """The body to send to vLLM: the client's bytes unless usage must be requested or an alias replaced.

    The common streamed call (no alias, no ``stream_options``) keeps the client's bytes and gets the option
    spliced in after the opening brace: no re-serialisation of what may be a long prompt."""
    body = parsed.body
    if parsed.model == model_id and parsed.stream and not parsed.client_wants_usage and "stream_options" not in body:
        start = len(raw) - len(raw.lstrip())
        if raw[start : start + 1] == b"{":  # always, for a parsed object; checked so a surprise cannot corrupt it
            return _WANT_USAGE + raw[start + 1 :]
    changed = False
    if parsed.model != model_id:
        body["model"] = model_id
        changed = True
    if parsed.stream and not parsed.client_wants_usage:
        opts = body.get("stream_options")
        body["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
        changed = True
    return dump_json(body) if changed else raw


def dump_json(body: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON; a lone surrogate the client wrote as an escape ("\ud800") stays an escape."""
    try:
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:
        return json.dumps(body, separators=(",", ":")).encode()


# Documented request bodies for the OpenAPI schema (the handlers read the raw body themselves so that invalid
# JSON is a 400 with an OpenAI error object, not FastAPI's 422).
def openapi_body(endpoint: Endpoint, *, fanout: bool = False) -> dict[str, Any]:
    schema = _inline(_MODELS[endpoint].model_json_schema())
    if fanout:  # the fan-out routes take "models" (a list, or "all") instead of "model"
        schema["properties"].pop("model")
        schema["properties"] = {
            "models": {
                "anyOf": [{"type": "array", "items": {"type": "string"}, "minItems": 1}, {"const": "all"}],
                "description": 'model ids or aliases to ask, or "all"',
            },
            **schema["properties"],
        }
        schema["required"] = ["models", *(r for r in schema["required"] if r != "model")]
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """Replace pydantic's local ``#/$defs/X`` references by the definitions (they would dangle once the schema is
    embedded in the OpenAPI document)."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return walk(defs[ref.removeprefix("#/$defs/")])
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    result: dict[str, Any] = walk(schema)
    return result
