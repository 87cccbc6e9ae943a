"""The emulator's HTTP app: routes, timing, the load model, failure injection, and engine accounting."""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway.devstack.emulator import generate, render
from gateway.devstack.emulator.config import EMULATOR, EmulatorConfig
from gateway.devstack.emulator.errors import VllmError
from gateway.devstack.emulator.metrics import EngineMetrics
from gateway.devstack.emulator.oracle import Oracle
from gateway.devstack.emulator.params import Plan, plan
from gateway.devstack.emulator.tokenize import tokenizer_routes
from gateway.devstack.emulator.tokens import TokenModel, token_model
from gateway.relay.asgi import race_disconnect


class Emulator:
    def __init__(self, config: EmulatorConfig, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = EngineMetrics(self.registry, config.model)
        self.tokens: TokenModel = token_model(config.tokenizer, config.max_model_len)
        self.rng = random.Random(config.seed)
        self.running = 0
        self.created = int(time.time())
        self.oracle: Oracle | None = None
        if config.answers is not None:
            self.oracle = Oracle.load(config.answers, config.seed, config.accuracy, config.tool_error_rate)

    def _factor(self) -> float:
        load = max(1.0, self.running / self.config.batch_size)
        j = self.config.jitter
        return load * (self.rng.uniform(1 - j, 1 + j) if j else 1.0)

    async def read(self, request: Request) -> Any:
        try:
            return json.loads(await request.body())
        except ValueError:
            raise VllmError(400, "Invalid JSON body") from None

    async def handle(self, request: Request, chat: bool) -> Response:
        start = time.perf_counter()
        try:
            body = await self.read(request)
            p = plan(body, chat, self.config, self.tokens, self.rng)
            if self.config.fail_rate and self.rng.random() < self.config.fail_rate:
                raise VllmError(500, "injected failure (emulator fail_rate)", "InternalServerError")
        except VllmError as err:
            return JSONResponse(err.body(), status_code=err.status, headers={"x-emulator": EMULATOR})
        verdict = self.oracle.apply(p, body) if self.oracle is not None else None
        choices = generate.choices(p, self.config, self.tokens, self.rng)
        prompts = generate.prompt_steps(p, self.tokens)
        rid = ("chatcmpl-" if chat else "cmpl-") + (p.request_id or uuid.uuid4().hex)
        headers = {"x-emulator": EMULATOR, "x-request-id": request.headers.get("x-request-id", rid)}
        if verdict is not None:
            headers["x-emulator-oracle"] = verdict
        if p.ignored:
            # names as JSON escapes them (a header is latin-1, and control characters would split it)
            headers["x-emulator-ignored"] = ",".join(json.dumps(n)[1:-1] for n in p.ignored)[:1000]
        if p.stream:
            chunks = [render.stream(p, c, self.tokens, prompts) for c in choices]
            stream = self._stream(rid, p, choices, chunks, start)
            return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
        steps = max(len(c.ids) for c in choices)
        self.running += 1
        self.metrics.running.set(self.running)
        try:
            factor = self._factor()
            total = (self.config.ttft_ms + self.config.itl_ms * max(0, steps - 1)) * factor / 1000
            # like vLLM, abort the generation as soon as the client goes away
            gone, _ = await race_disconnect(
                lambda: asyncio.sleep(max(0.0, start + total - time.perf_counter())), request.receive
            )
        finally:
            self.running -= 1
            self.metrics.running.set(self.running)
        generated = sum(c.tokens for c in choices)
        if gone:
            self._finished("abort", start, None, 0, p.prompt_tokens)
            return Response(status_code=499)
        reason = "length" if any(c.finish == "length" for c in choices) else "stop"
        self._finished(reason, start, start + self.config.ttft_ms * factor / 1000, generated, p.prompt_tokens)
        payload = {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.config.model,
            **render.body(p, choices, self.tokens, prompts),
            "usage": render.usage(p, choices),
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
        self, rid: str, p: Plan, choices: list[generate.Choice], chunks: list[list[str]], start: float
    ) -> AsyncIterator[bytes]:
        """Tokens one per ITL step; with several choices, every choice's token of a step in turn, one chunk each
        (as vLLM interleaves ``n`` choices and a list of prompts)."""
        cfg, m = self.config, self.metrics
        kind = "chat.completion.chunk" if p.chat else "text_completion"
        head = f'data: {{"id":"{rid}","object":"{kind}","created":{int(time.time())},"model":{json.dumps(cfg.model)},'
        fingerprint = f',"system_fingerprint":"{EMULATOR}"'
        end = "]" + ("" if p.include_usage else fingerprint) + "}\n\n"
        steps = max(len(c) for c in chunks)
        self.running += 1
        m.running.set(self.running)
        first: float | None = None
        sent = 0
        reason = "abort"
        break_at = steps // 2 if steps > 1 else None
        drop = cfg.drop_rate and self.rng.random() < cfg.drop_rate
        error = cfg.stream_error_rate and self.rng.random() < cfg.stream_error_rate

        def so_far(c: generate.Choice, made: int) -> str:
            """``,"usage":{...}`` with a choice's tokens so far, for stream_options.continuous_usage_stats (as
            vLLM: per chunk, per choice; the usage-only chunk at the end still sums every choice)."""
            out: dict[str, Any] = {"prompt_tokens": p.prompt_tokens, "completion_tokens": made,
                                   "total_tokens": p.prompt_tokens + made}  # fmt: skip
            if p.parser:
                out["completion_tokens_details"] = {"reasoning_tokens": min(made, c.reasoning)}
            return ',"usage":' + json.dumps(out, separators=(",", ":"))

        try:
            if p.chat:
                for c in choices:
                    usage0 = so_far(c, 0) if p.continuous_usage else ""
                    yield (
                        f'{head}"choices":[{{"index":{c.index},"delta":{{"role":"assistant","content":""}},'
                        '"logprobs":null,"finish_reason":null}],"prompt_token_ids":null,"prompt_text":null'
                        + usage0
                        + "}\n\n"
                    ).encode()
                    if p.echo_text:
                        delta = json.dumps({"content": p.echo_text})
                        choice = f'{{"index":{c.index},"delta":{delta},"logprobs":null,"finish_reason":null}}'
                        yield f'{head}"choices":[{choice}]}}\n\n'.encode()
            due = start
            prev = None
            for k in range(steps):
                due += (cfg.ttft_ms if k == 0 else cfg.itl_ms) * self._factor() / 1000
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if k == break_at and drop:
                    raise ConnectionAbortedError("injected mid-stream drop (emulator drop_rate)")
                if k == break_at and error:
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
                out = []
                for c, own in zip(choices, chunks, strict=True):
                    if k < len(own):
                        last = k == len(own) - 1
                        if own[k]:  # empty: a hidden reasoning token (include_reasoning false)
                            tail = end if last else "]}\n\n"
                            if p.continuous_usage:
                                tail = tail[:-3] + so_far(c, min(k + 1, c.tokens)) + "}\n\n"
                            out.append(head + '"choices":[' + own[k] + tail)
                        sent += (1 if k < len(c.ids) else 0) + (c.hidden if last else 0)
                if out:
                    yield "".join(out).encode()
            if p.include_usage:
                usage = json.dumps(render.usage(p, choices), separators=(",", ":"))
                yield (head + '"choices":[],"usage":' + usage + fingerprint + "}\n\n").encode()
            yield b"data: [DONE]\n\n"
            reason = "length" if any(c.finish == "length" for c in choices) else "stop"
        finally:
            self.running -= 1
            m.running.set(self.running)
            if reason != "error":
                self._finished(reason, start, first, sent, p.prompt_tokens)


async def _fastapi_error(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 404)
    detail = getattr(exc, "detail", None) or ("Not Found" if status == 404 else "Method Not Allowed")
    return JSONResponse({"detail": detail}, status_code=status, headers={"x-emulator": EMULATOR})


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
            *tokenizer_routes(emu.config, emu.tokens, emu.read),
            Route("/health", health),
            Route("/version", version),
            Route("/metrics", metrics),
        ],
        # vLLM is a FastAPI app: an unknown route or method is answered in JSON, {"detail": ...}, not plain text
        exception_handlers={404: _fastapi_error, 405: _fastapi_error},
    )
    app.state.emulator = emu
    return app
