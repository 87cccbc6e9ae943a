"""The fault matrix (docs/fault-matrix.md) names only tests that exist."""

from __future__ import annotations

import ast
import re

from tests.servers import REPO


def test_every_test_named_in_the_fault_matrix_exists() -> None:
    text = (REPO / "docs" / "fault-matrix.md").read_text(encoding="utf-8")
    named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", text)
    assert len(named) > 40
    missing = []
    for path, name in named:
        tree = ast.parse((REPO / path).read_text(encoding="utf-8"))
        functions = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        if name not in functions:
            missing.append(f"{path}::{name}")
    assert not missing, missing
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    headers = {"| Fault ", "| Input ", "| Behaviour ", "| Situation ", "| Concern ", "| Run "}
    for row in rows:
        if not any(row.startswith(h) for h in headers):
            assert "`tests/" in row, f"a row without a test: {row[:80]}"


def test_the_bucket_table_is_the_codes() -> None:
    """docs/measurement.md lists every bound of every latency histogram, vLLM's in bold."""
    from gateway import metrics

    text = (REPO / "docs" / "measurement.md").read_text(encoding="utf-8").split("## Histogram buckets")[1]
    text = text.split("\n## ")[0]
    rows = {
        "gateway_time_to_first_token_seconds": (metrics.TTFT_BUCKETS, metrics.VLLM_TTFT_BUCKETS),
        "gateway_inter_token_latency_seconds": (metrics.ITL_BUCKETS, metrics.VLLM_ITL_BUCKETS),
        "gateway_request_duration_seconds": (metrics.E2E_BUCKETS, metrics.VLLM_E2E_BUCKETS),
        "gateway_overhead_seconds": (metrics.OVERHEAD_BUCKETS, ()),
    }
    for family, (bounds, vllm) in rows.items():
        line = next(x for x in text.splitlines() if x.startswith("| ") and f"`{family}`" in x)
        cells = line.split("|")[2].split()
        assert [float(c.strip("*")) for c in cells] == list(bounds), family
        assert {float(c.strip("*")) for c in cells if c.startswith("**")} == set(vllm), family
