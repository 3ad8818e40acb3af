"""How many CPU cores this process may use: the one answer the trainer's torch threads, the
exporter's ONNX Runtime sessions and the server's worker processes all share out."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """Cores in this process's CPU affinity mask (a container's cpuset, `taskset`), which
    `os.cpu_count()` ignores."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
