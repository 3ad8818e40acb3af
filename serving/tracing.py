"""OpenTelemetry tracing: a span per call with the steps of its way through the core, and a
span per ONNX Runtime run linked to the calls it served, exported over OTLP. Off by default,
and free when off.

On or off is decided once per process, from OpenTelemetry's standard variables:

    OTEL_SDK_DISABLED=true              off, whatever else is set
    OTEL_TRACES_EXPORTER unset | none   off (the SDK's own default is otlp; a server traces
                                        only when asked, so ours is off)
    OTEL_TRACES_EXPORTER=otlp           on, exported over OTLP: gRPC by default, or
                                        http/protobuf (OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL)
                                        when opentelemetry-exporter-otlp-proto-http is installed
    OTEL_TRACES_EXPORTER=console        on, spans printed to stdout (for debugging);
                                        "otlp,console" does both

Everything else is the SDK's, read from the same environment: where and how to export
(OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT, _HEADERS, _TIMEOUT, _CERTIFICATE, _INSECURE...), the
resource (OTEL_SERVICE_NAME, default "convserve"; OTEL_RESOURCE_ATTRIBUTES), the sampler
(OTEL_TRACES_SAMPLER, OTEL_TRACES_SAMPLER_ARG; default parentbased_always_on), the batch span
processor (OTEL_BSP_SCHEDULE_DELAY, _MAX_QUEUE_SIZE, ...) and the propagators
(OTEL_PROPAGATORS, default W3C tracecontext and baggage). A value this server cannot honour
(an unknown exporter or protocol) stops start-up with a TracingError naming the variable.

Off, `tracing_from_environ()` returns None: nothing of OpenTelemetry is imported, a front
end pays one `is None` test per call and the batcher reads one context variable per request.

On, each call (gRPC: both services; HTTP: every route) is a SERVER span named as the
semantic conventions say ("convserve.v1.Classifier/Predict", "POST /v2/models/{model}/infer"),
the child of the caller's W3C `traceparent` (gRPC metadata or HTTP header), with children
whose times the batcher measured:

    decode   the call's start until its rows join the batcher's queue: reading the request,
             decoding and checking its images (Explain: building the occluded rows too)
    queue    waiting in the queue until a batch takes its rows (zero when it took none)
    compute  the ONNX Runtime run of its batch (one per run when a large request is split),
             linked to that run's batch span

and one `batch` span per run: the root of a trace of its own, linked to every traced call it
served, with the model, version, batch size, requests and execution provider. The call span
carries the model, version and provider too. Spans are written when the times are known,
with explicit start and end times (monotonic readings converted to wall-clock time), never
from inside the batcher's loops; a call the sampler drops costs nothing after its span's
start. The batch span processor exports from its own thread; `Tracing.shutdown` (the
server's drain) flushes it.

Triton's TraceSetting RPC switches the sampler at run time (serving.trace_settings). Each
worker process of `--workers N` has its own provider, exporter and settings. The clients
send their caller's context (serving.client.tracecontext).
"""

from __future__ import annotations

import contextvars
import importlib.metadata
import importlib.util
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from serving.trace_settings import BATCH, Switch, rate_of_environ

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span

EXPORTERS = ("otlp", "console")
PROTOCOLS = ("grpc", "http/protobuf")
DEFAULT_SERVICE = "convserve"
TRACER_NAME = "convserve"

# Span names.
DECODE, QUEUE, COMPUTE = "decode", "queue", "compute"  # and BATCH (serving.trace_settings)
# Attribute keys of ours (the RPC and HTTP ones are the semantic conventions').
MODEL = "convserve.model"
VERSION = "convserve.model.version"
PROVIDER = "convserve.provider"
IMAGES = "convserve.images"  # rows (images) of one call
BATCH_SIZE = "convserve.batch.size"  # rows of one ONNX Runtime run
BATCH_REQUESTS = "convserve.batch.requests"  # calls (or parts of calls) the run served
# gRPC codes a server span reports as an error: the semantic conventions for RPC leave the
# others (the caller's doing: a bad argument, an unknown model) unset.
GRPC_SERVER_ERRORS = frozenset({2, 4, 12, 13, 14, 15})  # UNKNOWN, DEADLINE_EXCEEDED,
# UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS

# The call being served, for the batcher: set by `Tracing.call` (only for a call that is
# sampled) and reset by `CallTrace.end`, in the task that serves the call.
_CALL: contextvars.ContextVar[CallTrace | None] = contextvars.ContextVar(
    "convserve_call_trace", default=None
)


def current_call() -> CallTrace | None:
    """The traced call this task is serving, or None (tracing off, or the call not sampled)."""
    return _CALL.get()


class TracingError(ValueError):
    """The OTEL_* variables ask for what this process cannot do: it does not start."""


def _truthy(text: str | None) -> bool:
    return (text or "").strip().lower() == "true"


@dataclass(frozen=True)
class TracingConfig:
    """What the standard variables ask for: which exporters (none: tracing is off)."""

    exporters: tuple[str, ...] = ()
    protocol: str = "grpc"  # OTLP's transport

    @property
    def on(self) -> bool:
        return bool(self.exporters)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> TracingConfig:
        """Read (and check) OTEL_SDK_DISABLED, OTEL_TRACES_EXPORTER and the OTLP protocol."""
        env = os.environ if environ is None else environ
        if _truthy(env.get("OTEL_SDK_DISABLED")):
            return cls()
        names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",")]
        names = [n for n in names if n]
        unknown = sorted(set(names) - {*EXPORTERS, "none"})
        if unknown:
            raise TracingError(
                f"OTEL_TRACES_EXPORTER: unknown exporter {', '.join(unknown)} "
                f"(this server exports with {', '.join(EXPORTERS)} or none)"
            )
        exporters = tuple(dict.fromkeys(n for n in names if n != "none"))
        protocol = (
            env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "grpc"
        ).strip()
        if "otlp" in exporters:
            if protocol not in PROTOCOLS:
                raise TracingError(
                    f"OTEL_EXPORTER_OTLP_PROTOCOL: {protocol!r} is not one of {PROTOCOLS}"
                )
            if protocol == "http/protobuf" and not _installed(
                "opentelemetry.exporter.otlp.proto.http"
            ):
                raise TracingError(
                    "OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf needs the package "
                    "opentelemetry-exporter-otlp-proto-http (pip install it), or use grpc"
                )
        return cls(exporters, protocol)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def tracing_from_environ(environ: Mapping[str, str] | None = None) -> Tracing | None:
    """This process's tracing, or None when the variables leave it off (nothing imported)."""
    config = TracingConfig.from_environ(environ)
    if not config.on:
        return None
    try:
        return Tracing(config)
    except TracingError:
        raise
    except ValueError as exc:  # e.g. OTEL_PROPAGATORS naming a propagator not installed
        raise TracingError(f"OpenTelemetry refused its OTEL_* variables: {exc}") from exc


def convserve_version() -> str:
    try:
        return importlib.metadata.version("convserve")
    except importlib.metadata.PackageNotFoundError:
        return ""


def tracer_provider(config: TracingConfig, service: str) -> TracerProvider:
    """An SDK tracer provider of our own (never the global one: every server, and every test
    server in one process, has its own), exporting as `config` says, the sampler and the
    rest from the standard variables. `service` is the service name unless
    OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES gives one."""
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    ours: dict[str, str | int] = {
        "service.name": service,
        "service.version": convserve_version(),
        "process.pid": os.getpid(),
    }
    resource = Resource.create(ours).merge(OTELResourceDetector().detect())
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    for name in config.exporters:
        exporter = _otlp_exporter(config.protocol) if name == "otlp" else ConsoleSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def _otlp_exporter(protocol: str) -> Any:
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter()  # endpoint, headers, TLS, timeout: OTEL_EXPORTER_OTLP_*


def model_attributes(name: str, version: int, provider: str) -> dict[str, str | int]:
    """What spans say about the model version a batcher serves."""
    return {MODEL: name, VERSION: version, PROVIDER: provider}


class Tracing:
    """One process's tracing: its tracer provider and exporters, the sampler TraceSetting
    controls, and the spans of calls and batches."""

    def __init__(self, config: TracingConfig, service: str = DEFAULT_SERVICE):
        from opentelemetry import propagate
        from opentelemetry.context import Context
        from opentelemetry.trace import Link, SpanKind, StatusCode, set_span_in_context

        self.config = config
        self.provider = tracer_provider(config, service)
        self.sampler = Switch(self.provider.sampler, rate_of_environ(os.environ))
        # before the tracer, which keeps the provider's (Switch is a duck-typed Sampler)
        self.provider.sampler = self.sampler  # type: ignore[assignment]
        self.tracer = self.provider.get_tracer(TRACER_NAME, convserve_version())
        self._propagator = propagate.get_global_textmap()  # OTEL_PROPAGATORS
        self._root = Context()  # no parent: a batch span starts a trace of its own
        self._link = Link
        self._server = SpanKind.SERVER
        self.error_status = StatusCode.ERROR
        self.in_context = set_span_in_context

    def call(
        self, name: str, carrier: Mapping[str, str], attributes: Mapping[str, Any]
    ) -> CallTrace | None:
        """Start a call's SERVER span, the child of the caller's context in `carrier` (gRPC
        metadata or HTTP headers), and make it the current call of this task until its
        `end`. None when the sampler drops it: nothing more is recorded for the call."""
        started = time.monotonic()
        offset = time.time_ns() - time.monotonic_ns()
        span = self.tracer.start_span(
            name,
            context=self._propagator.extract(carrier),
            kind=self._server,
            attributes=attributes,
            start_time=int(started * 1e9) + offset,
        )
        if not span.is_recording():
            return None
        trace = CallTrace(self, span, started, offset)
        trace.token = _CALL.set(trace)
        return trace

    def batch(
        self,
        calls: Sequence[CallTrace],
        start: float,
        took: float,
        rows: int,
        requests: int,
        attributes: Mapping[str, Any],
    ) -> None:
        """One ONNX Runtime run from `start` (a time.monotonic() value) for `took` seconds,
        of `rows` rows for `requests` calls of which `calls` are traced: its batch span,
        linked to theirs, and each call's compute span, linked to it."""
        end = start + took
        offset = calls[0].offset  # the times of its first call's spans, to the nanosecond
        span = self.tracer.start_span(
            BATCH,
            context=self._root,
            links=[self._link(c.span.get_span_context()) for c in calls],
            attributes={**attributes, BATCH_SIZE: rows, BATCH_REQUESTS: requests},
            start_time=int(start * 1e9) + offset,
        )
        span.end(end_time=int(end * 1e9) + offset)
        link = [self._link(span.get_span_context())]
        for c in calls:
            c.child(COMPUTE, start, end, {BATCH_SIZE: rows}, link)

    @property
    def exporters(self) -> tuple[str, ...]:
        return self.config.exporters

    def shutdown(self) -> None:
        """Export what is still buffered (bounded by the exporter's timeout) and stop."""
        self.provider.shutdown()


def record_batch(
    calls: Sequence[CallTrace],
    start: float,
    took: float,
    rows: int,
    requests: int,
    attributes: Mapping[str, Any],
) -> None:
    """The batcher's report of a run that served traced `calls` (Tracing.batch)."""
    calls[0].tracing.batch(calls, start, took, rows, requests, attributes)


class CallTrace:
    """One traced call: its SERVER span and the spans of its steps, written from the times
    the batcher reports (time.monotonic() values)."""

    __slots__ = ("context", "offset", "span", "started", "token", "tracing")

    def __init__(self, tracing: Tracing, span: Span, started: float, offset: int):
        self.tracing = tracing
        self.span = span
        self.context = tracing.in_context(span)  # the parent of its steps' spans
        self.started = started
        self.offset = offset  # wall-clock ns minus monotonic ns when the call started
        self.token: contextvars.Token | None = None

    def child(
        self,
        name: str,
        start: float,
        end: float,
        attributes: Mapping[str, Any] | None = None,
        links: Sequence[Any] | None = None,
    ) -> None:
        span = self.tracing.tracer.start_span(
            name,
            context=self.context,
            attributes=attributes,
            links=links,
            start_time=int(start * 1e9) + self.offset,
        )
        span.end(end_time=int(end * 1e9) + self.offset)

    def queued(
        self, enqueued: float, taken: float, rows: int, attributes: Mapping[str, Any]
    ) -> None:
        """Its rows joined the queue at `enqueued` and a batch took them at `taken`, for the
        model version that `attributes` describe."""
        self.span.set_attributes({**attributes, IMAGES: rows})
        self.child(DECODE, self.started, enqueued)
        self.child(QUEUE, enqueued, taken)

    def end_rpc(self, code: int) -> None:
        """End a gRPC call that finished with status `code` (a number: 0 is OK)."""
        self.span.set_attribute("rpc.grpc.status_code", code)
        if code in GRPC_SERVER_ERRORS:
            self.span.set_status(self.tracing.error_status)
        self._end()

    def end_http(self, status: int) -> None:
        """End an HTTP call answered with `status` (5xx is the server's error)."""
        self.span.set_attribute("http.response.status_code", status)
        if status >= 500:
            self.span.set_status(self.tracing.error_status)
        self._end()

    def _end(self) -> None:
        if self.token is not None:
            _CALL.reset(self.token)
            self.token = None
        self.span.end(end_time=time.monotonic_ns() + self.offset)
