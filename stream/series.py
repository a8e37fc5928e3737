"""Tilt series: collect the scans of a series and reconstruct them (issue 7, item 1).

Scans of a tilt series carry ``series_id``, ``series_index`` (0 … length − 1),
``series_length`` and ``tilt_deg`` in their metadata (``stemstream simulate --tilts`` sets
them). :class:`SeriesCollector` is fed every finished scan and says when a series is complete;
:func:`reconstruct_series` turns the scan files of a series (complete or not) into one series
file ``<out_dir>/<series_id>-tomo.h5``: aligned projections, the RESIRE volume and its
R-factor, the traced atoms and their statistics, plus CSV tables and PNG previews beside it.
The algorithms are in ``operators/tomography.py``, ``operators/tracing.py`` and
``operators/atom_tables.py``; the file layout and the conventions are in docs/SERIES.md.

Angle convention: a scan at stage tilt ``t`` (degrees, about the image rows' axis y) is the
projection at Euler angles ``(0, tilt_sign · t, 0)``, ``tilt_sign = −1`` by default: the
emulator rotates the specimen by ``x' = x cos t + z sin t`` (``Specimen.rotated``), which is
the projector's ``theta = −t`` (docs/STAGES_TOMOGRAPHY.md). A scan whose metadata has
``euler_deg = [phi, theta, psi]`` uses those as they are (the projector's ZYZ convention).

Example
-------
>>> collector = SeriesCollector()
>>> done = collector.add("s-0000", "out/s-0000.h5", {"series_id": "s", "series_index": 0,
...                                                   "series_length": 2, "tilt_deg": -10.0})
>>> done is None, collector.pending()[0].missing
(True, [1])
>>> done = collector.add("s-0001", "out/s-0001.h5", {"series_id": "s", "series_index": 1,
...                                                   "series_length": 2, "tilt_deg": 10.0})
>>> done.complete, [str(p) for p in done.paths], collector.pending()
(True, ['out/s-0000.h5', 'out/s-0001.h5'], [])
"""

from __future__ import annotations

import csv
import json
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from numbers import Integral, Real
from pathlib import Path

import h5py
import numpy as np

from . import __version__
from .storage import link_unique, open_scan, read_attrs

SERIES_FORMAT = "stemstream-tomo"
SERIES_FORMAT_VERSION = 1
SERIES_KEYS = ("series_id", "series_index", "series_length")


# ---------------------------------------------------------------- metadata

def _integer(value, name: str) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, Integral):
        return int(value)
    if isinstance(value, Real) and float(value).is_integer():  # 3.0 from JSON
        return int(value)
    raise ValueError(f"{name} must be an integer, got {value!r}")


def _degrees(value, name: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, Real) or not np.isfinite(value):
        raise ValueError(f"{name} must be a finite number of degrees, got {value!r}")
    return float(value)


def _euler(metadata: dict) -> np.ndarray | None:
    e = metadata.get("euler_deg")
    if e is None:
        return None
    try:
        a = np.asarray(e, dtype=np.float64)
    except (TypeError, ValueError):
        a = np.zeros(0)
    if a.shape != (3,) or not np.isfinite(a).all():
        raise ValueError(f"euler_deg must be three finite numbers [phi, theta, psi] in degrees, got {e!r}")
    return a


def series_key(metadata: dict) -> tuple[str, int, int, float | None] | None:
    """``(series_id, index, length, tilt_deg)`` of a scan from its metadata, or None when the
    scan is not part of a tilt series (no ``series_*`` key at all).

    tilt_deg is None only when the metadata gives ``euler_deg`` instead. ValueError, naming
    the key and the fix, for incomplete or inconsistent values: some ``series_*`` keys but not
    all, an empty id, an index outside 0 … length − 1, a non-finite tilt, or neither
    ``tilt_deg`` nor ``euler_deg``.
    """
    md = metadata or {}
    present = [k for k in SERIES_KEYS if md.get(k) is not None]
    if not present:
        return None
    if len(present) < len(SERIES_KEYS):
        missing = [k for k in SERIES_KEYS if k not in present]
        raise ValueError(f"metadata has {', '.join(present)} but not {', '.join(missing)}: a scan of a tilt "
                         "series needs series_id, series_index and series_length (stemstream simulate "
                         "--tilts sets all three)")
    sid = md["series_id"]
    if isinstance(sid, bytes):
        sid = sid.decode()
    if not isinstance(sid, str) or not sid.strip():
        raise ValueError(f"series_id must be a non-empty string, got {sid!r}")
    index = _integer(md["series_index"], "series_index")
    length = _integer(md["series_length"], "series_length")
    if length < 1:
        raise ValueError(f"series_length must be >= 1, got {length} (series {sid!r})")
    if not 0 <= index < length:
        raise ValueError(f"series_index {index} is outside 0..{length - 1} (series_length {length}) "
                         f"in series {sid!r}: indices count from 0")
    tilt = md.get("tilt_deg")
    tilt = None if tilt is None else _degrees(tilt, "tilt_deg")
    if tilt is None and _euler(md) is None:
        raise ValueError(f"scan {index} of series {sid!r} has no tilt angle: give tilt_deg (degrees about y) "
                         "or euler_deg [phi, theta, psi] in its metadata")
    return sid, index, length, tilt


def projection_angles(metadata: dict, tilt_sign: float = -1.0) -> np.ndarray:
    """(3,) float64 Euler angles (phi, theta, psi) in degrees of the projection a scan is:
    metadata ``euler_deg`` as it is, else ``(0, tilt_sign · tilt_deg, 0)``. ValueError when
    the metadata has neither."""
    e = _euler(metadata)
    if e is not None:
        return e
    if metadata.get("tilt_deg") is None:
        raise ValueError("no tilt angle in the metadata: give tilt_deg (degrees about y) or euler_deg "
                         "[phi, theta, psi]")
    return np.array([0.0, tilt_sign * _degrees(metadata["tilt_deg"], "tilt_deg"), 0.0])


# ---------------------------------------------------------------- collector

@dataclass(frozen=True)
class SeriesMember:
    """One scan of a series: its id, file, index in the series and stage tilt (None when the
    metadata gives euler_deg)."""

    scan_id: str
    path: Path
    index: int
    tilt_deg: float | None


@dataclass
class Series:
    """The scans of one series collected so far (``members``: index → SeriesMember).
    ``replaced``: earlier scans that a later scan of the same index replaced."""

    series_id: str
    length: int
    members: dict = field(default_factory=dict)
    replaced: list = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return len(self.members) == self.length

    @property
    def missing(self) -> list[int]:
        return [i for i in range(self.length) if i not in self.members]

    @property
    def paths(self) -> list[Path]:
        """The scan files in series order."""
        return [self.members[i].path for i in sorted(self.members)]

    def describe(self) -> str:
        miss = self.missing
        more = f"; missing {_ranges(miss)}" if miss else ""
        return f"series {self.series_id}: {len(self.members)} of {self.length} scans{more}"


def _ranges(indices: list[int], limit: int = 6) -> str:
    runs, start = [], None
    for k, i in enumerate(indices):
        if start is None:
            start = i
        if k + 1 == len(indices) or indices[k + 1] != i + 1:
            runs.append(str(start) if start == i else f"{start}-{i}")
            start = None
    return ", ".join(runs[:limit]) + (", …" if len(runs) > limit else "")


class SeriesCollector:
    """Groups finished scans by series id; thread-safe, pure Python.

    :meth:`add` returns the :class:`Series` when that scan completes it (all ``series_length``
    indices present) and forgets it; incomplete series stay available (:meth:`pending`,
    :meth:`take` for a run on request). A scan of a series id seen again after it completed
    starts a new series (``stemstream simulate --tilts … --scans 2`` repeats the id). At
    most ``max_pending`` incomplete series are kept; the oldest is dropped (``dropped``).
    """

    def __init__(self, max_pending: int = 64):
        if int(max_pending) < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending!r}")
        self.max_pending = int(max_pending)
        self._pending: dict[str, Series] = {}  # in order of first arrival
        self.dropped: list[str] = []
        self._lock = threading.Lock()

    def add(self, scan_id: str, path, metadata: dict) -> Series | None:
        """Record a finished scan. Returns its series when this scan completed it, else None
        (also for scans that are not part of a series). The same scan fed twice changes
        nothing; another scan of an index already present replaces it (the earlier one goes to
        ``replaced``). ValueError (nothing recorded) for bad series metadata or a
        ``series_length`` that disagrees with the series' earlier scans."""
        try:
            key = series_key(metadata)
        except ValueError as e:
            raise ValueError(f"scan {scan_id}: {e}") from None
        if key is None:
            return None
        sid, index, length, tilt = key
        member = SeriesMember(str(scan_id), Path(path), index, tilt)
        with self._lock:
            s = self._pending.get(sid)
            if s is None:
                s = self._pending[sid] = Series(sid, length)
            elif s.length != length:
                raise ValueError(f"scan {scan_id}: series_length {length} but the earlier scans of series "
                                 f"{sid!r} have {s.length}; one series id must keep one length (use a new "
                                 "series_id for a new series)")
            old = s.members.get(index)
            if old == member:
                return None
            if old is not None:
                s.replaced.append(old)
            s.members[index] = member
            if s.complete:
                del self._pending[sid]
                return s
            while len(self._pending) > self.max_pending:
                oldest = next(iter(self._pending))
                del self._pending[oldest]
                self.dropped.append(oldest)
        return None

    def pending(self) -> list[Series]:
        """The incomplete series, oldest first."""
        with self._lock:
            return list(self._pending.values())

    def get(self, series_id: str) -> Series | None:
        with self._lock:
            return self._pending.get(series_id)

    def take(self, series_id: str) -> Series:
        """Remove and return an incomplete series (to reconstruct it now, on request);
        ValueError naming the pending series when there is none of that id."""
        with self._lock:
            s = self._pending.pop(series_id, None)
            if s is None:
                have = ", ".join(self._pending) or "none"
                raise ValueError(f"no incomplete series {series_id!r} (pending: {have})")
            return s

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)


# ---------------------------------------------------------------- reconstruction

# Keyword defaults of reconstruct_series: a ``[series]`` configuration table can be checked
# against them (check_series_params).
SERIES_DEFAULTS = {
    "image": "adf", "iterations": 100, "step_scale": 1.0, "align": "com", "background": "border",
    "tilt_sign": -1.0, "voxel_size_A": None, "volume_shape": None, "atom_sigma_A": 0.45,
    "trace": True, "trace_options": None, "statistics": True, "lattice": "fcc",
    "statistics_options": None, "previews": True,
}


def check_series_params(params: dict, where: str = "[series]") -> None:
    """ValueError naming unknown keys of a table meant for :func:`reconstruct_series`."""
    unknown = set(params) - set(SERIES_DEFAULTS) - {"series_id"}
    if unknown:
        raise ValueError(f"{where}: unknown parameter(s) {', '.join(sorted(unknown))}; valid: "
                         f"{', '.join(SERIES_DEFAULTS)}")


def _check_options(func, options, name: str, taken: tuple) -> None:
    """ValueError, before any work, for keyword options ``func`` does not take."""
    import inspect

    if options is None:
        return
    if not isinstance(options, dict):
        raise ValueError(f"{name} must be a table of keyword arguments, got {options!r}")
    allowed = set(inspect.signature(func).parameters) - set(taken)
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {', '.join(sorted(unknown))} for {func.__name__}; "
                         f"valid: {', '.join(sorted(allowed))}")


def _open_when_free(path: Path, wait_s: float = 60.0) -> h5py.File:
    """open_scan, waiting while another process holds the file open for writing (a stage of
    the last scan may be writing /stages into it: HDF5 locks the file)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return open_scan(path)
        except ValueError as e:
            if not isinstance(e.__context__, BlockingIOError):
                raise
            if time.monotonic() > deadline:
                raise ValueError(f"{path}: stayed open for writing in another program for {wait_s:.0f} s (HDF5 "
                                 "file lock); close it and reconstruct again") from None
        time.sleep(0.25)


@dataclass
class SeriesInput:
    """The projections of a series as read from its scan files, sorted by theta.

    images (n, h, w) float64 (``/results/<image>``); angles (n, 3) Euler degrees; tilt_deg (n,)
    (NaN where the metadata gives euler_deg); paths, scan_ids, status per scan; index (n,)
    series_index (−1 when absent); voxel_size_A; series_id; warnings."""

    images: np.ndarray
    angles: np.ndarray
    tilt_deg: np.ndarray
    paths: list
    scan_ids: list
    status: list
    index: np.ndarray
    voxel_size_A: float
    series_id: str
    warnings: list


def read_series(paths, image: str = "adf", *, tilt_sign: float = -1.0, voxel_size_A: float | None = None,
                series_id: str | None = None) -> SeriesInput:
    """Read ``/results/<image>`` and the tilt of every scan file and sort them by theta.

    ValueError naming the file and the fix for: fewer than 2 files, a file that is not a scan
    file, a missing image, a missing or bad tilt angle, images of different shapes or
    non-finite values, different scan steps, scans of different series (unless ``series_id``
    is given), one series index twice, all scans at the same angle.
    """
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    if len(paths) < 2:
        raise ValueError(f"a tilt series needs at least 2 projections, got {len(paths)} scan file(s): "
                         "give the scan files of every tilt")
    if tilt_sign not in (-1, 1):
        raise ValueError(f"tilt_sign must be -1 (the emulator's convention) or +1, got {tilt_sign!r}")
    images, angles, tilts, ids, status, index, steps, sids = [], [], [], [], [], [], [], []
    warnings = []
    for p in paths:
        with _open_when_free(p) as f:  # ScanFileError (a ValueError) names the file
            md = read_attrs(f["metadata"]) if "metadata" in f else {}
            res = f["results"] if "results" in f else {}
            if image not in res:
                have = ", ".join(sorted(res)) or "none"
                raise ValueError(f"{p}: no image {image!r} in /results (it has {have}); choose image= one of "
                                 f"those, or enable the {image!r} detector in the configuration and process "
                                 "the scan again (stemstream process-file)")
            img = np.asarray(res[image][()], dtype=np.float64)
            scan_status = str(f.attrs.get("status", "unknown"))
            scan_id = str(f.attrs.get("scan_id", p.stem))
        if img.ndim != 2:
            raise ValueError(f"{p}: /results/{image} has shape {img.shape}; a projection must be a 2-D scan "
                             "image (ny, nx): choose a scan-shaped result")
        if not np.isfinite(img).all():
            raise ValueError(f"{p}: /results/{image} has {int((~np.isfinite(img)).sum())} NaN or infinite "
                             "pixels; choose an image without them (adf, bf)")
        try:
            key = series_key(md)
            ang = projection_angles(md, tilt_sign)
        except ValueError as e:
            raise ValueError(f"{p}: {e}") from None
        if scan_status != "complete":
            warnings.append(f"{p.name} is {scan_status}: positions without frames are 0 in its image")
        images.append(img)
        angles.append(ang)
        tilts.append(np.nan if md.get("tilt_deg") is None else float(md["tilt_deg"]))
        ids.append(scan_id)
        status.append(scan_status)
        index.append(-1 if key is None else key[1])
        sids.append(None if key is None else key[0])
        step = md.get("scan_step_A")
        steps.append(float(step) if isinstance(step, Real) and np.isfinite(step) and step > 0 else None)

    odd = [k for k, im in enumerate(images) if im.shape != images[0].shape]
    if odd:
        k = odd[0]
        raise ValueError(f"{paths[k]}: /results/{image} is {images[k].shape} but {paths[0]} is "
                         f"{images[0].shape}; all scans of a series need the same scan shape (rescan, or "
                         "leave the odd one out)")
    if voxel_size_A is None:
        if None in steps:
            bad = paths[steps.index(None)]
            raise ValueError(f"{bad}: no scan_step_A in the metadata, so the voxel size is unknown; give "
                             "voxel_size_A (Å)")
        if max(steps) - min(steps) > 1e-6 * max(steps):
            k = int(np.argmax(np.abs(np.array(steps) - steps[0])))
            raise ValueError(f"{paths[k]}: scan_step_A {steps[k]:g} Å differs from {paths[0]}'s "
                             f"{steps[0]:g} Å; scans of a series need one scan step (or give voxel_size_A "
                             "to override)")
        voxel_size_A = steps[0]
    elif not (isinstance(voxel_size_A, Real) and np.isfinite(voxel_size_A) and voxel_size_A > 0):
        raise ValueError(f"voxel_size_A must be a positive number of Å, got {voxel_size_A!r}")

    named = sorted({s for s in sids if s is not None})
    if series_id is None:
        if len(named) > 1:
            raise ValueError(f"the files belong to {len(named)} series ({', '.join(named)}); give the files of "
                             "one series, or series_id= to reconstruct them together")
        series_id = named[0] if named else paths[0].stem
    seen = {}
    for p, sid, i in zip(paths, sids, index):
        if sid is not None and (sid, i) in seen:
            raise ValueError(f"{p} and {seen[sid, i]} are both scan {i} of series {sid!r}; leave one out")
        seen[sid, i] = p
    angles = np.array(angles)
    if np.ptp(angles, axis=0).max() == 0:
        raise ValueError(f"all {len(paths)} scans are at the same angles {angles[0].tolist()}: a tilt series "
                         "needs scans at different tilts")
    order = np.lexsort((np.array(index), angles[:, 1]))  # by theta, then series index
    pick = lambda seq: [seq[k] for k in order]  # noqa: E731
    return SeriesInput(np.stack(images)[order], angles[order], np.array(tilts)[order], pick(paths),
                       pick(ids), pick(status), np.array(index)[order], float(voxel_size_A),
                       str(series_id), warnings)


@dataclass
class SeriesResult:
    """What :func:`reconstruct_series` wrote and its headline numbers.

    path: the series file; csv, previews: files beside it; n_projections; r_factor_first,
    r_factor_final (R after the first and the last iteration); n_atoms traced (0 when not
    traced); seconds (wall clock); headline (one line); warnings; error ("" unless tracing
    or the statistics failed: the file then holds the volume without them)."""

    path: Path
    series_id: str
    n_projections: int
    r_factor_first: float
    r_factor_final: float
    n_atoms: int
    seconds: float
    headline: str
    csv: list = field(default_factory=list)
    previews: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    error: str = ""


def _file_stem(series_id: str) -> str:
    """A file name from a series id: anything but letters, digits, '.', '_', '-' becomes '_'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", series_id).lstrip(".") or "series"


def reconstruct_series(paths, out_dir=None, *, image: str = "adf", iterations: int = 100,
                       step_scale: float = 1.0, align: str = "com", background="border",
                       tilt_sign: float = -1.0, voxel_size_A: float | None = None, volume_shape=None,
                       atom_sigma_A: float = 0.45, trace: bool = True, trace_options: dict | None = None,
                       statistics: bool = True, lattice: str = "fcc", statistics_options: dict | None = None,
                       previews: bool = True, series_id: str | None = None) -> SeriesResult:
    """Reconstruct a tilt series from its scan files and write ``<out_dir>/<series_id>-tomo.h5``.

    Parameters
    ----------
    paths : scan files (any order; sorted by theta here), at least 2.
    out_dir : directory of the series file (default: the first scan's); CSV tables go beside
        it, PNG previews into ``out_dir/previews``.
    image : the scan result used as projection (``/results/<image>``), default "adf".
    iterations, step_scale : RESIRE gradient steps and s in t = s / (n · nz).
    align : "com", "xcorr", "com+xcorr" (``operators.tomography.align_projections``) or
        "none" (the scans are centred on the tilt axis already).
    background : "border" (subtract each image's border median, the vacuum level: isolated
        particles), "none" (films), or a number subtracted from every image.
    tilt_sign : theta = tilt_sign · tilt_deg (−1: the emulator's convention); scans whose
        metadata gives ``euler_deg`` use it as it is.
    voxel_size_A : Å per voxel; default the scans' ``scan_step_A``.
    volume_shape : (nz, ny, nx); default (w, h, w).
    atom_sigma_A, trace, trace_options : atom tracing (``operators.tracing.trace_atoms``
        keyword arguments in trace_options); trace=False stops after the reconstruction.
    statistics, lattice, statistics_options : per-atom statistics
        (``operators.atom_tables.atom_statistics`` keyword arguments in statistics_options).
        A failure of tracing or of the statistics is recorded in the file and the result
        (``error``), not raised: the volume is kept.
    previews : write the PNG previews.
    series_id : name of the series file; default the scans' series_id (or the first file's
        stem).

    Returns
    -------
    SeriesResult. Positions are (x, y, z) Å relative to the centre voxel, the rotation centre
    (docs/SERIES.md). ValueError naming the file and the fix for bad input (:func:`read_series`).
    """
    from operators.atom_tables import atom_statistics
    from operators.lattices import bulk_coordination
    from operators.tomography import align_projections, resire
    from operators.tracing import trace_atoms

    t0 = time.perf_counter()
    if align not in ("com", "xcorr", "com+xcorr", "none"):
        raise ValueError(f"align must be 'com', 'xcorr', 'com+xcorr' or 'none', got {align!r}")
    if not (background in ("border", "none") or (isinstance(background, Real) and np.isfinite(background))):
        raise ValueError(f"background must be 'border', 'none' or a number, got {background!r}")
    if not (isinstance(atom_sigma_A, Real) and np.isfinite(atom_sigma_A) and atom_sigma_A > 0):
        raise ValueError(f"atom_sigma_A must be a positive number of Å, got {atom_sigma_A!r}")
    if statistics and lattice != "amorphous":
        bulk_coordination(lattice)  # names the valid lattices, before a long reconstruction
    _check_options(trace_atoms, trace_options, "trace_options", ("volume", "voxel_size_A", "atom_sigma_A"))
    _check_options(atom_statistics, statistics_options, "statistics_options",
                   ("positions", "intensities", "lattice", "volume", "voxel_size"))
    s = read_series(paths, image, tilt_sign=tilt_sign, voxel_size_A=voxel_size_A, series_id=series_id)
    out_dir = Path(out_dir) if out_dir is not None else s.paths[0].parent
    vox = s.voxel_size_A

    b = s.images.copy()
    vacuum = np.median(np.concatenate([b[:, 0, :], b[:, -1, :], b[:, :, 0], b[:, :, -1]], axis=1), axis=1)
    if background == "border":
        b -= vacuum[:, None, None]
    elif background != "none":
        b -= float(background)
    if align in ("com", "com+xcorr"):  # the alignment's own test names projections, not files
        level = vacuum[:, None, None] if background == "none" else 0.0
        empty = np.flatnonzero(np.clip(b - level, 0, None).sum(axis=(1, 2)) <= 0)
        if len(empty):
            raise ValueError(f"{s.paths[empty[0]]}: /results/{image} has no signal above the background "
                             "(vacuum level), so it has no centre of mass: leave the scan out, or use "
                             "align='xcorr'")
    if align == "none":
        shifts, reference = np.zeros((len(b), 2)), int(np.argmin(np.abs(s.angles[:, 1])))
    else:
        al = align_projections(b, s.angles, method=align,
                               background=0.0 if background != "none" else None)
        b, shifts, reference = al.projections, al.shifts_px, al.reference
    rec = resire(b, s.angles, iterations=iterations, step_scale=step_scale, volume_shape=volume_shape)

    atoms, stats, error = None, None, ""
    if trace:  # the volume is worth keeping even when tracing or a statistic fails
        try:
            atoms = trace_atoms(rec.volume, vox, atom_sigma_A=atom_sigma_A, **(trace_options or {}))
        except Exception as e:  # noqa: BLE001 - recorded in the file and the result
            error = f"tracing failed: {type(e).__name__}: {e}"
        if statistics and atoms is not None:
            try:
                stats = atom_statistics(atoms.positions_A, atoms.peak_intensity, lattice=lattice,
                                        volume=rec.volume, voxel_size=vox, **(statistics_options or {}))
            except Exception as e:  # noqa: BLE001 - e.g. fewer than 5 atoms, all in a plane
                error = f"statistics failed: {type(e).__name__}: {e}"
    if error:
        s.warnings.append(error)

    n_atoms = 0 if atoms is None else len(atoms.positions_A)
    theta = s.angles[:, 1]
    head = (f"{s.series_id}: {len(b)} projections (theta {theta.min():+.0f}..{theta.max():+.0f}°), "
            f"{'x'.join(map(str, rec.volume.shape))} voxels of {vox:.3g} Å, R {rec.r_factor[0]:.3f} -> "
            f"{rec.r_factor[-1]:.3f} in {rec.iterations} iterations")
    if atoms is not None:
        head += f"; {n_atoms} atoms traced"
    if stats is not None:
        head += f" (CN mean {stats.cn_mean:.2f}"
        head += f", a = {stats.lattice_constant:.3f} Å)" if np.isfinite(stats.lattice_constant) else ")"
    if error:
        head += f"; {error}"
    params = {"image": image, "iterations": iterations, "step_scale": step_scale, "align": align,
              "background": background, "tilt_sign": tilt_sign, "voxel_size_A": vox,
              "volume_shape": list(rec.volume.shape), "atom_sigma_A": atom_sigma_A, "trace": trace,
              "trace_options": trace_options or {}, "statistics": statistics, "lattice": lattice,
              "statistics_options": statistics_options or {}}

    def write(f: h5py.File) -> None:
        _write_series(f, s, b, shifts, reference, align, rec, vox, atoms, stats, error, params)
        f.attrs.update(headline=head, seconds=time.perf_counter() - t0)

    out_dir.mkdir(parents=True, exist_ok=True)
    path = _write_atomically(out_dir / f"{_file_stem(s.series_id)}-tomo.h5", write)
    seconds = time.perf_counter() - t0
    headline = f"{head}; {seconds:.0f} s -> {path.name}"
    csvs, pngs = _write_tables(path, s, shifts, rec, atoms, stats), []
    if previews:
        try:
            pngs = _write_previews(path, s, rec, atoms, stats)
        except Exception as e:  # noqa: BLE001 - a preview is not worth a reconstruction
            s.warnings.append(f"previews not written: {type(e).__name__}: {e}")
    return SeriesResult(path, s.series_id, len(b), float(rec.r_factor[0]), float(rec.r_factor[-1]), n_atoms,
                        seconds, headline, csvs, pngs, s.warnings, error)


# ---------------------------------------------------------------- writing

def _write_atomically(target: Path, write) -> Path:
    """Write through ``write(h5py.File)`` under a temporary name, then give it ``target``'s name
    or ``stem-2``, ``stem-3``, … (stream.storage: nothing is ever overwritten)."""
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        with h5py.File(tmp, "w") as f:
            write(f)
        with open(tmp, "rb+") as fh:  # on disk before it gets its final name
            os.fsync(fh.fileno())
        return link_unique(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _strings(values) -> np.ndarray:
    return np.asarray([str(v) for v in values], dtype=h5py.string_dtype())


def _write_series(f, s: SeriesInput, b, shifts, reference, align, rec, vox, atoms, stats, error,
                  params) -> None:
    f.attrs.update(format=SERIES_FORMAT, format_version=SERIES_FORMAT_VERSION, series_id=s.series_id,
                   software="stemstream", version=__version__,
                   created=datetime.now().isoformat(timespec="seconds"), n_projections=len(b),
                   n_atoms=0 if atoms is None else len(atoms.positions_A),
                   r_factor_final=float(rec.r_factor[-1]), params=json.dumps(params, default=str),
                   warnings=json.dumps(s.warnings), error=error)
    src = f.create_group("sources")
    src.create_dataset("path", data=_strings(s.paths))
    src.create_dataset("scan_id", data=_strings(s.scan_ids))
    src.create_dataset("status", data=_strings(s.status))
    src.create_dataset("series_index", data=s.index)
    src.create_dataset("tilt_deg", data=s.tilt_deg).attrs["unit"] = "degrees (stage tilt, NaN: euler_deg given)"
    src.create_dataset("euler_deg", data=s.angles).attrs["unit"] = "degrees (phi, theta, psi), ZYZ"
    src.attrs.update(image=params["image"], tilt_sign=params["tilt_sign"])

    al = f.create_group("alignment")
    al.attrs.update(method=align, reference=int(reference), background=str(params["background"]))
    al.create_dataset("shifts_px", data=shifts).attrs["unit"] = "px (dy, dx) applied"
    al.create_dataset("projections", data=b.astype(np.float32), compression="gzip", compression_opts=1,
                      shuffle=True).attrs["description"] = "the projections RESIRE fitted (n, h, w)"

    r = f.create_group("reconstruction")
    r.attrs.update(voxel_size_A=vox, axes=rec.axes, step=rec.step, step_scale=rec.step_scale,
                   iterations=rec.iterations, indexing="[z, y, x]",
                   origin="centre voxel (nz//2, ny//2, nx//2) = the rotation centre")
    r.create_dataset("volume", data=rec.volume.astype(np.float32), compression="gzip", compression_opts=1,
                     shuffle=True, chunks=(1,) + rec.volume.shape[1:])
    r.create_dataset("r_factor", data=rec.r_factor).attrs["description"] = "sum|PO - b| / sum|b| per iteration"
    r.create_dataset("r_factor_per_projection", data=rec.r_factor_per_projection)

    if atoms is not None:
        a = f.create_group("atoms")
        for name in ("positions_A", "positions_vox", "correlation", "peak_intensity", "integrated_intensity",
                     "coordination"):
            a.create_dataset(name, data=getattr(atoms, name))
        a["positions_A"].attrs["unit"] = "Å (x, y, z) from the centre voxel"
        a["positions_vox"].attrs["unit"] = "voxel (z, y, x) indices"
        a.attrs.update(threshold=atoms.threshold, otsu_threshold=atoms.otsu_threshold,
                       bond_cutoff_A=atoms.bond_cutoff_A, n_candidates=atoms.n_candidates,
                       n_rejected_correlation=atoms.n_rejected_correlation,
                       n_rejected_coordination=atoms.n_rejected_coordination,
                       atom_sigma_A=params["atom_sigma_A"])
    if stats is not None:
        from operators.atom_tables import write_hdf5

        write_hdf5(stats, f.create_group("statistics"))


def _write_csv(path: Path, cols: dict) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(list(cols))
        for row in zip(*(np.asarray(c).tolist() for c in cols.values())):
            w.writerow([f"{v:.7g}" if isinstance(v, float) else v for v in row])
    return path


def _write_tables(path: Path, s: SeriesInput, shifts, rec, atoms, stats) -> list[Path]:
    """CSV beside the series file: projections, R-factor, atoms (the statistics table when
    computed, else the traced atoms) and the per-sample summary."""
    stem = path.parent / path.stem
    out = [_write_csv(Path(f"{stem}_projections.csv"), {
        "file": [str(p) for p in s.paths], "scan_id": s.scan_ids, "series_index": s.index,
        "tilt_deg": s.tilt_deg, "phi_deg": s.angles[:, 0], "theta_deg": s.angles[:, 1], "psi_deg": s.angles[:, 2],
        "shift_y_px": shifts[:, 0], "shift_x_px": shifts[:, 1], "r_factor": rec.r_factor_per_projection}),
        _write_csv(Path(f"{stem}_rfactor.csv"), {"iteration": np.arange(1, rec.iterations + 1),
                                                 "r_factor": rec.r_factor})]
    if stats is not None:
        from operators.atom_tables import write_csv, write_summary_csv

        out += [write_csv(stats, f"{stem}_atoms.csv"), write_summary_csv(stats, f"{stem}_summary.csv")]
    elif atoms is not None:
        p = atoms.positions_A
        out.append(_write_csv(Path(f"{stem}_atoms.csv"), {
            "x": p[:, 0], "y": p[:, 1], "z": p[:, 2], "correlation": atoms.correlation,
            "peak_intensity": atoms.peak_intensity, "coordination": atoms.coordination}))
    return [Path(p) for p in out]


def _write_previews(path: Path, s: SeriesInput, rec, atoms, stats) -> list[Path]:
    """previews/<stem>_rfactor.png, <stem>_volume.png (central slices and sums along each axis,
    traced atoms marked on the sums) and the statistics histograms <stem>_atoms_*.png."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from operators.tomography import plot_r_factor

    directory = path.parent / "previews"
    directory.mkdir(parents=True, exist_ok=True)
    out = [plot_r_factor(rec.r_factor, directory / f"{path.stem}_rfactor.png",
                         title=f"{s.series_id}: RESIRE R-factor")]
    v = rec.volume
    nz, ny, nx = v.shape
    vox = s.voxel_size_A
    fig = Figure(figsize=(10, 6.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3)
    # (title, image, extent in Å, which position columns are the image's x and y)
    ext = lambda n_x, n_y: [(-0.5 - n_x // 2) * vox, (n_x - 0.5 - n_x // 2) * vox,  # noqa: E731
                            (n_y - 0.5 - n_y // 2) * vox, (-0.5 - n_y // 2) * vox]
    # a slice through the centre voxel can fall between atomic planes: show the brightest
    # plane within ±1 Å of the centre instead
    near = max(1, int(round(1.0 / vox)))
    planes = []
    for axis, n_ in zip((0, 1, 2), v.shape):
        lo, hi = max(0, n_ // 2 - near), min(n_, n_ // 2 + near + 1)
        k = lo + int(np.argmax(v.sum(axis=tuple(a for a in range(3) if a != axis))[lo:hi]))
        planes.append((k, (k - n_ // 2) * vox))
    (kz, z0), (ky, y0), (kx, x0) = planes
    panels = [(f"slice z = {z0:.1f} Å", v[kz], ext(nx, ny), None),
              (f"slice y = {y0:.1f} Å", v[:, ky], ext(nx, nz), None),
              (f"slice x = {x0:.1f} Å", v[:, :, kx], ext(ny, nz), None),
              ("sum along z", v.sum(0), ext(nx, ny), (0, 1)),
              ("sum along y", v.sum(1), ext(nx, nz), (0, 2)), ("sum along x", v.sum(2), ext(ny, nz), (1, 2))]
    labels = {0: "x (Å)", 1: "y (Å)", 2: "z (Å)"}
    for ax, (title, img, extent, cols), xy in zip(axes.flat, panels, [(0, 1), (0, 2), (1, 2)] * 2):
        ax.imshow(img, cmap="gray", extent=extent, interpolation="nearest")
        if cols is not None and atoms is not None and len(atoms.positions_A):
            ax.plot(atoms.positions_A[:, cols[0]], atoms.positions_A[:, cols[1]], "+", color="tab:red",
                    ms=3, mew=0.6)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(labels[xy[0]], fontsize=8)
        ax.set_ylabel(labels[xy[1]], fontsize=8)
        ax.tick_params(labelsize=7)
    n = 0 if atoms is None else len(atoms.positions_A)
    fig.suptitle(f"{s.series_id}: {nz}x{ny}x{nx} voxels of {vox:.3g} Å, R {rec.r_factor[-1]:.3f}"
                 + (f", {n} atoms (+)" if atoms is not None else ""), fontsize=10)
    fig.tight_layout()
    target = directory / f"{path.stem}_volume.png"
    fig.savefig(target, dpi=80)
    out.append(target)
    if stats is not None:
        from operators.atom_tables import write_histograms

        out += write_histograms(stats, directory, stem=f"{path.stem}_atoms")
    return [Path(p) for p in out]


# ---------------------------------------------------------------- command line

def group_series(paths) -> tuple[dict, list[str]]:
    """Scan files grouped by series id (files without series metadata under None), and one
    note per file left out (series files written by :func:`reconstruct_series`). ValueError
    naming the file for bad series metadata or a file that is not a scan file."""
    groups, notes = {}, []
    for p in (Path(p) for p in paths):
        try:
            with h5py.File(p, "r") as f:
                if f.attrs.get("format") == SERIES_FORMAT:
                    notes.append(f"{p}: left out: a series file, not a scan")
                    continue
        except OSError:
            pass  # open_scan below says what is wrong with it
        with _open_when_free(p) as f:
            md = read_attrs(f["metadata"]) if "metadata" in f else {}
        try:
            key = series_key(md)
        except ValueError as e:
            raise ValueError(f"{p}: {e}") from None
        groups.setdefault(None if key is None else key[0], []).append(p)
    return groups, notes


def add_tomo_args(p) -> None:
    """Arguments of ``stemstream tomo`` (an argparse parser)."""
    p.add_argument("files", nargs="+", metavar="FILE",
                   help="scan files of one or more tilt series (grouped by their metadata series_id)")
    p.add_argument("--out", metavar="DIR", help="output directory (default: the first scan's)")
    p.add_argument("--series-id", metavar="NAME", help="reconstruct all FILEs as one series of this name")
    p.add_argument("--image", default="adf", help="scan result used as projection (default adf)")
    p.add_argument("--iterations", type=int, default=100, help="RESIRE iterations (default 100)")
    p.add_argument("--step-scale", type=float, default=1.0, help="RESIRE step scale s, 0 < s <= 3 (default 1)")
    p.add_argument("--align", choices=["com", "xcorr", "com+xcorr", "none"], default="com",
                   help="projection alignment (default com: centre of mass, for isolated particles)")
    p.add_argument("--background", default="border",
                   help="border (subtract the vacuum level at the image border; default), none (films), or a number")
    p.add_argument("--tilt-sign", type=float, choices=[-1.0, 1.0], default=-1.0,
                   help="theta = sign x tilt_deg (default -1: the emulator's convention)")
    p.add_argument("--voxel-size", type=float, metavar="Å", help="voxel size (default: the scans' scan_step_A)")
    p.add_argument("--atom-sigma", type=float, default=0.45, metavar="Å", help="atom width for tracing (0.45)")
    p.add_argument("--lattice", default="fcc", help="fcc, bcc, bcc14, hcp, sc or amorphous (default fcc)")
    p.add_argument("--no-trace", action="store_true", help="stop after the reconstruction")
    p.add_argument("--no-statistics", action="store_true", help="trace atoms but compute no statistics")
    p.add_argument("--no-previews", action="store_true", help="write no PNG previews")


def run_tomo(args) -> int:
    """``stemstream tomo FILE…``: reconstruct every series among the files (incomplete ones
    too, with a warning). Exit code 0, 1 when a reconstruction recorded an error, 2 for bad
    input (one line on stderr naming the file and the fix)."""
    import sys

    def fail(text):
        print(f"stemstream tomo: error: {text}", file=sys.stderr)
        return 2

    background = args.background
    if background not in ("border", "none"):
        try:
            background = float(background)
        except ValueError:
            return fail(f"--background must be border, none or a number, got {background!r}")
    try:
        groups, notes = group_series(args.files)
        for note in notes:
            print(f"stemstream tomo: {note}", flush=True)
        if args.series_id is not None:
            groups = {args.series_id: [p for ps in groups.values() for p in ps]}
        if not groups:
            return fail("no scan files among the FILEs")
        failed = 0
        for sid, paths in groups.items():
            if sid is not None and args.series_id is None:
                with _open_when_free(paths[0]) as f:
                    length = series_key(read_attrs(f["metadata"]))[2]
                if len(paths) < length:
                    print(f"WARNING [{sid}] {len(paths)} of {length} scans: reconstructing an incomplete "
                          "series", flush=True)
            r = reconstruct_series(paths, args.out, image=args.image, iterations=args.iterations,
                                   step_scale=args.step_scale, align=args.align, background=background,
                                   tilt_sign=args.tilt_sign, voxel_size_A=args.voxel_size,
                                   atom_sigma_A=args.atom_sigma, trace=not args.no_trace,
                                   statistics=not args.no_statistics, lattice=args.lattice,
                                   previews=not args.no_previews,
                                   series_id=args.series_id if args.series_id is not None else sid)
            print(f"[{r.series_id}] {r.headline}", flush=True)
            for w in r.warnings:
                print(f"WARNING [{r.series_id}] {w}", flush=True)
            failed += bool(r.error)
        return 1 if failed else 0
    except ValueError as e:  # ScanFileError included
        return fail(str(e))
