"""What every HTTP handler shares: core errors to HTTP statuses in one table (next to the
gRPC one, serving.grpc.status.STATUS_OF), answered as `{"error": "..."}` by one decorator
that also checks the token, asks the data plane for admission, counts each call by method,
status and protocol and, with tracing on, makes its span. Method names are the gRPC
methods' (ModelInfer, Predict...), so one dashboard row and one alert cover a method over
both protocols.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from serving import errors
from serving.metrics import RequestTimer
from serving.tracing import CallTrace, Tracing

log = logging.getLogger("convserve.http")

# The one table from core errors to HTTP statuses (the Open Inference Protocol's and
# KServe's choices where they make one: 400 for a bad request, 404 for an unknown model).
HTTP_STATUS_OF: dict[type[errors.ServingError], int] = {
    errors.InvalidInput: 400,
    errors.ModelNotFound: 404,
    errors.NotReady: 503,
    errors.QueueFull: 429,
    errors.MessageTooLarge: 413,
    errors.FailedPrecondition: 400,
    errors.DeadlineExceeded: 504,
    errors.Draining: 503,
    errors.InferenceFailed: 500,
    errors.ModelLoadError: 503,
    errors.DeviceUnavailable: 503,
}
MAX_DETAILS = 1024  # characters of an error message (one may quote a client's string)
JSON_TYPE = "application/json"


def http_status_of(exc: errors.ServingError) -> int:
    for cls in type(exc).__mro__:
        if cls in HTTP_STATUS_OF:
            return HTTP_STATUS_OF[cls]
    return 500


def json_response(
    doc: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """`doc` as a JSON body (numpy arrays included, written as lists)."""
    body = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    return web.Response(body=body, status=status, headers=headers, content_type=JSON_TYPE)


def error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """The protocol's error body: `{"error": "<message>"}`."""
    if len(message) > MAX_DETAILS:
        message = f"{message[:MAX_DETAILS]}... ({len(message)} characters)"
    return json_response({"error": message}, status, headers)


class Refused(Exception):
    """Token auth said no: 401 (no valid token) or 403 (the token does not grant this)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


Handler = Callable[[Any, web.Request], Awaitable[web.StreamResponse]]


def endpoint(method: str, group: str, admit: bool = True) -> Callable[[Handler], Handler]:
    """Check the token for `group`, admit (unless the handler admits itself, once it knows
    the call's deadline), map core errors to statuses, count the call, observe its latency.
    The decorated function is a method of an object with `plane`, `metrics` and
    `authorize(request, group)`."""

    def wrap(fn: Handler) -> Handler:
        @functools.wraps(fn)
        async def handler(self: Any, request: web.Request) -> web.StreamResponse:
            timer = RequestTimer(self.metrics, method, "http")
            self.metrics.inflight.inc()
            response: web.StreamResponse | None = None
            trace = None
            try:
                self.authorize(request, group)
                if self.plane.tracing is not None:  # a refused token is not traced (as gRPC)
                    trace = call_trace(self.plane.tracing, method, request)
                if admit:
                    self.plane.admit(None)
                response = await fn(self, request)
            except Refused as exc:
                bearer = {"WWW-Authenticate": 'Bearer realm="convserve"'}
                response = error(exc.status, str(exc), bearer if exc.status == 401 else None)
            except errors.ServingError as exc:
                self.metrics.rejected.labels(exc.reason).inc()
                response = error(http_status_of(exc), str(exc))
            except web.HTTPRequestEntityTooLarge as exc:
                self.metrics.rejected.labels(errors.MessageTooLarge.reason).inc()
                response = error(413, f"request body too large: {exc.text}")
            except Exception as exc:
                log.exception("%s failed", method)
                response = error(500, f"internal error: {exc}")
            finally:
                self.metrics.inflight.dec()
                timer.done(str(response.status) if response is not None else "499")
                if trace is not None:
                    trace.end_http(response.status if response is not None else 499)
            if not self.plane.admitting:
                response.force_close()  # draining: the client reconnects elsewhere
            return response

        return handler

    return wrap


def call_trace(tracing: Tracing, method: str, request: web.Request) -> CallTrace | None:
    """The call's span, the child of the caller's W3C traceparent header; named, as the
    semantic conventions say, after the HTTP method and route."""
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else request.path
    return tracing.call(
        f"{request.method} {route}",
        request.headers,
        {
            "http.request.method": request.method,
            "http.route": route,
            "url.path": request.path,
            "rpc.method": method,  # the gRPC method it is (ModelInfer, Predict...)
        },
    )


def read_json(body: bytes | memoryview, what: str = "request body") -> Any:
    """`body` as JSON; InvalidInput when it is not (nesting deeper than 1024 and integers
    beyond 64 bits included: orjson refuses both)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise errors.InvalidInput(f"{what} is not valid JSON: {str(exc)[:200]}") from None
