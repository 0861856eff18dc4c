import grpc
from google.rpc import error_details_pb2, status_pb2

from services.common import errors
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
