"""Recorded scans as one thing to read: stemstream scan files and stempy sparse files (v3).

``open_recording(path)`` detects the format, checks the file's structure (cheap: attributes,
shapes, the last offset) and returns a :class:`Recording`; ``Recording.read(lo, hi)`` gives the
events of stored frames ``lo:hi`` in CSR form and checks them (offsets that never decrease,
pixels inside the detector). Every problem raises :class:`ScanFileError` naming the path, what
is wrong and what was expected — nothing is replayed or processed from a file that fails.

Stored frame *i* = position · frames_per_position + k, position = row · nx + column, flyback
frames excluded (``docs/FORMAT.md``). stempy files number frames the same way over their whole
raster; with ``flyback=N`` the last N columns of every row are the 4D Camera's flyback frames
and are dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
from numba import njit

from stream.transport.protocol import Geometry, ProtocolError
from stream.files.storage import FORMAT, ScanFileError, read_attrs

STEMPY_VERSION = 3


@dataclass
class Recording:
    """A recorded scan. ``geometry`` is the whole detector's, with the recording's n_sources.

    received: (n_sources, n_frames) uint16 arrivals of each (source, raster frame) part as the
        live session saw them (stemstream files opened ``with_received``), else None.
    frames_sent: per source, as the sources announced at the end of the live scan (or None).
    """

    path: Path
    kind: str  # "stemstream" | "stempy"
    scan_id: str
    geometry: Geometry
    metadata: dict
    n_events: int
    received: np.ndarray | None = None
    frames_sent: dict | None = None
    provenance: dict = field(default_factory=dict)

    @property
    def n_stored(self) -> int:
        """Stored frames: positions × frames per position (flyback excluded)."""
        return self.geometry.n_positions * self.geometry.frames_per_position

    def raster_frames(self, stored: np.ndarray) -> np.ndarray:
        """Raster frame number (flyback included, as on the wire) of stored frames ``stored``."""
        g = self.geometry
        fpp, nx, fb = g.frames_per_position, g.scan_shape[1], g.flyback
        pos, k = np.divmod(np.asarray(stored, np.int64), fpp)
        row, col = np.divmod(pos, nx)
        return (row * (nx + fb) + col) * fpp + k

    def read(self, lo: int = 0, hi: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Events of stored frames lo:hi → (offsets (hi-lo+1,) int64 from 0, indices uint32)."""
        hi = self.n_stored if hi is None else hi
        if not 0 <= lo <= hi <= self.n_stored:
            raise ValueError(f"frames {lo}:{hi} outside the {self.n_stored} stored frames of {self.path}")
        with _open_h5(self.path) as f:
            try:
                if self.kind == "stemstream":
                    offsets, indices = _read_stemstream(self.path, f, lo, hi)
                else:
                    offsets, indices = _read_stempy(f, self.geometry, lo, hi)
            except OSError as e:  # a chunk that does not decompress: a damaged copy
                raise ScanFileError(f"{self.path}: the events of stored frames {lo}..{hi - 1} cannot be read "
                                    f"({e}); the file is damaged: copy it again from its source") from None
        check_events(offsets, indices, self.geometry.n_pixels, self.path, first_frame=lo)
        return offsets, indices


def open_recording(path, flyback: int | None = None, with_received: bool = False) -> Recording:
    """Open a stemstream scan file or a stempy sparse file (detected) and check its structure.

    with_received: also load which (source, frame) parts arrived live (``received``; replay).
    flyback: stempy files only: flyback columns at the end of every raster row (the 4D Camera
        records one); None takes it from the file's metadata when stemstream wrote it, else 0.
    """
    path = Path(path)
    with _open_h5(path) as f:
        if f.attrs.get("format") is not None:
            if f.attrs.get("format") != FORMAT:
                raise ScanFileError(f"{path}: root attribute format is {f.attrs.get('format')!r}; "
                                    f"expected {FORMAT!r} (a stemstream scan file) or a stempy sparse file")
            if flyback:
                raise ScanFileError(f"{path}: --flyback applies to stempy files only; a stemstream "
                                    "scan file records its own flyback in /geometry")
            return _open_stemstream(path, f, with_received)
        if "electron_events" in f:
            return _open_stempy(path, f, flyback)
    raise ScanFileError(f"{path}: neither a stemstream scan file (root attribute format = {FORMAT!r}) "
                        "nor a stempy sparse file (group electron_events, root attribute version = 3)")


def _open_h5(path: Path) -> h5py.File:
    if path.is_dir():
        raise ScanFileError(f"{path}: is a directory; give a scan file")
    if not path.is_file():
        raise ScanFileError(f"{path}: no such file")
    if not h5py.is_hdf5(path):
        raise ScanFileError(f"{path}: not an HDF5 file; expected a stemstream scan file or a stempy "
                            "sparse file (.h5)")
    try:
        return h5py.File(path, "r")
    except BlockingIOError:
        raise ScanFileError(f"{path}: in use: another program is writing into it (HDF5 file lock); "
                            "try again when it has finished") from None
    except OSError as e:  # a signature but a damaged body: usually a truncated copy
        raise ScanFileError(f"{path}: HDF5 file cannot be read, probably truncated or damaged ({e}); "
                            "copy it again from its source") from None


def _require(path, group, name, what):
    if name not in group:
        raise ScanFileError(f"{path}: {group.name.rstrip('/')}/{name} is missing; expected {what}")
    return group[name]


def _geometry(path, attrs: dict, where: str) -> Geometry:
    try:
        return Geometry.from_wire({k: v for k, v in attrs.items() if k != "sector"}).for_sector(None)
    except ProtocolError as e:
        raise ScanFileError(f"{path}: {where} does not describe a scan: {e.detail}") from None


def _open_stemstream(path: Path, f: h5py.File, with_received: bool) -> Recording:
    g = read_attrs(_require(path, f, "geometry", "a group with scan_shape, frame_shape, "
                                                 "frames_per_position"))
    for key in ("scan_shape", "frame_shape"):
        if key not in g:
            raise ScanFileError(f"{path}: /geometry attribute {key} is missing; expected [rows, columns]")
    geometry = _geometry(path, g, "/geometry")
    _require(path, f, "completeness", "a group with dataset received (docs/FORMAT.md)")
    ev = _require(path, f, "events", "a group with datasets offsets and indices")
    offsets = _require(path, ev, "offsets", f"({geometry.n_positions * geometry.frames_per_position + 1},) uint64")
    indices = _require(path, ev, "indices", "(n_events,) uint32")
    n_stored = geometry.n_positions * geometry.frames_per_position
    if offsets.shape != (n_stored + 1,):
        raise ScanFileError(f"{path}: /events/offsets has shape {offsets.shape}; expected ({n_stored + 1},) "
                            f"for {geometry.scan_shape[0]}x{geometry.scan_shape[1]} positions × "
                            f"{geometry.frames_per_position} frame(s)")
    if offsets.dtype.kind not in "iu" or indices.dtype.kind not in "iu" or indices.ndim != 1:
        raise ScanFileError(f"{path}: /events has offsets {offsets.dtype}, indices {indices.dtype} "
                            f"{indices.shape}; expected unsigned integers, indices one-dimensional")
    last = int(offsets[-1])
    if last != indices.shape[0] or int(offsets[0]) != 0:
        raise ScanFileError(f"{path}: /events/offsets run from {int(offsets[0])} to {last} but "
                            f"/events/indices holds {indices.shape[0]} events; expected 0 to "
                            f"{indices.shape[0]} (the file is inconsistent)")
    received = None
    if "received" in f["completeness"]:
        shape = f["completeness/received"].shape
        if shape != (geometry.n_sources, geometry.n_frames):
            raise ScanFileError(f"{path}: /completeness/received has shape {shape}; expected "
                                f"({geometry.n_sources}, {geometry.n_frames}) (sources, frames)")
        if with_received:  # only replay needs it (n_sources x n_frames: 8 MB for 1024², 4 sources)
            received = f["completeness/received"][...]
    prov = read_attrs(f["provenance"]) if "provenance" in f else {}
    sent = prov.get("frames_sent_per_source") or None
    return Recording(path, "stemstream", scan_id_of(f.attrs.get("scan_id"), path), geometry,
                     read_attrs(f["metadata"]) if "metadata" in f else {}, int(indices.shape[0]),
                     received=received, frames_sent={int(k): int(v) for k, v in sent.items()} if sent else None,
                     provenance=prov)


def _open_stempy(path: Path, f: h5py.File, flyback: int | None) -> Recording:
    version = f.attrs.get("version")
    if version is None or int(version) != STEMPY_VERSION:
        shown = "missing" if version is None else version.item() if hasattr(version, "item") else version
        raise ScanFileError(f"{path}: stempy file version {shown}; only version {STEMPY_VERSION} "
                            "is read (load and save it with a current stempy to convert it)")
    ee = f["electron_events"]
    frames = _require(path, ee, "frames", "a variable-length uint32 dataset, one entry per frame")
    pos = _require(path, ee, "scan_positions", "a dataset with attributes Nx, Ny (scan width, height)")
    if frames.dtype.kind != "O" or h5py.check_vlen_dtype(frames.dtype) is None \
            or np.dtype(h5py.check_vlen_dtype(frames.dtype)).kind not in "iu":
        raise ScanFileError(f"{path}: /electron_events/frames has type {frames.dtype}; expected "
                            "variable-length uint32 (one array of pixel indices per frame)")
    for obj, names, what in ((pos, ("Nx", "Ny"), "scan width and height"),
                             (frames, ("Nx", "Ny"), "the frame shape")):
        for a in names:
            if a not in obj.attrs:
                raise ScanFileError(f"{path}: {obj.name} attribute {a} is missing; expected {what}")
    nx_raster, ny = int(pos.attrs["Nx"]), int(pos.attrs["Ny"])
    # stempy writes frame_shape[0] as Nx and reads it back first: (Nx, Ny) is (rows, columns)
    frame_shape = (int(frames.attrs["Nx"]), int(frames.attrs["Ny"]))
    metadata = read_attrs(f["metadata"]) if "metadata" in f else {}
    ours = metadata.get("stemstream") if isinstance(metadata.get("stemstream"), dict) else {}
    if flyback is None:
        flyback = int(ours.get("flyback", 0))
    n_raster = nx_raster * ny
    if n_raster < 1 or frames.shape[0] % n_raster or frames.shape[0] == 0:
        raise ScanFileError(f"{path}: /electron_events/frames holds {frames.shape[0]} frames, not a "
                            f"multiple of the {ny}x{nx_raster} scan (Ny x Nx); expected "
                            "positions × frames per position")
    if not 0 <= flyback < nx_raster:
        raise ScanFileError(f"{path}: flyback {flyback} must be 0..{nx_raster - 1} (the scan is {nx_raster} wide)")
    if pos.shape != (n_raster,) or not np.array_equal(pos[...], np.arange(n_raster)):
        raise ScanFileError(f"{path}: /electron_events/scan_positions is not 0..{n_raster - 1} in order; "
                            "expected a full raster scan (partial scans are not supported)")
    cal = {k: ours[k] for k in ("mrad_per_px", "convergence_mrad", "center") if ours.get(k) is not None}
    try:  # the calibration stemstream's export keeps in metadata/stemstream
        geometry = Geometry((ny, nx_raster - flyback), frame_shape, frames.shape[0] // n_raster, 1,
                            flyback=flyback, mrad_per_px=_number(cal.get("mrad_per_px")),
                            convergence_mrad=_number(cal.get("convergence_mrad")),
                            center=tuple(float(c) for c in cal["center"]) if "center" in cal else None)
    except ProtocolError as e:
        raise ScanFileError(f"{path}: the stempy scan does not describe a scan: {e.detail}") from None
    scan_id = scan_id_of(ours.get("scan_id") or metadata.get("scan_id"), path)
    n_events = -1  # unknown until read: vlen data has no cheap total
    return Recording(path, "stempy", scan_id, geometry, metadata, n_events)


def _number(v):
    return None if v is None else float(v)


def scan_id_of(value, path: Path) -> str:
    """The recording's scan id as the wire protocol takes it: characters other than
    A-Z a-z 0-9 . _ - become _, at most 120 (room for replay's -loopN); the file name when none."""
    text = str(value.decode() if isinstance(value, bytes) else value) if value is not None else ""
    text = re.sub(r"[^A-Za-z0-9._-]", "_", text or path.stem).lstrip("._-")[:120]
    return text or "scan"


def _read_stemstream(path, f, lo, hi):
    off = f["events/offsets"][lo:hi + 1].astype(np.int64)
    a, b = int(off[0]), int(off[-1])
    if b < a:
        raise ScanFileError(f"{path}: /events/offsets decrease between frames {lo} and {hi}; "
                            "expected offsets that never decrease (the file is damaged)")
    indices = f["events/indices"][a:b]
    if indices.dtype != np.uint32:
        indices = indices.astype(np.uint32)
    return off - a, indices


def _read_stempy(f, geometry: Geometry, lo: int, hi: int):
    """Stored frames lo:hi of a stempy file, flyback frames skipped."""
    fpp = geometry.frames_per_position
    nx, fb = geometry.scan_shape[1], geometry.flyback
    ds = f["electron_events/frames"]
    if fb == 0:
        parts = ds[lo:hi]
    else:  # the raster frames of stored frames lo:hi, read row by row
        parts = []
        row_frames, stored_row = (nx + fb) * fpp, nx * fpp
        for row in range(lo // stored_row, -(-hi // stored_row)):
            a = max(lo, row * stored_row) - row * stored_row
            b = min(hi, (row + 1) * stored_row) - row * stored_row
            parts.append(ds[row * row_frames + a:row * row_frames + b])
        parts = np.concatenate(parts) if parts else np.empty(0, object)
    counts = np.fromiter((len(p) for p in parts), np.int64, len(parts))
    offsets = np.zeros(len(parts) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    indices = np.concatenate(parts).astype(np.uint32, copy=False) if len(parts) and offsets[-1] else \
        np.empty(0, np.uint32)
    return offsets, indices


@njit(cache=True, nogil=True)
def _first_bad(offsets, indices, n_pixels):
    """(kind, frame, value): 0 all good; 1 offsets decrease at frame; 2 pixel >= n_pixels."""
    for i in range(len(offsets) - 1):
        if offsets[i + 1] < offsets[i]:
            return 1, i, offsets[i + 1]
        for e in range(offsets[i], offsets[i + 1]):
            if indices[e] >= n_pixels:
                return 2, i, np.int64(indices[e])
    return 0, -1, 0


def check_events(offsets: np.ndarray, indices: np.ndarray, n_pixels: int, path="events",
                 first_frame: int = 0) -> None:
    """ScanFileError unless offsets (n+1,) run from 0 to len(indices) without decreasing and
    every index is a pixel of the detector (< n_pixels)."""
    offsets = np.asarray(offsets, np.int64)
    if len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != len(indices):
        raise ScanFileError(f"{path}: offsets of frames {first_frame}.. run to {offsets[-1] if len(offsets) else '?'} "
                            f"but {len(indices)} events were read; expected them to agree")
    kind, frame, value = _first_bad(offsets, indices, np.int64(n_pixels))
    if kind == 1:
        raise ScanFileError(f"{path}: offsets decrease at stored frame {first_frame + frame}; expected "
                            "offsets that never decrease (the file is damaged)")
    if kind == 2:
        raise ScanFileError(f"{path}: stored frame {first_frame + frame} has an event at pixel {value}, "
                            f"outside the detector's {n_pixels} pixels; expected flat indices y·w + x "
                            "below h·w (wrong frame shape in the file?)")
