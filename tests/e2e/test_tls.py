"""Encrypted transport end to end: the five services as processes with mutual
TLS on gRPC (certificates made by the test), and a nats-server started by the
test with TLS (client certificates verified) and a password; the `ik`
command line, with a certificate too, registers and runs the example
workflow. Plaintext gRPC, and TLS without a client certificate, are refused."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from infrakitchen.workflow.v1 import workflow_pb2 as wp
from infrakitchen.workflow.v1 import workflow_pb2_grpc
from services.common.config import SERVICES
from tests.support.certs import make_certificates
from tests.support.processes import ROOT, ServiceProcesses, free_port

pytestmark = pytest.mark.e2e




@pytest.fixture
def tls_nats(tmp_path):
    """A nats-server of its own with JetStream, TLS (client certificates verified) and a password."""
    certs = make_certificates(tmp_path / "certs")
    port = free_port()
    conf = tmp_path / "nats.conf"
    conf.write_text(f'''
listen: "127.0.0.1:{port}"
jetstream {{ store_dir: "{tmp_path / 'js'}" }}
tls {{
  cert_file: "{certs['cert']}"
  key_file: "{certs['key']}"
  ca_file: "{certs['ca']}"
  verify: true
  timeout: 5
}}
authorization {{ user: "ik", password: "nats-pw-{port}" }}
''')
    server = "nats-server" if subprocess.run(["which", "nats-server"], capture_output=True).returncode == 0 \
        else "/usr/sbin/nats-server"
    proc = subprocess.Popen([server, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    yield f"tls://127.0.0.1:{port}", f"nats-pw-{port}", certs
    proc.terminate()
    proc.wait(10)


def test_the_example_runs_over_mutual_tls_on_grpc_and_tls_nats(tmp_path, event_prefix, tls_nats):
    nats_url, nats_password, certs = tls_nats
    tls_env = {"IK_TLS_CERT_FILE": str(certs["cert"]), "IK_TLS_KEY_FILE": str(certs["key"]),
               "IK_TLS_CA_FILE": str(certs["ca"]), "IK_TLS_CLIENT_AUTH": "require"}
    procs = ServiceProcesses(tmp_path / "data", event_prefix, nats_url, extra_env={
        **tls_env, "IK_NATS_TLS_CA_FILE": str(certs["ca"]), "IK_NATS_TLS_CERT_FILE": str(certs["cert"]),
        "IK_NATS_TLS_KEY_FILE": str(certs["key"]), "IK_NATS_USER": "ik", "IK_NATS_PASSWORD": nats_password})
    procs.start()
    try:
        # Plaintext is refused, and so is TLS without a client certificate.
        for channel in (grpc.insecure_channel(procs.target("workflow")),
                        grpc.secure_channel(procs.target("workflow"), grpc.ssl_channel_credentials(
                            root_certificates=certs["ca"].read_bytes()))):
            with channel, pytest.raises(grpc.RpcError) as refused:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        for name in SERVICES:
            assert "with mutual TLS" in procs.log(name)

        env = {**os.environ, **tls_env, "IK_DATA_DIR": str(procs.data_dir), "IK_CONFIG_DIR": str(tmp_path / "cfg"),
               "COLUMNS": "160", **{f"IK_{s.upper()}_TARGET": procs.target(s) for s in SERVICES}}

        def ik(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, env=env, capture_output=True,
                                  text=True, timeout=240)
        assert ik("login", "--token", procs.token()).returncode == 0
        registered = ik("example", "register")
        assert registered.returncode == 0, registered.stdout + registered.stderr
        run = ik("workflow", "run", "Production Environment", "--var", "vpc.cidr_block=10.44.0.0/16")
        assert run.returncode == 0, run.stdout + run.stderr
        with procs.channel("workflow") as channel:
            [w] = workflow_pb2_grpc.WorkflowServiceStub(channel).ListWorkflows(
                wp.ListWorkflowsRequest(), metadata=procs.metadata()).workflows
        assert w.status == wp.WORKFLOW_STATUS_DONE and len(w.steps) == 3
    finally:
        procs.stop()
