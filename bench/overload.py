"""`make overload`: capacity, then 4x and 10x it offered open loop, for this checkout's server
and, in the same run, commit 513f521's (so a change cannot lower its own denominator
unnoticed); writes bench/results/overload.json and overload.md.

For each server (pinned to the first CPU; the load on the others): closed-loop capacity
(convserve.v1 Predict, one image a call, 64 in flight), then each multiple of it for
--seconds, open loop from h2load with a 0.5 s grpc-timeout, a checked sampling client beside
it (bench/openloop.py). Reported per offer: goodput (OK answers a second: an OK answer came
within its deadline, grpc would have cancelled it otherwise), every status the server
counted, the calls grpc answered without a handler, the sampled p50/p99 time to a refusal,
RSS, rows computed for no OK answer, and recovery (load end -> first OK, -> queue depth 0).

    python bench/overload.py                     # ours and 513f521, 1 worker, the fast model
    python bench/overload.py --workers 2         # both workers pinned to the server's CPU
    python bench/overload.py --model slow        # the slow test model: the queue is the limit
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench import overload_run, slow_model  # noqa: E402

BASE = "513f521"
FAST_SHAPE = (1, 28, 28)
TARGETS = {  # multiple -> goodput as a share of capacity (the target; must: 0.5)
    4.0: 0.8,
    10.0: 0.7,
}


def base_tree(work: Path) -> Path:
    """A checkout of BASE beside the results (git worktree), made once."""
    tree = work / BASE
    if not (tree / "serving").is_dir():
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", "--force", str(tree), BASE],
            check=True,
            capture_output=True,
        )
    return tree


def verdicts(r: dict[str, Any], deadline: float) -> dict[str, bool]:
    """The issue's targets for one offer."""
    sampled = r["sampled"]
    shed = {"RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED"}
    target = TARGETS.get(r["multiple"], 0.5)
    return {
        f"goodput >= {target:.0%} of capacity": r["goodput_of_capacity"] >= target,
        "goodput >= 50% of capacity (must)": r["goodput_of_capacity"] >= 0.5,
        "refusals only RESOURCE_EXHAUSTED/UNAVAILABLE (sampled)": set(sampled["statuses"])
        <= {"OK", *shed},
        "DEADLINE_EXCEEDED <= 5% of calls (sampled)": r["deadline_exceeded_share"] <= 0.05,
        "p99 time to a refusal <= 50 ms": sampled["refusal_ms"].get("p99", 0) <= 50,
        "RSS <= 512 MiB": r["rss_mib_max"] <= 512,
        "first OK <= 100 ms after the load": r["recovery"]["first_ok_s"] <= 0.1,
        "queue depth 0 <= 1 s after the load": r["recovery"]["queue_empty_s"] <= 1.0,
        "no row computed for a late call": r["rows"]["computed_for_no_ok_answer"] <= 64,
    }


def table(results: dict[str, Any]) -> str:
    lines = [
        "| server | capacity req/s | offer | sent/s | goodput/s | of capacity | server statuses "
        "| grpc, no handler | refusal p50/p99 ms (sampled) | DEADLINE share | RSS MiB | "
        "first OK s | queue 0 s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["servers"].items():
        cap = r["capacity"]["requests_per_s"]
        for o in r["offers"]:
            ref = o["sampled"]["refusal_ms"]
            lines.append(
                f"| {name} | {cap:.0f} | {o['multiple']:g}x | {o['sent_per_s']:.0f} | "
                f"{o['goodput_per_s']:.0f} | {o['goodput_of_capacity']:.0%} | "
                f"{', '.join(f'{k} {v}' for k, v in sorted(o['server_statuses'].items()))} | "
                f"{o['never_handled']} | {ref.get('p50', '-')}/{ref.get('p99', '-')} | "
                f"{o['deadline_exceeded_share']:.1%} | {o['rss_mib_max']:.0f} | "
                f"{o['recovery']['first_ok_s']:.3f} | {o['recovery']['queue_empty_s']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("fast", "slow"), default="fast")
    p.add_argument("--model-repository", type=Path, default=ROOT / "runs/bench-export/models")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--multiples", default="4,10")
    p.add_argument("--seconds", type=float, default=30.0, help="each offer")
    p.add_argument("--deadline", type=float, default=0.5)
    p.add_argument("--no-base", action="store_true", help=f"skip {BASE}'s server")
    p.add_argument("--no-proxy", action="store_true", help="skip the runs behind HAProxy")
    p.add_argument(
        "--proxy-cpus",
        choices=("server", "load"),
        default="server",
        help="where HAProxy runs: on the server's CPU (default: it pays for its refusals from "
        "the same budget) or on the load's (a proxy on other machines)",
    )
    p.add_argument("--only", default="", help="comma-separated names of the servers to run")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/overload.json")
    p.add_argument("server_args", nargs="*", help="extra cnn-serve flags (after --)")
    a = p.parse_args()

    work = ROOT / "runs/overload"
    work.mkdir(parents=True, exist_ok=True)
    cpus = sorted(os.sched_getaffinity(0))
    server_cpus, load_cpus = str(cpus[0]), ",".join(str(c) for c in cpus[1:]) or str(cpus[0])
    if a.model == "slow":
        source = a.model_repository / "fashion-mnist/1"
        repository, shape = slow_model.repository(work / "slow-models", source), slow_model.SHAPE
    else:
        repository, shape = a.model_repository, FAST_SHAPE
    args = ["--intra-op-threads", "1", "--workers", str(a.workers), *a.server_args]
    trees = {"this checkout": (ROOT, "serving.main")}
    if not a.no_base:
        trees[BASE] = (base_tree(work), "serving.server")
    servers = {}  # each server alone, then with HAProxy (deploy/haproxy) in front on its CPU
    for name, (tree, entry) in trees.items():
        servers[name] = (tree, entry, None)
        if not a.no_proxy:
            proxy_cpus = server_cpus if a.proxy_cpus == "server" else load_cpus
            servers[f"{name} + HAProxy"] = (tree, entry, proxy_cpus)
    if a.only:
        servers = {k: v for k, v in servers.items() if k in a.only.split(",")}
    multiples = [float(m) for m in a.multiples.split(",")]
    results: dict[str, Any] = {
        "model": a.model,
        "workers": a.workers,
        "deadline_s": a.deadline,
        "cpus": {"server": server_cpus, "load": load_cpus, "haproxy": a.proxy_cpus},
        "servers": {},
    }
    for name, (tree, entry, proxy_cpus) in servers.items():
        print(f"{name}: {entry} from {tree}", flush=True)
        setup = overload_run.Setup(
            tree,
            entry,
            repository,
            args,
            shape,
            multiples,
            a.seconds,
            a.deadline,
            server_cpus=server_cpus,
            load_cpus=load_cpus,
            proxy_cpus=proxy_cpus,
        )
        r = overload_run.measure(setup)
        for o in r["offers"]:
            o["verdicts"] = verdicts(o, a.deadline)
        results["servers"][name] = r
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=2) + "\n")
    md = table(results)
    a.out.with_suffix(".md").write_text(md)
    print(md)
    for name, r in results["servers"].items():
        if name.startswith("this checkout"):
            missed = [
                (o["multiple"], k) for o in r["offers"] for k, ok in o["verdicts"].items() if not ok
            ]
            print(f"{name}: targets missed:", missed or "none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
