"""Calls spread over every replica a service's name resolves to (a
Kubernetes headless Service gives one address per pod): the channels the
services and the CLI make balance round-robin, where one HTTP/2 connection
used to carry every call to the first replica."""
from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common.tls import SERVER_OPTIONS, GrpcTls
from tests.support.processes import free_port


class Counting(grpc.ServerInterceptor):
    def __init__(self):
        self.calls = 0

    def intercept_service(self, continuation, details):
        self.calls += 1
        return continuation(details)


def test_calls_are_spread_over_every_address_of_a_target():
    from concurrent import futures
    servers, counters, ports = [], [], []
    for _ in range(2):
        counter = Counting()
        server = grpc.server(futures.ThreadPoolExecutor(2), interceptors=[counter], options=SERVER_OPTIONS)
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
        port = free_port()
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        servers.append(server)
        counters.append(counter)
        ports.append(port)
    try:
        # Two addresses behind one target, as a headless Service's DNS name has.
        channel = GrpcTls.from_env({}).channel(f"ipv4:127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}")
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(20):
            assert stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
                health_pb2.HealthCheckResponse.SERVING
        channel.close()
        assert all(c.calls >= 5 for c in counters), [c.calls for c in counters]
    finally:
        for server in servers:
            server.stop(None)
