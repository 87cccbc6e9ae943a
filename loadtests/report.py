"""Sweep reports: report.json (everything), report.md and a self-contained report.html with inline SVG."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    by_origin = sorted(result["models"].items(), key=lambda kv: (kv[1]["origin"], kv[0]))
    for model, m in by_origin:
        last = m["steps"][-1] if m["steps"] else {}
        rows.append([
            model, m["origin"], _f(m["max_sustainable_rps"], 1), _f(m["output_tps_at_max"], 1),
            _f(m["usd_per_1m_output"]), str(len(m["steps"])),
            "saturated" if last.get("saturated") else "SLO breach" if last.get("slo_breach") else "not reached",
        ])  # fmt: skip
    return rows


HEADER = ["model", "origin", "max sustainable req/s", "out tok/s there", "$/1M out (GPU)", "steps", "sweep ended"]


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Rate sweep against {result['host']}",
        "",
        f"{result['arrival']} arrivals, {result['duration_s']:g} s per step, rates {result['rates']}; SLOs: "
        f"TTFT {result['slo']['ttft_s'] or '-'} s, TPOT {result['slo']['tpot_s'] or '-'} s.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(result)]
    lines += ["", "## Steps", "", "| model | rate | intended | achieved | TTFT p50/p95 ms | TPOT p50 ms | goodput | "
              "out tok/s | state |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    warnings = []
    for model, m in result["models"].items():
        for s in m["steps"]:
            state = "SATURATED" if s["saturated"] else "SLO breach" if s["slo_breach"] else "ok"
            lines.append(
                f"| {model} | {s['rate']:g} | {s['intended_rps']:.2f} | {s['achieved_rps']:.2f} | "
                f"{s['ttft_p50_s'] * 1000:.0f}/{s['ttft_p95_s'] * 1000:.0f} | {s['tpot_p50_s'] * 1000:.1f} | "
                f"{s['goodput_rps']:.2f} | {s['output_tps']:.1f} | {state} |"
            )
            if s["warning"]:
                warnings.append(f"- {model} @ {s['rate']:g} req/s: {s['warning']}")
    if warnings:
        lines += ["", "## Warnings", "", *warnings]
    lines += [
        "",
        "$/1M out (GPU) = card GPU $/hour / (output tok/s at the max sustainable rate x 3600) x 1e6.",
    ]
    return "\n".join(lines) + "\n"


def _svg(result: dict[str, Any], key: str, ylabel: str, xkey: str = "achieved_rps") -> str:
    w, h, pad = 560, 300, 50
    series = [(model, [(s[xkey], s[key]) for s in m["steps"]]) for model, m in result["models"].items()]
    xs = [x for _, pts in series for x, _ in pts] or [1.0]
    ys = [y for _, pts in series for _, y in pts] or [1.0]
    xmax, ymax = max(xs) * 1.1 or 1.0, max(ys) * 1.1 or 1.0

    def px(x: float, y: float) -> str:
        return f"{pad + x / xmax * (w - 2 * pad):.1f},{h - pad - y / ymax * (h - 2 * pad):.1f}"

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img">',
        f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#333"/>',
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="#333"/>',
        f'<text x="{w / 2}" y="{h - 12}" text-anchor="middle" font-size="12">achieved req/s (0 to {xmax:.1f})</text>',
        f'<text x="12" y="{pad - 10}" font-size="12">{html.escape(ylabel)} (max {ymax:.3g})</text>',
    ]
    for i, (model, pts) in enumerate(series):
        colour = _COLOURS[i % len(_COLOURS)]
        if pts:
            parts.append(
                f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{" ".join(px(*p) for p in pts)}"/>'
            )
            parts += [
                f'<circle cx="{px(*p).split(",")[0]}" cy="{px(*p).split(",")[1]}" r="3" fill="{colour}"/>' for p in pts
            ]
        parts.append(
            f'<text x="{w - pad - 150}" y="{pad + 14 * i}" font-size="12" fill="{colour}">{html.escape(model)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def html_report(result: dict[str, Any]) -> str:
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in table_rows(result))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in HEADER)
    warnings = [
        f"<li>{html.escape(m)} @ {s['rate']:g} req/s: {html.escape(s['warning'])}</li>"
        for m, d in result["models"].items() for s in d["steps"] if s["warning"]
    ]  # fmt: skip
    for m in result["models"].values():
        for s in m["steps"]:
            s["ttft_p50_ms"], s["ttft_p95_ms"] = s["ttft_p50_s"] * 1000, s["ttft_p95_s"] * 1000
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Rate sweep</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
        "padding:4px 8px}</style></head><body>"
        f"<h1>Rate sweep against {html.escape(result['host'])}</h1>"
        f"<p>{html.escape(result['arrival'])} arrivals, {result['duration_s']:g} s per step. Grouped by origin "
        "(CN, US). $/1M out (GPU) = GPU $/hour / (output tok/s at the max sustainable rate x 3600) x 1e6.</p>"
        f"<table><tr>{head}</tr>{rows}</table>"
        "<h2>TTFT p50 vs achieved throughput</h2>" + _svg(result, "ttft_p50_ms", "TTFT p50 ms") +
        "<h2>TTFT p95 vs achieved throughput</h2>" + _svg(result, "ttft_p95_ms", "TTFT p95 ms") +
        "<h2>Goodput at the SLOs vs achieved throughput</h2>" + _svg(result, "goodput_rps", "goodput req/s") +
        ("<h2>Warnings</h2><ul>" + "".join(warnings) + "</ul>" if warnings else "") +
        "</body></html>\n"
    )  # fmt: skip


def write(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    (out / "report.md").write_text(markdown(result), encoding="utf-8")
    (out / "report.html").write_text(html_report(result), encoding="utf-8")
