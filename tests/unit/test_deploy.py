"""The deployment files, checked offline: every Kubernetes manifest of the
base and the example overlay against the API schemas (kubernetes-validate,
which ships them), and what an operator relies on: gRPC health probes,
non-root containers, resources, a disruption budget per service, a
three-node NATS; the compose file's services and what they are built from;
the images: runtime only, non-root, health-checked."""
from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from services.common.config import SERVICES

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
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


def _stages(dockerfile: str) -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined)."""
    stages: dict[str, list[str]] = {}
    current = None
    for line in re.sub(r"\\\n\s*", " ", dockerfile).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            current = line.split()[-1]
            stages[current] = [line]
        elif current is not None:
            stages[current].append(line)
    return stages


RUNTIME_ONLY = ("pytest", "grpcio-tools", "grpcurl", "mypy-protobuf", "typer", "rich", "honcho",
                "kubernetes-validate", "terraform")


def _requirements(name: str) -> list[str]:
    lines = (ROOT / name).read_text().splitlines()
    return [line.split("==")[0].split("[")[0].strip().lower() for line in lines
            if line.strip() and not line.startswith(("#", "-r"))]


def test_the_images_are_runtime_only_non_root_and_health_checked():
    stages = _stages((DEPLOY / "Dockerfile").read_text())
    assert set(stages) == {"build", "build-executor", "base", "service", "executor"}
    service, executor = stages["service"], stages["executor"]
    # The runtime stages copy the build's virtualenv and generated code; nothing is compiled or
    # generated in them, and only the build stage installs tools.
    for stage in (service, executor):
        assert not any("pip install" in line or "grpc_tools" in line for line in stage), stage
        assert [line for line in stage if line.startswith("USER")][-1] == "USER 10001:10001"
    assert any(line.startswith("HEALTHCHECK") and "services.common.healthcheck" in line for line in stages["base"])
    assert service[0] == "FROM base AS service" and executor[0] == "FROM base AS executor"
    assert any(line == "COPY --from=build /opt/ik /opt/ik" for line in service)
    assert any(line == "COPY --from=build-executor /opt/ik /opt/ik" for line in executor)
    assert not any("requirements-executor.txt" in line for line in stages["build"])
    assert any("requirements-executor.txt" in line for line in stages["build-executor"])
    # What the runtime virtualenv gets: no test tools, code generators, CLI or Terraform.
    runtime = _requirements("requirements.txt")
    assert not [r for r in runtime if r.startswith(RUNTIME_ONLY)], runtime
    assert all(r.startswith("terraform") for r in _requirements("requirements-executor.txt"))
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert compose["services"]["executor"]["build"]["target"] == "executor"
    assert compose["services"]["workflow"]["build"]["target"] == "service"
    images = {d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]["image"]
              for d in documents(KUBE / "base") if d["kind"] == "Deployment"}
    assert images.pop("ik-executor") == "infrakitchen-executor:latest"
    assert set(images.values()) == {"infrakitchen:latest"}


def test_the_runtime_requirements_cover_every_import_of_the_services():
    """Every third-party module the services import comes from requirements.txt (or, for
    the executor alone, requirements-executor.txt), directly or as a dependency."""
    import ast
    import sys
    from importlib import metadata

    from packaging.requirements import Requirement

    def closure(requirement_lines: list[str]) -> set[str]:
        seen, todo = set(), [Requirement(line) for line in requirement_lines]
        while todo:
            req = todo.pop()
            name = req.name.lower().replace("_", "-")
            if name in seen:
                continue
            seen.add(name)
            for sub in map(Requirement, metadata.requires(name) or []):
                # A dependency counts when its marker holds here, for the extras asked for.
                if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in (req.extras or {""})):
                    todo.append(sub)
        return seen
    def lines(name: str) -> list[str]:
        return [line.strip() for line in (ROOT / name).read_text().splitlines()
                if line.strip() and not line.startswith(("#", "-r"))]
    runtime = closure(lines("requirements.txt"))
    executor = runtime | closure(lines("requirements-executor.txt"))
    distributions = metadata.packages_distributions()
    missing = set()
    for path in (ROOT / "services").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in ("services", "infrakitchen", "__future__"):
                    continue
                allowed = executor if "services/executor" in path.as_posix() else runtime
                dists = {d.lower().replace("_", "-") for d in distributions.get(top, [])}
                if not dists & allowed:
                    missing.add(f"{path.relative_to(ROOT)}: {top}")
    assert not missing, sorted(missing)
