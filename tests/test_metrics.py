from __future__ import annotations

import bisect
import gc
import itertools
import math

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import create_app
from gateway.config import parse_settings
from gateway.metrics import E2E_BUCKETS, ITL_BUCKETS, MAX_BUCKET_RATIO, TTFT_BUCKETS, Metrics, observe_all
from tests.conftest import card
from tests.servers import ThreadServer, metric

VLLM_TTFT = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10, 20, 40, 80,
             160, 640, 2560]  # fmt: skip
VLLM_ITL = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5, 7.5, 10, 20, 40, 80]
VLLM_E2E = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960, 1920, 7680]


@pytest.mark.parametrize(
    ("buckets", "vllm", "low", "high"),
    [(TTFT_BUCKETS, VLLM_TTFT, 0.005, 60), (ITL_BUCKETS, VLLM_ITL, 0.001, 2), (E2E_BUCKETS, VLLM_E2E, 0.05, 600)],
)
def test_buckets_keep_vllm_bounds_and_are_fine_over_the_range_that_matters(
    buckets: tuple[float, ...], vllm: list[float], low: float, high: float
) -> None:
    assert set(vllm) <= set(buckets), "every vLLM bound stays, so SLO thresholds line up with vllm:* histograms"
    assert list(buckets) == sorted(set(buckets))
    assert buckets[0] <= low and buckets[-1] >= high
    ratios = [b / a for a, b in itertools.pairwise(buckets) if b > low and a < high]
    assert max(ratios) <= MAX_BUCKET_RATIO < 1.2  # a median read from them is off by (ratio - 1) / 2 at worst


def test_a_median_read_from_the_buckets_is_within_ten_percent_anywhere_in_range() -> None:
    """The worst case for linear interpolation: every value just above a bound, or exactly on one."""
    for buckets, low, high in ((TTFT_BUCKETS, 0.005, 60), (ITL_BUCKETS, 0.001, 2), (E2E_BUCKETS, 0.05, 600)):
        for true in [low * 1.013**i for i in range(1, int(math.log(high / low) / math.log(1.013)))]:
            i = bisect.bisect_left(buckets, true)
            a, b = buckets[i - 1] if i else 0.0, buckets[i]
            assert abs((a + b) / 2 - true) / true <= 0.1, (true, a, b)


def test_the_emulator_keeps_vllms_own_buckets() -> None:
    from gateway.devstack.emulator import EngineMetrics

    text = generate_latest(_registry_with(EngineMetrics)).decode()
    les = {line.split('le="')[1].split('"')[0] for line in text.splitlines() if
           line.startswith("vllm:time_to_first_token_seconds_bucket")}  # fmt: skip
    assert les == {repr(float(x)) for x in VLLM_TTFT} | {"+Inf"}


def _registry_with(engine: type) -> CollectorRegistry:
    registry = CollectorRegistry()
    engine(registry, "m")
    return registry


def test_observe_all_equals_observing_one_value_at_a_time() -> None:
    """The batched observe (a stream's ITL gaps at the end of the stream) leaves exactly what one ``observe`` per
    value leaves: values on bucket bounds, between them, past the last one, and repeats."""
    values = [0.0, 0.001, 0.0015, 0.01, 0.0100001, 0.02, 0.02, 0.02, 0.75, 79.9, 80.0, 1e6] + [0.021] * 30
    one, batched = Metrics(CollectorRegistry()), Metrics(CollectorRegistry())
    for value in values:
        one.series("m", "b").itl.observe(value)
    observe_all(batched.series("m", "b").itl, values)
    observe_all(batched.series("m", "b").itl, [])

    def exposition(metrics: Metrics) -> list[str]:  # without the creation times, which differ between the two
        return [x for x in generate_latest(metrics.registry).decode().splitlines() if "_created" not in x]

    assert exposition(batched) == exposition(one)
    assert metric(
        generate_latest(batched.registry).decode(), "gateway_inter_token_latency_seconds_count", model="m"
    ) == len(values)


def test_label_sets_are_preinitialised_and_info_published() -> None:
    settings = parse_settings(
        {
            "models": [card("a", "qwen3", "Alibaba", "CN"), card("b", "llama", "Meta", "US")],
            "backends": [
                {"name": "a1", "base_url": "http://x", "models": ["a"]},
                {"name": "b1", "base_url": "http://y", "models": ["b"], "gpu": {"type": "L4", "usd_per_hour": 0.7}},
            ],
        },
        "test",
    )
    metrics = Metrics(CollectorRegistry())
    metrics.describe(settings)
    text = generate_latest(metrics.registry).decode()
    assert metric(text, "gateway_requests_total", model="a", backend="a1", endpoint="chat", status="200") == 0
    assert metric(text, "gateway_time_to_first_token_seconds_count", model="b", backend="b1") == 0
    assert metric(text, "gateway_upstream_errors_total", backend="b1", reason="timeout") == 0
    assert metric(text, "gateway_cost_usd_total", model="a", backend="a1", basis="list_price") == 0
    assert metric(text, "gateway_backend_cost_per_hour_usd", backend="a1") == 4.0  # card: 2 GPUs x $2
    assert metric(text, "gateway_backend_cost_per_hour_usd", backend="b1") == 0.7  # backend's own GPU wins
    assert metric(text, "gateway_model_info", model="a", family="qwen3", vendor="Alibaba", origin="CN") == 1
    assert metric(text, "gateway_backend_info", backend="b1", model="b") == 1
    names = {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}
    assert not [n for n in names if ":" in n]  # colons are vLLM's and the recording rules'


def test_an_app_built_and_served_in_a_thread_leaves_the_process_alone() -> None:
    """Process-wide settings (the collector's thresholds and frozen objects, prometheus-client's created series)
    are made by ``gateway serve`` (``gateway.server.tune_process``), not by building or starting an app: tests and
    embedders that start one in a thread keep their process as it was. ``gateway serve`` itself is checked in
    tests/test_cli.py (no ``_created`` series in its exposition)."""
    before = (gc.get_threshold(), gc.get_freeze_count())
    settings = parse_settings(
        {"gateway": {"results_db": ":memory:"}, "models": [{"id": "m"}],
         "backends": [{"name": "b", "base_url": "http://127.0.0.1:9", "models": ["m"]}]},
        "test",
    )  # fmt: skip
    with ThreadServer(create_app(settings)) as gw:
        text = httpx.get(f"{gw.url}/metrics").text
    assert (gc.get_threshold(), gc.get_freeze_count()) == before
    assert "_created" in text  # prometheus-client's default, untouched
