"""ONNX export: a training checkpoint in, a complete model version folder out.

The version folder is the one contract between training and serving:

    <repository>/<name>/config.pbtxt         Triton-compatible config (rewritten atomically)
    <repository>/<name>/<version>/model.onnx uint8 NCHW `images` -> `logits`, `probabilities`
    <repository>/<name>/<version>/manifest.json
    <repository>/<name>/<version>/model.opt.onnx | model.int8.onnx | model.fp16.onnx (optional)
    <repository>/<name>/<version>/model.insight.onnx  the same network with every conv stage's
                                             activation maps as extra outputs (for Explain
                                             and reports; model.onnx stays one clean pass)

The graph is self-contained: its first module (`trainer.models.Normalize`) turns raw pixels
0..255 into normalised floats and its last op is the softmax, so clients never normalise.

manifest.json keys (the serving code reads exactly these):
    format ("convserve.manifest/1"), name, version (int), labels, input {name, dtype, layout,
    channels, height, width}, outputs, mean, std, dataset, test_accuracy (fraction, 0..1),
    opset, exporter ("dynamo" | "torchscript"), parity, variants {filename: {...}},
    rejected_variants {filename: {..., reason}}, insight (null, or {file, stages: [{name,
    layer, kind, shape [C, H, W], receptive_field, jump, start}]}: the analytic plan of each
    extra output of model.insight.onnx), training (the checkpoint's recipe), created_at
    (UTC ISO-8601), source_commit, convserve_version, files {filename: sha256}.
  parity: samples, test_samples, max_abs_diff_probability, max_abs_diff_logit,
    argmax_agreement, torch_test_accuracy, ort_test_accuracy, tolerance_probability,
    execution_provider.
  variants[filename]: kind ("optimized" | "int8" | "fp16"), how it was made (kind-specific),
    test_accuracy, accuracy_drop (percentage points below fp32), parity (samples, test_samples,
    max_abs_diff_probability, max_abs_diff_logit, argmax_agreement; against PyTorch).
    model.opt.onnx holds ORT's CPU-EP fusions (com.microsoft ops): load it on the CPU EP.

ONNX metadata_props: every key in METADATA_KEYS is stored as `convserve.<manifest key>`; the
value is the manifest's value, as is for strings and JSON-encoded otherwise. Each file also
carries `convserve.variant` ("fp32", "optimized", "int8" or "fp16"); in a variant file
`convserve.test_accuracy` is that variant's own accuracy.

Checks before anything is published: `onnx.checker.check_model(full_check=True)`, and parity
with PyTorch on the whole test set (topped up with training images to at least
MIN_PARITY_SAMPLES): argmax agreement must be 100% and max |delta probability| at most
PROBABILITY_TOLERANCE, else ExportError. Optional variants are measured on the same images; a
variant that loses more than `max_accuracy_drop` points of test accuracy (or cannot be built,
or, for the fp32 optimised graph, misses the fp32 parity bound) is not written and is listed in
`rejected_variants` instead.

Publishing is atomic: the version is built in a hidden `.tmp-<version>-<random>` folder inside
`<repository>/<name>/`, every file is fsynced, and the folder is renamed to its all-digit name.
A server that considers only all-digit folders never sees a half-written version. A killed
export leaves its hidden temp folder behind; it is safe to delete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from pydantic import ValidationError
from torch import nn

import trainer
from serving.cores import usable_cores
from serving.repository import (
    INSIGHT_FILE,
    MANIFEST_FILE,
    METADATA_PREFIX,
    VARIANT_FILES,
    metadata_props,
)
from trainer import data as datalib
from trainer.atomic import fsync_dir, fsync_tree, umasked, write_atomic
from trainer.checkpoint import CheckpointError, load_checkpoint
from trainer.int8 import quantize_int8
from trainer.models import Classifier, build_model
from trainer.recipe import Recipe, RecipeError, load_recipe_data

log = logging.getLogger("convserve.export")

MANIFEST_FORMAT = "convserve.manifest/1"
INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "probabilities")
MODEL_FILE = VARIANT_FILES["fp32"]
PROBABILITY_TOLERANCE = 1e-4  # max |delta probability| between ORT and PyTorch for fp32
MIN_PARITY_SAMPLES = 2000
TORCHSCRIPT_MAX_OPSET = 20
TRITON_MAX_BATCH_SIZE = 64
EVAL_BATCH = 500
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class ExportError(RuntimeError):
    """An export that cannot be done; the message says why in one line."""


@dataclass(frozen=True)
class ExportResult:
    version_dir: Path
    manifest: dict[str, Any]


# ----------------------------------------------------------------------------- the model
class WithProbabilities(nn.Module):
    """The classifier plus its softmax, so the graph answers both `logits` and `probabilities`."""

    def __init__(self, classifier: Classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.classifier(images)
        return logits, torch.softmax(logits, dim=1)


class WithStages(nn.Module):
    """The classifier's outputs plus every conv stage's activation maps (model.insight.onnx)."""

    def __init__(self, classifier: Classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, maps = self.classifier.forward_with_stages(images)
        return (logits, torch.softmax(logits, dim=1), *maps)


def stage_outputs(model: Classifier) -> list[dict[str, Any]]:
    """The insight graph's extra outputs, in order, with their analytic plan rows."""
    return [
        {
            "name": f"stage{r.index}_{r.kind}",
            "layer": r.index,
            "kind": r.kind,
            "shape": list(r.shape),
            "receptive_field": r.rf,
            "jump": r.jump,
            "start": r.start,
        }
        for r in model.rows
        if r.is_stage
    ]


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file as given; for a run dir, its best checkpoint (else its last)."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.exists():
        raise ExportError(f"checkpoint {p} not found")
    candidates = [p / "checkpoints" / "best.pt", p / "checkpoints" / "last.pt"]
    candidates += [p / "best.pt", p / "last.pt"]
    for c in candidates:
        if c.is_file():
            return c
    raise ExportError(f"no checkpoint in {p} (looked for checkpoints/best.pt and last.pt)")


def load_model(checkpoint: Path) -> tuple[dict[str, Any], Recipe, Classifier]:
    """Read a checkpoint and rebuild its eval model (eval mode, fp32, strict weights)."""
    try:
        state = load_checkpoint(checkpoint)
    except CheckpointError as exc:
        raise ExportError(str(exc)) from None
    needed = ("recipe", "eval_model", "classes", "in_shape", "mean", "std")
    missing = [k for k in needed if not isinstance(state, dict) or k not in state]
    if missing:
        raise ExportError(f"{checkpoint} is not a convserve training checkpoint (no {missing})")
    try:
        recipe = Recipe.model_validate(state["recipe"])
        model = build_model(
            recipe.model,
            tuple(state["in_shape"]),
            len(state["classes"]),
            state["mean"],
            state["std"],
        )
    except (ValidationError, RecipeError) as exc:
        raise ExportError(
            f"{checkpoint}: its recipe cannot build a model: {_first_line(exc)}"
        ) from None
    _load_weights(model, state["eval_model"], checkpoint)
    return state, recipe, model.eval()


def _load_weights(model: nn.Module, weights: dict[str, torch.Tensor], checkpoint: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    resized = sorted(
        k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape
    )
    if missing or unexpected or resized:
        parts = [
            f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for label, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("wrong shape", resized),
            )
            if keys
        ]
        raise ExportError(
            f"{checkpoint}: weights do not match the model its recipe describes "
            f"({'; '.join(parts)})"
        )
    model.load_state_dict(weights, strict=True)


def export_onnx(
    model: nn.Module,
    path: Path,
    in_shape: tuple[int, int, int],
    opset: int,
    output_names: tuple[str, ...] = OUTPUT_NAMES,
) -> str:
    """Write `model` (uint8 images -> `output_names`) to `path` with a dynamic batch.

    Tries the dynamo exporter; on failure logs why and retries with the TorchScript exporter
    (opset at most TORCHSCRIPT_MAX_OPSET). Returns the exporter used.
    """
    model = model.eval()
    example = torch.zeros((2, *in_shape), dtype=torch.uint8)  # batch 2: 1 would be specialised
    names = {"input_names": [INPUT_NAME], "output_names": list(output_names)}
    try:
        with warnings.catch_warnings():
            # torch.export's own use of a deprecated pytree API; nothing a user can act on
            warnings.filterwarnings("ignore", ".*LeafSpec", FutureWarning)
            torch.onnx.export(
                model,
                (example,),
                path,
                dynamo=True,
                external_data=False,  # torch 2.13 otherwise writes weights to model.onnx.data
                opset_version=opset,
                dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch", min=1)}},
                verbose=False,
                **names,
            )
        return "dynamo"
    except Exception as exc:  # whatever dynamo cannot do, the older exporter may
        dynamo_error = _first_line(exc)
    ts_opset = min(opset, TORCHSCRIPT_MAX_OPSET)
    log.warning(
        "dynamo exporter failed (%s); retrying with TorchScript, opset %d", dynamo_error, ts_opset
    )
    try:
        with warnings.catch_warnings():  # we know it is the legacy exporter: we just said so
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model,
                (example,),
                path,
                dynamo=False,
                opset_version=ts_opset,
                dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *output_names)},
                **names,
            )
    except Exception as exc:
        raise ExportError(
            f"both ONNX exporters failed: dynamo: {dynamo_error}; TorchScript: {_first_line(exc)}"
        ) from exc
    return "torchscript"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ----------------------------------------------------------------------------- provenance
def source_commit() -> str:
    """The convserve source commit (`-dirty` if the work tree has changes), else "unknown"."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        out = subprocess.run(
            ["git", "-C", str(here), *args], capture_output=True, text=True, timeout=10
        )
        if out.returncode != 0:
            raise OSError(out.stderr)
        return out.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain"))
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def stamp_metadata(path: Path, props: dict[str, str]) -> None:
    """Replace the convserve.* metadata_props of the ONNX file at `path` (others are kept)."""
    model = onnx.load(path)
    keep = [(p.key, p.value) for p in model.metadata_props if not p.key.startswith(METADATA_PREFIX)]
    del model.metadata_props[:]
    for key, value in [*keep, *props.items()]:
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, path)


# ----------------------------------------------------------------------------- evaluation
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


# ----------------------------------------------------------------------------- variants
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
    """Static INT8 (QDQ, per-channel) calibrated on training images; trainer.int8 says which
    ops stay float and why."""
    return quantize_int8(src, dst, data.train.images, seed)


def fp16_variant(src: Path, dst: Path, data: datalib.Dataset, seed: int) -> dict[str, Any]:
    """Float16 weights and activations; uint8 in and float32 out as before (keep_io_types)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(src), keep_io_types=True), dst)
    return {"converter": "onnxruntime.transformers.float16", "keep_io_types": True}


VARIANTS: dict[str, tuple[str, Callable[..., dict[str, Any]]]] = {
    "optimized": ("model.opt.onnx", optimized_variant),
    "int8": ("model.int8.onnx", int8_variant),
    "fp16": ("model.fp16.onnx", fp16_variant),
}


# ----------------------------------------------------------------------------- repository
def versions(model_dir: Path) -> list[int]:
    """Published versions: the all-digit folder names (hidden temp folders never count)."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit() and p.is_dir())


def triton_config(name: str, in_shape: tuple[int, int, int], num_classes: int) -> str:
    """A Triton model config for the ONNX Runtime backend with server-side batching."""
    dims = ", ".join(str(d) for d in in_shape)
    outputs = ",\n".join(
        f'  {{\n    name: "{o}"\n    data_type: TYPE_FP32\n    dims: [ {num_classes} ]\n  }}'
        for o in OUTPUT_NAMES
    )
    return (
        f'name: "{name}"\n'
        'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {TRITON_MAX_BATCH_SIZE}\n"
        "input [\n"
        f'  {{\n    name: "{INPUT_NAME}"\n    data_type: TYPE_UINT8\n    format: FORMAT_NCHW\n'
        f"    dims: [ {dims} ]\n  }}\n"
        "]\n"
        f"output [\n{outputs}\n]\n"
        "dynamic_batching {\n  max_queue_delay_microseconds: 500\n}\n"
    )


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _prepare_model_dir(repository: Path, name: str, version: int | None) -> tuple[Path, int]:
    if not _NAME_RE.fullmatch(name) or name.isdigit():
        raise ExportError(
            f"model name {name!r} must be letters, digits, '.', '_' or '-' (not only digits)"
        )
    model_dir = repository / name
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=model_dir):  # modes do not stop root: really try
            pass
    except OSError as exc:
        raise ExportError(
            f"cannot write to model repository {repository}: {exc.strerror or exc}"
        ) from None
    if version is None:
        return model_dir, max(versions(model_dir), default=0) + 1
    if version < 1:
        raise ExportError(f"version must be a positive integer, got {version}")
    if (model_dir / str(version)).exists():
        raise ExportError(f"{model_dir / str(version)} already exists; choose another --version")
    return model_dir, version


def _publish(tmp: Path, final: Path) -> None:
    os.chmod(tmp, umasked(0o777))  # readable by a server running as another user
    fsync_tree(tmp)
    if final.exists():
        raise ExportError(f"{final} appeared while exporting; nothing was overwritten")
    try:
        os.rename(tmp, final)  # atomic: the all-digit name appears complete or not at all
    except OSError as exc:  # ENOTEMPTY/EEXIST: another export published it first
        raise ExportError(f"could not publish {final}: {exc.strerror or exc}") from None
    fsync_dir(final.parent)


# ----------------------------------------------------------------------------- the export
def _load_eval_data(recipe: Recipe, state: dict[str, Any], data_dir: str | None) -> datalib.Dataset:
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


def _eval_images(ds: datalib.Dataset) -> EvalImages:
    extra = max(0, MIN_PARITY_SAMPLES - len(ds.test))
    images = ds.test.images
    if extra:
        images = np.concatenate([images, ds.train.images[:extra]])
    return EvalImages(np.ascontiguousarray(images), ds.test.labels)


def export_checkpoint(
    checkpoint: str | os.PathLike,
    repository: str | os.PathLike,
    name: str | None = None,
    *,
    version: int | None = None,
    opset: int = 18,
    optimize: bool = True,
    int8: bool = False,
    fp16: bool = False,
    max_accuracy_drop: float = 0.5,
    data_dir: str | None = None,
    insight: bool = True,
) -> ExportResult:
    """Export a checkpoint (file or run dir) as `<repository>/<name>/<version>/`.

    `name` defaults to the recipe's export.name, else the recipe name; `version` to the
    highest published version + 1. Raises ExportError for anything a user can fix.
    """
    if opset < 18:
        raise ExportError(f"opset must be at least 18, got {opset}")
    path = resolve_checkpoint(checkpoint)
    state, recipe, model = load_model(path)
    name = name or recipe.export.name or recipe.name
    model_dir, version = _prepare_model_dir(Path(repository), name, version)
    ds = _load_eval_data(recipe, state, data_dir)
    log.info("exporting %s as %s version %d", path, name, version)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=model_dir))
    try:
        manifest = _build_version(
            tmp,
            model=model,
            state=state,
            recipe=recipe,
            ds=ds,
            name=name,
            version=version,
            opset=opset,
            wanted=[k for k, on in (("optimized", optimize), ("int8", int8), ("fp16", fp16)) if on],
            max_accuracy_drop=max_accuracy_drop,
            insight=insight,
        )
        final = model_dir / str(version)
        _publish(tmp, final)
    except OSError as exc:
        raise ExportError(f"could not write {model_dir}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    try:
        config = triton_config(name, tuple(state["in_shape"]), len(state["classes"]))
        write_atomic(model_dir / "config.pbtxt", config, mode=0o666)
    except OSError as exc:
        raise ExportError(f"could not write {model_dir / 'config.pbtxt'}: {exc}") from None
    log.info("published %s (test accuracy %.4f)", final, manifest["test_accuracy"])
    return ExportResult(final, manifest)


def _build_version(
    out: Path,
    *,
    model: Classifier,
    state: dict[str, Any],
    recipe: Recipe,
    ds: datalib.Dataset,
    name: str,
    version: int,
    opset: int,
    wanted: list[str],
    max_accuracy_drop: float,
    insight: bool = True,
) -> dict[str, Any]:
    """Write model.onnx, the wanted variants and manifest.json into `out`; return the manifest."""
    data = _eval_images(ds)
    reference = torch_outputs(model, data.images)
    model_path = out / MODEL_FILE
    exporter = export_onnx(WithProbabilities(model), model_path, tuple(state["in_shape"]), opset)
    manifest = _base_manifest(name, version, state, recipe, data.accuracy(reference), exporter)
    stamp_metadata(model_path, metadata_props(manifest, "fp32"))
    manifest["opset"] = _check_graph(model_path)
    manifest["parity"] = _check_parity(model_path, reference, data)
    for kind in wanted:
        _add_variant(out, kind, manifest, ds, data, reference, max_accuracy_drop, recipe.train.seed)
    files = [MODEL_FILE, *manifest["variants"]]
    if insight:
        manifest["insight"] = _write_insight(out, model, manifest, data, reference)
        files.append(INSIGHT_FILE)
    manifest["files"] = {f: sha256(out / f) for f in files}
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _base_manifest(
    name: str,
    version: int,
    state: dict[str, Any],
    recipe: Recipe,
    test_accuracy: float,
    exporter: str,
) -> dict[str, Any]:
    """The manifest in its final key order; opset, parity, variants and files come later."""
    c, h, w = state["in_shape"]
    return {
        "format": MANIFEST_FORMAT,
        "name": name,
        "version": version,
        "labels": list(state["classes"]),
        "input": {
            "name": INPUT_NAME,
            "dtype": "uint8",
            "layout": "NCHW",
            "channels": c,
            "height": h,
            "width": w,
        },
        "outputs": list(OUTPUT_NAMES),
        "mean": [float(m) for m in state["mean"]],
        "std": [float(s) for s in state["std"]],
        "dataset": recipe.data.name,
        "test_accuracy": test_accuracy,  # PyTorch's; parity guarantees ORT's is the same
        "opset": None,
        "exporter": exporter,
        "parity": None,
        "variants": {},
        "rejected_variants": {},
        "insight": None,
        "training": state["recipe"],
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source_commit": source_commit(),
        "convserve_version": trainer.__version__,
        "files": {},
    }


def _check_parity(model_path: Path, reference: Outputs, data: EvalImages) -> dict[str, Any]:
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


def _check_graph(path: Path) -> int:
    """Run the full ONNX checker and refuse external data; returns the default-domain opset."""
    model = onnx.load(path)
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"the exported graph fails onnx.checker: {_first_line(exc)}") from None
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        raise ExportError("the exported graph keeps its weights in external data")
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _add_variant(
    out: Path,
    kind: str,
    manifest: dict[str, Any],
    ds: datalib.Dataset,
    data: EvalImages,
    reference: Outputs,
    max_accuracy_drop: float,
    seed: int,
) -> None:
    """Build, measure and publish (or reject) one variant; records it in the manifest."""
    filename, build = VARIANTS[kind]
    dst = out / filename
    try:
        extra = build(out / MODEL_FILE, dst, ds, seed)
        parity = compare(reference, ort_outputs(dst, data.images), data)
    except Exception as exc:  # a variant is optional: failing to build it rejects only it
        dst.unlink(missing_ok=True)
        reason = " ".join(f"could not build or run it: {exc}".split())
        log.warning("%s variant rejected: %s", kind, reason)
        manifest["rejected_variants"][filename] = {"kind": kind, "reason": reason}
        return
    fp32_accuracy = manifest["test_accuracy"]
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
        manifest["rejected_variants"][filename] = {
            **entry,
            "max_accuracy_drop": max_accuracy_drop,
            "reason": reason,
        }
        return
    stamp_metadata(dst, metadata_props({**manifest, "test_accuracy": accuracy}, kind))
    manifest["variants"][filename] = entry
    log.info(
        "%s variant %s: test accuracy %.4f (accuracy drop %.2f points)",
        kind,
        filename,
        accuracy,
        entry["accuracy_drop"],
    )


def _write_insight(
    out: Path, model: Classifier, manifest: dict[str, Any], data: EvalImages, reference: Outputs
) -> dict[str, Any]:
    """model.insight.onnx: checked like model.onnx; its logits must match PyTorch's."""
    stages = stage_outputs(model)
    path = out / INSIGHT_FILE
    names = (*OUTPUT_NAMES, *(s["name"] for s in stages))
    export_onnx(WithStages(model), path, tuple(model.in_shape), manifest["opset"], names)
    stamp_metadata(path, metadata_props(manifest, "insight"))
    _check_graph(path)
    n = min(len(data.images), EVAL_BATCH)
    got = ort_session(path).run(None, {INPUT_NAME: data.images[:n]})
    diff = float(np.abs(got[1] - reference.probabilities[:n]).max())
    if diff > PROBABILITY_TOLERANCE:
        raise ExportError(f"{INSIGHT_FILE} disagrees with PyTorch: max |delta probability| {diff}")
    return {"file": INSIGHT_FILE, "stages": stages}
