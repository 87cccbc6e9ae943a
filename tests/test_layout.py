"""The package's shape (issue #17): no module over 500 lines, no import cycle among the gateway's modules, the
runtime not importing the local stack or the tools, and the model builder importable without the gateway's
dependencies (it runs in vLLM's environment)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.servers import REPO

PACKAGE = REPO / "gateway"


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports_at_load(path: Path, known: set[str]) -> set[str]:
    """The gateway modules ``path`` imports when it is loaded: top-level statements, not function bodies nor
    ``if TYPE_CHECKING`` blocks."""
    found: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n in known}
    return found


def test_no_module_is_over_500_lines() -> None:
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > 500}
    assert not long, long


def test_no_import_cycle() -> None:
    mods = modules()
    graph = {name: imports_at_load(path, set(mods)) - {name} for name, path in mods.items()}
    # a package's __init__ is loaded with each of its modules
    for name in mods:
        parent = name.rpartition(".")[0]
        if parent in mods and parent != "gateway":
            graph[name].add(parent)
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


def test_the_runtime_does_not_import_the_local_stack_or_the_tools() -> None:
    mods = modules()
    runtime = [n for n in mods if not n.startswith(("gateway.devstack", "gateway.tools", "gateway.cli"))]
    for name in runtime:
        bad = {m for m in imports_at_load(mods[name], set(mods)) if m.startswith(("gateway.devstack", "gateway.tools"))}
        assert not bad, (name, bad)


def test_the_model_builder_imports_without_the_gateways_dependencies() -> None:
    """``python -m gateway.tools.modelbuild`` runs in vLLM's environment, which has none of the gateway's
    dependencies: importing its packages must not pull them in (checked with an interpreter that has no site
    packages at all)."""
    code = "import gateway, gateway.tools; print('ok')"
    done = subprocess.run([sys.executable, "-S", "-c", code], cwd=REPO, capture_output=True, text=True, check=False)
    assert done.stdout.strip() == "ok", done.stderr
