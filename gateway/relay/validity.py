"""Whether a finished answer honoured what its request asked for: valid tool calls, JSON when JSON was asked.

Only a request that asks for structure has a ``Contract`` (``contract_of``): non-empty ``tools`` with
``tool_choice`` other than ``"none"``, or ``response_format`` of type ``json_object`` or ``json_schema``. Every other
call costs one dict lookup per field, and its stream keeps the observer's fast path (nothing is kept or parsed).
A call with a contract keeps its first choice's answer and is checked once it has ended, answered 200 and not cut
short by ``max_tokens`` (``finish_reason`` ``length``: a truncated answer is the budget's doing, not the model's).
The check never changes what the client received.

Tool calls, each call of the first choice (``metrics.TOOL_ERRORS``):

``no_call``          no call although ``tool_choice`` was ``"required"`` or named a function (under ``"auto"`` a
                     model may answer in text: not an error)
``unknown_tool``     the call names no tool of the request
``invalid_json``     its arguments do not parse as JSON
``schema_mismatch``  its arguments do not validate against that tool's ``parameters``

Structured output (``metrics.STRUCTURED_ERRORS``): the answer's content, ``<think>...</think>`` removed and whitespace
trimmed, is ``invalid_json`` when it does not parse as JSON, ``schema_mismatch`` when it does not validate
against ``response_format.json_schema.schema``. An answer that called a tool instead has no content to check.

A client's schema that is not a usable JSON Schema leaves the call unchecked rather than counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import jsonschema

from gateway.relay.sse import split_answer


@dataclass(frozen=True, slots=True)
class Contract:
    """What a request asked its answer to be: tools it may call (name -> parameters), and/or JSON."""

    tools: dict[str, dict[str, Any]] = field(default_factory=dict)
    call_required: bool = False  # tool_choice "required" or a named function
    json: bool = False  # response_format json_object or json_schema
    schema: dict[str, Any] | None = None  # response_format.json_schema.schema


@dataclass(frozen=True, slots=True)
class Verdict:
    tool_errors: tuple[str, ...] = ()  # one kind per failed call (``no_call`` at most once)
    structured_error: str | None = None


def contract_of(body: dict[str, Any]) -> Contract | None:
    """The contract of a request body, or None when it asks for no structure (the common case: two lookups)."""
    tools, response_format = body.get("tools"), body.get("response_format")
    if not tools and not response_format:
        return None
    choice = body.get("tool_choice")
    named: dict[str, dict[str, Any]] = {}
    if isinstance(tools, list) and choice != "none":
        for tool in tools:
            function = tool.get("function") if isinstance(tool, dict) else None
            if isinstance(function, dict) and isinstance(function.get("name"), str):
                parameters = function.get("parameters")
                named[function["name"]] = parameters if isinstance(parameters, dict) else {}
    required = bool(named) and (choice == "required" or isinstance(choice, dict))
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    schema = None
    if kind == "json_schema":
        spec = response_format.get("json_schema") if isinstance(response_format, dict) else None
        found = spec.get("schema") if isinstance(spec, dict) else None
        schema = found if isinstance(found, dict) else None
    wants_json = kind in ("json_object", "json_schema")
    if not named and not wants_json:
        return None
    return Contract(named, required, wants_json, schema)


def schema_valid(schema: dict[str, Any], value: Any) -> bool | None:
    """Whether ``value`` validates against ``schema``; None when the schema cannot be used (the client's)."""
    try:
        return next(iter(jsonschema.Draft202012Validator(schema).iter_errors(value)), None) is None
    except Exception:  # an unusable schema (bad keyword values, unresolvable $ref) is not the model's
        return None


def tool_call_error(tools: dict[str, dict[str, Any]], name: str, arguments: str) -> str | None:
    """The ``metrics.TOOL_ERRORS`` kind of one call, or None when it is valid (or its tool's schema is unusable)."""
    if name not in tools:
        return "unknown_tool"
    try:
        value = json.loads(arguments or "{}")
    except ValueError:
        return "invalid_json"
    return "schema_mismatch" if schema_valid(tools[name], value) is False else None


def check(contract: Contract, text: str, tool_calls: list[tuple[str, str]]) -> Verdict:
    """Check a finished answer (its content and its ``(name, arguments)`` calls) against its request's contract."""
    errors: list[str] = []
    if contract.tools:
        if not tool_calls and contract.call_required:
            errors.append("no_call")
        for name, arguments in tool_calls:
            if (kind := tool_call_error(contract.tools, name, arguments)) is not None:
                errors.append(kind)
    structured = None
    if contract.json and not tool_calls:
        content = split_answer(text)[1].strip()
        try:
            value = json.loads(content)
        except ValueError:
            structured = "invalid_json"
        else:
            if contract.schema is not None and schema_valid(contract.schema, value) is False:
                structured = "schema_mismatch"
    return Verdict(tuple(errors), structured)
