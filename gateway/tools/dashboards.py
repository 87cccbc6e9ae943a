"""The Grafana dashboards, generated: every panel and its PromQL is defined once, in ``PANELS``.

``python -m gateway.tools.dashboards --out deploy/grafana/dashboards`` rewrites the committed JSON files; a test checks
that they are current and evaluates every query against a real Prometheus scraping a real gateway and emulators.

Queries read the recording rules of ``deploy/prometheus/rules/recording.yml`` where one exists (``model:…`` and
``origin:…``) and raw metrics otherwise. Each query names the labels its series carry (``Query.labels``), which is
what the legend shows and what the test asserts. Every query aggregates away ``instance``, so several gateway
replicas add up (counters) or are deduplicated (configuration gauges, with ``max``).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATASOURCE = {"type": "prometheus", "uid": "llm-gateway-prometheus"}  # provisioned with this uid
SCHEMA_VERSION = 39
MODEL_VAR = "$model"
RATE = "$__rate_interval"


@dataclass(frozen=True, slots=True)
class Query:
    expr: str
    legend: str
    labels: tuple[str, ...]  # labels every result series carries


@dataclass(frozen=True, slots=True)
class Panel:
    dashboard: str  # a key of DASHBOARDS
    row: str
    title: str
    queries: tuple[Query, ...]
    unit: str = "short"
    description: str = ""
    kind: str = "timeseries"  # or "stat"


@dataclass(frozen=True, slots=True)
class Dashboard:
    key: str
    uid: str
    title: str
    description: str
    model_values: str  # the $model variable's values


DASHBOARDS = (
    Dashboard(
        "model-comparison", "llm-model-comparison", "Model comparison",
        "Latency, speed, throughput, cost and SLO attainment per model and CN vs US.",
        "label_values(gateway_model_info, model)",
    ),
    Dashboard(
        "gateway", "llm-gateway", "Gateway",
        "Traffic, in-flight requests, backend health, upstream errors and the gateway's own TTFT overhead.",
        "label_values(gateway_model_info, model)",
    ),
    Dashboard(
        "vllm-engines", "llm-vllm-engines", "vLLM engines",
        "vLLM's own metrics, scraped from every backend: queues, KV cache, preemptions, prefix cache, latency.",
        "label_values(vllm:num_requests_running, model_name)",
    ),
)  # fmt: skip

QUANTILES = (("p50", "0.5"), ("p95", "0.95"), ("p99", "0.99"))
M = '{model=~"$model"}'  # gateway series of the selected models
V = '{model_name=~"$model"}'  # vLLM series of the selected models


def _recorded(level: str, metric: str, legend: str = "") -> Query:
    selector = M if level == "model" else ""
    return Query(f"{level}:{metric}{selector}", legend or "{{" + level + "}}", (level,))


def _percentiles(level: str, metric: str) -> tuple[Query, ...]:
    return tuple(_recorded(level, f"{metric}:{p}_5m", "{{" + level + "}} " + p) for p, _ in QUANTILES)


def _vllm_percentiles(metric: str) -> tuple[Query, ...]:
    return tuple(
        Query(
            f"histogram_quantile({q}, sum by (le, backend) (rate({metric}_bucket{V}[{RATE}])))",
            "{{backend}} " + p,
            ("backend",),
        )
        for p, q in QUANTILES
    )


def _comparison(level: str, row: str) -> list[Panel]:
    """The same panels per model and per origin: only the recording rules' level differs."""
    d = "model-comparison"
    return [
        Panel(d, row, "TTFT p50 / p95 / p99", _percentiles(level, "gateway_time_to_first_token_seconds"), "s",
              "Time to the first content-bearing chunk, measured at the gateway (streaming requests)."),
        Panel(d, row, "TTFT vs time to first answer token (p50)",
              (_recorded(level, "gateway_time_to_first_token_seconds:p50_5m", "{{" + level + "}} first token"),
               _recorded(level, "gateway_time_to_first_answer_token_seconds:p50_5m",
                         "{{" + level + "}} first answer token")), "s",
              "A thinking model's first token is reasoning; its user waits for the first answer token. The two "
              "lines are one for a model that does not think."),
        Panel(d, row, "Reasoning share of output tokens", (_recorded(level, "gateway_reasoning_tokens:share_rate5m"),),
              "percentunit", "Reasoning tokens / completion tokens (usage's reasoning_tokens, else the reasoning "
              "chunks)."),
        Panel(d, row, "Mean thinking time per streamed call",
              (_recorded(level, "gateway_reasoning_duration_seconds:mean_per_request_5m"),), "s",
              "First reasoning chunk to first answer chunk, averaged over every streamed call (0 without thinking)."),
        Panel(d, row, "Empty-answer rate", (_recorded(level, "gateway_empty_answers:ratio_rate5m"),), "percentunit",
              "Successful calls that ended with no answer: the thinking used the whole max_tokens."),
        Panel(d, row, "TPOT p50 / p95 / p99", _percentiles(level, "gateway_time_per_output_token_seconds"), "s",
              "(E2E - TTFT) / (completion tokens - 1)."),
        Panel(d, row, "E2E latency p50 / p95 / p99", _percentiles(level, "gateway_request_duration_seconds"), "s"),
        Panel(d, row, "Output speed (median, tokens/s per request)",
              (Query(f"1 / {level}:gateway_time_per_output_token_seconds:p50_5m{M if level == 'model' else ''}",
                     "{{" + level + "}}", (level,)),),
              "short", "1 / median TPOT: the speed one user sees (Artificial Analysis' output speed)."),
        Panel(d, row, "Output tokens/s (throughput)", (_recorded(level, "gateway_completion_tokens:rate5m"),), "short"),
        Panel(d, row, "$ per 1M output tokens",
              (_recorded(level, "gateway_gpu_cost_usd_per_million_output_tokens:rate5m",
                         "{{" + level + "}} GPU time"),
               _recorded(level, "gateway_list_price_cost_usd_per_million_output_tokens:rate5m",
                         "{{" + level + "}} list price")),
              "currencyUSD",
              "GPU time: hourly cost of the backends serving the model / (output tokens/s x 3600) x 1e6, at the "
              "rate actually served (an idle GPU makes tokens expensive). List price: usage x the card's prices."),
        Panel(d, row, "Requests/s", (_recorded(level, "gateway_requests:rate5m"),), "reqps"),
        Panel(d, row, "Error ratio (status not 2xx)", (_recorded(level, "gateway_requests_errors:ratio_rate5m"),),
              "percentunit"),
        Panel(d, row, "SLO attainment (TTFT <= 0.5 s, TPOT <= 0.05 s)",
              (_recorded(level, "gateway_ttft_slo_attainment:ratio_rate5m", "{{" + level + "}} TTFT"),
               _recorded(level, "gateway_tpot_slo_attainment:ratio_rate5m", "{{" + level + "}} TPOT"),
               _recorded(level, "gateway_slo_attainment:min_ratio_rate5m", "{{" + level + "}} both (upper bound)")),
              "percentunit",
              "Fraction of requests under each threshold. Both at once cannot be derived from two histograms: "
              "the smaller fraction is an upper bound."),
    ]  # fmt: skip


def _gateway() -> list[Panel]:
    d = "gateway"
    gw_ttft = (
        f"sum by (model) (rate(gateway_time_to_first_token_seconds_sum{M}[{RATE}]))"
        f" / sum by (model) (rate(gateway_time_to_first_token_seconds_count{M}[{RATE}]))"
    )
    vllm_ttft = (
        f"label_replace(sum by (model_name) (rate(vllm:time_to_first_token_seconds_sum{V}[{RATE}]))"
        f" / sum by (model_name) (rate(vllm:time_to_first_token_seconds_count{V}[{RATE}])),"
        ' "model", "$1", "model_name", "(.*)")'
    )
    return [
        Panel(d, "Traffic", "Requests/s by model and status",
              (Query(f"sum by (model, status) (rate(gateway_requests_total{M}[{RATE}]))", "{{model}} {{status}}",
                     ("model", "status")),), "reqps"),
        Panel(d, "Traffic", "Requests/s by endpoint",
              (Query(f"sum by (endpoint) (rate(gateway_requests_total{M}[{RATE}]))", "{{endpoint}}",
                     ("endpoint",)),), "reqps"),
        Panel(d, "Traffic", "In-flight requests",
              (Query(f"sum by (model) (gateway_requests_in_flight{M})", "{{model}}", ("model",)),), "short"),
        Panel(d, "Traffic", "Tokens/s by backend",
              (Query(f"sum by (backend) (rate(gateway_prompt_tokens_total{M}[{RATE}]))", "{{backend}} prompt",
                     ("backend",)),
               Query(f"sum by (backend) (rate(gateway_completion_tokens_total{M}[{RATE}]))",
                     "{{backend}} completion", ("backend",))), "short"),
        Panel(d, "Backends", "Backend health (gateway health checks)",
              (Query("max by (backend) (gateway_backend_up)", "{{backend}}", ("backend",)),), "short",
              "1 = the last health check passed (max over gateway replicas).", kind="stat"),
        Panel(d, "Backends", "Scrape targets up",
              (Query("up", "{{job}} {{instance}}", ("job", "instance")),), "short", kind="stat"),
        Panel(d, "Backends", "Upstream errors/s by reason",
              (Query(f"sum by (backend, reason) (rate(gateway_upstream_errors_total[{RATE}]))",
                     "{{backend}} {{reason}}", ("backend", "reason")),), "short"),
        Panel(d, "Backends", "GPU cost per hour by backend",
              (Query("max by (backend) (gateway_backend_cost_per_hour_usd)", "{{backend}}", ("backend",)),),
              "currencyUSD"),
        Panel(d, "Validity", "Tool-call and structured-output errors/s by model and kind",
              (Query(f"sum by (model, kind) (rate(gateway_tool_call_errors_total{M}[{RATE}]))",
                     "{{model}} tool call {{kind}}", ("model", "kind")),
               Query(f"sum by (model, kind) (rate(gateway_structured_output_errors_total{M}[{RATE}]))",
                     "{{model}} structured output {{kind}}", ("model", "kind"))), "short",
              "Answers to requests with tools or response_format that broke it, checked after the call ended: "
              "no_call (a call was required), unknown_tool, invalid_json, schema_mismatch. Alerts: "
              "GatewayToolCallErrors, GatewayStructuredOutputErrors (over 5% of checked calls for 10 minutes)."),
        Panel(d, "Shared state", "Limit checks skipped and result rows dropped /s",
              (Query(f"sum by (outcome) (rate(gateway_limits_backend_errors_total[{RATE}]))", "limits {{outcome}}",
                     ("outcome",)),
               Query(f"sum by (reason) (rate(gateway_store_dropped_rows_total[{RATE}]))", "rows dropped {{reason}}",
                     ("reason",))), "short",
              "Zero when all is well. limits: calls whose API-key limits Redis did not check (gateway.limits_backend): "
              "admitted unchecked (fail_open), refused with 503 (fail_closed), a refund or charge lost; alert "
              "GatewayLimitsBackendErrors. rows dropped: results not stored: queue_full, write_failed, unavailable "
              "(PostgreSQL cannot be reached), stopped."),
        Panel(d, "Overhead", "Mean TTFT: gateway vs vLLM",
              (Query(gw_ttft, "{{model}} gateway", ("model",)), Query(vllm_ttft, "{{model}} vLLM", ("model",))),
              "s", "vLLM starts its clock at tokenization, the gateway at receipt of the request."),
        Panel(d, "Overhead", "Gateway overhead per call (p50, p99)",
              (Query(f"histogram_quantile(0.5, sum by (model, le) (rate(gateway_overhead_seconds_bucket{M}[{RATE}])))",
                     "{{model}} p50", ("model",)),
               Query(f"histogram_quantile(0.99, sum by (model, le) (rate(gateway_overhead_seconds_bucket{M}[{RATE}])))",
                     "{{model}} p99", ("model",))), "s",
              "Time inside the gateway: receipt to the upstream request written (parsing, routing, queueing for a "
              "slot, connecting), plus the first token chunk's (or the body's) way from the backend to the client."),
        Panel(d, "Overhead", "TTFT gap: gateway mean TTFT - vLLM mean TTFT",
              (Query(f"{gw_ttft} - on (model) {vllm_ttft}", "{{model}}", ("model",)),), "s",
              "Network + queueing + gateway work. Needs vLLM's served model name to equal the gateway's model id."),
    ]  # fmt: skip


def _vllm() -> list[Panel]:
    d = "vllm-engines"
    by = ("backend", "model_name")
    return [
        Panel(d, "Scheduler", "Requests running",
              (Query(f"sum by (backend, model_name) (vllm:num_requests_running{V})", "{{backend}}", by),)),
        Panel(d, "Scheduler", "Requests waiting",
              (Query(f"sum by (backend, model_name) (vllm:num_requests_waiting{V})", "{{backend}}", by),)),
        Panel(d, "Scheduler", "KV-cache usage",
              (Query(f"max by (backend, model_name) (vllm:kv_cache_usage_perc{V})", "{{backend}}", by),),
              "percentunit"),
        Panel(d, "Scheduler", "Preemptions/s",
              (Query(f"sum by (backend, model_name) (rate(vllm:num_preemptions_total{V}[{RATE}]))", "{{backend}}",
                     by),)),
        Panel(d, "Scheduler", "Prefix-cache hit rate",
              (Query(f"sum by (backend, model_name) (rate(vllm:prefix_cache_hits_total{V}[{RATE}]))"
                     f" / sum by (backend, model_name) (rate(vllm:prefix_cache_queries_total{V}[{RATE}]))",
                     "{{backend}}", by),), "percentunit", "Hit tokens / queried tokens."),
        Panel(d, "Scheduler", "Generation tokens/s",
              (Query(f"sum by (backend, model_name) (rate(vllm:generation_tokens_total{V}[{RATE}]))",
                     "{{backend}}", by),)),
        Panel(d, "Latency", "vLLM TTFT p50 / p95 / p99", _vllm_percentiles("vllm:time_to_first_token_seconds"), "s"),
        Panel(d, "Latency", "vLLM inter-token latency p50 / p95 / p99",
              _vllm_percentiles("vllm:inter_token_latency_seconds"), "s"),
        Panel(d, "Latency", "Finished requests/s by reason",
              (Query(f"sum by (backend, finished_reason) (rate(vllm:request_success_total{V}[{RATE}]))",
                     "{{backend}} {{finished_reason}}", ("backend", "finished_reason")),), "reqps"),
    ]  # fmt: skip


PANELS: tuple[Panel, ...] = (
    *_comparison("model", "Per model"),
    *_comparison("origin", "CN vs US (models grouped by origin)"),
    *_gateway(),
    *_vllm(),
)


def _model_variable(query: str) -> dict[str, Any]:
    return {
        "name": "model",
        "label": "Model",
        "type": "query",
        "datasource": DATASOURCE,
        "definition": query,
        "query": {"query": query, "refId": "model"},
        "refresh": 2,
        "multi": True,
        "includeAll": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [],
        "sort": 1,
        "hide": 0,
    }


def _panel(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    targets = [
        {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": q.expr, "legendFormat": q.legend, "range": True}
        for i, q in enumerate(panel.queries)
    ]
    options: dict[str, Any]
    if panel.kind == "stat":
        options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}, "colorMode": "value"}
    else:
        options = {
            "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "mean"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "options": options,
        "targets": targets,
    }


def build(dashboard: Dashboard) -> dict[str, Any]:
    """One dashboard's JSON model: its panels two to a line, under a row per ``Panel.row``."""
    panels: list[dict[str, Any]] = []
    y, x, row = 0, 0, None
    for panel in (p for p in PANELS if p.dashboard == dashboard.key):
        if panel.row != row:
            y += 8 if x else 0
            row, x = panel.row, 0
            panels.append({"id": len(panels) + 1, "type": "row", "title": row, "collapsed": False,
                           "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})  # fmt: skip
            y += 1
        panels.append(_panel(panel, len(panels) + 1, x, y))
        x = 12 - x
        y += 8 if x == 0 else 0
    return {
        "uid": dashboard.uid,
        "title": dashboard.title,
        "description": dashboard.description,
        "tags": ["llm-gateway"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": [_model_variable(dashboard.model_values)]},
        "panels": panels,
    }


def render(dashboard: Dashboard) -> str:
    return json.dumps(build(dashboard), indent=2, ensure_ascii=False) + "\n"


def filename(dashboard: Dashboard) -> str:
    return f"{dashboard.key}.json"


def write(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for dashboard in DASHBOARDS:
        path = out / filename(dashboard)
        path.write_text(render(dashboard), encoding="utf-8")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.tools.dashboards", description="Write the Grafana dashboards' JSON."
    )
    parser.add_argument("--out", type=Path, default=Path("deploy/grafana/dashboards"), help="output folder")
    args = parser.parse_args(argv)
    for path in write(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
