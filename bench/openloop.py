"""Offered load that is really offered: h2load at a fixed rate (open loop, C, cheap for the
cores it shares), with a checked gRPC client sampling beside it.

h2load sends `--rps` requests a second on each connection whatever the server does, each with
a `grpc-timeout` header, so the server sees the deadline a gRPC client would send. It counts a
gRPC error as a success (HTTP 200; the status is in the trailers), so the figures come from
three places that check each other: the server's own counts by status code
(`convserve_requests_total`), the response data bytes h2load received (only an OK answer
carries a message: data bytes / the size of one answer = OK answers), and the sampling client,
a real gRPC client that sends one call every `every` seconds with the same deadline and records
each status and how long it took, so the time to a refusal is measured where a caller sees it.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench import h2grpc

REFUSALS = ("RESOURCE_EXHAUSTED", "UNAVAILABLE")


def percentiles(ms: list[float]) -> dict[str, float]:
    if not ms:
        return {"n": 0}
    p50, p99 = np.percentile(ms, [50, 99])
    return {"n": len(ms), "p50": round(float(p50), 2), "p99": round(float(p99), 2)}


@dataclass
class Sampler:
    """One unary call every `every` seconds on one channel, open loop like the load (a call
    does not wait for the one before), from a thread, until stopped."""

    target: str
    path: str
    message: bytes
    deadline: float
    every: float = 0.01
    calls: list[tuple[str, float]] = field(default_factory=list)  # (status, ms)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()

    def _run(self) -> None:
        pending: list[grpc.Future] = []
        with grpc.insecure_channel(self.target) as ch:
            call = ch.unary_unary(self.path)
            next_at = time.monotonic()
            while not self._stop.is_set():
                t0 = time.monotonic()
                f = call.future(self.message, timeout=self.deadline)
                f.add_done_callback(lambda f, t0=t0: self._done(f, t0))
                pending.append(f)
                next_at += self.every
                self._stop.wait(max(0.0, next_at - time.monotonic()))
            for f in pending:  # every sampled call is answered (its deadline bounds it)
                with contextlib.suppress(grpc.RpcError, grpc.FutureCancelledError):
                    f.result()

    def _done(self, f: grpc.Future, t0: float) -> None:
        ms = (time.monotonic() - t0) * 1e3
        exc = f.exception()
        self.calls.append(("OK" if exc is None else exc.code().name, ms))

    def report(self) -> dict[str, Any]:
        codes = Counter(s for s, _ in self.calls)
        return {
            "calls": len(self.calls),
            "statuses": dict(codes),
            "refusal_ms": percentiles([ms for s, ms in self.calls if s in REFUSALS]),
            "ok_ms": percentiles([ms for s, ms in self.calls if s == "OK"]),
        }


@dataclass
class Offered:
    """What h2load sent and got back in one open-loop run."""

    asked_per_s: float
    seconds: float
    started: int
    done: int
    data_bytes: int
    answer_bytes: int
    command: str

    @property
    def sent_per_s(self) -> float:
        return self.started / self.seconds

    @property
    def answers_with_data(self) -> float:
        """OK answers, by the bytes: a refusal carries no message."""
        return self.data_bytes / self.answer_bytes


def open_loop(
    port: int,
    path: str,
    body: Path,
    answer_bytes: int,
    rate: float,
    seconds: float,
    deadline: float,
    connections: int = 8,
    cpus: str | None = None,
    host: str = "127.0.0.1",
) -> Offered:
    """Offer `rate` calls a second for `seconds` over `connections` connections, each call
    with a `deadline` (s) in its grpc-timeout header; h2load pinned to `cpus` if given."""
    per_connection = max(1.0, rate / connections)
    timeout = f"grpc-timeout: {max(1, round(deadline * 1000))}m"
    # 4096 streams a connection: never the limit, so the rate is the offer.
    cmd = h2grpc.command(
        host, port, path, body, connections, layout_of=(connections, 4096), headers=(timeout,)
    )
    cmd += ["--rps", f"{per_connection:.1f}", "-D", f"{round(seconds * 1000)}ms"]
    if cpus is not None:
        cmd = ["taskset", "-c", cpus, *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
    out = proc.stdout
    reqs = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done", out)
    data = re.search(r"\((\d+)\) data", out)
    if proc.returncode != 0 or not (reqs and data):
        raise RuntimeError(f"h2load failed ({proc.returncode}):\n{out}\n{proc.stderr}")
    return Offered(
        asked_per_s=rate,
        seconds=seconds,
        started=int(reqs.group(2)),
        done=int(reqs.group(3)),
        data_bytes=int(data.group(1)),
        answer_bytes=answer_bytes,
        command=" ".join(f"'{c}'" if " " in c else c for c in cmd),
    )
