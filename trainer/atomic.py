"""Files that appear whole or not at all, and stay so after a crash.

A file is written to a hidden temp file in the same folder, flushed and fsynced, then renamed
over its final name, and the folder is fsynced so the rename itself is durable. Checkpoints
and the exporter's published versions and Triton config are all written this way.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def umasked(mode: int) -> int:
    """`mode` as a plain mkdir/open would give it; mkdtemp and mkstemp use 0o700/0o600."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def fsync_dir(path: Path) -> None:
    """Make the entries of folder `path` (a rename into it, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file directly inside `folder`, then the folder itself."""
    for p in folder.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    fsync_dir(folder)


def write_atomic(path: Path, data: bytes | memoryview | str, *, mode: int | None = None) -> None:
    """Write `data` (text as UTF-8) to `path` via a hidden temp file beside it, fsync, rename.

    A crash at any moment leaves the previous file or the new one under `path`, never a torn
    one. `mode=None` keeps the temp file's owner-only 0o600; give e.g. 0o666 for a file other
    users read (the umask applies, as for a plain open). On failure the temp file is removed
    and the error raised as it came.
    """
    if isinstance(data, str):
        data = data.encode()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if mode is not None:
                os.fchmod(f.fileno(), umasked(mode))
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
