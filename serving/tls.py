"""TLS certificate files: which they are, whether they fit together, and whether they changed.

The checks use the standard library's `ssl`: the key must match the certificate, and the
client CA file (mutual TLS) must hold at least one certificate. The gRPC front end builds its
credentials from these files and re-reads them on change (serving.grpc.tls).
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path


class TLSError(ValueError):
    """Certificate files that cannot be read or do not fit together."""


@dataclass(frozen=True)
class TLSFiles:
    """PEM files: the server's certificate (chain) and key, and for mutual TLS the CA that
    must have signed every client's certificate."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def paths(self) -> tuple[Path, ...]:
        return (self.cert, self.key) + ((self.client_ca,) if self.client_ca else ())


def _no_password() -> bytes:
    return b""  # an encrypted key fails the check instead of prompting on a terminal


def check_files(files: TLSFiles) -> None:
    """Raise TLSError naming the file when a file is unreadable or the key does not match."""
    for flag, path in (("--tls-cert", files.cert), ("--tls-key", files.key)):
        if not os.access(path, os.R_OK):
            raise TLSError(f"{flag} {path}: cannot be read")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(files.cert, files.key, password=_no_password)
    except (ssl.SSLError, OSError) as exc:
        raise TLSError(
            f"--tls-cert {files.cert} / --tls-key {files.key}: not a matching PEM certificate "
            f"and unencrypted private key ({exc})"
        ) from None
    if files.client_ca is not None:
        try:
            ctx.load_verify_locations(cafile=files.client_ca)
        except (ssl.SSLError, OSError) as exc:
            raise TLSError(
                f"--tls-client-ca {files.client_ca}: no readable PEM certificate ({exc})"
            ) from None


def signature(files: TLSFiles) -> tuple[tuple[int, int], ...] | None:
    # mtime and inode: a rewrite and a rename-over (Kubernetes secret volumes swap a
    # symlink; stat follows it) both change it.
    try:
        return tuple((s.st_mtime_ns, s.st_ino) for s in map(os.stat, files.paths()))
    except OSError:
        return None
