"""Settings: one typed object per program, from flags and environment variables.

A program's settings are a frozen dataclass whose fields are declared with `option()`: the
default, the help text, the bounds and the choices live there and nowhere else. `parse()`
builds the argparse parser from the fields (flag `--max-batch-size` for `max_batch_size`,
environment variable `CONVSERVE_MAX_BATCH_SIZE` when the program takes them; a flag beats the
variable, the variable beats the default) and validates once, in `__post_init__`, so an
object built in code is held to the same rules as one built from a command line. A field
whose type is itself a settings dataclass contributes its flags (the client's access options
in cnn-predict and cnn-bench).

`ServerSettings` is cnn-serve's. The core's own configuration objects (`BatchConfig`,
`RepositoryConfig`, `RuntimeOptions`, `Limits`) have no defaults: they are views of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.auth import GROUPS, TokenFileError, parse_groups
from serving.batcher import BatchConfig
from serving.contract import VARIANT_FILES
from serving.dataplane import Limits
from serving.repository import RepositoryConfig
from serving.runtime import GRAPH_OPT_LEVELS, SPINNING, RuntimeOptions
from serving.tls import TLSFiles

ENV_PREFIX = "CONVSERVE_"


class SettingsError(ValueError):
    """Settings that cannot work; the message names the flag."""


@dataclass(frozen=True)
class Option:
    """What a settings field declares besides its type and default."""

    help: str
    minimum: float | None = None
    choices: tuple[str, ...] | None = None
    flag: str | None = None  # default: the field name with '-' for '_'
    cli: bool = True  # False: set by code only (not a flag, not a variable)
    env: bool = True  # read ENV_PREFIX + FLAG when the program reads variables
    env_always: bool = False  # read it even where the program reads no others (a secret)
    exclusive: str | None = None  # options naming one group exclude each other as flags
    parse: Callable[[str], Any] | None = None  # text -> value; ValueError says why
    metavar: str | None = None

    def flag_of(self, name: str) -> str:
        return self.flag or name.replace("_", "-")

    def reads_env(self, program_env: bool) -> bool:
        return self.env_always or (program_env and self.env)


def option(default: Any, help: str, **kw: Any) -> Any:
    """A settings field: its default and its `Option`."""
    return field(default=default, metadata={"option": Option(help, **kw)})


def nested(cls: type) -> Any:
    """A settings field holding another settings dataclass, whose flags it contributes."""
    return field(default_factory=cls, metadata={"nested": True})


def env_name(flag: str) -> str:
    return ENV_PREFIX + flag.upper().replace("-", "_")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def validate(settings: Any) -> None:
    """Bounds and choices of every option field; SettingsError names the flag."""
    for f in dataclasses.fields(settings):
        opt = f.metadata.get("option")
        value = getattr(settings, f.name)
        if opt is None or value is None:
            continue
        flag = f"--{opt.flag_of(f.name)}" if opt.cli else f.name
        if opt.minimum is not None and value < opt.minimum:
            raise SettingsError(f"{flag} must be >= {opt.minimum:g}")
        if opt.choices is not None and value not in opt.choices:
            raise SettingsError(f"{flag} must be one of {', '.join(opt.choices)}; got {value!r}")


# ----------------------------------------------------------------------------- parsing
def _truthy(text: str) -> bool:
    return text.strip().lower() not in ("0", "false", "no", "off", "")


def _leaf_fields(cls: type) -> list[tuple[tuple[str, ...], dataclasses.Field, Any]]:
    """(path, field, type) of every option field, nested settings flattened."""
    hints = _hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("nested"):
            out += [((f.name, *p), g, t) for p, g, t in _leaf_fields(hints[f.name])]
        elif "option" in f.metadata and f.metadata["option"].cli:
            out.append(((f.name,), f, hints[f.name]))
    return out


def _converter(opt: Option, typ: Any) -> Callable[[str], Any] | None:
    if opt.parse is not None:
        return opt.parse
    base = typing.get_args(typ)[0] if typing.get_origin(typ) in (typing.Union, _UnionType) else typ
    return base if base in (int, float, str, Path) else None


_UnionType = type(int | None)


def _dest(path: tuple[str, ...]) -> str:
    return "__".join(path)


def build_parser(
    cls: type, prog: str, description: str, *, env: bool, environ: Mapping[str, str]
) -> argparse.ArgumentParser:
    """An argparse parser with a flag per option field of `cls` (defaults: see `parse`)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    groups: dict[str, Any] = {}
    for path, f, typ in _leaf_fields(cls):
        opt: Option = f.metadata["option"]
        flag = opt.flag_of(f.name)
        help_text = opt.help
        if opt.reads_env(env):
            help_text += f" [{env_name(flag)}]"
        kw: dict[str, Any] = {"dest": _dest(path), "default": None, "help": help_text}
        if opt.metavar:
            kw["metavar"] = opt.metavar
        if typ is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(typ) is tuple and opt.parse is None:
            kw["action"] = "append"  # repeatable
        else:
            kw["type"] = _converter(opt, typ)
            if opt.choices is not None:
                kw["choices"] = list(opt.choices)
        if opt.exclusive is not None and opt.exclusive not in groups:
            groups[opt.exclusive] = p.add_mutually_exclusive_group()
        groups.get(opt.exclusive, p).add_argument(f"--{flag}", **kw)
    return p


def parse(
    cls: type,
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
    env: bool = True,
    environ: Mapping[str, str] | None = None,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> tuple[Any, argparse.Namespace]:
    """Settings of type `cls` from `argv` (a flag), then `environ` (a variable, when `env`),
    then the field's default. Errors exit as argparse's do, naming the flag. `extra` adds
    arguments that are not settings (positional paths, an output file); they come back in
    the namespace."""
    environ = os.environ if environ is None else environ
    p = build_parser(cls, prog, description, env=env, environ=environ)
    if extra is not None:
        extra(p)
    args = p.parse_args(argv)
    values: dict[tuple[str, ...], Any] = {}
    for path, f, typ in _leaf_fields(cls):
        opt: Option = f.metadata["option"]
        value = getattr(args, _dest(path))
        text = environ.get(env_name(opt.flag_of(f.name))) if opt.reads_env(env) else None
        if value is None and text is not None:
            value = _from_env(p, opt.flag_of(f.name), opt, typ, text)
        if value is not None:
            values[path] = tuple(value) if isinstance(value, list) else value
    try:
        return _build(cls, values, ()), args
    except SettingsError as exc:
        p.error(str(exc))
    raise AssertionError("unreachable")  # p.error exits


def _from_env(p: argparse.ArgumentParser, flag: str, opt: Option, typ: Any, text: str) -> Any:
    if typ is bool:
        return _truthy(text)
    if typing.get_origin(typ) is tuple and opt.parse is None:
        return tuple(text.split())
    convert = _converter(opt, typ) or str
    try:
        value = convert(text)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        p.error(f"{env_name(flag)}={text!r}: {exc}")
    if opt.choices is not None and value not in opt.choices:
        p.error(f"{env_name(flag)}={text!r}: choose from {', '.join(opt.choices)}")
    return value


def _build(cls: type, values: dict[tuple[str, ...], Any], prefix: tuple[str, ...]) -> Any:
    hints = _hints(cls)
    kw = {}
    for f in dataclasses.fields(cls):
        path = (*prefix, f.name)
        if f.metadata.get("nested"):
            kw[f.name] = _build(hints[f.name], values, path)
        elif path in values:
            kw[f.name] = values[path]
    return cls(**kw)


# ----------------------------------------------------------------------------- cnn-serve
EVENT_LOOPS = ("auto", "uvloop", "asyncio")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
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
    host: str = option("0.0.0.0", "gRPC bind address")
    port: int = option(50051, "gRPC port (0: any free port)", minimum=0)
    metrics_host: str = option("0.0.0.0", "Prometheus /metrics bind address")
    metrics_port: int = option(8000, "Prometheus /metrics port (0: off)", minimum=0)
    metrics: bool = option(
        True,
        "record Prometheus metrics (--no-metrics: record nothing and serve no /metrics; only "
        "for pricing metrics in benchmarks)",
    )
    device: str = option("auto", "auto | cpu | cuda | cuda:N | tensorrt", parse=_device)
    intra_op_threads: int = option(0, "ORT threads per run (0: one per core)", minimum=0)
    inter_op_threads: int = option(1, "ORT inter-op threads", minimum=0)
    graph_optimization: str = option(
        "all", "ORT graph optimisation level", choices=tuple(sorted(GRAPH_OPT_LEVELS))
    )
    variant: str = option("fp32", "which model file to serve", choices=tuple(sorted(VARIANT_FILES)))
    max_batch_size: int = option(64, "rows per ORT run", minimum=1)
    max_queue_delay_us: int = option(
        0, "how long a request may wait for company (microseconds)", minimum=0
    )
    max_queue_size: int = option(4096, "queued rows beyond which requests are shed", minimum=1)
    instances: int = option(1, "concurrent ORT runs per model", minimum=1)
    workers: int = option(1, "worker processes sharing the port", minimum=1)
    poll_interval: float = option(5.0, "seconds between repository scans (0: never)", minimum=0)
    drain_timeout: float = option(30.0, "seconds to finish admitted requests on SIGTERM", minimum=0)
    # Long-lived clients re-resolve and reconnect after this age, so a scaled-out Deployment
    # behind one ClusterIP spreads them over the new pods.
    max_connection_age: float = option(
        0.0,
        "seconds before a client connection is asked to reconnect (GOAWAY; 0: never)",
        minimum=0,
    )
    max_connection_age_grace: float = option(
        30.0, "seconds an aged connection keeps for the RPCs still running on it", minimum=0
    )
    max_message_bytes: int = option(16 * 1024 * 1024, "largest request or response", minimum=1024)
    max_images_per_request: int = option(256, "images in one request", minimum=1)
    max_explain_positions: int = option(
        1024,
        "occlusion patch positions one Explain may run (each is a forward pass)",
        minimum=1,
    )
    max_model_bytes: int = option(
        512 * 1024 * 1024, "largest model file that will be loaded", minimum=1
    )
    event_loop: str = option(
        "auto",
        "the asyncio event loop: uvloop (libuv, in C: less CPU per RPC), asyncio (the "
        "standard library's), auto (uvloop when installed)",
        choices=EVENT_LOOPS,
    )
    log_format: str = option("text", "text | json", choices=("text", "json"))
    log_level: str = option("info", "debug | info | warning | error", choices=LOG_LEVELS)
    # Transport and access (SECURITY.md). No certificate: plaintext. No token file: no auth.
    tls_cert: Path | None = option(None, "server certificate chain (PEM): TLS on the gRPC port")
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
    # Set by code, not by users.
    reuse_port: bool = option(
        False, "workers sharing a port the parent reserved (SO_REUSEPORT)", cli=False
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
            self.poll_interval,
            self.variant,
            self.max_model_bytes,
        )

    @property
    def runtime(self) -> RuntimeOptions:
        return RuntimeOptions(
            self.device,
            self.intra_op_threads,
            self.inter_op_threads,
            self.graph_optimization,
            self.spinning,
        )

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
        return Limits(self.max_images_per_request, self.max_explain_positions)

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
