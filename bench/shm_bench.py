"""System shared memory against raw_input_contents: 32-image KServe V2 ModelInfer calls to
one convserve worker, the tensors sent in the request and answer (raw contents) or left in
/dev/shm regions the request names (Triton's system shared-memory extension), side by side.

A Python gRPC client (what a tritonclient user runs) sends pre-built requests from
`--concurrency` threads for `--seconds`, alternating the two ways over `--rounds` rounds;
each way's answers are checked against ONNX Runtime in-process first. Reports requests/s,
latency percentiles and the server's CPU per request (from /proc), and the ratios.

Writes bench/results/shm.json and shm.md.

    python bench/shm_bench.py [--model-repository runs/demo/models]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serving_bench import (  # noqa: E402
    System,
    code_version,
    find_model,
    free_port,
    machine,
    started,
    test_images,
    tree_cpu_seconds,
)

from serving.proto.inference import grpc_predict_v2_pb2 as pb  # noqa: E402
from serving.proto.inference import grpc_predict_v2_pb2_grpc as pb_grpc  # noqa: E402

MODEL = "fashion-mnist"
N = 32  # images per request


def raw_request(x: np.ndarray) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=MODEL)
    req.inputs.add(name="images", datatype="UINT8", shape=list(x.shape))
    req.outputs.add(name="probabilities")
    req.raw_input_contents.append(x.tobytes())
    return req


def shm_request(in_bytes: int, out_bytes: int, slot: int) -> pb.ModelInferRequest:
    """Inputs read from, outputs written to, this thread's slot of the two regions."""
    req = pb.ModelInferRequest(model_name=MODEL)
    t = req.inputs.add(name="images", datatype="UINT8", shape=[N, 1, 28, 28])
    t.parameters["shared_memory_region"].string_param = "in"
    t.parameters["shared_memory_byte_size"].int64_param = in_bytes
    t.parameters["shared_memory_offset"].int64_param = slot * in_bytes
    o = req.outputs.add(name="probabilities")
    o.parameters["shared_memory_region"].string_param = "out"
    o.parameters["shared_memory_byte_size"].int64_param = out_bytes
    o.parameters["shared_memory_offset"].int64_param = slot * out_bytes
    return req


def drive(target: str, requests: list[pb.ModelInferRequest], seconds: float) -> dict[str, Any]:
    """Each thread sends its request back to back for `seconds`: req/s and latencies."""
    latencies: list[list[float]] = [[] for _ in requests]
    stop = time.monotonic() + seconds

    def worker(i: int) -> None:
        with grpc.insecure_channel(target) as ch:
            infer = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                infer(requests[i], timeout=30)
                latencies[i].append(time.perf_counter() - t0)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(requests))]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    every = np.array([x for xs in latencies for x in xs]) * 1e3
    return {
        "requests_per_s": round(len(every) / wall, 1),
        "p50_ms": round(float(np.percentile(every, 50)), 3),
        "p99_ms": round(float(np.percentile(every, 99)), 3),
        "requests": len(every),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-repository", type=Path, default=None)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="shm-bench-"))
    model = find_model(args.model_repository, work)
    images = test_images((1, 28, 28), N)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    (want,) = sess.run(["probabilities"], {"images": images})

    port = free_port()
    cmd = [sys.executable, "-m", "serving.main", "--model-repository",
           str(model.parent.parent.parent), "--model", MODEL, "--host", "127.0.0.1",
           "--port", str(port), "--http-port", "0", "--metrics-port", "0",
           "--poll-interval", "0", "--device", "cpu"]  # fmt: skip
    target = f"127.0.0.1:{port}"
    c = args.concurrency
    in_bytes, out_bytes = images.nbytes, N * want.shape[1] * 4
    key_in, key_out = (
        f"/cs-bench-in-{uuid.uuid4().hex[:6]}",
        f"/cs-bench-out-{uuid.uuid4().hex[:6]}",
    )
    path_in, path_out = Path("/dev/shm" + key_in), Path("/dev/shm" + key_out)
    path_in.write_bytes(images.tobytes() * c)
    path_out.write_bytes(bytes(out_bytes * c))
    runs: dict[str, list[dict[str, Any]]] = {"raw": [], "shm": []}
    try:
        with started(System("convserve", "v2", cmd, ()), 0, work / "server.log") as proc:
            _wait(target, raw_request(images))
            stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(target))
            stub.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(
                name="in", key=key_in, byte_size=in_bytes * c))  # fmt: skip
            stub.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(
                name="out", key=key_out, byte_size=out_bytes * c))  # fmt: skip
            ways = {
                "raw": [raw_request(images)] * c,
                "shm": [shm_request(in_bytes, out_bytes, i) for i in range(c)],
            }
            # Answers first: raw in the reply, shm in the output region.
            got = np.frombuffer(stub.ModelInfer(ways["raw"][0]).raw_output_contents[0], "<f4")
            np.testing.assert_allclose(got.reshape(want.shape), want, atol=1e-4)
            stub.ModelInfer(ways["shm"][0])
            got = np.frombuffer(path_out.read_bytes()[:out_bytes], "<f4")
            np.testing.assert_allclose(got.reshape(want.shape), want, atol=1e-4)
            for rnd in range(args.rounds):
                for way, requests in ways.items():
                    cpu0 = tree_cpu_seconds(proc.pid)
                    r = drive(target, requests, args.seconds)
                    r["server_cpu_us_per_request"] = round(
                        (tree_cpu_seconds(proc.pid) - cpu0) / r["requests"] * 1e6, 1
                    )
                    runs[way].append(r)
                    print(f"round {rnd + 1} {way}: {r}", flush=True)
    finally:
        path_in.unlink(missing_ok=True)
        path_out.unlink(missing_ok=True)
    med = {
        way: {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "requests"}
        for way, rs in runs.items()
    }
    ratios = {
        "req/s shm / raw": round(med["shm"]["requests_per_s"] / med["raw"]["requests_per_s"], 3),
        "p50 shm / raw": round(med["shm"]["p50_ms"] / med["raw"]["p50_ms"], 3),
        "server CPU per request shm / raw": round(
            med["shm"]["server_cpu_us_per_request"] / med["raw"]["server_cpu_us_per_request"], 3
        ),
    }
    result = {"machine": machine(), "code": code_version(), "settings": vars(args) | {
        "out": str(args.out), "model_repository": str(model), "images_per_request": N},
        "runs": runs, "median": med, "ratios": ratios}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shm.json").write_text(json.dumps(result, indent=2, default=str))
    lines = ["| tensors | req/s | img/s | p50 ms | p99 ms | server CPU µs/request |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for way, m in med.items():
        lines.append(f"| {way} | {m['requests_per_s']:,.0f} | {m['requests_per_s'] * N:,.0f} | "
                     f"{m['p50_ms']:.2f} | {m['p99_ms']:.2f} | "
                     f"{m['server_cpu_us_per_request']:,.0f} |")  # fmt: skip
    lines += ["", *(f"- {k}: {v}" for k, v in ratios.items())]
    (args.out / "shm.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _wait(target: str, request: pb.ModelInferRequest, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with grpc.insecure_channel(target) as ch:
                pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(request, timeout=5)
            return
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.25)


if __name__ == "__main__":
    raise SystemExit(main())
