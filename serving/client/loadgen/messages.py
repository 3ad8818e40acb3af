"""The bytes cnn-bench sends and the first answers it checks: synthetic images, serialised
Predict and KServe V2 ModelInfer requests, and Triton's ModelStreamInfer answer."""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence

import numpy as np

from serving.client.loadgen.config import LoadConfig
from serving.proto.convserve.v1 import classifier_pb2 as pb
from serving.proto.inference import grpc_predict_v2_pb2 as v2

DISTINCT_REQUESTS = 16  # requests cycle through this many different images


def synthetic_images(n: int, shape: Sequence[int], seed: int) -> np.ndarray:
    """`n` deterministic uint8 images of `shape` (C, H, W): smooth blobs, not pure noise,
    so PNG sizes are realistic."""
    rng = np.random.default_rng(seed)
    c, h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.empty((n, c, h, w), np.uint8)
    for i in range(n):
        cy, cx = rng.uniform(0.2, 0.8, 2) * (h, w)
        r = rng.uniform(0.2, 0.45) * min(h, w)
        blob = np.clip(255 * (1 - np.hypot(yy - cy, xx - cx) / r), 0, 255)
        noise = rng.integers(0, 40, (c, h, w))
        out[i] = np.clip(blob[None] + noise, 0, 255).astype(np.uint8)
    return out


def _png(image_chw: np.ndarray) -> bytes:
    from PIL import Image

    arr = image_chw[0] if image_chw.shape[0] == 1 else image_chw.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def predict_request(images: np.ndarray, cfg: LoadConfig) -> pb.PredictRequest:
    """A convserve Predict request holding `images` (N, C, H, W) uint8."""
    if cfg.png:
        wire = [pb.Image(encoded=_png(x)) for x in images]
    else:
        wire = [
            pb.Image(tensor=pb.Tensor(dtype=pb.UINT8, shape=list(x.shape), data=x.tobytes()))
            for x in images
        ]
    return pb.PredictRequest(model=cfg.model, top_k=cfg.top_k, images=wire)


def infer_request(images: np.ndarray, cfg: LoadConfig) -> v2.ModelInferRequest:
    """A KServe V2 ModelInfer request: one UINT8 tensor (N, C, H, W) in raw_input_contents."""
    req = v2.ModelInferRequest(model_name=cfg.model)
    req.inputs.add(name=cfg.v2_input, datatype="UINT8", shape=list(images.shape))
    req.outputs.add(name=cfg.v2_output)
    req.raw_input_contents.append(np.ascontiguousarray(images).tobytes())
    return req


def build_requests(cfg: LoadConfig) -> list[bytes]:
    """DISTINCT_REQUESTS serialised requests of `images_per_request` images each."""
    n = cfg.images_per_request
    imgs = synthetic_images(DISTINCT_REQUESTS * n, cfg.shape, cfg.seed)
    make = infer_request if cfg.v2 else predict_request
    return [
        make(imgs[i * n : (i + 1) * n], cfg).SerializeToString() for i in range(DISTINCT_REQUESTS)
    ]


@functools.cache
def _stream_infer_response() -> type:
    """Triton's ModelStreamInferResponse {string error_message = 1; ModelInferResponse
    infer_response = 2}: not in the KServe V2 proto we ship, so declared here (the inner
    response as bytes, which is wire-compatible) in a pool of its own."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    f = descriptor_pb2.FileDescriptorProto(
        name="convserve_loadgen/stream_infer.proto", package="convserve_loadgen", syntax="proto3"
    )
    m = f.message_type.add(name="ModelStreamInferResponse")
    fd = descriptor_pb2.FieldDescriptorProto
    m.field.add(name="error_message", number=1, type=fd.TYPE_STRING, label=fd.LABEL_OPTIONAL)
    m.field.add(name="infer_response", number=2, type=fd.TYPE_BYTES, label=fd.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("convserve_loadgen.ModelStreamInferResponse")
    )


def parse_stream_infer(data: bytes) -> tuple[str, v2.ModelInferResponse]:
    """A ModelStreamInfer answer -> (error message, the ModelInferResponse)."""
    msg = _stream_infer_response().FromString(data)
    return msg.error_message, v2.ModelInferResponse.FromString(msg.infer_response)


def check_response(data: bytes, cfg: LoadConfig) -> None:
    """The first answer of each process is parsed: it must hold one result per image."""
    n = cfg.images_per_request
    if cfg.mode == "v2-stream":
        resp = parse_stream_infer(data)[1]
        got = resp.outputs[0].shape[0] if resp.outputs else 0
    elif cfg.mode == "v2":
        resp = v2.ModelInferResponse.FromString(data)
        got = resp.outputs[0].shape[0] if resp.outputs else 0
    else:
        got = len(pb.PredictResponse.FromString(data).predictions)
    if got != n:
        raise RuntimeError(f"the server answered {got} results for {n} images")
