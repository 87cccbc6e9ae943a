"""Reasoning told apart from the answer (issue #15): the stream observer on vLLM's shapes (``reasoning``, the older
``reasoning_content``), on ``<think>`` tags left in the content by a server without a reasoning parser, and on
DeepSeek-R1's prompt-opened thinking; the fast path (plain chunks scanned, not parsed) agrees with the parse."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.relay.sse import SSEFramer, StreamObserver, split_answer


def chunk(delta: dict[str, Any] | None = None, *, finish: str | None = None, usage: dict[str, Any] | None = None,
          text: str | None = None) -> bytes:  # fmt: skip
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
    if text is not None:
        choice["text"] = text
    else:
        choice["delta"] = delta or {}
    obj: dict[str, Any] = {"id": "c", "object": "chat.completion.chunk", "choices": [choice] if usage is None else []}
    if usage is not None:
        obj["usage"] = usage
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def observe(events: list[bytes], *, keep_text: bool = False) -> StreamObserver:
    """Each event observed at t = its index (seconds), through the relay's path (framer + observe_raw)."""
    obs = StreamObserver(t0=0.0, keep_text=keep_text)
    framer = SSEFramer()
    for t, raw in enumerate([*events, b"data: [DONE]\n\n"]):
        for event in framer.feed_raw(raw):
            obs.observe_raw(event, now=float(t))
    assert obs.done
    return obs


ROLE = chunk({"role": "assistant", "content": ""})


@pytest.mark.parametrize("field", ["reasoning", "reasoning_content"])
def test_a_reasoning_parsers_stream(field: str) -> None:
    usage = {"prompt_tokens": 5, "completion_tokens": 5, "completion_tokens_details": {"reasoning_tokens": 3}}
    events = [ROLE, *(chunk({field: w}) for w in ("Let", " me", " think")), chunk({"content": "Hi"}),
              chunk({"content": "!"}, finish="stop"), chunk(usage=usage)]  # fmt: skip
    for keep in (False, True):  # the fast path, and the parse (keep_text parses every chunk)
        obs = observe(events, keep_text=keep)
        assert (obs.ttft, obs.ttfat, obs.reasoning_s) == (1.0, 4.0, 3.0)
        assert (obs.reasoning_tokens, obs.reasoning_counted, obs.answer_tokens(5)) == (3, False, 2)
        assert (obs.reasoning_chunks, obs.answer_chunks, obs.empty_answer, obs.think_in_content) == (3, 2, False, False)
        assert obs.gaps == [1.0, 1.0, 1.0, 1.0]  # every token-bearing chunk, reasoning or answer
    kept = observe(events, keep_text=True)
    assert ("".join(kept.text), "".join(kept.reasoning_text)) == ("Hi!", "Let me think")


def test_without_the_backends_count_reasoning_tokens_are_the_reasoning_chunks() -> None:
    usage = {"prompt_tokens": 5, "completion_tokens": 6}
    events = [ROLE, chunk({"reasoning": "a"}), chunk({"reasoning": "b"}), chunk({"content": "c"}, finish="stop"),
              chunk(usage=usage)]  # fmt: skip
    obs = observe(events)
    assert (obs.reasoning_tokens, obs.reasoning_counted, obs.answer_tokens(6)) == (2, True, 4)


def test_thinking_that_uses_the_whole_budget_is_an_empty_answer() -> None:
    usage = {"prompt_tokens": 5, "completion_tokens": 3, "completion_tokens_details": {"reasoning_tokens": 3}}
    events = [ROLE, chunk({"reasoning": "a"}), chunk({"reasoning": "b"}), chunk({"reasoning": "c"}, finish="length"),
              chunk(usage=usage)]  # fmt: skip
    obs = observe(events)
    assert obs.empty_answer and obs.ttfat is None and obs.ttft == 1.0
    assert obs.reasoning_s == 2.0  # first to last reasoning chunk when no answer came
    assert obs.answer_tokens(3) == 0 and obs.finish_reason == "length"


def test_a_model_that_does_not_think_has_its_first_answer_token_at_ttft() -> None:
    obs = observe([ROLE, chunk({"content": "Hello"}), chunk({"content": " there"}, finish="stop")])
    assert obs.ttft == obs.ttfat == 1.0 and obs.reasoning_s is None and obs.reasoning_tokens == 0
    assert obs.answer_tokens(2) == 2 and not obs.empty_answer


def test_think_tags_inside_the_content_count_as_reasoning_and_are_flagged() -> None:
    events = [ROLE, chunk({"content": "<think>"}), chunk({"content": "hmm"}), chunk({"content": "</think>\n\nHi"}),
              chunk({"content": " there"}, finish="stop")]  # fmt: skip
    for keep in (False, True):
        obs = observe(events, keep_text=keep)
        assert obs.think_in_content
        assert (obs.ttft, obs.ttfat, obs.reasoning_chunks, obs.answer_chunks) == (1.0, 3.0, 3, 2)
    kept = observe(events, keep_text=True)
    assert split_answer("".join(kept.text)) == ("hmm", "\n\nHi there")


def test_thinking_opened_in_the_prompt_is_found_at_its_closing_tag() -> None:
    """DeepSeek-R1's template puts ``<think>`` in the prompt: the content starts with thinking, and only the
    ``</think>`` shows it was thinking; what came before is counted again as reasoning, at its own times."""
    events = [ROLE, chunk({"content": "hmm"}), chunk({"content": " so"}), chunk({"content": "</think>"}),
              chunk({"content": "Answer"}, finish="stop")]  # fmt: skip
    obs = observe(events)
    assert obs.think_in_content
    assert (obs.ttft, obs.ttfat, obs.reasoning_s) == (1.0, 4.0, 3.0)
    assert (obs.reasoning_chunks, obs.answer_chunks) == (3, 1)
    assert split_answer("hmm so</think>Answer") == ("hmm so", "Answer")


def test_a_streamed_tool_call_is_an_answer() -> None:
    call = {"index": 0, "id": "t1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    obs = observe([ROLE, chunk({"reasoning": "plan"}), chunk({"tool_calls": [call]}, finish="tool_calls")])
    assert (obs.ttft, obs.ttfat) == (1.0, 2.0) and not obs.empty_answer


def test_completions_text_is_the_answer() -> None:
    obs = observe([chunk(text="Hello"), chunk(text=" world", finish="length")])
    assert obs.ttft == obs.ttfat == 0.0 and obs.answer_chunks == 2


def test_a_non_streaming_answer_says_whether_it_reasoned_and_answered() -> None:
    def answer(message: dict[str, Any], details: int | None) -> StreamObserver:
        usage: dict[str, Any] = {"prompt_tokens": 4, "completion_tokens": 9}
        if details is not None:
            usage["completion_tokens_details"] = {"reasoning_tokens": details}
        obs = StreamObserver(t0=0.0, keep_text=True)
        obs.observe_answer({"choices": [{"index": 0, "message": message, "finish_reason": "stop"}], "usage": usage})
        return obs

    obs = answer({"role": "assistant", "reasoning": "think", "content": "Hi"}, 7)
    assert (obs.reasoning_tokens, obs.answer_tokens(9), obs.empty_answer) == (7, 2, False)
    assert (obs.reasoning_text, obs.text) == (["think"], ["Hi"])
    assert answer({"role": "assistant", "reasoning": "think", "content": None}, 9).empty_answer
    tagged = answer({"role": "assistant", "content": "<think>x</think>"}, None)
    assert tagged.think_in_content and tagged.empty_answer


def test_split_answer() -> None:
    assert split_answer("plain") == ("", "plain")
    assert split_answer("<think>a</think>b") == ("a", "b")
    assert split_answer("<think>never closed") == ("never closed", "")
