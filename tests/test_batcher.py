"""The dynamic batcher on its own: splitting, reassembly, isolation of failures, shedding."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from serving.batcher import BatchConfig, Batcher
from serving.errors import DeadlineExceeded, Draining, InferenceFailed, QueueFull
from serving.inline import WATCH_TURNS
from serving.lanes import Lanes
from serving.settings import ServerSettings


class Recorder:
    """A run function that doubles its input and records every batch it was given.

    `delay` is a simulated run time. A run also waits while `gate` is closed (cleared), so a
    test knows which requests are queued while a run is busy, whatever the machine's speed.
    """

    def __init__(self, fail_on: int | None = None, delay: float = 0.0):
        self.batches: list[np.ndarray] = []
        self.fail_on = fail_on
        self.delay = delay
        self.lock = threading.Lock()
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with self.lock:
            self.batches.append(x.copy())
        if not self.gate.wait(timeout=30):
            raise RuntimeError("the test never opened the gate")
        if self.delay:
            time.sleep(self.delay)
        if self.fail_on is not None and (x == self.fail_on).any():
            raise RuntimeError(f"poisoned row {self.fail_on}")
        return x * 2


def run(coro_fn, *args):
    return asyncio.run(coro_fn(*args))


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Yield to the event loop until `condition()` holds (fail after `timeout` s)."""

    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.001)

    await asyncio.wait_for(poll(), timeout)


async def _with_batcher(run_fn, config, body):
    with Lanes(config.instances, "ort-test") as pool:
        b = Batcher(run_fn, config, pool)
        try:
            return await body(b)
        finally:
            await b.close(timeout=5)


def batching(**kw: object) -> BatchConfig:
    """cnn-serve's default batching with `kw` (ServerSettings field names) changed."""
    return ServerSettings(**kw).batching


def rows(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)[:, None]


async def round_trip() -> None:
    """What a lone client's next call waits: its answer's way back and its next call's way
    in, more loop turns than the batcher watches after a run on the loop."""
    for _ in range(WATCH_TURNS + 1):
        await asyncio.sleep(0)


def test_each_request_gets_exactly_its_own_rows_in_order():
    rec = Recorder(delay=0.01)

    async def body(b):
        reqs = [rows(*range(10 * i, 10 * i + 1 + i % 4)) for i in range(40)]
        outs = await asyncio.gather(*(b.submit(r) for r in reqs))
        for r, o in zip(reqs, outs, strict=True):
            assert np.array_equal(o, r * 2)

    run(_with_batcher, rec, batching(max_batch_size=16), body)
    assert max(len(x) for x in rec.batches) > 1  # requests were merged
    assert all(len(x) <= 16 for x in rec.batches)


def test_a_request_larger_than_max_batch_is_split_and_reassembled():
    rec = Recorder()

    async def body(b):
        big = rows(*range(100))
        return await b.submit(big)

    out = run(_with_batcher, rec, batching(max_batch_size=8, instances=2), body)
    assert np.array_equal(out, rows(*range(100)) * 2)
    assert all(len(x) <= 8 for x in rec.batches) and sum(len(x) for x in rec.batches) == 100


def test_a_failed_run_fails_only_the_requests_in_that_batch():
    rec = Recorder(fail_on=13)
    rec.gate.clear()

    async def body(b):
        first = asyncio.ensure_future(b.submit(rows(1)))  # runs alone while the next queue
        await until(lambda: len(rec.batches) == 1)
        poisoned = asyncio.ensure_future(b.submit(rows(13)))
        companion = asyncio.ensure_future(b.submit(rows(5)))  # shares the poisoned batch
        await until(lambda: b.queued_rows == 2)
        rec.gate.set()
        assert np.array_equal(await first, rows(2))
        for fut in (poisoned, companion):
            with pytest.raises(InferenceFailed, match="poisoned row 13"):
                await fut
        assert np.array_equal(await b.submit(rows(7)), rows(14))  # the batcher lives on

    run(_with_batcher, rec, batching(max_batch_size=4), body)
    assert [x.ravel().tolist() for x in rec.batches] == [[1], [13, 5], [7]]


def test_queue_full_sheds_at_once_and_memory_stays_bounded():
    rec = Recorder()
    rec.gate.clear()

    async def body(b):
        first = asyncio.ensure_future(b.submit(rows(*range(4))))
        await until(lambda: len(rec.batches) == 1)  # running: the queue is empty again
        queued = asyncio.ensure_future(b.submit(rows(*range(6))))
        await asyncio.sleep(0)
        assert b.queued_rows == 6
        with pytest.raises(QueueFull):
            await b.submit(rows(*range(5)))  # 6 + 5 > 10
        rec.gate.set()
        await first
        await queued

    run(_with_batcher, rec, batching(max_batch_size=4, max_queue_size=10), body)


def test_expired_and_cancelled_requests_are_dropped_before_compute():
    rec = Recorder()
    rec.gate.clear()

    async def body(b):
        blocker = asyncio.ensure_future(b.submit(rows(1)))
        await until(lambda: len(rec.batches) == 1)
        deadline = time.monotonic() + 0.01
        expired = asyncio.ensure_future(b.submit(rows(2), deadline=deadline))
        cancelled = asyncio.ensure_future(b.submit(rows(3)))
        await until(lambda: b.queued_rows == 2)
        cancelled.cancel()
        await until(lambda: time.monotonic() > deadline)  # expired while the blocker runs
        rec.gate.set()
        await blocker
        with pytest.raises(DeadlineExceeded):
            await expired
        assert np.array_equal(await b.submit(rows(4)), rows(8))  # the batcher serves on

    run(_with_batcher, rec, batching(max_batch_size=4), body)
    computed = np.concatenate(rec.batches).ravel().tolist()
    assert 2 not in computed and 3 not in computed and 4 in computed


class Fates:
    """A batcher observer that adds up what happened to rows that were not answered."""

    def __init__(self) -> None:
        self.dropped_by: dict[str, int] = {}
        self.abandoned_rows = 0

    def queue_depth(self, rows: int) -> None: ...
    def queue_wait(self, seconds: float) -> None: ...
    def batch(
        self, size: int, seconds: float, requests: int = 1, assembly: float = 0.0
    ) -> None: ...

    def dropped(self, rows: int, reason: str) -> None:
        self.dropped_by[reason] = self.dropped_by.get(reason, 0) + rows

    def abandoned(self, rows: int) -> None:
        self.abandoned_rows += rows


def image_rows(value: int, n: int = 2) -> np.ndarray:
    """`n` rows of 3x4 images: many elements, as real requests have (`==` on them is an
    array, so anything that compares requests by value instead of identity breaks)."""
    return np.full((n, 3, 4), value, dtype=np.int64)


def test_cancelled_expired_and_abandoned_rows_are_counted_and_expired_ones_never_run():
    rec = Recorder()
    rec.gate.clear()
    fates = Fates()

    async def body(b):
        blocker = asyncio.ensure_future(b.submit(image_rows(1)))
        await until(lambda: len(rec.batches) == 1)
        deadline = time.monotonic() + 0.01
        expires = asyncio.ensure_future(b.submit(image_rows(2), deadline))
        cancelled = asyncio.ensure_future(b.submit(image_rows(3)))  # queued behind `expires`
        kept = asyncio.ensure_future(b.submit(image_rows(4), time.monotonic() + 5))
        await until(lambda: b.queued_rows == 6)
        cancelled.cancel()
        await until(lambda: time.monotonic() > deadline)  # expired while the blocker runs
        rec.gate.set()
        await blocker
        with pytest.raises(DeadlineExceeded):
            await expires
        assert np.array_equal(await kept, image_rows(8))
        # The gated runs took over 10 ms, so small runs stay on the executor (not inline on
        # the loop): a caller can leave while one runs.
        rec.gate.clear()
        left = asyncio.ensure_future(b.submit(image_rows(5)))
        await until(lambda: len(rec.batches) == 3)  # its batch is running now:
        left.cancel()  # the caller leaves mid-run
        rec.gate.set()
        await until(lambda: fates.abandoned_rows == 2)

    with Lanes(1, "ort-test") as pool:
        run(_observed, rec, batching(max_batch_size=4), pool, fates, body)
    computed = {int(x.flat[0]) for x in np.concatenate(rec.batches)}
    assert computed == {1, 4, 5}
    assert fates.dropped_by == {"deadline": 2, "cancelled": 2}
    assert fates.abandoned_rows == 2


def test_a_deadline_that_passes_while_the_batch_waits_for_the_ort_thread_is_not_computed():
    """The last check runs on the ORT thread itself: a busy thread (another model version's
    run, a slow device) cannot make a row start after its deadline."""
    rec = Recorder()
    fates = Fates()
    busy = threading.Event()

    async def body(b):
        b.lanes.submit(busy.wait, 30)  # the only ORT thread is busy until `busy` is set
        deadline = time.monotonic() + 0.03
        late = asyncio.ensure_future(b.submit(image_rows(6), deadline))
        await until(lambda: time.monotonic() > deadline)
        busy.set()
        with pytest.raises(DeadlineExceeded):
            await late
        assert np.array_equal(await b.submit(image_rows(7)), image_rows(14))

    with Lanes(1, "ort-test") as pool:
        run(_observed, rec, batching(max_batch_size=4), pool, fates, body)
    assert [int(x.flat[0]) for x in rec.batches] == [7]
    assert fates.dropped_by == {"deadline": 2}


async def _observed(run_fn, config, pool, observer, body):
    b = Batcher(run_fn, config, pool, observer)
    try:
        return await body(b)
    finally:
        await b.close(timeout=5)


def test_close_finishes_admitted_work_and_refuses_new():
    rec = Recorder(delay=0.02)

    async def body(b):
        pending = [asyncio.ensure_future(b.submit(rows(i))) for i in range(5)]
        await asyncio.sleep(0)
        await b.close(timeout=5)
        for i, p in enumerate(pending):
            assert np.array_equal(await p, rows(2 * i))
        with pytest.raises(Draining):
            await b.submit(rows(9))

    run(_with_batcher, rec, batching(max_batch_size=2), body)


def test_queue_delay_waits_for_company_up_to_the_limit():
    rec = Recorder()
    delay = 0.3

    async def body(b):
        first = asyncio.ensure_future(b.submit(rows(1)))
        # The second comes later (the behaviour under test), well within the delay.
        await asyncio.sleep(0.01)
        second = asyncio.ensure_future(b.submit(rows(2)))
        await asyncio.gather(first, second)
        t0 = time.monotonic()
        await b.submit(rows(3))  # alone: no company comes
        return time.monotonic() - t0

    config = batching(max_batch_size=2, max_queue_delay_us=int(delay * 1e6))
    waited = run(_with_batcher, rec, config, body)
    # The first waited and took the second along; the lone one was held for the whole delay
    # (asyncio may fire a timer up to its clock resolution early) and then ran by itself.
    assert [x.ravel().tolist() for x in rec.batches] == [[1, 2], [3]]
    assert waited >= delay - 1e-3


class ThreadRecorder(Recorder):
    """A Recorder that also notes which thread ran each batch."""

    def __init__(self, fail_on: int | None = None, delay: float = 0.0):
        super().__init__(fail_on=fail_on, delay=delay)
        self.threads: list[int] = []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.threads.append(threading.get_ident())
        return super().__call__(x)


@pytest.mark.parametrize("delay", [0.0, 0.01])
def test_idle_small_requests_run_on_the_loop_only_when_runs_are_cheap(delay):
    rec = ThreadRecorder(delay=delay)
    loop_thread = threading.get_ident()  # asyncio.run runs the loop on this thread

    async def body(b):
        for i in range(6):  # one at a time: the batcher is idle for each
            assert np.array_equal(await b.submit(rows(i)), rows(2 * i))
            await round_trip()
        big = rows(*range(8))  # above INLINE_MAX_ROWS: always on the executor
        assert np.array_equal(await b.submit(big), big * 2)

    config = batching(max_batch_size=8)
    run(_with_batcher, rec, config, body)
    on_loop = [t == loop_thread for t in rec.threads]
    assert on_loop[0] is False  # nothing measured yet: the first run takes the executor
    assert on_loop[-1] is False
    # Cheap runs (well under 2 ms) move onto the loop; 10 ms runs never do.
    assert on_loop[1:6] == [delay == 0.0] * 5


def test_small_requests_that_arrive_together_batch_instead_of_running_one_by_one_on_the_loop():
    """Under load, calls arrive while a run on the loop blocks it. Each used to find the
    batcher idle and run alone on the loop, so a busy server never batched. Now a call that
    comes within the batcher's watch after a run on the loop goes to an ORT thread, and those
    behind it batch; once calls come one at a time again, they run on the loop again."""
    rec = ThreadRecorder()
    loop_thread = threading.get_ident()

    async def body(b):
        for i in range(3):  # one at a time: cheap runs move onto the loop
            assert np.array_equal(await b.submit(rows(i)), rows(2 * i))
            await round_trip()
        assert rec.threads[-1] == loop_thread
        before = len(rec.batches)
        outs = await asyncio.gather(*(b.submit(rows(100 + i)) for i in range(40)))
        for i, out in enumerate(outs):
            assert np.array_equal(out, rows(2 * (100 + i)))
        burst = rec.batches[before:], rec.threads[before:]
        await round_trip()
        assert np.array_equal(await b.submit(rows(7)), rows(14))
        return burst

    (batches, threads) = run(_with_batcher, rec, batching(max_batch_size=8), body)
    assert sorted(int(v) for x in batches for v in x[:, 0]) == list(range(100, 140))
    # The first runs on the loop; the second, within the watch, takes the ORT thread while
    # the other 38 queue behind it.
    assert [len(x) for x in batches] == [1, 1, 8, 8, 8, 8, 6]
    assert [t == loop_thread for t in threads] == [True] + [False] * 6
    assert rec.threads[-1] == loop_thread  # alone again: back on the loop


def test_a_failed_run_on_the_loop_fails_that_request_and_the_next_still_runs_there():
    rec = ThreadRecorder(fail_on=13)
    loop_thread = threading.get_ident()

    async def body(b):
        for i in range(3):  # the first run is measured on the executor, then cheap runs inline
            assert np.array_equal(await b.submit(rows(i)), rows(2 * i))
            await round_trip()
        with pytest.raises(InferenceFailed, match="poisoned row 13"):
            await b.submit(rows(13))
        await round_trip()
        assert np.array_equal(await b.submit(rows(7)), rows(14))
        assert b.queued_rows == 0

    config = batching(max_batch_size=8)
    run(_with_batcher, rec, config, body)
    assert [t == loop_thread for t in rec.threads] == [False, True, True, True, True]
