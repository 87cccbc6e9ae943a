"""The commands as a user runs them, each in its own process: serve, emulate, up."""

from __future__ import annotations

import asyncio
import itertools
import os
import queue
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from gateway.devstack.supervisor import free_port
from tests.servers import REPO, cli, histogram_quantile, metric


def test_bad_config_exits_non_zero_naming_file_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("backends:\n  - name: b\n    base_url: nope\n    models: [m]\nmodels: [{id: m}]\n")
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(bad)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2
    assert str(bad) in done.stderr and "backends[0].base_url" in done.stderr


def test_serve_without_config_says_what_is_missing() -> None:
    done = subprocess.run([sys.executable, "-m", "gateway", "serve"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "--config FILE or --backend URL" in done.stderr


def test_serve_discovers_models_from_backends() -> None:
    e1, e2, gw = free_port(), free_port(), free_port()
    with (
        cli("emulate", "--model", "Qwen/Qwen3-8B", "--port", str(e1), ready=f"http://127.0.0.1:{e1}/health"),
        cli("emulate", "--model", "meta-llama/Llama-3.1-8B", "--port", str(e2), ready=f"http://127.0.0.1:{e2}/health"),
        cli(
            "serve", "--backend", f"qwen=http://127.0.0.1:{e1}/v1", "--backend", f"http://127.0.0.1:{e2}",
            "--port", str(gw), ready=f"http://127.0.0.1:{gw}/ready",
        ),
    ):  # fmt: skip
        models = httpx.get(f"http://127.0.0.1:{gw}/v1/models").json()["data"]
        assert {(m["id"], m["family"], m["origin"], tuple(m["backends"])) for m in models} == {
            ("Qwen/Qwen3-8B", "qwen3", "CN", ("qwen",)),
            ("meta-llama/Llama-3.1-8B", "llama", "US", ("backend1",)),
        }
        emu = httpx.get(f"http://127.0.0.1:{e1}/v1/models").json()["data"][0]
        assert emu["owned_by"] == "vllm-emulator"  # the emulator never passes for a model


@pytest.mark.slow
def test_serve_with_workers_aggregates_metrics_and_stops_cleanly() -> None:
    e, gw = free_port(), free_port()
    url = f"http://127.0.0.1:{gw}"
    with (
        cli("emulate", "--model", "m", "--port", str(e), "--ttft-ms", "5", "--itl-ms", "2",
            ready=f"http://127.0.0.1:{e}/health"),
        cli("serve", "--backend", f"http://127.0.0.1:{e}", "--port", str(gw), "--workers", "2",
            ready=f"{url}/ready", timeout=60) as proc,
    ):  # fmt: skip
        sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for i in range(20):
            if i % 2:
                list(sdk.completions.create(model="m", prompt="hi", max_tokens=3, stream=True))
            else:
                sdk.completions.create(model="m", prompt="hi", max_tokens=3)
        out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, check=False).stdout.decode()
        workers = [int(p) for p in out.split()]
        assert len(workers) >= 2
        environ = Path(f"/proc/{workers[0]}/environ").read_bytes().split(b"\0")
        metrics_dir = next(v.split(b"=", 1)[1].decode() for v in environ if v.startswith(b"PROMETHEUS_MULTIPROC_DIR="))
        assert Path(metrics_dir).is_dir()
        for _ in range(3):  # whichever worker answers, the counts are the sum over workers
            text = httpx.get(f"{url}/metrics").text
            assert metric(text, "gateway_requests_total", model="m", status="200") == 20
            assert metric(text, "gateway_completion_tokens_total", model="m") == 60
            assert metric(text, "gateway_time_to_first_token_seconds_count", model="m") == 10
            assert metric(text, "gateway_requests_in_flight", model="m") == 0
            assert metric(text, "gateway_backend_up") == 1
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        assert not Path(metrics_dir).exists()  # its private metrics directory is removed


@pytest.mark.slow
def test_gateway_timing_matches_the_emulators_ttft_and_itl(tmp_path: Path) -> None:
    """The core issue's check: TTFT 200 ms / ITL 20 ms upstream -> the gateway measures 200 ms and 20 ms (the
    median in the bucket around each, the means close). Both run as separate processes, as deployed."""
    emu, gw = free_port(), free_port()
    config = tmp_path / "gw.yaml"
    config.write_text(
        f"models: [{{id: m, family: qwen3, origin: CN}}]\n"
        f"backends: [{{name: emu, base_url: 'http://127.0.0.1:{emu}', models: [m]}}]\n"
    )
    emulate = ("emulate", "--model", "m", "--port", str(emu), "--ttft-ms", "200", "--itl-ms", "20")
    with (
        cli(*emulate, "--output-tokens", "20", ready=f"http://127.0.0.1:{emu}/health"),
        cli("serve", "--config", str(config), "--port", str(gw), ready=f"http://127.0.0.1:{gw}/ready"),
    ):
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{gw}/v1", api_key="x", max_retries=0)

        async def one() -> tuple[float, list[float]]:
            t0 = time.perf_counter()
            stamps = []
            stream = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    stamps.append(time.perf_counter())
            return stamps[0] - t0, [b - a for a, b in itertools.pairwise(stamps)]

        async def rounds(k: int) -> list[tuple[float, list[float]]]:
            results = []
            for _ in range(k):  # rounds of 4 concurrent streams
                results += await asyncio.gather(*(one() for _ in range(4)))
            return results

        async def run() -> tuple[str, list[tuple[float, list[float]]]]:
            await rounds(1)  # warm-up: first connections on both hops, first-call costs in client and gateway
            async with httpx.AsyncClient() as http:
                before = (await http.get(f"http://127.0.0.1:{gw}/metrics")).text
            results = await rounds(3)
            await client.close()
            return before, results

        before, results = asyncio.run(run())
        after = httpx.get(f"http://127.0.0.1:{gw}/metrics").text
    assert "_created" not in after  # gateway serve turns prometheus-client's created series off (tune_process)
    labels = {"model": "m", "backend": "emu"}

    def delta(name: str, **extra: str) -> float:
        return metric(after, name, **labels, **extra) - metric(before, name, **labels, **extra)

    n = delta("gateway_time_to_first_token_seconds_count")
    assert n == 12
    ttft_mean = delta("gateway_time_to_first_token_seconds_sum") / n
    itl_n = delta("gateway_inter_token_latency_seconds_count")
    assert itl_n == 12 * 19  # one sample per gap between the 20 tokens of each stream
    itl_mean = delta("gateway_inter_token_latency_seconds_sum") / itl_n
    # Most samples sit in the bucket around their target, so the median does; the mean is on target. (A shared
    # 2-core machine delays chunks, and the one after a late chunk comes early: a busy run was seen below 90% in
    # the bucket while the suite ran beside other tests. 60% still pins the median, and the means are checked.)
    in_ttft = delta("gateway_time_to_first_token_seconds_bucket", le="0.25") - delta(
        "gateway_time_to_first_token_seconds_bucket", le="0.1"
    )
    in_itl = delta("gateway_inter_token_latency_seconds_bucket", le="0.025") - delta(
        "gateway_inter_token_latency_seconds_bucket", le="0.01"
    )
    assert in_ttft >= 0.6 * n and in_itl >= 0.6 * itl_n, (in_ttft, n, in_itl, itl_n)
    # The emulator never sends the first token before 200 ms after it got the request, which is after the
    # gateway's clock started: the gateway's TTFT cannot be below 200 ms. Above it is the machine's doing; the
    # tight figures (the 200 +/- 10 ms, 20 +/- 3 ms) belong to the benchmark, these bounds to a busy machine.
    assert 0.200 <= ttft_mean <= 0.240, ttft_mean
    assert 0.018 <= itl_mean <= 0.025, itl_mean
    client_ttft = statistics.fmean(t for t, _ in results)
    client_itl = statistics.median(g for _, gaps in results for g in gaps)
    # The same 12 streams seen by the client: it sent before the gateway's clock started and got each first token
    # after the gateway stamped it, so its mean can only be later, and not by much.
    assert ttft_mean <= client_ttft <= ttft_mean + 0.040, (client_ttft, ttft_mean)
    assert 0.018 <= client_itl <= 0.025, client_itl
    tpot_p50 = histogram_quantile(after, "gateway_time_per_output_token_seconds", 0.5, **labels)
    assert 0.01 < tpot_p50 <= 0.025


class Output:
    """Reads a process's output in a thread, so waiting for a line never blocks past a deadline."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen = ""
        self.thread = threading.Thread(target=self._pump, args=(proc,), daemon=True)
        self.thread.start()

    def _pump(self, proc: subprocess.Popen[str]) -> None:
        for line in proc.stdout or []:
            self.lines.put(line)

    def until(self, marker: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while marker not in self.seen:
            try:
                self.seen += self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {marker!r} after {timeout} s; output so far:\n{self.seen}") from None
        return self.seen

    def rest(self) -> str:
        """Everything after the process has exited."""
        self.thread.join(10)
        while not self.lines.empty():
            self.seen += self.lines.get()
        return self.seen


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_up_serves_three_families_and_stops_everything(stop: signal.Signals) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "up", "--backends", "emulated", "--port", str(port)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    try:
        out = Output(proc)
        output = out.until("gateway ready at", timeout=60)
        assert f"gateway ready at http://127.0.0.1:{port}/v1" in output, output
        assert "emulators, not models" in output
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        families = set()
        for model in client.models.list():
            families.add(model.model_extra["family"] if model.model_extra else None)
            chat = client.chat.completions.create(
                model=model.id, messages=[{"role": "user", "content": "hi"}], max_tokens=3
            )
            assert chat.choices[0].message.content
            chunks = list(client.completions.create(model=model.id, prompt="hi", max_tokens=3, stream=True))
            assert "".join(c.choices[0].text for c in chunks if c.choices).strip()
        assert families == {"qwen3", "deepseek", "llama"}
        children = descendants(proc.pid)
        assert len(children) >= 4  # three emulators and the gateway
        proc.send_signal(stop)
        proc.wait(30)
        rest = out.rest()
        assert proc.returncode == 0, rest
        assert "All processes stopped." in rest
        assert not [pid for pid in children if alive(pid)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def test_up_reports_a_busy_port() -> None:
    port = free_port()
    with cli("emulate", "--model", "x", "--port", str(port), ready=f"http://127.0.0.1:{port}/health"):
        done = subprocess.run(
            [sys.executable, "-m", "gateway", "up", "--port", str(port)], capture_output=True, text=True, timeout=30
        )
    assert done.returncode == 2 and re.search(r"port \d+ is already in use", done.stdout)
