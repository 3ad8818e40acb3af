"""Servers built in the test process: `serving.server.create_server` on port 0 with a
registry of their own, on an event loop in a background thread.

Behaviour tests use these (tests/serving_helpers.py starts `cnn-serve` processes for what
only a process shows: signals, `--workers N`, start-up failures, log format, /proc). Clients
are real sync gRPC clients talking to `target`; metrics are read back from `registry` with
`get_sample_value`, as prometheus_client's own tests do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
from prometheus_client import CollectorRegistry

from serving.server import App, create_server
from serving.settings import ServerSettings

T = TypeVar("T")
START_TIMEOUT = 120.0  # loading and warming every model of the repository


def settings_for(repository: Path, **kw: Any) -> ServerSettings:
    """cnn-serve's defaults, serving `repository` on a free loopback port, no /metrics port
    and no HTTP port (a test that wants one passes `http_port=free_port()`)."""
    base: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "metrics_port": 0, "http_port": 0}
    return ServerSettings(model_repository=repository, **{**base, **kw})


class _Lines(logging.Handler):
    """Every log record of the process while a server runs, formatted as the text log is."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


class InProcessServer:
    """One worker's server on its own event loop thread, started by `start()` (models loaded
    and warmed, then the port opened) and drained by `stop()`."""

    def __init__(self, settings: ServerSettings, registry: CollectorRegistry | None = None):
        self.settings = settings
        self.registry = registry if registry is not None else CollectorRegistry()
        self.port = 0
        self.app: App | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="inprocess-server", daemon=True)
        self._logs = _Lines()
        self._level = logging.NOTSET

    # -- what tests use ----------------------------------------------------------------
    @property
    def target(self) -> str:
        return f"{self.settings.host}:{self.port}"

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.target)

    @property
    def url(self) -> str:
        """The HTTP port's base URL (the settings must give an http_port)."""
        assert self.app is not None and self.app.http is not None, "no HTTP port"
        return f"http://{self.settings.host}:{self.app.http.port}"

    def value(self, name: str, **labels: str) -> float:
        """The samples `name` whose labels include these, summed (0 when none was recorded):
        `value("convserve_requests_total", method="Predict", code="OK")` counts both
        protocols."""
        return sum(
            v for got, v in self.samples(name) if all(got.get(k) == x for k, x in labels.items())
        )

    def samples(self, name: str) -> list[tuple[dict[str, str], float]]:
        """(labels, value) of every sample called `name` (for 'exactly these series')."""
        return [
            (s.labels, s.value)
            for family in self.registry.collect()
            for s in family.samples
            if s.name == name
        ]

    def log(self) -> str:
        """What the process logged while this server ran (other servers' lines too)."""
        return "\n".join(self._logs.lines)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        """Run `coro` on the server's event loop (where its core lives) and return its result."""
        assert self._loop is not None, "not started"
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # -- life cycle --------------------------------------------------------------------
    def start(self) -> InProcessServer:
        root = logging.getLogger()
        root.addHandler(self._logs)
        ours = logging.getLogger("convserve")
        self._level = ours.level
        ours.setLevel(logging.INFO)  # what cnn-serve logs; the root logger stays as it is
        self._thread.start()
        if not self._started.wait(START_TIMEOUT):
            raise TimeoutError(f"server not started after {START_TIMEOUT}s:\n{self.log()}")
        if self._error is not None:
            self._detach_logs()
            raise self._error
        return self

    def stop(self) -> None:
        """Drain (admitted requests finish, up to the settings' drain_timeout) and stop;
        re-raises whatever stopped the server's loop, so a clean stop is a passing check."""
        try:
            if self._loop is not None and self._stop is not None and self.running:
                self._loop.call_soon_threadsafe(self._stop.set)
            limit = self.settings.drain_timeout + 30
            self._thread.join(limit)
            assert not self.running, f"server still running {limit}s after stop"
        finally:
            self._detach_logs()
        if self._error is not None:
            raise self._error

    def __enter__(self) -> InProcessServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _detach_logs(self) -> None:
        logging.getLogger().removeHandler(self._logs)
        logging.getLogger("convserve").setLevel(self._level)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported by start() or stop()
            self._error = exc
        finally:
            self._started.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        _, self.port, self.app = await create_server(self.settings, self.registry)
        try:
            await self.app.start()  # models loaded and warmed before the ports open
            await self.app.listen()
        except BaseException:
            await self.app.drain(0)
            raise
        self._started.set()
        await self._stop.wait()
        await self.app.drain(self.settings.drain_timeout)


@contextlib.contextmanager
def serving(
    repository: Path, registry: CollectorRegistry | None = None, **settings: Any
) -> Iterator[InProcessServer]:
    """An in-process server of `repository` with these ServerSettings fields, drained on exit."""
    with InProcessServer(settings_for(repository, **settings), registry) as server:
        yield server
