"""Between the caller's types and convserve.v1 messages: images (paths, bytes, PIL images,
numpy arrays) into requests, responses into Prediction, Explanation and model-info dicts."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from serving.proto.convserve.v1 import classifier_pb2 as pb


@dataclass(frozen=True)
class ClassScore:
    index: int
    label: str
    probability: float


@dataclass(frozen=True)
class Prediction:
    classes: tuple[ClassScore, ...]
    model: str
    version: int
    # The server's out-of-distribution score (0..1, higher is less like the test set) and
    # whether it is above the version's threshold (the test set's 95th percentile).
    ood_score: float = 0.0
    out_of_distribution: bool = False

    @property
    def label(self) -> str:
        return self.classes[0].label

    @property
    def index(self) -> int:
        return self.classes[0].index

    @property
    def probability(self) -> float:
        return self.classes[0].probability


@dataclass(frozen=True)
class Explanation:
    """What Classifier.Explain answered for one image."""

    model: str
    version: int
    classes: tuple[ClassScore, ...]  # every class, most probable first
    target_class: int  # the class the heatmap tracks
    heatmap: np.ndarray  # (rows, cols) float32: probability drop when each patch is hidden
    forward_passes: int
    overlay_png: bytes  # empty unless render_png was asked for
    activations: np.ndarray | None  # (C, H, W) float32 of activation_stage, if asked

    @property
    def label(self) -> str:
        return self.classes[0].label


# ----------------------------------------------------------------------------- requests
def to_image(image: Any) -> pb.Image:
    """A path, bytes, PIL image or numpy array -> the wire Image message."""
    if isinstance(image, pb.Image):
        return image
    if isinstance(image, str | Path):
        return pb.Image(encoded=Path(image).read_bytes())
    if isinstance(image, bytes | bytearray | memoryview):
        return pb.Image(encoded=bytes(image))
    if isinstance(image, np.ndarray):
        return _array_image(image)
    if hasattr(image, "save") and hasattr(image, "mode"):  # a PIL image
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return pb.Image(encoded=buf.getvalue())
    raise TypeError(f"cannot send {type(image).__name__} as an image")


def _array_image(a: np.ndarray) -> pb.Image:
    if a.ndim == 3 and a.shape[0] not in (1, 3) and a.shape[-1] in (1, 3):
        a = a.transpose(2, 0, 1)  # HWC -> CHW
    if a.ndim not in (2, 3):
        raise ValueError(f"an image array must be 2-D or 3-D, got shape {a.shape}")
    if a.dtype == np.uint8:
        dtype = pb.UINT8
    elif a.dtype == np.float32:
        dtype = pb.FLOAT32
        a = a.astype("<f4", copy=False)
    else:
        raise ValueError(f"image arrays must be uint8 or float32, got {a.dtype}")
    a = np.ascontiguousarray(a)
    return pb.Image(tensor=pb.Tensor(dtype=dtype, shape=list(a.shape), data=a.tobytes()))


def predict_request(
    images: Sequence[Any], top_k: int, model: str, version: int
) -> pb.PredictRequest:
    return pb.PredictRequest(
        model=model, version=version, top_k=top_k, images=[to_image(i) for i in images]
    )


def explain_request(image: Any, model: str, version: int, **kw: Any) -> pb.ExplainRequest:
    target = kw.pop("target_class", None)
    return pb.ExplainRequest(
        model=model,
        version=version,
        image=to_image(image),
        target_class=target or 0,
        has_target_class=target is not None,
        **kw,
    )


# ----------------------------------------------------------------------------- responses
def to_predictions(resp: pb.PredictResponse) -> list[Prediction]:
    return [
        Prediction(
            tuple(ClassScore(c.index, c.label, c.probability) for c in p.classes),
            resp.model,
            resp.version,
            p.ood_score,
            p.out_of_distribution,
        )
        for p in resp.predictions
    ]


def _tensor(t: pb.Tensor) -> np.ndarray:
    return np.frombuffer(t.data, dtype="<f4").reshape(tuple(t.shape)).copy()


def to_explanation(resp: pb.ExplainResponse) -> Explanation:
    return Explanation(
        model=resp.model,
        version=resp.version,
        classes=tuple(ClassScore(c.index, c.label, c.probability) for c in resp.prediction.classes),
        target_class=resp.target_class,
        heatmap=_tensor(resp.heatmap),
        forward_passes=resp.forward_passes,
        overlay_png=resp.overlay_png,
        activations=_tensor(resp.activations[0]) if resp.activations else None,
    )


def to_model_info(info: pb.ModelInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "version": info.version,
        "versions": list(info.versions),
        "labels": list(info.labels),
        "input": {
            "channels": info.input.channels,
            "height": info.input.height,
            "width": info.input.width,
        },
        "execution_provider": info.execution_provider,
        "requested_device": info.requested_device,
        "max_batch_size": info.max_batch_size,
        "manifest": json.loads(info.manifest_json or "{}"),
    }
