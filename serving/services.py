"""Thin gRPC servicers: protobuf in, the data plane, protobuf out.

Both wire APIs (convserve.v1.Classifier and the KServe V2 inference.GRPCInferenceService)
call the same core. Core exceptions become gRPC status codes in one table, applied by one
decorator that also counts every RPC by method and status code.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from serving import errors
from serving.codec import InputSpec
from serving.dataplane import DataPlane, EncodedImage, ImageInput, RawTensor
from serving.metrics import Metrics, RequestTimer
from serving.proto.convserve.v1 import classifier_pb2 as pb
from serving.proto.convserve.v1 import classifier_pb2_grpc as pb_grpc
from serving.proto.inference import grpc_predict_v2_pb2 as v2
from serving.proto.inference import grpc_predict_v2_pb2_grpc as v2_grpc
from serving.repository import ModelVersion

log = logging.getLogger("convserve.services")

VERSION = "0.1.0"

# The one table from core errors to gRPC status codes.
STATUS_OF: dict[type[errors.ServingError], grpc.StatusCode] = {
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ModelNotFound: grpc.StatusCode.NOT_FOUND,
    errors.NotReady: grpc.StatusCode.UNAVAILABLE,
    errors.QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.MessageTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Draining: grpc.StatusCode.UNAVAILABLE,
    errors.InferenceFailed: grpc.StatusCode.INTERNAL,
    errors.ModelLoadError: grpc.StatusCode.UNAVAILABLE,
    errors.DeviceUnavailable: grpc.StatusCode.UNAVAILABLE,
}

_DTYPE_NAMES = {pb.UINT8: "uint8", pb.FLOAT32: "float32"}
# UTF-8 bytes of an error message: grpc sends it percent-encoded (up to 3x) in a trailer, and
# clients refuse trailers over 8 KiB.
MAX_DETAILS = 1024


def status_of(exc: errors.ServingError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.INTERNAL


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The client's deadline as a time.monotonic() value (None when it set none)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class Undecodable:
    """A request whose bytes are not a valid message of its type. grpc would answer UNKNOWN
    and log a traceback; the handler answers INVALID_ARGUMENT instead."""

    def __init__(self, reason: str):
        self.reason = reason


def _tolerant(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as exc:
            return Undecodable(f"request is not a valid protobuf message: {exc}")

    return parse


class TolerantRegistration:
    """Stands in for the server in a generated `add_*Servicer_to_server` call so that every
    method's request deserializer returns Undecodable instead of raising."""

    def __init__(self, server: grpc.aio.Server):
        self.server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # added, wrapped, with the registered handlers below

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        wrapped = {
            method: h._replace(request_deserializer=_tolerant(h.request_deserializer))
            for method, h in handlers.items()
        }
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, wrapped),)
        )
        self.server.add_registered_method_handlers(service, wrapped)


class Gate:
    """Whether new work is admitted; closed while draining."""

    def __init__(self) -> None:
        self.open = True


Handler = Callable[..., Awaitable[Any]]


def rpc(method: str) -> Callable[[Handler], Handler]:
    """Map core errors to status codes, count the RPC, observe its latency."""

    def wrap(fn: Handler) -> Handler:
        @functools.wraps(fn)
        async def handler(self: _Servicer, request: Any, context: grpc.aio.ServicerContext):
            timer = RequestTimer(self.metrics, method)
            self.metrics.inflight.inc()
            code = "OK"
            try:
                if not self.gate.open:
                    raise errors.Draining("server is draining; retry on another replica")
                if isinstance(request, Undecodable):
                    raise errors.InvalidInput(request.reason)
                return await fn(self, request, context)
            except errors.ServingError as exc:
                status = status_of(exc)
                code = status.name
                self.metrics.rejected.labels(exc.reason).inc()
                # Clipped: a message quoting a huge client string would overflow the
                # client's metadata limit and reach it as RESOURCE_EXHAUSTED instead.
                await context.abort(status, _clip_utf8(str(exc), MAX_DETAILS))
            except asyncio.CancelledError:
                # The client went away, or its deadline passed while we worked.
                remaining = context.time_remaining()
                expired = remaining is not None and remaining <= 0
                code = "DEADLINE_EXCEEDED" if expired else "CANCELLED"
                self.metrics.rejected.labels(code.lower()).inc()
                raise
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                code = "INTERNAL"
                log.exception("%s failed", method)
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {exc}")
            finally:
                self.metrics.inflight.dec()
                timer.done(code)

        return handler

    return wrap


class _Servicer:
    def __init__(self, plane: DataPlane, metrics: Metrics, gate: Gate, device: str):
        self.plane = plane
        self.metrics = metrics
        self.gate = gate
        self.device = device


# ----------------------------------------------------------------------------- convserve.v1
def _image_inputs(images: Any) -> list[ImageInput]:
    out: list[ImageInput] = []
    for i, img in enumerate(images):
        which = img.WhichOneof("source")
        if which == "encoded":
            out.append(EncodedImage(img.encoded))
        elif which == "tensor":
            t = img.tensor
            dtype = _DTYPE_NAMES.get(t.dtype)
            if dtype is None:
                raise errors.InvalidInput(f"image {i}: tensor dtype must be UINT8 or FLOAT32")
            out.append(RawTensor(dtype, tuple(t.shape), t.data))
        else:
            raise errors.InvalidInput(f"image {i}: neither encoded bytes nor a tensor")
    return out


def _uint8_payloads(images: Any, spec: InputSpec) -> list[bytes] | None:
    """The data of every image when all are UINT8 tensors shaped like the model's input
    ((C, H, W), or (H, W) for one channel), else None: the general path then decodes them
    and words any error."""
    chw = list(spec.shape)
    hw = [spec.height, spec.width] if spec.channels == 1 else chw
    out = []
    for img in images:
        t = img.tensor  # an image that is not a tensor reads as an empty one: dtype 0
        if t.dtype != pb.UINT8:
            return None
        shape = t.shape
        if shape != chw and shape != hw:
            return None
        out.append(t.data)
    return out


def _float_tensor(a: np.ndarray) -> pb.Tensor:
    a = np.ascontiguousarray(a, dtype="<f4")
    return pb.Tensor(dtype=pb.FLOAT32, shape=list(a.shape), data=a.tobytes())


class ClassifierServicer(_Servicer, pb_grpc.ClassifierServicer):
    async def _rows(
        self, request: pb.PredictRequest, mv: ModelVersion
    ) -> tuple[np.ndarray, ModelVersion]:
        """The request's images as one uint8 batch for `mv`, or for the version that
        replaced it while a big decode waited on a thread."""
        self.plane.check_count(len(request.images))  # before looking at any of them
        payloads = _uint8_payloads(request.images, mv.spec)
        rows = None if payloads is None else self.plane.stack_uint8(payloads, mv)
        if rows is not None:
            return rows, mv
        images = _image_inputs(request.images)
        rows = self.plane.decode_inline(images, mv)
        if rows is not None:
            return rows, mv
        rows = await self.plane.decode_in_thread(images, mv)
        # The decode awaited a thread: a hot swap may have happened meanwhile, so resolve
        # the model again (and re-decode in the rare case its input changed).
        latest = self.plane.model(request.model, request.version)
        if latest is not mv and latest.spec != mv.spec:
            rows = self.plane.decode(images, latest)
        return rows, latest

    async def _predict(self, request: pb.PredictRequest, context: Any) -> pb.PredictResponse:
        mv = self.plane.model(request.model, request.version)
        k = self.plane.check_top_k(request.top_k, mv)
        rows, mv = await self._rows(request, mv)
        result = await self.plane.classify(mv, rows, k, deadline_of(context))
        labels = mv.labels
        response = pb.PredictResponse(
            model=mv.name, version=mv.version, request_id=request.request_id
        )
        # Built in place with add(): half the cost of constructing each message and copying
        # it into its parent (~90 vs ~200 us for 32 images; it is on every request's path).
        add_prediction = response.predictions.add
        for idx, probs in zip(result.indices.tolist(), result.probabilities.tolist(), strict=True):
            add_class = add_prediction().classes.add
            for i, p in zip(idx, probs, strict=True):
                add_class(index=i, label=labels[i], probability=p)
        return response

    @rpc("Predict")
    async def Predict(self, request: pb.PredictRequest, context: Any) -> pb.PredictResponse:
        return await self._predict(request, context)

    async def PredictStream(
        self, request_iterator: AsyncIterator[pb.PredictRequest], context: Any
    ) -> AsyncIterator[pb.PredictResponse]:
        async for request in request_iterator:
            yield await self._stream_one(request, context)

    @rpc("PredictStream")
    async def _stream_one(self, request: pb.PredictRequest, context: Any) -> pb.PredictResponse:
        return await self._predict(request, context)

    @rpc("Explain")
    async def Explain(self, request: pb.ExplainRequest, context: Any) -> pb.ExplainResponse:
        mv = self.plane.model(request.model, request.version)
        if not request.HasField("image"):
            raise errors.InvalidInput("request has no image")
        image = (await self.plane.decode_async(_image_inputs([request.image]), mv))[0]
        ex = await self.plane.explain(
            mv,
            image,
            patch=request.patch_size,
            stride=request.stride,
            target=request.target_class if request.has_target_class else None,
            stage=request.activation_stage,
            render_png=request.render_png,
            deadline=deadline_of(context),
        )
        occ = ex.occlusion
        order = np.argsort(-occ.probabilities, kind="stable")
        probs = occ.probabilities
        prediction = pb.Prediction(
            classes=[
                pb.ClassScore(index=int(i), label=mv.labels[i], probability=float(probs[i]))
                for i in order
            ]
        )
        activations = [] if ex.activations is None else [_float_tensor(ex.activations)]
        return pb.ExplainResponse(
            model=mv.name,
            version=mv.version,
            prediction=prediction,
            heatmap=_float_tensor(occ.heatmap),
            overlay_png=ex.overlay_png,
            target_class=occ.target,
            forward_passes=occ.forward_passes,
            activations=activations,
        )

    @rpc("GetModelInfo")
    async def GetModelInfo(self, request: pb.ModelInfoRequest, context: Any) -> pb.ModelInfo:
        mv = self.plane.model(request.model, request.version)
        s = mv.spec
        return pb.ModelInfo(
            name=mv.name,
            version=mv.version,
            versions=self.plane.repository.versions(mv.name),
            labels=list(mv.labels),
            input=pb.InputSpec(
                name=s.name,
                dtype=pb.UINT8,
                layout="NCHW",
                channels=s.channels,
                height=s.height,
                width=s.width,
            ),
            execution_provider=mv.session.provider,
            requested_device=mv.session.requested_device,
            max_batch_size=mv.batcher.config.max_batch_size,
            manifest_json=json.dumps(mv.manifest),
            variants=sorted(mv.manifest.get("variants", {})),
        )


# ----------------------------------------------------------------------------- KServe V2
def _v2_version(text: str) -> int | None:
    if not text:
        return None
    # ASCII digits only: str.isdigit() admits "²" and "١", and int() refuses > 4300 digits.
    if not (text.isascii() and text.isdigit() and len(text) <= 18):
        raise errors.ModelNotFound(f"model version {_clip(text)!r} is not a version number")
    return int(text)


def _clip(text: str, limit: int = 64) -> str:
    """A client's string, short enough to quote back in an error message."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _clip_utf8(text: str, limit: int) -> str:
    """`text` cut to at most about `limit` UTF-8 bytes, saying so."""
    raw = text.encode()
    if len(raw) <= limit:
        return text
    return raw[:limit].decode(errors="ignore") + f"... ({len(raw)} bytes)"


def v2_input(request: v2.ModelInferRequest) -> tuple[str, list[int], bytes]:
    """The one input tensor of a ModelInferRequest as (datatype, shape, little-endian bytes),
    from raw_input_contents or the typed contents; DataPlane.batch_tensor checks the rest."""
    if len(request.inputs) != 1:
        raise errors.InvalidInput(
            f"expected exactly one input tensor 'images', got {len(request.inputs)}"
        )
    t = request.inputs[0]
    if t.name != "images":
        raise errors.InvalidInput(f"unknown input {_clip(t.name)!r}; the model takes 'images'")
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise errors.InvalidInput("raw_input_contents must hold exactly one tensor")
        data = request.raw_input_contents[0]
    elif t.datatype == "UINT8":
        values = np.asarray(t.contents.uint_contents, dtype=np.int64)
        if values.size and (values.min() < 0 or values.max() > 255):
            raise errors.InvalidInput("UINT8 contents must lie in 0..255")
        data = values.astype(np.uint8).tobytes()
    elif t.datatype == "FP32":
        data = np.asarray(t.contents.fp32_contents, dtype="<f4").tobytes()
    else:
        data = b""
    return t.datatype, list(t.shape), data


def _bytes_tensor(strings: list[bytes]) -> bytes:
    """KServe/Triton raw BYTES encoding: each element is a 4-byte little-endian length + data."""
    return b"".join(struct.pack("<I", len(s)) + s for s in strings)


class InferenceServicer(_Servicer, v2_grpc.GRPCInferenceServiceServicer):
    OUTPUTS = ("logits", "probabilities")

    @rpc("ServerLive")
    async def ServerLive(self, request: Any, context: Any) -> v2.ServerLiveResponse:
        return v2.ServerLiveResponse(live=True)

    @rpc("ServerReady")
    async def ServerReady(self, request: Any, context: Any) -> v2.ServerReadyResponse:
        return v2.ServerReadyResponse(ready=self.gate.open and self.plane.repository.ready)

    @rpc("ModelReady")
    async def ModelReady(self, request: Any, context: Any) -> v2.ModelReadyResponse:
        try:
            self.plane.model(request.name, _v2_version(request.version))
        except errors.ModelNotFound:
            return v2.ModelReadyResponse(ready=False)
        return v2.ModelReadyResponse(ready=True)

    @rpc("ServerMetadata")
    async def ServerMetadata(self, request: Any, context: Any) -> v2.ServerMetadataResponse:
        return v2.ServerMetadataResponse(
            name="convserve", version=VERSION, extensions=["classification"]
        )

    @rpc("ModelMetadata")
    async def ModelMetadata(self, request: Any, context: Any) -> v2.ModelMetadataResponse:
        mv = self.plane.model(request.name, _v2_version(request.version))
        meta = v2.ModelMetadataResponse.TensorMetadata
        k = mv.num_classes
        return v2.ModelMetadataResponse(
            name=mv.name,
            versions=[str(v) for v in self.plane.repository.versions(mv.name)],
            platform="onnxruntime_onnx",
            inputs=[meta(name="images", datatype="UINT8", shape=[-1, *mv.spec.shape])],
            outputs=[meta(name=n, datatype="FP32", shape=[-1, k]) for n in self.OUTPUTS],
        )

    @rpc("ModelInfer")
    async def ModelInfer(
        self, request: v2.ModelInferRequest, context: Any
    ) -> v2.ModelInferResponse:
        mv = self.plane.model(request.model_name, _v2_version(request.model_version))
        rows = self.plane.batch_tensor(mv.spec, *v2_input(request))
        wanted = [(o.name, o.parameters) for o in request.outputs] or [
            (n, {}) for n in self.OUTPUTS
        ]
        for i, (name, params) in enumerate(wanted):
            if name not in self.OUTPUTS:
                raise errors.InvalidInput(
                    f"unknown output {_clip(name)!r}; have {list(self.OUTPUTS)}"
                )
            # Each at most once: 30,000 copies in a 1 MB request cost seconds of event loop.
            if any(name == other for other, _ in wanted[:i]):
                raise errors.InvalidInput(f"output {name!r} is requested more than once")
            if "classification" in params and params["classification"].int64_param < 0:
                raise errors.InvalidInput(f"output {name!r}: classification must be >= 0")
        out = await mv.infer(rows, deadline_of(context))
        resp = v2.ModelInferResponse(
            model_name=mv.name, model_version=str(mv.version), id=request.id
        )
        n, k = len(rows), mv.num_classes
        for name, params in wanted:
            values = out[:, self.OUTPUTS.index(name)]
            topk = params["classification"].int64_param if "classification" in params else 0
            if topk:
                # Classification extension: "<value>:<index>:<label>" strings, best first.
                kk = min(int(topk), k)
                order = np.argsort(-values, axis=1, kind="stable")[:, :kk]
                strings = [
                    f"{values[r, c]:f}:{c}:{mv.labels[c]}".encode()
                    for r in range(n)
                    for c in order[r]
                ]
                resp.outputs.add(name=name, datatype="BYTES", shape=[n, kk])
                resp.raw_output_contents.append(_bytes_tensor(strings))
            else:
                resp.outputs.add(name=name, datatype="FP32", shape=[n, k])
                resp.raw_output_contents.append(np.ascontiguousarray(values, "<f4").tobytes())
        return resp
