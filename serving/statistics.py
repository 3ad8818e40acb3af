"""Cumulative inference statistics of one model version, as Triton reports them
(ModelStatistics: success, fail, queue, compute input / infer / output, per-batch-size
figures), so tools built for Triton's statistics (perf_analyzer's server-side split,
dashboards) read ours unchanged.

It sits between the batcher and the metrics observer: every batcher observation passes
through (and on to Prometheus); the data plane adds what only it sees (each request's
outcome and end-to-end time, and the time spent turning outputs into answers). Counts of
the compute durations are per request, as Triton's: a batch serving k requests adds k and
k x its duration. Everything here runs on the event loop; no lock is needed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from serving.batcher import BatchObserver


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(seconds * 1e9) * count


@dataclass
class BatchFigures:
    count: int = 0
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)


class InferenceStatistics:
    """Triton's ModelStatistics of one version since it was loaded."""

    def __init__(self, inner: BatchObserver | None = None):
        self._inner = inner
        self.success = Duration()
        self.fail = Duration()
        self.queue = Duration()
        self.compute_input = Duration()
        self.compute_infer = Duration()
        self.compute_output = Duration()
        self.inference_count = 0  # images computed
        self.execution_count = 0  # ONNX Runtime runs
        self.last_inference_ms = 0  # wall clock, ms since the epoch (0: none yet)
        self.batches: dict[int, BatchFigures] = {}

    # -- what the data plane records ---------------------------------------------------
    def request(self, ok: bool, seconds: float) -> None:
        (self.success if ok else self.fail).add(seconds)

    def output(self, seconds: float) -> None:
        self.compute_output.add(seconds)

    # -- the batcher's observations (BatchObserver), passed on to the metrics -----------
    def queue_depth(self, rows: int) -> None:
        if self._inner is not None:
            self._inner.queue_depth(rows)

    def queue_wait(self, seconds: float) -> None:
        self.queue.add(seconds)
        if self._inner is not None:
            self._inner.queue_wait(seconds)

    def batch(self, size: int, seconds: float, requests: int = 1, assembly: float = 0.0) -> None:
        self.execution_count += 1
        self.inference_count += size
        self.last_inference_ms = int(time.time() * 1000)
        self.compute_infer.add(seconds, requests)
        self.compute_input.add(assembly, requests)
        figures = self.batches.setdefault(size, BatchFigures())
        figures.count += 1
        figures.compute_infer.add(seconds)
        figures.compute_input.add(assembly)
        if self._inner is not None:
            self._inner.batch(size, seconds, requests, assembly)

    def dropped(self, rows: int, reason: str) -> None:
        if self._inner is not None:
            self._inner.dropped(rows, reason)

    def abandoned(self, rows: int) -> None:
        if self._inner is not None:
            self._inner.abandoned(rows)


class RequestClock:
    """Times one request for its version's statistics: `with clock:` around the whole
    request (an exception counts it as failed), `clock.computed()` once the batch answered
    (what follows is compute output)."""

    __slots__ = ("_computed", "_start", "_stats")

    def __init__(self, stats: InferenceStatistics):
        self._stats = stats
        self._start = time.perf_counter()
        self._computed = 0.0

    def computed(self) -> None:
        self._computed = time.perf_counter()

    def __enter__(self) -> RequestClock:
        return self

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        now = time.perf_counter()
        if kind is None and self._computed:
            self._stats.output(now - self._computed)
        self._stats.request(kind is None, now - self._start)
