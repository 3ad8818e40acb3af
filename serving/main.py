"""`cnn-serve`: settings from flags and CONVSERVE_* variables, logging, then one server, or
with --workers N a parent process and N workers sharing the port (serving.workers)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from serving.logs import setup_logging
from serving.settings import ServerSettings, server_settings

log = logging.getLogger("convserve.server")


def main(argv: Sequence[str] | None = None) -> int:
    settings = server_settings(argv)
    setup_logging(settings.log_format, settings.log_level)
    if settings.workers > 1:
        from serving import workers

        return workers.run_parent(settings)
    return run_single(settings)


def run_single(settings: ServerSettings) -> int:
    """One server in this process, with its own /metrics listener."""
    from serving.workers import MULTIPROC_ENV, fresh_multiproc_dir

    if os.environ.get(MULTIPROC_ENV):
        # One server with the variable set (an image or a manifest that also runs --workers N):
        # prometheus_client writes its values there, so the folder must exist, and be empty,
        # before prometheus_client is imported.
        fresh_multiproc_dir(os.environ[MULTIPROC_ENV])
    from prometheus_client import REGISTRY, start_http_server

    from serving import server

    if settings.metrics_listener:
        start_http_server(settings.metrics_listener, settings.metrics_host, REGISTRY)
    return server.run(settings, REGISTRY)


if __name__ == "__main__":
    sys.exit(main())
