"""The report's HTML tables, and its answers side by side (each call's reasoning collapsed above its answer, an
empty answer flagged). Every text from a model or a card is escaped."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.compare.charts import escape_html
from gateway.compare.stats import DASH
from gateway.compare.store import CallResult

ANSWER_CHARS = 600
MISSING = DASH
NO_DATA = '<p class="nodata">no data</p>'


def table(head: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int = 99) -> str:
    """Cells are already HTML; columns from ``numeric_from`` on are right-aligned."""
    th = "".join(f"<th>{escape_html(h)}</th>" for h in head)
    trs = (
        "<tr>" + "".join(f'<td class="n">{c}</td>' if i >= numeric_from else f"<td>{c}</td>" for i, c in enumerate(r))
        for r in rows
    )
    return f"<table><tr>{th}</tr>{''.join(trs)}</table>"


def _clipped(text: str) -> str:
    if len(text) <= ANSWER_CHARS:
        return f'<div class="ans">{escape_html(text)}</div>'
    shown, note = escape_html(text[:ANSWER_CHARS]), f"(first {ANSWER_CHARS} of {len(text)} chars)"
    return f'<div class="ans">{shown}…</div><span class="len">{note}</span>'


def _answer(call: CallResult | None) -> str:
    """A call's answer; its reasoning, if any, collapsed above it; an empty answer flagged."""
    if call is None:
        return MISSING
    if call.error is not None:
        return f'<span class="err">error: {escape_html(call.error)}</span>'
    thought = ""
    if call.reasoning_text:
        label = f"reasoning ({call.reasoning_tokens} tokens, {len(call.reasoning_text)} chars)"
        thought = f"<details><summary>{escape_html(label)}</summary>{_clipped(call.reasoning_text)}</details>"
    if call.empty_answer:
        why = f"no answer: the thinking used the whole budget (finish_reason {call.finish_reason or 'unknown'})"
        return thought + f'<span class="err">{escape_html(why)}</span>'
    if call.text is None:
        return thought + '<span class="nodata">(answer not kept)</span>'
    return thought + _clipped(call.text)


def answers(results: Sequence[CallResult], models: Sequence[str]) -> str:
    cells: dict[tuple[str, str, int], dict[str, CallResult]] = {}
    for r in results:
        cells.setdefault((r.comparison_id, r.prompt_id, r.repeat), {}).setdefault(r.arm, r)
    if not cells:
        return NO_DATA
    rows = []
    for (comparison, prompt, repeat), calls in cells.items():
        category = next(iter(calls.values())).prompt_category
        label = f"{escape_html(prompt or comparison)} #{repeat}" + (
            f"<br><small>{escape_html(category)}</small>" if category else ""
        )
        rows.append([label, *(_answer(calls.get(m)) for m in models)])
    return table(["prompt / repeat", *models], rows)
