"""Where the state shared by several gateway processes lives (README, "Scale-out: shared state"): the forms of
``gateway.results_db`` (a SQLite file, ``:memory:``, or a PostgreSQL URL) and ``gateway.limits_backend``
(``local`` or a Redis URL), checked when the settings are read. Neither URL may hold a password: it comes from the
environment variable ``results_db_password_env`` / ``limits_password_env`` names."""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Protocol
from urllib.parse import urlsplit


class StateSettings(Protocol):
    results_db: str
    results_db_password_env: str | None
    limits_backend: str
    limits_password_env: str | None


POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(value: str) -> bool:
    """A results store in PostgreSQL (anything else is a SQLite file, or ``:memory:``)."""
    return value.startswith(POSTGRES_SCHEMES)


def check_results_db(value: str) -> str:
    """``value`` if it is usable as ``gateway.results_db`` (or ``gateway compare --results-db``); a ValueError
    naming the setting when it is a PostgreSQL URL holding a password (the message does not repeat the URL)."""
    if is_postgres_url(value):
        parts = urlsplit(value)
        if parts.password is not None or re.search(r"(^|&)password=", parts.query):
            raise ValueError(
                "gateway.results_db must not hold a password (user:password@ or ?password=): put it in an "
                "environment variable and name it in gateway.results_db_password_env"
            )
    return value


PSYCOPG_MISSING = (
    "a PostgreSQL results store needs psycopg, which is not installed: pip install 'llm-compare-gateway[scale]'"
)


def check_limits_backend(url: str) -> str:
    """``url`` if it is usable as ``gateway.limits_backend``; else a ValueError saying why (no password in it)."""
    if url == "local":
        return url
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"must be 'local' or a redis:// or rediss:// URL, not {url!r}")
    if parts.password is not None:
        raise ValueError("no password in the URL: name the environment variable holding it in limits_password_env")
    if not parts.hostname:
        raise ValueError(f"no host in {url!r}")
    return url


def state_problems(g: StateSettings) -> list[str]:
    """What keeps the shared-state settings from working on this machine: a password variable not set, psycopg not
    installed."""
    problems = []
    for setting, var in (("results_db_password_env", g.results_db_password_env),
                         ("limits_password_env", g.limits_password_env)):  # fmt: skip
        if var and not os.environ.get(var):
            problems.append(f"gateway.{setting}: environment variable {var} is not set or empty")
    if is_postgres_url(g.results_db) and importlib.util.find_spec("psycopg") is None:
        problems.append(f"gateway.results_db: {PSYCOPG_MISSING}")
    return problems
