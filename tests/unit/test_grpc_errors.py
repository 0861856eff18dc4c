import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from services.common import errors
from services.common.clients import RemoteError, ServiceClients
from services.common.config import Settings
from services.common.grpc_errors import to_grpc_status


def _details(status: grpc.Status) -> dict:
    raw = dict(status.trailing_metadata)["grpc-status-details-bin"]
    st = status_pb2.Status.FromString(raw)
    found = {}
    for any_ in st.details:
        for cls in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest,
                    error_details_pb2.PreconditionFailure, error_details_pb2.ResourceInfo):
            if any_.Is(cls.DESCRIPTOR):
                msg = cls()
                any_.Unpack(msg)
                found[cls.DESCRIPTOR.name] = msg
    return found


def test_invalid_argument_carries_field_violations():
    err = errors.InvalidArgument("bad", [errors.FieldViolation("template.key", "must not be empty"),
                                         errors.FieldViolation("template.name", "too long")])
    status = to_grpc_status(err)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT and status.details == "bad"
    d = _details(status)
    assert [v.field for v in d["BadRequest"].field_violations] == ["template.key", "template.name"]
    assert d["ErrorInfo"].reason == "INVALID_ARGUMENT" and d["ErrorInfo"].domain == "infrakitchen.io"


def test_failed_precondition_carries_violations_and_reason():
    err = errors.FailedPrecondition("Cannot destroy resource", [
        errors.PreconditionViolation("DEPENDENCY", "resource/child-1", "eks-cluster-production is provisioned")],
        reason="DEPENDENCIES_EXIST")
    status = to_grpc_status(err)
    assert status.code == grpc.StatusCode.FAILED_PRECONDITION
    d = _details(status)
    assert d["ErrorInfo"].reason == "DEPENDENCIES_EXIST"
    assert d["PreconditionFailure"].violations[0].subject == "resource/child-1"


def test_not_found_and_already_exists_name_the_resource():
    for err, code in ((errors.NotFound("template", "t-1"), grpc.StatusCode.NOT_FOUND),
                      (errors.AlreadyExists("template", "vpc"), grpc.StatusCode.ALREADY_EXISTS)):
        status = to_grpc_status(err)
        assert status.code == code
        info = _details(status)["ResourceInfo"]
        assert (info.resource_type, info.resource_name) == (err.resource_type, err.resource_name)


def test_other_codes():
    assert to_grpc_status(errors.Aborted("stale etag")).code == grpc.StatusCode.ABORTED
    assert to_grpc_status(errors.Unavailable("executor down")).code == grpc.StatusCode.UNAVAILABLE
    assert to_grpc_status(errors.PermissionDenied("no")).code == grpc.StatusCode.PERMISSION_DENIED


def _rpc_error(err: errors.DomainError) -> grpc.aio.AioRpcError:
    status = to_grpc_status(err)
    return grpc.aio.AioRpcError(status.code, grpc.aio.Metadata(), grpc.aio.Metadata(*status.trailing_metadata),
                                details=status.details)


class _Callee:
    """A remote method that answers with the given errors, then with 'ok'."""

    def __init__(self, *errors_first: errors.DomainError):
        self.answers = list(errors_first)
        self.calls = 0

    async def __call__(self, request, metadata, timeout):
        self.calls += 1
        if self.answers:
            raise _rpc_error(self.answers.pop(0))
        return "ok"


@pytest.fixture
def clients(monkeypatch, tmp_path):
    monkeypatch.setattr("services.common.clients.CONFLICT_RETRY_DELAYS", (0, 0, 0))
    return ServiceClients(Settings.from_env("workflow", {"IK_AUTH_SECRET": "x" * 32, "IK_DATA_DIR": str(tmp_path)}),
                          "workflow")


async def test_a_concurrent_change_inside_the_callee_is_asked_again(clients):
    conflict = errors.Aborted("resource r was changed by someone else just now", reason="CONCURRENT_CHANGE")
    callee = _Callee(conflict, conflict)
    assert await clients.call("resource", callee, None) == "ok"
    assert callee.calls == 3


async def test_a_stale_etag_and_a_conflict_that_persists_reach_the_caller(clients):
    stale = _Callee(errors.Aborted("resource r was changed by someone else", reason="STALE_ETAG"))
    with pytest.raises(RemoteError) as raised:
        await clients.call("resource", stale, None)
    assert raised.value.code == grpc.StatusCode.ABORTED and stale.calls == 1
    conflict = errors.Aborted("changed", reason="CONCURRENT_CHANGE")
    endless = _Callee(*[conflict] * 10)
    with pytest.raises(RemoteError):
        await clients.call("resource", endless, None)
    assert endless.calls == 4
