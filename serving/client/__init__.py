"""A Python client for convserve.v1.Classifier and the `cnn-predict` command.

    from serving.client import Client
    with Client("localhost:50051") as c:
        for p in c.predict(["shoe.png", "shirt.png"], top_k=3):
            print(p.label, p.probability)

Images may be file paths, encoded bytes, PIL images or numpy arrays (uint8 or float32
pixel values 0..255, shaped (H, W), (C, H, W) or (H, W, C)).

Modules: `clients` (Client, AsyncClient), `retry` (the retry policy, PredictionError),
`convert` (images -> requests, responses -> Prediction/Explanation), `channel` (targets,
load balancing, TLS, tokens), `access` (the commands' TLS and token flags), `predict`
(cnn-predict).
"""

from __future__ import annotations

from serving.client.access import access_from_args, add_access_options
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
from serving.client.predict import IMAGE_SUFFIXES, find_images, predict_main
from serving.client.retry import RETRYABLE, PredictionError, Retry

__all__ = [
    "IMAGE_SUFFIXES",
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
    "access_from_args",
    "add_access_options",
    "bearer_metadata",
    "channel_options",
    "channel_target",
    "connect",
    "default_load_balancing",
    "find_images",
    "predict_main",
    "read_token_file",
    "to_image",
]
