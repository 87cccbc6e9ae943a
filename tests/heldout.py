"""Held-out clients for tests (docs/heldout-clients.md): benchmark and framework clients that this project did not
write, each run from a virtualenv of its own under ``.venv-clients/`` (``scripts/heldout-setup.sh``), against the
emulator behind the gateway — the emulator and the gateway each a process of its own on a free loopback port.

A missing client virtualenv fails the test, naming the command that installs it: a held-out check that skips
itself is no check."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from gateway.devstack import vllm_cpu
from gateway.devstack.supervisor import free_port
from tests.servers import REPO, cli, emulator_process, metric

CLIENTS = REPO / ".venv-clients"
MODEL = "emulated/heldout"
TOKENIZER = "heldout/qwen3"  # the tiny Qwen3's tokenizer, under this name in a private Hugging Face cache
# The emulator's configured truth: what every client and the gateway should find, plus their own overheads.
TTFT_MS = 100.0
ITL_MS = 20.0
OUTPUT_TOKENS = 32


def client_program(client: str, program: str) -> Path:
    """``program`` in the virtualenv of held-out ``client``; fails (does not skip) when it is not installed."""
    path = CLIENTS / client / "bin" / program
    if not path.exists():
        pytest.fail(f"held-out client {client} is not installed ({path} missing): run scripts/heldout-setup.sh")
    return path


@dataclass(frozen=True)
class Stack:
    gateway: str
    emulator: str

    def gateway_metrics(self) -> str:
        return httpx.get(f"{self.gateway}/metrics", timeout=10).text

    def emulator_metrics(self) -> str:
        return httpx.get(f"{self.emulator}/metrics", timeout=10).text


@contextlib.contextmanager
def stack(tmp_path: Path) -> Iterator[Stack]:
    """The emulator (TTFT 100 ms, ITL 20 ms, 32 tokens, no jitter; its tokens the tiny Qwen3's, the tokenizer
    the clients count and encode with) and ``gateway serve`` in front of it."""
    tokenizer = vllm_cpu.MODELS / "qwen3"
    if not (tokenizer / "tokenizer.json").exists():
        pytest.fail(f"the tiny Qwen3's tokenizer is missing at {tokenizer}: scripts/test.sh builds the tiny models")
    options: dict[str, float | str] = {"ttft_ms": TTFT_MS, "itl_ms": ITL_MS, "output_tokens": OUTPUT_TOKENS,
                                       "jitter": 0, "tokenizer": str(tokenizer)}  # fmt: skip
    with emulator_process(MODEL, **options) as emulator:
        port = free_port()
        config = {
            "gateway": {"health_check_interval_s": 1, "results_db": ":memory:"},
            "models": [{"id": MODEL, "family": "qwen3", "origin": "CN", "emulated": True}],
            "backends": [{"name": "emu", "base_url": emulator, "models": [MODEL]}],
        }
        path = tmp_path / "gateway.yaml"
        path.write_text(yaml.safe_dump(config))
        url = f"http://127.0.0.1:{port}"
        with cli("serve", "--config", str(path), "--port", str(port), ready=f"{url}/ready"):
            yield Stack(url, emulator)


def client_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a client process: offline, with the tiny Qwen3's tokenizer as ``heldout/qwen3`` in a
    Hugging Face cache of its own (some clients resolve even a local path through the cache when offline)."""
    source = vllm_cpu.MODELS / "qwen3"
    files = ("tokenizer.json", "tokenizer_config.json", "config.json")
    if not all((source / f).exists() for f in files):
        pytest.fail(f"tiny model missing in {source}: scripts/test.sh builds it (python -m gateway.devstack.vllm_cpu)")
    cache = tmp_path / "hf" / "hub"
    repo = cache / ("models--" + TOKENIZER.replace("/", "--"))
    revision = "0" * 40
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    for name in files:
        shutil.copyfile(source / name, snapshot / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {
        **env,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_CACHE": str(cache),
        "HF_HOME": str(tmp_path / "hf"),
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        "DO_NOT_TRACK": "1",
    }


def run_client(argv: list[str], tmp_path: Path, timeout: float = 300) -> str:
    """Run a client to its end in ``tmp_path``, in a process group of its own that is killed afterwards (AIPerf
    runs a process per service); its output, or a failure showing the end of it."""
    proc = subprocess.Popen(
        argv,
        cwd=tmp_path,
        env=client_env(tmp_path),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output = f"(killed after {timeout} s)\n" + proc.communicate()[0]
    finally:
        # the group outlives its leader while any member does, so its id is not reused: this kills only the client's
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited with {proc.returncode}:\n{output[-4000:]}")
    return output


@dataclass(frozen=True)
class Figures:
    """One side's view of a run: counts, and means in milliseconds."""

    requests: int
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float
    itl_ms: float  # the mean whose definition the client uses: see gateway_figures


def gateway_figures(text: str, itl: str) -> Figures:
    """The gateway's figures for ``MODEL`` from its /metrics: histogram means as _sum/_count. ``itl`` names the
    histogram whose definition matches the client's ITL: ``pooled`` (gateway_inter_token_latency_seconds, every
    gap one sample) or ``per_request`` (gateway_time_per_output_token_seconds, one (E2E - TTFT)/(n - 1) a
    request)."""
    name = {"pooled": "gateway_inter_token_latency_seconds", "per_request": "gateway_time_per_output_token_seconds"}

    def mean_ms(histogram: str) -> float:
        return 1000 * metric(text, f"{histogram}_sum", model=MODEL) / metric(text, f"{histogram}_count", model=MODEL)

    return Figures(
        requests=int(metric(text, "gateway_requests_total", model=MODEL, status="200")),
        prompt_tokens=int(metric(text, "gateway_prompt_tokens_total", model=MODEL)),
        completion_tokens=int(metric(text, "gateway_completion_tokens_total", model=MODEL)),
        ttft_ms=mean_ms("gateway_time_to_first_token_seconds"),
        itl_ms=mean_ms(name[itl]),
    )


def emulator_ttft_ms(text: str) -> float:
    """The emulator's own TTFT mean (from its handler's start to its first token's write), from its /metrics."""
    total = metric(text, "vllm:time_to_first_token_seconds_sum")
    return 1000 * total / metric(text, "vllm:time_to_first_token_seconds_count")
