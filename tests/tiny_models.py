"""Tiny, valid model version folders built by hand in milliseconds (no training, no torch).

`write_version(root, name, version)` writes `root/name/version/{model.onnx, manifest.json}`
that honours the repository contract exactly as trainer.export does: uint8 NCHW input
`images` with a dynamic batch, float `logits` and `probabilities` outputs, a manifest with
labels, input spec, mean/std and files {filename: sha256}, and the same `convserve.*`
metadata_props in the graph. Its answers are known in advance: with m the mean pixel of an
image scaled to 0..1 and K classes, logits[k] = -(m * (K - 1) - k)^2, so the predicted class
is round(m * (K - 1)) (`expected_class`), and probabilities are their softmax.

Knobs make a version hostile in one way at a time (wrong input dtype or layout, missing
output, custom-domain operator, external data, corrupt bytes, bad manifest...). Every knob
defaults to "valid"; tests combine `make_model` / `write_version` keyword arguments.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from serving.contract import MANIFEST_FILE, MODEL_FILE, Manifest
from serving.metadata import metadata_props

OPSET = 17
IR_VERSION = 8  # what every onnxruntime >= 1.14 reads
DEFAULT_LABELS = ("dark", "dim", "mid", "bright")


def expected_logits(images: np.ndarray, num_classes: int = len(DEFAULT_LABELS)) -> np.ndarray:
    """The logits a tiny model gives for uint8 images of shape (N, C, H, W)."""
    m = images.reshape(len(images), -1).astype(np.float64).mean(axis=1) / 255.0
    return -((m[:, None] * (num_classes - 1) - np.arange(num_classes)) ** 2)


def expected_class(images: np.ndarray, num_classes: int = len(DEFAULT_LABELS)) -> np.ndarray:
    """The class index a tiny model predicts for each image: round(mean pixel * (K - 1))."""
    return expected_logits(images, num_classes).argmax(axis=1)


def image_of_class(
    k: int, shape: tuple[int, int, int] = (1, 8, 8), num_classes: int = len(DEFAULT_LABELS)
) -> np.ndarray:
    """A uint8 (C, H, W) image the tiny model classifies as class `k` (a flat grey level)."""
    level = round(255 * k / (num_classes - 1))
    return np.full(shape, level, dtype=np.uint8)


def make_model(
    *,
    num_classes: int = len(DEFAULT_LABELS),
    shape: tuple[int, int, int] = (1, 8, 8),
    input_dtype: int = TensorProto.UINT8,
    layout: str = "NCHW",
    outputs: Sequence[str] = ("logits", "probabilities"),
    custom_domain: str | None = None,
    metadata: dict[str, str] | None = None,
    pad_bytes: int = 0,
) -> onnx.ModelProto:
    """A valid tiny classifier graph, or one that breaks the contract in a chosen way.

    input_dtype: e.g. TensorProto.FLOAT for a float input. layout: "NHWC" declares the
    input as (N, H, W, C). outputs: leave one out to drop it. custom_domain: route the
    logits through an Identity-like op `Scramble` in that domain (needs a custom operator
    library, which the server never loads). metadata: the graph's metadata_props (default:
    what the exporter writes for `manifest_for("tiny", 1, ...)`; {} for none, as in a graph
    not made by our exporter). pad_bytes: add an unused initializer of that many bytes (a
    big file that still loads).
    """
    c, h, w = shape
    dims = ["batch", h, w, c] if layout == "NHWC" else ["batch", c, h, w]
    ks = numpy_helper.from_array(np.arange(num_classes, dtype=np.float32), "ks")
    scale = numpy_helper.from_array(np.array(num_classes - 1, dtype=np.float32), "scale")
    raw = "logits_raw" if custom_domain else "logits"
    nodes = [
        helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["x"], ["m255"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Div", ["m255", "c255"], ["m"]),
        helper.make_node("Unsqueeze", ["m", "axis1"], ["m1"]),
        helper.make_node("Mul", ["m1", "scale"], ["pos"]),
        helper.make_node("Sub", ["pos", "ks"], ["d"]),
        helper.make_node("Mul", ["d", "d"], ["d2"]),
        helper.make_node("Neg", ["d2"], [raw]),
    ]
    opsets = [helper.make_opsetid("", OPSET)]
    if custom_domain:
        nodes.append(helper.make_node("Scramble", [raw], ["logits"], domain=custom_domain))
        opsets.append(helper.make_opsetid(custom_domain, 1))
    nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1))
    inits = [
        ks,
        scale,
        numpy_helper.from_array(np.array(255.0, dtype=np.float32), "c255"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
    ]
    if pad_bytes:
        inits.append(numpy_helper.from_array(np.zeros(pad_bytes, dtype=np.uint8), "pad"))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("images", input_dtype, dims)],
        [
            helper.make_tensor_value_info(o, TensorProto.FLOAT, ["batch", num_classes])
            for o in outputs
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=opsets, producer_name="tests.tiny_models")
    model.ir_version = IR_VERSION
    labels = list(DEFAULT_LABELS[:num_classes]) if num_classes <= 4 else _labels(num_classes)
    if metadata is None:
        metadata = metadata_props(
            Manifest.from_dict(manifest_for("tiny", 1, labels, shape)), "fp32"
        )
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    return model


def exporter_metadata(
    name: str,
    version: int,
    labels: Sequence[str] = DEFAULT_LABELS,
    shape: tuple[int, int, int] = (1, 8, 8),
) -> dict[str, str]:
    """The metadata_props the exporter stamps into model.onnx for `manifest_for(...)`."""
    return metadata_props(Manifest.from_dict(manifest_for(name, version, labels, shape)), "fp32")


def _labels(k: int) -> list[str]:
    return [f"class{i}" for i in range(k)]


def with_external_data(model: onnx.ModelProto, location: str, name: str = "ks") -> None:
    """Mark initializer `name` as stored in external file `location` (bytes not embedded)."""
    tensor = next(t for t in model.graph.initializer if t.name == name)
    length = len(tensor.raw_data) or numpy_helper.to_array(tensor).nbytes
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)


def manifest_for(
    name: str,
    version: int,
    labels: Sequence[str] = DEFAULT_LABELS,
    shape: tuple[int, int, int] = (1, 8, 8),
) -> dict[str, Any]:
    """A manifest.json as trainer.export writes it (files filled in by write_version)."""
    c, h, w = shape
    return {
        "format": "convserve.manifest/1",
        "name": name,
        "version": version,
        "labels": list(labels),
        "input": {
            "name": "images",
            "dtype": "uint8",
            "layout": "NCHW",
            "channels": c,
            "height": h,
            "width": w,
        },
        "outputs": ["logits", "probabilities"],
        "mean": [0.5] * c,
        "std": [0.25] * c,
        "dataset": "tiny",
        "test_accuracy": 1.0,
        "opset": OPSET,
        "exporter": "tests.tiny_models",
        "parity": None,
        "variants": {},
        "rejected_variants": {},
        "insight": None,
        "training": {},
        "created_at": "2026-01-01T00:00:00+00:00",
        "source_commit": "unknown",
        "convserve_version": "0.1.0",
        "files": {},
    }


def write_version(
    root: Path,
    name: str = "tiny",
    version: int = 1,
    *,
    labels: Sequence[str] = DEFAULT_LABELS,
    shape: tuple[int, int, int] = (1, 8, 8),
    model: onnx.ModelProto | None = None,
    model_bytes: bytes | None = None,
    manifest: dict[str, Any] | None = None,
    edit_manifest: Callable[[dict[str, Any]], None] | None = None,
    manifest_text: str | None = None,
    checksum: bool = True,
    extra_files: dict[str, bytes] | None = None,
    symlinks: dict[str, Path] | None = None,
    write_manifest: bool = True,
) -> Path:
    """Write a complete version folder `root/name/version` and return its path.

    By default a valid tiny model whose graph metadata matches its manifest. Hostile knobs:
    `model` (a graph from make_model with its own knobs), `model_bytes` (raw file content,
    e.g. truncated or random bytes), `edit_manifest` (mutate the manifest dict before it is
    written, after files are hashed), `manifest_text` (write exactly this as manifest.json,
    e.g. "" or "{not json"), `checksum=False` (leave `files` empty), `extra_files` (name ->
    bytes written beside the model), `symlinks` (name -> target: a symlink in the folder,
    replacing a file of that name), `write_manifest=False` (no manifest.json at all).
    Written into a hidden temp folder and renamed, as the exporter does, so a polling server
    never sees half a version.
    """
    man = manifest if manifest is not None else manifest_for(name, version, labels, shape)
    if model_bytes is None:
        if model is None:
            model = make_model(
                num_classes=len(labels),
                shape=shape,
                metadata=metadata_props(Manifest.from_dict(man), "fp32"),
            )
        model_bytes = model.SerializeToString()
    mdir = Path(root) / name
    mdir.mkdir(parents=True, exist_ok=True)
    tmp = mdir / f".tmp-{version}"
    tmp.mkdir()
    (tmp / MODEL_FILE).write_bytes(model_bytes)
    for fname, data in (extra_files or {}).items():
        (tmp / fname).write_bytes(data)
    if checksum:
        man["files"] = {MODEL_FILE: hashlib.sha256(model_bytes).hexdigest()}
    if edit_manifest is not None:
        edit_manifest(man)
    text = manifest_text if manifest_text is not None else json.dumps(man, indent=2)
    if write_manifest:
        (tmp / MANIFEST_FILE).write_text(text)
    for fname, target in (symlinks or {}).items():
        (tmp / fname).unlink(missing_ok=True)
        (tmp / fname).symlink_to(target)
    final = mdir / str(version)
    tmp.rename(final)
    return final


def run_tiny(model: onnx.ModelProto, images: np.ndarray) -> list[np.ndarray]:
    """Run a tiny graph in ONNX Runtime on the CPU (for checking the helper itself)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["logits", "probabilities"], {"images": images})
