"""Arms of a comparison (issue #15 item 4): a model, or a model with a named variant of the request, from the
command line's ``--variant NAME=JSON`` and the fan-out API's ``variants``; every arm answers the same prompts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from gateway.compare.arms import Arm, ArmError, arms, check_variants, parse_variant_option
from tests.conftest import Stack
from tests.servers import REPO

RESOLVE = {"qwen3": "emu/qwen3", "emu/qwen3": "emu/qwen3", "llama": "emu/llama", "emu/llama": "emu/llama"}.get
NOTHINK = {"chat_template_kwargs": {"enable_thinking": False}}


def test_variants_apply_to_every_model_unless_arms_are_named() -> None:
    found = arms(["qwen3", "llama"], {"nothink": NOTHINK}, RESOLVE)
    assert [a.name for a in found] == ["emu/qwen3", "emu/llama", "emu/qwen3+nothink", "emu/llama+nothink"]
    named = arms(["qwen3", "qwen3+nothink", "llama"], {"nothink": NOTHINK}, RESOLVE)
    assert [a.name for a in named] == ["emu/qwen3", "emu/qwen3+nothink", "emu/llama"]
    assert named[1].body({"messages": [], "max_tokens": 4}) == {"messages": [], "max_tokens": 4, **NOTHINK}
    assert arms(["qwen3", "emu/qwen3"], {}, RESOLVE) == [Arm("emu/qwen3")]  # an alias and its id: one arm


@pytest.mark.parametrize(
    ("names", "variants", "message"),
    [
        (["gpt-9"], {}, "The model `gpt-9` does not exist."),
        (["qwen3+fast"], {"nothink": NOTHINK}, "no variant 'fast'"),
        (["qwen3+nothink", "llama"], {"nothink": NOTHINK, "short": {"max_tokens": 2}}, "short given but no arm"),
    ],
)
def test_bad_arms_say_what_is_wrong(names: list[str], variants: dict[str, dict[str, object]], message: str) -> None:
    with pytest.raises(ArmError, match=message.replace("(", r"\(")):
        arms(names, variants, RESOLVE)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("nothink", "expected NAME=JSON"),
        ("nothink={bad", "not JSON"),
        ('x={"model":"other"}', "may not set model"),
        ('x={"stream":false}', "may not set stream"),
        ("x=[1]", "non-empty object"),
        ('bad name={"seed":1}', "letters, digits"),
    ],
)
def test_a_bad_variant_option_is_refused(option: str, message: str) -> None:
    with pytest.raises(ArmError, match=message):
        parse_variant_option(option)
    assert parse_variant_option('nothink={"chat_template_kwargs":{"enable_thinking":false}}') == ("nothink", NOTHINK)
    with pytest.raises(ArmError, match="at most 8"):
        check_variants({f"v{i}": {"seed": i} for i in range(9)})


def test_the_fan_out_api_runs_each_arm_on_the_same_request(stack: Stack) -> None:
    body = {"models": ["qwen3", "qwen3+short", "llama"], "variants": {"short": {"max_tokens": 2}},
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6}  # fmt: skip
    data = httpx.post(f"{stack.v1}/compare/chat/completions", json=body, timeout=30).json()
    got = {r["arm"]: (r["model"], r["variant"], r["metrics"]["completion_tokens"]) for r in data["results"]}
    assert got == {"emu/qwen3": ("emu/qwen3", None, 6), "emu/qwen3+short": ("emu/qwen3", "short", 2),
                   "emu/llama": ("emu/llama", None, 6)}  # fmt: skip
    stored = httpx.get(f"{stack.v1}/compare/{data['id']}").json()["results"]
    assert sorted((r["model"], r["variant"]) for r in stored) == [
        ("emu/llama", ""), ("emu/qwen3", ""), ("emu/qwen3", "short")
    ]  # fmt: skip
    # streaming: each chunk names its arm, so two arms of one model stay apart
    arms_seen: dict[str, int] = {}
    with httpx.stream("POST", f"{stack.v1}/compare/chat/completions", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                choices = event["chunk"]["choices"] if event["type"] == "chunk" else []
                if choices and choices[0]["delta"].get("content"):
                    arms_seen[event["arm"]] = arms_seen.get(event["arm"], 0) + 1
    assert arms_seen == {"emu/qwen3": 6, "emu/qwen3+short": 2, "emu/llama": 6}
    # a variant the backend refuses fills its own slot with the backend's error; the other arms answer
    bad = {**body, "variants": {"short": {"max_tokens": "two"}}}
    data = httpx.post(f"{stack.v1}/compare/chat/completions", json=bad, timeout=30).json()
    errors = {r["arm"]: r["error"] and r["error"]["code"] for r in data["results"]}
    assert errors == {"emu/qwen3": None, "emu/qwen3+short": 400, "emu/llama": None}


@pytest.mark.parametrize(
    ("change", "status", "param"),
    [
        ({"variants": {"short": {"model": "x"}}}, 400, "variants"),
        ({"variants": {"other": {"max_tokens": 2}}}, 400, "variants"),  # qwen3+short names no defined variant
        ({"variants": {"short": {"stream_options": {"include_usage": False}}}}, 400, "variants"),
        ({"models": ["gpt-9+short"]}, 404, "models"),
    ],
)
def test_the_fan_out_api_refuses_bad_variants(stack: Stack, change: dict[str, object], status: int, param: str) -> None:
    body = {"models": ["qwen3", "qwen3+short"], "variants": {"short": {"max_tokens": 2}},
            "messages": [{"role": "user", "content": "hi"}], **change}  # fmt: skip
    r = httpx.post(f"{stack.v1}/compare/chat/completions", json=body, timeout=30)
    assert r.status_code == status and r.json()["error"]["param"] == param, r.text


def test_gateway_compare_variant_makes_an_arm_with_paired_statistics(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "arms"
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "compare", "--gateway", stack.url, "--models", "qwen3,llama",
         "--variant", 'short={"max_tokens": 3}', "--out", str(out), "--max-tokens", "8"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "x 4 arms" in done.stdout
    for arm in ("emu/qwen3+short", "emu/llama+short"):
        assert arm in done.stdout
    summary = (out / "summary.md").read_text(encoding="utf-8")
    # the arm is compared with the baseline (the US model) pair by pair, like any model
    assert "emu/qwen3+short is " in summary or "between emu/qwen3+short and emu/llama" in summary
    rows = (out / "results.csv").read_text(encoding="utf-8")
    assert rows.count(",short,") == 2 * 8  # 8 builtin prompts x 2 models, each with its variant's name
