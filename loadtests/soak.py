"""A bounded soak: mixed traffic and faults through a real gateway process, proving flat memory and no lost answer.

    python -m loadtests.soak --duration 60 [--concurrency 20] [--rss-bound-mib 16] [--out soak.json]

It starts, on free loopback ports, three vLLM emulators (``gateway emulate``): two replicas of ``soak/alpha`` that
inject faults (500 before any byte, an error event half-way, a stream cut off half-way) and one clean
``soak/beta``; then ``gateway serve`` in front of them. Every ``--kill-every`` seconds one alpha replica is
SIGKILLed (streams through it break mid-way) and restarted a second later on the same port. Meanwhile
``--concurrency`` closed-loop workers send a weighted mix (``KINDS``): streaming and non-streaming chat and text
completions (always with ``max_tokens``; some with ``stream_options.include_usage``), streams the client closes
after a few events, non-streaming calls whose socket is closed before the answer, bad requests, and fan-outs.

Every request ends in exactly one outcome:

- ``complete``: a stream that ends with ``data: [DONE]`` after a last content chunk with ``finish_reason``
  stop/length, no error event, the expected number of token chunks (the emulator sends one token per chunk) and a
  usage chunk exactly when ``include_usage`` was asked; or a 200 JSON body with choices, finish_reason and usage.
- ``error``: an explicit error. In a stream, an event ``data: {"error": {...}}`` followed by ``data: [DONE]``;
  otherwise a 4xx/5xx status with an OpenAI error body ``{"error": {"message", "type", ...}}``.
- ``rejected``: a deliberately bad request answered 4xx with an OpenAI error body.
- ``disconnect``: the client left on purpose.
- ``lost``: anything else: a stream without ``[DONE]``, data after ``[DONE]``, ``[DONE]`` without a finish reason
  (a fake end), a missing or extra token chunk, a connection reset, a timeout, an error status with a non-OpenAI
  body, a malformed 200. Examples are printed.

Memory: the gateway's VmRSS (``/proc/PID/status``) every second. The baseline is the mean of the last three
samples of the warm-up; the run fails if RSS after the warm-up ever exceeds it by more than ``--rss-bound-mib``.
At the end the gateway's ``/metrics`` must show ``gateway_requests_in_flight`` back to 0 and
``gateway_requests_total`` equal to the requests sent (fan-outs count once per model), and every emulator must
report ``vllm:num_requests_running`` 0 (the gateway closed every upstream request).

``--direct`` sends the same traffic straight to one faulty emulator, bypassing the gateway, to show that the
checker does catch truncated streams: drops there arrive as cut-off streams, so that run reports LOST and fails.

Exit status: 0 when nothing was lost and every check passed, 1 otherwise, 2 on bad arguments, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.devstack.supervisor import Child, StartupError, Supervisor, free_port, signals_as_keyboard_interrupt

COMPLETE, ERROR, REJECTED, DISCONNECT, LOST = "complete", "error", "rejected", "disconnect", "lost"
OUTCOMES = (COMPLETE, ERROR, REJECTED, DISCONNECT, LOST)
FINISH = ("stop", "length")
MIB = 1024 * 1024

ALPHA, BETA = "soak/alpha", "soak/beta"  # alpha: two faulty replicas; beta: one clean backend
ALIASES = {ALPHA: "alpha", BETA: "beta"}
OUTPUT_TOKENS = 12  # every emulator's answer length unless max_tokens is lower
MAX_TOKENS = (4, 16)  # max_tokens is drawn from this range: both finish reasons occur

# Request kinds and their weights in the mix. "direct" runs leave out what only the gateway serves.
KINDS: dict[str, int] = {
    "chat-stream": 16,
    "chat-stream-usage": 10,
    "text-stream": 8,
    "text-stream-usage": 6,
    "chat": 12,
    "text": 8,
    "stream-disconnect": 8,
    "abandon": 4,
    "bad-json": 3,
    "bad-model": 3,
    "bad-type": 3,
    "bad-max-tokens": 3,
    "compare": 3,
    "compare-stream": 3,
}
GATEWAY_ONLY = ("bad-type", "compare", "compare-stream")


# -- verdicts: pure functions of what the client received -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verdict:
    outcome: str
    detail: str = ""


def is_error_object(value: Any) -> bool:
    """The inside of an OpenAI error body: ``{"message": str, "type": ..., ...}``."""
    return isinstance(value, dict) and isinstance(value.get("message"), str) and "type" in value


def error_key(err: dict[str, Any], where: str) -> str:
    """A short, bounded label for an explicit error (where it surfaced and its code or type)."""
    code = err.get("code")
    return f"{where} {code if isinstance(code, str) else err.get('type')}"


def check_error_status(status: int, raw: bytes, *, bad_request: bool = False) -> Verdict:
    """A non-200 answer: explicit only with an OpenAI error body; a bad request must get a 4xx."""
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if not isinstance(body, dict) or not is_error_object(body.get("error")):
        return Verdict(LOST, f"status {status} without an OpenAI error body: {raw[:120]!r}")
    if bad_request and 400 <= status < 500:
        return Verdict(REJECTED, f"http {status}")
    if status < 400:
        return Verdict(LOST, f"unexpected status {status}")
    return Verdict(ERROR, error_key(body["error"], f"http {status}"))


def _choice_text(choice: dict[str, Any]) -> Any:
    delta = choice.get("delta")
    if isinstance(delta, dict):
        return delta.get("content")
    return choice.get("text")


@dataclass(slots=True)
class Expect:
    """What a complete answer must look like: the emulator's exact token count and finish reason."""

    tokens: int | None = None
    finish: str | None = None

    @classmethod
    def for_max_tokens(cls, max_tokens: int) -> Expect:
        n = min(OUTPUT_TOKENS, max_tokens)
        return cls(n, "length" if n >= max_tokens else "stop")


@dataclass(slots=True)
class StreamCheck:
    """Fed the ``data:`` payloads of one OpenAI stream in order; ``verdict`` classifies it once it ended."""

    expect: Expect = field(default_factory=Expect)
    want_usage: bool = False
    events: int = 0
    done: bool = False
    error: dict[str, Any] | None = None
    finish: str | None = None
    tokens: int = 0
    usage_tokens: int | None = None
    usage_chunks: int = 0
    problem: str | None = None

    def _bad(self, problem: str) -> None:
        if self.problem is None:
            self.problem = f"{problem} (event {self.events})"

    def feed(self, data: str) -> None:
        self.events += 1
        if self.done:
            self._bad(f"data after [DONE]: {data[:80]!r}")
            return
        if data == "[DONE]":
            self.done = True
            return
        if self.error is not None:
            self._bad("an event after the error event instead of [DONE]")
        try:
            obj = json.loads(data)
        except ValueError:
            self._bad(f"an event that is not JSON: {data[:80]!r}")
            return
        if not isinstance(obj, dict):
            self._bad(f"an event that is not an object: {data[:80]!r}")
            return
        if "error" in obj:
            if not is_error_object(obj["error"]):
                self._bad(f"an error event that is not an OpenAI error object: {data[:120]!r}")
            self.error = obj["error"] if isinstance(obj["error"], dict) else {"message": str(obj["error"])}
            return
        usage = obj.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            self.usage_tokens = usage["completion_tokens"]
        choices = obj.get("choices")
        if not isinstance(choices, list):
            self._bad("a chunk without choices")
            return
        if not choices:
            if isinstance(usage, dict):
                self.usage_chunks += 1
            else:
                self._bad("a chunk with empty choices and no usage")
            return
        for choice in choices:
            if not isinstance(choice, dict):
                self._bad("a choice that is not an object")
                continue
            if _choice_text(choice):
                if self.finish is not None:
                    self._bad("tokens after the finish_reason")
                self.tokens += 1
            if choice.get("finish_reason") is not None:
                self.finish = str(choice["finish_reason"])

    def verdict(self, transport_error: str | None = None) -> Verdict:
        if transport_error is not None:
            return Verdict(LOST, f"{transport_error} after {self.events} events")
        if self.problem is not None:
            return Verdict(LOST, self.problem)
        if not self.done:
            what = "an error event" if self.error is not None else f"{self.tokens} tokens"
            return Verdict(LOST, f"stream ended without [DONE] after {what} ({self.events} events)")
        if self.error is not None:
            return Verdict(ERROR, error_key(self.error, "stream"))
        if self.finish not in FINISH:
            return Verdict(LOST, f"[DONE] without a finish_reason stop/length (got {self.finish}): a fake end")
        if self.expect.finish is not None and self.finish != self.expect.finish:
            return Verdict(LOST, f"finish_reason {self.finish}, expected {self.expect.finish}")
        if self.want_usage and self.usage_chunks != 1:
            return Verdict(LOST, f"include_usage was asked but {self.usage_chunks} usage chunks came")
        if not self.want_usage and self.usage_chunks:
            return Verdict(LOST, "a usage chunk the client did not ask for")
        if self.expect.tokens is not None and self.tokens != self.expect.tokens:
            return Verdict(LOST, f"{self.tokens} token chunks, expected {self.expect.tokens}")
        if self.usage_tokens is not None and self.usage_tokens != self.tokens:
            return Verdict(LOST, f"usage says {self.usage_tokens} completion tokens, {self.tokens} chunks came")
        return Verdict(COMPLETE)


def check_completion(raw: bytes, expect: Expect) -> Verdict:
    """A non-streaming 200: one choice with text, a finish reason and usage that agree with ``expect``."""
    try:
        body = json.loads(raw)
        choice = body["choices"][0]
        text = choice["message"]["content"] if "message" in choice else choice["text"]
        finish = choice["finish_reason"]
        completion_tokens = body["usage"]["completion_tokens"]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        return Verdict(LOST, f"malformed 200 body ({type(exc).__name__}: {exc}): {raw[:120]!r}")
    if not isinstance(text, str) or not text:
        return Verdict(LOST, "a 200 without text")
    if finish not in FINISH or (expect.finish is not None and finish != expect.finish):
        return Verdict(LOST, f"finish_reason {finish!r}, expected {expect.finish}")
    if expect.tokens is not None and completion_tokens != expect.tokens:
        return Verdict(LOST, f"usage.completion_tokens {completion_tokens}, expected {expect.tokens}")
    return Verdict(COMPLETE)


def _fanout_slot(model: str, error: Any, finish: str | None, tokens: int, expect: Expect) -> str | None:
    """None if the model's slot is complete, "error" if it carries an explicit error, else what is wrong."""
    if error is not None:  # fan-out slots hold the inner error object (a backend's may lack "type")
        ok = isinstance(error, dict) and isinstance(error.get("message"), str)
        return "error" if ok else f"{model}: an error that is not an error object: {error!r:.120}"
    if finish not in FINISH or (expect.finish is not None and finish != expect.finish):
        return f"{model}: finish_reason {finish!r} without an error"
    if expect.tokens is not None and tokens != expect.tokens:
        return f"{model}: {tokens} tokens without an error, expected {expect.tokens}"
    return None


def check_fanout(raw: bytes, models: list[str], expect: Expect) -> Verdict:
    """A non-streaming fan-out 200: one result per model, each an answer or an explicit error."""
    try:
        body = json.loads(raw)
        results = {r["model"]: r for r in body["results"]}
    except (ValueError, KeyError, TypeError) as exc:
        return Verdict(LOST, f"malformed fan-out body ({type(exc).__name__}): {raw[:120]!r}")
    if sorted(results) != sorted(models):
        return Verdict(LOST, f"fan-out results for {sorted(results)}, asked {sorted(models)}")
    slots = []
    for model, r in results.items():
        response = r.get("response") or {}
        try:
            choice = response["choices"][0]
            finish, tokens = choice.get("finish_reason"), response["usage"]["completion_tokens"]
        except (KeyError, IndexError, TypeError):
            finish, tokens = None, -1
        slots.append((model, r.get("error"), finish, tokens))
    return _fanout_verdict(slots, expect, "fanout")


def _fanout_verdict(slots: list[tuple[str, Any, str | None, int]], expect: Expect, where: str) -> Verdict:
    """Every model's slot (model, error, finish reason, tokens) complete or an explicit error, else LOST."""
    errors = []
    for model, error, finish, tokens in slots:
        slot = _fanout_slot(model, error, finish, tokens, expect)
        if slot == "error":
            errors.append(error)
        elif slot is not None:
            return Verdict(LOST, slot)
    if errors:
        return Verdict(ERROR, error_key(errors[0], where))
    return Verdict(COMPLETE)


@dataclass(slots=True)
class FanoutStreamCheck:
    """Fed the ``data:`` payloads of a streaming fan-out: chunk events per model, one result per model, done."""

    models: list[str]
    expect: Expect = field(default_factory=Expect)
    events: int = 0
    done: bool = False
    done_event: bool = False
    tokens: Counter[str] = field(default_factory=Counter)
    finish: dict[str, str] = field(default_factory=dict)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    problem: str | None = None

    def feed(self, data: str) -> None:
        self.events += 1
        if self.done:
            self.problem = self.problem or "data after [DONE]"
            return
        if data == "[DONE]":
            self.done = True
            return
        try:
            obj = json.loads(data)
            kind = obj["type"]
        except (ValueError, KeyError, TypeError):
            self.problem = self.problem or f"a fan-out event without a type: {data[:80]!r}"
            return
        if kind == "chunk":
            model, choices = obj.get("model"), (obj.get("chunk") or {}).get("choices") or []
            for choice in choices:
                if isinstance(choice, dict) and _choice_text(choice):
                    self.tokens[str(model)] += 1
                if isinstance(choice, dict) and choice.get("finish_reason"):
                    self.finish[str(model)] = str(choice["finish_reason"])
        elif kind == "result":
            if obj.get("model") in self.results:
                self.problem = self.problem or f"two results for {obj.get('model')}"
            self.results[str(obj.get("model"))] = obj
        elif kind == "done":
            self.done_event = True

    def verdict(self, transport_error: str | None = None) -> Verdict:
        if transport_error is not None:
            return Verdict(LOST, f"{transport_error} after {self.events} events")
        if self.problem is not None:
            return Verdict(LOST, self.problem)
        if not self.done or not self.done_event:
            return Verdict(LOST, f"fan-out stream ended without done/[DONE] after {self.events} events")
        if sorted(self.results) != sorted(self.models):
            return Verdict(LOST, f"fan-out results for {sorted(self.results)}, asked {sorted(self.models)}")
        slots = [(m, r.get("error"), self.finish.get(m), self.tokens[m]) for m, r in self.results.items()]
        return _fanout_verdict(slots, self.expect, "fanout-stream")


async def sse_data(response: httpx.Response) -> AsyncIterator[str]:
    """The ``data`` of each server-sent event, dispatched at its blank line (an unterminated last event is not)."""
    lines: list[str] = []
    async for line in response.aiter_lines():
        if not line:
            if lines:
                yield "\n".join(lines)
                lines = []
        elif line.startswith("data:"):
            value = line[5:]
            lines.append(value[1:] if value.startswith(" ") else value)


# -- traffic ----------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Tally:
    """Every outcome, by kind; explicit error labels; the first lost examples; what reached the gateway."""

    by_kind: dict[str, Counter[str]] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)
    lost: list[dict[str, str]] = field(default_factory=list)
    proxied: int = 0  # requests sent to /v1/chat/completions or /v1/completions
    abandoned: int = 0  # of which: sockets closed before the answer
    fanout_calls: int = 0  # fan-outs x models: each is one gateway_requests_total sample

    def add(self, kind: str, verdict: Verdict, request_id: str) -> None:
        self.by_kind.setdefault(kind, Counter())[verdict.outcome] += 1
        if verdict.outcome == ERROR:
            self.errors[verdict.detail] += 1
        if verdict.outcome == LOST and len(self.lost) < 20:
            self.lost.append({"kind": kind, "request_id": request_id, "detail": verdict.detail})

    def outcomes(self) -> Counter[str]:
        total: Counter[str] = Counter(dict.fromkeys(OUTCOMES, 0))
        for counts in self.by_kind.values():
            total.update(counts)
        return total

    @property
    def requests(self) -> int:
        return sum(self.outcomes().values())


class Traffic:
    """Closed-loop workers sending the weighted mix of ``KINDS`` to ``url`` until a deadline."""

    def __init__(
        self,
        url: str,
        models: list[str],
        *,
        direct: bool,
        seed: int,
        timeout: float,
        weights: dict[str, int] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,  # a seam for tests
    ) -> None:
        self.url = url
        self.models = models
        self.direct = direct
        self.rng = random.Random(seed)
        mix = KINDS | (weights or {})
        self.kinds = [k for k, w in mix.items() if w > 0 and not (direct and k in GATEWAY_ONLY)]
        self.weights = [mix[k] for k in self.kinds]
        self.tally = Tally()
        self.counter = 0
        self.client = httpx.AsyncClient(
            base_url=url,
            timeout=httpx.Timeout(timeout, connect=5.0),
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=1000),
            trust_env=False,  # loopback only: never through a proxy from the environment
            transport=transport,
        )

    async def close(self) -> None:
        await self.client.aclose()

    async def worker(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            kind = self.rng.choices(self.kinds, self.weights)[0]
            self.counter += 1
            request_id = f"soak-{self.counter}"
            try:
                verdict = await self.one(kind, request_id)
            except (httpx.HTTPError, OSError) as exc:
                verdict = Verdict(LOST, f"{type(exc).__name__}: {exc}")
            self.tally.add(kind, verdict, request_id)

    def _model(self) -> str:
        model = ALPHA if self.rng.random() < 0.6 or len(self.models) == 1 else BETA
        return ALIASES[model] if not self.direct and self.rng.random() < 0.5 else model

    def _body(self, chat: bool, request_id: str) -> tuple[dict[str, Any], Expect]:
        max_tokens = self.rng.randint(*MAX_TOKENS)
        body: dict[str, Any] = {"model": self._model(), "max_tokens": max_tokens, "temperature": 0.7}
        if chat:
            body["messages"] = [{"role": "user", "content": f"{request_id}: tell me something"}]
        else:
            body["prompt"] = f"{request_id}: once upon a time"
        return body, Expect.for_max_tokens(max_tokens)

    async def one(self, kind: str, request_id: str) -> Verdict:
        headers = {"content-type": "application/json", "x-request-id": request_id}
        chat = not kind.startswith("text")
        path = "/v1/chat/completions" if chat else "/v1/completions"
        body, expect = self._body(chat, request_id)
        if kind.startswith("compare"):
            models = list(self.models)
            body.pop("model")
            body["models"] = models
            body["stream"] = kind == "compare-stream"
            self.tally.fanout_calls += len(models)
            if body["stream"]:
                fanout = FanoutStreamCheck(models, expect)
                return await self._stream("/v1/compare/chat/completions", body, headers, fanout)
            r = await self.client.post("/v1/compare/chat/completions", content=json.dumps(body), headers=headers)
            if r.status_code != 200:
                return check_error_status(r.status_code, r.content)
            return check_fanout(r.content, models, expect)
        self.tally.proxied += 1
        if kind.startswith("bad-"):
            content = self._bad(kind, body)
            r = await self.client.post(path, content=content, headers=headers)
            if r.status_code == 200:
                return Verdict(LOST, f"{kind} accepted with 200: {r.content[:120]!r}")
            return check_error_status(r.status_code, r.content, bad_request=True)
        if kind == "abandon":
            self.tally.abandoned += 1
            return await self._abandon(path, json.dumps(body).encode(), request_id)
        if kind.endswith("stream") or kind.endswith("usage") or kind == "stream-disconnect":
            body["stream"] = True
            want_usage = kind.endswith("usage")
            if want_usage:
                body["stream_options"] = {"include_usage": True}
            check = StreamCheck(expect, want_usage)
            leave = self.rng.randint(2, 5) if kind == "stream-disconnect" else None
            return await self._stream(path, body, headers, check, leave_after=leave)
        r = await self.client.post(path, content=json.dumps(body), headers=headers)
        if r.status_code != 200:
            return check_error_status(r.status_code, r.content)
        return check_completion(r.content, expect)

    def _bad(self, kind: str, body: dict[str, Any]) -> bytes:
        if kind == "bad-json":
            return json.dumps(body).encode()[:-7]  # cut off: not JSON any more
        if kind == "bad-model":
            body["model"] = "no-such-model"
        elif kind == "bad-type":
            key = self.rng.choice(("messages", "stream", "model"))
            body[key] = {"messages": "just a string", "stream": "yes", "model": 42}[key]
        else:  # bad-max-tokens: the gateway forwards it, the backend refuses it (a backend 4xx passing through)
            body["max_tokens"] = "eight"
        return json.dumps(body).encode()

    async def _stream(
        self,
        path: str,
        body: dict[str, Any],
        headers: dict[str, str],
        check: StreamCheck | FanoutStreamCheck,
        *,
        leave_after: int | None = None,
    ) -> Verdict:
        transport_error = None
        try:
            async with self.client.stream("POST", path, content=json.dumps(body), headers=headers) as r:
                if r.status_code != 200:
                    return check_error_status(r.status_code, await r.aread())
                if not r.headers.get("content-type", "").startswith("text/event-stream"):
                    return Verdict(LOST, f"a stream answered as {r.headers.get('content-type')}")
                async for data in sse_data(r):
                    check.feed(data)
                    leave = leave_after is not None and check.events >= leave_after and not check.done
                    if leave and isinstance(check, StreamCheck) and check.error is None and check.problem is None:
                        return Verdict(DISCONNECT, f"left after {check.events} events")
        except httpx.TimeoutException as exc:
            transport_error = f"client timeout ({type(exc).__name__})"
        except httpx.HTTPError as exc:
            transport_error = f"{type(exc).__name__}: {exc}"
        return check.verdict(transport_error)

    async def _abandon(self, path: str, payload: bytes, request_id: str) -> Verdict:
        """A non-streaming call whose socket is closed before the answer: written whole, then dropped."""
        url = httpx.URL(self.url)
        _, writer = await asyncio.open_connection(url.host, url.port)
        head = (
            f"POST {path} HTTP/1.1\r\nhost: {url.host}:{url.port}\r\ncontent-type: application/json\r\n"
            f"x-request-id: {request_id}\r\ncontent-length: {len(payload)}\r\n\r\n"
        )
        try:
            writer.write(head.encode() + payload)
            await writer.drain()
            await asyncio.sleep(self.rng.uniform(0.02, 0.15))
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        return Verdict(DISCONNECT, "closed a non-streaming call before its answer")


# -- memory and metrics -----------------------------------------------------------------------------------------


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


@dataclass(slots=True)
class Memory:
    pid: int
    warmup_s: float
    samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds since the start, bytes)

    def sample(self, t: float) -> int | None:
        value = rss_bytes(self.pid)
        if value is not None:
            self.samples.append((t, value))
        return value

    def summary(self, bound_mib: float) -> dict[str, Any]:
        warm = [v for t, v in self.samples if t < self.warmup_s][-3:] or [v for _, v in self.samples[:1]]
        after = [(t, v) for t, v in self.samples if t >= self.warmup_s]
        if not warm or not after:
            return {"ok": False, "detail": "not enough RSS samples"}
        baseline = statistics.fmean(warm)
        peak = max(v for _, v in after)
        final = after[-1][1]
        slope = 0.0
        if len(after) >= 3:
            slope = statistics.linear_regression([t for t, _ in after], [v for _, v in after]).slope
        growth = (peak - baseline) / MIB
        return {
            "pid": self.pid,
            "warmup_s": self.warmup_s,
            "baseline_mib": round(baseline / MIB, 2),
            "peak_mib": round(peak / MIB, 2),
            "final_mib": round(final / MIB, 2),
            "peak_growth_mib": round(growth, 2),
            "final_growth_mib": round((final - baseline) / MIB, 2),
            "slope_mib_per_min": round(slope * 60 / MIB, 3),
            "bound_mib": bound_mib,
            "ok": growth <= bound_mib,
            "samples": [[round(t, 1), round(v / MIB, 2)] for t, v in self.samples],
        }


def metric_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def metric_by(text: str, name: str, label: str) -> dict[str, int]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                key = s.labels.get(label, "")
                out[key] = out.get(key, 0.0) + s.value
    return {k: int(v) for k, v in sorted(out.items()) if v}


async def settle(client: httpx.AsyncClient, url: str, name: str, within_s: float = 10.0) -> tuple[float, str]:
    """Poll ``url``'s /metrics until ``name`` sums to 0 (disconnects are noticed asynchronously)."""
    deadline = time.monotonic() + within_s
    while True:
        text = (await client.get(f"{url}/metrics")).text
        value = metric_sum(text, name)
        if value == 0 or time.monotonic() > deadline:
            return value, text
        await asyncio.sleep(0.2)


# -- the stack --------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Backend:
    name: str
    model: str
    port: int
    argv: list[str]
    child: Child | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def emulator(args: argparse.Namespace, name: str, model: str, seed: int, faults: bool) -> Backend:
    port = free_port()
    argv = [sys.executable, "-m", "gateway", "emulate", "--model", model, "--port", str(port),
            "--ttft-ms", str(args.ttft_ms), "--itl-ms", str(args.itl_ms), "--output-tokens", str(OUTPUT_TOKENS),
            "--jitter", "0.2", "--seed", str(seed)]  # fmt: skip
    if faults:
        argv += ["--fail-rate", str(args.fail_rate), "--stream-error-rate", str(args.stream_error_rate),
                 "--drop-rate", str(args.drop_rate)]  # fmt: skip
    return Backend(name, model, port, argv)


@dataclass(slots=True)
class Stack:
    sup: Supervisor
    backends: list[Backend]
    url: str  # where the traffic goes: the gateway, or (--direct) the one emulator
    watched: Child  # whose RSS is sampled
    kills: int = 0

    def pids(self) -> dict[str, int]:
        return {c.name: c.process.pid for c in self.sup.children}


def gateway_config(backends: list[Backend], run: Path, port: int) -> dict[str, Any]:
    def card(model: str, family: str, origin: str) -> dict[str, Any]:
        return {"id": model, "family": family, "vendor": "soak", "origin": origin, "aliases": [ALIASES[model]],
                "emulated": True, "gpu": {"type": "H100-80GB", "count": 1, "usd_per_hour": 2.5},
                "list_price": {"input_per_1m": 0.05, "output_per_1m": 0.2}}  # fmt: skip

    return {
        "gateway": {
            "host": "127.0.0.1",
            "port": port,
            "health_check_interval_s": 0.5,
            "health_check_timeout_s": 2,
            "log_level": "warning",
            # on disk, not :memory:, so the fan-out rows it keeps do not count as gateway RSS growth
            "results_db": str(run / "results.sqlite"),
        },
        "models": [card(ALPHA, "qwen3", "CN"), card(BETA, "llama", "US")],
        "backends": [
            {"name": b.name, "base_url": b.url, "models": [b.model], "timeouts": {"connect": 2, "read": 30}}
            for b in backends
        ],
    }


def start_stack(args: argparse.Namespace, sup: Supervisor, run: Path) -> Stack:
    backends = [emulator(args, "alpha-a", ALPHA, args.seed + 1, faults=True)]
    if not args.direct:
        backends.append(emulator(args, "alpha-b", ALPHA, args.seed + 2, faults=True))
        backends.append(emulator(args, "beta-a", BETA, args.seed + 3, faults=False))
    for b in backends:
        b.child = sup.start(b.name, b.argv)
    for b in backends:
        assert b.child is not None
        sup.wait_ready(b.child, f"{b.url}/health", timeout=60)
    if args.direct:
        assert backends[0].child is not None
        return Stack(sup, backends, backends[0].url, backends[0].child)
    port = free_port()
    config = run / "gateway.yaml"
    config.write_text(yaml.safe_dump(gateway_config(backends, run, port), sort_keys=False), encoding="utf-8")
    argv = [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", str(port)]
    gateway = sup.start("gateway", argv)
    url = f"http://127.0.0.1:{port}"
    sup.wait_ready(gateway, f"{url}/ready", timeout=60)
    return Stack(sup, backends, url, gateway)


async def wait_healthy(client: httpx.AsyncClient, b: Backend, within_s: float = 60.0) -> None:
    deadline = time.monotonic() + within_s
    while True:
        assert b.child is not None
        if b.child.process.poll() is not None:
            raise StartupError(f"{b.name} exited with {b.child.process.returncode} on restart:\n{b.child.tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if (await client.get(f"{b.url}/health", timeout=2.0)).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise StartupError(f"{b.name} was not ready {within_s:.0f} s after its restart; see {b.child.log}")
        await asyncio.sleep(0.1)


async def chaos(
    stack: Stack, client: httpx.AsyncClient, every: float, down: float, deadline: float, started: dict[str, int]
) -> None:
    """Every ``every`` s, SIGKILL one alpha replica (taking turns) and start it again on its port ``down`` s later.
    The last restart is awaited, so no replica is left dead for the end-of-run checks."""
    replicas = [b for b in stack.backends if b.model == ALPHA]
    while time.monotonic() + every < deadline:
        await asyncio.sleep(every)
        b = replicas[stack.kills % len(replicas)]
        stack.kills += 1
        assert b.child is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(b.child.process.pid, signal.SIGKILL)
        await asyncio.to_thread(b.child.process.wait)
        stack.sup.children.remove(b.child)
        await asyncio.sleep(down)
        b.child = stack.sup.start(f"{b.name}.{stack.kills}", b.argv)
        started[b.child.name] = b.child.process.pid
        await wait_healthy(client, b)


# -- the run ----------------------------------------------------------------------------------------------------


def progress_line(elapsed: float, tally: Tally, memory: Memory, kills: int) -> str:
    counts = tally.outcomes()
    done = sum(counts.values())
    parts = "  ".join(f"{k} {counts[k]}" for k in OUTCOMES)
    rss = memory.samples[-1][1] / MIB if memory.samples else 0.0
    warm = [v for t, v in memory.samples if t < memory.warmup_s][-3:]
    if elapsed < memory.warmup_s or not warm:
        growth = "warming up"
    else:
        growth = f"{(rss - statistics.fmean(warm) / MIB):+.1f} MiB since warm-up"
    return (
        f"[{elapsed:5.0f} s] {done} requests ({done / max(elapsed, 1e-9):.1f}/s)  {parts}  kills {kills}  "
        f"RSS {rss:.1f} MiB ({growth})"
    )


async def soak(args: argparse.Namespace, stack: Stack) -> dict[str, Any]:
    models = [ALPHA] if args.direct else [ALPHA, BETA]
    started = stack.pids()
    traffic = Traffic(stack.url, models, direct=args.direct, seed=args.seed, timeout=args.timeout, weights=args.weights)
    memory = Memory(stack.watched.process.pid, args.warmup)
    start = time.monotonic()
    deadline = start + args.duration
    workers = [asyncio.create_task(traffic.worker(deadline)) for _ in range(args.concurrency)]
    faults = None
    if args.kill_every > 0 and not args.direct:
        faults = asyncio.create_task(chaos(stack, traffic.client, args.kill_every, args.down_s, deadline, started))

    async def monitor() -> None:
        next_line = start + args.progress_every
        while True:
            now = time.monotonic()
            memory.sample(now - start)
            if now >= next_line:
                print(progress_line(now - start, traffic.tally, memory, stack.kills), flush=True)
                next_line += args.progress_every
            await asyncio.sleep(1.0)

    watcher = asyncio.create_task(monitor())
    try:
        await asyncio.gather(*workers)
        if faults is not None:
            await faults
        elapsed = time.monotonic() - start
        checks: list[dict[str, Any]] = []
        metrics: dict[str, Any] = {}
        if not args.direct:
            try:
                metrics = await gateway_checks(traffic, stack, checks)
            except httpx.HTTPError as exc:  # the gateway or an emulator died: that fails the run, with its reason
                checks.append({"name": "metrics after the run", "ok": False, "detail": f"{type(exc).__name__}: {exc}"})
        memory.sample(time.monotonic() - start)  # after the drain: the final RSS
    finally:
        for task in (*workers, watcher, *([faults] if faults else [])):
            task.cancel()
        await asyncio.gather(*workers, watcher, *([faults] if faults else []), return_exceptions=True)
        await traffic.close()
    tally = traffic.tally
    lost = tally.outcomes()[LOST]
    checks.insert(0, {"name": "no lost responses", "ok": lost == 0, "detail": f"{lost} lost"})
    rss = memory.summary(args.rss_bound_mib)
    growth = f"peak {rss.get('peak_growth_mib')} MiB over {rss.get('baseline_mib')} MiB"
    checks.insert(1, {"name": "RSS growth after warm-up", "ok": rss["ok"],
                      "detail": f"{growth} (bound {args.rss_bound_mib:g} MiB)"})  # fmt: skip
    return {
        "mode": "direct" if args.direct else "gateway",
        "duration_s": round(elapsed, 1),
        "concurrency": args.concurrency,
        "seed": args.seed,
        "requests": tally.requests,
        "requests_per_s": round(tally.requests / elapsed, 1),
        "outcomes": dict(tally.outcomes()),
        "by_kind": {k: dict(v) for k, v in sorted(tally.by_kind.items())},
        "errors": dict(tally.errors.most_common()),
        "lost_examples": tally.lost,
        "kills": stack.kills,
        "processes": started,
        "rss": rss,
        "metrics": metrics,
        "checks": checks,
        "ok": all(c["ok"] for c in checks),
    }


async def gateway_checks(traffic: Traffic, stack: Stack, checks: list[dict[str, Any]]) -> dict[str, Any]:
    """In-flight gauge back to 0, requests counted once each, every backend idle, the gateway still up."""
    client, tally = traffic.client, traffic.tally
    in_flight, text = await settle(client, stack.url, "gateway_requests_in_flight")
    checks.append({"name": "gateway_requests_in_flight back to 0", "ok": in_flight == 0, "detail": f"{in_flight:g}"})
    counted = int(metric_sum(text, "gateway_requests_total"))
    sent = tally.proxied + tally.fanout_calls
    # Exact: even a socket closed right after its request was written is counted (499, backend "none").
    detail = f"counted {counted}, sent {sent} ({tally.proxied} proxied, {tally.abandoned} of them abandoned, "
    checks.append({"name": "gateway_requests_total = requests sent", "ok": counted == sent,
                   "detail": f"{detail}+ {tally.fanout_calls} fan-out calls)"})  # fmt: skip
    running = {}
    for b in stack.backends:
        value, _ = await settle(client, b.url, "vllm:num_requests_running")
        running[b.name] = value
    idle = all(v == 0 for v in running.values())
    checks.append({"name": "backends idle (upstream requests closed)", "ok": idle, "detail": str(running)})
    alive = stack.watched.process.poll() is None
    checks.append({"name": "gateway still running", "ok": alive, "detail": f"exit {stack.watched.process.poll()}"})
    return {
        "requests_counted": counted,
        "requests_sent": sent,
        "abandoned": tally.abandoned,
        "by_status": metric_by(text, "gateway_requests_total", "status"),
        "upstream_errors": metric_by(text, "gateway_upstream_errors_total", "reason"),
        "backends_running_after": running,
    }


def log_problems(log: Path) -> list[str]:
    """Tracebacks and ERROR lines in the gateway's log: not failures by themselves, but worth reading."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line for line in lines if "Traceback" in line or " ERROR " in line or line.startswith("ERROR")]


def table(summary: dict[str, Any]) -> str:
    cols = OUTCOMES
    rows = [f"{'kind':<22}" + "".join(f"{c:>12}" for c in cols) + f"{'total':>9}"]
    for kind, counts in summary["by_kind"].items():
        cells = "".join(f"{counts.get(c, 0):>12}" for c in cols)
        rows.append(f"{kind:<22}{cells}{sum(counts.values()):>9}")
    total = summary["outcomes"]
    rows.append(f"{'total':<22}" + "".join(f"{total[c]:>12}" for c in cols) + f"{summary['requests']:>9}")
    return "\n".join(rows)


def report(summary: dict[str, Any]) -> str:
    out = [
        "",
        f"soak ({summary['mode']}): {summary['requests']} requests in {summary['duration_s']} s "
        f"({summary['requests_per_s']}/s), concurrency {summary['concurrency']}, {summary['kills']} backend kills",
        "",
        table(summary),
        "",
        "explicit errors:",
        *(f"  {n:>6}  {label}" for label, n in summary["errors"].items()),
    ]
    if summary["lost_examples"]:
        out += ["", "LOST (first examples):"]
        out += [f"  {e['request_id']:<12} {e['kind']:<20} {e['detail']}" for e in summary["lost_examples"]]
    rss = summary["rss"]
    if "baseline_mib" in rss:
        out += ["", f"RSS (pid {rss['pid']}): baseline {rss['baseline_mib']} MiB after {rss['warmup_s']:g} s warm-up, "
                f"peak {rss['peak_mib']} ({rss['peak_growth_mib']:+} MiB), final {rss['final_mib']} "
                f"({rss['final_growth_mib']:+} MiB), trend {rss['slope_mib_per_min']:+} MiB/min"]  # fmt: skip
    m = summary["metrics"]
    if m:
        out += [f"gateway requests by status: {m['by_status']}", f"upstream errors by reason: {m['upstream_errors']}"]
    if summary.get("gateway_log_problems"):
        out += [f"gateway log: {len(summary['gateway_log_problems'])} Traceback/ERROR lines, first:",
                f"  {summary['gateway_log_problems'][0]}"]  # fmt: skip
    out += ["", "checks:"]
    out += [f"  {'ok  ' if c['ok'] else 'FAIL'}  {c['name']}: {c['detail']}" for c in summary["checks"]]
    out += ["", "PASS" if summary["ok"] else "FAIL"]
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtests.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=60.0, help="seconds of traffic")
    p.add_argument("--concurrency", type=int, default=20, help="closed-loop workers")
    p.add_argument("--warmup", type=float, help="seconds before the RSS baseline (default: 20%% of the run, <= 10)")
    p.add_argument("--rss-bound-mib", type=float, default=16.0, help="allowed RSS growth after the warm-up")
    p.add_argument("--kill-every", type=float, default=15.0, help="SIGKILL an alpha replica this often (0: never)")
    p.add_argument("--down-s", type=float, default=1.0, help="seconds a killed replica stays down")
    p.add_argument("--fail-rate", type=float, default=0.1, help="alpha replicas: 500 before any byte")
    p.add_argument("--stream-error-rate", type=float, default=0.05, help="alpha replicas: error event half-way")
    p.add_argument("--drop-rate", type=float, default=0.05, help="alpha replicas: stream cut off half-way")
    p.add_argument("--ttft-ms", type=float, default=40.0)
    p.add_argument("--itl-ms", type=float, default=8.0)
    p.add_argument("--timeout", type=float, default=30.0, help="client read timeout per request (then LOST)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress-every", type=float, default=5.0, help="seconds between progress lines")
    p.add_argument("--out", type=Path, help="write the summary as JSON here")
    p.add_argument("--run-dir", type=Path, help="config and logs (default: a temp dir, removed if the run passes)")
    p.add_argument("--direct", action="store_true", help="bypass the gateway: traffic straight to one faulty emulator")
    kinds = ", ".join(KINDS)
    p.add_argument("--weight", action="append", default=[], metavar="KIND=N",
                   help=f"change one kind's weight in the mix (0 leaves it out); kinds: {kinds}")  # fmt: skip
    args = p.parse_args(argv)
    args.weights = {}
    for item in args.weight:
        kind, _, n = item.partition("=")
        if kind not in KINDS or not n.isdigit():
            p.error(f"--weight {item}: expected KIND=N with KIND one of {', '.join(KINDS)}")
        args.weights[kind] = int(n)
    if args.warmup is None:
        args.warmup = min(10.0, 0.2 * args.duration)
    if args.duration <= 0 or args.concurrency < 1 or not 0 <= args.warmup < args.duration:
        p.error("need --duration > 0, --concurrency >= 1 and 0 <= --warmup < --duration")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = args.run_dir or Path(tempfile.mkdtemp(prefix="soak-"))
    run.mkdir(parents=True, exist_ok=True)
    sup = Supervisor(run / "logs")
    summary: dict[str, Any] | None = None
    with signals_as_keyboard_interrupt():
        try:
            print(f"starting {'1 emulator' if args.direct else '3 emulators and the gateway'} (logs in {run})")
            stack = start_stack(args, sup, run)
            pids = " ".join(f"{name}={pid}" for name, pid in stack.pids().items())
            print(f"processes: {pids}")
            print(f"soak: {args.duration:g} s, {args.concurrency} workers against {stack.url}", flush=True)
            summary = asyncio.run(soak(args, stack))
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            return 130
        except StartupError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            sup.stop()
            print("all processes stopped", flush=True)
    if not args.direct:
        summary["gateway_log_problems"] = log_problems(run / "logs" / "gateway.log")[:20]
    print(report(summary))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        print(f"summary: {args.out}")
    if summary["ok"] and args.run_dir is None:
        shutil.rmtree(run, ignore_errors=True)
    else:
        print(f"config and logs kept in {run}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
