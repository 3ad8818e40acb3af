"""Serving targets measured interleaved: every system running at once, measured in rounds.

`bench/serving_bench.py` runs the systems one after another. On this VM the speed of ONNX
Runtime in-process moves by 15-25% within one such run, more than the margins the targets
leave (5%, 10%, 0.3 ms), so one run can pass or fail a target on the drift alone. Here all
the systems the targets name are started at the same time on their own ports (idle except
the one under load; their CPU while idle is recorded), and each round measures, back to
back:

- concurrency 1: the ORT batch-1 ceiling, the empty grpc.aio server (on asyncio's loop and
  on uvloop), the naive server and convserve (1 and 2 workers), the ceiling again;
- concurrency 64: the naive server, Triton's core and convserve (1 and 2 workers);
- 32-image requests and streams (4 requests of 32 images on each of 8 streams) from the
  naive server and convserve, each between two batch-32 ceilings; around the group, the
  ceiling as the 2-worker server lays its threads out (two sessions of one intra-op thread
  each, run at once from two threads: what 2 workers can do at most on 2 cores).
  The 2-worker server's rows say how h2load's connections fell on its workers (`ss`,
  halfway through each run): SO_REUSEPORT hashes each connection to one worker.
  The naive server also runs there as 2 processes of one ORT thread each on one port (the
  2 workers' layout, what a user gets by starting it twice), and with `--sync-peer` the
  same on grpc's thread-pool server, which prices grpc.aio's transport.

With `--before DIR` (a checkout of an earlier commit, e.g. `git worktree add DIR <commit>`),
convserve from DIR joins every group under its own names ("... (before)"), so a change is
measured against its baseline in the same rounds; the report adds a before/after table.

The order within a group turns each round. A target's figure is the median over rounds of
that round's ratio (or overhead), given with the rounds' range and how many rounds met it.
Every run is bracketed by correctness passes like bench-serving's, and h2load's received
bytes are checked.

    python bench/serving_targets.py [--rounds 5] [--duration 4] [--model-repository DIR]
        [--before DIR] [--groups c1,c64,bulk] [--sync-peer]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import h2grpc  # noqa: E402
import serving_bench as sb  # noqa: E402
from serving_report import EMPTY, EMPTY_UV, NAIVE, NAIVE2, NAIVE2_SYNC, TRITON  # noqa: E402

from serving.runtime import session_options  # noqa: E402
from serving.settings import ServerSettings  # noqa: E402

ONE = "convserve"
TWO = "convserve, 2 workers"
OURS = (ONE, TWO)
BEFORE = " (before)"  # the suffix of a --before system's name
GROUPS = ("c1", "c64", "bulk")
C1, C64 = sb.SINGLE[0], sb.SINGLE[-1]
BULK32, STREAM = sb.BULK
CEILING_S = 1.5  # seconds of in-process ORT per ceiling measurement


def ceiling(model: Path, images: np.ndarray, batch: int) -> float:
    """ms per run at batch 1, or images/s at batch 32: the figure the targets compare with."""
    c = sb.ort_ceiling(model, images, CEILING_S, (batch,))[str(batch)]
    return c["ms_per_run_p50"] if batch == 1 else c["images_per_s"]


def layout_ceiling(model: Path, images: np.ndarray, sessions: int = 2, batch: int = 32) -> float:
    """images/s of `sessions` ORT sessions of one intra-op thread each, run at once from as
    many threads at `batch`: the ceiling as `sessions` workers on as many cores lay their
    threads out (a one-thread run spends less CPU per image than a two-thread one)."""
    opts = session_options(ServerSettings(device="cpu", intra_op_threads=1).runtime)
    made = [
        ort.InferenceSession(str(model), opts, ["CPUExecutionProvider"]) for _ in range(sessions)
    ]
    x = images[:batch]
    for sess in made:
        for _ in range(10):
            sess.run(["probabilities"], {"images": x})
    counts = [0] * sessions
    start = threading.Barrier(sessions + 1)
    end = [0.0]

    def drive(i: int) -> None:
        start.wait()
        while time.perf_counter() < end[0]:
            made[i].run(["probabilities"], {"images": x})
            counts[i] += 1

    threads = [threading.Thread(target=drive, args=(i,)) for i in range(sessions)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    end[0] = t0 + CEILING_S
    start.wait()
    for t in threads:
        t.join()
    return batch * sum(counts) / (time.perf_counter() - t0)


def summary(values: list[float], met: list[bool]) -> dict[str, Any]:
    return {
        "median": round(statistics.median(values), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
        "rounds": [round(v, 4) for v in values],
        "rounds_met": sum(met),
    }


def judged(
    target: str, per: dict[str, list[float]], need: float, unit: str, higher: bool = True
) -> dict[str, Any]:
    """A target's verdict for the convserve configuration with the best median of `per`
    (per-round figures by system): met when that median is >= `need` (or <= when not
    `higher`)."""
    ok = (lambda v: v >= need) if higher else (lambda v: v <= need)
    pick = max if higher else min
    best = pick(per, key=lambda name: statistics.median(per[name]))
    s = summary(per[best], [ok(v) for v in per[best]])
    return {
        "target": target,
        "system": best,
        **s,
        "unit": unit,
        "others": {k: summary(v, [ok(x) for x in v]) for k, v in per.items()},
        "met": ok(s["median"]),
    }


def evaluate(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-round ratios and overheads, and each target's verdict on their median."""
    out: list[dict[str, Any]] = []
    for peer, need, goal in ((TRITON, 1.2, 1.5), (NAIVE, 1.1, None)):
        if not all(peer in r["c64"] and ONE in r["c64"] for r in rounds):
            continue
        per = {
            ours: [
                r["c64"][ours]["requests_per_s"] / r["c64"][peer]["requests_per_s"] for r in rounds
            ]
            for ours in OURS
        }
        name = f"single-image unary c64: >= {need}x {peer} requests/s"
        t = judged(name + (f" (goal {goal}x)" if goal else ""), per, need, "x")
        t["goal_met"] = t["median"] >= goal if goal else None
        out.append(t)
    for key, sc in (("bulk32", BULK32), ("stream", STREAM)):
        if not all(ONE in r[key] for r in rounds):
            continue
        per = {ours: [r[key][ours]["x_ceiling"] for r in rounds] for ours in OURS}
        name = f"{sc.name}: >= 95% of the ORT in-process ceiling (batch 32) images/s"
        out.append(judged(name, per, 0.95, "x ceiling"))
        for peer, what in (
            (NAIVE, "the naive server's images/s in the same round"),
            (NAIVE2, "the naive server as 2 processes of 1 ORT thread, same round"),
        ):
            if not all(peer in r[key] for r in rounds):
                continue
            per = {
                ours: [r[key][ours]["images_per_s"] / r[key][peer]["images_per_s"] for r in rounds]
                for ours in OURS
            }
            out.append(judged(f"{sc.name}: >= {what}", per, 1.0, "x naive"))
        layout = {TWO: [r[key][TWO]["x_layout_ceiling"] for r in rounds]}
        name = (
            f"(yardstick) {sc.name}: >= 95% of the ceiling as 2 workers lay their threads "
            "out (2 sessions x 1 thread, batch 32)"
        )
        out.append(judged(name, layout, 0.95, "x layout ceiling"))
    if not all(ONE in r["c1"] for r in rounds):
        return out
    per = {ours: [r["c1"][ours]["overhead_ms"] for r in rounds] for ours in OURS}
    name = "concurrency 1: p50 above the empty grpc.aio server <= ORT batch-1 compute + 0.3 ms"
    out.append(judged(name, per, 0.3, "ms over compute", higher=False))
    best = out[-1]["system"]
    naive = [r["c1"][NAIVE]["overhead_ms"] for r in rounds]
    out[-1]["naive_overhead_ms"] = summary(naive, [v <= 0.3 for v in naive])
    strict = {best: [r["c1"][best]["overhead_uvloop_ms"] for r in rounds]}
    name = (
        "(stricter) concurrency 1: p50 above the empty grpc.aio server on uvloop <= ORT "
        "batch-1 compute + 0.3 ms"
    )
    out.append(judged(name, strict, 0.3, "ms over compute", higher=False))
    return out


# What the before/after table compares: (row, group, field, systems).
COMPARED = (
    ("c1 p50 ms over compute", "c1", "overhead_ms", (ONE,)),
    ("c64 requests/s", "c64", "requests_per_s", OURS),
    ("c64 server CPU ms per request", "c64", "server_cpu_ms", OURS),
    ("32 images, x ceiling", "bulk32", "x_ceiling", OURS),
    ("32 images, server CPU ms per request", "bulk32", "server_cpu_ms", OURS),
    ("stream, x ceiling", "stream", "x_ceiling", OURS),
    ("stream, server CPU ms per request", "stream", "server_cpu_ms", OURS),
)


def before_after(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each compared figure's median before and after, and the median of the rounds'
    after/before ratios (the two were measured minutes apart at most, in turn)."""
    rows = []
    for label, group, key, systems in COMPARED:
        for name in systems:
            old = name + BEFORE
            have = [r[group] for r in rounds if name in r[group] and old in r[group]]
            if len(have) != len(rounds) or not have:
                continue
            a = [g[old][key] for g in have]
            b = [g[name][key] for g in have]
            rows.append(
                {
                    "figure": label,
                    "system": name,
                    "before": summary(a, [True] * len(a)),
                    "after": summary(b, [True] * len(b)),
                    "after_over_before": summary(
                        [y / x for x, y in zip(a, b, strict=True)], [True] * len(a)
                    ),
                }
            )
    return rows


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        f"Interleaved targets: {len(doc['rounds'])} rounds, {doc['method']['duration_s']:g} s "
        f"per run after {doc['method']['warmup_s']:g} s of warm-up; {doc['wall_s']:.0f} s in all.",
        "",
        "| target | convserve | median | range over rounds | rounds met | met |",
        "|---|---|---:|---:|---:|---|",
    ]
    for t in doc["targets"]:
        met = "yes" if t["met"] else "**no**"
        if t.get("goal_met") is not None:
            met += f" (goal: {'yes' if t['goal_met'] else 'no'})"
        lines.append(
            f"| {t['target']} | {t['system']} | {t['median']:.3f} {t['unit']} "
            f"| {t['min']:.3f}-{t['max']:.3f} | {t['rounds_met']}/{len(t['rounds'])} | {met} |"
        )
    if doc.get("before_after"):
        lines += [
            "",
            f"Before ({doc['before']['commit']}) and after, in the same rounds: medians "
            "(range), and the median of the rounds' after/before ratios.",
            "",
            "| figure | system | before | after | after / before |",
            "|---|---|---:|---:|---:|",
        ]
        for row in doc["before_after"]:
            a, b, q = row["before"], row["after"], row["after_over_before"]
            lines.append(
                f"| {row['figure']} | {row['system']} | {a['median']:.3f} ({a['min']:.3f}-"
                f"{a['max']:.3f}) | {b['median']:.3f} ({b['min']:.3f}-{b['max']:.3f}) "
                f"| {q['median']:.3f} ({q['min']:.3f}-{q['max']:.3f}) |"
            )
    lines += ["", "Per round (each row measured back to back):", ""]
    rounds = doc["rounds"]
    if all(ONE in r["c1"] for r in rounds):
        lines += [
            "| round | ORT batch 1 ms | c1 p50 ms: empty / empty on uvloop / naive / "
            "convserve / 2 workers | c1 ms over compute: naive / convserve / convserve above "
            "the uvloop floor |",
            "|---:|---:|---|---|",
        ]
        for i, r in enumerate(rounds, 1):
            c1 = r["c1"]
            p50 = " / ".join(f"{c1[s]['p50_ms']:.3f}" for s in (EMPTY, EMPTY_UV, NAIVE, ONE, TWO))
            over = " / ".join(f"{c1[s]['overhead_ms']:.3f}" for s in (NAIVE, ONE))
            over += f" / {c1[ONE]['overhead_uvloop_ms']:.3f}"
            lines.append(f"| {i} | {c1['compute_ms']:.3f} | {p50} | {over} |")
        lines.append("")
    if all(ONE in r["c64"] for r in rounds):
        lines += ["| round | c64 req/s: naive / Triton / convserve / 2 workers |", "|---:|---|"]
        for i, r in enumerate(rounds, 1):
            c64 = r["c64"]
            rps = " / ".join(
                f"{c64[s]['requests_per_s']:.0f}" if s in c64 else "-"
                for s in (NAIVE, TRITON, ONE, TWO)
            )
            lines.append(f"| {i} | {rps} |")
        lines.append("")
    if all(ONE in r["bulk32"] for r in rounds):
        shown = tuple(s for s in (NAIVE, NAIVE2, NAIVE2_SYNC, ONE, TWO) if s in rounds[0]["bulk32"])
        who = " / ".join(
            {NAIVE: "naive", NAIVE2: "naive x2", NAIVE2_SYNC: "naive x2 sync", ONE: "1"}.get(
                s, "2 workers"
            )
            for s in shown
        )
        lines += [
            f"| round | ceiling img/s: batch 32 / 2 x 1 thread | 32 images img/s: {who} "
            f"| x ceiling: {who} | server CPU ms per request: {who} (empty server) "
            f"| h2load cores: {who} | stream x ceiling: {who} | stream server CPU ms per "
            f"request: {who} (empty server) | 2 workers' connections per worker: 32 images / "
            "stream |",
            "|---:|---|---|---|---|---|---|---|---|",
        ]
        for i, r in enumerate(rounds, 1):
            b, st = r["bulk32"], r["stream"]

            def cells(g: dict[str, Any], key: str, fmt: str) -> str:
                return " / ".join(format(g[s][key], fmt) for s in shown)

            def spread(g: dict[str, Any]) -> str:
                conns = g[TWO].get("connections_per_worker")
                return "-" if conns is None else "+".join(map(str, conns))

            lines.append(
                f"| {i} | {b['ceiling_images_per_s']:.0f} / {b['layout_ceiling_images_per_s']:.0f} "
                f"| {cells(b, 'images_per_s', '.0f')} | {cells(b, 'x_ceiling', '.3f')} "
                f"| {cells(b, 'server_cpu_ms', '.2f')} ({b['floor']['server_cpu_ms']:.2f}) "
                f"| {cells(b, 'client_cpu_cores', '.2f')} | {cells(st, 'x_ceiling', '.3f')} "
                f"| {cells(st, 'server_cpu_ms', '.2f')} ({st['floor']['server_cpu_ms']:.2f}) "
                f"| {spread(b)} / {spread(st)} |"
            )
        lines.append("")
    idle = max((run["idle_others_cpu_cores"] for run in doc["runs"]), default=0.0)
    c1t = next((t for t in doc["targets"] if "naive_overhead_ms" in t), None)
    if c1t is not None:
        naive = c1t["naive_overhead_ms"]
        lines.append(
            f"The naive server's concurrency-1 overhead, measured the same way: median "
            f"{naive['median']:.3f} ms ({naive['min']:.3f}-{naive['max']:.3f}; within 0.3 ms "
            f"in {naive['rounds_met']}/{len(naive['rounds'])} rounds)."
        )
    lines.append(f"The idle systems used at most {idle:.3f} cores between them during any run.")
    return "\n".join(lines) + "\n"


def before_systems(model: Path, before: Path) -> dict[str, tuple[Any, int]]:
    """convserve (1 and 2 workers) as the checkout at `before` serves it, on ports of its own."""
    if not (before / "serving" / "main.py").is_file():
        raise SystemExit(f"--before {before}: not a convserve checkout (no serving/main.py)")
    out = {}
    for name in OURS:
        port, mport = sb.free_port(), sb.free_port()
        for s in sb.systems(model, port, mport, skip_triton=True):
            if s.name == name:
                s.name, s.cwd = name + BEFORE, before.resolve()
                out[s.name] = (s, port)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-repository", type=Path, help="holds fashion-mnist/<version>/")
    p.add_argument("--work", type=Path, default=ROOT / "runs/bench-serving")
    p.add_argument("--out-dir", type=Path, default=ROOT / "bench/results")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--duration", type=float, default=4.0, help="seconds measured per run")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up load per run")
    p.add_argument("--skip-triton", action="store_true")
    p.add_argument(
        "--before",
        type=Path,
        help="a checkout of an earlier commit: its convserve joins every group",
    )
    p.add_argument(
        "--groups",
        default=",".join(GROUPS),
        help=f"comma-separated, of {','.join(GROUPS)} (a partial run judges only its targets)",
    )
    p.add_argument(
        "--sync-peer",
        action="store_true",
        help=f"add '{NAIVE2_SYNC}' to the bulk group (grpc's thread-pool transport)",
    )
    args = p.parse_args()
    groups = set(args.groups.split(","))
    if not groups or not groups <= set(GROUPS):
        raise SystemExit(f"--groups: choose from {','.join(GROUPS)}")
    if h2grpc.available() is None:
        raise SystemExit("h2load is missing: apt-get install nghttp2-client")
    t_start = time.monotonic()
    model = sb.find_model(args.model_repository, args.work)
    manifest = json.loads((model.parent / "manifest.json").read_text())
    shape = tuple(int(manifest["input"][k]) for k in ("channels", "height", "width"))
    images = sb.test_images(shape)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    expected = sess.run(["probabilities"], {"images": images[:1024]})[0]
    del sess
    info = sb.machine()
    wanted = [NAIVE, ONE, TWO, EMPTY]
    if "c1" in groups:
        wanted.append(EMPTY_UV)
    if "c64" in groups and not args.skip_triton:
        wanted.append(TRITON)
    peers = []  # the bulk group's naive peers beside the naive server
    if "bulk" in groups:
        peers = [NAIVE2, NAIVE2_SYNC] if args.sync_peer else [NAIVE2]
        wanted += peers
    # Each system on ports of its own, built by bench-serving's own table.
    chosen: dict[str, tuple[sb.System, int]] = {}
    for name in wanted:
        port, mport = sb.free_port(), sb.free_port()
        for s in sb.systems(model, port, mport, args.skip_triton):
            if s.name == name:
                chosen[name] = (s, port)
    ours = list(OURS)
    if args.before:
        chosen.update(before_systems(model, args.before))
        ours += [n + BEFORE for n in OURS]
    runs: list[dict[str, Any]] = []
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmpdir, contextlib.ExitStack() as stack:
        tmp = Path(tmpdir)
        procs = {}
        for name, (system, port) in chosen.items():
            log = tmp / f"{len(procs)}.log"
            procs[name] = stack.enter_context(sb.started(system, port, log))
            target = f"127.0.0.1:{port}"
            probe = sb.answer_probe(system, target, system.scenarios[0], images, expected)
            sb.wait_ready(system, procs[name], log, probe, timeout=120)
            print(f"{name} ready on {target}", flush=True)

        def run(name: str, sc: sb.Scenario) -> dict[str, Any]:
            system, port = chosen[name]
            idle0 = sum(sb.tree_cpu_seconds(p.pid) for n, p in procs.items() if n != name)
            t0 = time.monotonic()
            r = sb.measure(
                system, procs[name], f"127.0.0.1:{port}", port, sc, images, expected, args, tmp
            )
            idle = sum(sb.tree_cpu_seconds(p.pid) for n, p in procs.items() if n != name) - idle0
            r["idle_others_cpu_cores"] = round(idle / (time.monotonic() - t0), 3)
            if not r["valid"]:
                raise RuntimeError(f"{name}, {sc.name}: invalid run {r}")
            runs.append(r)
            lat = r["latency_ms"]
            print(
                f"  {sc.name:<34} {name:<33} {r['requests_per_s']:>8.1f} req/s "
                f"{r['images_per_s']:>8.1f} img/s p50 {lat['p50']:.3f} ms "
                f"cpu {r['server_cpu_ms_per_request']:.2f} ms/req h2load "
                f"{r['client_cpu_cores']:.2f} cores (idle others {r['idle_others_cpu_cores']:.3f})",
                flush=True,
            )
            return r

        def costs(r: dict[str, Any]) -> dict[str, Any]:
            return {
                "server_cpu_ms": r["server_cpu_ms_per_request"],
                "client_cpu_cores": r["client_cpu_cores"],
            }

        for i in range(args.rounds):
            print(f"== round {i + 1}/{args.rounds}", flush=True)

            def turn(names: list[str], i: int = i) -> list[str]:
                k = i % len(names)
                return names[k:] + names[:k]

            rnd: dict[str, Any] = {"c1": {}, "c64": {}, "bulk32": {}, "stream": {}}
            if "c1" in groups:
                before = ceiling(model, images, 1)
                c1 = {n: run(n, C1) for n in turn([EMPTY, EMPTY_UV, NAIVE, *ours])}
                compute = (before + ceiling(model, images, 1)) / 2
                rnd["c1"]["compute_ms"] = round(compute, 4)
                for n, r in c1.items():
                    p50 = r["latency_ms"]["p50"]
                    rnd["c1"][n] = {
                        "p50_ms": p50,
                        # DESIGN: above the empty grpc.aio server (asyncio's loop, what an
                        # afternoon's server runs on); and, stricter, above the same server on
                        # uvloop, the loop cnn-serve runs on.
                        "overhead_ms": round(p50 - c1[EMPTY]["latency_ms"]["p50"] - compute, 4),
                        "overhead_uvloop_ms": round(
                            p50 - c1[EMPTY_UV]["latency_ms"]["p50"] - compute, 4
                        ),
                    }
            if "c64" in groups:
                for n in turn([x for x in (NAIVE, TRITON, *ours) if x in chosen]):
                    r = run(n, C64)
                    rnd["c64"][n] = {"requests_per_s": r["requests_per_s"], **costs(r)}
            if "bulk" in groups:
                layout = layout_ceiling(model, images)
                top = ceiling(model, images, 32)
                for key, sc in (("bulk32", BULK32), ("stream", STREAM)):
                    for n in turn([NAIVE, *peers, *ours]):
                        r = run(n, sc)
                        after = ceiling(model, images, 32)
                        rnd[key][n] = {
                            "images_per_s": r["images_per_s"],
                            "ceiling_images_per_s": round((top + after) / 2, 1),
                            "x_ceiling": round(r["images_per_s"] / ((top + after) / 2), 4),
                            **costs(r),
                        }
                        if "connections_per_worker" in r:
                            rnd[key][n]["connections_per_worker"] = r["connections_per_worker"]
                        top = after
                for key, sc in (("bulk32", BULK32), ("stream", STREAM)):
                    # The transport's own CPU for a call of this size (no model run): the
                    # part of a request no Python gRPC server can avoid.
                    r = run(EMPTY, sc)
                    rnd[key]["floor"] = {"images_per_s": r["images_per_s"], **costs(r)}
                layout = (layout + layout_ceiling(model, images)) / 2
                for key in ("bulk32", "stream"):
                    g = rnd[key]
                    g["ceiling_images_per_s"] = round(
                        statistics.mean(g[n]["ceiling_images_per_s"] for n in (NAIVE, *ours)), 1
                    )
                    g["layout_ceiling_images_per_s"] = round(layout, 1)
                    for n in (NAIVE, *peers, *ours):
                        g[n]["x_layout_ceiling"] = round(g[n]["images_per_s"] / layout, 4)
            rounds.append(rnd)
            print(f"  round {i + 1}: {json.dumps(rnd)}", flush=True)
    doc = {
        "model": str(model.relative_to(sb.ROOT) if model.is_relative_to(sb.ROOT) else model),
        "machine": info,
        "code": sb.code_version(),
        "method": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "ceiling_s": CEILING_S,
            "groups": sorted(groups),
            "order": "groups c1, c64, 32 images, stream; the order within a group turns "
            "each round; each bulk run between two batch-32 ceilings, the layout ceiling "
            "(2 sessions x 1 thread) before and after the bulk groups",
        },
        "rounds": rounds,
        "runs": runs,
        "wall_s": round(time.monotonic() - t_start, 1),
    }
    if args.before:
        doc["before"] = {"path": str(args.before), **sb.code_version(args.before.resolve())}
        doc["before_after"] = before_after(rounds)
    doc["targets"] = evaluate(rounds)
    text = markdown(doc)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "serving_targets.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out_dir / "serving_targets.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
