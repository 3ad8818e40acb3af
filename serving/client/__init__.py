"""A Python client for convserve.v1.Classifier, and the `cnn-predict` and `cnn-bench` commands.

    from serving.client import Client
    with Client("localhost:50051") as c:
        for p in c.predict(["shoe.png", "shirt.png"], top_k=3):
            print(p.label, p.probability)

Images may be file paths, encoded bytes, PIL images or numpy arrays (uint8 or float32
pixel values 0..255, shaped (H, W), (C, H, W) or (H, W, C)).

Modules: `clients` (Client, AsyncClient), `retry` (the retry policy, PredictionError),
`convert` (images -> requests, responses -> Prediction/Explanation), `channel` (targets,
load balancing, TLS, tokens), `tracecontext` (the caller's trace context, sent with each
call), `access` (the commands' TLS and token settings), `predict` (cnn-predict), `loadgen`
(cnn-bench).
"""

from __future__ import annotations

import importlib
from typing import Any

from serving.client.channel import (
    SCHEMES,
    TLS,
    bearer_metadata,
    channel_options,
    channel_target,
    connect,
    default_load_balancing,
    read_token_file,
)
from serving.client.clients import AsyncClient, Client
from serving.client.convert import ClassScore, Explanation, Prediction, to_image
from serving.client.retry import RETRYABLE, PredictionError, Retry

# The commands (cnn-predict's CLI and its settings, tqdm) load when a command's names are
# first used, not with every `import serving.client` a library user makes.
_LAZY = {
    "predict_main": "serving.client.predict",
    "find_images": "serving.client.predict",
    "IMAGE_SUFFIXES": "serving.client.predict",
    "ClientAccess": "serving.client.access",
}

__all__ = [
    "RETRYABLE",
    "SCHEMES",
    "TLS",
    "AsyncClient",
    "ClassScore",
    "Client",
    "Explanation",
    "Prediction",
    "PredictionError",
    "Retry",
    "bearer_metadata",
    "channel_options",
    "channel_target",
    "connect",
    "default_load_balancing",
    "read_token_file",
    "to_image",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
