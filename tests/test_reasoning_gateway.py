"""The gateway measures thinking (issue #15's done-when), against emulators that think: TTFT 50 ms, ITL 10 ms and 20
reasoning tokens before an answer of 8. The time to first answer token is about 250 ms (within 15 ms, the issue's
bound), the TTFT stays at about 50 ms, reasoning tokens grow by 20 per call and answer tokens by 8, whichever way
the backend shows its thinking (``reasoning``, ``reasoning_content``, ``<think>`` in the content); thinking that uses
up ``max_tokens`` is an empty answer; a request that does not think answers at its TTFT; and whole (non-streamed)
answers are split by their ``completion_tokens_details``."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from tests.conftest import card, settings_for
from tests.servers import ThreadServer, emulator_process, samples

TTFT, ITL, THINK, ANSWER = 0.050, 0.010, 20, 8
TTFAT = TTFT + THINK * ITL  # 250 ms
TOLERANCE = 0.015  # the bound, for its done-when test (10 calls)
# The other tests prove what is counted, not timing precision: a token cannot come before its schedule (the lower
# bound is causal), and a loaded 2-core machine was seen adding 15 ms to a mean of 5 (the upper bound's margin).
LATE = 0.060
MODELS: dict[str, dict[str, Any]] = {  # model: how its emulator shows the thinking
    "m-reasoning": {},
    "m-reasoning-content": {"reasoning_field": "reasoning_content"},
    "m-think": {"think_in_content": True},
}
OFF: dict[str, Any] = {"chat_template_kwargs": {"enable_thinking": False}}


@pytest.fixture(scope="module")
def gateway() -> Iterator[str]:
    """The three emulators as processes of their own (timed streams must not share the test's interpreter lock),
    and a gateway in front."""
    timing: dict[str, Any] = {
        "ttft_ms": TTFT * 1000,
        "itl_ms": ITL * 1000,
        "output_tokens": ANSWER,
        "reasoning_tokens": THINK,
    }
    with contextlib.ExitStack() as stack:
        urls = {m: stack.enter_context(emulator_process(m, **timing, **extra)) for m, extra in MODELS.items()}
        backends = [{"name": f"{m}-b", "base_url": url, "models": [m]} for m, url in urls.items()]
        cards = [card(m, "qwen3", "Alibaba", "CN", aliases=[]) for m in MODELS]
        with ThreadServer(create_app(settings_for(backends, cards))) as gw:
            yield gw.url


def scrape(url: str) -> str:
    return httpx.get(f"{url}/metrics").text


def total(text: str, name: str, model: str) -> float:
    return sum(samples(text, name, model=model))


def calls(url: str, model: str, count: int, stream: bool = True, **extra: Any) -> dict[str, float]:
    """Make ``count`` sequential calls; what each metric of ``model`` grew by, once all were recorded."""
    before = scrape(url)
    body = {"model": model, "messages": [{"role": "user", "content": "think, then answer"}], "stream": stream}
    with httpx.Client(timeout=30) as client:
        for _ in range(count):
            response = client.post(f"{url}/v1/chat/completions", json={**body, **extra})
            assert response.status_code == 200
    deadline = time.monotonic() + 15
    while True:  # calls are recorded when their relay ends, just after the client has the last byte
        after = scrape(url)
        done = total(after, "gateway_requests_total", model) - total(before, "gateway_requests_total", model)
        if done >= count:
            break
        assert time.monotonic() < deadline, f"only {done} of {count} calls recorded"
        time.sleep(0.05)
    names = [
        "gateway_time_to_first_token_seconds_sum",
        "gateway_time_to_first_token_seconds_count",
        "gateway_time_to_first_answer_token_seconds_sum",
        "gateway_time_to_first_answer_token_seconds_count",
        "gateway_reasoning_duration_seconds_count",
        "gateway_reasoning_tokens_total",
        "gateway_answer_tokens_total",
        "gateway_completion_tokens_total",
        "gateway_empty_answers_total",
    ]
    return {n.removeprefix("gateway_"): total(after, n, model) - total(before, n, model) for n in names}


def mean(grew: dict[str, float], histogram: str) -> float:
    assert grew[f"{histogram}_count"] > 0
    return grew[f"{histogram}_sum"] / grew[f"{histogram}_count"]


def test_first_answer_token_at_ttft_plus_thinking(gateway: str) -> None:
    """The issue's done-when: 10 streamed calls; TTFAT mean within 15 ms of 250 ms, reasoning tokens +20 a call,
    TTFT mean within 15 ms of 50 ms."""
    n = 10
    grew = calls(gateway, "m-reasoning", n)
    ttfat = mean(grew, "time_to_first_answer_token_seconds")
    ttft = mean(grew, "time_to_first_token_seconds")
    print(f"TTFAT mean {ttfat * 1000:.1f} ms, TTFT mean {ttft * 1000:.1f} ms")  # the report quotes them (-s)
    assert abs(ttfat - TTFAT) <= TOLERANCE, ttfat
    assert abs(ttft - TTFT) <= TOLERANCE, ttft
    assert grew["time_to_first_answer_token_seconds_count"] == n
    assert grew["reasoning_duration_seconds_count"] == n
    assert grew["reasoning_tokens_total"] == THINK * n
    assert grew["answer_tokens_total"] == ANSWER * n
    assert grew["completion_tokens_total"] == (THINK + ANSWER) * n
    assert grew["empty_answers_total"] == 0


@pytest.mark.parametrize("model", ["m-reasoning-content", "m-think"])
def test_other_ways_of_showing_thinking_count_alike(gateway: str, model: str) -> None:
    """``reasoning_content`` (reported in usage, like ``reasoning``) and ``<think>`` in the content (no usage
    details: the gateway counts the reasoning chunks) measure the same."""
    n = 5
    grew = calls(gateway, model, n)
    assert TTFAT <= mean(grew, "time_to_first_answer_token_seconds") <= TTFAT + LATE
    assert TTFT <= mean(grew, "time_to_first_token_seconds") <= TTFT + LATE
    assert grew["reasoning_tokens_total"] == THINK * n
    assert grew["answer_tokens_total"] == ANSWER * n
    assert grew["empty_answers_total"] == 0


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("limit", [THINK, 10])
def test_thinking_that_uses_up_max_tokens_is_an_empty_answer(gateway: str, model: str, limit: int) -> None:
    grew = calls(gateway, model, 1, max_tokens=limit)
    assert grew["empty_answers_total"] == 1
    assert grew["time_to_first_answer_token_seconds_count"] == 0
    assert grew["reasoning_tokens_total"] == limit
    assert grew["answer_tokens_total"] == 0


@pytest.mark.parametrize("model", list(MODELS))
def test_no_thinking_answers_at_ttft(gateway: str, model: str) -> None:
    """``enable_thinking: false``: the first answer token is the first token."""
    grew = calls(gateway, model, 3, **OFF)
    ttfat = mean(grew, "time_to_first_answer_token_seconds")
    assert TTFT <= ttfat <= TTFT + LATE
    assert abs(ttfat - mean(grew, "time_to_first_token_seconds")) < 0.001
    assert grew["reasoning_tokens_total"] == 0 and grew["reasoning_duration_seconds_count"] == 0
    assert grew["answer_tokens_total"] == ANSWER * 3


@pytest.mark.parametrize("model", ["m-reasoning", "m-reasoning-content"])
def test_whole_answers_are_split_by_their_usage_details(gateway: str, model: str) -> None:
    """Non-streamed: no times, but ``completion_tokens_details.reasoning_tokens`` splits the tokens, and a message
    with thinking and no content is an empty answer."""
    grew = calls(gateway, model, 2, stream=False)
    assert grew["reasoning_tokens_total"] == THINK * 2 and grew["answer_tokens_total"] == ANSWER * 2
    assert grew["empty_answers_total"] == 0 and grew["time_to_first_answer_token_seconds_count"] == 0
    empty = calls(gateway, model, 1, stream=False, max_tokens=12)
    assert empty["empty_answers_total"] == 1
    assert empty["reasoning_tokens_total"] == 12 and empty["answer_tokens_total"] == 0
