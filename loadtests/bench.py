"""Proxy overhead benchmark: this gateway against direct access, nginx, LiteLLM and vllm-router, side by side.

``python -m loadtests.bench [--targets direct,gateway,nginx,litellm,vllm-router] [--out DIR] [--no-heavy]`` starts
the vLLM emulator (``gateway emulate``: TTFT 0, fixed ITL, 32 tokens, an unlimited batch) and every target in
front of it, then runs each measurement point as interleaved rounds (direct, gateway, nginx, ... then again,
``--rounds`` times) with the load generator ``loadtests.benchclient`` in a separate process, and prints a Markdown
table (written with a JSON twin to ``--out``). Figures are medians over rounds; "added" figures are paired by
round (target minus direct in the same round) before the median.

Pinning (2+ cores): the backend and the load generator share core 0, the proxies core 1 (``taskset -c``); every
target runs for the whole group of points on one backend, the idle ones on the proxy core too (their CPU is
measured and reported). Processes and their configs: ``loadtests.benchtargets``; figures and tables:
``loadtests.benchreport``.

Points: streaming with 100 concurrent streams at ITL 20 ms (connections primed first: see loadtests.benchclient);
the heavy point, 1,000 streams at ITL 5 ms
(``--no-heavy`` skips it; the emulator and the load generator on one core may not keep up: the report says so
when direct falls behind the nominal schedule); non-streaming with 50 concurrent requests of ``max_tokens`` 1
(answered at once, so the figure is the proxies' request cost, not the backend's generation time).

A peer that is missing is installed by ``loadtests/install-peers.sh`` (``--no-install`` to skip); one that still
cannot be installed or started is a "not available: why" row, never dropped.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from loadtests.benchreport import Point, keep_up_note, markdown, ratios, summarize, to_json
from loadtests.benchtargets import (
    API_KEY,
    BENCH_DIR,
    MODEL,
    REPO,
    STARTERS,
    Env,
    NotInstalled,
    Process,
    Running,
    Unavailable,
    _die_with_parent,
    backend,
    children_of,
    gateway_source,
    machine,
    pinned,
    versions,
)

TARGETS = ("direct", "gateway", "nginx", "litellm", "vllm-router")


def build_points(args: argparse.Namespace) -> list[Point]:
    stream_s = (args.tokens - 1) * args.itl_ms / 1000
    points = [
        Point(
            "stream",
            f"Streaming: {args.streams} concurrent streams, ITL {args.itl_ms:g} ms, {args.tokens} tokens",
            "stream",
            args.streams,
            args.itl_ms,
            args.tokens,
            args.warmup,
            args.duration,
            stream_s,
            max_warmup=args.max_warmup,
            prime=True,
        ),
        Point(
            "plain",
            f"Non-streaming: {args.plain_concurrency} concurrent requests, max_tokens {args.plain_max_tokens}",
            "plain",
            args.plain_concurrency,
            args.itl_ms,
            args.plain_max_tokens,
            args.warmup,
            args.duration,
            0.1,
            max_warmup=args.max_warmup,
        ),
    ]
    if args.heavy:
        points.append(
            Point(
                "heavy",
                f"Streaming, heavy: {args.heavy_streams} concurrent streams, ITL {args.heavy_itl_ms:g} ms, "
                f"{args.tokens} tokens",
                "stream",
                args.heavy_streams,
                args.heavy_itl_ms,
                args.tokens,
                args.warmup + 1.0,
                args.duration,
                max(1.0, (args.tokens - 1) * args.heavy_itl_ms / 1000),
                max_warmup=args.heavy_max_warmup,
                timeout=120.0,
                prime=True,
            )
        )
    return points


# -- one phase -----------------------------------------------------------------------------------------------
def run_client(
    point: Point, url: str, watch: dict[str, list[int]], load_core: int | None, log: Path, args: argparse.Namespace
) -> dict[str, Any]:
    drain = args.drain
    max_warmup = max(point.max_warmup, point.warmup)
    cmd = [*pinned(load_core), sys.executable, "-m", "loadtests.benchclient", "--url", url, "--mode", point.mode]
    cmd += ["--model", MODEL, "--api-key", API_KEY, "--concurrency", str(point.concurrency)]
    cmd += ["--max-tokens", str(point.max_tokens), "--ttft-ms", "0", "--itl-ms", str(point.itl_ms)]
    cmd += ["--warmup", str(point.warmup), "--duration", str(point.duration), "--stagger", str(point.stagger)]
    cmd += ["--max-warmup", str(max_warmup), "--drain", str(drain), "--timeout", str(max(point.timeout, drain))]
    if point.prime:
        cmd.append("--prime")
    for name, pids in watch.items():
        if pids:
            cmd += ["--watch", f"{name}={','.join(map(str, pids))}"]
    budget = max_warmup + point.duration + drain + 60
    with open(log, "ab") as err:
        r = subprocess.run(
            cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=err, timeout=budget, check=False, preexec_fn=_die_with_parent
        )
    if r.returncode != 0:
        raise RuntimeError(f"load generator exited with {r.returncode} (see {log})")
    result: dict[str, Any] = json.loads(r.stdout)
    return result


# -- the run -------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    targets = [t for t in args.targets if t != "direct"]
    targets.insert(0, "direct")  # the baseline every added figure is paired with
    out: Path = args.out
    log_dir = out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited: 1,000 streams need ~3,000 sockets
    cores = os.cpu_count() or 1
    pin = cores >= 2 and not args.no_pin and shutil.which("taskset") is not None
    load_core, proxy_core = (args.load_core, args.proxy_core) if pin else (None, None)
    if pin:
        os.sched_setaffinity(0, {args.load_core})  # the harness itself mostly sleeps; keep it off the proxy core
    points = build_points(args)
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "versions": versions(targets),
        "settings": {
            "targets": targets,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "duration": args.duration,
            "tokens": args.tokens,
            "load_core": load_core,
            "proxy_core": proxy_core,
            "commands": {},
            "gateway_source": {},  # digest of gateway/*.py when each backend's group started
        },
        "points": [],
    }
    missing: dict[str, str] = {}  # peers that could not be installed, once for all backends
    groups: dict[float, list[Point]] = {}
    for point in points:
        groups.setdefault(point.itl_ms, []).append(point)
    for itl_ms, group in groups.items():
        group_dir = log_dir / f"itl{itl_ms:g}ms"  # each backend's processes, configs and logs
        group_dir.mkdir(exist_ok=True)
        report["settings"]["gateway_source"][f"itl{itl_ms:g}ms"] = gateway_source()
        with backend(itl_ms, args.tokens, load_core, group_dir) as (backend_url, emulator):
            env = Env(out, backend_url, proxy_core, args.install)
            running: dict[str, Running] = {"direct": Running("direct", backend_url, None)}
            unavailable: dict[str, str] = dict(missing)
            try:
                for target in targets[1:]:
                    if target in unavailable:
                        continue
                    say(f"starting {target} (ITL {itl_ms:g} ms backend)")
                    try:
                        running[target] = STARTERS[target](env, group_dir)
                        proc = running[target].process
                        if proc is not None:
                            report["settings"]["commands"][target] = proc.cmd
                    except Unavailable as exc:
                        unavailable[target] = str(exc)
                        if isinstance(exc, NotInstalled):
                            missing[target] = str(exc)
                        say(f"{target}: not available: {exc}")
                for point in group:
                    report["points"].append(
                        measure(point, targets, running, unavailable, emulator, load_core, args, group_dir)
                    )
            finally:
                for r in running.values():
                    if r.process is not None:
                        r.process.stop()
    return report


def measure(
    point: Point,
    targets: list[str],
    running: dict[str, Running],
    unavailable: dict[str, str],
    emulator: Process,
    load_core: int | None,
    args: argparse.Namespace,
    log_dir: Path,
) -> dict[str, Any]:
    rounds: dict[str, list[dict[str, Any] | None]] = {t: [] for t in targets if t not in unavailable}
    backend_pids = children_of(emulator.pid)
    for r in range(args.rounds):
        for target in targets:
            if target in unavailable:
                continue
            run = running[target]
            if run.process is not None and not run.process.alive():
                unavailable[target] = f"exited with {run.process.proc.returncode} during the run: {run.process.tail()}"
                rounds.pop(target, None)
                continue
            peers = [p for name, other in running.items() if name != target for p in other.pids()]
            watch = {"proxy": run.pids(), "backend": backend_pids, "peers": peers}
            say(f"{point.name} round {r + 1}/{args.rounds}: {target}")
            try:
                phase = run_client(point, run.url, watch, load_core, log_dir / "benchclient.log", args)
            except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
                say(f"{target}: load generator failed: {exc}")
                phase = None
            rounds[target].append(phase)
            if phase:
                say(
                    f"  {phase['rate']:.1f}/s, latency p50 {phase['latency_ms']['p50']:.1f} ms, "
                    f"proxy CPU {phase['cpu_s'].get('proxy', 0):.2f} s, errors {phase['errors']}, "
                    f"warm-up {phase['warmup_s']:.1f} s"
                )
            time.sleep(args.pause)
    summary = summarize(point, rounds)
    cost_key = "cpu_us_per_chunk" if point.mode == "stream" else "cpu_us_per_request"
    return {
        "point": asdict(point),
        "targets": targets,
        "unavailable": {t: unavailable[t] for t in targets if t in unavailable},
        "summary": summary,
        "ratios": ratios({t: s for t, s in summary.items()}, cost_key),
        "note": keep_up_note(point, summary.get("direct")),
        "rounds": rounds,
    }


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _targets(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in TARGETS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown target(s) {', '.join(bad)}; choose from {', '.join(TARGETS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtests.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", type=_targets, default=list(TARGETS), help=f"comma-separated: {','.join(TARGETS)}")
    p.add_argument("--out", type=Path, help="directory for bench.md, bench.json and logs (default .bench/runs/DATE)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=float, default=2.0, help="seconds discarded before each window")
    p.add_argument("--duration", type=float, default=8.0, help="seconds measured per target per round per point")
    p.add_argument(
        "--max-warmup",
        type=float,
        default=30.0,
        help="a window opens once every connection finished one request (a slow proxy queues the first wave), "
        "or after this many seconds",
    )
    p.add_argument("--drain", type=float, default=30.0, help="seconds in-flight requests get after a window")
    p.add_argument("--pause", type=float, default=0.5, help="seconds between phases")
    p.add_argument("--streams", type=int, default=100)
    p.add_argument("--itl-ms", type=float, default=20.0)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--plain-concurrency", type=int, default=50)
    p.add_argument("--plain-max-tokens", type=int, default=1)
    p.add_argument("--heavy", action=argparse.BooleanOptionalAction, default=True, help="the 1,000-stream point")
    p.add_argument("--heavy-streams", type=int, default=1000)
    p.add_argument("--heavy-itl-ms", type=float, default=5.0)
    p.add_argument(
        "--heavy-max-warmup",
        type=float,
        default=90.0,
        help="the heavy point's --max-warmup: a saturated emulator accepts new connections slowly",
    )
    p.add_argument("--install", action=argparse.BooleanOptionalAction, default=True, help="install missing peers")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    p.add_argument("--render", type=Path, metavar="BENCH_JSON", help="only print the table of an earlier run")
    p.add_argument("--load-core", type=int, default=0)
    p.add_argument("--proxy-core", type=int, default=1)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.render:
        print(markdown(json.loads(args.render.read_text())))
        return 0
    if args.out is None:
        args.out = BENCH_DIR / "runs" / time.strftime("%Y%m%d-%H%M%S")
    args.out = args.out.resolve()  # children run in other directories
    args.out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _terminate)  # stop the children on the way out, as on Ctrl-C
    report = run(args)
    text = markdown(report)
    (args.out / "bench.md").write_text(text)
    (args.out / "bench.json").write_text(json.dumps(to_json(report), indent=2))
    print(text)
    say(f"wrote {args.out / 'bench.md'} and {args.out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
