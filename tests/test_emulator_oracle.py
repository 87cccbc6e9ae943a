"""The emulator as an oracle (issue #16 item 7): with ``--answers`` it answers graded prompts right with probability
``--accuracy``, decided per prompt by ``is_correct(seed, prompt, accuracy)``, and wrong ones fail as designed, so
tests check measured accuracy against known truth exactly. Every item of both built-in sets goes through a real
emulator (streamed and not) and the real grader; then the answer's tokens, timing and thinking, the misses, the
command line and the devstack config."""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway import cli
from gateway.compare.grading import TOOL_ERRORS, Answer, ToolCall, expectation_of, grade
from gateway.config import ConfigError
from gateway.devstack import stack
from gateway.devstack.emulator import EmulatorConfig, create_emulator_app
from gateway.devstack.emulator.oracle import Oracle, is_correct, tool_failure, unit
from gateway.devstack.emulator.tokens import WORDS, WordTokens
from tests.conftest import card, settings_for
from tests.servers import REPO, ThreadServer, emulator_process, emulators

SETS = [REPO / "gateway" / "compare" / "graded" / f"{lang}.jsonl" for lang in ("en", "zh")]
ITEMS = [json.loads(line) for path in SETS for line in path.read_text(encoding="utf-8").splitlines() if line]
RUNS = {"right": (1.0, 0), "wrong": (0.0, 0), "half": (0.5, 7)}  # accuracy, seed
NUMBER = next(item for item in ITEMS if item["scorer"] == "number" and item["expected"] == 28)  # en-arith-01
TOOL = next(item for item in ITEMS if item["scorer"] == "tool_call")


def prompt_of(item: dict[str, Any]) -> str:
    return str(item["prompt"])


def request(item: dict[str, Any], stream: bool, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": item["prompt"]}], "stream": stream}
    if item.get("tools"):
        body |= {"tools": item["tools"], "tool_choice": "auto"}
    return body | extra


def read_stream(response: httpx.Response) -> tuple[Answer, str, dict[str, Any] | None, dict[str, str]]:
    """The answer as a client assembles it from the chunks: content concatenated, tool calls by index (name, and
    the arguments' pieces joined); the last finish reason, the usage chunk, and the reasoning."""
    text, reasoning = "", ""
    calls: dict[int, ToolCall] = {}
    finish, usage = "", None
    for line in response.iter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        usage = chunk.get("usage") or usage
        for choice in chunk["choices"]:
            delta = choice["delta"]
            text += delta.get("content") or ""
            reasoning += delta.get("reasoning") or ""
            for call in delta.get("tool_calls") or []:
                got = calls.setdefault(call["index"], ToolCall())
                got.name += call.get("function", {}).get("name") or ""
                got.arguments += call.get("function", {}).get("arguments") or ""
            finish = choice.get("finish_reason") or finish
    return Answer(text, [calls[i] for i in sorted(calls)]), finish, usage, {"reasoning": reasoning}


def ask(
    url: str, body: dict[str, Any], client: httpx.Client | None = None
) -> tuple[Answer, str, httpx.Response, dict[str, Any] | None]:
    """One chat call, streamed or not: the answer, its finish reason, the response and the usage."""
    with contextlib.ExitStack() as stack:
        client = client or stack.enter_context(httpx.Client(timeout=30))
        if body.get("stream"):
            with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
                assert response.status_code == 200, response.read()
                answer, finish, usage, _ = read_stream(response)
            return answer, finish, response, usage
        response = client.post(f"{url}/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        message = choice["message"]
        calls = [ToolCall(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls") or []]
        return Answer(message["content"] or "", calls), choice["finish_reason"], response, response.json()["usage"]


@pytest.fixture(scope="module")
def answers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both built-in sets in one answers file."""
    path = tmp_path_factory.mktemp("oracle") / "answers.jsonl"
    path.write_text("".join(p.read_text(encoding="utf-8") for p in SETS), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def urls(answers: Path) -> Iterator[dict[str, str]]:
    fast: dict[str, Any] = {"ttft_ms": 0, "itl_ms": 0, "answers": str(answers)}
    configs = {name: EmulatorConfig(model="m", accuracy=a, seed=s, **fast) for name, (a, s) in RUNS.items()}
    configs["timed"] = EmulatorConfig(model="m", ttft_ms=40, itl_ms=10, answers=str(answers))
    configs["thinking"] = EmulatorConfig(model="m", ttft_ms=0, itl_ms=0, reasoning_tokens=3, answers=str(answers))
    configs["think-tags"] = EmulatorConfig(
        model="m", ttft_ms=0, itl_ms=0, reasoning_tokens=3, think_in_content=True, answers=str(answers)
    )
    with emulators(configs) as urls:
        yield urls


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("run", list(RUNS))
def test_every_built_in_item_is_graded_as_the_oracle_decides(urls: dict[str, str], run: str, stream: bool) -> None:
    accuracy, seed = RUNS[run]
    kinds: list[str] = []
    right = 0
    with httpx.Client(timeout=30) as client:
        for item in ITEMS:
            exp = expectation_of(item)
            assert exp is not None
            answer, finish, response, _ = ask(urls[run], request(item, stream), client)
            result = grade(exp, answer)
            truth = is_correct(seed, prompt_of(item), accuracy)
            assert result.correct is truth, (item["id"], answer, result)
            assert response.headers["x-emulator-oracle"] == ("hit-correct" if truth else "hit-wrong")
            right += truth
            if exp.scorer == "tool_call" and not truth:
                kinds.append(result.kind)
                assert result.kind == tool_failure(seed, prompt_of(item), 0.5), item["id"]
            assert finish == ("tool_calls" if answer.tool_calls else "stop"), item["id"]
    if run == "right":
        assert right == len(ITEMS)
    elif run == "wrong":
        assert right == 0
        assert sorted(set(kinds)) == sorted(TOOL_ERRORS)  # every way a tool call fails shows up
    else:
        assert right == sum(is_correct(7, prompt_of(i), 0.5) for i in ITEMS)
        assert 0.3 * len(ITEMS) < right < 0.7 * len(ITEMS)


def test_is_correct_is_a_stable_pure_function_of_seed_prompt_and_accuracy() -> None:
    prompts = [prompt_of(i) for i in ITEMS]
    decided = [is_correct(7, p, 0.5) for p in prompts]
    assert decided == [is_correct(7, p, 0.5) for p in prompts]  # repeats agree
    assert decided == [is_correct(7, f"  {p}\n", 0.5) for p in prompts]  # surrounding white space does not count
    assert decided != [is_correct(8, p, 0.5) for p in prompts]  # another seed: another model
    # a higher accuracy keeps every right answer right; 0 and 1 are never and always
    for low, high in ((0.2, 0.5), (0.5, 0.9)):
        assert all(is_correct(7, p, high) for p in prompts if is_correct(7, p, low))
    assert not any(is_correct(7, p, 0.0) for p in prompts) and all(is_correct(7, p, 1.0) for p in prompts)
    # the draw is SHA-256 of the seed and prompt: the same in every process (no PYTHONHASHSEED dependence)
    digest = hashlib.sha256(b"0\x00\x00What is 2 + 2?").digest()
    assert unit(0, " What is 2 + 2? ") == int.from_bytes(digest[:8], "big") / 2**64
    assert 0 <= unit(0, "x") < 1
    assert {tool_failure(0, p, 1.0) for p in prompts} == {"invalid_json", "unknown_tool", "schema_mismatch"}
    assert {tool_failure(0, p, 0.0) for p in prompts} == {"wrong_call", "no_call"}


def test_the_answer_is_streamed_as_tokens_at_the_configured_timing(urls: dict[str, str]) -> None:
    expected = "The answer is 28."
    count = len(WordTokens(4096).encode(expected))
    assert count == 4
    start = time.perf_counter()
    body = request(NUMBER, True, stream_options={"include_usage": True})
    with httpx.stream("POST", f"{urls['timed']}/v1/chat/completions", json=body, timeout=30) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    elapsed = time.perf_counter() - start
    pieces = [
        c["choices"][0]["delta"]["content"] for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")
    ]
    assert "".join(pieces) == expected and len(pieces) == count
    assert chunks[-1]["usage"]["completion_tokens"] == count
    assert elapsed >= (40 + 10 * (count - 1)) / 1000
    # non-streamed: the same usage; max_tokens cuts the answer short, as it would a model's
    whole = httpx.post(f"{urls['timed']}/v1/chat/completions", json=request(NUMBER, False), timeout=30).json()
    assert whole["choices"][0]["message"]["content"] == expected
    assert whole["usage"]["completion_tokens"] == count
    cut = httpx.post(f"{urls['right']}/v1/chat/completions", json=request(NUMBER, False, max_tokens=2), timeout=30)
    assert cut.json()["choices"][0]["message"]["content"] == "The answer"
    assert cut.json()["choices"][0]["finish_reason"] == "length"
    assert cut.json()["usage"]["completion_tokens"] == 2
    # ignore_eos: the answer, then filler up to max_tokens (the grader reads the first number)
    padded = request(NUMBER, False, max_tokens=10, ignore_eos=True)
    body = httpx.post(f"{urls['right']}/v1/chat/completions", json=padded, timeout=30).json()
    assert body["choices"][0]["message"]["content"].startswith(expected)
    assert body["usage"]["completion_tokens"] == 10


def test_thinking_comes_first_and_the_oracle_answers_after_it(urls: dict[str, str]) -> None:
    exp = expectation_of(NUMBER)
    assert exp is not None
    with httpx.stream("POST", f"{urls['thinking']}/v1/chat/completions", json=request(NUMBER, True)) as response:
        answer, finish, _, extra = read_stream(response)
    assert extra["reasoning"] and answer.text == "The answer is 28." and finish == "stop"
    whole = httpx.post(f"{urls['thinking']}/v1/chat/completions", json=request(NUMBER, False)).json()
    assert whole["usage"]["completion_tokens_details"]["reasoning_tokens"] == 3
    assert whole["usage"]["completion_tokens"] == 3 + 4
    tagged, _, _, _ = ask(urls["think-tags"], request(NUMBER, False))
    assert tagged.text.startswith("<think>") and tagged.text.endswith("</think>\n\nThe answer is 28.")
    assert grade(exp, tagged).correct
    # a tool call: thinking with a parser, none without (as the emulator constrains calls without one)
    tool_exp = expectation_of(TOOL)
    assert tool_exp is not None
    for name in ("thinking", "think-tags"):
        call, finish, _, _ = ask(urls[name], request(TOOL, True))
        assert grade(tool_exp, call).correct and finish == "tool_calls"


def test_prompts_it_does_not_know_are_answered_as_without_it(urls: dict[str, str]) -> None:
    url = urls["right"]
    other = {"model": "m", "messages": [{"role": "user", "content": "Tell me a story"}]}
    response = httpx.post(f"{url}/v1/chat/completions", json=other)
    assert response.headers["x-emulator-oracle"] == "miss"
    assert response.json()["choices"][0]["message"]["content"].split()[0] in WORDS
    # a tool prompt without its tools, or with a call forced by tool_choice: the free choice is what it grades
    for body in (
        {"model": "m", "messages": [{"role": "user", "content": TOOL["prompt"]}]},
        request(TOOL, False, tool_choice="required"),
        request(NUMBER, False, tool_choice="required", tools=TOOL["tools"]),
    ):
        assert httpx.post(f"{url}/v1/chat/completions", json=body).headers["x-emulator-oracle"] == "miss"
    # the last user message is the prompt: earlier turns do not matter
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": NUMBER["prompt"]}]},
    ]
    hit = httpx.post(f"{url}/v1/chat/completions", json={"model": "m", "messages": turns})
    assert hit.headers["x-emulator-oracle"] == "hit-correct"
    assert hit.json()["choices"][0]["message"]["content"] == "The answer is 28."
    # completions: each prompt by itself
    both = {"model": "m", "prompt": [NUMBER["prompt"], "Once upon a time"], "max_tokens": 8}
    response = httpx.post(f"{url}/v1/completions", json=both)
    assert response.headers["x-emulator-oracle"] == "hit-correct,miss"
    assert response.json()["choices"][0]["text"] == "The answer is 28."
    tool_prompt = httpx.post(f"{url}/v1/completions", json={"model": "m", "prompt": TOOL["prompt"]})
    assert tool_prompt.headers["x-emulator-oracle"] == "miss"
    # without --answers there is no oracle and no header
    with ThreadServer(create_emulator_app(EmulatorConfig(model="m", ttft_ms=0, itl_ms=0))) as plain:
        assert "x-emulator-oracle" not in httpx.post(f"{plain.url}/v1/chat/completions", json=other).headers


def test_lines_it_cannot_answer_are_misses_and_bad_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    lines = [
        {"prompt": "Say hi", "scorer": "regex", "expected": "h.*"},
        {"prompt": "Name a colour", "scorer": "exact", "expected": ["red", "blue"]},
        {"messages": [{"role": "user", "content": " Capital of France? "}], "scorer": "contains", "expected": "Paris"},
        {"prompt": "Tell a joke"},
        {"prompt": "Make JSON", "scorer": "json_schema", "schema": {"type": "object", "required": ["a"]}},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    oracle = Oracle.load(path, 0, 0.0, 0.5)
    assert sorted(oracle.entries) == ["Capital of France?", "Make JSON", "Name a colour"]
    assert (oracle.skipped, oracle.ungraded) == (1, 1)
    for entry in oracle.entries.values():
        assert grade(entry.expectation, entry.answer).correct is False
    right = Oracle.load(path, 0, 1.0, 0.5)
    assert all(grade(e.expectation, e.answer).correct for e in right.entries.values())
    assert right.entries["Name a colour"].answer.text == "red"

    bad = {
        "not JSON": ("{nope", ":1: not JSON"),
        "unknown scorer": (json.dumps({"prompt": "x", "scorer": "vibes", "expected": 1}), ":1: unknown scorer"),
        "no prompt": (json.dumps({"scorer": "number", "expected": 1}), ":1: needs 'prompt'"),
        "bad number": (json.dumps({"prompt": "x", "scorer": "number", "expected": "many"}), ":1: scorer 'number'"),
        "twice": (json.dumps({"prompt": "x", "expected": "a"}) + "\n" + json.dumps({"prompt": " x", "expected": "b"}),
                  ":2: the same prompt as line 1"),
        "nothing to answer": (json.dumps({"prompt": "x"}), "no prompt the oracle can answer"),
    }  # fmt: skip
    for name, (text, message) in bad.items():
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            Oracle.load(path, 0, 1.0, 0.5)
        with pytest.raises(ValueError, match=message):
            create_emulator_app(EmulatorConfig(model="m", answers=str(path)))
        assert name


def test_the_command_line_parses_the_flags_and_refuses_bad_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = cli.build_parser().parse_args(
        [
            "emulate",
            "--model",
            "m",
            "--answers",
            "a.jsonl",
            "--accuracy",
            "0.8",
            "--seed",
            "3",
            "--tool-error-rate",
            "0.2",
        ]
    )
    assert (args.answers, args.accuracy, args.seed, args.tool_error_rate) == ("a.jsonl", 0.8, 3, 0.2)
    defaults = cli.build_parser().parse_args(["emulate", "--model", "m"])
    assert (defaults.answers, defaults.accuracy, defaults.tool_error_rate) == (None, 1.0, 0.5)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"prompt": "x", "expected": "a"})
        + "\n"
        + json.dumps({"prompt": "y", "scorer": "choice", "expected": "Z"})
    )
    assert cli.main(["emulate", "--model", "m", "--answers", str(bad)]) == 2
    assert f"answers {bad}:2: scorer 'choice'" in capsys.readouterr().err
    assert cli.main(["emulate", "--model", "m", "--answers", str(tmp_path / "missing.jsonl")]) == 2
    assert "cannot read" in capsys.readouterr().err
    for flag, value in (
        ("--accuracy", "1.5"),
        ("--accuracy", "-0.1"),
        ("--accuracy", "nan"),
        ("--tool-error-rate", "2"),
    ):
        assert cli.main(["emulate", "--model", "m", flag, value]) == 2
        assert "must be between 0 and 1" in capsys.readouterr().err


def test_a_devstack_config_passes_the_oracle_to_its_emulator() -> None:
    oracle = {"answers": "graded.jsonl", "accuracy": 0.75, "seed": 11, "tool_error_rate": 0.25}
    backend = {"name": "b", "base_url": "http://127.0.0.1:1", "models": ["m"], "emulator": oracle}
    cards = [card("m", "qwen3", "Alibaba", "CN")]
    argv = stack.backend_argv("emulated", settings_for([backend], cards).backends[0], 9, 2)
    parsed = cli.build_parser().parse_args(argv[argv.index("emulate") :])
    assert (parsed.answers, parsed.accuracy, parsed.seed, parsed.tool_error_rate) == ("graded.jsonl", 0.75, 11, 0.25)
    # without a seed of its own, a backend's emulator is seeded by its position, as before; no answers: no oracle
    plain = {**backend, "emulator": {"ttft_ms": 10}}
    argv = stack.backend_argv("emulated", settings_for([plain], cards).backends[0], 9, 2)
    parsed = cli.build_parser().parse_args(argv[argv.index("emulate") :])
    assert (parsed.seed, parsed.answers, parsed.accuracy) == (2, None, 1.0)
    for field, value in (("accuracy", 1.5), ("tool_error_rate", -1)):
        with pytest.raises(ConfigError, match=field):
            settings_for([{**backend, "emulator": {**oracle, field: value}}], cards)


def test_gateway_emulate_answers_as_two_known_models() -> None:
    """The command itself: two emulators on the same prompts, each right exactly where ``is_correct`` says."""
    items = [i for i in ITEMS if i["id"].startswith("en-")]
    for seed, accuracy in ((3, 0.5), (4, 0.8)):
        options: dict[str, float | str] = {"answers": str(SETS[0]), "accuracy": accuracy, "seed": seed}
        with emulator_process("m", ttft_ms=0, itl_ms=0, **options) as url, httpx.Client(timeout=30) as client:
            for item in items:
                exp = expectation_of(item)
                assert exp is not None
                answer, _, _, _ = ask(url, request(item, False), client)
                assert grade(exp, answer).correct is is_correct(seed, prompt_of(item), accuracy), item["id"]
