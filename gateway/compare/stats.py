"""Paired statistics for comparing two models on identical prompts (pure functions, standard library only).

Contract:

- Percentiles interpolate linearly between order statistics (numpy's default method, "linear"); ``q`` is 0-100.
- Pairing: a result of model A and a result of model B form a pair when they share ``(comparison_id, prompt_id,
  repeat)``: the same prompt, the same repetition. Inside one comparison run every model shares the comparison id,
  so this is pairing by (prompt_id, repeat); the comparison id keeps ad-hoc fan-outs and mirrored pairs apart (their
  prompt_id is ""). A pair is used only if both calls succeeded (``error is None``) and both have the metric; the
  ratio needs a positive denominator, so a pair whose B value is not > 0 is dropped. If one model has several
  results for a key, the first one counts.
- Effect sizes are medians of per-pair values: the difference A - B and the ratio A / B. Per-pair ratios cancel
  what the prompt itself costs (a long answer is slow on every model), which a ratio of two medians would not.
- Uncertainty: percentile bootstrap. ``RESAMPLES`` resamples of the pairs, with replacement, each the size of the
  data; the median of each; the 2.5th and 97.5th percentiles of those medians. The generator is
  ``random.Random(seed)`` (default seed 0), so the same results always give the same report.
- ``describe`` turns a comparison into one sentence. Lower is better for TTFT, time to first answer token, TPOT and
  E2E; higher is better for
  output speed. A 95% CI that contains ratio 1.0 is reported as "no clear difference"; fewer than 2 pairs as
  "too few pairs".
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from gateway.compare.store import CallResult

Metric = Literal["ttft_s", "ttfat_s", "tpot_s", "e2e_s", "output_tps"]
METRICS: tuple[Metric, ...] = ("ttft_s", "ttfat_s", "tpot_s", "e2e_s", "output_tps")
LOWER_IS_BETTER = frozenset({"ttft_s", "ttfat_s", "tpot_s", "e2e_s"})
METRIC_LABELS: dict[str, str] = {
    "ttft_s": "TTFT", "ttfat_s": "time to first answer token", "tpot_s": "TPOT", "e2e_s": "E2E latency",
    "output_tps": "output speed",
}  # fmt: skip
RESAMPLES = 2000
CONFIDENCE = 0.95
DASH = "\u2013"  # en dash: ranges such as "95% CI 0.62-0.76" print with it, as in typeset text

PairKey = tuple[str, str, int]  # (comparison_id, prompt_id, repeat)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0 <= q <= 100), interpolating linearly between the two nearest order statistics."""
    if not values:
        raise ValueError("percentile of no values")
    return _sorted_percentile(sorted(values), q)


def _sorted_percentile(ordered: Sequence[float], q: float) -> float:
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be within 0..100, got {q}")
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True, slots=True)
class Summary:
    n: int
    mean: float
    p50: float
    p90: float
    p95: float
    p99: float


def summary(values: Sequence[float]) -> Summary:
    """Count, mean and the percentiles the reports show (docs/measurement.md); ValueError when there are no values."""
    if not values:
        raise ValueError("summary of no values")
    ordered = sorted(values)
    p50, p90, p95, p99 = (_sorted_percentile(ordered, q) for q in (50, 90, 95, 99))
    return Summary(len(ordered), statistics.fmean(ordered), p50, p90, p95, p99)


@dataclass(frozen=True, slots=True)
class Paired:
    """Per-pair A - B and A / B of one metric, their medians and bootstrap confidence intervals."""

    metric: str
    keys: tuple[PairKey, ...]
    differences: tuple[float, ...]
    ratios: tuple[float, ...]
    median_difference: float
    median_ratio: float
    difference_ci: tuple[float, float]
    ratio_ci: tuple[float, float]

    @property
    def n(self) -> int:
        return len(self.keys)

    @property
    def prompts(self) -> int:
        """Distinct prompts among the pairs (a prompt repeated several times counts once)."""
        return len({key[:2] for key in self.keys})


def _metric(result: CallResult, metric: str) -> float | None:
    value = getattr(result, metric)
    return float(value) if value is not None and math.isfinite(value) else None


def _by_key(results: Sequence[CallResult], metric: str) -> dict[PairKey, float]:
    out: dict[PairKey, float] = {}
    for r in results:
        key = (r.comparison_id, r.prompt_id, r.repeat)
        value = _metric(r, metric)
        # The first result per key counts, even if it failed: a retry is not the same measurement.
        if key not in out:
            out[key] = value if r.error is None and value is not None else math.nan
    return out


def pairs(a: Sequence[CallResult], b: Sequence[CallResult], metric: str) -> list[tuple[PairKey, float, float]]:
    """The usable pairs ``(key, a value, b value)`` in the order of ``a``; see the module docstring for the rules."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
    left, right = _by_key(a, metric), _by_key(b, metric)
    return [
        (key, x, right[key])
        for key, x in left.items()
        if key in right and not math.isnan(x) and not math.isnan(right[key]) and right[key] > 0
    ]


def bootstrap_medians(values: Sequence[float], *, resamples: int = RESAMPLES, seed: int = 0) -> list[float]:
    """Medians of ``resamples`` resamples of ``values`` drawn with replacement, each as long as ``values``.

    The indices drawn depend only on the seed and ``len(values)``, so two columns of the same pairs bootstrapped with
    the same seed are resampled by the same pairs, as a paired bootstrap should be.
    """
    if not values:
        raise ValueError("bootstrap of no values")
    rng = random.Random(seed)
    n = len(values)
    return [statistics.median(rng.choices(values, k=n)) for _ in range(resamples)]


def bootstrap_ci(
    values: Sequence[float], *, confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the median of ``values``."""
    medians = sorted(bootstrap_medians(values, resamples=resamples, seed=seed))
    tail = (1.0 - confidence) / 2.0 * 100.0
    return _sorted_percentile(medians, tail), _sorted_percentile(medians, 100.0 - tail)


def paired(
    a: Sequence[CallResult], b: Sequence[CallResult], metric: str, *, seed: int = 0, resamples: int = RESAMPLES
) -> Paired | None:
    """Compare ``metric`` of A's and B's results pair by pair; None when no pair is usable."""
    matched = pairs(a, b, metric)
    if not matched:
        return None
    differences = tuple(x - y for _, x, y in matched)
    ratios = tuple(x / y for _, x, y in matched)
    return Paired(
        metric=metric,
        keys=tuple(key for key, _, _ in matched),
        differences=differences,
        ratios=ratios,
        median_difference=statistics.median(differences),
        median_ratio=statistics.median(ratios),
        difference_ci=bootstrap_ci(differences, resamples=resamples, seed=seed),
        ratio_ci=bootstrap_ci(ratios, resamples=resamples, seed=seed),
    )


def _pct(value: float) -> str:
    # Whole percents read best; below 10% one decimal keeps "0%" from appearing next to a real difference.
    return f"{value:.0f}" if abs(value) >= 9.95 else f"{value:.1f}"


def format_ratio(value: float) -> str:
    text = f"{value:.2f}"
    # A bound of 0.996 printed as "1.00" would contradict "the CI excludes 1".
    return f"{value:.3f}" if text == "1.00" and value != 1.0 else text


def _on(p: Paired) -> str:
    if p.prompts == p.n:
        return f"on the same {p.n} prompt{'s' if p.n != 1 else ''}"
    return f"on the same {p.prompts} prompt{'s' if p.prompts != 1 else ''}, {p.n} paired calls"


def describe(p: Paired | None, name_a: str, name_b: str, metric: str) -> str:
    """One sentence comparing A with B on ``metric``, e.g. "a is 31% faster than b in TTFT on the same 12 ..."."""
    label = METRIC_LABELS.get(metric, metric)
    if p is None or p.n < 2:
        n = 0 if p is None else p.n
        return (
            f"Too few pairs to compare {name_a} with {name_b} in {label}: {n} prompt{'s' if n != 1 else ''} "
            "where both calls succeeded (at least 2 needed)."
        )
    r, (low, high) = p.median_ratio, p.ratio_ci
    ci = f"median of per-prompt ratios {format_ratio(r)}, 95% CI {format_ratio(low)}{DASH}{format_ratio(high)}"
    if low <= 1.0 <= high:
        return f"No clear difference between {name_a} and {name_b} in {label} {_on(p)} ({ci})."
    # The CI lies wholly on one side of 1.0; it, not the point estimate, decides the direction.
    below = high < 1.0
    size, bounds = abs(r - 1.0) * 100.0, sorted(abs(x - 1.0) * 100.0 for x in (low, high))
    low_pct, high_pct = _pct(bounds[0]), _pct(bounds[1])
    span = f"{low_pct}%" if low_pct == high_pct else f"{low_pct}{DASH}{high_pct}%"
    if metric in LOWER_IS_BETTER:
        word = "faster" if below else "slower"
        return f"{name_a} is {_pct(size)}% {word} than {name_b} in {label} {_on(p)} ({ci}, i.e. {span} {word})."
    word = "lower" if below else "higher"
    return f"{name_a} has {_pct(size)}% {word} {label} than {name_b} {_on(p)} ({ci}, i.e. {span} {word})."
