"""vLLM 0.32's answer shapes: the whole body, and each streamed chunk's choice.

Chunks are built by string concatenation rather than ``json.dumps`` of a dict: the emulator is the fast backend of
load tests, and a token chunk is its hot path (JSON-encoding the token text is the only per-chunk encoding done for
a plain stream). The field order and presence follow vLLM's ``model_dump_json(exclude_unset=True)``.

Thinking, with an emulated reasoning parser: each reasoning token is a chunk whose delta is ``{"reasoning": text}``
(or ``reasoning_content``), the message carries the whole thinking in that field and ``content`` is ``null`` when
no answer followed; every chat usage has ``completion_tokens_details.reasoning_tokens``, as vLLM's has whenever it
runs a parser. Without one (``--think-in-content``) the thinking is ordinary content (tags in it, see ``generate``).
"""

from __future__ import annotations

import json
from typing import Any

from gateway.devstack.emulator import logprobs
from gateway.devstack.emulator.generate import Choice
from gateway.devstack.emulator.params import Plan
from gateway.devstack.emulator.tokens import TokenModel

Prompts = list[list[logprobs.Step | None]] | None


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def usage(plan: Plan, choices: list[Choice]) -> dict[str, Any]:
    """vLLM counts each prompt once (``n`` does not multiply it) and sums completion tokens over the choices,
    thinking included; with a reasoning parser it details the thinking's share (0 when the request did not think)."""
    completion = sum(c.tokens for c in choices)
    out: dict[str, Any] = {
        "prompt_tokens": plan.prompt_tokens,
        "total_tokens": plan.prompt_tokens + completion,
        "completion_tokens": completion,
    }
    if plan.parser:
        out["completion_tokens_details"] = {"reasoning_tokens": sum(c.reasoning for c in choices)}
    return out


def _tool_call(choice: Choice, plan: Plan, arguments: str) -> dict[str, Any]:
    assert plan.tool is not None
    return {"id": choice.tool_id, "type": "function", "function": {"name": plan.tool[0], "arguments": arguments}}


def _completion_logprobs(plan: Plan, c: Choice, tokens: TokenModel, prompts: Prompts) -> dict[str, Any] | None:
    if plan.logprobs is None:
        return None
    taken: list[logprobs.Step | None] = list(c.steps or [])
    ids = c.ids
    if plan.echo and prompts is not None:
        taken, ids = [*prompts[c.prompt], *taken], [*plan.prompts[c.prompt], *ids]
    return logprobs.completion(tokens, taken, ids)


def body(plan: Plan, choices: list[Choice], tokens: TokenModel, prompts: Prompts) -> dict[str, Any]:
    """The non-streamed answer's ``choices`` and vLLM's extra top-level fields (``id`` etc. are added by the app)."""
    out: list[dict[str, Any]] = []
    for c in choices:
        text = "".join(c.pieces)
        if plan.chat:
            thought = None
            if plan.parser:
                thought = "".join(c.pieces[: c.reasoning]) if c.reasoning and plan.show_reasoning else None
                text = "".join(c.pieces[c.reasoning :])
            content = None if plan.parser and not c.answered and not plan.echo else plan.echo_text + text
            message: dict[str, Any] = {"role": "assistant", "content": content}
            message.update(refusal=None, annotations=None, audio=None, function_call=None)
            if plan.tool:
                message["content"] = plan.echo_text
                if c.answered:
                    message["tool_calls"] = [_tool_call(c, plan, text)]
            message[plan.reasoning_field if plan.parser else "reasoning"] = thought
            lp = None if c.steps is None else {"content": logprobs.chat_entries(tokens, c.steps, plan.logprobs or 0)}
            out.append(
                {"index": c.index, "message": message, "logprobs": lp, "finish_reason": c.finish}
                | {"stop_reason": c.stop_reason, "token_ids": None}
            )
        else:
            shown = plan.texts[c.prompt] + text if plan.echo else text
            out.append(
                {"index": c.index, "text": shown, "logprobs": _completion_logprobs(plan, c, tokens, prompts)}
                | {"finish_reason": c.finish, "stop_reason": c.stop_reason, "token_ids": None}
                | {"prompt_logprobs": None if prompts is None else logprobs.prompt_entries(tokens, prompts[c.prompt])}
                | {"prompt_token_ids": None}
            )
    extra: dict[str, Any] = {}
    if plan.chat:
        extra = {"prompt_logprobs": None if prompts is None else logprobs.prompt_entries(tokens, prompts[0])}
    return {"choices": out, **extra}


def stream(plan: Plan, c: Choice, tokens: TokenModel, prompts: Prompts) -> list[str]:
    """One choice's chunks, as the JSON of its ``choices[0]`` object: one per token (the last carries the finish
    reason); echo puts the prompt in the first one, as vLLM does."""
    out = []
    count = len(c.ids)
    offset = 0
    head = f'{{"index":{c.index},'
    for k in range(max(count, 1)):
        last = k >= count - 1
        text = c.pieces[k] if k < count else ""
        ids = c.ids[k : k + 1]
        taken: list[logprobs.Step | None] = [*(c.steps or [])[k : k + 1]]
        if k == 0 and plan.echo and not plan.chat:
            text = plan.texts[c.prompt] + text
            ids = [*plan.prompts[c.prompt], *ids]
            taken = [*(prompts[c.prompt] if prompts else []), *taken]
        finish = f'"{c.finish}",' + '"stop_reason":' + _json(c.stop_reason) if last else "null"
        if plan.chat:
            if k < c.reasoning and plan.parser:
                if not plan.show_reasoning and not last:
                    out.append("")  # vLLM sends no chunk for a hidden reasoning token (the step still takes its time)
                    continue
                delta = "{}" if not plan.show_reasoning else f'{{"{plan.reasoning_field}":{_json(text)}}}'
            elif plan.tool:
                call = {"index": 0, "function": {"arguments": text}}
                if k == c.reasoning:
                    call = {"id": c.tool_id, "type": "function", "index": 0}
                    call["function"] = {"name": plan.tool[0], "arguments": text}
                delta = _json({"tool_calls": [call]})
            else:
                delta = '{"content":' + _json(text) + "}"
            lp = (
                "null"
                if c.steps is None
                else _json({"content": logprobs.chat_entries(tokens, [s for s in taken if s], plan.logprobs or 0)})
            )
            out.append(f'{head}"delta":{delta},"logprobs":{lp},"finish_reason":{finish},"token_ids":null}}')
        else:
            lp = "null"
            if plan.logprobs is not None:
                fragment = logprobs.completion(tokens, taken, ids, offset)
                offset = fragment["text_offset"][-1] + len(fragment["tokens"][-1]) if ids else offset
                lp = _json(fragment)
            tail = "" if last else ',"stop_reason":null'
            out.append(f'{head}"text":{_json(text)},"logprobs":{lp},"finish_reason":{finish}{tail},"token_ids":null}}')
    return out
