"""A line-oriented file opened in bounded time and memory, whatever its size: an on-disk index.

Why: a manifest of the paper's 3 * 10^9 rows cannot be parsed, validated or even held as
Python objects when a run starts (measured before this module: 3.0 s and +467 MB per 10^6 rows,
i.e. hours and terabytes per rank). Instead one streaming pass records where each row starts
(``int64`` byte offsets, 8 bytes per row, written to disk as they are found), and every later
open memory-maps that file: opening is a ``stat`` and an ``mmap``, resident memory grows only
with the pages actually touched, and DataLoader workers share the pages. A row is read with one
``pread`` and parsed only when its sample is drawn.

The index lives in a cache folder (``$PREPRETRAIN_CACHE``, default ``~/.cache/prepretrain``),
named by the file's resolved path, size and modification time, so an edited manifest gets a
new index and a read-only dataset folder is never written to. Blank lines and ``#`` comment
lines are left out of the index.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

from prepretrain.files import atomic_path

INDEX_VERSION = "rows-v1"
CHUNK_BYTES = 16 << 20


def cache_root() -> Path:
    """Where derived files (row indexes, normalised CSV) are kept: ``$PREPRETRAIN_CACHE`` or
    ``~/.cache/prepretrain``; a temporary folder when neither can be created."""
    configured = os.environ.get("PREPRETRAIN_CACHE")
    root = Path(configured) if configured else Path.home() / ".cache" / "prepretrain"
    try:
        root.mkdir(parents=True, exist_ok=True)
        return root
    except OSError:
        fallback = Path(tempfile.gettempdir()) / "prepretrain-cache"
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback


def file_identity(path: Path, extra: str = "") -> str:
    """A name for what is derived from ``path`` as it is now: path, size, mtime, and a hash of
    its first and last MiB (a file rewritten within the filesystem's mtime granularity with the
    same size still gets a new name unless its ends are unchanged too)."""
    stat = path.stat()
    digest = hashlib.sha256(f"{INDEX_VERSION}|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{extra}".encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(1 << 20))
        if stat.st_size > 2 << 20:
            handle.seek(-(1 << 20), os.SEEK_END)
            digest.update(handle.read())
    return digest.hexdigest()[:20]


def build_row_offsets(path: Path, out: Path) -> int:
    """Write the byte offset of every non-blank, non-comment line of ``path`` to ``out`` (raw
    little-endian int64), streaming: memory is one chunk whatever the file size. Returns the count."""
    count = 0
    with open(path, "rb") as source, atomic_path(out) as tmp, open(tmp, "wb") as sink:
        position = 0
        pending = [0]  # a line that starts at the next byte read (the file's first, or after a chunk's last "\n")
        while True:
            chunk = source.read(CHUNK_BYTES)
            if not chunk:
                break
            data = np.frombuffer(chunk, dtype=np.uint8)
            starts = np.concatenate((np.asarray(pending, dtype=np.int64),
                                     np.flatnonzero(data == 10).astype(np.int64) + 1 + position))
            end = position + len(chunk)
            pending = [end] if len(starts) and starts[-1] == end else []
            starts = starts[starts < end]
            first = data[starts - position]
            keep = starts[(first != 10) & (first != 13) & (first != ord("#"))]
            keep.astype("<i8").tofile(sink)
            count += len(keep)
            position += len(chunk)
        sink.flush()
        os.fsync(sink.fileno())
    return count


class RowIndex:
    """Rows of a text file by number, through a memory-mapped offset index built once."""

    def __init__(self, path: str | os.PathLike, cache: Path | None = None):
        self.path = Path(path)
        index = (cache or cache_root() / "rows") / f"{file_identity(self.path)}.offsets"
        if not index.is_file():
            index.parent.mkdir(parents=True, exist_ok=True)
            build_row_offsets(self.path, index)
        self.index_path = index
        size = index.stat().st_size
        self.offsets = np.memmap(index, dtype="<i8", mode="r") if size else np.zeros(0, dtype=np.int64)
        self._fd: int | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.offsets)

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # a forked worker opens its own
            self._fd = os.open(self.path, os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def raw(self, index: int) -> bytes:
        """Row ``index`` without its line ending."""
        start = int(self.offsets[index])
        before = 1 if start else 0  # the byte before a row must end the previous line
        fd, size = self._descriptor(), 1024
        while True:
            data = os.pread(fd, size + before, start - before)
            if before and data[:1] != b"\n":
                raise RuntimeError(f"{self.path} changed after it was opened (row {index} no longer starts a "
                                   "line): open it again")
            data = data[before:]
            end = data.find(b"\n")
            if end >= 0:
                return data[:end].rstrip(b"\r")
            if len(data) < size:  # the last line, without a newline
                return data.rstrip(b"\r")
            size *= 4

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fd"], state["_pid"] = None, -1
        state["offsets"] = None  # re-mapped on the other side (spawned workers)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        size = self.index_path.stat().st_size
        self.offsets = np.memmap(self.index_path, dtype="<i8", mode="r") if size else np.zeros(0, dtype=np.int64)

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass
