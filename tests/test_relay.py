"""The relay's inline path (gateway.relay, step 4): its sends run in the call's own context, and turning it off
(``gateway.relay_inline: false``) changes nothing a client can see."""

from __future__ import annotations

import contextvars
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.app import create_app
from gateway.devstack.emulator import EmulatorConfig, create_emulator_app
from tests.conftest import card, settings_for
from tests.servers import ThreadServer, metric

REQUEST: contextvars.ContextVar[str] = contextvars.ContextVar("request", default="none")


class Tagging:
    """What a logging or tracing middleware does: put the request's id in a context variable for the request's
    code, and (here) note, for each body message sent, which request the variable says is being served."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.seen: list[tuple[str, str]] = []  # (the request's own id, the variable's value during its send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        own = dict(scope.get("headers", [])).get(b"x-request-id", b"").decode()
        REQUEST.set(own)

        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.body":
                self.seen.append((own, REQUEST.get()))
            await send(message)

        await self.app(scope, receive, tagged)


@pytest.fixture(scope="module")
def emulator() -> Iterator[str]:
    with ThreadServer(create_emulator_app(EmulatorConfig(model="m", ttft_ms=5, itl_ms=5, output_tokens=30))) as s:
        yield s.url


def gateway(emulator: str, **section: Any) -> tuple[Any, Tagging, ThreadServer]:
    settings = settings_for(
        [{"name": "b", "base_url": emulator, "models": ["m"]}], [card("m", "llama", "Meta", "US")], **section
    )
    app = create_app(settings)
    tagging = Tagging(app)
    return app, tagging, ThreadServer(tagging)


BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 30, "stream": True}


def test_inline_sends_run_in_the_calls_own_context(emulator: str) -> None:
    """Calls one after another reuse the pooled upstream connection opened by the first: the inline sends of
    each must see its own request, not the first one's (the connection's callbacks' context)."""
    app, tagging, server = gateway(emulator)
    with server as gw:
        for i in range(4):
            r = httpx.post(f"{gw.url}/v1/chat/completions", json=BODY, headers={"x-request-id": f"req-{i}"})
            assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
        assert len(tagging.seen) > 4 * 10  # most of each stream's events went out inline, one send each
        wrong = [(own, seen) for own, seen in tagging.seen if own != seen]
        assert not wrong, wrong[:5]
        # one connection served all four (it goes back to the pool once the backend's last bytes are read, just
        # after the client got [DONE])
        pool = app.state.gateway.pool.backends["b"].h1
        deadline = time.monotonic() + 5
        while len(pool.idle) != 1 or pool.open != 1:
            assert time.monotonic() < deadline, (len(pool.idle), pool.open)
            time.sleep(0.01)


def normalised(text: str) -> list[object]:
    """A stream's events without what differs between two calls (the response id and its creation time)."""
    out: list[object] = []
    for event in text.split("\n\n"):
        if event.startswith("data: {"):
            obj = json.loads(event[6:])
            out.append({k: v for k, v in obj.items() if k not in ("id", "created")})
        elif event:
            out.append(event)
    return out


def test_with_the_inline_path_off_clients_see_the_same_stream(emulator: str) -> None:
    answers = {}
    for inline in (True, False):
        _, _, server = gateway(emulator, relay_inline=inline)
        with server as gw:
            r = httpx.post(f"{gw.url}/v1/chat/completions", json={**BODY, "seed": 1})
            assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
            answers[inline] = normalised(r.text)
            text = httpx.get(f"{gw.url}/metrics").text
            assert metric(text, "gateway_inter_token_latency_seconds_count", model="m") == 29
            assert metric(text, "gateway_completion_tokens_total", model="m") == 30
    assert answers[True] == answers[False]
    assert len(answers[True]) == 32  # role, 30 tokens, [DONE]
