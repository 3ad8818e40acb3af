"""The caller's trace context, sent with each call: when OpenTelemetry is installed and a span
is current where the client is called, its W3C `traceparent` (and `tracestate`, baggage:
whatever OTEL_PROPAGATORS names) go into the call's metadata, so the server's spans join the
caller's trace. Nothing is sent otherwise, and nothing of OpenTelemetry is imported before
the first call. A command (cnn-predict) takes its caller's context from its environment
(`command_trace`)."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any


@functools.cache
def _api() -> tuple[Any, Any] | None:
    try:
        from opentelemetry import propagate, trace
    except ImportError:  # a client installed without OpenTelemetry: nothing to propagate
        return None
    except ValueError as exc:  # OTEL_PROPAGATORS naming a propagator not installed
        logging.getLogger("convserve.client").warning("trace context not sent: %s", exc)
        return None
    return propagate, trace


def trace_metadata() -> tuple[tuple[str, str], ...]:
    """The current context as call metadata, or () when no span is current."""
    api = _api()
    if api is None:
        return ()
    propagate, trace = api
    if not trace.get_current_span().get_span_context().is_valid:
        return ()
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items())


@contextlib.contextmanager
def command_trace(name: str, environ: Mapping[str, str] | None = None) -> Iterator[None]:
    """Run a command (cnn-predict) in its caller's trace: the W3C context in the variables
    TRACEPARENT / TRACESTATE / BAGGAGE (the environment carrier OpenTelemetry specifies for
    processes) becomes current, so every call the command makes carries it (serving.client
    sends the current context). With OTEL_TRACES_EXPORTER set, as for the server, the
    command also records a span `name` of its own around them, exported before it exits."""
    from serving.tracing import (
        TRACER_NAME,
        TracingConfig,
        TracingError,
        convserve_version,
        tracer_provider,
    )

    env = os.environ if environ is None else environ
    carrier = {k.lower(): env[k] for k in ("TRACEPARENT", "TRACESTATE", "BAGGAGE") if env.get(k)}
    config = TracingConfig.from_environ(env)
    if not carrier and not config.on:
        yield
        return
    try:
        from opentelemetry import context, propagate
    except ValueError as exc:  # OTEL_PROPAGATORS naming a propagator not installed
        raise TracingError(f"OpenTelemetry refused its OTEL_* variables: {exc}") from exc

    token = context.attach(propagate.extract(carrier))
    try:
        if not config.on:
            yield
            return
        provider = tracer_provider(config, name)
        try:
            with provider.get_tracer(TRACER_NAME, convserve_version()).start_as_current_span(name):
                yield
        finally:
            provider.shutdown()
    finally:
        context.detach(token)
