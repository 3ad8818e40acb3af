"""When a small request runs on the event loop itself instead of an ORT thread.

An idle batcher runs a small request on the loop when such runs have been taking less than
INLINE_MAX_S: a batch-1 run of a small CNN costs about what the hop to an ORT thread and back
costs, and it keeps concurrency-1 latency low. Slow runs (a big model, a busy device) keep
going to the ORT threads, so the loop is never blocked for long.

...but only a request that is alone. A run on the loop blocks it, so calls that arrive
meanwhile wait in gRPC's core, unseen: each then found the batcher idle, ran alone on the
loop in turn, and a loaded server never batched (1-image calls at c64: a batch-1 run per
call, ~0.3 ms more CPU a request than batches of 10-30). So after a run on the loop the
batcher watches the loop's next WATCH_TURNS turns: a call gRPC received meanwhile reaches
the batcher within that many (at c8, 9 in 10 by the 6th turn; at c1 none of 5,500 in 20
turns: the next call of a lone client is a round trip away), and one that does goes to an
ORT thread, so those behind it batch. The answer does not wait for the watch.
"""

from __future__ import annotations

import asyncio

INLINE_MAX_ROWS = 4
INLINE_MAX_S = 0.002
WATCH_TURNS = 8


class LoopRuns:
    """One batcher's record of its small runs' cost, and the watch after a run on the loop."""

    def __init__(self) -> None:
        self._small_run_s: float | None = None  # moving average of small runs' duration
        self._watch = 0  # loop turns left in the watch after a run on the loop

    def allowed(self, n: int) -> bool:
        """Whether a request of `n` rows that finds the batcher idle may run on the loop."""
        if self._watch or n > INLINE_MAX_ROWS:
            return False
        return self._small_run_s is not None and self._small_run_s <= INLINE_MAX_S

    def ran(self, n: int, seconds: float) -> None:
        """A run of `n` rows took `seconds`, on the loop or on an ORT thread."""
        if n <= INLINE_MAX_ROWS:
            last = self._small_run_s
            self._small_run_s = seconds if last is None else 0.8 * last + 0.2 * seconds

    def ran_on_loop(self) -> None:
        """Start the watch over the running loop's next WATCH_TURNS turns."""
        self._watch = WATCH_TURNS
        if self._watch:
            asyncio.get_running_loop().call_soon(self._turned)

    def _turned(self) -> None:
        self._watch -= 1
        if self._watch:
            asyncio.get_running_loop().call_soon(self._turned)
