"""The `ik` command line against the real services (separate processes), each
command group driven the way an operator would: typer's runner for most, a
real `ik` process where a service restarts under a live watch."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
from typer.testing import CliRunner

from cli.app import app
from infrakitchen.approval.v1 import approval_pb2 as ap
from infrakitchen.approval.v1 import approval_pb2_grpc
from services.common.auth import Role, mint_token
from services.common.config import SERVICES
from tests.support.processes import ROOT, ServiceProcesses, drop_streams, free_port

pytestmark = pytest.mark.e2e

SECRET_VALUE = "s3cr3t-value-never-shown"


@pytest.fixture(scope="module")
def platform(tmp_path_factory, nats_url):
    import uuid
    prefix = f"cli{uuid.uuid4().hex[:8]}"
    procs = ServiceProcesses(tmp_path_factory.mktemp("data"), prefix, nats_url)
    procs.start()
    procs.config_dir = tmp_path_factory.mktemp("config")
    yield procs
    procs.stop()
    drop_streams(nats_url, prefix)


def env_of(platform, **extra) -> dict[str, str]:
    return {"IK_DATA_DIR": str(platform.data_dir), "IK_CONFIG_DIR": str(platform.config_dir), "COLUMNS": "200",
            **{f"IK_{s.upper()}_TARGET": platform.target(s) for s in SERVICES}, **extra}


def ik(platform, *args: str, input: str | None = None, **env: str):
    result = CliRunner().invoke(app, list(args), env=env_of(platform, **env), input=input, catch_exceptions=False)
    return result


@pytest.fixture(scope="module")
def example(platform):
    assert ik(platform, "login", "--token", platform.token()).exit_code == 0
    registered = ik(platform, "example", "register")
    assert registered.exit_code == 0, registered.output
    run = ik(platform, "workflow", "run", "Production Environment", "--var", "vpc.cidr_block=10.7.0.0/16")
    assert run.exit_code == 0, run.output
    [w] = json.loads(ik(platform, "-o", "json", "workflow", "list").output)
    return w


def test_version_and_the_server_setting(platform, example):
    assert ik(platform, "--version").output.strip().startswith("ik ")
    # No targets: the server (flag or IK_SERVER) with each service's port as the services read it.
    ports = {f"IK_{s.upper()}_PORT": str(platform.ports[s]) for s in SERVICES}
    env = {"IK_CONFIG_DIR": str(platform.config_dir), **ports}
    listed = CliRunner().invoke(app, ["--server", "127.0.0.1", "-o", "json", "blueprint", "list"], env=env)
    assert listed.exit_code == 0 and json.loads(listed.output)[0]["name"] == "Production Environment"
    # A service that is not there: the message names it and where it was looked for.
    down = CliRunner().invoke(app, ["blueprint", "list"], env={**env, "IK_BLUEPRINT_PORT": str(free_port())})
    assert down.exit_code == 1 and "blueprint service at 127.0.0.1:" in down.output and "not reachable" in down.output


def test_blueprint_commands(platform, example):
    listed = json.loads(ik(platform, "-o", "json", "blueprint", "list").output)
    assert [b["name"] for b in listed] == ["Production Environment"]
    shown = ik(platform, "blueprint", "show", "Production Environment")
    assert shown.exit_code == 0 and "VPC" in shown.output and "-> " in shown.output  # a wiring rule
    preview = json.loads(ik(platform, "-o", "json", "blueprint", "preview", listed[0]["id"]).output)
    assert {s["template_name"]: s.get("position", 0) for s in preview["steps"]} == \
        {"VPC": 0, "EKS Cluster": 1, "RDS Database": 1}


def test_workflow_commands(platform, example):
    assert example["status"] == "WORKFLOW_STATUS_DONE"
    text = ik(platform, "workflow", "list").output
    assert "Production Environment" in text and example["id"] in text  # blueprint names, whole ids
    shown = json.loads(ik(platform, "-o", "json", "workflow", "show", example["id"]).output)
    eks = next(s for s in shown["steps"] if s["template_name"] == "EKS Cluster")
    assert isinstance(eks["resolved_variables"]["subnet_ids"], list)  # values as JSON
    tree = ik(platform, "workflow", "show", example["id"]).output
    assert '"subnet_ids": ["' in tree  # a list shown as JSON, not protobuf text


def test_a_workflow_is_created_planned_then_executed_and_watched_again(platform, example):
    created = ik(platform, "-o", "json", "workflow", "create", "Production Environment", "--var",
                 "vpc.cidr_block=10.8.0.0/16")
    assert created.exit_code == 0, created.output
    w = json.loads(created.output)
    assert w["status"] == "WORKFLOW_STATUS_PENDING"  # created, not executed
    said = ik(platform, "workflow", "create", "Production Environment", "--var", "nothing.here=1")
    assert said.exit_code == 2 and "template one of eks, rds, vpc" in said.output
    planned = ik(platform, "workflow", "plan", w["id"])
    assert planned.exit_code == 0, planned.output
    plan_id = json.loads(ik(platform, "-o", "json", "workflow", "show", w["id"]).output)["plan_id"]
    executed = ik(platform, "workflow", "execute", w["id"], "--plan", plan_id, "--no-watch")
    assert executed.exit_code == 0, executed.output
    watched = ik(platform, "workflow", "watch", w["id"])  # re-attach until it ends
    assert watched.exit_code == 0, watched.output
    assert "done" in watched.output and "VPC" in watched.output
    again = ik(platform, "workflow", "watch", example["id"])  # an ended one: shown, at once
    assert again.exit_code == 0 and "done" in again.output
    # A read-only user learns before the table and the question that it may not tear down;
    # the preview is theirs, its order naming steps, not resource ids.
    reader = mint_token(platform.secret, "reader", Role.READ)
    refused = ik(platform, "--token", reader, "workflow", "teardown", w["id"], "--yes")
    assert refused.exit_code == 1 and "needs the admin role" in refused.output
    assert "outside dependents" not in refused.output and "Destroy these" not in refused.output
    preview = ik(platform, "--token", reader, "workflow", "teardown", w["id"], "--preview")
    assert preview.exit_code == 0, preview.output
    vpc_row = next(line for line in preview.output.splitlines() if "│ VPC" in line)
    assert "EKS Cluster" in vpc_row and "RDS Database" in vpc_row  # destroyed after those two
    assert "needs the admin role" in preview.output
    scripted = json.loads(ik(platform, "-o", "json", "--token", reader, "workflow", "teardown", w["id"],
                             "--preview").output)
    assert len(scripted["steps"]) == 3 and scripted["caller_can_teardown"] is False
    torn = ik(platform, "workflow", "teardown", w["id"], "--yes")
    assert torn.exit_code == 0, torn.output
    lines = ik(platform, "workflow", "list").output.splitlines()
    listed = {i: next(line for line in lines if i in line) for i in (w["id"], example["id"])}
    assert "done, torn down" in listed[w["id"]] and "torn down" not in listed[example["id"]]


def test_the_approval_flow_is_shown_and_turned_on_and_off(platform, example):
    shown = ik(platform, "approval", "flow")
    assert shown.exit_code == 0 and "The approval flow is off" in shown.output
    on = ik(platform, "-o", "json", "approval", "flow", "on")
    assert on.exit_code == 0 and json.loads(on.output)["enabled"] is True
    denied = ik(platform, "--token", mint_token(platform.secret, "reader", Role.READ), "approval", "flow", "off")
    assert denied.exit_code == 1 and "PERMISSION_DENIED" in denied.output
    off = ik(platform, "approval", "flow", "off")
    assert off.exit_code == 0 and "The approval flow is off" in off.output and "set by" in off.output
    bad = ik(platform, "approval", "flow", "maybe")
    assert bad.exit_code == 2 and "`on` or `off`" in bad.output


def test_a_workflow_plan_waiting_for_approval_is_listed_with_its_plan_and_approved(platform, example):
    assert ik(platform, "approval", "flow", "on").exit_code == 0
    try:
        w = json.loads(ik(platform, "-o", "json", "workflow", "create", "Production Environment", "--var",
                          "vpc.cidr_block=10.9.0.0/16").output)
        assert ik(platform, "workflow", "plan", w["id"]).exit_code == 0
        plan_id = json.loads(ik(platform, "-o", "json", "workflow", "show", w["id"]).output)["plan_id"]
        executed = ik(platform, "workflow", "execute", w["id"], "--plan", plan_id, "--no-watch")
        assert executed.exit_code == 0 and "waits for approval" in executed.output, executed.output
        deadline = time.monotonic() + 30
        while True:
            listed = ik(platform, "approval", "list").output
            if f"workflow {w['id']}" in listed or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        line = next(line for line in listed.splitlines() if w["id"] in line)
        assert plan_id in listed and "in 3 steps" in line and "deferred" in line  # the whole plan, summed up
        [request] = [r for r in json.loads(ik(platform, "-o", "json", "approval", "list").output)
                     if r.get("workflow_id") == w["id"]]
        assert ik(platform, "approval", "approve", request["id"]).exit_code == 0
        assert ik(platform, "workflow", "watch", w["id"]).exit_code == 0
    finally:
        assert ik(platform, "approval", "flow", "off").exit_code == 0


def test_resource_commands(platform, example):
    # The resource service applies the executor's events on its own: it may be a moment behind the workflow.
    deadline = time.monotonic() + 30
    while True:
        resources = json.loads(ik(platform, "-o", "json", "resource", "list", "--workflow", example["id"]).output)
        if all(r["state"] == "RESOURCE_STATE_PROVISIONED" for r in resources) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(resources) == 3 and all(r["state"] == "RESOURCE_STATE_PROVISIONED" for r in resources)
    vpc = next(r for r in resources if r["name"].startswith("vpc"))
    shown = ik(platform, "resource", "show", vpc["id"])
    assert shown.exit_code == 0 and "output vpc_id" in shown.output
    tree = json.loads(ik(platform, "-o", "json", "resource", "tree", vpc["id"]).output)
    assert {c["name"] for c in tree["root"]["children"]} == {r["name"] for r in resources if r["id"] != vpc["id"]}
    logs = ik(platform, "resource", "logs", vpc["id"], "--follow")
    assert logs.exit_code == 0 and "Apply complete!" in logs.output
    filtered = json.loads(ik(platform, "-o", "json", "resource", "list", "--state", "destroyed", "--workflow",
                             example["id"]).output)
    assert filtered == []  # this workflow's are all live
    # Templates by name in the table, and by key in the filter.
    listed = ik(platform, "resource", "list", "--workflow", example["id"])
    assert listed.exit_code == 0 and "EKS Cluster" in listed.output and vpc["template_id"] not in listed.output
    by_key = json.loads(ik(platform, "-o", "json", "resource", "list", "--template", "vpc", "--workflow",
                           example["id"]).output)
    assert [r["id"] for r in by_key] == [vpc["id"]]
    bad = ik(platform, "resource", "list", "--state", "gone")
    assert bad.exit_code == 2 and "--state must be one of" in bad.output
    # A resource of its own, from a template key (never provisioned).
    refused = ik(platform, "resource", "create", "--template", "vpc", "--name", "cli-made")
    assert refused.exit_code == 1 and "resource.variables.name: is required" in refused.output  # violations listed
    [integration] = json.loads(ik(platform, "-o", "json", "integration", "list").output)
    made = ik(platform, "resource", "create", "--template", "vpc", "--name", "cli-made", "--var", "name=cli-made",
              "--var", "cidr_block=10.3.0.0/16", "--integration", integration["id"], "--label", "cli")
    assert made.exit_code == 0, made.output
    [mine] = json.loads(ik(platform, "-o", "json", "resource", "list", "--label", "cli").output)
    assert mine["name"] == "cli-made" and mine["variables"]["cidr_block"] == "10.3.0.0/16"
    # Only a destroyed resource's record may be deleted: the refusal says why.
    refused = ik(platform, "resource", "delete", mine["id"], "--yes")
    assert refused.exit_code == 1 and "delete needs destroyed/done" in refused.output
    # Destroying a resource others depend on is refused, naming the dependents.
    refused = ik(platform, "resource", "destroy", vpc["id"], "--yes")
    assert refused.exit_code == 1 and "FAILED_PRECONDITION" in refused.output
    assert any(r["id"] in refused.output for r in resources if r["id"] != vpc["id"])


def test_approval_commands(platform, example):
    resources = json.loads(ik(platform, "-o", "json", "resource", "list", "--workflow", example["id"]).output)
    with grpc.insecure_channel(platform.target("approval")) as channel:
        request = approval_pb2_grpc.ApprovalServiceStub(channel).CreateApprovalRequest(
            ap.CreateApprovalRequestRequest(approval_request=ap.ApprovalRequest(
                resource_id=resources[0]["id"], operation=ap.APPROVAL_OPERATION_DESTROY)),
            metadata=platform.metadata(Role.WRITE, "bob"), timeout=10)
    mine = json.loads(ik(platform, "-o", "json", "approval", "list").output)  # an admin may decide it
    assert request.id in [r["id"] for r in mine]
    approved = ik(platform, "approval", "approve", request.id, "--comment", "fine")
    assert approved.exit_code == 0 and "approved" in approved.output
    again = ik(platform, "approval", "reject", request.id)
    assert again.exit_code == 1 and "FAILED_PRECONDITION" in again.output


def test_integration_secret_and_storage_commands_never_echo_secrets(platform, example, tmp_path):
    credentials = tmp_path / "creds.json"
    credentials.write_text(json.dumps({"AWS_ACCESS_KEY_ID": "AKIA-TEST", "AWS_SECRET_ACCESS_KEY": SECRET_VALUE}))
    made = ik(platform, "integration", "create", "--name", "cloud", "--provider", "aws",
              "--credentials-file", str(credentials))
    assert made.exit_code == 0 and "AWS_SECRET_ACCESS_KEY" in made.output and SECRET_VALUE not in made.output
    listed = ik(platform, "-o", "json", "integration", "list").output
    assert "cloud" in listed and SECRET_VALUE not in listed
    values = tmp_path / "values.json"
    values.write_text(json.dumps({"db_password": SECRET_VALUE}))
    secret = ik(platform, "secret", "create", "--name", "db", "--values-file", str(values))
    assert secret.exit_code == 0 and SECRET_VALUE not in secret.output
    assert SECRET_VALUE not in ik(platform, "-o", "json", "secret", "list").output
    assert "example-local" in ik(platform, "storage", "list").output
    # A bad file never shows its content; the server's field violations are listed.
    broken = tmp_path / "broken.json"
    broken.write_text(f"{{not json {SECRET_VALUE}")
    bad = ik(platform, "integration", "create", "--name", "x", "--provider", "aws", "--credentials-file", str(broken))
    assert bad.exit_code == 2 and SECRET_VALUE not in bad.output
    unnamed = ik(platform, "integration", "create", "--name", "", "--provider", "aws",
                 "--credentials-file", str(credentials))
    assert unnamed.exit_code == 1 and "INVALID_ARGUMENT" in unnamed.output and "integration.name" in unnamed.output


def test_an_expired_token_says_to_log_in(platform, example):
    expired = mint_token(platform.secret, "alice", Role.ADMIN, ttl_seconds=-60)
    answer = ik(platform, "--token", expired, "workflow", "list")
    assert answer.exit_code == 1 and "expired" in answer.output and "ik login" in answer.output


def test_a_watch_survives_a_restart_of_the_workflow_service(platform, example):
    """A real `ik workflow run` follows the workflow while the workflow service is killed and started again."""
    env = {**os.environ, **env_of(platform), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cli", "workflow", "run", "Production Environment",
                             "--var", "vpc.cidr_block=10.8.0.0/16"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:  # until it says the workflow started: it is watching from then on
        seen.append(line)
        if "started." in line:
            break
    platform.stop("workflow", sig=signal.SIGKILL)
    platform.start("workflow")
    out = "".join(seen) + proc.communicate(timeout=180)[0]
    assert proc.returncode == 0, out
    assert "reconnecting" in out and "Traceback" not in out and "done" in out
