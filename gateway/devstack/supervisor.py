"""Starting and stopping the processes of a local stack (``gateway up``), leaving none behind.

Each child runs in its own session (so a signal reaches its whole process group) with a parent-death signal, so
even a ``kill -9`` of the supervisor takes the children with it. ``stop`` sends SIGTERM to every group, waits,
then SIGKILLs what is left. Output goes to one log file per child; a child that dies while we wait for it is
reported with the tail of its log.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import httpx

PR_SET_PDEATHSIG = 1


class StartupError(Exception):
    """A child could not be started or did not become ready."""


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) == 0


@dataclass(slots=True)
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class Supervisor:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        child = Child(name, process, log)
        self.children.append(child)
        return child

    def probe(self, child: Child, url: str, accept: Callable[[int], bool] | None = None) -> bool:
        """Is ``child`` answering at ``url``? Raises StartupError if it has exited."""
        if child.process.poll() is not None:
            raise StartupError(
                f"{child.name} exited with code {child.process.returncode} before it was ready; "
                f"last lines of {child.log}:\n{child.tail()}"
            )
        try:
            status = httpx.get(url, timeout=2.0).status_code
        except httpx.HTTPError:
            return False
        return accept(status) if accept else status == 200

    def wait_ready(
        self, child: Child, url: str, timeout: float, *, accept: Callable[[int], bool] | None = None
    ) -> None:
        """Poll ``url`` until it answers 200 (or ``accept(status)``); fail early if the child exits."""
        deadline = time.monotonic() + timeout
        while not self.probe(child, url, accept):
            if time.monotonic() > deadline:
                raise StartupError(f"{child.name} was not ready at {url} after {timeout:.0f} s; see {child.log}")
            time.sleep(0.2)

    def stop(self, grace: float = 10.0) -> None:
        """Stop every child (SIGTERM to its group, SIGKILL after ``grace``). A second Ctrl-C / SIGTERM during
        this does not interrupt it: it is bounded, and leaving it half-way would leave processes behind."""
        with _signals_ignored():
            self._stop(grace)

    def _stop(self, grace: float) -> None:
        for child in reversed(self.children):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in self.children:
            remaining = max(0.1, deadline - time.monotonic())
            try:
                child.process.wait(remaining)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(child.process.pid, signal.SIGKILL)
                child.process.wait()
            # the group may still hold grandchildren (vLLM's engine core): make sure none outlives us
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.process.pid, signal.SIGKILL)
        self.children.clear()


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def signals_as_keyboard_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP end the main job the way Ctrl-C does, so the same cleanup runs."""

    def raise_interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, raise_interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def python() -> str:
    return sys.executable
