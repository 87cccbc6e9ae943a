"""vLLM's tokenizer routes: ``POST /tokenize``, ``POST /detokenize`` and (behind a flag, off by default as vLLM's
``--enable-tokenizer-info-endpoint``) ``GET /tokenizer_info``, with the emulator's token model."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.devstack.emulator.config import EMULATOR, EmulatorConfig
from gateway.devstack.emulator.errors import VllmError, bad_request, invalid_type, model_not_found, unsupported
from gateway.devstack.emulator.tokens import OutOfVocabulary, TokenModel, chat_prompt

Reader = Callable[[Request], Awaitable[Any]]
HEADERS = {"x-emulator": EMULATOR}


def tokenize(body: Any, cfg: EmulatorConfig, tokens: TokenModel) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise invalid_type("", "model_attributes_type", "Input should be a valid dictionary or object", body)
    chat = "messages" in body
    if chat and body.get("continue_final_message") and body.get("add_generation_prompt", True):
        raise bad_request("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
    if body.get("model") is not None and body["model"] != cfg.model:
        raise model_not_found(body["model"], cfg.model)
    if chat:
        messages = body["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise invalid_type("messages", "list_type", "Input should be a valid list", messages)
        text, special = chat_prompt(messages), body.get("add_special_tokens", False) is True
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise invalid_type("prompt", "string_type", "Input should be a valid string", prompt)
        text = prompt
        special = body.get("add_special_tokens", True) is not False
    if body.get("tools"):
        raise unsupported("tools", "in /tokenize (no chat template is applied)")
    ids = tokens.encode(text, special)
    strs = [tokens.token_str(i) for i in ids] if body.get("return_token_strs") else None
    return {"count": len(ids), "max_model_len": cfg.max_model_len, "tokens": ids, "token_strs": strs}


def detokenize(body: Any, cfg: EmulatorConfig, tokens: TokenModel) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise invalid_type("", "model_attributes_type", "Input should be a valid dictionary or object", body)
    if body.get("model") is not None and body["model"] != cfg.model:
        raise model_not_found(body["model"], cfg.model)
    ids = body.get("tokens")
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise invalid_type("tokens", "list_type", "Input should be a valid list of integers", ids)
    try:
        return {"prompt": tokens.decode(ids)}
    except OutOfVocabulary as err:
        raise bad_request(str(err), "tokens") from None


def tokenizer_routes(cfg: EmulatorConfig, tokens: TokenModel, read: Reader) -> list[Route]:
    def route(
        fn: Callable[[Any, EmulatorConfig, TokenModel], dict[str, Any]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                return JSONResponse(fn(await read(request), cfg, tokens), headers=HEADERS)
            except VllmError as err:
                return JSONResponse(err.body(), status_code=err.status, headers=HEADERS)

        return endpoint

    async def info(request: Request) -> Response:
        return JSONResponse(tokens.info(), headers=HEADERS)

    routes = [
        Route("/tokenize", route(tokenize), methods=["POST"]),
        Route("/detokenize", route(detokenize), methods=["POST"]),
    ]
    if cfg.tokenizer_info:
        routes.append(Route("/tokenizer_info", info))
    return routes
