"""Is the graph faithful? ONNX Runtime against PyTorch on the same images.

Parity is measured on the whole test set, topped up with training images to at least
MIN_PARITY_SAMPLES: an fp32 graph must agree on the argmax of every image and stay within
PROBABILITY_TOLERANCE of PyTorch's probabilities, else ExportError.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from serving.contract import INPUT_NAME, OUTPUT_NAMES
from serving.cores import usable_cores
from trainer import data as datalib
from trainer.export.errors import ExportError
from trainer.export.graph import WithProbabilities
from trainer.recipe import Recipe, load_recipe_data

log = logging.getLogger("convserve.export")

PROBABILITY_TOLERANCE = 1e-4  # max |delta probability| between ORT and PyTorch for fp32
MIN_PARITY_SAMPLES = 2000
EVAL_BATCH = 500


@dataclass(frozen=True)
class Outputs:
    logits: np.ndarray
    probabilities: np.ndarray


@dataclass(frozen=True)
class EvalImages:
    """The images parity and accuracy are measured on: the test set first, then (only if
    the test set is small) training images up to MIN_PARITY_SAMPLES, which count for parity
    but not for accuracy."""

    images: np.ndarray
    test_labels: np.ndarray

    def accuracy(self, out: Outputs) -> float:
        n = len(self.test_labels)
        return float((out.probabilities[:n].argmax(1) == self.test_labels).mean())


def load_eval_data(recipe: Recipe, state: dict[str, Any], data_dir: str | None) -> datalib.Dataset:
    """The checkpoint's dataset, refused unless it is what the checkpoint was trained on."""
    d = recipe.data
    try:
        ds = load_recipe_data(recipe, data_dir)
    except datalib.DataError as exc:
        msg = " ".join(str(exc).split())
        raise ExportError(
            f"cannot load the {d.name} test set for the parity check: {msg}"
        ) from None
    shape = [ds.channels, ds.height, ds.width]
    if list(ds.classes) != list(state["classes"]) or shape != list(state["in_shape"]):
        raise ExportError(
            f"the {d.name} data found ({len(ds.classes)} classes, {shape}) is not what the "
            f"checkpoint was trained on ({len(state['classes'])} classes, {state['in_shape']})"
        )
    return ds


def eval_images(ds: datalib.Dataset) -> EvalImages:
    extra = max(0, MIN_PARITY_SAMPLES - len(ds.test))
    images = ds.test.images
    if extra:
        images = np.concatenate([images, ds.train.images[:extra]])
    return EvalImages(np.ascontiguousarray(images), ds.test.labels)


@torch.inference_mode()
def torch_outputs(model: nn.Module, images: np.ndarray) -> Outputs:
    wrapped = WithProbabilities(model).eval()
    parts = [
        wrapped(torch.from_numpy(images[i : i + EVAL_BATCH]))
        for i in range(0, len(images), EVAL_BATCH)
    ]
    return Outputs(
        torch.cat([p[0] for p in parts]).numpy(), torch.cat([p[1] for p in parts]).numpy()
    )


def ort_session(path: Path, **options: Any) -> ort.InferenceSession:
    """A CPU session with one intra-op thread per usable core."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = usable_cores()
    for key, value in options.items():
        setattr(so, key, value)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_outputs(path: Path, images: np.ndarray) -> Outputs:
    session = ort_session(path)
    parts = [
        session.run(list(OUTPUT_NAMES), {INPUT_NAME: images[i : i + EVAL_BATCH]})
        for i in range(0, len(images), EVAL_BATCH)
    ]
    return Outputs(
        np.concatenate([p[0] for p in parts]).astype(np.float32),
        np.concatenate([p[1] for p in parts]).astype(np.float32),
    )


def compare(reference: Outputs, got: Outputs, data: EvalImages) -> dict[str, Any]:
    """Parity numbers of `got` against the PyTorch `reference` on the same images."""
    return {
        "samples": len(data.images),
        "test_samples": len(data.test_labels),
        "max_abs_diff_probability": float(
            np.abs(got.probabilities - reference.probabilities).max()
        ),
        "max_abs_diff_logit": float(np.abs(got.logits - reference.logits).max()),
        "argmax_agreement": float(
            (got.probabilities.argmax(1) == reference.probabilities.argmax(1)).mean()
        ),
        "test_accuracy": data.accuracy(got),
    }


def parity_failure(report: dict[str, Any]) -> str | None:
    """Why an fp32 graph is not faithful to PyTorch, or None if it is."""
    problems = []
    if report["argmax_agreement"] < 1.0:
        problems.append(f"argmax agreement {report['argmax_agreement']:.4%} < 100%")
    if report["max_abs_diff_probability"] > PROBABILITY_TOLERANCE:
        problems.append(
            f"max |delta probability| {report['max_abs_diff_probability']:.3g} "
            f"> {PROBABILITY_TOLERANCE:g}"
        )
    return "; ".join(problems) or None


def check_parity(model_path: Path, reference: Outputs, data: EvalImages) -> dict[str, Any]:
    """Run the graph in ORT (CPU EP) on the evaluation images; ExportError unless faithful."""
    report = compare(reference, ort_outputs(model_path, data.images), data)
    ort_accuracy = report.pop("test_accuracy")
    parity = {
        **report,
        "torch_test_accuracy": data.accuracy(reference),
        "ort_test_accuracy": ort_accuracy,
        "tolerance_probability": PROBABILITY_TOLERANCE,
        "execution_provider": "CPUExecutionProvider",
    }
    failure = parity_failure(parity)
    if failure:
        raise ExportError(
            f"ONNX Runtime disagrees with PyTorch on {parity['samples']} images: {failure} "
            f"(max |delta logit| {parity['max_abs_diff_logit']:.3g}, ORT test accuracy "
            f"{parity['ort_test_accuracy']:.4f} vs PyTorch {parity['torch_test_accuracy']:.4f})"
        )
    log.info(
        "parity: argmax agreement %.4f, max |dp| %.2g, max |dlogit| %.2g on %d images",
        parity["argmax_agreement"],
        parity["max_abs_diff_probability"],
        parity["max_abs_diff_logit"],
        parity["samples"],
    )
    return parity
