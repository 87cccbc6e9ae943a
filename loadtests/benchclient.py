"""The overhead benchmark's load generator: cheap per request, so the proxy under test is what gets measured.

``python -m loadtests.benchclient --url http://127.0.0.1:P --mode stream|plain --concurrency N ...`` keeps N
HTTP/1.1 keep-alive connections, each sending one chat completion after another (closed loop) until the window
ends, and prints one JSON object (a :class:`PhaseResult`) on stdout. It speaks HTTP itself on raw asyncio
sockets (an ``asyncio.Protocol`` per connection, a hand-written response parser, no HTTP library), so a chunk
costs a few microseconds here and arrival times are taken the moment bytes reach user space.

Timeline: with ``--prime``, all N connections are opened first, each carrying one non-streaming request of about
a second (see the priming comment below); the N first requests are spread over ``--stagger`` seconds (so streams
are out of phase, as in steady traffic); at least ``--warmup`` seconds are discarded, and until every connection
has finished its first exchange (a slow proxy queues the first wave; at most ``--max-warmup`` seconds); then the
window of ``--duration`` seconds is measured; no request starts after it, the ones in flight finish (up to
``--drain`` seconds). At the window's edges the client reads the CPU time (utime + stime from ``/proc/PID/stat``)
of each watched process group (``--watch NAME=PID,PID``) and samples their RSS (``VmRSS``) four times a second,
so CPU per request and per chunk cover exactly the requests and chunks counted in the window.

What is counted (chat completions; the definitions of docs/measurement.md, narrowed to what the emulator sends):
- a token chunk is an SSE event whose ``content`` (or ``text``) is a non-empty string (the emulator sends no
  reasoning or tool calls); vLLM's role-only first chunk, the finish chunk and usage chunks are not;
- TTFT = first token chunk's arrival - request sent; ITL = every gap between two token chunks of one stream;
- chunk delay = arrival of token chunk i - (request sent + nominal TTFT + i x nominal ITL): how late each token
  reaches the client against the emulator's schedule (which is anchored at the request's start, without drift).
  Its p50 through a proxy minus its p50 direct is the proxy's added per-chunk latency;
- latency stats use the requests *sent* in the window; rates, CPU per request and CPU per chunk use requests
  *completed* and chunks *received* in the window (the window the CPU time was read over);
- an error is a non-200 status, a stream without ``data: [DONE]`` or with an error event, a non-streaming body
  without ``choices``, a closed connection or a request over ``--timeout``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import re
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

from gateway.compare.stats import percentile, summary

TOKEN = re.compile(rb'"(?:content|text)":\s*"(?!")')
EVENT_END = re.compile(rb"\r?\n\r?\n")
CLK_TCK = os.sysconf("SC_CLK_TCK")


class ExchangeError(Exception):
    """A request that did not complete as a well-formed 200 answer."""


@dataclass(slots=True)
class Answer:
    status: int
    tokens: list[float]  # arrival time of every token chunk (perf_counter)
    done: bool  # saw data: [DONE] (streams) or a body with "choices" (non-streaming)
    error_event: bool
    end: float  # arrival of the response's last byte


class Connection(asyncio.Protocol):
    """One HTTP/1.1 keep-alive connection carrying one exchange at a time; parses the response as it arrives."""

    def __init__(self, stream: bool) -> None:
        self.stream = stream
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.future: asyncio.Future[Answer] | None = None
        self._reset()

    def _reset(self) -> None:
        self.head = bytearray()
        self.in_body = False
        self.status = 0
        self.length: int | None = None  # Content-Length, or None for chunked / until close
        self.chunked = False
        self.close_after = False
        self.raw = bytearray()  # undecoded chunked framing
        self.chunk_left = -1  # bytes left in the current chunk; -1: a size line comes next
        self.body = bytearray()  # decoded body (non-streaming) or the unparsed SSE tail (streams)
        self.tokens: list[float] = []
        self.done = False
        self.error_event = False

    # -- asyncio.Protocol ----------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.future is not None and not self.future.done():
            if self.in_body and self.length is None and not self.chunked:
                self._finish(time.perf_counter())  # a body delimited by the connection's close
            else:
                self.future.set_exception(ExchangeError(f"connection closed: {exc or 'by peer'}"))

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if self.future is None or self.future.done():
            return  # bytes nobody asked for (a late error page): the next exchange resets
        try:
            self._feed(data, now)
        except ExchangeError as exc:
            self.future.set_exception(exc)
            self.close()

    # -- use --------------------------------------------------------------------------------------------
    def request(self, payload: bytes, stream: bool | None = None) -> asyncio.Future[Answer]:
        assert self.transport is not None
        if stream is not None:
            self.stream = stream
        self._reset()
        self.future = asyncio.get_running_loop().create_future()
        self.transport.write(payload)
        return self.future

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # -- parsing ----------------------------------------------------------------------------------------
    def _feed(self, data: bytes, now: float) -> None:
        if not self.in_body:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head) > 65536:
                    raise ExchangeError("response head over 64 KiB")
                return
            head, data = bytes(self.head[:end]), bytes(self.head[end + 4 :])
            self._parse_head(head)
            self.in_body = True
        if self.chunked:
            self._dechunk(data, now)
        else:
            self._body(data, now)
            if self.length is not None and len(self.body) >= self.length:
                self._finish(now)

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise ExchangeError(f"bad status line {lines[0][:80]!r}")
        self.status = int(parts[1])
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                self.length = int(value.strip())
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                self.chunked = True
            elif name == b"connection" and b"close" in value.lower():
                self.close_after = True
        if self.status in (204, 304):
            self.length = 0

    def _dechunk(self, data: bytes, now: float) -> None:
        self.raw += data
        raw = self.raw
        pos = 0
        while True:
            if self.chunk_left < 0:  # a size line
                eol = raw.find(b"\r\n", pos)
                if eol < 0:
                    break
                size_text = bytes(raw[pos:eol]).split(b";", 1)[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise ExchangeError(f"bad chunk size {size_text[:20]!r}") from None
                if size == 0:  # the last chunk: then trailers (normally none) and an empty line
                    if raw.startswith(b"\r\n", eol + 2) or raw.find(b"\r\n\r\n", eol) >= 0:
                        del raw[:]
                        self._finish(now)
                        return
                    break  # wait for the rest, keeping the size line
                pos = eol + 2
                self.chunk_left = size
            take = min(self.chunk_left, len(raw) - pos)
            if take > 0:
                self._body(bytes(raw[pos : pos + take]), now)
                pos += take
                self.chunk_left -= take
            if self.chunk_left > 0 or len(raw) - pos < 2:  # more data, or the CRLF after it, still to come
                break
            pos += 2
            self.chunk_left = -1
        del raw[:pos]

    def _body(self, data: bytes, now: float) -> None:
        self.body += data
        if not self.stream or self.status != 200:
            return
        parts = EVENT_END.split(self.body)
        for event in parts[:-1]:
            if event.startswith(b"data: [DONE]"):
                self.done = True
            elif TOKEN.search(event) is not None:
                self.tokens.append(now)
            elif b'"error"' in event:
                self.error_event = True
        self.body = bytearray(parts[-1])

    def _finish(self, now: float) -> None:
        if self.future is None or self.future.done():
            return
        done = self.done if self.stream else (self.status == 200 and b'"choices"' in self.body)
        self.future.set_result(Answer(self.status, self.tokens, done, self.error_event, now))
        self.in_body = False
        if self.close_after:
            self.close()


# -- /proc ---------------------------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process (all its threads), in seconds; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5), counted from 1


def rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def parse_watch(items: Sequence[str]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for item in items:
        name, _, pids = item.partition("=")
        groups[name] = [int(p) for p in pids.split(",") if p]
    return groups


# -- results -------------------------------------------------------------------------------------------------
def stats_ms(values: list[float]) -> dict[str, float]:
    """Count, p50, p90, p99, mean and max of ``values`` (seconds) in ms, percentiles as the reports compute them
    (``gateway.compare.stats``); NaN but the count when there are none."""
    if not values:
        nan = float("nan")
        return {"n": 0, "p50": nan, "p90": nan, "p99": nan, "mean": nan, "max": nan}
    s = summary(values)
    ms = 1000.0
    return {
        "n": s.n,
        "p50": s.p50 * ms,
        "p90": s.p90 * ms,
        "p99": s.p99 * ms,
        "mean": s.mean * ms,
        "max": max(values) * ms,
    }


@dataclass(slots=True)
class PhaseResult:
    mode: str
    concurrency: int
    window_s: float
    warmup_s: float = 0.0  # from start to the window's opening
    warmed: int = 0  # connections that had finished their first exchange when the window opened
    primed: int = 0  # connections opened and primed before the load started (--prime)
    prime_s: float = 0.0
    sent: int = 0  # requests sent in the window
    completed: int = 0  # successful requests completed in the window
    errors: int = 0  # failed requests sent in the window
    error_samples: list[str] = field(default_factory=list)
    unfinished: int = 0  # still in flight when the drain ran out
    chunks: int = 0  # token chunks received in the window
    tokens_per_stream_p50: float = float("nan")
    rate: float = 0.0  # completed / window (streams/s or requests/s)
    chunk_rate: float = 0.0
    ttft_ms: dict[str, float] = field(default_factory=dict)
    itl_ms: dict[str, float] = field(default_factory=dict)
    chunk_delay_ms: dict[str, float] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)  # E2E: last byte (plain) or last token (streams)
    tail_ms: dict[str, float] = field(default_factory=dict)  # streams: last token -> end of the response
    cpu_s: dict[str, float] = field(default_factory=dict)  # per watched group, over the window
    cpu_busy: dict[str, float] = field(default_factory=dict)  # cpu_s / window, 1.0 = one core
    rss_max_kb: dict[str, int] = field(default_factory=dict)
    rss_first_kb: dict[str, int] = field(default_factory=dict)  # the window's first and last RSS samples
    rss_last_kb: dict[str, int] = field(default_factory=dict)
    client_cpu_s: float = 0.0


@dataclass(slots=True)
class Recorder:
    window: tuple[float, float] = (float("inf"), float("inf"))
    sent: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    completions: list[float] = field(default_factory=list)  # completion times of successful requests
    chunk_times: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    delay: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    tail: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    def in_window(self, t: float) -> bool:
        return self.window[0] <= t < self.window[1]

    def error(self, sent_at: float, why: str) -> None:
        if self.in_window(sent_at):
            self.errors += 1
            if len(self.error_samples) < 5:
                self.error_samples.append(why)

    def record(self, sent_at: float, answer: Answer, ttft_s: float, itl_s: float, stream: bool) -> None:
        end = answer.end
        self.chunk_times.extend(answer.tokens)
        counted = self.in_window(sent_at)
        if counted:
            self.sent += 1
        ok = answer.status == 200 and answer.done and not answer.error_event and (answer.tokens or not stream)
        if not ok:
            why = f"status {answer.status}" if answer.status != 200 else "stream ended without [DONE] or tokens"
            if answer.error_event:
                why = "error event in stream"
            self.error(sent_at, why)
            return
        self.completions.append(end)
        if not counted:
            return
        if stream:
            times = answer.tokens
            self.ttft.append(times[0] - sent_at)
            self.itl.extend(b - a for a, b in itertools.pairwise(times))
            self.delay.extend(t - sent_at - ttft_s - i * itl_s for i, t in enumerate(times))
            self.latency.append(times[-1] - sent_at)
            self.tail.append(answer.end - times[-1])
            self.tokens.append(len(times))
        else:
            self.latency.append(end - sent_at)


async def run_phase(args: argparse.Namespace) -> PhaseResult:
    url = urlsplit(args.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    stream = args.mode == "stream"
    body: dict[str, Any] = {
        "model": args.model,
        "messages": [{"role": "user", "content": "Tell me about proxies."}],
        "max_tokens": args.max_tokens,
        "stream": stream,
    }
    path = url.path.rstrip("/") + "/v1/chat/completions"

    def request(body: dict[str, Any]) -> bytes:
        raw = json.dumps(body, separators=(",", ":")).encode()
        return (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Accept: {'text/event-stream' if body['stream'] else 'application/json'}\r\n"
            f"Authorization: Bearer {args.api_key}\r\nContent-Length: {len(raw)}\r\n\r\n"
        ).encode() + raw

    payload = request(body)
    loop = asyncio.get_running_loop()

    async def connect() -> Connection:
        _, conn = await asyncio.wait_for(loop.create_connection(lambda: Connection(stream), host, port), args.timeout)
        return conn

    # Priming: every connection opened and carrying one non-streaming request, all at once, before the load
    # starts. A saturated uvicorn/uvloop server (the emulator, vLLM's own server) accepts new connections only
    # slowly, so connections opened under load would measure its accept queue, for direct and for every proxy's
    # upstream pool alike. The primer lasts about a second at the backend (ignore_eos + enough tokens, a mere
    # sleep in the emulator), so a proxy holds N upstream connections at once, which its pool then keeps.
    primed: list[Connection | None] = [None] * args.concurrency
    prime_started = time.perf_counter()
    if args.prime:
        primer_tokens = max(2, int(1000 / max(args.itl_ms, 1.0)) + 1)
        primer = request({**body, "stream": False, "max_tokens": primer_tokens, "ignore_eos": True})

        async def prime(index: int) -> None:
            with contextlib.suppress(OSError, TimeoutError, ExchangeError):
                conn = await connect()
                answer = await asyncio.wait_for(conn.request(primer, stream=False), args.timeout)
                if answer.status == 200 and not conn.closed:
                    primed[index] = conn
                else:
                    conn.close()

        await asyncio.gather(*(prime(i) for i in range(args.concurrency)))
    prime_s = time.perf_counter() - prime_started
    ttft_s, itl_s = args.ttft_ms / 1000, args.itl_ms / 1000
    rec = Recorder()
    groups = parse_watch(args.watch)
    start = time.perf_counter()
    end = [math.inf]  # no request starts after end[0]: set when the window opens
    warmed = asyncio.Event()  # every connection has finished its first exchange: past the start-up burst
    first_done = 0
    warmed_at_open: list[int] = []
    cpu_marks: list[tuple[float, dict[str, float], float]] = []
    rss_max: dict[str, int] = {name: 0 for name in groups}
    rss_first: dict[str, int] = {}
    rss_last: dict[str, int] = {}

    def mark() -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu_marks.append(
            (
                time.perf_counter(),
                {name: sum(cpu_seconds(p) for p in pids) for name, pids in groups.items()},
                usage.ru_utime + usage.ru_stime,
            )
        )

    async def sampler() -> None:
        await asyncio.sleep(args.warmup)
        # A slow proxy takes longer than the warm-up to serve the first wave of N requests; measuring before
        # then would count a start-up queue, not steady state. Wait for it, within --max-warmup.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(warmed.wait(), max(0.0, args.max_warmup - args.warmup))
        mark()
        warmed_at_open.append(first_done)
        t_end = cpu_marks[0][0] + args.duration
        end[0] = t_end
        rec.window = (cpu_marks[0][0], t_end)
        while (now := time.perf_counter()) < t_end:
            for name, pids in groups.items():
                rss = sum(rss_kb(p) for p in pids)
                rss_max[name] = max(rss_max[name], rss)
                rss_first.setdefault(name, rss)
                rss_last[name] = rss
            await asyncio.sleep(min(0.25, t_end - now))
        mark()
        rec.window = (cpu_marks[0][0], cpu_marks[1][0])

    def first_exchange_over() -> None:
        nonlocal first_done
        first_done += 1
        if first_done == args.concurrency:
            warmed.set()

    async def worker(index: int) -> None:
        await asyncio.sleep(args.stagger * index / args.concurrency)
        conn = primed[index]
        first = True
        try:
            while time.perf_counter() < end[0]:
                current: Connection
                if conn is None or conn.closed:
                    try:
                        current = await connect()
                    except (OSError, TimeoutError) as exc:
                        rec.error(time.perf_counter(), f"connect: {exc!r}")
                        conn = None
                        await asyncio.sleep(0.05)
                        continue
                    conn = current
                else:
                    current = conn
                sent_at = time.perf_counter()
                try:
                    answer: Answer | None = await asyncio.wait_for(current.request(payload, stream), args.timeout)
                except (ExchangeError, TimeoutError) as exc:
                    rec.error(sent_at, f"{type(exc).__name__}: {exc}")
                    answer = None
                if first:
                    first = False
                    first_exchange_over()
                if answer is None:
                    current.close()
                    conn = None
                    continue
                rec.record(sent_at, answer, ttft_s, itl_s, stream)
                if answer.status != 200:
                    current.close()  # an error body may not be fully framed; start clean
                    conn = None
        finally:
            if conn is not None:
                conn.close()

    sampling = asyncio.create_task(sampler())
    workers = [asyncio.create_task(worker(i)) for i in range(args.concurrency)]
    await sampling
    _, pending = await asyncio.wait(workers, timeout=args.drain)
    for task in pending:
        task.cancel()
    for task in pending:
        with contextlib.suppress(asyncio.CancelledError):
            await task

    (t0, cpu0, own0), (t1, cpu1, own1) = cpu_marks[0], cpu_marks[1]
    window = t1 - t0
    result = PhaseResult(mode=args.mode, concurrency=args.concurrency, window_s=window, warmup_s=t0 - start)
    result.sent, result.errors, result.error_samples = rec.sent, rec.errors, rec.error_samples
    result.warmed = warmed_at_open[0]
    result.primed, result.prime_s = sum(1 for c in primed if c is not None), prime_s
    result.unfinished = len(pending)
    result.completed = sum(1 for t in rec.completions if t0 <= t < t1)
    result.chunks = sum(1 for t in rec.chunk_times if t0 <= t < t1)
    result.rate = result.completed / window
    result.chunk_rate = result.chunks / window
    if rec.tokens:
        result.tokens_per_stream_p50 = percentile(rec.tokens, 50)
    result.ttft_ms = stats_ms(rec.ttft)
    result.itl_ms = stats_ms(rec.itl)
    result.chunk_delay_ms = stats_ms(rec.delay)
    result.latency_ms = stats_ms(rec.latency)
    result.tail_ms = stats_ms(rec.tail)
    result.cpu_s = {name: cpu1[name] - cpu0[name] for name in groups}
    result.cpu_busy = {name: value / window for name, value in result.cpu_s.items()}
    result.rss_max_kb = rss_max
    result.rss_first_kb, result.rss_last_kb = rss_first, rss_last
    result.client_cpu_s = own1 - own0
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtests.benchclient", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="base URL of the target (its /v1/chat/completions is called)")
    p.add_argument("--mode", choices=("stream", "plain"), default="stream")
    p.add_argument("--model", default="m")
    p.add_argument("--api-key", default="sk-bench", help="sent as a bearer token (LiteLLM's master key)")
    p.add_argument("--concurrency", type=int, default=100)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--ttft-ms", type=float, default=0.0, help="the backend's nominal TTFT (for chunk delays)")
    p.add_argument("--itl-ms", type=float, default=20.0, help="the backend's nominal ITL (for chunk delays)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds discarded before the window (at least)")
    p.add_argument(
        "--max-warmup",
        type=float,
        default=30.0,
        help="the window opens once every connection finished one exchange, or after this many seconds",
    )
    p.add_argument("--duration", type=float, default=10.0, help="seconds in the measured window")
    p.add_argument("--stagger", type=float, default=0.5, help="seconds over which the first requests are spread")
    p.add_argument("--drain", type=float, default=30.0, help="seconds in-flight requests get after the window")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds one request may take")
    p.add_argument(
        "--prime",
        action="store_true",
        help="open every connection with one short non-streaming request before the load starts",
    )
    p.add_argument("--watch", action="append", default=[], help="NAME=PID,PID: a process group to meter")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    result = asyncio.run(run_phase(args))
    json.dump(asdict(result), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
