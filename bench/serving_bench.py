"""Serving benchmark: convserve next to the systems a user would pick instead, in one run.

Same machine, same model (the default Fashion-MNIST export), same load, one after another:

- the ceiling: ONNX Runtime in-process (no RPC) at batch 1, 32 and 64, with the session
  options convserve uses; measured once at the start, and at batch 1 and 32 again just
  before and just after each system, whose ratios are taken against that bracket's mean
  (this VM's speed drifts by more than the targets' margins within one run);
- an empty-handler grpc.aio server (the floor of any Python gRPC server; concurrency-1
  latency is reported as overhead above it);
- a naive server (bench/naive_server.py: grpc.aio + one session.run per request);
- convserve: batching off (--max-batch-size 1) and on (defaults), 1 worker and --workers 2;
- Triton Inference Server's core through PyTriton (bench/triton_server.py, run from
  bench/.venv-triton) with Triton's dynamic batcher, over KServe V2 ModelInfer.

Load comes from h2load (bench/h2grpc.py) with pre-serialised gRPC bodies, so the client costs
the two cores as little as possible; a stream scenario's call is one bidirectional stream of 4
requests, all sent at once. Every run is bracketed by correctness passes with a real gRPC
client (answers compared with ONNX Runtime in-process) and trusted only when the bytes h2load
received match the answers it counts. The Python load generator (`cnn-bench`) is run against
convserve too (closed loop, open loop, streams) for comparison.

The targets themselves are judged by bench/serving_targets.py, which runs the systems they
name side by side in rounds: one system after another, as here, cannot resolve 5%.

Writes bench/results/serving.json, serving.md (tables with ratios to the ceiling and to each
peer) and latency_throughput.png; when a target is missed it profiles convserve with py-spy
(serving_profile_c1.txt, serving_profile_c64.txt).

    python bench/serving_bench.py [--model-repository runs/demo/models] [--duration 5]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import h2grpc  # noqa: E402
from ports import free_port  # noqa: E402
from serving_report import (  # noqa: E402
    EMPTY_UV,
    METRICS_OFF,
    NAIVE2,
    NAIVE2_SYNC,
    latency_throughput_figure,
    markdown,
    targets,
)

from serving.client.loadgen import parse_stream_infer  # noqa: E402
from serving.proto.convserve.v1 import classifier_pb2 as pb  # noqa: E402
from serving.proto.inference import grpc_predict_v2_pb2 as v2  # noqa: E402
from serving.runtime import session_options  # noqa: E402
from serving.settings import ServerSettings  # noqa: E402

MODEL = "fashion-mnist"
BRACKET_S = 2.0  # seconds per batch size of each ceiling measured around a system
TRITON_VENV = ROOT / "bench" / ".venv-triton"
PATHS = {
    ("convserve", "unary"): "/convserve.v1.Classifier/Predict",
    ("convserve", "stream"): "/convserve.v1.Classifier/PredictStream",
    ("v2", "unary"): "/inference.GRPCInferenceService/ModelInfer",
    ("v2", "stream"): "/inference.GRPCInferenceService/ModelStreamInfer",
}


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # unary | stream
    images: int  # images per request message
    concurrency: int  # requests (unary) or streams in flight
    messages: int = 1  # request messages per call in the correctness passes


SINGLE = tuple(Scenario(f"1 image, c{c}", "unary", 1, c) for c in (1, 8, 32, 64))
BULK = (
    Scenario("32 images, c8", "unary", 32, 8),
    Scenario("stream, 32 images/msg, 8 streams", "stream", 32, 8, messages=4),
)


@dataclass
class System:
    name: str
    protocol: str  # convserve | v2
    command: list[str]
    scenarios: tuple[Scenario, ...]
    env: dict[str, str] = field(default_factory=dict)
    listeners: int = 1  # processes that must say "listening on" before load starts
    checks_answers: bool = True  # the empty server answers without looking
    cwd: Path = ROOT  # where it starts (`python -m` imports from here first)


# ----------------------------------------------------------------------------- helpers
def find_model(repo: Path | None, work: Path) -> Path:
    """model.onnx of the latest fashion-mnist version: given, found, or trained here."""
    candidates = [repo] if repo else [ROOT / "runs/demo/models", ROOT / "runs/bench-export/models"]
    candidates.append(work / "models")
    for r in candidates:
        versions = sorted(
            (int(v.name) for v in (r / MODEL).glob("*") if v.name.isdigit()), reverse=True
        )
        if versions:
            return r / MODEL / str(versions[0]) / "model.onnx"
    if repo:
        raise SystemExit(f"no {MODEL} model in {repo}")
    print(f"no model repository found: training the default recipe (1 epoch) into {work}")
    subprocess.run(
        [
            str(Path(sys.executable).parent / "cnn-train"),
            "--recipe",
            "fashion_mnist",
            "--out",
            str(work / "run"),
            "--repository",
            str(work / "models"),
            "--quiet",
            "train.epochs=1",
            "export.tta=none",  # the serving figures are the plain network's
        ],
        check=True,
        cwd=ROOT,
    )
    return find_model(work / "models", work)


def test_images(shape: tuple[int, ...], n: int = 2048) -> np.ndarray:
    try:
        from trainer.data import load_dataset

        images = load_dataset("fashion-mnist").test.images[:n]
        if images.shape[1:] == shape:
            return images
    except Exception as exc:  # no dataset here: synthetic images still load the server
        print(f"(no Fashion-MNIST test set: {exc}; using synthetic images)")
    from serving.client.loadgen import synthetic_images

    return synthetic_images(n, shape, 0)


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "grpcio": grpc.__version__,
        "h2load": h2grpc.available(),
        "load_average_at_start": os.getloadavg(),
    }


def code_version(root: Path = ROOT) -> dict[str, Any]:
    """Which convserve was measured (this checkout's, or the one at `root`): the commit,
    whether the tree was dirty, and a hash of serving/**/*.py (the tree may hold uncommitted
    work)."""
    import hashlib

    def git(*a: str) -> str:
        r = subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, check=False)
        return r.stdout.strip()

    h = hashlib.sha256()
    for f in sorted((root / "serving").rglob("*.py")):
        h.update(f.read_bytes())
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "dirty_files": git("status", "--porcelain", "--", "serving").splitlines(),
        "serving_sha256": h.hexdigest()[:16],
    }


def machine_busy_seconds() -> float:
    """CPU seconds all cores of the machine have been busy (not idle or waiting on I/O)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) used so far by `pid` and all its descendants."""
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            raw = (d / "stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        stats[int(d.name)] = fields
        children.setdefault(int(fields[1]), []).append(int(d.name))
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        if p in stats:
            total += (int(stats[p][11]) + int(stats[p][12])) / tick
        todo += children.get(p, [])
    return total


# ----------------------------------------------------------------------------- requests
def request_messages(protocol: str, sc: Scenario, images: np.ndarray) -> list[bytes]:
    """The serialised request messages of one call (1 for unary, `messages` for a stream)."""
    out = []
    for m in range(sc.messages):
        x = images[m * sc.images : (m + 1) * sc.images]
        if protocol == "convserve":
            req = pb.PredictRequest(
                top_k=1,
                images=[
                    pb.Image(
                        tensor=pb.Tensor(dtype=pb.UINT8, shape=list(i.shape), data=i.tobytes())
                    )
                    for i in x
                ],
            )
        else:
            req = v2.ModelInferRequest(model_name=MODEL)
            req.inputs.add(name="images", datatype="UINT8", shape=list(x.shape))
            req.outputs.add(name="probabilities")
            req.raw_input_contents.append(x.tobytes())
        out.append(req.SerializeToString())
    return out


def call(target: str, protocol: str, sc: Scenario, messages: list[bytes]) -> list[bytes]:
    """Send one call's messages with a real gRPC client; the raw response messages."""
    path = PATHS[(protocol, sc.kind)]
    with grpc.insecure_channel(target) as ch:
        if sc.kind == "unary":
            return [ch.unary_unary(path)(messages[0], timeout=30)]
        return list(ch.stream_stream(path)(iter(messages), timeout=60))


def check_answers(
    protocol: str, sc: Scenario, responses: list[bytes], expected: np.ndarray, content: bool
) -> None:
    """Every answer has one result per image; with `content`, equal to ORT in-process."""
    if len(responses) != sc.messages:
        raise AssertionError(f"{len(responses)} answers for {sc.messages} messages")
    for m, data in enumerate(responses):
        want = expected[m * sc.images : (m + 1) * sc.images]
        if protocol == "convserve":
            preds = pb.PredictResponse.FromString(data).predictions
            if len(preds) != sc.images:
                raise AssertionError(f"{len(preds)} predictions for {sc.images} images")
            if content:
                idx = np.array([p.classes[0].index for p in preds])
                prob = np.array([p.classes[0].probability for p in preds])
                if not np.array_equal(idx, want.argmax(1)):
                    raise AssertionError("top-1 classes differ from ONNX Runtime in-process")
                np.testing.assert_allclose(prob, want.max(1), atol=1e-4)
        else:
            if sc.kind == "stream":
                error, resp = parse_stream_infer(data)
                if error:
                    raise AssertionError(error)
            else:
                resp = v2.ModelInferResponse.FromString(data)
            got = np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(want.shape)
            np.testing.assert_allclose(got, want, atol=1e-4)


# ----------------------------------------------------------------------------- ceiling
def ort_ceiling(
    model: Path, images: np.ndarray, seconds: float, batches: tuple[int, ...] = (1, 32, 64)
) -> dict[str, Any]:
    """ONNX Runtime in-process, the session options convserve uses: images/s per batch."""
    sess = ort.InferenceSession(
        str(model), session_options(ServerSettings(device="cpu").runtime), ["CPUExecutionProvider"]
    )
    out: dict[str, Any] = {}
    for b in batches:
        x = images[:b]
        for _ in range(20):
            sess.run(["probabilities"], {"images": x})
        times: list[float] = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            sess.run(["probabilities"], {"images": x})
            times.append(time.perf_counter() - t0)
        out[str(b)] = {
            "images_per_s": round(b * len(times) / sum(times), 1),
            "ms_per_run_p50": round(statistics.median(times) * 1e3, 4),
            "runs": len(times),
        }
    return out


def bracket(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The ceiling measured just before and just after one system's runs, and their mean:
    what that system's ratios are taken against (the VM's speed drifts within a run)."""
    return {
        "images_per_s_32": round(
            (before["32"]["images_per_s"] + after["32"]["images_per_s"]) / 2, 1
        ),
        "ms_per_run_1": round(
            (before["1"]["ms_per_run_p50"] + after["1"]["ms_per_run_p50"]) / 2, 4
        ),
        "before": before,
        "after": after,
    }


# ----------------------------------------------------------------------------- systems
@contextlib.contextmanager
def started(system: System, port: int, log: Path) -> Iterator[subprocess.Popen]:
    with open(log, "w") as f:
        proc = subprocess.Popen(
            system.command,
            cwd=system.cwd,
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**os.environ, **system.env},
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def answer_probe(
    system: System, target: str, sc: Scenario, images: np.ndarray, expected: np.ndarray
) -> Callable[[], None]:
    """One call of `sc` to `system` whose answers must match ORT in-process (only their
    shape for a system that answers without looking): for wait_ready, or a check after load."""
    messages = request_messages(system.protocol, sc, images)

    def probe() -> None:
        responses = call(target, system.protocol, sc, messages)
        check_answers(system.protocol, sc, responses, expected, system.checks_answers)

    return probe


def wait_ready(
    system: System, proc: subprocess.Popen, log: Path, probe: Callable[[], None], timeout: float
) -> None:
    """Until `listeners` processes listen and a real request is answered correctly (PyTriton
    says ready before its model has loaded)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{system.name} exited with {proc.returncode}:\n{log.read_text()}")
        listening = log.read_text().count("listening on") if system.listeners > 1 else 1
        if listening >= system.listeners:
            try:
                probe()
                return
            except (grpc.RpcError, AssertionError, ValueError) as exc:
                last = exc
        time.sleep(0.25)
    raise TimeoutError(f"{system.name} not ready after {timeout}s ({last}):\n{log.read_text()}")


def systems(model: Path, port: int, mport: int, skip_triton: bool) -> list[System]:
    py = sys.executable
    serve = [
        py,
        "-m",
        "serving.main",
        "--model-repository",
        str(model.parent.parent.parent),
        "--model",
        MODEL,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-host",
        "127.0.0.1",
        "--metrics-port",
        str(mport),
        "--poll-interval",
        "0",
        # Each server its own HTTP port (on by default, 8080 for all of them otherwise).
        "--http-port",
        str(free_port()),
    ]
    naive = [py, "bench/naive_server.py", "--model", str(model), "--port", str(port)]
    out = [
        System(
            "empty grpc.aio",
            "convserve",
            [*naive, "--empty"],
            SINGLE[:1] + SINGLE[-1:],
            checks_answers=False,
        ),
        System(
            EMPTY_UV,
            "convserve",
            [*naive, "--empty", "--event-loop", "uvloop"],
            SINGLE[:1] + SINGLE[-1:],
            checks_answers=False,
        ),
        System("naive", "convserve", naive, SINGLE + BULK),
        *(
            System(
                name,
                "convserve",
                [*naive, "--processes", "2", "--intra-op-threads", "1", "--transport", t],
                BULK,
                listeners=2,
            )
            for name, t in ((NAIVE2, "aio"), (NAIVE2_SYNC, "sync"))
        ),
        System("convserve, no batching", "convserve", [*serve, "--max-batch-size", "1"], SINGLE),
        System(
            "convserve, no batching, 2 workers",
            "convserve",
            [*serve, "--max-batch-size", "1", "--workers", "2"],
            SINGLE,
            listeners=2,
        ),
        System("convserve", "convserve", serve, SINGLE + BULK),
        # The price of metrics: the same server recording nothing (issue: <= 3% req/s).
        System(METRICS_OFF, "convserve", [*serve, "--no-metrics"], SINGLE[:1] + SINGLE[-1:]),
        System(
            "convserve, 2 workers",
            "convserve",
            [*serve, "--workers", "2"],
            SINGLE + BULK,
            listeners=2,
        ),
    ]
    tpy = TRITON_VENV / "bin" / "python"
    if skip_triton:
        pass
    elif not tpy.exists():
        print(
            f"(no {TRITON_VENV}: Triton skipped; `make bench/.venv-triton/.installed` installs it)"
        )
    else:
        libdir = subprocess.run(
            [str(tpy), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        cmd = [
            str(tpy),
            "bench/triton_server.py",
            "--model",
            str(model),
            "--grpc-port",
            str(port),
            "--http-port",
            str(free_port()),
            "--metrics-port",
            str(free_port()),
        ]
        # The backend stub links libpython3.X.so.1.0: the interpreter's own, not the system's.
        ld = ":".join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH")) if p)
        triton = System("triton (pytriton)", "v2", cmd, SINGLE + BULK, env={"LD_LIBRARY_PATH": ld})
        out.insert(2, triton)  # peers first, then ours
    return out


# ----------------------------------------------------------------------------- one run
def measure(
    system: System,
    proc: subprocess.Popen,
    target: str,
    port: int,
    sc: Scenario,
    images: np.ndarray,
    expected: np.ndarray,
    args: argparse.Namespace,
    tmp: Path,
) -> dict[str, Any]:
    """One scenario against a running system, bracketed by correctness passes."""
    messages = request_messages(system.protocol, sc, images)
    responses = call(target, system.protocol, sc, messages)  # correctness pass before
    check_answers(system.protocol, sc, responses, expected, system.checks_answers)
    answer_bytes = sum(5 + len(r) for r in responses)
    cpu0 = tree_cpu_seconds(proc.pid)
    client0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0, t0 = machine_busy_seconds(), time.monotonic()
    spread: list[int] = []
    if system.listeners > 1:  # halfway through the measured run: where its connections went
        look = threading.Timer(
            args.warmup + args.duration / 2, lambda: spread.extend(connection_spread(port))
        )
        look.start()
    out = _h2load(system, port, sc, messages, answer_bytes, args, tmp)
    if system.listeners > 1:
        look.join()
    client1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy, wall = machine_busy_seconds() - busy0, time.monotonic() - t0
    server_cpu = tree_cpu_seconds(proc.pid) - cpu0
    client_cpu = (client1.ru_utime + client1.ru_stime) - (client0.ru_utime + client0.ru_stime)
    responses = call(target, system.protocol, sc, messages)  # and after
    check_answers(system.protocol, sc, responses, expected, system.checks_answers)
    loaded = args.warmup + out["seconds"]  # the CPU counters ran during the warm-up too
    return {
        "system": system.name,
        "scenario": sc.name,
        "kind": sc.kind,
        "concurrency": sc.concurrency,
        "images_per_request": sc.images,
        **out,
        "server_cpu_ms_per_request": round(
            1e3 * server_cpu / max(1.0, loaded * out["requests_per_s"]), 4
        ),
        "server_cpu_cores": round(server_cpu / loaded, 2),
        # With several workers: the load's connections per worker, fewest first (SO_REUSEPORT
        # hashes each connection to one worker; a worker without any idles).
        **({"connections_per_worker": spread} if system.listeners > 1 else {}),
        "client_cpu_cores": round(client_cpu / loaded, 2),
        # Cores busy with anything but this server and its load client: another job on
        # the machine shows here (the driver itself idles while a run lasts).
        "other_cpu_cores": round(max(0.0, busy - server_cpu - client_cpu) / wall, 2),
    }


def connection_spread(port: int) -> list[int]:
    """Established connections to `port` on this host by the process holding each, fewest
    first (`ss -tnp`); a worker holding none is not counted."""
    out = subprocess.run(
        ["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
    ).stdout
    return sorted(collections.Counter(re.findall(r"pid=(\d+)", out)).values())


def _h2load(
    system: System,
    port: int,
    sc: Scenario,
    messages: list[bytes],
    answer_bytes: int,
    args: argparse.Namespace,
    tmp: Path,
) -> dict[str, Any]:
    """h2load posts one call's framed messages per stream: a unary request, or for a stream
    scenario `sc.messages` requests on one bidirectional stream (the server has the next one
    before it answers the last)."""
    body = tmp / "body.bin"
    body.write_bytes(b"".join(h2grpc.frame(m) for m in messages))
    path = PATHS[(system.protocol, sc.kind)]
    r = h2grpc.run(port, path, body, sc.concurrency, args.duration, args.warmup, tmp / "h2.log")
    byte_ratio = r.data_bytes / max(1, r.done * answer_bytes)
    if sc.kind == "unary":
        # h2load counts a failed gRPC call (HTTP 200, status in trailers) as a success; a
        # failed call carries no data, so the bytes received tell.
        valid = abs(byte_ratio - 1) < 0.01
        answered = r.done
    else:
        # Calls still open when the time is up have sent part of their answers: between
        # 0 and `concurrency` calls' worth of bytes more than the finished calls hold. The
        # answers are counted from the bytes (all answers to the same request are equal in
        # size), so those cut-off calls count for what they did.
        valid = r.done * answer_bytes <= r.data_bytes <= (r.done + sc.concurrency) * answer_bytes
        answered = r.data_bytes * sc.messages / answer_bytes
    return {
        "client": "h2load",
        "requests": round(answered),
        "calls": r.done,
        "failed": r.failed,
        "seconds": round(r.seconds, 3),
        "requests_per_s": round(answered / r.seconds, 1),
        "images_per_s": round(answered * sc.images / r.seconds, 1),
        "latency_ms": r.latency_ms,  # per call: a whole stream of `sc.messages` requests
        "answer_bytes": answer_bytes,
        "received_bytes_ratio": round(byte_ratio, 4),
        "valid": r.failed == 0 and valid,
        "command": r.command,
    }


def _cnn_bench(
    target: str, args: argparse.Namespace, out: Path, extra: list[str], timeout: float
) -> tuple[list[str], subprocess.CompletedProcess]:
    """Run the Python load generator for --duration after --warmup; JSON goes to `out`."""
    cmd = [sys.executable, "-m", "serving.client.loadgen", "--target", target, *extra]
    cmd += ["--duration", f"{args.duration:g}", "--warmup", f"{args.warmup:g}"]
    cmd += ["--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return cmd, proc


def python_client_runs(
    target: str, args: argparse.Namespace, tmp: Path, c64_rps: float, shape: tuple[int, ...]
) -> list[dict]:
    """cnn-bench (the Python load generator) against convserve: closed loop at 64 in flight,
    open loop at half of what h2load measured there, and 8 streams with one 32-image message
    in flight on each."""
    runs = []
    rate = max(50, round(0.5 * c64_rps, -1))
    stream = ["--mode", "stream", "--concurrency", "8", "--images-per-request", "32"]
    stream += ["--shape", ",".join(map(str, shape))]
    for extra in (["--concurrency", "64"], ["--rate", str(rate)], stream):
        out = tmp / "cnn-bench.json"
        cmd, _ = _cnn_bench(target, args, out, extra, timeout=args.duration * 3 + 60)
        if out.exists():
            r = json.loads(out.read_text())
            r["command"] = "cnn-bench " + " ".join(cmd[3:-2])
            runs.append(r)
            out.unlink()
    return runs


def profile(
    system: System, proc: subprocess.Popen, port: int, sc: Scenario, images, tmp: Path, dest: Path
) -> str | None:
    """py-spy (native frames too) on the server while h2load holds the scenario's load."""
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        return None
    body = tmp / "body.bin"
    body.write_bytes(
        b"".join(h2grpc.frame(m) for m in request_messages(system.protocol, sc, images))
    )
    path = PATHS[(system.protocol, sc.kind)]
    load = subprocess.Popen(
        [*h2grpc.command("127.0.0.1", port, path, body, sc.concurrency), "-D", "10s"],
        stdout=subprocess.DEVNULL,
    )
    time.sleep(1)
    raw = dest.with_suffix(".collapsed")
    subprocess.run(
        [
            pyspy,
            "record",
            "--pid",
            str(proc.pid),
            "--duration",
            "7",
            "--rate",
            "100",
            "--native",  # gRPC core, protobuf and ORT frames too (not with --nonblocking)
            "--format",
            "raw",
            "--output",
            str(raw),
        ],
        capture_output=True,
        check=False,
    )
    load.wait()
    if not raw.exists():
        return None
    from serving_report import summarise_profile

    text = summarise_profile(raw.read_text())
    dest.write_text(text)
    return text


# ----------------------------------------------------------------------------- main
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-repository", type=Path, help="holds fashion-mnist/<version>/")
    p.add_argument(
        "--work", type=Path, default=ROOT / "runs/bench-serving", help="training work dir"
    )
    p.add_argument("--out-dir", type=Path, default=ROOT / "bench/results")
    p.add_argument("--duration", type=float, default=8.0, help="seconds measured per run")
    p.add_argument("--warmup", type=float, default=1.5, help="seconds of warm-up load per run")
    p.add_argument("--skip-triton", action="store_true")
    p.add_argument(
        "--only",
        action="append",
        help="a system name to run (repeatable; names hold commas; default: all)",
    )
    p.add_argument("--profile", choices=["auto", "always", "never"], default="auto")
    args = p.parse_args()
    if h2grpc.available() is None:
        raise SystemExit("h2load is missing: apt-get install nghttp2-client")

    t_start = time.monotonic()
    model = find_model(args.model_repository, args.work)
    manifest = json.loads((model.parent / "manifest.json").read_text())
    shape = tuple(int(manifest["input"][k]) for k in ("channels", "height", "width"))
    images = test_images(shape)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    expected = sess.run(["probabilities"], {"images": images[:1024]})[0]
    del sess
    info = machine()
    load = info["load_average_at_start"]
    print(f"model {model}; machine {info['cpu']} x{info['cores']}; load average {load}")

    ceiling = ort_ceiling(model, images, seconds=max(0.5, args.duration / 2))
    print("ceiling (ORT in-process):", {b: c["images_per_s"] for b, c in ceiling.items()})
    port, mport = free_port(), free_port()
    target = f"127.0.0.1:{port}"
    results: list[dict] = []
    python_runs: list[dict] = []
    profile_text = None
    wanted = set(args.only) if args.only else None
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for system in systems(model, port, mport, args.skip_triton):
            if wanted and system.name not in wanted:
                continue
            if not wanted and system.name in (NAIVE2, NAIVE2_SYNC):
                continue  # bench-targets' peers for the bulk rows
            log = tmp / "server.log"
            before = ort_ceiling(model, images, BRACKET_S, (1, 32))
            first_result = len(results)
            t0 = time.monotonic()
            with started(system, port, log) as proc:
                probe = answer_probe(system, target, system.scenarios[0], images, expected)
                wait_ready(system, proc, log, probe, timeout=120)
                print(f"== {system.name} (ready in {time.monotonic() - t0:.1f}s)", flush=True)
                for sc in system.scenarios:
                    r = measure(system, proc, target, port, sc, images, expected, args, tmp)
                    results.append(r)
                    lat = r["latency_ms"]
                    print(
                        f"  {sc.name:<32} {r['requests_per_s']:>8.1f} req/s "
                        f"{r['images_per_s']:>8.1f} img/s  p50 {lat['p50']:.3f} "
                        f"p99 {lat['p99']:.3f} ms  server {r['server_cpu_cores']:.2f} cores, "
                        f"client {r['client_cpu_cores']:.2f}, other {r['other_cpu_cores']:.2f}"
                        f"{'' if r['valid'] else '  INVALID'}",
                        flush=True,
                    )
                if system.name == "convserve":
                    c64 = next(
                        r
                        for r in results
                        if r["system"] == "convserve"
                        and r["concurrency"] == 64
                        and r["images_per_request"] == 1
                    )
                    python_runs = python_client_runs(
                        target, args, tmp, c64["requests_per_s"], images.shape[1:]
                    )
                    for r in python_runs:
                        lat = r["latency_ms"]
                        print(
                            f"  cnn-bench {r['mode']}, {r['loop']} loop: "
                            f"{r['requests_per_s']} req/s, {r['images_per_s']} img/s, "
                            f"p50 {lat['p50']} ms, p99 {lat['p99']} ms, errors {r['errors']}"
                        )
            own = bracket(before, ort_ceiling(model, images, BRACKET_S, (1, 32)))
            print(
                f"  ceiling around it: {own['images_per_s_32']:.0f} img/s at batch 32, "
                f"{own['ms_per_run_1']:.3f} ms at batch 1"
            )
            for r in results[first_result:]:
                r["ceiling"] = own
        if args.profile != "never":
            missed = any(not t["met"] for t in targets(results, ceiling))
            if args.profile == "always" or missed:
                system = next(s for s in systems(model, port, mport, True) if s.name == "convserve")
                log = tmp / "server.log"
                with started(system, port, log) as proc:
                    wait_ready(system, proc, log, lambda: None, timeout=120)
                    time.sleep(1.0)
                    texts = []
                    for sc in (SINGLE[0], SINGLE[-1]):  # concurrency 1 and 64
                        dest = args.out_dir / f"serving_profile_c{sc.concurrency}.txt"
                        text = profile(system, proc, port, sc, images, tmp, dest)
                        texts.append(f"== py-spy, convserve, {sc.name}\n{text}")
                    profile_text = "\n".join(texts)
    doc = {
        "model": str(model.relative_to(ROOT) if model.is_relative_to(ROOT) else model),
        "model_test_accuracy": manifest.get("test_accuracy"),
        "machine": info,
        "code": code_version(),
        "method": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "client": "h2load with pre-serialised gRPC bodies (bench/h2grpc.py); "
            "connections = min(8, concurrency), streams per connection = concurrency / connections",
            "checks": "a correctness pass with a real gRPC client before and after each run "
            "(answers equal ONNX Runtime in-process), and h2load's received data bytes = "
            "calls x the size of a correct answer",
        },
        "ceiling": ceiling,
        "results": results,
        "python_client": python_runs,
        "wall_s": round(time.monotonic() - t_start, 1),
    }
    text, checks = markdown(results, ceiling, python_runs, info, doc["method"])
    doc["targets"] = checks
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "serving.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out_dir / "serving.md").write_text(text)
    fig = latency_throughput_figure(results, ceiling)
    fig.savefig(args.out_dir / "latency_throughput.png", dpi=110)
    print(text)
    if profile_text:
        print(profile_text)
    print(
        f"wrote {args.out_dir}/serving.json, serving.md, latency_throughput.png in {doc['wall_s']}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
