"""How cnn-bench offers its load: `run_load` starts the client processes at one common time
and merges what they measured; a `Worker` is one process's share, on its own event loop and
channels, as a closed loop (N requests in flight) or an open loop (requests due at fixed
times, streams written without waiting for earlier answers)."""

from __future__ import annotations

import asyncio
import math
import multiprocessing as mp
import time
from typing import Any

import grpc

from serving.client.loadgen.config import MODEL_INFER, PREDICT, LoadConfig, channel, resolve
from serving.client.loadgen.messages import build_requests, check_response, parse_stream_infer
from serving.client.loadgen.report import Samples, report


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
        channels = [channel(cfg, self.index * 1000 + i) for i in range(n_channels)]
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
