"""The benchmark's processes: the emulator, this gateway, nginx, LiteLLM and vllm-router, each started pinned to a
core, in a session of its own, with its output in a log file, checked with a short stream, and stopped with its
process group. A target that cannot be installed, started or answer is :class:`Unavailable`, with the reason."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(os.environ.get("BENCH_DIR") or REPO / ".bench")  # the peers' virtualenvs, runs (git-ignored)
INSTALLER = REPO / "loadtests" / "install-peers.sh"
MODEL = "m"
API_KEY = "sk-bench"  # LiteLLM's master key; the other targets ignore the header
TOKEN = re.compile(r'"(?:content|text)":\s*"(?!")')
NOBODY = 65534


class Unavailable(Exception):
    """A target that cannot be measured; the message says why and lands in its row."""


class NotInstalled(Unavailable):
    """A peer that is not installed and could not be: not tried again for the next backend."""


# -- processes -----------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def children_of(pid: int) -> list[int]:
    """pid and all its live descendants (nginx's worker, any helper a peer forks)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(parents.get(p, []))
    return tree


class Process:
    """A child in its own session, pinned with taskset, its output in a log file; stopped with its group."""

    def __init__(self, name: str, cmd: list[str], log: Path, *, env: dict[str, str] | None = None, cwd: Path = REPO):
        self.name, self.cmd, self.log_path = name, cmd, log
        self.log: IO[bytes] = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 6) -> str:
        self.log.flush()
        text = self.log_path.read_text(errors="replace").strip().splitlines()
        return " | ".join(line.strip()[:200] for line in text[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def pinned(core: int | None) -> list[str]:
    return ["taskset", "-c", str(core)] if core is not None else []


def smoke(url: str, timeout: float = 5.0) -> None:
    """One short stream through the target: a 200 with token chunks and data: [DONE], or an exception."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}
    r = httpx.post(
        f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=timeout
    )
    if r.status_code != 200:
        raise Unavailable(f"smoke request: HTTP {r.status_code}: {r.text[:200]}")
    if "data: [DONE]" not in r.text or not TOKEN.search(r.text):
        raise Unavailable(f"smoke request: no token chunks or no [DONE] in {r.text[:200]!r}")


def started(proc: Process, port: int, timeout: float) -> Running:
    """The proxy once it answers on ``port`` (stopped, and Unavailable raised, if it does not)."""
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url, timeout)
    except Unavailable:
        proc.stop()
        raise
    return Running(proc.name, url, proc)


def wait_ready(proc: Process, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not proc.alive():
            raise Unavailable(f"{proc.name} exited with {proc.proc.returncode}: {proc.tail()}")
        try:
            smoke(url)
            return
        except (httpx.HTTPError, Unavailable) as exc:
            last = str(exc) or type(exc).__name__
        time.sleep(0.25)
    raise Unavailable(f"{proc.name} not ready after {timeout:g} s ({last}); log: {proc.tail(3)}")


# -- targets -------------------------------------------------------------------------------------------------
@dataclass(slots=True)
class Running:
    name: str
    url: str
    process: Process | None  # None: direct (nothing between client and backend)

    def pids(self) -> list[int]:
        return children_of(self.process.pid) if self.process else []


@dataclass(slots=True)
class Env:
    run_dir: Path
    backend_url: str
    proxy_core: int | None
    install: bool


def _venv(peer: str) -> Path:
    return BENCH_DIR / f"venv-{peer}"


def nginx_binary() -> str | None:
    return shutil.which("nginx") or (str(Path("/usr/sbin/nginx")) if Path("/usr/sbin/nginx").exists() else None)


def peer_installed(peer: str) -> bool:
    if peer == "nginx":
        return nginx_binary() is not None
    exe = {"litellm": "litellm", "vllm-router": "vllm-router"}[peer]
    return (_venv(peer) / "bin" / exe).exists()


def ensure_peer(peer: str, env: Env) -> None:
    if peer_installed(peer):
        return
    if not env.install:
        raise NotInstalled(f"not installed (run loadtests/install-peers.sh {peer})")
    log = env.run_dir / f"install-{peer}.log"
    with open(log, "wb") as out:
        rc = subprocess.run(["bash", str(INSTALLER), peer], stdout=out, stderr=subprocess.STDOUT, check=False)
    if rc.returncode != 0 or not peer_installed(peer):
        lines = log.read_text(errors="replace").strip().splitlines()
        raise NotInstalled(f"install failed: {lines[-1][:200] if lines else 'no output'} (log {log})")


def start_gateway(env: Env, log_dir: Path) -> Running:
    port = free_port()
    config = log_dir / "gateway.yaml"
    # Production-like: no per-request logging, nothing written to the results store by proxied calls.
    config.write_text(
        "gateway:\n  host: 127.0.0.1\n  log_level: warning\n  results_db: ':memory:'\n"
        f"models:\n  - id: {MODEL}\n"
        f"backends:\n  - name: emu\n    base_url: {env.backend_url}\n    models: [{MODEL}]\n"
        "    max_connections: 4096\n"
    )
    cmd = [*pinned(env.proxy_core), sys.executable, "-m", "gateway", "serve", "--config", str(config)]
    proc = Process("gateway", [*cmd, "--port", str(port)], log_dir / "gateway.log")
    return started(proc, port, 60)


def nginx_conf(prefix: Path, port: int, backend: str, nofile: int) -> str:
    upstream = backend.removeprefix("http://")
    temp = "\n".join(
        f"    {kind}_temp_path {prefix / 'tmp' / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""worker_processes 1;
worker_rlimit_nofile {nofile};
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} warn;
events {{
    worker_connections {min(nofile, 16384)};
}}
http {{
    access_log off;
{temp}
    upstream backend {{
        server {upstream};
        keepalive 1024;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""


def start_nginx(env: Env, log_dir: Path) -> Running:
    ensure_peer("nginx", env)
    binary = nginx_binary()
    assert binary is not None
    prefix = Path(tempfile.mkdtemp(prefix="nginx-", dir=log_dir))
    (prefix / "tmp").mkdir()
    port = free_port()
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_conf(prefix, port, env.backend_url, nofile))
    drop: list[str] = []
    if os.geteuid() == 0:  # run it unprivileged: the prefix belongs to nobody
        for path in (prefix, prefix / "tmp", conf):
            os.chown(path, NOBODY, NOBODY)
        drop = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    cmd = [*pinned(env.proxy_core), *drop, binary, "-c", str(conf), "-p", str(prefix)]
    cmd += ["-e", str(prefix / "error.log"), "-g", "daemon off;"]
    proc = Process("nginx", cmd, log_dir / "nginx.log")
    return started(proc, port, 30)


def start_litellm(env: Env, log_dir: Path) -> Running:
    ensure_peer("litellm", env)
    port = free_port()
    config = log_dir / "litellm.yaml"
    # LiteLLM's production best practices that apply to one worker without a database: a master key, no
    # verbose/debug logging, JSON logs, a request timeout, one uvicorn worker per core (one core here),
    # LITELLM_LOG=ERROR and LITELLM_MODE=PRODUCTION; the default simple-shuffle routing. The local model cost
    # map: this machine cannot fetch the remote one (it would retry at startup).
    config.write_text(
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        f"    litellm_params:\n      model: openai/{MODEL}\n      api_base: {env.backend_url}/v1\n"
        "      api_key: none\n"
        f"general_settings:\n  master_key: {API_KEY}\n"
        "litellm_settings:\n  request_timeout: 600\n  set_verbose: false\n  json_logs: true\n"
    )
    process_env = {
        **os.environ,
        "LITELLM_LOG": "ERROR",
        "LITELLM_MODE": "PRODUCTION",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "NO_DOCKER_TELEMETRY": "True",
    }
    exe = _venv("litellm") / "bin" / "litellm"
    cmd = [*pinned(env.proxy_core), str(exe), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    proc = Process("litellm", [*cmd, "--num_workers", "1"], log_dir / "litellm.log", env=process_env, cwd=log_dir)
    return started(proc, port, 120)


def start_vllm_router(env: Env, log_dir: Path) -> Running:
    ensure_peer("vllm-router", env)
    port = free_port()
    exe = _venv("vllm-router") / "bin" / "vllm-router"
    cmd = [*pinned(env.proxy_core), str(exe), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--worker-urls", env.backend_url, "--policy", "round_robin"]
    cmd += ["--prometheus-port", str(free_port()), "--log-level", "warning"]
    proc = Process("vllm-router", cmd, log_dir / "vllm-router.log")
    return started(proc, port, 60)


STARTERS: dict[str, Callable[[Env, Path], Running]] = {
    "gateway": start_gateway,
    "nginx": start_nginx,
    "litellm": start_litellm,
    "vllm-router": start_vllm_router,
}


def _run_text(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (r.stdout + r.stderr).strip()


def gateway_source() -> str:
    """A digest of the gateway's source as it is on disk now: the working tree may change between two starts."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "gateway").rglob("*.py")):
        digest.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def versions(targets: Sequence[str]) -> dict[str, str]:
    commit = _run_text(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]) or "unknown"
    dirty = _run_text(["git", "-C", str(REPO), "status", "--porcelain", "--", "gateway"])
    out = {"gateway": f"{commit}{' + uncommitted changes' if dirty else ''}", "python": platform.python_version()}
    out["emulator"] = f"gateway emulate ({commit})"
    if "nginx" in targets and (binary := nginx_binary()):
        out["nginx"] = _run_text([binary, "-v"]).removeprefix("nginx version: ").removeprefix("nginx/")
    for peer, dist in (("litellm", "litellm"), ("vllm-router", "vllm-router")):
        python = _venv(peer) / "bin" / "python"
        if peer in targets and python.exists():
            out[peer] = _run_text([str(python), "-c", f"import importlib.metadata as m; print(m.version('{dist}'))"])
    return out


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1])
    return {
        "cpu_model": model,
        "cores": os.cpu_count() or 1,
        "memory_gib": round(mem / 1024 / 1024, 1),
        "kernel": platform.release(),
        "load_average_at_start": list(os.getloadavg()),
    }


@contextlib.contextmanager
def backend(itl_ms: float, tokens: int, core: int | None, log_dir: Path) -> Iterator[tuple[str, Process]]:
    """The vLLM emulator as the benchmark's backend: TTFT 0, the given ITL and tokens, an unlimited batch."""
    port = free_port()
    cmd = [*pinned(core), sys.executable, "-m", "gateway", "emulate", "--model", MODEL, "--port", str(port)]
    cmd += ["--ttft-ms", "0", "--itl-ms", f"{itl_ms:g}", "--output-tokens", str(tokens), "--batch-size", "100000"]
    proc = Process("emulator", cmd, log_dir / "emulator.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url, 30)
        yield url, proc
    finally:
        proc.stop()
