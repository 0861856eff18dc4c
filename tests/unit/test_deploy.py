"""The deployment files, checked offline: every Kubernetes manifest of the
base and the example overlay against the API schemas (kubernetes-validate,
which ships them), and what an operator relies on: gRPC health probes,
non-root containers, resources, a disruption budget per service, a
three-node NATS; the compose file's services and what they are built from."""
from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from services.common.config import SERVICES

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
KUBE = DEPLOY / "kubernetes"
VERSION = "1.30.0"


def documents(directory: Path) -> list[dict]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    docs = []
    for entry in kustomization["resources"]:
        path = directory / entry
        if path.is_dir():
            docs += documents(path)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


@pytest.mark.parametrize("directory", [KUBE / "base", KUBE / "overlays" / "example"])
def test_every_manifest_is_valid_against_the_kubernetes_schemas(directory):
    docs = documents(directory)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, VERSION, strict=True)


def test_every_service_is_probed_by_grpc_health_runs_as_non_root_and_has_a_budget():
    docs = documents(KUBE / "base")
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    budgets = {d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] for d in docs
               if d["kind"] == "PodDisruptionBudget"}
    assert set(deployments) == {f"ik-{s}" for s in SERVICES}
    for name, d in deployments.items():
        pod = d["spec"]["template"]["spec"]
        [container] = pod["containers"]
        port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == port, (name, probe)
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
        env = {e["name"] for e in container["env"]}
        service = name.removeprefix("ik-")
        assert {f"IK_{service.upper()}_DATABASE_URL", "IK_STREAM_REPLICAS", "IK_ENCRYPTION_KEY"} <= env
        assert name in budgets, f"{name} has no PodDisruptionBudget"
    executor = deployments["ik-executor"]["spec"]["template"]["spec"]
    assert {"name": "work", "emptyDir": {}} in executor["volumes"]
    [nats] = [d for d in docs if d["kind"] == "StatefulSet"]
    assert nats["spec"]["replicas"] == 3


def test_the_overlay_patches_what_the_base_has():
    overlay = yaml.safe_load((KUBE / "overlays" / "example" / "kustomization.yaml").read_text())
    names = {(d["kind"], d["metadata"]["name"]) for d in documents(KUBE / "base")}
    for patch in overlay["patches"]:
        doc = yaml.safe_load((KUBE / "overlays" / "example" / patch["path"]).read_text())
        assert (doc["kind"], doc["metadata"]["name"]) in names


def test_the_compose_file_runs_every_service_from_files_that_exist():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert set(SERVICES) <= set(compose["services"])
    for name in SERVICES:
        build = compose["services"][name].get("build") or {}
        if build:
            assert (DEPLOY / build["context"] / build["dockerfile"]).exists()


def test_the_dashboard_uses_only_metrics_the_services_export():
    import json
    import re

    from prometheus_client.metrics import MetricWrapperBase

    from services.common import metrics
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}
    exported = {m._name + suffix for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)
                for suffix in suffixes[m._type]}
    dashboard = json.loads((DEPLOY / "grafana" / "infrakitchen.json").read_text())
    used = {m for panel in dashboard["panels"] for target in panel["targets"]
            for m in re.findall(r"\bik_[a-z_]+", target["expr"])}
    assert used and used <= exported, used - exported
