"""Retry budget and circuit breaker state machines, on a fake clock."""

from __future__ import annotations

from gateway.relay.resilience import CircuitBreaker, RetryBudget, State


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_budget_is_a_floor_plus_a_ratio_of_recent_requests() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.2, min_per_s=0.2, window_s=10, clock=clock)  # floor: 2 per 10 s
    assert [budget.try_retry() for _ in range(3)] == [True, True, False]
    for _ in range(10):
        budget.request()
    assert [budget.try_retry() for _ in range(3)] == [True, True, False]  # 2 + 0.2 * 10 = 4 in the window
    clock.now += 5
    assert not budget.try_retry()  # still inside the window
    clock.now += 5.5
    assert budget.try_retry()  # the first second's requests and retries have aged out, the floor is back
    clock.now += 100
    assert [budget.try_retry() for _ in range(3)] == [True, True, False]  # a long gap clears every bucket


def test_breaker_opens_after_consecutive_failures_only() -> None:
    clock = Clock()
    b = CircuitBreaker(failures=3, open_s=10, max_open_s=40, clock=clock)
    assert not b.failure() and not b.failure()
    b.success()  # a success resets the run
    assert not b.failure() and not b.failure()
    assert b.failure() and b.state is State.OPEN
    assert not b.available() and b.retry_after() == 10


def test_half_open_lets_one_probe_through_and_backs_off() -> None:
    clock = Clock()
    b = CircuitBreaker(failures=1, open_s=10, max_open_s=25, clock=clock)
    b.failure()
    clock.now += 10
    assert b.available()
    b.acquire()
    assert b.state is State.HALF_OPEN and not b.available()  # one probe at a time
    assert b.failure() and not b.available() and b.retry_after() == 20  # open again, for twice as long
    clock.now += 20
    b.acquire()
    b.release()  # the probe ended without a verdict (client left): another may go
    assert b.available()
    b.acquire()
    b.failure()
    assert b.retry_after() == 25  # capped at max_open_s
    clock.now += 25
    b.acquire()
    assert b.success() and b.retry_after() == 0 and b.available()
    b.failure()
    assert b.retry_after() == 10  # back to the base ejection time after closing


def test_a_late_success_does_not_close_an_open_breaker() -> None:
    clock = Clock()
    b = CircuitBreaker(failures=2, open_s=10, max_open_s=60, clock=clock)
    b.failure()
    b.failure()
    clock.now += 0.2
    assert not b.success()  # a request sent before the ejection answered: not a probe
    assert not b.available() and b.retry_after() > 9
