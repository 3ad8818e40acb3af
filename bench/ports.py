"""Loopback ports for the servers a bench or a test starts."""

from __future__ import annotations

import socket

_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free now on 127.0.0.1 and never handed out before by this process: once a
    probe socket closes, the kernel may give the next bind(0) the same port, and a server
    given it for two of its listeners cannot start (seen: gRPC and metrics both on one)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
