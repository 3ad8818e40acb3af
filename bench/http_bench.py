"""HTTP serving benchmark: convserve's HTTP port beside MLServer's and Triton core's HTTP
endpoints, and beside convserve's own gRPC port, side by side in one run.

Same machine, same model (the default Fashion-MNIST export), same load tool for all: h2load
over HTTP/1.1 (`--h1`; gRPC for convserve's gRPC rows), one connection per request in
flight, pre-built KServe V2 bodies:

- `json`: the input as a JSON array of pixels, the output as a JSON array of floats;
- `binary`: Triton's binary tensor extension (`Inference-Header-Content-Length`), the input
  and output as raw little-endian bytes after a JSON header: what tritonclient.http sends.
  MLServer does not implement it.

Every system is started once and kept up; the scenarios then run in rounds, each round
visiting every system in turn, so the machine's drift touches them alike (medians over
rounds are reported). Each run is trusted only when every answer had a 2xx status and the
body bytes h2load received equal requests x the size of a correct answer; a real HTTP client
checks the answers against ONNX Runtime in-process before and after each run.

The systems: convserve (one worker, its defaults: batching on); MLServer 1.7 with a custom
ONNX Runtime model (bench/mlserver_model.py, adaptive batching on); Triton's core through
PyTriton (bench/triton_server.py: Triton's dynamic batcher, ONNX Runtime in the callable).
All run ONNX Runtime 1.31.1 with the same session options.

Targets (issue "Every client users already have"): c64 single-image req/s over HTTP
>= 1.2x MLServer's; 32-image img/s over HTTP (binary extension) >= 85% of convserve's over
gRPC (KServe V2 ModelInfer with raw_input_contents, the same tensors).

Writes bench/results/http.json and http.md.

    python bench/http_bench.py [--model-repository runs/demo/models] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import h2grpc  # noqa: E402
from serving_bench import (  # noqa: E402
    TRITON_VENV,
    System,
    code_version,
    find_model,
    free_port,
    machine,
    started,
    test_images,
)

from serving.proto.inference import grpc_predict_v2_pb2 as v2  # noqa: E402

MODEL = "fashion-mnist"
MLSERVER_VENV = ROOT / "bench" / ".venv-mlserver"
INFER = f"/v2/models/{MODEL}/infer"
GRPC_INFER = "/inference.GRPCInferenceService/ModelInfer"


@dataclass(frozen=True)
class Scenario:
    name: str
    images: int
    concurrency: int


SCENARIOS = (
    Scenario("1 image, c1", 1, 1),
    Scenario("1 image, c64", 1, 64),
    Scenario("32 images, c8", 32, 8),
)


@dataclass
class Endpoint:
    """One system's way in: HTTP with these encodings, or gRPC (V2 ModelInfer)."""

    system: str
    port: int
    encodings: tuple[str, ...]  # json | binary | grpc
    process: System
    results: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


# ----------------------------------------------------------------------------- bodies
def http_body(x: np.ndarray, encoding: str) -> tuple[bytes, dict[str, str]]:
    tensor: dict[str, Any] = {"name": "images", "datatype": "UINT8", "shape": list(x.shape)}
    out: dict[str, Any] = {"name": "probabilities"}
    if encoding == "json":
        tensor["data"] = x.ravel().tolist()
        doc = {"inputs": [tensor], "outputs": [out]}
        return json.dumps(doc).encode(), {"Content-Type": "application/json"}
    tensor["parameters"] = {"binary_data_size": x.nbytes}
    out["parameters"] = {"binary_data": True}
    header = json.dumps({"inputs": [tensor], "outputs": [out]}).encode()
    return header + x.tobytes(), {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }


def grpc_body(x: np.ndarray) -> bytes:
    req = v2.ModelInferRequest(model_name=MODEL)
    req.inputs.add(name="images", datatype="UINT8", shape=list(x.shape))
    req.outputs.add(name="probabilities")
    req.raw_input_contents.append(x.tobytes())
    return h2grpc.frame(req.SerializeToString())


def http_answer(port: int, body: bytes, headers: dict[str, str]) -> tuple[int, np.ndarray]:
    """POST one request with a real HTTP client: (body length, the probabilities)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", INFER, body=body, headers=headers)
        r = conn.getresponse()
        data = r.read()
        if r.status != 200:
            raise AssertionError(f"HTTP {r.status}: {data[:300]!r}")
        n = r.headers.get("Inference-Header-Content-Length")
    finally:
        conn.close()
    doc = json.loads(data[: int(n)] if n else data)
    (o,) = [o for o in doc["outputs"] if o["name"] == "probabilities"]
    probs = np.frombuffer(data[int(n) :], "<f4") if n else np.asarray(o["data"], np.float32)
    return len(data), probs.reshape(o["shape"])


def grpc_answer(port: int, body: bytes) -> tuple[int, np.ndarray]:
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        data = ch.unary_unary(GRPC_INFER)(h2grpc.unframe(body)[0], timeout=30)
    resp = v2.ModelInferResponse.FromString(data)
    probs = np.frombuffer(resp.raw_output_contents[0], "<f4")
    return len(h2grpc.frame(data)), probs.reshape(list(resp.outputs[0].shape))


def checked(ep: Endpoint, encoding: str, body: bytes, headers: dict[str, str], want: np.ndarray):
    """One answer compared with ONNX Runtime in-process; its size in bytes."""
    if encoding == "grpc":
        size, got = grpc_answer(ep.port, body)
    else:
        size, got = http_answer(ep.port, body, headers)
    np.testing.assert_allclose(got, want, atol=1e-4, err_msg=f"{ep.system} {encoding}")
    return size


def load_command(ep: Endpoint, encoding: str, sc: Scenario, body: Path, headers: dict) -> list:
    if encoding == "grpc":
        return h2grpc.command("127.0.0.1", ep.port, GRPC_INFER, body, sc.concurrency,
                              layout_of=(sc.concurrency, 1))  # fmt: skip
    extra = [a for k, v in headers.items() for a in ("-H", f"{k}: {v}")]
    return [
        "h2load", "--h1", f"http://127.0.0.1:{ep.port}{INFER}", "-d", str(body), *extra,
        "-c", str(sc.concurrency), "-m", "1",
    ]  # fmt: skip


# ----------------------------------------------------------------------------- systems
def endpoints(model: Path, work: Path) -> list[Endpoint]:
    py = sys.executable
    http_port, grpc_port = free_port(), free_port()
    repo = model.parent.parent.parent
    convserve = System(
        "convserve",
        "v2",
        [py, "-m", "serving.main", "--model-repository", str(repo), "--model", MODEL,
         "--host", "127.0.0.1", "--port", str(grpc_port), "--http-port", str(http_port),
         "--metrics-port", "0", "--poll-interval", "0", "--device", "cpu"],
        (),
    )  # fmt: skip
    out = [
        Endpoint("convserve HTTP", http_port, ("json", "binary"), convserve),
        Endpoint("convserve gRPC", grpc_port, ("grpc",), convserve),
    ]
    mlserver = MLSERVER_VENV / "bin" / "mlserver"
    if mlserver.exists():
        port = free_port()
        folder = mlserver_settings(work / "mlserver", model, port)
        cmd = [str(mlserver), "start", str(folder)]
        env = {"PYTHONPATH": str(ROOT / "bench")}
        out.append(Endpoint("MLServer", port, ("json",), System("MLServer", "v2", cmd, (), env)))
    triton_py = TRITON_VENV / "bin" / "python"
    if triton_py.exists():
        port = free_port()
        libdir = _libdir(triton_py)
        cmd = [str(triton_py), str(ROOT / "bench" / "triton_server.py"), "--model", str(model),
               "--http-port", str(port), "--grpc-port", str(free_port()),
               "--metrics-port", str(free_port())]  # fmt: skip
        system = System("Triton core", "v2", cmd, (), {"LD_LIBRARY_PATH": libdir})
        out.append(Endpoint("Triton core", port, ("json", "binary"), system))
    return out


def _libdir(python: Path) -> str:
    import subprocess

    code = "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True).stdout.strip()


def mlserver_settings(folder: Path, model: Path, port: int) -> Path:
    """MLServer's settings.json and the model's model-settings.json."""
    (folder / MODEL).mkdir(parents=True, exist_ok=True)
    server = {"http_port": port, "grpc_port": free_port(), "metrics_port": free_port(),
              "host": "127.0.0.1", "debug": False, "metrics_endpoint": None}  # fmt: skip
    (folder / "settings.json").write_text(json.dumps(server))
    settings = {
        "name": MODEL,
        "implementation": "mlserver_model.OrtModel",
        "max_batch_size": 64,
        "max_batch_time": 0.0005,
        "parameters": {"uri": str(model)},
    }
    (folder / MODEL / "model-settings.json").write_text(json.dumps(settings))
    return folder


@contextlib.contextmanager
def all_started(eps: list[Endpoint], work: Path, x: np.ndarray, want: np.ndarray) -> Iterator:
    """Every system started (a system with two endpoints once), each answering correctly."""
    with contextlib.ExitStack() as stack:
        seen: dict[int, Any] = {}
        for ep in eps:
            if id(ep.process) not in seen:
                log = work / f"{ep.process.name.replace(' ', '_')}.log"
                seen[id(ep.process)] = (stack.enter_context(started(ep.process, 0, log)), log)
        for ep in eps:
            proc, log = seen[id(ep.process)]
            _wait_answering(ep, proc, log, x, want)
        yield


def _wait_answering(ep: Endpoint, proc: Any, log: Path, x: np.ndarray, want: np.ndarray) -> None:
    encoding = ep.encodings[0]
    body, headers = (grpc_body(x), {}) if encoding == "grpc" else http_body(x, encoding)
    deadline = time.monotonic() + 180
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{ep.system} exited:\n{log.read_text()[-3000:]}")
        try:
            checked(ep, encoding, body, headers, want)
            return
        except Exception as exc:  # not up yet: refused, 503, a model still loading
            last = exc
        time.sleep(0.5)
    raise TimeoutError(f"{ep.system} not answering ({last}):\n{log.read_text()[-3000:]}")


# ----------------------------------------------------------------------------- measuring
def measure(
    ep: Endpoint, encoding: str, sc: Scenario, images: np.ndarray, want: np.ndarray,
    work: Path, duration: float, warmup: float,
) -> dict[str, Any]:  # fmt: skip
    x, expected = images[: sc.images], want[: sc.images]
    if encoding == "grpc":
        body, headers = grpc_body(x), {}
    else:
        body, headers = http_body(x, encoding)
    size = checked(ep, encoding, body, headers, expected)
    path = work / "body.bin"
    path.write_bytes(body)
    r = h2grpc.measure(load_command(ep, encoding, sc, path, headers), duration, warmup,
                       work / "h2load.log")  # fmt: skip
    checked(ep, encoding, body, headers, expected)
    # A run cut off by its duration counts bytes of up to `concurrency` unfinished answers;
    # a JSON answer's length varies by a few bytes (batched floats differ in the last bits).
    # HTTP failures are non-2xx statuses (gRPC's are 200s with no data: the bytes show them).
    slack = 0.0 if encoding == "grpc" else 0.05
    low, high = r.done * size * (1 - slack), (r.done + sc.concurrency) * size * (1 + slack)
    ok = r.done > 0 and r.failed == 0 and low <= r.data_bytes <= high
    if encoding != "grpc":
        ok = ok and r.status_2xx == r.done
    return {
        "requests_per_s": round(r.requests_per_s, 1),
        "images_per_s": round(r.requests_per_s * sc.images, 1),
        "latency_ms": r.latency_ms,
        "requests": r.done,
        "body_bytes": len(body),
        "answer_bytes": size,
        "data_bytes": r.data_bytes,
        "trusted": ok,
        "command": r.command,
    }


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "requests_per_s": round(statistics.median(r["requests_per_s"] for r in runs), 1),
        "images_per_s": round(statistics.median(r["images_per_s"] for r in runs), 1),
        "p50_ms": round(statistics.median(r["latency_ms"]["p50"] for r in runs), 3),
        "p99_ms": round(statistics.median(r["latency_ms"]["p99"] for r in runs), 3),
        "trusted": all(r["trusted"] for r in runs),
        "rounds": len(runs),
    }


def summary(eps: list[Endpoint]) -> dict[str, Any]:
    rows = {}
    for ep in eps:
        for key, runs in ep.results.items():
            rows[f"{ep.system} | {key}"] = median_of(runs)

    def get(system: str, encoding: str, sc: Scenario, what: str) -> float | None:
        row = rows.get(f"{system} | {encoding} | {sc.name}")
        return row[what] if row else None

    c64, bulk = SCENARIOS[1], SCENARIOS[2]
    ours = get("convserve HTTP", "json", c64, "requests_per_s")
    mls = get("MLServer", "json", c64, "requests_per_s")
    ours_bin = get("convserve HTTP", "binary", bulk, "images_per_s")
    ours_grpc = get("convserve gRPC", "grpc", bulk, "images_per_s")
    targets = {
        "c64 HTTP req/s vs MLServer's (>= 1.2)": round(ours / mls, 3) if ours and mls else None,
        "32-image img/s, HTTP binary vs gRPC (>= 0.85)": round(ours_bin / ours_grpc, 3)
        if ours_bin and ours_grpc
        else None,
    }
    return {"rows": rows, "targets": targets}


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| system | encoding | scenario | req/s | img/s | p50 ms | p99 ms | trusted |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, r in result["summary"]["rows"].items():
        system, encoding, scenario = key.split(" | ")
        lines.append(
            f"| {system} | {encoding} | {scenario} | {r['requests_per_s']:,.0f} | "
            f"{r['images_per_s']:,.0f} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | "
            f"{'yes' if r['trusted'] else 'NO'} |"
        )
    lines += ["", "| target | ratio |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in result["summary"]["targets"].items()]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-repository", type=Path, default=None)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args()
    if h2grpc.available() is None:
        raise SystemExit("h2load is not installed (Debian: nghttp2-client)")
    work = Path(tempfile.mkdtemp(prefix="http-bench-"))
    model = find_model(args.model_repository, work)
    images = test_images((1, 28, 28), 64)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    (want,) = sess.run(["probabilities"], {"images": images})
    eps = endpoints(model, work)
    with all_started(eps, work, images[:1], want[:1]):
        for rnd in range(args.rounds):
            for sc in SCENARIOS:
                for ep in eps:
                    for enc in ep.encodings:
                        r = measure(ep, enc, sc, images, want, work, args.duration, args.warmup)
                        ep.results.setdefault(f"{enc} | {sc.name}", []).append(r)
                        print(f"round {rnd + 1} {ep.system} {enc} {sc.name}: "
                              f"{r['requests_per_s']:,.0f} req/s, p50 "
                              f"{r['latency_ms']['p50']:.2f} ms, trusted {r['trusted']}",
                              flush=True)  # fmt: skip
    result = {
        "machine": machine(),
        "code": code_version(),
        "settings": vars(args) | {"out": str(args.out), "model_repository": str(model)},
        "runs": {ep.system: ep.results for ep in eps},
        "summary": summary(eps),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "http.json").write_text(json.dumps(result, indent=2, default=str))
    (args.out / "http.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
