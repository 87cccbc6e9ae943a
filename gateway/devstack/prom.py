"""A local Prometheus for the one-command stack: find (or install) the binary and write its scrape config.

Prometheus comes from the OS package (Debian: ``apt-get install prometheus``). When it is missing and cannot be
installed (not root, no apt), the caller is told why and the stack runs without it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml


@dataclass(frozen=True, slots=True)
class Target:
    job: str  # "gateway" or "vllm"
    address: str  # host:port
    labels: dict[str, str]


def find_prometheus() -> str | None:
    return shutil.which("prometheus") or ("/usr/bin/prometheus" if os.access("/usr/bin/prometheus", os.X_OK) else None)


def ensure_prometheus(log: Path) -> tuple[str | None, str]:
    """The prometheus binary, installing the OS package when possible; else (None, why not)."""
    found = find_prometheus()
    if found:
        return found, "found"
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None, "prometheus is not installed; install it (Debian/Ubuntu: sudo apt-get install prometheus)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with log.open("ab") as out:
        for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "prometheus"]):
            if subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env, check=False).returncode != 0:
                return None, f"`{' '.join(argv)}` failed; see {log}"
    found = find_prometheus()
    return (found, "installed") if found else (None, f"prometheus still missing after apt-get; see {log}")


def scrape_config(targets: list[Target], interval_s: float = 5.0, rule_files: list[str] | None = None) -> str:
    jobs: dict[str, list[Target]] = {}
    for target in targets:
        jobs.setdefault(target.job, []).append(target)
    config = {
        "global": {"scrape_interval": f"{interval_s:g}s", "evaluation_interval": f"{interval_s:g}s"},
        "rule_files": rule_files or [],
        "scrape_configs": [
            {
                "job_name": job,
                "static_configs": [{"targets": [t.address], "labels": t.labels} for t in members],
            }
            for job, members in jobs.items()
        ],
    }
    return yaml.safe_dump(config, sort_keys=False)


def prometheus_argv(binary: str, config: Path, data: Path, port: int) -> list[str]:
    return [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={data}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--storage.tsdb.retention.time=2d",
        "--web.enable-lifecycle",
    ]


def wait_scraped(base_url: str, expected: int, timeout: float) -> int:
    """Wait until Prometheus has discovered and scraped ``expected`` targets once; returns how many are up."""
    deadline = time.monotonic() + timeout
    up = 0
    while time.monotonic() < deadline:
        try:
            targets = httpx.get(f"{base_url}/api/v1/targets", timeout=2).json()["data"]["activeTargets"]
        except (httpx.HTTPError, ValueError, KeyError):
            targets = []
        up = sum(1 for t in targets if t.get("health") == "up")
        if len(targets) >= expected and all(t.get("health") != "unknown" for t in targets):
            return up
        time.sleep(0.25)
    return up
