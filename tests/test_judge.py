"""Pairwise judging: verdict parsing, both orders combined, win rates and Bradley-Terry by hand, and
``gateway compare --judge`` end to end against emulators and a rule-following judge behind the gateway."""

from __future__ import annotations

import csv
import json
import math
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from gateway.app import create_app
from gateway.compare.judge import (
    JUDGE_PROMPT,
    Judgement,
    Judging,
    bradley_terry,
    combine,
    head_to_head,
    judge_prompt,
    pairs,
    parse_verdict,
    scores,
    section,
    user_prompt,
    win_rates,
)
from gateway.compare.store import CallResult
from gateway.devstack.emulator import EmulatorConfig, create_emulator_app
from tests.conftest import card, settings_for
from tests.servers import REPO, ThreadServer
from tests.test_compare_run import gateway_compare


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [
        ("A", "A"), ("b", "B"), ("Tie", "tie"), ("TIE.", "tie"), ("**B**", "B"), ("Verdict: A", "A"),
        ("Answer B is clearer.\nB", "B"), ("Both are fine.\n\nFinal answer: tie\n", "tie"),
        ("<think>A looks wrong</think>\nB", "B"), ("Answer A is better", "A"), ("B is a better answer", "B"),
        ("", "invalid"), (None, "invalid"), ("I cannot decide.", "invalid"), ("A\nmaybe", "invalid"),
        ("A or B", "B"), ("`a`", "A"),
    ],
)  # fmt: skip
def test_verdict_parsing(reply: str | None, verdict: str) -> None:
    assert parse_verdict(reply) == verdict


@pytest.mark.parametrize(
    ("ab", "ba", "outcome", "disagreement"),
    [
        ("A", "B", "a", False),  # arm_a first, then arm_a second: the same arm both times
        ("B", "A", "b", False),
        ("tie", "tie", "tie", False),
        ("A", "A", "tie", True),  # the first position won both times: position bias, not a preference
        ("B", "B", "tie", True),
        ("A", "tie", "tie", True),
        ("tie", "A", "tie", True),
        ("invalid", "B", "invalid", False),
        ("A", "invalid", "invalid", False),
    ],
)
def test_combining_both_orders(ab: str, ba: str, outcome: str, disagreement: bool) -> None:
    assert combine(ab, ba) == (outcome, disagreement)
    j = Judgement("c", "p", 0, "x", "y", ab, ba, "judge")
    assert (j.outcome, j.order_disagreement) == (outcome, disagreement)


def decided(*games: tuple[str, str, str, int]) -> list[tuple[str, str, Any]]:
    return [(a, b, outcome) for a, b, outcome, n in games for _ in range(n)]


def test_bradley_terry_two_arms_is_the_odds() -> None:
    strengths, prior = bradley_terry(decided(("x", "y", "a", 3), ("x", "y", "b", 1)))
    assert not prior
    assert strengths["x"] / strengths["y"] == pytest.approx(3.0)
    assert strengths["x"] * strengths["y"] == pytest.approx(1.0)  # geometric mean 1
    strengths, _ = bradley_terry(decided(("x", "y", "a", 2), ("y", "x", "tie", 1), ("y", "x", "a", 1)))
    assert strengths["x"] / strengths["y"] == pytest.approx(2.5 / 1.5)  # a tie: half a win each way
    # x never lost: no finite fit, so one tie is added to the pair (2.5 : 0.5)
    strengths, prior = bradley_terry(decided(("x", "y", "a", 2)))
    assert prior and strengths["x"] / strengths["y"] == pytest.approx(5.0)


def test_three_arms_known_ordering() -> None:
    games = decided(("a", "b", "a", 3), ("a", "b", "b", 1), ("b", "c", "a", 3), ("b", "c", "b", 1),
                    ("a", "c", "a", 3), ("c", "a", "a", 1))  # fmt: skip
    assert win_rates(games) == {"a": 0.75, "b": 0.5, "c": 0.25}
    strengths, prior = bradley_terry(games)
    assert not prior and strengths["a"] > strengths["b"] > strengths["c"]
    assert math.prod(strengths.values()) == pytest.approx(1.0)
    # symmetric data: b sits at the geometric mean, a and c mirror each other
    assert strengths["b"] == pytest.approx(1.0) and strengths["a"] * strengths["c"] == pytest.approx(1.0)
    # the fit's fixed point: each arm's expected wins equal its actual wins
    for arm in "abc":
        won = sum(1 for x, y, o in games if (x, o) == (arm, "a") or (y, o) == (arm, "b"))
        expected = sum(strengths[arm] / (strengths[x] + strengths[y]) for x, y, _ in games if arm in (x, y))
        assert expected == pytest.approx(won)


def judgements_of(games: list[tuple[str, str, Any]]) -> list[Judgement]:
    verdicts = {"a": ("A", "B"), "b": ("B", "A"), "tie": ("tie", "tie")}
    return [Judgement("c", f"p{i}", 0, a, b, *verdicts[o], "judge") for i, (a, b, o) in enumerate(games)]


def test_scores_and_their_intervals() -> None:
    games = decided(("a", "b", "a", 6), ("a", "b", "b", 2), ("a", "b", "tie", 2))
    js = [*judgements_of(games), Judgement("c", "bad", 0, "a", "b", "maybe", "A", "judge")]
    result = scores(js, resamples=300)
    assert result is not None and [s.arm for s in result.arms] == ["a", "b"]
    a, b = result.arms
    assert (a.pairs, a.wins, a.ties, a.losses) == (10, 6, 2, 2)  # the invalid one is left out
    assert a.win_rate == pytest.approx(0.7) and b.win_rate == pytest.approx(0.3)
    assert a.strength / b.strength == pytest.approx(7 / 3)
    for s in result.arms:
        assert s.win_rate_ci[0] <= s.win_rate <= s.win_rate_ci[1]
        assert s.strength_ci[0] <= s.strength <= s.strength_ci[1]
    assert scores(js, resamples=300) == result  # seeded
    assert head_to_head(js) == {("a", "b"): (6, 2, 2), ("b", "a"): (2, 2, 6)}


def test_no_data() -> None:
    assert scores([]) is None
    invalid = [Judgement("c", "p", 0, "a", "b", "invalid", "A", "judge")]
    assert scores(invalid) is None
    page = section(Judging("judge", invalid))
    assert page.tables == [] and any("No data" in s for s in page.sentences)


def test_pairs_prompt_and_judge_prompt() -> None:
    def r(arm: str, pid: str, error: str | None = None) -> CallResult:
        return CallResult("c", "run", arm, prompt_id=pid, text=f"{arm} says", error=error)

    results = [r("x", "p1"), r("y", "p1"), r("z", "p1"), r("x", "p2"), r("y", "p2", "boom"), r("z", "p2")]
    assert [(a.arm, b.arm, a.prompt_id) for a, b in pairs(results)] == [
        ("x", "y", "p1"), ("x", "z", "p1"), ("y", "z", "p1"), ("x", "z", "p2")
    ]  # fmt: skip
    parts = [{"type": "text", "text": "hi"}]
    messages: list[dict[str, Any]] = [{"role": "system", "content": "s"}, {"role": "user", "content": "first"},
                {"role": "assistant", "content": "a"}, {"role": "user", "content": parts}]  # fmt: skip
    assert user_prompt(messages) == "hi"
    text = judge_prompt("Q?", "one", "two")
    assert "[Prompt]\nQ?" in text and "[Answer A]\none" in text and "[Answer B]\ntwo" in text
    assert text.splitlines()[-1] == "Reply with exactly one of A, B or tie on the last line."


def test_the_judge_prompt_is_in_the_docs() -> None:
    assert JUDGE_PROMPT in (REPO / "docs" / "judging.md").read_text(encoding="utf-8")


# -- end to end ---------------------------------------------------------------------------------------------------

ARMS = (("emu/long", 16), ("emu/mid", 6), ("emu/short", 2))


def judge_app() -> Starlette:
    """A judge that prefers the longer answer; says "A" whatever it reads for a prompt marked BIASED (so the orders
    disagree) and no verdict for one marked UNSURE."""

    async def completions(request: Request) -> JSONResponse:
        body = await request.json()
        text = body["messages"][-1]["content"]
        a = re.search(r"\[Answer A\]\n(.*?)\n\n\[Answer B\]", text, re.S)
        b = re.search(r"\[Answer B\]\n(.*?)\n\nWhich answer", text, re.S)
        assert a and b and body["temperature"] == 0 and not body.get("stream")
        if "UNSURE" in text:
            reply = "I cannot decide."
        elif "BIASED" in text:
            reply = "A"
        else:
            size_a, size_b = len(a.group(1)), len(b.group(1))
            reply = (
                "The longer one.\nVerdict: **" + ("A" if size_a > size_b else "B" if size_b > size_a else "tie") + "**"
            )
        return JSONResponse({
            "id": "j", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13},
        })  # fmt: skip

    async def health(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    return Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"]), Route("/health", health)])


@pytest.fixture(scope="module")
def judged_stack() -> Iterator[str]:
    servers = [ThreadServer(create_emulator_app(EmulatorConfig(model=m, ttft_ms=5, itl_ms=1, output_tokens=n)))
               for m, n in ARMS]  # fmt: skip
    servers.append(ThreadServer(judge_app()))
    models = [*(m for m, _ in ARMS), "emu/judge"]
    try:
        for s in servers:
            s.__enter__()
        urls = [s.url for s in servers]
        settings = settings_for(
            [{"name": m.replace("/", "-"), "base_url": u, "models": [m]} for m, u in zip(models, urls, strict=True)],
            [card(m, m.split("/")[1], "Test", "US") for m in models],
        )  # fmt: skip
        with ThreadServer(create_app(settings)) as gw:
            yield gw.url
    finally:
        for s in servers:
            s.__exit__()


def test_compare_with_a_judge(judged_stack: str, tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    lines = ["Say something.", "Say more.", "BIASED: say something.", "UNSURE: say something."]
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": t}) + "\n" for i, t in enumerate(lines, 1)))
    out = tmp_path / "run"
    done = gateway_compare(
        "--gateway", judged_stack, "--models", "emu/long,emu/mid,emu/short", "--prompts", str(prompts),
        "--out", str(out), "--judge", "judge", "--concurrency", "3", "--max-tokens", "32",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "judging 12 pairs of answers with emu/judge" in done.stdout and "biased" not in done.stderr
    with (out / "judgements.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    got = [(r["prompt_id"], r["arm_a"], r["arm_b"], r["verdict_ab"], r["verdict_ba"], r["outcome"],
            r["order_disagreement"], r["judge"]) for r in rows]  # fmt: skip
    pairs_ = [("emu/long", "emu/mid"), ("emu/long", "emu/short"), ("emu/mid", "emu/short")]
    expected = [(p, a, b, "A", "B", "a", "0", "emu/judge") for p in ("p1", "p2") for a, b in pairs_]
    expected += [("p3", a, b, "A", "A", "tie", "1", "emu/judge") for a, b in pairs_]
    expected += [("p4", a, b, "invalid", "invalid", "invalid", "0", "emu/judge") for a, b in pairs_]
    assert sorted(got) == sorted(expected)
    db = sqlite3.connect(out / "results.sqlite")
    assert db.execute("SELECT COUNT(*), SUM(order_disagreement) FROM judgements").fetchone() == (12, 3)
    assert db.execute("SELECT reply_ab FROM judgements WHERE prompt_id = 'p4'").fetchone() == ("I cannot decide.",)
    db.close()
    summary = (out / "summary.md").read_text(encoding="utf-8")
    judged = summary.split("## Pairwise judging")[1]
    assert (
        "Judge: emu/judge. 12 pairs" in judged and "3 order disagreements" in judged and "3 with an invalid" in judged
    )
    # win rates: long 4 wins + 2 ties of 6, mid 2 + 2 ties, short 0 + 2 ties; strongest first
    rates = re.findall(r"^\| (emu/\w+) \| 6 \| (\d) \| 2 \| (\d) \| (\d+)% \|", judged, re.M)
    assert rates == [("emu/long", "4", "0", "83"), ("emu/mid", "2", "2", "50"), ("emu/short", "0", "4", "17")]
    assert "| emu/long | \u2013 | 2/1/0 | 2/1/0 |" in judged
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "<h2>Pairwise judging</h2>" in html and "Arm against arm" in html


def test_judge_validation_and_self_judging(judged_stack: str, tmp_path: Path) -> None:
    done = gateway_compare(
        "--gateway", judged_stack, "--models", "emu/long", "--judge", "gpt-9", "--out", str(tmp_path)
    )
    assert done.returncode == 2 and "--judge gpt-9: not served" in done.stderr
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "p1", "prompt": "hi"}\n')
    out = tmp_path / "self"
    done = gateway_compare(
        "--gateway", judged_stack, "--models", "emu/long,emu/short", "--prompts", str(prompts), "--out", str(out),
        "--judge", "emu/long", "--max-tokens", "8",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "biased" in done.stderr  # the judge is one of the compared models
    judged = (out / "summary.md").read_text(encoding="utf-8").split("## Pairwise judging")[1]
    assert "No data" in judged  # an emulator's filler words are no verdict
    assert "invalid" in (out / "judgements.csv").read_text(encoding="utf-8")
