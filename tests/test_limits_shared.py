"""API-key limits shared through a real Redis (``gateway.limits_backend``): one budget for every worker and
replica, the same answers as the in-process buckets, and an outage that never blocks a call (fail_open) or refuses
it with a clear 503 (fail_closed)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from gateway.app import create_app
from gateway.auth import hash_key
from gateway.config import ConfigError
from gateway.devstack.emulator import EmulatorConfig, create_emulator_app
from gateway.devstack.supervisor import free_port
from gateway.errors import RateLimited
from gateway.limits import RETRY_AFTER_S, Grant, LocalLimits, RedisLimits, SharedLimits
from gateway.metrics import Metrics
from tests.conftest import card, settings_for
from tests.redisserver import RedisServer, redis_server
from tests.servers import ThreadServer, metric, serve_config

KEY = "gk-shared-0123456789abcdef0123456789abcdef0"
AUTH = {"authorization": f"Bearer {KEY}"}
KEY10 = "gk-rpm10-0123456789abcdef0123456789abcdef0"  # its own Redis buckets: the module shares one Redis


def shared(url: str, **options: Any) -> tuple[SharedLimits, Metrics]:
    metrics = Metrics(CollectorRegistry())
    return SharedLimits(url, metrics, **options), metrics


def errors(metrics: Metrics, outcome: str) -> float:
    return float(metrics.limits_backend_errors.labels(outcome)._value.get())


async def outcome(limits: RedisLimits | LocalLimits, requests: int, tokens: int) -> Grant | None:
    try:
        return await limits.take(requests, tokens)
    except RateLimited:
        return None


def refill_allowance(capacity: int, elapsed_s: float) -> int:
    """How many more admissions a bucket of ``capacity`` a minute can give over ``elapsed_s`` (its refill)."""
    return math.floor(elapsed_s * capacity / 60) + 1


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


def test_two_workers_share_one_request_budget(redis: RedisServer) -> None:
    """Two processes' connection pools (two SharedLimits) alternate 30 calls of one key with rpm 10: 10 are admitted
    in all, not 10 each."""

    async def main() -> tuple[int, float]:
        (a, _), (b, _) = shared(redis.url), shared(redis.url)
        keys = [RedisLimits(s, "budget-test", "k", 10, 0) for s in (a, b)]
        started = time.monotonic()
        admitted = [await outcome(keys[i % 2], 1, 0) for i in range(30)]
        elapsed = time.monotonic() - started
        await a.aclose()
        await b.aclose()
        return sum(g is not None for g in admitted), elapsed

    admitted, elapsed = asyncio.run(main())
    assert 10 <= admitted < 10 + refill_allowance(10, elapsed), (admitted, elapsed)


def test_redis_buckets_answer_as_the_local_ones(redis: RedisServer) -> None:
    """The same sequence of reservations and settlements against both: the same admissions, the same remaining
    tokens in the headers (within what the buckets refill while the test runs), the same Retry-After."""

    async def run(limits: RedisLimits | LocalLimits) -> list[tuple[bool, dict[str, str], float | None]]:
        out: list[tuple[bool, dict[str, str], float | None]] = []
        for op, reserved, used in [("take", 50, 0), ("take", 50, 0), ("take", 50, 0), ("settle", 50, 10),
                                   ("take", 50, 0), ("take", 1, 0), ("settle", 1, 200), ("take", 1, 0)]:  # fmt: skip
            if op == "settle":
                limits.settle(reserved, used)
                if isinstance(limits, RedisLimits):
                    await limits.shared.drain()
                continue
            try:
                grant = await limits.take(1, reserved)
                out.append((True, grant.headers, None))
            except RateLimited as err:
                out.append((False, err.extra_headers, err.retry_after))
        return out

    async def main() -> tuple[list[Any], list[Any]]:
        s, _ = shared(redis.url)
        try:
            far = await run(RedisLimits(s, "parity-test", "k", 60, 120))
        finally:
            await s.aclose()
        return far, await run(LocalLimits("k", 60, 120, time.monotonic))

    far, near = asyncio.run(main())
    assert [ok for ok, *_ in far] == [ok for ok, *_ in near] == [True, True, False, True, True, False]
    for (_, h1, wait1), (_, h2, wait2) in zip(far, near, strict=True):
        assert h1.keys() == h2.keys() == {f"x-ratelimit-{w}-{k}" for w in ("limit", "remaining")
                                          for k in ("requests", "tokens")}  # fmt: skip
        for name in h1:
            assert abs(int(h1[name]) - int(h2[name])) <= 3, (name, far, near)  # 2 tokens a second refill
        if wait1 is not None and wait2 is not None:
            assert abs(wait1 - wait2) < 2.0, (wait1, wait2)


def test_a_settlement_refunds_and_charges_the_shared_bucket(redis: RedisServer) -> None:
    async def main() -> list[str]:
        s, _ = shared(redis.url)
        key = RedisLimits(s, "settle-test", "k", 0, 1000)
        try:
            seen = [(await key.take(1, 600)).headers["x-ratelimit-remaining-tokens"]]  # 400 left
            key.settle(600, 100)  # 500 back
            await s.drain()
            seen.append((await key.take(1, 0)).headers["x-ratelimit-remaining-tokens"])
            key.settle(0, 700)  # a stream's excess, charged after the fact
            await s.drain()
            seen.append((await key.take(1, 0)).headers["x-ratelimit-remaining-tokens"])
        finally:
            await s.aclose()
        return seen

    first, refunded, charged = (int(v) for v in asyncio.run(main()))
    assert 400 <= first <= 410 and 900 <= refunded <= 920 and 200 <= charged <= 230, (first, refunded, charged)


def test_redis_down_fail_open_admits_counts_and_recovers(redis: RedisServer) -> None:
    """A stopped Redis: calls are admitted unchecked and counted; once it is back (and RETRY_AFTER_S has passed)
    the limits hold again."""
    server = RedisServer()
    server.start()
    try:

        async def main() -> tuple[list[bool], float, list[bool], Metrics]:
            s, metrics = shared(server.url)
            key = RedisLimits(s, "outage-test", "k", 2, 0)
            before = [await outcome(key, 1, 0) is not None for _ in range(3)]
            server.stop()
            started = time.monotonic()
            during = await key.take(1, 0)
            took = time.monotonic() - started
            assert during.tokens == 0 and during.headers == {}
            server.start()  # the same port, an empty Redis (nothing is saved)
            await asyncio.sleep(RETRY_AFTER_S + 0.2)
            after = [await outcome(key, 1, 0) is not None for _ in range(3)]
            await s.aclose()
            return before, took, after, metrics

        before, took, after, metrics = asyncio.run(main())
    finally:
        server.cleanup()
    assert before == [True, True, False]
    assert took < 5.0  # refused connection: immediate; the bound is for a loaded machine
    assert errors(metrics, "admitted") == 1
    assert after == [True, True, False]


def test_a_redis_that_never_answers_costs_a_call_its_timeout_once() -> None:
    """A listener that accepts and never replies (a hung Redis): the first call waits ``limits_timeout_s`` and is
    admitted; the next ones within RETRY_AFTER_S do not wait at all."""
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)
        url = f"redis://127.0.0.1:{hung.getsockname()[1]}/0"

        async def main() -> tuple[float, float, Metrics]:
            s, metrics = shared(url, timeout_s=0.3)
            key = RedisLimits(s, "hung-test", "k", 1, 0)
            t0 = time.monotonic()
            await key.take(1, 0)
            first = time.monotonic() - t0
            t0 = time.monotonic()
            for _ in range(5):
                await key.take(1, 0)
            rest = time.monotonic() - t0
            await s.aclose()
            return first, rest, metrics

        first, rest, metrics = asyncio.run(main())
    assert 0.25 <= first < 3.0, first
    assert rest < 0.25, rest  # none of them waited for Redis
    assert errors(metrics, "admitted") == 6


def test_password_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    with redis_server(password="s3cret-redis") as server:

        async def admitted(**options: Any) -> tuple[bool, float]:
            s, metrics = shared(server.url, **options)
            try:
                grant = await RedisLimits(s, "auth-test", "k", 5, 0).take(1, 0)
            finally:
                await s.aclose()
            return bool(grant.headers), errors(metrics, "admitted")

        monkeypatch.setenv("TEST_REDIS_PASSWORD", "s3cret-redis")
        assert asyncio.run(admitted(password_env="TEST_REDIS_PASSWORD")) == (True, 0)  # checked: headers
        assert asyncio.run(admitted()) == (False, 1)  # no password: NOAUTH, fail open, counted
        monkeypatch.delenv("TEST_REDIS_PASSWORD")
        with pytest.raises(RuntimeError, match="TEST_REDIS_PASSWORD"):
            shared(server.url, password_env="TEST_REDIS_PASSWORD")


@pytest.mark.parametrize(
    ("url", "message"),
    [("redis://:pw@127.0.0.1:6379/0", "no password in the URL"), ("http://127.0.0.1:6379", "redis:// or rediss://"),
     ("redis:///0", "no host")],
)  # fmt: skip
def test_limits_backend_urls_are_checked(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        settings_for([{"name": "b", "base_url": "http://127.0.0.1:1", "models": ["m"]}],
                     [card("m", "llama", "Meta", "US", aliases=[])], limits_backend=url)  # fmt: skip


@contextlib.contextmanager
def gateway_over(url: str, **gateway: Any) -> Iterator[str]:
    cfg = EmulatorConfig(model="m", ttft_ms=5, itl_ms=1, output_tokens=4)
    with ThreadServer(create_emulator_app(cfg)) as emulator:
        settings = settings_for(
            [{"name": "b", "base_url": emulator.url, "models": ["m"]}], [card("m", "llama", "Meta", "US", aliases=[])],
            auth={"keys": [{"name": "k", "sha256": hash_key(KEY), "rpm": 100}], "protect_metrics": False},
            limits_backend=url, **gateway,
        )  # fmt: skip
        with ThreadServer(create_app(settings)) as gw:
            yield gw.url


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def test_fail_closed_answers_503_and_fail_open_serves(redis: RedisServer) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    with gateway_over(dead, limits_on_failure="fail_closed") as url:
        r = httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=AUTH, timeout=30)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "rate_limits_unavailable"
        assert httpx.get(f"{url}/v1/models", headers=AUTH, timeout=30).status_code == 503
        text = httpx.get(f"{url}/metrics", timeout=30).text
        assert metric(text, "gateway_limits_backend_errors_total", outcome="refused") == 2
    with gateway_over(dead) as url:
        r = httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=AUTH, timeout=30)
        assert r.status_code == 200, r.text
        assert "x-ratelimit-remaining-requests" not in r.headers  # nothing was checked, so nothing to tell
        text = httpx.get(f"{url}/metrics", timeout=30).text
        assert metric(text, "gateway_limits_backend_errors_total", outcome="admitted") == 1
    with gateway_over(redis.url) as url:
        r = httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=AUTH, timeout=30)
        assert r.status_code == 200 and r.headers["x-ratelimit-limit-requests"] == "100"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", "redis"])
def test_two_gateway_processes_enforce_one_rpm(backend: str, redis: RedisServer, tmp_path: Path) -> None:
    """The done-when case: a key with rpm 10, two `gateway serve` processes over one emulator, 30 calls alternating
    between them. With Redis, 10 are admitted in all; with the local default each process admits its own 10 (the
    reason the shared backend exists, and the proof that this test can fail)."""
    cfg = EmulatorConfig(model="m", ttft_ms=5, itl_ms=1, output_tokens=4)
    with ThreadServer(create_emulator_app(cfg)) as emulator, contextlib.ExitStack() as stack:
        config = {
            "gateway": {"results_db": ":memory:", "limits_backend": redis.url if backend == "redis" else "local",
                        "auth": {"keys": [{"name": f"k-{backend}", "sha256": hash_key(KEY10), "rpm": 10}]}},
            "models": [card("m", "llama", "Meta", "US", aliases=[])],
            "backends": [{"name": "b", "base_url": emulator.url, "models": ["m"]}],
        }  # fmt: skip
        urls = [stack.enter_context(serve_config(config, tmp_path / f"gateway-{i}.json")) for i in range(2)]
        auth = {"authorization": f"Bearer {KEY10}"}
        started = time.monotonic()
        codes = [
            httpx.post(f"{urls[i % 2]}/v1/chat/completions", json=CHAT, headers=auth, timeout=30).status_code
            for i in range(30)
        ]
        elapsed = time.monotonic() - started
    assert set(codes) <= {200, 429}, codes
    buckets = 1 if backend == "redis" else 2
    assert 10 * buckets <= codes.count(200) < 10 * buckets + buckets * refill_allowance(10, elapsed), (codes, elapsed)


@pytest.mark.slow
def test_the_alert_fires_while_redis_does_not_answer(tmp_path: Path) -> None:
    """promtool's rule unit test: a counter that grows fires GatewayLimitsBackendErrors after 2 minutes, with its
    outcome; a counter that stays still does not."""
    import shutil
    import subprocess

    import yaml

    rules = Path(__file__).resolve().parent.parent / "deploy/prometheus/rules/alerts.yml"
    case = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                {"series": 'gateway_limits_backend_errors_total{outcome="admitted",instance="a"}',
                 "values": "0+30x10"},
                {"series": 'gateway_limits_backend_errors_total{outcome="refused",instance="a"}', "values": "5x10"},
            ],
            "alert_rule_test": [
                {"eval_time": "1m", "alertname": "GatewayLimitsBackendErrors", "exp_alerts": []},
                {"eval_time": "6m", "alertname": "GatewayLimitsBackendErrors", "exp_alerts": [{
                    "exp_labels": {"severity": "page", "outcome": "admitted"},
                    "exp_annotations": {
                        "summary": "API-key limits not checked: Redis does not answer (admitted)",
                        "description": "Calls are admitted without their rpm/tpm check. See the gateway's log for "
                        "the error (timeout, refused, auth).",
                    },
                }]},
            ],
        }],
    }  # fmt: skip
    path = tmp_path / "alert_test.yml"
    path.write_text(yaml.safe_dump(case))
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed (Debian's prometheus package; .ci/run installs it)"
    run = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_admission_cost_benchmark_runs(redis: RedisServer) -> None:
    """``python -m loadtests.limits`` (the README's figures): four rows, each with a positive cost."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "loadtests.limits", "--redis", redis.url, "--calls", "100", "--rounds", "1"],
        capture_output=True, text=True, timeout=120, check=False, cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()[1:]
    assert [line[:24].strip() for line in lines] == [
        "local, one at a time", "local, 50 at once", "redis, one at a time", "redis, 50 at once"
    ], done.stdout  # fmt: skip
    assert all(float(line[24:].split()[1]) > 0 for line in lines), done.stdout  # the CPU column


@pytest.mark.parametrize("reply", [b"+OK\r\n", b"*2\r\n:1\r\n:2\r\n", b"*5\r\n$1\r\nx\r\n:0\r\n:0\r\n:0\r\n:0\r\n",
                                   b"not RESP at all\r\n"])  # fmt: skip
def test_a_server_that_answers_nonsense_is_a_server_that_did_not_answer(reply: bytes) -> None:
    """Something on the Redis port that is not Redis, or a script answer of the wrong shape: the call is not failed
    with a 500, it follows the policy (fail_open: admitted, counted)."""

    async def main() -> tuple[Grant, Metrics]:
        handlers: list[asyncio.Task[None]] = []

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while await reader.read(65536):
                    writer.write(reply)
                    await writer.drain()
            writer.close()

        def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            handlers.append(asyncio.ensure_future(serve(reader, writer)))

        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        s, metrics = shared(f"redis://127.0.0.1:{port}/0", timeout_s=1.0)
        try:
            return await RedisLimits(s, "nonsense", "k", 5, 100).take(1, 10), metrics
        finally:
            await s.aclose()  # the handlers see the connection end
            server.close()
            await asyncio.wait_for(asyncio.gather(*handlers), 10)

    grant, metrics = asyncio.run(main())
    assert grant == Grant(0) and errors(metrics, "admitted") == 1
