"""Values that satisfy a JSON schema: the arguments of an emulated tool call and ``response_format`` content.

vLLM constrains a real model's output to the schema; the emulator builds a value that validates instead:
objects with every property (required or not), strings within their length bounds (``pattern`` and ``format`` are
not honoured), numbers and integers within their bounds, booleans, nulls, arrays of ``minItems`` (at least one)
items, ``enum``/``const`` values, the first branch of ``anyOf``/``oneOf``, merged ``allOf``, and local ``$ref``s.
"""

from __future__ import annotations

import math
import random
from typing import Any

from gateway.devstack.emulator.tokens import WORDS

MAX_DEPTH = 16
DEFAULT_OBJECT = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}


def _resolve(ref: str, root: dict[str, Any]) -> dict[str, Any]:
    node: Any = root
    for part in ref.removeprefix("#/").split("/"):
        node = node.get(part, {}) if isinstance(node, dict) else {}
    return node if isinstance(node, dict) else {}


def _string(schema: dict[str, Any], rng: random.Random) -> str:
    lo, hi = int(schema.get("minLength", 0)), schema.get("maxLength")
    text = " ".join(rng.choice(WORDS) for _ in range(2))
    while len(text) < lo:
        text += " " + rng.choice(WORDS)
    return text[: int(hi)] if hi is not None else text


def _number(schema: dict[str, Any], rng: random.Random, integer: bool) -> int | float:
    lo = schema.get("minimum", schema.get("exclusiveMinimum"))
    hi = schema.get("maximum", schema.get("exclusiveMaximum"))
    if lo is None:
        lo = 0 if hi is None or hi > 0 else hi - 100
    if hi is None:
        hi = lo + 100
    if integer:
        low = math.floor(lo) + 1 if "minimum" not in schema and "exclusiveMinimum" in schema else math.ceil(lo)
        high = math.ceil(hi) - 1 if "maximum" not in schema and "exclusiveMaximum" in schema else math.floor(hi)
        return rng.randint(low, max(low, high))
    if hi <= lo:
        return float(lo)
    value = round(lo + (hi - lo) * rng.uniform(0.1, 0.9), 2)  # strictly inside: exclusive bounds hold too
    return value if lo < value < hi else (lo + hi) / 2


def value_for(schema: Any, rng: random.Random, root: dict[str, Any] | None = None, depth: int = 0) -> Any:
    """A value valid against ``schema`` (a JSON schema as a dict; ``True``/empty: anything, here a string)."""
    if not isinstance(schema, dict) or depth > MAX_DEPTH:
        return _string({}, rng)
    root = schema if root is None else root
    if "$ref" in schema:
        return value_for(_resolve(str(schema["$ref"]), root), rng, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return rng.choice(list(schema["enum"]))
    for key in ("anyOf", "oneOf"):
        if schema.get(key):
            return value_for(schema[key][0], rng, root, depth + 1)
    if schema.get("allOf"):
        merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
        for part in schema["allOf"]:
            part = _resolve(part["$ref"], root) if isinstance(part, dict) and "$ref" in part else part
            for k, v in (part if isinstance(part, dict) else {}).items():
                if k in ("properties",) and isinstance(v, dict):
                    merged["properties"] = {**merged.get("properties", {}), **v}
                elif k == "required" and isinstance(v, list):
                    merged["required"] = [*merged.get("required", []), *v]
                else:
                    merged.setdefault(k, v)
        return value_for(merged, rng, root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
    if kind == "object":
        props = schema.get("properties") or {}
        out = {name: value_for(sub, rng, root, depth + 1) for name, sub in props.items()}
        for name in schema.get("required") or []:
            out.setdefault(name, _string({}, rng))
        return out
    if kind == "array":
        count = max(1, int(schema.get("minItems", 1)))
        if "maxItems" in schema:
            count = min(count, int(schema["maxItems"]))
        prefix = schema.get("prefixItems") or []
        return [
            value_for(prefix[i] if i < len(prefix) else schema.get("items", {}), rng, root, depth + 1)
            for i in range(count)
        ]
    if kind == "string":
        return _string(schema, rng)
    if kind in ("number", "integer"):
        return _number(schema, rng, kind == "integer")
    if kind == "boolean":
        return rng.random() < 0.5
    return None
