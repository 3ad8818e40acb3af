"""CIFAR-10, read straight from the official tarball of pickled batches.

The batches are pickles, and unpickling runs whatever callables the pickle names; a restricted
unpickler admits only the numpy functions that rebuild arrays, so a tampered tarball fails
with DataError instead of running code.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainer.data.fetch import RemoteFile, locate
from trainer.data.types import DataError, Dataset, ImageSet

try:  # numpy >= 2 moved numpy.core to numpy._core; pickles name either, depending on the writer
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _numeric  # type: ignore[no-redef]

_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}
for _core in ("numpy.core", "numpy._core"):
    _ALLOWED[(f"{_core}.multiarray", "_reconstruct")] = _multiarray._reconstruct
    _ALLOWED[(f"{_core}.multiarray", "scalar")] = _multiarray.scalar
    # Arrays pickled with protocol 5 (Python's default) are rebuilt by _frombuffer.
    _ALLOWED[(f"{_core}.numeric", "_frombuffer")] = _numeric._frombuffer

_MEMBER_DIR = "cifar-10-batches-py"
_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))


@dataclass(frozen=True)
class CifarSource:
    """Where a CIFAR-style tarball lives: one RemoteFile, plus optional system folders."""

    name: str
    file: RemoteFile
    system_dirs: tuple[Path, ...] = ()


CIFAR10 = CifarSource(
    name="cifar10",
    file=RemoteFile(
        "cifar-10-python.tar.gz",
        ("6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",),
        ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
    ),
)


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only numpy's array-rebuilding globals."""

    def __init__(self, file: io.BufferedIOBase, *, source: str) -> None:
        super().__init__(file, encoding="bytes")  # the real batches are Python 2 pickles
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise DataError(
                f"refusing to unpickle {module}.{name} from {self._source}: CIFAR batches only "
                f"hold numpy arrays, so this file was not written by the dataset's authors; "
                f"delete it and run `make data`"
            ) from None


def restricted_loads(data: bytes, *, source: str) -> Any:
    """Unpickle ``data`` admitting only numpy arrays; ``source`` names it in errors."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), source=source).load()
    except DataError:
        raise
    except Exception as e:  # any malformed pickle: the file is damaged, not our bug
        raise DataError(f"{source}: cannot unpickle ({e!r}); delete it and run `make data`") from e


def load_cifar(
    source: CifarSource, data_dir: str | os.PathLike | None = None, download: bool = True
) -> Dataset:
    """Locate (or download), verify and read a CIFAR-10 tarball; images come back (N, 3, 32, 32)."""
    path = locate(
        (source.file,),
        dataset=source.name,
        data_dir=data_dir,
        system_dirs=source.system_dirs,
        download=download,
    )[source.file.filename]
    members = _read_members(path, ("batches.meta", *_TRAIN_BATCHES, "test_batch"))
    classes = tuple(_text(n) for n in _field(members["batches.meta"], "label_names", path))
    return Dataset(
        name=source.name,
        classes=classes,
        train=_image_set([members[name] for name in _TRAIN_BATCHES], path, len(classes)),
        test=_image_set([members["test_batch"]], path, len(classes)),
    )


def _read_members(path: Path, names: tuple[str, ...]) -> dict[str, dict]:
    """Unpickle the named batches, reading the tarball once, front to back (gzip cannot seek)."""
    wanted = {f"{_MEMBER_DIR}/{name}": name for name in names}
    found: dict[str, dict] = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                name = wanted.get(member.name)
                f = tar.extractfile(member) if name is not None and member.isfile() else None
                if f is not None:
                    found[name] = _batch(f.read(), f"{path}:{member.name}")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(
            f"{path}: cannot read the tarball ({e}); delete it and run `make data`"
        ) from e
    missing = [member for member, name in wanted.items() if name not in found]
    if missing:
        raise DataError(
            f"{path}: the tarball lacks {', '.join(missing)}; delete it and run `make data`"
        )
    return found


def _batch(data: bytes, source: str) -> dict:
    batch = restricted_loads(data, source=source)
    if not isinstance(batch, dict):
        raise DataError(f"{source}: expected a dict, got {type(batch).__name__}")
    return batch


def _image_set(batches: list[dict], path: Path, n_classes: int) -> ImageSet:
    images, labels = [], []
    for batch in batches:
        data = np.asarray(_field(batch, "data", path))
        batch_labels = np.asarray(_field(batch, "labels", path))
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(
                f"{path}: a batch's data is {data.dtype} {data.shape}, not (N, 3072) uint8"
            )
        if batch_labels.shape != (len(data),) or batch_labels.dtype.kind not in "iu":
            raise DataError(
                f"{path}: a batch has {batch_labels.shape} labels for {len(data)} images"
            )
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(batch_labels.astype(np.int64))
    all_labels = np.concatenate(labels)
    if len(all_labels) and (all_labels.min() < 0 or all_labels.max() >= n_classes):
        raise DataError(
            f"{path}: labels fall outside 0..{n_classes - 1}; delete it and run `make data`"
        )
    return ImageSet(np.concatenate(images), all_labels)


def _field(batch: dict, key: str, path: Path) -> Any:
    """A batch entry by key, which is bytes in the real Python 2 pickles and str in newer ones."""
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    raise DataError(f"{path}: a batch has no {key!r} entry; delete it and run `make data`")


def _text(name: bytes | str) -> str:
    return name.decode() if isinstance(name, bytes) else str(name)
