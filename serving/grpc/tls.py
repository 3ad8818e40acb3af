"""TLS on the gRPC port: server credentials whose certificate files are re-read on change.

grpc calls `CertificateStore.fetch` before every new TLS handshake. It stats the files (a few
microseconds) and re-reads them when one changed, or when SIGHUP asked for it (`reload`).
Connections already open keep the certificate they were made with, so a rotation drops no
connection and no admitted request. A half-done rotation (the new certificate written, its
key not yet) fails the check (serving.tls.check_files), is logged, and the previous pair
keeps serving until the files agree again.
"""

from __future__ import annotations

import logging
import threading

import grpc

from serving.tls import TLSError, TLSFiles, check_files, signature

log = logging.getLogger("convserve.tls")


def _configuration(files: TLSFiles) -> grpc.ServerCertificateConfiguration:
    """Check and read the files into a configuration grpc can use."""
    before = signature(files)
    check_files(files)
    cert, key = files.cert.read_bytes(), files.key.read_bytes()
    ca = files.client_ca.read_bytes() if files.client_ca else None
    if signature(files) != before:
        raise TLSError("the certificate files changed while being read; will retry")
    return grpc.ssl_server_certificate_configuration([(key, cert)], ca)


class CertificateStore:
    """The server's TLS credentials, re-read when the files change or on `reload()`."""

    def __init__(self, files: TLSFiles):
        self.files = files
        self._lock = threading.Lock()
        self._seen = signature(files)
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
            self._seen = signature(self.files)
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
            if self._pending is None and signature(self.files) != self._seen:
                self.reload()
            with self._lock:
                pending, self._pending = self._pending, None
            return pending
        except Exception:  # an exception here would fail the handshake; keep serving
            log.exception("TLS certificate check failed")
            return None
