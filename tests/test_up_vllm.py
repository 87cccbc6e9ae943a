"""The README's main command end to end: `gateway up --backends vllm-cpu` brings up three real vLLM servers, the
gateway and Prometheus, prints the side-by-side comparison, serves, and on SIGTERM leaves no process behind."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from gateway.compare import runs as compare
from gateway.devstack import vllm_cpu
from gateway.devstack.supervisor import free_port
from tests.servers import REPO
from tests.test_cli import Output, alive, descendants

pytestmark = pytest.mark.vllm


def test_up_vllm_cpu_runs_the_main_job_and_stops_everything() -> None:
    if not vllm_cpu.python().exists():
        pytest.fail(f"vLLM CPU build missing at {vllm_cpu.VENV}: run scripts/test.sh (it installs it)")
    port, prom_port = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "up", "--backends", "vllm-cpu", "--port", str(port),
         "--prometheus-port", str(prom_port)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        out = Output(proc)
        text = out.until("until Ctrl-C", timeout=600)
        assert f"gateway ready at http://127.0.0.1:{port}/v1" in text
        assert f"Prometheus at http://127.0.0.1:{prom_port}" in text, text
        # the comparison table: one row per family, every prompt answered, numbers in every column; no model thinks
        # (tiny-qwen3 could, but its thinking is off unless a call asks): the first answer token is the first token
        for model in ("tiny-qwen3", "tiny-deepseek", "tiny-llama"):
            numbers = r"\s+([\d.]+)" * 4 + r"\s+\d+/\d+" + r"\s+([\d.]+)" * 3
            row = re.search(rf"^{model}\s+(CN|US)\s+(\d+)/(\d+){numbers}$", text, re.M)
            assert row, f"no comparison row for {model}:\n{text}"
            assert row.group(2) == row.group(3) == str(len(compare.BUILTIN)), text
            assert row.group(4) == row.group(5), f"{model}: TTFT and TTFAT differ: {row.group(0)}"
        report = re.search(r"Report: (\S+report\.html)", text)
        assert report, text
        html = Path(report.group(1)).read_text(encoding="utf-8")
        assert html.count("<svg") >= 4 and "no data" not in html.lower() and "tiny-deepseek" in html
        targets = httpx.get(f"http://127.0.0.1:{prom_port}/api/v1/targets").json()["data"]["activeTargets"]
        assert sorted(t["labels"]["job"] for t in targets) == ["gateway", "vllm", "vllm", "vllm"]
        assert all(t["health"] == "up" for t in targets), targets
        assert "(4/4 up)" in text
        groups = httpx.get(f"http://127.0.0.1:{prom_port}/api/v1/rules").json()["data"]["groups"]
        assert sum(len(g["rules"]) for g in groups) > 20  # the project's recording and alerting rules
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
        reply = client.chat.completions.create(
            model="deepseek", messages=[{"role": "user", "content": "hi"}], max_tokens=5
        )
        assert reply.model == "tiny-deepseek" and reply.choices[0].message.content
        children = descendants(proc.pid)
        assert len(children) >= 5  # three vLLM servers (and their engine processes), the gateway, Prometheus
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        assert proc.returncode == 0 and "All processes stopped." in out.rest()
        assert not [pid for pid in children if alive(pid)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()
