"""What the emulator does with each request field: honour it, accept it as a no-op, or refuse it with vLLM's 400.

Honoured (changes the answer as in vLLM): ``model`` (absent means the served model, as in vLLM), ``messages``
(string or list-of-text-parts content), ``prompt`` (a string, a list of strings — one choice per prompt and ``n`` —
a list of token ids, or a list of token-id lists), ``n``, ``max_tokens``, ``max_completion_tokens``, ``stream``,
``stream_options.include_usage``, ``stop``, ``stop_token_ids``, ``include_stop_str_in_output``, ``ignore_eos``,
``seed``, ``logprobs``, ``top_logprobs``, ``prompt_logprobs``, ``echo``, ``tools``, ``tool_choice``,
``response_format`` (``text``, ``json_object``, ``json_schema``) and ``request_id`` (the response id). When the
emulator thinks (``--reasoning-tokens``), chat also honours ``chat_template_kwargs.enable_thinking: false`` and
``reasoning_effort: "none"`` (no thinking, as Qwen3's template), and with an emulated reasoning parser
``include_reasoning: false`` (no reasoning deltas, no logprobs, as vLLM hides them) and ``thinking_token_budget``
(at most that many reasoning tokens); otherwise these four are no-ops, and always on completions, which never think.

No-ops (sampling or scheduling knobs that do not change the answer's shape; their values are still checked as
vLLM checks them where it does): see ``NO_OPS``.

Refused with a 400 when set to anything but their default (they would change the answer in a way the emulator does
not produce): see ``REFUSED``. An unknown field is ignored, as vLLM's ``OpenAIBaseModel`` (``extra="allow"``) does —
including the ``guided_*`` fields vLLM 0.32 removed — and named in the ``x-emulator-ignored`` response header, so
it is not silent.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from gateway.devstack.emulator.config import MAX_LOGPROBS, MAX_N, MAX_PROMPTS, MAX_STOP_STRINGS, EmulatorConfig
from gateway.devstack.emulator.errors import VllmError, bad_request, invalid_type, model_not_found, unsupported
from gateway.devstack.emulator.tokens import OutOfVocabulary, TokenModel, chat_prompt, message_text
from gateway.devstack.emulator.tools import DEFAULT_OBJECT

HONOURED = frozenset(
    "model n max_tokens stream stream_options stop stop_token_ids include_stop_str_in_output ignore_eos seed "
    "logprobs prompt_logprobs echo response_format request_id".split()
)
CHAT_HONOURED = frozenset("messages max_completion_tokens top_logprobs tools tool_choice".split())
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
NO_OPS = frozenset(
    "temperature top_p top_k min_p presence_penalty frequency_penalty repetition_penalty logit_bias user min_tokens "
    "skip_special_tokens spaces_between_special_tokens add_special_tokens length_penalty priority cache_salt "
    "session_id vllm_xargs thinking_token_budget mm_processor_kwargs media_io_kwargs routed_experts_prompt_start "
    "return_token_offsets mm_payload return_mm_kwargs truncation_side parallel_tool_calls reasoning_effort "
    "include_reasoning add_generation_prompt continue_final_message documents chat_template chat_template_kwargs "
    "service_tier".split()
)
REFUSED = {  # field: its default values (anything else is refused)
    "use_beam_search": (None, False),
    "logprob_token_ids": (None, []),
    "allowed_token_ids": (None,),
    "bad_words": (None, []),
    "structured_outputs": (None,),
    "prompt_embeds": (None,),
    "suffix": (None,),
    "truncate_prompt_tokens": (None,),
    "return_tokens_as_token_ids": (None, False),
    "return_token_ids": (None, False),
    "return_prompt_text": (None, False),
    "repetition_detection": (None,),
    "stream_interval": (None, 1),
    "watermarking": (None, False),
    "kv_transfer_params": (None,),
    "ec_transfer_params": (None,),
}
CORRECT_TOOL_CHOICE = 'Correct usage: `{"type": "function", "function": {"name": "my_function"}}`'


@dataclass(slots=True)
class Plan:
    """A validated request: what to answer, in vLLM's terms."""

    chat: bool
    prompts: list[list[int]]
    texts: list[str]
    n: int = 1
    max_tokens: int | None = None
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False  # stream_options.continuous_usage_stats (with include_usage): usage on every chunk
    logprobs: int | None = None  # chat: top_logprobs when logprobs is true; completions: logprobs
    prompt_logprobs: int | None = None
    echo: bool = False
    echo_text: str = ""  # chat echo: the last message's content when it is the assistant's
    stop: list[str] = field(default_factory=list)
    stop_ids: frozenset[int] = frozenset()
    include_stop: bool = False
    ignore_eos: bool = False
    tool: tuple[str, Any] | None = None  # (function name, its parameters schema)
    tool_required: bool = False  # "required" (finish_reason tool_calls) rather than a named function (stop)
    schema: dict[str, Any] | None = None  # response_format's schema
    seed: int | None = None
    request_id: str | None = None
    ignored: list[str] = field(default_factory=list)
    # Thinking (chat only): reasoning tokens before the answer, counted against max_tokens (0: no thinking).
    reasoning: int = 0
    parser: bool = False  # an emulated reasoning parser: reasoning in its own field, usage's reasoning_tokens
    reasoning_field: str = "reasoning"
    show_reasoning: bool = True  # include_reasoning (false hides reasoning deltas and logprobs, as vLLM)
    think_tags: bool = False  # no parser: the thinking goes in the content, between <think> tags
    answers: list[str | None] = field(default_factory=list)  # the oracle's, per prompt (None: filler as usual)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


def _int(body: dict[str, Any], name: str, default: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid_type(name, "int_type", "Input should be a valid integer", value)
    return value


def _number(body: dict[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid_type(name, "float_type", "Input should be a valid number", value)
    return float(value)


def _sampling(body: dict[str, Any]) -> None:
    """The no-op knobs' checks, as vLLM's ``SamplingParams`` makes them (then ignored: filler is filler)."""
    temperature = _number(body, "temperature")
    if temperature is not None and temperature < 0:
        raise bad_request(f"temperature must be non-negative, got {temperature}.", "temperature", temperature)
    if temperature is not None and temperature > 2:
        raise bad_request(f"temperature must be in [0, 2], got {temperature}.", "temperature", temperature)
    top_p = _number(body, "top_p")
    if top_p is not None and not 0 < top_p <= 1:
        raise bad_request(f"top_p must be in (0, 1], got {top_p}.", "top_p", top_p)
    for name in ("presence_penalty", "frequency_penalty"):
        value = _number(body, name)
        if value is not None and not -2 <= value <= 2:
            raise bad_request(f"{name} must be in [-2, 2], got {value}.")


def _logprobs(body: dict[str, Any], chat: bool, vocab: int) -> tuple[int | None, int | None]:
    """vLLM's ``check_logprobs`` validator, then its ``--max-logprobs`` (20) limit."""
    names = ("prompt_logprobs", "top_logprobs") if chat else ("prompt_logprobs", "logprobs")
    for name in names:
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise bad_request(f"`{name}` must be an integer.", name, value)
    prompt = body.get("prompt_logprobs")
    if prompt is not None:
        if body.get("stream") and (prompt > 0 or prompt == -1):
            raise bad_request("`prompt_logprobs` are not available when `stream=True`.", "prompt_logprobs")
        if prompt < 0 and prompt != -1:
            raise bad_request("`prompt_logprobs` must be a positive value or -1.", "prompt_logprobs", prompt)
    if chat:
        wanted = body.get("logprobs")
        if wanted is not None and not isinstance(wanted, bool) and wanted not in (0, 1):
            raise invalid_type("logprobs", "bool_parsing", "Input should be a valid boolean", wanted)
        top = body.get("top_logprobs")
        if top is not None and top < 0 and top != -1:
            raise bad_request("`top_logprobs` must be a positive value or -1.", "top_logprobs", top)
        if top is not None and (top == -1 or top > 0) and not wanted:
            raise bad_request("when using `top_logprobs`, `logprobs` must be set to true.", "top_logprobs")
        sample = int(top or 0) if wanted else None
    else:
        value = body.get("logprobs")
        if value is not None and value < 0 and value != -1:
            raise bad_request("`logprobs` must be a positive value or -1.", "logprobs", value)
        sample = None if value is None else int(value)
    for name, asked in (("logprobs", sample), ("prompt_logprobs", prompt)):
        count = vocab if asked == -1 else asked
        if count is not None and count > MAX_LOGPROBS:
            kind = "sample" if name == "logprobs" else "prompt"
            raise bad_request(
                f"Requested {kind} logprobs of {count}, which is greater than max allowed: {MAX_LOGPROBS}", name, count
            )
    return sample, None if prompt is None else int(prompt)


def _tools(body: dict[str, Any], plan: Plan, rng: random.Random) -> None:
    """vLLM's ``check_tool_usage`` validator, word for word; then which function the answer calls."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools == []:
        raise bad_request(
            "`tools` must not be an empty array. Either provide at least one tool or omit the field entirely.", "tools"
        )
    if tools is not None and (
        not isinstance(tools, list)
        or not all(isinstance(t, dict) and isinstance(t.get("function"), dict) for t in tools)
        or not all(isinstance(t["function"].get("name"), str) for t in tools)
    ):
        raise invalid_type("tools", "model_type", "Input should be a list of function tools", tools)
    if choice is None:
        choice = "auto" if tools else "none"
    if choice == "none":
        return
    if not tools:
        raise bad_request("When using `tool_choice`, `tools` must be set.", "tool_choice")
    if choice not in ("auto", "required") and not isinstance(choice, dict):
        raise bad_request(
            f'Invalid value for `tool_choice`: {choice}! Only named tools, "none", "auto" or "required" are supported.',
            "tool_choice",
        )
    functions = {t["function"]["name"]: t["function"].get("parameters") or {} for t in tools}
    if isinstance(choice, dict):
        function = choice.get("function")
        if not isinstance(function, dict):
            raise bad_request(
                f"Invalid value for `function`: `{function}` in `tool_choice`! {CORRECT_TOOL_CHOICE}",
                "tool_choice.function",
            )
        if "name" not in function:
            raise bad_request(
                f"Expected field `name` in `function` in `tool_choice`! {CORRECT_TOOL_CHOICE}",
                "tool_choice.function.name",
            )
        name = function["name"]
        if not isinstance(name, str) or not name:
            raise bad_request(
                f"Invalid `name` in `function`: `{name}` in `tool_choice`! {CORRECT_TOOL_CHOICE}",
                "tool_choice.function.name",
            )
        if name not in functions:
            raise bad_request(
                "The tool specified in `tool_choice` does not match any of the specified `tools`", "tool_choice"
            )
        plan.tool = (name, functions[name])
    elif choice == "required":
        name = rng.choice(sorted(functions))
        plan.tool, plan.tool_required = (name, functions[name]), True
    # "auto": the emulated model answers with text (as vLLM with --enable-auto-tool-choice does when the model
    # calls no tool); vLLM without that flag refuses "auto" instead.


def _reasoning(body: dict[str, Any], plan: Plan, cfg: EmulatorConfig) -> None:
    """How long this chat request thinks: ``cfg.reasoning_tokens``, unless the request turns thinking off
    (``enable_thinking: false``, or ``reasoning_effort: "none"`` without it, as vLLM passes it to the template) or
    caps it (``thinking_token_budget``, which vLLM honours only with a reasoning parser)."""
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise invalid_type("chat_template_kwargs", "dict_type", "Input should be a valid dictionary", kwargs)
    effort = body.get("reasoning_effort")
    if effort is not None and effort not in REASONING_EFFORTS:
        allowed = ", ".join(f"'{e}'" for e in REASONING_EFFORTS[:-1]) + f" or '{REASONING_EFFORTS[-1]}'"
        raise invalid_type("reasoning_effort", "literal_error", f"Input should be {allowed}", effort)
    include = body.get("include_reasoning")
    if include is not None and not isinstance(include, bool):
        raise invalid_type("include_reasoning", "bool_type", "Input should be a valid boolean", include)
    budget = body.get("thinking_token_budget")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < -1):
        raise invalid_type(
            "thinking_token_budget",
            "value_error",
            "Value error, `thinking_token_budget` must be a non-negative integer or -1 for unlimited.",
            budget,
        )
    thinking = (kwargs or {}).get("enable_thinking")
    if thinking is None and effort is not None:
        thinking = effort != "none"
    plan.parser = cfg.reasoning_parser
    plan.reasoning_field = cfg.reasoning_field
    plan.show_reasoning = include is not False or not plan.parser
    count = 0 if thinking is False else cfg.reasoning_tokens
    if plan.parser and budget is not None and budget >= 0:
        count = min(count, budget)
    if not plan.parser and (plan.tool or plan.schema is not None):
        count = 0  # without a reasoning parser vLLM constrains the output from its first token: no room to think
    plan.reasoning = count
    plan.think_tags = cfg.think_in_content and count > 0
    if not plan.show_reasoning:
        plan.logprobs = None


def _response_format(body: dict[str, Any]) -> dict[str, Any] | None:
    fmt = body.get("response_format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if spec is None:
            raise bad_request(
                "When response_format type is 'json_schema', the 'json_schema' field must be provided.",
                "response_format",
            )
        schema = spec.get("schema") if isinstance(spec, dict) else None
        return schema if isinstance(schema, dict) else {}
    if kind == "json_object":
        return DEFAULT_OBJECT
    if kind == "text":
        return None
    if kind in ("structural_tag",):
        raise unsupported("response_format", "of type structural_tag")
    raise invalid_type(
        "response_format.type", "literal_error", "Input should be 'text', 'json_object' or 'json_schema'", kind
    )


def _stop(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid_type("stop", "list_type", "Input should be a valid list", stop)
    if len(stops) > MAX_STOP_STRINGS:
        raise invalid_type(
            "stop", "too_long", f"List should have at most {MAX_STOP_STRINGS} items after validation", stop
        )
    if any(not s for s in stops):
        raise bad_request("stop cannot contain an empty string.")
    return stops


def _prompts(body: dict[str, Any], chat: bool, tokens: TokenModel) -> tuple[list[list[int]], list[str]]:
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise invalid_type("messages", "list_type", "Input should be a valid list", messages)
        for m in messages:
            content = m.get("content")
            if isinstance(content, list):
                for part in content:
                    if not isinstance(part, dict) or part.get("type") != "text":
                        kind = part.get("type") if isinstance(part, dict) else part
                        raise unsupported("messages", f"content of type {kind} (the emulated model reads only text)")
        text = chat_prompt(messages)
        return [tokens.encode(text)], [text]
    prompt = body.get("prompt")
    if prompt is None or prompt == "" or prompt == []:
        raise bad_request("Either prompt or prompt_embeds must be provided and non-empty.", "prompt")
    special = body.get("add_special_tokens", True) is not False
    if isinstance(prompt, str):
        return [tokens.encode(prompt, special)], [prompt]
    if not isinstance(prompt, list):
        raise invalid_type("prompt", "string_type", "Input should be a valid string", prompt)
    if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        prompt = [prompt]
    elif len(prompt) > MAX_PROMPTS:
        raise bad_request(
            f"prompt list length {len(prompt)} exceeds the maximum allowed count of {MAX_PROMPTS}. To increase this "
            "limit, set the VLLM_MAX_COMPLETION_PROMPTS environment variable.",
            "prompt",
        )
    ids, texts = [], []
    for p in prompt:
        if isinstance(p, str):
            ids.append(tokens.encode(p, special))
            texts.append(p)
        elif isinstance(p, list) and p and all(isinstance(i, int) and not isinstance(i, bool) for i in p):
            try:
                texts.append(tokens.decode(p))
            except OutOfVocabulary as err:
                raise bad_request(str(err), "prompt") from None
            ids.append(list(p))
        else:
            raise invalid_type("prompt", "list_type", "Input should be a string or a list of token ids", p)
    return ids, texts


def plan(body: Any, chat: bool, cfg: EmulatorConfig, tokens: TokenModel, rng: random.Random) -> Plan:
    """Check ``body`` in vLLM's order (its protocol validators, the model, the context, its sampling checks)."""
    if not isinstance(body, dict):
        raise invalid_type("", "model_attributes_type", "Input should be a valid dictionary or object", body)
    known = HONOURED | NO_OPS | REFUSED.keys() | (CHAT_HONOURED if chat else {"prompt"})
    for name, defaults in REFUSED.items():
        if name in body and body[name] not in defaults:
            raise unsupported(name)
    if body.get("stream_options") and not body.get("stream"):
        raise bad_request("Stream options can only be defined when `stream=True`.", "stream_options")
    opts = body.get("stream_options") or {}
    sample, prompt_logprobs = _logprobs(body, chat, tokens.size())
    p = Plan(chat=chat, prompts=[], texts=[], logprobs=sample, prompt_logprobs=prompt_logprobs)
    p.schema = _response_format(body)
    p.stop = _stop(body)
    if chat:
        _tools(body, p, rng)
        _reasoning(body, p, cfg)
    p.echo = bool(body.get("echo"))
    model = body.get("model")
    if model is not None and model != cfg.model:
        raise model_not_found(model, cfg.model)
    p.prompts, p.texts = _prompts(body, chat, tokens)
    if chat and p.echo:
        last = body["messages"][-1] if body["messages"] else {}
        p.echo_text = message_text(last.get("content")) if last.get("role") == "assistant" else ""
    n = _int(body, "n", 1)
    assert n is not None
    if n < 1:
        raise bad_request(f"n must be at least 1, got {n}.")
    if n > MAX_N:
        raise bad_request(
            f"n must be at most {MAX_N}, got {n}. To increase this limit, set the VLLM_MAX_N_SEQUENCES environment "
            "variable."
        )
    p.n = n
    max_tokens = _int(body, "max_completion_tokens") if chat else None
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens")
    zero_ok = not chat and p.echo and max_tokens == 0  # lm-eval's loglikelihood: the prompt's logprobs only
    if max_tokens is not None and max_tokens < 1 and not zero_ok:
        raise bad_request(f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens", max_tokens)
    p.max_tokens = max_tokens
    for ids in p.prompts:
        wanted = len(ids) + (max_tokens or 1)
        if wanted > cfg.max_model_len:
            raise VllmError(
                400,
                f"This model's maximum context length is {cfg.max_model_len} tokens. However, you requested "
                f"{wanted} tokens ({len(ids)} in the messages, {max_tokens or 1} in the completion). Please reduce "
                "the length of the messages or completion.",
            )
    _sampling(body)
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(isinstance(i, int) for i in stop_ids):
        raise bad_request(f"stop_token_ids must contain only integers, got {stop_ids}.")
    p.stop_ids = frozenset(stop_ids)
    p.include_stop = bool(body.get("include_stop_str_in_output"))
    p.ignore_eos = bool(body.get("ignore_eos"))
    p.stream = bool(body.get("stream"))
    p.include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
    p.continuous_usage = p.include_usage and bool(isinstance(opts, dict) and opts.get("continuous_usage_stats"))
    seed = body.get("seed")
    p.seed = seed if isinstance(seed, int) else None
    request_id = body.get("request_id")
    p.request_id = request_id if isinstance(request_id, str) and request_id else None
    p.ignored = sorted(k for k in body if k not in known)
    return p
