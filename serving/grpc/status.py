"""What every gRPC handler shares: core errors to status codes in one table, applied by one
decorator that also asks the data plane for admission, counts each RPC by method and status
code and, with tracing on, makes its span; and request bytes that are not a valid message
answered INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from serving import errors
from serving.dataplane import DataPlane
from serving.metrics import Metrics, RequestTimer
from serving.tracing import CallTrace

log = logging.getLogger("convserve.grpc")

# The one table from core errors to gRPC status codes.
STATUS_OF: dict[type[errors.ServingError], grpc.StatusCode] = {
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ModelNotFound: grpc.StatusCode.NOT_FOUND,
    errors.NotReady: grpc.StatusCode.UNAVAILABLE,
    errors.QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.MessageTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Draining: grpc.StatusCode.UNAVAILABLE,
    errors.InferenceFailed: grpc.StatusCode.INTERNAL,
    errors.ModelLoadError: grpc.StatusCode.UNAVAILABLE,
    errors.DeviceUnavailable: grpc.StatusCode.UNAVAILABLE,
}
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


def clip_utf8(text: str, limit: int) -> str:
    """`text` cut to at most about `limit` UTF-8 bytes, saying so."""
    raw = text.encode()
    if len(raw) <= limit:
        return text
    return raw[:limit].decode(errors="ignore") + f"... ({len(raw)} bytes)"


class Servicer:
    """What a handler of either service holds: the data plane and the metrics."""

    service = ""  # the gRPC service's full name (its spans are named after it)

    def __init__(self, plane: DataPlane, metrics: Metrics):
        self.plane = plane
        self.metrics = metrics


Handler = Callable[..., Awaitable[Any]]


def rpc(
    method: str, answer_error: Callable[[Any, str], Any] | None = None
) -> Callable[[Handler], Handler]:
    """Admit, map core errors to status codes, count the RPC, observe its latency, trace it
    (when tracing is on: serving.tracing). With
    `answer_error` (one message of a stream whose protocol answers errors in-band, as
    ModelStreamInfer does), a core error becomes the message `answer_error(request, text)`
    and the stream goes on, instead of ending the call."""

    def wrap(fn: Handler) -> Handler:
        @functools.wraps(fn)
        async def handler(self: Servicer, request: Any, context: grpc.aio.ServicerContext):
            timer = RequestTimer(self.metrics, method)
            self.metrics.inflight.inc()
            code = "OK"
            trace = None if self.plane.tracing is None else call_trace(self, method, context)
            try:
                self.plane.admit(deadline_of(context))
                if isinstance(request, Undecodable):
                    raise errors.InvalidInput(request.reason)
                return await fn(self, request, context)
            except errors.ServingError as exc:
                status = status_of(exc)
                code = status.name
                self.metrics.rejected.labels(exc.reason).inc()
                # Clipped: a message quoting a huge client string would overflow the
                # client's metadata limit and reach it as RESOURCE_EXHAUSTED instead.
                details = clip_utf8(str(exc), MAX_DETAILS)
                if answer_error is not None:
                    return answer_error(request, f"{status.name}: {details}")
                await context.abort(status, details)
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
                if trace is not None:
                    trace.end_rpc(grpc.StatusCode[code].value[0])

        return handler

    return wrap


def call_trace(servicer: Servicer, method: str, context: Any) -> CallTrace | None:
    """The call's span, the child of the caller's W3C traceparent in its metadata."""
    assert servicer.plane.tracing is not None
    service = servicer.service
    return servicer.plane.tracing.call(
        f"{service}/{method}",
        dict(context.invocation_metadata() or ()),
        {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
    )


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
