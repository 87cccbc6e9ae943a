"""Identical prompts to several models through the gateway, measured from the client's side.

Each call is a streamed chat completion with ``stream_options.include_usage`` so token counts come from vLLM. The
timings use the same definitions as the gateway's metrics (``streaming.StreamObserver``): TTFT to the first
token-bearing chunk, TPOT = (E2E - TTFT) / (completion_tokens - 1).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx

from gateway.config import ModelCard
from gateway.cost import gpu_usd_per_1m_output
from gateway.streaming import SSEFramer, StreamObserver

BUILTIN_PROMPTS: tuple[tuple[str, str], ...] = (
    ("short chat", "Give me three tips for writing clear documentation."),
    ("chinese", "请用三句话介绍一下长城的历史。"),
    ("code", "Write a Python function that checks whether a string is a palindrome."),
    ("reasoning", "A train leaves at 9:40 and arrives at 13:05. How long is the trip? Explain briefly."),
)


@dataclass(slots=True)
class Measurement:
    model: str
    prompt: str
    ttft_s: float | None
    tpot_s: float | None
    e2e_s: float | None
    prompt_tokens: int
    completion_tokens: int
    text: str
    error: str | None = None


def measure(client: httpx.Client, url: str, model: str, prompt: str, max_tokens: int) -> Measurement:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "seed": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    obs = StreamObserver(t0=time.perf_counter(), keep_text=True)
    framer = SSEFramer()
    try:
        with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                response.read()
                return Measurement(model, prompt, None, None, None, 0, 0, "", f"HTTP {response.status_code}: "
                                   f"{response.text[:200]}")  # fmt: skip
            for data in response.iter_raw():
                for event in framer.feed(data):
                    obs.observe(event)
    except httpx.HTTPError as exc:
        return Measurement(model, prompt, None, None, None, 0, 0, "", f"{type(exc).__name__}: {exc}")
    usage = obs.usage
    error = None
    if obs.error is not None:
        error = str(obs.error.get("message", obs.error))
    elif obs.first_token is None:
        error = "no token-bearing chunk: the model produced no visible text"
    return Measurement(
        model,
        prompt,
        obs.ttft,
        obs.tpot,
        obs.e2e,
        usage.prompt_tokens if usage else 0,
        usage.completion_tokens if usage else 0,
        "".join(obs.text),
        error,
    )


def run(
    url: str,
    models: Sequence[str],
    prompts: Sequence[str],
    *,
    max_tokens: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> list[Measurement]:
    """Every prompt to every model, one call at a time (so no call competes with another)."""
    out: list[Measurement] = []
    total = len(models) * len(prompts)
    with httpx.Client(timeout=httpx.Timeout(connect=5.0, read=120.0, write=30.0, pool=5.0)) as client:
        for prompt in prompts:
            for model in models:
                out.append(measure(client, url, model, prompt, max_tokens))
                if progress:
                    progress(len(out), total)
    return out


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _fmt(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def table(results: Sequence[Measurement], cards: dict[str, ModelCard]) -> str:
    """Side-by-side per model: medians of TTFT and TPOT, output speed, tokens and $ per 1M output tokens."""
    header = (
        f"{'model':<22} {'origin':<6} {'ok':>5} {'TTFT p50 ms':>12} {'TPOT p50 ms':>12} {'out tok/s':>10} "
        f"{'tokens in/out':>14} {'$/1M out (GPU)':>15} {'$/1M out (list)':>16}"
    )
    lines = [header, "-" * len(header)]
    for model in dict.fromkeys(r.model for r in results):
        rows = [r for r in results if r.model == model]
        good = [r for r in rows if r.error is None]
        tokens_out = sum(r.completion_tokens for r in good)
        decode_s = sum((r.e2e_s or 0) - (r.ttft_s or 0) for r in good)
        decode_tokens = sum(max(0, r.completion_tokens - 1) for r in good)
        speed = decode_tokens / decode_s if decode_s > 0 else None
        card = cards.get(model)
        per_hour = card.gpu.cost_per_hour_usd if card and card.gpu else None
        gpu_cost = gpu_usd_per_1m_output(per_hour, speed) if per_hour is not None and speed else None
        list_cost = card.list_price.output_per_1m if card and card.list_price else None
        lines.append(
            f"{model:<22} {(card.origin if card else '?'):<6} {len(good):>2}/{len(rows):<2} "
            f"{_fmt(_median([r.ttft_s for r in good if r.ttft_s is not None]), 1000):>12} "
            f"{_fmt(_median([r.tpot_s for r in good if r.tpot_s is not None]), 1000, 2):>12} "
            f"{_fmt(speed):>10} "
            f"{sum(r.prompt_tokens for r in good):>6}/{tokens_out:<7} "
            f"{_fmt(gpu_cost, digits=2):>15} {_fmt(list_cost, digits=2):>16}"
        )
    errors = [r for r in results if r.error]
    for r in errors[:5]:
        lines.append(f"  error from {r.model}: {r.error}")
    lines.append(
        "TTFT/TPOT: medians over the prompts; out tok/s = 1/TPOT pooled (one request at a time, batch 1); "
        "$/1M out (GPU) = GPU $/hour / (out tok/s x 3600) x 1e6 at that speed."
    )
    return "\n".join(lines)
