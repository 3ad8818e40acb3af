"""`cnn-serve`: build the gRPC server, load the repository, serve until SIGTERM, drain.

`create_server(config)` builds everything for one worker and returns the server, the port it
bound and the app that owns the repository, so a test binds port 0 and talks to it. `main`
adds process concerns: flags (each also a CONVSERVE_* environment variable), logging,
signals, the metrics listener and, with --workers N, worker processes sharing the port.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from serving.auth import GROUPS, AuthInterceptor, TokenFileError, TokenTable, parse_groups
from serving.batcher import BatchConfig
from serving.dataplane import DataPlane, Limits
from serving.metrics import Metrics, MetricsEvents
from serving.proto.convserve.v1 import classifier_pb2, classifier_pb2_grpc
from serving.proto.inference import grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc
from serving.repository import VARIANT_FILES, ModelRepository, RepositoryConfig
from serving.runtime import GRAPH_OPT_LEVELS, RuntimeOptions
from serving.services import ClassifierServicer, Gate, InferenceServicer, TolerantRegistration
from serving.tls import CertificateStore, TLSError, TLSFiles

log = logging.getLogger("convserve.server")

SERVICE_NAMES = (
    classifier_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name,
    grpc_predict_v2_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
)


@dataclass(frozen=True)
class ServerConfig:
    """Every setting of one server; defaults live here and nowhere else."""

    model_repository: Path = Path("models")
    models: tuple[str, ...] = ()  # NAME or NAME:V1,V2 (pinned versions)
    host: str = "0.0.0.0"
    port: int = 50051
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 8000  # 0: no metrics listener
    metrics: bool = True  # False: record nothing (the benchmark's metrics-off baseline)
    device: str = "auto"
    intra_op_threads: int = 0
    inter_op_threads: int = 1
    graph_optimization: str = "all"
    variant: str = "fp32"
    max_batch_size: int = 64
    max_queue_delay_us: int = 0
    max_queue_size: int = 4096
    instances: int = 1
    workers: int = 1
    poll_interval: float = 5.0
    drain_timeout: float = 30.0
    # Long-lived clients re-resolve and reconnect after this age, so a scaled-out Deployment
    # behind one ClusterIP spreads them over the new pods (0: connections live forever).
    max_connection_age: float = 0.0
    max_connection_age_grace: float = 30.0  # RPCs in flight on an aged connection get this long
    max_message_bytes: int = 16 * 1024 * 1024
    max_images_per_request: int = 256
    max_explain_positions: int = 1024  # occlusion positions per Explain (forward passes - 1)
    max_model_bytes: int = 512 * 1024 * 1024
    log_format: str = "text"
    log_level: str = "info"
    # Transport and access (SECURITY.md). No certificate: plaintext. No token file: no auth.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # set: mutual TLS, clients need a cert it signed
    auth_token_file: Path | None = None
    open_groups: tuple[str, ...] = ("health",)  # endpoint groups that need no token
    health_port: int = 0  # plaintext grpc.health.v1-only listener for probes (0: none)
    event_loop: str = "auto"  # EVENT_LOOPS: uvloop where installed, else asyncio's own
    reuse_port: bool = False  # set for workers that share a port reserved by the parent

    def repository_config(self) -> RepositoryConfig:
        names, pinned = [], {}
        for spec in self.models:
            name, _, versions = spec.partition(":")
            names.append(name)
            if versions:
                pinned[name] = tuple(int(v) for v in versions.split(","))
        return RepositoryConfig(
            Path(self.model_repository),
            tuple(names),
            pinned,
            self.poll_interval,
            self.variant,
            self.max_model_bytes,
        )

    def runtime_options(self) -> RuntimeOptions:
        return RuntimeOptions(
            self.device, self.intra_op_threads, self.inter_op_threads, self.graph_optimization
        )

    def tls_files(self) -> TLSFiles | None:
        if self.tls_cert is None or self.tls_key is None:
            return None
        return TLSFiles(Path(self.tls_cert), Path(self.tls_key), self.tls_client_ca)

    def batch_config(self) -> BatchConfig:
        return BatchConfig(
            self.max_batch_size,
            self.max_queue_delay_us / 1e6,
            self.max_queue_size,
            self.instances,
        )


@dataclass
class App:
    """What one worker serves: repository, data plane, health, metrics, admission gate."""

    config: ServerConfig
    metrics: Metrics
    repository: ModelRepository
    health: HealthServicer
    gate: Gate = field(default_factory=Gate)
    decode_executor: concurrent.futures.ThreadPoolExecutor | None = None
    access: Access | None = None
    health_server: grpc.aio.Server | None = None  # --health-port: probes only, plaintext
    _process_task: asyncio.Task | None = None

    async def start(self) -> None:
        """Load and warm every model, then report SERVING (health stays NOT_SERVING until)."""
        await self.repository.start()
        await self._set_health()
        self._process_task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        # Health follows the repository (a model may load later); process gauges refresh.
        while True:
            self.metrics.update_process()
            await self._set_health()
            await asyncio.sleep(1.0)

    async def _set_health(self) -> None:
        serving = self.gate.open and self.repository.ready
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)

    async def drain(self, server: grpc.aio.Server, timeout: float) -> None:
        """NOT_SERVING, refuse new RPCs, finish every admitted one (bounded), stop."""
        self.gate.open = False
        await self._set_health()
        log.info("draining: finishing admitted requests (up to %.0fs)", timeout)
        await server.stop(grace=timeout)
        if self.health_server is not None:
            await self.health_server.stop(grace=1.0)
        await self.repository.close(timeout=1.0)
        if self._process_task is not None:
            self._process_task.cancel()
        if self.decode_executor is not None:
            self.decode_executor.shutdown(wait=False)


@dataclass
class Access:
    """TLS certificates and auth tokens of one server: both re-read on change or SIGHUP."""

    certificates: CertificateStore | None
    tokens: TokenTable | None

    @classmethod
    def from_config(cls, config: ServerConfig) -> Access:
        """Read and check the files; TLSError or TokenFileError refuses to start."""
        files = config.tls_files()
        tokens = config.auth_token_file
        return cls(
            CertificateStore(files) if files else None, TokenTable(tokens) if tokens else None
        )

    def reload(self) -> None:
        if self.certificates is not None:
            self.certificates.reload()
        if self.tokens is not None:
            self.tokens.reload()


PENDING_CALLS_LIMIT = 20_000  # ~20-80 MB of typical requests (1-4 KB) waiting in grpc


def grpc_options(config: ServerConfig) -> list[tuple[str, int | str]]:
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        # A stale server on the same port must not silently take our traffic; only
        # workers of one server share a port (the parent reserves it).
        ("grpc.so_reuseport", 1 if config.reuse_port else 0),
        # Calls that reached grpc but not yet our handlers (the event loop is behind). Past
        # grpc's defaults (1000 soft, 3000 hard) grpc sheds them with CANCELLED, which
        # clients take for their own cancellation and retry (serving.client does); under
        # `make overload` that was a third of all answers. Below this limit the excess gets
        # the batcher's RESOURCE_EXHAUSTED or its deadline's DEADLINE_EXCEEDED; the limit
        # only caps memory. Cost measured in RELIABILITY.md (less goodput under overload).
        ("grpc.server.max_pending_requests", PENDING_CALLS_LIMIT),
        ("grpc.server.max_pending_requests_hard_limit", PENDING_CALLS_LIMIT),
        *_connection_age_options(config),
    ]


def _connection_age_options(config: ServerConfig) -> list[tuple[str, int | str]]:
    if config.max_connection_age <= 0:
        return []
    return [
        ("grpc.max_connection_age_ms", int(config.max_connection_age * 1000)),
        ("grpc.max_connection_age_grace_ms", int(config.max_connection_age_grace * 1000)),
    ]


async def create_server(
    config: ServerConfig, registry: CollectorRegistry | None = None
) -> tuple[grpc.aio.Server, int, App]:
    """Build one worker's server and bind it; call `app.start()` then `server.start()`."""
    metrics = Metrics(registry, enabled=config.metrics)
    repository = ModelRepository(
        config.repository_config(),
        config.runtime_options(),
        config.batch_config(),
        MetricsEvents(metrics),
    )
    decode_executor = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="decode")
    limits = Limits(
        config.max_images_per_request, max_explain_positions=config.max_explain_positions
    )
    plane = DataPlane(repository, limits, decode_executor)
    health = HealthServicer()  # it starts out SERVING for "": say NOT_SERVING until loaded
    access = Access.from_config(config)
    app = App(config, metrics, repository, health, decode_executor=decode_executor, access=access)
    await app._set_health()
    interceptors = None  # no token file: no interceptor, so unauthenticated serving pays nothing
    if access.tokens is not None:
        open_groups = frozenset(config.open_groups)
        interceptors = [AuthInterceptor(access.tokens, open_groups, metrics)]
    server = grpc.aio.server(interceptors=interceptors, options=grpc_options(config))
    args = (plane, metrics, app.gate, config.device)
    # Undecodable request bytes reach the servicers, which answer INVALID_ARGUMENT.
    ours = TolerantRegistration(server)
    classifier_pb2_grpc.add_ClassifierServicer_to_server(ClassifierServicer(*args), ours)
    grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        InferenceServicer(*args), ours
    )
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
    reflection.enable_server_reflection((*names, reflection.SERVICE_NAME), server)
    creds = access.certificates.credentials() if access.certificates else None
    port = _bind(server, config.host, config.port, creds)
    if config.health_port:
        # Probes cannot present client certificates or tokens: the same HealthServicer
        # (so the same status) alone on a plaintext port of its own.
        reuse = ("grpc.so_reuseport", 1 if config.reuse_port else 0)
        app.health_server = grpc.aio.server(options=[reuse])
        health_pb2_grpc.add_HealthServicer_to_server(health, app.health_server)
        _bind(app.health_server, config.host, config.health_port, None)
    return server, port, app


def _bind(
    server: grpc.aio.Server, host: str, port: int, creds: grpc.ServerCredentials | None
) -> int:
    address = f"{_host(host)}:{port}"
    try:
        if creds is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, creds)
    except RuntimeError:  # grpc reports a failed bind this way
        bound = 0
    if bound == 0:
        raise OSError(f"could not bind {address} (in use, or not an address of this host)")
    return bound


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


async def serve(config: ServerConfig, registry: CollectorRegistry | None = None) -> int:
    """Run one worker until SIGTERM/SIGINT, then drain and return 0."""
    server, port, app = await create_server(config, registry)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload, app)
    servers = [server] + ([app.health_server] if app.health_server else [])
    if config.reuse_port:
        # A worker sharing the port must not take connections before its models are warm.
        await app.start()
        for s in servers:
            await s.start()
    else:
        for s in servers:
            await s.start()  # health answers NOT_SERVING while models load
        await app.start()
    log.info(
        "listening on %s:%d (pid %d, %s event loop)",
        config.host,
        port,
        os.getpid(),
        type(loop).__module__.split(".")[0],
    )
    if not app.repository.ready:
        log.error(
            "no model is loaded yet from %s (%s)",
            config.model_repository,
            app.repository.last_error or "empty repository",
        )
    else:
        for name in app.repository.names():
            mv = app.repository.get(name)
            log.info("serving %s version %d on %s", name, mv.version, mv.session.provider)
    await stop.wait()
    await app.drain(server, config.drain_timeout)
    log.info("stopped")
    return 0


def _reload(app: App) -> None:
    log.info("SIGHUP: re-reading TLS certificates and auth tokens")
    if app.access is not None:
        app.access.reload()


# ----------------------------------------------------------------------------- flags
def _env(name: str) -> str:
    return "CONVSERVE_" + name.upper().replace("-", "_")


def build_parser() -> argparse.ArgumentParser:
    d = ServerConfig()
    p = argparse.ArgumentParser(
        prog="cnn-serve",
        description="Serve ONNX image classifiers over gRPC (convserve.v1 and KServe V2). "
        "Every flag can also be set as CONVSERVE_<FLAG> (e.g. CONVSERVE_PORT=50051).",
    )

    def add(flag: str, typ: type, default: object, help: str, **kw: object) -> None:
        env = _env(flag)
        value = os.environ.get(env, default)
        p.add_argument(f"--{flag}", type=typ, default=value, help=f"{help} [{env}]", **kw)

    add("model-repository", Path, d.model_repository, "model repository folder")
    p.add_argument(
        "--model",
        action="append",
        default=os.environ.get(_env("model"), "").split() or None,
        help="serve only this model; NAME:1,2 pins versions (repeatable) [CONVSERVE_MODEL]",
    )
    add("host", str, d.host, "gRPC bind address")
    add("port", int, d.port, "gRPC port (0: any free port)")
    add("metrics-host", str, d.metrics_host, "Prometheus /metrics bind address")
    add("metrics-port", int, d.metrics_port, "Prometheus /metrics port (0: off)")
    p.add_argument(
        "--metrics",
        action=argparse.BooleanOptionalAction,
        default=os.environ.get(_env("metrics"), "1" if d.metrics else "0").lower()
        not in ("0", "false", "no", "off"),
        help="record Prometheus metrics (--no-metrics: record nothing and serve no "
        f"/metrics; only for pricing metrics in benchmarks) [{_env('metrics')}]",
    )
    add("device", str, d.device, "auto | cpu | cuda | cuda:N | tensorrt")
    add("intra-op-threads", int, d.intra_op_threads, "ORT threads per run (0: one per core)")
    add("inter-op-threads", int, d.inter_op_threads, "ORT inter-op threads")
    add(
        "graph-optimization",
        str,
        d.graph_optimization,
        "ORT graph optimisation level",
        choices=sorted(GRAPH_OPT_LEVELS),
    )
    add("variant", str, d.variant, "which model file to serve", choices=sorted(VARIANT_FILES))
    add("max-batch-size", int, d.max_batch_size, "rows per ORT run")
    add(
        "max-queue-delay-us",
        int,
        d.max_queue_delay_us,
        "how long a request may wait for company (microseconds)",
    )
    add("max-queue-size", int, d.max_queue_size, "queued rows beyond which requests are shed")
    add("instances", int, d.instances, "concurrent ORT runs per model")
    add("workers", int, d.workers, "worker processes sharing the port")
    add("poll-interval", float, d.poll_interval, "seconds between repository scans (0: never)")
    add("drain-timeout", float, d.drain_timeout, "seconds to finish admitted requests on SIGTERM")
    add(
        "max-connection-age",
        float,
        d.max_connection_age,
        "seconds before a client connection is asked to reconnect (GOAWAY; 0: never)",
    )
    add(
        "max-connection-age-grace",
        float,
        d.max_connection_age_grace,
        "seconds an aged connection keeps for the RPCs still running on it",
    )
    add("max-message-bytes", int, d.max_message_bytes, "largest request or response")
    add("max-images-per-request", int, d.max_images_per_request, "images in one request")
    add(
        "max-explain-positions",
        int,
        d.max_explain_positions,
        "occlusion patch positions one Explain may run (each is a forward pass)",
    )
    add("max-model-bytes", int, d.max_model_bytes, "largest model file that will be loaded")
    add(
        "event-loop",
        str,
        d.event_loop,
        "the asyncio event loop: uvloop (libuv, in C: less CPU per RPC), asyncio (the "
        "standard library's), auto (uvloop when installed)",
        choices=list(EVENT_LOOPS),
    )
    add("log-format", str, d.log_format, "text | json", choices=["text", "json"])
    add("log-level", str, d.log_level, "debug | info | warning | error")
    add("tls-cert", str, None, "server certificate chain (PEM): TLS on the gRPC port")
    add("tls-key", str, None, "private key (PEM) of --tls-cert")
    add("tls-client-ca", str, None, "CA (PEM) that must sign client certificates (mutual TLS)")
    add(
        "auth-token-file",
        str,
        None,
        "bearer tokens, one per line: TOKEN [group,group...] (re-read on change)",
    )
    add(
        "open-groups",
        str,
        ",".join(d.open_groups),
        f"endpoint groups that need no token, comma-separated, of {','.join(GROUPS)} "
        "('none': every group needs one)",
    )
    add("health-port", int, d.health_port, "plaintext grpc.health.v1-only port for probes (0: off)")
    return p


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def config_from_args(argv: Sequence[str] | None = None) -> ServerConfig:
    a = build_parser().parse_args(argv)
    for name, low in (
        ("port", 0),
        ("metrics-port", 0),
        ("max-batch-size", 1),
        ("max-queue-size", 1),
        ("instances", 1),
        ("workers", 1),
        ("max-images-per-request", 1),
        ("max-explain-positions", 1),
        ("max-message-bytes", 1024),
        ("health-port", 0),
    ):
        if getattr(a, name.replace("-", "_")) < low:
            build_parser().error(f"--{name} must be >= {low}")
    if bool(a.tls_cert) != bool(a.tls_key):
        build_parser().error("--tls-cert and --tls-key go together")
    if a.tls_client_ca and not a.tls_cert:
        build_parser().error("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    try:
        open_groups = parse_groups("" if a.open_groups == "none" else a.open_groups, "")
    except TokenFileError as exc:
        build_parser().error(f"--open-groups{exc}")
    return ServerConfig(
        model_repository=a.model_repository,
        models=tuple(a.model or ()),
        host=a.host,
        port=a.port,
        metrics_host=a.metrics_host,
        metrics_port=a.metrics_port if a.metrics else 0,
        metrics=a.metrics,
        device=a.device,
        intra_op_threads=a.intra_op_threads,
        inter_op_threads=a.inter_op_threads,
        graph_optimization=a.graph_optimization,
        variant=a.variant,
        max_batch_size=a.max_batch_size,
        max_queue_delay_us=a.max_queue_delay_us,
        max_queue_size=a.max_queue_size,
        instances=a.instances,
        workers=a.workers,
        poll_interval=a.poll_interval,
        drain_timeout=a.drain_timeout,
        max_connection_age=a.max_connection_age,
        max_connection_age_grace=a.max_connection_age_grace,
        max_message_bytes=a.max_message_bytes,
        max_images_per_request=a.max_images_per_request,
        max_explain_positions=a.max_explain_positions,
        max_model_bytes=a.max_model_bytes,
        log_format=a.log_format,
        log_level=a.log_level,
        tls_cert=_path(a.tls_cert),
        tls_key=_path(a.tls_key),
        tls_client_ca=_path(a.tls_client_ca),
        auth_token_file=_path(a.auth_token_file),
        open_groups=tuple(sorted(open_groups)),
        health_port=a.health_port,
        event_loop=a.event_loop,
    )


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(fmt: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
        )
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def main(argv: Sequence[str] | None = None) -> int:
    config = config_from_args(argv)
    setup_logging(config.log_format, config.log_level)
    if config.workers > 1:
        from serving.workers import run_workers

        try:  # here, once: a worker that cannot start would be restarted forever
            Access.from_config(config)
        except (TLSError, TokenFileError) as exc:
            log.error("cannot start: %s", exc)
            return 3

        return run_workers(config)
    return run_single(config)


EVENT_LOOPS = ("auto", "uvloop", "asyncio")


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


def run_single(config: ServerConfig) -> int:
    """One worker: a plain server, or one of the workers that `--workers N` started."""
    from prometheus_client import REGISTRY, start_http_server

    from serving.errors import DeviceUnavailable
    from serving.workers import MULTIPROC_ENV, WORKER_ENV, fresh_multiproc_dir

    registry = REGISTRY
    if os.environ.get(WORKER_ENV):
        # Multiprocess mode: values go to files the parent aggregates; no listener here.
        config = replace(config, reuse_port=True, metrics_port=0, port=int(os.environ[WORKER_ENV]))
        registry = CollectorRegistry()
    elif os.environ.get(MULTIPROC_ENV):
        # One server with the variable set (an image or a manifest that also runs --workers N):
        # prometheus_client writes its values there, so the folder must exist, and be empty.
        fresh_multiproc_dir(os.environ[MULTIPROC_ENV])
    if config.metrics_port:
        start_http_server(config.metrics_port, config.metrics_host, registry)
    try:
        return loop_runner(config.event_loop)(serve(config, registry))
    except (DeviceUnavailable, OSError, TLSError, TokenFileError) as exc:
        log.error("cannot start: %s", exc)
        return 3


if __name__ == "__main__":
    sys.exit(main())
