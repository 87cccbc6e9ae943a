"""ASGI helpers shared by the gateway and the emulator."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from starlette.types import Receive

from gateway.errors import ShuttingDown


async def until_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def race_disconnect(
    work: Callable[[], Awaitable[Any]], receive: Receive, abort: asyncio.Event | None = None
) -> tuple[bool, Any]:
    """Run ``work`` unless the client disconnects first; returns (disconnected, result).

    An exception raised by ``work`` propagates as itself (not wrapped in an exception group). When ``abort`` is
    set first (the gateway's drain time is over), ``work`` is cancelled and ShuttingDown is raised.
    """
    outcome: list[Any] = []
    failure: list[BaseException] = []
    disconnected = aborted = False
    async with anyio.create_task_group() as tg:
        if abort is not None:

            async def stop() -> None:
                nonlocal aborted
                await abort.wait()
                aborted = True
                tg.cancel_scope.cancel()

            tg.start_soon(stop)

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
    if aborted and not disconnected:
        raise ShuttingDown("the gateway is shutting down and its drain time is over")
    return True, None
