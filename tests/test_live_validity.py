"""#16 item 5: tool calls and structured output checked on live traffic (``gateway.relay.validity``).

Real sockets: scripted backends (``tests.backends.Recorder``) and the oracle emulator behind a real gateway. The
counters move by kind, streamed and not; valid answers leave them at 0; the client's bytes are the backend's; a
request that asks for no structure keeps the observer's fast path (nothing kept, nothing parsed)."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from gateway.devstack.emulator import EmulatorConfig, create_emulator_app
from gateway.devstack.emulator.oracle import tool_failure
from gateway.metrics import STRUCTURED_ERRORS, TOOL_ERRORS
from gateway.relay.proxy import Exchange, Recorder
from gateway.relay.sse import StreamObserver, Usage
from gateway.relay.validity import Contract, check, contract_of
from gateway.state import Gateway
from tests.backends import Recorder as Backend
from tests.conftest import card, settings_for
from tests.servers import REPO, ThreadServer, metric, samples

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
MSG = [{"role": "user", "content": "hi"}]
# Three calls, one of each kind: arguments cut short, a tool the request did not offer, a number for a string.
BAD_CALLS = [("get_weather", '{"city": "Par'), ("get_time", "{}"), ("get_weather", '{"city": 5}')]


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    body = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def _tool_stream(calls: list[tuple[str, str]]) -> list[bytes]:
    out = [_chunk({"role": "assistant", "content": ""})]
    for i, (name, arguments) in enumerate(calls):
        first = {"index": i, "id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": ""}}
        out.append(_chunk({"tool_calls": [first]}))
        half = len(arguments) // 2  # the arguments arrive in pieces, as vLLM streams them
        for piece in (arguments[:half], arguments[half:]):
            out.append(_chunk({"tool_calls": [{"index": i, "function": {"arguments": piece}}]}))
    return [*out, _chunk({}, "tool_calls"), b"data: [DONE]\n\n"]


def _text_stream(pieces: list[str]) -> list[bytes]:
    return [_chunk({"role": "assistant", "content": ""}), *(_chunk({"content": p}) for p in pieces),
            _chunk({}, "stop"), b"data: [DONE]\n\n"]  # fmt: skip


def _tool_body(calls: list[tuple[str, str]]) -> bytes:
    tool_calls = [{"id": f"call_{i}", "type": "function", "function": {"name": n, "arguments": a}}
                  for i, (n, a) in enumerate(calls)]  # fmt: skip
    message = {"role": "assistant", "content": None, "tool_calls": tool_calls}
    answer = {"id": "c1", "object": "chat.completion", "model": "m",
              "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}],
              "usage": {"prompt_tokens": 5, "completion_tokens": 9}}  # fmt: skip
    return json.dumps(answer).encode()


def _text_body(content: str, finish: str = "stop") -> bytes:
    answer = {"id": "c1", "object": "chat.completion", "model": "m",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
              "usage": {"prompt_tokens": 5, "completion_tokens": 9}}  # fmt: skip
    return json.dumps(answer).encode()


BACKENDS = {  # model: what its backend answers, whatever it is asked
    "bad-tools-stream": Backend(chunks=_tool_stream(BAD_CALLS)),
    "bad-tools-body": Backend(body=_tool_body(BAD_CALLS)),
    "good-tools-stream": Backend(chunks=_tool_stream([("get_weather", '{"city": "Paris"}')])),
    "good-tools-body": Backend(body=_tool_body([("get_weather", '{"city": "Paris"}')])),
    "bad-json-stream": Backend(chunks=_text_stream(['{"a": ', "1"])),  # never closed
    "bad-json-body": Backend(body=_text_body('{"a": "one"}')),  # JSON, not of the schema
    "good-json-stream": Backend(chunks=_text_stream(['{"a": ', "1}"])),
    "good-json-body": Backend(body=_text_body('{"a": 1}')),
    "cut-json-body": Backend(body=_text_body('{"a": ', finish="length")),
}


class Spy(Recorder):
    """The gateway's recorder, keeping each call's observer so a test can see what the relay kept."""

    def __init__(self, recorder: Recorder) -> None:
        super().__init__(recorder.metrics)
        self.on_pair = recorder.on_pair
        self.observers: list[StreamObserver | None] = []

    def finished(
        self, ex: Exchange, status: int, *, e2e: float | None, usage: Usage | None,
        observer: StreamObserver | None = None,
    ) -> None:  # fmt: skip
        self.observers.append(observer)
        super().finished(ex, status, e2e=e2e, usage=usage, observer=observer)


@contextmanager
def stack() -> Iterator[tuple[str, dict[str, str], Spy]]:
    """(the gateway's URL, each model's backend URL, the spying recorder)."""
    with ExitStack() as es:
        urls = {m: es.enter_context(ThreadServer(b.app())).url for m, b in BACKENDS.items()}
        settings = settings_for(
            [{"name": f"b-{m}", "base_url": u, "models": [m]} for m, u in urls.items()],
            [card(m, "qwen3", "Alibaba", "CN", aliases=[]) for m in urls],
        )
        app = create_app(settings)
        gateway: Gateway = app.state.gateway
        spy = gateway.recorder = Spy(gateway.recorder)
        yield es.enter_context(ThreadServer(app)).url, urls, spy


@pytest.fixture(scope="module")
def live() -> Iterator[tuple[str, dict[str, str], Spy]]:
    with stack() as s:
        yield s


def _the_observer(spy: Spy) -> StreamObserver | None:
    """The one call's observer. The gateway records a stream just after its last bytes went out, so the client
    may have them first: wait for it (it failed once as a race under a loaded parallel run)."""
    deadline = time.monotonic() + 10
    while not spy.observers and time.monotonic() < deadline:
        time.sleep(0.01)
    (observer,) = spy.observers
    return observer


def _post(url: str, body: dict[str, Any]) -> bytes:
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=10)
    assert r.status_code == 200, r.text
    return r.content


def _errors(url: str, model: str) -> dict[str, dict[str, float]]:
    """The validity counters of ``model``, from one scrape (only their lines are parsed)."""
    families = ("gateway_tool_call_", "gateway_structured_output_")
    text = "\n".join(line for line in httpx.get(f"{url}/metrics").text.splitlines() if line.startswith(families))
    return {
        "tool": {k: metric(text, "gateway_tool_call_errors_total", model=model, kind=k) for k in TOOL_ERRORS},
        "structured": {
            k: metric(text, "gateway_structured_output_errors_total", model=model, kind=k) for k in STRUCTURED_ERRORS
        },
        "checks": {
            "tool": metric(text, "gateway_tool_call_checks_total", model=model),
            "structured": metric(text, "gateway_structured_output_checks_total", model=model),
        },
    }


def _zero(kinds: tuple[str, ...]) -> dict[str, float]:
    return dict.fromkeys(kinds, 0.0)


@pytest.mark.parametrize("stream", [True, False])
def test_invalid_tool_calls_count_by_kind_and_reach_the_client_unchanged(
    live: tuple[str, dict[str, str], Spy], stream: bool
) -> None:
    gw, urls, _ = live
    model = "bad-tools-stream" if stream else "bad-tools-body"
    body = {"model": model, "messages": MSG, "tools": [WEATHER], "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}  # the client's own: the gateway strips nothing
    got = _post(gw, body)
    assert got == _post(urls[model], body)  # byte for byte what the backend sends
    errors = _errors(gw, model)
    assert errors["tool"] == {**_zero(TOOL_ERRORS), "invalid_json": 1, "unknown_tool": 1, "schema_mismatch": 1}
    assert errors["structured"] == _zero(STRUCTURED_ERRORS)
    assert errors["checks"] == {"tool": 1, "structured": 0}


@pytest.mark.parametrize("stream", [True, False])
def test_invalid_structured_output_counts_by_kind(live: tuple[str, dict[str, str], Spy], stream: bool) -> None:
    gw, urls, _ = live
    model, kind = ("bad-json-stream", "invalid_json") if stream else ("bad-json-body", "schema_mismatch")
    response_format = {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}
    body = {"model": model, "messages": MSG, "response_format": response_format, "stream": stream}
    assert _post(gw, body) == _post(urls[model], body)
    errors = _errors(gw, model)
    assert errors["structured"] == {**_zero(STRUCTURED_ERRORS), kind: 1}
    assert errors["tool"] == _zero(TOOL_ERRORS)
    assert errors["checks"] == {"tool": 0, "structured": 1}


def test_valid_answers_are_checked_and_leave_the_error_counters_at_zero(
    live: tuple[str, dict[str, str], Spy],
) -> None:
    gw, _, _ = live
    json_object = {"type": "json_object"}
    for stream in (True, False):
        suffix = "stream" if stream else "body"
        _post(gw, {"model": f"good-tools-{suffix}", "messages": MSG, "tools": [WEATHER], "stream": stream,
                   "tool_choice": "required"})  # fmt: skip
        _post(gw, {"model": f"good-json-{suffix}", "messages": MSG, "response_format": json_object, "stream": stream})
        for model, check_kind in ((f"good-tools-{suffix}", "tool"), (f"good-json-{suffix}", "structured")):
            errors = _errors(gw, model)
            assert errors["tool"] == _zero(TOOL_ERRORS) and errors["structured"] == _zero(STRUCTURED_ERRORS)
            assert errors["checks"][check_kind] == 1, (model, errors)
    # an answer cut by max_tokens is not judged: the budget's doing, not the model's
    _post(gw, {"model": "cut-json-body", "messages": MSG, "response_format": json_object})
    assert _errors(gw, "cut-json-body")["checks"]["structured"] == 0


def test_no_call_counts_only_when_a_call_was_required(live: tuple[str, dict[str, str], Spy]) -> None:
    gw, _, _ = live
    model = "good-json-body"  # answers in text
    before = _errors(gw, model)["tool"]["no_call"]
    _post(gw, {"model": model, "messages": MSG, "tools": [WEATHER]})  # "auto": a text answer is fine
    assert _errors(gw, model)["tool"]["no_call"] == before
    _post(gw, {"model": model, "messages": MSG, "tools": [WEATHER],
               "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})  # fmt: skip
    assert _errors(gw, model)["tool"]["no_call"] == before + 1
    _post(gw, {"model": model, "messages": MSG, "tools": [WEATHER], "tool_choice": "none"})  # not checked at all
    assert _errors(gw, model)["tool"]["no_call"] == before + 1


def test_a_request_without_tools_keeps_the_fast_path(live: tuple[str, dict[str, str], Spy]) -> None:
    """The same stream of invalid tool calls, asked for without tools: the observer keeps nothing and scans every
    plain chunk instead of parsing it (it would have assembled the calls), and nothing is counted."""
    gw, _, spy = live
    model = "bad-tools-stream"
    before = _errors(gw, model)
    spy.observers.clear()
    _post(gw, {"model": model, "messages": MSG, "stream": True})
    observer = _the_observer(spy)
    assert observer is not None and not observer.keep_text
    assert observer.tool_calls == {} and observer.text == []
    assert _errors(gw, model) == before
    spy.observers.clear()
    _post(gw, {"model": model, "messages": MSG, "stream": True, "tools": [WEATHER]})
    observer = _the_observer(spy)
    assert observer is not None and observer.keep_text and len(observer.tool_calls) == 3


def test_the_oracle_emulators_invalid_calls_count_as_the_oracle_chose() -> None:
    """Live traffic from a model: the oracle emulator answers every tool prompt of the built-in graded set with an
    invalid call (accuracy 0, tool error rate 1), of the kind ``tool_failure`` decides."""
    path = REPO / "gateway" / "compare" / "graded" / "en.jsonl"
    items = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    tool_items = [i for i in items if i.get("scorer") == "tool_call"]
    assert tool_items
    cfg = EmulatorConfig(model="oracle", ttft_ms=1, itl_ms=1, answers=str(path), accuracy=0.0, tool_error_rate=1.0)
    expected = Counter(tool_failure(cfg.seed, i["prompt"], 1.0) for i in tool_items)
    with ThreadServer(create_emulator_app(cfg)) as emulator:
        settings = settings_for([{"name": "emu", "base_url": emulator.url, "models": ["oracle"]}],
                                [card("oracle", "qwen3", "Alibaba", "CN", aliases=[])])  # fmt: skip
        with ThreadServer(create_app(settings)) as gw:
            for n, item in enumerate(tool_items):
                messages = [{"role": "user", "content": item["prompt"]}]
                _post(gw.url, {"model": "oracle", "messages": messages, "tools": item["tools"], "stream": n % 2 == 0})
            text = httpx.get(f"{gw.url}/metrics").text
    got = {k: metric(text, "gateway_tool_call_errors_total", model="oracle", kind=k) for k in TOOL_ERRORS}
    assert got == {k: float(expected[k]) for k in TOOL_ERRORS}, (got, expected)
    assert metric(text, "gateway_tool_call_checks_total", model="oracle") == len(tool_items)
    assert samples(text, "gateway_structured_output_errors_total", model="oracle") == [0.0, 0.0]


def test_contracts_and_checks() -> None:
    """Table-driven: which requests carry a contract, and what the check finds."""
    assert contract_of({"model": "m", "messages": MSG}) is None
    assert contract_of({"tools": []}) is None
    assert contract_of({"tools": [WEATHER], "tool_choice": "none"}) is None
    assert contract_of({"response_format": {"type": "text"}}) is None
    tools = contract_of({"tools": [WEATHER], "tool_choice": "required"})
    assert tools is not None and set(tools.tools) == {"get_weather"} and tools.call_required and not tools.json
    plain_json = contract_of({"response_format": {"type": "json_object"}})
    assert plain_json == Contract(json=True)
    schema = contract_of({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}})
    assert schema is not None and schema.schema == SCHEMA
    assert check(plain_json, '<think>hmm</think> {"a": 1} ', []).structured_error is None
    assert check(plain_json, "```json\n{}\n```", []).structured_error == "invalid_json"  # not JSON as sent
    assert check(schema, '{"a": 1.5}', []).structured_error == "schema_mismatch"
    assert check(tools, "", list(BAD_CALLS)).tool_errors == ("invalid_json", "unknown_tool", "schema_mismatch")
    assert check(tools, "sunny", []).tool_errors == ("no_call",)
    broken = Contract(tools={"f": {"type": 5}})  # the client's schema is unusable: the call is not judged
    assert check(broken, "", [("f", "{}")]).tool_errors == ()
