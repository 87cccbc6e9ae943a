"""Grading answers against an expectation: is a model's answer right, not only fast and cheap.

A graded prompt carries ``expected`` and a ``scorer`` (``exact`` when it names none):

==============  ======================================================================================================
scorer          correct when
==============  ======================================================================================================
``exact``       the answer equals ``expected`` (a string, or a list of accepted strings) once both are normalised
``contains``    the normalised answer contains the normalised ``expected`` (or one of them)
``regex``       ``expected`` (a Python regular expression) matches the answer somewhere
``number``      the answer's first number (or, when the answer ends with one, its last: "... so the answer is 42")
                is within ``tolerance`` (absolute, default 1e-6) of ``expected``; "1,234", a minus sign, "2.5e3" and
                full-width digits read as numbers
``choice``      the answer's choice letter (A-E, a capital: "B", "(B)", "**B**", "B。", "Answer: B", "选B", "我选择B")
                is ``expected``
``json_schema`` the answer (or the JSON object inside a fenced code block) parses and validates against
                ``schema``; with ``expected`` too, the parsed value must also equal it
``tool_call``   the first tool call names a tool from ``tools`` and its arguments parse and validate against that
                tool's ``parameters``; with ``expected`` ({"name", "arguments"}), they must also be those. The
                failures are told apart: ``no_call``, ``invalid_json``, ``unknown_tool``, ``schema_mismatch``,
                ``wrong_call``
``judge``       decided by a judge model afterwards (``gateway compare --judge``): not graded here
==============  ======================================================================================================

Normalisation (``normalise``): Unicode NFKC (full-width digits, letters and punctuation become their ASCII forms,
so a full-width "42" equals "42" and a full-width comma a comma), case folded, surrounding whitespace and a final
full stop removed, inner whitespace collapsed. Reasoning is never graded: ``strip_reasoning`` removes
``<think>...</think>`` left in the content, and the ``reasoning``/``reasoning_content`` fields are not part of the
answer to begin with.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

import jsonschema

from gateway.relay.sse import split_answer
from gateway.relay.validity import tool_call_error

SCORERS = ("exact", "contains", "regex", "number", "choice", "json_schema", "tool_call", "judge")
TOOL_ERRORS = ("no_call", "invalid_json", "unknown_tool", "schema_mismatch", "wrong_call")
CHOICES = "ABCDE"


class ExpectationError(ValueError):
    """A graded prompt whose expectation cannot be used; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class Expectation:
    scorer: str
    expected: Any = None
    tolerance: float = 1e-6
    schema: dict[str, Any] | None = None
    tools: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True, slots=True)
class Grade:
    correct: bool | None  # None: not graded here (a judge decides)
    score: float | None  # 1.0 or 0.0 for the scorers here
    detail: str = ""  # why it is wrong (or which tool-call failure), for the report
    kind: str = ""  # tool_call failures: one of TOOL_ERRORS


@dataclass(slots=True)
class ToolCall:
    name: str = ""
    arguments: str = ""


@dataclass(slots=True)
class Answer:
    """What is graded: the answer's text (reasoning removed) and its tool calls."""

    text: str
    tool_calls: list[ToolCall] = field(default_factory=list)


def expectation_of(line: dict[str, Any]) -> Expectation | None:
    """The expectation a prompt line carries (None when it has neither ``expected`` nor ``scorer``)."""
    scorer = line.get("scorer")
    if scorer is None and "expected" not in line:
        return None
    scorer = "exact" if scorer is None else scorer
    if scorer not in SCORERS:
        raise ExpectationError(f"unknown scorer {scorer!r}; expected one of {', '.join(SCORERS)}")
    expected = line.get("expected")
    tools = line.get("tools") or ()
    schema = line.get("schema")
    tolerance = line.get("tolerance", 1e-6)
    if scorer in ("exact", "contains"):
        if not (isinstance(expected, str) or (isinstance(expected, list) and expected and
                                              all(isinstance(x, str) for x in expected))):  # fmt: skip
            raise ExpectationError(f"scorer {scorer!r} needs 'expected': a string or a list of strings")
    elif scorer == "regex":
        if not isinstance(expected, str):
            raise ExpectationError("scorer 'regex' needs 'expected': a regular expression")
        try:
            re.compile(expected)
        except re.error as exc:
            raise ExpectationError(f"'expected' is not a valid regular expression: {exc}") from None
    elif scorer == "number":
        if isinstance(expected, str):
            expected = _first_number(expected)
        if not isinstance(expected, (int, float)) or isinstance(expected, bool) or not math.isfinite(expected):
            raise ExpectationError("scorer 'number' needs 'expected': a number")
        if not isinstance(tolerance, (int, float)) or isinstance(tolerance, bool) or tolerance < 0:
            raise ExpectationError("'tolerance' must be a number >= 0")
    elif scorer == "choice":
        if not isinstance(expected, str) or expected.strip().upper() not in CHOICES:
            raise ExpectationError(f"scorer 'choice' needs 'expected': one letter of {CHOICES}")
        expected = expected.strip().upper()
    elif scorer == "json_schema":
        if not isinstance(schema, dict):
            raise ExpectationError("scorer 'json_schema' needs 'schema': a JSON Schema object")
        _check_schema(schema, "schema")
    elif scorer == "tool_call":
        if not isinstance(tools, list) or not tools:
            raise ExpectationError("scorer 'tool_call' needs 'tools': the request's tools (a non-empty list)")
        for tool in tools:
            function = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise ExpectationError("each of 'tools' needs {'type': 'function', 'function': {'name', ...}}")
            _check_schema(function.get("parameters") or {}, f"the parameters of {function['name']}")
        if expected is not None and not (isinstance(expected, dict) and isinstance(expected.get("name"), str)):
            raise ExpectationError("scorer 'tool_call': 'expected' must be {'name': ..., 'arguments': {...}}")
    return Expectation(scorer, expected, float(tolerance), schema, tuple(tools))


def _check_schema(schema: Any, what: str) -> None:
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ExpectationError(f"{what} is not a valid JSON Schema: {exc.message}") from None


def normalise(text: str) -> str:
    folded = unicodedata.normalize("NFKC", text).casefold()
    folded = " ".join(folded.split())
    return folded[:-1].rstrip() if folded.endswith((".", "。")) else folded


def strip_reasoning(text: str) -> str:
    """The answer without ``<think>...</think>`` (reasoning a server without a parser left in the content)."""
    return split_answer(text)[1].strip() if "</think>" in text or "<think>" in text else text


_MINUS = "\u2212"  # the minus sign, as typeset text writes it
_NUMBER = re.compile(rf"[-+{_MINUS}]?(?:\d{{1,3}}(?:,\d{{3}})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+{_MINUS}]?\.\d+")


def _numbers(text: str) -> list[float]:
    out = []
    for match in _NUMBER.finditer(unicodedata.normalize("NFKC", text)):
        raw = match.group().replace(",", "").replace(_MINUS, "-")
        try:
            out.append(float(raw))
        except ValueError:
            continue
    return out


def _first_number(text: str) -> float | None:
    found = _numbers(text)
    return found[0] if found else None


# A capital letter only: "the answer is a..." names no choice. NFKC leaves "。" and "、" as they are.
_CHOICE_PATTERNS = (
    re.compile(r"^\s*\**\(?([A-E])\)?\**(?:[.:,;)\s。、选项]|$)"),  # "B", "(B)", "B.", "**B**", "B。", "C选项"
    re.compile(r"(?i:answer|choice|option)(?:\s*(?i:is|:))*\s*\**\(?([A-E])\)?\b"),  # "The answer is: **B**"
    re.compile(r"(?:选[择项]?|答案(?:应该?)?)[是为:\s]*\**\(?([A-E])\)?"),  # "选B", "我选择C", "答案为 B"
)


def _choice(text: str) -> str | None:
    plain = unicodedata.normalize("NFKC", text)
    for pattern in _CHOICE_PATTERNS:
        if match := pattern.search(plain):
            return match.group(1).upper()
    return None


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S)


def _json_of(text: str) -> Any:
    """The answer as JSON: all of it, else the first fenced block. ValueError when neither parses."""
    try:
        return json.loads(text)
    except ValueError:
        fenced = _FENCE.search(text)
        if fenced is None:
            raise
        return json.loads(fenced.group(1))


def grade(exp: Expectation, answer: Answer) -> Grade:
    """Grade one answer (see the module docstring for each scorer)."""
    text = strip_reasoning(answer.text)
    scorer = exp.scorer
    expected: Any = exp.expected
    if scorer == "judge":
        return Grade(None, None, "graded by a judge")
    if scorer in ("exact", "contains"):
        wanted = [exp.expected] if isinstance(exp.expected, str) else list(exp.expected)
        got = normalise(text)
        ok = any((normalise(w) == got) if scorer == "exact" else (normalise(w) in got) for w in wanted)
        return _result(ok, f"expected {wanted[0]!r}")
    if scorer == "regex":
        return _result(re.search(exp.expected, text) is not None, f"no match for {exp.expected!r}")
    if scorer == "number":
        numbers = _numbers(text)
        candidates = numbers[:1] + numbers[-1:] if numbers else []
        ok = any(abs(n - exp.expected) <= exp.tolerance for n in candidates)
        return _result(ok, f"expected {exp.expected:g}, read {', '.join(f'{n:g}' for n in candidates) or 'none'}")
    if scorer == "choice":
        letter = _choice(text)
        return _result(letter == expected, f"expected {expected}, read {letter or 'no choice'}")
    if scorer == "json_schema":
        try:
            value = _json_of(text)
        except ValueError:
            return Grade(False, 0.0, "not JSON", "invalid_json")
        assert exp.schema is not None
        errors = sorted(jsonschema.Draft202012Validator(exp.schema).iter_errors(value), key=lambda e: e.path)
        if errors:
            return Grade(False, 0.0, f"schema: {errors[0].message}", "schema_mismatch")
        if exp.expected is not None and value != exp.expected:
            return Grade(False, 0.0, "valid, but not the expected value", "wrong_value")
        return Grade(True, 1.0)
    return _grade_tool_call(exp, answer)


def _grade_tool_call(exp: Expectation, answer: Answer) -> Grade:
    if not answer.tool_calls:
        return Grade(False, 0.0, "no tool call", "no_call")
    call = answer.tool_calls[0]
    tools = {t["function"]["name"]: t["function"].get("parameters") or {} for t in exp.tools}
    kind = tool_call_error(tools, call.name, call.arguments)  # the relay's own check of live calls
    if kind is not None:
        return Grade(False, 0.0, _TOOL_DETAIL[kind].format(name=call.name), kind)
    arguments = json.loads(call.arguments or "{}")
    wanted = exp.expected
    if isinstance(wanted, dict):
        if call.name != wanted["name"]:
            return Grade(False, 0.0, f"called {call.name}, expected {wanted['name']}", "wrong_call")
        want_args = wanted.get("arguments")
        if isinstance(want_args, dict) and (not isinstance(arguments, dict) or
                                            any(arguments.get(k) != v for k, v in want_args.items())):  # fmt: skip
            return Grade(False, 0.0, "arguments differ from the expected ones", "wrong_call")
    return Grade(True, 1.0)


_TOOL_DETAIL = {
    "unknown_tool": "unknown tool {name!r}",
    "invalid_json": "arguments are not JSON",
    "schema_mismatch": "arguments do not match the parameters of {name}",
}


def _result(ok: bool, why: str) -> Grade:
    return Grade(True, 1.0) if ok else Grade(False, 0.0, why)
