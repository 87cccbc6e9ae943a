from __future__ import annotations

import json

import httpx
import pytest

from gateway.app import create_app
from gateway.config import RequestLimits
from gateway.errors import InvalidRequest
from gateway.protocol import parse_request, upstream_body
from tests.conftest import card, settings_for
from tests.servers import ThreadServer

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def raw(obj: object) -> bytes:
    return json.dumps(obj).encode()


@pytest.mark.parametrize(
    ("body", "endpoint", "param"),
    [
        (b"{not json", "chat", None),
        (b"\xff\xfe", "chat", None),
        (raw([1, 2]), "chat", None),
        (raw({"messages": []}), "chat", "model"),
        (raw({**CHAT, "model": 7}), "chat", "model"),
        (raw({**CHAT, "model": ""}), "chat", "model"),
        (raw({**CHAT, "stream": "yes"}), "chat", "stream"),
        (raw({**CHAT, "stream_options": {"include_usage": "true"}}), "chat", "stream_options.include_usage"),
        (raw({"model": "m"}), "chat", "messages"),
        (raw({**CHAT, "messages": []}), "chat", "messages"),
        (raw({"model": "m"}), "completions", "prompt"),
        (raw({"model": "m", "prompt": 5}), "completions", "prompt"),
    ],
)
def test_invalid_requests_are_400_with_param(body: bytes, endpoint: str, param: str | None) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_request(body, endpoint)  # type: ignore[arg-type]
    assert info.value.status == 400
    assert info.value.param == param
    assert info.value.body()["error"]["type"] == "invalid_request_error"


def test_unknown_fields_reach_vllm_byte_for_byte() -> None:
    body = (
        b'{"model":"m", "messages":[{"role":"user","content":"hi"}], "top_k": 5, "guided_json": {"a": 1},'
        b' "chat_template_kwargs": {"enable_thinking": false}}'
    )
    parsed = parse_request(body, "chat")
    assert upstream_body(parsed, body, "m") is body  # untouched: not even re-serialised


def test_stream_without_usage_asks_for_it_and_keeps_other_options() -> None:
    body = raw({**CHAT, "stream": True, "stream_options": {"continuous_usage_stats": False}, "top_k": 3})
    parsed = parse_request(body, "chat")
    assert parsed.stream and not parsed.client_wants_usage
    sent = json.loads(upstream_body(parsed, body, "m"))
    assert sent["stream_options"] == {"continuous_usage_stats": False, "include_usage": True}
    assert sent["top_k"] == 3


def test_stream_without_options_keeps_the_clients_bytes_after_the_added_option() -> None:
    body = b' \n{"model":"m","messages":[{"role":"user","content":"caf\xc3\xa9 \\ud800"}],"stream":true, "top_k" : 3}'
    parsed = parse_request(body, "chat")
    sent = upstream_body(parsed, body, "m")
    assert sent.endswith(body.lstrip()[1:])  # the prompt is not re-serialised (spacing and escapes kept)
    assert json.loads(sent) == {**json.loads(body), "stream_options": {"include_usage": True}}


def test_stream_with_usage_is_untouched() -> None:
    body = raw({**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    parsed = parse_request(body, "chat")
    assert parsed.client_wants_usage
    assert upstream_body(parsed, body, "m") is body


def test_alias_is_replaced_by_the_model_id() -> None:
    body = raw({**CHAT, "model": "alias"})
    assert json.loads(upstream_body(parse_request(body, "chat"), body, "real/id"))["model"] == "real/id"


def test_completions_accept_token_ids_and_lists() -> None:
    for prompt in ("text", ["a", "b"], [1, 2, 3]):
        assert parse_request(raw({"model": "m", "prompt": prompt}), "completions").model == "m"


def nested(depth: int) -> object:
    value: object = "x"
    for _ in range(depth - 1):
        value = [value]
    return value


SMALL = RequestLimits(
    max_json_containers=100, max_json_values=200, max_json_depth=10, max_messages=5, max_content_parts=6
)


@pytest.mark.parametrize(
    ("body", "limit"),
    [
        ({**CHAT, "messages": [{"role": "user", "content": "x"}] * 6}, "max_messages"),
        ({**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 7}]}, "max_content_parts"),
        ({**CHAT, "extra": nested(12)}, "max_json_depth"),
        ({**CHAT, "extra": [{}] * 101}, "max_json_containers"),
        ({**CHAT, "extra": list(range(201))}, "max_json_values"),
        (raw(CHAT)[:-1] + b', "extra": ' + b"[" * 2000 + b"]" * 2000 + b"}", "max_json_depth"),  # past recursion
    ],
    ids=["messages", "content-parts", "depth", "containers", "values", "deeper-than-recursion"],
)
def test_request_limits_are_400s_naming_the_limit(body: dict[str, object] | bytes, limit: str) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(InvalidRequest) as info:  # the nesting past Python's recursion limit: under default limits
        parse_request(data, "chat", RequestLimits() if isinstance(body, bytes) else SMALL)
    assert f"gateway.request_limits.{limit}" in info.value.message
    within = {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 6}] * 1}
    assert parse_request(json.dumps({**within, "extra": nested(9)}).encode(), "chat", SMALL).model == "m"


def test_a_fan_out_to_more_models_than_allowed_is_a_400_naming_the_limit() -> None:
    models = [card(f"m{i}", "llama", "Meta", "US", aliases=[]) for i in range(3)]
    settings = settings_for(
        [{"name": "b", "base_url": "http://127.0.0.1:9", "models": [m["id"] for m in models]}],
        models,
        request_limits={"max_fanout_models": 2},
    )
    with ThreadServer(create_app(settings)) as gw:
        body = {"models": ["m0", "m1", "m2"], "messages": [{"role": "user", "content": "hi"}]}
        answer = httpx.post(f"{gw.url}/v1/compare/chat/completions", json=body)
    assert answer.status_code == 400
    assert "gateway.request_limits.max_fanout_models" in answer.json()["error"]["message"]
