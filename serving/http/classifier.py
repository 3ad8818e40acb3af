"""convserve.v1's calls over HTTP, for curl, browsers and the try-it page: an image file as
the body in, the data plane, JSON out (field names as in the protobuf messages' JSON form).

    curl --data-binary @shirt.png http://HOST:8080/v1/models/fashion-mnist/predict?top_k=3
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import numpy as np

from serving.dataplane import Classification, ExplainRequest, Explanation, ModelInfo
from serving.errors import InvalidInput
from serving.images import EncodedImage


def query_int(query: Mapping[str, str], name: str, default: int | None) -> int | None:
    text = query.get(name)
    if text is None or text == "":
        return default
    if not (text.isascii() and text.lstrip("-").isdigit() and len(text) <= 9):
        raise InvalidInput(f"query parameter {name} must be a whole number")
    return int(text)


def image(body: bytes) -> EncodedImage:
    if not body:
        raise InvalidInput("the request body must be an image file (PNG, JPEG, WebP, BMP, GIF)")
    return EncodedImage(body)


def _classes(labels: tuple[str, ...], indices: Any, probabilities: Any) -> list[dict[str, Any]]:
    return [
        {"index": int(i), "label": labels[int(i)], "probability": float(p)}
        for i, p in zip(indices, probabilities, strict=True)
    ]


def classification(c: Classification) -> dict[str, Any]:
    return {
        "model": c.model,
        "version": c.version,
        "predictions": [
            {
                "classes": _classes(c.labels, idx, probs),
                "ood_score": score,
                "out_of_distribution": flagged,
            }
            for idx, probs, score, flagged in zip(
                c.indices.tolist(),
                c.probabilities.tolist(),
                c.ood_scores.tolist(),
                c.ood_flagged.tolist(),
                strict=True,
            )
        ],
    }


def explain_request(query: Mapping[str, str], body: bytes) -> ExplainRequest:
    return ExplainRequest(
        image=image(body),
        patch=query_int(query, "patch_size", 0) or 0,
        stride=query_int(query, "stride", 0) or 0,
        target=query_int(query, "target_class", None),
        stage=query.get("activation_stage", ""),
        render_png=query.get("render_png", "true").lower() not in ("0", "false", "no"),
    )


def _tensor(a: np.ndarray) -> dict[str, Any]:
    a = np.asarray(a, dtype=np.float32)
    return {"shape": list(a.shape), "data": a.ravel()}


def explanation(ex: Explanation) -> dict[str, Any]:
    probs = ex.probabilities
    doc: dict[str, Any] = {
        "model": ex.model,
        "version": ex.version,
        "prediction": {"classes": _classes(ex.labels, ex.ranked, probs[ex.ranked])},
        "heatmap": _tensor(ex.heatmap),
        "target_class": ex.target,
        "forward_passes": ex.forward_passes,
    }
    if ex.overlay_png:
        doc["overlay_png"] = base64.b64encode(ex.overlay_png).decode()
    if ex.activations is not None:
        doc["activations"] = [_tensor(ex.activations)]
    return doc


def model_info(info: ModelInfo) -> dict[str, Any]:
    s = info.spec
    return {
        "name": info.name,
        "version": info.version,
        "versions": list(info.versions),
        "labels": list(info.manifest.labels),
        "input": {
            "name": s.name,
            "dtype": "UINT8",
            "layout": "NCHW",
            "channels": s.channels,
            "height": s.height,
            "width": s.width,
        },
        "execution_provider": info.provider,
        "requested_device": info.requested_device,
        "max_batch_size": info.max_batch_size,
        "test_accuracy": info.manifest.test_accuracy,
        "variants": sorted(info.manifest.variants),
        "activation_stages": list(info.stages),
        "manifest": info.document,
    }
