"""The emulator's own knobs: the load model, seeded jitter, and its labelling as an emulator."""

from __future__ import annotations

import asyncio
import time

import httpx

from gateway.devstack.emulator import EmulatorConfig, create_emulator_app
from tests.servers import ThreadServer


async def ttfts(url: str, n: int) -> list[float]:
    async with httpx.AsyncClient(timeout=30) as client:

        async def one() -> float:
            t0 = time.perf_counter()
            body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True, "max_tokens": 3}
            async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if '"content":" ' in line:
                        return time.perf_counter() - t0
            raise AssertionError("no token")

        return list(await asyncio.gather(*(one() for _ in range(n))))


def test_latency_grows_once_concurrency_passes_the_batch_size() -> None:
    cfg = EmulatorConfig(model="m", ttft_ms=100, itl_ms=5, output_tokens=3, batch_size=2)
    with ThreadServer(create_emulator_app(cfg)) as emu:
        within = asyncio.run(ttfts(emu.url, 2))
        beyond = asyncio.run(ttfts(emu.url, 6))
    assert max(within) < 0.2  # 2 running, batch of 2: TTFT as configured (100 ms; the rest is a busy machine's)
    # 6 arriving together: each is slowed by running/batch at admission, the last ones about 3x
    assert max(beyond) > 0.25 and sum(beyond) / 6 > 1.5 * sum(within) / 2, (within, beyond)


def test_jitter_is_seeded_and_labelled_as_emulator() -> None:
    def run(seed: int) -> list[float]:
        cfg = EmulatorConfig(model="m", ttft_ms=100, itl_ms=1, output_tokens=2, jitter=0.5, seed=seed)
        with ThreadServer(create_emulator_app(cfg)) as emu:
            out = []
            for _ in range(5):
                r = httpx.post(f"{emu.url}/v1/completions", json={"model": "m", "prompt": "x", "seed": 1})
                assert r.headers["x-emulator"] == "vllm-emulator" and r.json()["system_fingerprint"] == "vllm-emulator"
                out.append(r.elapsed.total_seconds())
            return out

    a, b = run(1), run(1)
    # same seed, same delays (TTFT drawn from 50-150 ms): each pair within scheduling noise; the jitter is real
    assert all(abs(x - y) < 0.03 for x, y in zip(a, b, strict=True)), (a, b)
    assert max(a) - min(a) > 0.02, a
