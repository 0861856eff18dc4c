"""`python -m examples.production_environment` against a running blueprint
service process: registers the seed's blueprint, and a second run changes nothing."""
from __future__ import annotations

import re
import subprocess
import sys
import uuid

import grpc
import pytest

from infrakitchen.blueprint.v1 import blueprint_pb2 as pb
from infrakitchen.blueprint.v1 import blueprint_pb2_grpc
from tests.support.processes import ROOT, ServiceProcesses, drop_streams

pytestmark = pytest.mark.e2e


def test_register_production_environment_twice(tmp_path, nats_url):
    prefix = f"e{uuid.uuid4().hex[:10]}"
    procs = ServiceProcesses(tmp_path / "data", prefix, nats_url)
    procs.start("blueprint")
    try:
        env = {**procs.env, "IK_BLUEPRINT_TARGET": procs.target("blueprint"), "IK_TOKEN": procs.token()}
        cmd = [sys.executable, "-m", "examples.production_environment", "--repo", str(tmp_path / "repo")]
        first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert first.returncode == 0, first.stderr
        second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 0, second.stderr
        assert first.stdout == second.stdout, "a second run returns what the first made"
        blueprint_id = re.search(r"blueprint 'Production Environment' (\S+) \(revision 1\)", first.stdout).group(1)

        with grpc.insecure_channel(procs.target("blueprint")) as channel:
            stub = blueprint_pb2_grpc.BlueprintServiceStub(channel)
            md = procs.metadata()
            assert len(stub.ListBlueprints(pb.ListBlueprintsRequest(), metadata=md).blueprints) == 1
            assert len(stub.ListTemplates(pb.ListTemplatesRequest(), metadata=md).templates) == 3
            preview = stub.PreviewBlueprint(pb.PreviewBlueprintRequest(id=blueprint_id), metadata=md)
        positions = sorted((s.position, s.template_name) for s in preview.steps)
        assert positions == [(0, "VPC"), (1, "EKS Cluster"), (1, "RDS Database")]
    finally:
        procs.stop()
        drop_streams(nats_url, prefix)


def test_register_team_environment_twice_with_its_cloud_integration(tmp_path, nats_url):
    prefix = f"e{uuid.uuid4().hex[:10]}"
    procs = ServiceProcesses(tmp_path / "data", prefix, nats_url)
    procs.start("blueprint", "executor")
    try:
        env = {**procs.env, "IK_BLUEPRINT_TARGET": procs.target("blueprint"),
               "IK_EXECUTOR_TARGET": procs.target("executor"), "IK_TOKEN": procs.token()}
        cmd = [sys.executable, "-m", "examples.team_environment", "--repo", str(tmp_path / "repo"),
               "--cloud", "http://127.0.0.1:8790", "--cloud-token", "dev"]
        first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert first.returncode == 0, first.stderr
        second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 0, second.stderr
        assert first.stdout == second.stdout, "a second run returns what the first made"
        blueprint_id = re.search(r"blueprint 'Team Environment' (\S+) \(revision 1\)", first.stdout).group(1)
        assert re.search(r"integration testcloud \S+", first.stdout)

        with grpc.insecure_channel(procs.target("blueprint")) as channel:
            stub = blueprint_pb2_grpc.BlueprintServiceStub(channel)
            preview = stub.PreviewBlueprint(pb.PreviewBlueprintRequest(id=blueprint_id), metadata=procs.metadata())
        positions = sorted((s.position, s.template_name) for s in preview.steps)
        assert positions == [(0, "Team Network"), (1, "Team Bucket"), (1, "Team Database")]
    finally:
        procs.stop()
        drop_streams(nats_url, prefix)
