"""The results store off the event loop: one writer thread per gateway process, fed through a bounded queue.

The event loop never waits for the store (SQLite or PostgreSQL). ``add`` (called at the end of a relayed call that
mirroring sampled, by a mirror, by a fan-out) only puts the rows on a queue and returns: it never blocks and never
raises. The queue holds
at most ``gateway.results_queue_rows`` rows (queued or being written); rows that do not fit are dropped, counted in
``gateway_store_dropped_rows_total{reason="queue_full"}`` and logged at most once every ``LOG_EVERY_S``.

The writer takes whatever is queued and writes it in one transaction. While the file is locked (another worker
of ``gateway serve --workers N``, a backup, someone's ``sqlite3`` shell) it keeps the rows and tries again: the
calls go on and the queue fills, instead of every stream of the worker stalling. A write SQLite refuses for any
other reason (disk full, a damaged file) is dropped, counted (``write_failed``) and logged.

A PostgreSQL store that cannot be reached (the server down, the connection refused or lost during the write) is not
waited for: the batch is dropped, counted (``unavailable``) and logged at most once every ``LOG_EVERY_S``, and the
next batch connects again (each try bounded by the connect timeout). A write the server refuses (a constraint) is
``write_failed``. A read of a store that cannot be reached raises ``gateway.errors.StoreUnavailable``: a 503.

Reads (``GET /v1/compare``, ``/v1/compare/{id}``, the /ui history) run in a thread (``asyncio.to_thread``) and
flush first: they wait, up to ``READ_WAIT_S``, until every row added before the read was asked for is written.
So a comparison can be read as soon as its answer went out (read-your-writes within the process; the rows of other
workers appear once their own writers commit).

The app's lifespan starts the thread before serving and, at shutdown, ``stop`` lets it write everything queued
before it ends (nothing is lost on a clean stop, unless PostgreSQL cannot be reached). Only a file that stays
locked for ``stop_timeout_s`` makes it give up: those rows are counted as ``stopped`` and logged, as are rows
added after the stop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

from gateway.compare.store import CallResult, Store
from gateway.errors import StoreUnavailable
from gateway.metrics import STORE_DROP_REASONS, Metrics

log = logging.getLogger("gateway.compare.writer")
T = TypeVar("T")

LOG_EVERY_S = 10.0  # at most one log line per this many seconds about dropped rows, one about a locked file, one
# about a store that cannot be reached
RETRY_S = 0.1  # pause between tries while the file is locked (each try already waited the busy timeout)
READ_WAIT_S = 2.0  # longest a read waits for earlier rows to be written (then it reads what is there)
BATCH_ROWS = 1000  # rows per transaction at most: a backlog is written in a few transactions, not one per call


def _locked(exc: sqlite3.OperationalError) -> bool:
    return getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


class StoreWriter:
    """The gateway's results store: ``add`` from the event loop, awaitable reads, one writer thread (see above)."""

    def __init__(
        self, store: Store, metrics: Metrics, *, max_rows: int = 10_000, stop_timeout_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self.store = store
        self.max_rows = max_rows
        self.stop_timeout_s = stop_timeout_s
        self._dropped = {r: metrics.store_dropped_rows.labels(r) for r in STORE_DROP_REASONS}
        self._clock = clock
        self._jobs: queue.SimpleQueue[list[CallResult] | None] = queue.SimpleQueue()
        # Guards the counts below. The event loop takes it only to count and enqueue; the writer only to count:
        # nobody holds it while SQLite works.
        self._state = threading.Condition()
        self._pending = 0  # rows accepted and not yet written (or given up)
        self._accepted = 0  # batches accepted so far
        self._finished = 0  # batches written or given up (in the order they were accepted)
        self._closed = False  # stop() was called: rows added from now on are dropped
        self._giving_up = threading.Event()  # the stop timeout is over: drop what is left instead of retrying
        self._thread: threading.Thread | None = None
        self._logged_drop = self._logged_lock = self._logged_unavailable = -math.inf
        self._unlogged: dict[str, int] = {}

    # -- the event loop's side ----------------------------------------------------------------------------------
    def add(self, results: Iterable[CallResult]) -> None:
        """Queue the rows for writing. Never waits and never raises: a row is not worth a client's call."""
        try:
            rows = list(results)
            if not rows:
                return
            with self._state:
                if self._closed:
                    reason = "stopped"
                elif self._pending + len(rows) > self.max_rows:
                    reason = "queue_full"
                else:
                    self._pending += len(rows)
                    self._accepted += 1
                    self._jobs.put(rows)
                    return
            self._drop(len(rows), reason)
        except Exception:  # a bug of ours must not reach the call that produced the row
            log.exception("results store: rows not queued")

    async def recent(self, limit: int = 50) -> list[dict[str, object]]:
        return await self._read(lambda: self.store.recent(limit))

    async def comparison(self, comparison_id: str) -> list[CallResult]:
        return await self._read(lambda: self.store.comparison(comparison_id))

    async def _read(self, query: Callable[[], T]) -> T:
        before = self._accepted  # the rows added before this read: it sees them (read on the loop's thread)
        return await asyncio.to_thread(self._flushed_read, before, query)

    def _flushed_read(self, before: int, query: Callable[[], T]) -> T:
        with self._state:
            written = self._state.wait_for(lambda: self._finished >= before, READ_WAIT_S)
        if not written:
            log.warning("results store: reading before earlier rows are written (the file is locked?)")
        return query()

    # -- lifespan ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="results-store-writer", daemon=True)
        self._thread.start()

    def flush(self, timeout: float) -> bool:
        """Wait (blocking) until every row added so far is written or given up; False if that took longer."""
        with self._state:
            target = self._accepted
            return self._state.wait_for(lambda: self._finished >= target, timeout)

    def stop(self) -> None:
        """Write everything queued, then end the thread and close the store (blocking: the lifespan runs it in a
        thread). A file locked for longer than ``stop_timeout_s`` makes it give up on what is left."""
        with self._state:
            self._closed = True
        self._jobs.put(None)
        thread = self._thread
        if thread is None:  # never started: nothing will write what was queued
            if self._pending:
                self._drop(self._pending, "stopped")
        else:
            thread.join(self.stop_timeout_s)
            if thread.is_alive():
                self._giving_up.set()  # its current try ends within the busy timeout, then it drops the rest
                thread.join(self.stop_timeout_s)
            if thread.is_alive():
                log.error("results store: the writer did not finish; %d rows are lost", self._pending)
                return
        self.store.close()

    # -- the writer thread --------------------------------------------------------------------------------------
    def _run(self) -> None:
        while (first := self._jobs.get()) is not None:
            batches, rows, last = 1, list(first), False
            while len(rows) < BATCH_ROWS:
                try:
                    more = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    last = True
                    break
                batches, rows = batches + 1, rows + more
            self._write(rows)
            with self._state:
                self._pending -= len(rows)
                self._finished += batches
                self._state.notify_all()
            if last:
                return

    def _write(self, rows: list[CallResult]) -> None:
        while not self._giving_up.is_set():
            try:
                self.store.add(rows)
                return
            except StoreUnavailable as exc:
                self._note_unavailable(exc)
                self._drop(len(rows), "unavailable")
                return
            except sqlite3.OperationalError as exc:
                if not _locked(exc):
                    log.error("results store: %d rows not written: %s", len(rows), exc)
                    self._drop(len(rows), "write_failed")
                    return
                self._note_locked()
                self._giving_up.wait(RETRY_S)
            except Exception:
                log.exception("results store: %d rows not written", len(rows))
                self._drop(len(rows), "write_failed")
                return
        self._drop(len(rows), "stopped")

    # -- accounting -----------------------------------------------------------------------------------------------
    def _drop(self, n: int, reason: str) -> None:
        self._dropped[reason].inc(n)
        with self._state:
            self._unlogged[reason] = self._unlogged.get(reason, 0) + n
            now = self._clock()
            if now - self._logged_drop < LOG_EVERY_S:
                return
            self._logged_drop, counts, self._unlogged = now, self._unlogged, {}
        what = ", ".join(f"{n} ({reason})" for reason, n in counts.items())
        log.warning("results store: rows dropped since the last report: %s (gateway_store_dropped_rows_total)", what)

    def _note_locked(self) -> None:
        now = self._clock()
        if now - self._logged_lock >= LOG_EVERY_S:
            self._logged_lock = now
            log.warning("results store %s is locked by another process; %d rows wait", self.store.where, self._pending)

    def _note_unavailable(self, exc: StoreUnavailable) -> None:
        now = self._clock()
        if now - self._logged_unavailable >= LOG_EVERY_S:
            self._logged_unavailable = now
            log.warning("%s; its rows are dropped until it is back", exc.message)
