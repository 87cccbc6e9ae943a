"""Routing policy: pure functions over a snapshot of backend state, no I/O.

A request names a model (its id or an alias). Among the healthy replicas serving that model the router picks
the one with the fewest requests in flight; ties go round-robin so equal replicas share load evenly. Failover
calls ``pick`` again with the replicas already tried excluded.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Replica:
    name: str
    healthy: bool
    in_flight: int


class ModelTable:
    """Names clients may use (ids and aliases) -> canonical model id -> backends serving it, in config order."""

    def __init__(self, aliases: Mapping[str, str], backends_of: Mapping[str, Sequence[str]]) -> None:
        self._canonical = dict(aliases)
        self._backends_of = {model: tuple(names) for model, names in backends_of.items()}

    def resolve(self, name: str) -> str | None:
        return self._canonical.get(name)

    def backends_of(self, model: str) -> tuple[str, ...]:
        return self._backends_of.get(model, ())

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(self._backends_of)


class Router:
    def __init__(self) -> None:
        self._turn: dict[str, int] = {}

    def pick(self, model: str, replicas: Iterable[Replica], exclude: Iterable[str] = ()) -> str | None:
        skip = set(exclude)
        candidates = [r for r in replicas if r.healthy and r.name not in skip]
        if not candidates:
            return None
        least = min(r.in_flight for r in candidates)
        tied = [r for r in candidates if r.in_flight == least]
        turn = self._turn.get(model, 0)
        self._turn[model] = turn + 1
        return tied[turn % len(tied)].name
