"""Start real `cnn-serve` processes on loopback ports and talk to them (no mocks)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from serving.probe import check

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    metrics_port: int
    log_path: Path
    host: str = "127.0.0.1"  # the gRPC and metrics bind address

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.target)

    def metrics(self) -> str:
        url = f"http://{self.host}:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.read().decode()

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def start_server(
    repository: Path,
    tmp: Path,
    *args: str,
    wait: bool = True,
    timeout: float = 60.0,
    env: dict[str, str] | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    metrics_port: int = 0,
) -> ServerProcess:
    port, mport = port or free_port(), metrics_port or free_port()
    log_path = tmp / f"server-{host}-{port}.log"
    cmd = [
        sys.executable,
        "-m",
        "serving.server",
        "--model-repository",
        str(repository),
        "--host",
        host,
        "--port",
        str(port),
        "--metrics-host",
        host,
        "--metrics-port",
        str(mport),
        *args,
    ]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    server = ServerProcess(proc, port, mport, log_path, host)
    if wait:
        wait_serving(server, timeout)
    return server


def wait_serving(server: ServerProcess, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited with {server.proc.returncode}:\n{server.log()}")
        if check(server.target, timeout=1.0) == "SERVING":
            return
        time.sleep(0.1)
    server.stop()
    raise TimeoutError(f"server not SERVING after {timeout}s:\n{server.log()}")


@contextlib.contextmanager
def running_server(repository: Path, tmp: Path, *args: str, **kw) -> Iterator[ServerProcess]:
    server = start_server(repository, tmp, *args, **kw)
    try:
        yield server
    finally:
        server.stop()


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` in a /metrics text."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def codes_of(text: str, method: str = "Predict") -> dict[str, float]:
    """convserve_requests_total of one method by status code, from a /metrics text."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if smp.name == "convserve_requests_total" and smp.labels["method"] == method:
                out[smp.labels["code"]] = out.get(smp.labels["code"], 0) + smp.value
    return out
