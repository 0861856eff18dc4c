"""gRPC servicer of ExecutorService: parses, authorises, calls one use case in
a unit of work, converts the result. Methods not implemented yet answer
UNIMPLEMENTED (the generated base class)."""
from infrakitchen.executor.v1 import executor_pb2, executor_pb2_grpc

SERVICE_NAME = executor_pb2.DESCRIPTOR.services_by_name["ExecutorService"].full_name


class ExecutorServicer(executor_pb2_grpc.ExecutorServiceServicer):
    def __init__(self, runtime):
        self.runtime = runtime


def register(server, runtime) -> list[str]:
    executor_pb2_grpc.add_ExecutorServiceServicer_to_server(ExecutorServicer(runtime), server)
    return [SERVICE_NAME]
