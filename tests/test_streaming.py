from __future__ import annotations

import json

import pytest

from gateway.relay.sse import Event, SSEFramer, StreamObserver


def chunk(content: str | None = None, *, role: bool = False, finish: str | None = None) -> bytes:
    delta: dict[str, str] = {"role": "assistant", "content": ""} if role else {}
    if content is not None:
        delta["content"] = content
    obj = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}\n\n'
STREAM = chunk(role=True) + chunk("Hel") + chunk("lo") + chunk("!") + chunk("", finish="stop") + USAGE
STREAM += b"data: [DONE]\n\n"


def frame_all(data: bytes, sizes: list[int]) -> list[Event]:
    framer = SSEFramer()
    events: list[Event] = []
    pos = 0
    for size in sizes:
        events += framer.feed(data[pos : pos + size])
        pos += size
    events += framer.feed(data[pos:])
    tail = framer.flush()
    return events + ([tail] if tail else [])


def test_events_are_forwarded_byte_for_byte() -> None:
    events = frame_all(STREAM, [])
    assert b"".join(e.raw for e in events) == STREAM
    assert [e.data for e in events][-1] == "[DONE]"
    assert len(events) == 7


@pytest.mark.parametrize("split", range(1, 60))
def test_split_at_every_byte(split: int) -> None:
    """Reads that cut lines (and the blank line between events) anywhere give the same events."""
    events = frame_all(STREAM, [split] * (len(STREAM) // split))
    assert b"".join(e.raw for e in events) == STREAM
    assert [e.data for e in events] == [e.data for e in frame_all(STREAM, [])]


@pytest.mark.parametrize("split", [1, 2, 3, 7, 1000])
def test_crlf_and_cr_line_endings(split: int) -> None:
    for ending in (b"\r\n", b"\r"):
        data = STREAM.replace(b"\n", ending)
        events = frame_all(data, [split] * (len(data) // split))
        assert b"".join(e.raw for e in events) == data
        assert [e.data for e in events] == [e.data for e in frame_all(STREAM, [])]


def test_comments_multiline_data_and_no_space() -> None:
    data = b': keep-alive\n\ndata:{"a":1}\n\ndata: line1\ndata: line2\nid: 3\n\n'
    events = frame_all(data, [5, 5, 5])
    assert [e.data for e in events] == [None, '{"a":1}', "line1\nline2"]


def test_unterminated_tail_is_flushed() -> None:
    framer = SSEFramer()
    assert framer.feed(b'data: {"x": 1}\n\ndata: [DO') != []
    tail = framer.flush()
    assert tail is not None and tail.data == "[DO"
    assert framer.flush() is None


def test_oversized_event_is_refused() -> None:
    framer = SSEFramer(max_event_bytes=100)
    with pytest.raises(ValueError, match="exceeded"):
        framer.feed(b"data: " + b"x" * 200)


def observe_all(data: bytes, times: list[float]) -> tuple[StreamObserver, list[bool]]:
    obs = StreamObserver(t0=10.0, keep_text=True)
    flags = [obs.observe(e, now=t) for e, t in zip(frame_all(data, []), times, strict=True)]
    return obs, flags


def test_observer_times_only_token_bearing_chunks() -> None:
    # role-only chunk at 10.05 does not count; tokens at 10.2, 10.22, 10.25; the finish chunk (empty) neither
    obs, flags = observe_all(STREAM, [10.05, 10.2, 10.22, 10.25, 10.26, 10.27, 10.28])
    assert obs.ttft == pytest.approx(0.2)
    assert obs.gaps == pytest.approx([0.02, 0.03])
    assert obs.e2e == pytest.approx(0.25)
    assert obs.usage is not None and (obs.usage.prompt_tokens, obs.usage.completion_tokens) == (7, 3)
    assert obs.tpot == pytest.approx(0.05 / 2)  # (E2E - TTFT) / (completion_tokens - 1)
    assert obs.done and obs.finish_reason == "stop" and obs.error is None
    assert "".join(obs.text) == "Hello!"
    assert flags == [False, False, False, False, False, True, False]  # only the usage-only chunk is flagged


def test_reasoning_tool_calls_and_completions_text_count_as_tokens() -> None:
    for choice in (
        {"delta": {"reasoning_content": "hmm"}},
        {"delta": {"reasoning": "hmm"}},
        {"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{"}}]}},
        {"text": "x"},
    ):
        obs = StreamObserver(t0=0.0)
        obs.observe(Event(b"", json.dumps({"choices": [choice]})), now=1.0)
        assert obs.ttft == 1.0, choice
    obs = StreamObserver(t0=0.0)
    obs.observe(Event(b"", json.dumps({"choices": [{"text": ""}]})), now=1.0)
    assert obs.ttft is None


def test_in_stream_error_is_recorded() -> None:
    obs = StreamObserver(t0=0.0)
    obs.observe(Event(b"", '{"error": {"message": "boom", "code": 500}}'))
    assert obs.error == {"message": "boom", "code": 500}


def test_tpot_needs_two_tokens() -> None:
    obs, _ = observe_all(chunk("a") + b'data: {"choices":[],"usage":{"completion_tokens":1}}\n\n', [11.0, 11.1])
    assert obs.ttft == pytest.approx(1.0) and obs.tpot is None


SCAN_CASES = [
    '{"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}',
    '{"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}',
    '{"choices":[{"index":0,"delta":{"content":null,"reasoning_content":"hmm"}}]}',
    '{"choices":[{"index":0,"delta":{"reasoning":"x"}}]}',
    '{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{}"}}]}}]}',
    '{"choices":[{"index":0,"delta":{"tool_calls":[]}}]}',
    '{"choices":[{"index":0,"delta":{"content":"say \\"content\\":\\"x\\" and \\"usage\\":{"}}]}',
    '{"choices":[{"index":0,"delta":{"content":""},"finish_reason":"length"}]}',
    '{"choices":[{"index":0,"text":"abc","finish_reason":"stop"}]}',
    '{"choices":[{"index":0,"text":"","finish_reason":null}]}',
    '{ "choices" : [ { "index" : 0, "delta" : { "content" : "spaced" }, "finish_reason" : "stop" } ] }',
    '{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}',
    '{"choices":[{"index":0,"delta":{"content":"x"}}],"usage":null}',
]


@pytest.mark.parametrize("data", SCAN_CASES)
def test_the_scan_agrees_with_parsing(data: str) -> None:
    """The observer's fast path (a scan of the event's bytes) decides exactly what parsing the chunk decides."""
    fast, parsed = StreamObserver(t0=0.0), StreamObserver(t0=0.0, keep_text=True)  # keep_text forces parsing
    raw = b"data: " + data.encode() + b"\n\n"
    assert fast.observe_raw(raw, now=1.0) == parsed.observe(Event(raw=raw, data=data), now=1.0)
    assert (fast.first_token, fast.finish_reason, fast.usage) == (
        parsed.first_token,
        parsed.finish_reason,
        parsed.usage,
    )
