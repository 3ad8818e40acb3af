"""How a client reaches servers: targets and load balancing, TLS, bearer tokens, channel
options. Shared by Client, AsyncClient, cnn-predict and cnn-bench."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True)
class TLS:
    """TLS settings: the CA that signed the server's certificate, and for mutual TLS the
    client's own certificate and key (PEM files)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None  # override the name checked in the server certificate

    def credentials(self) -> grpc.ChannelCredentials:
        read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
        return grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))


def read_token_file(path: str | Path) -> str:
    """The first token in a file (blank lines and `# comments` skipped; a server-style
    `TOKEN groups` line gives its TOKEN)."""
    for line in Path(path).read_text().splitlines():
        fields = line.split()
        if fields and not fields[0].startswith("#"):
            return fields[0]
    raise ValueError(f"{path}: holds no token")


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that presents `token` to a server run with --auth-token-file."""
    return (("authorization", f"Bearer {token}"),) if token else ()


SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:")


def channel_target(target: str | Sequence[str]) -> str:
    """`host:port`, a `dns:///name:port` target, or a list (or comma-list) of `ip:port`."""
    if isinstance(target, str):
        if "," not in target or target.startswith(SCHEMES):
            return target
        target = target.split(",")
    return "ipv4:" + ",".join(target)


def default_load_balancing(target: str | Sequence[str]) -> str | None:
    """round_robin where the target names several servers: a list of addresses, or a
    `dns:///` name (a headless Service resolves to every ready pod); else gRPC's pick_first."""
    resolved = channel_target(target)
    return "round_robin" if resolved.startswith(("dns:", "ipv4:", "ipv6:")) else None


def channel_options(
    load_balancing: str | None, tls: TLS | None, max_message_bytes: int
) -> list[tuple[str, object]]:
    opts: list[tuple[str, object]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    if load_balancing:
        config: dict[str, object] = {"loadBalancingConfig": [{load_balancing: {}}]}
        if load_balancing == "round_robin":
            # Each server's grpc.health.v1 status, watched: a replica that starts draining
            # (NOT_SERVING) leaves the rotation at once instead of refusing calls.
            config["healthCheckConfig"] = {"serviceName": ""}
        opts.append(("grpc.service_config", json.dumps(config)))
    if tls is not None and tls.server_name:
        opts.append(("grpc.ssl_target_name_override", tls.server_name))
    return opts


def connect(
    target: str, options: Sequence[tuple[str, object]], tls: TLS | None, *, aio: bool = False
) -> grpc.Channel | grpc.aio.Channel:
    """A plaintext channel, or a TLS one when `tls` is given; grpc.aio's when `aio`."""
    api = grpc.aio if aio else grpc
    if tls is None:
        return api.insecure_channel(target, options=options)
    return api.secure_channel(target, tls.credentials(), options=options)
