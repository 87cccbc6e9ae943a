"""Held-out framework clients against the emulator through the gateway (issue #14 item 7): LangChain's
``ChatOpenAI.with_structured_output`` and ``bind_tools``, and an lm-eval loglikelihood task. Each client runs from a
virtualenv of its own (scripts/heldout-setup.sh).

They need the emulator to honour ``response_format`` (json_schema), ``tools``/``tool_choice`` (streamed
``tool_calls`` deltas) and completions ``echo`` + ``logprobs`` over a prompt given as token ids of the tokenizer the
client uses (the emulator runs with ``--tokenizer``); docs/heldout-clients.md says what each client sends."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.heldout import MODEL, TOKENIZER, client_program, run_client, stack
from tests.servers import REPO, metric

# lm-eval's task: three-way multiple choice, scored by the loglikelihood of each choice after the question.
DOCS: list[dict[str, Any]] = [
    {"question": "What colour is the sky on a clear day?", "choices": [" blue", " green", " red"], "answer": 0},
    {"question": "How many legs does a spider have?", "choices": [" six", " eight", " ten"], "answer": 1},
    {"question": "Which of these is a prime number?", "choices": [" four", " nine", " seven"], "answer": 2},
    {"question": "What do bees make?", "choices": [" honey", " milk", " silk"], "answer": 0},
]
TASK = "heldout_loglikelihood"


@pytest.mark.slow
def test_langchain_structured_output_and_tools(tmp_path: Path) -> None:
    """langchain-openai 1.7.4: ``with_structured_output(Weather)`` returns a validated ``Weather``;
    ``bind_tools([GetWeather], tool_choice="GetWeather")`` returns one ``GetWeather`` call with a string ``city``,
    answered whole and streamed (tool-call deltas assembled by LangChain), each ending with ``stop``: for a named
    ``tool_choice`` that is what OpenAI's API and vLLM 0.32 send (``tool_calls`` is for "auto" and "required")."""
    python = client_program("langchain", "python")
    with stack(tmp_path) as servers:
        out = run_client(
            [str(python), str(REPO / "tests" / "heldout_langchain.py"), f"{servers.gateway}/v1", MODEL], tmp_path
        )
        seen = metric(servers.gateway_metrics(), "gateway_requests_total", model=MODEL, endpoint="chat", status="200")
    result: dict[str, dict[str, Any]] = json.loads(out.splitlines()[-1])
    assert seen == 3, (seen, result)  # each step one call, through the gateway

    structured = result["structured"]
    assert "error" not in structured, structured
    assert structured["type"] == "Weather"
    assert isinstance(structured["value"]["city"], str) and isinstance(structured["value"]["raining"], bool)

    for name in ("tool_call", "streamed_tool_call"):
        answer = result[name]
        assert "error" not in answer, (name, answer)
        assert answer["finish_reason"] == "stop", (name, answer)
        (call,) = answer["tool_calls"]
        assert call["name"] == "GetWeather" and call["id"], (name, call)
        assert set(call["args"]) == {"city"} and isinstance(call["args"]["city"], str), (name, call)
    assert result["streamed_tool_call"]["chunks"] > 1  # it streamed


@pytest.mark.slow
def test_lm_eval_loglikelihood_task(tmp_path: Path) -> None:
    """lm-eval 0.4.13, ``local-completions`` with the tiny Qwen3's tokenizer: a local multiple-choice task (one
    loglikelihood request per choice: ``prompt`` as token ids, ``echo``, ``logprobs: 1``, ``max_tokens: 1``). Every
    choice gets a finite log-likelihood of at most 0, every request goes through the gateway once, and the accuracy
    lm-eval reports is the one its own per-sample log-likelihoods give."""
    lm_eval = client_program("lm-eval", "lm_eval")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tasks / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    task = {
        "task": TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": "choices",
        "doc_to_target": "answer",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    (tasks / f"{TASK}.yaml").write_text(yaml.safe_dump(task))
    results = tmp_path / "results"
    with stack(tmp_path) as servers:
        model_args = (
            f"model={MODEL},base_url={servers.gateway}/v1/completions,tokenizer_backend=huggingface,"
            f"tokenizer={TOKENIZER},tokenized_requests=True,num_concurrent=1,max_retries=1"
        )
        run_client(
            [
                str(lm_eval),
                "--model=local-completions",
                f"--model_args={model_args}",
                f"--tasks={TASK}",
                f"--include_path={tasks}",
                f"--limit={len(DOCS)}",
                f"--output_path={results}",
                "--log_samples",
            ],
            tmp_path,
        )
        seen = metric(
            servers.gateway_metrics(), "gateway_requests_total", model=MODEL, endpoint="completions", status="200"
        )
    choices = sum(len(doc["choices"]) for doc in DOCS)
    assert seen == choices  # one loglikelihood request per choice, each through the gateway

    (summary,) = results.rglob("results_*.json")
    accuracy = json.loads(summary.read_text())["results"][TASK]["acc,none"]
    (samples_file,) = results.rglob(f"samples_{TASK}_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(samples) == len(DOCS)
    right = 0
    for sample in samples:
        scores = [float(resp[0]) for resp in sample["filtered_resps"]]
        assert len(scores) == len(sample["doc"]["choices"]), sample
        assert all(math.isfinite(s) and s <= 0 for s in scores), scores
        right += int(scores.index(max(scores)) == sample["doc"]["answer"])
    assert accuracy == right / len(DOCS)
