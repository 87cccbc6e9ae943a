"""The fan-out API end to end over real sockets: identical requests, partial failure, streaming, the store."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator

import httpx
import openai
import pytest

from gateway.app import create_app
from gateway.devstack.emulator import EmulatorConfig, create_emulator_app
from tests.backends import Recorder
from tests.conftest import FAMILIES, Stack, card, settings_for
from tests.servers import ThreadServer

MSG = [{"role": "user", "content": "Compare yourselves."}]
PARAMS = {"messages": MSG, "max_tokens": 6, "temperature": 0.3, "seed": 7, "top_k": 5}


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=30)


def test_fanout_from_the_openai_sdk_raw_request(stack: Stack) -> None:
    response = sdk(stack.url).post(
        "/compare/chat/completions", body={**PARAMS, "models": "all"}, cast_to=httpx.Response
    )
    data = response.json()
    assert data["id"].startswith("cmp-") and response.headers["x-comparison-id"] == data["id"]
    by_model = {r["model"]: r for r in data["results"]}
    assert set(by_model) == {m for m, *_ in FAMILIES}
    for result in by_model.values():
        assert result["error"] is None and result["backend"]
        answer = result["response"]
        assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["content"]
        assert answer["usage"]["completion_tokens"] == 6
        m = result["metrics"]
        assert 0.02 < m["ttft_s"] < 1 and 0 < m["tpot_s"] < 0.1 and m["e2e_s"] > m["ttft_s"]
        assert m["completion_tokens"] == 6 and m["output_tokens_per_s"] == pytest.approx(1 / m["tpot_s"])
        expected_list = (m["prompt_tokens"] * 1.0 + 6 * 4.0) / 1e6  # card(): $1 in / $4 out per 1M
        assert m["cost_usd"]["list_price"] == pytest.approx(expected_list)
        # GPU time: $4/h for at most this call's wall-clock (other calls share the GPU)
        assert 0 < m["cost_usd"]["gpu_time"] <= 4.0 / 3600 * (m["e2e_s"] + 0.05)
    stored = httpx.get(f"{stack.v1}/compare/{data['id']}").json()["results"]
    assert {r["model"] for r in stored} == set(by_model) and all(r["text"] for r in stored)
    assert data["id"] in [c["id"] for c in httpx.get(f"{stack.v1}/compare").json()["data"]]


def test_fanout_completions_with_aliases_and_curl(stack: Stack) -> None:
    curl = shutil.which("curl")
    assert curl, "curl is needed for this test"
    body = json.dumps({"models": ["qwen3", "llama", "emu/qwen3"], "prompt": "Once", "max_tokens": 3})
    out = subprocess.run(
        [curl, "-s", "-H", "content-type: application/json", "-d", body, f"{stack.v1}/compare/completions"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    results = json.loads(out.stdout)["results"]
    assert [r["model"] for r in results] == ["emu/qwen3", "emu/llama"]  # aliases resolved, duplicates merged
    assert all(r["response"]["choices"][0]["text"] for r in results)


@pytest.fixture
def recorded() -> Iterator[tuple[str, list[Recorder]]]:
    """Two recording backends (identical bodies are checked on them) and one that always fails."""
    stream = [
        b'data: {"id":"c1","created":1,"model":"M","choices":[{"index":0,"delta":{"role":"assistant",'
        b'"content":""}}]}\n\n',
        b'data: {"id":"c1","created":1,"model":"M","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n',
        b'data: {"id":"c1","created":1,"model":"M","choices":[{"index":0,"delta":{"content":" there"},'
        b'"finish_reason":"length"}]}\n\n',
        b'data: {"id":"c1","created":1,"model":"M","choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2}}\n\n',
        b"data: [DONE]\n\n",
    ]
    recs = [Recorder(chunks=stream, chunk_delay=0.01), Recorder(chunks=stream, chunk_delay=0.01),
            Recorder(body=b'{"error":{"message":"out of memory","type":"InternalServerError","code":500}}',
                     status=500)]  # fmt: skip
    names = ["a", "b", "broken"]
    servers = [ThreadServer(r.app()).__enter__() for r in recs]
    settings = settings_for(
        [{"name": n, "base_url": s.url, "models": [n]} for n, s in zip(names, servers, strict=True)],
        [card(n, "qwen3", "Alibaba", "CN", aliases=[]) for n in names],
    )
    try:
        with ThreadServer(create_app(settings)) as gw:
            yield gw.url, recs
    finally:
        for server in servers:
            server.__exit__()


def test_identical_requests_and_partial_failure(recorded: tuple[str, list[Recorder]]) -> None:
    url, recs = recorded
    data = httpx.post(f"{url}/v1/compare/chat/completions", json={**PARAMS, "models": ["a", "b", "broken"]}).json()
    by_model = {r["model"]: r for r in data["results"]}
    assert by_model["broken"]["response"] is None and by_model["broken"]["error"]["message"] == "out of memory"
    assert (
        by_model["a"]["error"] is None and by_model["a"]["response"]["choices"][0]["message"]["content"] == "hi there"
    )
    sent = [json.loads(r.received[-1][0]) for r in recs]
    for body, model in zip(sent, ["a", "b", "broken"], strict=True):
        assert body.pop("model") == model
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert sent[0] == sent[1] == sent[2]  # same messages, parameters, seed, max_tokens, unknown fields
    assert sent[0]["seed"] == 7 and sent[0]["top_k"] == 5 and sent[0]["max_tokens"] == 6


def test_streaming_fanout_tags_every_event_with_its_model(recorded: tuple[str, list[Recorder]]) -> None:
    url, _ = recorded
    raw = httpx.post(
        f"{url}/v1/compare/chat/completions", json={**PARAMS, "models": ["a", "b", "broken"], "stream": True}
    ).content
    events = [e.removeprefix(b"data: ") for e in raw.split(b"\n\n") if e]
    assert events[-1] == b"[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    assert parsed[-1]["type"] == "done" and parsed[-1]["id"].startswith("cmp-")
    chunks = [p for p in parsed if p["type"] == "chunk"]
    for model in ("a", "b"):
        texts = [c["chunk"]["choices"][0]["delta"].get("content", "") for c in chunks if c["model"] == model]
        assert "".join(texts) == "hi there"
    assert not [c for c in chunks if not c["chunk"]["choices"]]  # usage-only chunks hidden: not asked for
    results = {p["model"]: p for p in parsed if p["type"] == "result"}
    assert results["broken"]["error"]["message"] == "out of memory" and results["a"]["metrics"]["ttft_s"] > 0


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({**PARAMS}, 400, "models"),
        ({**PARAMS, "models": []}, 400, "models"),
        ({**PARAMS, "models": ["nope"]}, 404, "models"),
        ({"models": ["a"], "messages": "x"}, 400, "messages"),
    ],
)
def test_fanout_validation(
    recorded: tuple[str, list[Recorder]], body: dict[str, object], status: int, param: str
) -> None:
    url, _ = recorded
    r = httpx.post(f"{url}/v1/compare/chat/completions", json=body)
    assert r.status_code == status and r.json()["error"]["param"] == param


def test_one_failing_emulator_does_not_hold_back_the_others() -> None:
    ok = EmulatorConfig(model="ok", ttft_ms=5, itl_ms=1, output_tokens=3)
    bad = EmulatorConfig(model="bad", ttft_ms=5, itl_ms=1, output_tokens=3, drop_rate=1.0)
    with ThreadServer(create_emulator_app(ok)) as a, ThreadServer(create_emulator_app(bad)) as b:
        settings = settings_for(
            [{"name": "a", "base_url": a.url, "models": ["ok"]}, {"name": "b", "base_url": b.url, "models": ["bad"]}],
            [card("ok", "llama", "Meta", "US", aliases=[]), card("bad", "qwen3", "Alibaba", "CN", aliases=[])],
        )
        with ThreadServer(create_app(settings)) as gw:
            data = httpx.post(f"{gw.url}/v1/compare/completions", json={"models": "all", "prompt": "x"}).json()
    by_model = {r["model"]: r for r in data["results"]}
    assert by_model["ok"]["error"] is None and by_model["ok"]["response"]["choices"][0]["text"]
    assert "without [DONE]" in by_model["bad"]["error"]["message"] or "broke" in by_model["bad"]["error"]["message"]
