"""Audit an exported model on labelled data with ONNX Runtime alone (no torch imported).

`cnn-report --model models/NAME/VERSION --data PATH` reads the version's manifest and
model.onnx, classifies every image with ONNX Runtime and writes the report parts that need
only the model: confusion matrix, per-class accuracy, most confident mistakes and occlusion
maps. `evaluation_sections` builds those parts for the training report too.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from serving.codec import InputSpec, decode_image
from serving.errors import InvalidInput
from serving.occlusion import Grid, grid, occlusion, upsample
from trainer import figures
from trainer.data.idx import read_idx
from trainer.data.types import DataError
from trainer.report import ReportError, Section, write_report

Predict = Callable[[np.ndarray], np.ndarray]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
IDX_IMAGES = ("t10k-images-idx3-ubyte", "t10k-images-idx3-ubyte.gz")
IDX_LABELS = ("t10k-labels-idx1-ubyte", "t10k-labels-idx1-ubyte.gz")
OCCLUDED_IMAGES = 6
MISTAKES = 16


def occlusion_grid(height: int, width: int) -> Grid:
    """The report's occlusion grid: the default patch, overlapping with stride patch // 3."""
    g = grid(height, width)
    return grid(height, width, g.patch, max(1, g.patch // 3))


def evaluation_sections(
    images: np.ndarray,
    labels: np.ndarray,
    probabilities: np.ndarray,
    classes: Sequence[str],
    predict: Predict,
    mean: Sequence[float],
) -> list[Section]:
    """Occlusion maps, confusion matrix, per-class accuracy and confident mistakes."""
    k = len(classes)
    pred = probabilities.argmax(1)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (labels, pred), 1)
    per_class = cm.diagonal() / np.maximum(cm.sum(1), 1)
    accuracy = float((pred == labels).mean())
    return [
        _occlusion_section(images, labels, classes, predict, mean),
        Section(
            "confusion",
            "Confusion matrix (test set)",
            f"Each cell counts test images of the row's true class predicted as the column's "
            f"class; the diagonal holds the {int(cm.trace())} correct ones of {len(labels)} "
            f"(accuracy {accuracy:.2%}). Bright cells off the diagonal are the classes the "
            "network confuses.",
            figures.confusion_matrix(cm, classes),
        ),
        Section(
            "per_class",
            "Per-class accuracy (test set)",
            "The share of each class's test images classified correctly; the dashed line is "
            "the mean over classes. Short bars are the hard classes.",
            figures.per_class_accuracy(per_class, classes),
        ),
        _mistakes_section(images, labels, probabilities, classes),
    ]


def _occlusion_section(
    images: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    predict: Predict,
    mean: Sequence[float],
) -> Section:
    g = occlusion_grid(images.shape[2], images.shape[3])
    picks = images[:OCCLUDED_IMAGES]
    maps, titles = [], []
    for img, label in zip(picks, labels[:OCCLUDED_IMAGES], strict=True):
        occ = occlusion(img, predict, mean, patch=g.patch, stride=g.stride, target=int(label))
        maps.append(upsample(occ.heatmap, g, img.shape[1], img.shape[2]))
        titles.append(f"{classes[label]}\np={occ.probabilities[label]:.2f}")
    return Section(
        "occlusion",
        "Occlusion sensitivity",
        f"A {g.patch}x{g.patch} patch of the training mean colour slides over each test image "
        f"in steps of {g.stride} px ({g.forward_passes} forward passes per image). Red marks "
        "where hiding the region lowers the probability of the true class (the evidence the "
        "network uses), blue where it raises it; each pixel shows the mean over the patches "
        "covering it. The title gives the true class and its probability.",
        figures.occlusion_maps(list(picks), maps, titles),
    )


def _mistakes_section(
    images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray, classes: Sequence[str]
) -> Section:
    pred = probabilities.argmax(1)
    wrong = np.flatnonzero(pred != labels)
    conf = probabilities[wrong, pred[wrong]]
    order = wrong[np.argsort(-conf, kind="stable")][:MISTAKES]
    titles = [
        f"true {classes[labels[i]]}\npred {classes[pred[i]]} {probabilities[i, pred[i]]:.2f}"
        for i in order
    ]
    fig = figures.mistakes([images[i] for i in order], titles) if len(order) else None
    caption = (
        f"The {len(order)} wrong test predictions made with the highest probability: true "
        "class, predicted class and its probability. Confident mistakes show ambiguous images, "
        "label noise or a blind spot of the network."
        if len(order)
        else "The network made no mistake on the test set."
    )
    return Section("mistakes", "Most confident mistakes", caption, fig)


# ----------------------------------------------------------------------------- ONNX-only
def read_manifest(model_dir: Path) -> dict:
    try:
        return json.loads((model_dir / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise ReportError(f"{model_dir}: no readable manifest.json ({exc})") from None


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
            session.run(["probabilities"], {"images": x[i : i + batch]})[0]
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
    predict = onnx_predict(model_dir / "model.onnx")
    probs = predict(images)
    accuracy = float((probs.argmax(1) == labels).mean())
    sections = evaluation_sections(images, labels, probs, classes, predict, manifest["mean"])
    title = f"Audit of {manifest['name']} version {manifest['version']}"
    facts = (
        f"{len(labels)} labelled images from {data}, classified with ONNX Runtime "
        f"(model.onnx): accuracy {accuracy:.2%} (exported test accuracy "
        f"{manifest.get('test_accuracy', float('nan')):.2%})."
    )
    return write_report(title, facts, sections, out)
