"""Arms of a comparison: a model, or a model with a named variant of the request.

A variant is a set of request fields laid over the prompt's request for one arm, for instance thinking turned off
for Qwen3: ``nothink = {"chat_template_kwargs": {"enable_thinking": false}}``. Arms are named ``model`` or
``model+variant``; every arm gets the same prompts, so ``qwen3``, ``qwen3+nothink`` and ``llama`` are compared
pair by pair like any two models (``gateway.compare.stats``).

Which arms: the names listed, where ``model+variant`` picks a variant for one model. When variants are given and no
name picks one, every model is compared plain and with each variant. ``gateway compare --variant NAME=JSON`` and
the fan-out API's ``variants`` field both come here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
# Fields a variant may not set: they say which model and how the answer travels, which the comparison decides.
RESERVED = frozenset({"model", "models", "variants", "stream", "stream_options"})
MAX_VARIANTS = 8


class ArmError(ValueError):
    """A variant or an arm name that cannot be used; ``unknown_model`` when the name is not a model at all."""

    def __init__(self, message: str, *, unknown_model: bool = False) -> None:
        super().__init__(message)
        self.unknown_model = unknown_model


@dataclass(frozen=True, slots=True)
class Arm:
    model: str
    variant: str = ""
    overrides: Mapping[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.model}+{self.variant}" if self.variant else self.model

    def body(self, base: Mapping[str, Any]) -> dict[str, Any]:
        """The request for this arm: ``base`` with the variant's fields laid over it."""
        return {**base, **self.overrides}


def check_variants(raw: object) -> dict[str, dict[str, Any]]:
    """``{name: {field: value}}`` as given (a JSON object of objects), checked; ArmError says what is wrong."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ArmError('variants: an object of named request overrides, e.g. {"nothink": {...}}')
    if len(raw) > MAX_VARIANTS:
        raise ArmError(f"variants: at most {MAX_VARIANTS}")
    out: dict[str, dict[str, Any]] = {}
    for name, fields in raw.items():
        if not isinstance(name, str) or not VARIANT_NAME.match(name):
            raise ArmError(f"variant name {name!r}: letters, digits, '_', '.', '-' (at most 64)")
        if not isinstance(fields, dict) or not fields:
            raise ArmError(f"variant {name!r}: a non-empty object of request fields")
        if reserved := sorted(RESERVED & set(fields)):
            raise ArmError(f"variant {name!r} may not set {', '.join(reserved)}: the comparison sets them")
        out[name] = fields
    return out


def parse_variant_option(option: str) -> tuple[str, dict[str, Any]]:
    """``NAME=JSON`` (the command line's ``--variant``)."""
    name, sep, text = option.partition("=")
    if not sep:
        raise ArmError(f"--variant {option!r}: expected NAME=JSON, e.g. nothink='{{\"temperature\": 0}}'")
    try:
        fields = json.loads(text)
    except ValueError as exc:
        raise ArmError(f"--variant {name}: not JSON: {exc}") from None
    return name, check_variants({name: fields})[name]


def arms(
    names: Sequence[str], variants: Mapping[str, Mapping[str, Any]], resolve: Callable[[str], str | None]
) -> list[Arm]:
    """The arms ``names`` ask for (see the module docstring), each once, in order. ``resolve`` maps a model name or
    alias to its id, None when there is no such model."""
    picked: dict[str, Arm] = {}
    used: set[str] = set()
    for name in names:
        model = resolve(name)
        variant = ""
        if model is None and "+" in name:
            base, variant = name.rsplit("+", 1)
            if variant not in variants:
                known = ", ".join(sorted(variants)) or "none given"
                raise ArmError(f"`{name}`: no variant {variant!r} (variants: {known})")
            model = resolve(base)
            used.add(variant)
            name = base
        if model is None:
            raise ArmError(f"The model `{name}` does not exist.", unknown_model=True)
        arm = Arm(model, variant, dict(variants[variant]) if variant else {})
        picked.setdefault(arm.name, arm)
    if variants and not used:  # every model, plain and with each variant
        plain = list(picked.values())
        for arm in plain:
            for variant, fields in variants.items():
                extra = Arm(arm.model, variant, dict(fields))
                picked.setdefault(extra.name, extra)
    elif unused := sorted(set(variants) - used):
        raise ArmError(f"variant(s) {', '.join(unused)} given but no arm uses them (name arms as model+variant)")
    return list(picked.values())
