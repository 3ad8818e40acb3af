"""Audit an exported model on labelled data with ONNX Runtime alone (no torch imported).

`cnn-report --model models/NAME/VERSION --data PATH` reads the version's manifest and
model.onnx, classifies every image with ONNX Runtime and writes the report parts that need
only the model (trainer.report.evaluation): confusion matrix, per-class accuracy, most
confident mistakes and occlusion maps.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from serving.codec import decode_image
from serving.contract import INPUT_NAME, MANIFEST_FILE, MODEL_FILE, PROBABILITIES, InputSpec
from serving.errors import InvalidInput
from trainer.data.idx import read_idx
from trainer.data.types import DataError
from trainer.report import ReportError
from trainer.report.evaluation import Predict, evaluation_sections
from trainer.report.page import write_report

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
IDX_IMAGES = ("t10k-images-idx3-ubyte", "t10k-images-idx3-ubyte.gz")
IDX_LABELS = ("t10k-labels-idx1-ubyte", "t10k-labels-idx1-ubyte.gz")


def read_manifest(model_dir: Path) -> dict:
    try:
        return json.loads((model_dir / MANIFEST_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ReportError(f"{model_dir}: no readable {MANIFEST_FILE} ({exc})") from None


def load_labelled(path: Path, labels: Sequence[str], spec: InputSpec) -> tuple:
    """(images (N, C, H, W) uint8, labels (N,) int64) from class folders or IDX files."""
    if not path.is_dir():
        raise ReportError(f"--data {path} is not a folder")
    idx = [p for n in IDX_IMAGES if (p := path / n).is_file()]
    if idx:
        lab = [p for n in IDX_LABELS if (p := path / n).is_file()]
        if not lab:
            raise ReportError(f"{path}: {idx[0].name} has no t10k-labels-idx1-ubyte beside it")
        try:
            images, y = read_idx(idx[0]), read_idx(lab[0])
        except DataError as exc:
            raise ReportError(str(exc)) from None
        if images.shape[1:] != (spec.height, spec.width) or spec.channels != 1:
            raise ReportError(f"{idx[0]}: images {images.shape[1:]} do not fit {spec.shape}")
        return np.ascontiguousarray(images[:, None]), y.astype(np.int64)
    return _read_folders(path, labels, spec)


def _class_index(name: str, labels: Sequence[str]) -> int | None:
    if name.isdigit() and int(name) < len(labels):
        return int(name)
    names = [label.replace("/", "-") for label in labels]
    return names.index(name) if name in names else None


def _read_folders(path: Path, labels: Sequence[str], spec: InputSpec) -> tuple:
    images, ys = [], []
    for folder in sorted(p for p in path.iterdir() if p.is_dir()):
        y = _class_index(folder.name, labels)
        if y is None:
            raise ReportError(f"{folder}: folder name is neither a class index nor a label")
        for f in sorted(folder.iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                images.append(decode_image(f.read_bytes(), spec))  # as the server decodes
            except InvalidInput as exc:
                raise ReportError(f"{f}: {exc}") from None
            ys.append(y)
    if not images:
        raise ReportError(f"{path}: no class folders with images, and no IDX files")
    return np.stack(images), np.asarray(ys, dtype=np.int64)


def onnx_predict(model_path: Path, batch: int = 500) -> Predict:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])

    def predict(x: np.ndarray) -> np.ndarray:
        parts = [
            session.run([PROBABILITIES], {INPUT_NAME: x[i : i + batch]})[0]
            for i in range(0, len(x), batch)
        ]
        return np.concatenate(parts).astype(np.float32)

    return predict


def audit_report(model_dir: Path, data: Path, out: Path) -> Path:
    """The ONNX-only report of `model_dir` (a version folder) on the labelled `data`."""
    manifest = read_manifest(model_dir)
    inp, classes = manifest["input"], list(manifest["labels"])
    spec = InputSpec(int(inp["channels"]), int(inp["height"]), int(inp["width"]))
    images, labels = load_labelled(data, classes, spec)
    predict = onnx_predict(model_dir / MODEL_FILE)
    probs = predict(images)
    accuracy = float((probs.argmax(1) == labels).mean())
    sections = evaluation_sections(images, labels, probs, classes, predict, manifest["mean"])
    title = f"Audit of {manifest['name']} version {manifest['version']}"
    facts = (
        f"{len(labels)} labelled images from {data}, classified with ONNX Runtime "
        f"({MODEL_FILE}): accuracy {accuracy:.2%} (exported test accuracy "
        f"{manifest.get('test_accuracy', float('nan')):.2%})."
    )
    return write_report(title, facts, sections, out)
