"""Retry budget and circuit breaker: pure state machines over an injectable clock, no I/O.

Both follow the trusted proxies. A retry budget (Finagle, Envoy's ``retry_budget``) caps retries at a fraction of
recent requests, plus a small floor, so that retries cannot multiply the load on a fleet that is already failing.
A circuit breaker (Envoy's outlier detection, with Hystrix's half-open probe) takes a backend out after
consecutive failures on real traffic, lets a single probe request through once the ejection time has passed,
closes on the probe's success and reopens for twice as long on its failure. When every healthy replica of a
model is ejected, the pool routes to them anyway (Envoy's panic routing): refusing all traffic would be worse.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

Clock = Callable[[], float]


class RetryBudget:
    """Retries allowed in the last ``window_s``: ``min_per_s * window_s + ratio * requests`` in that window."""

    def __init__(self, ratio: float, min_per_s: float, window_s: int = 10, clock: Clock = time.monotonic) -> None:
        self.ratio = ratio
        self.floor = min_per_s * window_s
        self.window = window_s
        self.clock = clock
        self._requests = [0] * window_s  # per-second buckets, indexed by int(now) % window
        self._retries = [0] * window_s
        self._second = int(clock())

    def _advance(self) -> int:
        now = int(self.clock())
        if now != self._second:
            for s in range(max(self._second + 1, now - self.window + 1), now + 1):
                self._requests[s % self.window] = 0
                self._retries[s % self.window] = 0
            self._second = now
        return now % self.window

    def request(self) -> None:
        self._requests[self._advance()] += 1

    def try_retry(self) -> bool:
        """Take one retry from the budget; False when it is spent."""
        slot = self._advance()
        if sum(self._retries) >= self.floor + self.ratio * sum(self._requests):
            return False
        self._retries[slot] += 1
        return True


class State(enum.IntEnum):
    """Values of ``gateway_backend_circuit_state``."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    def __init__(self, failures: int, open_s: float, max_open_s: float, clock: Clock = time.monotonic) -> None:
        self.threshold = failures
        self.base_open_s = open_s
        self.max_open_s = max_open_s
        self.clock = clock
        self.state = State.CLOSED
        self.failures = 0  # consecutive
        self.open_s = open_s  # the next ejection's length: doubles each time a probe fails
        self.open_until = 0.0
        self.probing = False  # a half-open probe is in flight

    def available(self) -> bool:
        """May a request be routed here now? (Does not change the state: ``acquire`` does.)"""
        if self.state is State.CLOSED:
            return True
        if self.state is State.OPEN:
            return self.clock() >= self.open_until
        return not self.probing

    def acquire(self) -> None:
        """The router chose this backend: an open breaker whose time is up lets this request through as the
        probe."""
        if self.state is not State.CLOSED and self.available():
            self.state = State.HALF_OPEN
            self.probing = True

    def release(self) -> None:
        """The request ended without a verdict on the backend (e.g. the client left): free the probe slot."""
        self.probing = False

    def success(self) -> bool:
        """Returns True when this closed the breaker. While open, a success is the late answer of a request sent
        before the ejection: it proves nothing, only a probe's (or any answer while half-open) closes."""
        if self.state is State.OPEN:
            return False
        self.failures = 0
        self.probing = False
        if self.state is State.CLOSED:
            return False
        self.state, self.open_s = State.CLOSED, self.base_open_s
        return True

    def failure(self) -> bool:
        """Returns True when this opened the breaker."""
        self.probing = False
        self.failures += 1
        if self.state is State.HALF_OPEN:
            self.open_s = min(self.open_s * 2, self.max_open_s)
        elif self.state is State.OPEN or self.failures < self.threshold:
            return False
        self.state = State.OPEN
        self.open_until = self.clock() + self.open_s
        return True

    def retry_after(self) -> float:
        """Seconds until a probe may go (0 when one may go now)."""
        return max(0.0, self.open_until - self.clock()) if self.state is State.OPEN else 0.0
