"""Public benchmark files a user already has on disk, read as graded prompt lines (``gateway compare --format``).

- ``gsm8k``: JSONL with ``question`` and ``answer``, the answer's final number after ``####`` (GSM8K's own form:
  "... #### 72"); graded with the ``number`` scorer. The prompt asks for the number on the last line.
- ``mmlu-csv``: CSV with a question, four options and the answer letter per row: MMLU's files (no header:
  ``question,A,B,C,D,answer``) and CMMLU's (a header ``,Question,A,B,C,D,Answer``, a leading index column); graded
  with the ``choice`` scorer. The prompt lists the options and asks for the letter only (in Chinese when the
  question is).

Each returns plain dicts in the graded-prompt line format (``prompt``, ``id``, ``category``, ``lang``,
``scorer``, ``expected``), so they are checked like any prompt file. Nothing here downloads anything.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

FORMATS = ("jsonl", "gsm8k", "mmlu-csv")
_FINAL = re.compile(r"####\s*([-\d.,]+)\s*$")
_HAN = re.compile(r"[\u4e00-\u9fff]")


class FormatError(ValueError):
    """A row that cannot be read as the format says; the message names the file and the line."""


def gsm8k(path: Path) -> list[dict[str, Any]]:
    lines = []
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
            question, answer = row["question"], row["answer"]
        except (ValueError, KeyError, TypeError):
            raise FormatError(f"{path}:{n}: expected a JSON object with 'question' and 'answer'") from None
        final = _FINAL.search(str(answer))
        if final is None:
            raise FormatError(f"{path}:{n}: the answer has no final '#### <number>'")
        lines.append({
            "id": f"gsm8k-{n}", "category": "gsm8k", "lang": _lang(question), "scorer": "number",
            "expected": float(final.group(1).replace(",", "")),
            "prompt": f"{question}\n\nSolve it step by step, then give the final answer as a number on the last line.",
        })  # fmt: skip
    return lines


def mmlu_csv(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    lines = []
    for n, row in enumerate(rows, 1):
        if n == 1 and [c.strip().lower() for c in row[-6:]] == ["question", "a", "b", "c", "d", "answer"]:
            continue  # CMMLU's header
        cells = row[-6:]
        if len(cells) < 6 or cells[5].strip().upper() not in ("A", "B", "C", "D"):
            raise FormatError(f"{path}:{n}: expected question, A, B, C, D and the answer letter")
        question, options, letter = cells[0], cells[1:5], cells[5].strip().upper()
        zh = _lang(question) == "zh"
        listed = "\n".join(f"{k}. {v}" for k, v in zip("ABCD", options, strict=True))
        ask = "只回答选项字母。" if zh else "Reply with the letter only."
        lines.append({"id": f"{path.stem}-{n}", "category": path.stem, "lang": "zh" if zh else "en",
                      "scorer": "choice", "expected": letter, "prompt": f"{question}\n{listed}\n{ask}"})  # fmt: skip
    return lines


def _lang(text: str) -> str:
    return "zh" if _HAN.search(text) else "en"


def read(path: Path, fmt: str) -> list[dict[str, Any]]:
    """The lines of ``path`` read as ``fmt`` (``gsm8k`` or ``mmlu-csv``)."""
    if fmt == "gsm8k":
        return gsm8k(path)
    if fmt == "mmlu-csv":
        return mmlu_csv(path)
    raise FormatError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
