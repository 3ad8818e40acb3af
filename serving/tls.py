"""TLS on the gRPC port: server credentials whose certificate files are re-read on change.

grpc calls `CertificateStore.fetch` before every new TLS handshake. It stats the files (a few
microseconds) and re-reads them when one changed, or when SIGHUP asked for it (`reload`).
Connections already open keep the certificate they were made with, so a rotation drops no
connection and no admitted request. A half-done rotation (the new certificate written, its
key not yet) fails the check, is logged, and the previous pair keeps serving until the
files agree again.

The checks use the standard library's `ssl`: the key must match the certificate, and the
client CA file (mutual TLS) must hold at least one certificate.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger("convserve.tls")


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


def _signature(files: TLSFiles) -> tuple[tuple[int, int], ...] | None:
    # mtime and inode: a rewrite and a rename-over (Kubernetes secret volumes swap a
    # symlink; stat follows it) both change it.
    try:
        return tuple((s.st_mtime_ns, s.st_ino) for s in map(os.stat, files.paths()))
    except OSError:
        return None


def _configuration(files: TLSFiles) -> grpc.ServerCertificateConfiguration:
    """Check and read the files into a configuration grpc can use."""
    before = _signature(files)
    check_files(files)
    cert, key = files.cert.read_bytes(), files.key.read_bytes()
    ca = files.client_ca.read_bytes() if files.client_ca else None
    if _signature(files) != before:
        raise TLSError("the certificate files changed while being read; will retry")
    return grpc.ssl_server_certificate_configuration([(key, cert)], ca)


class CertificateStore:
    """The server's TLS credentials, re-read when the files change or on `reload()`."""

    def __init__(self, files: TLSFiles):
        self.files = files
        self._lock = threading.Lock()
        self._seen = _signature(files)
        self._initial = _configuration(files)  # raises TLSError: refuse to start
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self.reloads = 0

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial,
            self.fetch,
            require_client_authentication=self.files.client_ca is not None,
        )

    def reload(self) -> bool:
        """Re-read the files now (SIGHUP); the next handshake uses them. False (and the
        previous certificate stays) when they are unreadable or do not match."""
        with self._lock:
            # Files that fail the check are looked at again only once they change again,
            # so a broken rotation logs once, not once per handshake.
            self._seen = _signature(self.files)
            try:
                self._pending = _configuration(self.files)
            except TLSError as exc:
                log.error("TLS certificate not reloaded; still serving the previous one: %s", exc)
                return False
        self.reloads += 1
        log.info("TLS certificate reloaded from %s", self.files.cert)
        return True

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """grpc's per-handshake hook: a new configuration, or None to keep the current one."""
        try:
            if self._pending is None and _signature(self.files) != self._seen:
                self.reload()
            with self._lock:
                pending, self._pending = self._pending, None
            return pending
        except Exception:  # an exception here would fail the handshake; keep serving
            log.exception("TLS certificate check failed")
            return None
