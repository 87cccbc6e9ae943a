"""Real servers on free loopback ports for tests: uvicorn in a thread, or a CLI command in a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from gateway.devstack.supervisor import free_port

REPO = Path(__file__).resolve().parent.parent


class ThreadServer:
    """An ASGI app served by uvicorn on 127.0.0.1:<free port> in a background thread."""

    def __init__(self, app: Any, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on port {self.port} did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@contextlib.contextmanager
def emulators(configs: dict[str, Any]) -> Iterator[dict[str, str]]:
    """An in-process emulator for each ``EmulatorConfig``, each on a free port: {name: url}; all stopped on exit."""
    from gateway.devstack.emulator import create_emulator_app

    with contextlib.ExitStack() as stack:
        yield {name: stack.enter_context(ThreadServer(create_emulator_app(cfg))).url for name, cfg in configs.items()}


def wait_http(url: str, timeout: float = 30.0, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} while waiting for {url}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        time.sleep(0.05)
    raise TimeoutError(url)


@contextlib.contextmanager
def cli(*args: str, ready: str | None = None, timeout: float = 30.0) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``python -m gateway ARGS`` in its own process group; wait until ``ready`` answers 200; kill on exit."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        if ready:
            wait_http(ready, timeout, proc)
        yield proc
    finally:
        stop_group(proc)
        if proc.stdout:
            proc.stdout.close()


@contextlib.contextmanager
def serve_config(config: dict[str, Any], path: Path, *args: str, timeout: float = 60.0) -> Iterator[str]:
    """``gateway serve`` of ``config`` (written to ``path`` as JSON, which the YAML loader reads) in a process of
    its own, on a free port, with extra ``args`` (``--workers 2``); yields its URL once /ready answers."""
    path.write_text(json.dumps(config))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with cli("serve", "--config", str(path), "--port", str(port), *args, ready=f"{url}/ready", timeout=timeout):
        yield url


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process's group (it was started in a session of its own), SIGKILL after 10 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def samples(text: str, name: str, **labels: str) -> list[float]:
    """The values of the samples of ``name`` whose labels include ``labels``, from a Prometheus exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    return [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    ]


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``; KeyError when there is none."""
    found = samples(text, name, **labels)
    if not found:
        raise KeyError(f"no sample {name}{labels}")
    return sum(found)


def histogram_quantile(text: str, name: str, q: float, **labels: str) -> float:
    """Prometheus' histogram_quantile over one histogram's buckets (linear interpolation inside a bucket)."""
    from prometheus_client.parser import text_string_to_metric_families

    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == f"{name}_bucket" and all(s.labels.get(k) == v for k, v in labels.items()):
                le = float(s.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + s.value
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == float("inf"):
                return prev_bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / max(count - prev_count, 1e-12)
        prev_bound, prev_count = bound, count
    return bounds[-1]


@contextlib.contextmanager
def emulator_process(model: str, **options: float | str | bool) -> Iterator[str]:
    """``gateway emulate`` as its own process (``ttft_ms=5`` becomes ``--ttft-ms 5``, ``think_in_content=True``
    the bare switch); yields its URL. For tests that time streams: an emulator in the test's own process shares its
    interpreter lock with the test's threads."""
    port = free_port()
    flags = []
    for key, value in options.items():
        flag = f"--{key.replace('_', '-')}"
        if value is True:
            flags.append(flag)
        elif value is not False:
            flags += [flag, str(value)]
    url = f"http://127.0.0.1:{port}"
    with cli("emulate", "--model", model, "--port", str(port), *flags, ready=f"{url}/health"):
        yield url


def python_process(script: str, *args: str) -> subprocess.Popen[str]:
    """``script`` run by this Python in a process of its own (load that must not share the test's interpreter
    lock); its standard output is captured as text."""
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd=REPO, stdout=subprocess.PIPE, text=True)


def stream_gaps(
    url: str, body: dict[str, Any], gaps: list[float], started: threading.Event | None = None
) -> threading.Thread:
    """A stream of ``body`` through the gateway at ``url``, in a thread (started): appends to ``gaps`` the time
    between each two chunks it reads, and sets ``started`` at the first one."""

    def run() -> None:
        last = None
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
            for _ in response.iter_raw():
                now = time.monotonic()
                if last is not None:
                    gaps.append(now - last)
                last = now
                if started is not None:
                    started.set()

    thread = threading.Thread(target=run)
    thread.start()
    return thread
