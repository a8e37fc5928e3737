"""Event chunks handed to another worker process on the same host through shared memory.

While a scan runs, every early block (``session/early.py``) needs the parts of its frames that
the other workers' receivers hold. dask moves a task's result between workers over their
(TLS) connection: on two cores that cost the workers' event loops about 2.5 ns per byte, a
fifth of the cores at 300,000 frames/s (BENCHMARKS.md). Between processes of one host a file
in a memory file system (``[memory] handoff_dir``, ``/dev/shm``) does it for a memory copy:
the holder writes its parts there (:func:`put`) and dask moves only the small
:class:`Handoff` naming the file; the builder maps the file and unlinks it (``load``), so its
memory returns as soon as the block is built. At a scan's end a worker's closed state without
its events (its images, counts and completeness: tens of MB at 1024² positions) goes to the
writer the same way (:func:`put_object`: the object's pickle travels, its arrays stay in the
file).

:func:`offer` is what a worker calls: it files each handoff under a key (the scan, or the
writing of its file), falls back to the chunks themselves when the directory cannot take them
(warned once per directory), and :func:`release` removes the key's files nobody loaded (their
block was cancelled). A file whose worker died before that is removed by the next
:func:`sweep` on its host once it is ``STALE_S`` old (a block takes well under a second; one
that waited that long is written again at the scan's end anyway).

Examples
--------
>>> import tempfile
>>> from operators.chunk import Chunk
>>> chunk = Chunk.from_counts([0, 1], [0, 0], [0, 1], [2, 1], [5, 9, 3])
>>> h = put([chunk], tempfile.gettempdir())
>>> [c.indices.tolist() for c in h.load()]       # the file is gone after load
[[5, 9, 3]]
"""

from __future__ import annotations

import functools
import logging
import mmap
import os
import pickle
import re
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from distributed.comm import get_address_host

from operators.chunk import Chunk
from stream.transport.spill import CHUNK_LAYOUT, pwrite_all

log = logging.getLogger("stemstream.transport")
PREFIX = "stemstream-handoff-"
_NAME = re.compile(rf"{PREFIX}(\d+)-[0-9a-f]{{32}}$")
STALE_S = 60.0  # a holder's file not loaded by then belongs to a block that never ran
COUNTS = {"put": 0, "loaded": 0, "objects": 0}  # this process's handoffs: files, files loaded, of them objects
_lock = threading.Lock()


def _count(what: str) -> None:
    with _lock:
        COUNTS[what] += 1


@functools.cache
def host_id() -> str:
    """This host's identity for this boot: two processes that agree share its memory file
    systems (a container that shares the boot but not /dev/shm fails in ``load``, by name)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        import socket
        return socket.gethostname()


@dataclass(frozen=True)
class Handoff:
    """Chunks written to ``path`` on host ``host``: per chunk its frames and events."""

    path: str
    host: str
    sizes: tuple  # ((n_frames, n_events), ...)

    def load(self) -> list[Chunk]:
        """The chunks, views of the file mapped copy-on-write (no copy is made; writable, as
        the kernels are compiled for), which is unlinked at once.

        Raises RuntimeError naming the file and the reason (another host, or gone)."""
        mem = _mapped(self.path, self.host)
        chunks, offset = [], 0
        for n, e in self.sizes:
            arrays = []
            for (_, dtype), length in zip(CHUNK_LAYOUT, (n, n, n, n + 1, e)):
                offset = _aligned(offset)
                arrays.append(np.frombuffer(mem, dtype=dtype, count=length, offset=offset))
                offset += arrays[-1].nbytes
            chunks.append(Chunk(*arrays))
        _count("loaded")
        return chunks


@dataclass(frozen=True)
class HandedObject:
    """An object handed over through ``path`` on host ``host``: its pickle (protocol 5)
    travels here, the buffers of its arrays (``sizes``, bytes each) are in the file."""

    path: str
    host: str
    pickled: bytes
    sizes: tuple

    def load(self):
        """The object, its arrays views of the file mapped copy-on-write (writable, no copy),
        which is unlinked at once. Raises RuntimeError as :meth:`Handoff.load`."""
        mem = memoryview(_mapped(self.path, self.host))
        buffers, offset = [], 0
        for n in self.sizes:
            offset = _aligned(offset)
            buffers.append(mem[offset:offset + n])
            offset += n
        _count("loaded")
        _count("objects")
        # the pickle came over dask's connection, as every task's arguments do; the file
        # gives only the arrays' bytes
        return pickle.loads(self.pickled, buffers=buffers)


def _mapped(path: str, host: str):
    """The handoff file ``path`` of host ``host`` mapped copy-on-write, and unlinked."""
    if not _NAME.match(os.path.basename(path)):  # never unlink a file that is not one
        raise RuntimeError(f"{path} is not a handoff file ({PREFIX}PID-ID)")
    if host != host_id():
        raise RuntimeError(f"events handed off in {path} on another host; set [memory] "
                           "handoff_dir = \"\" where workers do not share a host's memory")
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise RuntimeError(f"events handed off in {path}: {e.strerror or e} (removed "
                           "as stale, or not visible from this process)") from None
    try:
        size = os.fstat(fd).st_size
        return mmap.mmap(fd, size, access=mmap.ACCESS_COPY) if size else bytearray()
    finally:
        os.close(fd)
        os.unlink(path)


def loaded(x):
    """``x`` itself, or the object a :class:`HandedObject` hands over."""
    return x.load() if isinstance(x, HandedObject) else x


def chunks_of(parts) -> list[Chunk]:
    """The chunks of workers' parts, each a list of chunks or a :class:`Handoff` (loaded)."""
    return [c for p in parts for c in (p.load() if isinstance(p, Handoff) else p)]


def put(chunks: list[Chunk], directory: str) -> Handoff:
    """Write ``chunks`` to a new file (mode 0600) in ``directory``; OSError (full, missing,
    read-only) leaves no file behind and the caller sends the chunks as they are."""
    arrays = [np.ascontiguousarray(getattr(c, name), dtype=dtype) for c in chunks for name, dtype in CHUNK_LAYOUT]
    path = _write(directory, arrays)
    return Handoff(path, host_id(), tuple((c.n_frames, c.n_events) for c in chunks))


def put_object(obj, directory: str) -> HandedObject:
    """Write the arrays of ``obj`` (as pickle protocol 5 lets them out of its pickle) to a
    new file (mode 0600) in ``directory``; OSError as :func:`put`."""
    buffers = []
    pickled = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    path = _write(directory, raws)
    return HandedObject(path, host_id(), pickled, tuple(r.nbytes for r in raws))


def _write(directory: str, buffers: list) -> str:
    """A new handoff file in ``directory`` holding ``buffers``, each from 8 bytes; its path."""
    path = os.path.join(directory, f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        offset = 0
        for b in buffers:
            offset = _aligned(offset)
            pwrite_all(fd, b, offset)
            offset += memoryview(b).nbytes
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)
    _count("put")
    return path


def _aligned(offset: int) -> int:
    """Every array starts on 8 bytes: the kernels are compiled for aligned arrays."""
    return -(-offset // 8) * 8


def sweep(directory: str, stale_s: float = STALE_S) -> int:
    """Remove the handoff files in ``directory`` older than ``stale_s``; returns how many."""
    removed, now = 0, time.time()
    try:
        names = [n for n in os.listdir(directory) if _NAME.match(n)]
    except OSError:
        return 0
    for name in names:
        path = os.path.join(directory, name)
        try:
            if now - os.stat(path).st_mtime >= stale_s:
                os.unlink(path)
                removed += 1
        except OSError:
            continue  # loaded meanwhile, or not ours to remove
    return removed


_filed: dict[str, list[str]] = {}  # key -> its handoff files (removed by release if not loaded)
_released: OrderedDict[str, None] = OrderedDict()  # keys released here (the latest 1024)
_failed: set[str] = set()  # directories already warned about
_next_sweep = [0.0]


def offer(chunks: list[Chunk], directory: str, key: str) -> Handoff | list[Chunk]:
    """``chunks`` handed over through ``directory`` (a Handoff), filed under ``key``; the
    chunks themselves if the directory cannot take them (logged once per directory) or
    ``key`` was released meanwhile (its block was cancelled)."""
    return _offer(put, chunks, directory, key)


def offer_object(obj, directory: str, key: str):
    """``obj`` handed over through ``directory`` (a HandedObject, :func:`loaded` on the
    other side), filed under ``key``; ``obj`` itself where :func:`offer` gives the chunks."""
    return _offer(put_object, obj, directory, key)


def _offer(write, what, directory: str, key: str):
    if time.monotonic() >= _next_sweep[0]:  # the files of workers that died
        _next_sweep[0] = time.monotonic() + 10.0
        sweep(directory)
    try:
        h = write(what, directory)
    except OSError as e:
        if directory not in _failed:
            _failed.add(directory)
            log.warning("events cannot be handed to the other workers through %s (%s); they go "
                        "over dask's connections (set [memory] handoff_dir to a memory file system "
                        "with room, or \"\" to stop trying)", directory, e.strerror or e)
        return what
    with _lock:
        if key not in _released:
            _filed.setdefault(key, []).append(h.path)
            return h
    os.unlink(h.path)
    return what


def release(key: str) -> None:
    """Remove the files offered under ``key`` that nobody loaded; later offers under it
    keep no file."""
    with _lock:
        _released[key] = None
        while len(_released) > 1024:
            _released.popitem(last=False)
        for path in _filed.pop(key, []):
            try:
                os.unlink(path)
            except FileNotFoundError:  # loaded: the builder unlinked it
                pass


def on_one_host(addresses) -> bool:
    """Whether the dask addresses (``tls://10.0.0.5:40123``) all name the same host."""
    return len({get_address_host(a) for a in addresses}) <= 1
