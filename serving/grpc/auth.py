"""Token auth on the gRPC port: an interceptor that lets a call through when its endpoint
group is open or its `authorization: Bearer <token>` grants the group (serving.auth holds the
token table). It is installed only when a token file is configured: without one, requests
pay nothing for it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence

import grpc

from serving.auth import TokenTable
from serving.metrics import Metrics

log = logging.getLogger("convserve.auth")

LOG_EVERY_S = 10.0  # at most one denial log line per this many seconds
METHOD_GROUPS = {
    **{
        f"/convserve.v1.Classifier/{m}": "inference"
        for m in ("Predict", "PredictStream", "Explain")
    },
    "/convserve.v1.Classifier/GetModelInfo": "metadata",
    "/inference.GRPCInferenceService/ModelInfer": "inference",
    **{
        f"/inference.GRPCInferenceService/{m}": "metadata"
        for m in ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata")
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
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
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
        self.tokens = tokens
        self.open_groups = open_groups
        self._failures = metrics.auth_failures
        self._next_log = 0.0
        self._unlogged = 0

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        group = group_of(details.method)
        if group in self.open_groups:
            return await continuation(details)
        token = _bearer(details.invocation_metadata)
        grants = self.tokens.grants(token) if token else None
        if grants is not None and group in grants:
            return await continuation(details)
        # The refusal must be a handler of the real method's kind (a streaming one must not
        # wait for a first message the client may never send).
        handler = await continuation(details)
        if grants is None:
            code, why = grpc.StatusCode.UNAUTHENTICATED, "a valid bearer token is required"
        elif handler is None:
            return None  # a known caller, a method that does not exist: UNIMPLEMENTED
        else:
            code, why = grpc.StatusCode.PERMISSION_DENIED, "this token does not grant this method"
        self._refused(details.method, group, code)
        return _refusal(handler, code, why)

    def _refused(self, method: str, group: str | None, code: grpc.StatusCode) -> None:
        self._failures.labels(group or "none", code.name).inc()
        # One line per LOG_EVERY_S at most, however fast the refusals come.
        self._unlogged += 1
        now = time.monotonic()
        if now >= self._next_log:
            log.warning(
                "refused %s with %s (%d refusal(s) since the last such line; at most one "
                "line per %.0fs)",
                method[:200],
                code.name,
                self._unlogged,
                LOG_EVERY_S,
            )
            self._next_log = now + LOG_EVERY_S
            self._unlogged = 0
