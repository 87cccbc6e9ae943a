"""Where an API key's rate-limit buckets live: in this process (the default), or in Redis, shared by every worker
and replica (``gateway.limits_backend: redis://HOST:PORT/DB``).

Both keep the same two token buckets per key (``gateway.auth``: ``rpm`` requests and ``tpm`` tokens a minute,
refilled continuously, reserved on admission and settled when the call ends) and answer the same way: a ``Grant``
(the tokens reserved, the ``x-ratelimit-*`` headers) or ``RateLimited`` with the wait.

**Redis.** One Lua script does each step atomically on the Redis server, with the server's clock (``TIME``), so
workers on different machines agree without synchronised clocks: it refills both buckets, checks them, and takes
from both or neither. A bucket is a hash (``level``, ``at``) under ``gw:rl:{<key id>}:r`` / ``:t`` (the braces
keep a key's two buckets in one Redis Cluster slot; the id is the first 32 hex digits of the key's configured
SHA-256, never the key). It expires when it would be full again: a missing bucket is a full one. Settling (the
refund of an unused reservation, or the charge of a stream's excess) is sent without holding up the call's end.

**When Redis does not answer** within ``gateway.limits_timeout_s`` (or refuses the connection), the call follows
``gateway.limits_on_failure``: ``fail_open`` (the default) admits it unchecked, ``fail_closed`` answers 503. Either
way it is counted in ``gateway_limits_backend_errors_total{outcome}`` (``admitted``, ``refused``; ``unsettled``
for a settlement lost), logged at most once per ``LOG_EVERY_S``, and Redis is not asked again for
``RETRY_AFTER_S`` (so an outage costs each call nothing, not a timeout). The alert ``GatewayLimitsBackendErrors``
fires on the counter.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol
from urllib.parse import urlsplit

from gateway.errors import RateLimited, ServerError
from gateway.metrics import LIMITS_OUTCOMES
from gateway.resp import Redis, Script

if TYPE_CHECKING:
    from gateway.metrics import Metrics

log = logging.getLogger("gateway.limits")

LOG_EVERY_S = 10.0
RETRY_AFTER_S = 1.0  # after Redis failed to answer, calls skip it for this long


class LimitsUnavailable(ServerError):
    status = 503
    type = "service_unavailable"
    code = "rate_limits_unavailable"


@dataclass(frozen=True, slots=True)
class Grant:
    """An admission: the tokens reserved (settle them when the call ends) and the x-ratelimit-* headers."""

    tokens: int
    headers: dict[str, str] = field(default_factory=dict)


class KeyLimits(Protocol):
    """One API key's buckets. ``take`` reserves or raises RateLimited; ``settle`` gives back (or charges) the
    difference between what was reserved and what was used, without waiting."""

    async def take(self, requests: int, tokens: int) -> Grant: ...

    def settle(self, reserved: int, used: int) -> None: ...


def _headers(rpm: int, tpm: int, remaining_r: float | None, remaining_t: float | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for kind, cap, level in (("requests", rpm, remaining_r), ("tokens", tpm, remaining_t)):
        if cap and level is not None:
            out[f"x-ratelimit-limit-{kind}"] = str(cap)
            out[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(level)))
    return out


def _refused(name: str, wait_r: float, wait_t: float, headers: dict[str, str]) -> RateLimited:
    what = "requests" if wait_r >= wait_t else "tokens"
    err = RateLimited(f"rate limit of key {name!r} reached ({what} per minute)", retry_after=max(wait_r, wait_t))
    err.extra_headers = headers
    return err


def needs(rpm: int, tpm: int, requests: int, tokens: int) -> tuple[int, int]:
    """What a call takes from each bucket: at most a full one, so that any call can run once the bucket is full."""
    return (min(requests, rpm) if rpm else 0), (min(tokens, tpm) if tpm else 0)


# -- in this process -------------------------------------------------------------------------------------------
class Bucket:
    """``capacity`` units, refilled at ``capacity`` per minute; may go negative when charged after the fact."""

    def __init__(self, capacity: int, clock: Callable[[], float]) -> None:
        self.capacity = capacity
        self.level = float(capacity)
        self.clock = clock
        self.at = clock()

    def refill(self) -> float:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.at) * self.capacity / 60.0)
        self.at = now
        return self.level

    def wait_s(self, need: float) -> float:
        """Seconds until the level reaches ``need``."""
        return max(0.0, (need - self.refill()) * 60.0 / self.capacity)


class LocalLimits:
    """A key's buckets in this process (per worker, per replica)."""

    def __init__(self, name: str, rpm: int, tpm: int, clock: Callable[[], float]) -> None:
        self.name, self.rpm, self.tpm = name, rpm, tpm
        self.requests = Bucket(rpm, clock) if rpm else None
        self.tokens = Bucket(tpm, clock) if tpm else None

    async def take(self, requests: int, tokens: int) -> Grant:
        need_r, need_t = needs(self.rpm, self.tpm, requests, tokens)
        wait_r = self.requests.wait_s(need_r) if self.requests is not None else 0.0
        wait_t = self.tokens.wait_s(max(need_t, 1)) if self.tokens is not None else 0.0
        if wait_r > 0 or wait_t > 0:
            raise _refused(self.name, wait_r, wait_t, self.headers())
        if self.requests is not None:
            self.requests.level -= need_r
        if self.tokens is not None:
            self.tokens.level -= need_t
        return Grant(need_t, self.headers())

    def settle(self, reserved: int, used: int) -> None:
        if self.tokens is not None:
            self.tokens.refill()
            self.tokens.level = min(self.tokens.capacity, self.tokens.level + reserved - used)

    def headers(self) -> dict[str, str]:
        return _headers(
            self.rpm, self.tpm,
            self.requests.level if self.requests else None, self.tokens.level if self.tokens else None,
        )  # fmt: skip


# -- in Redis --------------------------------------------------------------------------------------------------
# KEYS: the key's request bucket, its token bucket. ARGV: "take" or "settle", rpm, tpm (0: no such limit), then
# for take: requests, tokens; for settle: tokens given back (negative: charged). Returns {admitted, wait for
# requests, wait for tokens, remaining requests, remaining tokens}: waits as strings (a Lua number comes back to
# the client truncated to an integer), remaining -1 for a limit that is not set.
SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function level(key, cap)
  local v = redis.call('HMGET', key, 'level', 'at')
  local lvl, at = tonumber(v[1]), tonumber(v[2])
  if not lvl then return cap end
  return math.min(cap, lvl + math.max(0, now - at) * cap / 60)
end
local function save(key, cap, lvl)
  redis.call('HSET', key, 'level', string.format('%.6f', lvl), 'at', string.format('%.6f', now))
  redis.call('PEXPIRE', key, math.ceil((cap - lvl) * 60000 / cap) + 1000)
end
local function wait(lvl, cap, need)
  if lvl >= need then return 0 end
  return (need - lvl) * 60 / cap
end
local rpm, tpm = tonumber(ARGV[2]), tonumber(ARGV[3])
local lr, lt = nil, nil
if rpm > 0 then lr = level(KEYS[1], rpm) end
if tpm > 0 then lt = level(KEYS[2], tpm) end
local ok, wr, wt = 1, 0, 0
if ARGV[1] == 'take' then
  local nr, nt = tonumber(ARGV[4]), tonumber(ARGV[5])
  if lr then wr = wait(lr, rpm, nr) end
  if lt then wt = wait(lt, tpm, math.max(nt, 1)) end
  if wr > 0 or wt > 0 then
    ok = 0
  else
    if lr then lr = lr - nr; save(KEYS[1], rpm, lr) end
    if lt then lt = lt - nt; save(KEYS[2], tpm, lt) end
  end
elseif lt then
  lt = math.min(tpm, lt + tonumber(ARGV[4]))
  save(KEYS[2], tpm, lt)
end
local function rem(l) if l then return math.max(0, math.floor(l)) end return -1 end
return {ok, string.format('%.6f', wr), string.format('%.6f', wt), rem(lr), rem(lt)}
"""


class SharedLimits:
    """The connection to Redis that every key's ``RedisLimits`` of this process uses, and the outage policy."""

    def __init__(
        self, url: str, metrics: Metrics, *, password_env: str | None = None, timeout_s: float = 0.25,
        on_failure: Literal["fail_open", "fail_closed"] = "fail_open", clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        password = None
        if password_env is not None:
            password = os.environ.get(password_env)
            if password is None:
                raise RuntimeError(f"limits_password_env: the environment variable {password_env} is not set")
        self.url, self.timeout_s, self.on_failure, self._clock = url, timeout_s, on_failure, clock
        self.redis = Redis(url, password=password, timeout_s=timeout_s)
        self.script = Script(self.redis, SCRIPT)
        self._errors = {o: metrics.limits_backend_errors.labels(o) for o in LIMITS_OUTCOMES}
        self._skip_until = -math.inf
        self._logged = -math.inf
        self._settling: set[asyncio.Task[None]] = set()

    async def run(self, keys: list[str], args: list[str | int]) -> tuple[bool, float, float, int, int] | None:
        """The script's answer, or None when Redis did not give one (and then it is not asked for a while)."""
        if self._clock() < self._skip_until:
            return None
        try:
            answer = await self.script(keys, args)
            ok, wait_r, wait_t, rem_r, rem_t = answer  # a Redis that answers something else has not answered
            return (bool(int(ok)), float(wait_r), float(wait_t), int(rem_r), int(rem_t))
        except Exception as exc:  # connection refused, timeout, auth, a script error: all mean "no answer"
            self._skip_until = self._clock() + RETRY_AFTER_S
            now = self._clock()
            if now - self._logged >= LOG_EVERY_S:
                self._logged = now
                log.warning(
                    "rate limits: Redis at %s did not answer (%s: %s); %s for %.0f s "
                    "(gateway_limits_backend_errors_total)",
                    _safe(self.url), type(exc).__name__, exc,
                    "admitting calls unchecked" if self.on_failure == "fail_open" else "refusing calls", RETRY_AFTER_S,
                )  # fmt: skip
            return None

    def failed(self, outcome: str) -> None:
        self._errors[outcome].inc()

    def later(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` without waiting for it (a settlement), keeping it until it ends (``drain`` waits)."""
        task = asyncio.get_running_loop().create_task(work)
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def drain(self) -> None:
        """Wait for the settlements sent so far (each ends within its timeout)."""
        if self._settling:
            await asyncio.wait(list(self._settling), timeout=self.timeout_s * 4)

    async def aclose(self) -> None:
        await self.drain()
        await self.redis.close()


def _safe(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}"


class RedisLimits:
    """A key's buckets in Redis (see the module's docstring)."""

    def __init__(self, shared: SharedLimits, key_id: str, name: str, rpm: int, tpm: int) -> None:
        self.shared, self.name, self.rpm, self.tpm = shared, name, rpm, tpm
        self.keys = [f"gw:rl:{{{key_id}}}:r", f"gw:rl:{{{key_id}}}:t"]

    async def take(self, requests: int, tokens: int) -> Grant:
        need_r, need_t = needs(self.rpm, self.tpm, requests, tokens)
        answer = await self.shared.run(self.keys, ["take", self.rpm, self.tpm, need_r, need_t])
        if answer is None:
            if self.shared.on_failure == "fail_closed":
                self.shared.failed("refused")
                raise LimitsUnavailable("rate limits cannot be checked (their store does not answer); retry shortly")
            self.shared.failed("admitted")
            return Grant(0)  # nothing reserved: the call's use is charged when it settles, if Redis is back
        ok, wait_r, wait_t, rem_r, rem_t = answer
        headers = _headers(self.rpm, self.tpm, None if rem_r < 0 else rem_r, None if rem_t < 0 else rem_t)
        if not ok:
            raise _refused(self.name, wait_r, wait_t, headers)
        return Grant(need_t, headers)

    def settle(self, reserved: int, used: int) -> None:
        if self.tpm and reserved != used:
            self.shared.later(self._settle(reserved - used))

    async def _settle(self, delta: int) -> None:
        if await self.shared.run(self.keys, ["settle", self.rpm, self.tpm, delta]) is None:
            self.shared.failed("unsettled")
