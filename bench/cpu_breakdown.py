"""Where a served request's CPU goes: Linux `perf` samples of the whole machine under h2load.

py-spy (bench-serving's profiles) stops the process to read native stacks and slows a
server at concurrency 1 from ~900 to ~60 requests/s, so its shares are of a different
workload. `perf record -a` at 1 kHz costs about nothing: each sample is charged to a
thread and a shared object, and dividing by the requests answered meanwhile gives
microseconds of CPU per request, split by

- thread: the server's event-loop threads (main thread of each serving process), its other
  threads (the ORT executor and intra-op threads, thread pools), grpc's `event_engine`
  threads, h2load, the idle task, anything else;
- shared object: onnxruntime, libpython (Python code being interpreted), cygrpc (grpc's
  core and Cython layer), the kernel, libc, protobuf, numpy...

    python bench/cpu_breakdown.py --system naive --system convserve --scenario c1
    python bench/cpu_breakdown.py --system "convserve, 2 workers" --scenario 32

Needs `perf` (Debian: linux-perf) and permission to record system-wide (root, or
kernel.perf_event_paranoid <= 0). Writes --out (default bench/results/cpu_breakdown.json).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import h2grpc  # noqa: E402
import serving_bench as sb  # noqa: E402

SCENARIOS = {"c1": sb.SINGLE[0], "c64": sb.SINGLE[-1], "32": sb.BULK[0], "stream": sb.BULK[1]}
DSOS = (
    ("onnxruntime", "onnxruntime"),
    ("libpython", "Python interpreter"),
    ("cygrpc", "gRPC core + Cython"),
    ("kernel", "kernel"),
    ("libc.so", "libc"),
    ("_message", "protobuf"),
    ("_multiarray", "numpy"),
)


def _dso(name: str) -> str:
    for key, label in DSOS:
        if key in name:
            return label
    return "other"


def threads_of(pid: int) -> dict[int, int]:
    """Thread id -> process id, for `pid` and every process below it."""
    out: dict[int, int] = {}
    todo = [pid]
    while todo:
        p = todo.pop()
        task = Path(f"/proc/{p}/task")
        if not task.exists():
            continue
        for t in task.iterdir():
            out[int(t.name)] = p
            children = t / "children"
            if children.exists():
                todo += [int(c) for c in children.read_text().split()]
    return out


def breakdown(data: Path, server_threads: dict[int, int], requests: float) -> dict[str, Any]:
    """perf samples (1 ms each) -> microseconds per request by thread role and by DSO."""
    text = subprocess.run(
        ["perf", "script", "-i", str(data), "-F", "comm,tid,ip,dso"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    by_role: collections.Counter[str] = collections.Counter()
    by_dso: collections.Counter[str] = collections.Counter()
    for line in text.splitlines():
        m = re.match(r"\s*(.+?)\s+(\d+)\s+.*\((.*)\)\s*$", line)
        if not m:
            continue
        comm, tid, dso = m.group(1), int(m.group(2)), m.group(3)
        if tid in server_threads:
            pid = server_threads[tid]
            if comm.startswith("event_engine") or comm.startswith("grpc"):
                role = "server: grpc threads"
            elif tid == pid:
                role = "server: event-loop (main) threads"
            else:
                role = "server: other threads (ORT, pools)"
            by_dso[_dso(dso)] += 1
        elif comm == "h2load":
            role = "h2load"
        elif comm == "swapper":
            role = "idle"
        else:
            role = "other processes"
        by_role[role] += 1
    us = 1000.0 / requests  # one sample = 1 ms of one CPU
    return {
        "us_per_request_by_thread": {k: round(v * us, 1) for k, v in by_role.most_common()},
        "server_us_per_request_by_library": {k: round(v * us, 1) for k, v in by_dso.most_common()},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--system", action="append", help="bench-serving system name (repeatable)")
    p.add_argument("--scenario", choices=sorted(SCENARIOS), default="c1")
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--model-repository", type=Path)
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/cpu_breakdown.json")
    args = p.parse_args()
    if shutil.which("perf") is None:
        raise SystemExit("perf is missing: apt-get install linux-perf")
    model = sb.find_model(args.model_repository, ROOT / "runs/bench-serving")
    images = sb.test_images((1, 28, 28))
    expected = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(
        ["probabilities"], {"images": images[:1024]}
    )[0]
    sc = SCENARIOS[args.scenario]
    out: list[dict[str, Any]] = []
    for name in args.system or ["naive", "convserve"]:
        port, mport = sb.free_port(), sb.free_port()
        system = next(s for s in sb.systems(model, port, mport, True) if s.name == name)
        with tempfile.TemporaryDirectory() as tmpdir:
            tmp = Path(tmpdir)
            with sb.started(system, port, tmp / "log") as proc:
                target = f"127.0.0.1:{port}"
                probe = sb.answer_probe(system, target, sc, images, expected)
                sb.wait_ready(system, proc, tmp / "log", probe, timeout=120)
                body = tmp / "body.bin"
                msgs = sb.request_messages(system.protocol, sc, images)
                body.write_bytes(b"".join(h2grpc.frame(m) for m in msgs))
                path = sb.PATHS[(system.protocol, sc.kind)]
                cmd = h2grpc.command("127.0.0.1", port, path, body, sc.concurrency)
                subprocess.run([*cmd, "-D", "2s"], capture_output=True, check=True)  # warm-up
                load = subprocess.Popen(
                    [*cmd, "-D", f"{round((args.seconds + 2) * 1000)}ms"],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                time.sleep(0.5)
                server_threads = threads_of(proc.pid)
                data = tmp / "perf.data"
                t0 = time.monotonic()
                record = ["perf", "record", "-a", "-e", "cpu-clock", "-F", "1000"]
                subprocess.run(
                    [*record, "-o", str(data), "--", "sleep", f"{args.seconds:g}"],
                    capture_output=True,
                    check=True,
                )
                recorded = time.monotonic() - t0
                h2 = load.communicate()[0]
                probe()  # still answering correctly after the load
            rate = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", h2)
            if rate is None:
                raise RuntimeError(f"cannot read h2load's output:\n{h2}")
            rps = float(rate.group(1))
            row = {
                "system": name,
                "scenario": sc.name,
                "requests_per_s": rps,
                "requests_per_s_answered": round(rps * sc.messages, 1),
                "images_per_s": round(rps * sc.images * sc.messages, 1),
                **breakdown(data, server_threads, rps * sc.messages * recorded),
            }
        out.append(row)
        print(json.dumps(row, indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"machine": sb.machine(), "code": sb.code_version(), "runs": out}
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
