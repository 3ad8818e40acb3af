"""Optional variants of the fp32 graph: ORT-optimised, INT8, FP16, each measured or rejected.

A variant is measured on the same images as the fp32 parity check. One that loses more than
`max_accuracy_drop` points of test accuracy (or cannot be built, or, for the fp32 optimised
graph, misses the fp32 parity bound) is not written and is listed in `rejected_variants`.

variants[filename] in the manifest: kind ("optimized" | "int8" | "fp16"), how it was made
(kind-specific), test_accuracy, accuracy_drop (percentage points below fp32), parity
(samples, test_samples, max_abs_diff_probability, max_abs_diff_logit, argmax_agreement;
against PyTorch). model.opt.onnx holds ORT's CPU-EP fusions (com.microsoft ops): load it on
the CPU EP. In a variant file `convserve.test_accuracy` is that variant's own accuracy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort

from serving.contract import MODEL_FILE, VARIANT_FILES, Manifest
from serving.metadata import metadata_props
from trainer import data as datalib
from trainer.export.graph import stamp_metadata
from trainer.export.int8 import quantize_int8
from trainer.export.parity import (
    EvalImages,
    Outputs,
    compare,
    ort_outputs,
    ort_session,
    parity_failure,
)

log = logging.getLogger("convserve.export")


def accuracy_drop_points(reference_accuracy: float, accuracy: float) -> float:
    """How many percentage points `accuracy` lies below the reference (negative: above)."""
    return round((reference_accuracy - accuracy) * 100.0, 6)


def variant_rejection(
    kind: str,
    fp32_accuracy: float,
    accuracy: float,
    parity: dict[str, Any],
    max_accuracy_drop: float,
) -> str | None:
    """Why a measured variant must not be published, or None if it may be."""
    drop = accuracy_drop_points(fp32_accuracy, accuracy)
    if drop > max_accuracy_drop:
        return (
            f"test accuracy {accuracy:.4f} is {drop:.2f} points below fp32 "
            f"{fp32_accuracy:.4f} (max_accuracy_drop {max_accuracy_drop:g})"
        )
    if kind == "optimized":  # still an fp32 graph: it must keep the fp32 guarantee
        return parity_failure(parity)
    return None


# ----------------------------------------------------------------------------- builders
def optimized_variant(src: Path, dst: Path, data: datalib.Dataset, seed: int) -> dict[str, Any]:
    """The graph as ORT rewrites it at ORT_ENABLE_EXTENDED (fusions are CPU-EP specific)."""
    ort_session(
        src,
        graph_optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        optimized_model_filepath=str(dst),
    )
    return {
        "optimization_level": "ORT_ENABLE_EXTENDED",
        "execution_provider": "CPUExecutionProvider",
    }


def int8_variant(src: Path, dst: Path, data: datalib.Dataset, seed: int) -> dict[str, Any]:
    """Static INT8 (QDQ, per-channel) calibrated on training images; trainer.export.int8 says
    which ops stay float and why."""
    return quantize_int8(src, dst, data.train.images, seed)


def fp16_variant(src: Path, dst: Path, data: datalib.Dataset, seed: int) -> dict[str, Any]:
    """Float16 weights and activations; uint8 in and float32 out as before (keep_io_types)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(src), keep_io_types=True), dst)
    return {"converter": "onnxruntime.transformers.float16", "keep_io_types": True}


# kind -> (file, builder(src, dst, dataset, seed) -> how it was made)
VARIANTS: dict[str, tuple[str, Callable[..., dict[str, Any]]]] = {
    "optimized": (VARIANT_FILES["opt"], optimized_variant),
    "int8": (VARIANT_FILES["int8"], int8_variant),
    "fp16": (VARIANT_FILES["fp16"], fp16_variant),
}


def add_variant(
    out: Path,
    kind: str,
    manifest: Manifest,
    ds: datalib.Dataset,
    data: EvalImages,
    reference: Outputs,
    max_accuracy_drop: float,
    seed: int,
) -> Manifest:
    """Build, measure and keep (or reject) one variant; returns the manifest recording it."""
    filename, build = VARIANTS[kind]
    dst = out / filename
    try:
        extra = build(out / MODEL_FILE, dst, ds, seed)
        parity = compare(reference, ort_outputs(dst, data.images), data)
    except Exception as exc:  # a variant is optional: failing to build it rejects only it
        dst.unlink(missing_ok=True)
        reason = " ".join(f"could not build or run it: {exc}".split())
        log.warning("%s variant rejected: %s", kind, reason)
        return _rejected(manifest, filename, {"kind": kind, "reason": reason})
    fp32_accuracy = manifest.test_accuracy
    accuracy = parity.pop("test_accuracy")
    entry = {
        "kind": kind,
        **extra,
        "test_accuracy": accuracy,
        "accuracy_drop": accuracy_drop_points(fp32_accuracy, accuracy),
        "parity": parity,
    }
    reason = variant_rejection(kind, fp32_accuracy, accuracy, parity, max_accuracy_drop)
    if reason:
        dst.unlink()
        log.warning("%s variant rejected: %s", kind, reason)
        return _rejected(
            manifest,
            filename,
            {**entry, "max_accuracy_drop": max_accuracy_drop, "reason": reason},
        )
    stamp_metadata(dst, metadata_props(replace(manifest, test_accuracy=accuracy), kind))
    log.info(
        "%s variant %s: test accuracy %.4f (accuracy drop %.2f points)",
        kind,
        filename,
        accuracy,
        entry["accuracy_drop"],
    )
    return replace(manifest, variants={**manifest.variants, filename: entry})


def _rejected(manifest: Manifest, filename: str, entry: dict[str, Any]) -> Manifest:
    return replace(manifest, rejected_variants={**manifest.rejected_variants, filename: entry})
