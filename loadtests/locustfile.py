"""Locust load test for an OpenAI-compatible server (the gateway, or vLLM itself): streamed chat completions,
timed per chunk with the gateway's own definitions (``gateway.relay.sse``), recorded per model.

    locust -f loadtests/locustfile.py --headless --host http://127.0.0.1:8000 -u 10 -r 10 -t 30s --csv out/run

Stats entries (request type ``LLM`` unless noted), per model; times in milliseconds:

- ``request <model>``: every request, and every failure (HTTP error, in-stream error event, a stream that ended
  without ``[DONE]`` or without a token, a connection error). Its time is until the stream closed.
- ``TTFT <model>``, ``TTFAT <model>``, ``TPOT <model>``, ``E2E <model>``: successful requests only (the
  definitions of docs/measurement.md, with t0 = the client's send time). TTFAT is the time to the first *answer*
  token (after a thinking model's reasoning); equal to TTFT for a model that does not think. A successful request
  with no answer at all (thinking used the whole ``max_tokens``) has no TTFAT and counts in ``empty answer
  <model>``.
- ``ITL <model>``: one sample per gap between token-bearing chunks.
- ``tokens <model>``: completion tokens from the server's ``usage``, as both the size and the "time" columns.
- ``goodput <model>``: requests that met every SLO given (``--slo-ttft``, ``--slo-ttfat``, ``--slo-tpot``,
  ``--slo-e2e``); a request with no answer misses a TTFAT SLO.
- type ``ARRIVAL``, ``send lag <model>``: open loop only, actual minus intended send time.

Open loop (``--arrival constant|poisson|gamma --rate R``): one user per process is enough (``-u 1``, or one per
worker): it sends each request at its intended time on a new greenlet, so slow answers do not lower the offered
load. Extra users in that mode stay idle. At the end the master (or the single process) prints intended vs
achieved rate, with a WARNING when achieved < 95% of the target, and writes it to ``--summary-json``.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import gevent  # type: ignore[import-untyped]
import gevent.pool  # type: ignore[import-untyped]
import httpx
from locust import User, events, task
from locust.env import Environment
from locust.runners import WorkerRunner
from locust.stats import PERCENTILES_TO_REPORT, StatsCSV

from gateway.relay.sse import SSEFramer, StreamObserver
from loadtests import arrival
from loadtests.workload import Size, Workload

log = logging.getLogger("loadtests")
logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request would swamp the run's output


@events.init_command_line_parser.add_listener  # type: ignore[untyped-decorator]
def _arguments(parser: Any) -> None:
    g = parser.add_argument_group("LLM load (loadtests)")
    g.add_argument("--models", default="all", help="comma-separated model ids, or 'all' (from the host's /v1/models)")
    g.add_argument("--prompts", default="builtin", help="builtin | FILE.jsonl | synthetic")
    g.add_argument("--input-tokens", default="128", help="synthetic prompts: N or LO-HI (approximate tokens)")
    g.add_argument("--output-tokens", default="", help="synthetic prompts: N or LO-HI exact output tokens")
    g.add_argument("--max-tokens", type=int, default=64, help="max_tokens unless a prompt sets its own")
    g.add_argument("--arrival", choices=arrival.KINDS, default="closed", help="closed loop, or an open-loop schedule")
    g.add_argument("--rate", type=float, default=1.0, help="open loop: total requests/s over all models")
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma arrivals: the shape (1 = Poisson)")
    g.add_argument("--seed", type=int, default=0, help="seed of the schedule and the synthetic prompts")
    g.add_argument("--slo-ttft", type=float, default=0.0, help="SLO on TTFT, seconds (0: none)")
    g.add_argument("--slo-ttfat", type=float, default=0.0, help="SLO on time to first answer token, s (0: none)")
    g.add_argument("--slo-tpot", type=float, default=0.0, help="SLO on TPOT, seconds (0: none)")
    g.add_argument("--slo-e2e", type=float, default=0.0, help="SLO on E2E, seconds (0: none)")
    g.add_argument("--summary-json", default="", help="write the run's rate summary here")


def _fire(env: Environment, kind: str, name: str, ms: float, size: int = 0, exc: Exception | None = None) -> None:
    env.events.request.fire(  # type: ignore[no-untyped-call]
        request_type=kind, name=name, response_time=ms, response_length=size, exception=exc, context={}
    )


class StreamFailure(Exception):
    pass


class Run:
    """What one load-generator process shares between its users."""

    def __init__(self, env: Environment, host: str) -> None:
        opts: Any = env.parsed_options
        self.env = env
        self.host = host.rstrip("/")
        self.opts = opts
        self.client = httpx.Client(
            timeout=httpx.Timeout(connect=10.0, read=120.0, write=30.0, pool=120.0),
            limits=httpx.Limits(max_connections=2048, max_keepalive_connections=256),
        )
        models = [m for m in str(opts.models).split(",") if m] if opts.models != "all" else self._discover()
        self.workload = Workload(
            tuple(models),
            prompts=opts.prompts,
            max_tokens=opts.max_tokens,
            input_tokens=Size.parse(opts.input_tokens),
            output_tokens=Size.parse(opts.output_tokens) if opts.output_tokens else None,
            seed=opts.seed,
        )
        self.counter = itertools.count()
        self.scheduler_taken = False
        runner = env.runner
        if isinstance(runner, WorkerRunner):
            self.index, self.processes = max(0, runner.worker_index), max(1, int(opts.expect_workers))
        else:
            self.index, self.processes = 0, 1

    def _discover(self) -> list[str]:
        data = self.client.get(f"{self.host}/v1/models").json()["data"]
        return [m["id"] for m in data]

    def send(self, i: int, intended: float | None) -> None:
        model, body = self.workload.request(i)
        env = self.env
        t0 = time.perf_counter()
        if intended is not None:
            _fire(env, "ARRIVAL", f"send lag {model}", max(0.0, t0 - intended) * 1000)
        obs = StreamObserver(t0=t0)
        framer = SSEFramer()
        error: str | None = None
        try:
            with self.client.stream("POST", f"{self.host}/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    raw = response.read()
                    try:
                        error = f"HTTP {response.status_code}: {json.loads(raw)['error']['message']}"
                    except (ValueError, KeyError, TypeError):
                        error = f"HTTP {response.status_code}: {raw[:200]!r}"
                else:
                    for data in response.iter_raw():
                        now = time.perf_counter()
                        for event in framer.feed(data):
                            obs.observe(event, now)
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        end = time.perf_counter()
        if error is None:
            if obs.error is not None:
                error = f"in-stream error: {obs.error.get('message', obs.error)}"
            elif not obs.done:
                error = "the stream ended without [DONE]"
            elif obs.first_token is None:
                error = "no token-bearing chunk"
        tokens = obs.usage.completion_tokens if obs.usage else 0
        _fire(env, "LLM", f"request {model}", (end - t0) * 1000, tokens, StreamFailure(error) if error else None)
        if error is not None or obs.ttft is None or obs.e2e is None:
            return
        ttft, e2e, tpot, ttfat = obs.ttft, obs.e2e, obs.tpot, obs.ttfat
        _fire(env, "LLM", f"TTFT {model}", ttft * 1000)
        if ttfat is not None:
            _fire(env, "LLM", f"TTFAT {model}", ttfat * 1000)
        else:
            _fire(env, "LLM", f"empty answer {model}", e2e * 1000, tokens)
        for gap in obs.gaps:
            _fire(env, "LLM", f"ITL {model}", gap * 1000)
        if tpot is not None:
            _fire(env, "LLM", f"TPOT {model}", tpot * 1000)
        _fire(env, "LLM", f"E2E {model}", e2e * 1000)
        _fire(env, "LLM", f"tokens {model}", tokens, tokens)
        o = self.opts
        if (
            (not o.slo_ttft or ttft <= o.slo_ttft)
            and (not o.slo_ttfat or (ttfat is not None and ttfat <= o.slo_ttfat))
            and (not o.slo_tpot or (tpot if tpot is not None else 0.0) <= o.slo_tpot)
            and (not o.slo_e2e or e2e <= o.slo_e2e)
        ):
            _fire(env, "LLM", f"goodput {model}", e2e * 1000, tokens)


MAX_REQUESTS = 1_000_000  # a bound on any one open-loop schedule
_RUNS: dict[int, Run] = {}  # one per Environment (a locustfile is a module: there is no other place to keep it)


class LLMUser(User):
    """Closed loop: sends back to back. Open loop: the first user of each process runs its share of the schedule."""

    def on_start(self) -> None:
        env = self.environment
        if id(env) not in _RUNS:
            _RUNS[id(env)] = Run(env, self.host or "http://127.0.0.1:8000")
        self.run_state = _RUNS[id(env)]
        self.inflight = gevent.pool.Group()
        self.scheduler = False
        self.schedule_done = False
        if self.run_state.opts.arrival != "closed" and not self.run_state.scheduler_taken:
            self.run_state.scheduler_taken = self.scheduler = True

    @task
    def work(self) -> None:
        run = self.run_state
        if run.opts.arrival == "closed":
            run.send(next(run.counter), None)
            return
        if not self.scheduler or self.schedule_done:
            gevent.sleep(0.5)  # an idle user in open-loop mode; bounded by the run time like every user
            return
        self.schedule_done = True
        o = run.opts
        start = time.perf_counter()
        horizon = math.inf
        if o.run_time:
            # stop issuing a little before locust's -t so the last answers are in the CSV; what is still in
            # flight then (a saturated server) is simply not achieved
            elapsed = time.time() - self.environment.stats.total.start_time
            horizon = max(1.0, float(o.run_time) - elapsed - min(2.0, 0.2 * float(o.run_time)))
        offsets = arrival.arrivals(o.arrival, o.rate, burstiness=o.burstiness, seed=o.seed)
        for i, offset in arrival.share(enumerate(offsets), run.index, run.processes):
            if offset >= horizon or i >= MAX_REQUESTS:
                break
            delay = start + offset - time.perf_counter()
            if delay > 0:
                gevent.sleep(delay)
            self.inflight.spawn(run.send, i, start + offset)

    def on_stop(self) -> None:
        self.inflight.join(timeout=5.0)  # let streams in flight finish and be recorded


@events.quitting.add_listener  # type: ignore[untyped-decorator]
def _summary(environment: Environment, **_kwargs: Any) -> None:
    if isinstance(environment.runner, WorkerRunner) or environment.parsed_options is None:
        return
    prefix = environment.parsed_options.csv_prefix
    if prefix:
        # locust's own CSV is written by a timer (every second), so its last rows can miss the run's last second
        with open(f"{prefix}_stats.csv", "w", newline="", encoding="utf-8") as f:
            StatsCSV(environment, PERCENTILES_TO_REPORT).requests_csv(csv.writer(f))
    summary = rate_summary(environment)
    if summary is None:
        return
    for line in summary["lines"]:
        print(line, file=sys.stderr, flush=True)
    path = environment.parsed_options.summary_json
    if path:
        Path(path).write_text(json.dumps(summary, indent=2), encoding="utf-8")


def _span_rate(entry: Any) -> float:
    """Events per second over the span of one stats entry (first to last event): the rate of that process."""
    n = entry.num_requests
    span = (entry.last_request_timestamp or 0.0) - entry.start_time
    return (n - 1) / span if n > 1 and span > 0 else 0.0


def rate_summary(env: Environment) -> dict[str, Any] | None:
    """Intended vs achieved rate from the aggregated stats (so it holds on a master too).

    intended: the realised rate of the first S arrivals of the global schedule (S = requests sent), per model the
    arrivals that went to it; sent: the rate at which requests actually left (the load generator keeping up);
    achieved: the rate of successful completions, over their own span (an unsaturated server completes requests
    at the rate they arrive; a saturated one at its capacity).
    """
    opts = env.parsed_options
    stats = env.stats
    if opts is None:
        return None
    models = sorted(name.removeprefix("request ") for name, _ in stats.entries if name.startswith("request "))
    open_loop = opts.arrival != "closed"
    per_model: dict[str, Any] = {}
    lines: list[str] = []
    sent_total = sum(stats.get(f"send lag {m}", "ARRIVAL").num_requests for m in models)
    offsets = (
        arrival.schedule(
            opts.arrival, opts.rate, duration=math.inf, burstiness=opts.burstiness, seed=opts.seed, limit=sent_total
        )
        if open_loop and sent_total
        else []
    )
    worst: arrival.RateCheck | None = None
    for k, model in enumerate(models):
        req, e2e = stats.get(f"request {model}", "LLM"), stats.get(f"E2E {model}", "LLM")
        lag = stats.get(f"send lag {model}", "ARRIVAL")
        mine = offsets[k :: len(models)] if models else []
        intended = (len(mine) - 1) / (mine[-1] - mine[0]) if len(mine) > 1 and mine[-1] > mine[0] else 0.0
        achieved = _span_rate(e2e)
        per_model[model] = {
            "requests": req.num_requests,
            "failures": req.num_failures,
            "completed": e2e.num_requests,
            "intended_rps": intended if open_loop else None,
            "sent_rps": _span_rate(lag) if open_loop else None,
            "achieved_rps": achieved,
            "lag_mean_ms": lag.avg_response_time if lag.num_requests else None,
            "lag_max_ms": lag.max_response_time if lag.num_requests else None,
        }
        if open_loop:
            check = arrival.check_rate(intended, min(achieved, per_model[model]["sent_rps"]))
            per_model[model]["ok"] = check.ok
            if worst is None or check.ratio < worst.ratio:
                worst = check
    intended_total = (len(offsets) - 1) / offsets[-1] if len(offsets) > 1 and offsets[-1] > 0 else 0.0
    summary: dict[str, Any] = {
        "arrival": opts.arrival,
        "target_rps": opts.rate if open_loop else None,
        "intended_rps": intended_total if open_loop else None,
        "achieved_rps": sum(m["achieved_rps"] for m in per_model.values()),
        "models": per_model,
        "ok": worst is None or worst.ok,
        "warning": None,
    }
    if open_loop:
        lines.append(
            f"rate: target {opts.rate:.2f} req/s, intended (this schedule) {intended_total:.2f}, "
            f"achieved {summary['achieved_rps']:.2f}"
        )
        for model, m in per_model.items():
            lines.append(
                f"  {model}: intended {m['intended_rps']:.2f} req/s, sent {m['sent_rps']:.2f}, achieved "
                f"{m['achieved_rps']:.2f}, {m['failures']} failures, send lag mean {m['lag_mean_ms'] or 0:.1f} ms, "
                f"max {m['lag_max_ms'] or 0:.1f} ms"
            )
        if worst is not None and not worst.ok:
            summary["warning"] = worst.warning("at least one model")
            lines.append(str(summary["warning"]))
    else:
        lines.append(f"closed loop: achieved {summary['achieved_rps']:.2f} req/s")
    summary["lines"] = lines
    return summary
