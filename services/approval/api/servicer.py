"""gRPC servicer of ApprovalService: parses, authorises, calls one use case in
a unit of work, converts the result. Methods not implemented yet answer
UNIMPLEMENTED (the generated base class)."""
from infrakitchen.approval.v1 import approval_pb2, approval_pb2_grpc

SERVICE_NAME = approval_pb2.DESCRIPTOR.services_by_name["ApprovalService"].full_name


class ApprovalServicer(approval_pb2_grpc.ApprovalServiceServicer):
    def __init__(self, runtime):
        self.runtime = runtime


def register(server, runtime) -> list[str]:
    approval_pb2_grpc.add_ApprovalServiceServicer_to_server(ApprovalServicer(runtime), server)
    return [SERVICE_NAME]
