"""What the gateway's metrics say about calls at their edges (issue #14): streams the client abandoned, plain and
fan-out, and the gateway's own time per call (``gateway_overhead_seconds``, ``server-timing``)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import httpx
import pytest

from gateway.app import create_app
from gateway.devstack.emulator import EmulatorConfig, create_emulator_app
from tests.conftest import card, settings_for
from tests.servers import ThreadServer, samples

MODELS = ("m1", "m2")
OUTPUT_PRICE = 4.0  # $ per 1M output tokens on tests.conftest.card


@pytest.fixture(scope="module")
def gateway() -> Iterator[str]:
    """Two jitter-free emulators behind a gateway, 32 tokens each after a TTFT of 50 ms: m1 one every 50 ms (a client
    that leaves after 20 is well before the end), m2 one every 20 ms, with one backend slot."""
    emulators = [
        ThreadServer(create_emulator_app(EmulatorConfig(model=m, ttft_ms=50, itl_ms=itl, output_tokens=32)))
        for m, itl in zip(MODELS, (50, 20), strict=True)
    ]
    try:
        for server in emulators:
            server.__enter__()
        backends = [
            {"name": f"{m}-b", "base_url": s.url, "models": [m], **({"max_concurrency": 1} if m == "m2" else {})}
            for m, s in zip(MODELS, emulators, strict=True)
        ]
        settings = settings_for(backends, [card(m, "qwen3", "Alibaba", "CN", aliases=[]) for m in MODELS])
        with ThreadServer(create_app(settings)) as gw:
            yield gw.url
    finally:
        for server in emulators:
            server.__exit__()


def metric(text: str, name: str, **labels: str) -> float:
    return sum(samples(text, name, **labels))  # 0 for a series not created yet (a 499's, before the first)


def scrape(url: str) -> str:
    return httpx.get(f"{url}/metrics").text


def wait_for(url: str, name: str, value: float, **labels: str) -> str:
    """The exposition once ``name{labels}`` has reached ``value`` (calls are recorded when their relay ends)."""
    deadline = time.monotonic() + 15
    while True:
        text = scrape(url)
        if sum(samples(text, name, **labels)) >= value:
            return text
        assert time.monotonic() < deadline, f"{name}{labels} never reached {value}"
        time.sleep(0.05)


def chat(model: str, stream: bool = True) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hello"}], "stream": stream}


def token_chunks(line: str) -> int:
    if not line.startswith("data: {"):
        return 0
    return sum(1 for c in json.loads(line[6:])["choices"] if c.get("delta", {}).get("content"))


def test_abandoned_streams_count_the_tokens_they_received(gateway: str) -> None:
    """Issue #14's check: 10 streams of 32 tokens, each abandoned after 20, add between 200 and 260 completion
    tokens, 10 TTFT observations, their gaps, their list-price cost and 10 calls with status 499."""
    before = scrape(gateway)

    async def leave_after(n: int) -> int:
        received = 0
        async with (
            httpx.AsyncClient(timeout=30) as client,
            client.stream("POST", f"{gateway}/v1/chat/completions", json=chat("m1")) as r,
        ):
            assert r.status_code == 200
            async for line in r.aiter_lines():
                received += token_chunks(line)
                if received >= n:
                    break
        return received

    async def ten() -> list[int]:
        return list(await asyncio.gather(*(leave_after(20) for _ in range(10))))

    received = asyncio.run(ten())
    assert received == [20] * 10
    labels = {"model": "m1"}
    after = wait_for(gateway, "gateway_requests_total", metric(before, "gateway_requests_total", status="499") + 10,
                     status="499", **labels)  # fmt: skip

    def delta(name: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    tokens = delta("gateway_completion_tokens_total")
    assert 200 <= tokens <= 260, tokens  # the chunks relayed before the gateway saw the client leave count too
    assert delta("gateway_time_to_first_token_seconds_count") == 10
    assert delta("gateway_inter_token_latency_seconds_count") >= 10 * 19
    assert delta("gateway_cost_usd_total") == pytest.approx(tokens * OUTPUT_PRICE / 1e6)
    assert delta("gateway_request_duration_seconds_count") == 0  # an E2E needs the end of the answer
    assert delta("gateway_time_per_output_token_seconds_count") == 0


def test_an_abandoned_fan_out_counts_each_models_tokens(gateway: str) -> None:
    before = scrape(gateway)
    per_model = dict.fromkeys(MODELS, 0)
    body = {**chat("m1"), "models": list(MODELS)}
    body.pop("model")
    with httpx.stream("POST", f"{gateway}/v1/compare/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                if event.get("type") == "chunk":
                    per_model[event["model"]] += token_chunks("data: " + json.dumps(event["chunk"]))
            if min(per_model.values()) >= 5:
                break
    for model in MODELS:
        after = wait_for(gateway, "gateway_requests_total",
                         metric(before, "gateway_requests_total", model=model, status="499") + 1,
                         model=model, status="499")  # fmt: skip
        tokens = metric(after, "gateway_completion_tokens_total", model=model) - metric(
            before, "gateway_completion_tokens_total", model=model
        )
        assert per_model[model] <= tokens < 32, (model, per_model, tokens)
        ttft = metric(after, "gateway_time_to_first_token_seconds_count", model=model)
        assert ttft == metric(before, "gateway_time_to_first_token_seconds_count", model=model) + 1


def test_the_gateways_own_time_is_observed_once_per_call_and_includes_queueing(gateway: str) -> None:
    """``gateway_overhead_seconds``: one observation per answered call, small next to the backend's time, and it
    counts the wait for a backend slot (one slot: the second of two concurrent streams waits for the first)."""
    before = scrape(gateway)
    plain = httpx.post(f"{gateway}/v1/chat/completions", json=chat("m2", stream=False), timeout=30)
    assert plain.status_code == 200
    timing = dict(part.strip().split(";dur=") for part in plain.headers["server-timing"].split(","))
    text = wait_for(gateway, "gateway_overhead_seconds_count",
                    metric(before, "gateway_overhead_seconds_count", model="m2") + 1, model="m2")  # fmt: skip
    one = metric(text, "gateway_overhead_seconds_sum", model="m2") - metric(
        before, "gateway_overhead_seconds_sum", model="m2"
    )
    assert one == pytest.approx(float(timing["gateway"]) / 1000, abs=1e-6)
    assert 0 < one < 0.05 * float(timing["upstream"]) / 1000 + 0.05  # 32 tokens take the backend ~0.7 s

    async def two() -> list[float]:
        async with httpx.AsyncClient(timeout=30) as client:

            async def one_stream() -> float:
                async with client.stream("POST", f"{gateway}/v1/chat/completions", json=chat("m2")) as r:
                    await r.aread()
                    gateway_ms = dict(p.strip().split(";dur=") for p in r.headers["server-timing"].split(","))
                    return float(gateway_ms["gateway"]) / 1000

            return list(await asyncio.gather(one_stream(), one_stream()))

    first, second = sorted(asyncio.run(two()))
    assert second > 0.5 > first, (first, second)  # the second waited the first's whole stream (~0.7 s)
    text = wait_for(gateway, "gateway_overhead_seconds_count",
                    metric(before, "gateway_overhead_seconds_count", model="m2") + 3, model="m2")  # fmt: skip
    assert (
        metric(text, "gateway_overhead_seconds_count", model="m2")
        == metric(before, "gateway_overhead_seconds_count", model="m2") + 3
    )
    total = metric(text, "gateway_overhead_seconds_sum", model="m2") - metric(
        before, "gateway_overhead_seconds_sum", model="m2"
    )
    assert total >= one + first + second  # the histogram also counts each first token chunk's way out
