"""Find a dataset's files on disk, verify them by SHA-256, and download them when missing.

A dataset's directory is searched for in this order, and counts only when it holds every file:
an explicit ``data_dir``; ``$CONVSERVE_DATA/<dataset>``; the dataset's system directories
(e.g. a Debian package's copy); ``~/.cache/convserve/datasets/<dataset>``. If none does and
downloading is allowed, the missing files are fetched into the first of ``data_dir``,
``$CONVSERVE_DATA/<dataset>`` and the cache directory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from trainer.data.types import DataError

log = logging.getLogger(__name__)

ENV_VAR = "CONVSERVE_DATA"
TIMEOUT_S = 60
_CHUNK = 1 << 20
_FIX = "delete it and run `make data`, or pass --data-dir pointing at a good copy"

# (resolved path, size, mtime_ns) -> hex digest, so repeated loads in one process hash once.
_digest_cache: dict[tuple[str, int, int], str] = {}


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset: its name on disk, the digests we accept, and where to fetch it."""

    filename: str
    sha256: tuple[str, ...]  # accepted digests of the file as stored (any matches)
    urls: tuple[str, ...]  # mirrors tried in order


def sha256_file(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def locate(
    files: Sequence[RemoteFile],
    *,
    dataset: str,
    data_dir: str | os.PathLike | None,
    system_dirs: Sequence[Path],
    download: bool,
) -> dict[str, Path]:
    """Paths of all ``files`` (by filename), each verified by SHA-256; downloads if allowed.

    Raises DataError when a local file fails verification, when the files are found nowhere
    and ``download`` is False, or when a download fails.
    """
    searched = _search_dirs(dataset, data_dir, system_dirs)
    for directory in searched:
        if all((directory / f.filename).is_file() for f in files):
            return {f.filename: _verified(directory / f.filename, f, dataset) for f in files}
    if not download:
        places = "\n".join(f"  {d}" for d in searched)
        names = ", ".join(f.filename for f in files)
        raise DataError(
            f"{dataset}: files not found ({names}). Looked in:\n{places}\n"
            f"Run `make data` to download them, pass --data-dir pointing at a folder that holds "
            f"them, or allow downloading."
        )
    return _fill(files, _download_dir(dataset, data_dir), dataset)


def download(file: RemoteFile, dest_dir: Path) -> Path:
    """Fetch ``file`` into ``dest_dir`` from its first mirror that answers; returns its path.

    The bytes stream into a temporary file in ``dest_dir`` and are hashed on the way; only a
    file with an accepted digest is renamed to its final name, so a failed or tampered download
    never leaves a file that a later load would trust.
    """
    errors = []
    for url in file.urls:
        log.info("downloading %s to %s", url, dest_dir)
        try:
            tmp, digest = _fetch_to_temp(url, dest_dir, file.filename)
        except (urllib.error.URLError, OSError) as e:  # HTTPError, timeouts, resets
            errors.append(f"  {url}: {e}")
            continue
        if digest not in file.sha256:
            tmp.unlink()
            raise DataError(
                f"{file.filename}: download from {url} has SHA-256 {digest}, expected "
                f"{' or '.join(file.sha256)}; the mirror served a different file. Retry later, "
                f"or put a good copy in a folder and pass --data-dir"
            )
        final = dest_dir / file.filename
        os.replace(tmp, final)
        return final
    tried = "\n".join(errors)
    raise DataError(
        f"{file.filename}: download failed from every mirror:\n{tried}\n"
        f"Check the network and run `make data`, or pass --data-dir pointing at a folder that "
        f"already holds the file."
    )


def _fill(files: Sequence[RemoteFile], dest: Path, dataset: str) -> dict[str, Path]:
    """Download into ``dest`` the files it lacks, verifying the ones it already has."""
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(
            f"{dataset}: cannot create download folder {dest} ({e}); "
            f"pass --data-dir pointing at a writable folder"
        ) from e
    found = {}
    for f in files:
        path = dest / f.filename
        found[f.filename] = _verified(path, f, dataset) if path.is_file() else download(f, dest)
    return found


def _fetch_to_temp(url: str, dest_dir: Path, filename: str) -> tuple[Path, str]:
    h = hashlib.sha256()
    fd, name = tempfile.mkstemp(dir=dest_dir, prefix=f".{filename}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:
            while chunk := resp.read(_CHUNK):
                h.update(chunk)
                out.write(chunk)
    except BaseException:
        os.unlink(name)
        raise
    return Path(name), h.hexdigest()


def _verified(path: Path, file: RemoteFile, dataset: str) -> Path:
    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        digest = _digest_cache.get(key) or sha256_file(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e}); fix its permissions, or {_FIX}") from e
    if digest not in file.sha256:
        raise DataError(
            f"{path}: SHA-256 {digest} does not match the published {dataset} digest "
            f"({' or '.join(file.sha256)}); the file is corrupt or a different version. {_FIX}"
        )
    _digest_cache[key] = digest
    return path


def _search_dirs(
    dataset: str, data_dir: str | os.PathLike | None, system_dirs: Sequence[Path]
) -> list[Path]:
    dirs = [] if data_dir is None else [Path(data_dir)]
    if root := os.environ.get(ENV_VAR):
        dirs.append(Path(root) / dataset)
    dirs.extend(Path(d) for d in system_dirs)
    dirs.append(_cache_dir(dataset))
    return dirs


def _download_dir(dataset: str, data_dir: str | os.PathLike | None) -> Path:
    if data_dir is not None:
        return Path(data_dir)
    if root := os.environ.get(ENV_VAR):
        return Path(root) / dataset
    return _cache_dir(dataset)


def _cache_dir(dataset: str) -> Path:
    return Path.home() / ".cache" / "convserve" / "datasets" / dataset
