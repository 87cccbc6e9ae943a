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

from gateway.config import load_settings

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"


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
