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
A call that does not fit gets 429 with ``Retry-After`` and OpenAI's ``x-ratelimit-*`` headers. The buckets are
this process's unless ``gateway.limits_backend`` shares them through Redis (``gateway.limits``).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable

from gateway.config import ApiKey, AuthSection
from gateway.errors import PermissionDenied, Unauthorized
from gateway.limits import Grant, KeyLimits, LocalLimits, RedisLimits, SharedLimits
from gateway.protocol import ParsedRequest

KEY_PREFIX = "gk-"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


class Client:
    """One configured key and its live limits (``gateway.limits``: in this process, or shared through Redis)."""

    def __init__(self, key: ApiKey, allowed: frozenset[str] | None, limits: KeyLimits) -> None:
        self.key = key
        self.name = key.name
        self.allowed = allowed  # canonical model ids, None: all
        self.limits = limits

    def check_model(self, model: str) -> None:
        if self.allowed is not None and model not in self.allowed:
            raise PermissionDenied(f"this API key may not use model `{model}`", param="model")

    async def admit(self) -> dict[str, str]:
        """One request of a route that costs no tokens (``GET /v1/models``, say); returns the x-ratelimit-* headers."""
        return (await self.limits.take(1, 0)).headers

    async def reserve(self, requests: int, tokens: int) -> Grant:
        """Take ``requests`` from the request bucket and reserve ``tokens`` (at most a full bucket, so that any call
        can run once the bucket is full), or raise RateLimited. ``settle`` the grant's tokens when the call ends."""
        return await self.limits.take(requests, tokens)

    def settle(self, reserved: int, used: int) -> None:
        """A call that reserved ``reserved`` tokens used ``used``: refund the difference (or charge the excess)."""
        self.limits.settle(reserved, used)


class Keyring:
    def __init__(
        self, auth: AuthSection, resolve: Callable[[str], str | None], clock: Callable[[], float] = time.monotonic,
        shared: SharedLimits | None = None,
    ) -> None:  # fmt: skip
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
            limits: KeyLimits = (
                LocalLimits(key.name, key.rpm or 0, key.tpm or 0, clock)
                if shared is None
                else RedisLimits(shared, key.sha256[:32], key.name, key.rpm or 0, key.tpm or 0)
            )
            self.clients.append((bytes.fromhex(key.sha256), Client(key, allowed, limits)))

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
