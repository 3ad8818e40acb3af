"""One worker's server: the core (repository, data plane) with its front ends, from start
to drain.

`create_server(settings, registry)` builds everything and binds, so a test binds port 0 and
talks to it in-process with a registry of its own; `serve` runs a worker until SIGTERM and
drains; `run` does that on the chosen event loop. Process concerns (flags, logging, the
metrics listener, several workers) are serving.main's and serving.workers'.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from serving.auth import TokenFileError, TokenTable
from serving.capture import Capture
from serving.dataplane import DataPlane
from serving.errors import DeviceUnavailable
from serving.grpc import server as grpc_front
from serving.grpc.tls import CertificateStore
from serving.http import server as http_front
from serving.http.tls import ServerContext
from serving.metrics import Metrics
from serving.observers import MetricsEvents, flush_monitor
from serving.repository import ModelRepository
from serving.settings import EVENT_LOOPS, ServerSettings
from serving.tls import TLSError
from serving.tracing import TracingError, tracing_from_environ

# On SIGTERM, calls that keep arriving are refused as draining for at most this long (or half
# the drain timeout) before the front end stops: long enough for a load balancer to take the
# replica out, short enough not to slow a rolling update.
SETTLE_MAX_S = 1.0

log = logging.getLogger("convserve.server")


@dataclass
class Access:
    """TLS certificates (for each port that serves calls) and auth tokens of one server:
    all re-read on change or SIGHUP."""

    certificates: CertificateStore | None
    http_tls: ServerContext | None
    tokens: TokenTable | None

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> Access:
        """Read and check the files; TLSError or TokenFileError refuses to start."""
        files = settings.tls_files
        tokens = settings.auth_token_file
        http_tls = ServerContext(files) if files and settings.http_port else None
        return cls(
            CertificateStore(files) if files else None,
            http_tls,
            TokenTable(tokens) if tokens else None,
        )

    def reload(self) -> None:
        for store in (self.certificates, self.http_tls, self.tokens):
            if store is not None:
                store.reload()


@dataclass
class App:
    """What one worker serves: repository, data plane, front end, metrics, access."""

    settings: ServerSettings
    metrics: Metrics
    repository: ModelRepository
    plane: DataPlane
    front: grpc_front.GrpcFront
    http: http_front.HttpFront | None  # --http-port 0: none
    access: Access
    decode_executor: concurrent.futures.ThreadPoolExecutor
    _watch_task: asyncio.Task | None = None

    async def start(self) -> None:
        """Load and warm every model, then report SERVING (health stays NOT_SERVING until)."""
        if self.plane.capture is not None:
            self.plane.capture.start()
        await self.repository.start()
        await self.front.set_serving(self.plane.ready)
        self._watch_task = asyncio.get_running_loop().create_task(self._watch())

    async def listen(self) -> None:
        """Take calls on every port (gRPC, and HTTP unless it is off)."""
        await self.front.start()
        if self.http is not None:
            await self.http.start()

    async def _watch(self) -> None:
        # Health follows the repository (a model may load later); process gauges refresh.
        while True:
            try:
                self.metrics.update_process()
                self.flush_monitors()
                await self.front.set_serving(self.plane.ready)
            except Exception:  # one failed refresh must not end health reporting
                log.exception("health and process figures not refreshed")
            await asyncio.sleep(1.0)

    def flush_monitors(self) -> None:
        """What every served version predicted since the last flush, into the metrics."""
        for mv in self.plane.served("", None):
            flush_monitor(self.metrics, mv)

    async def drain(self, timeout: float) -> None:
        """NOT_SERVING, refuse new RPCs, finish every admitted one (bounded), stop."""
        self.plane.stop_admitting()
        await self.front.set_serving(False)
        log.info("draining: finishing admitted requests (up to %.0fs)", timeout)
        # Calls the front end has taken in but not handed to a handler would be cancelled by
        # its stop: refuse them as draining first (they go elsewhere), while admitted ones
        # finish; a client that keeps sending is cut off after SETTLE_MAX_S.
        t0 = time.monotonic()
        window = min(timeout / 2, SETTLE_MAX_S)
        if window > 0 and not await self.plane.settle(window):
            log.info("calls still arriving after %.1fs of refusing them; stopping", window)
        # The HTTP server waits for its running calls up to the drain timeout (its runner's
        # shutdown_timeout); both fronts stop together.
        stops = [self.front.stop(max(0.0, timeout - (time.monotonic() - t0)))]
        if self.http is not None:
            stops.append(self.http.stop())
        await asyncio.gather(*stops)
        if self.plane.capture is not None:  # write what was captured (bounded), then stop
            await self.plane.capture.drain()
        await self.repository.close(timeout=1.0)
        self.flush_monitors()
        self.plane.shared_memory.close()
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
        self.decode_executor.shutdown(wait=False)
        if self.plane.tracing is not None:  # export the spans still buffered (bounded)
            await asyncio.get_running_loop().run_in_executor(None, self.plane.tracing.shutdown)


async def create_server(
    settings: ServerSettings, registry: CollectorRegistry | None = None
) -> tuple[grpc.aio.Server, int, App]:
    """Build one worker's server and bind it; call `app.start()` then `server.start()`."""
    tracing = tracing_from_environ()  # the OTEL_* variables: None (off) unless they ask
    metrics = Metrics(registry, enabled=settings.metrics)
    capture_config = settings.capture  # its folder is made (or refused) before anything else
    capture = Capture(capture_config, metrics) if capture_config else None
    repository = ModelRepository(
        settings.repository, settings.runtime, settings.batching, MetricsEvents(metrics)
    )
    decode_executor = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="decode")
    plane = DataPlane(repository, settings.limits, decode_executor, capture, tracing)
    try:
        access = Access.from_settings(settings)
        front = await grpc_front.build(settings, plane, metrics, access.certificates, access.tokens)
    except BaseException:  # unreadable certificates, a port in use: leave no threads behind
        await repository.close(timeout=0)
        decode_executor.shutdown(wait=False)
        raise
    http = None
    if settings.http_port:
        try:
            http = await http_front.build(settings, plane, metrics, access.http_tls, access.tokens)
        except BaseException:
            await front.stop(0)
            await repository.close(timeout=0)
            decode_executor.shutdown(wait=False)
            raise
    app = App(settings, metrics, repository, plane, front, http, access, decode_executor)
    return front.server, front.port, app


async def serve(settings: ServerSettings, registry: CollectorRegistry | None = None) -> int:
    """Run one worker until SIGTERM/SIGINT, then drain and return 0."""
    _, port, app = await create_server(settings, registry)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload, app)
    try:
        if settings.reuse_port:
            # A worker sharing the port must not take connections before its models are warm.
            await app.start()
            await app.listen()
        else:
            await app.listen()  # health answers NOT_SERVING while models load
            await app.start()
    except BaseException:  # e.g. --device cuda where CUDA cannot run: close what is open
        await app.drain(0)
        raise
    log.info(
        "listening on %s:%d (pid %d, %s event loop)",
        settings.host,
        port,
        os.getpid(),
        type(loop).__module__.split(".")[0],
    )
    if app.http is not None:
        scheme = "https" if app.access.http_tls else "http"
        page = " (the try-it page at /)" if settings.ui else ""
        log.info("HTTP on %s://%s:%d%s", scheme, settings.host, app.http.port, page)
    if not app.repository.ready:
        log.error(
            "no model is loaded yet from %s (%s)",
            settings.model_repository,
            app.repository.last_error or "empty repository",
        )
    else:
        for name in app.repository.names():
            mv = app.repository.get(name)
            log.info("serving %s version %d on %s", name, mv.version, mv.session.provider)
    await stop.wait()
    await app.drain(settings.drain_timeout)
    log.info("stopped")
    return 0


def _reload(app: App) -> None:
    log.info("SIGHUP: re-reading TLS certificates and auth tokens")
    app.access.reload()


def loop_runner(kind: str) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """What runs the server's coroutine: uvloop.run or asyncio.run. uvloop runs the loop's
    machinery (callbacks, futures, polling) in C: single-image requests at concurrency 1 took
    0.12 ms less (p50) and 13% less CPU, and 64 in flight on 2 workers got 11% more
    requests/s; 32-image requests, where ORT dominates, did not gain (BENCHMARKS.md)."""
    if kind not in EVENT_LOOPS:
        raise ValueError(f"event loop must be one of {EVENT_LOOPS}, got {kind!r}")
    if kind == "asyncio":
        return asyncio.run
    try:
        import uvloop
    except ImportError:
        if kind == "uvloop":
            raise
        log.info("uvloop is not installed: serving on asyncio's own event loop")
        return asyncio.run
    return uvloop.run


def run(settings: ServerSettings, registry: CollectorRegistry | None = None) -> int:
    """`serve` on the settings' event loop; 3 (logged) when the server cannot start."""
    try:
        return loop_runner(settings.event_loop)(serve(settings, registry))
    except (DeviceUnavailable, OSError, TLSError, TokenFileError, TracingError) as exc:
        log.error("cannot start: %s", exc)
        return 3


if __name__ == "__main__":  # the entry point used to be here
    raise SystemExit(
        "cnn-serve's entry point is serving.main: run cnn-serve or python -m serving.main"
    )
