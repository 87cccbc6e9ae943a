"""The emulator's OpenAI/vLLM API (issue #14 item 3): every honoured parameter against vLLM's answer shape, every
parameter it cannot honour refused with vLLM's 400, and vLLM's tokenizer routes. Answers come from emulators on
real sockets (the official SDK needs one) with no delays."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from gateway.devstack.emulator import EmulatorConfig, create_emulator_app
from tests.servers import ThreadServer

MSG = [{"role": "user", "content": "Say something about the weather today"}]
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 3, "maxLength": 20},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "ratio": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
        "metric": {"type": "boolean"},
        "unit": {"enum": ["C", "F"]},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
        "where": {
            "type": "object",
            "properties": {"lat": {"type": "number"}, "zone": {"$ref": "#/$defs/zone"}},
            "required": ["lat", "zone"],
        },
    },
    "required": ["city", "days", "where"],
    "$defs": {"zone": {"type": "string", "enum": ["north", "south"]}},
}
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "weather", "parameters": SCHEMA}},
    {"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {}}}},
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small byte-level BPE tokenizer directory, as a Hugging Face model ships one (trained here in milliseconds,
    so the test needs no model files)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [json.dumps(SCHEMA), *(m["content"] for m in MSG)] * 5 + ["the quick brown fox jumps over a lazy dog"] * 5
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_special_tokens(["<|im_end|>"])
    root = tmp_path_factory.mktemp("tokenizer")
    tok.save(str(root / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "tokenizer_class": "PreTrainedTokenizerFast", "vocab_file": "v.json"}
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    return str(root)


@pytest.fixture(scope="module", params=["words", "tokenizer"])
def url(request: pytest.FixtureRequest) -> Iterator[str]:
    tokenizer = request.getfixturevalue("tokenizer_dir") if request.param == "tokenizer" else None
    cfg = EmulatorConfig(model="m", ttft_ms=0, itl_ms=0, output_tokens=12, tokenizer=tokenizer, tokenizer_info=True)
    with ThreadServer(create_emulator_app(cfg)) as server:
        yield server.url


def sdk(url: str) -> Any:
    """The official client, typed loosely: its overloads would not take the vLLM extensions or the plain dicts."""
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


def post(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=30)


def events(url: str, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    text = post(url, path, {**body, "stream": True}).text
    lines = [line.removeprefix("data: ") for line in text.split("\n\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def count(url: str, **body: Any) -> int:
    answer = post(url, "/tokenize", {"model": "m", **body}).json()
    assert answer["count"] == len(answer["tokens"])
    return int(answer["count"])


# -- honoured ------------------------------------------------------------------------------------------------------


def test_n_choices_count_the_prompt_once(url: str) -> None:
    r = sdk(url).chat.completions.create(model="m", messages=MSG, n=3, max_tokens=5)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" and c.message.content for c in r.choices)
    assert len({c.message.content for c in r.choices}) > 1  # n samples, not one copied
    assert r.usage is not None and r.usage.completion_tokens == 15
    assert r.usage.prompt_tokens == count(url, messages=MSG)


def test_n_choices_stream_interleaved_one_choice_per_chunk(url: str) -> None:
    chunks = events(url, "/v1/chat/completions", {"model": "m", "messages": MSG, "n": 2, "max_tokens": 3})
    assert all(len(c["choices"]) == 1 for c in chunks)
    indices = [c["choices"][0]["index"] for c in chunks]
    assert indices == [0, 1] + [0, 1] * 3  # role chunks, then each step: every choice in turn
    finishes = [c["choices"][0]["index"] for c in chunks if c["choices"][0].get("finish_reason")]
    assert finishes == [0, 1]


def test_text_parts_count_like_the_same_string(url: str) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": MSG[0]["content"]}]}]
    as_parts = post(url, "/v1/chat/completions", {"model": "m", "messages": parts}).json()["usage"]["prompt_tokens"]
    as_text = post(url, "/v1/chat/completions", {"model": "m", "messages": MSG}).json()["usage"]["prompt_tokens"]
    assert as_parts == as_text == count(url, prompt=MSG[0]["content"], add_special_tokens=False)


def test_chat_logprobs_and_top_logprobs(url: str) -> None:
    def ask() -> Any:
        return sdk(url).chat.completions.create(
            model="m",
            messages=MSG,
            max_tokens=4,
            logprobs=True,
            top_logprobs=3,
            seed=7,
        )

    r = ask()
    content = r.choices[0].logprobs.content
    assert content is not None and len(content) == 4
    assert "".join(e.token for e in content) == r.choices[0].message.content
    for e in content:
        assert e.logprob < 0 and e.bytes == list(e.token.encode())
        assert len(e.top_logprobs) == 3 and (e.top_logprobs[0].token, e.top_logprobs[0].logprob) == (e.token, e.logprob)
        assert len({t.token for t in e.top_logprobs}) == 3
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
    assert ask().choices[0].logprobs.model_dump() == r.choices[0].logprobs.model_dump()  # seeded
    streamed = events(url, "/v1/chat/completions", {"model": "m", "messages": MSG, "max_tokens": 4, "logprobs": True})
    entries = [
        e
        for c in streamed
        if c["choices"] and c["choices"][0]["logprobs"]
        for e in c["choices"][0]["logprobs"]["content"]
    ]
    assert len(entries) == 4 and all(e["top_logprobs"] == [] and e["logprob"] < 0 for e in entries)


def test_echo_with_max_tokens_0_gives_the_prompts_logprobs_as_lm_eval_needs(url: str) -> None:
    prompt = "The capital of France is Paris"
    body = {"model": "m", "prompt": prompt, "echo": True, "max_tokens": 0, "logprobs": 1}
    choice = post(url, "/v1/completions", body).json()["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(isinstance(v, float) and v < 0 for v in lp["token_logprobs"][1:])
    assert "".join(lp["tokens"]) == prompt and len(lp["tokens"]) == count(url, prompt=prompt)
    offsets = [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
    assert lp["text_offset"] == offsets
    for token, value, top in zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:], strict=True):
        assert top == {token: value}  # lm-eval's is_greedy reads the best of these
    streamed = events(url, "/v1/completions", body)
    assert streamed[0]["choices"][0]["text"] == prompt and streamed[0]["choices"][0]["logprobs"] == lp


def test_echo_with_tokens_and_logprobs(url: str) -> None:
    prompt = "one two three"
    r = post(url, "/v1/completions", {"model": "m", "prompt": prompt, "echo": True, "max_tokens": 2, "logprobs": 2})
    choice, usage = r.json()["choices"][0], r.json()["usage"]
    lp = choice["logprobs"]
    assert choice["text"].startswith(prompt) and "".join(lp["tokens"]) == choice["text"]
    assert len(lp["tokens"]) == usage["prompt_tokens"] + 2 == count(url, prompt=prompt) + 2
    assert all(len(top) == 2 for top in lp["top_logprobs"][1:])


def test_a_list_of_prompts_and_of_token_id_lists(url: str) -> None:
    prompts = ["first prompt here", "a second, longer prompt than the first"]
    r = post(url, "/v1/completions", {"model": "m", "prompt": prompts, "n": 2, "max_tokens": 3}).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    assert r["usage"]["prompt_tokens"] == sum(count(url, prompt=p) for p in prompts)  # each prompt once
    assert r["usage"]["completion_tokens"] == 12
    ids = [post(url, "/tokenize", {"prompt": p}).json()["tokens"] for p in prompts]
    echoed = post(url, "/v1/completions", {"model": "m", "prompt": ids, "echo": True, "max_tokens": 1}).json()
    assert [c["text"][: len(p)] for c, p in zip(echoed["choices"], prompts, strict=True)] == prompts
    single = post(url, "/v1/completions", {"model": "m", "prompt": ids[0], "max_tokens": 1}).json()
    assert len(single["choices"]) == 1 and single["usage"]["prompt_tokens"] == len(ids[0])
    streamed = events(url, "/v1/completions", {"model": "m", "prompt": prompts, "max_tokens": 2})
    assert [c["choices"][0]["index"] for c in streamed] == [0, 1, 0, 1]


def test_prompt_logprobs(url: str) -> None:
    prompt = "tell me a story"
    ids = post(url, "/tokenize", {"prompt": prompt}).json()["tokens"]
    for path, body in (("/v1/completions", {"prompt": prompt}), ("/v1/chat/completions", {"messages": MSG})):
        r = post(url, path, {"model": "m", "max_tokens": 1, "prompt_logprobs": 2, **body}).json()
        got = r["prompt_logprobs"] if "messages" in body else r["choices"][0]["prompt_logprobs"]
        assert got[0] is None and len(got) == r["usage"]["prompt_tokens"]
        for entry in got[1:]:
            assert len(entry) == 2 and sorted(e["rank"] for e in entry.values()) == [1, 2]
            assert all(e["logprob"] < 0 and isinstance(e["decoded_token"], str) for e in entry.values())
        if "prompt" in body:
            assert [int(next(iter(e))) for e in got[1:]] == ids[1:]  # the prompt's own token ranks first


def test_stop_strings_cut_the_text_before_them(url: str) -> None:
    body = {"model": "m", "prompt": "x", "max_tokens": 12, "seed": 3}
    full = post(url, "/v1/completions", body).json()["choices"][0]["text"]
    word = full.split()[len(full.split()) // 2]
    stop = " " + word
    r = post(url, "/v1/completions", {**body, "stop": [stop, "never there"]}).json()
    choice = r["choices"][0]
    assert choice["text"] == full[: full.index(stop)]
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", stop)
    assert 0 < r["usage"]["completion_tokens"] < 12
    kept = post(url, "/v1/completions", {**body, "stop": stop, "include_stop_str_in_output": True}).json()
    assert kept["choices"][0]["text"] == full[: full.index(stop) + len(stop)]
    chunks = events(url, "/v1/completions", {**body, "stop": [stop]})
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    assert chunks[-1]["choices"][0]["stop_reason"] == stop


def test_stop_token_ids(url: str) -> None:
    body = {"model": "m", "prompt": "x", "max_tokens": 12, "seed": 3}
    ids = post(url, "/tokenize", {"prompt": post(url, "/v1/completions", body).json()["choices"][0]["text"]})
    stop_id = ids.json()["tokens"][3]
    choice = post(url, "/v1/completions", {**body, "stop_token_ids": [stop_id]}).json()["choices"][0]
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", stop_id)


def test_named_tool_call_is_schema_valid(url: str) -> None:
    choice = {"type": "function", "function": {"name": "weather"}}
    r = sdk(url).chat.completions.create(model="m", messages=MSG, tools=TOOLS, tool_choice=choice)
    call = r.choices[0].message.tool_calls
    assert call is not None and len(call) == 1 and call[0].function.name == "weather"
    assert call[0].id.startswith("chatcmpl-tool-") and call[0].type == "function"
    jsonschema.validate(json.loads(call[0].function.arguments), SCHEMA)
    assert r.choices[0].finish_reason == "stop"  # vLLM: "stop" for a named function, "tool_calls" for required
    assert r.usage is not None and r.usage.completion_tokens == count(url, prompt=call[0].function.arguments)


def test_required_tool_call_streams_deltas_the_sdk_accumulates(url: str) -> None:
    stream = sdk(url).chat.completions.create(
        model="m",
        messages=MSG,
        tools=TOOLS,
        tool_choice="required",
        stream=True,
        seed=1,
    )
    name, arguments, ids, finish = "", "", set(), None
    deltas = 0
    for chunk in stream:
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for call in c.delta.tool_calls or []:
                deltas += 1
                assert call.index == 0
                ids |= {call.id} if call.id else set()
                name += (call.function.name or "") if call.function else ""
                arguments += (call.function.arguments or "") if call.function else ""
    assert finish == "tool_calls" and len(ids) == 1 and name in ("weather", "noop")
    # "required" picks either tool; noop's arguments ("{}") are one token, so they may come with the name itself
    assert deltas > 1 if name == "weather" else deltas >= 1, (name, deltas)
    jsonschema.validate(json.loads(arguments), SCHEMA if name == "weather" else TOOLS[1]["function"]["parameters"])


def test_tool_choice_auto_answers_text(url: str) -> None:
    r = sdk(url).chat.completions.create(model="m", messages=MSG, tools=TOOLS, max_tokens=3)
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_response_format_gives_json_that_fits(url: str, stream: bool) -> None:
    formats: list[tuple[dict[str, Any], dict[str, Any]]] = [
        ({"type": "json_object"}, {"type": "object"}),
        ({"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA}}, SCHEMA),
    ]
    for fmt, schema in formats:
        body = {"model": "m", "messages": MSG, "response_format": fmt}
        if stream:
            chunks = events(url, "/v1/chat/completions", body)
            text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
            assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and len(chunks) > 3
        else:
            text = post(url, "/v1/chat/completions", body).json()["choices"][0]["message"]["content"]
        value = json.loads(text)
        jsonschema.validate(value, schema)
        assert isinstance(value, dict) and value


def test_max_completion_tokens_wins_over_max_tokens(url: str) -> None:
    body = {"model": "m", "messages": MSG, "max_tokens": 9, "max_completion_tokens": 2}
    r = post(url, "/v1/chat/completions", body).json()
    assert r["usage"]["completion_tokens"] == 2 and r["choices"][0]["finish_reason"] == "length"


def test_accepted_no_ops_and_ignored_unknown_fields(url: str) -> None:
    body = {"model": "m", "messages": MSG, "max_tokens": 3, "temperature": 0.2, "top_p": 0.5, "seed": 1}
    body |= {"presence_penalty": 1, "frequency_penalty": -1, "user": "u", "ignore_eos": True, "min_tokens": 1}
    body |= {"skip_special_tokens": False, "chat_template_kwargs": {"enable_thinking": False}, "top_k": 5}
    r = post(url, "/v1/chat/completions", body)
    assert r.status_code == 200 and "x-emulator-ignored" not in r.headers
    weird = post(url, "/v1/chat/completions", {**body, "guided_json": {}, "frobnicate": 1})
    assert weird.status_code == 200 and weird.headers["x-emulator-ignored"] == "frobnicate,guided_json"
    assert weird.json()["choices"][0]["message"]["content"] == r.json()["choices"][0]["message"]["content"]


def test_model_may_be_left_out_but_not_wrong(url: str) -> None:
    assert post(url, "/v1/chat/completions", {"messages": MSG, "max_tokens": 1}).status_code == 200
    wrong = post(url, "/v1/completions", {"model": "x", "prompt": "hi"})
    assert wrong.status_code == 404
    assert wrong.json() == {
        "error": {
            "message": "The model `x` does not exist. Valid aliases: m.",
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }
    }


# -- refused -------------------------------------------------------------------------------------------------------

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
UNIMPLEMENTED: list[tuple[str, str, Any]] = [  # vLLM honours these; the emulator refuses rather than ignores them
    (COMPLETIONS, "use_beam_search", True),
    (COMPLETIONS, "suffix", "end"),
    (CHAT, "logprob_token_ids", [1]),
    (CHAT, "structured_outputs", {"choice": ["a"]}),
    (CHAT, "allowed_token_ids", [1, 2]),
    (CHAT, "bad_words", ["x"]),
    (COMPLETIONS, "truncate_prompt_tokens", 3),
    (CHAT, "return_token_ids", True),
    (CHAT, "return_tokens_as_token_ids", True),
]
REFUSALS: list[tuple[str, Any, str, str | None, str]] = [
    # (path, fields, type, param, message)
    (CHAT, {"logprobs": True, "top_logprobs": 21}, "BadRequestError", "logprobs",
     "Requested sample logprobs of 21, which is greater than max allowed: 20 (parameter=logprobs, value=21)"),
    (CHAT, {"top_logprobs": 2}, "BadRequestError", "top_logprobs",
     "when using `top_logprobs`, `logprobs` must be set to true. (parameter=top_logprobs)"),
    (CHAT, {"logprobs": "yes"}, "Bad Request", "body.logprobs", "1 validation error:"),
    (CHAT, {"top_logprobs": "3", "logprobs": True}, "BadRequestError", "top_logprobs",
     "`top_logprobs` must be an integer. (parameter=top_logprobs, value=3)"),
    (COMPLETIONS, {"logprobs": 21}, "BadRequestError", "logprobs",
     "Requested sample logprobs of 21, which is greater than max allowed: 20 (parameter=logprobs, value=21)"),
    (COMPLETIONS, {"prompt_logprobs": 30}, "BadRequestError", "prompt_logprobs",
     "Requested prompt logprobs of 30, which is greater than max allowed: 20 (parameter=prompt_logprobs, value=30)"),
    (COMPLETIONS, {"prompt_logprobs": 1, "stream": True}, "BadRequestError", "prompt_logprobs",
     "`prompt_logprobs` are not available when `stream=True`. (parameter=prompt_logprobs)"),
    (CHAT, {"n": 0}, "BadRequestError", None, "n must be at least 1, got 0."),
    (CHAT, {"n": 16385}, "BadRequestError", None, "n must be at most 16384, got 16385. To increase this limit, "
     "set the VLLM_MAX_N_SEQUENCES environment variable."),
    (CHAT, {"max_tokens": 0}, "BadRequestError", "max_tokens",
     "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)"),
    (COMPLETIONS, {"max_tokens": 0}, "BadRequestError", "max_tokens",
     "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)"),
    (CHAT, {"temperature": -1}, "BadRequestError", "temperature",
     "temperature must be non-negative, got -1.0. (parameter=temperature, value=-1.0)"),
    (CHAT, {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "BadRequestError",
     "tool_choice", "The tool specified in `tool_choice` does not match any of the specified `tools` "
     "(parameter=tool_choice)"),
    (CHAT, {"tool_choice": "required"}, "BadRequestError", "tool_choice",
     "When using `tool_choice`, `tools` must be set. (parameter=tool_choice)"),
    (CHAT, {"tools": TOOLS, "tool_choice": "always"}, "BadRequestError", "tool_choice",
     'Invalid value for `tool_choice`: always! Only named tools, "none", "auto" or "required" are supported. '
     "(parameter=tool_choice)"),
    (CHAT, {"tools": []}, "BadRequestError", "tools", "`tools` must not be an empty array. Either provide at least "
     "one tool or omit the field entirely. (parameter=tools)"),
    (CHAT, {"stream_options": {"include_usage": True}}, "BadRequestError", "stream_options",
     "Stream options can only be defined when `stream=True`. (parameter=stream_options)"),
    (CHAT, {"response_format": {"type": "json_schema"}}, "BadRequestError", "response_format",
     "When response_format type is 'json_schema', the 'json_schema' field must be provided. "
     "(parameter=response_format)"),
    (CHAT, {"stop": ["a", "b", "c", "d", "e"]}, "Bad Request", "body.stop", "1 validation error:"),
    (CHAT, {"stop": [""]}, "BadRequestError", None, "stop cannot contain an empty string."),
    (COMPLETIONS, {"prompt": ""}, "BadRequestError", "prompt",
     "Either prompt or prompt_embeds must be provided and non-empty. (parameter=prompt)"),
    (COMPLETIONS, {"prompt": [[10**9]]}, "BadRequestError", "prompt",
     "Token id 1000000000 is out of vocabulary (parameter=prompt)"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "BadRequestError", "messages", "The vLLM emulator does not implement `messages`"),
] + [
    (path, {field: value}, "BadRequestError", field, f"The vLLM emulator does not implement `{field}`.")
    for path, field, value in UNIMPLEMENTED
]  # fmt: skip


@pytest.mark.parametrize(("path", "fields", "kind", "param", "message"), REFUSALS)
def test_what_it_cannot_honour_gets_vllms_400(
    url: str, path: str, fields: dict[str, Any], kind: str, param: str | None, message: str
) -> None:
    base = {"model": "m", "messages": MSG} if path == CHAT else {"model": "m", "prompt": "hi"}
    r = post(url, path, {**base, **fields})
    assert r.status_code == 400, r.text
    assert r.headers["x-emulator"] == "vllm-emulator"
    error = r.json()["error"]
    assert (error["type"], error["param"], error["code"]) == (kind, param, 400)
    assert error["message"].startswith(message), error["message"]
    if kind == "BadRequestError" and param is None:
        assert error["message"] == message


def test_the_sdk_raises_on_a_refusal(url: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(url).chat.completions.create(model="m", messages=MSG, n=0)
    assert caught.value.status_code == 400 and "n must be at least 1" in str(caught.value.body)


# -- tokenizer routes ----------------------------------------------------------------------------------------------


def test_tokenize_and_detokenize_round_trip(url: str) -> None:
    text = "Hello there, general Kenobi"
    answer = post(url, "/tokenize", {"model": "m", "prompt": text, "return_token_strs": True}).json()
    assert set(answer) == {"count", "max_model_len", "tokens", "token_strs"} and answer["max_model_len"] == 4096
    assert answer["count"] == len(answer["tokens"]) == len(answer["token_strs"]) > 3
    assert post(url, "/detokenize", {"model": "m", "tokens": answer["tokens"]}).json() == {"prompt": text}
    chat = post(url, "/tokenize", {"messages": [{"role": "user", "content": text}]}).json()
    assert chat["token_strs"] is None and chat["count"] == count(url, prompt=text, add_special_tokens=False)
    missing = post(url, "/detokenize", {"model": "nope", "tokens": [1]})
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "NotFoundError"
    assert post(url, "/detokenize", {"tokens": [10**9]}).status_code == 400
    info = httpx.get(f"{url}/tokenizer_info").json()
    assert isinstance(info["tokenizer_class"], str)


def test_tokenizer_info_is_off_by_default_as_in_vllm() -> None:
    with ThreadServer(create_emulator_app(EmulatorConfig(model="m"))) as server:
        assert httpx.get(f"{server.url}/tokenizer_info").status_code == 404


def test_the_tokenizer_gives_real_tokens(tokenizer_dir: str) -> None:
    real = Tokenizer.from_file(f"{tokenizer_dir}/tokenizer.json")
    cfg = EmulatorConfig(model="m", ttft_ms=0, itl_ms=0, tokenizer=tokenizer_dir, tokenizer_info=True)
    text = "The quick fox counts tokens like this: unbelievable!"
    with ThreadServer(create_emulator_app(cfg)) as server:
        answer = post(server.url, "/tokenize", {"prompt": text, "return_token_strs": True}).json()
        chat = post(server.url, CHAT, {"messages": [{"role": "user", "content": text}], "max_tokens": 2}).json()
        info = httpx.get(f"{server.url}/tokenizer_info").json()
    expected = real.encode(text)
    assert answer["tokens"] == expected.ids and answer["token_strs"] == expected.tokens
    assert chat["usage"]["prompt_tokens"] == len(real.encode(text, add_special_tokens=False).ids)
    assert info["eos_token"] == "<|im_end|>" and "vocab_file" not in info


def test_a_tokenizer_directory_without_a_tokenizer_fails_at_startup(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match=r"no tokenizer\.json"):
        create_emulator_app(EmulatorConfig(model="m", tokenizer=str(tmp_path)))


def test_continuous_usage_stats_put_the_usage_so_far_on_every_chunk_through_the_gateway() -> None:
    """GuideLLM asks for ``stream_options.continuous_usage_stats``: vLLM then puts each choice's usage so far on
    every chunk (the role chunk's at 0), before the usage-only chunk with the totals. The gateway relays them and
    still counts the call's tokens once."""
    from gateway.app import create_app
    from tests.conftest import card, settings_for
    from tests.servers import metric

    cfg = EmulatorConfig(model="m", ttft_ms=5, itl_ms=1, output_tokens=5)
    with ThreadServer(create_emulator_app(cfg)) as emu:
        settings = settings_for([{"name": "b", "base_url": emu.url, "models": ["m"]}],
                                [card("m", "qwen3", "Alibaba", "CN", aliases=[])])  # fmt: skip
        with ThreadServer(create_app(settings)) as gw:
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                    "stream_options": {"include_usage": True, "continuous_usage_stats": True}}  # fmt: skip
            lines = httpx.post(f"{gw.url}/v1/chat/completions", json=body, timeout=30).text.splitlines()
            text = httpx.get(f"{gw.url}/metrics").text
    chunks = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
    made = [c["usage"]["completion_tokens"] for c in chunks if c["choices"]]
    assert made == [0, 1, 2, 3, 4, 5], made
    assert all(c["usage"]["total_tokens"] == c["usage"]["prompt_tokens"] + c["usage"]["completion_tokens"]
               for c in chunks)  # fmt: skip
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    assert metric(text, "gateway_completion_tokens_total", model="m") == 5
    assert metric(text, "gateway_time_to_first_token_seconds_count", model="m") == 1


def test_unknown_routes_and_odd_field_names_answer_as_vllm_does() -> None:
    """Found by the OpenAPI fuzz test: a route the emulator does not serve answers FastAPI's JSON 404 (as vLLM), so
    the gateway passes it through rather than calling it a bad gateway; a field name no header can carry (outside
    latin-1, control characters) is named escaped, never a 500."""
    cfg = EmulatorConfig(model="m", ttft_ms=1, itl_ms=1, output_tokens=2)
    with ThreadServer(create_emulator_app(cfg)) as emu:
        missing = httpx.get(f"{emu.url}/tokenizer_info")
        assert missing.status_code == 404 and missing.json() == {"detail": "Not Found"}
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "\U0010b3dd\n\u00e9": 1}
        r = httpx.post(f"{emu.url}/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.headers["x-emulator-ignored"] == "\\udbec\\udfdd\\n\\u00e9"
