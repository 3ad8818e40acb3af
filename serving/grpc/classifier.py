"""convserve.v1.Classifier: protobuf in, the data plane, protobuf out."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np

from serving.dataplane import ExplainRequest
from serving.grpc.status import Servicer, deadline_of, rpc
from serving.images import EncodedImage, ImageInput, RawTensor
from serving.proto.convserve.v1 import classifier_pb2 as pb
from serving.proto.convserve.v1 import classifier_pb2_grpc as pb_grpc

_DTYPE_NAMES = {pb.UINT8: "uint8", pb.FLOAT32: "float32"}


def image_input(img: pb.Image) -> ImageInput:
    t = img.tensor  # an image that is not a tensor reads as an empty one: dtype 0
    if t.dtype == pb.UINT8:  # the bulk clients' case first: no oneof lookup, no shape copy
        return RawTensor("uint8", t.shape, t.data)
    which = img.WhichOneof("source")
    if which == "encoded":
        return EncodedImage(img.encoded)
    if which == "tensor":
        return RawTensor(_dtype_name(t.dtype), t.shape, t.data)
    return None


def _dtype_name(code: int) -> str:
    """The data plane's dtype name; anything else by its proto name, which it refuses."""
    if code in _DTYPE_NAMES:
        return _DTYPE_NAMES[code]
    try:
        return pb.DataType.Name(code)
    except ValueError:
        return str(code)


class Images:
    """A request's images as the data plane's inputs, each converted when the plane reads it
    (the plane counts them before reading any)."""

    def __init__(self, images: Any):
        self._images = images

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, i: int) -> ImageInput:
        return image_input(self._images[i])

    def __iter__(self) -> Iterator[ImageInput]:
        return map(image_input, self._images)  # the uint8 fast path reads them in order


def _float_tensor(a: np.ndarray) -> pb.Tensor:
    a = np.ascontiguousarray(a, dtype="<f4")
    return pb.Tensor(dtype=pb.FLOAT32, shape=list(a.shape), data=a.tobytes())


class ClassifierServicer(Servicer, pb_grpc.ClassifierServicer):
    service = pb.DESCRIPTOR.services_by_name["Classifier"].full_name

    async def _predict(self, request: pb.PredictRequest, context: Any) -> pb.PredictResponse:
        c = await self.plane.predict(
            request.model,
            request.version,
            Images(request.images),
            request.top_k,
            deadline_of(context),
            request.request_id,
        )
        response = pb.PredictResponse(
            model=c.model, version=c.version, request_id=request.request_id
        )
        # Built in place with add(): half the cost of constructing each message and copying
        # it into its parent (~90 vs ~200 us for 32 images; it is on every request's path).
        labels = c.labels
        add_prediction = response.predictions.add
        rows = zip(
            c.indices.tolist(),
            c.probabilities.tolist(),
            c.ood_scores.tolist(),
            c.ood_flagged.tolist(),
            strict=True,
        )
        for idx, probs, score, flagged in rows:
            prediction = add_prediction(ood_score=score, out_of_distribution=flagged)
            add_class = prediction.classes.add
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
        ask = ExplainRequest(
            image=image_input(request.image) if request.HasField("image") else None,
            patch=request.patch_size,
            stride=request.stride,
            target=request.target_class if request.has_target_class else None,
            stage=request.activation_stage,
            render_png=request.render_png,
        )
        ex = await self.plane.explain(request.model, request.version, ask, deadline_of(context))
        probs = ex.probabilities
        prediction = pb.Prediction(
            classes=[
                pb.ClassScore(index=int(i), label=ex.labels[i], probability=float(probs[i]))
                for i in ex.ranked
            ]
        )
        activations = [] if ex.activations is None else [_float_tensor(ex.activations)]
        return pb.ExplainResponse(
            model=ex.model,
            version=ex.version,
            prediction=prediction,
            heatmap=_float_tensor(ex.heatmap),
            overlay_png=ex.overlay_png,
            target_class=ex.target,
            forward_passes=ex.forward_passes,
            activations=activations,
        )

    @rpc("GetModelInfo")
    async def GetModelInfo(self, request: pb.ModelInfoRequest, context: Any) -> pb.ModelInfo:
        info = self.plane.model_info(request.model, request.version)
        s = info.spec
        return pb.ModelInfo(
            name=info.name,
            version=info.version,
            versions=info.versions,
            labels=list(info.manifest.labels),
            input=pb.InputSpec(
                name=s.name,
                dtype=pb.UINT8,
                layout="NCHW",
                channels=s.channels,
                height=s.height,
                width=s.width,
            ),
            execution_provider=info.provider,
            requested_device=info.requested_device,
            max_batch_size=info.max_batch_size,
            manifest_json=json.dumps(info.document),
            variants=sorted(info.manifest.variants),
        )
