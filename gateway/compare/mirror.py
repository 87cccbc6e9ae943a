"""Shadow mirroring: a sampled fraction of normal traffic to model A is also sent to models B, C, ...

Fire-and-forget: the client's call is sampled once its body is parsed, its model resolved and the call admitted,
before a backend is chosen for it; its mirrors then start as background tasks and never touch the client's
response. Each mirrored call is a fan-out of one (``fanout.call_model``): the client's parameters with the target
model, always streamed with usage, never queued for a busy backend (``Overloaded`` at once). Their number is
bounded per source model (``mirror.max_concurrency``, mirrors of that model's calls in flight): when the bound is
full a mirror is skipped and counted (``gateway_mirror_skipped_total``), never queued. The client's call and its
mirrors share a pair id and are recorded in the results store (``kind = "mirror"``; the answers, the client's as
it received it and the mirrors', only with ``keep_text``), the client's side when it ends (``record_primary``,
through ``Recorder.on_pair``). Mirrored calls go to ``gateway_mirror_*`` metrics, never to the client-facing ones
or their cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from typing import Any

from gateway.compare.fanout import call_model
from gateway.compare.store import measured
from gateway.compare.writer import StoreWriter
from gateway.config import MirrorRule, Settings
from gateway.metrics import Metrics
from gateway.protocol import Endpoint
from gateway.relay.backends import BackendPool
from gateway.relay.proxy import Exchange
from gateway.relay.sse import StreamObserver, Usage

log = logging.getLogger("gateway.compare.mirror")


class Mirror:
    def __init__(
        self,
        settings: Settings,
        pool: BackendPool,
        metrics: Metrics,
        store: StoreWriter,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.metrics = metrics
        self.store = store
        self.rules: dict[str, MirrorRule] = {c.id: c.mirror for c in settings.models if c.mirror}
        self.active: dict[str, int] = dict.fromkeys(self.rules, 0)
        self.rng = rng or random.Random()
        self.tasks: set[asyncio.Task[None]] = set()

    def maybe(self, ex: Exchange, body: dict[str, Any], endpoint: Endpoint) -> str | None:
        """Start the mirrors of this call if it is sampled; returns the pair id (None: not mirrored). A sampled
        call keeps its own answer's text too when the rule keeps the mirrors' (``ex.keep_text``)."""
        rule = self.rules.get(ex.model)
        if rule is None or self.rng.random() >= rule.fraction:
            return None
        ex.keep_text = rule.keep_text
        pair_id = f"pair-{uuid.uuid4().hex}"
        request = dict(body)  # the client's parameters, as it sent them
        for target in rule.to:
            if self.active[ex.model] >= rule.max_concurrency:
                self.metrics.mirror_skipped.labels(target).inc()
                continue
            self.active[ex.model] += 1
            task = asyncio.create_task(self._shadow(ex.model, target, request, endpoint, pair_id, rule))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return pair_id

    async def _shadow(
        self, source: str, target: str, body: dict[str, Any], endpoint: Endpoint, pair_id: str, rule: MirrorRule
    ) -> None:
        card = self.settings.card(target)
        try:
            outcome = await call_model(self.pool, None, card, endpoint, body, pair_id, queue=False)
            backend = outcome.backend or "none"
            m = self.metrics
            m.mirror_requests.labels(target, backend, "200" if outcome.error is None else str(outcome.status)).inc()
            if outcome.error is None:
                if outcome.observer.ttft is not None:
                    m.mirror_ttft.labels(target, backend).observe(outcome.observer.ttft)
                usage = outcome.observer.usage
                if usage:
                    m.mirror_completion_tokens.labels(target, backend).inc(usage.completion_tokens)
                if outcome.cost_list_usd:
                    m.mirror_cost.labels(target, backend, "list_price").inc(outcome.cost_list_usd)
                if outcome.cost_gpu_usd:
                    m.mirror_cost.labels(target, backend, "gpu_time").inc(outcome.cost_gpu_usd)
            self.store.add([outcome.to_result(pair_id, "mirror", card, rule.keep_text)])
        except Exception:  # a mirror must never disturb anything else
            log.exception("mirrored call to %s failed", target)
        finally:
            self.active[source] -= 1

    def record_primary(
        self, pair_id: str, ex: Exchange, status: int, e2e: float | None, usage: Usage | None,
        observer: StreamObserver | None,
    ) -> None:  # fmt: skip
        """The client's own call, stored under the pair id so the pair can be compared."""
        rule = self.rules[ex.model]
        seen = observer or StreamObserver(t0=ex.t0, usage=usage)  # a non-streaming call: no token times
        error = None if status == 200 else f"status {status}"
        row = measured(
            pair_id, "mirror", ex.model, seen, backend=ex.backend, card=ex.card, e2e_s=e2e, error=error,
            keep_text=rule.keep_text,
        )  # fmt: skip
        self.store.add([row])

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
