"""One HDF5 file per scan: events (CSR), results, completeness, metadata, provenance.

The layout is documented in ``docs/FORMAT.md``. A file is written under a temporary name and
renamed only when everything is in it, so a file named ``<scan_id>.h5`` is never half-written;
its root attribute ``status`` says whether the scan itself was complete.
"""

from __future__ import annotations

import json
import os
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
from isal import isal_zlib

FORMAT = "stemstream-scan"
FORMAT_VERSION = 1
EVENTS_CHUNK = 1 << 20  # events per HDF5 chunk (4 MiB of uint32)


class ScanFileError(ValueError):
    """A file that is not a readable stemstream scan file; the message names path and problem."""


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
    chunks = (chunk_len,) + data.shape[1:]
    if level == 0:
        return group.create_dataset(name, data=data, chunks=chunks)
    ds = group.create_dataset(name, shape=data.shape, dtype=data.dtype, chunks=chunks,
                              compression="gzip", compression_opts=level, shuffle=True)
    n_chunks = -(-len(data) // chunk_len)

    def compress(i):
        block = data[i * chunk_len:(i + 1) * chunk_len]
        if len(block) < chunk_len:  # HDF5 chunks are whole, the extent cuts the last one
            block = np.concatenate([block, np.zeros((chunk_len - len(block),) + data.shape[1:], data.dtype)])
        return _shuffle_deflate(block, level)

    with ThreadPoolExecutor(min(n_chunks, threads or os.cpu_count() or 1)) as pool:
        for i, payload in enumerate(pool.map(compress, range(n_chunks))):
            ds.id.write_direct_chunk((i * chunk_len,) + (0,) * (data.ndim - 1), payload)
    return ds


def write_scan(path: str | Path, **fields) -> Path:
    """Write a scan file atomically and return its path: ``path``, or ``<stem>-2.h5``, … if
    a file of that name exists already (a scan id used twice never overwrites a scan).

    fields (keyword arguments of ``_write``): scan_id, status, reason, geometry and metadata
    (plain maps), results and completeness (name → operators.base.Result), offsets
    (n_frames + 1,) and indices (uint32): the events in CSR layout, frames in order
    position·fpp + k; completeness_summary and provenance (plain maps), compression_level;
    or copy_from: a scan file whose events and completeness are copied unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")  # one per writer
    try:
        _write(tmp, **fields)
        with open(tmp, "rb+") as fh:  # on disk before it gets its final name
            os.fsync(fh.fileno())
        final = link_unique(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    try:  # and the name itself on disk
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # not every file system lets a directory be fsynced
    return final


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


def _write(tmp: Path, *, scan_id, status, reason, geometry, metadata, results, provenance,
           compression_level, offsets=None, indices=None, completeness=None,
           completeness_summary=None, copy_from=None) -> None:
    """copy_from: a scan file whose /events and /completeness are copied as they are (raw
    compressed chunks, nothing decoded) instead of ``offsets``/``indices``/``completeness``."""
    with h5py.File(tmp, "w") as f:
        f.attrs.update(format=FORMAT, format_version=FORMAT_VERSION, scan_id=scan_id,
                       status=status, reason=reason)
        write_attrs(f.create_group("geometry"), geometry)
        write_attrs(f.create_group("metadata"), metadata)
        if copy_from is not None:
            with h5py.File(copy_from, "r") as src:
                for name in ("events", "completeness"):
                    src.copy(src[name], f, name)
        else:
            ev = f.create_group("events")
            ev.attrs.update(layout="csr", sorted_within_frame=True, n_events=len(indices),
                            frame_shape=geometry["frame_shape"], scan_shape=geometry["scan_shape"],
                            frames_per_position=geometry["frames_per_position"])
            write_compressed(ev, "offsets", np.asarray(offsets, np.uint64), 1 << 18, compression_level)
            write_compressed(ev, "indices", np.asarray(indices, np.uint32), EVENTS_CHUNK, compression_level)
        _write_results(f.create_group("results"), results, compression_level)
        if copy_from is None:
            _write_results(f.create_group("completeness"), completeness, compression_level)
            write_attrs(f["completeness"], completeness_summary)
        write_attrs(f.create_group("provenance"), provenance)


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
        f.close()
        hint = " (it is the emulator's ground truth)" if truth else ""
        raise ScanFileError(f"{path}: not a stemstream scan file{hint}: root attribute format is "
                            f"{fmt!r}, expected {FORMAT!r}")
    return f


def describe(path: str | Path) -> dict:
    """Everything ``stemstream info`` shows, as plain values."""
    with open_scan(path) as f:
        out = {"path": str(path), **read_attrs(f)}
        for key in ("results", "completeness"):
            out[key] = out.get(key, {})
            for name, d in f[key].items():
                out[key][name] = {"shape": list(d.shape), "dtype": str(d.dtype),
                                  **{k: (v.item() if isinstance(v, np.generic) else v)
                                     for k, v in d.attrs.items() if k in ("kind", "unit", "description")}}
        ev = f["events"]
        out["events"] = {"n_frames": int(ev["offsets"].shape[0] - 1), "n_events": int(ev.attrs["n_events"]),
                         "stored_bytes": int(ev["indices"].id.get_storage_size()
                                             + ev["offsets"].id.get_storage_size())}
        out["file_bytes"] = Path(path).stat().st_size
    return out
