"""Deployment files, validated as far as a machine without Docker or a cluster allows: Kubernetes manifests
against the Kubernetes 1.37 OpenAPI schemas (kubernetes-validate, strict), docker-compose.yml and the
Dockerfiles structurally, and every config they mount loaded by the gateway's own validator."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml

from gateway.auth import hash_key
from gateway.config import ConfigError, load_settings

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
