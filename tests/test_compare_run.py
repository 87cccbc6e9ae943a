"""`gateway compare` as a user runs it, against the emulated stack: a run, its report files, and bad input."""

from __future__ import annotations

import csv
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from gateway.app import create_app
from gateway.auth import hash_key
from gateway.compare.runs import BUILTIN, load_prompts
from gateway.devstack.emulator import EmulatorConfig, create_emulator_app
from tests.conftest import Stack, card, settings_for
from tests.servers import REPO, ThreadServer


def gateway_compare(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "compare", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_comparison_run_writes_a_complete_report(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = gateway_compare(
        "--gateway", stack.url, "--models", "qwen3,deepseek,llama", "--out", str(out),
        "--repeat", "2", "--concurrency", "3", "--max-tokens", "8",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    calls = len(BUILTIN) * 3 * 2
    assert f"{calls}/{calls} calls, 0 errors" in done.stderr  # the progress bar's last state
    for model in ("emu/qwen3", "emu/deepseek", "emu/llama"):
        assert model in done.stdout
    with (out / "results.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == calls and all(r["error"] == "" for r in rows)
    assert {r["prompt_category"] for r in rows} == {
        "short chat",
        "long-context summary",
        "code",
        "reasoning",
        "chinese",
    }
    # pairing: every model answered every (prompt, repeat), in one comparison
    assert len({r["comparison_id"] for r in rows}) == 1
    keys = {(r["prompt_id"], r["repeat"]) for r in rows}
    assert all(sum(1 for r in rows if (r["prompt_id"], r["repeat"]) == k) == 3 for k in keys)
    db = sqlite3.connect(out / "results.sqlite")
    assert db.execute("SELECT COUNT(*) FROM results WHERE text != ''").fetchone()[0] == calls
    db.close()
    html = (out / "report.html").read_text(encoding="utf-8")
    for section in ("TTFT", "TPOT", "CN", "US", "$", "95% CI"):
        assert section in html
    assert html.count("<svg") >= 4 and "no data" not in html.lower()
    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert "emu/llama" in summary and "95% CI" in summary


def test_bad_prompt_file_and_unknown_model(stack: Stack, tmp_path: Path) -> None:
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"nope": 1}\n', encoding="utf-8")
    done = gateway_compare("--gateway", stack.url, "--prompts", str(bad), "--out", str(tmp_path / "x"))
    assert done.returncode == 2 and f"{bad}:2" in done.stderr
    done = gateway_compare("--gateway", stack.url, "--models", "gpt-9", "--out", str(tmp_path / "x"))
    assert done.returncode == 2 and "The model `gpt-9` does not exist" in done.stderr
    unreachable = gateway_compare("--gateway", "http://127.0.0.1:9", "--out", str(tmp_path / "x"))
    assert unreachable.returncode == 1 and "cannot list models" in unreachable.stderr


def test_prompt_files_accept_prompt_or_messages(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(
        '{"id": "a", "category": "mine", "prompt": "hi", "max_tokens": 5}\n\n'
        '{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "yo"}]}\n',
        encoding="utf-8",
    )
    prompts = load_prompts(str(path))
    assert [(p.id, p.category, p.max_tokens) for p in prompts] == [("a", "mine", 5), ("p3", "", None)]
    assert prompts[1].messages[0]["role"] == "system"
    assert len(load_prompts("builtin")) == len(BUILTIN)


def test_a_comparison_run_against_a_gateway_with_keys_takes_its_key_from_the_environment(tmp_path: Path) -> None:
    key = "gk-compare-run-0123456789abcdef0123456789"
    emulator = create_emulator_app(EmulatorConfig(model="m", ttft_ms=5, itl_ms=1, output_tokens=4))
    with ThreadServer(emulator) as backend:
        settings = settings_for(
            [{"name": "b", "base_url": backend.url, "models": ["m"]}],
            [card("m", "llama", "Meta", "US", aliases=[])],
            auth={"keys": [{"name": "runner", "sha256": hash_key(key), "models": ["m"]}]},
        )
        with ThreadServer(create_app(settings)) as gw:
            args = ["--gateway", gw.url, "--models", "all", "--out", str(tmp_path / "run"), "--max-tokens", "4"]
            refused = gateway_compare(*args)
            assert refused.returncode == 2 and "needs an API key: set GATEWAY_API_KEY" in refused.stderr
            wrong = subprocess.run(
                [sys.executable, "-m", "gateway", "compare", *args, "--api-key-env", "RUN_KEY"],
                cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "RUN_KEY": "gk-wrong-key"},
            )  # fmt: skip
            assert wrong.returncode == 2 and "refused the key in RUN_KEY" in wrong.stderr
            done = subprocess.run(
                [sys.executable, "-m", "gateway", "compare", *args, "--api-key-env", "RUN_KEY"],
                cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "RUN_KEY": key},
            )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    calls = len(BUILTIN)
    assert f"{calls}/{calls} calls, 0 errors" in done.stderr
