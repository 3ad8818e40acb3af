"""gRPC load from `h2load` (Debian: nghttp2-client): a C client that costs the server's cores
far less than any Python client, fed a pre-serialised gRPC request body.

A gRPC message on the wire is a 5-byte prefix (0 = not compressed, then the length as a
big-endian uint32) and the serialised protobuf. h2load POSTs the same body on every stream
with the headers gRPC needs (`content-type: application/grpc`, `te: trailers`).

h2load judges success by the HTTP status, and gRPC answers HTTP 200 even for a failed call
(the status is in the trailers). So a run is only trusted when the response *data* bytes
h2load received equal requests x the size of a correct response, measured beforehand with
a real client (a failed call carries no data); the caller also checks answers for
correctness with a real client after each run.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def frame(message: bytes) -> bytes:
    """One length-prefixed gRPC message."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def unframe(body: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(body):
        n = int.from_bytes(body[i + 1 : i + 5], "big")
        out.append(body[i + 5 : i + 5 + n])
        i += 5 + n
    return out


def available() -> str | None:
    """h2load's version line, or None when it is not installed."""
    if shutil.which("h2load") is None:
        return None
    return subprocess.run(["h2load", "--version"], capture_output=True, text=True).stdout.strip()


def layout(concurrency: int, max_connections: int = 8) -> tuple[int, int]:
    """(connections, streams per connection) for `concurrency` requests in flight."""
    conns = min(concurrency, max_connections)
    return conns, math.ceil(concurrency / conns)


@dataclass
class H2Result:
    seconds: float
    done: int
    succeeded: int
    failed: int
    data_bytes: int
    requests_per_s: float
    latency_ms: dict[str, float]
    command: str
    status_2xx: int = 0  # HTTP answers with a 2xx status (gRPC's failures are 200s too)


def command(
    host: str,
    port: int,
    path: str,
    body: Path,
    concurrency: int,
    *,
    layout_of: tuple[int, int] | None = None,
    headers: tuple[str, ...] = (),
) -> list[str]:
    """h2load posting the pre-framed gRPC `body` to `path` with `concurrency` streams in flight
    (or `layout_of` = (connections, streams per connection)), with extra `headers` (add -D
    for a duration)."""
    conns, streams = layout_of or layout(concurrency)
    extra = [arg for h in headers for arg in ("-H", h)]
    return [
        "h2load",
        f"http://{host}:{port}{path}",
        "-d",
        str(body),
        "-H",
        "te: trailers",
        "-H",
        "content-type: application/grpc",
        *extra,
        "-c",
        str(conns),
        "-m",
        str(streams),
    ]


def run(
    port: int,
    path: str,
    body: Path,
    concurrency: int,
    duration: float,
    warmup: float,
    log: Path,
    host: str = "127.0.0.1",
) -> H2Result:
    """Keep `concurrency` streams in flight for `duration` s, after a separate `warmup` s run
    (h2load's own --warm-up-time counts the warm-up's bytes in its totals)."""
    return measure(command(host, port, path, body, concurrency), duration, warmup, log)


def measure(base: list[str], duration: float, warmup: float, log: Path) -> H2Result:
    """Run the h2load command `base` for a `warmup` s (discarded), then `duration` s."""
    if warmup > 0:
        _h2load([*base, "-D", f"{round(warmup * 1000)}ms"], warmup)
    log.unlink(missing_ok=True)  # h2load appends to an existing log
    cmd = [*base, "-D", f"{round(duration * 1000)}ms", "--log-file", str(log)]
    out = _h2load(cmd, duration)
    finished = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", out)
    reqs = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed", out
    )
    data = re.search(r"\((\d+)\) data", out)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if not (finished and reqs and data and codes):
        raise RuntimeError(f"cannot read h2load's output:\n{out}")
    seconds = float(finished.group(1)) / (1000 if finished.group(2) == "ms" else 1)
    return H2Result(
        seconds=seconds,
        done=int(reqs.group(3)),
        succeeded=int(reqs.group(4)),
        failed=int(reqs.group(5)),
        data_bytes=int(data.group(1)),
        requests_per_s=float(finished.group(3)),
        latency_ms=log_percentiles(log),
        command=" ".join(f"'{c}'" if " " in c else c for c in cmd),
        status_2xx=int(codes.group(1)),
    )


def _h2load(cmd: list[str], seconds: float) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    if proc.returncode != 0 or "finished in" not in proc.stdout:
        raise RuntimeError(f"h2load failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def log_percentiles(log: Path) -> dict[str, float]:
    """Latency percentiles from h2load's --log-file (start us, status, duration us)."""
    rows = [line.split("\t") for line in log.read_text().splitlines() if line.strip()]
    us = np.array([float(r[2]) for r in rows if len(r) >= 3])
    if us.size == 0:
        return {k: math.nan for k in ("p50", "p90", "p99", "max", "mean")}
    p50, p90, p99 = np.percentile(us, [50, 90, 99]) / 1e3
    return {
        "p50": round(float(p50), 4),
        "p90": round(float(p90), 4),
        "p99": round(float(p99), 4),
        "max": round(float(us.max()) / 1e3, 4),
        "mean": round(float(us.mean()) / 1e3, 4),
    }
