"""Tilt series: reconstruct one series into a series file (issue 7, item 1).

:func:`reconstruct_series` turns the scan files of a series (complete or not; collected by
``stream/series.py``) into one series file ``<out_dir>/<series_id>-tomo.h5``: aligned
projections, the RESIRE volume and its R-factor, the traced atoms and their statistics, plus
CSV tables and PNG previews beside it (written by ``stream/tomo_output.py``).
:func:`read_series` reads the projections and tilts; :func:`check_series_params` checks a
``[series]`` configuration table; :func:`add_tomo_args` / :func:`run_tomo` are
``stemstream tomo``. The algorithms are in ``operators/tomography.py``,
``operators/tracing.py`` and ``operators/atom_tables.py``; the file layout and the
conventions (angles: ``stream/series.py``) are in docs/SERIES.md.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path

import h5py
import numpy as np

from .series import open_when_free, group_series, projection_angles, series_key
from .storage import read_attrs
from .tomo_output import write_atomically, write_series_file, write_series_previews, write_series_tables

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
        write_series_file(f, s, b, shifts, reference, align, rec, vox, atoms, stats, error, params)
        f.attrs.update(headline=head, seconds=time.perf_counter() - t0)

    out_dir.mkdir(parents=True, exist_ok=True)
    path = write_atomically(out_dir / f"{_file_stem(s.series_id)}-tomo.h5", write)
    seconds = time.perf_counter() - t0
    headline = f"{head}; {seconds:.0f} s -> {path.name}"
    csvs, pngs = write_series_tables(path, s, shifts, rec, atoms, stats), []
    if previews:
        try:
            pngs = write_series_previews(path, s, rec, atoms, stats)
        except Exception as e:  # noqa: BLE001 - a preview is not worth a reconstruction
            s.warnings.append(f"previews not written: {type(e).__name__}: {e}")
    return SeriesResult(path, s.series_id, len(b), float(rec.r_factor[0]), float(rec.r_factor[-1]), n_atoms,
                        seconds, headline, csvs, pngs, s.warnings, error)



# ---------------------------------------------------------------- command line

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
                with open_when_free(paths[0]) as f:
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
