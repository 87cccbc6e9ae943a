from __future__ import annotations

import pytest

from gateway.relay.routing import ModelTable, Replica, Router


def replicas(*spec: tuple[str, bool, int]) -> list[Replica]:
    return [Replica(name, healthy, in_flight) for name, healthy, in_flight in spec]


@pytest.mark.parametrize(
    ("spec", "exclude", "expected"),
    [
        ([("a", True, 3), ("b", True, 1), ("c", True, 2)], (), "b"),  # least in flight
        ([("a", True, 0), ("b", False, 0)], (), "a"),  # unhealthy skipped
        ([("a", False, 0), ("b", False, 0)], (), None),  # nothing healthy
        ([("a", True, 0), ("b", True, 5)], ("a",), "b"),  # failover excludes the replica tried
        ([("a", True, 0)], ("a",), None),
        ([], (), None),
    ],
)
def test_pick(spec: list[tuple[str, bool, int]], exclude: tuple[str, ...], expected: str | None) -> None:
    assert Router().pick("m", replicas(*spec), exclude) == expected


def test_ties_go_round_robin_per_model() -> None:
    router = Router()
    equal = replicas(("a", True, 0), ("b", True, 0), ("c", True, 0))
    assert [router.pick("m", equal) for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]
    assert router.pick("other", equal) == "a"  # each model has its own turn


def test_model_table_resolves_aliases() -> None:
    table = ModelTable({"m": "m", "alias": "m"}, {"m": ["b1", "b2"]})
    assert table.resolve("alias") == "m" and table.resolve("m") == "m" and table.resolve("x") is None
    assert table.backends_of("m") == ("b1", "b2") and table.backends_of("x") == ()
