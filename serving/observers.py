"""What the server's parts report, as metric updates (the metrics themselves are defined in
serving.metrics): a version's batcher observations (ModelObserver, children bound once for
the hot path), the repository's events (MetricsEvents) and each version's monitor counts
(flush_monitor, once a second and when a version retires).
"""

from __future__ import annotations

from typing import Any

from serving.batcher import BatchObserver
from serving.metrics import Metrics
from serving.repository import ModelVersion, RepositoryEvents


class ModelObserver(BatchObserver):
    """Batcher observations for one model version, with children bound once (hot path)."""

    def __init__(self, m: Metrics, model: str, version: str):
        self._depth = m.queue_depth.labels(model, version)
        self._wait = m.queue_wait.labels(model, version)
        self._compute = m.compute.labels(model, version)
        self._size = m.batch_size.labels(model, version)
        self._items = m.items.labels(model, version)
        self._dropped = {
            r: m.dropped_rows.labels(model, version, r) for r in ("deadline", "cancelled", "failed")
        }
        self._abandoned = m.abandoned_rows.labels(model, version)

    def queue_depth(self, rows: int) -> None:
        self._depth.set(rows)

    def queue_wait(self, seconds: float) -> None:
        self._wait.observe(seconds)

    def batch(self, size: int, seconds: float, requests: int = 1, assembly: float = 0.0) -> None:
        self._compute.observe(seconds)
        self._size.observe(size)
        self._items.inc(size)

    def dropped(self, rows: int, reason: str) -> None:
        self._dropped[reason].inc(rows)

    def abandoned(self, rows: int) -> None:
        self._abandoned.inc(rows)


class MetricsEvents(RepositoryEvents):
    """Repository events as metrics: loads, failures, swaps and the model info gauge."""

    def __init__(self, metrics: Metrics):
        self.m = metrics
        self._live = 0
        self._refused: set[tuple[str, int, str]] = set()  # refused_version gauges set to 1

    def load(self, model: str, version: int, ok: bool, reason: str = "") -> None:
        if ok:
            self.m.model_loads.labels(model).inc()
        else:
            self.m.model_load_failures.labels(model, reason).inc()
        # A version's refusal is current until it is refused again or it (or a newer one) loads.
        for key in [k for k in self._refused if k[0] == model and k[1] <= version]:
            if ok or key[1] == version:
                self.m.model_refused.labels(key[0], str(key[1]), key[2]).set(0)
                self._refused.discard(key)
        if not ok:
            self.m.model_refused.labels(model, str(version), reason).set(1)
            self._refused.add((model, version, reason))

    def changed(self, model: str, version: int, event: str) -> None:
        self.m.model_files_changed.labels(model, event).inc()

    def writable(self, folders: dict[str, int]) -> None:
        for who, count in folders.items():
            self.m.repository_writable.labels(who).set(count)

    def swap(self, model: str, old: int | None, new: int) -> None:
        if old is not None:
            self.m.model_swaps.labels(model).inc()

    def info(self, mv: ModelVersion, live: bool) -> None:
        s = mv.session
        labels = (mv.name, str(mv.version), s.provider, str(mv.opset), s.requested_device)
        self.m.model_info.labels(*labels).set(1 if live else 0)
        self._reference(mv, live)
        self.m.provider_fallback.labels(mv.name).set(1 if s.fallback else 0)
        self._live += 1 if live else -1
        self.m.models_loaded.set(self._live)

    def retired(self, mv: ModelVersion) -> None:
        flush_monitor(self.m, mv)  # what its last requests predicted

    def observer(self, model: str, version: int) -> BatchObserver:
        return ModelObserver(self.m, model, str(version))

    def _reference(self, mv: ModelVersion, live: bool) -> None:
        """The test set's class shares while `mv` is served (0 once it is not), and every
        class's prediction counter at 0 from the start: a class the window never predicts
        is then a 0 share in the drift rule, not a missing series."""
        name, version = mv.name, str(mv.version)
        fractions = mv.manifest.monitoring.class_fractions if mv.manifest.monitoring else None
        if live:
            self.m.ood_flagged.labels(name, version)
        for i, label in enumerate(mv.labels):
            if live:
                self.m.predictions.labels(name, version, label)
            if fractions is not None:
                share = fractions[i] if live else 0.0
                self.m.reference_class_fraction.labels(name, version, label).set(share)


def flush_monitor(m: Metrics, mv: ModelVersion) -> None:
    """Add what `mv`'s monitor counted since the last flush to the prediction metrics."""
    counts = mv.monitor.take()
    if not m.enabled or not counts.images:
        return
    model, version = mv.name, str(mv.version)
    for i in counts.classes.nonzero()[0]:
        m.predictions.labels(model, version, mv.labels[i]).inc(int(counts.classes[i]))
    child = m.prediction_confidence.labels(model, version)
    _observe_counts(child, counts.confidence, counts.confidence_sum)
    child = m.input_intensity.labels(model, version)
    _observe_counts(child, counts.intensity, counts.intensity_sum)
    if counts.flagged:
        m.ood_flagged.labels(model, version).inc(counts.flagged)


def _observe_counts(child: Any, counts: Any, total: float) -> None:
    """Observe many values at once into a labelled Histogram child: `counts` per bucket
    (the histogram's own bounds, without +Inf) and their sum. prometheus_client keeps a
    child's buckets uncumulated (observe() adds 1 to the first bucket whose bound is >= the
    value) and cumulates them when collected, so adding each bucket's count is observe()
    of every value, at one update per bucket instead of one per value."""
    for bucket, n in zip(child._buckets, counts, strict=False):
        if n:
            bucket.inc(int(n))
    child._sum.inc(total)
