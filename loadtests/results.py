"""Reading a locust run back: its stats CSV, its rate summary, and the gateway's /metrics for the same window."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True, slots=True)
class Entry:
    name: str
    count: int
    failures: int
    mean: float  # ms (for ``tokens``: tokens)
    p50: float
    p95: float
    p99: float
    mean_size: float

    @property
    def total_size(self) -> float:
        return self.mean_size * self.count


def read_stats(prefix: str | Path) -> dict[str, Entry]:
    """``PREFIX_stats.csv`` as {name: Entry}, without the aggregated row."""
    out: dict[str, Entry] = {}
    with open(f"{prefix}_stats.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["Name"] == "Aggregated":
                continue

            def num(key: str, row: dict[str, str] = row) -> float:
                value = row.get(key, "")
                return float(value) if value not in ("", "N/A") else 0.0

            out[row["Name"]] = Entry(
                row["Name"],
                int(num("Request Count")),
                int(num("Failure Count")),
                num("Average Response Time"),
                num("50%"),
                num("95%"),
                num("99%"),
                num("Average Content Size"),
            )
    return out


def read_summary(path: str | Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(Path(path).read_text(encoding="utf-8"))
    return data


def _samples(text: str, name: str, model: str) -> dict[str, float]:
    """{le or '': value} summed over backends, for the samples of ``name`` labelled with ``model``."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels.get("model") == model:
                key = s.labels.get("le", "")
                out[key] = out.get(key, 0.0) + s.value
    return out


def _delta(before: str, after: str, name: str, model: str) -> float:
    return sum(_samples(after, name, model).values()) - sum(_samples(before, name, model).values())


@dataclass(frozen=True, slots=True)
class Agreement:
    model: str
    client_tokens: int
    gateway_tokens: int
    client_requests: int
    gateway_ttft_count: int
    client_ttft_mean_s: float
    gateway_ttft_mean_s: float
    client_tpot_mean_s: float
    gateway_tpot_mean_s: float

    def line(self) -> str:
        return (
            f"{self.model:<24} tokens client {self.client_tokens} / gateway {self.gateway_tokens}   "
            f"requests {self.client_requests} / {self.gateway_ttft_count}   TTFT mean ms "
            f"{self.client_ttft_mean_s * 1000:.1f} / {self.gateway_ttft_mean_s * 1000:.1f}   TPOT mean ms "
            f"{self.client_tpot_mean_s * 1000:.2f} / {self.gateway_tpot_mean_s * 1000:.2f}"
        )


def cross_check(stats: dict[str, Entry], before: str, after: str, models: list[str]) -> list[Agreement]:
    """Client-side numbers beside the gateway's histograms and counters, both over the same window (the gateway's
    ``/metrics`` scraped just before and just after the run)."""
    out: list[Agreement] = []
    for model in models:

        def mean(hist: str, model: str = model) -> tuple[float, int]:
            total = _delta(before, after, f"{hist}_sum", model)
            count = round(_delta(before, after, f"{hist}_count", model))
            return (total / count if count else 0.0), count

        ttft, ttft_n = mean("gateway_time_to_first_token_seconds")
        tpot, _ = mean("gateway_time_per_output_token_seconds")
        tokens = stats.get(f"tokens {model}")
        out.append(
            Agreement(
                model,
                round(tokens.total_size) if tokens else 0,
                round(_delta(before, after, "gateway_completion_tokens_total", model)),
                stats[f"request {model}"].count if f"request {model}" in stats else 0,
                ttft_n,
                stats[f"TTFT {model}"].mean / 1000 if f"TTFT {model}" in stats else 0.0,
                ttft,
                stats[f"TPOT {model}"].mean / 1000 if f"TPOT {model}" in stats else 0.0,
                tpot,
            )
        )
    return out
