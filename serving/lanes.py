"""The threads one model version's ORT runs on: an executor whose hot path skips most of
what `loop.run_in_executor` does.

A batch's hop to a ThreadPoolExecutor and back costs about 50 us of CPU on uvloop (a
concurrent.futures.Future, its work item, the pool's idle semaphore, two futures chained
with callbacks both ways); `Lanes.call` puts (function, arguments, asyncio future) on a
`queue.SimpleQueue` and the thread answers with one `call_soon_threadsafe`: about 17 us
(BENCHMARKS.md, "Session 12: bulk at the ceiling"). Every batch pays it once: a bulk
request's fixed cost outside ORT fell from ~360 to ~300 us; a batch of single images shares
it among its rows.

`Lanes` is also a `concurrent.futures.Executor` (`submit`, `shutdown`), so the rare callers
that want one (`run_in_executor` for a version's insight graph) share its threads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any


def _set_result(future: asyncio.Future, value: Any) -> None:
    if not future.done():  # its awaiter may have been cancelled meanwhile
        future.set_result(value)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


# A job: (loop, asyncio future, fn, args) from `call`, or (None, concurrent future, fn,
# args) from `submit`; None tells a thread to stop.
_Job = tuple[asyncio.AbstractEventLoop | None, Any, Callable[..., Any], tuple[Any, ...]]


class Lanes(concurrent.futures.Executor):
    """`threads` threads named `<name>_<i>` taking jobs in arrival order."""

    def __init__(self, threads: int, name: str):
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()  # orders submissions against shutdown
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True)
            for i in range(threads)
        ]
        for t in self._threads:
            t.start()

    def call(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        """`fn(*args)` on a lane; its result (or exception) on the running loop's future."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new calls after shutdown")
            self._jobs.put((loop, future, fn, args))
        return future

    def submit(
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        call = (lambda: fn(*args, **kwargs)) if kwargs else fn
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._jobs.put((None, future, call, () if kwargs else args))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking jobs; the ones queued still run (`cancel_futures`: those from `submit`
        are cancelled instead, as ThreadPoolExecutor does), then the threads end."""
        with self._lock:
            if not self._closed:
                self._closed = True
                if cancel_futures:
                    self._cancel_queued()
                for _ in self._threads:
                    self._jobs.put(None)
        if wait:
            for t in self._threads:
                if t is not threading.current_thread():
                    t.join()

    def _cancel_queued(self) -> None:
        kept = []
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None and job[0] is None:
                job[1].cancel()
            else:
                kept.append(job)
        for job in kept:
            self._jobs.put(job)

    def _work(self) -> None:
        get = self._jobs.get
        while True:
            job = get()
            if job is None:
                return
            _run(*job)
            del job  # the batch's arrays are not kept while the lane waits for the next


def _run(
    loop: asyncio.AbstractEventLoop | None, future: Any, fn: Callable[..., Any], args: tuple
) -> None:
    if loop is None:  # from submit: a concurrent.futures.Future
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(*args))
            except BaseException as exc:
                future.set_exception(exc)
        return
    try:
        answer: tuple[Callable[..., None], Any] = (_set_result, fn(*args))
    except BaseException as exc:  # the awaiting coroutine decides what it means
        answer = (_set_exception, exc)
    with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting
        loop.call_soon_threadsafe(answer[0], future, answer[1])
