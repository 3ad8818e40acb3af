"""The ONNX graph: the network wrapped to answer the contract's outputs, exported with the
dynamo exporter (TorchScript when dynamo fails), stamped with metadata and checked.

The graph is self-contained: its first module (`trainer.models.Normalize`) turns raw pixels
0..255 into normalised floats and its last op is the softmax, so clients never normalise.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from serving.contract import INPUT_NAME, OUTPUT_NAMES, Stage
from serving.metadata import METADATA_PREFIX
from trainer.export.errors import ExportError, first_line
from trainer.models import Classifier

log = logging.getLogger("convserve.export")

TORCHSCRIPT_MAX_OPSET = 20


class WithProbabilities(nn.Module):
    """The classifier plus its softmax, so the graph answers both `logits` and `probabilities`."""

    def __init__(self, classifier: nn.Module):  # a Classifier, or one with test-time views
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


def stage_outputs(model: Classifier) -> tuple[Stage, ...]:
    """The insight graph's extra outputs, in order, with their analytic plan rows."""
    return tuple(
        Stage(
            name=f"stage{r.index}_{r.kind}",
            layer=r.index,
            kind=r.kind,
            shape=r.shape,
            receptive_field=r.rf,
            jump=r.jump,
            start=r.start,
        )
        for r in model.rows
        if r.is_stage
    )


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
        dynamo_error = first_line(exc)
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
            f"both ONNX exporters failed: dynamo: {dynamo_error}; TorchScript: {first_line(exc)}"
        ) from exc
    return "torchscript"


def stamp_metadata(path: Path, props: dict[str, str]) -> None:
    """Replace the convserve.* metadata_props of the ONNX file at `path` (others are kept)."""
    model = onnx.load(path)
    keep = [(p.key, p.value) for p in model.metadata_props if not p.key.startswith(METADATA_PREFIX)]
    del model.metadata_props[:]
    for key, value in [*keep, *props.items()]:
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, path)


def check_graph(path: Path) -> int:
    """Run the full ONNX checker and refuse external data; returns the default-domain opset."""
    model = onnx.load(path)
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"the exported graph fails onnx.checker: {first_line(exc)}") from None
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        raise ExportError("the exported graph keeps its weights in external data")
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
