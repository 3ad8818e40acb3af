"""Token auth on the gRPC port: an interceptor that lets a call through when its endpoint
group is open or its `authorization: Bearer <token>` grants the group (serving.auth holds the
token table). It is installed only when a token file is configured: without one, requests
pay nothing for it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import grpc

from serving.auth import UNAUTHENTICATED, Gate, TokenTable, bearer_token
from serving.metrics import Metrics

METHOD_GROUPS = {
    **{
        f"/convserve.v1.Classifier/{m}": "inference"
        for m in ("Predict", "PredictStream", "Explain")
    },
    "/convserve.v1.Classifier/GetModelInfo": "metadata",
    **{
        f"/inference.GRPCInferenceService/{m}": "inference"
        for m in (
            "ModelInfer",
            "ModelStreamInfer",
            "SystemSharedMemoryRegister",
            "SystemSharedMemoryStatus",
            "SystemSharedMemoryUnregister",
        )
    },
    **{
        f"/inference.GRPCInferenceService/{m}": "metadata"
        for m in (
            "ServerLive",
            "ServerReady",
            "ModelReady",
            "ServerMetadata",
            "ModelMetadata",
            "ModelConfig",
            "ModelStatistics",
            "RepositoryIndex",
        )
    },
    # What changes the server for everyone: never open unless --open-groups says admin.
    **{
        f"/inference.GRPCInferenceService/{m}": "admin"
        for m in ("RepositoryModelLoad", "RepositoryModelUnload", "LogSettings", "TraceSetting")
    },
}
SERVICE_GROUPS = {
    "grpc.health.v1.Health": "health",
    "grpc.reflection.v1alpha.ServerReflection": "reflection",
    "grpc.reflection.v1.ServerReflection": "reflection",
}


def group_of(method: str) -> str | None:
    """The group of a full method name (`/package.Service/Method`), None when in none."""
    group = METHOD_GROUPS.get(method)
    if group is None:
        group = SERVICE_GROUPS.get(method[1:].partition("/")[0])
    return group


def _bearer(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            return bearer_token(value)
    return None


def _refusal(
    handler: grpc.RpcMethodHandler | None, code: grpc.StatusCode, details: str
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as the refused one that only aborts."""

    async def abort(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, details)

    if handler is not None and handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler is not None and handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler is not None and handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through when its group is open or its bearer token grants the group."""

    def __init__(self, tokens: TokenTable, open_groups: frozenset[str], metrics: Metrics):
        self.gate = Gate(tokens, open_groups, metrics.auth_failures)

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        group = group_of(details.method)
        refusal = self.gate.refusal(group, _bearer(details.invocation_metadata))
        if refusal is None:
            return await continuation(details)
        # The refusal must be a handler of the real method's kind (a streaming one must not
        # wait for a first message the client may never send).
        handler = await continuation(details)
        if refusal == UNAUTHENTICATED:
            code, why = grpc.StatusCode.UNAUTHENTICATED, "a valid bearer token is required"
        elif handler is None:
            return None  # a known caller, a method that does not exist: UNIMPLEMENTED
        else:
            code, why = grpc.StatusCode.PERMISSION_DENIED, "this token does not grant this method"
        self.gate.refused(details.method, group, code.name)
        return _refusal(handler, code, why)
