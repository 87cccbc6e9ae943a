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
