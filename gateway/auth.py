"""Client API keys: verification, per-key model allow-lists and rate limits. Off unless keys are configured.

Keys are random 256-bit secrets (``gateway keygen``); the configuration holds only their SHA-256, so a leaked
config file does not leak a key. (A fast hash is enough for random keys: there is nothing to brute-force, unlike
passwords.) The presented key's hash is compared with every configured hash in constant time, without an early
exit. Keys, like prompts, never appear in logs or metric labels: the key's configured ``name`` does.

Rate limits are token buckets refilled continuously: ``rpm`` requests and ``tpm`` tokens (prompt + completion) per
minute. Tokens are *reserved* when a call is admitted, as the big API providers do: the call's possible cost (its
prompt, estimated from the body's size, plus ``max_tokens`` or ``auth.reserve_completion_tokens``, times ``n``),
at most a full bucket. When the call ends the reservation is settled against what it really used (the backend's
usage; for a stream the client abandoned, the estimated prompt plus the token chunks it was sent), the difference
refunded. So a burst of concurrent calls stays within about the budget, and a client that hangs up before the last
token still pays for what it received. A fan-out to N models counts N requests and reserves for each.
A call that does not fit gets 429 with ``Retry-After`` and OpenAI's ``x-ratelimit-*`` headers.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import time
from collections.abc import Callable

from gateway.config import ApiKey, AuthSection
from gateway.errors import PermissionDenied, RateLimited, Unauthorized
from gateway.protocol import ParsedRequest

KEY_PREFIX = "gk-"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


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


class Client:
    """One configured key and its live limits."""

    def __init__(self, key: ApiKey, allowed: frozenset[str] | None, clock: Callable[[], float]) -> None:
        self.key = key
        self.name = key.name
        self.allowed = allowed  # canonical model ids, None: all
        self.requests = Bucket(key.rpm, clock) if key.rpm else None
        self.tokens = Bucket(key.tpm, clock) if key.tpm else None

    def check_model(self, model: str) -> None:
        if self.allowed is not None and model not in self.allowed:
            raise PermissionDenied(f"this API key may not use model `{model}`", param="model")

    def admit(self) -> dict[str, str]:
        """One request of a route that costs no tokens (``GET /v1/models``, say); returns the x-ratelimit-* headers."""
        self.reserve(1, 0)
        return self.headers()

    def reserve(self, requests: int, tokens: int) -> int:
        """Take ``requests`` from the request bucket and reserve ``tokens`` (at most a full bucket, so that any call
        can run once the bucket is full) or raise RateLimited. Returns the tokens reserved: ``settle`` them."""
        need_r = min(requests, self.requests.capacity) if self.requests is not None else 0
        need_t = min(tokens, self.tokens.capacity) if self.tokens is not None else 0
        wait_r = self.requests.wait_s(need_r) if self.requests is not None else 0.0
        wait_t = self.tokens.wait_s(max(need_t, 1)) if self.tokens is not None else 0.0
        if wait_r > 0 or wait_t > 0:
            what = "requests" if wait_r >= wait_t else "tokens"
            err = RateLimited(
                f"rate limit of key {self.name!r} reached ({what} per minute)", retry_after=max(wait_r, wait_t)
            )
            err.extra_headers = self.headers()
            raise err
        if self.requests is not None:
            self.requests.level -= need_r
        if self.tokens is not None:
            self.tokens.level -= need_t
        return need_t

    def settle(self, reserved: int, used: int) -> None:
        """A call that reserved ``reserved`` tokens used ``used``: refund the difference (or charge the excess)."""
        if self.tokens is not None:
            self.tokens.refill()
            self.tokens.level = min(self.tokens.capacity, self.tokens.level + reserved - used)

    def headers(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for kind, bucket in (("requests", self.requests), ("tokens", self.tokens)):
            if bucket is not None:
                out[f"x-ratelimit-limit-{kind}"] = str(bucket.capacity)
                out[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(bucket.level)))
        return out


class Keyring:
    def __init__(
        self, auth: AuthSection, resolve: Callable[[str], str | None], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.enabled = auth.enabled
        self.protect_metrics = auth.protect_metrics
        self.reserve_completion_tokens = auth.reserve_completion_tokens
        self.clients: list[tuple[bytes, Client]] = []
        for key in auth.keys:
            if key.sha256 is None:  # parse_settings replaces key_env by the key's hash
                raise ValueError(f"API key {key.name!r}: key_env not read; load settings with parse_settings")
            allowed = None
            if key.models is not None:
                allowed = frozenset(m for m in (resolve(name) for name in key.models) if m is not None)
            self.clients.append((bytes.fromhex(key.sha256), Client(key, allowed, clock)))

    def estimate(self, parsed: ParsedRequest) -> int:
        """A call's possible cost in tokens, reserved when it is admitted: its prompt's estimate plus ``n``
        completions of ``max_tokens`` (or ``auth.reserve_completion_tokens``)."""
        return parsed.prompt_estimate + parsed.completions * (parsed.max_tokens or self.reserve_completion_tokens)

    def verify(self, authorization: str | None) -> Client:
        """The client presenting ``Authorization: Bearer <key>``, or Unauthorized."""
        if not authorization:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("malformed Authorization header: expected 'Bearer <key>'")
        digest = hashlib.sha256(token.strip().encode()).digest()
        found: Client | None = None
        for stored, client in self.clients:  # no early exit: the time taken does not depend on which key matched
            if hmac.compare_digest(stored, digest):
                found = client
        if found is None:
            raise Unauthorized("invalid API key")
        return found
