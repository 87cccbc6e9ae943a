"""The emulator thinks (issue #15 item 6): reasoning chunks before the answer in vLLM 0.32's shapes (``reasoning``,
``reasoning_content`` for older servers, or ``<think>`` inside the content without a parser), thinking switched off
per request, thinking that uses up ``max_tokens``, ``completion_tokens_details`` exactly when vLLM reports it, and
the timing (the first answer token one ITL per reasoning token after the TTFT). Emulators on real sockets."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from gateway import cli
from gateway.config import ConfigError
from gateway.devstack import stack
from gateway.devstack.emulator import EmulatorConfig
from tests.conftest import card, settings_for
from tests.servers import emulators, samples

MSG = [{"role": "user", "content": "Think about the weather, then say something"}]
THINK, ANSWER = 5, 4  # the fast emulators' reasoning and answer tokens
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"],
}
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": SCHEMA}}]
FIELDS = ("reasoning", "reasoning_content")


@pytest.fixture(scope="module")
def urls() -> Iterator[dict[str, str]]:
    """One delay-free emulator per way of thinking, plus one that does not think, and one with the issue's timing."""
    fast: dict[str, Any] = {"ttft_ms": 0, "itl_ms": 0, "output_tokens": ANSWER, "reasoning_tokens": THINK}
    configs = {
        "reasoning": EmulatorConfig(model="m", **fast),
        "reasoning_content": EmulatorConfig(model="m", **fast, reasoning_field="reasoning_content"),
        "think": EmulatorConfig(model="m", **fast, think_in_content=True),
        "none": EmulatorConfig(model="m", ttft_ms=0, itl_ms=0, output_tokens=ANSWER),
        "timed": EmulatorConfig(model="m", ttft_ms=50, itl_ms=10, output_tokens=ANSWER, reasoning_tokens=20),
    }
    with emulators(configs) as urls:
        yield urls


def post(url: str, body: dict[str, Any], path: str = "/v1/chat/completions") -> httpx.Response:
    return httpx.post(f"{url}{path}", json={"model": "m", "messages": MSG, **body}, timeout=30)


def events(url: str, body: dict[str, Any], path: str = "/v1/chat/completions") -> list[dict[str, Any]]:
    """A stream's chunks (usage included), the role-only first chunk and ``[DONE]`` checked and left out."""
    text = post(url, {**body, "stream": True, "stream_options": {"include_usage": True}}, path).text
    lines = [line.removeprefix("data: ") for line in text.split("\n\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    if path.endswith("chat/completions"):
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        return chunks[1:]
    return chunks


def deltas(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c["choices"][0]["delta"] for c in chunks if c["choices"]]


def usage(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    assert chunks[-1]["choices"] == []
    return dict(chunks[-1]["usage"])


@pytest.mark.parametrize("field", FIELDS)
def test_streamed_thinking_comes_first_one_token_a_chunk(urls: dict[str, str], field: str) -> None:
    chunks = events(urls[field], {})
    got = deltas(chunks)
    assert len(got) == THINK + ANSWER
    for delta in got[:THINK]:
        assert list(delta) == [field] and isinstance(delta[field], str) and delta[field]
    for delta in got[THINK:]:
        assert list(delta) == ["content"] and delta["content"]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes == [None] * (THINK + ANSWER - 1) + ["stop"]
    assert usage(chunks) == {
        "prompt_tokens": usage(chunks)["prompt_tokens"],
        "total_tokens": usage(chunks)["prompt_tokens"] + THINK + ANSWER,
        "completion_tokens": THINK + ANSWER,
        "completion_tokens_details": {"reasoning_tokens": THINK},
    }


@pytest.mark.parametrize("field", FIELDS)
def test_whole_answer_carries_the_thinking_in_its_field(urls: dict[str, str], field: str) -> None:
    body = post(urls[field], {"seed": 7}).json()
    message = body["choices"][0]["message"]
    other = ({*FIELDS} - {field}).pop()
    assert isinstance(message[field], str) and len(message[field].split()) == THINK
    assert other not in message
    assert isinstance(message["content"], str) and len(message["content"].split()) == ANSWER
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == THINK + ANSWER
    assert body["usage"]["completion_tokens_details"] == {"reasoning_tokens": THINK}
    # the same seed streams the same thinking and answer
    got = deltas(events(urls[field], {"seed": 7}))
    assert "".join(d.get(field, "") for d in got) == message[field]
    assert "".join(d.get("content", "") for d in got) == message["content"]


def test_the_official_sdk_reads_the_thinking(urls: dict[str, str]) -> None:
    client: Any = openai.OpenAI(base_url=f"{urls['reasoning']}/v1", api_key="none", max_retries=0)
    whole = client.chat.completions.create(model="m", messages=MSG)
    assert whole.choices[0].message.model_extra["reasoning"] and whole.choices[0].message.content
    assert whole.usage.completion_tokens_details.reasoning_tokens == THINK
    stream = client.chat.completions.create(
        model="m", messages=MSG, stream=True, stream_options={"include_usage": True}
    )
    kinds, last = [], None
    for chunk in stream:
        last = chunk
        for choice in chunk.choices:
            if (choice.delta.model_extra or {}).get("reasoning"):
                kinds.append("reasoning")
            elif choice.delta.content:
                kinds.append("content")
    assert kinds == ["reasoning"] * THINK + ["content"] * ANSWER
    assert last is not None and last.usage.completion_tokens_details.reasoning_tokens == THINK


def test_think_in_content_wraps_the_thinking_in_tags(urls: dict[str, str]) -> None:
    """Without a parser: ``<think>`` opens the first reasoning token, ``</think>`` closes the last, the answer's
    first token starts with a blank line; no reasoning field and no completion_tokens_details."""
    chunks = events(urls["think"], {"seed": 3})
    got = deltas(chunks)
    assert all(list(d) == ["content"] for d in got) and len(got) == THINK + ANSWER
    texts = [d["content"] for d in got]
    assert texts[0].startswith("<think>") and texts[THINK - 1].endswith("</think>")
    assert texts[THINK].startswith("\n\n") and "think>" not in "".join(texts[1 : THINK - 1] + texts[THINK:])
    text = "".join(texts)
    assert re.fullmatch(r"<think>( \S+){5}</think>\n\n( \S+){4}", text), text
    assert usage(chunks) == {
        "prompt_tokens": usage(chunks)["prompt_tokens"],
        "total_tokens": usage(chunks)["prompt_tokens"] + THINK + ANSWER,
        "completion_tokens": THINK + ANSWER,
    }
    whole = post(urls["think"], {"seed": 3}).json()
    assert whole["choices"][0]["message"]["content"] == text and whole["choices"][0]["message"]["reasoning"] is None
    assert "completion_tokens_details" not in whole["usage"]


@pytest.mark.parametrize("switch", [{"chat_template_kwargs": {"enable_thinking": False}}, {"reasoning_effort": "none"}])
@pytest.mark.parametrize("name", ["reasoning", "reasoning_content", "think"])
def test_thinking_switched_off_per_request(urls: dict[str, str], name: str, switch: dict[str, Any]) -> None:
    """Qwen3's switch: no thinking at all. With a parser vLLM still details usage, with 0 reasoning tokens."""
    chunks = events(urls[name], switch)
    got = deltas(chunks)
    assert all(list(d) == ["content"] for d in got) and len(got) == ANSWER
    assert "think>" not in "".join(d["content"] for d in got)
    details = usage(chunks).get("completion_tokens_details")
    assert details == (None if name == "think" else {"reasoning_tokens": 0})
    assert usage(chunks)["completion_tokens"] == ANSWER
    whole = post(urls[name], switch).json()
    message = whole["choices"][0]["message"]
    assert message.get("reasoning") is None and message.get("reasoning_content") is None
    assert len(message["content"].split()) == ANSWER
    # thinking stays on when the switch says so
    on = {"chat_template_kwargs": {"enable_thinking": True}, "reasoning_effort": "high"}
    assert len(deltas(events(urls[name], on))) == THINK + ANSWER


@pytest.mark.parametrize("limit", [1, THINK - 1, THINK])
@pytest.mark.parametrize("name", ["reasoning", "reasoning_content", "think"])
def test_thinking_that_uses_up_max_tokens_ends_with_length_and_no_answer(
    urls: dict[str, str], name: str, limit: int
) -> None:
    chunks = events(urls[name], {"max_tokens": limit})
    got = deltas(chunks)
    assert len(got) == limit
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    if name == "think":
        texts = [d["content"] for d in got]
        assert texts[0].startswith("<think>") and "</think>" not in "".join(texts)  # cut short: left open
    else:
        assert all(list(d) == [name] for d in got)
    u = usage(chunks)
    assert u["completion_tokens"] == limit
    assert u.get("completion_tokens_details") == (None if name == "think" else {"reasoning_tokens": limit})
    whole = post(urls[name], {"max_completion_tokens": limit}).json()
    choice = whole["choices"][0]
    assert choice["finish_reason"] == "length" and whole["usage"]["completion_tokens"] == limit
    if name != "think":
        assert choice["message"]["content"] is None and len(choice["message"][name].split()) == limit


def test_the_answer_gets_what_thinking_leaves_of_max_tokens(urls: dict[str, str]) -> None:
    chunks = events(urls["reasoning"], {"max_tokens": THINK + 2})
    got = deltas(chunks)
    assert ["/".join(d) for d in got] == ["reasoning"] * THINK + ["content"] * 2
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert usage(chunks)["completion_tokens_details"] == {"reasoning_tokens": THINK}
    # a budget larger than thinking and answer: the answer is output_tokens long and stops
    roomy = post(urls["reasoning"], {"max_tokens": 100}).json()
    assert roomy["choices"][0]["finish_reason"] == "stop" and roomy["usage"]["completion_tokens"] == THINK + ANSWER
    # ignore_eos: the answer fills the rest
    filled = post(urls["reasoning"], {"max_tokens": 12, "ignore_eos": True}).json()
    assert filled["usage"]["completion_tokens"] == 12 and len(filled["choices"][0]["message"]["content"].split()) == 7


def test_completions_never_think(urls: dict[str, str]) -> None:
    """vLLM's reasoning parser works on chat only: a completion is plain text, whatever the emulator's thinking."""
    for name in ("reasoning", "think"):
        chunks = events(urls[name], {"prompt": "hello"}, "/v1/completions")
        texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
        assert len(texts) == ANSWER and "think>" not in "".join(texts)
        assert usage(chunks)["completion_tokens"] == ANSWER and "completion_tokens_details" not in usage(chunks)


def test_no_thinking_no_details(urls: dict[str, str]) -> None:
    """An emulator that does not think is a server without a reasoning parser: no details, ``reasoning`` null."""
    chunks = events(urls["none"], {})
    assert "completion_tokens_details" not in usage(chunks)
    whole = post(urls["none"], {}).json()
    assert whole["choices"][0]["message"]["reasoning"] is None and "completion_tokens_details" not in whole["usage"]


def test_every_choice_thinks_first(urls: dict[str, str]) -> None:
    chunks = events(urls["reasoning"], {"n": 2})
    for index in (0, 1):
        own = [c["choices"][0]["delta"] for c in chunks if c["choices"] and c["choices"][0]["index"] == index]
        own = [d for d in own if "role" not in d]  # the second choice's role chunk
        assert ["/".join(d) for d in own] == ["reasoning"] * THINK + ["content"] * ANSWER
    assert usage(chunks)["completion_tokens"] == 2 * (THINK + ANSWER)
    assert usage(chunks)["completion_tokens_details"] == {"reasoning_tokens": 2 * THINK}
    whole = post(urls["reasoning"], {"n": 2}).json()
    assert all(c["message"]["reasoning"] and c["message"]["content"] for c in whole["choices"])


def test_tool_calls_and_json_come_after_the_thinking(urls: dict[str, str]) -> None:
    url = urls["reasoning"]
    named = {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "weather"}}}
    got = deltas(events(url, named))
    assert [list(d) for d in got[:THINK]] == [["reasoning"]] * THINK
    calls = [d["tool_calls"][0] for d in got[THINK:]]
    assert calls[0]["function"]["name"] == "weather" and calls[0]["id"].startswith("chatcmpl-tool-")
    jsonschema.validate(json.loads("".join(c["function"]["arguments"] for c in calls)), SCHEMA)
    whole = post(url, named).json()["choices"][0]
    assert whole["message"]["reasoning"] and whole["finish_reason"] == "stop"
    jsonschema.validate(json.loads(whole["message"]["tool_calls"][0]["function"]["arguments"]), SCHEMA)
    # cut short while thinking: no call at all
    short = post(url, {**named, "max_tokens": 2}).json()["choices"][0]
    assert short["finish_reason"] == "length" and "tool_calls" not in short["message"]
    fmt = {"response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA}}}
    got = deltas(events(url, fmt))
    assert ["/".join(d) for d in got[:THINK]] == ["reasoning"] * THINK
    jsonschema.validate(json.loads("".join(d["content"] for d in got[THINK:])), SCHEMA)
    whole = post(url, fmt).json()["choices"][0]["message"]
    assert whole["reasoning"] and jsonschema.validate(json.loads(whole["content"]), SCHEMA) is None


def test_without_a_parser_structured_output_leaves_no_room_to_think(urls: dict[str, str]) -> None:
    """vLLM without a reasoning parser constrains a tool call's arguments or ``response_format`` JSON from the first
    token: the model cannot open a ``<think>``."""
    named = {"tools": TOOLS, "tool_choice": "required"}
    got = deltas(events(urls["think"], named))
    assert all("/".join(d) == "tool_calls" for d in got)
    jsonschema.validate(json.loads("".join(d["tool_calls"][0]["function"]["arguments"] for d in got)), SCHEMA)
    fmt = {"response_format": {"type": "json_object"}}
    whole = post(urls["think"], fmt).json()
    assert json.loads(whole["choices"][0]["message"]["content"]) and whole["usage"]["completion_tokens"] < 20


def test_logprobs_cover_the_thinking_tokens_too(urls: dict[str, str]) -> None:
    chunks = events(urls["reasoning"], {"logprobs": True, "top_logprobs": 2})
    token_chunks = [c["choices"][0] for c in chunks if c["choices"]]
    assert all(len(c["logprobs"]["content"]) == 1 for c in token_chunks) and len(token_chunks) == THINK + ANSWER
    whole = post(urls["reasoning"], {"logprobs": True}).json()["choices"][0]
    assert len(whole["logprobs"]["content"]) == THINK + ANSWER


def test_include_reasoning_false_hides_the_thinking_not_its_cost(urls: dict[str, str]) -> None:
    """As vLLM: no reasoning deltas (and no logprobs at all), the reasoning tokens still counted."""
    chunks = events(urls["reasoning"], {"include_reasoning": False, "logprobs": True})
    got = [c["choices"][0] for c in chunks if c["choices"]]
    assert [list(c["delta"]) for c in got] == [["content"]] * ANSWER
    assert all(c["logprobs"] is None for c in got)
    assert usage(chunks)["completion_tokens_details"] == {"reasoning_tokens": THINK}
    cut = deltas(events(urls["reasoning"], {"include_reasoning": False, "max_tokens": 2}))
    assert cut == [{}]  # only the finishing chunk, empty, as vLLM sends it
    whole = post(urls["reasoning"], {"include_reasoning": False}).json()["choices"][0]
    assert whole["message"]["reasoning"] is None and whole["message"]["content"]


def test_thinking_token_budget_caps_the_thinking(urls: dict[str, str]) -> None:
    got = deltas(events(urls["reasoning"], {"thinking_token_budget": 2}))
    assert ["/".join(d) for d in got] == ["reasoning"] * 2 + ["content"] * ANSWER
    assert len(deltas(events(urls["reasoning"], {"thinking_token_budget": -1}))) == THINK + ANSWER


@pytest.mark.parametrize(
    "bad",
    [
        {"thinking_token_budget": -2},
        {"thinking_token_budget": 1.5},
        {"reasoning_effort": "enormous"},
        {"chat_template_kwargs": ["enable_thinking"]},
        {"include_reasoning": "no"},
    ],
)
def test_bad_thinking_fields_are_refused(urls: dict[str, str], bad: dict[str, Any]) -> None:
    r = post(urls["reasoning"], bad)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == f"body.{next(iter(bad))}"


def test_first_answer_token_after_ttft_plus_an_itl_per_reasoning_token(urls: dict[str, str]) -> None:
    """TTFT 50 ms, ITL 10 ms, 20 reasoning tokens: the first reasoning token at 50 ms, the first answer token at
    250 ms (one-sided margins: a loaded machine is late, never early). The engine metrics count the thinking: its
    generation tokens include the reasoning tokens, its TTFT is the first token of any kind."""
    url = urls["timed"]
    before = httpx.get(f"{url}/metrics").text
    body = {"model": "m", "messages": MSG, "stream": True}
    first_reasoning = first_answer = None
    kinds: list[str] = []
    with httpx.Client(timeout=30) as client:
        start = time.perf_counter()
        with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                delta = json.loads(line[6:])["choices"][0]["delta"]
                if delta.get("reasoning"):
                    kinds.append("reasoning")
                    first_reasoning = first_reasoning or time.perf_counter() - start
                elif delta.get("content"):
                    kinds.append("content")
                    first_answer = first_answer or time.perf_counter() - start
    assert kinds == ["reasoning"] * 20 + ["content"] * ANSWER
    assert first_reasoning is not None and 0.05 <= first_reasoning < 0.05 + 0.5
    assert first_answer is not None and 0.25 <= first_answer < 0.25 + 0.5
    after = httpx.get(f"{url}/metrics").text

    def grew(name: str) -> float:
        return sum(samples(after, name)) - sum(samples(before, name))

    assert grew("vllm:generation_tokens_total") == 20 + ANSWER
    assert grew("vllm:time_to_first_token_seconds_count") == 1
    assert 0.05 <= grew("vllm:time_to_first_token_seconds_sum") < 0.05 + 0.2
    assert grew("vllm:request_generation_tokens_sum") == 20 + ANSWER


def test_command_line_and_devstack_settings_reach_the_emulator() -> None:
    args = cli.build_parser().parse_args(
        ["emulate", "--model", "m", "--reasoning-tokens", "20", "--reasoning-field", "reasoning_content"]
    )
    assert (args.reasoning_tokens, args.reasoning_field, args.think_in_content) == (20, "reasoning_content", False)
    assert cli.build_parser().parse_args(["emulate", "--model", "m", "--think-in-content"]).think_in_content
    argv = stack.emulator_argv(
        "m", 9, {"reasoning_tokens": 20, "reasoning_field": "reasoning", "think_in_content": True}
    )
    assert argv[-5:] == ["--reasoning-tokens", "20", "--reasoning-field", "reasoning", "--think-in-content"]
    off = stack.emulator_argv("m", 9, {"think_in_content": False})
    assert "--think-in-content" not in off
    # a devstack config's emulator: section names them as the config file does
    thinking = {"reasoning_tokens": 20, "reasoning_field": "reasoning_content", "think_in_content": True}
    backend = {"name": "b", "base_url": "http://127.0.0.1:1", "models": ["m"], "emulator": thinking}
    settings = settings_for([backend], [card("m", "qwen3", "Alibaba", "CN")])
    argv = stack.backend_argv("emulated", settings.backends[0], 9, 0)
    parsed = cli.build_parser().parse_args(argv[argv.index("emulate") :])
    assert (parsed.reasoning_tokens, parsed.reasoning_field, parsed.think_in_content) == (20, "reasoning_content", True)
    with pytest.raises(ConfigError, match="reasoning_field"):
        settings_for([{**backend, "emulator": {"reasoning_field": "thoughts"}}], [card("m", "qwen3", "Alibaba", "CN")])
    with pytest.raises(ValueError, match="reasoning_tokens"):
        EmulatorConfig(model="m", reasoning_tokens=-1)
