"""Paired statistics against values worked out by hand (see the comments next to each expected number)."""

from __future__ import annotations

import itertools
import statistics
from collections import Counter

import pytest

from gateway.compare.stats import (
    RESAMPLES,
    Paired,
    bootstrap_medians,
    describe,
    paired,
    percentile,
    summary,
)
from gateway.compare.store import CallResult


def call(model: str, prompt: str, ttft: float | None, *, repeat: int = 0, error: str | None = None) -> CallResult:
    return CallResult(
        comparison_id="run-1", kind="run", model=model, prompt_id=prompt, repeat=repeat, ttft_s=ttft, error=error
    )


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([1.0, 2.0, 3.0, 4.0], 0, 1.0),
        ([1.0, 2.0, 3.0, 4.0], 50, 2.5),  # halfway between the 2nd and 3rd value
        ([1.0, 2.0, 3.0, 4.0], 90, 3.7),  # position 0.9 x 3 = 2.7: 3 + 0.7 x (4 - 3)
        ([4.0, 1.0, 3.0, 2.0], 100, 4.0),  # order of the input does not matter
        ([7.0], 99, 7.0),
    ],
)
def test_percentile_interpolates_linearly(values: list[float], q: float, expected: float) -> None:
    assert percentile(values, q) == pytest.approx(expected)


def test_percentile_rejects_empty_and_out_of_range() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match=r"within 0\.\.100"):
        percentile([1.0], 101)


def test_summary() -> None:
    s = summary([5.0, 1.0, 4.0, 2.0, 3.0])
    # sorted 1..5; position (5 - 1) x q: p90 at 3.6 -> 4.6, p95 at 3.8 -> 4.8, p99 at 3.96 -> 4.96
    assert (s.n, s.mean, s.p50) == (5, 3.0, 3.0)
    assert (s.p90, s.p95, s.p99) == pytest.approx((4.6, 4.8, 4.96))
    with pytest.raises(ValueError, match="no values"):
        summary([])


# Five prompts both models answered, plus calls that must not be paired.
A = [
    call("a", "p1", 0.30), call("a", "p2", 0.20), call("a", "p3", 0.50), call("a", "p4", 0.40), call("a", "p5", 0.90),
    call("a", "p6", None, error="HTTP 500"),  # A failed: no pair
    call("a", "p7", 0.10),  # B failed on p7: no pair
    call("a", "p8", None),  # succeeded but has no TTFT (no token-bearing chunk): no pair
    call("a", "p9", 0.10),  # B never ran p9: no pair
    call("a", "p1", 0.30, repeat=1),  # B has no repeat 1: no pair
    call("a", "p2", 0.99),  # a second result for (p2, repeat 0): the first one counts
]  # fmt: skip
B = [
    call("b", "p1", 0.60), call("b", "p2", 0.25), call("b", "p3", 0.50), call("b", "p4", 0.80), call("b", "p5", 1.00),
    call("b", "p6", 0.30), call("b", "p7", None, error="timeout"), call("b", "p8", 0.30),
    call("b", "p10", 0.10),  # A never ran p10
]  # fmt: skip


def test_pairing_ignores_failed_calls_unmatched_prompts_and_duplicates() -> None:
    p = paired(A, B, "ttft_s")
    assert p is not None
    assert [key[1] for key in p.keys] == ["p1", "p2", "p3", "p4", "p5"]
    # per-pair ratios a / b: 0.30/0.60, 0.20/0.25, 0.50/0.50, 0.40/0.80, 0.90/1.00
    assert p.ratios == pytest.approx((0.5, 0.8, 1.0, 0.5, 0.9))
    # sorted 0.5, 0.5, 0.8, 0.9, 1.0: the median is the third
    assert p.median_ratio == pytest.approx(0.8)
    # differences a - b: -0.30, -0.05, 0.00, -0.40, -0.10; sorted -0.40, -0.30, -0.10, -0.05, 0.00
    assert p.differences == pytest.approx((-0.30, -0.05, 0.0, -0.40, -0.10))
    assert p.median_difference == pytest.approx(-0.10)
    assert (p.n, p.prompts) == (5, 5)


def test_pairing_needs_a_known_metric_and_some_pairs() -> None:
    with pytest.raises(ValueError, match="unknown metric"):
        paired(A, B, "latency")
    assert paired(A, [call("b", "p6", 0.3)], "ttft_s") is None  # A's p6 failed


def test_bootstrap_ci_matches_the_exact_resampling_distribution() -> None:
    # Three pairs with ratios 0.5, 0.8 and 1.0 (a over b) and differences -0.30, -0.05, 0.00.
    a = [call("a", "p1", 0.30), call("a", "p2", 0.20), call("a", "p3", 0.50)]
    b = [call("b", "p1", 0.60), call("b", "p2", 0.25), call("b", "p3", 0.50)]
    ratios = [0.5, 0.8, 1.0]
    # All 3^3 = 27 ordered resamples are equally likely. The median is 0.5 when at least two draws are 0.5:
    # exactly two in 3 (position of the other draw) x 2 (its value) = 6 ways, all three in 1 way: 7 of 27.
    # By symmetry 1.0 also has 7; 0.8 has the remaining 27 - 14 = 13.
    exact = {0.5: 7 / 27, 0.8: 13 / 27, 1.0: 7 / 27}
    enumerated = Counter(statistics.median(s) for s in itertools.product(ratios, repeat=3))
    assert {k: v / 27 for k, v in enumerated.items()} == pytest.approx(exact)
    # Exact 2.5th / 97.5th percentiles (inverse CDF): P(median <= 0.5) = 7/27 >= 0.025, so the 2.5th is 0.5;
    # P(median <= 0.8) = 20/27 < 0.975, so the 97.5th is 1.0.
    exact_ci = (0.5, 1.0)

    seeded = bootstrap_medians(ratios, resamples=RESAMPLES, seed=0)
    freq = Counter(seeded)
    # Sampling error of a frequency near 7/27 from 2000 draws is about 0.01; allow 0.03 (3 standard errors).
    for value, probability in exact.items():
        assert freq[value] / RESAMPLES == pytest.approx(probability, abs=0.03)

    p = paired(a, b, "ttft_s")
    assert p is not None
    # Tolerance 1e-9, i.e. equal: each end atom holds ~26% of the 2000 medians, far more than the 2.5% tail, so the
    # sampled 2.5th / 97.5th percentiles (linear interpolation) fall inside the atoms at 0.5 and 1.0.
    assert p.ratio_ci == pytest.approx(exact_ci, abs=1e-9)
    assert p.difference_ci == pytest.approx((-0.30, 0.0), abs=1e-9)  # the same argument for the differences


def test_bootstrap_is_seeded_and_resamples_the_same_pairs_for_every_column() -> None:
    x = [1.0, 2.0, 3.0, 4.0, 10.0]
    assert bootstrap_medians(x, seed=0) == bootstrap_medians(x, seed=0)
    assert bootstrap_medians(x, seed=0) != bootstrap_medians(x, seed=1)
    # Same seed and length -> same indices: a column scaled by 10 gives medians scaled by 10.
    assert bootstrap_medians([10 * v for v in x], seed=0) == pytest.approx([10 * m for m in bootstrap_medians(x)])


def test_identical_ratios_give_a_degenerate_ci() -> None:
    b_times = [0.5, 1.0, 0.25, 2.0]  # powers of two: a = b / 2 is exact, every ratio is exactly 0.5
    a = [call("a", f"p{i}", t / 2) for i, t in enumerate(b_times)]
    b = [call("b", f"p{i}", t) for i, t in enumerate(b_times)]
    p = paired(a, b, "ttft_s")
    assert p is not None
    assert p.median_ratio == 0.5
    assert p.ratio_ci == (0.5, 0.5)


def fake(ratio: float, ci: tuple[float, float], *, n: int = 12, repeats: int = 1, metric: str = "ttft_s") -> Paired:
    keys = tuple(("run-1", f"p{i // repeats}", i % repeats) for i in range(n))
    return Paired(metric, keys, (0.0,) * n, (ratio,) * n, 0.0, ratio, (0.0, 0.0), ci)


@pytest.mark.parametrize(
    ("p", "metric", "sentence"),
    [
        (
            fake(0.69, (0.62, 0.76)),
            "ttft_s",
            # (1 - 0.69) x 100 = 31; the bounds (1 - 0.76) and (1 - 0.62) give 24 and 38
            "tiny-qwen3 is 31% faster than tiny-llama in TTFT on the same 12 prompts "
            "(median of per-prompt ratios 0.69, 95% CI 0.62\u20130.76, i.e. 24\u201338% faster).",
        ),
        (
            fake(1.25, (1.1, 1.4), metric="tpot_s"),
            "tpot_s",
            "tiny-qwen3 is 25% slower than tiny-llama in TPOT on the same 12 prompts "
            "(median of per-prompt ratios 1.25, 95% CI 1.10\u20131.40, i.e. 10\u201340% slower).",
        ),
        (
            fake(0.98, (0.9, 1.07), metric="e2e_s"),
            "e2e_s",
            "No clear difference between tiny-qwen3 and tiny-llama in E2E latency on the same 12 prompts "
            "(median of per-prompt ratios 0.98, 95% CI 0.90\u20131.07).",
        ),
        (
            fake(1.5, (1.2, 1.8), metric="output_tps"),
            "output_tps",
            "tiny-qwen3 has 50% higher output speed than tiny-llama on the same 12 prompts "
            "(median of per-prompt ratios 1.50, 95% CI 1.20\u20131.80, i.e. 20\u201380% higher).",
        ),
        (
            fake(0.8, (0.7, 0.9), n=4, repeats=2, metric="output_tps"),
            "output_tps",
            "tiny-qwen3 has 20% lower output speed than tiny-llama on the same 2 prompts, 4 paired calls "
            "(median of per-prompt ratios 0.80, 95% CI 0.70\u20130.90, i.e. 10\u201330% lower).",
        ),
        (
            fake(1.0, (1.0, 1.0), n=3),  # identical: a degenerate CI at 1.0 is no difference
            "ttft_s",
            "No clear difference between tiny-qwen3 and tiny-llama in TTFT on the same 3 prompts "
            "(median of per-prompt ratios 1.00, 95% CI 1.00\u20131.00).",
        ),
        (
            fake(0.5, (0.5, 0.5), n=1),
            "ttft_s",
            "Too few pairs to compare tiny-qwen3 with tiny-llama in TTFT: 1 prompt where both calls succeeded "
            "(at least 2 needed).",
        ),
        (
            None,
            "tpot_s",
            "Too few pairs to compare tiny-qwen3 with tiny-llama in TPOT: 0 prompts where both calls succeeded "
            "(at least 2 needed).",
        ),
    ],
)
def test_describe(p: Paired | None, metric: str, sentence: str) -> None:
    assert describe(p, "tiny-qwen3", "tiny-llama", metric) == sentence


def test_describe_from_real_pairs() -> None:
    # Every ratio is 0.5 (see test_identical_ratios_give_a_degenerate_ci): 50% faster, CI 0.50-0.50.
    b_times = [0.5, 1.0, 0.25, 2.0]
    p = paired([call("a", f"p{i}", t / 2) for i, t in enumerate(b_times)], [call("b", f"p{i}", t) for i, t in
               enumerate(b_times)], "ttft_s")  # fmt: skip
    assert describe(p, "a", "b", "ttft_s") == (
        "a is 50% faster than b in TTFT on the same 4 prompts "
        "(median of per-prompt ratios 0.50, 95% CI 0.50\u20130.50, i.e. 50% faster)."
    )
