"""Benchmark: Classifier.Explain latency and forward-pass cost next to Predict.

Starts `cnn-serve` on a model version folder (the one `make bench-export` trains into
runs/bench-export unless `--model-dir` names another), then, one call at a time from one
client (concurrency 1, so latency is not queueing), times Predict on one image and Explain
at the server's default patch/stride and at a fine setting (patch 5, stride 1, the report's
localisation setting). Writes JSON with p50/p90 latency, forward passes per call and the
server's own inference-items counter, which must rise by exactly 1 + P per explanation.

    python bench/explain_bench.py --out bench/results/explain.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serving_bench import free_port  # noqa: E402

from serving.client import Client  # noqa: E402
from trainer.data import load_dataset  # noqa: E402

DEFAULT_MODEL = ROOT / "runs/bench-export/models/fashion-mnist/1"  # what bench-export trains


def _items(metrics_port: int) -> float:
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("convserve_inference_items_total{")
    )


def _timed(fn, image: np.ndarray, calls: int) -> tuple[list[float], object]:
    out = None
    for _ in range(5):  # warm-up
        out = fn(image)
    ms = []
    for _ in range(calls):
        t = time.perf_counter()
        out = fn(image)
        ms.append((time.perf_counter() - t) * 1000)
    return ms, out


def _summary(ms: list[float]) -> dict[str, float]:
    q = statistics.quantiles(ms, n=10)
    return {"p50_ms": round(statistics.median(ms), 3), "p90_ms": round(q[8], 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/explain.json")
    p.add_argument("--calls", type=int, default=200)
    args = p.parse_args()
    if not (args.model_dir / "model.onnx").is_file():
        sys.exit(f"{args.model_dir} holds no model.onnx: run `make bench-export` first")
    port, mport = free_port(), free_port()
    repo = args.model_dir.parent.parent
    cmd = [
        sys.executable, "-m", "serving.main", "--model-repository", str(repo),
        "--model", args.model_dir.parent.name, "--host", "127.0.0.1", "--port", str(port),
        "--metrics-host", "127.0.0.1", "--metrics-port", str(mport), "--poll-interval", "0",
        "--http-port", "0",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
    try:
        client = Client(f"127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        while client_health(client) != "SERVING":
            if time.monotonic() > deadline or proc.poll() is not None:
                sys.exit("server did not become SERVING")
            time.sleep(0.2)
        image = load_dataset("fashion-mnist").test.images[0]
        results: dict[str, dict] = {}
        ms, _ = _timed(lambda x: client.predict([x]), image, args.calls)
        results["predict"] = {**_summary(ms), "forward_passes": 1}
        for name, kw in (
            ("explain_default", {}),
            # the default before bench/explain_quality.py chose 4/4: time per pass compared
            ("explain_patch7_stride7", {"patch_size": 7, "stride": 7}),
            ("explain_patch5_stride1", {"patch_size": 5, "stride": 1}),
        ):
            before = _items(mport)
            calls = max(20, args.calls // (10 if kw.get("stride") == 1 else 1))
            ms, out = _timed(lambda x, kw=kw: client.explain(x, **kw), image, calls)
            counted = (_items(mport) - before) / (calls + 5)
            results[name] = {
                **_summary(ms),
                "forward_passes": out.forward_passes,
                "heatmap_shape": list(out.heatmap.shape),
                "items_counted_per_call": counted,
                "x_predict_p50": round(_summary(ms)["p50_ms"] / results["predict"]["p50_ms"], 1),
                "ms_per_pass_p50": round(_summary(ms)["p50_ms"] / out.forward_passes, 4),
            }
            assert counted == out.forward_passes, (counted, out.forward_passes)
        client.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    report = {
        "model_dir": str(args.model_dir),
        "machine": {"processor": platform.processor(), "cores": os.cpu_count()},
        "method": "one client, one call at a time, 5 warm-up calls, latency seen by the client",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(results, indent=2))


def client_health(client: Client) -> str:
    try:
        return client.health()
    except Exception:  # not listening yet
        return "UNKNOWN"


if __name__ == "__main__":
    main()
