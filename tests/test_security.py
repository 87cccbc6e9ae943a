"""API keys, per-key allow-lists and rate limits, request head and content-type checks, CORS, /metrics placement,
what never leaks (keys, prompts), and graceful drain."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from gateway.app import create_app
from gateway.auth import hash_key
from gateway.compare.runs import fetch_cards
from gateway.config import ModelCard
from gateway.devstack.emulator import EmulatorConfig, create_emulator_app
from gateway.devstack.supervisor import free_port
from tests.backends import Recorder
from tests.conftest import card, settings_for
from tests.servers import REPO, ThreadServer, cli, samples

KEY_A = "gk-team-a-0123456789abcdef0123456789abcdef"
KEY_B = "gk-team-b-fedcba9876543210fedcba9876543210"
KEY_ADMIN = "gk-admin-00000000000000000000000000000000"
PLAIN = {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def keyed_gateway(
    backend_url: str,
    rpm: int = 1000,
    *,
    auth: dict[str, Any] | None = None,
    backend: str = "b",
    models: list[dict[str, Any]] | None = None,
    **section: Any,
) -> ThreadServer:
    """Keys: team-a (m1 only, ``rpm``), team-b (every model, 10 tokens a minute), ops (admin); ``auth`` adds to
    or replaces them (``{"keys": []}``: keys off). One backend serves m1 and m2 (alias llama)."""
    keys = [
        {"name": "team-a", "sha256": hash_key(KEY_A), "models": ["m1"], "rpm": rpm},
        {"name": "team-b", "sha256": hash_key(KEY_B), "tpm": 10},
        {"name": "ops", "sha256": hash_key(KEY_ADMIN), "admin": True},
    ]
    settings = settings_for(
        [{"name": backend, "base_url": backend_url, "models": ["m1", "m2"]}],
        models
        or [card("m1", "qwen3", "Alibaba", "CN", aliases=[]), card("m2", "llama", "Meta", "US", aliases=["llama"])],
        auth={"keys": keys, **(auth or {})},
        **section,
    )
    return ThreadServer(create_app(settings))


def bearer(key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"} if key else {}


@pytest.fixture(scope="module")
def keyed() -> Iterator[tuple[str, Recorder]]:
    rec = Recorder()  # usage: 2 prompt + 3 completion tokens per call
    with ThreadServer(rec.app()) as b, keyed_gateway(b.url) as gw:
        yield gw.url, rec


def post(url: str, key: str | None, body: dict[str, Any] = PLAIN, path: str = "/v1/chat/completions") -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}{path}", json=body, headers=headers)


def test_keys_are_required_and_checked(keyed: tuple[str, Recorder]) -> None:
    url, rec = keyed
    before = len(rec.received)
    for key, why in ((None, "missing API key"), ("gk-wrong", "invalid API key")):
        r = post(url, key)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key" and why in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/chat/completions", json=PLAIN, headers={"authorization": f"Basic {KEY_A}"})
    assert r.status_code == 401
    assert len(rec.received) == before  # nothing reached the backend
    sdk = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY_ADMIN, max_retries=0)
    assert sdk.chat.completions.create(model="m2", messages=[{"role": "user", "content": "hi"}]).choices
    assert httpx.get(f"{url}/health").status_code == 200 and httpx.get(f"{url}/ready").status_code == 200


def test_a_key_sees_and_uses_only_its_models(keyed: tuple[str, Recorder]) -> None:
    url, _ = keyed
    listed = httpx.get(f"{url}/v1/models", headers={"authorization": f"Bearer {KEY_A}"}).json()["data"]
    assert [m["id"] for m in listed] == ["m1"]
    for body, path in (
        ({**PLAIN, "model": "llama"}, "/v1/chat/completions"),  # an alias of a model it may not use
        ({**PLAIN, "models": ["m1", "m2"]}, "/v1/compare/chat/completions"),
    ):
        r = post(url, KEY_A, body, path)
        assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"
    assert httpx.get(f"{url}/v1/compare", headers={"authorization": f"Bearer {KEY_A}"}).status_code == 403
    assert httpx.get(f"{url}/v1/compare", headers={"authorization": f"Bearer {KEY_ADMIN}"}).status_code == 200


def test_ready_says_only_ready_or_not_without_an_admin_key() -> None:
    with ThreadServer(Recorder().app()) as b, keyed_gateway(b.url, backend="gpu-rack-7") as gw:
        for key in (None, KEY_A, "gk-not-a-key"):  # a probe needs no key; a wrong one is not refused either
            r = httpx.get(f"{gw.url}/ready", headers=bearer(key))
            assert r.status_code == 200 and r.json() == {"ready": True, "draining": False}
        full = httpx.get(f"{gw.url}/ready", headers=bearer(KEY_ADMIN)).json()
        assert full == {
            "ready": True,
            "draining": False,
            "models": {"m1": True, "m2": True},
            "backends": {"gpu-rack-7": True},
        }
        app: Any = gw.server.config.app
        app.state.gateway.draining = True
        r = httpx.get(f"{gw.url}/ready", headers=bearer(KEY_B))
        assert r.status_code == 503 and r.json() == {"ready": False, "draining": True}
    with ThreadServer(Recorder().app()) as b, keyed_gateway(b.url, auth={"keys": []}) as gw:  # keys off: as before
        full = httpx.get(f"{gw.url}/ready").json()
        assert full["models"] == {"m1": True, "m2": True} and full["backends"] == {"b": True}


def test_models_list_shows_a_key_nothing_of_models_it_may_not_use() -> None:
    mirrored = card("m1", "qwen3", "Alibaba", "CN", aliases=[], mirror={"to": ["m2"], "fraction": 0.0})
    models = [mirrored, card("m2", "llama", "Meta", "US", aliases=["llama"])]
    with ThreadServer(Recorder().app()) as b, keyed_gateway(b.url, backend="gpu-rack-7", models=models) as gw:

        def listed(key: str) -> list[dict[str, Any]]:
            r = httpx.get(f"{gw.url}/v1/models", headers=bearer(key))
            assert r.status_code == 200
            data: list[dict[str, Any]] = r.json()["data"]
            return data

        team_a = listed(KEY_A)  # m1 only: nothing may name m2 (its id, its alias, a mirror target) or a backend
        assert [m["id"] for m in team_a] == ["m1"]
        for hidden in ("m2", "llama", "gpu-rack-7"):
            assert hidden not in json.dumps(team_a), hidden
        assert team_a[0]["card"]["mirror"] is None and team_a[0]["card"]["list_price"] == mirrored["list_price"]
        team_b = listed(KEY_B)  # every model, not an admin: the mirror target is one of its models; no backends
        assert [m["id"] for m in team_b] == ["m1", "m2"] and team_b[0]["card"]["mirror"]["to"] == ["m2"]
        assert "gpu-rack-7" not in json.dumps(team_b)
        admin = listed(KEY_ADMIN)
        assert admin[0]["backends"] == ["gpu-rack-7"] and admin[0]["card"]["mirror"]["to"] == ["m2"]
    with (
        ThreadServer(Recorder().app()) as b,
        keyed_gateway(b.url, backend="gpu-rack-7", models=models, auth={"keys": []}) as gw,
    ):  # keys off: everything, as `gateway compare` reads it
        data = httpx.get(f"{gw.url}/v1/models").json()["data"]
        assert [m["backends"] for m in data] == [["gpu-rack-7"], ["gpu-rack-7"]]
        assert fetch_cards(gw.url) == {m["id"]: ModelCard.model_validate(m) for m in models}


def test_docs_and_the_ui_page_follow_the_key_rules(keyed: tuple[str, Recorder], open_gateway: str) -> None:
    url, _ = keyed
    for path in ("/docs", "/openapi.json"):  # the API's shape is for clients that hold a key (public_docs: false)
        r = httpx.get(f"{url}{path}")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
        assert httpx.get(f"{url}{path}", headers=bearer("gk-wrong")).status_code == 401
        assert httpx.get(f"{url}{path}", headers=bearer(KEY_A)).status_code == 200
    page = httpx.get(f"{url}/ui")  # the page shell holds no data; its calls carry the key (public_ui: true)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for path in ("/docs", "/openapi.json", "/ui"):  # keys off: open, as before
        assert httpx.get(f"{open_gateway}{path}").status_code == 200
    flipped = {"public_docs": True, "public_ui": False}
    with ThreadServer(Recorder().app()) as b, keyed_gateway(b.url, auth=flipped) as gw:
        assert httpx.get(f"{gw.url}/docs").status_code == 200
        assert "/v1/chat/completions" in httpx.get(f"{gw.url}/openapi.json").json()["paths"]
        r = httpx.get(f"{gw.url}/ui")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{gw.url}/ui", headers=bearer(KEY_A)).status_code == 200


def test_requests_per_minute_limit() -> None:
    with ThreadServer(Recorder().app()) as b, keyed_gateway(b.url, rpm=3) as gw:
        answers = [post(gw.url, KEY_A) for _ in range(4)]
        assert [r.status_code for r in answers] == [200, 200, 200, 429]
        assert answers[0].headers["x-ratelimit-limit-requests"] == "3"
        assert answers[2].headers["x-ratelimit-remaining-requests"] == "0"
        refused = answers[3]
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert 1 <= int(refused.headers["retry-after"]) <= 20  # one request refills in 60 / 3 s
        assert post(gw.url, KEY_B).status_code == 200  # other keys are not affected


def test_tokens_per_minute_limit_reserves_then_charges_real_usage() -> None:
    with ThreadServer(Recorder().app()) as b, keyed_gateway(b.url) as gw:
        # 10 tokens a minute. A call reserves its possible cost, at most a full bucket (here all 10: its prompt
        # estimate plus max_tokens 3 is more), and is charged its real usage (5) when it ends: a second call finds
        # 5 left, not enough to reserve 10, and is refused until the bucket refills.
        answers = [post(gw.url, KEY_B) for _ in range(2)]
        assert [r.status_code for r in answers] == [200, 429]
        assert answers[0].headers["x-ratelimit-remaining-tokens"] == "0"  # all 10 reserved while it ran
        refused = answers[1]
        assert "tokens per minute" in refused.json()["error"]["message"]
        assert refused.headers["x-ratelimit-remaining-tokens"] == "5"  # 5 refunded: usage was 2 + 3
        assert 1 <= int(refused.headers["retry-after"]) <= 31  # 5 more tokens take 30 s at 10 a minute


def test_metrics_need_an_admin_key_or_move_to_their_own_port(keyed: tuple[str, Recorder]) -> None:
    url, _ = keyed
    assert httpx.get(f"{url}/metrics").status_code == 401
    assert httpx.get(f"{url}/metrics", headers={"authorization": f"Bearer {KEY_A}"}).status_code == 403
    text = httpx.get(f"{url}/metrics", headers={"authorization": f"Bearer {KEY_ADMIN}"}).text
    assert samples(text, "gateway_requests_total")
    assert samples(text, "gateway_rejected_total", model="unknown", reason="unauthorized")
    port = free_port()
    with ThreadServer(Recorder().app()) as b, keyed_gateway(b.url, metrics_port=port) as gw:
        assert httpx.get(f"{gw.url}/metrics", headers={"authorization": f"Bearer {KEY_ADMIN}"}).status_code == 404
        assert samples(httpx.get(f"http://127.0.0.1:{port}/metrics").text, "gateway_requests_total")


def test_a_key_from_the_environment_opens_the_gateway(monkeypatch: pytest.MonkeyPatch) -> None:
    # The shipped deployments' admin key: its secret in an environment variable, not its hash in the file.
    monkeypatch.setenv("GW_TEST_ADMIN_KEY", KEY_ADMIN)
    keys = [
        {"name": "ops", "key_env": "GW_TEST_ADMIN_KEY", "admin": True},
        {"name": "team-a", "sha256": hash_key(KEY_A)},
    ]
    with ThreadServer(Recorder().app()) as b, keyed_gateway(b.url, auth={"keys": keys}) as gw:
        assert post(gw.url, None).status_code == 401 and post(gw.url, "GW_TEST_ADMIN_KEY").status_code == 401
        assert post(gw.url, KEY_ADMIN).status_code == 200 and post(gw.url, KEY_A).status_code == 200
        admin, team = ({"authorization": f"Bearer {k}"} for k in (KEY_ADMIN, KEY_A))
        # stored comparisons and /metrics: the environment's key is the admin, the other is not
        assert httpx.get(f"{gw.url}/v1/compare", headers=admin).status_code == 200
        assert httpx.get(f"{gw.url}/v1/compare", headers=team).status_code == 403
        assert httpx.get(f"{gw.url}/metrics", headers=admin).status_code == 200
        assert httpx.get(f"{gw.url}/metrics", headers=team).status_code == 403


def test_keys_and_prompts_never_reach_logs_or_metrics(caplog: pytest.LogCaptureFixture) -> None:
    secret_prompt = "my-secret-prompt-4f2a"
    body = {**PLAIN, "messages": [{"role": "user", "content": secret_prompt}]}
    rec = Recorder()
    caplog.set_level(logging.DEBUG)
    with ThreadServer(rec.app()) as b, keyed_gateway(b.url) as gw:
        assert post(gw.url, KEY_A, body).status_code == 200
        post(gw.url, "gk-not-a-key-but-secret", body)
        post(gw.url, KEY_A, {**body, "stream": True})
        metrics = httpx.get(f"{gw.url}/metrics", headers={"authorization": f"Bearer {KEY_ADMIN}"}).text
    for secret in (secret_prompt, KEY_A, "gk-not-a-key-but-secret", hash_key(KEY_A)):
        assert secret not in caplog.text
        assert secret not in metrics
    assert "authorization" not in {k.lower() for k in rec.received[0][1]}  # the client's key is not forwarded


def test_clients_cannot_choose_the_upstream() -> None:
    rec = Recorder()
    with ThreadServer(rec.app()) as b, keyed_gateway(b.url, auth={"keys": []}) as gw:
        body = {**PLAIN, "base_url": "http://169.254.169.254", "api_base": "http://evil.example"}
        headers = {"host": "evil.example", "x-forwarded-host": "evil.example", "x-backend": "http://evil.example"}
        r = httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 200 and r.headers["x-gateway-backend"] == "b"
        assert len(rec.received) == 1  # the configured backend got it; the fields went along as unknown params


# -- request heads and content types -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def open_gateway() -> Iterator[str]:
    with ThreadServer(Recorder().app()) as b, keyed_gateway(b.url, auth={"keys": []}) as gw:
        yield gw.url


@pytest.mark.parametrize(
    ("headers", "content", "status", "code"),
    [
        ({"content-type": "text/plain"}, json.dumps(PLAIN).encode(), 415, "unsupported_media_type"),
        ({"content-type": "application/x-www-form-urlencoded"}, b"model=m1", 415, "unsupported_media_type"),
        ({"content-type": "application/json"}, b'{"model": "m1", "messages": "\xff\xfe"}', 400, "invalid_request"),
        ({f"x-h{i}": "v" for i in range(120)}, json.dumps(PLAIN).encode(), 431, "headers_too_large"),
        ({"x-big": "v" * 40_000}, json.dumps(PLAIN).encode(), 431, "headers_too_large"),
    ],
    ids=["text-plain", "form", "non-utf8", "many-headers", "huge-header"],
)
def test_bad_request_heads_are_clear_4xx(
    open_gateway: str, headers: dict[str, str], content: bytes, status: int, code: str
) -> None:
    r = httpx.post(f"{open_gateway}/v1/chat/completions", content=content, headers=headers)
    assert r.status_code == status
    assert r.json()["error"]["code"] == code and r.json()["error"]["message"]


@pytest.mark.parametrize("content_type", [None, "application/json; charset=utf-8", "application/vnd.api+json"])
def test_json_content_types_and_none_are_accepted(open_gateway: str, content_type: str | None) -> None:
    headers = {"content-type": content_type} if content_type else {}
    request = httpx.Request("POST", f"{open_gateway}/v1/chat/completions", content=json.dumps(PLAIN).encode())
    for key in list(request.headers):
        if key.lower() == "content-type":
            del request.headers[key]
    request.headers.update(headers)
    with httpx.Client() as c:
        assert c.send(request).status_code == 200


def test_cors_is_off_unless_configured(open_gateway: str) -> None:
    preflight = {"origin": "https://evil.example", "access-control-request-method": "POST"}
    r = httpx.options(f"{open_gateway}/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    r = httpx.get(f"{open_gateway}/v1/models", headers={"origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    with (
        ThreadServer(Recorder().app()) as b,
        keyed_gateway(b.url, auth={"keys": []}, cors_origins=["https://ui.example"]) as gw,
    ):
        r = httpx.options(f"{gw.url}/v1/chat/completions", headers={**preflight, "origin": "https://ui.example"})
        assert r.headers["access-control-allow-origin"] == "https://ui.example"
        r = httpx.options(f"{gw.url}/v1/chat/completions", headers=preflight)
        assert "access-control-allow-origin" not in r.headers


def test_cors_with_keys_on_preflights_pass_and_refusals_carry_the_allow_origin() -> None:
    origin = "https://ui.example"
    with (
        ThreadServer(Recorder().app()) as b,
        keyed_gateway(b.url, rpm=1, cors_origins=[origin], max_body_bytes=1024) as gw,
    ):
        url = f"{gw.url}/v1/chat/completions"
        asks = {"origin": origin, "access-control-request-method": "POST"}
        asks["access-control-request-headers"] = "authorization, content-type, x-request-id"
        r = httpx.options(url, headers=asks)  # a browser's preflight never carries the key
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
        assert {"authorization", "content-type"} <= {
            h.strip() for h in r.headers["access-control-allow-headers"].split(",")
        }
        assert "POST" in r.headers["access-control-allow-methods"]
        r = httpx.options(url, headers={**asks, "origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"

        def call(key: str | None, body: dict[str, Any] = PLAIN, **kwargs: Any) -> httpx.Response:
            headers = {"origin": origin, **bearer(key), **kwargs.pop("headers", {})}
            return httpx.post(url, headers=headers, **({"json": body} | kwargs))

        assert call(KEY_A).status_code == 200  # team-a's one request a minute
        answers = {
            401: call(None),  # the call itself still needs the key
            403: call(KEY_A, {**PLAIN, "model": "m2"}),  # refused before admission: costs no request
            429: call(KEY_A),  # the minute's request is spent
            413: call(KEY_B, content=b"x" * 2000),
            415: call(KEY_B, content=json.dumps(PLAIN).encode(), headers={"content-type": "text/plain"}),
            431: call(KEY_B, headers={f"x-h{i}": "v" for i in range(120)}),
            200: call(KEY_B),
        }
        for status, r in answers.items():
            assert r.status_code == status, (status, r.text)
            assert r.headers.get("access-control-allow-origin") == origin, status
            exposed = {h.strip() for h in r.headers["access-control-expose-headers"].split(",")}
            assert {"retry-after", "x-request-id", "x-ratelimit-remaining-requests"} <= exposed, status
        assert answers[429].headers["retry-after"] and answers[200].headers["x-ratelimit-remaining-tokens"]
        stranger = httpx.post(url, json=PLAIN, headers={"origin": "https://evil.example"})
        assert stranger.status_code == 401 and "access-control-allow-origin" not in stranger.headers


def test_keygen_prints_a_key_and_its_hash_entry() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "keygen", "--name", "team-x", "--models", "m1,m2", "--rpm", "60"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    key = next(line.strip() for line in out.splitlines() if line.strip().startswith("gk-"))
    entry = yaml.safe_load(out[out.index("- name:") :])[0]
    assert entry == {"name": "team-x", "sha256": hash_key(key), "models": ["m1", "m2"], "rpm": 60}


# -- graceful drain ---------------------------------------------------------------------------------------------
def drain_config(tmp_path: Path, backend: str, drain_s: float) -> Path:
    config = {
        "gateway": {"drain_s": drain_s, "results_db": ":memory:", "log_level": "warning"},
        "models": [card("m1", "qwen3", "Alibaba", "CN", aliases=[])],
        "backends": [{"name": "b", "base_url": backend, "models": ["m1"]}],
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_stream(url: str, into: list[bytes]) -> threading.Thread:
    body = {**PLAIN, "stream": True, "max_tokens": 40}

    def run() -> None:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=20) as r:
            for data in r.iter_raw():
                into.append(data)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.slow
@pytest.mark.parametrize(("drain_s", "finishes"), [(10.0, True), (0.5, False)], ids=["within-drain", "past-drain"])
def test_sigterm_drains_streams_then_exits(tmp_path: Path, drain_s: float, finishes: bool) -> None:
    emulator = create_emulator_app(EmulatorConfig(model="m1", ttft_ms=10, itl_ms=50, output_tokens=40))  # 2 s
    with ThreadServer(emulator) as backend:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        config = drain_config(tmp_path, backend.url, drain_s)
        with cli("serve", "--config", str(config), "--port", str(port), ready=f"{url}/ready") as proc:
            received: list[bytes] = []
            stream = start_stream(url, received)
            time.sleep(0.4)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            with pytest.raises(httpx.ConnectError):  # no new connections once draining
                httpx.get(f"{url}/health", timeout=1)
            stream.join(15)
            assert proc.wait(15) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
            elapsed = time.monotonic() - t0
        raw = b"".join(received)
        assert raw.endswith(b"data: [DONE]\n\n")
        if finishes:
            assert b'"finish_reason":"length"' in raw and b'"error"' not in raw  # the whole answer
            assert elapsed > 1.0
        else:
            error = json.loads(raw.split(b"\n\n")[-3].removeprefix(b"data: "))["error"]
            assert error["code"] == "shutting_down"
            assert b'"finish_reason":"length"' not in raw
            assert elapsed < 1.8  # ended at drain_s (0.5 s), not when the 2 s answer would have ended


def test_ready_turns_503_while_draining() -> None:
    with ThreadServer(Recorder().app()) as b:
        gw = keyed_gateway(b.url, auth={"keys": []})
        with gw:
            assert httpx.get(f"{gw.url}/ready").status_code == 200
            app: Any = gw.server.config.app
            app.state.gateway.draining = True  # what SIGTERM sets (see the test above)
            r = httpx.get(f"{gw.url}/ready")
            assert r.status_code == 503 and r.json()["draining"] is True


def test_a_fan_out_stream_past_the_drain_time_ends_explicitly(tmp_path: Path) -> None:
    emulator = create_emulator_app(EmulatorConfig(model="m1", ttft_ms=10, itl_ms=50, output_tokens=40))  # 2 s
    with ThreadServer(emulator) as backend:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        config = drain_config(tmp_path, backend.url, 0.5)
        with cli("serve", "--config", str(config), "--port", str(port), ready=f"{url}/ready") as proc:
            received: list[bytes] = []
            body = {"models": ["m1"], "messages": PLAIN["messages"], "max_tokens": 40, "stream": True}

            def run() -> None:
                with httpx.stream("POST", f"{url}/v1/compare/chat/completions", json=body, timeout=20) as r:
                    received.extend(r.iter_raw())

            stream = threading.Thread(target=run)
            stream.start()
            time.sleep(0.4)
            proc.send_signal(signal.SIGTERM)
            stream.join(15)
            assert proc.wait(15) in (0, -signal.SIGTERM)
        raw = b"".join(received)
        assert raw.endswith(b"data: [DONE]\n\n")
        assert json.loads(raw.split(b"\n\n")[-3].removeprefix(b"data: "))["error"]["code"] == "shutting_down"
