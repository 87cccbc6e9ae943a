"""A vLLM emulator: vLLM's OpenAI API subset with configurable timing and failures, and no model at all.

It is the test double and the fast backend for load and overhead tests. It is always labelled as what it is:
``owned_by: "vllm-emulator"`` in ``/v1/models``, an ``x-emulator`` header on every response, and its text is
filler words, not the output of any model. Token counts are estimates (about four characters a token).

Shapes follow vLLM's OpenAI server: a role-only first chunk (``"delta": {"role": "assistant", "content": ""}``),
one chunk per token, a final chunk with ``finish_reason``, the usage-only chunk (``"choices": []``) when
``stream_options.include_usage`` is true, then ``data: [DONE]``; errors as ``{"error": {message, type, param,
code}}``; ``/metrics`` with vLLM's own metric names.

Timing: TTFT and ITL are scheduled against the request's start (no drift), scaled by a simple load model
(``running / batch_size`` once more requests run than fit in a batch), with optional seeded jitter.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway.metrics import VLLM_E2E_BUCKETS, VLLM_ITL_BUCKETS, VLLM_TTFT_BUCKETS
from gateway.relay.asgi import race_disconnect

EMULATOR = "vllm-emulator"
WORDS = tuple(
    (
        "the model answers with filler text because this server is an emulator and not a language model at all "
        "latency tokens stream one by one while the gateway measures time to first token inter token latency "
        "and cost per million output tokens for a side by side comparison on identical prompts"
    ).split(" ")
)


@dataclass(slots=True)
class EmulatorConfig:
    model: str
    ttft_ms: float = 200.0
    itl_ms: float = 20.0
    output_tokens: int = 64
    jitter: float = 0.0  # each delay is multiplied by a factor drawn uniformly from [1 - jitter, 1 + jitter]
    seed: int = 0
    batch_size: int = 64
    max_model_len: int = 4096
    fail_rate: float = 0.0  # fraction of requests answered with a 500 before any byte
    stream_error_rate: float = 0.0  # fraction of streams that send an error event half-way
    drop_rate: float = 0.0  # fraction of streams cut off half-way, without [DONE]


class VllmError(Exception):
    def __init__(self, status: int, message: str, type_: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}


class EngineMetrics:
    def __init__(self, registry: CollectorRegistry, model: str) -> None:
        labels = ("model_name", "engine")
        lv = (model, "0")

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=registry)

        self.running = Gauge("vllm:num_requests_running", "Requests running.", labels, registry=registry).labels(*lv)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting.", labels, registry=registry).labels(*lv)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage, 0-1.", labels, registry=registry).labels(*lv)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefill tokens.", labels, registry=registry).labels(*lv)
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Generation tokens.", labels, registry=registry
        ).labels(*lv)
        self.success = Counter(
            "vllm:request_success", "Finished requests.", (*labels, "finished_reason"), registry=registry
        )
        for reason in ("stop", "length", "abort"):
            self.success.labels(*lv, reason)
        self.preemptions = Counter("vllm:num_preemptions", "Preemptions.", labels, registry=registry).labels(*lv)
        self.prefix_queries = Counter(
            "vllm:prefix_cache_queries", "Prefix-cache queries (tokens).", labels, registry=registry
        ).labels(*lv)
        self.prefix_hits = Counter(
            "vllm:prefix_cache_hits", "Prefix-cache hits (tokens).", labels, registry=registry
        ).labels(*lv)
        self.ttft = hist("vllm:time_to_first_token_seconds", "TTFT.", VLLM_TTFT_BUCKETS).labels(*lv)
        self.itl = hist("vllm:inter_token_latency_seconds", "ITL.", VLLM_ITL_BUCKETS).labels(*lv)
        self.tpot = hist("vllm:request_time_per_output_token_seconds", "TPOT.", VLLM_ITL_BUCKETS).labels(*lv)
        self.e2e = hist("vllm:e2e_request_latency_seconds", "E2E.", VLLM_E2E_BUCKETS).labels(*lv)
        self.queue = hist("vllm:request_queue_time_seconds", "Queue time.", VLLM_E2E_BUCKETS).labels(*lv)
        self.prefill = hist("vllm:request_prefill_time_seconds", "Prefill.", VLLM_E2E_BUCKETS).labels(*lv)
        self.decode = hist("vllm:request_decode_time_seconds", "Decode.", VLLM_E2E_BUCKETS).labels(*lv)
        self.inference = hist("vllm:request_inference_time_seconds", "Inference.", VLLM_E2E_BUCKETS).labels(*lv)
        self.req_prompt = hist(
            "vllm:request_prompt_tokens",
            "Prompt tokens per request.",
            (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
        ).labels(*lv)
        self.req_generation = hist(
            "vllm:request_generation_tokens",
            "Generated tokens per request.",
            (1, 2, 5, 10, 20, 50, 100, 200, 500),
        ).labels(*lv)


def estimate_tokens(value: Any) -> int:
    """A rough token count of a prompt or message list: about four characters a token, at least one."""
    if isinstance(value, str):
        return max(1, (len(value) + 3) // 4)
    if isinstance(value, list):
        return sum(estimate_tokens(v) if not isinstance(v, int) else 1 for v in value) + (
            4 * len(value) if value and isinstance(value[0], dict) else 0
        )
    if isinstance(value, dict):
        return estimate_tokens(value.get("content") or "")
    return 1


class Emulator:
    def __init__(self, config: EmulatorConfig, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = EngineMetrics(self.registry, config.model)
        self.rng = random.Random(config.seed)
        self.running = 0
        self.created = int(time.time())

    # -- timing ------------------------------------------------------------------------------------------
    def _factor(self) -> float:
        load = max(1.0, self.running / self.config.batch_size)
        j = self.config.jitter
        return load * (self.rng.uniform(1 - j, 1 + j) if j else 1.0)

    # -- request handling -------------------------------------------------------------------------------
    def _validate(self, body: Any, chat: bool) -> tuple[int, int, dict[str, Any]]:
        if not isinstance(body, dict):
            raise VllmError(400, "request body must be a JSON object")
        if body.get("model") != self.config.model:
            raise VllmError(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError", "model")
        prompt = body.get("messages") if chat else body.get("prompt")
        if prompt is None:
            raise VllmError(400, f"Field required: {'messages' if chat else 'prompt'}")
        temperature = body.get("temperature")
        if temperature is not None and (not isinstance(temperature, int | float) or temperature < 0):
            raise VllmError(400, f"temperature must be non-negative, got {temperature}.", param="temperature")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise VllmError(400, f"max_tokens must be at least 1, got {max_tokens}.", param="max_tokens")
        prompt_tokens = estimate_tokens(prompt)
        limit = self.config.max_model_len
        if prompt_tokens + (max_tokens or 1) > limit:
            raise VllmError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_tokens + (max_tokens or 1)} tokens ({prompt_tokens} in the messages, "
                f"{max_tokens or 1} in the completion). Please reduce the length of the messages or completion.",
            )
        if body.get("ignore_eos") and max_tokens:
            n = max_tokens
        else:
            n = min(self.config.output_tokens, max_tokens or self.config.output_tokens)
        return prompt_tokens, n, body

    def _tokens(self, n: int, seed: Any) -> list[str]:
        rng = random.Random(seed if isinstance(seed, int) else self.rng.random())
        return [" " + rng.choice(WORDS) for _ in range(n)]

    async def handle(self, request: Request, chat: bool) -> Response:
        start = time.perf_counter()
        try:
            raw = await request.body()
            try:
                body = json.loads(raw)
            except ValueError:
                raise VllmError(400, "Invalid JSON body") from None
            prompt_tokens, n, body = self._validate(body, chat)
            if self.config.fail_rate and self.rng.random() < self.config.fail_rate:
                raise VllmError(500, "injected failure (emulator fail_rate)", "InternalServerError")
        except VllmError as err:
            return JSONResponse(err.body(), status_code=err.status, headers={"x-emulator": EMULATOR})
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        finish = "length" if max_tokens is not None and n >= max_tokens else "stop"
        tokens = self._tokens(n, body.get("seed"))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        headers = {"x-emulator": EMULATOR, "x-request-id": request.headers.get("x-request-id", rid)}
        if body.get("stream"):
            opts = body.get("stream_options") or {}
            usage = bool(opts.get("include_usage")) if isinstance(opts, dict) else False
            stream = self._stream(rid, chat, tokens, prompt_tokens, finish, usage, start)
            return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
        self.running += 1
        self.metrics.running.set(self.running)
        try:
            factor = self._factor()
            total = (self.config.ttft_ms + self.config.itl_ms * max(0, n - 1)) * factor / 1000
            # like vLLM, abort the generation as soon as the client goes away
            gone, _ = await race_disconnect(
                lambda: asyncio.sleep(max(0.0, start + total - time.perf_counter())), request.receive
            )
        finally:
            self.running -= 1
            self.metrics.running.set(self.running)
        if gone:
            self._finished("abort", start, None, 0, prompt_tokens)
            return Response(status_code=499)
        self._finished(finish, start, start + self.config.ttft_ms * factor / 1000, n, prompt_tokens)
        text = "".join(tokens)
        usage_obj = {
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens + n,
            "completion_tokens": n,
        }
        choice: dict[str, Any]
        if chat:
            choice = {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": text,
                    "tool_calls": [],
                    "reasoning_content": None,
                },
                "logprobs": None,
                "finish_reason": finish,
                "stop_reason": None,
            }
        else:
            choice = {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": finish,
                "stop_reason": None,
            }
        payload = {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.config.model,
            "choices": [choice],
            "usage": usage_obj,
            "system_fingerprint": EMULATOR,
        }
        return JSONResponse(payload, headers=headers)

    def _finished(self, reason: str, start: float, first: float | None, n: int, prompt_tokens: int) -> None:
        """Engine accounting as vLLM 0.32 does it: tokens always; an aborted request (the client left) is not a
        success of any kind and has no E2E (see docs/vllm-cpu-facts.md), only the tokens it made so far."""
        m = self.metrics
        m.prompt_tokens.inc(prompt_tokens)
        m.generation_tokens.inc(n)
        m.prefix_queries.inc(prompt_tokens)
        if reason == "abort":
            return
        now = time.perf_counter()
        m.success.labels(self.config.model, "0", reason).inc()
        m.e2e.observe(now - start)
        m.queue.observe(0.0)
        m.req_prompt.observe(prompt_tokens)
        m.req_generation.observe(n)
        if first is not None:
            m.prefill.observe(first - start)
            m.decode.observe(now - first)
            m.inference.observe(now - start)
            if n > 1:
                m.tpot.observe((now - first) / (n - 1))

    async def _stream(
        self,
        rid: str,
        chat: bool,
        tokens: list[str],
        prompt_tokens: int,
        finish: str,
        include_usage: bool,
        start: float,
    ) -> AsyncIterator[bytes]:
        cfg, m = self.config, self.metrics
        kind = "chat.completion.chunk" if chat else "text_completion"
        head = f'data: {{"id":"{rid}","object":"{kind}","created":{int(time.time())},"model":{json.dumps(cfg.model)},'
        # vLLM 0.32's shapes: a token chunk is before + the JSON-encoded token + after; the last token's chunk
        # carries the finish reason (and the system fingerprint when no usage chunk follows).
        fingerprint = f',"system_fingerprint":"{EMULATOR}"'
        if chat:
            before = head + '"choices":[{"index":0,"delta":{"content":'
            after = '},"logprobs":null,"finish_reason":null,"token_ids":null}]}\n\n'
            after_last = '},"logprobs":null,"finish_reason":"%s","stop_reason":null,"token_ids":null}]'
        else:
            before = head + '"choices":[{"index":0,"text":'
            after = ',"logprobs":null,"finish_reason":null,"stop_reason":null,"token_ids":null}]}\n\n'
            after_last = ',"logprobs":null,"finish_reason":"%s","stop_reason":null,"token_ids":null}]'
        after_last = after_last % finish + ("" if include_usage else fingerprint) + "}\n\n"
        n = len(tokens)
        self.running += 1
        m.running.set(self.running)
        first: float | None = None
        sent = 0
        reason = "abort"
        break_at = n // 2 if n > 1 else None
        drop = cfg.drop_rate and self.rng.random() < cfg.drop_rate
        error = cfg.stream_error_rate and self.rng.random() < cfg.stream_error_rate
        try:
            if chat:
                yield (
                    head + '"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
                    '"finish_reason":null}],"prompt_token_ids":null,"prompt_text":null}\n\n'
                ).encode()
            due = start
            prev = None
            for i, token in enumerate(tokens):
                due += (cfg.ttft_ms if i == 0 else cfg.itl_ms) * self._factor() / 1000
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if i == break_at and drop:
                    raise ConnectionAbortedError("injected mid-stream drop (emulator drop_rate)")
                if i == break_at and error:
                    err = VllmError(500, "injected in-stream error (emulator stream_error_rate)", "InternalServerError")
                    yield b"data: " + json.dumps(err.body()).encode() + b"\n\n" + b"data: [DONE]\n\n"
                    reason = "error"
                    return
                now = time.perf_counter()
                if first is None:
                    first = now
                    m.ttft.observe(now - start)
                elif prev is not None:
                    m.itl.observe(now - prev)
                prev = now
                sent = i + 1
                yield (before + json.dumps(token) + (after_last if sent == n else after)).encode()
            if include_usage:
                usage = json.dumps(
                    {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + n, "completion_tokens": n},
                    separators=(",", ":"),
                )
                yield (head + '"choices":[],"usage":' + usage + fingerprint + "}\n\n").encode()
            yield b"data: [DONE]\n\n"
            reason = finish
        finally:
            self.running -= 1
            m.running.set(self.running)
            if reason != "error":
                self._finished(reason, start, first, sent, prompt_tokens)


def create_emulator_app(config: EmulatorConfig, registry: CollectorRegistry | None = None) -> Starlette:
    emu = Emulator(config, registry)

    async def chat(request: Request) -> Response:
        return await emu.handle(request, chat=True)

    async def completions(request: Request) -> Response:
        return await emu.handle(request, chat=False)

    async def models(request: Request) -> Response:
        card = {
            "id": config.model,
            "object": "model",
            "created": emu.created,
            "owned_by": EMULATOR,
            "root": config.model,
            "parent": None,
            "max_model_len": config.max_model_len,
        }
        return JSONResponse({"object": "list", "data": [card]}, headers={"x-emulator": EMULATOR})

    async def health(request: Request) -> Response:
        return Response(status_code=200, headers={"x-emulator": EMULATOR})

    async def version(request: Request) -> Response:
        return JSONResponse({"version": f"{EMULATOR} (not vLLM)"})

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(emu.registry), media_type=CONTENT_TYPE_LATEST)

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/models", models),
            Route("/health", health),
            Route("/version", version),
            Route("/metrics", metrics),
        ]
    )
    app.state.emulator = emu
    return app
