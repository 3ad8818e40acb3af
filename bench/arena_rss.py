"""ONNX Runtime CPU memory settings, priced in resident memory: writes bench/results/arena.json.

A server sees every batch size from 1 to --max-batch-size in random order. Each setting
below runs the served model on that mix in a fresh process (so one setting's allocations
cannot hide another's) and reports RSS after warm-up, RSS at the end, and the mean run time:

- arena, next power of two: ORT's default (enable_cpu_mem_arena, kNextPowerOfTwo extension,
  enable_mem_pattern);
- arena, same as requested: the arena grows by exactly what is asked (an environment
  allocator registered with arena_extend_strategy=1, used through session.use_env_allocators);
- arena without memory patterns: enable_mem_pattern off (patterns are planned per input
  shape, and a dynamic batch makes many shapes);
- no arena: every tensor from malloc.

    python bench/arena_rss.py --model runs/bench-export/models/fashion-mnist/1/model.onnx
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SETTINGS = {
    "arena_next_power_of_two": {"arena": True, "pattern": True, "same_as_requested": False},
    "arena_same_as_requested": {"arena": True, "pattern": True, "same_as_requested": True},
    "arena_no_mem_pattern": {"arena": True, "pattern": False, "same_as_requested": False},
    "no_arena": {"arena": False, "pattern": False, "same_as_requested": False},
}


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def measure(model: Path, setting: str, runs: int, max_batch: int, threads: int) -> dict:
    """One setting, in this process: warm-up, then `runs` runs of random batch sizes."""
    import onnxruntime as ort

    cfg = SETTINGS[setting]
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.enable_cpu_mem_arena = cfg["arena"]
    so.enable_mem_pattern = cfg["pattern"]
    if cfg["same_as_requested"]:
        mem = ort.OrtMemoryInfo(
            "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
        )
        arena = ort.OrtArenaCfg({"arena_extend_strategy": 1})
        ort.create_and_register_allocator(mem, arena)
        so.add_session_config_entry("session.use_env_allocators", "1")
    sess = ort.InferenceSession(model.read_bytes(), so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = [d for d in inp.shape[1:]]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (max_batch, *shape), dtype=np.uint8)
    sizes = rng.integers(1, max_batch + 1, runs)
    rss_start = rss_mib()
    for n in (1, max_batch):  # what serving.runtime.Session.warmup does
        sess.run(None, {inp.name: images[:n]})
    warm = runs // 10
    t0 = time.perf_counter()
    for i, n in enumerate(sizes):
        sess.run(None, {inp.name: images[:n]})
        if i == warm:
            rss_warm = rss_mib()
    took = time.perf_counter() - t0
    rss_end = rss_mib()
    return {
        "setting": setting,
        **cfg,
        "rss_before_session_mib": round(rss_start, 1),
        "rss_after_warmup_mib": round(rss_warm, 1),
        "rss_end_mib": round(rss_end, 1),
        "growth_after_warmup_pct": round(100 * (rss_end - rss_warm) / rss_warm, 2),
        "mean_run_ms": round(1e3 * took / runs, 3),
        "rows_per_s": round(float(sizes.sum()) / took, 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--runs", type=int, default=1500)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("bench/results/arena.json"))
    p.add_argument("--one", choices=sorted(SETTINGS), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:  # the child: measure one setting and print it
        print(json.dumps(measure(a.model, a.one, a.runs, a.max_batch, a.threads)))
        return 0
    rows = []
    for setting in SETTINGS:
        argv = [sys.executable, __file__, "--model", str(a.model), "--one", setting]
        argv += ["--runs", str(a.runs), "--max-batch", str(a.max_batch)]
        argv += ["--threads", str(a.threads)]
        out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1])
    a.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"model": str(a.model), "runs": a.runs, "max_batch": a.max_batch, "settings": rows}
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
