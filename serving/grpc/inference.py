"""inference.GRPCInferenceService (KServe V2 / Open Inference Protocol over gRPC): protobuf in,
the data plane, protobuf out. Outputs go in `raw_output_contents` (tritonclient reads those)."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from serving import v2
from serving.grpc.status import Servicer, deadline_of, rpc
from serving.proto.inference import grpc_predict_v2_pb2 as pb
from serving.proto.inference import grpc_predict_v2_pb2_grpc as pb_grpc


def infer_request(request: pb.ModelInferRequest) -> v2.InferRequest:
    raw = request.raw_input_contents
    inputs = [
        v2.InferInput(t.name, t.datatype, tuple(t.shape), None if raw else _typed(t))
        for t in request.inputs
    ]
    outputs = [
        v2.RequestedOutput(
            o.name,
            o.parameters["classification"].int64_param if "classification" in o.parameters else 0,
        )
        for o in request.outputs
    ]
    version = v2.version_number(request.model_version)
    return v2.InferRequest(request.model_name, version, request.id, inputs, outputs, list(raw))


def _typed(t: Any) -> np.ndarray | None:
    """Typed values of the one datatype the model takes; the core refuses any other."""
    if t.datatype == v2.INPUT_DATATYPE:
        return np.asarray(t.contents.uint_contents, dtype=np.int64)
    return None


def _bytes_tensor(strings: list[bytes]) -> bytes:
    """KServe/Triton raw BYTES encoding: each element is a 4-byte little-endian length + data."""
    return b"".join(struct.pack("<I", len(s)) + s for s in strings)


def infer_response(r: v2.InferResponse) -> pb.ModelInferResponse:
    resp = pb.ModelInferResponse(model_name=r.model, model_version=str(r.version), id=r.id)
    for o in r.outputs:
        resp.outputs.add(name=o.name, datatype=o.datatype, shape=list(o.shape))
        if o.datatype == "BYTES":
            resp.raw_output_contents.append(_bytes_tensor(o.data))
        else:
            resp.raw_output_contents.append(np.ascontiguousarray(o.data, "<f4").tobytes())
    return resp


class InferenceServicer(Servicer, pb_grpc.GRPCInferenceServiceServicer):
    @rpc("ServerLive")
    async def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @rpc("ServerReady")
    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.plane.ready)

    @rpc("ModelReady")
    async def ModelReady(self, request: Any, context: Any) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.plane.model_ready(request.name, request.version))

    @rpc("ServerMetadata")
    async def ServerMetadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=v2.SERVER_NAME, version=v2.SERVER_VERSION, extensions=list(v2.EXTENSIONS)
        )

    @rpc("ModelMetadata")
    async def ModelMetadata(self, request: Any, context: Any) -> pb.ModelMetadataResponse:
        m = self.plane.model_metadata(request.name, v2.version_number(request.version))
        meta = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=m.name,
            versions=list(m.versions),
            platform=m.platform,
            inputs=[meta(name=t.name, datatype=t.datatype, shape=t.shape) for t in m.inputs],
            outputs=[meta(name=t.name, datatype=t.datatype, shape=t.shape) for t in m.outputs],
        )

    @rpc("ModelInfer")
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Any
    ) -> pb.ModelInferResponse:
        answer = await self.plane.infer(infer_request(request), deadline_of(context))
        return infer_response(answer)
