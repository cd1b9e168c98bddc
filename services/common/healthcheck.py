"""``python -m services.common.healthcheck HOST:PORT``: exit 0 when the service there reports
SERVING on the standard grpc.health.v1 service (the overall status, service name ""), 1 otherwise.
Container health checks (docker compose) use it; the image has no grpc_health_probe."""
from __future__ import annotations

import sys

from haoping.client import HealthClient


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m services.common.healthcheck HOST:PORT", file=sys.stderr)
        return 2
    with HealthClient(argv[0]) as client:
        return 0 if client.health_status() == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
