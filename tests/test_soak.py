"""Soak, the short form of `make soak`: ~25 s of steady open-loop load on a real `cnn-serve`
(tiny model) while its open file descriptors and resident memory are sampled from /proc.
The fd count must stay flat once the client's connections are up and return to the idle
count once they close; RSS must stay under an absolute bound. (The long form measures RSS
growth after warm-up; 25 s is too short for a growth percentage to mean anything.)"""

from __future__ import annotations

import threading
import time

import pytest

from bench.process_stats import MIB, Sampler, open_fds
from serving.client.loadgen import LoadConfig, run_load
from tests import tiny_models
from tests.serving_helpers import running_server

SHAPE = (1, 8, 8)
CONNECTIONS = 4
WARMUP_S = 5.0
DURATION_S = 20.0
RATE = 200.0  # requests/s: steady, well inside what the tiny model sustains
# Python + grpc + ONNX Runtime + numpy with the tiny model idle at about 115 MiB here. Under
# steady load the server holds at most a few hundred small calls in flight; 256 MiB leaves
# room for allocator slack and a bigger libc arena, and catches a leak of a few KiB per
# request (200/s x 25 s = 5000 requests) long before the long form would.
RSS_BOUND = 256 * MIB
# The server reads /proc/self/statm and lists /proc/self/fd once a second for its own
# process gauges: a sample taken during that read sees one more fd.
FD_SLACK = 1


@pytest.mark.slow
def test_soak_keeps_fds_flat_and_memory_bounded(tmp_path):
    tiny_models.write_version(tmp_path / "models", "tiny", 1, shape=SHAPE)
    args = ("--intra-op-threads", "1", "--poll-interval", "0")
    with running_server(tmp_path / "models", tmp_path, *args) as s:
        pid = s.proc.pid
        time.sleep(1.0)
        idle_fds = open_fds(pid)
        cfg = LoadConfig(
            target=s.target,
            shape=SHAPE,
            rate=RATE,
            duration=DURATION_S,
            warmup=WARMUP_S,
            connections=CONNECTIONS,
        )
        result: dict = {}
        load = threading.Thread(target=lambda: result.update(run_load(cfg)))
        with Sampler(pid, every=0.5) as mem:
            started = time.monotonic()
            load.start()
            load.join()
        assert result["error_count"] == 0, result["errors"]
        assert result["requests"] >= 0.9 * RATE * DURATION_S  # the load really ran

        # Inside the measured window, clear of its ends (connections opening and closing).
        until = started + WARMUP_S + DURATION_S - 1.0
        steady = [smp.fds[pid] for smp in mem.since(started + WARMUP_S + 1.0) if smp.t < until]
        assert len(steady) >= 10
        # Flat: the connections are up; nothing else opens or leaks descriptors per request.
        assert max(steady) - min(steady) <= FD_SLACK, steady
        assert min(steady) <= idle_fds + CONNECTIONS + FD_SLACK, (idle_fds, steady)
        assert mem.max_rss() < RSS_BOUND, mem.max_rss() / MIB

        # The client's connections closed: back to the idle count (the server notices the
        # closes asynchronously, so poll briefly).
        closed_by = time.monotonic() + 10
        while open_fds(pid) > idle_fds + FD_SLACK:
            assert time.monotonic() < closed_by, (idle_fds, open_fds(pid))
            time.sleep(0.1)
        print(  # shown with -s or on failure
            f"fds idle {idle_fds}, steady {min(steady)}..{max(steady)}, after {open_fds(pid)}; "
            f"RSS max {mem.max_rss() / MIB:.1f} MiB; {result['requests']} requests"
        )
