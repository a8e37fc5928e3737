"""Tilt series: reconstruct one series into a series file (issue 7, item 1).

:func:`reconstruct_series` turns the scan files of a series (complete or not; collected by
``stream/stages/series.py``) into one series file ``<out_dir>/<series_id>-tomo.h5``: aligned
projections, the RESIRE volume and its R-factor, the traced atoms and their statistics, plus
CSV tables and PNG previews beside it (written by ``stream/stages/tomo_output.py``).
:func:`check_series_params` checks a
``[series]`` configuration table; :func:`add_tomo_args` / :func:`run_tomo` are
``stemstream tomo``. The algorithms are in ``operators/tomography/reconstruct.py``,
``operators/tomography/tracing.py`` and ``operators/structure/atom_tables.py``; the file layout and the
conventions (angles: ``stream/stages/series.py``) are in docs/SERIES.md.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path

import h5py
import numpy as np

from stream.stages.series import SeriesInput, group_series, open_when_free, read_series, series_key  # noqa: F401 - SeriesInput re-exported
from stream.files.storage import cannot_write, output_dir, read_attrs
from stream.stages.tomo_output import write_atomically, write_series_file, write_series_previews, write_series_tables

# ---------------------------------------------------------------- reconstruction

# Keyword defaults of reconstruct_series: a ``[series]`` configuration table can be checked
# against them (check_series_params).
SERIES_DEFAULTS = {
    "image": "adf", "iterations": 100, "step_scale": 1.0, "align": "com", "background": "border",
    "tilt_sign": -1.0, "euler_axes": "zyx", "voxel_size_A": None, "volume_shape": None, "atom_sigma_A": 0.45,
    "trace": True, "trace_options": None, "statistics": True, "lattice": "auto",
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
                       tilt_sign: float = -1.0, euler_axes: str = "zyx", voxel_size_A: float | None = None,
                       volume_shape=None,
                       atom_sigma_A: float = 0.45, trace: bool = True, trace_options: dict | None = None,
                       statistics: bool = True, lattice: str = "auto", statistics_options: dict | None = None,
                       previews: bool = True, series_id: str | None = None,
                       series: SeriesInput | None = None) -> SeriesResult:
    """Reconstruct a tilt series from its scan files and write ``<out_dir>/<series_id>-tomo.h5``.

    Parameters
    ----------
    paths : scan files (any order; sorted by theta here), at least 2.
    out_dir : directory of the series file (default: the first scan's); CSV tables go beside
        it, PNG previews into ``out_dir/previews``.
    image : the scan result used as projection (``/results/<image>``), default "adf".
    iterations, step_scale : RESIRE gradient steps and s in t = s / (n · nz).
    align : "com", "xcorr", "com+xcorr" (``operators.tomography.reconstruct.align_projections``) or
        "none" (the scans are centred on the tilt axis already).
    background : "border" (subtract each image's border median, the vacuum level: isolated
        particles), "none" (films), or a number subtracted from every image.
    tilt_sign : theta = tilt_sign · tilt_deg (−1: the emulator's convention); scans whose
        metadata gives ``euler_deg`` use it as it is.
    euler_axes : rotation axes of (phi, theta, psi): "zyx" (default, RESIRE's published
        scripts: M = Rz(phi) Ry(theta) Rx(psi)) or e.g. "zyz"; matters only where phi or psi
        is not 0.
    voxel_size_A : Å per voxel; default the scans' ``scan_step_A``.
    volume_shape : (nz, ny, nx); default (w, h, w).
    atom_sigma_A, trace, trace_options : atom tracing (``operators.tomography.tracing.trace_atoms``
        keyword arguments in trace_options); trace=False stops after the reconstruction.
    statistics, lattice, statistics_options : per-atom statistics
        (``operators.structure.atom_tables.atom_statistics`` keyword arguments in statistics_options).
        A failure of tracing or of the statistics is recorded in the file and the result
        (``error``), not raised: the volume is kept.
    previews : write the PNG previews.
    series_id : name of the series file; default the scans' series_id (or the first file's
        stem).
    series : a SeriesInput already read (``read_matlab_series`` for the authors' MATLAB
        inputs); ``paths``, ``image``, ``tilt_sign`` and ``voxel_size_A`` are then not used.

    Returns
    -------
    SeriesResult. Positions are (x, y, z) Å relative to the centre voxel, the rotation centre
    (docs/SERIES.md). ValueError naming the file and the fix for bad input (:func:`read_series`).
    """
    from operators.structure.atom_tables import atom_statistics
    from operators.structure.lattices import bulk_coordination
    from operators.tomography.projector import check_axes
    from operators.tomography.reconstruct import align_projections, resire
    from operators.tomography.tracing import trace_atoms

    t0 = time.perf_counter()
    if align not in ("com", "xcorr", "com+xcorr", "none"):
        raise ValueError(f"align must be 'com', 'xcorr', 'com+xcorr' or 'none', got {align!r}")
    if not (background in ("border", "none") or (isinstance(background, Real) and np.isfinite(background))):
        raise ValueError(f"background must be 'border', 'none' or a number, got {background!r}")
    if not (isinstance(atom_sigma_A, Real) and np.isfinite(atom_sigma_A) and atom_sigma_A > 0):
        raise ValueError(f"atom_sigma_A must be a positive number of Å, got {atom_sigma_A!r}")
    if statistics and lattice not in ("amorphous", "auto"):
        bulk_coordination(lattice)  # names the valid lattices, before a long reconstruction
    _check_options(trace_atoms, trace_options, "trace_options", ("volume", "voxel_size_A", "atom_sigma_A"))
    _check_options(atom_statistics, statistics_options, "statistics_options",
                   ("positions", "intensities", "lattice", "volume", "voxel_size"))
    euler_axes = check_axes(euler_axes)
    s = series if series is not None else \
        read_series(paths, image, tilt_sign=tilt_sign, voxel_size_A=voxel_size_A, series_id=series_id)
    out_dir = output_dir(out_dir if out_dir is not None else s.paths[0].parent, "the output directory")
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
                             "(vacuum level), so it has no centre of mass: leave the scan out, or align by "
                             "cross-correlation (--align xcorr; align='xcorr' in Python)")
    if align == "none":
        shifts, reference = np.zeros((len(b), 2)), int(np.argmin(np.abs(s.angles[:, 1])))
    else:
        al = align_projections(b, s.angles, method=align,
                               background=0.0 if background != "none" else None)
        b, shifts, reference = al.projections, al.shifts_px, al.reference
    rec = resire(b, s.angles, iterations=iterations, step_scale=step_scale, volume_shape=volume_shape,
                 axes=euler_axes)

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
            if stats is not None and stats.displacement_note:
                s.warnings.append(stats.displacement_note + (" (voxels are the scans' step unless "
                                  "--voxel-size says otherwise)" if "not fitted" in stats.displacement_note else ""))
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
        head += f" (lattice {stats.lattice}, CN mean {stats.cn_mean:.2f}"
        head += f", a = {stats.lattice_constant:.3f} Å)" if np.isfinite(stats.lattice_constant) else ")"
    if error:
        head += f"; {error}"
    params = {"image": image, "iterations": iterations, "step_scale": step_scale, "align": align,
              "background": background, "tilt_sign": tilt_sign, "euler_axes": euler_axes, "voxel_size_A": vox,
              "volume_shape": list(rec.volume.shape), "atom_sigma_A": atom_sigma_A, "trace": trace,
              "trace_options": trace_options or {}, "statistics": statistics, "lattice": lattice,
              "statistics_options": statistics_options or {}}

    def write(f: h5py.File) -> None:
        write_series_file(f, s, b, shifts, reference, align, rec, vox, atoms, stats, error, params)
        f.attrs.update(headline=head, seconds=time.perf_counter() - t0)

    try:
        path = write_atomically(out_dir / f"{_file_stem(s.series_id)}-tomo.h5", write)
    except OSError as e:
        raise cannot_write(out_dir / f"{_file_stem(s.series_id)}-tomo.h5", e) from None
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
    p.add_argument("files", nargs="*", metavar="FILE",
                   help="scan files of one or more tilt series (grouped by their metadata series_id)")
    p.add_argument("--projections", metavar="FILE.mat[:NAME]",
                   help="instead of scan files: a MATLAB projection stack (x, y, n), as RESIRE reads it")
    p.add_argument("--angles", metavar="FILE.mat[:NAME]",
                   help="with --projections: the (n, 3) Euler angles [phi theta psi] in degrees")
    p.add_argument("--tilt-only", action="store_true",
                   help="with --angles: accept one tilt per projection, read as (0, theta, 0)")
    p.add_argument("--euler-axes", default="zyx", metavar="AXES",
                   help="rotation axes of phi, theta, psi (default zyx: RESIRE's M = Rz(phi) Ry(theta) Rx(psi); "
                        "zyz for GENFIRE-style angles)")
    p.add_argument("--film-thickness", type=int, metavar="PX",
                   help="reconstruct a film of this thickness (voxels) in a volume that holds every ray "
                        "through it (RESIRE's extended object)")
    p.add_argument("--out", metavar="DIR", help="output directory (default: the first scan's)")
    p.add_argument("--series-id", metavar="NAME", help="reconstruct all FILEs as one series of this name")
    p.add_argument("--image", default="adf", help="scan result used as projection (default adf)")
    p.add_argument("--iterations", type=int, default=100, help="RESIRE iterations (default 100)")
    p.add_argument("--step-scale", type=float, default=1.0, help="RESIRE step scale s, 0 < s <= 3 (default 1)")
    p.add_argument("--align", choices=["com", "xcorr", "com+xcorr", "none"], default=None,
                   help="projection alignment (default com: centre of mass, for isolated particles; none with "
                        "--projections, which are aligned already)")
    p.add_argument("--background", default=None,
                   help="border (subtract the vacuum level at the image border; default), none (films; default "
                        "with --projections), or a number")
    p.add_argument("--tilt-sign", type=float, choices=[-1.0, 1.0], default=-1.0,
                   help="theta = sign x tilt_deg (default -1: the emulator's convention)")
    p.add_argument("--voxel-size", type=float, metavar="Å", help="voxel size (default: the scans' scan_step_A)")
    p.add_argument("--atom-sigma", type=float, default=0.45, metavar="Å", help="atom width for tracing (0.45)")
    p.add_argument("--lattice", default="auto",
                   help="auto (default: inferred from the traced atoms), fcc, bcc, bcc14, hcp, sc or amorphous")
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

    matlab = args.projections is not None or args.angles is not None
    background = args.background or ("none" if matlab else "border")
    align = args.align or ("none" if matlab else "com")
    if background not in ("border", "none"):
        try:
            background = float(background)
        except ValueError:
            return fail(f"--background must be border, none or a number, got {background!r}")
    if matlab:
        return _run_matlab(args, align, background, fail)
    if not args.files:
        return fail("give scan files, or --projections FILE.mat --angles FILE.mat")
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
                                   step_scale=args.step_scale, align=align, background=background,
                                   tilt_sign=args.tilt_sign, euler_axes=args.euler_axes,
                                   voxel_size_A=args.voxel_size,
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


def _run_matlab(args, align, background, fail) -> int:
    """``stemstream tomo --projections P.mat --angles A.mat``: the authors' inputs."""
    from operators.tomography.reconstruct import extended_volume_shape
    from stream.stages.series import read_matlab_series

    if args.projections is None or args.angles is None:
        return fail("--projections and --angles go together: the MATLAB stack and its (n, 3) Euler angles")
    if args.files:
        return fail("give either scan files or --projections/--angles, not both")
    from operators.tomography.projector import check_axes

    try:
        check_axes(args.euler_axes)
        s = read_matlab_series(args.projections, args.angles, voxel_size_A=args.voxel_size,
                               tilt_only=args.tilt_only, series_id=args.series_id)
        shape = None
        if args.film_thickness is not None:
            if args.film_thickness < 1:
                return fail(f"--film-thickness must be a positive number of voxels, got {args.film_thickness}")
            shape = extended_volume_shape(s.images.shape[1:], s.angles, args.film_thickness,
                                          axes=args.euler_axes)
        print(f"stemstream tomo: {len(s.images)} projections of {s.images.shape[1]}x{s.images.shape[2]} px "
              f"from {args.projections}, Euler axes {args.euler_axes}", flush=True)
        out = args.out if args.out is not None else Path(str(args.projections).rsplit(":", 1)[0]).parent
        r = reconstruct_series([], out, iterations=args.iterations, step_scale=args.step_scale, align=align,
                               background=background, euler_axes=args.euler_axes, volume_shape=shape,
                               atom_sigma_A=args.atom_sigma, trace=not args.no_trace,
                               statistics=not args.no_statistics, lattice=args.lattice,
                               previews=not args.no_previews, series=s)
    except ValueError as e:
        return fail(str(e))
    print(f"[{r.series_id}] {r.headline}", flush=True)
    for w in r.warnings:
        print(f"WARNING [{r.series_id}] {w}", flush=True)
    return 1 if r.error else 0
