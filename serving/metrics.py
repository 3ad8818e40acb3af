"""Every Prometheus metric convserve exports, defined once, with help text and units.

A registry is passed in (tests build a fresh one). With `--workers N` the server runs in
prometheus_client's multiprocess mode: gauges declare how they combine across workers
(`livesum` for queue depth and in-flight requests, `livemax` for model info, `liveall` for
per-worker process figures) and counters of dead workers stay in the totals.
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from serving.contract import CONFIDENCE_BUCKETS, INTENSITY_BUCKETS
from serving.runboard import process_board

LATENCY_BUCKETS = (
    5e-4,
    1e-3,
    2e-3,
    3e-3,
    5e-3,
    7.5e-3,
    0.01,
    0.02,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
)
QUEUE_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
COMPUTE_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _Off:
    """Stands in for every metric when metrics are off: every update is a no-op. The hot
    ones are plain methods (cheaper than the catch-all below), so the metrics-off baseline
    really costs nothing."""

    def labels(self, *args: object, **kwargs: object) -> _Off:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, value: float) -> None:
        pass

    def __getattr__(self, name: str) -> _Off:
        return self

    def __call__(self, *args: object, **kwargs: object) -> _Off:
        return self


_OFF = _Off()


class Metrics:
    """The metric objects, created once per registry.

    With `enabled=False` nothing is recorded (every metric is a no-op): the server's
    `--no-metrics`, which exists so the benchmark can price metrics (on versus off).
    """

    def __init__(self, registry: CollectorRegistry | None = None, enabled: bool = True):
        r = registry if registry is not None else CollectorRegistry()
        if not enabled:  # the metrics are built, then replaced: none reaches a registry used
            r = CollectorRegistry()
        self.registry = r
        self.enabled = enabled
        # Labelled children of the per-request metrics, resolved once per label set:
        # `.labels()` costs a lock and a dict lookup on every request otherwise.
        self._request_children: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self.requests = Counter(
            "convserve_requests_total",
            "Calls handled, by method, status code (gRPC's name, or the HTTP status) and "
            "protocol (grpc or http).",
            ["method", "code", "protocol"],
            registry=r,
        )
        self.request_latency = Histogram(
            "convserve_request_duration_seconds",
            "End-to-end call latency in the server, from handler start to response.",
            ["method", "protocol"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.items = Counter(
            "convserve_inference_items_total",
            "Images run through the model (rows of computed batches).",
            ["model", "version"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "convserve_queue_wait_seconds",
            "Time a request waited in the batcher queue before its batch started.",
            ["model", "version"],
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.compute = Histogram(
            "convserve_batch_compute_seconds",
            "ONNX Runtime time per batch.",
            ["model", "version"],
            buckets=COMPUTE_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "convserve_batch_size",
            "Rows (images) per ONNX Runtime run.",
            ["model", "version"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.dropped_rows = Counter(
            "convserve_dropped_rows_total",
            "Rows (images) dropped before ONNX Runtime saw them: their deadline passed while "
            "queued (deadline), their caller went away (cancelled), or a split request's "
            "other part failed (failed).",
            ["model", "version", "reason"],
            registry=r,
        )
        self.abandoned_rows = Counter(
            "convserve_abandoned_rows_total",
            "Rows (images) computed for a caller that left (cancelled or past its deadline) "
            "while their batch was running: computed for nobody.",
            ["model", "version"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "convserve_queue_depth",
            "Rows (images) waiting in the batcher queue.",
            ["model", "version"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.inflight = Gauge(
            "convserve_inflight_requests",
            "Calls (gRPC and HTTP) being handled right now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.rejected = Counter(
            "convserve_rejected_requests_total",
            "Requests refused or dropped before compute, by reason.",
            ["reason"],
            registry=r,
        )
        self.auth_failures = Counter(
            "convserve_auth_failures_total",
            "Calls refused by token auth, by endpoint group ('none': a method in no group) "
            "and status code (UNAUTHENTICATED or PERMISSION_DENIED).",
            ["group", "code"],
            registry=r,
        )
        self.model_loads = Counter(
            "convserve_model_loads_total",
            "Model versions loaded and warmed.",
            ["model"],
            registry=r,
        )
        self.model_load_failures = Counter(
            "convserve_model_load_failures_total",
            "Model versions refused at load (the previous version keeps serving), by reason "
            "(serving.model.REFUSALS: manifest, checksum, too_large, corrupt, "
            "external_data, custom_op, contract, metadata, ...).",
            ["model", "reason"],
            registry=r,
        )
        self.model_refused = Gauge(
            "convserve_model_version_refused",
            "1 for a model version that was refused at load and is not served (until a valid "
            "version at least as new loads), with the reason.",
            ["model", "version", "reason"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.model_files_changed = Counter(
            "convserve_model_files_changed_total",
            "Served versions whose folder was deleted or changed under the running server "
            "(they keep serving from memory), by event (deleted, changed).",
            ["model", "event"],
            registry=r,
        )
        self.repository_writable = Gauge(
            "convserve_repository_writable_folders",
            "Model repository folders writable by users other than their owner, by who "
            "(group, other): whoever can write there chooses what the server runs.",
            ["who"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.model_swaps = Counter(
            "convserve_model_swaps_total",
            "Hot swaps from one served version to a newer one.",
            ["model"],
            registry=r,
        )
        self.model_info = Gauge(
            "convserve_model_info",
            "1 for each model version being served, with its execution provider and opset.",
            ["model", "version", "provider", "opset", "requested_device"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.provider_fallback = Gauge(
            "convserve_execution_provider_fallback",
            "1 when a model runs on the CPU although --device auto wanted a GPU provider.",
            ["model"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.models_loaded = Gauge(
            "convserve_models_loaded",
            "Model versions currently served.",
            registry=r,
            multiprocess_mode="livemax",
        )
        # What the model predicts, against its test set (serving.monitor). Updated once a
        # second from each version's running counts (flush_monitor), not per image.
        self.predictions = Counter(
            "convserve_predictions_total",
            "Images answered by Predict, PredictStream and ModelInfer (not Explain), by the "
            "predicted (top-1) class. Drift: compare the classes' shares with "
            "convserve_reference_class_fraction.",
            ["model", "version", "class"],
            registry=r,
        )
        self.prediction_confidence = Histogram(
            "convserve_prediction_confidence",
            "Top-1 probability of each answered image (the manifest's monitoring has the "
            "test set's shares over the same buckets).",
            ["model", "version"],
            buckets=CONFIDENCE_BUCKETS,
            registry=r,
        )
        self.input_intensity = Histogram(
            "convserve_input_mean_intensity",
            "Mean pixel intensity (0 black .. 1 white) of each answered image, as the model "
            "saw it.",
            ["model", "version"],
            buckets=INTENSITY_BUCKETS,
            registry=r,
        )
        self.ood_flagged = Counter(
            "convserve_ood_flagged_total",
            "Answered images flagged out of distribution: score (serving.monitor) above the "
            "version's threshold, its test set's 95th percentile (~5% of in-distribution images).",
            ["model", "version"],
            registry=r,
        )
        self.reference_class_fraction = Gauge(
            "convserve_reference_class_fraction",
            "Share of the version's test-set images predicted in each class (its manifest's "
            "monitoring.class_fractions): the baseline prediction drift is measured against.",
            ["model", "version", "class"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.process_cpu = Gauge(
            "convserve_process_cpu_seconds",
            "CPU time (user + system) of this worker process.",
            registry=r,
            multiprocess_mode="liveall",
        )
        self.process_rss = Gauge(
            "convserve_process_resident_memory_bytes",
            "Resident memory of this worker process.",
            registry=r,
            multiprocess_mode="liveall",
        )
        self.process_fds = Gauge(
            "convserve_process_open_fds",
            "Open file descriptors of this worker process.",
            registry=r,
            multiprocess_mode="liveall",
        )
        self.cpu_runs = Counter(
            "convserve_cpu_runs_total",
            "ORT runs on the CPU by the cores they took (serving.runboard): 'all' when the run "
            "found no other in flight on the server, 'share' when it ran on this worker's "
            "share. Counted only where runs can borrow idle cores (several workers or lanes).",
            ["cores"],
            registry=r,
        )
        self._runs_counted = (0, 0)
        # Sampled captures (serving.capture): each sampled image is captured or dropped.
        self.captured = Counter(
            "convserve_captured_images_total",
            "Images written to --capture-dir (a PNG and its JSON line).",
            ["model"],
            registry=r,
        )
        self.capture_dropped = Counter(
            "convserve_capture_dropped_images_total",
            "Images sampled for capture but not written, by reason (serving.capture.REASONS: "
            "queue_full, write_error, too_large, shutdown); the request is answered anyway.",
            ["model", "reason"],
            registry=r,
        )
        self.capture_evicted = Counter(
            "convserve_capture_evicted_images_total",
            "Captured images deleted, oldest first, to stay within --capture-max-bytes.",
            registry=r,
        )
        self.capture_bytes = Gauge(
            "convserve_capture_bytes",
            "Bytes of the files the server's captures hold in --capture-dir.",
            registry=r,
            multiprocess_mode="livesum",
        )

        if not enabled:
            for name, value in list(vars(self).items()):
                if isinstance(value, Counter | Gauge | Histogram):
                    setattr(self, name, _OFF)
        self.update_process()

    def request_done(self, method: str, code: str, seconds: float, protocol: str = "grpc") -> None:
        """Count one call by method, status code and protocol and observe its latency."""
        key = (method, code, protocol)
        children = self._request_children.get(key)
        if children is None:
            children = (
                self.requests.labels(method, code, protocol),
                self.request_latency.labels(method, protocol),
            )
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def update_process(self) -> None:
        """Refresh this worker's CPU, memory and fd gauges (called periodically; in
        multiprocess mode prometheus_client adds a `pid` label to each, liveall) and count
        its runs since the last call by the cores they took."""
        ru = resource.getrusage(resource.RUSAGE_SELF)
        self.process_cpu.set(ru.ru_utime + ru.ru_stime)
        self.process_rss.set(_rss_bytes())
        with contextlib.suppress(OSError):
            self.process_fds.set(len(os.listdir("/proc/self/fd")))
        board = process_board()
        if board is not None:
            runs, wide = board.counts()
            then, wide_then = self._runs_counted
            self.cpu_runs.labels("all").inc(wide - wide_then)
            self.cpu_runs.labels("share").inc(runs - wide - (then - wide_then))
            self._runs_counted = (runs, wide)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RequestTimer:
    """Counts a call by method, status code and protocol and observes its latency."""

    __slots__ = ("_metrics", "_start", "method", "protocol")

    def __init__(self, metrics: Metrics, method: str, protocol: str = "grpc"):
        self._metrics = metrics
        self.method = method
        self.protocol = protocol
        self._start = time.perf_counter()

    def done(self, code: str) -> None:
        elapsed = time.perf_counter() - self._start
        self._metrics.request_done(self.method, code, elapsed, self.protocol)
