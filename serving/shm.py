"""System shared memory (Triton's extension): a client on the same host puts input tensors
in a POSIX shared-memory region (/dev/shm/KEY), registers the region by name, and names it
in its requests instead of sending the bytes; outputs may be written back into a region.

Registering maps the file into this process; a request then reads its input bytes from the
mapping (one copy, into the batch) and writes its outputs into it. Each worker process has
its own registrations (Triton has one process): with `--workers N` a client must register
on the connection it infers on.

Because a region is a file on this host that the server reads and writes, registration is
refused unless the key names a regular file directly in /dev/shm (no path, no symlink), owned
by the server's own user, and the call came over loopback (the front end checks the peer).
"""

from __future__ import annotations

import mmap
import os
import re
import stat
from dataclasses import dataclass

from serving.errors import FailedPrecondition, InvalidInput

SHM_DIR = "/dev/shm"
KEY_RE = re.compile(r"/?[A-Za-z0-9_.-]{1,200}")
MAX_REGIONS = 256


@dataclass(frozen=True)
class SharedSlice:
    """Bytes of a registered region: what a request names instead of sending them."""

    region: str
    offset: int
    byte_size: int


@dataclass
class Region:
    name: str
    key: str
    offset: int  # of the region within the file
    byte_size: int
    mapping: mmap.mmap


class SharedMemory:
    """The regions registered with this worker, by name."""

    def __init__(self) -> None:
        self.regions: dict[str, Region] = {}

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        if not name:
            raise InvalidInput("a shared-memory region needs a name")
        if name in self.regions:
            raise FailedPrecondition(f"shared-memory region {name!r} is already registered")
        if len(self.regions) >= MAX_REGIONS:
            raise FailedPrecondition(f"{MAX_REGIONS} shared-memory regions are registered")
        if not KEY_RE.fullmatch(key) or key.strip("/") in (".", ".."):
            raise InvalidInput(f"shared-memory key {key[:64]!r} is not a name in {SHM_DIR}")
        if byte_size <= 0 or offset < 0:
            raise InvalidInput("a shared-memory region needs byte_size > 0 and offset >= 0")
        path = os.path.join(SHM_DIR, key.lstrip("/"))
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError as exc:
            raise InvalidInput(
                f"shared-memory key {key!r}: cannot be opened ({exc.strerror})"
            ) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                raise FailedPrecondition(
                    f"shared-memory key {key!r} is not a file of the server's own user"
                )
            if offset + byte_size > st.st_size:
                raise InvalidInput(
                    f"region {name!r} ({offset} + {byte_size} bytes) is larger than {key!r} "
                    f"({st.st_size} bytes)"
                )
            mapping = mmap.mmap(fd, offset + byte_size)
        finally:
            os.close(fd)
        self.regions[name] = Region(name, key, offset, byte_size, mapping)

    def unregister(self, name: str) -> None:
        """One region, or every region when `name` is empty."""
        names = [name] if name else list(self.regions)
        for n in names:
            region = self.regions.pop(n, None)
            if region is None:
                raise InvalidInput(f"no shared-memory region {n!r} is registered")
            region.mapping.close()

    def status(self, name: str) -> list[Region]:
        if not name:
            return list(self.regions.values())
        return [self._region(name)]

    def _region(self, name: str) -> Region:
        region = self.regions.get(name)
        if region is None:
            raise InvalidInput(f"no shared-memory region {name!r} is registered")
        return region

    def _span(self, s: SharedSlice, size: int) -> tuple[Region, int]:
        region = self._region(s.region)
        if s.offset < 0 or size < 0 or s.offset + size > region.byte_size:
            raise InvalidInput(
                f"{size} bytes at offset {s.offset} do not fit region {s.region!r} "
                f"({region.byte_size} bytes)"
            )
        return region, region.offset + s.offset

    def read(self, s: SharedSlice) -> bytes:
        region, start = self._span(s, s.byte_size)
        return region.mapping[start : start + s.byte_size]

    def write(self, s: SharedSlice, data: bytes) -> None:
        if len(data) > s.byte_size:
            raise InvalidInput(
                f"the output needs {len(data)} bytes; {s.byte_size} were given in region "
                f"{s.region!r}"
            )
        region, start = self._span(s, len(data))
        region.mapping[start : start + len(data)] = data

    def close(self) -> None:
        self.unregister("")
