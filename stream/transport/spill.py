"""Event chunks moved from memory to a file on the worker's local disk.

A receiver holds every event of an open scan until the scan closes. Past its memory budget
(``[memory] events_in_memory_mb``) it writes the oldest stored chunks to one
:class:`SpillFile` per scan and keeps a :class:`SpilledChunk` in their place, which reads the
chunk back (``load()``) when the scan file is written.

The arrays are written raw (no pickle, no compression): a spill must never slow the receiver
down, and page-cache writes of raw bytes run at several GB/s.

Examples
--------
>>> import tempfile
>>> from operators.chunk import Chunk
>>> chunk = Chunk.from_counts([0, 1], [0, 0], [0, 1], [2, 1], [5, 9, 3])
>>> spill = SpillFile(tempfile.gettempdir())
>>> spilled = spill.write(chunk)
>>> spilled.n_frames, spilled.n_events, spilled.nbytes      # bytes on disk: 26 n + 8 + 4 e
(2, 3, 72)
>>> spilled.load().indices.tolist()
[5, 9, 3]
"""

from __future__ import annotations

import os
import tempfile
import threading

import numpy as np

from operators.chunk import Chunk

# On-disk layout of one chunk: these arrays, in this order, back to back; lengths per chunk
# are n (frames), n + 1 (offsets) or e (events).
CHUNK_LAYOUT = (("frames", np.int64), ("sources", np.int16), ("positions", np.int64),
           ("offsets", np.int64), ("indices", np.uint32))
_FIX = "free space there, or set [memory] spill_dir to a writable local directory with room"


class SpillFile:
    """One append-only file of spilled chunks in ``directory`` (created if missing).

    The file is unlinked as soon as it is created: only the open descriptor keeps it, so
    nothing is left behind even if the worker dies, and its space is freed by ``close()`` or
    when the object (and every SpilledChunk referencing it) is garbage-collected. Only one
    thread may ``write``; any thread may load.

    Raises OSError naming the directory and the fix when the file cannot be created.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        self.fd = -1
        try:
            os.makedirs(self.directory, exist_ok=True)
            self.fd, path = tempfile.mkstemp(prefix="stemstream-spill-", dir=self.directory)
            os.unlink(path)
        except OSError as e:
            self.close()
            raise self._error("cannot create a spill file", e) from e
        self.size = 0  # bytes written so far; the next chunk goes here
        self._write_lock = threading.Lock()

    def _error(self, what: str, e: OSError) -> OSError:
        return OSError(e.errno, f"{what} in {self.directory}: {e.strerror or e}; {_FIX}")

    def write(self, chunk: Chunk) -> SpilledChunk:
        """Append the chunk's five arrays; returns the handle that reads them back.

        Raises OSError (disk full, I/O error) naming the directory and the fix; the chunk is
        then not spilled and the caller keeps it."""
        arrays = [np.ascontiguousarray(getattr(chunk, name), dtype=dtype) for name, dtype in CHUNK_LAYOUT]
        with self._write_lock:
            offset = self.size
            try:
                for a in arrays:
                    pwrite_all(self.fd, a, offset)
                    offset += a.nbytes
            except OSError as e:
                # self.size unchanged: the next write overwrites the partial bytes
                raise self._error("cannot write spilled events", e) from e
            spilled = SpilledChunk(self, self.size, chunk.n_frames, chunk.n_events)
            self.size = offset
        return spilled

    def close(self) -> None:
        """Close the descriptor, freeing the disk space; chunks not loaded yet are lost."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self):
        self.close()

    def __repr__(self) -> str:
        return f"SpillFile({self.directory!r}, {self.size} bytes)"


class SpilledChunk:
    """A chunk written to a :class:`SpillFile`: ``load()`` reads it back (thread-safe).

    Pickles as the plain Chunk it holds, so a state sent to another worker carries the events
    rather than a descriptor that is only valid here.
    """

    __slots__ = ("file", "n_events", "n_frames", "offset")

    def __init__(self, file: SpillFile, offset: int, n_frames: int, n_events: int):
        self.file = file
        self.offset = offset  # bytes from the start of the file
        self.n_frames = n_frames
        self.n_events = n_events

    @property
    def nbytes(self) -> int:
        """Bytes on disk (as many as the loaded chunk holds in memory)."""
        return 26 * self.n_frames + 8 + 4 * self.n_events

    def load(self) -> Chunk:
        """The chunk as it was written: fresh, writable arrays."""
        n, offset = self.n_frames, self.offset
        arrays = []
        for (name, dtype), length in zip(CHUNK_LAYOUT, (n, n, n, n + 1, self.n_events)):
            a = np.empty(length, dtype=dtype)
            pread_all(self.file.fd, a, offset)  # pread: no shared file position, thread-safe
            offset += a.nbytes
            arrays.append(a)
        return Chunk(*arrays)

    def __reduce__(self):
        c = self.load()
        return Chunk, (c.frames, c.sources, c.positions, c.offsets, c.indices)

    def __repr__(self) -> str:
        return f"SpilledChunk({self.n_frames} frames, {self.n_events} events, at {self.offset})"


def pwrite_all(fd: int, a: np.ndarray, offset: int) -> None:
    """Write all of contiguous ``a`` at byte ``offset`` (pwrite may write less than asked)."""
    view = memoryview(a).cast("B")
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def pread_all(fd: int, a: np.ndarray, offset: int) -> None:
    """Fill contiguous ``a`` from byte ``offset``, reading straight into its buffer."""
    view = memoryview(a).cast("B")
    while len(view):
        n = os.preadv(fd, [view], offset)
        if n == 0:
            raise OSError(f"spill file ended early at byte {offset}: {len(view)} bytes missing")
        view, offset = view[n:], offset + n
