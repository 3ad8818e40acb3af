"""TLS on the HTTP port: an `ssl.SSLContext` whose certificate files are re-read on change.

The same files and the same rules as the gRPC port (serving.grpc.tls): the context's SNI
callback runs at every new handshake, stats the files (a few microseconds) and, when they
changed or SIGHUP asked for it, hands the handshake a context built from the new files.
Open connections keep theirs; a half-done rotation is logged and the previous pair keeps
serving until the files agree again.
"""

from __future__ import annotations

import logging
import ssl
import threading

from serving.tls import TLSError, TLSFiles, check_files, signature

log = logging.getLogger("convserve.tls")


def _context(files: TLSFiles) -> ssl.SSLContext:
    before = signature(files)
    check_files(files)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(files.cert, files.key)
    if files.client_ca is not None:  # mutual TLS: no certificate signed by the CA, no call
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=files.client_ca)
    if signature(files) != before:
        raise TLSError("the certificate files changed while being read; will retry")
    return ctx


class ServerContext:
    """The HTTP port's TLS context, re-read when the files change or on `reload()`."""

    def __init__(self, files: TLSFiles):
        self.files = files
        self._lock = threading.Lock()
        self._seen = signature(files)
        self._current = _context(files)  # raises TLSError: refuse to start
        # The listening socket keeps this one; each handshake may be handed the current one.
        self.context = _context(files)
        self.context.sni_callback = self._handshake
        self.reloads = 0

    def reload(self) -> bool:
        """Re-read the files now (SIGHUP); the next handshake uses them. False (and the
        previous certificate stays) when they are unreadable or do not match."""
        with self._lock:
            self._seen = signature(self.files)  # a broken rotation logs once, not per handshake
            try:
                self._current = _context(self.files)
            except (TLSError, ssl.SSLError, OSError) as exc:
                log.error("TLS certificate not reloaded; still serving the previous one: %s", exc)
                return False
        self.reloads += 1
        log.info("TLS certificate reloaded from %s (HTTP port)", self.files.cert)
        return True

    def _handshake(self, sock: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        try:
            if signature(self.files) != self._seen:
                self.reload()
            sock.context = self._current
        except Exception:  # an exception here would fail the handshake; keep serving
            log.exception("TLS certificate check failed")
