"""The generated TypeScript client (clients/typescript, built by `make
client-ts`) runs the README example against the services: preview, create,
execute, watch to the end, one job's logs, a decoded field violation."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest

from services.common.config import SERVICES
from tests.support.processes import ROOT, ServiceProcesses, drop_streams

pytestmark = pytest.mark.e2e

CLIENT = ROOT / "clients" / "typescript"


def test_the_typescript_client_runs_the_example_end_to_end(tmp_path, nats_url):
    assert (CLIENT / "dist" / "example.js").exists(), "run `make client-ts` (part of `make test`)"
    node = shutil.which("node")
    assert node, "Node.js is needed for the TypeScript client"
    prefix = f"ts{uuid.uuid4().hex[:8]}"
    procs = ServiceProcesses(tmp_path / "data", prefix, nats_url)
    procs.start()
    try:
        env = {**os.environ, "IK_DATA_DIR": str(procs.data_dir), "IK_CONFIG_DIR": str(tmp_path / "config"),
               "IK_TOKEN": procs.token(), **{f"IK_{s.upper()}_TARGET": procs.target(s) for s in SERVICES}}
        registered = subprocess.run([sys.executable, "-m", "cli", "example", "register"], cwd=ROOT, env=env,
                                    capture_output=True, text=True, timeout=240)
        assert registered.returncode == 0, registered.stdout + registered.stderr
        run = subprocess.run([node, "dist/example.js"], cwd=CLIENT, env=env, capture_output=True, text=True,
                             timeout=240)
        assert run.returncode == 0, run.stdout + run.stderr
        summary = json.loads(run.stdout[run.stdout.index("{\n"):])
        # The live lines name statuses (enums are numbers in TypeScript).
        assert "VPC=DONE" in run.stdout and "VPC=3" not in run.stdout, run.stdout
        assert summary["status"] == "DONE" and set(summary["steps"]) == {"VPC", "EKS Cluster", "RDS Database"}
        assert isinstance(summary["subnetIds"], list) and summary["subnetIds"]  # a Struct as JSON
        assert summary["vpcJob"]["applyComplete"] and summary["vpcJob"]["lines"] > 0
        assert summary["vpcJob"]["finalStatus"] == "SUCCEEDED"
        violation = summary["violation"]
        assert violation["code"] == "InvalidArgument"
        assert "blueprint_id" in [v["field"] for v in violation["fieldViolations"]]
    finally:
        procs.stop()
        drop_streams(nats_url, prefix)
