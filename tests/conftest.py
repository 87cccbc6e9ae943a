from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from gateway.app import create_app
from gateway.config import Settings, parse_settings
from gateway.devstack.emulator import EmulatorConfig, create_emulator_app
from tests.servers import ThreadServer

FAMILIES = (
    # model id, family, vendor, origin, backend name
    ("emu/qwen3", "qwen3", "Alibaba", "CN", "qwen-a"),
    ("emu/deepseek", "deepseek", "DeepSeek", "CN", "deepseek-a"),
    ("emu/llama", "llama", "Meta", "US", "llama-a"),
)


def card(model: str, family: str, vendor: str, origin: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": model,
        "family": family,
        "vendor": vendor,
        "origin": origin,
        "params_b": 8,
        "gpu": {"type": "H100", "count": 2, "usd_per_hour": 2.0},
        "list_price": {"input_per_1m": 1.0, "output_per_1m": 4.0},
        "aliases": [family],
        **extra,
    }


def settings_for(backends: list[dict[str, Any]], models: list[dict[str, Any]], **gateway: Any) -> Settings:
    return parse_settings(
        {
            "gateway": {"health_check_interval_s": 0.2, "results_db": ":memory:", **gateway},
            "models": models,
            "backends": backends,
        },
        "test",
    )


@dataclass
class Stack:
    url: str
    settings: Settings
    emulators: dict[str, ThreadServer]

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    """Three emulators (fast: TTFT 30 ms, ITL 5 ms, 8 tokens) and a gateway in front of them, on real sockets."""
    servers: dict[str, ThreadServer] = {}
    try:
        for model, *_, backend in FAMILIES:
            cfg = EmulatorConfig(model=model, ttft_ms=30, itl_ms=5, output_tokens=8)
            servers[backend] = ThreadServer(create_emulator_app(cfg)).__enter__()
        settings = settings_for(
            [{"name": b, "base_url": servers[b].url, "models": [m]} for m, *_, b in FAMILIES],
            [card(m, f, v, o) for m, f, v, o, _ in FAMILIES],
        )
        with ThreadServer(create_app(settings)) as gw:
            yield Stack(gw.url, settings, servers)
    finally:
        for server in servers.values():
            server.__exit__()


# A real PostgreSQL server for the results-store tests (tests/postgres.py): postgres, pg_url, store_url.
from tests.postgres import pg_url, postgres, store_url  # noqa: E402, F401
