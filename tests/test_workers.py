"""`--workers N` process housekeeping that the metrics and security tests do not cover."""

from __future__ import annotations

from pathlib import Path

from tests.serving_helpers import running_server
from tests.tiny_models import write_version


def test_the_parent_removes_the_metrics_folder_it_created(tmp_path: Path) -> None:
    repo, tmp = tmp_path / "models", tmp_path / "tmp"
    tmp.mkdir()
    write_version(repo, "tiny", 1)
    with running_server(repo, tmp_path, "--workers", "2", env={"TMPDIR": str(tmp)}):
        made = list(tmp.glob("convserve-prom-*"))
        assert len(made) == 1 and any(made[0].iterdir())  # the workers' metric files
    assert not list(tmp.glob("convserve-prom-*"))  # one per server start would pile up in /tmp
