"""Cost math (pure functions; see docs/measurement.md, "Cost").

Two bases:

- list price: usage x the model card's $ per 1M input/output tokens: what the same tokens would cost from an
  API provider. Attributable per request.
- GPU time: (GPUs x $/GPU-hour) / (output tokens/s x 3600) x 1e6, from the token rate actually served over a
  window. Never a request's own wall-clock time: with continuous batching that overcounts by the batch size.
  Where one call needs a number of its own (fan-out, mirroring, the results store), ``gpu_usd_of_call`` gives
  its share: its wall-clock time divided by the mean number of calls its backend was serving meanwhile.
"""

from __future__ import annotations

from gateway.config import ListPrice

MILLION = 1_000_000.0


def list_price_usd(price: ListPrice | None, prompt_tokens: int, completion_tokens: int) -> float:
    if price is None:
        return 0.0
    return (prompt_tokens * price.input_per_1m + completion_tokens * price.output_per_1m) / MILLION


def blended_price_per_1m(price: ListPrice) -> float:
    """Artificial Analysis' blend: three input tokens for every output token."""
    return (3 * price.input_per_1m + price.output_per_1m) / 4


def gpu_usd_per_1m_output(cost_per_hour_usd: float, output_tokens_per_s: float) -> float | None:
    """$ per 1M output tokens on the GPU-time basis, or None when nothing was served (cost with no tokens)."""
    if output_tokens_per_s <= 0:
        return None
    return cost_per_hour_usd / (output_tokens_per_s * 3600.0) * MILLION


def gpu_usd_of_call(cost_per_hour_usd: float, elapsed_s: float, mean_in_flight: float) -> float:
    """One call's share of its backend's GPU cost: the backend's $/s x the call's wall-clock time / the mean
    number of requests the backend served meanwhile (a continuously batched GPU is shared, not rented per call)."""
    return cost_per_hour_usd / 3600.0 * elapsed_s / max(1.0, mean_in_flight)
