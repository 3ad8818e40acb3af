"""`--workers N` process housekeeping that the metrics and security tests do not cover."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from serving.client import Client
from tests.serving_helpers import ServerProcess, free_port, running_server, wait_serving
from tests.tiny_models import DEFAULT_LABELS, image_of_class, write_version


def test_the_parent_removes_the_metrics_folder_it_created(tmp_path: Path) -> None:
    repo, tmp = tmp_path / "models", tmp_path / "tmp"
    tmp.mkdir()
    write_version(repo, "tiny", 1)
    with running_server(repo, tmp_path, "--workers", "2", env={"TMPDIR": str(tmp)}):
        made = list(tmp.glob("convserve-prom-*"))
        assert len(made) == 1 and any(made[0].iterdir())  # the workers' metric files
    assert not list(tmp.glob("convserve-prom-*"))  # one per server start would pile up in /tmp


def test_workers_serve_the_flags_main_was_given_not_the_command_line(tmp_path: Path) -> None:
    """Workers get the parent's settings: `main(argv)` called from code (here from
    `python -c`, whose sys.argv holds none of these flags) must not start workers that read
    the command line instead and serve some other repository."""
    repo = tmp_path / "models"
    write_version(repo, "tiny", 1)
    port = free_port()
    flags = ["--model-repository", str(repo), "--workers", "2", "--host", "127.0.0.1"]
    flags += ["--port", str(port), "--metrics-port", "0", "--poll-interval", "0"]
    code = f"import sys; from serving.main import main; sys.exit(main({flags!r}))"
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", code], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT
        )
    server = ServerProcess(proc, port, 0, log_path)
    try:
        wait_serving(server)
        with Client(server.target) as client:
            image = image_of_class(2)
            assert client.predict([image])[0].label == DEFAULT_LABELS[2]
    finally:
        assert server.stop() == 0, server.log()
