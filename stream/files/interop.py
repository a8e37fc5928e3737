"""Export recorded scans to the formats other tools read, and import stempy files.

- stempy sparse v3 (``export_stempy``, ``import_stempy``): ``electron_events/frames``, one
  variable-length uint32 array per frame, positions × frames per position in raster order;
  ``electron_events/scan_positions`` 0..N-1 with attributes ``Nx`` (scan width), ``Ny`` (height);
  ``frames`` attributes ``Nx``, ``Ny`` = frame shape (stempy writes rows first); root attribute
  ``version`` = 3; a ``metadata`` group.
- LiberTEM raw CSR (``export_libertem_csr``): a TOML descriptor and three raw little-endian
  files (row pointers, pixel indices, counts); one row per frame, repeated pixels of a frame
  merged into one entry with its count.
- a dense block (``export_dense``): (Y1-Y0, X1-X0, h, w) counts for debugging.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
from numba import njit

from operators.completeness import Completeness
from operators.kernels import NJIT, sort_segments

from stream.files.recording import STEMPY_VERSION, Recording, open_recording
from stream.files.storage import OutputError, ScanFileError, cannot_write, write_attrs, write_scan

MAX_DENSE_BYTES = 4 << 30


class ExportError(OutputError):
    """An export the user asked for that cannot be done; the message says why and what to do."""


def _new_path(path) -> Path:
    path = Path(path)
    if path.exists():
        raise ExportError(f"{path} exists already; remove it or choose another name (nothing is overwritten)")
    if not path.parent.is_dir():
        raise ExportError(f"{path.parent} is not a directory; create it first")
    return path


def _with_tmp(path: Path, write) -> Path:
    """Write through ``write(tmp_path)`` then rename: a file with the final name is complete.
    An unwritable place is an ExportError naming ``path`` (not its temporary name)."""
    tmp = path.with_name(f".{path.name}.partial")
    try:
        write(tmp)
        tmp.rename(path)
    except OSError as e:
        raise ExportError(str(cannot_write(path, e))) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------- stempy

def export_stempy(rec: Recording | str | Path, out) -> Path:
    """Write the scan as a stempy sparse file (version 3). Flyback frames are not included
    (they were never stored); metadata carries the geometry under ``stemstream``."""
    rec = rec if isinstance(rec, Recording) else open_recording(rec)
    out = _new_path(out)
    offsets, indices = rec.read()
    g = rec.geometry
    vlen = h5py.vlen_dtype(np.uint32)
    frames = np.empty(rec.n_stored, dtype=vlen)  # typed: equal-length frames stay one array each
    frames[:] = np.split(indices, offsets[1:-1])

    def write(tmp):
        with h5py.File(tmp, "w") as f:
            f.attrs["version"] = STEMPY_VERSION
            ee = f.create_group("electron_events")
            pos = ee.create_dataset("scan_positions", data=np.arange(g.n_positions, dtype=np.uint32))
            pos.attrs["Nx"], pos.attrs["Ny"] = g.scan_shape[1], g.scan_shape[0]
            ds = ee.create_dataset("frames", (rec.n_stored,), dtype=vlen)
            ds.attrs["Nx"], ds.attrs["Ny"] = g.frame_shape[0], g.frame_shape[1]
            ds.write_direct(frames)
            md = {k: v for k, v in rec.metadata.items() if k != "stemstream"}
            md["stemstream"] = {"scan_id": rec.scan_id, "source_file": str(rec.path), "flyback": 0,
                                "recorded_flyback": g.flyback, "frames_per_position": g.frames_per_position,
                                **{k: v for k, v in g.to_wire().items() if k not in ("sector", "flyback")}}
            write_attrs(f.create_group("metadata"), md)
    return _with_tmp(out, write)


def import_stempy(src, out, flyback: int | None = None, compression_level: int = 1) -> Path:
    """Convert a stempy sparse file (v3) into a stemstream scan file at ``out``. Events are
    sorted within each frame; every frame counts as received; /results is empty (run
    ``stemstream process-file`` on the new file for images)."""
    rec = open_recording(src, flyback)
    if rec.kind != "stempy":
        raise ExportError(f"{src} is a stemstream scan file already; nothing to import")
    out = _new_path(out)
    offsets, indices = rec.read()
    sort_segments(offsets, indices)
    g = rec.geometry
    comp = Completeness(1, g.scan_shape, g.frames_per_position, g.flyback)
    state = comp.new_state()
    comp.add_range(state, 0, 0, g.n_frames)
    completeness, summary = comp.report(state)
    try:
        written = write_scan(out, scan_id=rec.scan_id, status="complete",
                             reason=f"imported from the stempy file {Path(src).name}",
                             geometry=g.to_wire(), metadata=rec.metadata, results={}, offsets=offsets,
                             indices=indices, completeness=completeness,
                             completeness_summary={k: v for k, v in summary.items()
                                                   if not k.endswith(("_frames", "_ranges"))},
                             provenance={"software": "stemstream", "imported_from": str(Path(src).resolve())},
                             compression_level=compression_level)
    except OSError as e:
        raise ExportError(str(cannot_write(out, e))) from None
    if written != out:  # a file of that name appeared meanwhile: say where ours went
        raise ExportError(f"{out} appeared while importing; the scan was written to {written}")
    return written


# ---------------------------------------------------------------- LiberTEM

@njit(**NJIT)
def _merge_repeats(offsets, indices):
    """Per frame, sorted pixels → unique pixels with counts: (indptr, pixels, counts)."""
    n = offsets.shape[0] - 1
    indptr = np.zeros(n + 1, np.int64)
    pixels = np.empty(indices.shape[0], np.uint32)
    counts = np.zeros(indices.shape[0], np.uint16)
    j = 0
    for i in range(n):
        last = -1
        for e in range(offsets[i], offsets[i + 1]):
            p = np.int64(indices[e])
            if p == last and counts[j - 1] < 65535:
                counts[j - 1] += 1
            else:
                pixels[j] = indices[e]
                counts[j] = 1
                j += 1
                last = p
        indptr[i + 1] = j
    return indptr, pixels[:j], counts[:j]


def libertem_raw_files(toml) -> dict[str, Path]:
    """The raw files of a LiberTEM CSR dataset beside its descriptor ``toml``."""
    toml = Path(toml)
    return {k: toml.with_name(f"{toml.stem}.{k}.raw") for k in ("indptr", "indices", "values")}


def export_libertem_csr(rec: Recording | str | Path, out) -> Path:
    """Write LiberTEM's raw CSR dataset: ``out`` (a .toml descriptor) and beside it
    ``<stem>.indptr.raw`` (int64), ``<stem>.indices.raw`` (uint32), ``<stem>.values.raw``
    (uint16). nav_shape is (ny, nx), or (ny, nx, frames per position)."""
    rec = rec if isinstance(rec, Recording) else open_recording(rec)
    out = _new_path(out)
    if out.suffix != ".toml":
        raise ExportError(f"{out}: LiberTEM's CSR descriptor must be a .toml file, e.g. {out.with_suffix('.toml')}")
    names = libertem_raw_files(out)
    for p in names.values():
        _new_path(p)
    offsets, indices = rec.read()  # a fresh array: sorted in place
    sort_segments(offsets, indices)
    indptr, pixels, counts = _merge_repeats(offsets, indices)
    g = rec.geometry
    nav = list(g.scan_shape) + ([g.frames_per_position] if g.frames_per_position > 1 else [])
    try:
        for key, arr, dt in (("indptr", indptr, "<i8"), ("indices", pixels, "<u4"), ("values", counts, "<u2")):
            _with_tmp(names[key], lambda tmp, a=arr, d=dt: a.astype(d).tofile(tmp))
    except BaseException:  # no half dataset left behind
        for p in names.values():
            p.unlink(missing_ok=True)
        raise
    toml = (f'# LiberTEM raw CSR dataset exported by stemstream from {rec.path.name} (scan {rec.scan_id})\n'
            "[params]\n"
            'filetype = "raw_csr"\n'
            f"nav_shape = {nav}\n"
            f"sig_shape = {list(g.frame_shape)}\n\n"
            "[raw_csr]\n"
            f'indptr_file = "{names["indptr"].name}"\nindptr_dtype = "<i8"\n'
            f'indices_file = "{names["indices"].name}"\nindices_dtype = "<u4"\n'
            f'data_file = "{names["values"].name}"\ndata_dtype = "<u2"\n')
    return _with_tmp(out, lambda tmp: tmp.write_text(toml))


# ---------------------------------------------------------------- dense

def parse_region(text: str) -> tuple[int, int, int, int]:
    """'Y0:Y1,X0:X1' → (y0, y1, x0, x1)."""
    try:
        ys, xs = text.split(",")
        (y0, y1), (x0, x1) = (tuple(int(v) for v in part.split(":")) for part in (ys, xs))
    except ValueError:
        raise ExportError(f"--region {text!r} is not Y0:Y1,X0:X1 (scan rows and columns, "
                          "end exclusive), e.g. 0:16,0:16") from None
    return y0, y1, x0, x1


@njit(**NJIT)
def _dense_block(offsets, indices, first_stored, fpp, nx, y0, x0, out):
    """out[row - y0, col - x0, pixel] += 1 for each event of stored frames first_stored, …
    whose position falls inside out's rows and columns."""
    for j in range(offsets.shape[0] - 1):
        pos = (first_stored + j) // fpp
        r, c = pos // nx - y0, pos % nx - x0
        if 0 <= r < out.shape[0] and 0 <= c < out.shape[1]:
            for e in range(offsets[j], offsets[j + 1]):
                out[r, c, indices[e]] += 1


def export_dense(rec: Recording | str | Path, out, region: tuple[int, int, int, int]) -> Path:
    """Write counts of scan rows y0:y1, columns x0:x1 as a .npy of shape (y1-y0, x1-x0, h, w),
    uint16 (uint32 if a pixel counts more), frames of a position summed."""
    rec = rec if isinstance(rec, Recording) else open_recording(rec)
    out = _new_path(out)
    g = rec.geometry
    (ny, nx), (h, w), fpp = g.scan_shape, g.frame_shape, g.frames_per_position
    y0, y1, x0, x1 = region
    if not (0 <= y0 < y1 <= ny and 0 <= x0 < x1 <= nx):
        raise ExportError(f"--region {y0}:{y1},{x0}:{x1} is outside the {ny}x{nx} scan; rows 0..{ny}, "
                          f"columns 0..{nx}, end exclusive")
    nbytes = (y1 - y0) * (x1 - x0) * h * w * 4
    if nbytes > MAX_DENSE_BYTES:
        raise ExportError(f"--region {y0}:{y1},{x0}:{x1} would need {nbytes / 2**30:.1f} GiB dense; "
                          f"choose a smaller region (at most {MAX_DENSE_BYTES >> 30} GiB)")
    block = np.zeros((y1 - y0, x1 - x0, h * w), np.uint32)
    lo, hi = y0 * nx * fpp, y1 * nx * fpp  # whole rows; the kernel keeps the columns
    offsets, indices = rec.read(lo, hi)
    _dense_block(offsets, indices, lo, fpp, nx, y0, x0, block)
    block = block.reshape(y1 - y0, x1 - x0, h, w)
    if block.max(initial=0) <= np.iinfo(np.uint16).max:
        block = block.astype(np.uint16)
    def write(tmp):
        with open(tmp, "wb") as fh:  # a file object: np.save would add .npy to the temporary name
            np.save(fh, block, allow_pickle=False)
    return _with_tmp(out, write)


def export(src, fmt: str, out, region: str | None = None, flyback: int | None = None) -> Path:
    """Dispatch of ``stemstream export``."""
    rec = open_recording(src, flyback)
    if fmt == "npy":
        if region is None:
            raise ExportError("--format npy needs --region Y0:Y1,X0:X1 (a dense 4D block of the whole "
                              "scan rarely fits in memory)")
        return export_dense(rec, out, parse_region(region))
    if region is not None:
        raise ExportError(f"--region applies to --format npy only, not {fmt}")
    return {"stempy": export_stempy, "libertem-csr": export_libertem_csr}[fmt](rec, out)


__all__ = ["export", "export_stempy", "import_stempy", "export_libertem_csr", "export_dense", "libertem_raw_files",
           "ExportError", "ScanFileError"]
