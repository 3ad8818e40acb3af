"""The sustainable rate of a pinned `cnn-serve`: the highest open-loop rate of the Python load
generator (cnn-bench) with no errors at a client deadline. `make soak` runs at a share of it.
(`make overload` measures closed-loop capacity with h2load instead: bench/overload_run.py.)
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import serving_bench as sb  # bench/ on sys.path, as the bench scripts set it
from prometheus_client.parser import text_string_to_metric_families

from serving.client.loadgen import LoadConfig, run_load
from serving.probe import check


class Metrics:
    """One scrape of /metrics: sample values, summed over the labels a question leaves out."""

    def __init__(self, text: str):
        self.samples = [smp for fam in text_string_to_metric_families(text) for smp in fam.samples]

    def value(self, name: str, **labels: str) -> float:
        return sum(
            smp.value
            for smp in self.samples
            if smp.name == name and labels.items() <= smp.labels.items()
        )

    def codes(self, method: str = "Predict") -> dict[str, float]:
        """convserve_requests_total of one method, by status code."""
        out: Counter[str] = Counter()
        for smp in self.samples:
            if smp.name == "convserve_requests_total" and smp.labels["method"] == method:
                out[smp.labels["code"]] += smp.value
        return dict(out)


@dataclass
class Server:
    """A `cnn-serve` started by serving_bench.started (which stops it with SIGTERM)."""

    proc: subprocess.Popen
    target: str
    metrics_url: str
    log_path: Path

    def metrics(self) -> Metrics:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as r:
            return Metrics(r.read().decode())

    def log(self) -> str:
        return self.log_path.read_text()


@contextlib.contextmanager
def start_pinned(repository: Path, tmp: Path, *args: str) -> Iterator[tuple[Server, dict]]:
    """`cnn-serve` on the first half of the CPUs (ORT threads: one per CPU there), while this
    process, and the client processes it starts, move to the rest. Offered several times its
    rate, a load generator sharing the server's cores starves it, and the figures would
    describe the client. Its exit code is `proc.returncode` once the block has ended."""
    cpus = sorted(os.sched_getaffinity(0))
    half = max(1, len(cpus) // 2)
    server, clients = set(cpus[:half]), set(cpus[half:]) or set(cpus)
    port, mport = sb.free_port(), sb.free_port()
    cmd = [sys.executable, "-m", "serving.main", "--model-repository", str(repository)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--poll-interval", "0"]
    cmd += ["--metrics-host", "127.0.0.1", "--metrics-port", str(mport)]
    system = sb.System(
        "convserve", "convserve", [*cmd, "--intra-op-threads", str(len(server)), *args], ()
    )
    log = tmp / "server.log"
    os.sched_setaffinity(0, server)  # the server process inherits it
    try:
        with sb.started(system, port, log) as proc:
            os.sched_setaffinity(0, clients)
            s = Server(proc, f"127.0.0.1:{port}", f"http://127.0.0.1:{mport}/metrics", log)
            sb.wait_ready(system, proc, log, lambda: _serving(s.target), timeout=60)
            yield s, {"server": sorted(server), "load_generator": sorted(clients)}
    finally:
        os.sched_setaffinity(0, clients)


def _serving(target: str) -> None:
    status = check(target, timeout=1.0)
    if status != "SERVING":
        raise AssertionError(status)


def queue_depth(s: Server) -> float:
    return s.metrics().value("convserve_queue_depth")


def wait_drained(s: Server, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while queue_depth(s) > 0:
        if time.monotonic() > end:
            raise RuntimeError("the queue did not drain")
        time.sleep(0.05)


def step(cfg: LoadConfig, rate: float, seconds: float) -> dict[str, Any]:
    r = run_load(replace(cfg, rate=rate, duration=seconds, warmup=1.0))
    return {
        "rate": rate,
        "ok": r["requests"],
        "errors": r["errors"],
        "p99_ms": r["latency_ms"]["p99"],
        "send_lag_ms": r["max_send_lag_ms"],
    }


def sustainable_rate(
    s: Server, cfg: LoadConfig, start: float, seconds: float, bisections: int = 4
) -> tuple[float, list[dict[str, Any]]]:
    """Highest open-loop rate with no errors: double until a step fails, then bisect."""
    steps: list[dict[str, Any]] = []

    def ok(rate: float) -> bool:
        wait_drained(s)
        steps.append(step(cfg, rate, seconds))
        print(f"  {rate:8.1f}/s: {steps[-1]}", flush=True)
        return not steps[-1]["errors"]

    good, bad = 0.0, start
    while ok(bad):
        good, bad = bad, bad * 2
    for _ in range(bisections):
        mid = (good + bad) / 2
        if ok(mid):
            good = mid
        else:
            bad = mid
    return good, steps
