"""Every metric the gateway exports.

Naming: ``gateway_<noun>_<unit>``, counters end in ``_total``, seconds and USD as base units, no colons (those
belong to vLLM's ``vllm:*`` metrics and to recording rules). Labels come only from the configuration (model,
backend) or from closed enums (endpoint, status, reason, basis): never request ids, keys or prompts.

With ``gateway serve --workers N`` every worker writes its samples to ``PROMETHEUS_MULTIPROC_DIR`` and /metrics
aggregates them (counters and histograms add up; gauges say how: in-flight and queues add up over live workers, a
backend counts as up only if every worker sees it up, the worst circuit state wins).

Latency buckets contain vLLM's own bounds, so SLO thresholds line up with ``vllm:*`` histograms, with bounds added
between them (``refined``) so that a percentile read from them is within 7.5% over the range that matters. Every
family's definition, and which calls it counts: docs/measurement.md.
"""

from __future__ import annotations

import itertools
import math
import os
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from gateway.config import Settings
from gateway.errors import UPSTREAM_REASONS

# vLLM's own bucket bounds (vllm/v1/metrics/loggers.py), which the emulator's ``vllm:*`` histograms use as they are.
VLLM_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
    80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
VLLM_ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
VLLM_E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
    960.0, 1920.0, 7680.0,
)  # fmt: skip
MAX_BUCKET_RATIO = 1.15  # upper / lower bound of every bucket in the range that matters: p50 error <= 7.5%


def refined(bounds: Sequence[float], low: float, high: float, ratio: float = MAX_BUCKET_RATIO) -> tuple[float, ...]:
    """``bounds`` (kept, so SLO thresholds set on vLLM's bounds still line up) with bounds added between each pair
    that starts in [low, high) and is further apart than ``ratio``: evenly spaced on a log scale, rounded to three
    significant digits. ``histogram_quantile`` interpolates linearly inside a bucket (a, b], so when every value
    sits just above a, the median it reports is (a + b) / 2: off by (b / a - 1) / 2 at worst, 7.5% at 1.15."""
    out: list[float] = []
    for a, b in itertools.pairwise(sorted(bounds)):
        out.append(a)
        if low <= a < high and b / a > ratio:
            steps = math.ceil(math.log(b / a) / math.log(ratio - 0.005))  # a margin for the rounding
            out.extend(float(f"{a * (b / a) ** (i / steps):.3g}") for i in range(1, steps))
    out.append(max(bounds))
    return tuple(out)


# The gateway's own: vLLM's bounds, refined over the ranges that matter (TTFT 5 ms to 60 s, ITL/TPOT 1 ms to 2 s,
# E2E 50 ms to 10 min); ITL/TPOT also get bounds down to 1 ms and E2E to 50 ms, where the gateway's own overhead
# and short calls land.
TTFT_BUCKETS = refined(VLLM_TTFT_BUCKETS, 0.005, 60.0)
ITL_BUCKETS = refined((0.001, 0.0025, 0.005, *VLLM_ITL_BUCKETS), 0.001, 2.0)
E2E_BUCKETS = refined((0.05, 0.1, *VLLM_E2E_BUCKETS), 0.05, 600.0)
# The gateway's own time per call: 100 us to 1 s finely (parsing to writing), coarse above (queueing for a slot).
OVERHEAD_BUCKETS = refined((0.0001, 0.001, 0.01, 0.1, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0), 0.0001, 1.0)

ENDPOINTS = ("chat", "completions")
NO_MODEL = "unknown"  # model label of a request that never resolved to a configured model
NO_BACKEND = "none"  # backend label of a request that never reached a backend
LIMITS_OUTCOMES = ("admitted", "refused", "unsettled")  # gateway_limits_backend_errors_total{outcome}
# Why a result row was not stored (gateway.compare.writer): the writer's queue was full, the database refused the
# write, could not be reached (PostgreSQL down), or the gateway stopped before the row could be written.
STORE_DROP_REASONS = ("queue_full", "write_failed", "unavailable", "stopped")
# How an answer failed the structure its request asked for (gateway.relay.validity says when each applies).
TOOL_ERRORS = ("no_call", "unknown_tool", "invalid_json", "schema_mismatch")
STRUCTURED_ERRORS = ("invalid_json", "schema_mismatch")


@dataclass(slots=True)
class Series:
    """The children of one (model, backend) pair, resolved once so the per-chunk path does no label lookups."""

    ttft: Histogram
    itl: Histogram
    tpot: Histogram
    prompt_tokens: Counter
    completion_tokens: Counter
    in_flight: Gauge
    cost_list_price: Counter
    overhead: Histogram
    ttfat: Histogram
    reasoning_s: Histogram
    reasoning_tokens: Counter
    answer_tokens: Counter
    empty_answers: Counter


M = TypeVar("M", Counter, Histogram)


def observe_all(histogram: Histogram, values: Sequence[float]) -> None:
    """``histogram.observe(v)`` for every value, with one increment per bucket touched instead of per value (a
    stream's inter-token gaps land in a few buckets). It works on prometheus-client's histogram internals
    (pinned in pyproject.toml); a test checks the result equals observing one value at a time."""
    if not values:
        return
    bounds: list[float] = histogram._upper_bounds
    counts = [0] * len(bounds)
    for value in values:
        counts[bisect_left(bounds, value)] += 1  # the first bucket whose upper bound is >= value, as observe()
    histogram._sum.inc(sum(values))
    for bucket, n in zip(histogram._buckets, counts, strict=True):
        if n:
            bucket.inc(n)


def _child(cache: dict[tuple[str, ...], M], metric: M, *labels: str) -> M:
    """``metric.labels(*labels)``, resolved once per label set (a label lookup costs more than the increment)."""
    child = cache.get(labels)
    if child is None:
        child = cache[labels] = metric.labels(*labels)
    return child


def multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def exposition(registry: CollectorRegistry) -> bytes:
    """The text for /metrics: this process's registry, or every worker's samples in multiprocess mode."""
    if multiprocess():
        from prometheus_client import multiprocess as mp

        aggregate = CollectorRegistry()
        mp.MultiProcessCollector(aggregate)  # type: ignore[no-untyped-call]
        return generate_latest(aggregate)
    return generate_latest(registry)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        mb = ("model", "backend")
        self.requests = Counter(
            "gateway_requests", "Requests by outcome.", ("model", "backend", "endpoint", "status"),
            registry=registry,
        )  # fmt: skip
        self.duration = Histogram(
            "gateway_request_duration_seconds",
            "End-to-end latency: last token-bearing chunk (or full body) minus receipt of the request.",
            ("model", "backend", "endpoint"), buckets=E2E_BUCKETS, registry=registry,
        )  # fmt: skip
        self.ttft = Histogram(
            "gateway_time_to_first_token_seconds",
            "First chunk carrying content/reasoning/text minus receipt of the request (streaming only).",
            mb, buckets=TTFT_BUCKETS, registry=registry,
        )  # fmt: skip
        self.itl = Histogram(
            "gateway_inter_token_latency_seconds",
            "Every gap between consecutive token-bearing chunks, pooled across requests.",
            mb, buckets=ITL_BUCKETS, registry=registry,
        )  # fmt: skip
        self.tpot = Histogram(
            "gateway_time_per_output_token_seconds",
            "(E2E - TTFT) / (completion_tokens - 1), per streamed request with more than one token.",
            mb, buckets=ITL_BUCKETS, registry=registry,
        )  # fmt: skip
        self.ttfat = Histogram(
            "gateway_time_to_first_answer_token_seconds",
            "First chunk carrying answer content, text or a tool call (not reasoning) minus receipt of the request"
            " (streaming only; equals TTFT for a model that does not think).",
            mb, buckets=TTFT_BUCKETS, registry=registry,
        )  # fmt: skip
        self.reasoning_s = Histogram(
            "gateway_reasoning_duration_seconds",
            "Thinking time: first reasoning chunk to first answer chunk (to the last reasoning chunk when no answer"
            " came), per streamed call that reasoned.",
            mb, buckets=E2E_BUCKETS, registry=registry,
        )  # fmt: skip
        self.reasoning_tokens = Counter(
            "gateway_reasoning_tokens",
            "Completion tokens spent reasoning: usage.completion_tokens_details.reasoning_tokens when the backend"
            " reports it, else the reasoning chunks.", mb, registry=registry,
        )  # fmt: skip
        self.answer_tokens = Counter(
            "gateway_answer_tokens", "Completion tokens that were not reasoning.", mb, registry=registry
        )
        self.empty_answers = Counter(
            "gateway_empty_answers",
            "Successful calls that ended with no answer (no content, text or tool call), e.g. thinking used the whole"
            " max_tokens.", mb, registry=registry,
        )  # fmt: skip
        # Validity of answers to requests that asked for tool calls or JSON (gateway.relay.validity).
        self.tool_call_checks = Counter(
            "gateway_tool_call_checks",
            "Successful calls with tools whose answer was checked (the denominator of the tool-call error ratio).",
            mb, registry=registry,
        )  # fmt: skip
        self.tool_call_errors = Counter(
            "gateway_tool_call_errors",
            "Invalid tool calls in checked answers, by kind: no_call (tool_choice required or named), unknown_tool,"
            " invalid_json (arguments), schema_mismatch (arguments vs the tool's parameters).",
            ("model", "backend", "kind"), registry=registry,
        )  # fmt: skip
        self.structured_output_checks = Counter(
            "gateway_structured_output_checks",
            "Successful calls with response_format json_object/json_schema whose content was checked.",
            mb, registry=registry,
        )  # fmt: skip
        self.structured_output_errors = Counter(
            "gateway_structured_output_errors",
            "Checked answers whose content is not JSON (invalid_json) or not valid against the response_format's"
            " schema (schema_mismatch).",
            ("model", "backend", "kind"), registry=registry,
        )  # fmt: skip
        self.overhead = Histogram(
            "gateway_overhead_seconds",
            "Time spent inside the gateway per call: from receipt to the upstream request written (parsing, routing,"
            " queueing for a slot, connecting, retries), plus from the upstream's first token chunk (or whole body)"
            " to its write to the client.",
            ("model",), buckets=OVERHEAD_BUCKETS, registry=registry,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "gateway_prompt_tokens", "Prompt tokens, from the backend's usage.", mb, registry=registry
        )
        self.completion_tokens = Counter(
            "gateway_completion_tokens", "Completion tokens, from the backend's usage.", mb, registry=registry
        )
        self.tokenizer_requests = Counter(
            "gateway_tokenizer_requests", "Calls of /tokenize, /detokenize and /tokenizer_info, by outcome.",
            ("model", "backend", "route", "status"), registry=registry,
        )  # fmt: skip
        self.in_flight = Gauge(
            "gateway_requests_in_flight", "Requests being served right now.", mb, registry=registry,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.backend_up = Gauge(
            "gateway_backend_up",
            "1 if the backend passed its last health check.",
            ("backend",),
            registry=registry,
            multiprocess_mode="livemin",
        )
        self.upstream_errors = Counter(
            "gateway_upstream_errors", "Backend failures by reason.", ("backend", "reason"), registry=registry
        )
        self.circuit_state = Gauge(
            "gateway_backend_circuit_state",
            "Outlier ejection: 0 closed (in rotation), 1 half-open (one probe request allowed), 2 open (ejected).",
            ("backend",), registry=registry, multiprocess_mode="livemax",
        )  # fmt: skip
        self.retries = Counter(
            "gateway_retries", "Requests sent again to another replica (before any byte reached the client).",
            ("model", "reason"), registry=registry,
        )  # fmt: skip
        self.retries_denied = Counter(
            "gateway_retry_budget_exhausted", "Retries not made because the model's retry budget was spent.",
            ("model",), registry=registry,
        )  # fmt: skip
        self.queued = Gauge(
            "gateway_queue_waiting", "Requests waiting for a backend slot (every replica at max_concurrency).",
            ("model",), registry=registry, multiprocess_mode="livesum",
        )  # fmt: skip
        self.rejected = Counter(
            "gateway_rejected", "Requests refused before reaching a backend, by reason.", ("model", "reason"),
            registry=registry,
        )  # fmt: skip
        self.cost = Counter(
            "gateway_cost_usd",
            "Client-facing cost; basis=list_price is usage x the model card's list prices.",
            ("model", "backend", "basis"), registry=registry,
        )  # fmt: skip
        self.backend_cost_per_hour = Gauge(
            "gateway_backend_cost_per_hour_usd",
            "GPUs x $/GPU-hour of the backend: divide by the token rate for $ per token on the GPU-time basis.",
            ("backend",), registry=registry, multiprocess_mode="max",
        )  # fmt: skip
        self.model_info = Gauge(
            "gateway_model_info",
            "Model card, for joins: group any panel by origin, family or vendor.",
            ("model", "family", "vendor", "origin", "params_b", "active_params_b", "gpu_type", "gpu_count"),
            registry=registry, multiprocess_mode="max",
        )  # fmt: skip
        self.backend_info = Gauge(
            "gateway_backend_info",
            "Which backend serves which model.",
            ("backend", "model"),
            registry=registry,
            multiprocess_mode="max",
        )
        # Shadow (mirrored) traffic: its own families, so client-facing numbers and cost never include it.
        self.mirror_requests = Counter(
            "gateway_mirror_requests", "Mirrored calls by outcome.", ("model", "backend", "status"), registry=registry
        )
        self.mirror_skipped = Counter(
            "gateway_mirror_skipped", "Mirrored calls not made: the concurrency bound was full.", ("model",),
            registry=registry,
        )  # fmt: skip
        self.mirror_ttft = Histogram(
            "gateway_mirror_time_to_first_token_seconds", "TTFT of mirrored calls.", mb, buckets=TTFT_BUCKETS,
            registry=registry,
        )  # fmt: skip
        self.mirror_completion_tokens = Counter(
            "gateway_mirror_completion_tokens", "Completion tokens of mirrored calls.", mb, registry=registry
        )
        self.mirror_cost = Counter(
            "gateway_mirror_cost_usd", "Cost of mirrored calls (not client-facing).", ("model", "backend", "basis"),
            registry=registry,
        )  # fmt: skip
        self.store_dropped_rows = Counter(
            "gateway_store_dropped_rows", "Result rows not written to the results store, by reason.", ("reason",),
            registry=registry,
        )  # fmt: skip
        for reason in STORE_DROP_REASONS:
            self.store_dropped_rows.labels(reason)
        self.limits_backend_errors = Counter(
            "gateway_limits_backend_errors", "Calls whose API-key limits Redis did not check (gateway.limits_backend), "
            "by outcome: admitted unchecked (fail_open), refused (fail_closed), or a settlement lost.", ("outcome",),
            registry=registry,
        )  # fmt: skip
        for outcome in LIMITS_OUTCOMES:
            self.limits_backend_errors.labels(outcome)
        self._series: dict[tuple[str, str], Series] = {}
        self._requests: dict[tuple[str, ...], Counter] = {}
        self._durations: dict[tuple[str, ...], Histogram] = {}

    def requests_of(self, model: str, backend: str, endpoint: str, status: int) -> Counter:
        return _child(self._requests, self.requests, model, backend, endpoint, str(status))

    def duration_of(self, model: str, backend: str, endpoint: str) -> Histogram:
        return _child(self._durations, self.duration, model, backend, endpoint)

    def series(self, model: str, backend: str) -> Series:
        key = (model, backend)
        found = self._series.get(key)
        if found is None:
            found = self._series[key] = Series(
                ttft=self.ttft.labels(model, backend),
                itl=self.itl.labels(model, backend),
                tpot=self.tpot.labels(model, backend),
                prompt_tokens=self.prompt_tokens.labels(model, backend),
                completion_tokens=self.completion_tokens.labels(model, backend),
                in_flight=self.in_flight.labels(model, backend),
                cost_list_price=self.cost.labels(model, backend, "list_price"),
                overhead=self.overhead.labels(model),
                ttfat=self.ttfat.labels(model, backend),
                reasoning_s=self.reasoning_s.labels(model, backend),
                reasoning_tokens=self.reasoning_tokens.labels(model, backend),
                answer_tokens=self.answer_tokens.labels(model, backend),
                empty_answers=self.empty_answers.labels(model, backend),
            )
        return found

    def describe(self, settings: Settings) -> None:
        """Publish the info metrics and pre-create every configured label set (dashboards show 0, not gaps)."""
        for card in settings.models:
            gpu = card.gpu
            self.model_info.labels(
                card.id, card.family, card.vendor, card.origin,
                _num(card.params_b), _num(card.active_params_b),
                gpu.type if gpu else "", str(gpu.count) if gpu else "",
            ).set(1)  # fmt: skip
        for backend in settings.backends:
            self.backend_up.labels(backend.name)
            self.circuit_state.labels(backend.name).set(0)
            self.backend_cost_per_hour.labels(backend.name).set(settings.backend_cost_per_hour(backend))
            for reason in UPSTREAM_REASONS:
                self.upstream_errors.labels(backend.name, reason)
            for model in backend.models:
                self.backend_info.labels(backend.name, model).set(1)
                self.series(model, backend.name)
                self.tool_call_checks.labels(model, backend.name)
                self.structured_output_checks.labels(model, backend.name)
                for kind in TOOL_ERRORS:
                    self.tool_call_errors.labels(model, backend.name, kind)
                for kind in STRUCTURED_ERRORS:
                    self.structured_output_errors.labels(model, backend.name, kind)
                self.queued.labels(model)
                self.retries_denied.labels(model)
                for endpoint in ENDPOINTS:
                    self.requests.labels(model, backend.name, endpoint, "200")
                    self.duration.labels(model, backend.name, endpoint)


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:g}"
