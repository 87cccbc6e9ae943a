"""Rate sweeps: step the open-loop rate per model (locust headless in a subprocess per step) until saturation or
an SLO breach, then report each model's max sustainable rate and its GPU cost per 1M output tokens there.

A step *saturates* when the achieved rate is under 95% of the intended rate (``arrival.check_rate``) or its p95
TTFT is more than 10x the first step's. It *breaches* the SLOs when fewer than 90% of its requests met every SLO
given (``--slo-ttft``, ``--slo-ttfat`` on the time to first answer token, ``--slo-tpot``). The max sustainable
rate is the highest step that did neither; a model's sweep stops at its first bad step.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gateway.compare.runs import fetch_cards
from gateway.cost import gpu_usd_per_1m_output
from loadtests.results import read_stats, read_summary

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
REPO = LOCUSTFILE.parent.parent
TTFT_GROWTH = 10.0
SLO_ATTAINMENT = 0.9


@dataclass(slots=True)
class Step:
    model: str
    rate: float
    intended_rps: float
    achieved_rps: float
    requests: int
    failures: int
    ttft_p50_s: float
    ttft_p95_s: float
    ttfat_p50_s: float  # time to first answer token (after any thinking); TTFT for a model that does not think
    ttfat_p95_s: float
    tpot_p50_s: float
    tpot_p95_s: float
    output_tps: float
    goodput_rps: float
    slo_attainment: float
    saturated: bool
    slo_breach: bool
    warning: str | None


def locust_command(
    host: str, model: str, rate: float, duration: float, prefix: Path, *, arrival: str = "poisson",
    slo_ttft: float = 0.0, slo_tpot: float = 0.0, slo_ttfat: float = 0.0, extra: Sequence[str] = (),
) -> list[str]:  # fmt: skip
    return [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", host,
        "-u", "1", "-r", "1", "-t", f"{max(1, round(duration))}s", "--csv", str(prefix), "--only-summary",
        "--models", model, "--arrival", arrival, "--rate", str(rate),
        "--slo-ttft", str(slo_ttft), "--slo-ttfat", str(slo_ttfat), "--slo-tpot", str(slo_tpot),
        "--summary-json", f"{prefix}_summary.json",
        "--loglevel", "WARNING", *extra,
    ]  # fmt: skip


def run_step(host: str, model: str, rate: float, duration: float, prefix: Path, **kwargs: Any) -> Step:
    cmd = locust_command(host, model, rate, duration, prefix, **kwargs)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=duration + 60, check=False)
    if proc.returncode not in (0, 1):  # 1: locust's "some requests failed"
        raise RuntimeError(f"locust exited with {proc.returncode}: {proc.stderr[-2000:]}")
    stats, summary = read_stats(prefix), read_summary(f"{prefix}_summary.json")
    m = summary["models"].get(model, {})
    get = stats.get
    ttft, tpot, tokens, req, good = (get(f"{k} {model}") for k in ("TTFT", "TPOT", "tokens", "request", "goodput"))
    ttfat = get(f"TTFAT {model}")
    completed = m.get("completed", 0)
    achieved = float(m.get("achieved_rps", 0.0))
    attainment = (good.count / completed) if good and completed else 0.0
    slo_set = bool(kwargs.get("slo_ttft") or kwargs.get("slo_tpot") or kwargs.get("slo_ttfat"))
    return Step(
        model=model,
        rate=rate,
        intended_rps=float(m.get("intended_rps") or 0.0),
        achieved_rps=achieved,
        requests=req.count if req else 0,
        failures=req.failures if req else 0,
        ttft_p50_s=ttft.p50 / 1000 if ttft else 0.0,
        ttft_p95_s=ttft.p95 / 1000 if ttft else 0.0,
        ttfat_p50_s=ttfat.p50 / 1000 if ttfat else 0.0,
        ttfat_p95_s=ttfat.p95 / 1000 if ttfat else 0.0,
        tpot_p50_s=tpot.p50 / 1000 if tpot else 0.0,
        tpot_p95_s=tpot.p95 / 1000 if tpot else 0.0,
        output_tps=achieved * (tokens.mean_size if tokens else 0.0),
        goodput_rps=achieved * attainment if slo_set else achieved,
        slo_attainment=attainment if slo_set else 1.0,
        saturated=not m.get("ok", False),
        slo_breach=slo_set and attainment < SLO_ATTAINMENT,
        warning=summary.get("warning"),
    )


def sweep(
    host: str, models: Sequence[str], rates: Sequence[float], duration: float, out: Path, *,
    slo_ttft: float = 0.0, slo_tpot: float = 0.0, slo_ttfat: float = 0.0, arrival: str = "poisson",
    extra: Sequence[str] = (),
) -> dict[str, Any]:  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    cards = fetch_cards(host)
    result: dict[str, Any] = {
        "host": host, "rates": list(rates), "duration_s": duration, "arrival": arrival,
        "slo": {"ttft_s": slo_ttft or None, "ttfat_s": slo_ttfat or None, "tpot_s": slo_tpot or None},
        "models": {},
    }  # fmt: skip
    for model in models:
        steps: list[Step] = []
        for rate in sorted(rates):
            prefix = out / "runs" / f"{model.replace('/', '_')}_{rate:g}"
            prefix.parent.mkdir(parents=True, exist_ok=True)
            step = run_step(host, model, rate, duration, prefix, arrival=arrival, slo_ttft=slo_ttft,
                            slo_tpot=slo_tpot, slo_ttfat=slo_ttfat, extra=extra)  # fmt: skip
            if steps and steps[0].ttft_p95_s > 0 and step.ttft_p95_s > TTFT_GROWTH * steps[0].ttft_p95_s:
                step.saturated = True
            steps.append(step)
            state = "SATURATED" if step.saturated else "SLO BREACH" if step.slo_breach else "ok"
            print(
                f"{model} @ {rate:g} req/s: achieved {step.achieved_rps:.2f}, TTFT p95 {step.ttft_p95_s * 1000:.0f} "
                f"ms, {step.output_tps:.1f} out tok/s, {state}",
                file=sys.stderr, flush=True,
            )  # fmt: skip
            if step.warning:
                print(step.warning, file=sys.stderr, flush=True)
            if step.saturated or step.slo_breach:
                break
        good = [s for s in steps if not s.saturated and not s.slo_breach]
        best = good[-1] if good else None
        card = cards.get(model)
        per_hour = card.gpu.cost_per_hour_usd if card and card.gpu else 0.0
        result["models"][model] = {
            "origin": card.origin if card else "unknown",
            "family": card.family if card else "unknown",
            "gpu_cost_per_hour_usd": per_hour,
            "steps": [asdict(s) for s in steps],
            "max_sustainable_rps": best.rate if best else None,
            "output_tps_at_max": best.output_tps if best else None,
            "usd_per_1m_output": gpu_usd_per_1m_output(per_hour, best.output_tps) if best and per_hour else None,
        }
    return result
