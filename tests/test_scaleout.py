"""Scale-out on one machine: two ``gateway serve --workers 2`` processes (four workers) behind a round-robin front,
sharing a real PostgreSQL (results) and a real Redis (API-key limits). Every fan-out, whichever worker ran it, is
in one history that every worker serves; a key's rpm holds across the four workers; the four workers' metrics,
summed, match what the client counted."""

from __future__ import annotations

import contextlib
from pathlib import Path

import httpx
import pytest

from gateway.auth import hash_key
from gateway.devstack.emulator import EmulatorConfig
from tests.conftest import card
from tests.redisserver import redis_server
from tests.roundrobin import round_robin
from tests.servers import emulators, metric, serve_config

pytestmark = pytest.mark.slow

OPS = "gk-ops-scaleout-0123456789abcdef0123456789ab"
TEAM = "gk-team-scaleout-0123456789abcdef0123456789a"
MODELS = ("qwen", "llama")


def call(front: str, method: str, path: str, key: str, body: dict[str, object] | None = None) -> httpx.Response:
    """One request on a connection of its own, so that the front sends it to the next worker process in turn."""
    with httpx.Client(timeout=60) as client:
        return client.request(method, f"{front}{path}", json=body, headers={"authorization": f"Bearer {key}"})


def test_four_workers_share_one_history_one_limit_and_add_up(pg_url: str, tmp_path: Path) -> None:
    configs = {m: EmulatorConfig(model=m, ttft_ms=5, itl_ms=1, output_tokens=6) for m in MODELS}
    with redis_server() as redis, emulators(configs) as backends, contextlib.ExitStack() as stack:
        config = {
            "gateway": {
                "results_db": pg_url, "limits_backend": redis.url,
                "auth": {"protect_metrics": False, "keys": [
                    {"name": "ops", "sha256": hash_key(OPS), "admin": True},
                    {"name": "team", "sha256": hash_key(TEAM), "models": ["llama"], "rpm": 10},
                ]},
            },
            "models": [card(m, "llama", "Meta", "US", aliases=[]) for m in MODELS],
            "backends": [{"name": f"b-{m}", "base_url": url, "models": [m]} for m, url in backends.items()],
        }  # fmt: skip
        gateways = [
            stack.enter_context(serve_config(config, tmp_path / f"gateway-{i}.json", "--workers", "2"))
            for i in range(2)
        ]
        front = stack.enter_context(round_robin(gateways)).url

        # fan-outs through the front, each on its own connection: they are run by different workers
        ids, tokens = [], 0
        for i in range(8):
            body = {"models": list(MODELS), "messages": [{"role": "user", "content": f"question {i}"}],
                    "max_tokens": 6}  # fmt: skip
            r = call(front, "POST", "/v1/compare/chat/completions", OPS, body)
            assert r.status_code == 200, r.text
            ids.append(r.headers["x-comparison-id"])
            results = r.json()["results"]
            assert all(a["error"] is None for a in results), results
            tokens += sum(a["response"]["usage"]["completion_tokens"] for a in results)
        # every worker lists every one of them and serves each by id
        for _ in range(4):
            listed = call(front, "GET", "/v1/compare?limit=100", OPS)
            assert listed.status_code == 200, listed.text
            assert set(ids) <= {c["id"] for c in listed.json()["data"]}
        for comparison_id in ids:
            r = call(front, "GET", f"/v1/compare/{comparison_id}", OPS)
            assert r.status_code == 200, r.text
            assert sorted(row["model"] for row in r.json()["results"]) == sorted(MODELS)

        # one rpm for the key across the four workers
        chat = {"model": "llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6}
        answers = [call(front, "POST", "/v1/chat/completions", TEAM, chat) for _ in range(30)]
        codes = [r.status_code for r in answers]
        assert set(codes) <= {200, 429}, codes
        admitted = codes.count(200)
        assert 10 <= admitted <= 12, codes  # 10, plus what the bucket refilled meanwhile (1 per 6 s)
        tokens += sum(r.json()["usage"]["completion_tokens"] for r in answers if r.status_code == 200)

        # the metrics of the two processes (each the sum of its two workers) add up to the client's counts
        texts = [httpx.get(f"{g}/metrics", timeout=30).text for g in gateways]
        assert sum(metric(t, "gateway_rejected_total", reason="rate_limited") for t in texts) == codes.count(429)
        assert sum(metric(t, "gateway_completion_tokens_total") for t in texts) == tokens
        for model, calls in (("qwen", len(ids)), ("llama", len(ids) + admitted)):  # fan-outs count per model
            assert sum(metric(t, "gateway_requests_total", model=model, status="200") for t in texts) == calls
        assert all(metric(t, "gateway_limits_backend_errors_total") == 0 for t in texts)
