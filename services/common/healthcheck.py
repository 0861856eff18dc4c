"""`python -m services.common.healthcheck [service]`: exits 0 when the
service (the argument, else $SERVICE) answers SERVING on its gRPC health
service at 127.0.0.1:IK_<SVC>_PORT (with TLS when the service serves it),
1 otherwise. The images' HEALTHCHECK; Kubernetes probes use gRPC directly."""
from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.config import DEFAULT_PORTS
from services.common.tls import GrpcTls


def serving(service: str, env: dict[str, str], timeout: float = 2.0) -> bool:
    port = env.get(f"IK_{service.upper()}_PORT", str(DEFAULT_PORTS[service]))
    try:
        with GrpcTls.from_env(env).channel(f"127.0.0.1:{port}") as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
    except grpc.RpcError:
        return False
    return answer.status == health_pb2.HealthCheckResponse.SERVING


def main(argv: list[str]) -> int:
    service = argv[0] if argv else os.environ.get("SERVICE", "")
    if service not in DEFAULT_PORTS:
        print(f"usage: python -m services.common.healthcheck <{'|'.join(DEFAULT_PORTS)}> (or SERVICE)",
              file=sys.stderr)
        return 2
    ok = serving(service, dict(os.environ))
    print(f"{service}: {'SERVING' if ok else 'not serving'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
