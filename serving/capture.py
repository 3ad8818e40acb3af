"""Sampled captures (`--capture-dir`): a sample of the images the server classifies, kept as
training data for the next model.

Each sampled image is written as the picture the model saw (its input size, after decoding:
greyscale PNG for one channel, RGB for three) into `DIR/<predicted label>/`, the layout
`cnn-train --recipe imagefolder` reads, and described by one JSON line (UTC time, model,
version, request id, the image's index in its request, its top classes with probabilities,
the file) in `DIR/captures-w<worker>-<ns>.jsonl`. Correct a label by moving the image to the
right folder and retrain.

The data plane offers every answered Predict, PredictStream and ModelInfer (gRPC or HTTP;
not Explain) once its batch is computed; with captures off it pays one attribute check.
Sampling is per image: a 32-image request offers 32 images, each kept with probability
`rate`. Every sampled image is either captured or dropped, and counted either way
(serving.metrics: convserve_captured_images_total and
convserve_capture_dropped_images_total by reason), so captured + dropped = sampled:

- queue_full: `queue_images` images were already waiting to be written;
- write_error: a full disk, a file over RLIMIT_FSIZE, no permission... (the partial file is
  removed; logged at most once per LOG_EVERY_S);
- too_large: one image and its line are more than the whole byte budget;
- shutdown: still waiting when the drain's flush time (FLUSH_S) ran out.

Threads: the request path (`offer`, on the event loop) samples, copies the sampled images and
queues them without waiting, never blocking and never raising into the request; one thread
per worker process, named `capture-writer`, encodes and writes them (`start` to `drain`).

Budget: one worker's files (its PNGs and JSONL files, by size in bytes) stay within
`max_bytes`; a write that would pass it deletes the oldest first (serving.capture_files).
With `--workers N` each worker has its own prefix `w<i>-`, its own JSONL files and 1/N of
--capture-max-bytes, and never touches another's files.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import queue
import random
import re
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from serving.capture_files import CaptureFiles, prepare_folder
from serving.ranking import top_k

if TYPE_CHECKING:  # settings import this module before prometheus_client may be imported
    from serving.metrics import Metrics

log = logging.getLogger("convserve.capture")

WRITER_THREAD = "capture-writer"
REASONS = ("queue_full", "write_error", "too_large", "shutdown")  # why an image was dropped
TOP_CLASSES = 5  # classes (with probabilities) in each JSON line
MAX_REQUEST_ID = 128  # characters of a caller's request id kept (it is the caller's text)
MAX_FOLDER_BYTES = 200  # of a label's folder name (file names are at most 255 bytes)
LOG_EVERY_S = 60.0  # at most one line about failed writes per this many seconds
FLUSH_S = 5.0  # how long a drain waits for the queued images to be written
_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\]")  # path separators and control characters


@dataclass(frozen=True)
class CaptureConfig:
    """One worker's captures: a view of ServerSettings (which holds the defaults)."""

    folder: Path
    rate: float  # 0 < rate <= 1: the chance each image is kept
    max_bytes: int  # this worker's share of --capture-max-bytes
    queue_images: int  # images waiting to be written beyond which new ones are dropped
    worker: int  # file names start w<worker>-


@dataclass(slots=True)
class _Sample:
    """The sampled images of one answered request, as the writer takes them."""

    time: float  # time.time() of the answer
    model: str
    version: int
    labels: tuple[str, ...]
    request_id: str
    indices: list[int]  # each image's position in its request
    rows: np.ndarray  # (n, C, H, W) uint8: a copy, so the request's buffers may go
    probabilities: np.ndarray  # (n, K) float32, copied too


class Capture:
    """Sampling on the request path, writing on the `capture-writer` thread."""

    def __init__(self, config: CaptureConfig, metrics: Metrics):
        self.config = config
        self.metrics = metrics
        prefix = f"w{config.worker}-"
        self.files = CaptureFiles(prepare_folder(config.folder), prefix, config.max_bytes)
        self._queue: queue.SimpleQueue[_Sample | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._queued = 0  # images queued or being written (bounded by queue_images)
        self._closing = False  # set by drain: nothing more is queued
        self._abandon = False  # set when the flush time ran out: the rest is dropped
        self._random = random.Random()
        self._thread = threading.Thread(target=self._run, name=WRITER_THREAD, daemon=True)
        self._next_log = 0.0
        self._unlogged = 0

    def start(self) -> None:
        """Start the writer (it first counts the files earlier runs left)."""
        c = self.config
        log.info(
            "capturing %g%% of classified images into %s (files %s*, at most %d bytes)",
            c.rate * 100,
            c.folder,
            self.files.prefix,
            c.max_bytes,
        )
        self._thread.start()

    # -- the request path --------------------------------------------------------------
    def offer(
        self,
        model: str,
        version: int,
        labels: tuple[str, ...],
        rows: np.ndarray,
        probabilities: np.ndarray,
        request_id: str,
    ) -> None:
        """An answered request's (N, C, H, W) images and (N, K) probabilities: sample them and
        queue the sample for the writer, or count it dropped. Called on the event loop; never
        waits for the disk."""
        rate = self.config.rate
        if rate >= 1.0:
            picked = list(range(len(rows)))
        else:
            draw = self._random.random
            picked = [i for i in range(len(rows)) if draw() < rate]
            if not picked:
                return
        if self._closing:
            self._dropped(model, "shutdown", len(picked))
            return
        with self._lock:
            take = max(0, min(len(picked), self.config.queue_images - self._queued))
            self._queued += take
        if take < len(picked):
            self._dropped(model, "queue_full", len(picked) - take)
            if not take:
                return
            picked = picked[:take]
        # Copies: the request's buffers (a shared-memory region even) are not ours to keep.
        if len(picked) == len(rows):
            rows, probabilities = rows.copy(), probabilities.copy()
        else:
            rows, probabilities = rows[picked], probabilities[picked]
        self._queue.put(
            _Sample(time.time(), model, version, labels, request_id, picked, rows, probabilities)
        )

    # -- shutdown ----------------------------------------------------------------------
    async def drain(self, timeout: float = FLUSH_S) -> None:
        """Take no more images, let the writer finish the queued ones for at most `timeout`
        s, and stop it; what is left is dropped as `shutdown`."""
        self._closing = True
        self._queue.put(None)
        if self._thread.ident is None:  # never started: nothing will write these
            self._abandon = True
            self._write_all()
            return
        end = time.monotonic() + timeout
        while self._thread.is_alive() and time.monotonic() < end:
            await asyncio.sleep(0.01)
        if self._thread.is_alive():
            self._abandon = True
            log.warning("captures still queued after %.1fs: dropping them", timeout)

    # -- the writer thread -------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.files.scan()  # what earlier runs of this worker left counts towards the budget
        except Exception as exc:  # OSError mostly: capture on without them
            log.warning("earlier captures in %s not counted: %s", self.files.root, exc)
        self._account()
        self._write_all()
        self.files.close()

    def _write_all(self) -> None:
        """Write (or, once abandoned, drop) samples until the end of the queue."""
        while (sample := self._queue.get()) is not None:
            try:
                if self._abandon:
                    self._dropped(sample.model, "shutdown", len(sample.indices))
                else:
                    self._write(sample)
            finally:
                with self._lock:
                    self._queued -= len(sample.indices)

    def _write(self, s: _Sample) -> None:
        request_id = s.request_id[:MAX_REQUEST_ID] or uuid.uuid4().hex
        when = datetime.fromtimestamp(s.time, UTC).isoformat(timespec="milliseconds")
        k = min(TOP_CLASSES, s.probabilities.shape[1])
        for j, index in enumerate(s.indices):
            try:
                (idx,), (probs,) = top_k(s.probabilities[j : j + 1], k)
                best = int(idx[0])
                folder = label_folder(s.labels[best], best)
                name = self.files.new_name()
                record = {
                    "time": when,
                    "model": s.model,
                    "version": s.version,
                    "request_id": request_id,
                    "index": index,
                    "file": f"{folder}/{name}",
                    "classes": [
                        {"index": int(c), "label": s.labels[c], "probability": round(float(p), 6)}
                        for c, p in zip(idx, probs, strict=True)
                    ],
                }
                line = (json.dumps(record) + "\n").encode()  # ASCII: any caller's text is safe
                written = self.files.write(folder, name, encode_png(s.rows[j]), line)
            except Exception as exc:  # OSError mostly; whatever it is, the request never sees it
                self._write_failed(s.model, exc)
                continue
            if written:
                self.metrics.captured.labels(s.model).inc()
            else:
                self._dropped(s.model, "too_large", 1)
            self._account()

    def _account(self) -> None:
        self.metrics.capture_bytes.set(self.files.bytes)
        evicted, self.files.evicted = self.files.evicted, 0
        if evicted:
            self.metrics.capture_evicted.inc(evicted)

    def _dropped(self, model: str, reason: str, n: int) -> None:
        self.metrics.capture_dropped.labels(model, reason).inc(n)

    def _write_failed(self, model: str, exc: Exception) -> None:
        self._dropped(model, "write_error", 1)
        self._unlogged += 1
        now = time.monotonic()
        if now >= self._next_log:
            log.warning(
                "capture not written in %s: %s (%d image(s) dropped since the last such line; "
                "at most one line per %.0fs)",
                self.files.root,
                exc,
                self._unlogged,
                LOG_EVERY_S,
                exc_info=not isinstance(exc, OSError),  # a bug: show where
            )
            self._next_log = now + LOG_EVERY_S
            self._unlogged = 0


def encode_png(row: np.ndarray) -> bytes:
    """A (C, H, W) uint8 image as PNG: greyscale for one channel, RGB for three."""
    pixels = row[0] if row.shape[0] == 1 else row.transpose(1, 2, 0)
    buf = io.BytesIO()
    # Level 1: a third of the default's time for a few percent more bytes; the writer must
    # keep up with the request path.
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


@lru_cache(maxsize=4096)
def label_folder(label: str, index: int) -> str:
    """The folder of class `index`: its label when that is a safe folder name; otherwise a
    cleaned copy with the index appended, so two unsafe labels never share a folder. Never
    empty, `.`, `..`, hidden (cnn-train skips hidden folders) nor a path."""
    name = _UNSAFE.sub("_", label).strip()
    name = name.encode(errors="replace")[:MAX_FOLDER_BYTES].decode(errors="ignore")
    if name.startswith("."):
        name = "_" + name[1:]
    if not name:
        name = "class"
    return name if name == label else f"{name}-{index}"
