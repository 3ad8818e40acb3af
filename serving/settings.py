"""cnn-serve's settings: every flag and CONVSERVE_* variable, each default, bound and help text
once (declared with serving.options).

The core's own configuration objects (`BatchConfig`, `RepositoryConfig`, `RuntimeOptions`,
`Limits`) have no defaults: they are views of `ServerSettings`.
"""

from __future__ import annotations

import argparse
import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from serving.auth import GROUPS, TokenFileError, parse_groups
from serving.batcher import BatchConfig
from serving.capture import CaptureConfig
from serving.contract import VARIANT_FILES
from serving.cores import usable_cores
from serving.dataplane import Limits
from serving.options import SettingsError, option, parse, validate
from serving.repository import RepositoryConfig
from serving.runtime import GRAPH_OPT_LEVELS, SPINNING, RuntimeOptions
from serving.tls import TLSFiles

EVENT_LOOPS = ("auto", "uvloop", "asyncio")
CONTROL_MODES = ("poll", "none", "explicit")
DEFAULT_POLL_S = 5.0
DEFAULT_CAPTURE_RATE = 0.01
DEFAULT_CAPTURE_MAX_BYTES = 1 << 30
LOG_LEVELS = ("debug", "info", "warning", "warn", "error", "critical")
_DEVICE_RE = re.compile(r"auto|cpu|tensorrt|cuda(:\d+)?")


def _device(text: str) -> str:
    if not _DEVICE_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"must be auto, cpu, cuda, cuda:N or tensorrt, not {text!r}"
        )
    return text


def _open_groups(text: str) -> tuple[str, ...]:
    try:
        return tuple(sorted(parse_groups("" if text == "none" else text, "")))
    except TokenFileError as exc:
        raise argparse.ArgumentTypeError(str(exc).lstrip(": ")) from None


@dataclass(frozen=True)
class ServerSettings:
    """Every setting of cnn-serve; each default lives here and nowhere else."""

    model_repository: Path = option(Path("models"), "model repository folder")
    models: tuple[str, ...] = option(
        (),
        "serve only this model; NAME:1,2 pins versions (repeatable)",
        flag="model",
        metavar="NAME[:V,V]",
    )
    host: str = option("0.0.0.0", "gRPC and HTTP bind address")
    port: int = option(50051, "gRPC port (0: any free port)", minimum=0)
    http_port: int = option(
        8080,
        "HTTP port on --host: KServe V2 REST, convserve.v1 as REST and the try-it page (0: off)",
        minimum=0,
    )
    ui: bool = option(True, "serve the try-it page at GET / on the HTTP port (--no-ui: off)")
    metrics_host: str = option("0.0.0.0", "Prometheus /metrics bind address")
    metrics_port: int = option(8000, "Prometheus /metrics port (0: off)", minimum=0)
    metrics: bool = option(
        True,
        "record Prometheus metrics (--no-metrics: record nothing and serve no /metrics; only "
        "for pricing metrics in benchmarks)",
    )
    device: str = option("auto", "auto | cpu | cuda | cuda:N | tensorrt", parse=_device)
    intra_op_threads: int = option(0, "ORT threads per run (0: one per core)")
    inter_op_threads: int = option(1, "ORT inter-op threads")
    graph_optimization: str = option(
        "all", "ORT graph optimisation level", choices=tuple(sorted(GRAPH_OPT_LEVELS))
    )
    variant: str = option("fp32", "which model file to serve", choices=tuple(sorted(VARIANT_FILES)))
    max_batch_size: int = option(64, "rows per ORT run", minimum=1)
    max_queue_delay_us: int = option(0, "how long a request may wait for company (microseconds)")
    max_queue_size: int = option(4096, "queued rows beyond which requests are shed", minimum=1)
    instances: int = option(1, "concurrent ORT runs per model", minimum=1)
    borrow_idle_cores: bool = option(
        True,
        "a CPU run that finds no other run in flight (any worker, any lane) uses every core, "
        "not its share (--intra-op-threads, or the cores split between --workers): a second "
        "session per model version (serving.runboard; --no-borrow-idle-cores: off)",
    )
    shed_by_deadline: bool = option(
        True,
        "refuse at once (RESOURCE_EXHAUSTED) a call whose deadline the work already queued "
        "would outlast, instead of queueing it to time out",
    )
    workers: int = option(1, "worker processes sharing the port", minimum=1)
    model_control_mode: str = option(
        "poll",
        "as Triton's: poll (load at start, then scan every --poll-interval), none (load at "
        "start, never again) or explicit (load only the --model NAMEs at start and what "
        "RepositoryModelLoad asks)",
        choices=CONTROL_MODES,
    )
    poll_interval: float | None = option(
        None,
        f"seconds between repository scans with --model-control-mode poll (default "
        f"{DEFAULT_POLL_S:g}; 0: never)",
        minimum=0,
    )
    drain_timeout: float = option(30.0, "seconds to finish admitted requests on SIGTERM")
    # Long-lived clients re-resolve and reconnect after this age, so a scaled-out Deployment
    # behind one ClusterIP spreads them over the new pods.
    max_connection_age: float = option(
        0.0,
        "seconds before a client connection is asked to reconnect (GOAWAY; 0: never)",
    )
    max_connection_age_grace: float = option(
        30.0, "seconds an aged connection keeps for the RPCs still running on it"
    )
    max_message_bytes: int = option(16 * 1024 * 1024, "largest request or response", minimum=1024)
    max_images_per_request: int = option(256, "images in one request", minimum=1)
    max_explain_positions: int = option(
        1024,
        "occlusion patch positions one Explain may run (each is a forward pass)",
        minimum=1,
    )
    max_model_bytes: int = option(512 * 1024 * 1024, "largest model file that will be loaded")
    event_loop: str = option(
        "auto",
        "the asyncio event loop: uvloop (libuv, in C: less CPU per RPC), asyncio (the "
        "standard library's), auto (uvloop when installed)",
        choices=EVENT_LOOPS,
    )
    log_format: str = option("text", "text | json", choices=("text", "json"))
    log_level: str = option(
        "info", "debug | info | warning | error", choices=LOG_LEVELS, parse=str.lower
    )
    # Transport and access (SECURITY.md). No certificate: plaintext. No token file: no auth.
    tls_cert: Path | None = option(
        None, "server certificate chain (PEM): TLS on the gRPC and HTTP ports"
    )
    tls_key: Path | None = option(None, "private key (PEM) of --tls-cert")
    tls_client_ca: Path | None = option(
        None, "CA (PEM) that must sign client certificates (mutual TLS)"
    )
    auth_token_file: Path | None = option(
        None, "bearer tokens, one per line: TOKEN [group,group...] (re-read on change)"
    )
    open_groups: tuple[str, ...] = option(
        ("health",),
        f"endpoint groups that need no token, comma-separated, of {','.join(GROUPS)} "
        "('none': every group needs one)",
        parse=_open_groups,
    )
    health_port: int = option(
        0, "plaintext grpc.health.v1-only port for probes (0: off)", minimum=0
    )
    # Sampled captures for retraining (serving.capture; what they hold: SECURITY.md).
    capture_dir: Path | None = option(
        None,
        "write a sample of the classified images here, as PNGs in a folder per predicted "
        "class (cnn-train's imagefolder layout), each with a JSON line (default: off)",
    )
    capture_rate: float | None = option(
        None,
        f"fraction of images captured, 0..1 (default {DEFAULT_CAPTURE_RATE:g}; needs "
        "--capture-dir)",
        minimum=0,
    )
    capture_max_bytes: int | None = option(
        None,
        "bytes the captures may hold, split evenly between the workers; the oldest are "
        f"deleted first (default {DEFAULT_CAPTURE_MAX_BYTES >> 30} GiB; needs --capture-dir)",
        minimum=1,
    )
    # Set by code, not by users.
    capture_queue: int = option(
        256, "images waiting to be captured beyond which more are dropped", minimum=1, cli=False
    )
    worker_index: int = option(0, "this worker's number, 0..worker_count-1", minimum=0, cli=False)
    worker_count: int = option(
        1, "--workers of the server this worker is one of (its own is 1)", minimum=1, cli=False
    )
    reuse_port: bool = option(
        False, "workers sharing a port the parent reserved (SO_REUSEPORT)", cli=False
    )
    run_board: str = option(
        "", "the workers' run board file (serving.runboard; '': this process's own)", cli=False
    )
    spinning: str = option(
        "run", "ORT intra-op spinning (serving.runtime.SPINNING)", choices=SPINNING, cli=False
    )

    def __post_init__(self) -> None:
        validate(self)
        if bool(self.tls_cert) != bool(self.tls_key):
            raise SettingsError("--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise SettingsError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        unknown = sorted(set(self.open_groups) - set(GROUPS))
        if unknown:
            raise SettingsError(f"--open-groups: unknown group(s) {unknown}")
        if self.model_control_mode != "poll" and self.poll_interval:
            raise SettingsError(
                f"--poll-interval {self.poll_interval:g} contradicts --model-control-mode "
                f"{self.model_control_mode}: only poll mode scans the repository (in explicit "
                "mode RepositoryModelLoad loads a model); drop one of them"
            )
        given = self.capture_rate is not None or self.capture_max_bytes is not None
        if self.capture_dir is None and given:
            raise SettingsError("--capture-rate and --capture-max-bytes need --capture-dir")
        if self.capture_rate is not None and not 0 <= self.capture_rate <= 1:
            raise SettingsError(f"--capture-rate must be within 0..1, got {self.capture_rate}")
        self.repository  # noqa: B018  (a malformed --model NAME:V,V is refused here)

    @functools.cached_property
    def repository(self) -> RepositoryConfig:
        names, pinned = [], {}
        for spec in self.models:
            name, _, versions = spec.partition(":")
            names.append(name)
            if versions:
                try:
                    pinned[name] = tuple(int(v) for v in versions.split(","))
                except ValueError:
                    raise SettingsError(
                        f"--model {spec!r}: versions are numbers, as in NAME:1,2"
                    ) from None
        return RepositoryConfig(
            self.model_repository,
            tuple(names),
            pinned,
            self.poll_seconds,
            self.variant,
            self.max_model_bytes,
            self.model_control_mode,
        )

    @property
    def poll_seconds(self) -> float:
        """Seconds between repository scans: 0 unless --model-control-mode poll."""
        if self.model_control_mode != "poll":
            return 0.0
        return DEFAULT_POLL_S if self.poll_interval is None else self.poll_interval

    @property
    def runtime(self) -> RuntimeOptions:
        return RuntimeOptions(
            self.device,
            self.intra_op_threads,
            self.inter_op_threads,
            self.graph_optimization,
            self.spinning,
            wide_threads=self.wide_threads,
            board=self.run_board,
            board_slots=self.worker_count,
            board_slot=self.worker_index,
        )

    @property
    def wide_threads(self) -> int:
        """Intra-op threads of a run alone on the server (serving.runboard): every usable
        core, when runs get fewer and several may run at once; else 0 (no wide session)."""
        cores = usable_cores()
        shared = self.worker_count > 1 or self.instances > 1
        if self.borrow_idle_cores and shared and 0 < self.intra_op_threads < cores:
            return cores
        return 0

    @property
    def batching(self) -> BatchConfig:
        return BatchConfig(
            self.max_batch_size,
            self.max_queue_delay_us / 1e6,
            self.max_queue_size,
            self.instances,
        )

    @property
    def limits(self) -> Limits:
        return Limits(
            self.max_images_per_request, self.max_explain_positions, self.shed_by_deadline
        )

    @property
    def capture(self) -> CaptureConfig | None:
        """This worker's captures, with its share of the byte budget; None when off (no
        --capture-dir, or a rate of 0)."""
        if self.capture_dir is None or self.capture_rate == 0:
            return None
        rate = DEFAULT_CAPTURE_RATE if self.capture_rate is None else self.capture_rate
        budget = self.capture_max_bytes or DEFAULT_CAPTURE_MAX_BYTES
        share = budget // self.worker_count
        return CaptureConfig(self.capture_dir, rate, share, self.capture_queue, self.worker_index)

    @property
    def tls_files(self) -> TLSFiles | None:
        if self.tls_cert is None or self.tls_key is None:
            return None
        return TLSFiles(self.tls_cert, self.tls_key, self.tls_client_ca)

    @property
    def metrics_listener(self) -> int:
        """The /metrics port, 0 when there is none (`--no-metrics` serves none)."""
        return self.metrics_port if self.metrics else 0


def server_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> ServerSettings:
    """cnn-serve's settings from its command line and CONVSERVE_* variables."""
    settings, _ = parse(
        ServerSettings,
        argv,
        prog="cnn-serve",
        description="Serve ONNX image classifiers over gRPC (convserve.v1 and KServe V2). "
        "Every flag can also be set as CONVSERVE_<FLAG> (e.g. CONVSERVE_PORT=50051).",
        environ=environ,
    )
    return settings
