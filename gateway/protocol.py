"""Wire models: strict on the few fields the gateway reads, ``extra="allow"`` on everything it forwards.

The gateway reads ``model``, ``stream``, ``stream_options`` and ``max_tokens`` and checks that a chat request has
``messages`` and a completion request a ``prompt``. Every other field (``top_k``, ``guided_json``,
``chat_template_kwargs``, ...) is vLLM's to validate and reaches it byte for byte: the body is re-serialised only
when the gateway must change it (to ask for usage in a stream, or to replace an alias by the model id).

A body is decoded on the event loop, so its cost is bounded before it is parsed (:class:`RequestLimits`): a
16 MiB body of ``[{},{},...]`` would otherwise become millions of Python objects (about 50x its size) and stall
every stream for seconds. Brackets and commas are counted in the raw bytes first (a C-speed count that includes
those inside strings, so it is an upper bound: never too low); then the parsed body's nesting depth, messages,
content parts and fan-out models. Each limit has an OpenAI-shaped 400 that names it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError, field_validator

from gateway.config import RequestLimits
from gateway.errors import InvalidRequest

DEFAULT_LIMITS = RequestLimits()


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
    max_tokens: int | None = None  # ``max_completion_tokens`` or ``max_tokens``, when the client set one
    completions: int = 1  # ``n``: answers asked for
    size: int = 0  # bytes of the body

    @property
    def prompt_estimate(self) -> int:
        """The prompt's tokens at most, about: a token per 4 bytes of body (right for English; the tokens reserved
        against a key's limit are settled against the backend's usage)."""
        return self.size // 4


def _too_big(what: str, limit: int, name: str) -> InvalidRequest:
    return InvalidRequest(f"request body has more than {limit} {what} (gateway.request_limits.{name})")


def json_object(raw: bytes, limits: RequestLimits = DEFAULT_LIMITS) -> dict[str, Any]:
    """The request body as a JSON object, or InvalidRequest (400) saying what is wrong with it."""
    brackets = raw.count(b"{") + raw.count(b"[")
    if brackets > limits.max_json_containers:
        raise _too_big("JSON objects and arrays ('{' and '[')", limits.max_json_containers, "max_json_containers")
    if raw.count(b",") > limits.max_json_values:
        raise _too_big("JSON values (',')", limits.max_json_values, "max_json_values")
    try:
        text = raw.decode("utf-8")  # strict: JSON exchanged between systems is UTF-8 (RFC 8259)
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"request body is not valid UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise _too_big("levels of nesting", limits.max_json_depth, "max_json_depth") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    if brackets > limits.max_json_depth and _depth(body) > limits.max_json_depth:
        raise _too_big("levels of nesting", limits.max_json_depth, "max_json_depth")
    return body


def _depth(value: Any) -> int:
    """The nesting depth of a parsed JSON value (iterative: no recursion limit to hit)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return deepest


def parse_request(raw: bytes, endpoint: Endpoint, limits: RequestLimits = DEFAULT_LIMITS) -> ParsedRequest:
    parsed = parse_body(json_object(raw, limits), endpoint, limits)
    parsed.size = len(raw)
    return parsed


def _check_counts(body: dict[str, Any], limits: RequestLimits) -> None:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return
    if len(messages) > limits.max_messages:
        raise _too_big("messages", limits.max_messages, "max_messages")
    parts = sum(len(m["content"]) for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list))
    if parts > limits.max_content_parts:
        raise _too_big("content parts", limits.max_content_parts, "max_content_parts")


def _max_tokens(body: dict[str, Any]) -> int | None:
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def parse_body(body: dict[str, Any], endpoint: Endpoint, limits: RequestLimits = DEFAULT_LIMITS) -> ParsedRequest:
    _check_counts(body, limits)
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
        max_tokens=_max_tokens(body),
        completions=n if isinstance(n := body.get("n"), int) and not isinstance(n, bool) and n > 1 else 1,
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
