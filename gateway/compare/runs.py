"""Comparison runs: every prompt to every model through the gateway, as users call it, measured client-side.

Each call is an ordinary streamed ``/v1/chat/completions`` request with ``stream_options.include_usage`` (token
counts come from vLLM). Timings use the gateway's own definitions (``gateway.relay.sse.StreamObserver``;
docs/measurement.md), with t0 = when this client sends the request: TTFT to the first token-bearing chunk,
TPOT = (E2E - TTFT) / (completion_tokens - 1). Calls are paired across models by (prompt id, repeat): the
request bodies are identical but for ``model``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from gateway.compare import formats
from gateway.compare.arms import Arm
from gateway.compare.grading import Answer, Expectation, ExpectationError, ToolCall, expectation_of, grade
from gateway.compare.store import CallResult, measured
from gateway.config import ModelCard
from gateway.cost import list_price_usd
from gateway.relay.sse import SSEFramer, StreamObserver

_ARTICLE = (
    "The Grand Canal of China, begun in the fifth century BC and extended under the Sui dynasty, links Beijing "
    "with Hangzhou over some 1,800 kilometres. For centuries it carried grain from the fertile south to the "
    "capital in the north, and with the grain travelled merchants, officials, poets and ideas. Its locks and "
    "embankments were rebuilt again and again after floods, and whole cities such as Yangzhou and Suzhou grew "
    "rich along its banks. When the Yellow River changed course in the nineteenth century and railways and "
    "coastal shipping arrived, long stretches of the canal silted up and fell out of use. In recent decades "
    "parts of it have been dredged again, to move coal and building materials cheaply and, through the "
    "South-North Water Transfer Project, to carry water to the dry north. In 2014 it was listed as a World "
    "Heritage Site, which brought new attention to the old towns, bridges and warehouses along its route, and "
    "also new debate about how to balance tourism, shipping and the daily life of the people who live beside it."
)

BUILTIN: tuple[dict[str, str], ...] = (
    {"id": "chat-1", "category": "short chat", "prompt": "Give me three tips for writing clear documentation."},
    {"id": "chat-2", "category": "short chat", "prompt": "What should I pack for a weekend hiking trip?"},
    {"id": "summary-1", "category": "long-context summary",
     "prompt": f"Summarise the following text in three sentences.\n\n{_ARTICLE}\n\n{_ARTICLE}"},
    {"id": "code-1", "category": "code",
     "prompt": "Write a Python function that checks whether a string is a palindrome, with a docstring."},
    {"id": "code-2", "category": "code", "prompt": "Explain what this SQL does: SELECT origin, COUNT(*) FROM "
     "models GROUP BY origin HAVING COUNT(*) > 1;"},
    {"id": "reasoning-1", "category": "reasoning",
     "prompt": "A train leaves at 9:40 and arrives at 13:05. How long is the trip? Explain step by step."},
    {"id": "zh-1", "category": "chinese", "prompt": "请用三句话介绍一下长城的历史。"},
    {"id": "zh-2", "category": "chinese",
     "prompt": "请解释一下什么是混合专家模型（MoE），以及它为什么能降低推理成本。"},  # noqa: RUF001
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Prompt:
    id: str
    category: str
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    expectation: Expectation | None = None  # a graded prompt: how its answer is scored (gateway.compare.grading)
    tools: list[dict[str, Any]] | None = None  # sent with tool_choice "auto" (tool-use prompts)
    lang: str = ""


class PromptError(Exception):
    """A prompt file that cannot be used; the message names the file and the line."""


def builtin_prompts() -> list[Prompt]:
    return [Prompt(p["id"], p["category"], [{"role": "user", "content": p["prompt"]}]) for p in BUILTIN]


GRADED_DIR = Path(__file__).resolve().parent / "graded"
GRADED_SETS = ("en", "zh")


def load_prompts(source: str, fmt: str = "jsonl") -> list[Prompt]:
    """``builtin``, ``builtin-graded`` (the graded sets in English and Chinese, ``builtin-graded-en`` or ``-zh``
    for one), or a JSONL file: one object per line with ``prompt`` (text) or ``messages``, and optionally ``id``,
    ``category``, ``lang``, ``max_tokens`` and, to grade its answers, ``expected`` and ``scorer`` (with ``schema``,
    ``tools`` or ``tolerance`` as the scorer needs: ``gateway.compare.grading``). ``fmt`` reads a public
    benchmark's file instead (``gsm8k``, ``mmlu-csv``: ``gateway.compare.formats``)."""
    if fmt != "jsonl":
        try:
            lines = formats.read(Path(source), fmt)
        except OSError as exc:
            raise PromptError(f"{source}: cannot read: {exc.strerror or exc}") from None
        except formats.FormatError as exc:
            raise PromptError(str(exc)) from None
        return _prompts(Path(source), enumerate(lines, 1))
    if source == "builtin":
        return builtin_prompts()
    if source.startswith("builtin-graded"):
        langs = GRADED_SETS if source == "builtin-graded" else (source.removeprefix("builtin-graded-"),)
        if not set(langs) <= set(GRADED_SETS):
            raise PromptError(f"{source}: no such set; builtin-graded, or builtin-graded-en / -zh")
        return [p for lang in langs for p in _load_file(GRADED_DIR / f"{lang}.jsonl")]
    return _load_file(Path(source))


def _load_file(path: Path) -> list[Prompt]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise PromptError(f"{path}: cannot read: {exc.strerror or exc}") from None
    parsed: list[tuple[int, Any]] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            parsed.append((n, json.loads(line)))
        except ValueError as exc:
            raise PromptError(f"{path}:{n}: not JSON: {exc}") from None
    return _prompts(path, parsed)


def _prompts(path: Path, lines: Iterable[tuple[int, Any]]) -> list[Prompt]:
    prompts: list[Prompt] = []
    for n, obj in lines:
        if not isinstance(obj, dict):
            raise PromptError(f"{path}:{n}: expected an object")
        messages = obj.get("messages")
        if messages is None and isinstance(obj.get("prompt"), str):
            messages = [{"role": "user", "content": obj["prompt"]}]
        if not isinstance(messages, list) or not messages:
            raise PromptError(f"{path}:{n}: needs 'prompt' (a string) or 'messages' (a non-empty list)")
        max_tokens = obj.get("max_tokens")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise PromptError(f"{path}:{n}: max_tokens must be a positive integer")
        try:
            expectation = expectation_of(obj)
        except ExpectationError as exc:
            raise PromptError(f"{path}:{n}: {exc}") from None
        tools = obj.get("tools") if isinstance(obj.get("tools"), list) else None
        prompts.append(Prompt(str(obj.get("id", f"p{n}")), str(obj.get("category", "")), messages, max_tokens,
                              expectation, tools, str(obj.get("lang", ""))))  # fmt: skip
    if not prompts:
        raise PromptError(f"{path}: no prompts")
    ids = [p.id for p in prompts]
    if len(set(ids)) != len(ids):
        raise PromptError(f"{path}: prompt ids must be unique")
    return prompts


async def call(
    client: httpx.AsyncClient, url: str, arm: Arm | str, prompt: Prompt, max_tokens: int, comparison_id: str,
    repeat: int, *, cache_bust: bool = False,
) -> CallResult:  # fmt: skip
    """One streamed call of ``arm`` (a model, or a model with a variant's fields laid over the request).
    ``cache_bust`` opens the conversation with a system message holding a random id, unique to this call: no
    backend can serve this prompt's prefix from its cache, whichever arm asked before."""
    arm = Arm(arm) if isinstance(arm, str) else arm
    model = arm.model
    messages = prompt.messages
    if cache_bust:
        messages = [{"role": "system", "content": f"Request {uuid.uuid4().hex}."}, *messages]
    base: dict[str, Any] = {"messages": messages, "max_tokens": prompt.max_tokens or max_tokens,
                            "temperature": 0.0, "seed": repeat}  # fmt: skip
    if prompt.tools:
        base.update(tools=prompt.tools, tool_choice="auto")
    body = arm.body(base)
    body.update(model=model, stream=True, stream_options={"include_usage": True})
    obs = StreamObserver(t0=time.perf_counter(), keep_text=True)
    backend: str | None = None
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            backend = response.headers.get("x-gateway-backend")
            if response.status_code == 200:
                error = await _observe(response, obs)
            else:
                error = _refusal(response.status_code, await response.aread())
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"
    result = measured(
        comparison_id, "run", model, obs, backend=backend, error=error, keep_text=True, prompt_id=prompt.id,
        prompt_category=prompt.category, repeat=repeat, variant=arm.variant,
    )  # fmt: skip
    result.prompt_lang = prompt.lang
    if prompt.expectation is not None and error is None:
        calls = [ToolCall(name, arguments) for name, arguments in (obs.tool_calls[i] for i in sorted(obs.tool_calls))]
        graded = grade(prompt.expectation, Answer(result.text or "", calls))
        result.correct = None if graded.correct is None else int(graded.correct)
        result.score, result.grade_detail = graded.score, graded.kind or graded.detail
    return result


async def _observe(response: httpx.Response, obs: StreamObserver) -> str | None:
    """Time the stream; its error, if it has one."""
    framer = SSEFramer()
    async for data in response.aiter_raw():
        for event in framer.feed(data):
            obs.observe(event)
    if obs.error is not None:
        return str(obs.error.get("message", obs.error))
    if not obs.done:
        return "the stream ended without [DONE]"
    if obs.first_token is None and not obs.tool_calls:
        return "no token-bearing chunk: the model produced no visible text"
    return None


def _refusal(status: int, raw: bytes) -> str:
    try:
        return f"HTTP {status}: {json.loads(raw)['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}: {raw[:200]!r}"


class ProgressBar:
    """A run's progress on stderr, for ``run``'s ``progress``: a tqdm bar while the calls run (on a terminal only),
    then one plain line a user and a script can read, ``N/N calls, E errors, T s``."""

    def __init__(self) -> None:
        self.bar: tqdm[Any] | None = None
        self.done = 0

    def __call__(self, done: int, total: int, errors: int, started: float) -> None:
        bar = self.bar
        if bar is None:
            # disable=None: no bar when stderr is not a terminal (a log, CI), where its redraws would be noise.
            bar = self.bar = tqdm(total=total, unit="call", file=sys.stderr, disable=None, dynamic_ncols=True)
        bar.set_postfix_str(f"{errors} errors", refresh=False)
        bar.update(done - self.done)
        self.done = done
        if done == total:
            bar.close()
            print(f"  {done}/{total} calls, {errors} errors, {time.monotonic() - started:.0f} s", file=sys.stderr)


async def run_async(
    url: str,
    models: Sequence[str | Arm],
    prompts: Sequence[Prompt],
    *,
    max_tokens: int = 64,
    concurrency: int = 1,
    repeat: int = 1,
    comparison_id: str | None = None,
    progress: Callable[[int, int, int, float], None] | None = None,
    api_key: str | None = None,
    cache_bust: bool = False,
    warmup: int = 0,
) -> list[CallResult]:
    """Every (prompt, repeat) to every arm (a model name, or an ``Arm``); at most ``concurrency`` calls at once, in
    prompt-major order so every arm meets the same load. First, ``warmup`` calls per arm with the first prompt,
    all arms at once, whose results are dropped (a backend's first calls pay for loading, compiling and warming
    caches that later calls do not)."""
    cid = comparison_id or f"run-{uuid.uuid4().hex[:12]}"
    arms = [Arm(m) if isinstance(m, str) else m for m in models]
    jobs = [(p, r, a) for r in range(repeat) for p in prompts for a in arms]
    results: list[CallResult] = []
    gate = asyncio.Semaphore(max(1, concurrency))
    started = time.monotonic()
    timeout = httpx.Timeout(connect=5.0, read=300.0, write=30.0, pool=300.0)
    limits = httpx.Limits(max_connections=max(1, concurrency) + 4)
    if progress:
        progress(0, len(jobs), 0, started)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=auth_headers(api_key)) as client:
        if warmup > 0 and prompts:
            await asyncio.gather(*(call(client, url, a, prompts[0], max_tokens, "warmup", 0, cache_bust=True)
                                   for _ in range(warmup) for a in arms))  # fmt: skip

        async def one(prompt: Prompt, rep: int, arm: Arm) -> None:
            async with gate:
                result = await call(client, url, arm, prompt, max_tokens, cid, rep, cache_bust=cache_bust)
            results.append(result)
            if progress:
                progress(len(results), len(jobs), sum(1 for r in results if r.error), started)

        await asyncio.gather(*(one(*job) for job in jobs))
    order = {(p.id, r, a.name): i for i, (p, r, a) in enumerate(jobs)}
    return sorted(results, key=lambda r: order[(r.prompt_id, r.repeat, r.arm)])


def run(url: str, models: Sequence[str | Arm], prompts: Sequence[Prompt], **kwargs: Any) -> list[CallResult]:
    return asyncio.run(run_async(url, models, prompts, **kwargs))


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {api_key}"} if api_key else {}


def fetch_cards(url: str, api_key: str | None = None) -> dict[str, ModelCard]:
    """The gateway's model cards, from its /v1/models."""
    data = httpx.get(f"{url}/v1/models", timeout=10, headers=auth_headers(api_key)).json()["data"]
    return {m["id"]: ModelCard.model_validate(m["card"]) for m in data if "card" in m}


def add_list_cost(results: Sequence[CallResult], cards: dict[str, ModelCard]) -> None:
    for r in results:
        card = cards.get(r.model)
        if card is not None:
            r.family, r.origin = card.family, card.origin
            if card.list_price is not None and r.ok:
                r.cost_list_usd = list_price_usd(card.list_price, r.prompt_tokens, r.completion_tokens)


def _fmt(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def table(results: Sequence[CallResult], cards: dict[str, ModelCard]) -> str:
    """Side by side per model, for a terminal: the same rows and numbers as the report's summary."""
    from gateway.compare.report import model_rows

    header = (
        f"{'model':<26} {'origin':<6} {'ok':>5} {'TTFT p50 ms':>12} {'TTFAT p50 ms':>13} {'TPOT p50 ms':>12} "
        f"{'out tok/s':>10} {'tokens in/out':>14} {'served tok/s':>13} {'$/1M out (GPU)':>15} {'$/1M out (list)':>16}"
    )
    lines = [header, "-" * len(header)]
    for row in model_rows(results, cards):
        ttft, tpot = (row.ttft.p50 if row.ttft else None), (row.tpot.p50 if row.tpot else None)
        ttfat = row.ttfat.p50 if row.ttfat else None
        lines.append(
            f"{row.name:<26} {row.origin:<6} {row.ok:>2}/{row.total:<2} "
            f"{_fmt(ttft, 1000):>12} {_fmt(ttfat, 1000):>13} {_fmt(tpot, 1000, 2):>12} "
            f"{_fmt(row.output_tps):>10} {row.prompt_tokens:>6}/{row.completion_tokens:<7} "
            f"{_fmt(row.served_tps):>13} {_fmt(row.gpu_per_1m, digits=2):>15} {_fmt(row.list_per_1m, digits=2):>16}"
        )
    for r in [r for r in results if r.error][:5]:
        lines.append(f"  error from {r.arm} on {r.prompt_id}: {r.error}")
    lines.append(
        "TTFT/TTFAT (first answer token, after any thinking)/TPOT: medians; out tok/s = 1/TPOT, the speed one "
        "request sees; served tok/s = output tokens / the model's active window in this run; $/1M out (GPU) = "
        "GPU $/hour / (served tok/s x 3600) x 1e6."
    )
    return "\n".join(lines)
