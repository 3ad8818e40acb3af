"""One overload measurement of one server: its closed-loop capacity, then open-loop offers
at multiples of it, each with goodput, statuses, time to a refusal, RSS and recovery.
Used by `make overload` (bench/overload.py) and by its short form in the test suite.

The server runs pinned to `server_cpus`; h2load and the sampling client to `load_cpus`.
API: convserve.v1 Classifier/Predict, one 28x28 uint8 image a call (or the model's shape).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from bench import h2grpc, openloop
from bench import serving_bench as sb
from bench.process_stats import MIB, Sampler, sample
from serving.proto.convserve.v1 import classifier_pb2 as pb

PREDICT = "/convserve.v1.Classifier/Predict"
HEALTH = "/grpc.health.v1.Health/Check"
CAPACITY_CONCURRENCY = 64  # closed loop: 8 connections x 8 streams


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def total(samples: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def codes(samples: dict, method: str = "Predict") -> Counter[str]:
    out: Counter[str] = Counter()
    for (n, ls), v in samples.items():
        d = dict(ls)
        if n == "convserve_requests_total" and d.get("method") == method:
            out[d["code"]] += int(v)
    return out


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    metrics_url: str
    log: Path
    front: int = 0  # where calls are sent: the server's port, or a proxy's in front of it

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def front_target(self) -> str:
        return f"127.0.0.1:{self.front or self.port}"

    def metrics(self) -> dict:
        return scrape(self.metrics_url)


PROXY_DIR = Path(__file__).resolve().parents[1] / "deploy/haproxy"


@contextlib.contextmanager
def proxied(s: Server, cpus: str, inflight: int, queue_ms: int, work: Path) -> Iterator[Server]:
    """HAProxy (deploy/haproxy) in front of `s`, pinned to `cpus`; `s` with its front set."""
    port = sb.free_port()
    env = {
        **os.environ,
        "CONVSERVE_PROXY_DIR": str(PROXY_DIR),
        "CONVSERVE_PROXY_BIND": f"127.0.0.1:{port}",
        "CONVSERVE_UPSTREAM": s.target,
        "CONVSERVE_PROXY_INFLIGHT": str(inflight),
        "CONVSERVE_PROXY_QUEUE_MS": str(queue_ms),
    }
    cmd = ["taskset", "-c", cpus, "haproxy", "-db", "-f", str(PROXY_DIR / "haproxy.cfg")]
    with open(work / "haproxy.log", "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        s.front = port
        end = time.monotonic() + 30
        while True:
            try:
                with grpc.insecure_channel(s.front_target) as ch:
                    ch.unary_unary(HEALTH)(b"", timeout=1)
                break
            except grpc.RpcError:
                if proc.poll() is not None or time.monotonic() > end:
                    raise RuntimeError(f"haproxy: {(work / 'haproxy.log').read_text()}") from None
                time.sleep(0.05)
        yield s
    finally:
        s.front = 0
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def started(
    tree: Path, entry: str, repository: Path, args: list[str], cpus: str, work: Path
) -> Iterator[Server]:
    """`python -m <entry>` of the source `tree` (this checkout, or another commit's) pinned to
    `cpus`, stopped with SIGTERM at the end (serving_bench.started)."""
    port, mport = sb.free_port(), sb.free_port()
    log = work / f"server-{port}.log"
    cmd = ["taskset", "-c", cpus, sys.executable, "-m", entry]
    cmd += ["--model-repository", str(repository.resolve()), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--metrics-host", "127.0.0.1", "--metrics-port", str(mport)]
    cmd += ["--poll-interval", "0", *args]
    system = sb.System(entry, "convserve", cmd, (), env={"PYTHONPATH": str(tree)}, cwd=tree)
    with sb.started(system, port, log) as proc:
        s = Server(proc, port, f"http://127.0.0.1:{mport}/metrics", log)
        wait_serving(s)
        yield s


def wait_serving(s: Server, timeout: float = 90.0) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if s.proc.poll() is not None:
            raise RuntimeError(f"server exited {s.proc.returncode}:\n{s.log.read_text()}")
        with contextlib.suppress(grpc.RpcError, OSError), grpc.insecure_channel(s.target) as ch:
            check = health_pb2_grpc.HealthStub(ch).Check
            if check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                with contextlib.suppress(OSError):  # workers: the parent's /metrics is up too
                    s.metrics()
                    return
        time.sleep(0.1)
    raise TimeoutError(f"server not serving after {timeout}s:\n{s.log.read_text()}")


def predict_message(shape: tuple[int, ...]) -> bytes:
    image = (np.arange(int(np.prod(shape))) % 251).astype(np.uint8)
    tensor = pb.Tensor(dtype=pb.UINT8, shape=list(shape), data=image.tobytes())
    return pb.PredictRequest(images=[pb.Image(tensor=tensor)]).SerializeToString()


def answer_size(s: Server, message: bytes) -> int:
    """Bytes h2load counts as data for one OK answer (its framed response message)."""
    with grpc.insecure_channel(s.front_target) as ch:
        raw = ch.unary_unary(PREDICT)(message, timeout=10)
    assert len(pb.PredictResponse.FromString(raw).predictions) == 1
    return len(h2grpc.frame(raw))


def first_ok(s: Server, message: bytes, t0: float, limit: float = 60.0) -> float:
    """Seconds from `t0` to the first OK answer, calling without pause on one channel."""
    with grpc.insecure_channel(s.front_target) as ch:
        call = ch.unary_unary(PREDICT)
        while True:
            with contextlib.suppress(grpc.RpcError):
                call(message, timeout=1.0)
                return time.monotonic() - t0
            if time.monotonic() - t0 > limit:
                raise RuntimeError(f"no OK answer within {limit}s of the load's end")


def queue_empty(s: Server, t0: float, limit: float = 60.0) -> float:
    while total(s.metrics(), "convserve_queue_depth") > 0:
        if time.monotonic() - t0 > limit:
            raise RuntimeError(f"the queue was not empty {limit}s after the load's end")
        time.sleep(0.01)
    return time.monotonic() - t0


def idle(s: Server, limit: float = 60.0) -> None:
    """Until no call is in the server (a stopped h2load's last calls may still be running)."""
    end = time.monotonic() + limit
    while total(s.metrics(), "convserve_inflight_requests") > 0:
        if time.monotonic() > end:
            raise RuntimeError(f"calls still in the server {limit}s after the load")
        time.sleep(0.02)


def capacity(s: Server, body: Path, answer_bytes: int, seconds: float, work: Path) -> dict:
    """Closed loop: CAPACITY_CONCURRENCY single-image calls in flight, after a warm-up whose
    calls have all finished; every answer checked to carry a message (a refusal would not)."""
    port = s.front or s.port
    h2grpc.run(port, PREDICT, body, CAPACITY_CONCURRENCY, 1.0, 0.0, work / "warm.log")
    idle(s)
    r = h2grpc.run(port, PREDICT, body, CAPACITY_CONCURRENCY, seconds, 0.0, work / "cap.log")
    idle(s)
    checked = r.data_bytes == r.succeeded * answer_bytes and r.failed == 0
    return {
        "api": "convserve.v1 Predict, 1 image a call",
        "concurrency": CAPACITY_CONCURRENCY,
        "requests_per_s": round(r.requests_per_s, 1),
        "p50_ms": r.latency_ms["p50"],
        "every_answer_ok": checked,
    }


def offer(
    s: Server,
    message: bytes,
    body: Path,
    answer_bytes: int,
    rate: float,
    seconds: float,
    deadline: float,
    load_cpus: str,
) -> dict[str, Any]:
    """Offer `rate` calls a second for `seconds`, open loop; what came of them."""
    before = s.metrics()
    with (
        Sampler(s.proc.pid, every=0.25) as mem,
        openloop.Sampler(s.front_target, PREDICT, message, deadline) as sampler,
    ):
        o = openloop.open_loop(
            s.front or s.port, PREDICT, body, answer_bytes, rate, seconds, deadline, cpus=load_cpus
        )
    ended = time.monotonic()
    recovery = {"first_ok_s": round(first_ok(s, message, ended), 4)}
    recovery["queue_empty_s"] = round(queue_empty(s, ended), 3)
    after = s.metrics()
    server = codes(after) - codes(before)
    server["OK"] -= 1  # the recovery probe

    def grew(name: str) -> int:
        return int(total(after, name) - total(before, name))

    # No row computed after its deadline: every row ORT computed was answered OK (one image
    # a call, the probe's included) or belongs to a caller that left while its batch ran.
    rows = {
        "computed": grew("convserve_inference_items_total"),
        "abandoned_mid_run": grew("convserve_abandoned_rows_total"),
        "dropped_before_compute": grew("convserve_dropped_rows_total"),
    }
    rows["computed_for_no_ok_answer"] = (
        rows["computed"] - rows["abandoned_mid_run"] - (server["OK"] + 1)
    )
    sample = sampler.report()
    sent = o.started + sample["calls"]
    ok = server["OK"]
    handled = sum(server.values())
    return {
        "asked_per_s": round(rate, 1),
        "sent_per_s": round(sent / seconds, 1),
        "seconds": seconds,
        "deadline_s": deadline,
        "goodput_per_s": round(ok / seconds, 1),
        "server_statuses": dict(server),
        # Calls grpc answered without a handler (deadline passed or cancelled in its backlog).
        "never_handled": max(0, sent - handled),
        "h2load_ok_by_bytes": round(o.answers_with_data),
        "sampled": sample,
        "deadline_exceeded_share": round(
            sample["statuses"].get("DEADLINE_EXCEEDED", 0) / max(1, sample["calls"]), 4
        ),
        "rows": rows,
        "rss_mib_max": round(mem.max_rss() / MIB, 1),
        "recovery": recovery,
        "h2load": o.command,
    }


@dataclass
class Setup:
    """One server under test and what is offered to it."""

    tree: Path  # source tree whose server runs (this checkout, or another commit's)
    entry: str  # its module: serving.main (or serving.server before the one-core work)
    repository: Path
    args: list[str]
    shape: tuple[int, ...]
    multiples: list[float]
    seconds: float
    deadline: float = 0.5
    capacity_seconds: float = 5.0
    server_cpus: str = "0"
    load_cpus: str = "1"
    proxy_cpus: str | None = None  # HAProxy in front (deploy/haproxy), pinned here
    proxy_inflight: int = CAPACITY_CONCURRENCY
    proxy_queue_ms: int = 25


def measure(setup: Setup) -> dict[str, Any]:
    """Capacity, then each multiple of it offered open loop, on one server."""
    work = Path(tempfile.mkdtemp(prefix="overload-"))
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {int(c) for c in setup.load_cpus.split(",")})  # the sampler's
    try:
        with (
            started(
                setup.tree, setup.entry, setup.repository, setup.args, setup.server_cpus, work
            ) as s,
            contextlib.ExitStack() as stack,
        ):
            if setup.proxy_cpus is not None:
                stack.enter_context(
                    proxied(s, setup.proxy_cpus, setup.proxy_inflight, setup.proxy_queue_ms, work)
                )
            out = _measure(s, setup, work)
        out["exit_code"] = s.proc.returncode
        return out
    finally:
        os.sched_setaffinity(0, mine)


def _measure(s: Server, setup: Setup, work: Path) -> dict[str, Any]:
    message = predict_message(setup.shape)
    body = work / "predict.bin"
    body.write_bytes(h2grpc.frame(message))
    answer_bytes = answer_size(s, message)
    cap = capacity(s, body, answer_bytes, setup.capacity_seconds, work)
    queue_empty(s, time.monotonic())
    rss_idle = sample(s.proc.pid).rss_total
    runs = []
    for m in setup.multiples:
        rate = m * cap["requests_per_s"]
        r = offer(
            s, message, body, answer_bytes, rate, setup.seconds, setup.deadline, setup.load_cpus
        )
        r["multiple"] = m
        r["goodput_of_capacity"] = round(r["goodput_per_s"] / cap["requests_per_s"], 3)
        runs.append(r)
        print(
            f"  {m:g}x: sent {r['sent_per_s']}/s, goodput {r['goodput_per_s']}/s "
            f"({r['goodput_of_capacity']:.0%}), server {r['server_statuses']}, "
            f"sampled {r['sampled']['statuses']}, refusal {r['sampled']['refusal_ms']}",
            flush=True,
        )
    return {
        "server": {
            "tree": str(setup.tree),
            "entry": setup.entry,
            "args": setup.args,
            "cpus": setup.server_cpus,
            "proxy": None
            if setup.proxy_cpus is None
            else {
                "haproxy_cpus": setup.proxy_cpus,
                "inflight": setup.proxy_inflight,
                "queue_ms": setup.proxy_queue_ms,
            },
        },
        "load_cpus": setup.load_cpus,
        "capacity": cap,
        "rss_mib_idle": round(rss_idle / MIB, 1),
        "offers": runs,
        "errors_logged": s.log.read_text().count(" ERROR "),
    }
