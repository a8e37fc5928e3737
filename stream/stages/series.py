"""Tilt series: collect the scans of a series from finished scans (issue 7, item 1).

Scans of a tilt series carry ``series_id``, ``series_index`` (0 … length − 1),
``series_length`` and ``tilt_deg`` in their metadata (``stemstream simulate --tilts`` sets
them). This module reads those keys (:func:`series_key`, :func:`projection_angles`) and
groups scans into series: :class:`SeriesCollector` is fed every finished scan and says when a
series is complete; :func:`group_series` groups scan files on disk by series id. The
reconstruction of a series into ``<out_dir>/<series_id>-tomo.h5`` is in ``stream/stages/tomo.py``
(its file writers in ``stream/stages/tomo_output.py``); the conventions are in docs/SERIES.md.

Angle convention: a scan at stage tilt ``t`` (degrees, about the image rows' axis y) is the
projection at Euler angles ``(0, tilt_sign · t, 0)``, ``tilt_sign = −1`` by default: the
emulator rotates the specimen by ``x' = x cos t + z sin t`` (``Specimen.rotated``), which is
the projector's ``theta = −t`` (docs/STAGES_TOMOGRAPHY.md). A scan whose metadata has
``euler_deg = [phi, theta, psi]`` uses those as they are, in the convention the
reconstruction is asked for (``euler_axes``, default "zyx": RESIRE's, docs/STAGES_TOMOGRAPHY.md).

:func:`read_matlab_series` reads the authors' inputs instead of scan files: a MATLAB
projection stack (x, y, n) and its (n, 3) Euler angles [phi theta psi] in degrees, as
RESIRE's ``Main_RESIRE_*.m`` scripts load them.

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

import threading
import time
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path

import h5py
import numpy as np

from stream.files.storage import open_scan, read_attrs

# Format tag and version of the series files (stream/stages/tomo_output.py writes them; group_series
# leaves them out).
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


# ---------------------------------------------------------------- scan files

def open_when_free(path: Path, wait_s: float = 60.0) -> h5py.File:
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


def group_series(paths) -> tuple[dict, list[str]]:
    """Scan files grouped by series id (files without series metadata under None), and one
    note per file left out (series files written by :func:`stream.stages.tomo.reconstruct_series`). ValueError
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
        with open_when_free(p) as f:
            md = read_attrs(f["metadata"]) if "metadata" in f else {}
        try:
            key = series_key(md)
        except ValueError as e:
            raise ValueError(f"{p}: {e}") from None
        groups.setdefault(None if key is None else key[0], []).append(p)
    return groups, notes


# ---------------------------------------------------------------- reading a series

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
        with open_when_free(p) as f:  # ScanFileError (a ValueError) names the file
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
                             "it: --voxel-size Å ('stemstream tomo'), voxel_size_A (Python, [series])")
        if max(steps) - min(steps) > 1e-6 * max(steps):
            k = int(np.argmax(np.abs(np.array(steps) - steps[0])))
            raise ValueError(f"{paths[k]}: scan_step_A {steps[k]:g} Å differs from {paths[0]}'s "
                             f"{steps[0]:g} Å; scans of a series need one scan step (or give --voxel-size / "
                             "voxel_size_A to override)")
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


def _mat_variable(path: Path, name: str | None, what: str) -> np.ndarray:
    """One numeric array of a MATLAB file (v5 through scipy, v7.3 through h5py, whose arrays
    come out with MATLAB's dimensions reversed: they are reversed back here): the variable
    ``name``, or the only numeric array in the file."""
    from scipy.io import loadmat

    if not path.is_file():
        raise ValueError(f"{path}: no such file; give the MATLAB file of the {what}")
    try:
        d = {k: v for k, v in loadmat(path).items() if not k.startswith("__")}
    except NotImplementedError:  # v7.3: HDF5
        with h5py.File(path, "r") as f:
            d = {k: np.transpose(f[k][()]) for k in f if isinstance(f[k], h5py.Dataset)}
    except Exception as e:  # noqa: BLE001 - scipy raises several kinds
        raise ValueError(f"{path}: not a readable MATLAB file ({e}); give the {what} as a .mat file") from None
    arrays = {k: np.asarray(v) for k, v in d.items()
              if isinstance(v, np.ndarray) and v.dtype.kind in "iuf" and v.size > 1}
    if name is not None:
        if name not in arrays:
            raise ValueError(f"{path}: no numeric variable {name!r} (it has {', '.join(sorted(arrays)) or 'none'}); "
                             f"give FILE.mat:NAME for the {what}")
        return arrays[name]
    if len(arrays) != 1:
        raise ValueError(f"{path}: {len(arrays) or 'no'} numeric variables ({', '.join(sorted(arrays))}); name the "
                         f"{what} with FILE.mat:NAME")
    return next(iter(arrays.values()))


def split_mat_spec(spec) -> tuple[Path, str | None]:
    """'FILE.mat:NAME' or 'FILE.mat' -> (path, name or None)."""
    text = str(spec)
    if ":" in Path(text).name:
        head, name = text.rsplit(":", 1)
        return Path(head), name or None
    return Path(text), None


def read_matlab_series(projections, angles, *, voxel_size_A: float | None = None,
                       tilt_only: bool = False, series_id: str | None = None) -> SeriesInput:
    """A tilt series from the authors' inputs: a MATLAB projection stack and its angles.

    Parameters
    ----------
    projections : 'FILE.mat' or 'FILE.mat:NAME', a (Dim1, Dim2, n) array as RESIRE reads it:
        Dim1 = x (across the tilt axis), Dim2 = y (the tilt axis), slice k the projection at
        angles(k, :). It becomes (n, y, x) here (``np.transpose(p, (2, 1, 0))``).
    angles : 'FILE.mat' or 'FILE.mat:NAME', (n, 3) [phi theta psi] in degrees, one row per
        projection (a (3, n) array is transposed); used as they are.
    voxel_size_A : Å per pixel (the files do not say; default 1: positions in pixels).
    tilt_only : accept an (n,) or (n, 1) array of tilts as (0, theta, 0) (RESIRE's own reader
        mishandles that shape, so it is refused unless asked for).
    series_id : name of the series file (default: the projection file's stem).

    Returns
    -------
    SeriesInput (paths: the projection file for every projection; scan_ids
    'STEM[k]' in the file's order; sorted by theta). ValueError naming the file and the fix.
    """
    ppath, pname = split_mat_spec(projections)
    apath, aname = split_mat_spec(angles)
    stack = np.asarray(_mat_variable(ppath, pname, "projections"), np.float64)
    if stack.ndim != 3:
        raise ValueError(f"{ppath}: the projections have shape {stack.shape}; expected a (Dim1, Dim2, n) stack "
                         "as RESIRE reads it")
    images = np.ascontiguousarray(np.transpose(stack, (2, 1, 0)))
    n = len(images)
    ang = np.asarray(_mat_variable(apath, aname, "angles"), np.float64)
    if ang.ndim == 2 and ang.shape[1] != 3 and ang.shape[0] == 3:
        ang = ang.T
    if ang.ndim == 1 or (ang.ndim == 2 and 1 in ang.shape and ang.size == n):
        if not tilt_only:
            raise ValueError(f"{apath}: {ang.size} angles in one column; RESIRE needs (n, 3) [phi theta psi] "
                             "per projection: give those, or --tilt-only to read them as tilts (0, theta, 0)")
        t = ang.ravel()
        ang = np.stack([np.zeros_like(t), t, np.zeros_like(t)], axis=1)
    if ang.ndim != 2 or ang.shape != (n, 3):
        raise ValueError(f"{apath}: angles of shape {ang.shape} for {n} projections in {ppath}; expected ({n}, 3) "
                         "[phi theta psi] in degrees")
    for what, a, path in (("projections", images, ppath), ("angles", ang, apath)):
        if not np.isfinite(a).all():
            raise ValueError(f"{path}: the {what} hold {int((~np.isfinite(a)).sum())} NaN or infinite values")
    if n < 2:
        raise ValueError(f"{ppath}: {n} projection; a tilt series needs at least 2")
    if voxel_size_A is None:
        voxel_size_A = 1.0
    elif not (isinstance(voxel_size_A, Real) and np.isfinite(voxel_size_A) and voxel_size_A > 0):
        raise ValueError(f"voxel_size_A must be a positive number of Å, got {voxel_size_A!r}")
    order = np.argsort(ang[:, 1], kind="stable")
    stem = ppath.stem
    return SeriesInput(images[order], ang[order], ang[order, 1].copy(), [ppath] * n,
                       [f"{stem}[{k}]" for k in order], ["complete"] * n, order.astype(np.int64),
                       float(voxel_size_A), str(series_id or stem), [])
