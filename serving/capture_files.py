"""One worker's capture files in the capture folder, oldest first, within a byte budget.

    DIR/<label folder>/w<i>-<ns>.png      an image (ns: nanoseconds since the epoch, unique)
    DIR/captures-w<i>-<ns>.jsonl          its JSON lines, a new file every `segment_bytes`

The folder and the files are the server user's only (0o700, 0o600): they hold the images
callers sent. An image is written to a hidden temp name and renamed, so the folder never
holds a partial image (and `cnn-train` skips hidden files); its JSON line is appended after,
and when that fails the image is removed and the file cut back to its last whole line. Files
are not fsynced: captures are a sample, the writer must keep up, and a power cut may lose the
last few. Names carry the wall-clock time because their order must survive a restart.

The budget counts the bytes of every file of this worker, the JSONL files too, so a long run
does not grow one file without bound: a JSONL file is closed at `segment_bytes` and queued
for deletion behind the images it describes (it is deleted when they all are). At start the
files earlier runs left are counted and ordered (images by the time in their name, closed
JSONL files by their last write). The queue costs 20 bytes a file, not a Python object each:
a 1 GiB budget of small images is about a million files.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from array import array
from pathlib import Path

import numpy as np

SEGMENT_BYTES = (4096, 8 * 1024 * 1024)  # a JSONL file's size: budget / 64 within these
JSONL = -1  # the folder id of JSONL files (they sit in DIR itself)


def prepare_folder(folder: Path) -> Path:
    """Make the capture folder (owner-only when new); OSError naming it when it cannot be
    made or written."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "not writable")
    except OSError as exc:
        raise OSError(exc.errno, f"capture folder {folder}: {exc.strerror or exc}") from None
    return folder


class CaptureFiles:
    """The files named `prefix`... in `root`: written, counted and deleted oldest first so
    that their bytes stay within `budget`. Used by one thread."""

    def __init__(self, root: Path, prefix: str, budget: int):
        self.root = root
        self.prefix = prefix
        self.budget = budget
        self.segment_bytes = min(max(budget // 64, SEGMENT_BYTES[0]), SEGMENT_BYTES[1])
        self.bytes = 0  # every file of ours: the queue's and the open JSONL file's
        self.evicted = 0  # images deleted for the budget (the caller reads and resets it)
        # The deletion queue, oldest first, as three columns from `_head` on.
        self._ns, self._folder, self._size = array("q"), array("i"), array("q")
        self._head = 0
        self._folders: list[str] = []  # folder id -> label folder name
        self._folder_ids: dict[str, int] = {}
        self._last_ns = 0
        self._segment: tuple[int, int, int] | None = None  # open JSONL: (fd, ns, bytes)

    # -- writing -----------------------------------------------------------------------
    def new_name(self) -> str:
        """A new image's file name (in whichever label folder it goes)."""
        return f"{self.prefix}{self._new_ns()}.png"

    def write(self, folder: str, name: str, png: bytes, line: bytes) -> bool:
        """The image `folder/name` and its JSON line, after deleting the oldest files as the
        budget needs; False (nothing written) when they alone are over the budget. OSError
        when the disk refuses: nothing of this image is left behind."""
        if not self._make_room(len(png) + len(line)):
            return False
        fid = self._folder_id(folder)
        path = self.root / folder / name
        with contextlib.suppress(FileExistsError):
            os.mkdir(path.parent, 0o700)  # again each time: a user may have removed it
        write_new(path, png)
        try:
            self._append(line)
        except OSError:
            path.unlink(missing_ok=True)  # no image without its line
            raise
        self._push(int(name[len(self.prefix) : -len(".png")]), fid, len(png))
        self.bytes += len(png)
        return True

    def _append(self, line: bytes) -> None:
        if self._segment is not None and self._segment[2] >= self.segment_bytes:
            self._close_segment()  # (only now: its last image is queued for deletion before it)
        if self._segment is None:
            ns = self._new_ns()
            path = self.root / f"captures-{self.prefix}{ns}.jsonl"
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
            self._segment = (os.open(path, flags, 0o600), ns, 0)
        fd, ns, size = self._segment
        try:
            write_all(fd, line)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)  # no torn line: back to the last whole one
            raise
        self._segment = (fd, ns, size + len(line))
        self.bytes += len(line)

    def _close_segment(self) -> None:
        if self._segment is not None:
            fd, ns, size = self._segment
            os.close(fd)
            self._segment = None
            self._push(ns, JSONL, size)  # behind every image it describes

    def close(self) -> None:
        self._close_segment()

    # -- the budget --------------------------------------------------------------------
    def _make_room(self, need: int) -> bool:
        while self.bytes + need > self.budget:
            if self._head == len(self._ns):  # only the open JSONL file is left: close it
                if self._segment is None or self._segment[2] == 0:
                    return False
                self._close_segment()
            self._evict_oldest()
        return True

    def _evict_oldest(self) -> None:
        i = self._head
        fid, size = self._folder[i], self._size[i]
        # Gone already (a user moved it to relabel it) or not ours to delete any more (a user
        # locked it): either way its bytes leave the count, and writing goes on.
        with contextlib.suppress(OSError):
            self._path(self._ns[i], fid).unlink()
        self.bytes -= size
        self.evicted += int(fid != JSONL)
        self._head += 1
        if self._head > 4096 and 2 * self._head > len(self._ns):  # amortised O(1) popleft
            for column in (self._ns, self._folder, self._size):
                del column[: self._head]
            self._head = 0

    def _push(self, ns: int, fid: int, size: int) -> None:
        self._ns.append(ns)
        self._folder.append(fid)
        self._size.append(size)

    def _path(self, ns: int, fid: int) -> Path:
        if fid == JSONL:
            return self.root / f"captures-{self.prefix}{ns}.jsonl"
        return self.root / self._folders[fid] / f"{self.prefix}{ns}.png"

    def _folder_id(self, folder: str) -> int:
        fid = self._folder_ids.get(folder)
        if fid is None:
            fid = self._folder_ids[folder] = len(self._folders)
            self._folders.append(folder)
        return fid

    def _new_ns(self) -> int:
        # Strictly increasing, even if the clock steps back or two files share a tick.
        self._last_ns = max(time.time_ns(), self._last_ns + 1)
        return self._last_ns

    # -- what earlier runs left ----------------------------------------------------------
    def scan(self) -> None:
        """Count the files of ours already in the folder, oldest first (deleting the oldest
        when they are over the budget) and remove temp files a crash left."""
        key, ns, fid, size = array("q"), array("q"), array("i"), array("q")

        def found(k: int, n: int, f: int, s: int) -> None:
            for column, value in ((key, k), (ns, n), (fid, f), (size, s)):
                column.append(value)

        with os.scandir(self.root) as entries:
            for e in entries:
                if e.is_dir(follow_symlinks=False) and not e.name.startswith("."):
                    for image_ns, s in self._scan_folder(Path(e.path)):
                        found(image_ns, image_ns, self._folder_id(e.name), s)
                elif (jsonl_ns := self._ns_of(e.name, "captures-", ".jsonl")) is not None:
                    st = e.stat(follow_symlinks=False)
                    found(st.st_mtime_ns, jsonl_ns, JSONL, st.st_size)
        order = np.lexsort((np.frombuffer(ns, np.int64), np.frombuffer(key, np.int64)))
        for column, values in ((self._ns, ns), (self._folder, fid), (self._size, size)):
            column.frombytes(np.frombuffer(values, values.typecode).take(order).tobytes())
        self.bytes += int(np.frombuffer(size, np.int64).sum())
        self._last_ns = max(self._last_ns, int(np.frombuffer(ns, np.int64).max(initial=0)))
        self._make_room(0)

    def _scan_folder(self, folder: Path) -> list[tuple[int, int]]:
        """(ns, bytes) of our images in one label folder; our stale temp files removed."""
        out = []
        with os.scandir(folder) as entries:
            for e in entries:
                if (n := self._ns_of(e.name, "", ".png")) is not None:
                    out.append((n, e.stat(follow_symlinks=False).st_size))
                elif e.name.startswith("." + self.prefix) and e.name.endswith(".tmp"):
                    with contextlib.suppress(OSError):
                        os.unlink(e.path)
        return out

    def _ns_of(self, name: str, before: str, suffix: str) -> int | None:
        head = before + self.prefix
        if name.startswith(head) and name.endswith(suffix):
            digits = name[len(head) : len(name) - len(suffix)]
            if digits.isascii() and digits.isdigit() and int(digits) < 1 << 63:
                return int(digits)
        return None


def write_all(fd: int, data: bytes) -> None:
    """os.write until all of `data` is written: a short write (a disk filling up, a file
    reaching RLIMIT_FSIZE) is followed by one that raises why."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError("write made no progress")
        view = view[n:]


def write_new(path: Path, data: bytes) -> None:
    """`data` as file `path` (0o600), whole or not at all: a hidden temp name, then a rename;
    on failure the temp file is removed and the error raised."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        try:
            write_all(fd, data)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
