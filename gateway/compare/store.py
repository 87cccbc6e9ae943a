"""Results store: one row per call of a comparison (fan-out, comparison run, or mirrored pair), in SQLite or
PostgreSQL (:func:`open_store` picks by ``gateway.results_db``; the PostgreSQL side is ``gateway.compare.store_pg``).

Schema (table ``results``; one row per (comparison id, prompt, repeat, model)):

=================  =======  ===============================================================================
column             type     meaning
=================  =======  ===============================================================================
id                 INTEGER  row id
comparison_id      TEXT     fan-out request id, comparison-run id or mirror pair id: rows sharing it had
                            identical requests
kind               TEXT     "fanout", "run" or "mirror"
created_at         REAL     Unix time the call started
prompt_id          TEXT     which prompt (pairs rows across models); "" for ad-hoc fan-outs
prompt_category    TEXT     e.g. "short chat", "code", "chinese"
repeat             INTEGER  repetition index within a run (0-based)
model              TEXT     model id
backend            TEXT     backend that served it (NULL if none did)
family, origin     TEXT     from the model card
ttft_s             REAL     time to first token-bearing chunk, seconds
tpot_s             REAL     (e2e - ttft) / (completion_tokens - 1)
e2e_s              REAL     to the last token-bearing chunk
prompt_tokens      INTEGER  from vLLM's usage
completion_tokens  INTEGER  from vLLM's usage
output_tps         REAL     1 / tpot: output tokens per second seen by this request
cost_gpu_usd       REAL     share of the backend's GPU cost (see cost.gpu_usd_of_call)
cost_list_usd      REAL     usage x the card's list prices
finish_reason      TEXT
text               TEXT     the answer (NULL when not kept: mirrored traffic keeps none by default), without
                            its reasoning
error              TEXT     error message, NULL on success
variant            TEXT     the arm's request overrides, by name ("" for the plain model; ``arm`` = model+variant)
ttfat_s            REAL     time to the first answer chunk (content, text or tool call; not reasoning)
reasoning_s        REAL     thinking time: first reasoning chunk to first answer chunk; NULL without reasoning
reasoning_tokens   INTEGER  usage.completion_tokens_details.reasoning_tokens, else the reasoning chunks
reasoning_source   TEXT     "usage" or "chunks": where reasoning_tokens came from
answer_tokens      INTEGER  completion tokens that were not reasoning
empty_answer       INTEGER  1 when the call succeeded with no answer (thinking used the whole max_tokens)
think_in_content   INTEGER  1 when the reasoning came as <think> tags inside the content (no reasoning parser)
reasoning_text     TEXT     the reasoning, kept apart from the answer (NULL when text is not kept)
prompt_lang        TEXT     the prompt's language, when its file says ("en", "zh")
correct            INTEGER  1 or 0 for a graded prompt's answer (gateway.compare.grading), NULL when not graded
score              REAL     the grader's score (1.0 or 0.0 today), NULL when not graded
grade_detail       TEXT     why a graded answer is wrong (or which tool-call failure: no_call, invalid_json, ...)
cached_tokens      INTEGER  prompt tokens the backend served from its prefix cache, when it reports them (NULL if not)
output_chars       INTEGER  characters generated (answer and reasoning), for per-character figures (tokenizers differ)
=================  =======  ===============================================================================

Columns added after a store file was created are added to it when it is opened (``ALTER TABLE ... ADD COLUMN``),
so an older results file keeps working; its old rows read the new columns as NULL or their defaults.

In PostgreSQL the table is the same but for its types: ``id`` is a ``BIGINT`` identity, INTEGER columns are
``BIGINT`` and REAL ones ``DOUBLE PRECISION``. Its schema is made, and migrated the same way (``ADD COLUMN IF NOT
EXISTS``, same defaults), when a gateway process first connects, under an advisory lock: processes starting at once
against an empty database do not trip over each other.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Protocol

from gateway.config import ModelCard
from gateway.cost import list_price_usd
from gateway.relay.sse import StreamObserver, Usage, split_answer
from gateway.state_urls import is_postgres_url


@dataclass(slots=True)
class CallResult:
    comparison_id: str
    kind: str
    model: str
    prompt_id: str = ""
    prompt_category: str = ""
    repeat: int = 0
    backend: str | None = None
    family: str = ""
    origin: str = ""
    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    output_tps: float | None = None
    cost_gpu_usd: float | None = None
    cost_list_usd: float | None = None
    finish_reason: str | None = None
    text: str | None = None
    error: str | None = None
    created_at: float = 0.0
    variant: str = ""
    ttfat_s: float | None = None
    reasoning_s: float | None = None
    reasoning_tokens: int = 0
    reasoning_source: str = ""
    answer_tokens: int = 0
    empty_answer: int = 0
    think_in_content: int = 0
    reasoning_text: str | None = None
    prompt_lang: str = ""
    correct: int | None = None
    score: float | None = None
    grade_detail: str = ""
    cached_tokens: int | None = None
    output_chars: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def arm(self) -> str:
        """What a comparison compares: the model, or the model with a named variant of the request."""
        return f"{self.model}+{self.variant}" if self.variant else self.model


def measured(
    comparison_id: str,
    kind: str,
    model: str,
    observer: StreamObserver,
    *,
    backend: str | None = None,
    card: ModelCard | None = None,
    e2e_s: float | None = None,
    cost_gpu_usd: float | None = None,
    error: str | None = None,
    keep_text: bool = False,
    prompt_id: str = "",
    prompt_category: str = "",
    repeat: int = 0,
    variant: str = "",
) -> CallResult:
    """The stored row of one measured call (a fan-out's, a mirrored pair's, a comparison run's): its timings,
    tokens and finish reason as ``observer`` saw them (E2E is the last token's, unless ``e2e_s`` gives another: a
    non-streaming answer's), family, origin and list-price cost from the model card (no cost for a call that
    failed), and the text that arrived when ``keep_text`` (a failed call's partial answer too)."""
    usage, tpot = observer.usage, observer.tpot
    completion = usage.completion_tokens if usage else 0
    text = reasoning = None
    if keep_text:
        text, reasoning = "".join(observer.text), "".join(observer.reasoning_text)
        if observer.think_in_content:
            thought, text = split_answer(text)
            reasoning += thought
    return CallResult(
        comparison_id=comparison_id,
        kind=kind,
        model=model,
        prompt_id=prompt_id,
        prompt_category=prompt_category,
        repeat=repeat,
        backend=backend,
        family=card.family if card else "",
        origin=card.origin if card else "",
        ttft_s=observer.ttft,
        tpot_s=tpot,
        e2e_s=observer.e2e if e2e_s is None else e2e_s,
        prompt_tokens=usage.prompt_tokens if usage else 0,
        completion_tokens=usage.completion_tokens if usage else 0,
        output_tps=1.0 / tpot if tpot else None,
        cost_gpu_usd=cost_gpu_usd,
        cost_list_usd=list_cost(card, usage) if error is None else None,
        finish_reason=observer.finish_reason,
        text=text,
        error=error,
        created_at=time.time() - (time.perf_counter() - observer.t0),  # the observer's clock is perf_counter
        variant=variant,
        ttfat_s=observer.ttfat,
        reasoning_s=observer.reasoning_s,
        reasoning_tokens=observer.reasoning_tokens if usage or observer.reasoning_chunks else 0,
        reasoning_source="chunks" if observer.reasoning_counted else "usage",
        answer_tokens=observer.answer_tokens(completion),
        empty_answer=int(error is None and observer.empty_answer),
        think_in_content=int(observer.think_in_content),
        reasoning_text=reasoning,
        cached_tokens=observer.cached_reported,
        output_chars=len("".join(observer.text)) + len("".join(observer.reasoning_text)),
    )


def list_cost(card: ModelCard | None, usage: Usage | None) -> float | None:
    """Usage x the card's list prices; None when either is unknown."""
    if card is None or card.list_price is None or usage is None:
        return None
    return list_price_usd(card.list_price, usage.prompt_tokens, usage.completion_tokens)


COLUMNS = tuple(f.name for f in fields(CallResult))
_TYPES = {
    "repeat": "INTEGER", "prompt_tokens": "INTEGER", "completion_tokens": "INTEGER", "created_at": "REAL",
    "ttft_s": "REAL", "tpot_s": "REAL", "e2e_s": "REAL", "output_tps": "REAL", "cost_gpu_usd": "REAL",
    "cost_list_usd": "REAL", "ttfat_s": "REAL", "reasoning_s": "REAL", "reasoning_tokens": "INTEGER",
    "answer_tokens": "INTEGER", "empty_answer": "INTEGER", "think_in_content": "INTEGER", "correct": "INTEGER",
    "score": "REAL", "cached_tokens": "INTEGER", "output_chars": "INTEGER",
}  # fmt: skip
# What a column added later reads as in the rows stored before it existed (NULL when not listed).
_DEFAULTS = {"variant": "''", "reasoning_tokens": "0", "reasoning_source": "''", "answer_tokens": "0",
             "empty_answer": "0", "think_in_content": "0", "prompt_lang": "''", "grade_detail": "''",
             "output_chars": "0"}  # fmt: skip
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS results (id INTEGER PRIMARY KEY AUTOINCREMENT, "
    + ", ".join(f"{c} {_TYPES.get(c, 'TEXT')}" for c in COLUMNS)
    + ");\nCREATE INDEX IF NOT EXISTS results_comparison ON results (comparison_id);"
    + "\nCREATE INDEX IF NOT EXISTS results_created ON results (created_at);"
)


class Store(Protocol):
    """What the gateway and ``gateway compare`` need of a results store; :func:`open_store` makes one. Used
    synchronously, from any thread: in the gateway only the writer thread and the reads' threads touch it
    (``gateway.compare.writer``), never the event loop. A store that cannot be reached raises
    :class:`gateway.errors.StoreUnavailable` (PostgreSQL only; a SQLite file is always there)."""

    @property
    def where(self) -> str:
        """The file or URL, for log lines (never a password: neither form holds one)."""
        ...

    def add(self, results: Iterable[CallResult]) -> None:
        """Insert the rows in one transaction: all of them or none."""
        ...

    def comparison(self, comparison_id: str) -> list[CallResult]:
        """The rows of one comparison, in the order they were added."""
        ...

    def recent(self, limit: int = 50) -> list[dict[str, object]]:
        """The latest comparisons, newest first: id, kind, when, models, calls and errors."""
        ...

    def close(self) -> None: ...


def open_store(
    where: Path | str, *, password_env: str | None = None, busy_timeout_s: float = 5.0,
    connect_timeout_s: float = 3.0, required: bool = True,
) -> Store:  # fmt: skip
    """The results store ``where`` names: a ``postgresql://`` (or ``postgres://``) URL, else a SQLite file or
    ``:memory:``. For PostgreSQL the password comes from the environment variable ``password_env`` (unset: libpq's
    own PGPASSWORD or .pgpass), ``connect_timeout_s`` bounds each connection attempt, and a server that cannot be
    reached raises :class:`gateway.errors.StoreUnavailable` when ``required``, else the store connects (and makes
    its schema) at its first use. ``busy_timeout_s`` is SQLite's wait for another process's write lock."""
    if is_postgres_url(str(where)):
        from gateway.compare.store_pg import PostgresStore

        return PostgresStore(
            str(where), password_env=password_env, connect_timeout_s=connect_timeout_s, required=required
        )
    return SqliteStore(where, busy_timeout_s=busy_timeout_s)


def values(results: Iterable[CallResult]) -> list[tuple[object, ...]]:
    """The rows to insert, in ``COLUMNS`` order; a row without a start time is stamped now."""
    now = time.time()
    return [tuple(getattr(r, c) if c != "created_at" or r.created_at else now for c in COLUMNS) for r in results]


def recent_sql(models: str, placeholder: str) -> str:
    """The query of :meth:`Store.recent`, given the dialect's aggregate of the distinct models and its
    placeholder. A comparison has one kind: MIN picks it in both dialects."""
    return (
        f"SELECT comparison_id, MIN(kind), MIN(created_at), {models}, COUNT(*), COUNT(error) FROM results "
        f"GROUP BY comparison_id ORDER BY MIN(created_at) DESC LIMIT {placeholder}"
    )


def recent_rows(rows: Iterable[Sequence[object]]) -> list[dict[str, object]]:
    return [
        {"id": r[0], "kind": r[1], "created_at": r[2], "models": sorted(str(r[3]).split(",")),
         "calls": r[4], "errors": r[5]}
        for r in rows
    ]  # fmt: skip


def call_results(rows: Iterable[Sequence[object]]) -> list[CallResult]:
    return [CallResult(**dict(zip(COLUMNS, row, strict=True))) for row in rows]  # type: ignore[arg-type]


class SqliteStore:
    """A SQLite file (or ``:memory:``), one statement at a time under a lock. ``gateway compare`` writes its
    ``results.sqlite`` with it."""

    def __init__(self, path: Path | str, *, busy_timeout_s: float = 5.0) -> None:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = str(path)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # several gateway workers may write the same file: wait this long for another's write to finish
        self._db.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        self._db.executescript(SCHEMA)
        have = {row[1] for row in self._db.execute("PRAGMA table_info(results)")}
        for column in COLUMNS:
            if column not in have:  # a file made by an older version: add what it lacks
                default = f" NOT NULL DEFAULT {_DEFAULTS[column]}" if column in _DEFAULTS else ""
                self._db.execute(f"ALTER TABLE results ADD COLUMN {column} {_TYPES.get(column, 'TEXT')}{default}")
        self._lock = threading.Lock()

    @property
    def where(self) -> str:
        return self.path

    def add(self, results: Iterable[CallResult]) -> None:
        """Insert the rows in one transaction: all of them or, if SQLite refuses (a locked file), none."""
        rows = values(results)
        if not rows:
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    f"INSERT INTO results ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})", rows
                )
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.rollback()
                raise

    def comparison(self, comparison_id: str) -> list[CallResult]:
        with self._lock:
            cur = self._db.execute(
                f"SELECT {', '.join(COLUMNS)} FROM results WHERE comparison_id = ? ORDER BY id", (comparison_id,)
            )
            return call_results(cur.fetchall())

    def recent(self, limit: int = 50) -> list[dict[str, object]]:
        with self._lock:
            rows = self._db.execute(recent_sql("GROUP_CONCAT(DISTINCT model)", "?"), (limit,)).fetchall()
        return recent_rows(rows)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def as_dict(result: CallResult) -> dict[str, object]:
    return asdict(result)
