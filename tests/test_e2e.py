"""End-to-end through real sockets: the official ``openai`` SDK -> gateway -> vLLM emulators."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from gateway.app import create_app
from gateway.devstack.emulator import EmulatorConfig, create_emulator_app
from gateway.devstack.supervisor import free_port
from tests.backends import Recorder, SlamServer
from tests.conftest import FAMILIES, Stack, card, settings_for
from tests.servers import ThreadServer, metric

MSG: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say something."}]


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=20)


def scrape(url: str) -> str:
    return httpx.get(f"{url}/metrics").text


def test_models_is_the_union_with_owned_by(stack: Stack) -> None:
    models = {m.id: m for m in client(stack.url).models.list()}
    assert set(models) == {m for m, *_ in FAMILIES}
    assert models["emu/qwen3"].owned_by == "Alibaba" and models["emu/llama"].owned_by == "Meta"


@pytest.mark.parametrize("name", ["emu/qwen3", "deepseek", "llama"])  # ids and aliases
def test_chat_and_completions_streaming_and_not(stack: Stack, name: str) -> None:
    c = client(stack.url)
    chat = c.chat.completions.create(model=name, messages=MSG, max_tokens=5)
    assert chat.choices[0].message.content and chat.usage and chat.usage.completion_tokens == 5
    assert chat.model.startswith("emu/")

    chunks = list(c.chat.completions.create(model=name, messages=MSG, max_tokens=4, stream=True))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert len(text.split()) == 4
    assert all(ch.choices and ch.usage is None for ch in chunks)  # usage was not asked for: none shown

    done = c.completions.create(model=name, prompt="Once", max_tokens=3)
    assert done.choices[0].text and done.usage and done.usage.completion_tokens == 3

    streamed = list(
        c.completions.create(
            model=name, prompt="Once", max_tokens=3, stream=True, stream_options={"include_usage": True}
        )
    )
    assert streamed[-1].usage is not None and streamed[-1].usage.completion_tokens == 3 and not streamed[-1].choices
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices).strip()


def test_usage_chunk_removed_only_when_not_asked(stack: Stack) -> None:
    body = {"model": "qwen3", "messages": MSG, "max_tokens": 3, "stream": True}
    plain = httpx.post(f"{stack.v1}/chat/completions", json=body).content
    asked = httpx.post(f"{stack.v1}/chat/completions", json={**body, "stream_options": {"include_usage": True}}).content
    assert b'"choices":[]' not in plain and plain.endswith(b"data: [DONE]\n\n")
    assert b'"choices":[],"usage":' in asked and asked.endswith(b"data: [DONE]\n\n")
    # the gateway still counted the tokens of the stream whose usage it hid
    assert metric(scrape(stack.url), "gateway_completion_tokens_total", model="emu/qwen3") >= 6


def test_headers_request_id_backend_and_timings(stack: Stack) -> None:
    c = client(stack.url)
    raw = c.chat.completions.with_raw_response.create(
        model="llama",
        messages=MSG,
        max_tokens=2,
        extra_headers={"x-request-id": "req-123"},
    )
    assert raw.headers["x-request-id"] == "req-123"
    assert raw.headers["x-gateway-backend"] == "llama-a"
    timing = dict(part.strip().split(";dur=") for part in raw.headers["server-timing"].split(","))
    # e2e ends when the body was in; the gateway's time also counts its work after that
    assert float(timing["upstream"]) <= float(timing["e2e"]) <= float(timing["upstream"]) + float(timing["gateway"])
    assert float(timing["upstream"]) > 30 and float(timing["gateway"]) > 0  # emulator: TTFT 30 ms + 1 ITL
    streamed = httpx.post(f"{stack.v1}/chat/completions", json={"model": "llama", "messages": MSG, "stream": True})
    assert streamed.headers["x-accel-buffering"] == "no" and streamed.headers["x-gateway-backend"] == "llama-a"
    # A stream's headers go out with its first chunk: what is known then is the gateway's time before the request
    # was written, and the backend's until that first chunk (the emulator's role-only chunk comes at once).
    timing = dict(part.strip().split(";dur=") for part in streamed.headers["server-timing"].split(","))
    assert set(timing) == {"gateway", "upstream"} and float(timing["gateway"]) > 0 and float(timing["upstream"]) > 0
    assert len(streamed.headers["x-request-id"]) == 32  # generated when the client sent none


def test_tokens_and_list_price_cost_are_counted(stack: Stack) -> None:
    before = scrape(stack.url)
    c = client(stack.url)
    r = c.chat.completions.create(model="deepseek", messages=MSG, max_tokens=6)
    assert r.usage is not None
    after = scrape(stack.url)
    labels = {"model": "emu/deepseek", "backend": "deepseek-a"}

    def delta(name: str, **extra: str) -> float:
        return metric(after, name, **labels, **extra) - metric(before, name, **labels, **extra)

    assert delta("gateway_completion_tokens_total") == r.usage.completion_tokens == 6
    assert delta("gateway_prompt_tokens_total") == r.usage.prompt_tokens
    expected = (r.usage.prompt_tokens * 1.0 + 6 * 4.0) / 1e6  # card(): $1 in, $4 out per 1M
    assert delta("gateway_cost_usd_total", basis="list_price") == pytest.approx(expected)
    assert delta("gateway_requests_total", endpoint="chat", status="200") == 1
    assert delta("gateway_request_duration_seconds_count", endpoint="chat") == 1
    assert metric(after, "gateway_backend_cost_per_hour_usd", backend="deepseek-a") == 4.0
    assert metric(after, "gateway_requests_in_flight", **labels) == 0


def test_client_errors_are_openai_shaped(stack: Stack) -> None:
    c = client(stack.url)
    with pytest.raises(openai.NotFoundError) as nf:
        c.chat.completions.create(model="gpt-9", messages=MSG)
    assert nf.value.code == "model_not_found"
    bad = httpx.post(f"{stack.v1}/chat/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    wrong = httpx.post(f"{stack.v1}/chat/completions", json={"model": "qwen3", "messages": "hi"})
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "messages"
    # the backend's own 4xx passes through with its status and body
    with pytest.raises(openai.BadRequestError) as br:
        c.chat.completions.create(model="qwen3", messages=MSG, temperature=-1)
    assert br.value.status_code == 400 and "temperature" in str(br.value.body)
    too_long = httpx.post(f"{stack.v1}/completions", json={"model": "qwen3", "prompt": "x" * 20000, "max_tokens": 10})
    assert too_long.status_code == 400 and "maximum context length" in too_long.json()["error"]["message"]
    assert httpx.get(f"{stack.url}/v1/nothing").json()["error"]["code"] == "not_found"


def test_client_disconnect_mid_stream_aborts_upstream(stack: Stack) -> None:
    emulator = stack.emulators["llama-a"]
    body = {"model": "llama", "messages": MSG, "max_tokens": 500, "ignore_eos": True, "stream": True}
    tokens_before = metric(scrape(emulator.url), "vllm:generation_tokens_total")
    with httpx.stream("POST", f"{stack.v1}/chat/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert metric(scrape(emulator.url), "vllm:num_requests_running") == 1
    # closed after the first chunk of 500 (2.5 s of tokens): the gateway must close upstream at once and the
    # backend abort. Bounds with seconds of margin for a busy machine: the whole answer would take 2.5 s.
    deadline = time.monotonic() + 5.0
    while metric(scrape(emulator.url), "vllm:num_requests_running") != 0:
        assert time.monotonic() < deadline, "backend still generating 5 s after the client left"
        time.sleep(0.02)
    made = metric(scrape(emulator.url), "vllm:generation_tokens_total") - tokens_before
    assert made < 250, f"the backend generated {made} of 500 tokens: it was not aborted"
    gw = scrape(stack.url)
    assert metric(gw, "gateway_requests_in_flight", model="emu/llama") == 0
    assert metric(gw, "gateway_requests_total", model="emu/llama", status="499") >= 1


def test_client_disconnect_during_non_streaming_call_aborts_upstream(stack: Stack) -> None:
    emulator = stack.emulators["qwen-a"]
    body = {"model": "qwen3", "messages": MSG, "max_tokens": 400, "ignore_eos": True}  # ~2 s of generation
    tokens_before = metric(scrape(emulator.url), "vllm:generation_tokens_total")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{stack.v1}/chat/completions", json=body, timeout=0.3)
    deadline = time.monotonic() + 5.0
    while metric(scrape(emulator.url), "vllm:num_requests_running") != 0:
        assert time.monotonic() < deadline, "backend still generating 5 s after the client left"
        time.sleep(0.02)
    made = metric(scrape(emulator.url), "vllm:generation_tokens_total") - tokens_before
    assert made < 200, f"the backend generated {made} of 400 tokens: it was not aborted"
    gw = scrape(stack.url)
    assert metric(gw, "gateway_requests_in_flight", model="emu/qwen3") == 0


def gateway_over(*backends: tuple[str, str, str], **gateway: object) -> ThreadServer:
    """A gateway over (name, url, model) backends; models get test cards."""
    models = sorted({m for _, _, m in backends})
    settings = settings_for(
        [{"name": n, "base_url": u, "models": [m], "timeouts": {"read": 1.0, "connect": 1.0}} for n, u, m in backends],
        [card(m, "qwen3", "Alibaba", "CN", aliases=[]) for m in models],
        **gateway,
    )
    return ThreadServer(create_app(settings))


def test_unknown_fields_and_streamed_bytes_pass_unchanged() -> None:
    odd = [b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n',
           b': keep-alive comment\n\n',
           b'data:   {"choices" : [{"delta":{"content":"A"}}], "x": 1}\r\n\r\n',
           b'data: {"choices":[{"delta":{"content":"B"}}]}\n',
           b'\n',
           b'data: [DONE]\n\n']  # fmt: skip
    rec = Recorder(chunks=odd)
    with ThreadServer(rec.app()) as backend, gateway_over(("rec", backend.url, "m")) as gw:
        body = (
            b'{"model":"m","messages":[{"role":"user","content":"hi"}],"top_k":7,'
            b'"guided_json":{"type":"object"},"chat_template_kwargs":{"enable_thinking":false},"stream":true,'
            b'"stream_options":{"include_usage":true}}'
        )
        out = httpx.post(f"{gw.url}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert out.content == b"".join(odd)
        assert rec.received[0][0] == body  # byte for byte: nothing re-serialised
        assert rec.received[0][1]["x-request-id"] == out.headers["x-request-id"]


def test_failover_before_first_byte_and_health_marks_down() -> None:
    with (
        SlamServer() as slam,
        ThreadServer(create_emulator_app(EmulatorConfig(model="m", ttft_ms=1, itl_ms=1, output_tokens=3))) as good,
        gateway_over(("slam", slam.url, "m"), ("good", good.url, "m")) as gw,
    ):
        c = client(gw.url)
        backends: Counter[str] = Counter()
        for _ in range(4):
            raw = c.chat.completions.with_raw_response.create(model="m", messages=MSG)
            backends[raw.headers["x-gateway-backend"]] += 1
        assert backends == {"good": 4}
        text = scrape(gw.url)
        assert metric(text, "gateway_upstream_errors_total", backend="slam", reason="connect") >= 1
        assert metric(text, "gateway_requests_total", backend="good", status="200") == 4


def test_backend_5xx_fails_over_to_a_replica() -> None:
    broken = Recorder(body=b'{"error":{"message":"boom","type":"InternalServerError","code":500}}', status=500)
    ok = Recorder()
    with (
        ThreadServer(broken.app()) as b1,
        ThreadServer(ok.app()) as b2,
        gateway_over(("broken", b1.url, "m"), ("ok", b2.url, "m")) as gw,
    ):
        for _ in range(4):
            r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "m", "messages": MSG})
            assert r.status_code == 200 and r.headers["x-gateway-backend"] == "ok"
        assert metric(scrape(gw.url), "gateway_upstream_errors_total", backend="broken", reason="status_5xx") >= 1


@pytest.mark.parametrize(
    ("backend", "status", "code"),
    [
        (Recorder(delay=3.0), 504, "upstream_timeout"),  # black hole: read timeout is 1 s
        (Recorder(body=b"<html>502 Bad Gateway</html>", status=502, content_type="text/html"), 502,
         "upstream_bad_response"),
        (Recorder(body=b'{"error":{"message":"slow down","code":429}}', status=429), 429, None),
    ],
)  # fmt: skip
def test_backend_failures_map_to_statuses(backend: Recorder, status: int, code: str | None) -> None:
    with ThreadServer(backend.app()) as b, gateway_over(("only", b.url, "m")) as gw:
        r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "m", "messages": MSG}, timeout=10)
        assert r.status_code == status
        error = r.json()["error"]
        if code:
            assert error["code"] == code and error["type"] in ("gateway_timeout", "bad_gateway")
        else:
            assert error["message"] == "slow down"  # passed through as the backend wrote it


def test_unreachable_backend_is_502_and_no_healthy_backend_is_503() -> None:
    with SlamServer() as slam, gateway_over(("slam", slam.url, "m")) as gw:
        r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "m", "messages": MSG})
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unreachable"
        # the failure took it out of rotation until the next health check says otherwise
        r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "m", "messages": MSG})
        assert r.status_code in (502, 503)
    dead = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    with gateway_over(("dead", dead, "m")) as gw:
        r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "m", "messages": MSG})
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_healthy_backend"
        assert httpx.get(f"{gw.url}/ready").status_code == 503
        assert metric(scrape(gw.url), "gateway_backend_up", backend="dead") == 0


def test_ready_turns_200_when_a_backend_comes_up() -> None:
    port = free_port()
    with gateway_over(("late", f"http://127.0.0.1:{port}", "m")) as gw:
        assert httpx.get(f"{gw.url}/ready").status_code == 503
        assert httpx.get(f"{gw.url}/health").status_code == 200
        with ThreadServer(create_emulator_app(EmulatorConfig(model="m")), port=port):
            deadline = time.monotonic() + 3
            while httpx.get(f"{gw.url}/ready").status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert metric(scrape(gw.url), "gateway_backend_up", backend="late") == 1


@pytest.mark.parametrize("fault", ["stream_error_rate", "drop_rate"])
def test_failure_after_first_byte_is_an_error_event_then_done(fault: str) -> None:
    cfg = EmulatorConfig(model="m", ttft_ms=1, itl_ms=1, output_tokens=10)
    setattr(cfg, fault, 1.0)
    with ThreadServer(create_emulator_app(cfg)) as b, gateway_over(("faulty", b.url, "m")) as gw:
        raw = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "m", "messages": MSG, "stream": True})
        events = [e for e in raw.content.split(b"\n\n") if e]
        assert events[-1] == b"data: [DONE]"
        error = json.loads(events[-2].removeprefix(b"data: "))["error"]
        assert error["message"]
        assert b'"finish_reason":"stop"' not in raw.content and b'"finish_reason":"length"' not in raw.content
        with pytest.raises(openai.APIError):
            list(client(gw.url).chat.completions.create(model="m", messages=MSG, stream=True))
        reason = "stream_error" if fault == "stream_error_rate" else "stream_broken"
        assert metric(scrape(gw.url), "gateway_upstream_errors_total", backend="faulty", reason=reason) == 2


def test_replicas_share_load() -> None:
    cfg = EmulatorConfig(model="m", ttft_ms=50, itl_ms=1, output_tokens=2)
    with (
        ThreadServer(create_emulator_app(cfg)) as a,
        ThreadServer(create_emulator_app(cfg)) as b,
        gateway_over(("a", a.url, "m"), ("b", b.url, "m")) as gw,
    ):
        seen = Counter(
            httpx.post(f"{gw.url}/v1/completions", json={"model": "m", "prompt": "x"}).headers["x-gateway-backend"]
            for _ in range(10)
        )
        assert seen == {"a": 5, "b": 5}  # sequential calls tie at 0 in flight: round robin


def test_health_check_takes_a_dead_replica_out_and_back() -> None:
    cfg = EmulatorConfig(model="m", ttft_ms=1, itl_ms=1, output_tokens=2)
    port = free_port()
    with ThreadServer(create_emulator_app(cfg)) as steady:
        flaky = ThreadServer(create_emulator_app(cfg), port=port).__enter__()
        with gateway_over(("steady", steady.url, "m"), ("flaky", flaky.url, "m")) as gw:
            assert metric(scrape(gw.url), "gateway_backend_up", backend="flaky") == 1
            flaky.__exit__()
            deadline = time.monotonic() + 3
            while metric(scrape(gw.url), "gateway_backend_up", backend="flaky") != 0:
                assert time.monotonic() < deadline, "health check did not notice the dead replica"
                time.sleep(0.05)
            for _ in range(4):
                r = httpx.post(f"{gw.url}/v1/completions", json={"model": "m", "prompt": "x"})
                assert r.status_code == 200 and r.headers["x-gateway-backend"] == "steady"
            with ThreadServer(create_emulator_app(cfg), port=port):
                deadline = time.monotonic() + 3
                while metric(scrape(gw.url), "gateway_backend_up", backend="flaky") != 1:
                    assert time.monotonic() < deadline, "health check did not put the replica back"
                    time.sleep(0.05)
                seen = {
                    httpx.post(f"{gw.url}/v1/completions", json={"model": "m", "prompt": "x"}).headers[
                        "x-gateway-backend"
                    ]
                    for _ in range(4)
                }
                assert seen == {"steady", "flaky"}


def test_body_over_the_limit_is_413_without_reaching_the_backend() -> None:
    rec = Recorder()
    with ThreadServer(rec.app()) as b, gateway_over(("rec", b.url, "m"), max_body_bytes=2048) as gw:
        url = f"{gw.url}/v1/chat/completions"
        big = {"model": "m", "messages": [{"role": "user", "content": "x" * 5000}]}
        r = httpx.post(url, json=big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

        def chunks(n: int) -> Iterator[bytes]:
            yield b'{"model": "m", "messages": [{"role": "user", "content": "'
            for _ in range(n):
                yield b"y" * 500
            yield b'"}]}'

        r = httpx.post(url, content=chunks(10), headers={"content-type": "application/json"})  # chunked, too big
        assert r.status_code == 413
        assert rec.received == []  # neither reached the backend
        r = httpx.post(url, content=chunks(2), headers={"content-type": "application/json"})  # chunked, fits
        assert r.status_code == 200 and json.loads(rec.received[0][0])["messages"][0]["content"] == "y" * 1000
        assert httpx.post(url, json={"model": "m", "messages": MSG}).status_code == 200
