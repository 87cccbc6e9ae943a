"""Logprobs in vLLM's three shapes, with made-up values.

Values are deterministic (drawn from the choice's seeded generator) negative floats. The sampled token is always
the most likely one, so every ``top_logprobs`` list or dict holds it first, followed by distinct alternatives from
the filler vocabulary with lower values: chat ``top_logprobs: k`` lists ``k`` entries; a completion's
``logprobs: k`` dict has ``max(k, 1)`` (vLLM's sampled token plus the top ``k``, which here include it);
``prompt_logprobs`` has the same, keyed by token id, ``None`` for the first prompt token as in vLLM.
"""

from __future__ import annotations

import random
from typing import Any

from gateway.devstack.emulator.tokens import TokenModel

Step = list[tuple[int, float]]  # (token id, logprob): the token itself first, then its alternatives


def step(token_id: int, width: int, rng: random.Random, filler: list[int]) -> Step:
    value = -round(rng.uniform(0.01, 2.5), 4)
    out = [(token_id, value)]
    seen = {token_id}
    for _ in range(min(width, len(filler) + 1) - 1):
        alt = rng.choice(filler)
        while alt in seen:
            alt = filler[(filler.index(alt) + 1) % len(filler)]
        seen.add(alt)
        value = round(value - rng.uniform(0.05, 1.5), 4)
        out.append((alt, value))
    return out


def steps(ids: list[int], width: int, rng: random.Random, filler: list[int]) -> list[Step]:
    return [step(i, width, rng, filler) for i in ids]


def chat_entries(model: TokenModel, taken: list[Step], top: int) -> list[dict[str, Any]]:
    def entry(token_id: int, value: float) -> dict[str, Any]:
        text = model.piece(token_id)
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8", errors="replace"))}

    return [{**entry(*s[0]), "top_logprobs": [entry(*alt) for alt in s[:top]]} for s in taken]


def completion(model: TokenModel, taken: list[Step | None], ids: list[int], offset: int = 0) -> dict[str, Any]:
    """vLLM's ``CompletionLogProbs``: ``taken[i]`` is ``None`` where vLLM has no logprob (the first prompt token)."""
    tokens = [model.piece(i) for i in ids]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {
        "text_offset": offsets,
        "token_logprobs": [None if s is None else s[0][1] for s in taken],
        "tokens": tokens,
        "top_logprobs": [None if s is None else {model.piece(t): v for t, v in s} for s in taken],
    }


def prompt_entries(model: TokenModel, taken: list[Step | None]) -> list[dict[str, Any] | None]:
    return [
        None
        if s is None
        else {str(t): {"logprob": v, "rank": rank, "decoded_token": model.piece(t)} for rank, (t, v) in enumerate(s, 1)}
        for s in taken
    ]
