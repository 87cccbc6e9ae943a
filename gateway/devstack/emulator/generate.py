"""The emulated model: what each choice says, token by token.

Text is filler words (``output_tokens`` of them unless ``max_tokens`` is smaller, or exactly ``max_tokens`` with
``ignore_eos``), or the oracle's answer when it knows the prompt (``oracle``: its text or its tool call, cut short
by ``max_tokens`` like any output, followed by filler with ``ignore_eos``). A tool call's arguments and
``response_format`` content are a JSON value built to satisfy the schema (see ``tools``), as long as it takes;
``max_tokens`` cuts either short (``finish_reason: "length"``, as a real model cut short would be). Stop strings and
stop token ids end a choice as in vLLM: the text stops before the stop string (or after it with
``include_stop_str_in_output``), ``finish_reason`` is ``"stop"`` and ``stop_reason`` the string or id; the token
that completed it is counted. Every choice is seeded by ``seed`` and its index, so it is reproducible.

Thinking (chat with ``--reasoning-tokens N``): the choice starts with N reasoning tokens of filler, then the answer.
They count against ``max_tokens``: the answer gets what is left (at most ``output_tokens``), none at all when the
thinking used it up (``finish_reason: "length"``). Stop strings and stop ids apply to the whole output, thinking
included, as in vLLM. With ``--think-in-content`` the tags are part of the token texts: ``<think>`` opens the first
reasoning token, ``</think>`` closes the last one and the answer's first token starts with a blank line
(``"\n\n"``), so a client reading the content sees ``<think>...</think>\n\nanswer``; a thinking cut short by
``max_tokens`` stays open, as a real model's would. The tags are not tokens of their own.
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

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


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
    reasoning: int = 0  # how many of ``ids``, from the start, are thinking

    @property
    def answered(self) -> bool:
        """Whether any answer token follows the thinking."""
        return len(self.ids) > self.reasoning

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


def _filler(count: int, tokens: TokenModel, rng: random.Random) -> list[int]:
    ids: list[int] = []
    while len(ids) < count:
        ids.extend(rng.choice(tokens.words))
    return ids[:count]


def _ids(
    plan: Plan, cfg: EmulatorConfig, tokens: TokenModel, rng: random.Random, limit: int | None, answer: str | None
) -> tuple[list[int], str]:
    """The answer's ids and finish reason, ``limit`` tokens at most (``max_tokens`` less the thinking)."""
    if limit == 0:
        return [], "length"
    if answer is not None:  # the oracle's (see ``oracle``): its text, or a tool call's arguments
        ids = tokens.encode(answer)
        if limit is not None and plan.ignore_eos and not plan.tool and len(ids) < limit:
            ids += _filler(limit - len(ids), tokens, rng)  # as a model told to ignore its end of text goes on
        if limit is not None and len(ids) >= limit:
            return ids[:limit], "length"
        return ids, "tool_calls" if plan.tool_required else "stop"
    schema = plan.tool[1] if plan.tool else plan.schema
    if schema is not None:
        ids = tokens.encode(json.dumps(value_for(schema, rng)))
        if limit is not None and len(ids) > limit:
            return ids[:limit], "length"
        return ids, "tool_calls" if plan.tool_required else "stop"
    count = limit if limit is not None and plan.ignore_eos else min(cfg.output_tokens, limit or cfg.output_tokens)
    return _filler(count, tokens, rng), "length" if limit is not None and count >= limit else "stop"


def _pieces(ids: list[int], tokens: TokenModel) -> list[str]:
    """Each token's text as a detokenizer streams it: a token that ends inside a character (byte-level BPE
    splits Chinese) sends nothing until the character is whole, so the pieces join to the decoded text."""
    pieces = [tokens.piece(i) for i in ids]
    whole = tokens.decode(ids)
    if "".join(pieces) == whole:
        return pieces
    out, sent = [], ""
    for k in range(len(ids)):
        text = tokens.decode(ids[: k + 1]) if k < len(ids) - 1 else whole
        if text.endswith("\ufffd") and k < len(ids) - 1:
            out.append("")
            continue
        out.append(text[len(sent) :])
        sent = text
    return out


def _think(choice: Choice, thought: list[int], plan: Plan, tokens: TokenModel) -> None:
    """Put the thinking before the answer (with ``<think>`` tags in the texts when there is no parser)."""
    answered = bool(choice.ids)
    choice.ids = [*thought, *choice.ids]
    choice.pieces = [*(tokens.piece(i) for i in thought), *choice.pieces]
    choice.reasoning = len(thought)
    if plan.think_tags and thought:
        r = len(thought)
        choice.pieces[0] = THINK_OPEN + choice.pieces[0]
        if answered:
            choice.pieces[r - 1] += THINK_CLOSE
            choice.pieces[r] = "\n\n" + choice.pieces[r]


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
            limit = plan.max_tokens
            thinking = plan.reasoning if limit is None else min(plan.reasoning, limit)
            # the answer is drawn first, so thinking does not change what a seeded choice answers
            answer = plan.answers[p] if plan.answers else None
            ids, finish = _ids(plan, cfg, tokens, own, None if limit is None else limit - thinking, answer)
            choice = Choice(index, p, ids, _pieces(ids, tokens) if answer else [tokens.piece(i) for i in ids], finish)
            if thinking:
                _think(choice, _filler(thinking, tokens, own), plan, tokens)
            if plan.stop or plan.stop_ids:
                _stop(choice, plan)
                choice.reasoning = min(choice.reasoning, len(choice.ids))
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
