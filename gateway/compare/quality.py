"""Quality in the comparison report: accuracy on graded prompts beside speed and cost (standard library only).

Contract:

- Only graded calls count (``correct`` is 1 or 0: a prompt with an expectation whose call succeeded); a call that
  failed is not an answer and is left out, as in the latency figures. Arms, origins and the baseline are the
  report's (``gateway.compare.report``).
- Accuracy = correct / graded, with a 95% Wilson score interval (sound at 0% and 100% and for small n, unlike
  the normal approximation).
- Paired accuracy against the baseline, on the items both answered (same comparison, prompt and repeat): the
  difference A - B in accuracy, its 95% percentile-bootstrap interval (resampling the pairs, seeded), and
  McNemar's exact test on the discordant pairs (A right and B wrong vs the opposite): the two-sided binomial
  probability of a split at least as uneven as the one seen, if either way were equally likely. The sentence
  calls a difference clear when that probability is under 5%.
- $ per correct answer = what the graded calls cost / how many were correct. List-price basis: their list-price
  costs summed; GPU-time basis: the arm's GPU $ per 1M output tokens (the report's, from its served rate) x their
  completion tokens. A dash when no answer was correct or a price is missing.
- Scatter plots put every arm at (cost or time, accuracy) and mark the Pareto front: the arms no other arm beats on
  both at once. Cost is $ per answer (the whole call, thinking included: GPU-time basis, else list price); time is
  the median time to first answer token.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.compare.charts import escape_html, scatter
from gateway.compare.stats import CONFIDENCE, DASH, RESAMPLES
from gateway.compare.store import CallResult

Z95 = 1.959963984540054  # the normal quantile of 0.975
SIGNIFICANCE = 0.05  # a paired difference is called clear when McNemar's exact p is below this
NO_GRADED = "no graded prompts in this run (give prompts an `expected` answer, or use --prompts builtin-graded)"


@dataclass(frozen=True, slots=True)
class Accuracy:
    name: str  # an arm, or an origin
    graded: int
    correct: int
    list_per_correct: float | None = None
    gpu_per_correct: float | None = None

    @property
    def rate(self) -> float | None:
        return self.correct / self.graded if self.graded else None

    @property
    def interval(self) -> tuple[float, float] | None:
        return wilson(self.correct, self.graded) if self.graded else None


@dataclass(frozen=True, slots=True)
class PairedAccuracy:
    arm: str
    baseline: str
    pairs: int
    only_arm: int  # the arm right, the baseline wrong
    only_baseline: int
    difference: float  # accuracy of the arm - accuracy of the baseline, on the pairs
    interval: tuple[float, float]
    p_value: float

    def sentence(self) -> str:
        """One sentence; the exact test decides whether the difference is clear (p < 0.05)."""
        lo, hi = self.interval
        span = f"{_pp(self.difference)} points, 95% CI {_pp(lo)} to {_pp(hi)}"
        test = f"McNemar exact p = {self.p_value:.3g}: {self.only_arm} items only {self.arm} got right, " \
               f"{self.only_baseline} only {self.baseline}"  # fmt: skip
        if self.p_value >= SIGNIFICANCE or self.difference == 0:
            return f"No clear difference in accuracy between {self.arm} and {self.baseline} on the same " \
                   f"{self.pairs} items ({span}; {test})."  # fmt: skip
        word = "more" if self.difference > 0 else "less"
        return f"{self.arm} is {abs(self.difference) * 100:.1f} points {word} accurate than {self.baseline} on " \
               f"the same {self.pairs} items ({span}; {test})."  # fmt: skip


def _pp(value: float) -> str:
    return f"{value * 100:+.1f}".replace("+-", "-") if value else "0.0"


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``correct / n`` (n > 0)."""
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: under "no difference", each discordant pair goes either way with
    probability 1/2; the probability of a split at least as uneven as ``only_a`` : ``only_b``."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2**n
    return float(min(1.0, 2 * tail))


def graded(results: Sequence[CallResult]) -> list[CallResult]:
    return [r for r in results if r.error is None and r.correct is not None]


def accuracy(name: str, calls: Sequence[CallResult], gpu_per_1m: float | None) -> Accuracy:
    good = graded(calls)
    right = sum(r.correct or 0 for r in good)
    costs = [r.cost_list_usd for r in good]
    listed = sum(c for c in costs if c is not None) / right if right and good and None not in costs else None
    tokens = sum(r.completion_tokens for r in good)
    gpu = gpu_per_1m * tokens / 1e6 / right if right and gpu_per_1m is not None else None
    return Accuracy(name, len(good), right, listed, gpu)


def paired_accuracy(
    arm: str, a: Sequence[CallResult], baseline: str, b: Sequence[CallResult], *, seed: int = 0
) -> PairedAccuracy | None:
    """The arm against the baseline on the items both answered (the module docstring); None without pairs."""

    def by_key(results: Sequence[CallResult]) -> dict[tuple[str, str, int], int]:
        out: dict[tuple[str, str, int], int] = {}
        for r in graded(results):
            out.setdefault((r.comparison_id, r.prompt_id, r.repeat), r.correct or 0)
        return out

    left, right = by_key(a), by_key(b)
    diffs = [left[k] - right[k] for k in left if k in right]
    if not diffs:
        return None
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(diffs, k=len(diffs))) for _ in range(RESAMPLES))
    tail = (1 - CONFIDENCE) / 2
    lo, hi = means[int(tail * (RESAMPLES - 1))], means[int((1 - tail) * (RESAMPLES - 1))]
    only_a, only_b = diffs.count(1), diffs.count(-1)
    return PairedAccuracy(arm, baseline, len(diffs), only_a, only_b, statistics.fmean(diffs), (lo, hi),
                          mcnemar_exact(only_a, only_b))  # fmt: skip


def breakdown(by_arm: Mapping[str, Sequence[CallResult]], field: str) -> tuple[list[str], dict[str, dict[str, str]]]:
    """Accuracy per arm and per value of ``field`` (``prompt_category`` or ``prompt_lang``): (values, cells)."""
    values = sorted({getattr(r, field) or DASH for calls in by_arm.values() for r in graded(calls)})
    cells: dict[str, dict[str, str]] = {}
    for arm, calls in by_arm.items():
        row = {}
        for value in values:
            sub = [r for r in graded(calls) if (getattr(r, field) or DASH) == value]
            right = sum(r.correct or 0 for r in sub)
            row[value] = f"{right / len(sub) * 100:.0f}% ({right}/{len(sub)})" if sub else DASH
        cells[arm] = row
    return values, cells


def percent(acc: Accuracy) -> str:
    if acc.rate is None or acc.interval is None:
        return DASH
    lo, hi = acc.interval
    return f"{acc.rate * 100:.1f}% ({lo * 100:.0f}{DASH}{hi * 100:.0f}%)"


def usd(value: float | None) -> str:
    return DASH if value is None else (f"{value:.2f}" if value >= 1 else f"{value:.3g}")


ACCURACY_COLUMNS = ("graded", "correct", "accuracy (95% CI)", "GPU $/correct answer", "list $/correct answer")


def accuracy_cells(acc: Accuracy) -> list[str]:
    return [str(acc.graded), str(acc.correct), percent(acc), usd(acc.gpu_per_correct), usd(acc.list_per_correct)]


def scatters(points_cost: Sequence[tuple[str, float, float]], points_time: Sequence[tuple[str, float, float]]) -> str:
    return (
        "<h3>Accuracy vs cost per answer</h3>"
        + scatter(
            "accuracy vs $ per answer",
            points_cost,
            "$ per answer (whole call, thinking included)",
            lambda v: f"${v:.3g}",
        )
        + "<h3>Accuracy vs time to first answer token</h3>"
        + scatter("accuracy vs time to first answer token (median)", points_time, "TTFAT p50, ms", lambda v: f"{v:g}")
        + '<p class="note">Filled dots joined by the line: the Pareto front, the arms no other arm beats on both '
        "axes at once (cheaper or faster, and at least as accurate). An arm off the front is beaten by one on it.</p>"
    )


def html_breakdown(title: str, values: Sequence[str], cells: Mapping[str, Mapping[str, str]]) -> str:
    head = "".join(f"<th>{escape_html(v)}</th>" for v in ("arm", *values))
    rows = "".join(
        "<tr>" + f"<td>{escape_html(arm)}</td>" + "".join(f'<td class="n">{escape_html(row[v])}</td>' for v in values)
        + "</tr>"
        for arm, row in cells.items()
    )  # fmt: skip
    return f"<h3>{escape_html(title)}</h3><table><tr>{head}</tr>{rows}</table>"


def section(by_arm: Mapping[str, Sequence[CallResult]], rows: Sequence[Any], groups: Sequence[Any],
            base: str | None) -> tuple[str, Markdown]:  # fmt: skip
    """The report's quality section: (its HTML, its Markdown parts). ``rows``/``groups`` are the report's summary
    rows per arm and per origin (``name``, ``gpu_per_1m``, ``ttfat``, ``gpu_per_answer``, ``list_per_answer``)."""
    if not any(graded(calls) for calls in by_arm.values()):
        return f'<p class="nodata">{escape_html(NO_GRADED)}</p>', Markdown([], [], NO_GRADED)
    arms = [accuracy(r.name, by_arm[r.name], r.gpu_per_1m) for r in rows]
    origins = [accuracy(g.name, [c for arm in g.family.split(", ") for c in by_arm.get(arm, [])], None)
               for g in groups]  # fmt: skip
    paired = [
        p for r in rows if base is not None and r.name != base
        if (p := paired_accuracy(r.name, by_arm[r.name], base, by_arm[base])) is not None
    ]  # fmt: skip
    categories, by_category = breakdown(by_arm, "prompt_category")
    langs, by_lang = breakdown(by_arm, "prompt_lang")
    points_cost, points_time = [], []
    for row, acc in zip(rows, arms, strict=True):
        cost = row.gpu_per_answer if row.gpu_per_answer is not None else row.list_per_answer
        if acc.rate is not None and cost is not None:
            points_cost.append((row.name, cost, acc.rate))
        if acc.rate is not None and row.ttfat is not None:
            points_time.append((row.name, row.ttfat.p50 * 1000, acc.rate))

    def table(items: Sequence[Accuracy], lead: str) -> str:
        head = "".join(f"<th>{escape_html(h)}</th>" for h in (lead, *ACCURACY_COLUMNS))
        body = "".join("<tr>" + f"<td>{escape_html(a.name)}</td>"
                       + "".join(f'<td class="n">{escape_html(c)}</td>' for c in accuracy_cells(a)) + "</tr>"
                       for a in items)  # fmt: skip
        return f"<table><tr>{head}</tr>{body}</table>"

    sentences = "".join(f"<li>{escape_html(p.sentence())}</li>" for p in paired)
    page = (
        table(arms, "arm") + "<h3>By origin</h3>" + table(origins, "origin")
        + (f"<h3>Paired accuracy</h3><ul>{sentences}</ul>" if paired else "")
        + html_breakdown("By category", categories, by_category) + html_breakdown("By language", langs, by_lang)
        + scatters(points_cost, points_time)
    )  # fmt: skip

    table_rows = [["arm", *ACCURACY_COLUMNS], *([a.name, *accuracy_cells(a)] for a in arms)]
    return page, Markdown(table_rows, [p.sentence() for p in paired])


@dataclass(frozen=True, slots=True)
class Markdown:
    """The quality section for summary.md, as text the report escapes: the accuracy table (header first) and the
    paired sentences; no table when nothing was graded (``note`` says so)."""

    table: list[list[str]]
    sentences: list[str]
    note: str = ""


PER_CHAR_COLUMNS = ("output chars", "chars per token", "output chars/s p50", "GPU $/1M chars", "list $/1M chars",
                    "cached prompt tokens")  # fmt: skip


def per_character(by_arm: Mapping[str, Sequence[CallResult]], rows: Sequence[Any]) -> list[list[str]]:
    """Per-character figures beside the per-token ones (tokenizers differ: the same Chinese text can be twice the
    tokens in one as in another): characters generated, characters per token, each call's characters per second
    after its first token (median), and $ per 1M characters (the $ per 1M tokens x tokens / characters). Also the
    prompt tokens the backends served from their prefix cache, where they report them (a dash where none did).
    Header first."""
    out = [["arm", *PER_CHAR_COLUMNS]]
    for row in rows:
        good = [r for r in by_arm[row.name] if r.error is None]
        chars, tokens = sum(r.output_chars for r in good), sum(r.completion_tokens for r in good)
        speeds = [
            r.output_chars / (r.e2e_s - r.ttft_s)
            for r in good
            if r.output_chars and r.e2e_s is not None and r.ttft_s is not None and r.e2e_s > r.ttft_s
        ]
        ratio = tokens / chars if chars else None
        cached = [r.cached_tokens for r in good if r.cached_tokens is not None]
        out.append([
            row.name, str(chars), f"{chars / tokens:.2f}" if tokens else DASH,
            f"{statistics.median(speeds):.1f}" if speeds else DASH,
            usd(row.gpu_per_1m * ratio if row.gpu_per_1m is not None and ratio is not None else None),
            usd(row.list_per_1m * ratio if row.list_per_1m is not None and ratio is not None else None),
            str(sum(cached)) if cached else DASH,
        ])  # fmt: skip
    return out
