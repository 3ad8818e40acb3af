"""Dynamic batching: concurrent requests for one model version become one ONNX Runtime run.

One `Batcher` per loaded model version, living on the worker's asyncio loop:

- `submit(rows, deadline)` admits a request (or sheds it at once with QueueFull when the
  queue holds `max_queue_size` rows: memory stays bounded under any load);
- a scheduler task takes rows from the queue head, waits at most `max_queue_delay` for
  company once it has a free instance, and launches a batch of up to `max_batch_size` rows on
  the version's ORT threads (serving.lanes; `instances` batches may run at once);
- a request larger than `max_batch_size` is split across batches and reassembled in order;
- a request whose deadline passed, or whose caller went away (its future was cancelled),
  is dropped before compute: when its batch is assembled, and again on the ORT thread just
  before the run, so no row starts computing after its deadline (the observer counts these
  dropped rows, and the rows computed for callers that left while their batch ran);
- a failed run fails only the requests in that batch;
- a small request that finds it idle and alone may run on the loop itself (serving.inline);
- a traced call's request (serving.tracing.current_call) reports its queue and run times.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from serving.errors import DeadlineExceeded, Draining, InferenceFailed, QueueFull, ServingError
from serving.inline import LoopRuns
from serving.lanes import Lanes
from serving.tracing import CallTrace, current_call, record_batch

log = logging.getLogger("convserve.batcher")


class BatchObserver(Protocol):
    """What the batcher reports (implemented by serving.metrics.ModelMetrics)."""

    def queue_depth(self, rows: int) -> None: ...
    def queue_wait(self, seconds: float) -> None: ...
    # `requests`: how many requests the run served; `assembly`: seconds to build its input.
    def batch(
        self, size: int, seconds: float, requests: int = 1, assembly: float = 0.0
    ) -> None: ...
    def dropped(self, rows: int, reason: str) -> None: ...
    def abandoned(self, rows: int) -> None: ...


class _NullObserver:
    def queue_depth(self, rows: int) -> None: ...
    def queue_wait(self, seconds: float) -> None: ...
    def batch(
        self, size: int, seconds: float, requests: int = 1, assembly: float = 0.0
    ) -> None: ...
    def dropped(self, rows: int, reason: str) -> None: ...
    def abandoned(self, rows: int) -> None: ...


@dataclass(frozen=True)
class BatchConfig:
    """How one model version batches (serving.settings holds the defaults)."""

    max_batch_size: int
    max_queue_delay_s: float
    max_queue_size: int  # rows (images) waiting, summed over requests
    instances: int


@dataclass(eq=False)  # identity: `req in queue` must not compare the numpy rows
class _Request:
    rows: np.ndarray
    future: asyncio.Future
    deadline: float | None  # time.monotonic() value
    enqueued: float
    trace: CallTrace | None = None  # its call's, when tracing samples the call
    taken: int = 0  # rows already handed to a batch
    parts: list[tuple[int, np.ndarray | None]] = field(default_factory=list)
    failed: bool = False

    @property
    def remaining(self) -> int:
        return len(self.rows) - self.taken

    @property
    def dead(self) -> bool:
        return self.future.done() or self.failed

    def expired(self, now: float) -> bool:
        """Not worth computing: the caller left, or its deadline has passed."""
        return self.dead or (self.deadline is not None and self.deadline <= now)


RunFn = Callable[[np.ndarray], np.ndarray]
_Batch = list[tuple[_Request, int, int]]  # (request, first row, end row) parts of one run
_Run = tuple[_Batch, _Batch, np.ndarray | None, float, float, float]  # what _run_live returns


class Batcher:
    """Merges concurrent requests into batched runs of `run` (a blocking function)."""

    def __init__(
        self,
        run: RunFn,
        config: BatchConfig,
        lanes: Lanes,
        observer: BatchObserver | None = None,
        name: str = "model",
        trace_attributes: Mapping[str, Any] | None = None,
    ):
        self.run = run
        self.config = config
        self.lanes = lanes
        self.observer = observer or _NullObserver()
        self.name = name
        self.trace_attributes = dict(trace_attributes or {})
        self._queue: collections.deque[_Request] = collections.deque()
        self._queued_rows = 0
        self._slots = asyncio.Semaphore(config.instances)
        self._arrived = asyncio.Event()
        self._running: set[asyncio.Task] = set()  # references to batch tasks
        self._active = 0  # batches computing now (scheduled or fast path)
        self._closed = False
        self._loop_runs = LoopRuns()  # whether a small request may run on the loop itself
        self._row_s = 0.0  # moving average of a run's seconds per row
        self._run_s = 0.0  # and of a run's seconds
        self._scheduler = asyncio.get_running_loop().create_task(self._schedule())

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    def expected_wait(self) -> float:
        """About how long a one-row request arriving now would take to be answered, at the
        recent cost of a row and of a run: the rows queued ahead of it, spread over the
        instances; half a run for the batch computing now (on average, half done); its own
        row. 0 when nothing is ahead of it: an idle batcher makes nobody late."""
        running = self._run_s / 2 if self._active else 0.0
        ahead = self._queued_rows * self._row_s / self.config.instances + running
        return ahead + self._row_s if ahead > 0 else 0.0

    async def submit(self, rows: np.ndarray, deadline: float | None = None) -> np.ndarray:
        """Compute `rows` (N, ...) in some batch; returns their N output rows, in order."""
        if self._closed:
            raise Draining("server is shutting down")
        n = len(rows)
        if self._queued_rows + n > self.config.max_queue_size:
            raise QueueFull(
                f"queue for {self.name} is full ({self._queued_rows} of "
                f"{self.config.max_queue_size} rows waiting); retry later"
            )
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            raise DeadlineExceeded("deadline already passed on arrival")
        trace = current_call()  # None unless tracing samples the call: one read when off
        idle = self._idle_fast_path(n)
        if idle and self._loop_runs.allowed(n):
            out = self._run_inline(rows, trace)
            self._loop_runs.ran_on_loop()
            return out
        req = _Request(rows, asyncio.get_running_loop().create_future(), deadline, now, trace)
        if idle:
            # Nobody is waiting and an instance is free: run now and skip the scheduler's
            # hops (this is what concurrency-1 latency is made of).
            await self._slots.acquire()  # does not suspend: a slot is free
            req.taken = n
            self.observer.queue_wait(0.0)
            if trace is not None:
                trace.queued(now, now, n, self.trace_attributes)
            # A task of its own, so a caller that leaves mid-run neither frees the slot
            # early nor loses the count of rows computed for nobody.
            self._launch([(req, 0, n)])
        else:
            self._queue.append(req)
            self._queued_rows += n
            self.observer.queue_depth(self._queued_rows)
            self._arrived.set()
        try:
            return await req.future
        finally:
            if not req.future.done():  # the caller was cancelled: free its queued rows now
                req.future.cancel()
                self._drop(req, "cancelled")

    def _run_inline(self, rows: np.ndarray, trace: CallTrace | None) -> np.ndarray:
        """A small run on the event loop itself, start to end without a suspension point:
        no other coroutine can start a batch meanwhile (so no slot is taken) and the caller
        cannot leave (so no future is needed). Its deadline was checked on arrival."""
        self.observer.queue_wait(0.0)
        self._active += 1
        try:
            t0 = time.monotonic()
            out = self.run(rows)
            took = time.monotonic() - t0
        except ServingError:
            raise
        except Exception as exc:  # as on the threads' path: logged, answered as a failure
            log.exception("batch for %s failed", self.name)
            raise InferenceFailed(f"inference failed: {exc}") from exc
        finally:
            self._active -= 1
        self._observe_run(len(rows), took)
        if trace is not None:
            trace.queued(t0, t0, len(rows), self.trace_attributes)
            record_batch([trace], t0, took, len(rows), 1, self.trace_attributes)
        return out

    def _observe_run(self, n: int, took: float, requests: int = 1, assembly: float = 0.0) -> None:
        self.observer.batch(n, took, requests, assembly)
        self._row_s = 0.8 * self._row_s + 0.2 * took / n if self._row_s else took / n
        self._run_s = 0.8 * self._run_s + 0.2 * took if self._run_s else took
        self._loop_runs.ran(n, took)

    def _idle_fast_path(self, n: int) -> bool:
        return (
            not self._queue
            and not self._slots.locked()
            and self.config.max_queue_delay_s == 0
            and n <= self.config.max_batch_size
        )

    # -- scheduling --------------------------------------------------------------------
    async def _schedule(self) -> None:
        cfg = self.config
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            await self._slots.acquire()
            if cfg.max_queue_delay_s > 0 and self._queued_rows < cfg.max_batch_size:
                await self._wait_for_company()
            batch = self._take()
            if not batch:
                self._slots.release()
                continue
            self._launch(batch)

    def _launch(self, batch: _Batch) -> None:
        task = asyncio.get_running_loop().create_task(self._execute(batch))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _wait_for_company(self) -> None:
        """Hold the first request until the batch fills or its queue delay is spent."""
        cfg = self.config
        while self._queue and self._queued_rows < cfg.max_batch_size:
            head = self._queue[0]
            left = head.enqueued + cfg.max_queue_delay_s - time.monotonic()
            if left <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                return

    def _drop(self, req: _Request, reason: str) -> None:
        if req in self._queue:
            self._queue.remove(req)
            self._queued_rows -= req.remaining
            self.observer.queue_depth(self._queued_rows)
            self.observer.dropped(req.remaining, reason)

    def _take(self) -> _Batch:
        """Pop up to max_batch_size rows from the queue head, skipping dead requests."""
        now = time.monotonic()
        batch: _Batch = []
        room = self.config.max_batch_size
        while self._queue and room > 0:
            req = self._queue[0]
            if req.expired(now):
                self._queue.popleft()
                self._queued_rows -= req.remaining
                self.observer.dropped(req.remaining, "cancelled" if req.dead else "deadline")
                if not req.future.done():
                    req.future.set_exception(
                        DeadlineExceeded("deadline passed while queued; not computed")
                    )
                continue
            if req.taken == 0:
                self.observer.queue_wait(now - req.enqueued)
                if req.trace is not None:
                    req.trace.queued(req.enqueued, now, len(req.rows), self.trace_attributes)
            n = min(room, req.remaining)
            batch.append((req, req.taken, req.taken + n))
            req.taken += n
            self._queued_rows -= n
            room -= n
            if req.remaining == 0:
                self._queue.popleft()
        self.observer.queue_depth(self._queued_rows)
        return batch

    async def _execute(self, batch: _Batch) -> None:
        self._active += 1
        try:
            try:
                ran = self.lanes.call(self._run_live, batch)
                live, late, out, started, took, assembly = await ran
            except ServingError as exc:
                self._fail(batch, exc)
                return
            except Exception as exc:  # never let one batch take the scheduler down
                log.exception("batch for %s failed", self.name)
                self._fail(batch, InferenceFailed(f"inference failed: {exc}"))
                return
            self._expire(late)
            if out is None:
                return
            self._observe_run(sum(b - a for _, a, b in live), took, len(live), assembly)
            self._deliver(live, out)
            traced = [req.trace for req, _, _ in live if req.trace is not None]
            if traced:  # the calls resume later: their spans are still open
                record_batch(traced, started, took, len(out), len(live), self.trace_attributes)
        finally:
            self._active -= 1
            self._slots.release()

    def _run_live(self, batch: _Batch) -> _Run:
        """Runs on the ORT thread: the last check before compute, then the run. Returns
        (live parts, parts dropped here, output or None, when ORT started (monotonic), seconds
        ORT took, seconds spent assembling its input)."""
        now = time.monotonic()
        live: _Batch = []
        late: _Batch = []
        for part in batch:
            (late if part[0].expired(now) else live).append(part)
        if not live:
            return live, late, None, 0.0, 0.0, 0.0
        parts = [req.rows[a:b] for req, a, b in live]
        x = parts[0] if len(parts) == 1 else np.concatenate(parts)
        t0 = time.monotonic()
        out = self.run(x)
        return live, late, out, t0, time.monotonic() - t0, t0 - now

    def _expire(self, late: _Batch) -> None:
        """Parts the last check dropped: their request fails without being computed."""
        for req, a, b in late:
            reason = "cancelled" if req.dead else "deadline"
            self.observer.dropped(b - a, reason)
            req.failed = True
            if not req.future.done():
                req.future.set_exception(DeadlineExceeded("deadline passed before compute"))
            self._drop(req, reason)  # rows of a split request still queued

    def _deliver(self, batch: _Batch, out: np.ndarray) -> None:
        start = 0
        for req, a, b in batch:
            if req.dead:  # the caller left while its batch ran: computed for nobody
                self.observer.abandoned(b - a)
            else:
                req.parts.append((a, out[start : start + b - a]))
                self._complete(req)
            start += b - a

    def _complete(self, req: _Request) -> None:
        if sum(len(p) for _, p in req.parts) < len(req.rows):
            return  # other parts of a split request are still running
        req.parts.sort(key=lambda p: p[0])
        rows = req.parts[0][1] if len(req.parts) == 1 else np.concatenate([p for _, p in req.parts])
        if not req.future.done():
            req.future.set_result(rows)

    def _fail(self, batch: _Batch, exc: ServingError) -> None:
        for req, _, _ in batch:
            req.failed = True
            if not req.future.done():
                req.future.set_exception(exc)
            self._drop(req, "failed")

    # -- shutdown ----------------------------------------------------------------------
    async def close(self, timeout: float | None = None) -> None:
        """Stop admitting, let queued and running requests finish (bounded), then stop."""
        self._closed = True
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._queue or self._active or self._running:
            if deadline is not None and time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.005)
        self._scheduler.cancel()
        for req in list(self._queue):
            if not req.future.done():
                req.future.set_exception(Draining("server shut down before this was computed"))
        self._queue.clear()
        self._queued_rows = 0
        self.observer.queue_depth(0)
