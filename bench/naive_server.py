"""Reference peers for the serving benchmark: a naive server and an empty-handler server.

`naive`: what a user writes in an afternoon. grpc.aio serving our convserve.v1.Classifier
Predict and PredictStream with raw uint8 tensors, one `session.run` per request in the event
loop thread, no batching, no validation beyond numpy's own. For fairness its ONNX Runtime
session uses the same options as convserve's (threads, spinning, optimisation level).

`--empty`: the same servicer with nothing behind it: Predict answers a prebuilt response of
the right size (a top-1 prediction per image) without looking at the images. It measures
what grpc.aio itself costs per request (the floor for any Python gRPC server), so
concurrency-1 latency can be reported as overhead above it, and a 32-image request's CPU
against the transport's own.

    python bench/naive_server.py --model models/fashion-mnist/1/model.onnx --port 50061
    python bench/naive_server.py --model models/fashion-mnist/1/model.onnx --port 50062 --empty
    python bench/naive_server.py ... --empty --event-loop uvloop   # the floor on cnn-serve's loop
    python bench/naive_server.py ... --processes 2 --intra-op-threads 1 [--transport sync]

`--processes N`: the same server in N processes sharing the port (SO_REUSEPORT), each with
its own session: the layout of `cnn-serve --workers N`, so the bulk rows can say whether
convserve's workers beat what a user gets by starting the naive server twice.
`--transport sync`: grpc's thread-pool server (one handler thread) instead of grpc.aio,
to price the asyncio transport itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import signal
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort

from serving.proto.convserve.v1 import classifier_pb2 as pb
from serving.proto.convserve.v1 import classifier_pb2_grpc as pb_grpc
from serving.runtime import session_options
from serving.server import loop_runner
from serving.settings import ServerSettings


class Naive(pb_grpc.ClassifierServicer):
    def __init__(self, model: Path, intra_op_threads: int = 0):
        self.session = ort.InferenceSession(
            str(model),
            session_options(
                ServerSettings(device="cpu", intra_op_threads=intra_op_threads).runtime
            ),
            ["CPUExecutionProvider"],
        )
        manifest = json.loads((model.parent / "manifest.json").read_text())
        self.labels = manifest["labels"]
        self.name, self.version = model.parent.parent.name, int(model.parent.name)
        inp = manifest["input"]
        self.shape = (inp["channels"], inp["height"], inp["width"])

    async def Predict(self, request, context):
        return self.answer(request)

    def answer(self, request: pb.PredictRequest) -> pb.PredictResponse:
        x = np.stack(
            [np.frombuffer(i.tensor.data, np.uint8).reshape(self.shape) for i in request.images]
        )
        probs = self.session.run(["probabilities"], {"images": x})[0]
        k = max(1, request.top_k)
        predictions = []
        for p in probs:
            best = np.argsort(-p)[:k]
            predictions.append(
                pb.Prediction(
                    classes=[
                        pb.ClassScore(index=int(i), label=self.labels[i], probability=float(p[i]))
                        for i in best
                    ]
                )
            )
        return pb.PredictResponse(model=self.name, version=self.version, predictions=predictions)

    async def PredictStream(self, request_iterator, context):
        async for request in request_iterator:
            yield await self.Predict(request, context)


class Empty(Naive):
    """No model run: a prebuilt answer with one prediction per image of the request (the
    size of a real top-1 answer), so a 32-image request prices the transport of its size."""

    def __init__(self, model: Path, intra_op_threads: int = 0):
        super().__init__(model, intra_op_threads)
        self.answers: dict[int, pb.PredictResponse] = {}

    def answer(self, request: pb.PredictRequest) -> pb.PredictResponse:
        n = len(request.images)
        answer = self.answers.get(n)
        if answer is None:
            score = pb.ClassScore(index=9, label=self.labels[9], probability=0.9921875)
            answer = pb.PredictResponse(
                model=self.name,
                version=self.version,
                predictions=[pb.Prediction(classes=[score]) for _ in range(n)],
            )
            self.answers[n] = answer
        return answer


OPTIONS = [("grpc.max_receive_message_length", 16 * 1024 * 1024)]


def bind(server: grpc.Server | grpc.aio.Server, host: str, port: int) -> None:
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise OSError(f"could not bind {host}:{port}")


def announce(servicer: pb_grpc.ClassifierServicer, host: str, port: int) -> None:
    print(f"{type(servicer).__name__.lower()} server listening on {host}:{port}", flush=True)


async def serve(servicer: pb_grpc.ClassifierServicer, host: str, port: int, shared: bool) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", int(shared)), *OPTIONS])
    pb_grpc.add_ClassifierServicer_to_server(servicer, server)
    bind(server, host, port)
    await server.start()
    announce(servicer, host, port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=1)


class Sync(pb_grpc.ClassifierServicer):
    """The same answers from grpc's thread-pool server."""

    def __init__(self, servicer: Naive):
        self.servicer = servicer

    def Predict(self, request, context):
        return self.servicer.answer(request)

    def PredictStream(self, request_iterator, context):
        for request in request_iterator:
            yield self.servicer.answer(request)


def serve_sync(servicer: Naive, host: str, port: int, shared: bool) -> None:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=1),
        options=[("grpc.so_reuseport", int(shared)), *OPTIONS],
    )
    pb_grpc.add_ClassifierServicer_to_server(Sync(servicer), server)
    bind(server, host, port)
    server.start()
    announce(servicer, host, port)
    signal.signal(signal.SIGTERM, lambda *_: server.stop(grace=1))
    server.wait_for_termination()


def run(args: argparse.Namespace, shared: bool) -> None:
    servicer = (Empty if args.empty else Naive)(args.model, args.intra_op_threads)
    if args.transport == "sync":
        serve_sync(servicer, args.host, args.port, shared)
    else:
        loop_runner(args.event_loop)(serve(servicer, args.host, args.port, shared))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="model.onnx of a version folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50061)
    p.add_argument("--empty", action="store_true", help="answer without running the model")
    p.add_argument(
        "--event-loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="asyncio (what an afternoon's server runs on) or uvloop (cnn-serve's default), so "
        "the empty server can price the loop convserve runs on",
    )
    p.add_argument("--processes", type=int, default=1, help="servers sharing the port")
    p.add_argument(
        "--intra-op-threads", type=int, default=0, help="ORT threads per process (0: ORT's)"
    )
    p.add_argument("--transport", choices=("aio", "sync"), default="aio")
    args = p.parse_args()
    if args.processes == 1:
        run(args, shared=False)
        return 0
    # Children share the port (SO_REUSEPORT; each connection goes to one of them) and go
    # when the parent is told to.
    ctx = multiprocessing.get_context("spawn")
    children = [ctx.Process(target=run, args=(args, True)) for _ in range(args.processes)]
    for c in children:
        c.start()
    stop = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # after the start: children would inherit it
    stopping = None
    while stopping is None and all(c.is_alive() for c in children):
        stopping = signal.sigtimedwait(stop, 0.5)
    for c in children:
        c.terminate()
    for c in children:
        c.join(10)
    return 0 if stopping else 1


if __name__ == "__main__":
    raise SystemExit(main())
