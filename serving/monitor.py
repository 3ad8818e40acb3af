"""Watching the model in production against what it did on its test set.

Latency and errors say the server is healthy, not that the model still is. Three figures
do, each measured the same way on the test set by the exporter (`profile`, written to the
manifest's `monitoring`) and on every served image here (`Monitor`):

- the predicted class: its distribution over a window, compared with the test set's by the
  population stability index (PSI), which the recording rule
  `job_model_version:convserve_prediction_drift:psi_rate30m` computes from the summed
  per-class counters, so any number of workers combine;
- the top-1 probability, and the image's mean pixel intensity (0..1), as histograms over
  the contract's buckets;
- an out-of-distribution score per image, from the model's own logits: among the test images
  given the same answer, how unusual its energy -logsumexp(logits) is (high: no class fits;
  Liu et al. 2020) and how unusual its logit norm is (low: little evidence for any class,
  the softmax picking one anyway), as percentiles from the manifest's per-class tables; the
  score is the larger of the two (0..1). An image is flagged when its score is above the
  test set's 95th percentile of the score, so 5% of test images are flagged by construction
  (the false-positive rate the manifest records). Why both: on the default recipe's model,
  energy alone separates handwritten digits (AUROC 0.99) but not photos of noise, which it
  calls "Bag" with a typical energy and a low norm (BENCHMARKS.md, `make bench-ood`).

`Monitor.observe` runs on the request path and computes only the score the answer carries;
`Monitor.take` counts what was answered since and hands the counts to the metrics once a
second, so Prometheus sees every image without a metric update per image. Explain's
occluded variants are never observed: they are not production traffic.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass

import numpy as np

from serving.contract import (
    CONFIDENCE_BUCKETS,
    INTENSITY_BUCKETS,
    OOD_SCORE,
    Manifest,
    Monitoring,
)

OOD_FALSE_POSITIVE_RATE = 0.05  # the share of test images above the flag threshold
QUANTILES = 101  # points of each class's quantile tables in the manifest (every 1%)
# Images a Monitor keeps for counting before it counts them on the request path (their
# rows and outputs: ~50 MB at 28x28x1 and 10 classes).
MAX_PENDING_ROWS = 65_536


def energy(logits: np.ndarray) -> np.ndarray:
    """The energy of each row of (N, K) logits, -logsumexp, float64: higher when no class
    fits."""
    x = np.asarray(logits, dtype=np.float64)
    top = x.max(axis=1)
    return -(top + np.log(np.exp(x - top[:, None]).sum(axis=1)))


def logit_norm(logits: np.ndarray) -> np.ndarray:
    """The L2 norm of each row of (N, K) logits, float64: lower when the evidence is weak."""
    return np.sqrt(np.square(np.asarray(logits, dtype=np.float64)).sum(axis=1))


def quantile_tables(values: np.ndarray, classes: np.ndarray, k: int) -> np.ndarray:
    """(k, QUANTILES): per class, the quantiles of `values` at 0, 1/(Q-1), ... 1 (NaN rows
    for a class with no value)."""
    q = np.linspace(0.0, 1.0, QUANTILES)
    rows = [
        np.quantile(values[classes == c], q) if (classes == c).any() else None for c in range(k)
    ]
    return np.stack([r if r is not None else np.full(QUANTILES, np.nan) for r in rows])


def percentiles(values: np.ndarray, classes: np.ndarray, tables: np.ndarray) -> np.ndarray:
    """Where each value lies among its class's quantiles (0..1, linear between them); 1.0
    for a class whose table is empty (no test image was given it: unusual by itself)."""
    rows = tables[classes]  # (N, Q)
    qn = rows.shape[1]
    below = (rows < values[:, None]).sum(axis=1)  # quantiles under the value: 0..Q
    lo, hi = np.maximum(below - 1, 0), np.minimum(below, qn - 1)
    r = np.arange(len(values))
    x0 = rows[r, lo]
    span = rows[r, hi] - x0
    frac = np.divide(values - x0, span, out=np.ones_like(span), where=span > 0)
    p = (lo + np.clip(frac, 0.0, 1.0, out=frac)) / (qn - 1)
    p[below == 0] = 0.0
    p[below == qn] = 1.0
    p[np.isnan(rows[:, 0])] = 1.0
    return p


def _percentile(value: float, row: list[float] | None) -> float:
    """`percentiles` of one value among one class's quantiles (None: an empty table), in
    plain Python: a single-image request's score costs a few microseconds this way, where
    numpy's per-call overhead makes it tens."""
    if row is None:
        return 1.0
    below = bisect_left(row, value)  # quantiles under the value
    if below == 0:
        return 0.0
    if below == len(row):
        return 1.0
    x0, x1 = row[below - 1], row[below]
    frac = (value - x0) / (x1 - x0) if x1 > x0 else 1.0
    return (below - 1 + min(max(frac, 0.0), 1.0)) / (len(row) - 1)


def ood_score_one(logits: list[float], answer: int, energy_rows: list, norm_rows: list) -> float:
    """`ood_scores` of one image (its logits as a list, the index of its top class)."""
    top = max(logits)
    e = -(top + math.log(sum(math.exp(x - top) for x in logits)))
    n = math.sqrt(sum(x * x for x in logits))
    return max(_percentile(e, energy_rows[answer]), 1.0 - _percentile(n, norm_rows[answer]))


def ood_scores(out: np.ndarray, energy_q: np.ndarray, norm_q: np.ndarray) -> np.ndarray:
    """The out-of-distribution score (0..1) of each row of the (N, 2, K) outputs (logits,
    probabilities), against the per-class tables of the test set."""
    logits = out[:, 0]
    answer = out[:, 1].argmax(axis=1)
    high_energy = percentiles(energy(logits), answer, energy_q)
    low_norm = 1.0 - percentiles(logit_norm(logits), answer, norm_q)
    return np.maximum(high_energy, low_norm)


class FlatTable:
    """`percentiles` against one (K, Q) table set in one `searchsorted` over every class's
    quantiles laid end to end: each class's table shifted by a span wider than all tables,
    so that a value moved by its class's shift (after clipping to the tables' range) lands
    among its own class's quantiles. No (N, Q) gather; the same results
    (tests/test_monitor.py)."""

    def __init__(self, table: np.ndarray):
        k, q = table.shape
        self.q = q
        self.empty = np.isnan(table[:, 0])
        known = table[~self.empty]
        low = float(known.min()) if known.size else 0.0
        high = float(known.max()) if known.size else 0.0
        self.low, self.high = low - 1.0, high + 1.0
        self.span = (high - low) + 4.0  # > the clipped range: no class reaches the next
        filled = np.where(self.empty[:, None], low, table)  # any sorted row; masked later
        self.flat = filled.reshape(-1)
        self.shifted = (filled + (np.arange(k) * self.span)[:, None]).reshape(-1)
        self.base = np.arange(k) * q

    def __call__(self, values: np.ndarray, classes: np.ndarray) -> np.ndarray:
        q, flat, base = self.q, self.flat, self.base[classes]
        clipped = np.clip(values, self.low, self.high)
        below = np.searchsorted(self.shifted, clipped + classes * self.span) - base
        lo = base + np.maximum(below - 1, 0)
        x0 = flat[lo]
        span = flat[base + np.minimum(below, q - 1)] - x0
        frac = np.divide(values - x0, span, out=np.ones_like(span), where=span > 0)
        p = (lo - base + np.clip(frac, 0.0, 1.0, out=frac)) / (q - 1)
        p[below == 0] = 0.0
        p[(below >= q) | self.empty[classes]] = 1.0
        p[np.isnan(values) & ~self.empty[classes]] = 0.0  # NaN: 0, as percentiles gives it
        return p


class Scorer:
    """`ood_scores` for the request path: both tables in one FlatTable (the norm's classes
    after the energy's), so a request's energies and norms take one lookup (~41 against
    ~66 us for 32 images: BENCHMARKS.md)."""

    def __init__(self, energy_q: np.ndarray, norm_q: np.ndarray):
        self.k = len(energy_q)
        self.table = FlatTable(np.concatenate([energy_q, norm_q]))

    def __call__(self, out: np.ndarray) -> np.ndarray:
        x = out[:, 0].astype(np.float64)  # once, for both (they take float64 as it is)
        n = len(x)
        answer = out[:, 1].argmax(axis=1)
        p = self.table(
            np.concatenate([energy(x), logit_norm(x)]),
            np.concatenate([answer, answer + self.k]),
        )
        return np.maximum(p[:n], 1.0 - p[n:])


def mean_intensity(images: np.ndarray) -> np.ndarray:
    """Each uint8 (N, C, H, W) image's mean pixel value, in 0..1."""
    flat = images.reshape(len(images), -1)
    # an integer sum: 2.5x faster than mean()'s float conversion of every pixel
    return flat.sum(axis=1, dtype=np.uint64) / (255.0 * flat.shape[1])


def bucket_counts(values: np.ndarray, bounds: tuple[float, ...]) -> np.ndarray:
    """How many values fall in each bucket: bucket i holds bounds[i-1] < v <= bounds[i] (as
    Prometheus's `le`); values above the last bound count in the last."""
    idx = np.searchsorted(np.asarray(bounds), values, side="left")
    return np.bincount(np.minimum(idx, len(bounds) - 1), minlength=len(bounds))


def shares(counts: np.ndarray) -> np.ndarray:
    total = counts.sum()
    return counts / total if total else np.zeros(len(counts))


def profile(
    logits: np.ndarray,
    probabilities: np.ndarray,
    images: np.ndarray,
    false_positive_rate: float = OOD_FALSE_POSITIVE_RATE,
) -> Monitoring:
    """The manifest's `monitoring`: what the served graph did on the test set (its outputs
    for `images`, uint8 NCHW)."""
    k = probabilities.shape[1]
    answer = probabilities.argmax(axis=1)
    # Rounded as the manifest keeps them, so the threshold is the server's own scores'.
    energy_q = np.round(quantile_tables(energy(logits), answer, k), 6)
    norm_q = np.round(quantile_tables(logit_norm(logits), answer, k), 6)
    scores = ood_scores(np.stack([logits, probabilities], axis=1), energy_q, norm_q)
    threshold = float(np.quantile(scores, 1.0 - false_positive_rate))
    confidence = bucket_counts(probabilities.max(axis=1), CONFIDENCE_BUCKETS)
    intensity = bucket_counts(mean_intensity(images), INTENSITY_BUCKETS)
    return Monitoring(
        images=len(images),
        class_fractions=_rounded(shares(np.bincount(answer, minlength=k))),
        confidence_fractions=_rounded(shares(confidence)),
        intensity_fractions=_rounded(shares(intensity)),
        ood_score=OOD_SCORE,
        ood_energy_quantiles=tuple(_rounded(r) if not np.isnan(r[0]) else () for r in energy_q),
        ood_norm_quantiles=tuple(_rounded(r) if not np.isnan(r[0]) else () for r in norm_q),
        ood_threshold=round(threshold, 6),
        ood_false_positive_rate=round(float((scores > threshold).mean()), 6),
    )


def tables(m: Monitoring) -> tuple[np.ndarray, np.ndarray]:
    """The manifest's quantile tables as (K, Q) arrays, NaN rows for empty ones."""

    def array(rows: tuple[tuple[float, ...], ...]) -> np.ndarray:
        q = max(len(r) for r in rows)
        return np.array([r if r else (np.nan,) * q for r in rows], dtype=np.float64)

    return array(m.ood_energy_quantiles), array(m.ood_norm_quantiles)


def _rounded(values: np.ndarray) -> tuple[float, ...]:
    return tuple(round(float(v), 6) for v in values)


@dataclass
class Counts:
    """What a Monitor saw since it was last taken."""

    classes: np.ndarray  # (K,) int
    confidence: np.ndarray  # per CONFIDENCE_BUCKETS bucket
    confidence_sum: float
    intensity: np.ndarray  # per INTENSITY_BUCKETS bucket
    intensity_sum: float
    flagged: int

    @property
    def images(self) -> int:
        return int(self.classes.sum())


class Monitor:
    """One served version's running counts, and its out-of-distribution flag threshold
    (None when the manifest has no profile for the score computed here: scores are still
    returned, nothing is flagged).

    On the request path `observe` computes only what the answer carries (the score and the
    flag) and keeps references to the request's rows and outputs; `take` counts everything
    kept since the last take in a few vectorised calls, once a second (off each request's
    latency, and about half the CPU of counting each request as it comes: BENCHMARKS.md)."""

    def __init__(self, manifest: Manifest):
        self.num_classes = manifest.num_classes
        m = manifest.monitoring
        # Scores need the test set's tables: without them (a manifest from an older exporter,
        # or another score) every score is 0 and nothing is flagged.
        known = m is not None and m.ood_score == OOD_SCORE
        both = tables(m) if known else ()
        self._scorer = Scorer(*both) if known else None
        self.threshold = m.ood_threshold if known else None
        # the same tables as lists, None for an empty row (ood_score_one)
        self._rows = tuple([None if np.isnan(r[0]) else r.tolist() for r in t] for t in both)
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._pending_rows = 0
        self._counts = self._empty()

    def _empty(self) -> Counts:
        return Counts(
            classes=np.zeros(self.num_classes, dtype=np.int64),
            confidence=np.zeros(len(CONFIDENCE_BUCKETS), dtype=np.int64),
            confidence_sum=0.0,
            intensity=np.zeros(len(INTENSITY_BUCKETS), dtype=np.int64),
            intensity_sum=0.0,
            flagged=0,
        )

    def observe(self, images: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A request's images (uint8 NCHW) and the model's (N, 2, K) outputs (logits,
        probabilities): each image's score and whether it is flagged. Counted later."""
        if self._scorer is None:
            scores = np.zeros(len(out))
            flagged = np.zeros(len(out), dtype=bool)
        elif len(out) == 1:  # the common case, in plain Python (ood_score_one)
            probs = out[0, 1].tolist()
            score = ood_score_one(out[0, 0].tolist(), probs.index(max(probs)), *self._rows)
            scores = np.array([score])
            flagged = np.array([score > self.threshold])
        else:
            scores = self._scorer(out)
            flagged = scores > self.threshold
        self._pending.append((images, out, flagged))
        self._pending_rows += len(images)
        if self._pending_rows >= MAX_PENDING_ROWS:  # bounded memory, whatever the flushes do
            self._count()
        return scores, flagged

    def _count(self) -> None:
        if not self._pending:
            return
        pending, self._pending, self._pending_rows = self._pending, [], 0
        images = np.concatenate([p[0] for p in pending])
        out = np.concatenate([p[1] for p in pending])
        probs = out[:, 1]
        top = probs.max(axis=1)
        light = mean_intensity(images)
        c = self._counts
        c.classes += np.bincount(probs.argmax(axis=1), minlength=self.num_classes)
        c.confidence += bucket_counts(top, CONFIDENCE_BUCKETS)
        c.confidence_sum += float(top.sum())
        c.intensity += bucket_counts(light, INTENSITY_BUCKETS)
        c.intensity_sum += float(light.sum())
        c.flagged += int(sum(int(p[2].sum()) for p in pending))

    def take(self) -> Counts:
        """The counts since the last take (and start again from zero)."""
        self._count()
        counts, self._counts = self._counts, self._empty()
        return counts
