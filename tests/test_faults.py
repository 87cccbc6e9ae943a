"""The fault matrix (docs/fault-matrix.md): each backend fault, what the client sees, and what is counted.

Faults are injected by small scripted backends (tests/backends.py) and the vLLM emulator's failure knobs, behind
a real gateway on real sockets. Every case also checks ``gateway_upstream_errors_total{reason}``.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from gateway.devstack.emulator import EmulatorConfig, create_emulator_app
from gateway.relay import asgi
from tests.backends import Die, Pause, Recorder
from tests.conftest import card, settings_for
from tests.servers import ThreadServer, metric

MSG = [{"role": "user", "content": "Say something."}]
STREAM = {"model": "m", "messages": MSG, "stream": True, "max_tokens": 3, "stream_options": {"include_usage": True}}
PLAIN = {"model": "m", "messages": MSG, "max_tokens": 3}


def chunk(text: str, finish: str | None = None) -> bytes:
    body = {
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}],
    }  # fmt: skip
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


USAGE = b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":4,"completion_tokens":3,"total_tokens":7}}\n\n'  # noqa: E501
DONE = b"data: [DONE]\n\n"
GOOD_STREAM: list[bytes | Pause | Die] = [chunk("a"), chunk("b"), chunk("c", "length"), USAGE, DONE]


def gateway(*backends: tuple[str, str], timeouts: Mapping[str, float] | None = None, **section: Any) -> ThreadServer:
    """A gateway over (name, url) backends that all serve model ``m``."""
    t = {"connect": 1.0, "read": 1.0, "first_token": 1.0, "stall": 1.0, **(timeouts or {})}
    extra = section.pop("backend", {})
    settings = settings_for(
        [{"name": n, "base_url": u, "models": ["m"], "timeouts": t, **extra} for n, u in backends],
        [card("m", "qwen3", "Alibaba", "CN", aliases=[])],
        **section,
    )
    return ThreadServer(create_app(settings))


def errors(url: str, backend: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    reasons = ("connect", "timeout", "bad_response", "stream_broken", "stream_error", "status_429", "status_5xx")
    found = {r: metric(text, "gateway_upstream_errors_total", backend=backend, reason=r) for r in reasons}
    return {r: n for r, n in found.items() if n}


def events(raw: bytes) -> list[bytes]:
    return [e for e in raw.replace(b"\r\n", b"\n").split(b"\n\n") if e]


def assert_error_then_done(raw: bytes, code: str) -> None:
    """The stream ends with an OpenAI error event then [DONE], and nothing in it claims a normal finish."""
    ev = events(raw)
    assert ev[-1] == b"data: [DONE]", raw[-200:]
    assert json.loads(ev[-2].removeprefix(b"data: "))["error"]["code"] == code
    assert b'"finish_reason":"stop"' not in raw and b'"finish_reason":"length"' not in raw


# -- before the first byte: fail over ---------------------------------------------------------------------------
def test_refused_connection_fails_over_and_marks_the_backend_down() -> None:
    good = Recorder()
    with ThreadServer(good.app()) as g:
        gone = ThreadServer(Recorder().app()).__enter__()
        with gateway(("gone", gone.url), ("good", g.url), health_check_interval_s=60) as gw:
            gone.__exit__()  # refuses connections from now on; no health check will notice for a minute
            seen = Counter(
                httpx.post(f"{gw.url}/v1/chat/completions", json=PLAIN).headers["x-gateway-backend"] for _ in range(4)
            )
            assert seen == {"good": 4}
            assert errors(gw.url, "gone") == {"connect": 1}  # then it is out of rotation
            assert metric(httpx.get(f"{gw.url}/metrics").text, "gateway_backend_up", backend="gone") == 0


@pytest.mark.parametrize(
    ("fault", "stream"),
    [
        (Recorder(delay=3.0), False),  # black hole: no answer at all
        (Recorder(delay=3.0, chunks=GOOD_STREAM), True),  # black hole for a stream: not even headers
        (Recorder(chunks=[Pause(3.0), *GOOD_STREAM]), True),  # slow first token: headers out, no chunk yet
    ],
    ids=["black-hole", "black-hole-stream", "slow-first-token"],
)
def test_timeout_before_the_first_byte_fails_over(fault: Recorder, stream: bool) -> None:
    good = Recorder(chunks=GOOD_STREAM) if stream else Recorder()
    with ThreadServer(fault.app()) as f, ThreadServer(good.app()) as g, gateway(("slow", f.url), ("good", g.url)) as gw:
        t0 = time.monotonic()
        r = httpx.post(f"{gw.url}/v1/chat/completions", json=STREAM if stream else PLAIN, timeout=10)
        assert r.status_code == 200 and r.headers["x-gateway-backend"] == "good"
        if stream:
            assert r.content == b"".join(c for c in GOOD_STREAM if isinstance(c, bytes))
        # whichever replica the router tried first, a timeout costs at most one deadline (1 s)
        assert time.monotonic() - t0 < 2.5
        if fault.received:  # the router tried it first
            assert errors(gw.url, "slow") == {"timeout": 1}
            text = httpx.get(f"{gw.url}/metrics").text
            assert metric(text, "gateway_retries_total", model="m", reason="timeout") == 1


@pytest.mark.parametrize("stream", [False, True])
def test_timeout_with_no_replica_left_is_a_504_json_error(stream: bool) -> None:
    fault = Recorder(chunks=[Pause(3.0), *GOOD_STREAM]) if stream else Recorder(delay=3.0)
    with ThreadServer(fault.app()) as f, gateway(("slow", f.url)) as gw:
        r = httpx.post(f"{gw.url}/v1/chat/completions", json=STREAM if stream else PLAIN, timeout=10)
        assert r.status_code == 504
        assert r.json()["error"]["code"] == "upstream_timeout"
        assert errors(gw.url, "slow") == {"timeout": 1}


def test_death_before_the_first_chunk_fails_over() -> None:
    dead = Recorder(chunks=[Die()])
    good = Recorder(chunks=GOOD_STREAM)
    with ThreadServer(dead.app()) as d, ThreadServer(good.app()) as g, gateway(("dead", d.url), ("good", g.url)) as gw:
        for _ in range(2):  # round robin: one of them goes to the dying backend first
            r = httpx.post(f"{gw.url}/v1/chat/completions", json=STREAM)
            assert r.status_code == 200 and r.content.endswith(DONE)
        assert len(dead.received) >= 1
        assert errors(gw.url, "dead") == {"stream_broken": len(dead.received)}


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (Recorder(status=500, body=b'{"error":{"message":"boom","type":"InternalServerError","code":500}}'),
         "status_5xx"),
        (Recorder(status=429, body=b'{"error":{"message":"slow down","code":429}}'), "status_429"),
        (Recorder(status=502, body=b"<html>502 Bad Gateway</html>", content_type="text/html"), "status_5xx"),
    ],
    ids=["500", "429", "html-502"],
)  # fmt: skip
def test_error_status_fails_over_or_passes_through(answer: Recorder, reason: str) -> None:
    good = Recorder()
    with ThreadServer(answer.app()) as a, ThreadServer(good.app()) as g:
        with gateway(("bad", a.url), ("good", g.url)) as gw:
            for _ in range(2):
                r = httpx.post(f"{gw.url}/v1/chat/completions", json=PLAIN)
                assert r.status_code == 200 and r.headers["x-gateway-backend"] == "good"
            assert len(answer.received) >= 1
            assert errors(gw.url, "bad") == {reason: len(answer.received)}  # each counted once
        with gateway(("bad", a.url)) as gw:  # alone: its answer, OpenAI-shaped, with its status
            for body in (PLAIN, STREAM):
                r = httpx.post(f"{gw.url}/v1/chat/completions", json=body)
                assert r.status_code == answer.status
                error = r.json()["error"]
                if answer.content_type == "text/html":
                    assert error["code"] == "upstream_bad_response"
                else:
                    assert error == json.loads(answer.body)["error"]
            assert errors(gw.url, "bad") == {reason: 2}  # counted once per call, not again for the bad body


# -- after the first byte: an error event, then [DONE] ----------------------------------------------------------
@pytest.mark.parametrize(
    ("script", "code", "reason"),
    [
        ([chunk("a"), Pause(3.0), chunk("b", "length"), DONE], "upstream_timeout", "timeout"),  # stall
        ([chunk("a"), chunk("b"), Die()], "upstream_stream_error", "stream_broken"),  # death mid-stream
        ([chunk("a"), chunk("b")], "upstream_stream_error", "stream_broken"),  # clean end without [DONE]
    ],
    ids=["stall", "death", "no-done"],
)
def test_failure_mid_stream_is_an_error_event_then_done(
    script: list[bytes | Pause | Die], code: str, reason: str
) -> None:
    rec = Recorder(chunks=script)
    with ThreadServer(rec.app()) as b, gateway(("b", b.url)) as gw:
        t0 = time.monotonic()
        r = httpx.post(f"{gw.url}/v1/chat/completions", json=STREAM, timeout=10)
        assert r.status_code == 200  # the status went out with the first chunk
        assert r.content.startswith(chunk("a"))
        assert_error_then_done(r.content, code)
        assert time.monotonic() - t0 < 2.5  # a stall is cut at the stall timeout (1 s), not at the backend's pace
        assert errors(gw.url, "b") == {reason: 1}
        text = httpx.get(f"{gw.url}/metrics").text
        assert metric(text, "gateway_requests_total", model="m", status="502" if reason != "timeout" else "504") == 1
        assert metric(text, "gateway_requests_in_flight", model="m") == 0


def test_in_stream_error_event_is_relayed_then_done() -> None:
    err = b'data: {"error":{"message":"engine died","type":"InternalServerError","code":500}}\n\n'
    rec = Recorder(chunks=[chunk("a"), err, DONE])
    with ThreadServer(rec.app()) as b, gateway(("b", b.url)) as gw:
        r = httpx.post(f"{gw.url}/v1/chat/completions", json=STREAM)
        assert r.content == chunk("a") + err + DONE  # the backend's own error, as it sent it
        assert errors(gw.url, "b") == {"stream_error": 1}


def test_awkward_but_valid_sse_passes_through_byte_for_byte() -> None:
    """Events split across reads at odd places, CRLF line ends, comments, a 1 MB event: all valid SSE."""
    big = chunk("x" * (1024 * 1024))
    whole = b": keep-alive comment\r\n\r\n" + chunk("a").replace(b"\n", b"\r\n") + big + chunk("c", "length") + DONE
    pieces: list[bytes | Pause | Die] = [whole[i : i + 7777] for i in range(0, len(whole), 7777)]
    with ThreadServer(Recorder(chunks=pieces).app()) as b, gateway(("b", b.url)) as gw:
        r = httpx.post(f"{gw.url}/v1/chat/completions", json=STREAM)
        assert r.status_code == 200 and r.content == whole
        assert errors(gw.url, "b") == {}


def test_slow_health_checks_do_not_take_out_a_backend_that_answers_requests() -> None:
    """Passive health: a saturated server answers /health late. Checks that time out while real requests are being
    answered are inconclusive; once the traffic stops, the same timeouts take the backend out."""
    rec = Recorder()
    with ThreadServer(rec.app()) as b, gateway(("b", b.url), health_check_timeout_s=0.1, unhealthy_threshold=2) as gw:
        rec.health_delay = 1.0  # every check from now on times out
        end = time.monotonic() + 1.5  # about 7 checks, at 0.2 s intervals
        while time.monotonic() < end:
            assert httpx.post(f"{gw.url}/v1/chat/completions", json=PLAIN).status_code == 200
            time.sleep(0.05)
        assert metric(httpx.get(f"{gw.url}/metrics").text, "gateway_backend_up", backend="b") == 1
        deadline = time.monotonic() + 5
        while metric(httpx.get(f"{gw.url}/metrics").text, "gateway_backend_up", backend="b") == 1:
            assert time.monotonic() < deadline, "a backend whose checks time out, with no traffic, stayed up"
            time.sleep(0.1)
        assert httpx.post(f"{gw.url}/v1/chat/completions", json=PLAIN).status_code == 503


# -- outlier ejection, retry budget ------------------------------------------------------------------------------
def test_circuit_breaker_ejects_then_probes_half_open() -> None:
    flaky = Recorder(status=500, body=b'{"error":{"message":"boom","code":500}}')
    good = Recorder()
    policy = {"failures": 2, "open_s": 1.0, "max_open_s": 10}
    with (
        ThreadServer(flaky.app()) as f,
        ThreadServer(good.app()) as g,
        gateway(("flaky", f.url), ("good", g.url), breaker=policy) as gw,
    ):
        url = f"{gw.url}/v1/chat/completions"

        def state() -> float:
            return metric(httpx.get(f"{gw.url}/metrics").text, "gateway_backend_circuit_state", backend="flaky")

        def until(n: int, seconds: float) -> None:
            """Send requests (all must succeed) until ``flaky`` has seen ``n`` of them."""
            deadline = time.monotonic() + seconds
            while len(flaky.received) < n:
                assert httpx.post(url, json=PLAIN).status_code == 200  # failures are retried on "good"
                assert time.monotonic() < deadline, f"flaky saw {len(flaky.received)} requests, not {n}"

        until(2, 0.9)
        opened = time.monotonic()
        for _ in range(4):
            assert httpx.post(url, json=PLAIN).status_code == 200
        assert len(flaky.received) == 2 and state() == 2  # two failures opened it: no more traffic
        time.sleep(max(0.0, opened + 1.0 - time.monotonic()))
        until(3, 0.9)  # one probe went through, failed, and reopened it for twice as long (2 s)
        reopened = time.monotonic()
        for _ in range(4):
            assert httpx.post(url, json=PLAIN).status_code == 200
        assert len(flaky.received) == 3 and state() == 2
        flaky.status, flaky.body = 200, good.body  # it recovers
        time.sleep(max(0.0, reopened + 1.2 - time.monotonic()))
        for _ in range(4):
            assert httpx.post(url, json=PLAIN).status_code == 200
        if time.monotonic() < reopened + 1.9:
            assert len(flaky.received) == 3  # 1.2 s later: still out (it would be back after a plain 1 s)
        time.sleep(max(0.0, reopened + 2.0 - time.monotonic()))
        until(6, 5.0)  # the probe succeeds: back in the rotation, sharing the load again
        assert state() == 0


def test_retry_budget_caps_retries() -> None:
    a = Recorder(status=503, body=b'{"error":{"message":"a is down","code":503}}')
    b = Recorder(status=503, body=b'{"error":{"message":"b is down","code":503}}')
    budget = {"budget_ratio": 0.0, "min_per_s": 0.1}  # one retry per 10 s window, none in proportion
    with (
        ThreadServer(a.app()) as sa,
        ThreadServer(b.app()) as sb,
        gateway(("a", sa.url), ("b", sb.url), retry=budget, breaker={"failures": 100}) as gw,
    ):
        statuses = [httpx.post(f"{gw.url}/v1/chat/completions", json=PLAIN).status_code for _ in range(4)]
        assert statuses == [503] * 4
        assert len(a.received) + len(b.received) == 5  # 4 requests, 1 retry
        text = httpx.get(f"{gw.url}/metrics").text
        assert metric(text, "gateway_retries_total", model="m") == 1
        assert metric(text, "gateway_retry_budget_exhausted_total", model="m") == 3


# -- overload ---------------------------------------------------------------------------------------------------
def test_concurrency_limit_queues_then_refuses_with_429() -> None:
    slow = create_emulator_app(EmulatorConfig(model="m", ttft_ms=600, itl_ms=1, output_tokens=2))
    limits = {"max_concurrency": 2, "max_queue": 2}
    with ThreadServer(slow) as b, gateway(("b", b.url), backend=limits, timeouts={"read": 5, "first_token": 5}) as gw:
        results: list[httpx.Response] = []

        def call() -> None:
            results.append(httpx.post(f"{gw.url}/v1/chat/completions", json=PLAIN, timeout=10))

        threads = [threading.Thread(target=call) for _ in range(6)]
        for t in threads:
            t.start()
            time.sleep(0.03)  # arrive in order
        time.sleep(0.2)
        waiting = metric(httpx.get(f"{gw.url}/metrics").text, "gateway_queue_waiting", model="m")
        for t in threads:
            t.join()
        assert waiting == 2
        statuses = Counter(r.status_code for r in results)
        assert statuses == {200: 4, 429: 2}
        refused = [r for r in results if r.status_code == 429]
        assert all(r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "overloaded" for r in refused)
        text = httpx.get(f"{gw.url}/metrics").text
        assert metric(text, "gateway_rejected_total", model="m", reason="overloaded") == 2
        assert metric(text, "gateway_queue_waiting", model="m") == 0
        assert metric(text, "gateway_requests_in_flight", model="m") == 0


def test_queue_wait_is_bounded_and_a_leaving_client_leaves_the_queue() -> None:
    slow = create_emulator_app(EmulatorConfig(model="m", ttft_ms=1500, itl_ms=1, output_tokens=2))
    limits = {"max_concurrency": 1, "max_queue": 5}
    t = {"read": 5, "first_token": 5}
    with ThreadServer(slow) as b, gateway(("b", b.url), backend=limits, timeouts=t, queue_timeout_s=0.3) as gw:
        url = f"{gw.url}/v1/chat/completions"
        first = threading.Thread(target=lambda: httpx.post(url, json=PLAIN, timeout=10))
        first.start()
        time.sleep(0.2)
        t0 = time.monotonic()
        r = httpx.post(url, json=PLAIN)
        assert r.status_code == 429 and 0.25 < time.monotonic() - t0 < 1.0
        with pytest.raises(httpx.ReadTimeout):  # a client that gives up while queued
            httpx.post(url, json=PLAIN, timeout=0.1)
        time.sleep(0.3)
        text = httpx.get(f"{gw.url}/metrics").text
        assert metric(text, "gateway_queue_waiting", model="m") == 0
        assert metric(text, "gateway_rejected_total", model="m", reason="queue_timeout") == 1
        first.join()


def test_when_every_replica_is_ejected_traffic_still_flows_panic_routing() -> None:
    broken = Recorder(status=500, body=b'{"error":{"message":"boom","code":500}}')
    with ThreadServer(broken.app()) as b, gateway(("only", b.url), breaker={"failures": 1, "open_s": 60}) as gw:
        statuses = [httpx.post(f"{gw.url}/v1/chat/completions", json=PLAIN).status_code for _ in range(3)]
        assert statuses == [500, 500, 500]  # the backend's own answer every time, not the gateway's 503
        assert len(broken.received) == 3
        text = httpx.get(f"{gw.url}/metrics").text
        assert metric(text, "gateway_backend_circuit_state", backend="only") == 2


# -- client behaviour -------------------------------------------------------------------------------------------
def test_disconnect_before_the_first_token_cancels_the_upstream_call() -> None:
    slow = EmulatorConfig(model="m", ttft_ms=3000, itl_ms=1, output_tokens=3)
    with ThreadServer(create_emulator_app(slow)) as b, gateway(("b", b.url), timeouts={"first_token": 10}) as gw:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{gw.url}/v1/chat/completions", json=STREAM, timeout=httpx.Timeout(5, read=0.3))
        deadline = time.monotonic() + 2.0  # the first token is 2.7 s away: a request not aborted still runs
        while metric(httpx.get(f"{b.url}/metrics").text, "vllm:num_requests_running") != 0:
            assert time.monotonic() < deadline, "the backend still runs the request 2 s after the client left"
            time.sleep(0.02)
        text = httpx.get(f"{gw.url}/metrics").text
        assert metric(text, "gateway_requests_total", model="m", status="499") == 1
        assert metric(text, "gateway_requests_in_flight", model="m") == 0
        assert errors(gw.url, "b") == {}  # the client left: not held against the backend


def test_a_reader_slower_than_the_backend_gets_every_byte_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Token events are sent from the upstream connection's callback while the relay task waits. When the client
    does not keep up, those sends must wait for its socket, later events queue behind them, and nothing is lost,
    reordered or duplicated."""
    waited: list[int] = []
    send_now = asgi.send_now  # what gateway.relay.proxy calls

    def counting_send_now(send: Any, message: Any) -> Any:
        pending = send_now(send, message)
        if pending is not None:
            waited.append(1)
        return pending

    monkeypatch.setattr("gateway.relay.proxy.send_now", counting_send_now)
    # 16 MB, more than the sockets buffer, one event a millisecond: the relay task is idle when each arrives, so
    # the events are sent from the callback until the client's socket is full, then the task takes over.
    script = [chunk(f"{i:05d}" + "x" * 8000) for i in range(2000)]
    script += [chunk("end", "length"), USAGE, DONE]
    backend = ThreadServer(Recorder(chunks=script, chunk_delay=0.001).app())
    with backend as b, gateway(("b", b.url), timeouts={"stall": 30}) as gw:
        with httpx.stream("POST", f"{gw.url}/v1/chat/completions", json=STREAM, timeout=60) as r:
            time.sleep(1.5)  # the gateway's writes back up
            received = b"".join(r.iter_raw())
        assert received == b"".join(script)
        assert waited, "no send ever had to wait: the slow path was not exercised"
        text = httpx.get(f"{gw.url}/metrics").text
        assert metric(text, "gateway_requests_total", model="m", status="200") == 1


def test_a_slow_reader_does_not_slow_other_streams() -> None:
    cfg = EmulatorConfig(model="m", ttft_ms=5, itl_ms=2, output_tokens=3000)  # ~6 s of output for the stuck reader
    body = {**STREAM, "max_tokens": 3000, "messages": [{"role": "user", "content": "x" * 2000}]}
    with ThreadServer(create_emulator_app(cfg)) as b, gateway(("b", b.url)) as gw:
        url = f"{gw.url}/v1/chat/completions"
        with httpx.stream("POST", url, json=body, timeout=30) as stuck:
            assert stuck.status_code == 200  # headers read, the body never is
            t0 = time.monotonic()
            for _ in range(3):
                r = httpx.post(url, json={**STREAM, "max_tokens": 50}, timeout=10)
                assert r.status_code == 200 and r.content.endswith(DONE)
            assert time.monotonic() - t0 < 2.0  # 3 x 50 tokens at 2 ms: about 0.3 s, whatever the stuck one does


# -- the fan-out facing the same faults ---------------------------------------------------------------------------
ENGINE_DIED = b'data: {"error":{"message":"engine died","type":"InternalServerError","code":500}}\n\n'


def last_error_code(answer: httpx.Response) -> object:
    """The error code a plain call ended with: its status's error body, or its stream's last error event."""
    if answer.status_code != 200:
        return answer.json()["error"]["code"]
    errors = [json.loads(e[6:])["error"] for e in events(answer.content) if e.startswith(b'data: {"error"')]
    return errors[-1]["code"] if errors else None


def tally(url: str) -> Counter[str]:
    """What the gateway counted: backend failures by reason, and model m's calls by status."""
    from prometheus_client.parser import text_string_to_metric_families

    out: Counter[str] = Counter()
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            if s.name == "gateway_upstream_errors_total":
                out[f"upstream_errors {s.labels['reason']}"] += int(s.value)
            elif s.name == "gateway_requests_total" and s.labels["model"] == "m":
                out[f"requests {s.labels['status']}"] += int(s.value)
    return +out


@pytest.mark.parametrize(
    "fault",
    [
        Recorder(status=500, body=b'{"error":{"message":"boom","type":"InternalServerError","code":500}}'),
        Recorder(status=502, body=b"<html>502 Bad Gateway</html>", content_type="text/html"),
        Recorder(status=400, body=b"<html>400 Bad Request</html>", content_type="text/html"),
        Recorder(chunks=[Pause(3.0), *GOOD_STREAM]),
        Recorder(chunks=[chunk("a"), Pause(3.0), chunk("b", "length"), DONE]),
        Recorder(chunks=[chunk("a"), chunk("b"), Die()]),
        Recorder(chunks=[chunk("a"), chunk("b")]),
        Recorder(chunks=[chunk("a"), ENGINE_DIED, DONE]),
        Recorder(chunks=[chunk("a"), ENGINE_DIED]),
        Recorder(chunks=[chunk("a"), b"data: not JSON\n\n", chunk("b", "length"), USAGE, DONE]),
        Recorder(chunks=[chunk("a", "length"), USAGE, b"data: [DONE]"]),
    ],
    ids=["500", "html-502", "html-400", "slow-first-token", "stall", "death", "no-done", "error-event",
         "error-event-no-done", "not-json-event", "done-unterminated"],
)  # fmt: skip
def test_a_fan_out_reports_and_counts_a_backend_fault_as_a_plain_call_does(fault: Recorder) -> None:
    """The same backend fault, met by a plain streaming call, a fan-out and a streaming fan-out: the same error
    code (or none), and the same counts (backend failures by reason, calls by status), once each."""
    with ThreadServer(fault.app()) as b, gateway(("b", b.url)) as gw:
        before = tally(gw.url)
        plain = httpx.post(f"{gw.url}/v1/chat/completions", json=STREAM, timeout=10)
        counted = tally(gw.url) - before
        fanout = {"models": ["m"], "messages": MSG, "max_tokens": 3}
        answer = httpx.post(f"{gw.url}/v1/compare/chat/completions", json=fanout, timeout=10)
        [result] = answer.json()["results"]
        assert (result["error"] or {}).get("code") == last_error_code(plain), (result["error"], plain.content)
        assert tally(gw.url) - before == counted + counted
        streamed = httpx.post(f"{gw.url}/v1/compare/chat/completions", json={**fanout, "stream": True}, timeout=10)
        [result] = [json.loads(e[6:]) for e in events(streamed.content) if e.startswith(b'data: {"type": "result"')]
        assert (result["error"] or {}).get("code") == last_error_code(plain), result["error"]
        assert tally(gw.url) - before == counted + counted + counted
