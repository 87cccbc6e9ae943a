"""Health checking at the transport seam (httpx.MockTransport): thresholds, not single blips."""

from __future__ import annotations

import asyncio

import httpx
from prometheus_client import CollectorRegistry

from gateway.metrics import Metrics
from gateway.relay.backends import BackendPool
from tests.conftest import card, settings_for


def test_one_late_health_check_does_not_take_a_backend_out() -> None:
    answers: list[int] = [200, 503, 503, 200, 503, 503, 503, 200]

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(answers.pop(0))

    settings = settings_for(
        [{"name": "b", "base_url": "http://backend.test", "models": ["m"]}], [card("m", "qwen3", "Alibaba", "CN")]
    )
    pool = BackendPool(settings, Metrics(CollectorRegistry()), {"b": httpx.MockTransport(handler)})
    backend = pool.backends["b"]

    async def run() -> list[bool | None]:
        seen = []
        for _ in range(8):
            await pool.check(backend)
            seen.append(backend.healthy)
        await pool.close()
        return seen

    # in after the first good check; two failures in a row keep it in; the third takes it out; one good check
    # brings it back
    assert asyncio.run(run()) == [True, True, True, True, True, True, False, True]
    assert pool.ready() == {"m": True}
