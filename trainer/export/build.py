"""The export, step by step: a training checkpoint in, a published model version out.

Nothing is published unless every step passes: the ONNX checker, parity with PyTorch on the
whole test set, the insight graph's own parity. Optional variants are measured and kept or
rejected on their own (trainer.export.variants).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from serving import monitor
from serving.contract import (
    INPUT_NAME,
    INSIGHT_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    OUTPUT_NAMES,
    Manifest,
    Stage,
)
from serving.metadata import metadata_props
from trainer import data as datalib
from trainer.export.errors import ExportError
from trainer.export.graph import (
    WithProbabilities,
    WithStages,
    check_graph,
    export_onnx,
    stage_outputs,
    stamp_metadata,
)
from trainer.export.manifest import new_manifest, sha256
from trainer.export.model import load_model, resolve_checkpoint
from trainer.export.parity import (
    EVAL_BATCH,
    PROBABILITY_TOLERANCE,
    EvalImages,
    Outputs,
    check_parity,
    eval_images,
    load_eval_data,
    ort_session,
    torch_outputs,
)
from trainer.export.publish import (
    new_version_folder,
    prepare_model_dir,
    publish,
    write_triton_config,
)
from trainer.export.variants import add_variant
from trainer.models import Classifier
from trainer.recipe import Recipe, recipe_to_dict
from trainer.tta import TTA_VIEWS, WithTTA

log = logging.getLogger("convserve.export")


@dataclass(frozen=True)
class ExportResult:
    version_dir: Path
    manifest: dict[str, Any]  # manifest.json as written


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
    tta: str | None = None,
) -> ExportResult:
    """Export a checkpoint (file or run dir) as `<repository>/<name>/<version>/`.

    `name` defaults to the recipe's export.name, else the recipe name; `version` to the
    highest published version + 1; `tta` (test-time views in the graph, trainer.tta) to the
    recipe's export.tta. Raises ExportError for anything a user can fix.
    """
    if opset < 18:
        raise ExportError(f"opset must be at least 18, got {opset}")
    if tta is not None and tta not in TTA_VIEWS:
        raise ExportError(f"tta must be one of {', '.join(TTA_VIEWS)}, got {tta!r}")
    path = resolve_checkpoint(checkpoint)
    state, recipe, model = load_model(path)
    if tta is not None and tta != recipe.export.tta:  # the manifest records what was built
        recipe = recipe.model_copy(update={"export": recipe.export.model_copy(update={"tta": tta})})
        state = {**state, "recipe": recipe_to_dict(recipe)}
    name = name or recipe.export.name or recipe.name
    model_dir, version = prepare_model_dir(Path(repository), name, version)
    ds = load_eval_data(recipe, state, data_dir)
    log.info("exporting %s as %s version %d", path, name, version)
    tmp = new_version_folder(model_dir, version)
    try:
        manifest = build_version(
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
        publish(tmp, final)
    except OSError as exc:
        raise ExportError(f"could not write {model_dir}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    write_triton_config(model_dir, name, tuple(state["in_shape"]), len(state["classes"]))
    log.info("published %s (test accuracy %.4f)", final, manifest.test_accuracy)
    return ExportResult(final, manifest.to_dict())


def build_version(
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
) -> Manifest:
    """Write model.onnx, the wanted variants and manifest.json into `out`; return the manifest.

    With test-time views (export.tta) model.onnx runs them and the manifest's accuracy is
    theirs; the insight graph (explanations, activation maps) is the plain network."""
    data = eval_images(ds)
    tta = recipe.export.tta
    served = WithTTA(model, tta).eval() if tta != "none" else model
    reference = torch_outputs(served, data.images)
    plain = torch_outputs(model, data.images) if tta != "none" else reference
    model_path = out / MODEL_FILE
    exporter = export_onnx(WithProbabilities(served), model_path, tuple(state["in_shape"]), opset)
    manifest = new_manifest(name, version, state, recipe, data.accuracy(reference), exporter)
    # What the served graph did on the test set: production is compared with it.
    n = len(data.test_labels)
    watch = monitor.profile(reference.logits[:n], reference.probabilities[:n], data.images[:n])
    manifest = replace(manifest, monitoring=watch)
    stamp_metadata(model_path, metadata_props(manifest, "fp32"))
    manifest = replace(manifest, opset=check_graph(model_path))
    manifest = replace(manifest, parity=check_parity(model_path, reference, data))
    for kind in wanted:
        manifest = add_variant(
            out, kind, manifest, ds, data, reference, max_accuracy_drop, recipe.train.seed
        )
    files = [MODEL_FILE, *manifest.variants]
    if insight:
        manifest = replace(manifest, insight=write_insight(out, model, manifest, data, plain))
        files.append(INSIGHT_FILE)
    manifest = replace(manifest, files={f: sha256(out / f) for f in files})
    (out / MANIFEST_FILE).write_text(manifest.to_json())
    return manifest


def write_insight(
    out: Path, model: Classifier, manifest: Manifest, data: EvalImages, reference: Outputs
) -> tuple[Stage, ...]:
    """model.insight.onnx: checked like model.onnx; its logits must match PyTorch's."""
    stages = stage_outputs(model)
    path = out / INSIGHT_FILE
    names = (*OUTPUT_NAMES, *(s.name for s in stages))
    export_onnx(WithStages(model), path, tuple(model.in_shape), manifest.opset, names)
    stamp_metadata(path, metadata_props(manifest, "insight"))
    check_graph(path)
    n = min(len(data.images), EVAL_BATCH)
    got = ort_session(path).run(None, {INPUT_NAME: data.images[:n]})
    diff = float(np.abs(got[1] - reference.probabilities[:n]).max())
    if diff > PROBABILITY_TOLERANCE:
        raise ExportError(f"{INSIGHT_FILE} disagrees with PyTorch: max |delta probability| {diff}")
    return stages
