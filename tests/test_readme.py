"""The README's tables follow the code: its command table names every ``gateway`` subcommand and only options that
exist, and its metrics table names every metric family the gateway registers and no other ``gateway_*`` name."""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from gateway.cli import build_parser
from gateway.config import parse_settings
from gateway.metrics import Metrics
from tests.conftest import card
from tests.servers import REPO

README = REPO / "README.md"


def section(text: str, title: str) -> str:
    """The text of the README section ``## title``, up to the next ``## `` heading."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text, re.S | re.M)
    assert match is not None, f"README.md has no '## {title}' section"
    return match.group(1)


def first_cells(markdown: str) -> list[str]:
    """The first cell of every row of the tables in ``markdown`` (header and separator rows left out)."""
    cells = []
    for line in markdown.splitlines():
        if line.startswith("| ") and not line.startswith("| ---"):
            cell = re.split(r"(?<!\\)\|", line)[1].strip()
            if cell not in ("command", "metric"):
                cells.append(cell.replace("\\|", "|"))
    return cells


def named_options(command: str) -> set[str]:
    """The options a command line names: ``--x``, and both ``--x`` and ``--no-x`` for ``--[no-]x``."""
    out: set[str] = set()
    for negatable, name in re.findall(r"--(\[no-\])?([a-z][a-z0-9-]*)", command):
        out.add(f"--{name}")
        if negatable:
            out.add(f"--no-{name}")
    return out


def subcommands() -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(actions) == 1
    return dict(actions[0].choices)


def command_problems(readme: str) -> list[str]:
    """What the README's command table says that the command line does not do, and what it leaves out."""
    parsers = subcommands()
    problems = []
    listed: set[str] = set()
    for cell in first_cells(section(readme, "Commands")):
        command = cell.strip("`")
        if command.startswith("gateway "):
            name = command.split()[1]
            if name not in parsers:
                problems.append(f"the table has `gateway {name}`, which build_parser() does not define")
                continue
            listed.add(name)
            unknown = sorted(named_options(command) - set(parsers[name]._option_string_actions))
            if unknown:
                problems.append(f"the `gateway {name}` row names option(s) it does not have: {', '.join(unknown)}")
        elif (module := re.search(r"-m (gateway(?:\.\w+)+)", command)) is not None:
            spec = importlib.util.find_spec(module.group(1))
            if spec is None or spec.origin is None:
                problems.append(f"the table runs `python -m {module.group(1)}`, which does not exist")
                continue
            source = Path(spec.origin).read_text(encoding="utf-8")
            unknown = sorted(o for o in named_options(command) if f'"{o}"' not in source)
            if unknown:
                problems.append(f"the `{module.group(1)}` row names option(s) it does not have: {', '.join(unknown)}")
    missing = sorted(set(parsers) - listed)
    if missing:
        problems.append(f"subcommand(s) missing from the table: {', '.join(f'gateway {m}' for m in missing)}")
    return problems


def registered_metrics() -> set[str]:
    """Every family ``Metrics`` registers, by its exposed name (counters with ``_total``)."""
    registry = CollectorRegistry()
    Metrics(registry)
    return {f"{m.name}_total" if m.type == "counter" else m.name for m in registry.collect()}


def metric_problems(readme: str) -> list[str]:
    in_table = {
        name for cell in first_cells(section(readme, "Metrics")) for name in re.findall(r"`(gateway_\w+)`", cell)
    }
    registered = registered_metrics()
    problems = []
    if missing := sorted(registered - in_table):
        problems.append(f"metric(s) gateway.metrics.Metrics registers but the table lacks: {', '.join(missing)}")
    if unknown := sorted(in_table - registered):
        problems.append(f"metric(s) in the table that gateway.metrics.Metrics does not register: {', '.join(unknown)}")
    return problems


def test_the_command_table_follows_the_command_line() -> None:
    problems = command_problems(README.read_text(encoding="utf-8"))
    assert not problems, "README.md, '## Commands':\n" + "\n".join(problems)


def test_the_metrics_table_follows_the_registry() -> None:
    problems = metric_problems(README.read_text(encoding="utf-8"))
    assert not problems, "README.md, '## Metrics':\n" + "\n".join(problems)


def test_the_checks_see_a_drifted_readme() -> None:
    readme = README.read_text(encoding="utf-8")
    keygen_row = next((line for line in readme.splitlines() if line.startswith("| `gateway keygen")), None)
    assert keygen_row is not None, "README.md's command table has no `gateway keygen` row to drift from"
    drifted = readme.replace(keygen_row + "\n", "").replace("[--workers N]", "[--workers N] [--threads T]")
    assert command_problems(drifted) == [
        "the `gateway serve` row names option(s) it does not have: --threads",
        "subcommand(s) missing from the table: gateway keygen",
    ]
    drifted = readme.replace("| `gateway_queue_waiting` |", "| `gateway_queue_depth` |")
    assert metric_problems(drifted) == [
        "metric(s) gateway.metrics.Metrics registers but the table lacks: gateway_queue_waiting",
        "metric(s) in the table that gateway.metrics.Metrics does not register: gateway_queue_depth",
    ]


def series_per_model(mirrored: bool) -> int:
    """The series one model served by one backend adds to /metrics (the ``*_created`` series are off)."""

    def count(n: int) -> int:
        settings = parse_settings(
            {
                "models": [card(f"m{i}", "qwen3", "Alibaba", "CN", aliases=[]) for i in range(n)],
                "backends": [{"name": f"b{i}", "base_url": "http://x", "models": [f"m{i}"]} for i in range(n)],
            },
            "test",
        )
        metrics = Metrics(CollectorRegistry())
        metrics.describe(settings)
        for i in range(n if mirrored else 0):
            metrics.mirror_ttft.labels(f"m{i}", f"b{i}")
        text = generate_latest(metrics.registry).decode()
        return sum(1 for line in text.splitlines() if line and not line.startswith("#") and "_created{" not in line)

    return count(2) - count(1)


def test_the_series_count_per_model_is_the_registrys() -> None:
    metrics = section(README.read_text(encoding="utf-8"), "Metrics")
    match = re.search(r"about (\d+) series per model and backend\*\* \((\d+) with mirroring\)", metrics)
    assert match is not None, "README.md's metrics section states no series count"
    plain, mirrored = series_per_model(False), series_per_model(True)
    assert abs(int(match.group(1)) - plain) <= 10 and abs(int(match.group(2)) - mirrored) <= 10, (plain, mirrored)
