"""The fixed CPU of a Predict: everything but ONNX Runtime's run and the transport.

A 32-image Predict spends ~10 ms in ORT on this machine and a few hundred microseconds in
convserve's own code (the converter, the data plane, the batcher and its hop to the ORT
thread, the monitor, the answer). `bench-targets` cannot see a change of 50 us through its
±7% rounds, so this measures that part alone: the servicer called in-process (no gRPC
transport) on the loop cnn-serve runs on, with the version's batcher running a function that
returns the version's own answer for these images (computed once by ORT), so every step
but the run itself happens as it does when serving. CPU is the process's (all threads: the
hop to the ORT thread counts), per request, median and minimum of `--rounds` rounds.

    python bench/call_cost.py --model-repository DIR [--images 32] [--concurrency 64] [--json OUT]

`--concurrency C` keeps C calls in flight at once (asyncio.gather, C at a time), so they
queue and share batches as a loaded server's do (the batched path: the scheduler, the run
on an ORT thread, the delivery); 1, the default, prices a lone client's path.

Run it from another checkout's root (`cd OLD && python /path/bench/call_cost.py ...`) to
price that checkout's code: it imports `serving` from the current directory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, os.getcwd())  # the checkout being priced, before any installed copy

from prometheus_client import CollectorRegistry

from serving.grpc.classifier import ClassifierServicer
from serving.proto.convserve.v1 import classifier_pb2 as pb
from serving.server import create_server, loop_runner
from serving.settings import ServerSettings


class _Context:
    """What the servicer asks of a call's context: no deadline, no metadata."""

    def time_remaining(self) -> None:
        return None

    def invocation_metadata(self) -> tuple:
        return ()


def _images(n: int, shape: tuple[int, int, int]) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8)


async def measure(
    repository: Path, n: int, rounds: int, calls: int, concurrency: int = 1
) -> dict[str, Any]:
    settings = ServerSettings(
        model_repository=repository,
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        http_port=0,
        device="cpu",
        intra_op_threads=1,
    )
    _, _, app = await create_server(settings, CollectorRegistry())
    await app.start()
    try:
        mv = app.plane.model(None, None)
        images = _images(n, mv.manifest.input.shape)
        # The version's own outputs for these images, as many times as a batch may hold them.
        copies = max(1, -(-mv.batcher.config.max_batch_size // n)) if concurrency > 1 else 1
        answer = mv.session.classify(np.concatenate([images] * copies))
        mv.batcher.run = lambda rows: answer[: len(rows)]
        raw = pb.PredictRequest(
            top_k=1,
            images=[
                pb.Image(tensor=pb.Tensor(dtype=pb.UINT8, shape=list(i.shape), data=i.tobytes()))
                for i in images
            ],
        ).SerializeToString()
        servicer = ClassifierServicer(app.plane, app.metrics)
        context = _Context()

        async def one() -> None:
            response = await servicer.Predict(pb.PredictRequest.FromString(raw), context)
            response.SerializeToString()

        async def call() -> None:
            if concurrency == 1:
                await one()
            else:
                await asyncio.gather(*(one() for _ in range(concurrency)))

        turns = max(1, calls // concurrency)  # of `concurrency` calls each
        made = turns * concurrency  # calls a round makes
        for _ in range(turns // 4):
            await call()
        process, loop = [], []
        for _ in range(rounds):
            p0, t0 = time.process_time_ns(), time.thread_time_ns()
            for _ in range(turns):
                await call()
            process.append((time.process_time_ns() - p0) / made / 1e3)
            loop.append((time.thread_time_ns() - t0) / made / 1e3)
            mv.monitor.take()  # counted once a second when serving; outside the timing here
        return {
            "images_per_request": n,
            "concurrency": concurrency,
            "process_cpu_us": {
                "median": round(statistics.median(process), 1),
                "min": round(min(process), 1),
            },
            "loop_thread_cpu_us": {
                "median": round(statistics.median(loop), 1),
                "min": round(min(loop), 1),
            },
            "rounds": rounds,
            "calls_per_round": made,
        }
    finally:
        await app.drain(1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-repository", type=Path, required=True)
    p.add_argument("--images", type=int, action="append", help="per request (default 32 and 1)")
    p.add_argument("--concurrency", type=int, default=1, help="calls in flight at once")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--calls", type=int, default=1000, help="calls per round")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    out = []
    for n in args.images or [32, 1]:
        r = loop_runner("auto")(
            measure(args.model_repository, n, args.rounds, args.calls, args.concurrency)
        )
        out.append(r)
        print(
            f"{n:>3} images, {args.concurrency} in flight: process CPU "
            f"{r['process_cpu_us']['median']:.1f} us per request "
            f"(min {r['process_cpu_us']['min']:.1f}), event loop thread "
            f"{r['loop_thread_cpu_us']['median']:.1f} (min {r['loop_thread_cpu_us']['min']:.1f})",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps({"cwd": os.getcwd(), "results": out}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
