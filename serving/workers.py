"""`--workers N`: N worker processes share one port, as in grpc's multiprocessing example.

The parent reserves the port with SO_REUSEPORT (so nothing else can take it), wipes the
Prometheus multiprocess folder, starts the workers (each a full single-worker server with
its own ORT sessions), serves the aggregated /metrics, restarts a worker that dies, forwards
SIGHUP (re-read certificates and tokens), and on SIGTERM forwards it and waits for every
worker to drain. SO_REUSEPORT spreads connections, not requests: clients need several
connections to use every worker.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from serving.server import ServerConfig

log = logging.getLogger("convserve.workers")

WORKER_ENV = "CONVSERVE_WORKER_PORT"  # set for workers: the port the parent reserved


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


def _worker_argv(port: int, config: ServerConfig) -> list[str]:
    argv = [a for a in sys.argv[1:]]
    if config.intra_op_threads == 0:
        # ORT's default is a thread per core in every worker: N workers would run N x cores
        # threads that preempt each other and the event loops. Share the cores out instead.
        cores = len(os.sched_getaffinity(0))
        argv += ["--intra-op-threads", str(max(1, cores // config.workers))]
    return [
        sys.executable,
        "-m",
        "serving.server",
        *argv,
        "--workers",
        "1",
        "--port",
        str(port),
        "--metrics-port",
        "0",
    ]


def _forward(workers: list[subprocess.Popen], sig: signal.Signals) -> None:
    for w in workers:
        with contextlib.suppress(ProcessLookupError):
            w.send_signal(sig)


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


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


def run_workers(config: ServerConfig) -> int:
    """The parent process of a multi-worker server."""
    given = os.environ.get(MULTIPROC_ENV)
    mp_dir = fresh_multiproc_dir(given)
    os.environ[MULTIPROC_ENV] = str(mp_dir)
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())

    with contextlib.ExitStack() as stack:
        port = stack.enter_context(reserve_port(config.host, config.port))
        if config.health_port:  # the workers share the probe port the same way
            stack.enter_context(reserve_port(config.host, config.health_port))
        env = {**os.environ, WORKER_ENV: str(port)}
        if config.metrics_port:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=str(mp_dir))
            start_http_server(config.metrics_port, config.metrics_host, registry)

        def spawn() -> subprocess.Popen:
            return subprocess.Popen(_worker_argv(port, config), env=env)

        workers: list[subprocess.Popen] = []
        signal.signal(signal.SIGHUP, lambda *_: _forward(workers, signal.SIGHUP))
        workers += [spawn() for _ in range(config.workers)]
        log.info("started %d workers on port %d: %s", len(workers), port, [w.pid for w in workers])
        while not stopping.wait(0.2):
            for i, w in enumerate(workers):
                if w.poll() is not None:
                    log.error("worker %d exited with %s; restarting it", w.pid, w.returncode)
                    multiprocess.mark_process_dead(w.pid, str(mp_dir))
                    workers[i] = spawn()
        _forward(workers, signal.SIGTERM)
        deadline = time.monotonic() + config.drain_timeout + 10
        code = 0
        for w in workers:
            try:
                rc = w.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.kill()
                rc = w.wait()
            multiprocess.mark_process_dead(w.pid, str(mp_dir))
            code = code or (rc if rc and rc > 0 else 0)
    if not given:  # ours: remove it (a folder the operator named is theirs to keep)
        shutil.rmtree(mp_dir, ignore_errors=True)
    return code
