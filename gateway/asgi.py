"""ASGI helpers shared by the gateway and the emulator."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from starlette.types import Receive


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
