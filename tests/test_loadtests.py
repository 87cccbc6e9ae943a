"""Load tests (loadtests/): schedule math, and locust runs in subprocesses against emulators behind the gateway."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.app import create_app
from gateway.devstack.emulator import EmulatorConfig, create_emulator_app
from gateway.devstack.supervisor import free_port
from loadtests import arrival
from loadtests.results import cross_check, read_stats, read_summary
from loadtests.sweep import LOCUSTFILE, sweep
from loadtests.workload import Size, Workload
from tests.conftest import card, settings_for
from tests.servers import REPO, ThreadServer

pytestmark = pytest.mark.slow  # left out of scripts/test.sh --quick

MODELS = ("emu/qwen3", "emu/llama")
TTFT_MS, ITL_MS, TOKENS = 30, 5, 8


@pytest.mark.parametrize(
    ("kind", "burstiness", "cv_low", "cv_high"),
    [("constant", 1.0, 0.0, 1e-9), ("poisson", 1.0, 0.9, 1.1), ("gamma", 0.25, 1.8, 2.2), ("gamma", 4.0, 0.45, 0.55)],
)
def test_schedule_rate_and_cv(kind: str, burstiness: float, cv_low: float, cv_high: float) -> None:
    offsets = arrival.schedule(kind, 20.0, duration=500.0, burstiness=burstiness, seed=7)
    stats = arrival.describe(offsets)
    assert stats.mean_rate == pytest.approx(20.0, rel=0.03)
    assert cv_low <= stats.cv <= cv_high
    assert offsets == arrival.schedule(kind, 20.0, duration=500.0, burstiness=burstiness, seed=7)  # seeded


def test_shares_rebuild_the_global_schedule() -> None:
    offsets = arrival.schedule("poisson", 5.0, duration=20.0, seed=1)
    parts = [list(arrival.share(offsets, i, 3)) for i in range(3)]
    assert sorted(x for p in parts for x in p) == offsets


def test_rate_check_and_bad_arguments() -> None:
    assert arrival.check_rate(10.0, 9.6).ok
    flagged = arrival.check_rate(10.0, 9.0)
    assert not flagged.ok
    assert "WARNING" in str(flagged.warning())
    with pytest.raises(ValueError, match="rate"):
        next(arrival.arrivals("poisson", 0.0))
    with pytest.raises(ValueError, match="arrival"):
        next(arrival.arrivals("closed", 1.0))


def test_every_model_gets_the_same_prompt_sequence() -> None:
    w = Workload(MODELS, prompts="synthetic", input_tokens=Size.parse("5-50"), output_tokens=Size(16, 16), seed=3)
    bodies = [w.request(i) for i in range(12)]
    for model in MODELS:
        assert [b["model"] for m, b in bodies if m == model] == [model] * 6
    first = [b["messages"] for m, b in bodies if m == MODELS[0]]
    second = [b["messages"] for m, b in bodies if m == MODELS[1]]
    assert first == second
    assert all(b["max_tokens"] == 16 and b["ignore_eos"] for _, b in bodies)
    builtin = Workload(MODELS)
    assert builtin.request(0)[1]["messages"] == builtin.request(1)[1]["messages"]


@pytest.fixture(scope="module")
def gateway() -> Iterator[str]:
    servers: list[ThreadServer] = []
    try:
        for model in MODELS:
            cfg = EmulatorConfig(model=model, ttft_ms=TTFT_MS, itl_ms=ITL_MS, output_tokens=TOKENS)
            servers.append(ThreadServer(create_emulator_app(cfg)).__enter__())
        settings = settings_for(
            [{"name": m.split("/")[1], "base_url": s.url, "models": [m]} for m, s in zip(MODELS, servers, strict=True)],
            [card(MODELS[0], "qwen3", "Alibaba", "CN"), card(MODELS[1], "llama", "Meta", "US")],
        )
        with ThreadServer(create_app(settings)) as gw:
            yield gw.url
    finally:
        for server in servers:
            server.__exit__()


def _locust(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)


def test_open_loop_run_stats_and_gateway_agreement(gateway: str, tmp_path: Path) -> None:
    before = httpx.get(f"{gateway}/metrics").text
    proc = subprocess.run(
        [sys.executable, "-m", "loadtests", "run", "--host", gateway, "--out", str(tmp_path), "--",
         "-u", "1", "-r", "1", "-t", "6s", "--arrival", "constant", "--rate", "8", "--prompts", "synthetic",
         "--input-tokens", "20-60"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    after = httpx.get(f"{gateway}/metrics").text
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "client / gateway" in proc.stdout
    stats = read_stats(tmp_path / "run")
    summary = read_summary(tmp_path / "summary.json")
    for model in MODELS:  # discovered from /v1/models
        m = summary["models"][model]
        assert m["failures"] == 0
        assert m["achieved_rps"] == pytest.approx(m["intended_rps"], rel=0.05), m
        assert m["intended_rps"] == pytest.approx(4.0, rel=0.01)
        ttft, itl, tpot, tokens = (stats[f"{k} {model}"] for k in ("TTFT", "ITL", "TPOT", "tokens"))
        assert TTFT_MS <= ttft.p50 <= TTFT_MS + 40
        assert ITL_MS - 2 <= itl.p50 <= ITL_MS + 5
        assert itl.count == ttft.count * (TOKENS - 1)  # one sample per gap
        assert ITL_MS - 1 <= tpot.mean <= ITL_MS + 3
        assert tokens.mean_size == TOKENS
        assert stats[f"E2E {model}"].mean >= ttft.mean + (TOKENS - 1) * ITL_MS - 2
    assert summary["ok"], summary
    for agreement in cross_check(stats, before, after, list(MODELS)):
        print(agreement.line())
        assert agreement.client_tokens == agreement.gateway_tokens > 0
        assert agreement.client_requests == agreement.gateway_ttft_count
        # the client's clock starts before the request reaches the gateway: its TTFT is a few ms longer (tens on a
        # busy machine: the bound is for that, not a target)
        assert 0 <= agreement.client_ttft_mean_s - agreement.gateway_ttft_mean_s <= 0.040
        assert agreement.client_tpot_mean_s == pytest.approx(agreement.gateway_tpot_mean_s, abs=0.001)


def test_flag_when_the_target_rate_is_unreachable(tmp_path: Path) -> None:
    # capacity about batch_size / (TTFT + 7 ITL) = 2 / 0.38 s, about 5 req/s: 20 req/s cannot be sustained
    cfg = EmulatorConfig(model="emu/slow", ttft_ms=30, itl_ms=50, output_tokens=8, batch_size=2)
    with ThreadServer(create_emulator_app(cfg)) as emu:
        proc = _locust("--host", emu.url, "-u", "1", "-r", "1", "-t", "5s", "--arrival", "poisson", "--rate", "20",
                       "--csv", str(tmp_path / "slow"), "--summary-json", str(tmp_path / "s.json"))  # fmt: skip
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert not summary["ok"]
    assert summary["achieved_rps"] < 0.95 * summary["intended_rps"]
    assert "WARNING" in summary["warning"]
    assert "WARNING" in proc.stderr


def test_distributed_master_and_two_workers(gateway: str, tmp_path: Path) -> None:
    port = free_port()
    master = subprocess.Popen(
        [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary", "--master",
         "--master-bind-host", "127.0.0.1", "--master-bind-port", str(port), "--expect-workers", "2",
         "--host", gateway, "-u", "2", "-r", "2", "-t", "5s", "--arrival", "constant", "--rate", "6",
         "--csv", str(tmp_path / "dist"), "--summary-json", str(tmp_path / "d.json") ],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "locust",
                "-f",
                str(LOCUSTFILE),
                "--worker",
                "--master-host",
                "127.0.0.1",
                "--master-port",
                str(port),
            ],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        _, err = master.communicate(timeout=60)
    finally:
        for proc in [master, *workers]:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
    assert master.returncode in (0, 1), err[-2000:]
    stats = read_stats(tmp_path / "dist")
    for model in MODELS:
        for kind in ("TTFT", "ITL", "TPOT", "E2E", "tokens", "request"):
            assert stats[f"{kind} {model}"].count > 0
    summary = read_summary(tmp_path / "d.json")
    # each worker sent its half of one global schedule: together, the intended rate
    for model in MODELS:
        assert summary["models"][model]["achieved_rps"] == pytest.approx(3.0, rel=0.1)


def test_sweep_writes_reports(gateway: str, tmp_path: Path) -> None:
    result = sweep(gateway, [MODELS[1]], [2.0, 4.0], 3.0, tmp_path, slo_ttft=0.5, slo_tpot=0.05)
    from loadtests import report

    report.write(result, tmp_path)
    m = result["models"][MODELS[1]]
    assert m["origin"] == "US"
    assert m["max_sustainable_rps"] == 4.0
    assert m["usd_per_1m_output"] == pytest.approx(4.0 / (m["output_tps_at_max"] * 3600) * 1e6)
    for name in ("report.json", "report.md", "report.html"):
        assert (tmp_path / name).stat().st_size > 200
    assert "<svg" in (tmp_path / "report.html").read_text()
    assert MODELS[1] in (tmp_path / "report.md").read_text()


def test_a_thinking_model_gets_ttfat_beside_ttft_and_an_slo_on_it(tmp_path: Path) -> None:
    """#15 item 5: against an emulator that thinks 20 tokens (TTFT 50 ms, ITL 10 ms), locust's TTFAT is about
    250 ms while its TTFT stays about 50 ms; ``--slo-ttfat 0.2`` fails every call's goodput (``--slo-ttft 0.2``
    alone passes them); with ``max_tokens`` 10 the thinking uses the whole budget: every call an empty answer."""
    model = "emu/thinker"
    cfg = EmulatorConfig(model=model, ttft_ms=50, itl_ms=10, output_tokens=8, reasoning_tokens=20)
    with ThreadServer(create_emulator_app(cfg)) as emu:
        settings = settings_for([{"name": "thinker", "base_url": emu.url, "models": [model]}],
                                [card(model, "qwen3", "Alibaba", "CN", aliases=[])])  # fmt: skip
        with ThreadServer(create_app(settings)) as gw:
            runs = {}
            for name, extra in (("ttft", ["--slo-ttft", "0.2"]), ("ttfat", ["--slo-ttfat", "0.2"]),
                                ("short", ["--max-tokens", "10"])):  # fmt: skip
                proc = _locust("--host", gw.url, "-u", "1", "-r", "1", "-t", "3s", "--csv", str(tmp_path / name),
                               "--models", model, *extra)  # fmt: skip
                assert proc.returncode == 0, proc.stderr[-2000:]
                runs[name] = read_stats(tmp_path / name)
    stats = runs["ttft"]
    requests, ttft, ttfat = (stats[f"{k} {model}"] for k in ("request", "TTFT", "TTFAT"))
    assert requests.count >= 3 and ttft.count == ttfat.count == requests.count
    assert 50 <= ttft.p50 <= 50 + 40 and 250 <= ttfat.p50 <= 250 + 60
    assert stats[f"goodput {model}"].count == requests.count
    assert f"goodput {model}" not in runs["ttfat"]  # no call met a 200 ms TTFAT SLO
    short = runs["short"]
    assert short[f"empty answer {model}"].count == short[f"request {model}"].count >= 3
    assert f"TTFAT {model}" not in short
