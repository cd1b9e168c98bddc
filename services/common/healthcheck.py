"""``python -m services.common.healthcheck HOST:PORT``: exit 0 when the service there reports
SERVING on the standard grpc.health.v1 service (the overall status, service name ""), 1 otherwise.
Container health checks (docker compose) use it; the image has no grpc_health_probe."""
from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def is_serving(address: str, timeout: float = 3.0) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                               timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m services.common.healthcheck HOST:PORT", file=sys.stderr)
        return 2
    return 0 if is_serving(argv[0]) else 1


if __name__ == "__main__":
    sys.exit(main())
