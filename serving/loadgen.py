"""`cnn-bench`: a gRPC load generator for convserve (and any KServe V2 server).

    cnn-bench --target localhost:50051 --concurrency 32 --duration 10
    cnn-bench --target localhost:50051 --rate 1500 --duration 10 --json out.json
    cnn-bench --target localhost:8001 --mode v2 --model fashion-mnist --shape 1,28,28

Two ways to load a server:

- closed loop (`--concurrency N`): N requests in flight; each waits for its answer before
  sending the next. Latency is send -> answer. Good for "how fast can it go".
- open loop (`--rate R`): requests are due at fixed times (one every 1/R s) whatever the
  server does, and latency is measured from the time a request was *due*, not from when it
  was sent. A server (or a client) that falls behind therefore shows up in the latency
  instead of silently lowering the offered load ("coordinated omission").

Requests are built and serialised once (identity serialisers on the channel), and responses
are not parsed except the first of each kind (checked for the right number of predictions),
so the client spends its CPU on gRPC itself. `--processes P` starts P client processes (each
with its own event loop and channels) and merges their latency samples. `--connections C`
opens C separate HTTP/2 connections: a `--workers N` server shares its port by SO_REUSEPORT,
which spreads connections, not requests, so use >= 8.

Latency samples are kept whole (a float per request) and merged exactly, so p99 and max are
the real ones, not bucket edges.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import io
import json
import math
import multiprocessing as mp
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from serving.client import TLS, access_from_args, add_access_options, bearer_metadata
from serving.proto.convserve.v1 import classifier_pb2 as pb
from serving.proto.convserve.v1 import classifier_pb2_grpc as pb_grpc
from serving.proto.inference import grpc_predict_v2_pb2 as v2

PREDICT = "/convserve.v1.Classifier/Predict"
PREDICT_STREAM = "/convserve.v1.Classifier/PredictStream"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
MODEL_STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"
# Predict, PredictStream, KServe V2 ModelInfer and ModelStreamInfer
MODES = ("unary", "stream", "v2", "v2-stream")
DISTINCT_REQUESTS = 16  # requests cycle through this many different images
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class LoadConfig:
    """One load run; defaults live here and nowhere else."""

    target: str = "localhost:50051"  # host:port, or a comma-list (round_robin over them)
    mode: str = "unary"  # unary | stream | v2 | v2-stream
    concurrency: int = 8  # closed loop: requests in flight (all processes together)
    rate: float = 0.0  # open loop: requests/s due (all processes); 0 = closed loop
    images_per_request: int = 1
    duration: float = 10.0  # seconds measured
    warmup: float = 2.0  # seconds of the same load before measuring (discarded)
    processes: int = 1
    connections: int = 0  # HTTP/2 connections (all processes); 0 = min(8, concurrency)
    png: bool = False  # send encoded PNGs instead of raw uint8 tensors
    model: str = ""
    shape: tuple[int, ...] = ()  # (C, H, W); () = ask the server (GetModelInfo)
    top_k: int = 1
    timeout: float = 10.0  # per-request deadline, seconds
    v2_input: str = "images"
    v2_output: str = "probabilities"
    max_outstanding: int = 8192  # open loop: requests due but unanswered beyond this are shed
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_server_name: str | None = None
    auth_token: str | None = None  # sent as `authorization: Bearer` metadata; never reported
    seed: int = 0

    @property
    def open_loop(self) -> bool:
        return self.rate > 0

    @property
    def v2(self) -> bool:
        return self.mode.startswith("v2")

    @property
    def streaming(self) -> bool:
        return self.mode.endswith("stream")

    @property
    def stream_method(self) -> str:
        return MODEL_STREAM_INFER if self.v2 else PREDICT_STREAM

    @property
    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        return bearer_metadata(self.auth_token) or None

    def n_connections(self) -> int:
        return self.connections or max(1, min(8, self.concurrency))


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


# ----------------------------------------------------------------------------- requests
def synthetic_images(n: int, shape: Sequence[int], seed: int) -> np.ndarray:
    """`n` deterministic uint8 images of `shape` (C, H, W): smooth blobs, not pure noise,
    so PNG sizes are realistic."""
    rng = np.random.default_rng(seed)
    c, h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.empty((n, c, h, w), np.uint8)
    for i in range(n):
        cy, cx = rng.uniform(0.2, 0.8, 2) * (h, w)
        r = rng.uniform(0.2, 0.45) * min(h, w)
        blob = np.clip(255 * (1 - np.hypot(yy - cy, xx - cx) / r), 0, 255)
        noise = rng.integers(0, 40, (c, h, w))
        out[i] = np.clip(blob[None] + noise, 0, 255).astype(np.uint8)
    return out


def _png(image_chw: np.ndarray) -> bytes:
    from PIL import Image

    arr = image_chw[0] if image_chw.shape[0] == 1 else image_chw.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def predict_request(images: np.ndarray, cfg: LoadConfig) -> pb.PredictRequest:
    """A convserve Predict request holding `images` (N, C, H, W) uint8."""
    if cfg.png:
        wire = [pb.Image(encoded=_png(x)) for x in images]
    else:
        wire = [
            pb.Image(tensor=pb.Tensor(dtype=pb.UINT8, shape=list(x.shape), data=x.tobytes()))
            for x in images
        ]
    return pb.PredictRequest(model=cfg.model, top_k=cfg.top_k, images=wire)


def infer_request(images: np.ndarray, cfg: LoadConfig) -> v2.ModelInferRequest:
    """A KServe V2 ModelInfer request: one UINT8 tensor (N, C, H, W) in raw_input_contents."""
    req = v2.ModelInferRequest(model_name=cfg.model)
    req.inputs.add(name=cfg.v2_input, datatype="UINT8", shape=list(images.shape))
    req.outputs.add(name=cfg.v2_output)
    req.raw_input_contents.append(np.ascontiguousarray(images).tobytes())
    return req


def build_requests(cfg: LoadConfig) -> list[bytes]:
    """DISTINCT_REQUESTS serialised requests of `images_per_request` images each."""
    n = cfg.images_per_request
    imgs = synthetic_images(DISTINCT_REQUESTS * n, cfg.shape, cfg.seed)
    make = infer_request if cfg.v2 else predict_request
    return [
        make(imgs[i * n : (i + 1) * n], cfg).SerializeToString() for i in range(DISTINCT_REQUESTS)
    ]


@functools.cache
def _stream_infer_response() -> type:
    """Triton's ModelStreamInferResponse {string error_message = 1; ModelInferResponse
    infer_response = 2}: not in the KServe V2 proto we ship, so declared here (the inner
    response as bytes, which is wire-compatible) in a pool of its own."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    f = descriptor_pb2.FileDescriptorProto(
        name="convserve_loadgen/stream_infer.proto", package="convserve_loadgen", syntax="proto3"
    )
    m = f.message_type.add(name="ModelStreamInferResponse")
    fd = descriptor_pb2.FieldDescriptorProto
    m.field.add(name="error_message", number=1, type=fd.TYPE_STRING, label=fd.LABEL_OPTIONAL)
    m.field.add(name="infer_response", number=2, type=fd.TYPE_BYTES, label=fd.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("convserve_loadgen.ModelStreamInferResponse")
    )


def parse_stream_infer(data: bytes) -> tuple[str, v2.ModelInferResponse]:
    """A ModelStreamInfer answer -> (error message, the ModelInferResponse)."""
    msg = _stream_infer_response().FromString(data)
    return msg.error_message, v2.ModelInferResponse.FromString(msg.infer_response)


def check_response(data: bytes, cfg: LoadConfig) -> None:
    """The first answer of each process is parsed: it must hold one result per image."""
    n = cfg.images_per_request
    if cfg.mode == "v2-stream":
        resp = parse_stream_infer(data)[1]
        got = resp.outputs[0].shape[0] if resp.outputs else 0
    elif cfg.mode == "v2":
        resp = v2.ModelInferResponse.FromString(data)
        got = resp.outputs[0].shape[0] if resp.outputs else 0
    else:
        got = len(pb.PredictResponse.FromString(data).predictions)
    if got != n:
        raise RuntimeError(f"the server answered {got} results for {n} images")


def resolve(cfg: LoadConfig) -> LoadConfig:
    """Fill in the image shape (and model name) from the server when not given."""
    if cfg.shape and (cfg.model or not cfg.v2):
        return cfg
    with _sync_channel(cfg) as channel:
        info = pb_grpc.ClassifierStub(channel).GetModelInfo(
            pb.ModelInfoRequest(model=cfg.model), timeout=cfg.timeout, metadata=cfg.metadata
        )
    shape = (info.input.channels, info.input.height, info.input.width)
    return replace(cfg, shape=shape, model=cfg.model or (info.name if cfg.v2 else ""))


# ----------------------------------------------------------------------------- channels
def _tls(cfg: LoadConfig) -> TLS | None:
    if cfg.tls_ca or cfg.tls_cert or cfg.tls_server_name:
        return TLS(cfg.tls_ca, cfg.tls_cert, cfg.tls_key, cfg.tls_server_name)
    return None


def _channel_args(cfg: LoadConfig, index: int) -> tuple[str, list[tuple[str, Any]]]:
    from serving.client import channel_options, channel_target, default_load_balancing

    # A comma-list of addresses or a dns:/// name (headless Service): round_robin over them.
    target = channel_target(cfg.target)
    opts = channel_options(default_load_balancing(target), _tls(cfg), MAX_MESSAGE_BYTES)
    # A private subchannel pool (and a distinct arg) makes each channel its own connection.
    opts += [("grpc.use_local_subchannel_pool", 1), ("convserve.bench_channel", index)]
    return target, opts


def _sync_channel(cfg: LoadConfig) -> grpc.Channel:
    target, opts = _channel_args(cfg, -1)
    tls = _tls(cfg)
    if tls is None:
        return grpc.insecure_channel(target, options=opts)
    return grpc.secure_channel(target, tls.credentials(), options=opts)


def _aio_channel(cfg: LoadConfig, index: int) -> grpc.aio.Channel:
    target, opts = _channel_args(cfg, index)
    tls = _tls(cfg)
    if tls is None:
        return grpc.aio.insecure_channel(target, options=opts)
    return grpc.aio.secure_channel(target, tls.credentials(), options=opts)


# ----------------------------------------------------------------------------- one process
class Worker:
    """One process's share of the load, on its own event loop and channels."""

    def __init__(self, cfg: LoadConfig, requests: list[bytes], index: int, share: int):
        self.cfg = cfg
        self.requests = requests
        self.index = index
        self.share = share  # closed loop: requests in flight here; open loop: 1 / processes
        self.samples = Samples()
        self.checked = False
        self.measure_from = self.measure_until = 0.0

    def _record(self, due: float, sent: float, code: str | None) -> None:
        """One finished request: `due` is when it should have gone (== sent, closed loop)."""
        done = time.monotonic()
        s = self.samples
        s.last_done = max(s.last_done, done)
        if due < self.measure_from:
            if code is None:
                s.warmup_ok += 1
            else:
                s.warmup_errors += 1
            return
        s.first_sent = min(s.first_sent, sent)
        if code is not None:
            s.errors[code] += 1
            return
        s.latencies.append(done - due)
        if self.cfg.open_loop:
            s.from_send.append(done - sent)
        if done > self.measure_until:
            s.late_ok += 1

    def _check(self, data: bytes) -> str | None:
        """An answer's error code: None when OK (V2 streams report errors in-band)."""
        if self.cfg.mode == "v2-stream" and parse_stream_infer(data)[0]:
            return "STREAM_ERROR"
        if not self.checked:
            self.checked = True
            check_response(data, self.cfg)
        return None

    async def run(self, start_at: float) -> Samples:
        cfg = self.cfg
        n_channels = max(1, math.ceil(cfg.n_connections() / cfg.processes))
        channels = [_aio_channel(cfg, self.index * 1000 + i) for i in range(n_channels)]
        try:
            for ch in channels:
                await asyncio.wait_for(ch.channel_ready(), cfg.timeout)
            await asyncio.sleep(max(0.0, start_at - time.monotonic()))
            self.measure_from = time.monotonic() + cfg.warmup
            self.measure_until = self.measure_from + cfg.duration
            if cfg.open_loop:
                await self._open_loop(channels)
            else:
                await self._closed_loop(channels)
        finally:
            for ch in channels:
                await ch.close()
        return self.samples

    # -- closed loop -------------------------------------------------------------------
    async def _closed_loop(self, channels: list[grpc.aio.Channel]) -> None:
        loop = self._stream_loop if self.cfg.streaming else self._unary_loop
        tasks = [loop(channels[i % len(channels)], i) for i in range(self.share)]
        await asyncio.gather(*tasks)

    def _unary_call(self, channel: grpc.aio.Channel) -> grpc.aio.UnaryUnaryMultiCallable:
        method = MODEL_INFER if self.cfg.v2 else PREDICT
        return channel.unary_unary(method)  # no serialisers: bytes in, bytes out

    async def _unary_loop(self, channel: grpc.aio.Channel, i: int) -> None:
        call = self._unary_call(channel)
        reqs, timeout, md = self.requests, self.cfg.timeout, self.cfg.metadata
        while True:
            sent = time.monotonic()
            if sent >= self.measure_until:
                return
            code = None
            try:
                code = self._check(await call(reqs[i % len(reqs)], timeout=timeout, metadata=md))
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            self._record(sent, sent, code)
            i += 1

    async def _stream_loop(self, channel: grpc.aio.Channel, i: int) -> None:
        """One stream, one request in flight on it (ping-pong); a failed stream is reopened."""
        reqs = self.requests
        while time.monotonic() < self.measure_until:
            call = channel.stream_stream(self.cfg.stream_method)(
                timeout=None, metadata=self.cfg.metadata
            )
            sent = time.monotonic()
            try:
                while sent < self.measure_until:
                    await call.write(reqs[i % len(reqs)])
                    data = await call.read()
                    if data is grpc.aio.EOF:  # the server ended the stream early
                        code = await call.code()
                        self._record(sent, sent, code.name if code else "EOF")
                        break
                    self._record(sent, sent, self._check(data))
                    i += 1
                    sent = time.monotonic()
                else:
                    await call.done_writing()
                    await call.code()
            except grpc.aio.AioRpcError as exc:
                self._record(sent, sent, exc.code().name)

    # -- open loop ---------------------------------------------------------------------
    async def _open_loop(self, channels: list[grpc.aio.Channel]) -> None:
        """Requests are due every `interval` seconds, staggered across processes."""
        cfg = self.cfg
        interval = cfg.processes / cfg.rate
        first_due = time.monotonic() + interval * self.index / cfg.processes
        end = self.measure_until
        outstanding: set[asyncio.Task] = set()
        streams = (
            [_Stream(self, channels[i % len(channels)]) for i in range(len(channels))]
            if cfg.streaming
            else []
        )
        calls = [self._unary_call(ch) for ch in channels]
        k = 0
        while True:
            due = first_due + k * interval
            if due >= end:
                break
            now = time.monotonic()
            if due > now:
                await asyncio.sleep(due - now)
                now = time.monotonic()
            self.samples.max_send_lag = max(self.samples.max_send_lag, now - due)
            req = self.requests[k % len(self.requests)]
            in_flight = len(outstanding) + sum(s.pending.qsize() for s in streams)
            if in_flight >= cfg.max_outstanding:
                self._record(due, now, "CLIENT_BACKLOG")
            elif streams:
                streams[k % len(streams)].send(req, due, now)
            else:
                task = asyncio.create_task(self._one(calls[k % len(calls)], req, due, now))
                outstanding.add(task)
                task.add_done_callback(outstanding.discard)
            k += 1
        if outstanding:
            await asyncio.wait(outstanding)
        await asyncio.gather(*(s.close() for s in streams))

    async def _one(self, call: Any, req: bytes, due: float, sent: float) -> None:
        code = None
        try:
            code = self._check(
                await call(req, timeout=self.cfg.timeout, metadata=self.cfg.metadata)
            )
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        self._record(due, sent, code)


class _Stream:
    """Open loop over a stream: requests are written when due (without waiting for earlier
    answers) and answers are matched to them in order."""

    def __init__(self, worker: Worker, channel: grpc.aio.Channel):
        self.worker = worker
        self.call = channel.stream_stream(worker.cfg.stream_method)(
            timeout=None, metadata=worker.cfg.metadata
        )
        self.pending: asyncio.Queue[tuple[float, float] | None] = asyncio.Queue()
        self.writes: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.tasks = [asyncio.create_task(self._write()), asyncio.create_task(self._read())]

    def send(self, req: bytes, due: float, sent: float) -> None:
        self.pending.put_nowait((due, sent))
        self.writes.put_nowait(req)

    async def _write(self) -> None:
        while (req := await self.writes.get()) is not None:
            await self.call.write(req)
        await self.call.done_writing()

    async def _read(self) -> None:
        try:
            async for data in self.call:
                due, sent = self.pending.get_nowait()
                self.worker._record(due, sent, self.worker._check(data))
        except grpc.aio.AioRpcError as exc:
            while not self.pending.empty():  # everything unanswered failed with the stream
                due, sent = self.pending.get_nowait()
                self.worker._record(due, sent, exc.code().name)

    async def close(self) -> None:
        self.writes.put_nowait(None)
        await asyncio.gather(*self.tasks, return_exceptions=True)


def _share(cfg: LoadConfig, index: int) -> int:
    base, extra = divmod(cfg.concurrency, cfg.processes)
    return base + (index < extra)


def _process_main(cfg: LoadConfig, requests: list[bytes], index: int, conn: Any) -> None:
    """Entry point of a client process: report ready, wait for the common start, run."""
    conn.send("ready")
    start_at = conn.recv()
    try:
        samples = asyncio.run(Worker(cfg, requests, index, _share(cfg, index)).run(start_at))
        conn.send(samples)
    except BaseException as exc:
        conn.send(exc)
        raise


def run_load(cfg: LoadConfig) -> dict[str, Any]:
    """Run one load test and return its report (see `report`)."""
    cfg = resolve(cfg)
    if not cfg.open_loop and cfg.concurrency < cfg.processes:
        raise ValueError("--concurrency must be >= --processes")
    requests = build_requests(cfg)
    if cfg.processes == 1:
        start = time.monotonic() + 0.05
        samples = asyncio.run(Worker(cfg, requests, 0, cfg.concurrency).run(start))
        return report(cfg, samples)
    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    for i in range(cfg.processes):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_process_main, args=(cfg, requests, i, child), daemon=True)
        p.start()
        pipes.append(parent)
        procs.append(p)
    for conn in pipes:
        conn.recv()
    # CLOCK_MONOTONIC is one clock for every process of the machine: a common start time.
    start_at = time.monotonic() + 1.0
    for conn in pipes:
        conn.send(start_at)
    total = Samples()
    for conn in pipes:
        got = conn.recv()
        if isinstance(got, BaseException):
            raise RuntimeError(f"a client process failed: {got!r}") from got
        total.merge(got)
    for p in procs:
        p.join()
    return report(cfg, total)


# ----------------------------------------------------------------------------- results
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
    out["config"] = {k: v for k, v in asdict(cfg).items() if not k.startswith(("tls", "auth"))}
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


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    d = LoadConfig()
    p = argparse.ArgumentParser(
        prog="cnn-bench",
        description="Load a convserve (or KServe V2) server over gRPC and report requests/s, "
        "images/s, latency percentiles and errors by status code.",
    )
    p.add_argument(
        "--target",
        default=d.target,
        help="HOST:PORT, dns:///NAME:PORT or a comma-list of IP:PORT (both round_robin)",
    )
    p.add_argument(
        "--mode",
        choices=MODES,
        default=d.mode,
        help="Predict, PredictStream, V2 ModelInfer, V2 ModelStreamInfer",
    )
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, default=d.concurrency, help="closed loop")
    load.add_argument("--rate", type=float, default=d.rate, help="open loop: requests/s due")
    p.add_argument("--images-per-request", type=int, default=d.images_per_request)
    p.add_argument("--duration", type=float, default=d.duration, help="seconds measured")
    p.add_argument("--warmup", type=float, default=d.warmup, help="seconds before measuring")
    p.add_argument("--processes", type=int, default=d.processes, help="client processes")
    p.add_argument("--connections", type=int, default=d.connections, help="0: min(8, N)")
    p.add_argument("--png", action="store_true", help="send PNG files, not raw uint8 tensors")
    p.add_argument("--model", default=d.model, help="model name (needed for --mode v2)")
    p.add_argument("--shape", default="", help="C,H,W of the model input (default: ask)")
    p.add_argument("--top-k", type=int, default=d.top_k)
    p.add_argument("--timeout", type=float, default=d.timeout, help="deadline per request, s")
    p.add_argument("--v2-input", default=d.v2_input, help="V2 input tensor name")
    p.add_argument("--v2-output", default=d.v2_output, help="V2 output tensor name")
    add_access_options(p)
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON ('-': stdout)")
    return p


def config_from_args(argv: Sequence[str] | None = None) -> tuple[LoadConfig, str | None]:
    p = build_parser()
    a = p.parse_args(argv)
    for name in ("concurrency", "images_per_request", "processes"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.duration <= 0 or a.warmup < 0 or a.rate < 0:
        p.error("--duration must be > 0; --warmup and --rate must be >= 0")
    _, token = access_from_args(p, a)  # checks the TLS flags; LoadConfig keeps the paths
    shape = tuple(int(x) for x in a.shape.split(",")) if a.shape else ()
    if shape and len(shape) != 3:
        p.error("--shape is C,H,W")
    cfg = LoadConfig(
        target=a.target,
        mode=a.mode,
        concurrency=a.concurrency,
        rate=a.rate,
        images_per_request=a.images_per_request,
        duration=a.duration,
        warmup=a.warmup,
        processes=a.processes,
        connections=a.connections,
        png=a.png,
        model=a.model,
        shape=shape,
        top_k=a.top_k,
        timeout=a.timeout,
        v2_input=a.v2_input,
        v2_output=a.v2_output,
        tls_ca=a.tls_ca,
        tls_cert=a.tls_cert,
        tls_key=a.tls_key,
        tls_server_name=a.tls_server_name,
        auth_token=token,
    )
    if cfg.open_loop and cfg.concurrency < cfg.processes:
        cfg = replace(cfg, concurrency=cfg.processes)
    return cfg, a.json


def main(argv: Sequence[str] | None = None) -> int:
    cfg, json_path = config_from_args(argv)
    try:
        result = run_load(cfg)
    except grpc.RpcError as exc:
        print(f"cnn-bench: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        print(f"cnn-bench: {exc}", file=sys.stderr)
        return 1
    if json_path == "-":
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result))
        if json_path:
            Path(json_path).parent.mkdir(parents=True, exist_ok=True)
            Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
