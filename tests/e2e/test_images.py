"""The images, end to end: `make images` builds them with podman, each of the
five services runs in its own container with the security settings of the pod
spec (deploy/kubernetes/base), and the seed's Production Environment runs
through them, driven by the `ik` command line from outside. The executor's job
log shows each terraform command ran in its sandbox, inside the container.

Containers share the host's network (each service on a free port, the test's
NATS on the host) so tests can run side by side; everything else is as in the
pod spec: uid 10001 in a user namespace of its own, a read-only root file
system with a /tmp of its own, no capabilities, no privilege escalation; the
executor adds what its sandbox
needs and nothing more: seccomp unconfined (bubblewrap's namespaces), /proc
unmasked (bubblewrap mounts a /proc for each job's pid namespace) and the TUN
device (pasta, the job's own network)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from infrakitchen.executor.v1 import executor_pb2 as ep
from infrakitchen.executor.v1 import executor_pb2_grpc
from infrakitchen.workflow.v1 import workflow_pb2 as wp
from infrakitchen.workflow.v1 import workflow_pb2_grpc
from examples.catalog import publish_modules
from services.common.auth import Role, mint_token
from services.common.config import SERVICES
from tests.support.processes import ROOT, free_port

# A cold build (the Debian base, apt, pip for both targets) takes minutes.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

TAG = "0.1.0"
SERVICE_IMAGE, EXECUTOR_IMAGE = f"localhost/infrakitchen:{TAG}", f"localhost/infrakitchen-executor:{TAG}"
PODMAN_ENV = {**os.environ, "CONTAINERS_CONF": str(ROOT / "deploy" / "podman" / "containers.conf")}
UID = 10001  # the images' user, runAsUser in the pod spec
# Each container in a user namespace of its own mapping, as the executor's pod has
# (hostUsers: false): uid 10001 inside is HOST_UID outside, never a user of this machine.
USERNS_BASE = 200000
USERNS = ["--uidmap", f"0:{USERNS_BASE}:65536", "--gidmap", f"0:{USERNS_BASE}:65536"]
HOST_UID = USERNS_BASE + UID

# The pod spec's securityContext, as podman options (deploy/kubernetes/base/*.yaml).
RESTRICTED = [*USERNS, "--user", f"{UID}:{UID}", "--read-only", "--tmpfs", "/tmp:rw,size=256m,mode=1777",
              "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
EXECUTOR_SANDBOX = ["--security-opt", "seccomp=unconfined", "--security-opt", "unmask=/proc/*",
                    "--device", "/dev/net/tun"]


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["podman", *args], env=PODMAN_ENV, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"podman {args[0]} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done


def owned_dir(path: Path) -> Path:
    """A directory the containers' user owns (the pod spec's fsGroup does this for volumes)."""
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, HOST_UID, HOST_UID)
    return path


@pytest.fixture(scope="module")
def images():
    built = subprocess.run(["make", "images"], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return built.stdout


@dataclass
class Containers:
    """The five services' containers of one test, on the host's network."""
    names: dict[str, str]  # service -> container name
    ports: dict[str, int]
    secret: str  # IK_AUTH_SECRET
    env: dict[str, str]  # every container's environment
    keys: Path  # the public keys, mounted read-only in all
    private: Path  # <service>/service.key, each mounted in its own service only
    tmp_path: Path
    started: list[str] = field(default_factory=list)

    @property
    def modules(self) -> Path:
        """The example modules' git repository, read by the blueprint and executor containers."""
        return self.tmp_path / "modules"

    def start(self, service: str) -> None:
        image, extra = (EXECUTOR_IMAGE, EXECUTOR_SANDBOX) if service == "executor" else (SERVICE_IMAGE, [])
        if service in ("blueprint", "executor"):
            extra = [*extra, "--volume", f"{self.modules}:{self.modules}:ro"]
        data = owned_dir(self.tmp_path / "data" / service)
        args = ["run", "--detach", "--name", self.names[service], "--label", "ik-e2e=images", "--network", "host",
                *RESTRICTED, *extra,
                "--volume", f"{data}:/data", "--volume", f"{self.keys}:/keys:ro",
                "--volume", f"{self.private / service}:/run/ik:ro",
                *[a for k, v in {**self.env, "SERVICE": service}.items() for a in ("--env", f"{k}={v}")], image]
        self.started.append(self.names[service])  # before the run: a container made but not started is removed too
        podman(*args)


@pytest.fixture
def containers(images, tmp_path, event_prefix, nats_url):
    # Containers an earlier, killed run left behind (they hold ports on the host's network).
    stale = podman("ps", "--all", "--quiet", "--filter", "label=ik-e2e=images", "--filter", "status=exited",
                   check=False).stdout.split()
    if stale:
        podman("rm", "--force", "--ignore", *stale, check=False, timeout=60)
    run_id = uuid.uuid4().hex[:8]
    ports = {name: free_port() for name in SERVICES}
    secret = "test-secret-" + uuid.uuid4().hex
    # Each service's key pair, made beforehand as compose's nats-identities and the Kubernetes Secrets
    # do: the public keys mounted read-only in all, each private key only in its own service.
    keys, private = tmp_path / "keys", tmp_path / "private"
    subprocess.run([sys.executable, "-m", "services.common.identities", "--keys-dir", str(keys),
                    "--private-dir", str(private)], cwd=ROOT, check=True, timeout=60)
    subprocess.run(["chown", "-R", f"{HOST_UID}:{HOST_UID}", str(private)], check=True)
    env = {
        "IK_EVENT_PREFIX": event_prefix, "IK_NATS_URL": nats_url, "IK_AUTH_SECRET": secret,
        "IK_HOST": "127.0.0.1", "IK_SHUTDOWN_GRACE": "2",
        "IK_SERVICE_KEYS_DIR": "/keys", "IK_SERVICE_KEY_FILE": "/run/ik/service.key",
        **{f"IK_{n.upper()}_PORT": str(p) for n, p in ports.items()},
        **{f"IK_{n.upper()}_TARGET": f"127.0.0.1:{p}" for n, p in ports.items()},
    }
    platform = Containers({service: f"ik-e2e-{run_id}-{service}" for service in SERVICES}, ports, secret, env,
                          keys, private, tmp_path)
    yield platform
    if platform.started:
        podman("rm", "--force", "--ignore", "--time", "5", *platform.started, check=False, timeout=60)


def wait_healthy(platform, timeout: float = 120) -> None:
    """Each container's own HEALTHCHECK (the image's, docker format) says healthy."""
    deadline = time.monotonic() + timeout
    pending = set(platform.names.values())
    while pending:
        for name in sorted(pending):
            if podman("healthcheck", "run", name, check=False, timeout=30).returncode == 0:
                pending.discard(name)
            elif podman("inspect", "--format", "{{.State.Running}}", name, check=False).stdout.strip() != "true":
                raise AssertionError(f"{name} stopped:\n{podman('logs', name, check=False).stderr[-4000:]}")
        if pending and time.monotonic() > deadline:
            logs = {n: podman("logs", n, check=False).stderr[-3000:] for n in pending}
            raise AssertionError(f"not healthy after {timeout}s: {logs}")
        time.sleep(1)


def container_log(platform, service: str) -> str:
    return podman("logs", platform.names[service], check=False).stderr[-6000:]


def ik(platform, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(platform.tmp_path / "home"), "IK_DATA_DIR": str(platform.tmp_path / "cli"),
           "IK_CONFIG_DIR": str(platform.tmp_path / "config"), "COLUMNS": "160",
           **{f"IK_{s.upper()}_TARGET": f"127.0.0.1:{p}" for s, p in platform.ports.items()}}
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_images_are_slim_keep_their_healthcheck_and_run_as_a_user(images):
    # Bytes at most (262 and 369 MB when written; targets 250 and 400 MB).
    bounds = {SERVICE_IMAGE: 275_000_000, EXECUTOR_IMAGE: 400_000_000}
    for image in (SERVICE_IMAGE, EXECUTOR_IMAGE):
        inspected = podman("image", "inspect", "--format", "{{.Config.User}}|{{json .Config.Healthcheck}}|{{.Size}}",
                           image).stdout.strip()
        user, healthcheck, size = inspected.split("|")
        assert user == f"{UID}:{UID}"
        assert "services.common.healthcheck" in healthcheck, f"{image}: the HEALTHCHECK was dropped"
        assert int(size) <= bounds[image], f"{image}: {int(size) / 1e6:.0f} MB"
        # Runtime only: no pip, no compilers, no protoc, no git history.
        found = podman("run", "--rm", "--entrypoint", "sh", image, "-c",
                       "command -v pip gcc cc protoc; ls /opt/ik/bin | grep -x pip; ls -d /app/.git; true").stdout
        assert found.strip() == "", f"{image} carries build tools: {found}"


def test_the_production_environment_runs_in_containers(containers):
    platform = containers
    # The example modules, published as git where the blueprint and executor containers read them
    # (owned by their user: git refuses a repository of another owner).
    publish_modules(platform.modules)  # as root, then handed over
    subprocess.run(["chown", "-R", f"{HOST_UID}:{HOST_UID}", str(platform.modules)], check=True)
    home = platform.tmp_path / "home"  # the CLI's user (root here) publishes to the repository it does not own
    home.mkdir()
    (home / ".gitconfig").write_text(f"[safe]\n\tdirectory = {platform.modules}\n")
    for service in SERVICES:
        platform.start(service)
    wait_healthy(platform)
    for name in platform.names.values():
        # ik (uid 10001) inside, a uid of no user of this machine outside; nothing of the image can change.
        # (The service's own process; the executor's job networks are namespaces of their own.)
        pid = podman("inspect", "--format", "{{.State.Pid}}", name).stdout.strip()
        status = Path(f"/proc/{pid}/status").read_text()
        assert f"Uid:\t{HOST_UID}\t" in status, status
        assert podman("top", name, "pid", "user").stdout.split("\n")[1].split() == ["1", "ik"]
        touched = podman("exec", name, "touch", "/app/services/x", check=False)
        assert touched.returncode != 0 and "Read-only file system" in touched.stderr

    token = mint_token(platform.secret, "alice", Role.ADMIN)
    assert ik(platform, "login", "--token", token).returncode == 0
    registered = ik(platform, "example", "register", "--repo", str(platform.modules),
                    "--state-dir", "/data/example-state")  # in the executor's own volume
    assert registered.returncode == 0, registered.stdout + registered.stderr
    run = ik(platform, "workflow", "run", "Production Environment", "--var", "vpc.cidr_block=10.42.0.0/16")
    assert run.returncode == 0, run.stdout + run.stderr + container_log(platform, "executor")
    assert "done" in run.stdout

    md = [("authorization", f"Bearer {token}")]
    with grpc.insecure_channel(f"127.0.0.1:{platform.ports['workflow']}") as wc, \
            grpc.insecure_channel(f"127.0.0.1:{platform.ports['executor']}") as xc:
        [w] = workflow_pb2_grpc.WorkflowServiceStub(wc).ListWorkflows(wp.ListWorkflowsRequest(), metadata=md).workflows
        assert w.status == wp.WORKFLOW_STATUS_DONE and len(w.steps) == 3
        executor = executor_pb2_grpc.ExecutorServiceStub(xc)
        vpc = next(s for s in w.steps if s.template_name == "VPC")
        log = "\n".join(line.text for message in executor.StreamJobLogs(
            ep.StreamJobLogsRequest(job_id=vpc.job_id), metadata=md, timeout=30) for line in message.lines)
    # Every terraform command of the job ran in bubblewrap, with the job's own network, inside the container.
    assert "sandbox: bwrap" in log, log[-3000:]
    assert "network: the job's own" in log, log[-3000:]
    assert "Apply complete!" in log
