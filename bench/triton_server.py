"""NVIDIA Triton Inference Server's core (through PyTriton) serving the same ONNX model.

Runs under bench/.venv-triton (nvidia-pytriton + onnxruntime), never under convserve's venv:
PyTriton pins its own protobuf and grpc stack.

The tritonserver binary that `nvidia-pytriton` bundles carries only the Python backend (no
onnxruntime backend: `pytriton/tritonserver/backends/` holds `python/` alone), so the model
repository cannot be served directly. Instead an ONNX Runtime session with the same session
options as convserve's runs inside the PyTriton inference callable, and Triton's own dynamic
batcher merges concurrent requests (`@batch` hands the callable one stacked batch). Clients
use Triton's KServe V2 gRPC endpoint (ModelInfer) on `--grpc-port`.

    PY=bench/.venv-triton/bin/python
    LD_LIBRARY_PATH=$($PY -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))') \
        $PY bench/triton_server.py --model models/fashion-mnist/1/model.onnx

The backend stub links against `libpython3.X.so.1.0`; when the interpreter is not the
system one, LD_LIBRARY_PATH must point at the interpreter's own lib directory (the driver
does that).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig


def session(path: Path, intra_op_threads: int) -> ort.InferenceSession:
    """The same options as serving.runtime.session_options (workers spin only within a run)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = intra_op_threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "1")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="model.onnx of a version folder")
    p.add_argument("--name", default="fashion-mnist")
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--max-queue-delay-us", type=int, default=0)
    p.add_argument("--intra-op-threads", type=int, default=0)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    manifest = json.loads((args.model.parent / "manifest.json").read_text())
    inp = manifest["input"]
    shape = (int(inp["channels"]), int(inp["height"]), int(inp["width"]))
    classes = len(manifest["labels"])
    sess = session(args.model, args.intra_op_threads)

    @batch
    def infer(images: np.ndarray) -> dict[str, np.ndarray]:
        (probs,) = sess.run(["probabilities"], {"images": images})
        return {"probabilities": probs}

    config = TritonConfig(
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        http_address="127.0.0.1",
        http_port=args.http_port,
        metrics_address="127.0.0.1",
        metrics_port=args.metrics_port,
        log_verbose=0,
    )
    with Triton(config=config) as triton:
        triton.bind(
            model_name=args.name,
            infer_func=infer,
            inputs=[Tensor(name="images", dtype=np.uint8, shape=shape)],
            outputs=[Tensor(name="probabilities", dtype=np.float32, shape=(classes,))],
            config=ModelConfig(
                batching=True,
                max_batch_size=args.max_batch_size,
                batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us),
            ),
            strict=False,
        )
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        triton.run()  # starts serving in the background
        print(f"triton: serving {args.name} on gRPC port {args.grpc_port}", flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
