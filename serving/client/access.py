"""The access options of cnn-predict and cnn-bench (TLS files and a bearer token), declared
once as settings and nested into both commands' settings. The token may come from
CONVSERVE_AUTH_TOKEN, the only variable these commands read (SECURITY.md)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from serving.client.channel import TLS, read_token_file
from serving.options import SettingsError, option, validate


@dataclass(frozen=True)
class ClientAccess:
    """How a command reaches a server that wants TLS or a token."""

    # metavar: the flag's own name, not the nested field's path (ACCESS__TLS_CA)
    tls_ca: str | None = option(
        None, "CA certificate (PEM) that signed the server's certificate", metavar="TLS_CA"
    )
    tls_cert: str | None = option(
        None, "client certificate (PEM) for mutual TLS", metavar="TLS_CERT"
    )
    tls_key: str | None = option(None, "client private key (PEM) for mutual TLS", metavar="TLS_KEY")
    tls_server_name: str | None = option(
        None, "name to check in the server's certificate", metavar="TLS_SERVER_NAME"
    )
    auth_token: str | None = option(
        None,
        "bearer token sent with every call (prefer --auth-token-file: command lines are "
        "visible to other users)",
        env_always=True,
        metavar="AUTH_TOKEN",
    )
    auth_token_file: str | None = option(
        None, "file holding the bearer token", metavar="AUTH_TOKEN_FILE"
    )

    def __post_init__(self) -> None:
        validate(self)
        if bool(self.tls_cert) != bool(self.tls_key):
            raise SettingsError("--tls-cert and --tls-key go together")
        self.token  # noqa: B018  (an unreadable --auth-token-file is refused here)

    @property
    def tls(self) -> TLS | None:
        """TLS settings, or None for plaintext."""
        if self.tls_ca or self.tls_cert or self.tls_server_name:
            return TLS(self.tls_ca, self.tls_cert, self.tls_key, self.tls_server_name)
        return None

    @functools.cached_property
    def token(self) -> str | None:
        """The bearer token: --auth-token-file's, else --auth-token's (read once)."""
        if not self.auth_token_file:
            return self.auth_token
        try:
            return read_token_file(self.auth_token_file)
        except (OSError, ValueError) as exc:
            raise SettingsError(f"--auth-token-file: {exc}") from None
