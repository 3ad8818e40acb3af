"""Which of a server's ORT runs may take every core: the run board.

With `--workers N` each worker's ORT session gets 1/N of the cores (serving.workers), so that
N workers busy at once do not preempt each other. But SO_REUSEPORT spreads connections, not
requests: a client on one gRPC channel (one connection) reaches one worker only, and 8
connections land 8/0 or 7/1 on 2 workers in 7% of tries. The busy worker then ran on half the
machine while the other core idled: 4,064 img/s of 32-image requests against 7,048 for one
worker on the same 2 cores (BENCHMARKS.md, "Session 14").

So every worker counts its runs in flight on a board: a small file that all of them map, with
each worker's runs in flight and when its last one ended. A run that finds no other run in
flight on the whole server, no other worker busy in the last QUIET_NS, and no two runs of its
own worker at once in the last QUIET_NS (its lanes, with `--instances` above 1), takes the
version's wide session (a thread per usable core); otherwise it takes its own share. ORT fixes
a session's thread count when it is made, hence two sessions per version when the board is
on (`--no-borrow-idle-cores`: one). The wide session never spins between the parallel
sections of a run: two runs that start at the same moment both find themselves alone, and a
wide run whose cores another worker takes meanwhile must not burn them waiting for a thread
that is not scheduled (one spinning 2-thread run beside a 1-thread run: -25% images/s on 2
cores; blocking instead: -10%, and a lone blocking run is as fast at batch 32).

The counts are advisory: a stale or raced count costs speed for one run, never an answer (the
two sessions are the same graph). A worker clears its own slot when it starts, so a worker
killed mid-run does not hold its count forever.
"""

from __future__ import annotations

import functools
import mmap
import os
import threading
import time
from pathlib import Path

SLOT_BYTES = 16  # per worker: runs in flight, and when its last run ended (int64s)
# Another worker counts as idle only this long after its last run ended: under load from
# many connections every worker is between two runs now and then (for the hop back to the
# event loop and the next batch), and a wide run begun in such a gap shares the cores with
# that worker's next run (2 workers at c64 single images: -5.5% requests/s without this).
QUIET_NS = 2_000_000


class RunBoard:
    """The runs in flight of every worker of one server; this process writes slot `slot`."""

    def __init__(self, path: Path | None, slots: int, slot: int):
        if not 0 <= slot < slots:
            raise ValueError(f"slot must be in 0..{slots - 1}, got {slot}")
        size = slots * SLOT_BYTES
        if path is None:  # one process: the board is private to it
            self._map = mmap.mmap(-1, size)
        else:
            fd = os.open(path, os.O_RDWR)
            try:
                if os.fstat(fd).st_size < size:
                    raise ValueError(f"run board {path} is smaller than {slots} slots")
                self._map = mmap.mmap(fd, size)
            finally:
                os.close(fd)
        self._words = memoryview(self._map).cast("q")
        self._slot = slot
        self._others = [j for j in range(slots) if j != slot]
        self._lock = threading.Lock()  # this process's lanes and loop update one slot
        # When two of this process's runs were last in flight at once. Its lanes hand a lone
        # client's calls to one another, so "another lane ran lately" would keep that client
        # narrow; under load they overlap all the time, which a lone client's runs never do.
        self._overlap_ns = -QUIET_NS
        self._words[2 * slot] = 0  # a restarted worker: whatever its predecessor left
        self.runs = 0  # this process's runs through the board, and how many ran wide
        self.wide_runs = 0

    def enter(self) -> bool:
        """Count a run in; True when it is the only one in flight on the server, every other
        worker has been idle for QUIET_NS, and no two of this worker's runs overlapped in
        that time."""
        w, mine = self._words, 2 * self._slot
        with self._lock:
            now = time.monotonic_ns()  # CLOCK_MONOTONIC: one clock for every process
            w[mine] += 1
            if w[mine] > 1:
                self._overlap_ns = now
            alone = w[mine] == 1 and now - self._overlap_ns >= QUIET_NS
            if alone and self._others:
                alone = all(w[2 * j] == 0 and now - w[2 * j + 1] >= QUIET_NS for j in self._others)
            self.runs += 1
            self.wide_runs += alone
            return alone

    def leave(self) -> None:
        w, mine = self._words, 2 * self._slot
        with self._lock:
            now = time.monotonic_ns()
            if w[mine] > 1:  # an overlap lasts until one of its runs leaves
                self._overlap_ns = now
            w[mine] -= 1
            w[mine + 1] = now

    def counts(self) -> tuple[int, int]:
        """(runs, of which wide) this process has made through the board."""
        with self._lock:
            return self.runs, self.wide_runs

    def in_flight(self) -> int:
        """Runs in flight on the whole server now."""
        return sum(self._words[0::2])


def make_board_file(folder: Path, slots: int) -> Path:
    """A zeroed board for `slots` workers in `folder` (the parent's private folder)."""
    path = folder / "run-board"
    path.write_bytes(bytes(slots * SLOT_BYTES))
    return path


_opened: list[RunBoard] = []


@functools.cache
def board_for(path: str, slots: int, slot: int) -> RunBoard:
    """This process's board: every session it opens shares the one object ("": private)."""
    board = RunBoard(Path(path) if path else None, slots, slot)
    _opened.append(board)
    return board


def process_board() -> RunBoard | None:
    """The board this process's sessions use (None: no session has one)."""
    return _opened[0] if _opened else None
