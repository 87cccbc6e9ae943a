"""Fan-out: one request, sent identically to several models at once, each measured the same way.

Every model's call is made as a stream (``stream_options.include_usage`` on) whatever the client asked, because
TTFT and TPOT exist only in a stream; a non-streaming fan-out returns, per model, the completion assembled from
that stream. One model failing fills its own slot (``error``); the others still answer.

The same machinery serves shadow mirroring (``mirror``): a mirrored call is a fan-out of one, recorded apart.

GPU-time cost of one call: the backend's $/s x the call's wall-clock time / the mean number of requests the
backend was serving during it (its share of a continuously batched GPU; never the whole wall-clock, which would
overcount by the batch size).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.auth import Client
from gateway.compare.store import CallResult, list_cost, measured
from gateway.config import ModelCard
from gateway.cost import gpu_usd_of_call
from gateway.errors import GatewayError
from gateway.metrics import Metrics
from gateway.protocol import Endpoint, dump_json
from gateway.relay.backends import BackendPool, Upstream, close_upstream, read_body
from gateway.relay.proxy import (
    CLIENT_CLOSED,
    Exchange,
    Recorder,
    count_failure,
    done_status,
    error_answer,
    read_to_end,
    stream_failure,
    unterminated,
)
from gateway.relay.sse import SSEFramer, StreamObserver

OnEvent = Callable[[str, bytes], Awaitable[None]]  # (arm: the model, or model+variant; raw JSON of one vLLM chunk)


@dataclass(frozen=True, slots=True)
class Charge:
    """An API key's share of a fan-out: tokens reserved for one model's call, and its prompt's estimate."""

    client: Client
    reserved: int
    prompt_estimate: int


@dataclass(slots=True)
class Answer:
    """What a non-streaming answer is assembled from, kept while the stream passes: the first chunk's id,
    creation time and model, the usage, the reasoning text. Nothing per chunk (the answer's text is the observer's):
    a long answer costs its text, not its chunks."""

    id: Any = None
    created: Any = None
    model: Any = None
    usage: dict[str, Any] | None = None
    reasoning: list[str] = field(default_factory=list)
    chunks: int = 0

    def take(self, chunk: dict[str, Any]) -> None:
        if self.chunks == 0:
            self.id, self.created, self.model = chunk.get("id"), chunk.get("created"), chunk.get("model")
        self.chunks += 1
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        for choice in chunk.get("choices") or []:
            if isinstance(choice, dict) and choice.get("index", 0) == 0 and isinstance(choice.get("delta"), dict):
                delta = choice["delta"]
                text = delta.get("reasoning_content") or delta.get("reasoning")
                if text:
                    self.reasoning.append(str(text))


@dataclass(slots=True)
class Outcome:
    model: str
    backend: str | None
    observer: StreamObserver
    answer: Answer
    error: dict[str, Any] | None  # an OpenAI error object's inner dict
    status: int
    cost_gpu_usd: float | None
    cost_list_usd: float | None
    variant: str = ""  # the arm's named request overrides ("" for the plain model)

    @property
    def arm(self) -> str:
        return f"{self.model}+{self.variant}" if self.variant else self.model

    def metrics(self) -> dict[str, Any]:
        o = self.observer
        usage = o.usage
        tpot = o.tpot
        completion = usage.completion_tokens if usage else None
        return {
            "ttft_s": o.ttft,
            "ttfat_s": o.ttfat,
            "reasoning_s": o.reasoning_s,
            "tpot_s": tpot,
            "e2e_s": o.e2e,
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "completion_tokens": completion,
            "reasoning_tokens": o.reasoning_tokens if usage else None,
            "answer_tokens": o.answer_tokens(completion) if completion is not None else None,
            "reasoning_tokens_from": ("chunks" if o.reasoning_counted else "usage") if usage else None,
            "empty_answer": o.empty_answer if self.error is None else None,
            "output_tokens_per_s": 1.0 / tpot if tpot else None,
            "cost_usd": {"gpu_time": self.cost_gpu_usd, "list_price": self.cost_list_usd},
        }

    def to_result(self, comparison_id: str, kind: str, card: ModelCard | None, keep_text: bool) -> CallResult:
        error = None if self.error is None else str(self.error.get("message", self.error))
        return measured(
            comparison_id, kind, self.model, self.observer, backend=self.backend, card=card,
            cost_gpu_usd=self.cost_gpu_usd, error=error, keep_text=keep_text, variant=self.variant,
        )  # fmt: skip


def streaming_body(body: dict[str, Any], model: str) -> bytes:
    sent = {k: v for k, v in body.items() if k != "models"}
    sent["model"] = model
    sent["stream"] = True
    opts = body.get("stream_options")
    sent["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
    return dump_json(sent)


def assemble(outcome: Outcome, endpoint: Endpoint) -> dict[str, Any] | None:
    """A non-streaming response object built from the model's stream (id, model and usage are vLLM's)."""
    answer = outcome.answer
    if outcome.error is not None or not answer.chunks:
        return None
    text = "".join(outcome.observer.text)
    if endpoint == "chat":
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if answer.reasoning:
            message["reasoning_content"] = "".join(answer.reasoning)
        choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": outcome.observer.finish_reason}
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": outcome.observer.finish_reason}
        kind = "text_completion"
    return {
        "id": answer.id,
        "object": kind,
        "created": answer.created,
        "model": answer.model if answer.model is not None else outcome.model,
        "choices": [choice],
        "usage": answer.usage,
    }


async def call_model(
    pool: BackendPool,
    recorder: Recorder | None,
    card: ModelCard,
    endpoint: Endpoint,
    body: dict[str, Any],
    request_id: str,
    *,
    on_event: OnEvent | None = None,
    forward_usage: bool = False,
    charge: Charge | None = None,
    queue: bool = True,
    variant: str = "",
) -> Outcome:
    """Stream one model's answer to ``body``; never raises for the model's own failure (it is the outcome). A
    failure is what the relay makes of it (``gateway.relay.proxy``): the same error, status and count a plain call
    to the same backend gets. When the task is cancelled (the client left), the call is recorded as 499 with what
    it had received, then the cancellation goes on. ``charge``: the API key's tokens reserved for this call,
    settled when it ends. ``variant`` names the arm ``body`` is for (its events and outcome carry it)."""
    label = f"{card.id}+{variant}" if variant else card.id
    model = card.id
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    ex = Exchange(request_id, endpoint, time.perf_counter(), model=model, card=card)
    if charge is not None:
        ex.client, ex.reserved, ex.prompt_estimate = charge.client, charge.reserved, charge.prompt_estimate
    observer = StreamObserver(t0=ex.t0, keep_text=True)
    answer = Answer()
    headers = {"content-type": "application/json", "x-request-id": request_id, "accept-encoding": "identity"}
    try:
        upstream = await pool.open(model, path, streaming_body(body, model), headers, stream=True, queue=queue)
    except GatewayError as err:
        count_failure(pool.metrics, ex.backend, err)
        if recorder:
            recorder.failed(ex, err.status)
        return Outcome(model, None, observer, answer, err.body()["error"], err.status, None, None, variant)
    except asyncio.CancelledError:
        if recorder:
            recorder.failed(ex, CLIENT_CLOSED)
        raise
    backend = upstream.backend
    ex.backend = backend.name
    series = pool.metrics.series(model, backend.name)
    series.in_flight.inc()
    status = upstream.response.status_code
    error: dict[str, Any] | None = None
    load = 1.0
    cancelled = False
    try:
        if status != 200:
            error, status = await _error_answer(upstream, pool.metrics)
        else:
            status, load = await _read_stream(upstream, observer, answer, label, on_event, forward_usage)
            error = observer.error
    except asyncio.CancelledError:
        cancelled = True
        raise
    except (GatewayError, ValueError) as exc:
        failure = stream_failure(upstream, exc)
        error, status = failure.body()["error"], failure.status
    finally:
        await close_upstream(upstream)
        upstream.release()
        series.in_flight.dec()
        if cancelled and recorder:
            recorder.finished(ex, CLIENT_CLOSED, e2e=None, usage=None, observer=observer)
    elapsed = time.perf_counter() - ex.t0
    usage = observer.usage if error is None else None
    per_hour = pool.settings.backend_cost_per_hour(backend.config)
    gpu = gpu_usd_of_call(per_hour, elapsed, load) if error is None else None
    if recorder:
        recorder.finished(ex, status, e2e=observer.e2e, usage=usage, observer=observer)
    return Outcome(model, backend.name, observer, answer, error, status, gpu, list_cost(card, usage), variant)


async def _error_answer(upstream: Upstream, metrics: Metrics) -> tuple[dict[str, Any], int]:
    """A backend's error status (the pool had no retry left): its error object and status, or the gateway's when
    its body is not an error object or cannot be read (as ``api.openai`` answers a plain call)."""
    name, status = upstream.backend.name, upstream.response.status_code
    try:
        raw = await read_body(upstream)
    except GatewayError as err:
        count_failure(metrics, name, err)
        return err.body()["error"], err.status
    bad = error_answer(name, status, raw)
    if bad is not None:
        count_failure(metrics, name, bad)
        return bad.body()["error"], bad.status
    inner = json.loads(raw).get("error")
    return (inner if isinstance(inner, dict) else {"message": raw.decode(errors="replace")[:500]}), status


async def _read_stream(
    upstream: Upstream, observer: StreamObserver, answer: Answer, model: str, on_event: OnEvent | None,
    forward_usage: bool,
) -> tuple[int, float]:  # fmt: skip
    """Read the model's stream to its end as the relay does: the status to record (200, or 500 after the backend's
    own error event) and the mean number of requests the backend served meanwhile. Raises what the relay reports
    as an error event (a read that failed or timed out, no ``[DONE]``, an oversized event)."""
    backend = upstream.backend
    framer = SSEFramer()
    load_sum, load_n = backend.in_flight, 1  # requests the backend was serving, sampled at each read
    while not observer.done and (data := await upstream.read()) is not None:
        load_sum, load_n = load_sum + backend.in_flight, load_n + 1
        for event in framer.feed(data):
            if event.data is None:
                continue
            if event.data == "[DONE]":
                observer.done = True
                continue
            try:
                chunk = json.loads(event.data)
            except ValueError:  # a plain call relays it as it is; a fan-out has nothing to tag
                continue
            usage_only = observer.observe_obj(chunk)
            if isinstance(chunk, dict):
                answer.take(chunk)
            if on_event is not None and (forward_usage or not usage_only) and observer.error is None:
                await on_event(model, event.data.encode())
    if not observer.done:
        unterminated(framer, observer, backend.name)
    status = done_status(upstream, observer)
    await read_to_end(upstream)
    return status, load_sum / load_n
