"""What an admission against the shared API-key limits costs the gateway, beside the in-process buckets:

    redis-server --port 6390 --save '' &
    python -m loadtests.limits --redis redis://127.0.0.1:6390/0

Prints wall-clock and CPU microseconds per admission (``take``) for the local buckets and for Redis, one caller
at a time and 50 at once (their requests then share the connection's round trips), in alternating rounds, on
uvloop as ``gateway serve`` runs. The CPU figure is this process's: the Redis server's own time is not in it."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable

import uvloop
from prometheus_client import CollectorRegistry

from gateway.limits import LocalLimits, RedisLimits, SharedLimits
from gateway.metrics import Metrics

BIG = 10**12  # limits no run can reach: every take is admitted


async def timed(n: int, run: Callable[[], Awaitable[object]]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    await run()
    return (time.perf_counter() - wall) / n * 1e6, (time.process_time() - cpu) / n * 1e6


async def main(url: str, calls: int, rounds: int) -> None:
    shared = SharedLimits(url, Metrics(CollectorRegistry()), timeout_s=5.0)
    limits: dict[str, LocalLimits | RedisLimits] = {"local": LocalLimits("bench", BIG, BIG, time.monotonic),
              "redis": RedisLimits(shared, f"bench-{time.time_ns()}", "bench", BIG, BIG)}  # fmt: skip
    results: dict[str, list[tuple[float, float]]] = {}
    try:
        for lim in limits.values():  # warm-up: connection, script loaded
            for _ in range(100):
                await lim.take(1, 100)
        for _ in range(rounds):
            for name, lim in limits.items():

                async def one_by_one(lim: LocalLimits | RedisLimits = lim) -> None:
                    for _ in range(calls):
                        await lim.take(1, 100)

                async def fifty(lim: LocalLimits | RedisLimits = lim) -> None:
                    async def caller() -> None:
                        for _ in range(calls // 50):
                            await lim.take(1, 100)

                    await asyncio.gather(*(caller() for _ in range(50)))

                results.setdefault(f"{name}, one at a time", []).append(await timed(calls, one_by_one))
                results.setdefault(f"{name}, 50 at once", []).append(await timed(calls // 50 * 50, fifty))
    finally:
        await shared.aclose()
    print(f"{'admissions':<24} {'wall µs (median)':>17} {'CPU µs (median)':>16}   rounds")
    for name, runs in results.items():
        walls, cpus = [w for w, _ in runs], [c for _, c in runs]
        each = ", ".join(f"{c:.1f}" for c in cpus)
        print(f"{name:<24} {statistics.median(walls):>17.1f} {statistics.median(cpus):>16.1f}   CPU: {each}")


def cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.limits", description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis", required=True, help="redis://HOST:PORT/DB of a Redis to use (keys gw:rl:*)")
    parser.add_argument("--calls", type=int, default=2000, help="admissions per round and kind (default 2000)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    uvloop.run(main(args.redis, args.calls, args.rounds))


if __name__ == "__main__":
    cli()
