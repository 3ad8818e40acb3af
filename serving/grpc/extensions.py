"""Triton's gRPC extensions of KServe V2, the ones tools call: stream inference, model
configuration, statistics, the repository index and model control, system shared memory,
trace and log settings. Protobuf in, the data plane, protobuf out, like the core V2 RPCs
(serving.grpc.inference), which this mixin joins in InferenceServicer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import text_format

from serving import logs, trace_settings, v2
from serving.errors import FailedPrecondition, InvalidInput
from serving.grpc.status import rpc
from serving.proto.inference import grpc_predict_v2_pb2 as pb
from serving.proto.inference import model_config_pb2 as mc
from serving.statistics import Duration, InferenceStatistics

LOOPBACK_PEERS = ("ipv4:127.", "ipv6:[::1]", "ipv6:%5B::1%5D", "unix:")


def model_config(info: Any) -> mc.ModelConfig:
    """The version's config.pbtxt as Triton reports it: what the file says, completed with
    how this server runs it (batch limit, queue delay, instances, device, model file)."""
    config = mc.ModelConfig()
    if info.config_text:
        try:
            text_format.Parse(info.config_text, config, allow_unknown_field=True)
        except text_format.ParseError:
            config.Clear()  # a hand-edited file we cannot read: report what we know
    config.name = info.name
    config.platform = v2.PLATFORM
    config.backend = "onnxruntime"
    config.max_batch_size = info.max_batch_size
    config.default_model_filename = info.variant_file
    config.version_policy.latest.num_versions = 1
    config.dynamic_batching.max_queue_delay_microseconds = info.max_queue_delay_us
    gpu = info.provider.startswith(("CUDA", "Tensorrt"))
    kind = mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU
    del config.instance_group[:]
    config.instance_group.add(name=f"{info.name}_0", kind=kind, count=info.instances)
    if not config.input:
        s = info.spec
        config.input.add(name=s.name, data_type=mc.TYPE_UINT8, format=mc.ModelInput.FORMAT_NCHW,
                         dims=[s.channels, s.height, s.width])  # fmt: skip
    if not config.output:
        for name in ("logits", "probabilities"):
            config.output.add(name=name, data_type=mc.TYPE_FP32, dims=[len(info.manifest.labels)])
    return config


def stream_error(request: Any, text: str) -> pb.ModelStreamInferResponse:
    """A stream request's failure, in-band, naming the request it answers."""
    answer = pb.ModelStreamInferResponse(error_message=text)
    if isinstance(request, pb.ModelInferRequest):  # not an undecodable message
        answer.infer_response.id = request.id
        answer.infer_response.model_name = request.model_name
        answer.infer_response.model_version = request.model_version
    return answer


def _duration(d: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def model_statistics(name: str, version: int, s: InferenceStatistics) -> pb.ModelStatistics:
    out = pb.ModelStatistics(
        name=name,
        version=str(version),
        last_inference=s.last_inference_ms,
        inference_count=s.inference_count,
        execution_count=s.execution_count,
    )
    i = out.inference_stats
    for field in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
        getattr(i, field).CopyFrom(_duration(getattr(s, field)))
    for size, b in sorted(s.batches.items()):
        out.batch_stats.add(
            batch_size=size,
            compute_input=_duration(b.compute_input),
            compute_infer=_duration(b.compute_infer),
            compute_output=pb.StatisticDuration(count=b.count),
        )
    return out


def _setting_value(value: bool | int | str) -> pb.LogSettingsResponse.SettingValue:
    v = pb.LogSettingsResponse.SettingValue
    if isinstance(value, bool):
        return v(bool_param=value)
    if isinstance(value, int):
        return v(uint32_param=value)
    return v(string_param=value)


def local_only(context: grpc.aio.ServicerContext) -> None:
    """System shared memory is for clients on this host: refuse any other caller."""
    peer = context.peer() or ""
    if not peer.startswith(LOOPBACK_PEERS):
        raise FailedPrecondition(
            f"system shared memory is for clients on the server's host (this call came from "
            f"{peer[:64]}); send the tensors in the request instead"
        )


class TritonExtensions:
    """The Triton extension RPCs of inference.GRPCInferenceService."""

    plane: Any
    metrics: Any
    log_format: str = "text"

    # -- streaming inference ------------------------------------------------------------
    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async for request in request_iterator:
            yield await self._stream_infer(request, context)

    @rpc("ModelStreamInfer", lambda request, text: stream_error(request, text))
    async def _stream_infer(self, request: Any, context: Any) -> pb.ModelStreamInferResponse:
        answer = await self._infer(request, context)
        return pb.ModelStreamInferResponse(infer_response=answer)

    async def _infer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        raise NotImplementedError  # InferenceServicer's: ModelInfer and this share it

    # -- configuration, statistics, repository -------------------------------------------
    @rpc("ModelConfig")
    async def ModelConfig(self, request: Any, context: Any) -> pb.ModelConfigResponse:
        info = self.plane.model_info(request.name, v2.version_number(request.version))
        return pb.ModelConfigResponse(config=model_config(info))

    @rpc("ModelStatistics")
    async def ModelStatistics(self, request: Any, context: Any) -> pb.ModelStatisticsResponse:
        versions = self.plane.served(request.name, v2.version_number(request.version))
        return pb.ModelStatisticsResponse(
            model_stats=[model_statistics(mv.name, mv.version, mv.statistics) for mv in versions]
        )

    @rpc("RepositoryIndex")
    async def RepositoryIndex(self, request: Any, context: Any) -> pb.RepositoryIndexResponse:
        out = pb.RepositoryIndexResponse()
        for name, version, state, reason in self.plane.index():
            if state == "READY" or not request.ready:
                v = "" if version is None else str(version)
                out.models.add(name=name, version=v, state=state, reason=reason)
        return out

    @rpc("RepositoryModelLoad")
    async def RepositoryModelLoad(
        self, request: Any, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        if request.parameters:
            raise InvalidInput("load parameters (a config or files to write) are not supported")
        await self.plane.load_model(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @rpc("RepositoryModelUnload")
    async def RepositoryModelUnload(
        self, request: Any, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        self.plane.unload_model(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # -- system shared memory ------------------------------------------------------------
    @rpc("SystemSharedMemoryRegister")
    async def SystemSharedMemoryRegister(
        self, request: Any, context: Any
    ) -> pb.SystemSharedMemoryRegisterResponse:
        local_only(context)
        self.plane.shared_memory.register(
            request.name, request.key, request.offset, request.byte_size
        )
        return pb.SystemSharedMemoryRegisterResponse()

    @rpc("SystemSharedMemoryStatus")
    async def SystemSharedMemoryStatus(
        self, request: Any, context: Any
    ) -> pb.SystemSharedMemoryStatusResponse:
        out = pb.SystemSharedMemoryStatusResponse()
        for r in self.plane.shared_memory.status(request.name):
            status = out.regions[r.name]
            status.name, status.key = r.name, r.key
            status.offset, status.byte_size = r.offset, r.byte_size
        return out

    @rpc("SystemSharedMemoryUnregister")
    async def SystemSharedMemoryUnregister(
        self, request: Any, context: Any
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        local_only(context)
        self.plane.shared_memory.unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    # -- trace and log settings ----------------------------------------------------------
    @rpc("TraceSetting")
    async def TraceSetting(self, request: Any, context: Any) -> pb.TraceSettingResponse:
        changes = {key: list(v.value) for key, v in request.settings.items()}
        now = trace_settings.trace_setting(self.plane.tracing, request.model_name, changes)
        out = pb.TraceSettingResponse()
        for key, values in now.items():
            out.settings[key].value.extend(values)
        return out

    @rpc("LogSettings")
    async def LogSettings(self, request: Any, context: Any) -> pb.LogSettingsResponse:
        if request.settings:
            changes = {k: getattr(v, v.WhichOneof("parameter_choice") or "string_param")
                       for k, v in request.settings.items()}  # fmt: skip
            try:
                logs.change_log_settings(self.log_format, changes)
            except ValueError as exc:
                raise InvalidInput(str(exc)) from None
        out = pb.LogSettingsResponse()
        for key, value in logs.log_settings(self.log_format).items():
            out.settings[key].CopyFrom(_setting_value(value))
        return out
