"""Quality beside speed and cost (issue #16): graded prompt files, accuracy with its interval, paired accuracy with
McNemar's exact test, $ per correct answer, the Pareto front. Expected figures are worked out by hand."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.compare.charts import pareto_front, scatter
from gateway.compare.quality import accuracy, mcnemar_exact, paired_accuracy, usd, wilson
from gateway.compare.report import write_report
from gateway.compare.runs import PromptError, load_prompts
from gateway.compare.stats import DASH
from gateway.compare.store import CallResult
from gateway.config import Gpu, ListPrice, ModelCard

CARDS = {
    "q": ModelCard(id="q", family="qwen3", origin="CN", gpu=Gpu(type="H100", count=1, usd_per_hour=3.6),
                   list_price=ListPrice(input_per_1m=0.0, output_per_1m=10.0)),
    "l": ModelCard(id="l", family="llama", origin="US", gpu=Gpu(type="H100", count=1, usd_per_hour=3.6),
                   list_price=ListPrice(input_per_1m=0.0, output_per_1m=20.0)),
}  # fmt: skip


def test_wilson_and_mcnemar_match_hand_computed_values() -> None:
    lo, hi = wilson(8, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)
    assert wilson(0, 5)[0] == 0.0 and wilson(5, 5)[1] == 1.0
    assert mcnemar_exact(7, 1) == pytest.approx(2 * (1 + 8) / 256)  # n = 8, the tail P(X <= 1) doubled
    assert mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0


def results() -> list[CallResult]:
    """10 graded items; q right on 9 (items 0-8), l right on 2 (items 0 and 9). Each call 100 completion tokens
    over 1 s, one every second: each model's served rate 100 tok/s."""
    out = []
    for k in range(10):
        base = CallResult(comparison_id="run-q", kind="run", model="q", prompt_id=f"i{k}", family="qwen3",
                          origin="CN", ttft_s=0.1, ttfat_s=0.2, tpot_s=0.01, e2e_s=1.0, completion_tokens=100,
                          created_at=1000.0 + k, cost_list_usd=100 * 10 / 1e6, correct=int(k < 9), score=1.0,
                          prompt_category="arithmetic" if k < 5 else "tool use", prompt_lang="en" if k % 2 else "zh",
                          text=f"answer {k}")  # fmt: skip
        out.append(base)
        out.append(replace(base, model="l", family="llama", origin="US", ttfat_s=0.1, ttft_s=0.1,
                           cost_list_usd=100 * 20 / 1e6, correct=int(k in (0, 9))))  # fmt: skip
    return out


def test_accuracy_paired_test_and_cost_per_correct_answer() -> None:
    rows = results()
    q = accuracy("q", [r for r in rows if r.model == "q"], gpu_per_1m=10.0)
    assert (q.graded, q.correct, q.rate) == (10, 9, 0.9)
    assert q.list_per_correct == pytest.approx(10 * 0.001 / 9)  # 10 calls of $0.001, 9 right
    assert q.gpu_per_correct == pytest.approx(10.0 * 1000 / 1e6 / 9)  # $10/1M x 1000 tokens, 9 right
    p = paired_accuracy("q", [r for r in rows if r.model == "q"], "l", [r for r in rows if r.model == "l"])
    assert p is not None
    assert (p.pairs, p.only_arm, p.only_baseline) == (10, 8, 1)  # q alone right on 1-8, l alone on 9
    assert p.difference == pytest.approx(0.7) and p.p_value == pytest.approx(2 * (1 + 9) / 512)
    assert p.interval[0] > 0 and "q is 70.0 points more accurate than l on the same 10 items" in p.sentence()
    # 7 against 1 is not clear (p = 0.07), whatever the bootstrap interval says
    close = paired_accuracy("q", [r for r in rows if r.model == "q" and r.prompt_id != "i8"], "l",
                            [r for r in rows if r.model == "l"])  # fmt: skip
    assert close is not None and close.p_value == pytest.approx(2 * 9 / 256)
    assert close.sentence().startswith("No clear difference in accuracy between q and l on the same 9 items")


def test_the_report_shows_accuracy_the_pareto_front_and_grades_in_the_csv(tmp_path: Path) -> None:
    paths = write_report(results(), CARDS, tmp_path)
    md = paths.markdown.read_text(encoding="utf-8")
    # GPU basis: $3.6/h at 100 tok/s served = $10 per 1M; q: 1000 tokens, 9 right -> $0.00111 per correct answer
    assert f"| q | 10 | 9 | 90.0% (60{DASH}98%) | 0.00111 | 0.00111 |" in md
    assert f"| l | 10 | 2 | 20.0% (6{DASH}51%) | 0.005 | 0.01 |" in md
    assert "q is 70.0 points more accurate than l on the same 10 items" in md
    page = paths.html.read_text(encoding="utf-8")
    assert page.count('<svg class="plot scatter"') == 2
    assert "By category" in page and "80% (4/5)" in page  # q on tool use: right on 5-8 of 5-9
    with paths.csv.open(encoding="utf-8") as f:
        header = f.readline().strip().split(",")
    assert {"correct", "score", "grade_detail", "prompt_lang"} <= set(header)


def test_pareto_front() -> None:
    points = [("cheap-bad", 1.0, 0.2), ("mid", 2.0, 0.6), ("dear-good", 5.0, 0.9), ("beaten", 3.0, 0.5),
              ("tie", 2.0, 0.6)]  # fmt: skip
    assert pareto_front(points) == ["cheap-bad", "mid", "tie", "dear-good"]
    svg = scatter("x", points, "$", str)
    assert svg.count('class="pareto"') == 4 and svg.count('class="point"') == 1 and "<polyline" in svg


def test_graded_prompt_files(tmp_path: Path) -> None:
    graded = load_prompts("builtin-graded")
    assert len(graded) >= 80 and all(p.expectation is not None for p in graded)
    assert {p.lang for p in graded} == {"en", "zh"} and len(load_prompts("builtin-graded-zh")) >= 40
    assert any(p.tools for p in graded)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "2+2?", "expected": 4, "scorer": "number"}) + "\n"
                   + json.dumps({"prompt": "x", "scorer": "choice", "expected": "Z"}) + "\n")  # fmt: skip
    with pytest.raises(PromptError, match=r"bad.jsonl:2: scorer 'choice' needs"):
        load_prompts(str(bad))
    with pytest.raises(PromptError, match="no such set"):
        load_prompts("builtin-graded-fr")


def test_gateway_compare_measures_each_oracles_accuracy_exactly(tmp_path: Path) -> None:
    """Issue #16's done-when: ``gateway compare`` on the built-in graded sets against two oracle emulators (right
    with probability 0.8 and 0.4, different seeds) finds each one's accuracy exactly equal to the oracle's realised
    accuracy, computes the paired test and intervals, and its $ per correct answer is its cost columns' sum over its
    correct answers."""
    import csv
    import subprocess
    import sys

    from gateway.app import create_app
    from gateway.compare.runs import GRADED_DIR
    from gateway.devstack.emulator import EmulatorConfig, create_emulator_app
    from gateway.devstack.emulator.oracle import is_correct
    from tests.conftest import card, settings_for
    from tests.servers import REPO, ThreadServer

    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join((GRADED_DIR / f"{lang}.jsonl").read_text(encoding="utf-8") for lang in ("en", "zh")),
                       encoding="utf-8")  # fmt: skip
    oracles = {"good": (0.8, 11), "poor": (0.4, 12)}  # model: (accuracy, seed)
    emulators = {
        m: ThreadServer(
            create_emulator_app(
                EmulatorConfig(model=m, ttft_ms=5, itl_ms=1, answers=str(answers), accuracy=a, seed=seed)
            )
        )
        for m, (a, seed) in oracles.items()
    }
    try:
        for server in emulators.values():
            server.__enter__()
        settings = settings_for(
            [{"name": f"{m}-b", "base_url": s.url, "models": [m]} for m, s in emulators.items()],
            [card("good", "qwen3", "Alibaba", "CN", aliases=[]), card("poor", "llama", "Meta", "US", aliases=[])],
        )
        with ThreadServer(create_app(settings)) as gw:
            done = subprocess.run(
                [sys.executable, "-m", "gateway", "compare", "--gateway", gw.url, "--prompts", "builtin-graded",
                 "--models", "good,poor", "--out", str(tmp_path / "out"), "--max-tokens", "256", "--concurrency", "4"],
                cwd=REPO, capture_output=True, text=True, timeout=300,
            )  # fmt: skip
    finally:
        for server in emulators.values():
            server.__exit__()
    assert done.returncode == 0, done.stdout + done.stderr
    prompts = load_prompts("builtin-graded")
    text_of = {p.id: p.messages[-1]["content"] for p in prompts}
    with (tmp_path / "out" / "results.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * len(prompts) and all(r["error"] == "" for r in rows)
    md = (tmp_path / "out" / "summary.md").read_text(encoding="utf-8")
    for model, (acc, seed) in oracles.items():
        mine = [r for r in rows if r["model"] == model]
        truth = {r["prompt_id"]: int(is_correct(seed, text_of[r["prompt_id"]], acc)) for r in mine}
        assert {r["prompt_id"]: int(r["correct"]) for r in mine} == truth  # every call graded as the oracle chose
        right = sum(truth.values())
        listed = sum(float(r["cost_list_usd"]) for r in mine) / right
        lo, hi = wilson(right, len(mine))
        row = next(x for x in md.splitlines() if x.startswith(f"| {model} | {len(mine)} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[:4] == [model, str(len(mine)), str(right), f"{right / len(mine) * 100:.1f}% "
                             f"({lo * 100:.0f}{DASH}{hi * 100:.0f}%)"], cells  # fmt: skip
        assert cells[5] == usd(listed), (cells, listed)  # list $ per correct answer
    assert "McNemar exact p = " in md and "more accurate than poor" in md  # good vs the US baseline
    assert (tmp_path / "out" / "report.html").read_text(encoding="utf-8").count('class="pareto"') >= 1


def test_public_formats_read_as_graded_prompts(tmp_path: Path) -> None:
    """``--format gsm8k`` and ``--format mmlu-csv`` (MMLU's header-less rows, CMMLU's header and index column):
    lines written here in those formats (no benchmark data) become number- and choice-graded prompts."""
    gsm = tmp_path / "test.jsonl"
    gsm.write_text(json.dumps({"question": "Ann has 3 bags of 12 pears. How many pears?",
                               "answer": "3 x 12 = 36\n#### 36"}) + "\n"
                   + json.dumps({"question": "A fee of 1,250 and another of 750. Total?",
                                 "answer": "#### 2,000"}) + "\n", encoding="utf-8")  # fmt: skip
    first, second = load_prompts(str(gsm), "gsm8k")
    assert first.expectation is not None and first.expectation.expected == 36.0
    assert second.expectation is not None and second.expectation.expected == 2000.0
    assert "final answer as a number" in first.messages[-1]["content"]
    mmlu = tmp_path / "astronomy_test.csv"
    mmlu.write_text('What orbits the Earth?,The Sun,The Moon,Mars,Venus,B\n"Red, hot planet?",Mars,Pluto,Io,Ceres,A\n',
                    encoding="utf-8")  # fmt: skip
    a, b = load_prompts(str(mmlu), "mmlu-csv")
    assert (a.category, a.expectation and a.expectation.expected, b.expectation and b.expectation.expected) == (
        "astronomy_test",
        "B",
        "A",
    )
    assert "B. The Moon" in a.messages[-1]["content"] and "letter only" in a.messages[-1]["content"]
    cmmlu = tmp_path / "chinese_history.csv"
    cmmlu.write_text(",Question,A,B,C,D,Answer\n0,长城始建于哪个时期,春秋战国,唐朝,宋朝,清朝,A\n", encoding="utf-8")
    (c,) = load_prompts(str(cmmlu), "mmlu-csv")
    assert c.lang == "zh" and "只回答选项字母" in c.messages[-1]["content"]
    bad = tmp_path / "bad.csv"
    bad.write_text("q,a,b,c,d,E\n", encoding="utf-8")
    with pytest.raises(PromptError, match=r"bad.csv:1: expected question"):
        load_prompts(str(bad), "mmlu-csv")


def test_cache_bust_and_warmup_and_cached_tokens(tmp_path: Path) -> None:
    """``--cache-bust``: every call opens with its own system message (no shared prefix for any cache); the
    warm-up calls reach the backend but not the results; a backend's ``cached_tokens`` is recorded."""
    from gateway.app import create_app
    from gateway.compare.runs import run
    from tests.backends import Recorder
    from tests.conftest import card, settings_for
    from tests.servers import ThreadServer

    def chunk(obj: dict[str, object]) -> bytes:
        return b"data: " + json.dumps(obj).encode() + b"\n\n"

    usage = {"prompt_tokens": 9, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 4}}
    chunks = [chunk({"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]}),
              chunk({"choices": [], "usage": usage}), b"data: [DONE]\n\n"]  # fmt: skip
    backend = Recorder(chunks=chunks)
    with ThreadServer(backend.app()) as b:
        settings = settings_for([{"name": "b", "base_url": b.url, "models": ["m"]}],
                                [card("m", "qwen3", "Alibaba", "CN", aliases=[])])  # fmt: skip
        with ThreadServer(create_app(settings)) as gw:
            prompts = load_prompts("builtin")[:3]
            results = run(gw.url, ["m"], prompts, cache_bust=True, warmup=2, repeat=2)
    assert len(results) == 6 and all(r.error is None for r in results)
    assert all(r.cached_tokens == 4 and r.output_chars == 2 for r in results)
    sent = [json.loads(body) for body, _ in backend.received]
    assert len(sent) == 2 + 6  # the two warm-up calls reached the backend, and are not among the results
    systems = [m["messages"][0]["content"] for m in sent]
    assert all(s.startswith("Request ") for s in systems) and len(set(systems)) == len(sent)
