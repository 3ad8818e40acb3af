"""`make soak`: hours-in-minutes at a steady 70% of the sustainable rate; writes
bench/results/soak.json.

The rate is 70% of --rate when given, else of the sustainable rate a short search finds
first (bench/sustainable.py: the highest open-loop rate with no errors at a 0.5 s
deadline). Every --sample-every seconds the RSS and open file descriptors of the server's
process tree (parent and workers) are read from /proc. Reported: RSS growth from the end of
the warm-up to the end (target < 5%), fd counts per process after warm-up (target: flat),
errors, and the ONNX Runtime memory settings the server ran with.

    SOAK_SECONDS=600 python bench/soak.py --model-repository runs/bench-export/models
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from process_stats import MIB, Sampler  # noqa: E402
from sustainable import start_pinned, sustainable_rate  # noqa: E402

from serving.client.loadgen import LoadConfig, resolve, run_load  # noqa: E402
from serving.runtime import session_options  # noqa: E402
from serving.settings import ServerSettings  # noqa: E402

GROWTH_TARGET_PCT = 5.0


def arena_settings() -> dict[str, Any]:
    so = session_options(ServerSettings().runtime)
    return {
        "enable_cpu_mem_arena": so.enable_cpu_mem_arena,
        "enable_mem_pattern": so.enable_mem_pattern,
        "arena_extend_strategy": "kNextPowerOfTwo (ORT default)",
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-repository", type=Path, default=ROOT / "runs/bench-export/models")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/soak.json")
    p.add_argument("--seconds", type=float, default=float(os.environ.get("SOAK_SECONDS", 600)))
    p.add_argument("--warmup-fraction", type=float, default=0.1, help="of --seconds")
    p.add_argument("--fraction", type=float, default=0.7, help="of the sustainable rate")
    p.add_argument("--rate", type=float, default=0.0, help="sustainable rate (0: search)")
    p.add_argument("--deadline", type=float, default=5.0, help="client deadline per request, s")
    p.add_argument("--sample-every", type=float, default=5.0)
    p.add_argument("server_args", nargs="*", help="extra cnn-serve flags (after --)")
    a = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    # The server on the first half of the CPUs, the load on the rest.
    with start_pinned(a.model_repository, tmp, *a.server_args) as (s, cpus):
        cfg = resolve(LoadConfig(target=s.target, timeout=a.deadline, connections=8))
        if a.rate > 0:
            sustainable, source = a.rate, "--rate"
        else:
            sustainable, _ = sustainable_rate(s, replace(cfg, timeout=0.5), 100.0, 3.0)
            source = "measured here first"
        rate = a.fraction * sustainable
        warmup = a.seconds * a.warmup_fraction
        print(f"soak: {rate:.0f}/s ({a.fraction:g} x {sustainable:g}/s) for {a.seconds:g} s")
        result: dict[str, Any] = {}
        run = replace(cfg, rate=rate, duration=a.seconds - warmup, warmup=warmup)
        load = threading.Thread(target=lambda: result.update(run_load(run)))
        with Sampler(s.proc.pid, every=a.sample_every) as mem:
            started = time.monotonic()
            load.start()
            load.join()
        log = s.log()
    rc = s.proc.returncode

    # After warm-up and before the clients close their connections at the end.
    until = started + a.seconds - a.sample_every
    steady = [smp for smp in mem.since(started + warmup) if smp.t < until]
    first, last = steady[0], steady[-1]
    growth = 100 * (last.rss_total - first.rss_total) / first.rss_total
    fds = {
        str(pid): {
            "min": min(smp.fds[pid] for smp in steady if pid in smp.fds),
            "max": max(smp.fds[pid] for smp in steady if pid in smp.fds),
        }
        for pid in first.fds
    }
    checks = {
        "rss_growth_under_5pct": growth < GROWTH_TARGET_PCT,
        "fds_flat": all(v["max"] - v["min"] <= 1 for v in fds.values()),
        "no_errors": not result["errors"],
        "server_exit_code_0": rc == 0,
        "no_errors_logged_by_convserve": " ERROR convserve" not in log,
    }
    out = {
        "seconds": a.seconds,
        "warmup_s": warmup,
        "rate_per_s": round(rate, 1),
        "sustainable_rate_per_s": sustainable,
        "sustainable_rate_from": source,
        "cpus": cpus,
        "server_args": a.server_args,
        "onnxruntime_memory": arena_settings(),
        "requests_ok": result["requests"],
        "errors": result["errors"],
        "latency_ms": result["latency_ms"],
        "rss_mib": {
            "after_warmup": round(first.rss_total / MIB, 1),
            "end": round(last.rss_total / MIB, 1),
            "max": round(max(smp.rss_total for smp in steady) / MIB, 1),
            "growth_after_warmup_pct": round(growth, 2),
        },
        # fd counts per process (with 1 of slack: the server lists /proc/self/fd once a
        # second for its own gauge, which holds one more fd while it does).
        "open_fds_after_warmup": fds,
        "samples": [
            {
                "t_s": round(smp.t - started, 1),
                "rss_mib": round(smp.rss_total / MIB, 2),
                "fds": smp.fds_total,
            }
            for smp in mem.samples
        ],
        "checks": checks,
        "passed": all(checks.values()),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "samples"}, indent=2))
    return 0 if out["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
