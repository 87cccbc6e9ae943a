"""ASGI helpers shared by the gateway and the emulator."""

from __future__ import annotations

import asyncio
import types
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import anyio
from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive, Send

from gateway.errors import ShuttingDown


def send_now(send: Send, message: Message) -> asyncio.Future[None] | None:
    """Start ``send(message)`` from plain (non-async) code and run it as far as it goes without waiting.

    None when it finished, the usual case (uvicorn writes to the socket at once); else a task running the rest
    of it (the client's socket buffer was full, say), or a future holding the exception it raised. The caller
    awaits that before its next send, so messages keep their order."""
    coro = send(message)
    if type(coro) is not types.CoroutineType:  # some other awaitable (not uvicorn's): just run it as a task
        return asyncio.ensure_future(coro)
    try:
        waiting = coro.send(None)
    except StopIteration:
        return None
    except Exception as exc:
        failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        failed.set_exception(exc)
        return failed
    return asyncio.ensure_future(_resume(coro, waiting))


async def _resume(coro: Coroutine[Any, Any, Any], waiting: Any) -> None:
    """Go on with a coroutine suspended on ``waiting`` (what it yielded: a future, or None), as a task would."""
    while True:
        try:
            if waiting is None:
                await asyncio.sleep(0)
            else:
                waiting._asyncio_future_blocking = False  # taken over, as Task.__step does with what it is handed
                await waiting
        except BaseException as exc:  # the future failed, or this task was cancelled: the coroutine gets it
            try:
                waiting = coro.throw(exc)
            except StopIteration:
                return
        else:
            try:
                waiting = coro.send(None)
            except StopIteration:
                return


async def receive_body(receive: Receive) -> bytes:
    """The whole request body (Starlette's ``Request.body`` does the same through two more layers)."""
    parts = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return parts[0] if len(parts) == 1 else b"".join(parts)


async def until_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def race_disconnect(work: Callable[[], Awaitable[Any]], receive: Receive) -> tuple[bool, Any]:
    """Run ``work`` unless the client disconnects first; returns (disconnected, result).

    An exception raised by ``work`` propagates as itself (not wrapped in an exception group).
    """
    outcome: list[Any] = []
    failure: list[BaseException] = []
    disconnected = False
    async with anyio.create_task_group() as tg:

        async def run() -> None:
            try:
                outcome.append(await work())
            except Exception as exc:
                failure.append(exc)
            tg.cancel_scope.cancel()

        async def watch() -> None:
            nonlocal disconnected
            await until_disconnect(receive)
            disconnected = True
            tg.cancel_scope.cancel()

        tg.start_soon(run)
        tg.start_soon(watch)
    if outcome:  # finished: a disconnect noticed in the same instant (after the last send) does not count
        return False, outcome[0]
    if failure and not disconnected:
        raise failure[0]
    return True, None


class ClientWatch:
    """One listener task for a whole proxied call: when the client disconnects (or the gateway's drain time is
    over: ``abort``), the task inside ``run`` is cancelled, so the upstream request closes and vLLM aborts.

    Cheaper than a task group per phase: one task per call, and plain task cancellation with the same
    ``uncancel`` bookkeeping as ``asyncio.timeout``. Create it only once the request body has been read (it
    consumes ``receive``); ``close`` it when done.
    """

    def __init__(self, receive: Receive, registry: set[Any]) -> None:
        self.gone = False
        self.aborted = False
        self._task: asyncio.Task[Any] | None = None
        self._fired = False
        self._registry = registry
        registry.add(self)
        self._listener = asyncio.get_running_loop().create_task(self._listen(receive))

    async def _listen(self, receive: Receive) -> None:
        await until_disconnect(receive)
        self.gone = True
        self._cancel()

    def abort(self) -> None:
        self.aborted = True
        self._cancel()

    def _cancel(self) -> None:
        if self._task is not None and not self._fired:
            self._fired = True
            self._task.cancel()

    async def run(self, work: Callable[[], Awaitable[Any]]) -> tuple[bool, Any]:
        """(False, result), or (True, None) when the client left first; ShuttingDown when aborted first."""
        if not (self.gone or self.aborted):
            task = asyncio.current_task()
            assert task is not None
            self._task, self._fired, cancelling = task, False, task.cancelling()
            try:
                return False, await work()
            except asyncio.CancelledError:
                if not self._fired or task.uncancel() > cancelling:
                    raise  # not ours (the server is cancelling this task): let it through
            finally:
                self._task = None
        if self.aborted and not self.gone:
            raise ShuttingDown("the gateway is shutting down and its drain time is over")
        return True, None

    def close(self) -> None:
        self._registry.discard(self)
        self._listener.cancel()
