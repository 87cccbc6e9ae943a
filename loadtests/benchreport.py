"""The benchmark's figures: medians over rounds (added figures paired with direct's round), ratios between targets,
and the Markdown tables. Works on the load generator's phase results as dicts, fresh or read back from bench.json
(where NaN was written as null)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

DASH = "\u2013"  # en dash: no value
TIMES = "\u00d7"
MINUS = "\u2212"


@dataclass(frozen=True, slots=True)
class Point:
    """One measurement point: a load shape run against every target, round after round."""

    name: str
    title: str
    mode: str  # "stream" or "plain"
    concurrency: int
    itl_ms: float
    max_tokens: int
    warmup: float
    duration: float
    stagger: float
    max_warmup: float = 30.0
    timeout: float = 60.0
    prime: bool = False  # open and prime every connection before the load (streams: see benchclient)

    @property
    def nominal_rate(self) -> float:
        """Requests/s a closed loop reaches if every stream takes exactly its nominal time (streams only)."""
        return self.concurrency / ((self.max_tokens - 1) * self.itl_ms / 1000)


# -- aggregation ---------------------------------------------------------------------------------------------
def _median(values: Sequence[float | None]) -> float:
    real = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(real) if real else math.nan


def _get(phase: dict[str, Any], *path: str) -> float:
    value: Any = phase
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return math.nan
        value = value[key]
    return float(value) if isinstance(value, int | float) and value is not None else math.nan


def _per(numerator: float, denominator: float, scale: float = 1e6) -> float:
    return numerator / denominator * scale if denominator > 0 and math.isfinite(numerator) else math.nan


def summarize(point: Point, rounds: dict[str, list[dict[str, Any] | None]]) -> dict[str, dict[str, float]]:
    """Median figures per target over rounds; added figures are paired with direct's result of the same round."""
    direct = rounds.get("direct", [])
    latency = ("ttft_ms", "chunk_delay_ms") if point.mode == "stream" else ("latency_ms",)
    out: dict[str, dict[str, float]] = {}
    for target, phases in rounds.items():
        fig: dict[str, list[float]] = {}

        def put(key: str, value: float, fig: dict[str, list[float]] = fig) -> None:
            fig.setdefault(key, []).append(value)

        for i, phase in enumerate(phases):
            if phase is None:
                continue
            base = direct[i] if i < len(direct) else None
            for metric in (*latency, "itl_ms") if point.mode == "stream" else latency:
                for q in ("p50", "p99"):
                    value = _get(phase, metric, q)
                    put(f"{metric}_{q}", value)
                    if base is not None:
                        put(f"added_{metric}_{q}", value - _get(base, metric, q))
            rate = _get(phase, "rate")
            put("rate", rate)
            if base is not None:
                put("rate_vs_direct", rate / _get(base, "rate") if _get(base, "rate") > 0 else math.nan)
            proxy_cpu = _get(phase, "cpu_s", "proxy")
            put("cpu_us_per_request", _per(proxy_cpu, _get(phase, "completed")))
            put("cpu_us_per_chunk", _per(proxy_cpu, _get(phase, "chunks")))
            put("proxy_busy", _get(phase, "cpu_busy", "proxy"))
            put("idle_peers_busy", _get(phase, "cpu_busy", "peers"))
            load = _get(phase, "cpu_busy", "backend") + _get(phase, "client_cpu_s") / max(_get(phase, "window_s"), 1e-9)
            put("load_core_busy", load)
            put("rss_mb", _get(phase, "rss_max_kb", "proxy") / 1024)
            put("errors", _get(phase, "errors") + _get(phase, "unfinished"))
            put("sent", _get(phase, "sent"))
            put("chunk_rate", _get(phase, "chunk_rate"))
            put("tokens_per_stream", _get(phase, "tokens_per_stream_p50"))
            put("tail_ms_p50", _get(phase, "tail_ms", "p50"))
            put("warmup_s", _get(phase, "warmup_s"))
            put("warmed", _get(phase, "warmed"))
        summary = {key: _median(values) for key, values in fig.items()}
        for key in ("errors", "sent"):
            summary[key] = float(sum(v for v in fig.get(key, []) if math.isfinite(v)))
        summary["rss_mb"] = max((v for v in fig.get("rss_mb", []) if math.isfinite(v)), default=math.nan)
        # Memory over the whole point (same process through every round): first sample -> last sample.
        measured = [p for p in phases if p is not None]
        if measured:
            summary["rss_start_mb"] = _get(measured[0], "rss_first_kb", "proxy") / 1024
            summary["rss_end_mb"] = _get(measured[-1], "rss_last_kb", "proxy") / 1024
        summary["rounds"] = float(sum(1 for p in phases if p is not None))
        out[target] = summary
    return out


def ratios(summary: dict[str, dict[str, float]], cost_key: str) -> dict[str, dict[str, dict[str, float]]]:
    """row / column for throughput (rate) and proxy CPU (cost_key) between every two measured targets."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for a, fa in summary.items():
        for b, fb in summary.items():
            if a == b:
                continue
            rate = fa.get("rate", math.nan) / fb["rate"] if fb.get("rate", 0) > 0 else math.nan
            cost = fa.get(cost_key, math.nan) / fb[cost_key] if fb.get(cost_key, 0) > 0 else math.nan
            table.setdefault(a, {})[b] = {"rate": rate, cost_key: cost}
    return table


def keep_up_note(point: Point, direct: dict[str, float] | None) -> str | None:
    """A sentence when the backend + load generator core could not hold the nominal schedule directly."""
    if point.mode != "stream" or direct is None:
        return None
    rate, nominal = direct.get("rate") or math.nan, point.nominal_rate
    delay = direct.get("chunk_delay_ms_p50") or math.nan
    if rate >= 0.9 * nominal and delay <= point.itl_ms / 2:
        return None
    return (
        f"The backend and the load generator could not keep up on one core at this point: direct reached "
        f"{rate:.0f} streams/s of the nominal {nominal:.0f}, chunks {delay:.1f} ms late at the median "
        f"(core busy {_pct(direct.get('load_core_busy'))}). Figures are what it could do: every target sees the "
        f"same slowed backend, and absolute rates are the backend's limit, not the proxies'. With that core "
        f"saturated, a proxy that relays several chunks per write spares the load generator reads on it, so a "
        f"proxy can come out faster than direct: a negative added latency here is that, not a proxy speeding up."
    )


# -- report --------------------------------------------------------------------------------------------------
def _f(value: float | None, digits: int = 1) -> str:
    if value is None or not math.isfinite(value):
        return DASH
    return f"{value:,.{digits}f}"


def _num(value: Any) -> float:
    """A figure read back from JSON, where NaN was written as null."""
    return float(value) if isinstance(value, int | float) else math.nan


def _pct(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return DASH
    return f"{value * 100:.1f}%" if abs(value) < 0.1 else f"{value * 100:.0f}%"


def _signed(value: float | None, digits: int = 2) -> str:
    if value is None or not math.isfinite(value):
        return DASH
    return f"{value:+.{digits}f}"


def point_table(point: Point, entry: dict[str, Any]) -> list[str]:
    summary: dict[str, dict[str, float]] = entry["summary"]
    unavailable: dict[str, str] = entry["unavailable"]
    lines = [f"### {point.title}", ""]
    if point.mode == "stream":
        head = (
            "| target | added TTFT p50 ms | added TTFT p99 ms | added chunk delay p50 ms | added chunk delay p99 ms "
            f"| end after last token p50 ms | streams/s | {TIMES} direct | CPU µs/chunk | CPU µs/stream | proxy core "
            "| RSS MB | errors |"
        )
    else:
        head = (
            f"| target | added latency p50 ms | added latency p99 ms | req/s | {TIMES} direct | CPU µs/req "
            "| proxy core | RSS MB | errors |"
        )
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for target in entry["targets"]:
        if target in unavailable:
            cols = head.count("|") - 2
            lines.append(f"| {target} | not available: {unavailable[target]} |" + " |" * (cols - 1))
            continue
        s = summary.get(target, {})
        direct = target == "direct"

        def cpu(key: str, s: dict[str, float] = s, direct: bool = direct) -> str:
            return DASH if direct else _f(s.get(key), 1)

        busy = DASH if direct else _pct(s.get("proxy_busy"))
        rss = DASH if direct else _f(s.get("rss_mb"), 0)
        errors = f"{s.get('errors', 0):.0f}/{s.get('sent', 0):.0f}"
        if point.mode == "stream":
            lines.append(
                f"| {target} | {_signed(s.get('added_ttft_ms_p50'))} | {_signed(s.get('added_ttft_ms_p99'))} "
                f"| {_signed(s.get('added_chunk_delay_ms_p50'))} | {_signed(s.get('added_chunk_delay_ms_p99'))} "
                f"| {_f(s.get('tail_ms_p50'), 2)} | {_f(s.get('rate'))} | {_f(s.get('rate_vs_direct'), 2)} "
                f"| {cpu('cpu_us_per_chunk')} | {cpu('cpu_us_per_request')} | {busy} | {rss} | {errors} |"
            )
        else:
            lines.append(
                f"| {target} | {_signed(s.get('added_latency_ms_p50'))} | {_signed(s.get('added_latency_ms_p99'))} "
                f"| {_f(s.get('rate'))} | {_f(s.get('rate_vs_direct'), 2)} | {cpu('cpu_us_per_request')} "
                f"| {busy} | {rss} | {errors} |"
            )
    d = summary.get("direct")
    if d:
        if point.mode == "stream":
            lines += [
                "",
                f"Direct: TTFT p50 {_f(d.get('ttft_ms_p50'), 2)} ms, p99 {_f(d.get('ttft_ms_p99'), 2)} ms; chunk "
                f"delay p50 {_f(d.get('chunk_delay_ms_p50'), 2)} ms, p99 {_f(d.get('chunk_delay_ms_p99'), 2)} ms; "
                f"ITL p50 {_f(d.get('itl_ms_p50'), 2)} ms, p99 {_f(d.get('itl_ms_p99'), 2)} ms; "
                f"{_f(d.get('chunk_rate'), 0)} chunks/s; backend + load generator core busy "
                f"{_pct(d.get('load_core_busy'))}.",
            ]
        else:
            lines += [
                "",
                f"Direct: latency p50 {_f(d.get('latency_ms_p50'), 2)} ms, p99 {_f(d.get('latency_ms_p99'), 2)} ms; "
                f"backend + load generator core busy {_pct(d.get('load_core_busy'))}.",
            ]
    memory = [
        f"{t} {_f(s.get('rss_start_mb'), 1)} → {_f(s.get('rss_end_mb'), 1)} MB"
        for t, s in summary.items()
        if t != "direct" and math.isfinite(_num(s.get("rss_start_mb"))) and math.isfinite(_num(s.get("rss_end_mb")))
    ]
    if memory:
        lines += ["", f"Proxy RSS, first sample of round 1 → last sample of the last round: {'; '.join(memory)}."]
    idle = [s.get("idle_peers_busy") for t, s in summary.items()]
    idle_max = max((v for v in idle if v is not None and math.isfinite(v)), default=math.nan)
    if math.isfinite(idle_max):
        lines += ["", f"The idle targets used at most {_pct(idle_max)} of the proxy core while another was measured."]
    slow = {t: s for t, s in summary.items() if (s.get("warmup_s") or 0) > point.warmup + 1}
    if slow:
        opened = ", ".join(
            f"{t} {_f(s.get('warmup_s'), 0)} s ({_f(s.get('warmed'), 0)}/{point.concurrency:,} connections had "
            "finished a request)"
            for t, s in summary.items()
        )
        lines += ["", f"Window opened after (median): {opened}."]
    if entry.get("note"):
        lines += ["", f"**Note.** {entry['note']}"]
    measured = [t for t in entry["targets"] if t in summary]
    cost_key = "cpu_us_per_chunk" if point.mode == "stream" else "cpu_us_per_request"
    table = entry["ratios"]
    if len(measured) > 1:
        cost_name = "CPU per chunk" if point.mode == "stream" else "CPU per request"
        rate_name = "streams/s" if point.mode == "stream" else "req/s"
        lines += ["", f"Ratios, row ÷ column ({rate_name} · {cost_name}):", ""]
        lines.append("| | " + " | ".join(measured) + " |")
        lines.append("|---|" + "---|" * len(measured))
        for a in measured:
            cells = []
            for b in measured:
                if a == b:
                    cells.append(DASH)
                    continue
                r = table.get(a, {}).get(b, {})
                cost = _num(r.get(cost_key))
                rate = f"{_f(r.get('rate'), 2)}{TIMES}" if math.isfinite(_num(r.get("rate"))) else DASH
                cells.append(f"{rate} · {_f(cost, 2)}{TIMES}" if math.isfinite(cost) else rate)
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return lines


def markdown(report: dict[str, Any]) -> str:
    m, v, s = report["machine"], report["versions"], report["settings"]
    pin = (
        f"backend + load generator on core {s['load_core']}, proxy on core {s['proxy_core']} (taskset)"
        if s["proxy_core"] is not None
        else "no pinning (one core)"
    )
    peers = ", ".join(f"{k} {val}" for k, val in v.items() if k not in ("python", "emulator"))
    lines = [
        "## Proxy overhead benchmark",
        "",
        f"{report['date']} · {m['cpu_model']}, {m['cores']} cores, {m['memory_gib']} GiB · {pin} · "
        f"{s['rounds']} interleaved rounds of {s['duration']:g} s (after {s['warmup']:g} s warm-up), medians · "
        f"load average at start {', '.join(f'{x:.1f}' for x in m['load_average_at_start'])}",
        "",
        f"Backend: vLLM emulator, TTFT 0, {s['tokens']} tokens, unlimited batch. Versions: {peers}; "
        f"Python {v.get('python')}.",
        "",
        f"Added = target {MINUS} direct in the same round (ms). Chunk delay = arrival of token i {MINUS} (sent + i "
        f"{TIMES} ITL). "
        "CPU = the proxy process tree's utime+stime over the window ÷ completed requests or ÷ token chunks "
        "(all its work, request handling included, charged to chunks). End after last token = last token chunk "
        "to the response's end (when the connection is free for the next request). Errors = failed or unfinished "
        "/ sent.",
        "",
    ]
    sources = set((s.get("gateway_source") or {}).values())
    if len(sources) > 1:
        lines += [
            "**The gateway's source changed during the run** (digests by backend: "
            f"{s['gateway_source']}): its rows in different tables measured different code.",
            "",
        ]
    for point_dict in report["points"]:
        point = Point(**point_dict["point"])
        lines += point_table(point, point_dict)
        lines.append("")
    return "\n".join(lines)


def to_json(value: Any) -> Any:
    """The report with NaN and infinities as null: plain JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    return value
