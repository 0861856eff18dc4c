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
    assert "work" in {v["name"] for v in executor["volumes"] if "emptyDir" in v}
    [nats] = [d for d in docs if d["kind"] == "StatefulSet"]
    assert nats["spec"]["replicas"] == 3
    spread = nats["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert {(c["topologyKey"], c["whenUnsatisfiable"]) for c in spread} == {("kubernetes.io/hostname", "DoNotSchedule")}


def test_every_deployment_migrates_first_spreads_is_scraped_and_bounded_and_its_service_is_headless():
    docs = documents(KUBE / "base")
    assert not [d for d in docs if d["kind"] == "Job"], "no Job of fixed name: a new image could not re-apply it"
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    for d in (d for d in docs if d["kind"] == "Deployment"):
        name, template = d["metadata"]["name"], d["spec"]["template"]
        pod, service = template["spec"], d["metadata"]["name"].removeprefix("ik-")
        [init] = pod["initContainers"]
        assert init["args"] == ["python", "-m", "services.common.migrate", service], name
        assert init["image"] == pod["containers"][0]["image"]
        assert {e["name"] for e in init["env"]} == {f"IK_{service.upper()}_DATABASE_URL"}
        keys = {c["topologyKey"] for c in pod["topologySpreadConstraints"]}
        assert keys == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}, name
        assert all(c["labelSelector"]["matchLabels"] == {"app.kubernetes.io/name": name}
                   for c in pod["topologySpreadConstraints"])
        annotations = template["metadata"]["annotations"]
        metrics_port = next(p["containerPort"] for p in pod["containers"][0]["ports"] if p["name"] == "metrics")
        assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": str(metrics_port),
                               "prometheus.io/path": "/metrics"}
        assert all(v["emptyDir"].get("sizeLimit") for v in pod["volumes"] if "emptyDir" in v), name
        assert services[name]["spec"]["clusterIP"] == "None", f"{name}: clients balance over its replicas"


def test_images_are_pinned():
    for d in documents(KUBE / "base"):
        if d["kind"] not in ("Deployment", "StatefulSet"):
            continue
        pod = d["spec"]["template"]["spec"]
        for container in pod["containers"] + pod.get("initContainers", []):
            name, _, tag = container["image"].rpartition(":")
            assert name and tag and tag != "latest" and re.fullmatch(r"\d+\.\d+\.\d+(-\w+)?", tag), container["image"]


# The rules of the "restricted" Pod Security Standard (Kubernetes 1.30), as the
# admission controller applies them to a pod.
ALLOWED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected",
                   "secret"}


def restricted_violations(pod: dict) -> set[str]:
    found = set()
    pod_context = pod.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            found.add(key)
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= ALLOWED_VOLUMES:
            found.add(f"volume {volume['name']}: {', '.join(sorted(kinds))}")
    for c in pod["containers"] + pod.get("initContainers", []):
        context = c.get("securityContext", {})
        if context.get("privileged"):
            found.add(f"{c['name']}: privileged")
        if context.get("allowPrivilegeEscalation") is not False:
            found.add(f"{c['name']}: allowPrivilegeEscalation")
        caps = context.get("capabilities", {})
        if "ALL" not in caps.get("drop", []) or set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.add(f"{c['name']}: capabilities")
        if not context.get("runAsNonRoot", pod_context.get("runAsNonRoot")):
            found.add(f"{c['name']}: runAsNonRoot")
        if context.get("runAsUser", pod_context.get("runAsUser")) == 0:
            found.add(f"{c['name']}: runAsUser 0")
        seccomp = context.get("seccompProfile", pod_context.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.add(f"seccomp {seccomp}")
        if context.get("procMount", "Default") != "Default":
            found.add(f"procMount {context['procMount']}")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            found.add(f"{c['name']}: hostPort")
    return found


def test_every_pod_meets_the_restricted_pod_security_level_but_the_executors_documented_exceptions():
    architecture = (ROOT / "docs" / "architecture.md").read_text()
    for d in documents(KUBE / "base"):
        if d["kind"] not in ("Deployment", "StatefulSet"):
            continue
        found = restricted_violations(d["spec"]["template"]["spec"])
        if d["metadata"]["name"] != "ik-executor":
            assert not found, (d["metadata"]["name"], found)
            continue
        # bubblewrap's namespaces and /proc, pasta's TUN device: each said in docs/architecture.md.
        assert found == {"seccomp Unconfined", "procMount Unmasked", "volume tun: hostPath"}, found
        assert d["spec"]["template"]["spec"]["hostUsers"] is False  # what the API requires of Unmasked
        for said in ("`seccompProfile: Unconfined`", "`procMount: Unmasked`", "`hostPath` of `/dev/net/tun`"):
            assert said in architecture


def test_network_policies_let_only_the_services_reach_nats_and_the_database():
    docs = documents(KUBE / "base")
    policies = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    deployments = {d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"}
    nats = policies["ik-nats"]
    [clients] = [rule for rule in nats["ingress"] if {"port": 4222} in rule.get("ports", [])]
    [source] = clients["from"]
    assert set(source["podSelector"]["matchExpressions"][0]["values"]) == deployments
    assert not [rule for rule in nats["egress"] if {"port": 5432} in rule.get("ports", [])]

    def selected(spec) -> set[str]:
        selector = spec["podSelector"]
        if "matchLabels" in selector:
            return {selector["matchLabels"]["app.kubernetes.io/name"]}
        return set(selector["matchExpressions"][0]["values"])
    to_database = set().union(*(selected(p) for p in policies.values()
                                for rule in p.get("egress", []) if {"port": 5432} in rule.get("ports", [])))
    assert to_database == deployments
    [public] = [p for p in policies.values() if any("ipBlock" in t for r in p.get("egress", []) for t in r.get("to", []))]
    v4 = next(t["ipBlock"] for r in public["egress"] for t in r["to"] if t["ipBlock"]["cidr"] == "0.0.0.0/0")
    assert {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"} <= set(v4["except"])
    assert {p["port"] for r in public["egress"] for p in r["ports"]} == {443, 80, 22}


def test_the_secrets_script_makes_every_secret_the_manifests_read(tmp_path):
    import importlib.util
    import os
    import stat

    from cryptography.fernet import Fernet
    from cryptography.hazmat.primitives import serialization
    spec = importlib.util.spec_from_file_location("k8s_secrets", ROOT / "scripts" / "k8s_secrets.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "secrets"
    assert script.main(["--out", str(out), "--database-url", "postgresql://ik@db:5432/ik_{service}"]) == 0
    generator = yaml.safe_load((out / "kustomization.yaml").read_text())
    assert generator["generatorOptions"] == {"disableNameSuffixHash": True}
    made = {(g["name"], entry.split("=", 1)[0]): out / entry.split("=", 1)[1]
            for g in generator["secretGenerator"] for entry in g["files"]}
    read = set()
    for d in documents(KUBE / "base"):
        if d["kind"] not in ("Deployment", "StatefulSet"):
            continue
        pod = d["spec"]["template"]["spec"]
        for c in pod["containers"] + pod.get("initContainers", []):
            read |= {(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
                     for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
        for v in pod.get("volumes", []):
            if "secret" in v:
                items = v["secret"].get("items")
                read |= {(v["secret"]["secretName"], i["key"]) for i in items} if items else \
                    {(v["secret"]["secretName"], "authorization.conf")}
    assert read and read <= set(made), read - set(made)
    for path in made.values():
        if not path.name.endswith(".pub"):
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    Fernet(made[("ik-encryption", "executor")].read_text().strip())
    serialization.load_pem_private_key(made[("ik-service-keys", "workflow.key")].read_bytes(), password=None)
    assert made[("ik-databases", "resource")].read_text() == "postgresql://ik@db:5432/ik_resource"
    conf = made[("ik-nats-authorization", "authorization.conf")].read_text()
    assert conf.count("nkey:") == len(SERVICES) + 1  # the services' and the operators'
    assert not any("admin" in key for _, key in made)  # the operators' seed is in no Secret
    before = {k: p.read_bytes() for k, p in made.items()}
    assert script.main(["--out", str(out), "--database-url", "postgresql://ik@db:5432/ik_{service}"]) == 0
    assert {k: p.read_bytes() for k, p in made.items()} == before, "made once and kept"


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


def test_the_compose_file_runs_every_service_as_the_pod_spec_does():
    """The same rights as the pod spec and the images' e2e test: read-only, no
    capabilities, no privilege escalation; only the executor gets its sandbox's
    three rights. Each service mounts its own private key and the public keys
    read-only: none can put a key in another's name."""
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    for name in SERVICES:
        svc = compose["services"][name]
        assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"] and "/tmp" in svc["tmpfs"], name
        assert "no-new-privileges:true" in svc["security_opt"], name
        sandbox = {"seccomp=unconfined", "systempaths=unconfined"} & set(svc["security_opt"])
        assert sandbox == ({"seccomp=unconfined", "systempaths=unconfined"} if name == "executor" else set()), name
        assert ("devices" in svc) == (name == "executor"), name
        assert svc["environment"]["IK_SERVICE_KEY_FILE"] == "/run/ik/service.key"
        assert {f"{name}-data:/data", f"{name}-key:/run/ik:ro", "service-keys:/keys:ro"} <= set(svc["volumes"]), name
        assert not [v for v in svc["volumes"] if v.startswith("service-keys:") and not v.endswith(":ro")], name
    maker = compose["services"]["nats-identities"]
    assert "python -m services.common.identities --keys-dir /keys --private-dir /private" in maker["command"][2]
    assert {f"{name}-key:/private/{name}" for name in SERVICES} <= set(maker["volumes"])


def test_the_key_maker_writes_each_private_key_apart_and_the_public_keys_together(tmp_path):
    import os
    import subprocess
    import sys
    subprocess.run([sys.executable, "-m", "services.common.identities", "--keys-dir", str(tmp_path / "keys"),
                    "--private-dir", str(tmp_path / "private")], check=True, timeout=60)
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == sorted(f"{s}.pub" for s in SERVICES)
    for service in SERVICES:
        key = tmp_path / "private" / service / "service.key"
        assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY") and os.stat(key).st_mode & 0o777 == 0o600
    before = {p.name: p.read_bytes() for p in (tmp_path / "keys").iterdir()}
    subprocess.run([sys.executable, "-m", "services.common.identities", "--keys-dir", str(tmp_path / "keys"),
                    "--private-dir", str(tmp_path / "private")], check=True, timeout=60)
    assert {p.name: p.read_bytes() for p in (tmp_path / "keys").iterdir()} == before  # once


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
    assert images.pop("ik-executor") == "infrakitchen-executor:0.1.0"
    assert set(images.values()) == {"infrakitchen:0.1.0"}


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


def test_the_init_migration_needs_only_the_database_url(tmp_path):
    """The init container has the database's URL and nothing else (no auth
    key, a read-only root): migrating must neither need nor write more."""
    import subprocess
    import sys
    data = tmp_path / "data"
    data.mkdir()
    env = {"PATH": "/usr/bin:/bin", "IK_DATA_DIR": str(data),
           "IK_WORKFLOW_DATABASE_URL": f"sqlite:///{tmp_path / 'workflow.db'}"}
    done = subprocess.run([sys.executable, "-m", "services.common.migrate", "workflow"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "workflow: schema up to date" in done.stdout
    assert list(data.iterdir()) == [], "it wrote beside the schema (a key?)"
