"""`--workers N`: N worker processes share one port, as in grpc's multiprocessing example.

The parent reserves the port with SO_REUSEPORT (so nothing else can take it), wipes the
Prometheus multiprocess folder, starts each worker as a spawned `multiprocessing.Process`
given its settings (a full single-worker server with its own ORT sessions), serves the
aggregated /metrics, restarts a worker that dies, forwards SIGHUP (re-read certificates and
tokens), and on SIGTERM forwards it and waits for every worker to drain. SO_REUSEPORT spreads
connections, not requests: a client needs several connections to reach every worker, and 8
connections land unevenly on 2 workers more often than not. Each worker runs ORT on its share
of the cores, and a run that finds no other in flight on the server takes them all
(serving.runboard, on a board file in the parent's private folder).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from multiprocessing.process import BaseProcess
from pathlib import Path

from serving.auth import TokenFileError
from serving.cores import usable_cores
from serving.logs import setup_logging
from serving.runboard import make_board_file
from serving.settings import ServerSettings
from serving.tls import TLSError
from serving.tracing import TracingConfig, TracingError

log = logging.getLogger("convserve.workers")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


@contextlib.contextmanager
def reserve_port(host: str, port: int) -> Iterator[int]:
    """Bind (not listen) with SO_REUSEPORT so only our workers can share the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
        yield sock.getsockname()[1]
    finally:
        sock.close()


def fresh_multiproc_dir(given: str | None) -> Path:
    """The Prometheus multiprocess folder with no stale files: `given`, or a new one.

    prometheus_client only writes into this folder, it never makes it, and files a previous
    run left would be summed into this one's figures. A server started with the variable set
    must call this before its first metric exists, one worker or several."""
    mp_dir = Path(given or tempfile.mkdtemp(prefix="convserve-prom-"))
    mp_dir.mkdir(parents=True, exist_ok=True)
    for stale in mp_dir.glob("*.db"):  # prometheus_client's files only: it may be /tmp itself
        stale.unlink()
    return mp_dir


def worker(settings: ServerSettings) -> None:
    """A worker process: one server on the port the parent reserved, its metrics written to
    the multiprocess folder (the parent serves them), no listener of its own."""
    setup_logging(settings.log_format, settings.log_level)
    from prometheus_client import CollectorRegistry

    from serving import server

    sys.exit(server.run(settings, CollectorRegistry()))


def worker_settings(
    settings: ServerSettings, port: int, index: int = 0, run_board: str = ""
) -> ServerSettings:
    """Worker `index`'s settings (the same number when it is restarted: its capture files
    and its slot of the `run_board` file, serving.runboard)."""
    threads = settings.intra_op_threads
    if threads == 0:
        # ORT's default is a thread per core in every worker: N workers would run N x cores
        # threads that preempt each other and the event loops. Share the cores out instead.
        threads = max(1, usable_cores() // settings.workers)
    return replace(
        settings,
        port=port,
        reuse_port=True,
        metrics_port=0,
        workers=1,
        intra_op_threads=threads,
        worker_index=index,
        worker_count=settings.workers,
        run_board=run_board,
    )


def run_parent(settings: ServerSettings) -> int:
    """The parent process of a multi-worker server."""
    if multiprocessing.parent_process() is not None:
        # A spawned worker re-imports the launching script: one that calls main() without
        # an `if __name__ == "__main__":` guard would land here, in a worker, and wipe the
        # live workers' metric files before failing on the metrics port, again and again.
        raise RuntimeError(
            "cnn-serve --workers N started inside one of its own workers: call "
            "serving.main.main() under `if __name__ == '__main__':` in the launching script"
        )
    from serving.capture_files import prepare_folder
    from serving.server import Access

    try:  # here, once: a worker that cannot start would be restarted forever
        Access.from_settings(settings)
        TracingConfig.from_environ()  # each worker builds its own tracer provider from it
        if settings.capture_dir is not None:
            prepare_folder(settings.capture_dir)
    except (TLSError, TokenFileError, OSError, TracingError) as exc:
        log.error("cannot start: %s", exc)
        return 3
    given = os.environ.get(MULTIPROC_ENV)
    mp_dir = fresh_multiproc_dir(given)
    os.environ[MULTIPROC_ENV] = str(mp_dir)  # the spawned workers inherit it
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    spawn = multiprocessing.get_context("spawn")
    with contextlib.ExitStack() as stack:
        private = Path(tempfile.mkdtemp(prefix="convserve-workers-"))
        stack.callback(shutil.rmtree, private, ignore_errors=True)
        board = str(make_board_file(private, settings.workers))
        port = stack.enter_context(reserve_port(settings.host, settings.port))
        if settings.health_port:  # the workers share the probe port the same way
            stack.enter_context(reserve_port(settings.host, settings.health_port))
        if settings.http_port:  # and the HTTP port
            stack.enter_context(reserve_port(settings.host, settings.http_port))
        if settings.metrics_listener:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=str(mp_dir))
            start_http_server(settings.metrics_listener, settings.metrics_host, registry)

        def start(i: int) -> BaseProcess:
            each = worker_settings(settings, port, i, board)
            p = spawn.Process(target=worker, args=(each,), name="convserve-worker")
            p.start()
            return p

        workers: list[BaseProcess] = []
        signal.signal(signal.SIGHUP, lambda *_: _forward(workers, signal.SIGHUP))
        workers += [start(i) for i in range(settings.workers)]
        log.info("started %d workers on port %d: %s", len(workers), port, [w.pid for w in workers])
        while not stopping.wait(0.2):
            for i, w in enumerate(workers):
                if not w.is_alive():
                    log.error("worker %d exited with %s; restarting it", w.pid, w.exitcode)
                    multiprocess.mark_process_dead(w.pid, str(mp_dir))
                    workers[i] = start(i)
        _forward(workers, signal.SIGTERM)
        code = _wait(workers, settings.drain_timeout + 10, mp_dir)
    if not given:  # ours: remove it (a folder the operator named is theirs to keep)
        shutil.rmtree(mp_dir, ignore_errors=True)
    return code


def _forward(workers: list[BaseProcess], sig: signal.Signals) -> None:
    for w in workers:
        if w.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w.pid, sig)


def _wait(workers: list[BaseProcess], timeout: float, mp_dir: Path) -> int:
    """Wait for every worker to drain (killing any still running after `timeout`); the first
    worker's failure code, else 0."""
    from prometheus_client import multiprocess

    deadline = time.monotonic() + timeout
    code = 0
    for w in workers:
        w.join(max(0.1, deadline - time.monotonic()))
        if w.is_alive():
            w.kill()
            w.join()
        multiprocess.mark_process_dead(w.pid, str(mp_dir))
        rc = w.exitcode
        code = code or (rc if rc and rc > 0 else 0)
    return code
