"""The emulator as an oracle (``--answers FILE.jsonl``): graded prompts answered right with a known probability.

The answers file is a graded prompt file (``gateway.compare.grading``: ``prompt`` or ``messages``, ``scorer``,
``expected``, and ``schema``/``tools``/``tolerance`` as the scorer needs). A request is matched to a line by its
prompt text, surrounding white space stripped: chat by its last user message (a string, or its text parts joined),
completions by each prompt; the line's prompt is its ``prompt``, or the last user message of its ``messages``.

Whether the answer is right is a pure function of the emulator's seed and the prompt: ``is_correct(seed, prompt,
accuracy)`` draws a number in [0, 1) from SHA-256 of both (the same in every process, every run and every repeat)
and answers right when it is below ``accuracy``. Two emulators with different seeds or accuracies are two "models"
whose answers to the same prompts are known in advance, so a test can compute the accuracy a comparison must
measure, prompt by prompt.

===============  ========================================  ======================================================
scorer           right answer                              wrong answer
===============  ========================================  ======================================================
``number``       ``The answer is 42.``                     expected + max(1, |expected| / 2, 2 x tolerance)
``choice``       the letter: ``B``                         another letter
``exact``,       the (first) expected string               a stock phrase none of the expected strings matches
``contains``
``json_schema``  ``expected`` as JSON (without it: a       one value changed, schema-valid where possible
                 value the schema generator builds)        (without ``expected``: a sentence, not JSON)
``tool_call``    a call of ``expected["name"]`` with       ``tool_failure(seed, prompt, tool_error_rate)``: an
                 ``expected["arguments"]`` (without        invalid call with probability ``tool_error_rate``
                 ``expected``: the first tool, generated   (``invalid_json``: arguments cut short;
                 arguments)                                ``unknown_tool``: a name not in ``tools``;
                                                           ``schema_mismatch``: a required argument left out),
                                                           else a valid but wrong answer (``wrong_call``: one
                                                           argument changed; ``no_call``: text, no call); the
                                                           kinds of each group equally likely. A call that cannot
                                                           fail the chosen way (no required argument) fails the
                                                           next way it can
===============  ========================================  ======================================================

``regex`` and ``judge`` lines are not answered (the oracle cannot build a string to match any regular expression, and
a judge decides later): their prompts are answered as without the oracle. Every answer is graded with the real
grader when the file is loaded; a line whose right answer does not grade correct, or whose wrong answer does not
grade incorrect, is not answered either (``skipped`` counts them). A tool prompt is answered only when the request
offers tools with ``tool_choice`` ``"auto"`` (or none given): the model's free choice that a graded tool prompt
measures. A tool call is sent as vLLM sends one for ``"auto"`` (``tool_calls`` deltas, ``finish_reason:
"tool_calls"``); a text answer as content. Every answered or unanswered response says which it was in the
``x-emulator-oracle`` header: ``hit-correct``, ``hit-wrong`` or ``miss`` (one per prompt, comma-separated). Every
choice (``n``) of a prompt gets the same answer; thinking (``--reasoning-tokens``) comes before it, except before a
tool call without a reasoning parser, as the emulator has it for any call.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema

from gateway.compare.grading import CHOICES, Answer, Expectation, ExpectationError, ToolCall, expectation_of, grade
from gateway.devstack.emulator.params import Plan
from gateway.devstack.emulator.tokens import message_text
from gateway.devstack.emulator.tools import value_for

MISS, HIT_CORRECT, HIT_WRONG = "miss", "hit-correct", "hit-wrong"
INVALID_CALLS = ("invalid_json", "unknown_tool", "schema_mismatch")
WRONG_CALLS = ("wrong_call", "no_call")
WRONG_TEXTS = ("I do not know.", "None of the above.", "It cannot be determined.")
NO_CALL_TEXT = "I am not able to look that up."
NOT_JSON_TEXT = "I could not find that information."


class AnswersError(ValueError):
    """An answers file the oracle cannot use; the message names the file and the line."""


def unit(seed: int, prompt: str, salt: str = "") -> float:
    """A draw in [0, 1) fixed by ``seed`` and ``prompt`` (stripped): SHA-256, the same in every process."""
    digest = hashlib.sha256(f"{seed}\x00{salt}\x00{prompt.strip()}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_correct(seed: int, prompt: str, accuracy: float) -> bool:
    """Whether an emulator with this seed and ``--accuracy`` answers ``prompt`` right."""
    return unit(seed, prompt) < accuracy


def tool_failure(seed: int, prompt: str, tool_error_rate: float) -> str:
    """How a wrong answer to the tool prompt ``prompt`` fails (a ``grading.TOOL_ERRORS`` kind)."""
    u = unit(seed, prompt, "tool")
    if u < tool_error_rate:
        return INVALID_CALLS[min(2, int(u / tool_error_rate * 3))]
    return WRONG_CALLS[min(1, int((u - tool_error_rate) / (1 - tool_error_rate) * 2))]


def last_user_text(messages: Any) -> str | None:
    """The text of the last user message (None when there is none)."""
    if not isinstance(messages, list):
        return None
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    return message_text(users[-1].get("content")) if users else None


@dataclass(frozen=True, slots=True)
class Entry:
    line: int
    expectation: Expectation
    answer: Answer  # what the oracle says to this prompt, under its seed and accuracy
    correct: bool


def _number(value: float) -> str:
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.12g}"


def _variants(value: Any, schema: Any) -> Iterator[Any]:
    """Values close to ``value`` but different: other enum members, a digit bumped, a rotated string, a number
    moved by one, a boolean flipped, an object with one of these changes."""
    schema = schema if isinstance(schema, dict) else {}
    for other in schema.get("enum") or []:
        if other != value:
            yield other
    if isinstance(value, bool):
        yield not value
    elif isinstance(value, int | float):
        yield value + 1
        yield value - 1
    elif isinstance(value, str):
        digits = [i for i, ch in enumerate(value) if ch.isdigit()]
        if digits:
            i = digits[-1]
            yield value[:i] + str((int(value[i]) + 1) % 10) + value[i + 1 :]
        if value[1:] + value[:1] != value:
            yield value[1:] + value[:1]
        yield value + " x"
    elif isinstance(value, list):
        yield value[:-1] if value else ["x"]
    elif isinstance(value, dict):
        properties = schema.get("properties") or {}
        for name, sub in value.items():
            for other in _variants(sub, properties.get(name)):
                yield {**value, name: other}
    else:
        yield "x"


def _changed(value: Any, schema: Any) -> Any:
    """The first variant of ``value`` that ``schema`` accepts (else the first variant): a plausible wrong value."""
    first = None
    validator = jsonschema.Draft202012Validator(schema if isinstance(schema, dict) else {})
    for other in _variants(value, schema):
        if validator.is_valid(other):
            return other
        first = other if first is None else first
    return first


def _right(exp: Expectation, rng: random.Random) -> Answer | None:
    expected: Any = exp.expected
    if exp.scorer == "number":
        return Answer(f"The answer is {_number(expected)}.")
    if exp.scorer == "choice":
        return Answer(expected)
    if exp.scorer in ("exact", "contains"):
        return Answer(expected if isinstance(expected, str) else expected[0])
    if exp.scorer == "json_schema":
        value = expected if expected is not None else value_for(exp.schema, rng)
        return Answer(json.dumps(value, ensure_ascii=False))
    if exp.scorer == "tool_call":
        if isinstance(expected, dict):
            arguments = expected.get("arguments")
            return Answer("", [ToolCall(expected["name"], json.dumps(arguments or {}, ensure_ascii=False))])
        function = exp.tools[0]["function"]
        arguments = value_for(function.get("parameters") or {}, rng)
        return Answer("", [ToolCall(function["name"], json.dumps(arguments, ensure_ascii=False))])
    return None  # regex, judge


def _wrong(exp: Expectation, right: Answer, seed: int, prompt: str, rate: float) -> Answer | None:
    expected: Any = exp.expected
    if exp.scorer == "number":
        delta = max(1.0, abs(expected) / 2, 2 * exp.tolerance)
        return Answer(f"The answer is {_number(expected + delta)}.")
    if exp.scorer == "choice":
        shift = 1 + int(unit(seed, prompt, "choice") * (len(CHOICES) - 1))
        return Answer(CHOICES[(CHOICES.index(expected) + shift) % len(CHOICES)])
    if exp.scorer in ("exact", "contains"):
        return next((Answer(t) for t in WRONG_TEXTS if not grade(exp, Answer(t)).correct), None)
    if exp.scorer == "json_schema":
        changed = _changed(expected, exp.schema)
        return Answer(NOT_JSON_TEXT if expected is None else json.dumps(changed, ensure_ascii=False))
    if exp.scorer == "tool_call":
        designed = tool_failure(seed, prompt, rate)
        for kind in (designed, *(k for k in INVALID_CALLS + WRONG_CALLS if k != designed)):
            answer = _failed_call(kind, right.tool_calls[0], exp)
            if answer is not None and grade(exp, answer).kind == kind:
                return answer
    return None


def _failed_call(kind: str, call: ToolCall, exp: Expectation) -> Answer | None:
    """The right call turned into a ``kind`` failure (None when this call cannot fail that way)."""
    functions = {t["function"]["name"]: t["function"].get("parameters") or {} for t in exp.tools}
    schema = functions.get(call.name, {})
    arguments = json.loads(call.arguments)
    if kind == "no_call":
        return Answer(NO_CALL_TEXT)
    if kind == "invalid_json":
        return Answer("", [ToolCall(call.name, call.arguments[:-1])])
    if kind == "unknown_tool":
        name = call.name + "_v2"
        while name in functions:
            name += "_v2"
        return Answer("", [ToolCall(name, call.arguments)])
    if kind == "schema_mismatch":
        validator = jsonschema.Draft202012Validator(schema)
        for required in schema.get("required") or []:
            if required in arguments:
                smaller = {k: v for k, v in arguments.items() if k != required}
                if not validator.is_valid(smaller):
                    return Answer("", [ToolCall(call.name, json.dumps(smaller, ensure_ascii=False))])
        return None
    changed = _changed(arguments, schema)  # wrong_call
    return None if changed is None else Answer("", [ToolCall(call.name, json.dumps(changed, ensure_ascii=False))])


def _prompt_of(line: dict[str, Any]) -> str | None:
    if isinstance(line.get("prompt"), str):
        return str(line["prompt"])
    return last_user_text(line.get("messages"))


class Oracle:
    """The answers of one emulator: its file read, every answer built and checked once, at startup."""

    def __init__(self, entries: dict[str, Entry], skipped: int = 0, ungraded: int = 0) -> None:
        self.entries = entries
        self.skipped = skipped  # graded lines it cannot answer (regex, judge, ...): misses
        self.ungraded = ungraded  # lines without an expectation: misses

    @classmethod
    def load(cls, path: str | Path, seed: int, accuracy: float, tool_error_rate: float) -> Oracle:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise AnswersError(f"answers {path}: cannot read: {exc.strerror or exc}") from None
        entries: dict[str, Entry] = {}
        skipped = ungraded = 0
        for n, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            where = f"answers {path}:{n}"
            try:
                line = json.loads(raw)
            except ValueError as exc:
                raise AnswersError(f"{where}: not JSON: {exc}") from None
            if not isinstance(line, dict):
                raise AnswersError(f"{where}: expected a JSON object")
            prompt = _prompt_of(line)
            if prompt is None or not prompt.strip():
                raise AnswersError(f"{where}: needs 'prompt' (a string) or 'messages' with a user message")
            try:
                exp = expectation_of(line)
            except ExpectationError as exc:
                raise AnswersError(f"{where}: {exc}") from None
            key = prompt.strip()
            if key in entries:
                raise AnswersError(f"{where}: the same prompt as line {entries[key].line}")
            if exp is None:
                ungraded += 1
                continue
            rng = random.Random(f"{seed}:{key}")
            right = _right(exp, rng)
            wrong = None if right is None else _wrong(exp, right, seed, key, tool_error_rate)
            if right is None or wrong is None or not grade(exp, right).correct or grade(exp, wrong).correct:
                skipped += 1
                continue
            correct = is_correct(seed, key, accuracy)
            entries[key] = Entry(n, exp, right if correct else wrong, correct)
        if not entries:
            raise AnswersError(f"answers {path}: no prompt the oracle can answer (graded lines, not regex or judge)")
        return cls(entries, skipped, ungraded)

    def summary(self) -> str:
        misses = self.skipped + self.ungraded
        return f"{len(self.entries)} answers" + (f" ({misses} lines answered as misses)" if misses else "")

    def apply(self, plan: Plan, body: dict[str, Any]) -> str:
        """Put the oracle's answers into ``plan`` (one per prompt; None: not its prompt) and return the
        ``x-emulator-oracle`` header's value."""
        texts = [last_user_text(body.get("messages"))] if plan.chat else list(plan.texts)
        tools, choice = body.get("tools"), body.get("tool_choice")
        auto = plan.chat and bool(tools) and choice in (None, "auto")
        verdicts: list[str] = []
        plan.answers = []
        for text in texts:
            entry = self.entries.get(text.strip()) if text is not None else None
            if entry is not None and (plan.tool is not None or (entry.expectation.scorer == "tool_call" and not auto)):
                entry = None  # a constrained call (required, a named function), or a tool prompt without its tools
            if entry is None:
                verdicts.append(MISS)
                plan.answers.append(None)
                continue
            verdicts.append(HIT_CORRECT if entry.correct else HIT_WRONG)
            if entry.answer.tool_calls:
                call = entry.answer.tool_calls[0]
                plan.tool, plan.tool_required = (call.name, {}), True  # finish_reason "tool_calls", as for "auto"
                if not plan.parser:  # no room to think in a call without a reasoning parser, as the emulator has it
                    plan.reasoning, plan.think_tags = 0, False
                plan.answers.append(call.arguments)
            else:
                plan.answers.append(entry.answer.text)
        return ",".join(verdicts)
