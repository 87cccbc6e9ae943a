"""The built-in graded sets (``gateway/compare/graded/*.jsonl``): each item's own expected answer grades correct and
a wrong one incorrect, so a model scoring low on them is the model's doing, not the set's."""

from __future__ import annotations

import json
from collections import Counter
from importlib import resources
from typing import Any

import pytest

from gateway.compare.grading import Answer, Expectation, Grade, ToolCall, expectation_of, grade
from gateway.compare.runs import load_prompts


def expectation(line: dict[str, Any]) -> Expectation:
    exp = expectation_of(line)
    assert exp is not None
    return exp


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("B", "B"),
        ("(B)", "B"),
        ("B) because the others are wrong", "B"),
        ("B。", "B"),  # NFKC keeps the Chinese full stop
        ("B，因为其余选项都不对", "B"),
        ("C、", "C"),
        ("C选项正确", "C"),
        ("**B**", "B"),
        ("The answer is **B**.", "B"),
        ("The answer is: B", "B"),
        ("The correct answer is (D).", "D"),
        ("Answer: B", "B"),
        ("Option E", "E"),
        ("选B", "B"),
        ("我选择C", "C"),
        ("正确选项是C", "C"),
        ("答案是：A", "A"),
        ("答案应该是 E", "E"),
        ("答案是 **C**", "C"),
        ("Ｄ", "D"),
    ],
)
def test_choice_reads_natural_answer_forms(text: str, letter: str) -> None:
    assert grade(expectation({"scorer": "choice", "expected": letter}), Answer(text)).correct
    other = "A" if letter != "A" else "B"
    assert not grade(expectation({"scorer": "choice", "expected": other}), Answer(text)).correct


def test_choice_does_not_read_a_lowercase_word_as_a_letter() -> None:
    exp = expectation({"scorer": "choice", "expected": "A"})
    assert not grade(exp, Answer("The answer is a bit unclear, but C")).correct  # was read as "A"


# --- the sets themselves -------------------------------------------------------------------------------------------

LANGS = ("en", "zh")
SCORER_OF = {
    "arithmetic": "number",
    "units": "number",
    "multiple choice": "choice",
    "extraction": "json_schema",
    "tool use": "tool_call",
}
FULL_WIDTH = str.maketrans("0123456789.-ABCDE", "０１２３４５６７８９．－ＡＢＣＤＥ")


def graded_set(lang: str) -> list[dict[str, Any]]:
    """One language's set as shipped (package data), one JSON object per line."""
    text = resources.files("gateway.compare").joinpath("graded").joinpath(f"{lang}.jsonl").read_text("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


ITEMS = [item for lang in LANGS for item in graded_set(lang)]
TEXT_ITEMS = [item for item in ITEMS if item["scorer"] != "tool_call"]


def each(items: list[dict[str, Any]]) -> list[Any]:
    return [pytest.param(item, id=item["id"]) for item in items]


def right_texts(item: dict[str, Any]) -> list[str]:
    """Answers a model that got it right might give."""
    expected, zh = item["expected"], item["lang"] == "zh"
    if item["scorer"] == "number":
        return [f"{expected}", f"The answer is {expected}.", f"答案是{expected}。", str(expected).translate(FULL_WIDTH)]
    if item["scorer"] == "choice":
        forms = [expected, f"({expected})", f"{expected}. because the others are wrong", f"The answer is {expected}."]
        return forms + (
            [f"答案是{expected}", f"{expected}。", f"选{expected}", expected.translate(FULL_WIDTH)] if zh else []
        )
    if item["scorer"] == "json_schema":
        value = json.dumps(expected, ensure_ascii=False)
        return [value, f"```json\n{value}\n```", f"Here it is:\n```json\n{json.dumps(expected, indent=2)}\n```"]
    if item["scorer"] in ("exact", "contains"):
        return [expected if isinstance(expected, str) else expected[0]]
    raise AssertionError(f"{item['id']}: no right answer can be built for scorer {item['scorer']!r}")


def wrong_text(item: dict[str, Any]) -> str:
    """One answer a model that got it wrong might give."""
    expected = item["expected"]
    if item["scorer"] == "number":
        return f"The answer is {round(expected + max(1.0, 10 * item.get('tolerance', 0)), 6)}."
    if item["scorer"] == "choice":
        return "A" if expected != "A" else "B"
    if item["scorer"] == "json_schema":
        return json.dumps(changed(expected, next(iter(expected))), ensure_ascii=False)
    return "something else entirely"


def changed(value: dict[str, Any], key: str) -> dict[str, Any]:
    """A copy of ``value`` with one key's value made different (it may or may not still fit the schema)."""
    old = value[key]
    if isinstance(old, bool):
        new: Any = not old
    elif isinstance(old, (int, float)):
        new = old + 1
    elif isinstance(old, str):
        new = old + "x"
    elif isinstance(old, list):
        new = old[:-1] if len(old) > 1 else [*old, "x"]
    else:
        raise AssertionError(f"no way to change {old!r}")
    return {**value, key: new}


@pytest.mark.parametrize("lang", LANGS)
def test_each_language_has_at_least_40_items_across_every_category(lang: str) -> None:
    items = graded_set(lang)
    assert len(items) >= 40
    assert {item["lang"] for item in items} == {lang}
    counts = Counter(item["category"] for item in items)
    assert set(counts) == set(SCORER_OF)
    assert min(counts.values()) >= 8
    letters = Counter(item["expected"] for item in items if item["scorer"] == "choice")
    assert set(letters) == set("ABCDE")  # a model that always says "A" does not score well


def test_ids_are_unique_across_both_languages_and_name_their_language() -> None:
    ids = [item["id"] for item in ITEMS]
    assert len(set(ids)) == len(ids)
    assert all(item["id"].startswith(f"{item['lang']}-") for item in ITEMS)


@pytest.mark.parametrize("item", each(ITEMS))
def test_every_item_carries_a_usable_expectation(item: dict[str, Any]) -> None:
    assert item["category"] in SCORER_OF
    assert item["scorer"] == SCORER_OF[item["category"]]
    assert isinstance(item["prompt"], str)
    assert "expected" in item
    expectation(item)  # raises ExpectationError when it cannot be used
    if item["scorer"] == "choice":
        assert f"\n{item['expected']}. " in item["prompt"]  # the expected letter is one of the options offered
    if item["scorer"] == "json_schema":
        schema = item["schema"]
        assert schema["additionalProperties"] is False
        assert set(schema["required"]) == set(schema["properties"]) == set(item["expected"])
        assert all(f'"{key}"' in item["prompt"] for key in schema["properties"])  # the prompt names every key
    if item["scorer"] == "tool_call":
        names = [tool["function"]["name"] for tool in item["tools"]]
        assert 2 <= len(names) <= 4
        assert len(set(names)) == len(names)
        assert item["expected"]["name"] in names


def test_the_sets_load_as_comparison_prompts() -> None:
    for lang in LANGS:
        path = resources.files("gateway.compare").joinpath("graded").joinpath(f"{lang}.jsonl")
        prompts = load_prompts(str(path))
        assert [p.id for p in prompts] == [item["id"] for item in graded_set(lang)]


@pytest.mark.parametrize("item", each(TEXT_ITEMS))
def test_the_expected_answer_grades_correct(item: dict[str, Any]) -> None:
    exp = expectation(item)
    for text in right_texts(item):
        assert grade(exp, Answer(text)) == Grade(True, 1.0), text


@pytest.mark.parametrize("item", each(TEXT_ITEMS))
def test_a_wrong_answer_grades_incorrect(item: dict[str, Any]) -> None:
    exp = expectation(item)
    wrong = wrong_text(item)
    assert not grade(exp, Answer(wrong)).correct, wrong
    if item["scorer"] == "number":
        assert not grade(exp, Answer(f"答案是{round(item['expected'] - 7, 6)}")).correct
    if item["scorer"] == "choice":
        assert not grade(exp, Answer(f"The answer is {wrong}.")).correct
        assert not grade(exp, Answer(f"答案是{wrong}")).correct


@pytest.mark.parametrize("item", each([item for item in ITEMS if item["scorer"] == "json_schema"]))
def test_an_extraction_missing_a_key_or_with_a_changed_value_grades_incorrect(item: dict[str, Any]) -> None:
    exp, expected = expectation(item), item["expected"]
    for key in expected:
        missing = json.dumps({k: v for k, v in expected.items() if k != key}, ensure_ascii=False)
        assert grade(exp, Answer(missing)).kind == "schema_mismatch", key
        different = grade(exp, Answer(json.dumps(changed(expected, key), ensure_ascii=False)))
        assert not different.correct, key
        assert different.kind in ("wrong_value", "schema_mismatch"), key
    assert grade(exp, Answer("I could not find those fields.")).kind == "invalid_json"


@pytest.mark.parametrize("item", each([item for item in ITEMS if item["scorer"] == "tool_call"]))
def test_the_expected_tool_call_grades_correct_and_each_failure_is_told_apart(item: dict[str, Any]) -> None:
    exp = expectation(item)
    name, arguments = item["expected"]["name"], item["expected"]["arguments"]

    def call(called: str, args: str) -> Grade:
        return grade(exp, Answer("", [ToolCall(called, args)]))

    assert call(name, json.dumps(arguments, ensure_ascii=False)) == Grade(True, 1.0)
    assert call(name, json.dumps(arguments)) == Grade(True, 1.0)  # \u escapes are the same string
    assert call("launch_rocket", json.dumps(arguments)).kind == "unknown_tool"
    assert call(name, "{city: " + str(arguments)).kind == "invalid_json"
    (tool,) = (t["function"] for t in item["tools"] if t["function"]["name"] == name)
    for key in tool["parameters"]["required"]:
        missing = {k: v for k, v in arguments.items() if k != key}
        assert call(name, json.dumps(missing)).kind == "schema_mismatch", key
    for key in arguments:
        assert call(name, json.dumps(changed(arguments, key))).kind in ("wrong_call", "schema_mismatch"), key
    assert grade(exp, Answer(json.dumps(arguments))).kind == "no_call"  # the arguments as text are no call


@pytest.mark.parametrize("item", each(TEXT_ITEMS))
def test_reasoning_is_not_graded(item: dict[str, Any]) -> None:
    exp, right, wrong = expectation(item), right_texts(item)[0], wrong_text(item)
    assert grade(exp, Answer(f"<think>the answer might be {wrong}</think>{right}")).correct
    assert grade(exp, Answer(f"<think>\nthe answer might be {wrong}\n</think>\n\n{right}")).correct
    assert not grade(exp, Answer(f"<think>{right}</think>{wrong}")).correct
    assert not grade(exp, Answer(f"<think>I am sure it is {right}")).correct  # thinking that never ended
