"""Client API keys: verification, per-key model allow-lists and rate limits. Off unless keys are configured.

Keys are random 256-bit secrets (``gateway keygen``); the configuration holds only their SHA-256, so a leaked
config file does not leak a key. (A fast hash is enough for random keys: there is nothing to brute-force, unlike
passwords.) The presented key's hash is compared with every configured hash in constant time, without an early
exit. Keys, like prompts, never appear in logs or metric labels: the key's configured ``name`` does.

Rate limits are token buckets refilled continuously: ``rpm`` requests and ``tpm`` tokens (prompt + completion,
from the backend's usage, charged when a call ends) per minute. A request is admitted while both buckets are
positive; one that is not gets 429 with ``Retry-After`` and OpenAI's ``x-ratelimit-*`` headers.
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
        """Take one request from the buckets or raise RateLimited; returns the x-ratelimit-* headers."""
        wait = 0.0
        if self.requests is not None:
            wait = max(wait, self.requests.wait_s(1.0))
        if self.tokens is not None:
            wait = max(wait, self.tokens.wait_s(1.0))
        if wait > 0:
            what = "requests" if self.requests is not None and self.requests.level < 1 else "tokens"
            err = RateLimited(f"rate limit of key {self.name!r} reached ({what} per minute)", retry_after=wait)
            err.extra_headers = self.headers()
            raise err
        if self.requests is not None:
            self.requests.level -= 1
        return self.headers()

    def charge(self, tokens: int) -> None:
        if self.tokens is not None:
            self.tokens.refill()
            self.tokens.level -= tokens

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
        self.clients: list[tuple[bytes, Client]] = []
        for key in auth.keys:
            if key.sha256 is None:  # parse_settings replaces key_env by the key's hash
                raise ValueError(f"API key {key.name!r}: key_env not read; load settings with parse_settings")
            allowed = None
            if key.models is not None:
                allowed = frozenset(m for m in (resolve(name) for name in key.models) if m is not None)
            self.clients.append((bytes.fromhex(key.sha256), Client(key, allowed, clock)))

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
