"""The TLS and token flags of cnn-predict and cnn-bench: added to a parser, read back as
(TLS settings, bearer token)."""

from __future__ import annotations

import argparse
import os

from serving.client.channel import TLS, read_token_file


def add_access_options(p: argparse.ArgumentParser) -> None:
    """The TLS and token flags shared by cnn-predict and cnn-bench."""
    p.add_argument("--tls-ca", help="CA certificate (PEM) that signed the server's certificate")
    p.add_argument("--tls-cert", help="client certificate (PEM) for mutual TLS")
    p.add_argument("--tls-key", help="client private key (PEM) for mutual TLS")
    p.add_argument("--tls-server-name", help="name to check in the server's certificate")
    p.add_argument(
        "--auth-token",
        default=os.environ.get("CONVSERVE_AUTH_TOKEN"),
        help="bearer token sent with every call [CONVSERVE_AUTH_TOKEN] (prefer "
        "--auth-token-file: command lines are visible to other users)",
    )
    p.add_argument("--auth-token-file", help="file holding the bearer token")


def access_from_args(
    p: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[TLS | None, str | None]:
    """(TLS settings or None for plaintext, bearer token or None) from `add_access_options`."""
    if bool(args.tls_cert) != bool(args.tls_key):
        p.error("--tls-cert and --tls-key go together")
    tls = None
    if args.tls_ca or args.tls_cert or args.tls_server_name:
        tls = TLS(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
    token = args.auth_token
    if args.auth_token_file:
        try:
            token = read_token_file(args.auth_token_file)
        except (OSError, ValueError) as exc:
            p.error(f"--auth-token-file: {exc}")
    return tls, token
