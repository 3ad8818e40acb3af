"""inference.GRPCInferenceService (KServe V2 / Open Inference Protocol over gRPC): protobuf in,
the data plane, protobuf out. Outputs go in `raw_output_contents` (tritonclient reads those)."""

from __future__ import annotations

from typing import Any

import numpy as np

from serving import v2
from serving.grpc.extensions import TritonExtensions, local_only
from serving.grpc.status import Servicer, deadline_of, rpc
from serving.proto.inference import grpc_predict_v2_pb2 as pb
from serving.proto.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from serving.shm import SharedSlice


def infer_request(request: pb.ModelInferRequest) -> tuple[v2.InferRequest, bool]:
    """The core request, and whether it names shared memory (for clients on this host)."""
    raw = request.raw_input_contents
    shared = False
    inputs = []
    for t in request.inputs:
        data = _shared(t.parameters) if t.parameters else None
        shared = shared or data is not None
        if data is None:
            data = None if raw else _typed(t)
        inputs.append(v2.InferInput(t.name, t.datatype, tuple(t.shape), data))
    outputs = []
    for o in request.outputs:
        p = o.parameters
        k = p["classification"].int64_param if "classification" in p else 0
        region = _shared(p) if p else None
        shared = shared or region is not None
        outputs.append(v2.RequestedOutput(o.name, k, region))
    version = v2.version_number(request.model_version)
    ask = v2.InferRequest(request.model_name, version, request.id, inputs, outputs, list(raw))
    return ask, shared


def _shared(parameters: Any) -> SharedSlice | None:
    """Triton's shared-memory parameters of a tensor, when it names a region."""
    if "shared_memory_region" not in parameters:
        return None
    size = (
        parameters["shared_memory_byte_size"].int64_param
        if ("shared_memory_byte_size" in parameters)
        else 0
    )
    offset = (
        parameters["shared_memory_offset"].int64_param
        if ("shared_memory_offset" in parameters)
        else 0
    )
    return SharedSlice(parameters["shared_memory_region"].string_param, offset, size)


def _typed(t: Any) -> np.ndarray | None:
    """Typed values of the one datatype the model takes; the core refuses any other."""
    if t.datatype == v2.INPUT_DATATYPE:
        return np.asarray(t.contents.uint_contents, dtype=np.int64)
    return None


def infer_response(r: v2.InferResponse) -> pb.ModelInferResponse:
    resp = pb.ModelInferResponse(model_name=r.model, model_version=str(r.version), id=r.id)
    for o in r.outputs:
        resp.outputs.add(name=o.name, datatype=o.datatype, shape=list(o.shape))
        # An output written to shared memory keeps its place with no bytes (tritonclient
        # finds an output's bytes by its index).
        resp.raw_output_contents.append(b"" if o.shared else v2.tensor_bytes(o))
    return resp


class InferenceServicer(Servicer, TritonExtensions, pb_grpc.GRPCInferenceServiceServicer):
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name

    def __init__(self, plane: Any, metrics: Any, log_format: str = "text"):
        super().__init__(plane, metrics)
        self.log_format = log_format

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
        return await self._infer(request, context)

    async def _infer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        ask, shared = infer_request(request)
        if shared:
            local_only(context)
        return infer_response(await self.plane.infer(ask, deadline_of(context)))
