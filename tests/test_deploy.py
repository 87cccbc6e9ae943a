"""Deployment files, validated as far as a machine without Docker or a cluster allows: Kubernetes manifests
against the Kubernetes 1.37 OpenAPI schemas (kubernetes-validate, strict), docker-compose.yml and the
Dockerfiles structurally, and every config they mount loaded by the gateway's own validator."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml

from gateway.auth import hash_key
from gateway.config import ConfigError, load_settings, parse_settings

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
# The shipped gateway configs: they listen on every interface, so they take an admin key from the environment.
SHIPPED = ("deploy/config.gpu.yaml", "deploy/compose/config.cpu.yaml")
ADMIN_KEY_ENV = "GATEWAY_ADMIN_KEY"
ADMIN_KEY = "gk-admin-test-0123456789abcdef0123456789"


@pytest.fixture(autouse=True)
def admin_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """The admin key every shipped config needs; a test that wants it unset deletes it."""
    monkeypatch.setenv(ADMIN_KEY_ENV, ADMIN_KEY)


def k8s_docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        if path.name != "servicemonitor.yaml":  # a CRD: no schema in core Kubernetes
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


@pytest.mark.parametrize("doc", k8s_docs(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_kubernetes_manifests_match_the_schema(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, "1.37.0", strict=True)


def test_kubernetes_scale_out_shape() -> None:
    docs = k8s_docs()
    kinds = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    gateway = kinds[("Deployment", "gateway")]
    assert gateway["spec"]["replicas"] >= 2
    hpa = kinds[("HorizontalPodAutoscaler", "gateway")]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gateway"}
    assert hpa["minReplicas"] >= 2
    config = load_settings(DEPLOY / "config.gpu.yaml")
    for backend in config.backends:
        host = urlparse(backend.base_url).hostname
        deployment = kinds[("Deployment", str(host))]
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert backend.models[0] in container["args"]  # the Deployment serves the model the gateway routes to
        service = kinds[("Service", str(host))]
        assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    for name in ("gateway",):
        assert (
            kinds[("Service", name)]["spec"]["selector"].items()
            <= gateway["spec"]["template"]["metadata"]["labels"].items()
        )
    # graceful drain: Kubernetes must not SIGKILL before the preStop pause and the gateway's drain are over
    pod = gateway["spec"]["template"]["spec"]
    pre_stop = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + config.gateway.drain_s


def test_kustomization_references_existing_files() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (DEPLOY / resource).is_file(), resource
    for generator in kustomization["configMapGenerator"]:
        for entry in generator["files"]:
            assert (DEPLOY / entry.split("=")[-1]).is_file(), entry


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return data


def test_compose_services_are_complete() -> None:
    services = compose()["services"]
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no healthcheck"
        assert set(service["profiles"]) <= {"gpu", "cpu"} and service["profiles"], name
        image = service.get("image", "")
        assert re.search(r":[\w.${}:-]+$", image) and ":latest" not in image, f"{name}: pin the image ({image})"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name} mounts missing {source}"
        build = service.get("build")
        if isinstance(build, dict):
            assert (REPO / build["context"] / build["dockerfile"]).is_file()
    gpu = {n for n, s in services.items() if "gpu" in s["profiles"]}
    cpu = {n for n, s in services.items() if "cpu" in s["profiles"]}
    assert {"gateway", "prometheus", "grafana", "vllm-qwen3", "vllm-deepseek", "vllm-llama"} <= gpu
    assert {"gateway-cpu", "prometheus", "grafana", "vllm-cpu-qwen3", "vllm-cpu-deepseek", "vllm-cpu-llama"} <= cpu
    for name in ("vllm-qwen3", "vllm-deepseek", "vllm-llama"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
        assert "HF_TOKEN" in str(services[name]["environment"])  # the hub token comes from the environment


@pytest.mark.parametrize(
    ("config", "profile"), [("deploy/config.gpu.yaml", "gpu"), ("deploy/compose/config.cpu.yaml", "cpu")]
)
def test_compose_gateway_configs_point_at_compose_services(config: str, profile: str) -> None:
    services = compose()["services"]
    settings = load_settings(REPO / config)
    for backend in settings.backends:
        host = urlparse(backend.base_url).hostname
        assert host in services and profile in services[host]["profiles"], backend.base_url
        if profile == "cpu":
            assert f"tiny-{host.removeprefix('vllm-cpu-')}" in services[host]["command"]  # type: ignore[union-attr]


def test_compose_cpu_config_matches_the_local_one() -> None:
    local = load_settings(DEPLOY / "config.vllm-cpu.yaml")
    composed = load_settings(DEPLOY / "compose" / "config.cpu.yaml")
    assert composed.models == local.models
    assert [b.models for b in composed.backends] == [b.models for b in local.backends]


def test_dockerfiles_copy_what_exists() -> None:
    for dockerfile in (REPO / "Dockerfile", DEPLOY / "compose" / "Dockerfile.vllm-cpu"):
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY "):
                for source in line.split()[1:-1]:
                    assert (REPO / source).exists(), f"{dockerfile.name}: COPY {source}"


def test_compose_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    import shutil
    import subprocess

    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: apt-get install prometheus (.ci/run does)"
    config = yaml.safe_load((DEPLOY / "compose" / "prometheus.yml").read_text())
    config["rule_files"] = [str(DEPLOY / "prometheus" / "rules" / "*.yml")]  # the mount, resolved locally
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    provisioning = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "llm-gateway.yml").read_text())
    mounted = [v for v in compose()["services"]["grafana"]["volumes"] if "grafana/dashboards" in v]
    assert mounted[0].split(":")[1] == provisioning["providers"][0]["options"]["path"]


# -- locked by default: API keys, the Grafana password, metrics on their own port ---------------------------------
def required_env(value: str, var: str) -> bool:
    """Compose's ``${VAR:?message}``: with VAR unset or empty, compose refuses to start and prints the message."""
    return re.fullmatch(rf"\$\{{{var}:\?[^}}]+\}}", value) is not None


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    return dict(e.split("=", 1) for e in env) if isinstance(env, list) else {k: str(v) for k, v in env.items()}


def mounting(config: str) -> dict[str, Any]:
    """The compose service that mounts ``config`` as the gateway's config file."""
    services = compose()["services"].values()
    return next(s for s in services if f"./{config}:/etc/gateway/config.yaml:ro" in s.get("volumes", []))


def test_compose_refuses_to_start_without_an_admin_key_and_a_grafana_password() -> None:
    services = compose()["services"]
    for name in ("gateway", "gateway-cpu"):
        assert required_env(environment(services[name])[ADMIN_KEY_ENV], ADMIN_KEY_ENV), name
    grafana = environment(services["grafana"])
    assert required_env(grafana["GF_SECURITY_ADMIN_PASSWORD"], "GRAFANA_ADMIN_PASSWORD")
    assert grafana.get("GF_AUTH_ANONYMOUS_ENABLED", "false") == "false"
    assert ":-admin" not in (REPO / "docker-compose.yml").read_text()  # no default password left anywhere


@pytest.mark.parametrize("config", SHIPPED)
def test_shipped_configs_need_an_admin_key_from_the_environment(config: str, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = yaml.safe_load((REPO / config).read_text())["gateway"]["auth"]["keys"]
    # no hash shipped: nobody would know its key
    assert raw == [{"name": "admin", "key_env": ADMIN_KEY_ENV, "admin": True}]
    settings = load_settings(REPO / config)
    assert settings.gateway.host == "0.0.0.0" and settings.gateway.auth.enabled
    assert [(k.name, k.sha256, k.admin) for k in settings.gateway.auth.keys] == [("admin", hash_key(ADMIN_KEY), True)]
    assert ADMIN_KEY_ENV in environment(mounting(config))  # compose hands the variable to that gateway
    monkeypatch.delenv(ADMIN_KEY_ENV)
    with pytest.raises(ConfigError) as info:
        load_settings(REPO / config)
    assert f"gateway.auth.keys[0].key_env (key 'admin'): environment variable {ADMIN_KEY_ENV} is not set" in str(
        info.value
    )


def metrics_port(config: str) -> int:
    settings = load_settings(REPO / config)
    assert settings.gateway.metrics_port is not None, f"{config}: set gateway.metrics_port"
    return settings.gateway.metrics_port


def test_compose_prometheus_scrapes_the_unpublished_metrics_port() -> None:
    ports = {metrics_port(config) for config in SHIPPED}
    assert len(ports) == 1  # one scrape target serves both profiles
    port = ports.pop()
    jobs = {
        j["job_name"]: j for j in yaml.safe_load((DEPLOY / "compose" / "prometheus.yml").read_text())["scrape_configs"]
    }
    assert [t for c in jobs["gateway"]["static_configs"] for t in c["targets"]] == [f"gateway:{port}"]
    for config in SHIPPED:
        service = mounting(config)
        assert service["ports"] == ["8000:8000"]  # the API only: metrics stay on the compose network


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions with In / NotIn / Exists / DoesNotExist)."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for e in selector.get("matchExpressions", []):
        value = labels.get(e["key"])
        ok = {"In": value in e.get("values", []), "NotIn": value not in e.get("values", []),
              "Exists": value is not None, "DoesNotExist": value is None}[e["operator"]]  # fmt: skip
        if not ok:
            return False
    return True


def scraped_ports(pod: dict[str, Any]) -> set[int]:
    """The container ports the shipped PodMonitors scrape on ``pod``: an endpoint's named port, where the pod has it."""
    named = {p["name"]: p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
    monitors = [d for d in yaml.safe_load_all((DEPLOY / "k8s" / "servicemonitor.yaml").read_text()) if d]
    return {
        named[e["port"]]
        for m in monitors
        if m["kind"] == "PodMonitor" and matches(m["spec"]["selector"], pod["metadata"]["labels"])
        for e in m["spec"]["podMetricsEndpoints"]
        if e["port"] in named
    }


def test_kubernetes_gateway_takes_its_key_from_a_secret_and_is_scraped_on_the_metrics_port() -> None:
    kinds = {(d["kind"], d["metadata"]["name"]): d for d in k8s_docs()}
    pod = kinds[("Deployment", "gateway")]["spec"]["template"]
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    ref = env[ADMIN_KEY_ENV]["valueFrom"]["secretKeyRef"]
    assert not ref.get("optional", False)  # no Secret, no start: never an open gateway
    namespace = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())["namespace"]
    readme = (REPO / "README.md").read_text()
    assert f"kubectl -n {namespace} create secret generic {ref['name']} --from-literal={ref['key']}=" in readme
    assert not any(d["kind"] == "Secret" for d in k8s_docs())  # the user makes the key; none is shipped
    # the key-free probes stay on the API port; Prometheus scrapes the metrics port only
    assert (container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]) == (
        {"path": "/ready", "port": "http"}, {"path": "/health", "port": "http"},
    )  # fmt: skip
    port = metrics_port("deploy/config.gpu.yaml")
    assert {"name": "metrics", "containerPort": port} in container["ports"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    assert scraped_ports(pod) == {port}
    assert [p["targetPort"] for p in kinds[("Service", "gateway")]["spec"]["ports"]] == ["http"]  # not metrics
    for (kind, name), doc in kinds.items():
        if kind == "Deployment" and name.startswith("vllm-"):
            assert scraped_ports(doc["spec"]["template"]) == {8000}, name  # vLLM's /metrics is on its API port


# -- shared state: PostgreSQL results and Redis limits (compose override file, kustomize component) ---------------
SHARED_KEYS = ("results_db", "results_db_password_env", "limits_backend", "limits_password_env",
               "limits_on_failure", "limits_timeout_s")  # fmt: skip
COMPONENT = DEPLOY / "k8s" / "shared-state"
OVERRIDE = DEPLOY / "compose" / "shared-state.yaml"
# each shared-state config and the plain one it extends
SHARED_CONFIGS = {
    "deploy/k8s/shared-state/config.gpu.yaml": "deploy/config.gpu.yaml",
    "deploy/compose/config.cpu.shared.yaml": "deploy/compose/config.cpu.yaml",
}
STORE_PASSWORDS = {"POSTGRES_PASSWORD": "pg-test-0123456789abcdef", "REDIS_PASSWORD": "redis0123456789abcdef"}


@pytest.fixture
def store_passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in STORE_PASSWORDS.items():
        monkeypatch.setenv(name, value)


def pinned(image: str) -> bool:
    """``name:tag`` with a version in the tag (a digit), never latest."""
    return re.fullmatch(r"[\w./-]+:[\w.-]*\d[\w.-]*", image) is not None and not image.endswith(":latest")


def shared_state_settings(config: str) -> Any:
    """``config`` loaded by the gateway, checked for URLs without passwords; returns the two parsed URLs too."""
    settings = load_settings(REPO / config)
    db, limits = urlparse(settings.gateway.results_db), urlparse(settings.gateway.limits_backend)
    assert db.scheme == "postgresql" and limits.scheme == "redis", config
    assert db.password is None and limits.password is None and "@" not in limits.netloc, config
    assert settings.gateway.results_db_password_env and settings.gateway.limits_password_env, config
    return settings, db, limits


@pytest.mark.usefixtures("store_passwords")
@pytest.mark.parametrize(("shared", "plain"), SHARED_CONFIGS.items())
def test_shared_state_configs_are_the_plain_ones_with_postgres_and_redis(shared: str, plain: str) -> None:
    shared_state_settings(shared)
    raw_shared, raw_plain = (yaml.safe_load((REPO / c).read_text()) for c in (shared, plain))
    for raw in (raw_shared, raw_plain):
        for key in SHARED_KEYS:
            raw["gateway"].pop(key, None)
    assert raw_shared == raw_plain  # the same models, backends, keys and ports: only the stores differ


def component_docs() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((COMPONENT / "kustomization.yaml").read_text())
    return [d for r in kustomization["resources"] for d in yaml.safe_load_all((COMPONENT / r).read_text()) if d]


@pytest.mark.parametrize("doc", component_docs(), ids=lambda d: f"shared-state/{d['kind']}/{d['metadata']['name']}")
def test_kubernetes_shared_state_manifests_match_the_schema(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, "1.37.0", strict=True)


def secret_refs(pod: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Environment variable -> (Secret, key) for every container of a pod spec."""
    return {
        e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
        for c in pod["containers"]
        for e in c.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }


@pytest.mark.usefixtures("store_passwords")
def test_kubernetes_shared_state_component_fits_the_base() -> None:
    """By hand what kustomize would do: every name the component uses exists where it points."""
    base = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    component = yaml.safe_load((COMPONENT / "kustomization.yaml").read_text())
    assert component["kind"] == "Component"
    # off by default; the documented switch names this folder
    assert "components" not in base
    assert "# components:\n#   - k8s/shared-state\n" in (DEPLOY / "kustomization.yaml").read_text()
    assert (DEPLOY / "k8s/shared-state").resolve() == COMPONENT
    # the config: replaces the base's generated gateway config, under the same file name
    (generator,) = component["configMapGenerator"]
    base_generator = next(g for g in base["configMapGenerator"] if g["name"] == generator["name"])
    assert generator["behavior"] == "replace"
    (entry,) = generator["files"]
    assert entry.split("=")[0] == base_generator["files"][0].split("=")[0] == "config.yaml"
    config = f"deploy/k8s/shared-state/{entry.split('=')[1]}"
    assert config in SHARED_CONFIGS
    settings, db, limits = shared_state_settings(config)

    docs = {(d["kind"], d["metadata"]["name"]): d for d in component_docs()}
    postgres, redis = docs[("StatefulSet", "postgres")], docs[("Deployment", "redis")]
    for workload in (postgres, redis):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] > 0
        for c in pod["containers"]:
            assert pinned(c["image"]), c["image"]
            assert "readinessProbe" in c and "livenessProbe" in c, c["name"]
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert {"cpu", "memory"} <= c["resources"]["requests"].keys() & c["resources"]["limits"].keys()
    # the URLs in the config reach the Services, which select the pods on a port they have
    for url, workload in ((db, postgres), (limits, redis)):
        service = docs[("Service", str(url.hostname))]
        pod = workload["spec"]["template"]
        assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        (port,) = [p for p in service["spec"]["ports"] if p["port"] == url.port]
        assert port["targetPort"] in {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
    pg_env = {e["name"]: e.get("value") for e in postgres["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert (db.username, db.path.lstrip("/")) == (pg_env["POSTGRES_USER"], pg_env["POSTGRES_DB"])
    # the data on the claim: PGDATA below the claim's mount
    (claim,) = postgres["spec"]["volumeClaimTemplates"]
    container = postgres["spec"]["template"]["spec"]["containers"][0]
    mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == claim["metadata"]["name"])
    assert pg_env["PGDATA"].startswith(mount + "/")
    probes = [container[p]["exec"]["command"] for p in ("readinessProbe", "livenessProbe")]
    assert all(p[0] == "pg_isready" for p in probes)
    # redis: requirepass from its secret; probes authenticate
    redis_pod = redis["spec"]["template"]["spec"]
    redis_container = redis_pod["containers"][0]
    assert "requirepass" in redis_container["args"][0] and "$REDIS_PASSWORD" in redis_container["args"][0]
    for probe in ("readinessProbe", "livenessProbe"):
        command = " ".join(redis_container[probe]["exec"]["command"])
        assert "redis-cli ping" in command and 'REDISCLI_AUTH="$REDIS_PASSWORD"' in command
    # the gateway reads the same Secret keys as the stores, under the names its config gives
    patch = yaml.safe_load((COMPONENT / "gateway-patch.yaml").read_text())
    gateway_refs = secret_refs(patch["spec"]["template"]["spec"])
    store_refs = secret_refs(postgres["spec"]["template"]["spec"]) | secret_refs(redis_pod)
    assert gateway_refs[settings.gateway.results_db_password_env] == store_refs["POSTGRES_PASSWORD"]
    assert gateway_refs[settings.gateway.limits_password_env] == store_refs["REDIS_PASSWORD"]
    # every Secret key used is in the documented command, for the base's namespace; no Secret is shipped
    text = (COMPONENT / "kustomization.yaml").read_text()
    for secret, key in {*gateway_refs.values(), *store_refs.values()}:
        assert f"kubectl -n {base['namespace']} create secret generic {secret} \\" in text
        assert f"--from-literal={key}=" in text
    assert not any(kind == "Secret" for kind, _ in docs)
    # the patch drops the base gateway's /data emptyDir (the per-pod SQLite file) by the names the base uses
    gateway = next(d for d in k8s_docs() if (d["kind"], d["metadata"]["name"]) == ("Deployment", "gateway"))
    base_pod = gateway["spec"]["template"]["spec"]
    assert {"name": "data", "emptyDir": {}} in base_pod["volumes"]
    assert {"name": "data", "mountPath": "/data"} in base_pod["containers"][0]["volumeMounts"]
    assert patch["spec"]["template"]["spec"]["volumes"] == [{"name": "data", "$patch": "delete"}]
    patched = patch["spec"]["template"]["spec"]["containers"][0]
    assert patched["name"] == base_pod["containers"][0]["name"]
    assert patched["volumeMounts"] == [{"mountPath": "/data", "$patch": "delete"}]
    # only the gateway pods reach the stores
    gateway_labels = gateway["spec"]["template"]["metadata"]["labels"]
    for name, url in (("postgres", db), ("redis", limits)):
        policy = docs[("NetworkPolicy", name)]["spec"]
        assert matches(policy["podSelector"], docs[("Service", name)]["spec"]["selector"])
        (rule,) = policy["ingress"]
        assert [matches(f["podSelector"], gateway_labels) for f in rule["from"]] == [True]
        assert rule["ports"] == [{"protocol": "TCP", "port": url.port}]


def kustomize_build(path: Path) -> list[dict[str, Any]]:
    import shutil
    import subprocess

    kustomize, kubectl = shutil.which("kustomize"), shutil.which("kubectl")
    assert kustomize or kubectl, "neither kustomize nor kubectl is installed (kubectl kustomize builds deploy/)"
    command = [kustomize, "build", str(path)] if kustomize else [str(kubectl), "kustomize", str(path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def built_gateway(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], Any]:
    """The built gateway Deployment and the settings from the ConfigMap it mounts."""
    kinds = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    gateway = kinds[("Deployment", "gateway")]
    (config_map,) = [v["configMap"]["name"] for v in gateway["spec"]["template"]["spec"]["volumes"] if "configMap" in v]
    settings = parse_settings(yaml.safe_load(kinds[("ConfigMap", config_map)]["data"]["config.yaml"]), config_map)
    return gateway, settings


@pytest.mark.usefixtures("store_passwords")
def test_kubernetes_builds_with_and_without_shared_state(tmp_path: Path) -> None:
    plain = kustomize_build(DEPLOY)
    gateway, settings = built_gateway(plain)
    assert settings.gateway.results_db == "/data/gateway.sqlite" and settings.gateway.limits_backend == "local"
    assert not {"postgres", "redis"} & {d["metadata"]["name"] for d in plain}
    # turned on as deploy/kustomization.yaml says: its two commented lines uncommented
    import shutil

    shutil.copytree(DEPLOY, tmp_path / "deploy")
    kustomization = tmp_path / "deploy" / "kustomization.yaml"
    text, off = kustomization.read_text(), "# components:\n#   - k8s/shared-state\n"
    assert off in text
    kustomization.write_text(text.replace(off, "components:\n  - k8s/shared-state\n"))
    shared = kustomize_build(tmp_path / "deploy")
    for doc in shared:
        if doc["kind"] != "PodMonitor":
            kubernetes_validate.validate(doc, "1.37.0", strict=True)
    assert {d["metadata"]["namespace"] for d in shared if d["kind"] != "Namespace"} == {"llm-compare"}
    kinds = {(d["kind"], d["metadata"]["name"]) for d in shared}
    stores = {("StatefulSet", "postgres"), ("Deployment", "redis"), ("Service", "postgres"), ("Service", "redis")}
    assert stores | {("NetworkPolicy", "postgres"), ("NetworkPolicy", "redis")} <= kinds
    gateway, settings = built_gateway(shared)
    assert urlparse(settings.gateway.results_db).scheme == "postgresql"
    assert urlparse(settings.gateway.limits_backend).scheme == "redis"
    pod = gateway["spec"]["template"]["spec"]
    refs = secret_refs(pod)
    assert refs[settings.gateway.results_db_password_env] == ("gateway-state", "postgres-password")
    assert refs[settings.gateway.limits_password_env] == ("gateway-state", "redis-password")
    assert refs[ADMIN_KEY_ENV] == ("gateway-keys", "admin-key")  # the base's env kept, not replaced
    assert not any("emptyDir" in v for v in pod["volumes"])  # results in PostgreSQL, not on a per-pod volume
    assert [m["mountPath"] for m in pod["containers"][0]["volumeMounts"]] == ["/etc/gateway"]


def volume_target(volume: str) -> str:
    return volume.split(":")[1]


def merge_service(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Compose's merge of two files' definitions of a service (the rules the override relies on): mappings by key
    (environment, depends_on), volumes by container path, command / entrypoint / healthcheck replaced."""
    merged = dict(base)
    for key, value in override.items():
        if key == "volumes":
            by_target = {volume_target(v): v for v in base.get(key, [])} | {volume_target(v): v for v in value}
            merged[key] = list(by_target.values())
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            merged[key] = {**base[key], **value}
        elif isinstance(value, list) and isinstance(base.get(key), list) and key not in ("command", "entrypoint"):
            merged[key] = base[key] + value
        else:
            merged[key] = value
    return merged


def compose_with_shared_state() -> dict[str, Any]:
    override: dict[str, Any] = yaml.safe_load(OVERRIDE.read_text())
    merged = compose()
    for name, service in override["services"].items():
        base = merged["services"].get(name)
        merged["services"][name] = merge_service(base, service) if base else service
    merged["volumes"] = {**merged["volumes"], **override.get("volumes", {})}
    return merged


def test_compose_shared_state_is_a_second_file_so_the_plain_stacks_need_no_store_passwords() -> None:
    # compose resolves ${VAR:?} in the whole file before profiles: a store password required in docker-compose.yml
    # would stop `--profile cpu up` without shared state
    text = (REPO / "docker-compose.yml").read_text()
    assert not re.search(r"\$\{(POSTGRES|REDIS)_PASSWORD", text)
    assert "-f docker-compose.yml -f deploy/compose/shared-state.yaml" in text  # documented where users look


@pytest.mark.usefixtures("store_passwords")
def test_compose_shared_state_stores_and_gateways() -> None:
    merged = compose_with_shared_state()
    services = merged["services"]
    postgres, redis = services["postgres"], services["redis"]
    for name, service in (("postgres", postgres), ("redis", redis)):
        assert set(service["profiles"]) == {"gpu", "cpu"}, name  # with either stack
        assert pinned(service["image"]), service["image"]
        assert service["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name
    assert postgres["healthcheck"]["test"][1] == "pg_isready"
    pg_env, redis_env = environment(postgres), environment(redis)
    assert required_env(pg_env["POSTGRES_PASSWORD"], "POSTGRES_PASSWORD")
    assert required_env(redis_env["REDIS_PASSWORD"], "REDIS_PASSWORD")
    # data on a named volume, declared
    (data,) = [v for v in postgres["volumes"] if volume_target(v) == "/var/lib/postgresql/data"]
    assert data.split(":")[0] in merged["volumes"]
    # requirepass from the variable ($$: left for the container's shell, not interpolated by compose)
    assert "requirepass" in redis["command"][0] and '"$$REDIS_PASSWORD"' in redis["command"][0]
    assert redis["entrypoint"] == ["sh", "-c"] and redis["user"] == "redis"  # not root, as the image would
    health = redis["healthcheck"]["test"]
    assert health[0] == "CMD-SHELL" and 'REDISCLI_AUTH="$$REDIS_PASSWORD" redis-cli ping' in health[1]

    for name, config in (("gateway", "deploy/k8s/shared-state/config.gpu.yaml"),
                         ("gateway-cpu", "deploy/compose/config.cpu.shared.yaml")):  # fmt: skip
        gateway = services[name]
        mounts = [v for v in gateway["volumes"] if volume_target(v) == "/etc/gateway/config.yaml"]
        assert mounts == [f"./{config}:/etc/gateway/config.yaml:ro"], name  # replaces the plain config
        settings, db, limits = shared_state_settings(config)
        assert db.hostname == "postgres" and limits.hostname == "redis"
        assert (db.username, db.path.lstrip("/")) == (pg_env["POSTGRES_USER"], pg_env["POSTGRES_DB"])
        assert db.port == 5432 and limits.port == 6379
        env = environment(gateway)
        assert required_env(env[ADMIN_KEY_ENV], ADMIN_KEY_ENV)  # the plain file's variables kept
        # the gateway gets the same variables the stores take their passwords from
        assert env[settings.gateway.results_db_password_env] == pg_env["POSTGRES_PASSWORD"]
        assert env[settings.gateway.limits_password_env] == redis_env["REDIS_PASSWORD"]
        depends = gateway["depends_on"]
        assert depends["postgres"] == depends["redis"] == {"condition": "service_healthy"}, name
        assert set(compose()["services"][name]["depends_on"]) < set(depends)  # the backends kept
        assert set(gateway["profiles"]) == set(compose()["services"][name]["profiles"])


def docker_compose(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("docker-compose")
    assert exe, "docker-compose is not installed (Debian's docker-compose; .ci/run installs it)"
    return subprocess.run([exe, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False)


def test_docker_compose_itself_merges_the_shared_state_file_as_the_hand_merge_does() -> None:
    """Compose (Debian's docker-compose 1.29, which needs no engine for `config`) reads both files: the stacks
    without shared state start with no store passwords, with it they refuse to, and its merge gives the gateway
    the shared config, both passwords and the wait for healthy stores, as compose_with_shared_state() says."""
    base = {"PATH": os.environ["PATH"], "GATEWAY_ADMIN_KEY": "k" * 20, "GRAFANA_ADMIN_PASSWORD": "pw"}
    files = ["-f", "docker-compose.yml", "-f", "deploy/compose/shared-state.yaml"]
    for profile in ("cpu", "gpu"):
        plain = docker_compose("-f", "docker-compose.yml", "--profile", profile, "config", env=base)
        assert plain.returncode == 0, plain.stderr
        refused = docker_compose(*files, "--profile", profile, "config", env=base)
        assert refused.returncode != 0 and "POSTGRES_PASSWORD" in refused.stderr + refused.stdout
        done = docker_compose(*files, "--profile", profile, "config", env={**base, **STORE_PASSWORDS})
        assert done.returncode == 0, done.stderr
        services = yaml.safe_load(done.stdout)["services"]
        hand = compose_with_shared_state()["services"]
        name = "gateway-cpu" if profile == "cpu" else "gateway"
        mounts = {v.split(":")[1]: v.split(":")[0] for v in services[name]["volumes"]}
        (shared,) = [v for v in hand[name]["volumes"] if volume_target(v) == "/etc/gateway/config.yaml"]
        assert mounts["/etc/gateway/config.yaml"] == str(REPO / shared.split(":")[0])
        assert set(services[name]["depends_on"]) == set(hand[name]["depends_on"])
        assert services[name]["depends_on"]["postgres"] == {"condition": "service_healthy"}
        assert {k: v for k, v in services[name]["environment"].items() if k in STORE_PASSWORDS} == STORE_PASSWORDS
        assert {"postgres", "redis"} <= set(services)
