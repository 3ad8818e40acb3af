"""What cnn-bench measured and how it says so: the latency samples and error counts of each
client process (merged exactly), percentiles, the JSON report and the table."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from serving.client.loadgen.config import LoadConfig


@dataclass
class Samples:
    """What one process measured: latency samples (s) of OK requests and error counts."""

    latencies: list[float] = field(default_factory=list)  # from due (open) or sent (closed)
    from_send: list[float] = field(default_factory=list)  # open loop: from the actual send
    errors: Counter = field(default_factory=Counter)
    warmup_ok: int = 0
    warmup_errors: int = 0
    late_ok: int = 0  # finished after the measured window (closed loop: sent inside it)
    first_sent: float = math.inf
    last_done: float = 0.0
    max_send_lag: float = 0.0  # open loop: how far behind schedule the client sent

    def merge(self, other: Samples) -> None:
        self.latencies += other.latencies
        self.from_send += other.from_send
        self.errors.update(other.errors)
        self.warmup_ok += other.warmup_ok
        self.warmup_errors += other.warmup_errors
        self.late_ok += other.late_ok
        self.first_sent = min(self.first_sent, other.first_sent)
        self.last_done = max(self.last_done, other.last_done)
        self.max_send_lag = max(self.max_send_lag, other.max_send_lag)


def percentiles(latencies_s: Sequence[float]) -> dict[str, float]:
    if not latencies_s:
        return {k: math.nan for k in ("p50", "p90", "p99", "max", "mean")}
    a = np.asarray(latencies_s) * 1e3
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {
        "p50": round(float(p50), 4),
        "p90": round(float(p90), 4),
        "p99": round(float(p99), 4),
        "max": round(float(a.max()), 4),
        "mean": round(float(a.mean()), 4),
    }


def report(cfg: LoadConfig, s: Samples) -> dict[str, Any]:
    """Requests/s and images/s over the measured window, latency percentiles (ms), errors.

    Closed loop: every request sent inside the window counts, and the window is stretched to
    the last answer (the tail is one latency). Open loop: every request *due* inside the
    window counts, and latency runs from its due time."""
    ok = len(s.latencies)
    window = cfg.duration
    if ok and not cfg.open_loop:
        window = max(window, s.last_done - s.first_sent)
    errors = dict(sorted(s.errors.items()))
    out: dict[str, Any] = {
        "target": cfg.target,
        "mode": cfg.mode,
        "loop": "open" if cfg.open_loop else "closed",
        "concurrency": None if cfg.open_loop else cfg.concurrency,
        "rate": cfg.rate if cfg.open_loop else None,
        "images_per_request": cfg.images_per_request,
        "encoding": "png" if cfg.png else "raw_uint8",
        "processes": cfg.processes,
        "connections": cfg.n_connections(),
        "duration_s": round(window, 3),
        "warmup_s": cfg.warmup,
        "requests": ok,
        "errors": errors,
        "error_count": sum(errors.values()),
        "requests_per_s": round(ok / window, 1),
        "images_per_s": round(ok * cfg.images_per_request / window, 1),
        "latency_ms": percentiles(s.latencies),
        "warmup": {"requests": s.warmup_ok, "errors": s.warmup_errors},
    }
    if cfg.open_loop:
        # Latency counts from the due time; this is how late the client itself sent (timer
        # resolution, a busy event loop) and the latency counted from the actual send.
        out["max_send_lag_ms"] = round(s.max_send_lag * 1e3, 3)
        out["latency_from_send_ms"] = percentiles(s.from_send)
    out["config"] = {k: v for k, v in asdict(cfg).items() if k != "access"}  # no secrets
    return out


def format_table(r: dict[str, Any]) -> str:
    lat = r["latency_ms"]
    load = f"rate {r['rate']:g}/s" if r["loop"] == "open" else f"concurrency {r['concurrency']}"
    rows = [
        ("target", f"{r['target']} ({r['mode']}, {r['encoding']})"),
        ("load", f"{r['loop']} loop, {load}, {r['images_per_request']} image(s)/request"),
        ("clients", f"{r['processes']} process(es), {r['connections']} connection(s)"),
        ("measured", f"{r['duration_s']:.2f} s after {r['warmup_s']:g} s warm-up"),
        ("requests", f"{r['requests']} OK ({r['requests_per_s']:.1f}/s)"),
        ("images/s", f"{r['images_per_s']:.1f}"),
        (
            "latency ms",
            f"p50 {lat['p50']:.3f}  p90 {lat['p90']:.3f}  p99 {lat['p99']:.3f}  "
            f"max {lat['max']:.3f}",
        ),
        ("errors", ", ".join(f"{k} {v}" for k, v in r["errors"].items()) or "none"),
    ]
    if "max_send_lag_ms" in r:
        rows.append(("send lag", f"max {r['max_send_lag_ms']:.3f} ms behind schedule"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
