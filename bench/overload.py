"""`make overload`: find the sustainable rate, then offer many times more; writes
bench/results/overload.json.

1. Sustainable rate: the highest open-loop rate (cnn-bench) with no errors at the client
   deadline used below: doubling from --start-rate until a step fails, then bisection.
   Each step is short and starts on an empty queue.
2. Overload: --multiple times that rate, offered by --processes client processes for
   --seconds. The multiple the load generator really reached is reported (requests sent /
   time taken to send them, over the sustainable rate): on a small machine the clients share
   cores with the server and cannot always offer what was asked.
3. What must hold: the excess gets only RESOURCE_EXHAUSTED or DEADLINE_EXCEEDED (every
   status is counted); no row is computed for a request after it timed out or was cancelled
   (rows ONNX Runtime computed == rows answered OK + rows of callers that left while their
   batch was already running; convserve_dropped_rows_total counts the rest, dropped before
   compute); the server's RSS stays under --rss-bound-mib; after the load the queue depth is
   0 and the next request succeeds. Recovery time (load end -> queue empty, -> first OK) is
   a figure, not a check.

    python bench/overload.py --model-repository runs/bench-export/models
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import serving_bench as sb  # noqa: E402
from process_stats import MIB, Sampler, sample  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from serving.client.loadgen import LoadConfig, resolve, run_load  # noqa: E402
from serving.probe import check  # noqa: E402
from serving.proto.convserve.v1 import classifier_pb2 as pb  # noqa: E402
from serving.proto.convserve.v1 import classifier_pb2_grpc as pb_grpc  # noqa: E402

SHED = ("RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED")
# A handler can be cancelled in the instant between its rows being delivered and its
# response being sent; allow that many rows per run in the computed-rows identity.
LATE_ANSWER_SLACK_ROWS = 64


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


def predict_ok(s: Server, shape: tuple[int, ...]) -> bool:
    """One one-image Predict (on a fresh connection): True when it is answered OK."""
    data = bytes(int(np.prod(shape)))
    req = pb.PredictRequest(
        images=[pb.Image(tensor=pb.Tensor(dtype=pb.UINT8, shape=list(shape), data=data))]
    )
    with grpc.insecure_channel(s.target) as ch:
        try:
            return len(pb_grpc.ClassifierStub(ch).Predict(req, timeout=2.0).predictions) == 1
        except grpc.RpcError:
            return False


def first_ok_after(s: Server, shape: tuple[int, ...], t0: float) -> float:
    """Seconds from `t0` until a Predict succeeds (probing without pause)."""
    while not predict_ok(s, shape):
        if time.monotonic() - t0 > 60:
            raise RuntimeError("no request succeeded within 60 s of the load's end")
        time.sleep(0.01)
    return time.monotonic() - t0


def recovery(s: Server, shape: tuple[int, ...], t0: float) -> dict[str, float]:
    while queue_depth(s) > 0:
        if time.monotonic() - t0 > 60:
            raise RuntimeError("the queue did not drain within 60 s")
        time.sleep(0.01)
    drained = time.monotonic() - t0
    return {
        "queue_empty_s": round(drained, 3),
        "first_ok_s": round(first_ok_after(s, shape, t0), 3),
    }


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, int]:
    return {k: int(v - before.get(k, 0)) for k, v in after.items() if v - before.get(k, 0)}


def overload(
    s: Server, cfg: LoadConfig, rate: float, seconds: float
) -> tuple[dict[str, Any], Sampler, float]:
    """Offer `rate` for `seconds`, sampling the server's memory; returns the load report,
    the samples and when the load ended (every request answered or timed out)."""
    with Sampler(s.proc.pid, every=0.25) as mem:
        r = run_load(replace(cfg, rate=rate, duration=seconds, warmup=0.0))
        ended = time.monotonic()
    return r, mem, ended


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-repository", type=Path, default=ROOT / "runs/bench-export/models")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/overload.json")
    p.add_argument("--deadline", type=float, default=0.5, help="client deadline per request, s")
    p.add_argument("--start-rate", type=float, default=100.0)
    p.add_argument("--step-seconds", type=float, default=3.0)
    p.add_argument("--multiple", type=float, default=8.0, help="overload = this x sustainable")
    p.add_argument("--seconds", type=float, default=15.0, help="overload duration")
    p.add_argument("--processes", type=int, default=2, help="load generator processes")
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--rss-bound-mib", type=float, default=512.0)
    p.add_argument("server_args", nargs="*", help="extra cnn-serve flags (after --)")
    a = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="overload-"))
    with start_pinned(a.model_repository, tmp, *a.server_args) as (s, cpus):
        cfg = resolve(LoadConfig(target=s.target, timeout=a.deadline, connections=a.connections))
        print(f"sustainable rate (deadline {a.deadline}s, {a.step_seconds}s steps):")
        sustainable, steps = sustainable_rate(s, cfg, a.start_rate, a.step_seconds)
        rss_idle = sample(s.proc.pid).rss_total
        target = a.multiple * sustainable
        print(f"overload: {target:.0f}/s asked from {a.processes} client processes", flush=True)
        ocfg = replace(cfg, processes=a.processes, concurrency=a.processes)
        wait_drained(s)
        before = s.metrics()
        r, mem, ended = overload(s, ocfg, target, a.seconds)
        rec = recovery(s, cfg.shape, ended)
        after = s.metrics()
        next_ok = predict_ok(s, cfg.shape)
        log = s.log()
    rc = s.proc.returncode

    statuses = {"OK": r["requests"], **r["errors"]}
    # Requests the load generator itself could not send (its own backlog limit): not offered.
    not_sent = statuses.pop("CLIENT_BACKLOG", 0)
    sent = sum(statuses.values())
    offered = sent / (a.seconds + r["max_send_lag_ms"] / 1e3)  # what really went out

    def grew(name: str, **labels: str) -> int:
        return int(after.value(name, **labels) - before.value(name, **labels))

    # The recovery probes are in both counts (OK answers and computed rows).
    computed = grew("convserve_inference_items_total")
    abandoned = grew("convserve_abandoned_rows_total")
    server_codes = delta(after.codes(), before.codes())
    ok_rows = server_codes.get("OK", 0)
    rows = {
        "computed_by_onnx_runtime": computed,
        "answered_ok_by_server": ok_rows,
        "computed_for_callers_that_left_mid_run": abandoned,
        "dropped_before_compute": {
            reason: grew("convserve_dropped_rows_total", reason=reason)
            for reason in ("deadline", "cancelled", "failed")
        },
        "unaccounted": computed - abandoned - ok_rows,
    }
    max_rss = mem.max_rss()
    checks = {
        "excess_only_resource_exhausted_or_deadline": set(statuses) <= {"OK", *SHED},
        "server_codes_only_ok_shed_or_cancelled": set(server_codes) <= {"OK", *SHED, "CANCELLED"},
        "overloaded": sum(statuses.get(c, 0) for c in SHED) > 0,
        "timed_out_rows_never_computed": 0 <= rows["unaccounted"] <= LATE_ANSWER_SLACK_ROWS,
        "rss_under_bound": max_rss < a.rss_bound_mib * MIB,
        "queue_depth_back_to_0": after.value("convserve_queue_depth") == 0,
        "next_request_ok": next_ok,
        "server_exit_code_0": rc == 0,
        "no_errors_logged_by_convserve": " ERROR convserve" not in log,
    }
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "server_args": a.server_args,
        "cpus": cpus,
        "client_deadline_s": a.deadline,
        "sustainable_rate_per_s": sustainable,
        "search_steps": steps,
        "overload": {
            "asked_rate_per_s": target,
            "offered_rate_per_s": round(offered, 1),
            "multiple_reached": round(offered / sustainable, 2) if sustainable else None,
            "seconds": a.seconds,
            "client_processes": a.processes,
            "client_send_lag_max_ms": r["max_send_lag_ms"],
            "requests_tried": sent,
            "not_sent_client_backlog": not_sent,
            "statuses": statuses,
            "server_codes": server_codes,
            "ok_latency_ms": r["latency_ms"],
            "goodput_ok_per_s": round(statuses["OK"] / a.seconds, 1),
            # grpc logs ExecuteBatchError when a handler answers a caller that already left.
            "answers_to_callers_gone": log.count("ExecuteBatchError raised"),
        },
        "rows": rows,
        "rss_mib": {
            "idle_before": round(rss_idle / MIB, 1),
            "max_during": round(max_rss / MIB, 1),
            "after": round(mem.samples[-1].rss_total / MIB, 1),
            "bound": a.rss_bound_mib,
        },
        "recovery": rec,
        "checks": checks,
        "passed": all(checks.values()),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("overload", "rows", "rss_mib", "recovery")}, indent=2))
    print("checks:", "PASSED" if result["passed"] else "FAILED", checks)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
