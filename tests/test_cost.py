from __future__ import annotations

import pytest

from gateway.config import ListPrice
from gateway.cost import blended_price_per_1m, gpu_usd_of_call, gpu_usd_per_1m_output, list_price_usd


def test_list_price() -> None:
    price = ListPrice(input_per_1m=0.5, output_per_1m=2.0)
    assert list_price_usd(price, 1_000_000, 0) == pytest.approx(0.5)
    assert list_price_usd(price, 200, 100) == pytest.approx((200 * 0.5 + 100 * 2.0) / 1e6)
    assert list_price_usd(None, 200, 100) == 0.0
    assert blended_price_per_1m(price) == pytest.approx((3 * 0.5 + 2.0) / 4)


@pytest.mark.parametrize(
    ("per_hour", "tok_s", "expected"),
    [
        (2.0, 1000.0, 2.0 / 3.6e6 * 1e6),  # $2/h at 1000 tok/s: $0.5556 per 1M
        (8 * 2.5, 2000.0, 20.0 / (2000 * 3600) * 1e6),
        (2.0, 0.0, None),  # idle: no tokens, no per-token price
    ],
)
def test_gpu_time_basis(per_hour: float, tok_s: float, expected: float | None) -> None:
    assert gpu_usd_per_1m_output(per_hour, tok_s) == (pytest.approx(expected) if expected else None)


def test_gpu_cost_of_a_call_is_its_share_of_a_batched_gpu() -> None:
    # 36 s on a $3.60/h backend that served 4 requests at a time on average: a quarter of $0.036
    assert gpu_usd_of_call(3.6, 36.0, 4.0) == pytest.approx(0.009)
    assert gpu_usd_of_call(3.6, 36.0, 0.5) == pytest.approx(0.036)  # never more than the whole GPU's time
