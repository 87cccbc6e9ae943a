"""Per-key rate limits that hold under concurrency, hang-ups and fan-outs: tokens are reserved at admission (the
call's possible cost), settled against what it used, charged for what an abandoned stream received; a fan-out to N
models is N requests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx

from gateway.app import create_app
from gateway.auth import hash_key
from gateway.devstack.emulator import EmulatorConfig, create_emulator_app
from tests.conftest import card, settings_for
from tests.servers import ThreadServer, metric, samples

KEY = "gk-limited-0123456789abcdef0123456789abcdef"
AUTH = {"authorization": f"Bearer {KEY}"}


@contextlib.contextmanager
def limited(limits: dict[str, int], models: tuple[str, ...] = ("m",), **emulator: Any) -> Iterator[str]:
    """A gateway over one emulator per model, with one API key limited by ``limits`` (rpm, tpm)."""
    servers = []
    try:
        for model in models:
            cfg = EmulatorConfig(model=model, **{"ttft_ms": 20, "itl_ms": 2, "output_tokens": 20, **emulator})
            servers.append(ThreadServer(create_emulator_app(cfg)).__enter__())
        settings = settings_for(
            [{"name": f"b-{m}", "base_url": s.url, "models": [m]} for m, s in zip(models, servers, strict=True)],
            [card(m, "llama", "Meta", "US", aliases=[]) for m in models],
            auth={"keys": [{"name": "limited", "sha256": hash_key(KEY), **limits}], "protect_metrics": False},
        )
        with ThreadServer(create_app(settings)) as gw:
            yield gw.url
    finally:
        for server in servers:
            server.__exit__()


def chat(max_tokens: int, stream: bool = False, model: str = "m") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
            "ignore_eos": True, "stream": stream}  # fmt: skip


def test_a_burst_of_concurrent_calls_stays_within_the_token_budget() -> None:
    """The review's case: 30 concurrent calls under tpm 200 received about 2,070 tokens, because each was admitted
    while the bucket held one token. Now each reserves its prompt estimate plus max_tokens before it runs."""

    async def burst(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            calls = [client.post(f"{url}/v1/chat/completions", json=chat(50), headers=AUTH) for _ in range(30)]
            return list(await asyncio.gather(*calls))

    with limited({"tpm": 200}, output_tokens=50, itl_ms=5) as url:
        answers = asyncio.run(burst(url))
    ok = [r for r in answers if r.status_code == 200]
    refused = [r for r in answers if r.status_code == 429]
    assert len(ok) + len(refused) == 30 and ok and refused
    used = sum(r.json()["usage"]["total_tokens"] for r in ok)
    assert used <= 200 * 1.1, f"{len(ok)} calls used {used} tokens of a 200 a minute budget"
    assert all(r.json()["error"]["code"] == "rate_limit_exceeded" for r in refused)


def test_a_stream_abandoned_before_its_last_token_is_charged_what_it_received() -> None:
    """The review's case: a client that hung up just before the last token was charged nothing (20 streams, 620
    tokens received under tpm 100). Now it pays its prompt estimate plus the token chunks it was sent, and those
    tokens and its TTFT are in the metrics."""
    with limited({"tpm": 600}, output_tokens=200, itl_ms=20) as url:
        started = time.monotonic()
        received = 0
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=chat(200, True), headers=AUTH) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    received += 1
                    if received == 60:
                        break  # hang up with 140 tokens (2.8 s) to go
        deadline = time.monotonic() + 5
        while not samples(text := httpx.get(f"{url}/metrics").text, "gateway_requests_total", status="499"):
            assert time.monotonic() < deadline, "the abandoned stream was never recorded"
            time.sleep(0.02)
        after = httpx.post(f"{url}/v1/chat/completions", json=chat(1), headers=AUTH)
        refilled = (time.monotonic() - started) * 600 / 60
    assert after.status_code == 200
    # The bucket was full (600); what the next call finds, once it has reserved its own, tells what the abandoned
    # one was charged, give or take the refill meanwhile (10 a second).
    charged = 600 - int(after.headers["x-ratelimit-remaining-tokens"]) - reservation(chat(1))
    prompt_estimate = len(compact(chat(200, True))) // 4
    assert received - refilled <= charged <= received + prompt_estimate, (received, charged, refilled)
    assert metric(text, "gateway_completion_tokens_total", model="m") >= received
    assert metric(text, "gateway_time_to_first_token_seconds_count", model="m") == 1


def reservation(body: dict[str, Any]) -> int:
    """The tokens a call reserves: its prompt estimate (body bytes / 4, as httpx sends it) plus max_tokens."""
    return len(compact(body)) // 4 + int(body["max_tokens"])


def compact(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()  # what httpx's json= sends


def test_a_fan_out_to_n_models_counts_n_requests_and_reserves_for_each() -> None:
    with limited({"rpm": 5}, models=("m1", "m2", "m3")) as url:
        body = {**chat(5), "models": ["m1", "m2", "m3"]}
        body.pop("model")
        first = httpx.post(f"{url}/v1/compare/chat/completions", json=body, headers=AUTH, timeout=30)
        assert first.status_code == 200 and len(first.json()["results"]) == 3
        assert first.headers["x-ratelimit-remaining-requests"] == "2"
        second = httpx.post(f"{url}/v1/compare/chat/completions", json=body, headers=AUTH, timeout=30)
        assert second.status_code == 429  # 3 requests do not fit in the 2 left
        single = httpx.post(f"{url}/v1/chat/completions", json=chat(5, model="m1"), headers=AUTH, timeout=30)
        assert single.status_code == 200 and single.headers["x-ratelimit-remaining-requests"] == "1"
    with limited({"tpm": 1000}, models=("m1", "m2", "m3")) as url:
        body = {**chat(100), "models": ["m1", "m2", "m3"]}
        body.pop("model")
        answer = httpx.post(f"{url}/v1/compare/chat/completions", json=body, headers=AUTH, timeout=30)
        assert answer.status_code == 200
        per_model = len(compact(body)) // 4 + 100
        assert int(answer.headers["x-ratelimit-remaining-tokens"]) == 1000 - 3 * per_model
        after = httpx.post(f"{url}/v1/chat/completions", json=chat(1, model="m1"), headers=AUTH, timeout=30)
        used = sum(r["metrics"]["prompt_tokens"] + r["metrics"]["completion_tokens"] for r in answer.json()["results"])
        # the three calls were settled at their real use (about 3 x 30), not at one call's
        left = int(after.headers["x-ratelimit-remaining-tokens"])
        assert (
            1000 - used - reservation(chat(1, model="m1"))
            <= left
            <= 1000 - used - reservation(chat(1, model="m1")) + 20
        )


def test_calls_refused_by_their_key_are_counted_as_rejected() -> None:
    """A call over its key's limits is refused by its handler (the body says what it costs), not by the Guard: it
    counts in gateway_rejected_total like the Guard's refusals, under its model (a fan-out's: unknown)."""
    with limited({"rpm": 2}, models=("m", "n")) as url:
        assert httpx.post(f"{url}/v1/chat/completions", json=chat(4), headers=AUTH, timeout=30).status_code == 200
        assert httpx.post(f"{url}/v1/chat/completions", json=chat(4), headers=AUTH, timeout=30).status_code == 200
        assert httpx.post(f"{url}/v1/chat/completions", json=chat(4), headers=AUTH, timeout=30).status_code == 429
        fanout = {"models": ["m", "n"], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        assert (
            httpx.post(f"{url}/v1/compare/chat/completions", json=fanout, headers=AUTH, timeout=30).status_code == 429
        )
        text = httpx.get(f"{url}/metrics", timeout=30).text
    assert metric(text, "gateway_rejected_total", model="m", reason="rate_limited") == 1
    assert metric(text, "gateway_rejected_total", model="unknown", reason="rate_limited") == 1
