"""serving.lanes: the ORT threads' executor, its fast `call` and its Executor face."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import pytest

from serving.lanes import Lanes


def test_call_answers_on_the_loop_in_arrival_order_on_named_threads():
    seen: list[tuple[int, str]] = []

    def job(i: int) -> int:
        seen.append((i, threading.current_thread().name))
        return i * i

    async def main() -> list[int]:
        with Lanes(1, "ort-m-1") as lanes:
            return await asyncio.gather(*(lanes.call(job, i) for i in range(50)))

    assert asyncio.run(main()) == [i * i for i in range(50)]
    assert [i for i, _ in seen] == list(range(50))
    assert {name for _, name in seen} == {"ort-m-1_0"}


def test_an_exception_reaches_the_awaiting_coroutine_and_the_lane_goes_on():
    def fail() -> None:
        raise ValueError("bad batch")

    async def main() -> int:
        with Lanes(1, "ort") as lanes:
            with pytest.raises(ValueError, match="bad batch"):
                await lanes.call(fail)
            return await lanes.call(int, "7")

    assert asyncio.run(main()) == 7


def test_several_threads_run_calls_at_once():
    both = threading.Barrier(2, timeout=10)  # breaks unless two calls run together

    async def main() -> None:
        with Lanes(2, "ort") as lanes:
            await asyncio.gather(lanes.call(both.wait), lanes.call(both.wait))

    asyncio.run(main())


def test_an_awaiter_that_left_does_not_break_the_lane():
    gate = threading.Event()

    async def main() -> str:
        with Lanes(1, "ort") as lanes:
            left = asyncio.ensure_future(lanes.call(gate.wait, 10))
            await asyncio.sleep(0)
            left.cancel()  # its future is cancelled while the job runs
            gate.set()
            return await lanes.call(str, "still serving")

    assert asyncio.run(main()) == "still serving"


def test_as_an_executor_it_serves_run_in_executor_and_shuts_down_like_a_pool():
    lanes = Lanes(1, "ort")

    async def main() -> int:
        return await asyncio.get_running_loop().run_in_executor(lanes, sum, [1, 2, 3])

    assert asyncio.run(main()) == 6
    assert lanes.submit(pow, 2, 10).result(timeout=10) == 1024
    assert lanes.submit(sorted, [3, 1, 2], reverse=True).result(timeout=10) == [3, 2, 1]
    gate, started = threading.Event(), threading.Event()

    def hold() -> bool:
        started.set()
        return gate.wait(10)

    running = lanes.submit(hold)
    queued = lanes.submit(int, "1")
    assert started.wait(10)
    lanes.shutdown(wait=False, cancel_futures=True)
    gate.set()
    assert running.result(timeout=10) is True  # what was running finishes
    with pytest.raises(concurrent.futures.CancelledError):
        queued.result(timeout=10)
    lanes.shutdown(wait=True)  # again: the threads have ended
    with pytest.raises(RuntimeError, match="after shutdown"):
        lanes.submit(int, "2")

    async def late() -> None:
        lanes.call(int, "3")

    with pytest.raises(RuntimeError, match="after shutdown"):
        asyncio.run(late())


def test_queued_jobs_still_run_after_shutdown_without_cancel():
    lanes = Lanes(1, "ort")
    gate = threading.Event()
    lanes.submit(gate.wait, 10)
    queued = lanes.submit(int, "5")
    lanes.shutdown(wait=False)
    gate.set()
    assert queued.result(timeout=10) == 5
    lanes.shutdown(wait=True)
