"""Held-out clients agree with the gateway (issue #14 item 7): GuideLLM and NVIDIA's AIPerf, pinned and each in a
virtualenv of its own, load the emulator through the gateway with the emulator's token counts (``usage``); their
request and token totals must equal the gateway's counters, and their TTFT and ITL means must line up with the
gateway's histograms and with the emulator's configured TTFT 100 ms and ITL 20 ms. docs/heldout-clients.md has the
versions, the bounds and the figures measured."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.heldout import (
    ITL_MS,
    MODEL,
    OUTPUT_TOKENS,
    TOKENIZER,
    TTFT_MS,
    Figures,
    client_program,
    emulator_ttft_ms,
    gateway_figures,
    run_client,
    stack,
)

REQUESTS = 24
CONCURRENCY = 2
# Bounds, in ms. Each client's TTFT starts before and ends after the gateway's, which starts before and ends after
# the emulator's, which is the configured 100 ms or more: an order that timing noise cannot break. The margins
# above are what a busy 2-core machine may add (measured: docs/heldout-clients.md).
SAME_CLOCK_MS = 1.0  # the order may be off by this much: clients stamp a request's start around its send
GATEWAY_TTFT_OVER_EMULATOR_MS = 30.0  # what the gateway adds (it controls this)
EMULATOR_TTFT_OVER_CONFIGURED_MS = 100.0  # what a loaded machine makes the emulator late by (seen: 35 ms)
CLIENT_TTFT_OVER_GATEWAY_MS = 40.0
# ITL: the emulator schedules every token against the request's start, so a late first token shortens the gaps
# after it, and a mean over 31 gaps moves by a delay / 31 only.
ITL_TOLERANCE_MS = 1.0


def agreement_problems(client: Figures, gateway: Figures, emulator_ttft: float) -> list[str]:
    """What in one client's figures disagrees with the gateway's and the emulator's (empty: they agree)."""
    problems = []
    for what in ("requests", "prompt_tokens", "completion_tokens"):
        if getattr(client, what) != getattr(gateway, what):
            problems.append(f"{what}: client {getattr(client, what)} != gateway {getattr(gateway, what)}")
    if gateway.requests != REQUESTS or gateway.completion_tokens != REQUESTS * OUTPUT_TOKENS:
        problems.append(f"the gateway saw {gateway.requests} requests, {gateway.completion_tokens} tokens")
    if not TTFT_MS - SAME_CLOCK_MS <= emulator_ttft <= gateway.ttft_ms + SAME_CLOCK_MS:
        problems.append(f"TTFT: emulator {emulator_ttft:.2f} ms not within [configured, gateway {gateway.ttft_ms:.2f}]")
    if gateway.ttft_ms - emulator_ttft > GATEWAY_TTFT_OVER_EMULATOR_MS:
        problems.append(f"TTFT: gateway {gateway.ttft_ms:.2f} ms, emulator {emulator_ttft:.2f}")
    if emulator_ttft - TTFT_MS > EMULATOR_TTFT_OVER_CONFIGURED_MS:
        problems.append(f"TTFT: emulator {emulator_ttft:.2f} ms, configured {TTFT_MS}")
    if not -SAME_CLOCK_MS <= client.ttft_ms - gateway.ttft_ms <= CLIENT_TTFT_OVER_GATEWAY_MS:
        problems.append(f"TTFT: client {client.ttft_ms:.2f} ms, gateway {gateway.ttft_ms:.2f}")
    for name, value in (("gateway", gateway.itl_ms), ("client", client.itl_ms)):
        if abs(value - ITL_MS) > ITL_TOLERANCE_MS:
            problems.append(f"ITL: {name} {value:.3f} ms, configured {ITL_MS}")
    if abs(client.itl_ms - gateway.itl_ms) > ITL_TOLERANCE_MS:
        problems.append(f"ITL: client {client.itl_ms:.3f} ms, gateway {gateway.itl_ms:.3f}")
    return problems


def report(name: str, client: Figures, gateway: Figures, emulator_ttft: float) -> str:
    return (
        f"{name}: TTFT client {client.ttft_ms:.2f} / gateway {gateway.ttft_ms:.2f} / emulator {emulator_ttft:.2f} / "
        f"configured {TTFT_MS} ms; ITL client {client.itl_ms:.3f} / gateway {gateway.itl_ms:.3f} / configured "
        f"{ITL_MS} ms; requests {client.requests}, tokens {client.prompt_tokens} + {client.completion_tokens}"
    )


def test_agreement_problems_sees_a_disagreement() -> None:
    """The check itself: the figures measured pass it, and each kind of disagreement is caught."""
    gateway = Figures(REQUESTS, 400, REQUESTS * OUTPUT_TOKENS, ttft_ms=104.7, itl_ms=20.0)
    client = Figures(REQUESTS, 400, REQUESTS * OUTPUT_TOKENS, ttft_ms=110.6, itl_ms=19.99)
    assert agreement_problems(client, gateway, emulator_ttft=101.0) == []
    wrong = {
        "a client counting the role-only chunk as the first token": replace(client, ttft_ms=1.5),
        "a client counting tokens itself": replace(client, completion_tokens=REQUESTS * OUTPUT_TOKENS + 7),
        "a request lost": replace(client, requests=REQUESTS - 1),
        "TPOT that includes the first token (GuideLLM's TPOT)": replace(client, itl_ms=(110.6 + 31 * 20) / 32),
        "ITL over a local tokenizer's count (39 tokens, not 32)": replace(client, itl_ms=31 * 20 / 38),
    }
    for what, figures in wrong.items():
        assert agreement_problems(figures, gateway, 101.0), what
    slow_gateway = replace(gateway, ttft_ms=101.0 + GATEWAY_TTFT_OVER_EMULATOR_MS + 5)
    assert agreement_problems(replace(client, ttft_ms=slow_gateway.ttft_ms + 2), slow_gateway, 101.0)
    assert agreement_problems(client, gateway, emulator_ttft=TTFT_MS - 5)  # the emulator faster than configured


@pytest.mark.slow
def test_guidellm_agrees_with_the_gateway(tmp_path: Path) -> None:
    """GuideLLM 0.8.1, concurrent profile, synthetic prompts, streaming chat. It always takes token counts from the
    server's usage (it asks for ``stream_options.include_usage``). Its ITL is (last token - first token) /
    (tokens - 1), averaged over every gap of every request: the gateway's pooled ITL histogram."""
    guidellm = client_program("guidellm", "guidellm")
    out = tmp_path / "guidellm.json"
    with stack(tmp_path) as servers:
        run_client(
            [
                str(guidellm),
                "run",
                f"--backend=kind=openai_http,target={servers.gateway},model={MODEL},validate_backend=false",
                f"--profile=kind=concurrent,streams={CONCURRENCY}",
                f"--constraint=kind=max_requests,count={REQUESTS}",
                f"--data=kind=synthetic_text,prompt_tokens=32,output_tokens={OUTPUT_TOKENS}",
                f"--tokenizer=kind=huggingface_auto,model={TOKENIZER}",
                "--seed=kind=static,value=1",
                f"--output=kind=json,path={out}",
                "--disable-console-interactive",
            ],
            tmp_path,
        )
        gateway = gateway_figures(servers.gateway_metrics(), itl="pooled")
        emulator_ttft = emulator_ttft_ms(servers.emulator_metrics())
    (benchmark,) = json.loads(out.read_text())["benchmarks"]
    metrics: dict[str, Any] = benchmark["metrics"]
    totals = metrics["request_totals"]
    assert totals["errored"] == totals["incomplete"] == 0, totals

    def done(name: str) -> dict[str, Any]:
        successful: dict[str, Any] = metrics[name]["successful"]
        return successful

    client = Figures(
        requests=totals["successful"],
        prompt_tokens=round(done("prompt_token_count")["total_sum"]),
        completion_tokens=round(done("output_token_count")["total_sum"]),
        ttft_ms=done("time_to_first_token_ms")["mean"],
        itl_ms=done("inter_token_latency_ms")["mean"],
    )
    print(report("GuideLLM", client, gateway, emulator_ttft))
    assert agreement_problems(client, gateway, emulator_ttft) == [], report("GuideLLM", client, gateway, emulator_ttft)


@pytest.mark.slow
def test_aiperf_agrees_with_the_gateway(tmp_path: Path) -> None:
    """AIPerf 0.13.0, fixed concurrency, synthetic prompts, streaming chat, ``--use-server-token-count`` (token
    counts from the server's usage, not its tokenizer). Its ITL is (E2E - TTFT) / (tokens - 1) a request, averaged
    over requests: the gateway's TPOT histogram."""
    aiperf = client_program("aiperf", "aiperf")
    artifacts = tmp_path / "aiperf"
    with stack(tmp_path) as servers:
        run_client(
            [
                str(aiperf),
                "profile",
                f"--model={MODEL}",
                f"--url={servers.gateway}",
                "--endpoint-type=chat",
                "--streaming",
                f"--tokenizer={TOKENIZER}",
                "--use-server-token-count",
                f"--request-count={REQUESTS}",
                f"--concurrency={CONCURRENCY}",
                "--isl=32",
                f"--osl={OUTPUT_TOKENS}",
                "--random-seed=1",
                "--ui-type=none",
                "--no-server-metrics",
                "--no-gpu-telemetry",
                f"--artifact-dir={artifacts}",
            ],
            tmp_path,
        )
        gateway = gateway_figures(servers.gateway_metrics(), itl="per_request")
        emulator_ttft = emulator_ttft_ms(servers.emulator_metrics())
    summary: dict[str, Any] = json.loads((artifacts / "profile_export_aiperf.json").read_text())
    assert summary["request_error_rate"]["avg"] == 0, summary["error_summary"]
    client = Figures(
        requests=round(summary["request_count"]["avg"]),
        prompt_tokens=round(summary["total_usage_prompt_tokens"]["avg"]),
        completion_tokens=round(summary["total_usage_completion_tokens"]["avg"]),
        ttft_ms=summary["time_to_first_token"]["avg"],
        itl_ms=summary["inter_token_latency"]["avg"],
    )
    assert round(summary["total_output_tokens"]["avg"]) == client.completion_tokens  # its OSL is the server's count
    print(report("AIPerf", client, gateway, emulator_ttft))
    assert agreement_problems(client, gateway, emulator_ttft) == [], report("AIPerf", client, gateway, emulator_ttft)


def test_a_missing_client_fails_the_test_naming_the_setup() -> None:
    with pytest.raises(pytest.fail.Exception, match=r"scripts/heldout-setup\.sh"):
        client_program("no-such-client", "no-such-program")
