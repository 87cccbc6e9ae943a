"""The gateway's state shared by every request (``Gateway``, built once per app by ``create_app``) and the graceful
drain it runs on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Protocol

from gateway.auth import Keyring
from gateway.compare.mirror import Mirror
from gateway.compare.writer import StoreWriter
from gateway.config import Settings
from gateway.metrics import Metrics
from gateway.relay.backends import BackendPool
from gateway.relay.proxy import Recorder

log = logging.getLogger("gateway.state")


class Abortable(Protocol):
    def abort(self) -> None: ...


@dataclass(slots=True)
class Gateway:
    """Everything a request handler needs, built once per app."""

    settings: Settings
    metrics: Metrics
    pool: BackendPool
    recorder: Recorder
    store: StoreWriter
    mirror: Mirror
    keyring: Keyring
    started: int
    draining: bool = False  # SIGTERM received: /ready says 503, in-flight calls get drain_s to finish
    watches: set[Abortable] = field(default_factory=set)  # the calls in flight (aborted after drain_s)

    def begin_drain(self) -> None:
        """Called (in the event loop) when shutdown starts; after ``drain_s`` unfinished calls are ended with an
        explicit error (streams: an error event and [DONE]) rather than cut."""
        if self.draining:
            return
        self.draining = True
        log.info("shutting down: in-flight calls get %g s (gateway.drain_s)", self.settings.gateway.drain_s)
        asyncio.get_running_loop().call_later(self.settings.gateway.drain_s, self._abort_all)

    def _abort_all(self) -> None:
        for watch in list(self.watches):
            watch.abort()


def drain_on_signals(gateway: Gateway) -> None:
    """Chain the gateway's drain in front of the server's SIGTERM/SIGINT handlers (uvicorn's, in every worker):
    uvicorn stops accepting and waits for in-flight calls, the gateway turns /ready 503 and ends what is left after
    ``drain_s`` explicitly. Only in the main thread (where signals are delivered); tests in threads skip it."""
    if threading.current_thread() is not threading.main_thread():
        return
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue

        def handler(signum: int, frame: FrameType | None, previous: Callable[..., Any] = previous) -> None:
            loop.call_soon_threadsafe(gateway.begin_drain)
            previous(signum, frame)

        signal.signal(sig, handler)
