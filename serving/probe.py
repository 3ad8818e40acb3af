"""`python -m serving.probe HOST:PORT`: exit 0 when grpc.health.v1 answers SERVING.

Used by container HEALTHCHECKs and scripts (`--wait 60` polls until SERVING or timeout).
Plaintext only: against a TLS port, probe cnn-serve's `--health-port` instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(target: str, service: str = "", timeout: float = 2.0) -> str:
    """The health status name (SERVING, NOT_SERVING, ...) or UNREACHABLE."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def wait_serving(target: str, timeout: float, service: str = "") -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if check(target, service) == "SERVING":
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="convserve-probe", description=__doc__)
    # A container HEALTHCHECK has no shell to expand variables: follow cnn-serve's port,
    # or its plaintext probe port when it has one (the main port may require mTLS/tokens).
    port = os.environ.get("CONVSERVE_HEALTH_PORT", "0")
    if port in ("", "0"):
        port = os.environ.get("CONVSERVE_PORT", "50051")
    default = f"localhost:{port}"
    p.add_argument("target", nargs="?", default=default, help=f"HOST:PORT (default {default})")
    p.add_argument("--service", default="", help="service name ('' = the whole server)")
    p.add_argument("--wait", type=float, default=0.0, help="poll up to this many seconds")
    args = p.parse_args(argv)
    if args.wait:
        ok = wait_serving(args.target, args.wait, args.service)
        print("SERVING" if ok else check(args.target, args.service))
        return 0 if ok else 1
    status = check(args.target, args.service)
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
