from __future__ import annotations

from pathlib import Path

import pytest

from gateway.auth import hash_key
from gateway.config import ConfigError, Settings, guess_card, load_settings

REPO = Path(__file__).resolve().parent.parent

GOOD = """
models:
  - id: m1
    family: qwen3
    origin: CN
    gpu: {type: L4, count: 2, usd_per_hour: 0.8}
    aliases: [one]
backends:
  - name: b1
    base_url: http://127.0.0.1:9/v1/
    models: [m1]
"""

# An admin key whose secret is in the environment, as the shipped deployments have it.
KEYED = (
    """
gateway:
  auth:
    keys:
      - name: ops
        key_env: GW_OPS_KEY
        admin: true
"""
    + GOOD
)
OPS_KEY = "gk-ops-0123456789abcdef0123456789abcdef"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gw.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["config.emulated.yaml", "config.gpu.yaml", "config.vllm-cpu.yaml"])
def test_shipped_examples_load(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_KEY", "gk-admin-0123456789abcdef")  # config.gpu.yaml's admin key
    settings = load_settings(REPO / "deploy" / name)
    assert {c.family for c in settings.models} == {"qwen3", "deepseek", "llama"}
    assert {c.origin for c in settings.models} == {"CN", "US"}


def test_good_config_and_derived_values(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, GOOD))
    backend = settings.backends[0]
    assert backend.base_url == "http://127.0.0.1:9"  # trailing /v1/ is the gateway's to add
    assert settings.backend_cost_per_hour(backend) == pytest.approx(1.6)
    assert backend.timeouts.connect == 5.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (GOOD.replace("http://127.0.0.1:9/v1/", "ftp://x"), "backends[0].base_url"),
        (GOOD.replace("count: 2", "count: -1"), "models[0].gpu.count"),
        (GOOD.replace("models: [m1]", "models: [m2]"), "serves 'm2', which has no model card"),
        (GOOD.replace("name: b1", "name: b1\n    color: red"), "backends[0].color"),
        (GOOD.replace("aliases: [one]", "aliases: [m1]"), "model name 'm1' is used by both"),
        (GOOD + "  - name: b1\n    base_url: http://x\n    models: [m1]\n", "backend name 'b1' is used twice"),
        (
            GOOD + "  - {name: b2, base_url: 'http://x', models: [m1], timeouts: {read: 0}}\n",
            "backends[1].timeouts.read",
        ),
        (
            KEYED.replace("key_env: GW_OPS_KEY", "key_env: GW_OPS_KEY\n        sha256: '" + "0" * 64 + "'"),
            "exactly one of",
        ),
        (
            KEYED.replace("key_env: GW_OPS_KEY", "admin: false"),
            "gateway.auth.keys[0]: Value error, give exactly one of",
        ),
        (KEYED.replace("GW_OPS_KEY", "not-a-variable"), "gateway.auth.keys[0].key_env: String should match pattern"),
        ("backends: []\n", "backends: List should have at least 1 item"),
        ("just a string", "expected a mapping"),
        ("models: [\n", "not valid YAML"),
    ],
)
def test_bad_config_names_file_and_field(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(path) in str(info.value)
    assert expected in str(info.value)


def test_model_without_backend(tmp_path: Path) -> None:
    text = GOOD.replace("backends:", "  - id: orphan\nbackends:")
    with pytest.raises(ConfigError, match="model 'orphan' has no backend serving it"):
        load_settings(write(tmp_path, text))


def test_api_key_comes_from_named_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, GOOD.replace("models: [m1]", "models: [m1]\n    api_key_env: B1_KEY"))
    monkeypatch.delenv("B1_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"backends\[0\].api_key_env: environment variable B1_KEY is not set"):
        load_settings(path)
    monkeypatch.setenv("B1_KEY", "sk-secret")
    assert load_settings(path).backends[0].api_key() == "sk-secret"


def test_client_key_from_env_keeps_only_its_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, KEYED)
    monkeypatch.setenv("GW_OPS_KEY", f"  {OPS_KEY}\n")  # as a Secret made from a file may hold it
    settings = load_settings(path)
    key = settings.gateway.auth.keys[0]
    assert (key.name, key.sha256, key.admin, settings.gateway.auth.enabled) == ("ops", hash_key(OPS_KEY), True, True)
    # `serve --workers` hands its workers the settings as JSON: they hold the hash only, and re-read the same
    handed = settings.model_dump_json()
    assert OPS_KEY not in handed and Settings.model_validate_json(handed) == settings


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, "environment variable GW_OPS_KEY is not set"),
        ("", "environment variable GW_OPS_KEY is empty"),
        ("  \n", "environment variable GW_OPS_KEY is empty"),
        ("short-key-15chr", "GW_OPS_KEY holds 15 characters; a key needs at least 16"),
    ],
    ids=["unset", "empty", "blank", "short"],
)
def test_client_key_from_env_must_be_set_and_long(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str | None, expected: str
) -> None:
    path = write(tmp_path, KEYED)
    if value is None:
        monkeypatch.delenv("GW_OPS_KEY", raising=False)
    else:
        monkeypatch.setenv("GW_OPS_KEY", value)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(info.value) == f"{path}: gateway.auth.keys[0].key_env (key 'ops'): {expected}"


def test_inline_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"backends\[0\].api_key"):
        load_settings(write(tmp_path, GOOD.replace("models: [m1]", "models: [m1]\n    api_key: sk-inline")))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "absent.yaml")


@pytest.mark.parametrize(
    ("model_id", "family", "origin"),
    [("Qwen/Qwen3-8B", "qwen3", "CN"), ("deepseek-ai/DeepSeek-V3", "deepseek", "CN"),
     ("meta-llama/Llama-3.1-8B-Instruct", "llama", "US"), ("mystery", "unknown", "unknown")],
)  # fmt: skip
def test_discovered_cards_are_guessed_from_the_id(model_id: str, family: str, origin: str) -> None:
    card = guess_card(model_id)
    assert (card.family, card.origin) == (family, origin)


@pytest.mark.parametrize(
    "url",
    ["http://admin:hunter2-s3cret@10.0.0.5:8000", "https://sk-live-s3cret@api.example/v1"],
    ids=["user-pass", "token"],
)
def test_credentials_in_a_backend_url_are_refused_without_echoing_them(tmp_path: Path, url: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, GOOD.replace("http://127.0.0.1:9/v1/", url)))
    message = str(info.value)
    assert "backends[0].base_url" in message and "api_key_env" in message
    assert "s3cret" not in message


@pytest.mark.parametrize(
    ("bad_line", "line", "column", "problem"),
    [
        ("    api_key: sk-live-s3cret: x", 12, 28, "mapping values are not allowed here"),  # a second ':'
        ("    token: *sk-live-s3cret", 12, 12, "found undefined alias"),  # PyYAML's own message names the alias
        ("    token: !!python/name:sk-live-s3cret x", 12, 12, "could not determine a constructor for the tag"),
        ("\ttoken: sk-live-s3cret", 12, 1, "found character '\\t' that cannot start any token"),
    ],
    ids=["mapping-value", "alias", "tag", "tab"],
)
def test_yaml_errors_name_line_and_column_but_not_the_text(
    tmp_path: Path, bad_line: str, line: int, column: int, problem: str
) -> None:
    path = write(tmp_path, GOOD.rstrip("\n") + "\n" + bad_line + "\n")
    assert path.read_text().splitlines()[line - 1] == bad_line
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert "s3cret" not in message
    assert message.startswith(f"{path}: not valid YAML at line {line}, column {column}: {problem}")


def test_a_yaml_value_that_cannot_be_built_is_a_config_error_without_its_text(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.rstrip("\n") + "\n    expires: 2001-13-45\n")  # a date PyYAML recognises, cannot build
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(info.value).startswith(f"{path}: not valid YAML") and "2001-13-45" not in str(info.value)
