"""Resident memory and open file descriptors of a server process tree, read from /proc.

A measuring tool of bench/overload.py and bench/soak.py, and of their short forms in tests/
(`from bench.process_stats import ...`): a `--workers N` server is a parent plus N workers,
so figures are taken for every process of the tree and summed, and per process where that
matters (fd counts).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass, field

MIB = 1024 * 1024


def children(pid: int) -> list[int]:
    """Direct children of `pid` (from /proc/PID/task/*/children)."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    return out


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children(p)
    return out


def rss_bytes(pid: int) -> int:
    """Resident set size of one process (VmRSS), 0 once it has gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def open_fds(pid: int) -> int:
    """Open file descriptors of one process, -1 once it has gone."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


@dataclass
class Sample:
    t: float  # time.monotonic()
    rss: dict[int, int]  # pid -> bytes
    fds: dict[int, int]  # pid -> open fds

    @property
    def rss_total(self) -> int:
        return sum(self.rss.values())

    @property
    def fds_total(self) -> int:
        return sum(v for v in self.fds.values() if v >= 0)


def sample(pid: int) -> Sample:
    pids = tree(pid)
    return Sample(time.monotonic(), {p: rss_bytes(p) for p in pids}, {p: open_fds(p) for p in pids})


@dataclass
class Sampler:
    """Samples a process tree every `every` seconds on a thread, while in a `with` block."""

    pid: int
    every: float = 0.25
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Sampler:
        self.samples.append(sample(self.pid))
        self._thread = threading.Thread(target=self._run, name="proc-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.samples.append(sample(self.pid))

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.samples.append(sample(self.pid))

    def max_rss(self) -> int:
        return max(s.rss_total for s in self.samples)

    def since(self, t: float) -> list[Sample]:
        return [s for s in self.samples if s.t >= t]
