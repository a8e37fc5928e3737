"""One HDF5 file per scan: events (CSR), results, completeness, metadata, provenance.

The layout is documented in ``docs/FORMAT.md``. A file is written under a temporary name and
renamed only when everything is in it, so a file named ``<scan_id>.h5`` is never half-written;
its root attribute ``status`` says whether the scan itself was complete.

A file may be built in a local *staging* directory and then published into its directory
with plain file operations (a hard link on the same file system, else a copy): HDF5 does not
survive a failed write (after ENOSPC the library can crash the process on the next file), so
an output that is full, read-only or gone fails in ``publish`` with an OSError and the
finished file waits in staging until it can be published.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from stream.files.chunk_codec import shuffle_deflate

FORMAT = "stemstream-scan"
FORMAT_VERSION = 1
EVENTS_CHUNK = 1 << 20  # events per HDF5 chunk (4 MiB of uint32)


class ScanFileError(ValueError):
    """A file that is not a readable stemstream scan file; the message names path and problem."""


class PublishError(OSError):
    """A scan file that cannot be written where it should go (read-only, full, gone); the
    message names the path, the system's reason and the fix. ``errno`` as the OSError's."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def publish_error(e: OSError, path: Path, what: str = "cannot write") -> PublishError:
    fix = {errno.ENOSPC: "free space there", errno.EDQUOT: "free space there (quota)",
           errno.EROFS: "make it writable", errno.EACCES: "make it writable for this user",
           errno.EPERM: "make it writable for this user"}.get(e.errno, "check the file system")
    return PublishError(e.errno, f"{what} {path}: {e.strerror or e}; {fix}")


def check_space(directory: Path, needed: int) -> None:
    """PublishError (ENOSPC) unless ``directory`` has ``needed`` bytes free."""
    try:
        st = os.statvfs(directory)
    except OSError as e:
        raise publish_error(e, directory, "cannot use") from None
    free = st.f_bavail * st.f_frsize
    if free < needed:
        raise PublishError(errno.ENOSPC, f"cannot write in {directory}: {free / 1e6:.1f} MB free, the "
                                        f"scan file needs up to {needed / 1e6:.1f} MB; free space there")


def publish(staged: Path, path: Path) -> Path:
    """Give the finished file ``staged`` its name in ``path``'s directory (``path``, or
    stem-2, …: never overwrites) and return it: a hard link on the same file system, else a
    copy under a temporary name, synced, then linked. ``staged`` stays where it is. Raises
    PublishError, leaving nothing behind in the target directory."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            final = link_unique(staged, path, rename=False)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
            partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
            try:
                shutil.copyfile(staged, partial)
                with open(partial, "rb+") as fh:
                    os.fsync(fh.fileno())
                final = link_unique(partial, path)
            finally:
                partial.unlink(missing_ok=True)
    except PublishError:
        raise
    except OSError as e:
        raise publish_error(e, path) from None
    _sync_dir(path.parent)
    return final


def move_into(src: str | Path, directory: str | Path) -> Path:
    """Move a finished scan file into ``directory`` (never overwriting: stem-2, … if its
    name is taken) and return its new path; PublishError leaves it where it was."""
    src = Path(src)
    final = publish(src, Path(directory) / src.name)
    src.unlink(missing_ok=True)
    return final


def _sync_dir(directory: Path) -> None:
    try:  # the name itself on disk
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # not every file system lets a directory be fsynced


class OutputError(ValueError):
    """An output that cannot be written where the user asked; the message names it and the fix."""


def output_dir(path, option: str = "--out") -> Path:
    """The directory ``path``, created if needed; OutputError naming ``option`` when it is a
    file or cannot be created or written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{option} {path} is a file, not a directory; give a directory (it is created "
                          "if needed)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".stemstream-write-test-{uuid.uuid4().hex[:8]}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise OutputError(f"{option} {path} cannot be written: {os.strerror(e.errno) if e.errno else e}; "
                          "choose a directory you can write to") from None
    return path


def cannot_write(path, e: OSError) -> OutputError:
    """The one-line error for a failed write of ``path`` (not of its temporary name)."""
    why = os.strerror(e.errno) if e.errno else (e.strerror or str(e) or type(e).__name__)
    if isinstance(e, PermissionError) or e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "choose a directory you can write to"
    elif e.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some space or choose another disk"
    else:
        fix = "check the path"
    return OutputError(f"cannot write {path}: {why}; {fix}")


def _attr_value(v):
    """A value HDF5 can hold as an attribute, or None (then the caller stores JSON)."""
    if isinstance(v, (bool, np.bool_)):
        return np.bool_(v)
    if isinstance(v, (int, float, np.integer, np.floating, str)):
        return v
    if isinstance(v, (list, tuple)) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        return np.asarray(v)
    if isinstance(v, (list, tuple)) and v and all(isinstance(x, str) for x in v):
        return np.asarray(v, dtype=h5py.string_dtype())
    return None


MAX_ATTR_BYTES = 16_000  # HDF5 keeps attributes in a 64 KiB header; larger values are datasets
JSON_KEYS = "json_keys"  # attribute listing the attributes of a group stored as JSON text


class JSONText(str):
    """A value already serialised as JSON: ``write_attrs`` stores it as one JSON attribute
    (a nested map that would otherwise become many subgroups and attributes)."""


def write_attrs(group: h5py.Group | h5py.Dataset, mapping: dict) -> None:
    """Plain values as attributes, nested maps as subgroups, ``JSONText`` and anything else as
    JSON text (named in the ``json_keys`` attribute); values too large for an attribute become
    datasets."""
    json_keys = []
    for key, value in mapping.items():
        key = str(key)
        if isinstance(value, dict):
            write_attrs(group.require_group(key), value)
            continue
        v = str(value) if isinstance(value, JSONText) else _attr_value(value)
        if isinstance(value, JSONText):
            json_keys.append(key)
        elif v is None:
            v = json.dumps(value, default=str)
            json_keys.append(key)
        if np.asarray(v).nbytes > MAX_ATTR_BYTES or (isinstance(v, str) and len(v) > MAX_ATTR_BYTES):
            if isinstance(group, h5py.Dataset):  # a dataset cannot hold datasets
                v = str(v)[:MAX_ATTR_BYTES] + " ... (truncated)"
                json_keys = [k for k in json_keys if k != key]
            else:
                group.create_dataset(key, data=v)
                continue
        put_attr(group, key, v)
    if json_keys:
        put_attr(group, JSON_KEYS, np.asarray(json_keys, dtype=h5py.string_dtype()))


_HTYPES: dict = {}  # numpy dtype -> (HDF5 file type, memory type): made once per process
_STR = h5py.string_dtype()
_SCALAR = h5py.h5s.create(h5py.h5s.SCALAR)  # one dataspace for every scalar attribute (read only)


def put_attr(obj, name: str, value) -> None:
    """``obj.attrs[name] = value`` for a new attribute, two to three times as fast as h5py's
    (which checks for an existing one and builds the HDF5 types and dataspace every time):
    a scan file has some 170 attributes, the largest cost of writing a small scan. Same
    stored types."""
    data = np.array(value, dtype=_STR) if isinstance(value, str) else np.asarray(value)
    if data.dtype.kind in "OUSV" and not isinstance(value, str) and data.dtype != _STR:
        obj.attrs[name] = value  # anything unusual: h5py's own way
        return
    key = (data.dtype.str, repr(data.dtype.metadata))
    types = _HTYPES.get(key)
    if types is None:
        types = _HTYPES[key] = (h5py.h5t.py_create(data.dtype, logical=True), h5py.h5t.py_create(data.dtype))
    space = h5py.h5s.create_simple(data.shape) if data.shape else _SCALAR
    attr = h5py.h5a.create(obj.id, name.encode(), types[0], space)
    try:
        attr.write(np.ascontiguousarray(data), mtype=types[1])
    finally:
        attr.close()


def put_attrs(obj, **values) -> None:
    for name, value in values.items():
        put_attr(obj, name, value)


def _plain(value):
    if isinstance(value, bytes):
        return value.decode()
    return value.tolist() if isinstance(value, np.ndarray) else \
        (value.item() if isinstance(value, np.generic) else value)


def read_attrs(group: h5py.Group) -> dict:
    """The inverse of write_attrs: attributes, subgroups and datasets as plain values."""
    json_keys = set(_plain(group.attrs.get(JSON_KEYS, [])))
    out = {}
    for key, value in group.attrs.items():
        if key == JSON_KEYS:
            continue
        out[key] = json.loads(value) if key in json_keys else _plain(value)
    for key, sub in group.items():
        if isinstance(sub, h5py.Group):
            out[key] = read_attrs(sub)
        elif isinstance(group, h5py.Group) and key not in out:  # a value too large for an attribute
            out[key] = _plain(sub[()]) if sub.size <= 100_000 else f"<dataset {sub.shape} {sub.dtype}>"
    return out


def write_compressed(group: h5py.Group, name: str, data: np.ndarray, chunk_len: int,
                     level: int, threads: int | None = None) -> h5py.Dataset:
    """A dataset with the standard shuffle + gzip filters, chunked along its first axis
    (``chunk_len`` rows per chunk), the chunks compressed in parallel threads (the
    compressors release the GIL; ``threads`` = 1: in this one) and written directly: any
    HDF5 reader opens it."""
    data = np.ascontiguousarray(data)
    if data.ndim == 0 or data.size == 0:  # HDF5 refuses chunks for empty or scalar datasets
        return group.create_dataset(name, data=data)
    chunk_len = min(len(data), chunk_len)
    ds = _chunked(group, name, data.shape, data.dtype, chunk_len, level)
    if level == 0:
        ds[...] = data
        return ds
    n_chunks = -(-len(data) // chunk_len)

    def compress(i):
        return _padded_chunk(data[i * chunk_len:(i + 1) * chunk_len], chunk_len, level)

    # one chunk: here; more: this process's compression threads (starting threads per call
    # cost more than compressing a small scan's images)
    payloads = map(compress, range(n_chunks)) if n_chunks == 1 or threads == 1 else \
        _deflate_pool().map(compress, range(n_chunks))
    for i, payload in enumerate(payloads):
        ds.id.write_direct_chunk((i * chunk_len,) + (0,) * (data.ndim - 1), payload)
    return ds


def _chunked(group: h5py.Group, name: str, shape, dtype, chunk_len: int, level: int,
             maxshape=None) -> h5py.Dataset:
    chunks = (chunk_len,) + tuple(shape[1:])
    if level == 0:
        return group.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks, maxshape=maxshape)
    return group.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks, maxshape=maxshape,
                                compression="gzip", compression_opts=level, shuffle=True)


def _padded_chunk(block: np.ndarray, chunk_len: int, level: int) -> bytes:
    """One compressed HDF5 chunk of ``block``; a short one padded with zeros (HDF5 chunks are
    whole, the dataset's extent cuts them)."""
    if len(block) < chunk_len:
        block = np.concatenate([block, np.zeros((chunk_len - len(block),) + block.shape[1:], block.dtype)])
    return shuffle_deflate(block, level)


def events_chunk_len(n_events: int) -> int:
    """Events per HDF5 chunk of ``/events/indices`` in a file of ``n_events`` events."""
    return max(1, min(int(n_events), EVENTS_CHUNK))


@dataclass
class EventBlock:
    """Events ``[start, start + n)`` of a scan file, cut on the file's chunk grid so that
    any worker can compress them: ``head`` raw up to the first chunk boundary, ``chunks``
    the whole chunks after it compressed (``n_chunked`` events), ``tail`` raw after the last
    boundary. Made by :func:`compress_block`, written by :meth:`ScanWriter.put_block`."""

    start: int
    head: np.ndarray
    chunks: list
    n_chunked: int
    tail: np.ndarray


_POOL: list[ThreadPoolExecutor] = []
_POOL_LOCK = threading.Lock()


def _deflate_pool() -> ThreadPoolExecutor:
    """This process's compression threads, made once even when two blocks start together."""
    with _POOL_LOCK:
        if not _POOL:
            _POOL.append(ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="stemstream-deflate"))
        return _POOL[0]


def compress_block(indices: np.ndarray, start: int, n_events: int | None, level: int) -> EventBlock:
    """The whole chunks of events ``indices`` (uint32, at file position ``start`` of a file
    of ``n_events``), compressed in this process's threads; the rest raw. ``n_events`` None:
    not known yet (a file written while its scan runs, chunks of ``EVENTS_CHUNK``): the
    events after the last whole chunk stay raw."""
    indices = np.asarray(indices, np.uint32)
    L = EVENTS_CHUNK if n_events is None else events_chunk_len(n_events)
    end = start + len(indices)
    c0 = -(-start // L) * L
    c1 = end if end == n_events else end // L * L  # the short last chunk is whole too
    if level == 0 or c0 >= c1:
        return EventBlock(start, indices, [], 0, indices[:0])
    body = indices[c0 - start:c1 - start]
    chunks = list(_deflate_pool().map(lambda a: _padded_chunk(body[a:a + L], L, level), range(0, len(body), L)))
    return EventBlock(start, indices[:c0 - start].copy(), chunks, len(body), indices[c1 - start:].copy())


def write_scan(path: str | Path, **fields) -> Path:
    """Write a scan file atomically and return its path: ``path``, or ``<stem>-2.h5``, … if
    a file of that name exists already (a scan id used twice never overwrites a scan).

    fields: scan_id, status, reason, geometry and metadata (plain maps), results and
    completeness (name → operators.base.Result), offsets (n_frames + 1,) and indices
    (uint32): the events in CSR layout, frames in order position·fpp + k;
    completeness_summary and provenance (plain maps), compression_level; or copy_from: a
    scan file whose events and completeness are copied unchanged. A scan too large to hold
    whole is written with :class:`ScanWriter` instead.
    """
    indices = fields.pop("indices", None)
    with ScanWriter(path, **fields) as w:
        if indices is not None:
            w.append(indices)
    return w.final


class ScanWriter:
    """A scan file written in steps, so that the events never need to be in memory at once:
    everything but the event indices when it is created, the indices block by block in
    stored-frame order (``append``), its final name when the ``with`` block ends (or
    ``close()``); on an exception nothing is left behind.

    Takes the fields of :func:`write_scan` without ``indices``: ``offsets`` (n_frames + 1,)
    says how many events there will be. ``staging``: a local directory to build the file in
    (checked for room first); ``close()`` then publishes it (``publish``) and, if that fails
    (PublishError), keeps it in ``self.tmp`` for ``publish`` to try again.

    ``growing=True`` (and no other field): a file whose events are appended while its scan
    runs, their number unknown (chunks of ``EVENTS_CHUNK``; the scan must end with at least
    that many events); ``finish_head`` then writes everything else, and the rest of the
    events follow as usual. The result is the same, dataset for dataset, as a file written
    at once from the same events.
    """

    def __init__(self, path: str | Path, *, compression_level: int, offsets=None, copy_from=None,
                 staging: str | Path | None = None, growing: bool = False, **fields):
        self.path = Path(path)
        self.staging = Path(staging) if staging else None
        where = self.staging or self.path.parent
        try:
            where.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise publish_error(e, where, "cannot create") from None
        if self.staging is not None:
            check_space(where, _upper_bound(offsets, fields))
        self.tmp = where / f".{self.path.name}.{uuid.uuid4().hex[:8]}.partial"
        self.level = compression_level
        self.final: Path | None = None
        self.n_events = None if growing else 0 if copy_from is not None else int(np.asarray(offsets)[-1])
        self.given = self.written = 0  # events appended; events in the file
        self._carry = np.zeros(0, np.uint32)  # appended, less than a chunk, not compressed yet
        try:
            self._file = h5py.File(self.tmp, "w")
        except OSError as e:
            raise publish_error(e, self.tmp) from None
        try:
            self._indices = _growing_indices(self._file, compression_level) if growing else \
                _write_head(self._file, offsets, copy_from, compression_level, **fields)
        except BaseException:
            self.discard()
            raise

    def finish_head(self, *, offsets, **fields) -> None:
        """A ``growing`` file: everything but the events still to come (the fields of
        ``write_scan``); from now on ``offsets`` says how many events there are."""
        n = int(np.asarray(offsets)[-1])
        if self.n_events is not None:
            raise ValueError(f"{self.tmp}: its head is written already")
        if n < max(self.given, EVENTS_CHUNK):
            raise ValueError(f"{self.tmp}: {n} events in the scan, {self.given} appended already "
                             f"(a growing file needs at least {EVENTS_CHUNK})")
        if self.staging is not None:
            check_space(self.staging, _upper_bound(offsets, fields) - 4 * self.given)
        self.n_events = n
        _write_head(self._file, offsets, None, self.level, grown=self._indices, **fields)

    def _room(self, end: int) -> None:
        """A growing file's indices long enough for events ``[0, end)``."""
        if self._indices.shape[0] < end:
            self._indices.resize((end,))

    def append(self, indices: np.ndarray) -> None:
        """The next events (uint32 flat pixel indices), in file order: whole HDF5 chunks are
        compressed and written now, the rest waits for the next events."""
        indices = np.asarray(indices, np.uint32)
        if self.n_events is not None and self.given + len(indices) > self.n_events:
            raise ValueError(f"{self.tmp}: more events than the {self.n_events} the offsets announce")
        if not len(indices):
            return
        self.given += len(indices)
        if self.level == 0:
            self._room(self.given)
            self._indices[self.given - len(indices):self.given] = indices
            self.written = self.given
            return
        data = np.concatenate([self._carry, indices]) if len(self._carry) else indices
        block = compress_block(data, self.written, self.n_events, self.level)  # on a boundary
        self._write_chunks(block)
        self._carry = np.concatenate([block.head, block.tail])  # one of them is empty

    def put_block(self, block: EventBlock) -> None:
        """The next events as :func:`compress_block` cut them (compressed elsewhere)."""
        if block.start != self.given:
            raise ValueError(f"{self.tmp}: a block of events from {block.start} where {self.given} is next")
        self.append(block.head)  # completes the chunk before the compressed ones
        if block.chunks:
            if len(self._carry) or self.written != self.given:
                raise ValueError(f"{self.tmp}: compressed chunks at {self.given}, not a chunk boundary")
            if self.n_events is not None and self.given + block.n_chunked > self.n_events:
                raise ValueError(f"{self.tmp}: more events than the {self.n_events} the offsets announce")
            self.given += block.n_chunked
            self._write_chunks(block)
        self.append(block.tail)

    def _write_chunks(self, block: EventBlock) -> None:
        L = self._indices.chunks[0] if block.chunks else 1
        if block.chunks:
            self._room(min(self.written + len(block.chunks) * L, self.n_events or (1 << 62)))
        for i, payload in enumerate(block.chunks):
            self._indices.id.write_direct_chunk((self.written + i * L,), payload)
        self.written += block.n_chunked

    def sync(self) -> None:
        """What is written so far onto the disk (HDF5's buffers, then fsync): a file grown
        while its scan runs then has only its head and last blocks left to sync at ``close``."""
        self._file.flush()
        with open(self.tmp, "rb+") as fh:
            os.fsync(fh.fileno())

    def close(self) -> Path:
        """Check that every announced event came, then give the file its name (``path``, or
        ``<stem>-2.h5``, … : never overwrites) and return it. Built in staging, the file is
        published; if that fails (PublishError) it stays in ``self.tmp``, finished."""
        try:
            if self.written != self.n_events:
                raise ValueError(f"{self.tmp}: {self.given} events written, the offsets announce "
                                 f"{self.n_events}; file not kept")
            self._file.close()
            with open(self.tmp, "rb+") as fh:  # on disk before it gets its final name
                os.fsync(fh.fileno())
            if self.staging is None:
                self.final = link_unique(self.tmp, self.path)
        except BaseException:
            self.discard()
            raise
        if self.staging is None:
            self.discard()
            _sync_dir(self.path.parent)
            return self.final
        self.final = publish(self.tmp, self.path)  # PublishError: the finished file stays staged
        self.discard()
        return self.final

    def discard(self) -> None:
        """Forget the temporary file (after close, only the name stays)."""
        try:
            self._file.close()
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ScanWriter":
        return self

    def __exit__(self, kind, *_):
        if kind is None:
            self.close()
        else:
            self.discard()


def link_unique(tmp: Path, path: Path, rename: bool = True) -> Path:
    """Give ``tmp`` the name ``path`` (or stem-2, stem-3, …) without ever replacing a file:
    a hard link fails atomically if the name exists. ``rename``: where hard links are not
    possible, check then rename (a small race); else raise that OSError."""
    for n in range(1, 10_000):
        candidate = path if n == 1 else path.with_name(f"{path.stem}-{n}{path.suffix}")
        try:
            os.link(tmp, candidate)
            return candidate
        except FileExistsError:
            continue
        except OSError:  # no hard links here: check, then rename (a small race)
            if not rename:
                raise
            if not candidate.exists():
                os.replace(tmp, candidate)
                return candidate
    raise FileExistsError(f"{path}: 10,000 files of this name exist already")


def _upper_bound(offsets, fields: dict) -> int:
    """Bytes a scan file can take at most: its events and arrays uncompressed, plus 1 MB."""
    n = 0
    if offsets is not None:
        offsets = np.asarray(offsets)
        n += 4 * int(offsets[-1]) + 8 * len(offsets)
    for group in ("results", "completeness"):
        n += sum(np.asarray(r.data).nbytes for r in (fields.get(group) or {}).values())
    return n + (1 << 20)


def _growing_indices(f: h5py.File, level: int) -> h5py.Dataset:
    """``/events/indices`` of a file whose number of events is not known yet: empty,
    extensible, chunked and filtered as ``_write_head`` makes it for a scan of at least
    ``EVENTS_CHUNK`` events."""
    return _chunked(f.create_group("events"), "indices", (0,), np.uint32, EVENTS_CHUNK, level,
                    maxshape=(None,))


def _write_head(f: h5py.File, offsets, copy_from, level, *, scan_id, status, reason, geometry,
                metadata, results, provenance, completeness=None, completeness_summary=None,
                counting=None, grown=None):
    """Everything of a scan file but the event indices; returns the (empty) indices dataset.
    copy_from: a scan file whose /events and /completeness are copied as they are (raw
    compressed chunks, nothing decoded) instead of ``offsets``/``completeness`` (and its
    ``/counting``). counting: (attributes, arrays) of the ``/counting`` group, for a scan
    counted from raw frames. grown: the ``_growing_indices`` already written into (then
    sized to the scan's events). ``/events/indices`` is extensible (maxshape None) either
    way, so that both kinds of file are the same."""
    put_attrs(f, format=FORMAT, format_version=FORMAT_VERSION, scan_id=scan_id,
                   status=status, reason=reason)
    write_attrs(f.create_group("geometry"), geometry)
    write_attrs(f.create_group("metadata"), metadata)
    indices = None
    if copy_from is not None:
        with h5py.File(copy_from, "r") as src:
            for name in ("events", "completeness") + (("counting",) if "counting" in src else ()):
                src.copy(src[name], f, name)
    else:
        offsets = np.asarray(offsets, np.uint64)
        n = int(offsets[-1])
        ev = f.require_group("events")
        put_attrs(ev, layout="csr", sorted_within_frame=True, n_events=n,
                        frame_shape=geometry["frame_shape"], scan_shape=geometry["scan_shape"],
                        frames_per_position=geometry["frames_per_position"])
        write_compressed(ev, "offsets", offsets, 1 << 18, level)
        if grown is not None:
            indices = grown
            indices.resize((n,))
        else:
            indices = ev.create_dataset("indices", data=np.zeros(0, np.uint32)) if n == 0 else \
                _chunked(ev, "indices", (n,), np.uint32, events_chunk_len(n), level, maxshape=(None,))
    if counting is not None:
        attrs, arrays = counting
        g = f.create_group("counting")
        write_attrs(g, attrs)
        for name, data in arrays.items():
            g.create_dataset(name, data=data, compression="gzip" if level else None,
                             compression_opts=level or None)
    _write_results(f.create_group("results"), results, level)
    if copy_from is None:
        _write_results(f.create_group("completeness"), completeness, level)
        write_attrs(f["completeness"], completeness_summary)
    write_attrs(f.create_group("provenance"), provenance)
    return indices


INCOMPRESSIBLE = 0.75  # a result whose first chunk keeps more than this share is stored raw


def _incompressible(first: np.ndarray, level: int) -> bool:
    """Whether a floating-point array's first chunk ``first`` keeps more than
    ``INCOMPRESSIBLE`` of its size through shuffle + deflate (integers always compress)."""
    if first.dtype.kind != "f":
        return False
    first = np.ascontiguousarray(first)
    return len(shuffle_deflate(first, level)) > INCOMPRESSIBLE * first.nbytes


def _write_results(g: h5py.Group, items: dict, level: int) -> None:
    """Result arrays; numeric ones of 64 kB or more compressed like the events, about
    1 MB per chunk (images and the summed pattern shrink 4x, tables stay as they are),
    unless their first chunk keeps more than ``INCOMPRESSIBLE`` of its size: the floating
    centre-of-mass images shrink by a fifth only, and compressing them took about 0.1 s of a
    1024² scan's end (BENCHMARKS.md)."""
    for name, res in items.items():
        data = np.asarray(res.data)
        if data.ndim and data.nbytes >= 1 << 16 and data.dtype.kind in "biuf":
            rows = max(1, (1 << 20) // max(1, data[0].nbytes))
            raw = level and _incompressible(data[:rows], level)
            d = write_compressed(g, name, data, rows, 0 if raw else level)
        else:
            d = g.create_dataset(name, data=data)
        put_attrs(d, kind=res.kind, unit=res.unit, description=res.description)
        write_attrs(d, res.attrs)


def read_images(path: str | Path) -> tuple[dict, np.ndarray]:
    """A scan file's result arrays (name -> array) and ``/completeness/position_frames``."""
    with h5py.File(path, "r") as f:
        results = {name: d[()] for name, d in f["results"].items() if isinstance(d, h5py.Dataset)}
        return results, f["completeness/position_frames"][()]


def open_scan(path: str | Path) -> h5py.File:
    """Open a scan file for reading; ScanFileError with the path and the reason otherwise."""
    path = Path(path)
    if path.is_dir():
        raise ScanFileError(f"{path}: is a directory; give a scan file such as {path}/SCAN_ID.h5")
    if not path.is_file():
        raise ScanFileError(f"{path}: no such file")
    try:
        f = h5py.File(path, "r")
    except BlockingIOError:
        raise ScanFileError(f"{path}: in use: another program is writing into it (HDF5 file lock); "
                            "try again when it has finished") from None
    except OSError as e:
        raise ScanFileError(f"{path}: not an HDF5 file ({e})") from None
    fmt = f.attrs.get("format")
    if fmt != FORMAT:
        truth = "stemstream-emulator-truth" in [fmt] + [g.attrs.get("format") for g in f.values()
                                                     if isinstance(g, h5py.Group)]
        stempy = fmt is None and "electron_events" in f
        f.close()
        hint = " (it is the emulator's ground truth)" if truth else \
            (f" (it is a stempy sparse file: 'stemstream import-stempy {path} SCAN.h5' converts it; replay, "
             "process-file and export read it as it is)") if stempy else \
            " (it is a tilt-series file of 'stemstream tomo'; docs/SERIES.md)" if fmt == "stemstream-tomo" else ""
        raise ScanFileError(f"{path}: not a stemstream scan file{hint}: root attribute format is "
                            f"{fmt!r}, expected {FORMAT!r}")
    return f


def _datasets(group: h5py.Group) -> dict:
    """Shape, dtype and the kind/unit/description attributes of each dataset of ``group``
    (never the values: a description stays small whatever the scan's size)."""
    out = {}
    for name, d in group.items():
        if isinstance(d, h5py.Dataset):
            out[name] = {"shape": list(d.shape), "dtype": str(d.dtype),
                         **{k: _plain(v) for k, v in d.attrs.items() if k in ("kind", "unit", "description")}}
    return out


def _attrs(group: h5py.Group) -> dict:
    json_keys = set(_plain(group.attrs.get(JSON_KEYS, [])))
    return {k: json.loads(v) if k in json_keys else _plain(v) for k, v in group.attrs.items() if k != JSON_KEYS}


def describe_stages(f: h5py.File) -> dict:
    """Each stage that ran on the scan (``/stages/NAME``): status, headline, error, seconds,
    parameters, its scalar values, and its arrays and tables by shape (docs/STAGES.md)."""
    out = {}
    groups = sorted(f["stages"].items(), key=lambda kv: float(kv[1].attrs.get("finished", 0))) if "stages" in f else []
    for name, g in groups:  # in the order they ran
        a = _attrs(g)
        params = a.pop("params", "{}")
        try:
            params = json.loads(params) if isinstance(params, str) else params
        except ValueError:
            pass
        info = {k: a.pop(k) for k in ("status", "headline", "error", "seconds", "finished") if k in a}
        tables = {t.removeprefix("table_"): {"rows": max((d.shape[0] for d in sub.values() if d.ndim), default=0),
                                             "columns": list(sub)}
                  for t, sub in g.items() if isinstance(sub, h5py.Group) and t.startswith("table_")}
        out[name] = {**info, "params": params, "values": a, "arrays": _datasets(g), "tables": tables}
    return out


def describe(path: str | Path) -> dict:
    """Everything ``stemstream info`` shows, as plain values: the scan's attributes, geometry,
    metadata, provenance, results and completeness by shape, events, stages."""
    with open_scan(path) as f:
        out = {"path": str(path), **_attrs(f)}
        for key in ("geometry", "metadata", "provenance"):
            if key in f:
                out[key] = read_attrs(f[key])
        out["results"] = _datasets(f["results"])
        out["completeness"] = {**_attrs(f["completeness"]), **_datasets(f["completeness"])}
        ev = f["events"]
        out["events"] = {"n_frames": int(ev["offsets"].shape[0] - 1), "n_events": int(ev.attrs["n_events"]),
                         "stored_bytes": int(ev["indices"].id.get_storage_size()
                                             + ev["offsets"].id.get_storage_size())}
        out["stages"] = describe_stages(f)
        out["file_bytes"] = Path(path).stat().st_size
        if "counting" in f:  # its attributes; the dark and gain maps stay in the file
            out["counting"] = {k: _plain(v) for k, v in f["counting"].attrs.items()}
    return out
