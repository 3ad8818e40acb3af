"""Benchmark: what test-time augmentation costs when served, and what it buys.

Exports one training run three ways (no views, mirror, mirror_shift: trainer.tta) into a
fresh repository, with the INT8 variant of the plain graph; serves all three from one
convserve worker and loads each with `cnn-bench` (32-image Predict requests, 16 in flight),
the three interleaved over `--rounds` rounds so background load hits them alike. Before the
load, each served answer is checked against ONNX Runtime in-process on the same graph.
Reports served images/s, its ratio to the plain graph, and each graph's test accuracy from
its manifest (the exporter's, on the whole test set).

    python bench/tta_price.py --run RUN_DIR --out bench/results/tta_price.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serving.client import Client  # noqa: E402
from trainer.data import load_dataset  # noqa: E402
from trainer.export import export_checkpoint  # noqa: E402

VIEWS = ("none", "mirror", "mirror_shift")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export_all(run: Path, repo: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for views in VIEWS:
        t0 = time.perf_counter()
        name = f"fashion-{views.replace('_', '-')}"
        res = export_checkpoint(
            run, repo, name, tta=views, int8=views != "mirror_shift", insight=False
        )
        m = res.manifest
        out[views] = {
            "model": name,
            "export_seconds": time.perf_counter() - t0,
            "test_accuracy": m["test_accuracy"],
            "variants": {
                k: {"test_accuracy": v["test_accuracy"], "accuracy_drop": v["accuracy_drop"]}
                for k, v in m["variants"].items()
            },
            "onnx": str(res.version_dir / "model.onnx"),
        }
        seconds = out[views]["export_seconds"]
        print(f"exported {name}: test {m['test_accuracy']:.4f} in {seconds:.0f} s")
    return out


def check_served(target: str, models: dict[str, dict[str, Any]], images: np.ndarray) -> None:
    """Every model's served top-1 equals ORT's argmax on its own graph."""
    with Client(target) as c:
        for views, m in models.items():
            sess = ort.InferenceSession(m["onnx"], providers=["CPUExecutionProvider"])
            want = sess.run(None, {"images": images})[1].argmax(1)
            got = c.predict(list(images), top_k=1, model=m["model"])
            served = np.array([p.index for p in got])
            assert np.array_equal(served, want), f"{views}: served answers differ from ORT"


def load(target: str, model: str, seconds: float, tmp: Path) -> dict[str, Any]:
    out = tmp / f"{model}.json"
    cmd = [sys.executable, "-m", "serving.client.loadgen", "--target", target]
    cmd += ["--model", model, "--concurrency", "16", "--images-per-request", "32"]
    cmd += ["--duration", f"{seconds:g}", "--warmup", "2", "--json", str(out)]
    subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=seconds + 120)  # rc 1: errors
    return json.loads(out.read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="a training run directory")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/tta_price.json")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=8.0)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        models = export_all(args.run, tmp / "models")
        port, mport = free_port(), free_port()
        target = f"127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "serving.main", "--model-repository", str(tmp / "models")]
        cmd += ["--port", str(port), "--metrics-port", str(mport), "--http-port", "0"]
        with open(tmp / "server.log", "w") as log:
            server = subprocess.Popen(
                cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            ds = load_dataset("fashion-mnist", seed=0)
            images = ds.test.images[:64]
            deadline = time.monotonic() + 120
            while True:
                try:
                    check_served(target, models, images)
                    break
                except Exception:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise
                    time.sleep(0.5)
            rounds: dict[str, list[float]] = {v: [] for v in VIEWS}
            errors: dict[str, int] = {v: 0 for v in VIEWS}
            for _ in range(args.rounds):
                for views in VIEWS:
                    r = load(target, models[views]["model"], args.seconds, tmp)
                    rounds[views].append(r["images_per_s"])
                    errors[views] += r["error_count"]
            check_served(target, models, images)  # still right after the load
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(30)
    base = statistics.median(rounds["none"])
    result = {
        "run": str(args.run),
        "load": "cnn-bench, Predict, 32 images/request, 16 in flight, one worker",
        "views": {
            v: {
                **{k: x for k, x in models[v].items() if k != "onnx"},
                "served_images_per_s": rounds[v],
                "median_images_per_s": statistics.median(rounds[v]),
                "vs_plain": statistics.median(rounds[v]) / base,
                "errors": errors[v],
            }
            for v in VIEWS
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for v, r in result["views"].items():
        print(
            f"{v:>13}: test {r['test_accuracy']:.4f}, served {r['median_images_per_s']:.0f} img/s"
            f" ({r['vs_plain']:.2f}x plain), errors {r['errors']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
