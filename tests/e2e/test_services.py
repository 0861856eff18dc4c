"""The five services as separate processes, as `make run` starts them: health,
reflection (through grpcurl), authentication and graceful shutdown."""
from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from infrakitchen.approval.v1 import approval_pb2, approval_pb2_grpc
from infrakitchen.blueprint.v1 import blueprint_pb2, blueprint_pb2_grpc
from infrakitchen.executor.v1 import executor_pb2, executor_pb2_grpc
from infrakitchen.resource.v1 import resource_pb2, resource_pb2_grpc
from infrakitchen.workflow.v1 import workflow_pb2, workflow_pb2_grpc
from services.common.auth import Role
from services.common.config import SERVICES
from services.common.grpc_errors import status_details
from tests.support.processes import ROOT, ServiceProcesses, drop_streams

pytestmark = pytest.mark.e2e

GRPCURL = str(Path(sys.executable).parent / "grpcurl")

SERVICE_NAMES = {
    "blueprint": "infrakitchen.blueprint.v1.BlueprintService",
    "workflow": "infrakitchen.workflow.v1.WorkflowService",
    "resource": "infrakitchen.resource.v1.ResourceService",
    "executor": "infrakitchen.executor.v1.ExecutorService",
    "approval": "infrakitchen.approval.v1.ApprovalService",
}

# One write (or admin) method per service, called with an empty request.
WRITE_CALLS = {
    "blueprint": (blueprint_pb2_grpc.BlueprintServiceStub, "CreateTemplate", blueprint_pb2.CreateTemplateRequest),
    "workflow": (workflow_pb2_grpc.WorkflowServiceStub, "ExecuteWorkflow", workflow_pb2.ExecuteWorkflowRequest),
    "resource": (resource_pb2_grpc.ResourceServiceStub, "ProvisionResource", resource_pb2.ProvisionResourceRequest),
    "executor": (executor_pb2_grpc.ExecutorServiceStub, "SubmitJob", executor_pb2.SubmitJobRequest),
    "approval": (approval_pb2_grpc.ApprovalServiceStub, "CreateApprovalRequest",
                 approval_pb2.CreateApprovalRequestRequest),
}


def _start(tmp_path_factory, nats_url, database_urls=None):
    prefix = f"e{uuid.uuid4().hex[:10]}"
    procs = ServiceProcesses(tmp_path_factory.mktemp("data"), prefix, nats_url, database_urls)
    try:
        procs.start()
    except BaseException:
        procs.stop(sig=signal.SIGKILL)
        raise
    return procs, prefix


def _cleanup(procs, prefix, nats_url):
    procs.stop()
    drop_streams(nats_url, prefix)


@pytest.fixture(scope="module")
def platform(tmp_path_factory, nats_url):
    procs, prefix = _start(tmp_path_factory, nats_url)
    yield procs
    _cleanup(procs, prefix, nats_url)


def _call(procs, service, metadata):
    stub_cls, method, request_cls = WRITE_CALLS[service]
    with grpc.insecure_channel(procs.target(service)) as channel:
        with pytest.raises(grpc.RpcError) as info:
            getattr(stub_cls(channel), method)(request_cls(), metadata=metadata, timeout=10)
    return info.value


@pytest.mark.parametrize("service", SERVICES)
def test_health_serving_without_a_token(platform, service):
    with grpc.insecure_channel(platform.target(service)) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE_NAMES[service]):
            response = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_the_images_health_check_follows_the_service(platform):
    from tests.support.processes import ROOT, free_port

    def check(port: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "services.common.healthcheck"], cwd=ROOT, capture_output=True,
                              text=True, timeout=30, env={**platform.env, "SERVICE": "workflow",
                                                          "IK_WORKFLOW_PORT": str(port)})
    up = check(platform.ports["workflow"])
    assert up.returncode == 0 and "SERVING" in up.stdout
    down = check(free_port())  # nothing listens there
    assert down.returncode == 1 and "not serving" in down.stdout


def test_grpcurl_describes_a_method_and_a_message_with_their_comments(platform):
    target = platform.target("workflow")
    method = subprocess.run([GRPCURL, "-plaintext", target, "describe",
                             "infrakitchen.workflow.v1.WorkflowService.ExecuteWorkflow"],
                            capture_output=True, text=True, timeout=30)
    assert method.returncode == 0, method.stderr
    assert "rpc ExecuteWorkflow" in method.stdout and "re-execute" in method.stdout  # the RPC's comment
    message = subprocess.run([GRPCURL, "-plaintext", target, "describe", "infrakitchen.workflow.v1.ExecuteWorkflowRequest"],
                             capture_output=True, text=True, timeout=30)
    assert message.returncode == 0 and "Apply this plan" in message.stdout  # a field's comment


def test_reflection_v1_answers_with_source_info(platform):
    from google.protobuf import descriptor_pb2

    from services.common.reflection import V1Request, V1Response
    with grpc.insecure_channel(platform.target("resource")) as channel:
        call = channel.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                                     request_serializer=V1Request.SerializeToString,
                                     response_deserializer=V1Response.FromString)
        listed, described = list(call(iter([
            V1Request(list_services=""),
            V1Request(file_containing_symbol="infrakitchen.resource.v1.ResourceService.CreateResource")]),
            timeout=10))
    assert {"infrakitchen.resource.v1.ResourceService", "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection", "grpc.health.v1.Health"} <= \
        {s.name for s in listed.list_services_response.service}
    files = [descriptor_pb2.FileDescriptorProto.FromString(b)
             for b in described.file_descriptor_response.file_descriptor_proto]
    assert files[0].name == "infrakitchen/resource/v1/resource.proto"
    assert any(loc.leading_comments.strip() for loc in files[0].source_code_info.location)
    assert {"google/protobuf/timestamp.proto", "google/api/field_behavior.proto"} <= {f.name for f in files}


@pytest.mark.parametrize("service", SERVICES)
def test_grpcurl_lists_service_health_and_reflection(platform, service):
    out = subprocess.run([GRPCURL, "-plaintext", platform.target(service), "list"],
                         capture_output=True, text=True, timeout=30, check=True).stdout.split()
    assert SERVICE_NAMES[service] in out
    assert "grpc.health.v1.Health" in out
    assert "grpc.reflection.v1alpha.ServerReflection" in out
    check = subprocess.run([GRPCURL, "-plaintext", platform.target(service), "grpc.health.v1.Health/Check"],
                           capture_output=True, text=True, timeout=30, check=True).stdout
    assert '"SERVING"' in check


@pytest.mark.parametrize("service", SERVICES)
def test_call_without_token_is_unauthenticated(platform, service):
    err = _call(platform, service, metadata=None)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert status_details(err)["ErrorInfo"].reason == "TOKEN_MISSING"


@pytest.mark.parametrize("service", SERVICES)
def test_bad_token_is_unauthenticated(platform, service):
    err = _call(platform, service, metadata=[("authorization", "Bearer forged.token.value")])
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("service", SERVICES)
def test_read_token_on_write_method_is_permission_denied(platform, service):
    err = _call(platform, service, metadata=platform.metadata(Role.READ, "rita"))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert status_details(err)["ErrorInfo"].reason == "ROLE_TOO_LOW"
    assert "rita" in err.details()


@pytest.mark.parametrize("service", SERVICES)
def test_admin_token_passes_the_gate(platform, service):
    err = _call(platform, service, metadata=platform.metadata(Role.ADMIN))
    # Past authentication: the method itself answers (not implemented yet, or
    # refusing the empty request), never an auth error and never INTERNAL.
    assert err.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INVALID_ARGUMENT,
                          grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)


def test_a_wrong_wal_limit_is_said_without_a_stack_trace(platform, tmp_path):
    from tests.support.processes import free_port
    for value in ("12", "lots"):
        proc = subprocess.run([sys.executable, "-m", "services.approval"], cwd=ROOT, timeout=60,
                              env={**platform.env, "IK_SQLITE_WAL_LIMIT": value, "IK_DATA_DIR": str(tmp_path),
                                   "IK_APPROVAL_PORT": str(free_port())}, capture_output=True, text=True)
        assert proc.returncode == 1 and "cannot start: IK_SQLITE_WAL_LIMIT" in proc.stderr, proc.stderr[-1000:]
        assert "Traceback" not in proc.stderr


def test_second_process_on_a_taken_port_fails(platform):
    proc = subprocess.run([sys.executable, "-m", "services.approval"], cwd=ROOT, env=platform.env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert f"cannot listen on 127.0.0.1:{platform.ports['approval']}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_services_on_postgres_and_graceful_sigterm(tmp_path_factory, nats_url, postgres):
    urls = {name: postgres.create() for name in SERVICES}
    procs, prefix = _start(tmp_path_factory, nats_url, urls)
    try:
        with grpc.insecure_channel(procs.target("resource")) as channel:
            assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status \
                == health_pb2.HealthCheckResponse.SERVING
    finally:
        codes = procs.stop(sig=signal.SIGTERM)
        _cleanup(procs, prefix, nats_url)
    assert codes == {name: 0 for name in SERVICES}
    for name in SERVICES:
        assert f"{name} service stopped" in procs.log(name)


def _grpcurl(platform, service: str, method: str, body: str) -> subprocess.CompletedProcess:
    token = dict(platform.metadata())["authorization"]
    return subprocess.run([GRPCURL, "-plaintext", "-H", f"authorization: {token}", "-d", body,
                           platform.target(service), f"{SERVICE_NAMES[service]}/{method}"],
                          capture_output=True, text=True, timeout=30)


def test_grpcurl_shows_each_error_detail_by_its_fields_and_json_names_are_lower_camel_case(platform):
    """grpcurl resolves the error details through reflection (it printed them
    as raw base64, so a user saw no refused field), and every message, the
    details included, comes out with lowerCamelCase JSON names; requests
    take either spelling."""
    refused = _grpcurl(platform, "blueprint", "CreateTemplate", '{"template": {"key": "Bad Key!"}}')
    assert refused.returncode != 0 and "Code: InvalidArgument" in refused.stderr
    assert "not recognized" not in refused.stderr and "@value" not in refused.stderr, refused.stderr
    assert '"@type":"type.googleapis.com/google.rpc.BadRequest","fieldViolations":[{"field":"template.key"' \
        in refused.stderr
    assert '"reason":"INVALID_ARGUMENT"' in refused.stderr  # google.rpc.ErrorInfo

    missing = _grpcurl(platform, "blueprint", "GetTemplate", '{"id": "no-such-template"}')
    assert "Code: NotFound" in missing.stderr
    assert '"resourceName":"no-such-template","resourceType":"template"' in missing.stderr  # ResourceInfo

    made = _grpcurl(platform, "blueprint", "CreateTemplate",
                    '{"template": {"key": "grpcurl-abstract", "name": "Abstract", "enabled": true, "abstract": true}}')
    assert made.returncode == 0, made.stderr
    import json
    template = json.loads(made.stdout)
    assert "createTime" in template and "create_time" not in template
    snake = _grpcurl(platform, "blueprint", "CreateSourceCodeVersion", json.dumps(
        {"template_id": template["id"], "source": {"repository_url": "https://example.invalid/m.git", "ref": "v1",
                                                   "path": "m"}}))
    camel = _grpcurl(platform, "blueprint", "CreateSourceCodeVersion", json.dumps(
        {"templateId": template["id"], "source": {"repositoryUrl": "https://example.invalid/m.git", "ref": "v1",
                                                  "path": "m"}}))
    for refused in (snake, camel):  # both spellings read: the template is found, and is abstract
        assert "Code: FailedPrecondition" in refused.stderr, refused.stderr
        assert '"@type":"type.googleapis.com/google.rpc.PreconditionFailure","violations":[{"type":"TEMPLATE_ABSTRACT"' \
            in refused.stderr, refused.stderr
