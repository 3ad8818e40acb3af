"""What Triton's TraceSetting RPC reads and changes in a running server's tracing
(serving.tracing): the sampler every span asks, switched off and on (trace_level OFF or
TIMESTAMPS) and given a rate (trace_rate N: one call in N). What OpenTelemetry's SDK cannot
change at run time (the exporter, a count of traces, a trace file) is reported with the one
value it has, and a change of it refused.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from serving.errors import FailedPrecondition, InvalidInput

BATCH = "batch"  # serving.tracing's span of one ONNX Runtime run


class Switch:
    """The sampler TraceSetting controls: off, it drops every span; on, it asks `delegate`
    (the environment's sampler, or the one a trace_rate set). A batch span (a root with
    links) is sampled when a call it served is. Duck-typed as an SDK Sampler (the SDK only
    calls these two methods), so that nothing of the SDK is imported while tracing is off."""

    def __init__(self, initial: Any, rate: str):
        from opentelemetry.sdk.trace.sampling import Decision, SamplingResult

        self.on = True
        self.initial = (initial, rate)
        self.delegate, self.rate = initial, rate
        self._drop = SamplingResult(Decision.DROP)
        self._sampled = functools.partial(SamplingResult, Decision.RECORD_AND_SAMPLE)

    def should_sample(
        self,
        parent_context: Any,
        trace_id: int,
        name: str,
        kind: Any = None,
        attributes: Any = None,
        links: Any = None,
        trace_state: Any = None,
    ) -> Any:
        if not self.on:
            return self._drop
        if links and name == BATCH:  # the span gets the attributes a sampler returns
            sampled = any(link.context.trace_flags.sampled for link in links)
            return self._sampled(attributes) if sampled else self._drop
        return self.delegate.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"convserve{{{'on' if self.on else 'off'},{self.delegate.get_description()}}}"

    def one_in(self, n: int) -> None:
        """Sample one call in `n` (0: none) of those whose caller did not decide."""
        from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, TraceIdRatioBased

        self.delegate = ParentBased(TraceIdRatioBased(1 / n) if n else ALWAYS_OFF)
        self.rate = str(n)


def rate_of_environ(env: Mapping[str, str]) -> str:
    """Triton's trace_rate (one call in N; 0: none) of the standard sampler variables, or ""
    for a sampler that is not a rate."""
    name = env.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    if name in ("always_on", "parentbased_always_on"):
        return "1"
    if name in ("always_off", "parentbased_always_off"):
        return "0"
    if name in ("traceidratio", "parentbased_traceidratio"):
        try:
            ratio = float(env.get("OTEL_TRACES_SAMPLER_ARG", "1"))
        except ValueError:
            ratio = 1.0  # as the SDK does
        return str(round(1 / ratio)) if ratio > 0 else "0"
    return ""


# ----------------------------------------------------------------------------- the RPC
# Triton's keys this server reports; what it cannot change keeps the one value it allows.
FIXED = {"trace_count": "-1", "log_frequency": "0", "trace_file": "", "trace_mode": "opentelemetry"}
WHY_FIXED = {
    "trace_count": "every sampled call is traced (no count limit)",
    "log_frequency": "spans go to the exporter, not to a trace file",
    "trace_file": "spans go to the exporter (OTEL_EXPORTER_OTLP_ENDPOINT), not to a file",
    "trace_mode": "this server traces with OpenTelemetry only",
}
LEVELS = ("OFF", "TIMESTAMPS")


class Traced(Protocol):
    """What TraceSetting needs of a server's tracing (serving.tracing.Tracing)."""

    @property
    def sampler(self) -> Switch: ...

    @property
    def exporters(self) -> tuple[str, ...]: ...


def trace_setting(
    tracing: Traced | None, model: str, changes: Mapping[str, Sequence[str]]
) -> dict[str, list[str]]:
    """Triton's TraceSetting: apply `changes` (a key with no value returns it to how the
    server started), then report. Checks every change before applying any (InvalidInput);
    turning tracing on or changing its rate in a server started without it is
    FailedPrecondition."""
    if model and changes:
        raise InvalidInput("trace settings are server-wide here: change them without a model name")
    level, rate = _checked(tracing, changes)
    if tracing is not None:
        s = tracing.sampler
        if level is not None:
            s.on = (level == "TIMESTAMPS") if level else True
        if rate is not None:
            if rate:
                s.one_in(int(rate))
            else:
                s.delegate, s.rate = s.initial
    on = tracing is not None and tracing.sampler.on
    out = {
        "trace_level": ["TIMESTAMPS" if on else "OFF"],
        "trace_rate": [tracing.sampler.rate if tracing is not None else "0"],
        **{key: [value] for key, value in FIXED.items()},
    }
    if tracing is not None:
        out["sampler"] = [tracing.sampler.delegate.get_description()]
        out["exporter"] = list(tracing.exporters)
    return out


def _checked(
    tracing: Traced | None, changes: Mapping[str, Sequence[str]]
) -> tuple[str | None, str | None]:
    """(new level, new rate) from `changes`: None for unchanged, "" for back to the start."""
    level = rate = None
    for key, values in changes.items():
        values = [v.strip() for v in values]
        if key == "trace_level":
            asked = sorted({v.upper() for v in values})
            if "TENSORS" in asked:
                raise InvalidInput("trace_level TENSORS is not traced: spans carry times only")
            if len(asked) > 1 or (asked and asked[0] not in LEVELS):
                raise InvalidInput(f"trace_level must be OFF or TIMESTAMPS, not {values}")
            level = asked[0] if asked else ""
        elif key == "trace_rate":
            if len(values) > 1 or (values and not (values[0].isascii() and values[0].isdigit())):
                raise InvalidInput(f"trace_rate must be a whole number >= 0, not {values}")
            rate = values[0] if values else ""
        elif key in FIXED:
            if values not in ([], [FIXED[key]]):
                raise InvalidInput(f"{key} can only be {FIXED[key]!r}: {WHY_FIXED[key]}")
        else:
            raise InvalidInput(f"unknown trace setting {key!r}")
    if tracing is None and (level == "TIMESTAMPS" or rate):
        raise FailedPrecondition(
            "tracing is off in this server: start it with OTEL_TRACES_EXPORTER=otlp (and "
            "OTEL_EXPORTER_OTLP_ENDPOINT) to trace; TraceSetting then switches it off and on"
        )
    return level, rate
