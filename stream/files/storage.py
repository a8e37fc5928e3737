"""One HDF5 file per scan: events (CSR), results, completeness, metadata, provenance.

The layout is documented in ``docs/FORMAT.md``. A file is written under a temporary name and
renamed only when everything is in it, so a file named ``<scan_id>.h5`` is never half-written;
its root attribute ``status`` says whether the scan itself was complete.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from isal import isal_zlib

FORMAT = "stemstream-scan"
FORMAT_VERSION = 1
EVENTS_CHUNK = 1 << 20  # events per HDF5 chunk (4 MiB of uint32)


class ScanFileError(ValueError):
    """A file that is not a readable stemstream scan file; the message names path and problem."""


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


def write_attrs(group: h5py.Group | h5py.Dataset, mapping: dict) -> None:
    """Plain values as attributes, nested maps as subgroups, anything else as JSON text (named
    in the ``json_keys`` attribute); values too large for an attribute become datasets."""
    json_keys = []
    for key, value in mapping.items():
        key = str(key)
        if isinstance(value, dict):
            write_attrs(group.require_group(key), value)
            continue
        v = _attr_value(value)
        if v is None:
            v = json.dumps(value, default=str)
            json_keys.append(key)
        if np.asarray(v).nbytes > MAX_ATTR_BYTES or (isinstance(v, str) and len(v) > MAX_ATTR_BYTES):
            if isinstance(group, h5py.Dataset):  # a dataset cannot hold datasets
                v = str(v)[:MAX_ATTR_BYTES] + " ... (truncated)"
                json_keys = [k for k in json_keys if k != key]
            else:
                group.create_dataset(key, data=v)
                continue
        group.attrs[key] = v
    if json_keys:
        group.attrs[JSON_KEYS] = np.asarray(json_keys, dtype=h5py.string_dtype())


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


def _deflate(buf, level: int) -> bytes:
    """A zlib stream of ``buf``, as HDF5's gzip filter stores it: ISA-L for levels 1-3 (its
    levels; 6-8x faster than zlib at the same size on event data), zlib above."""
    return isal_zlib.compress(buf, level) if level <= 3 else zlib.compress(buf, level)


def _shuffle_deflate(block: np.ndarray, level: int) -> bytes:
    """One HDF5 chunk through the shuffle then deflate filters, as the library would."""
    planes = block.reshape(-1).view(np.uint8).reshape(block.size, block.itemsize).T  # byte planes
    return _deflate(np.ascontiguousarray(planes), level)


def write_compressed(group: h5py.Group, name: str, data: np.ndarray, chunk_len: int,
                     level: int, threads: int | None = None) -> h5py.Dataset:
    """A dataset with the standard shuffle + gzip filters, chunked along its first axis
    (``chunk_len`` rows per chunk), the chunks compressed in parallel threads (the
    compressors release the GIL) and written directly: any HDF5 reader opens it."""
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

    with ThreadPoolExecutor(min(n_chunks, threads or os.cpu_count() or 1)) as pool:
        for i, payload in enumerate(pool.map(compress, range(n_chunks))):
            ds.id.write_direct_chunk((i * chunk_len,) + (0,) * (data.ndim - 1), payload)
    return ds


def _chunked(group: h5py.Group, name: str, shape, dtype, chunk_len: int, level: int) -> h5py.Dataset:
    chunks = (chunk_len,) + tuple(shape[1:])
    if level == 0:
        return group.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks)
    return group.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks,
                                compression="gzip", compression_opts=level, shuffle=True)


def _padded_chunk(block: np.ndarray, chunk_len: int, level: int) -> bytes:
    """One compressed HDF5 chunk of ``block``; a short one padded with zeros (HDF5 chunks are
    whole, the dataset's extent cuts them)."""
    if len(block) < chunk_len:
        block = np.concatenate([block, np.zeros((chunk_len - len(block),) + block.shape[1:], block.dtype)])
    return _shuffle_deflate(block, level)


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


def compress_block(indices: np.ndarray, start: int, n_events: int, level: int) -> EventBlock:
    """The whole chunks of events ``indices`` (uint32, at file position ``start`` of a file
    of ``n_events``), compressed in this process's threads; the rest raw."""
    indices = np.asarray(indices, np.uint32)
    L = events_chunk_len(n_events)
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
    says how many events there will be.
    """

    def __init__(self, path: str | Path, *, compression_level: int, offsets=None, copy_from=None,
                 **fields):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.partial")
        self.level = compression_level
        self.final: Path | None = None
        self.n_events = 0 if copy_from is not None else int(np.asarray(offsets)[-1])
        self.given = self.written = 0  # events appended; events in the file
        self._carry = np.zeros(0, np.uint32)  # appended, less than a chunk, not compressed yet
        self._file = h5py.File(self.tmp, "w")
        try:
            self._indices = _write_head(self._file, offsets, copy_from, compression_level, **fields)
        except BaseException:
            self.discard()
            raise

    def append(self, indices: np.ndarray) -> None:
        """The next events (uint32 flat pixel indices), in file order: whole HDF5 chunks are
        compressed and written now, the rest waits for the next events."""
        indices = np.asarray(indices, np.uint32)
        if self.given + len(indices) > self.n_events:
            raise ValueError(f"{self.tmp}: more events than the {self.n_events} the offsets announce")
        if not len(indices):
            return
        self.given += len(indices)
        if self.level == 0:
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
            if self.given + block.n_chunked > self.n_events:
                raise ValueError(f"{self.tmp}: more events than the {self.n_events} the offsets announce")
            self.given += block.n_chunked
            self._write_chunks(block)
        self.append(block.tail)

    def _write_chunks(self, block: EventBlock) -> None:
        L = self._indices.chunks[0] if block.chunks else 1
        for i, payload in enumerate(block.chunks):
            self._indices.id.write_direct_chunk((self.written + i * L,), payload)
        self.written += block.n_chunked

    def close(self) -> Path:
        """Check that every announced event came, then give the file its name (``path``, or
        ``<stem>-2.h5``, … : never overwrites) and return it."""
        try:
            if self.written != self.n_events:
                raise ValueError(f"{self.tmp}: {self.given} events written, the offsets announce "
                                 f"{self.n_events}; file not kept")
            self._file.close()
            with open(self.tmp, "rb+") as fh:  # on disk before it gets its final name
                os.fsync(fh.fileno())
            self.final = link_unique(self.tmp, self.path)
        finally:
            self.discard()
        try:  # and the name itself on disk
            fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass  # not every file system lets a directory be fsynced
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


def link_unique(tmp: Path, path: Path) -> Path:
    """Give ``tmp`` the name ``path`` (or stem-2, stem-3, …) without ever replacing a file:
    a hard link fails atomically if the name exists."""
    for n in range(1, 10_000):
        candidate = path if n == 1 else path.with_name(f"{path.stem}-{n}{path.suffix}")
        try:
            os.link(tmp, candidate)
            return candidate
        except FileExistsError:
            continue
        except OSError:  # no hard links here: check, then rename (a small race)
            if not candidate.exists():
                os.replace(tmp, candidate)
                return candidate
    raise FileExistsError(f"{path}: 10,000 files of this name exist already")


def _write_head(f: h5py.File, offsets, copy_from, level, *, scan_id, status, reason, geometry,
                metadata, results, provenance, completeness=None, completeness_summary=None,
                counting=None):
    """Everything of a scan file but the event indices; returns the (empty) indices dataset.
    copy_from: a scan file whose /events and /completeness are copied as they are (raw
    compressed chunks, nothing decoded) instead of ``offsets``/``completeness`` (and its
    ``/counting``). counting: (attributes, arrays) of the ``/counting`` group, for a scan
    counted from raw frames."""
    f.attrs.update(format=FORMAT, format_version=FORMAT_VERSION, scan_id=scan_id,
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
        ev = f.create_group("events")
        ev.attrs.update(layout="csr", sorted_within_frame=True, n_events=n,
                        frame_shape=geometry["frame_shape"], scan_shape=geometry["scan_shape"],
                        frames_per_position=geometry["frames_per_position"])
        write_compressed(ev, "offsets", offsets, 1 << 18, level)
        indices = ev.create_dataset("indices", data=np.zeros(0, np.uint32)) if n == 0 else \
            _chunked(ev, "indices", (n,), np.uint32, events_chunk_len(n), level)
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


def _write_results(g: h5py.Group, items: dict, level: int) -> None:
    """Result arrays; numeric ones of 64 kB or more compressed like the events, about
    1 MB per chunk (images and the summed pattern shrink 4x, tables stay as they are)."""
    for name, res in items.items():
        data = np.asarray(res.data)
        if data.ndim and data.nbytes >= 1 << 16 and data.dtype.kind in "biuf":
            rows = max(1, (1 << 20) // max(1, data[0].nbytes))
            d = write_compressed(g, name, data, rows, level)
        else:
            d = g.create_dataset(name, data=data)
        d.attrs.update(kind=res.kind, unit=res.unit, description=res.description)
        write_attrs(d, res.attrs)


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
