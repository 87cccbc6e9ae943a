"""Arrival schedules for open-loop load (pure: no I/O, no clock, no locust).

Open loop means every request's intended send time is fixed in advance from the target rate, so a slow server
cannot lower the offered load (coordinated omission, docs/measurement.md). Kinds:

- ``closed``: no schedule; locust's users send back to back (the offered load follows the server's speed).
- ``constant``: one request every ``1 / rate`` seconds, the first at offset 0.
- ``poisson``: exponential gaps with mean ``1 / rate`` (coefficient of variation 1).
- ``gamma``: gamma gaps with shape ``burstiness`` and mean ``1 / rate``; CV = 1 / sqrt(burstiness), so a shape
  below 1 is burstier than Poisson, above 1 smoother, and shape 1 is Poisson.

Offsets are seconds from the start of the run. A run split over several load-generator processes takes every
``n``-th arrival of the same global schedule (``share``), so together they offer exactly the global process.
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

KINDS = ("closed", "constant", "poisson", "gamma")
OPEN_KINDS = ("constant", "poisson", "gamma")
ACHIEVED_FRACTION = 0.95  # a run whose achieved rate is below this fraction of the target is flagged


def arrivals(kind: str, rate: float, *, burstiness: float = 1.0, seed: int = 0) -> Iterator[float]:
    """An endless, deterministic stream of intended send offsets (seconds, non-decreasing)."""
    if kind not in OPEN_KINDS:
        raise ValueError(f"arrival must be one of {', '.join(OPEN_KINDS)} for a schedule, got {kind!r}")
    if not rate > 0 or math.isinf(rate):
        raise ValueError(f"rate must be a positive number of requests per second, got {rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness (the gamma shape) must be positive, got {burstiness}")
    rng = random.Random(seed)
    t = 0.0
    if kind == "constant":
        for i in itertools.count():
            yield i / rate
    shape = 1.0 if kind == "poisson" else burstiness
    scale = 1.0 / (rate * shape)
    while True:
        t += rng.gammavariate(shape, scale)
        yield t


def schedule(
    kind: str, rate: float, *, duration: float, burstiness: float = 1.0, seed: int = 0, limit: int = 1_000_000
) -> list[float]:
    """The offsets that fall before ``duration`` seconds (at most ``limit`` of them)."""
    out: list[float] = []
    for offset in arrivals(kind, rate, burstiness=burstiness, seed=seed):
        if offset >= duration or len(out) >= limit:
            break
        out.append(offset)
    return out


def share(offsets: Iterable[T], index: int, count: int) -> Iterator[T]:
    """Process ``index`` of ``count``'s part of a global schedule: arrivals index, index + count, ..."""
    if not 0 <= index < count:
        raise ValueError(f"index {index} out of range for {count} processes")
    return itertools.islice(offsets, index, None, count)


@dataclass(frozen=True, slots=True)
class ScheduleStats:
    count: int
    mean_rate: float  # arrivals per second over the span of the schedule
    cv: float  # coefficient of variation of the gaps


def describe(offsets: list[float]) -> ScheduleStats:
    gaps = [b - a for a, b in itertools.pairwise(offsets)]
    if len(gaps) < 2:
        return ScheduleStats(len(offsets), 0.0, 0.0)
    mean = statistics.fmean(gaps)
    return ScheduleStats(len(offsets), 1.0 / mean if mean > 0 else math.inf, statistics.pstdev(gaps) / mean)


@dataclass(frozen=True, slots=True)
class RateCheck:
    target: float  # requests/s offered by design
    achieved: float  # requests/s actually completed
    ok: bool

    @property
    def ratio(self) -> float:
        return self.achieved / self.target if self.target > 0 else 1.0

    def warning(self, what: str = "run") -> str | None:
        if self.ok:
            return None
        return (
            f"WARNING: {what} achieved {self.achieved:.2f} req/s, {self.ratio:.0%} of the target "
            f"{self.target:.2f} req/s (< {ACHIEVED_FRACTION:.0%}): the target rate was not sustained"
        )


def check_rate(target: float, achieved: float, fraction: float = ACHIEVED_FRACTION) -> RateCheck:
    return RateCheck(target, achieved, achieved >= fraction * target)
