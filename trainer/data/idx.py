"""Reader for the IDX format of MNIST and Fashion-MNIST, plain or gzip-compressed."""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from typing import BinaryIO

import numpy as np

from trainer.data.types import DataError

_GZIP_MAGIC = b"\x1f\x8b"
_DTYPES = {0x08: np.dtype(np.uint8)}  # the only element type the datasets we read use
_MAX_BYTES = 1 << 32  # far above any dataset we read; a larger header is corrupt
_REFETCH = "the file is damaged or incomplete; delete it and run `make data`"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzip-compressed or raw) into a writable array of the shape it declares.

    Raises DataError naming the file for a bad magic number, an unsupported element type,
    fewer data bytes than the header's dimensions imply (including a truncated gzip stream)
    and bytes left over after the data.
    """
    try:
        with open(path, "rb") as raw:
            compressed = raw.read(2) == _GZIP_MAGIC
            raw.seek(0)
            if compressed:
                with gzip.GzipFile(fileobj=raw) as stream:
                    return _read_stream(stream, path)
            return _read_stream(raw, path)
    except EOFError as e:
        raise DataError(f"{path}: truncated gzip stream ({e}); {_REFETCH}") from e
    except (zlib.error, OSError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read IDX data ({e}); {_REFETCH}") from e


def _read_stream(stream: BinaryIO, path: str | os.PathLike) -> np.ndarray:
    header = stream.read(4)
    if len(header) < 4 or header[:2] != b"\x00\x00":
        raise DataError(f"{path}: not an IDX file (bad magic number {header.hex()}); {_REFETCH}")
    code, ndim = header[2], header[3]
    if code not in _DTYPES:
        raise DataError(f"{path}: IDX element type 0x{code:02x} is not supported (only uint8)")
    dims_bytes = stream.read(4 * ndim)
    if len(dims_bytes) < 4 * ndim:
        raise DataError(f"{path}: truncated IDX header; {_REFETCH}")
    dims = struct.unpack(f">{ndim}I", dims_bytes)
    if math.prod(dims) > _MAX_BYTES:
        raise DataError(f"{path}: IDX header declares an implausible shape {dims}; {_REFETCH}")
    out = np.empty(math.prod(dims), dtype=_DTYPES[code])
    got = _read_into(stream, memoryview(out).cast("B"))
    if got < out.nbytes:
        raise DataError(
            f"{path}: truncated IDX file: header declares shape {dims} ({out.nbytes} bytes) but "
            f"only {got} bytes follow; {_REFETCH}"
        )
    if stream.read(1):
        raise DataError(f"{path}: unexpected bytes after the IDX data of shape {dims}; {_REFETCH}")
    return out.reshape(dims)


def _read_into(stream: BinaryIO, buffer: memoryview) -> int:
    """Fill buffer from stream (which may return short reads); returns the bytes read."""
    filled = 0
    while filled < len(buffer):
        n = stream.readinto(buffer[filled:])
        if not n:
            break
        filled += n
    return filled
