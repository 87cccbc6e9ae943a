"""The built-in graded sets (``gateway/compare/graded/*.jsonl``): each item's own expected answer grades correct and
a wrong one incorrect, so a model scoring low on them is the model's doing, not the set's."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.compare.grading import Answer, Expectation, expectation_of, grade


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
