"""The gateway's own Redis client (gateway/resp.py) against a real redis-server: replies split anywhere, answers
matched to pipelined requests, scripts loaded when Redis forgot them, a timeout that drops the connection and a
next call that connects again."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from gateway.resp import _INCOMPLETE, Redis, RedisError, Script, encode, parse
from tests.redisserver import RedisServer, redis_server


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


def test_replies_parse_only_when_whole() -> None:
    reply = b"*5\r\n:1\r\n$3\r\n0.5\r\n+OK\r\n$-1\r\n*2\r\n:-3\r\n-ERR no\r\n"
    for cut in range(len(reply)):
        value, pos = parse(reply[:cut], 0)
        assert value is _INCOMPLETE and pos == 0, cut
    value, pos = parse(reply, 0)
    assert pos == len(reply)
    assert value[:4] == [1, b"0.5", "OK", None] and value[4][0] == -3 and isinstance(value[4][1], RedisError)
    assert encode("SET", "k", 5, b"\r\n") == b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n5\r\n$2\r\n\r\n\r\n"


def test_pipelined_answers_reach_their_callers(redis: RedisServer) -> None:
    async def main() -> list[bytes]:
        client = Redis(redis.url, timeout_s=5)
        try:
            await asyncio.gather(*(client.execute("SET", f"key-{i}", f"value-{i}" * (i % 50)) for i in range(300)))
            return list(await asyncio.gather(*(client.execute("GET", f"key-{i}") for i in range(300))))
        finally:
            await client.close()

    assert asyncio.run(main()) == [f"value-{i}".encode() * (i % 50) for i in range(300)]


def test_an_error_answer_raises_and_the_connection_goes_on(redis: RedisServer) -> None:
    async def main() -> object:
        client = Redis(redis.url)
        try:
            with pytest.raises(RedisError, match="unknown command"):
                await client.execute("NO-SUCH-COMMAND")
            return await client.execute("PING")
        finally:
            await client.close()

    assert asyncio.run(main()) == "PONG"


def test_a_script_redis_forgot_is_loaded_again(redis: RedisServer) -> None:
    async def main() -> list[object]:
        client = Redis(redis.url)
        script = Script(client, "return {KEYS[1], ARGV[1]}")
        try:
            first = await script(["k"], ["a"])
            await client.execute("SCRIPT", "FLUSH")
            return [first, await script(["k"], [7])]
        finally:
            await client.close()

    assert asyncio.run(main()) == [[b"k", b"a"], [b"k", b"7"]]


def test_a_late_answer_drops_the_connection_and_the_next_call_reconnects(redis: RedisServer) -> None:
    async def main() -> object:
        client = Redis(redis.url, timeout_s=0.3)
        try:
            await client.execute("PING")
            first = client._conn
            with pytest.raises(TimeoutError):
                await client.execute("BLPOP", "no-such-list", "1")  # answers (nil) after the timeout
            assert first is not None and first.closed
            await asyncio.sleep(1.0)  # Redis is free again
            answer = await client.execute("PING")
            assert client._conn is not first
            return answer
        finally:
            await client.close()

    assert asyncio.run(main()) == "PONG"


def test_auth_and_database_from_the_url() -> None:
    with redis_server(password="pw-0123") as server:

        async def main() -> tuple[object, object]:
            client = Redis(server.url.replace("/0", "/3"), password="pw-0123")
            try:
                await client.execute("SET", "where", "db3")
                return await client.execute("GET", "where"), await client.execute("CLIENT", "INFO")
            finally:
                await client.close()

        value, info = asyncio.run(main())
        assert value == b"db3" and isinstance(info, bytes) and b" db=3 " in info

        async def without() -> None:
            client = Redis(server.url)
            try:
                await client.execute("GET", "where")
            finally:
                await client.close()

        with pytest.raises(RedisError, match="NOAUTH"):
            asyncio.run(without())
