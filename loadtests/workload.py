"""Workloads: the request bodies a load test sends (pure: no I/O but reading a prompt file).

Every model gets the same prompt sequence: request ``i`` goes to ``models[i % M]`` with prompt number ``i // M``,
so over a run each model sees prompts 0, 1, 2, ... in the same order, with identical bodies but for ``model``.

Synthetic prompts are filler words sized in *approximate* tokens (about one token a word for these words; each
model's tokenizer counts differently, and the measured counts always come from the server's ``usage``). A size is
``N`` (fixed) or ``LO-HI`` (uniform, seeded per prompt number so every model gets the same sizes).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from gateway.compare.runs import Prompt, load_prompts

_WORDS = ("alpha", "bridge", "canal", "delta", "engine", "forest", "garden", "harbor", "island", "journey")


@dataclass(frozen=True, slots=True)
class Size:
    low: int
    high: int

    @classmethod
    def parse(cls, text: str) -> Size:
        lo, _, hi = text.partition("-")
        try:
            low, high = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(f"a token count is N or LO-HI, got {text!r}") from None
        if low < 1 or high < low:
            raise ValueError(f"a token count is N or LO-HI with 1 <= LO <= HI, got {text!r}")
        return cls(low, high)

    def sample(self, rng: random.Random) -> int:
        return self.low if self.low == self.high else rng.randint(self.low, self.high)


@dataclass(frozen=True, slots=True)
class Workload:
    models: tuple[str, ...]
    prompts: str = "builtin"  # builtin | FILE.jsonl | synthetic
    max_tokens: int = 64
    input_tokens: Size = Size(128, 128)
    output_tokens: Size | None = None  # synthetic only: exact output lengths (ignore_eos)
    seed: int = 0
    loaded: tuple[Prompt, ...] = field(default=(), init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("no models to load")
        if self.prompts != "synthetic":
            object.__setattr__(self, "loaded", tuple(load_prompts(self.prompts)))

    def request(self, i: int) -> tuple[str, dict[str, Any]]:
        """The model and body of request number ``i`` of the run."""
        model = self.models[i % len(self.models)]
        n = i // len(self.models)
        body: dict[str, Any] = {"model": model, "stream": True, "stream_options": {"include_usage": True}}
        if self.prompts == "synthetic":
            rng = random.Random(self.seed * 1_000_003 + n)
            words = [rng.choice(_WORDS) for _ in range(self.input_tokens.sample(rng))]
            body["messages"] = [{"role": "user", "content": " ".join(words)}]
            if self.output_tokens is not None:
                body["max_tokens"] = self.output_tokens.sample(rng)
                body["ignore_eos"] = True  # vLLM's extension: generate exactly max_tokens
            else:
                body["max_tokens"] = self.max_tokens
        else:
            prompt = self.loaded[n % len(self.loaded)]
            body["messages"] = prompt.messages
            body["max_tokens"] = prompt.max_tokens or self.max_tokens
        body["temperature"] = 0.0
        body["seed"] = self.seed
        return model, body
