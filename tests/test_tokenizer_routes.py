"""vLLM's tokenizer routes at the gateway (``gateway.api.tokenizer``): routed by model, bodies passed through, guarded
like /v1. A recording backend stands in for vLLM here (what it was sent is the point); tests/test_vllm.py checks
the answers against real vLLM."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from gateway.app import create_app
from gateway.auth import hash_key
from tests.conftest import card, settings_for
from tests.servers import ThreadServer, metric

KEY, OTHER = "sk-tok-one", "sk-tok-two"


class Backend:
    """Answers /tokenize with what it was sent, /detokenize with a 500 page, /tokenizer_info with its query."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, Any] | None]] = []

    def app(self) -> Starlette:
        async def tokenize(request: Request) -> Response:
            body = json.loads(await request.body())
            self.seen.append(("POST", "/tokenize", body))
            return JSONResponse({"count": 2, "max_model_len": 4096, "tokens": [1, 2], "token_strs": None, **body})

        async def detokenize(request: Request) -> Response:
            self.seen.append(("POST", "/detokenize", json.loads(await request.body())))
            return PlainTextResponse("<html>boom</html>", status_code=500)

        async def info(request: Request) -> Response:
            self.seen.append(("GET", "/tokenizer_info", None))
            return JSONResponse({"tokenizer_class": "Recorder", "query": str(request.url.query)})

        async def health(request: Request) -> Response:
            return Response()

        return Starlette(
            routes=[
                Route("/tokenize", tokenize, methods=["POST"]),
                Route("/detokenize", detokenize, methods=["POST"]),
                Route("/tokenizer_info", info),
                Route("/health", health),
            ]
        )


@contextmanager
def gateway(models: tuple[str, ...] = ("m1", "m2"), **auth: Any) -> Iterator[tuple[str, Backend]]:
    backend = Backend()
    with ThreadServer(backend.app()) as b:
        settings = settings_for(
            [{"name": "tok-b", "base_url": b.url, "models": list(models)}],
            [card(m, "qwen3", "Alibaba", "CN", aliases=["qwen"] if m == "m1" else []) for m in models],
            **({"auth": auth} if auth else {}),
        )
        with ThreadServer(create_app(settings)) as gw:
            yield gw.url, backend


def test_tokenize_is_routed_by_model_with_the_alias_resolved_and_the_answer_passed_through() -> None:
    with gateway() as (url, backend):
        r = httpx.post(f"{url}/tokenize", json={"model": "qwen", "prompt": "hello", "add_special_tokens": False})
        assert r.status_code == 200, r.text
        assert r.json() == {"count": 2, "max_model_len": 4096, "tokens": [1, 2], "token_strs": None, "model": "m1",
                            "prompt": "hello", "add_special_tokens": False}  # fmt: skip
        assert backend.seen == [("POST", "/tokenize", {"model": "m1", "prompt": "hello", "add_special_tokens": False})]
        assert r.headers["x-gateway-backend"] == "tok-b" and r.headers["x-gateway-model"] == "m1"
        text = httpx.get(f"{url}/metrics").text
        assert metric(text, "gateway_tokenizer_requests_total", model="m1", route="tokenize", status="200") == 1
        # not a generation: the request counters and their error ratios are left alone
        assert metric(text, "gateway_requests_total", model="m1") == 0


def test_the_model_is_required_when_several_are_served_and_must_exist() -> None:
    with gateway() as (url, backend):
        r = httpx.post(f"{url}/tokenize", json={"prompt": "hello"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text
        r = httpx.post(f"{url}/tokenize", json={"model": "nope", "prompt": "hello"})
        assert r.status_code == 404 and "`nope` does not exist" in r.json()["error"]["message"]
        assert httpx.post(f"{url}/tokenize", content=b"{not json").status_code == 400
        assert backend.seen == []
    with gateway(models=("only",)) as (url, _backend):
        assert httpx.post(f"{url}/tokenize", json={"prompt": "hello"}).json()["model"] == "only"


def test_a_backends_non_json_error_becomes_a_502_and_tokenizer_info_takes_the_model_from_the_query() -> None:
    with gateway() as (url, _backend):
        r = httpx.post(f"{url}/detokenize", json={"model": "m2", "tokens": [1, 2]})
        assert r.status_code == 502 and "non-JSON" in r.json()["error"]["message"], r.text
        r = httpx.get(f"{url}/tokenizer_info", params={"model": "m2"})
        assert r.status_code == 200 and r.json()["tokenizer_class"] == "Recorder"
        assert r.json()["query"] == ""  # the gateway's own query (model=) is not sent on
        assert httpx.get(f"{url}/tokenizer_info").status_code == 400  # two models: which tokenizer?


def test_keys_allow_lists_and_request_rates_apply() -> None:
    keys = [
        {"name": "one", "sha256": hash_key(KEY), "models": ["m1"], "rpm": 2},
        {"name": "two", "sha256": hash_key(OTHER)},
    ]
    with gateway(keys=keys, protect_metrics=False) as (url, backend):
        body = {"model": "m1", "prompt": "hi"}
        assert httpx.post(f"{url}/tokenize", json=body).status_code == 401
        assert httpx.get(f"{url}/tokenizer_info", params={"model": "m1"}).status_code == 401
        one = {"authorization": f"Bearer {KEY}"}
        r = httpx.post(f"{url}/tokenize", json={"model": "m2", "prompt": "hi"}, headers=one)
        assert r.status_code == 403, r.text
        assert httpx.post(f"{url}/tokenize", json=body, headers=one).status_code == 200
        assert httpx.post(f"{url}/tokenize", json=body, headers=one).status_code == 429  # its 2 a minute are spent
        two = {"authorization": f"Bearer {OTHER}"}
        assert httpx.post(f"{url}/tokenize", json=body, headers=two).status_code == 200
        r = httpx.post(f"{url}/tokenize", content=b"prompt=hi", headers={**two, "content-type": "text/plain"})
        assert r.status_code == 415
        assert [path for _, path, _ in backend.seen] == ["/tokenize", "/tokenize"]
