"""Benchmark: ONNX Runtime CPU images/s of the exported fp32, ORT-optimised and INT8 graphs.

Measures one model version folder: `model.onnx`, `model.opt.onnx` and `model.int8.onnx`, at
batch 1 and batch 32, with intra-op threads = usable cores, a warm-up, and the median of
several repeats. The variants are timed round-robin within each repeat, so a change in
background load hits all of them alike. Test accuracies come from the manifest (measured by
the exporter on the whole test set).

Which model: `--model-dir` names an existing version folder (it must hold the variants). Without
it, the default Fashion-MNIST recipe is trained for `--epochs` epochs (default 1: the weights
only need to be realistic, not the best) into WORK/run and exported with the optimised and
INT8 variants into WORK/models (WORK defaults to runs/bench-export). A later run reuses both;
delete WORK to start afresh.

`--explore` also times other INT8 settings built from the same model.onnx (per-tensor weights,
full-range 8-bit weights, QOperator format, and the exported QDQ graph after ORT's own
optimisation) and records their accuracy, for CPUs where the default INT8 graph is not the
best choice.

    python bench/export_bench.py --out bench/results/export.json [--model-dir models/NAME/1]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process, quantize_static

from serving.contract import INPUT_NAME, MANIFEST_FILE, OUTPUT_NAMES, VARIANT_FILES, versions
from serving.cores import usable_cores
from trainer.data import load_dataset
from trainer.export import export_checkpoint
from trainer.export.int8 import CalibrationReader, calibration_images

FILES = {
    "fp32": VARIANT_FILES["fp32"],
    "optimized": VARIANT_FILES["opt"],
    "int8": VARIANT_FILES["int8"],
}
_, PROBABILITIES = OUTPUT_NAMES
BATCHES = (1, 32)
TARGET_SPEEDUP, TARGET_MAX_DROP = 1.5, 0.5


def session(path: Path, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def calls_for(run, seconds: float) -> int:
    """How many calls take about `seconds` (measured after the warm-up)."""
    t0 = time.perf_counter()
    for _ in range(5):
        run()
    per_call = (time.perf_counter() - t0) / 5
    return max(5, int(seconds / per_call))


def throughput(
    paths: dict[str, Path], images: np.ndarray, batch: int, threads: int, repeats: int
) -> dict[str, float]:
    """Median images/s of each graph at `batch`; graphs alternate within every repeat."""
    x = {INPUT_NAME: np.ascontiguousarray(images[:batch])}
    runs = {}
    for label, path in paths.items():
        s = session(path, threads)
        for _ in range(20):  # warm-up: allocations, thread pool, caches
            s.run(None, x)
        runs[label] = (s, calls_for(lambda s=s: s.run(None, x), 0.4))
    rates: dict[str, list[float]] = {label: [] for label in paths}
    for _ in range(repeats):
        for label, (s, n) in runs.items():
            t0 = time.perf_counter()
            for _ in range(n):
                s.run(None, x)
            rates[label].append(n * batch / (time.perf_counter() - t0))
    return {label: round(statistics.median(r), 1) for label, r in rates.items()}


def accuracy(path: Path, images: np.ndarray, labels: np.ndarray, threads: int) -> float:
    s = session(path, threads)
    pred = np.concatenate(
        [
            s.run([PROBABILITIES], {INPUT_NAME: images[i : i + 500]})[0].argmax(1)
            for i in range(0, len(images), 500)
        ]
    )
    return float((pred == labels).mean())


def default_model(work: Path, epochs: int) -> Path:
    """Train and export the default recipe into `work`, or reuse what an earlier run left."""
    from trainer.recipe import load_recipe
    from trainer.run import fit

    run, model_dir = work / "run", work / "models" / "fashion-mnist"
    if not (run / "checkpoints" / "best.pt").exists():
        recipe = load_recipe("fashion_mnist", [f"train.epochs={epochs}", "export.tta=none"])
        fit(recipe, run, quiet=True)
    if versions(model_dir):
        return model_dir / str(versions(model_dir)[-1])
    return export_checkpoint(run, work / "models", "fashion-mnist", int8=True).version_dir


def int8_alternatives(model_dir: Path, work: Path, train_images: np.ndarray) -> dict[str, Path]:
    """Other INT8 settings from the same fp32 graph and calibration images."""
    pre = work / "pre.onnx"
    quant_pre_process(str(model_dir / FILES["fp32"]), str(pre))
    calib = calibration_images(train_images, seed=0)
    common = {"activation_type": QuantType.QUInt8, "weight_type": QuantType.QInt8}
    settings = {  # the exporter's INT8 is QDQ, per-channel, reduce_range, float stem/classifier
        "int8_every_op": {
            "quant_format": QuantFormat.QDQ,
            "per_channel": True,
            "reduce_range": True,
        },
        "int8_qdq_per_tensor": {"quant_format": QuantFormat.QDQ, "per_channel": False},
        "int8_qdq_full_range": {"quant_format": QuantFormat.QDQ, "per_channel": True},
        "int8_qoperator": {
            "quant_format": QuantFormat.QOperator,
            "per_channel": True,
            "reduce_range": True,
        },
    }
    out = {}
    for label, kw in settings.items():
        out[label] = work / f"{label}.onnx"
        quantize_static(
            str(pre),
            str(out[label]),
            CalibrationReader(calib),
            nodes_to_exclude=_softmax_nodes(pre),
            **common,
            **kw,
        )
    # The default QDQ graph after ORT's own fusions (what a serving session would run anyway).
    opt = ort.SessionOptions()
    opt.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opt.optimized_model_filepath = str(work / "int8_ort_optimized.onnx")
    ort.InferenceSession(str(model_dir / FILES["int8"]), opt, providers=["CPUExecutionProvider"])
    out["int8_ort_optimized"] = work / "int8_ort_optimized.onnx"
    return out


def _softmax_nodes(path: Path) -> list[str]:
    return [n.name for n in onnx.load(path).graph.node if n.op_type == "Softmax"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results/export.json")
    p.add_argument("--model-dir", type=Path, help="an existing version folder to measure")
    p.add_argument("--work", type=Path, default=Path("runs/bench-export"))
    p.add_argument("--epochs", type=int, default=1, help="epochs when training here")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--explore", action="store_true", help="also time other INT8 settings")
    args = p.parse_args()

    model_dir = args.model_dir or default_model(args.work, args.epochs)
    manifest = json.loads((model_dir / MANIFEST_FILE).read_text())
    missing = [f for f in FILES.values() if not (model_dir / f).exists()]
    if missing:
        raise SystemExit(f"{model_dir} lacks {missing}: export it with optimize and int8")
    threads = usable_cores()
    ds = load_dataset(manifest["dataset"])
    paths = {label: model_dir / f for label, f in FILES.items()}
    acc = {"fp32": manifest["test_accuracy"]}
    acc.update(
        {
            label: manifest["variants"][FILES[label]]["test_accuracy"]
            for label in ("optimized", "int8")
        }
    )
    with tempfile.TemporaryDirectory(prefix="export-bench-") as tmp:
        if args.explore:
            extra = int8_alternatives(model_dir, Path(tmp), ds.train.images)
            paths.update(extra)
            acc.update(
                {k: accuracy(v, ds.test.images, ds.test.labels, threads) for k, v in extra.items()}
            )
        speed = {b: throughput(paths, ds.test.images, b, threads, args.repeats) for b in BATCHES}

    variants = {
        label: {
            "file": path.name if label in FILES else None,
            "test_accuracy": acc[label],
            "accuracy_drop_points": round((acc["fp32"] - acc[label]) * 100, 2),
            "images_per_s": {str(b): speed[b][label] for b in BATCHES},
        }
        for label, path in paths.items()
    }
    speedup = speed[32]["int8"] / speed[32]["fp32"]
    drop = variants["int8"]["accuracy_drop_points"]
    out = {
        "model_dir": str(model_dir),
        "trained_here": args.model_dir is None,
        "training": {
            "preset": manifest["training"]["model"].get("preset"),
            "epochs": manifest["training"]["train"]["epochs"],
        },
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cores": threads,
            "onnxruntime": ort.__version__,
        },
        "method": f"intra_op_threads={threads}, 20 warm-up runs, median of {args.repeats} "
        "repeats of ~0.4 s, graphs interleaved",
        "variants": variants,
        "int8_speedup_batch32": round(speedup, 2),
        "int8_speedup_batch1": round(speed[1]["int8"] / speed[1]["fp32"], 2),
        "target": {
            "int8_speedup_batch32": TARGET_SPEEDUP,
            "max_accuracy_drop_points": TARGET_MAX_DROP,
            "met": speedup >= TARGET_SPEEDUP and drop <= TARGET_MAX_DROP,
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("variants", "int8_speedup_batch32", "target")}, indent=2))


if __name__ == "__main__":
    main()
