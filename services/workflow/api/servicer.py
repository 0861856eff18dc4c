"""gRPC servicer of WorkflowService: parses, authorises, calls one use case in
a unit of work, converts the result. Methods not implemented yet answer
UNIMPLEMENTED (the generated base class)."""
from infrakitchen.workflow.v1 import workflow_pb2, workflow_pb2_grpc

SERVICE_NAME = workflow_pb2.DESCRIPTOR.services_by_name["WorkflowService"].full_name


class WorkflowServicer(workflow_pb2_grpc.WorkflowServiceServicer):
    def __init__(self, runtime):
        self.runtime = runtime


def register(server, runtime) -> list[str]:
    workflow_pb2_grpc.add_WorkflowServiceServicer_to_server(WorkflowServicer(runtime), server)
    return [SERVICE_NAME]
