"""Start real `cnn-serve` processes on loopback ports and talk to them (no mocks)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from bench.ports import free_port
from serving.probe import check

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULE_FILES = sorted(PROMETHEUS_DIR.glob("rules/*.yml"))
# Run by the tritonclient venv's python (conftest's `tritonclient_python`): SERVER X.npy MODEL
# OUT.npy. Saves the probabilities, prints the top-3 classification strings and the metadata.
TRITON_SCRIPT = r"""
import json, sys
import numpy as np
import tritonclient.grpc as grpcclient
x = np.load(sys.argv[2])
c = grpcclient.InferenceServerClient(sys.argv[1])
assert c.is_server_live() and c.is_server_ready() and c.is_model_ready(sys.argv[3])
inp = grpcclient.InferInput("images", list(x.shape), "UINT8")
inp.set_data_from_numpy(x)
out = [grpcclient.InferRequestedOutput("probabilities"),
       grpcclient.InferRequestedOutput("logits", class_count=3)]
r = c.infer(sys.argv[3], [inp], outputs=out)
np.save(sys.argv[4], r.as_numpy("probabilities"))
print(json.dumps({"top": [s.decode() for s in r.as_numpy("logits")[0]],
                  "meta": c.get_model_metadata(sys.argv[3], as_json=True)}))
"""


def wait_for(what: str, fn: Callable[[], Any], timeout: float = 20.0, every: float = 0.2) -> Any:
    """Poll `fn` until it returns something truthy; fail with `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, ValueError, KeyError):
            if result := fn():
                return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


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
        "serving.main",
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


def wait_serving(server: ServerProcess, timeout: float = 60.0, port: int = 0) -> None:
    """Until health on the gRPC port (or on plaintext `port`, when the gRPC port needs TLS or
    a token) says SERVING; stops the server and raises with its log if it does not."""
    target = f"{server.host}:{port}" if port else server.target
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited with {server.proc.returncode}:\n{server.log()}")
        if check(target, timeout=1.0) == "SERVING":
            return
        time.sleep(0.1)  # between probes of a condition, not a guess at how long start-up takes
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


# ----------------------------------------------------------------------------- a real Prometheus
def prometheus_config(target: str) -> dict:
    """deploy/prometheus/prometheus.yml as shipped, pointed at `target`, with our rule files
    by absolute path and every interval 1 s (so a test sees scrapes and rules within seconds)."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(p) for p in RULE_FILES]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [target]}]
    return config


@dataclass
class PrometheusAPI:
    """Prometheus' HTTP API at `url`, wherever that Prometheus runs."""

    url: str

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.url}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        with urllib.request.urlopen(url, timeout=5) as r:
            body = r.read().decode()
        return json.loads(body) if path.startswith("/api/") else body

    def query(self, expr: str) -> list[dict]:
        try:
            out = self.get("/api/v1/query", query=expr)
        except urllib.error.HTTPError as exc:
            if exc.code in (400, 422):  # a bad query: say why, and do not retry
                raise AssertionError(f"{expr}: {exc.read().decode()}") from None
            raise
        assert out["status"] == "success", out
        return out["data"]["result"]

    def value(self, expr: str) -> float:
        (result,) = self.query(expr)
        return float(result["value"][1])


class Prometheus(PrometheusAPI):
    """A real `prometheus` process scraping one target every second, with our rule files."""

    def __init__(self, tmp: Path, target: str):
        exe = shutil.which("prometheus")
        assert exe, "prometheus is missing: `make test` installs it (apt-get install prometheus)"
        (tmp / "prometheus.yml").write_text(json.dumps(prometheus_config(target)))  # JSON is YAML
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log_path = tmp / "prometheus.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [
                    exe,
                    f"--config.file={tmp / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp / 'data'}",
                    f"--web.listen-address={self.url.removeprefix('http://')}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self) -> None:
        def ready() -> bool:
            assert self.proc.poll() is None, self.log_path.read_text()
            return "Ready" in self.get("/-/ready")

        wait_for("Prometheus /-/ready", ready, timeout=30)
        targets = lambda: self.get("/api/v1/targets")["data"]["activeTargets"]  # noqa: E731
        wait_for("the target to be up", lambda: any(t["health"] == "up" for t in targets()))
        wait_for("a first stored scrape", lambda: self.query('up{job="convserve"} == 1'))

    def wait_scrapes_after(self, t: float, scrapes: int = 2) -> None:
        """Until `scrapes` scrapes (1 s apart) have started after `t`, a time.time() value
        (a sample's timestamp is the wall-clock time its scrape started)."""
        wait_for(
            f"{scrapes} scrapes after the workload",
            lambda: self.value('timestamp(up{job="convserve"})') > t + scrapes - 1,
        )

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
