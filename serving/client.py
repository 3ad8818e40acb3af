"""A Python client for convserve.v1.Classifier and the `cnn-predict` command.

    from serving.client import Client
    with Client("localhost:50051") as c:
        for p in c.predict(["shoe.png", "shirt.png"], top_k=3):
            print(p.label, p.probability)

Images may be file paths, encoded bytes, PIL images or numpy arrays (uint8 or float32
pixel values 0..255, shaped (H, W), (C, H, W) or (H, W, C)).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from serving.proto.convserve.v1 import classifier_pb2 as pb
from serving.proto.convserve.v1 import classifier_pb2_grpc as pb_grpc

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}


class PredictionError(Exception):
    """A failed RPC: `code` is the grpc.StatusCode, `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


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

    @property
    def label(self) -> str:
        return self.classes[0].label

    @property
    def index(self) -> int:
        return self.classes[0].index

    @property
    def probability(self) -> float:
        return self.classes[0].probability


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


def _prediction(resp: pb.PredictResponse) -> list[Prediction]:
    return [
        Prediction(
            tuple(ClassScore(c.index, c.label, c.probability) for c in p.classes),
            resp.model,
            resp.version,
        )
        for p in resp.predictions
    ]


class Client:
    """Synchronous client. `timeout` is each call's deadline in seconds."""

    def __init__(self, target: str, *, timeout: float | None = 30.0):
        self.target = target
        self.timeout = timeout
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.ClassifierStub(self.channel)

    def predict(
        self,
        images: Sequence[Any],
        top_k: int = 1,
        *,
        model: str = "",
        version: int = 0,
        timeout: float | None = None,
    ) -> list[Prediction]:
        req = pb.PredictRequest(
            model=model, version=version, top_k=top_k, images=[to_image(i) for i in images]
        )
        try:
            resp = self.stub.Predict(req, timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            raise PredictionError(exc.code(), exc.details()) from None
        return _prediction(resp)

    def model_info(self, model: str = "", version: int = 0) -> dict[str, Any]:
        try:
            info = self.stub.GetModelInfo(
                pb.ModelInfoRequest(model=model, version=version), timeout=self.timeout
            )
        except grpc.RpcError as exc:
            raise PredictionError(exc.code(), exc.details()) from None
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
            "manifest": json.loads(info.manifest_json or "{}"),
        }

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- cnn-predict
def find_images(paths: Iterable[str]) -> list[Path]:
    """Files as given, and image files under directories (recursively, sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.exists():
            out.append(p)
        else:
            raise FileNotFoundError(f"no such file or directory: {p}")
    return out


def _truth(path: Path, labels: Sequence[str]) -> int | None:
    """A folder named after a class (its index, or its label with '/' as '-') is the truth."""
    name = path.parent.name
    for i, label in enumerate(labels):
        if name == str(i) or name == label.replace("/", "-"):
            return i
    return None


def predict_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cnn-predict", description="Classify images with a server.")
    p.add_argument("--server", default="localhost:50051", help="HOST:PORT of cnn-serve")
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    p.add_argument("--batch-size", type=int, default=64, help="images per request")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    p.add_argument("--model", default="", help="model name (when the server serves several)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or directories")
    args = p.parse_args(argv)
    try:
        files = find_images(args.paths)
    except FileNotFoundError as exc:
        print(f"cnn-predict: {exc}", file=sys.stderr)
        return 2
    if not files:
        print("cnn-predict: no images found", file=sys.stderr)
        return 2
    correct = known = 0
    with Client(args.server, timeout=args.timeout) as client:
        try:
            labels = client.model_info(args.model)["labels"]
            for start in range(0, len(files), args.batch_size):
                chunk = files[start : start + args.batch_size]
                preds = client.predict(chunk, args.top_k, model=args.model)
                for f, pred in zip(chunk, preds, strict=True):
                    _print(f, pred, args.json)
                    truth = _truth(f, labels)
                    if truth is not None:
                        known += 1
                        correct += pred.index == truth
        except PredictionError as exc:
            print(f"cnn-predict: {exc}", file=sys.stderr)
            return 1
    if known:
        print(
            f"accuracy {correct / known:.4f} ({correct}/{known} images whose folder names "
            "their class)",
            file=sys.stderr,
        )
    return 0


def _print(path: Path, pred: Prediction, as_json: bool) -> None:
    if as_json:
        print(
            json.dumps(
                {
                    "file": str(path),
                    "model": pred.model,
                    "version": pred.version,
                    "classes": [
                        {"index": c.index, "label": c.label, "probability": round(c.probability, 6)}
                        for c in pred.classes
                    ],
                }
            )
        )
    else:
        others = ", ".join(f"{c.label} {c.probability:.3f}" for c in pred.classes[1:])
        print(f"{path}\t{pred.label}\t{pred.probability:.4f}" + (f"\t({others})" if others else ""))


if __name__ == "__main__":
    sys.exit(predict_main())
