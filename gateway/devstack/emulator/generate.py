"""The emulated model: what each choice says, token by token.

Text is filler words (``output_tokens`` of them unless ``max_tokens`` is smaller, or exactly ``max_tokens`` with
``ignore_eos``). A tool call's arguments and ``response_format`` content are a JSON value built to satisfy the schema
(see ``tools``), as long as it takes; ``max_tokens`` cuts either short (``finish_reason: "length"``, as a real model
cut short would be). Stop strings and stop token ids end a choice as in vLLM: the text stops before the stop string
(or after it with ``include_stop_str_in_output``), ``finish_reason`` is ``"stop"`` and ``stop_reason`` the string or
id; the token that completed it is counted. Every choice is seeded by ``seed`` and its index, so it is reproducible.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from gateway.devstack.emulator import logprobs
from gateway.devstack.emulator.config import EmulatorConfig
from gateway.devstack.emulator.params import Plan
from gateway.devstack.emulator.tokens import TokenModel
from gateway.devstack.emulator.tools import value_for


@dataclass(slots=True)
class Choice:
    index: int
    prompt: int  # the index of its prompt
    ids: list[int]
    pieces: list[str]  # each token's text as sent (after a stop string: cut or empty)
    finish: str
    stop_reason: str | int | None = None
    steps: list[logprobs.Step] | None = None
    tool_id: str | None = None
    hidden: int = 0  # tokens vLLM generates without showing them (one, for echo with max_tokens 0)

    @property
    def tokens(self) -> int:
        return len(self.ids) + self.hidden


def _stop(choice: Choice, plan: Plan) -> None:
    text = ""
    for k, (token_id, piece) in enumerate(zip(choice.ids, choice.pieces, strict=True)):
        if token_id in plan.stop_ids:
            choice.ids, choice.pieces = choice.ids[: k + 1], [*choice.pieces[:k], ""]
            choice.finish, choice.stop_reason = "stop", token_id
            return
        before, text = len(text), text + piece
        hits = [(at, s) for s in plan.stop if (at := text.find(s, max(0, before - len(s) + 1))) >= 0]
        if hits:
            at, s = min(hits)
            end = at + len(s) if plan.include_stop else at
            cut, start = [], 0
            for p in choice.pieces[: k + 1]:
                cut.append(text[start : max(start, min(start + len(p), end))])
                start += len(p)
            choice.ids, choice.pieces = choice.ids[: k + 1], cut
            choice.finish, choice.stop_reason = "stop", s
            return


def _ids(plan: Plan, cfg: EmulatorConfig, tokens: TokenModel, rng: random.Random) -> tuple[list[int], str]:
    limit = plan.max_tokens
    schema = plan.tool[1] if plan.tool else plan.schema
    if schema is not None:
        ids = tokens.encode(json.dumps(value_for(schema, rng)))
        if limit is not None and len(ids) > limit:
            return ids[:limit], "length"
        return ids, "tool_calls" if plan.tool_required else "stop"
    count = limit if limit is not None and plan.ignore_eos else min(cfg.output_tokens, limit or cfg.output_tokens)
    ids = []
    while len(ids) < count:
        ids.extend(rng.choice(tokens.words))
    return ids[:count], "length" if limit is not None and count >= limit else "stop"


def choices(plan: Plan, cfg: EmulatorConfig, tokens: TokenModel, rng: random.Random) -> list[Choice]:
    out = []
    width = max(plan.logprobs or 0, 1)
    for p in range(len(plan.prompts)):
        for j in range(plan.n):
            index = p * plan.n + j
            own = random.Random(f"{plan.seed}:{index}") if plan.seed is not None else random.Random(rng.random())
            if not plan.chat and plan.echo and plan.max_tokens == 0:
                out.append(Choice(index, p, [], [], "length", hidden=1))
                continue
            ids, finish = _ids(plan, cfg, tokens, own)
            choice = Choice(index, p, ids, [tokens.piece(i) for i in ids], finish)
            if plan.stop or plan.stop_ids:
                _stop(choice, plan)
            if plan.logprobs is not None:
                choice.steps = logprobs.steps(choice.ids, width, own, tokens.filler)
            if plan.tool:
                choice.tool_id = f"chatcmpl-tool-{own.getrandbits(128):032x}"
            out.append(choice)
    return out


def prompt_steps(plan: Plan, tokens: TokenModel) -> list[list[logprobs.Step | None]] | None:
    """Each prompt's logprobs (``None`` first), when vLLM computes them: ``prompt_logprobs`` asked, or ``echo``
    (with ``logprobs`` on completions; always on chat, where ``top_logprobs`` then sets the width). They depend on
    the prompt alone, as a model's would: the same prompt always scores the same, whatever the seed."""
    width = plan.prompt_logprobs
    if width is None and plan.echo:
        width = (plan.logprobs or 0) if plan.chat else plan.logprobs
    if width is None:
        return None
    out: list[list[logprobs.Step | None]] = []
    for ids in plan.prompts:
        own = random.Random("prompt:" + ",".join(map(str, ids)))
        out.append([None, *logprobs.steps(ids[1:], max(width, 1), own, tokens.filler)])
    return out
