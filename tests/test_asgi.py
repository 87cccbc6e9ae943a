"""``send_now``: an ASGI send started from a plain callback (the relay's inline path)."""

from __future__ import annotations

import asyncio

import pytest
from starlette.types import Message

from gateway.relay.asgi import send_now


def test_a_send_that_does_not_wait_finishes_at_once() -> None:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def main() -> None:
        assert send_now(send, {"n": 1}) is None
        assert sent == [{"n": 1}]

    asyncio.run(main())


def test_a_send_that_waits_is_finished_by_a_task_in_order() -> None:
    """uvicorn's send waits when the client's socket is full: the rest runs as a task, and the next send (awaited
    after it, as the relay does) comes after it."""
    sent: list[Message] = []

    async def main() -> None:
        writable = asyncio.Event()

        async def send(message: Message) -> None:
            if not writable.is_set():
                await writable.wait()
            await asyncio.sleep(0)  # a bare yield too
            sent.append(message)

        pending = send_now(send, {"n": 1})
        assert pending is not None and not pending.done() and sent == []
        asyncio.get_running_loop().call_later(0.05, writable.set)
        await pending
        await send({"n": 2})
        assert sent == [{"n": 1}, {"n": 2}]

    asyncio.run(main())


def test_a_send_that_fails_hands_its_error_to_the_caller() -> None:
    async def main() -> None:
        async def broken(message: Message) -> None:
            raise OSError("gone")

        failed = send_now(broken, {})
        assert failed is not None
        with pytest.raises(OSError, match="gone"):
            await failed

        gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def fails_later(message: Message) -> None:
            await gate

        later = send_now(fails_later, {})
        assert later is not None
        gate.set_exception(OSError("later"))
        with pytest.raises(OSError, match="later"):
            await later

    asyncio.run(main())


def test_cancelling_an_unfinished_send_cancels_the_send() -> None:
    async def main() -> None:
        cancelled = asyncio.Event()

        async def send(message: Message) -> None:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        pending = send_now(send, {})
        assert pending is not None
        await asyncio.sleep(0)
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        assert cancelled.is_set()

    asyncio.run(main())
