"""Tilt series: write the series file of a reconstruction (issue 7, item 1).

The writers :func:`stream.stages.tomo.reconstruct_series` calls: the HDF5 series file
``<series_id>-tomo.h5`` (written under a temporary name, then linked, never overwriting), the
CSV tables beside it and the PNG previews in ``previews/``. The file layout is in
docs/SERIES.md.
"""

from __future__ import annotations

import csv
import json
import os
import uuid
from datetime import datetime
from pathlib import Path

import h5py
import numpy as np

from stream import __version__
from stream.files.storage import link_unique
from stream.stages.series import SERIES_FORMAT, SERIES_FORMAT_VERSION, SeriesInput


# ---------------------------------------------------------------- writing

def write_atomically(target: Path, write) -> Path:
    """Write through ``write(h5py.File)`` under a temporary name, then give it ``target``'s name
    or ``stem-2``, ``stem-3``, … (stream.files.storage: nothing is ever overwritten)."""
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


def write_series_file(f, s: SeriesInput, b, shifts, reference, align, rec, vox, atoms, stats, error,
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
    src.create_dataset("euler_deg", data=s.angles).attrs["unit"] = \
        f"degrees (phi, theta, psi) about the axes {rec.axes} (M = R_{rec.axes[0]}(phi) R_{rec.axes[1]}(theta) " \
        f"R_{rec.axes[2]}(psi))"
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
        from operators.structure.atom_tables import write_hdf5

        write_hdf5(stats, f.create_group("statistics"))


def _write_csv(path: Path, cols: dict) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(list(cols))
        for row in zip(*(np.asarray(c).tolist() for c in cols.values())):
            w.writerow([f"{v:.7g}" if isinstance(v, float) else v for v in row])
    return path


def write_series_tables(path: Path, s: SeriesInput, shifts, rec, atoms, stats) -> list[Path]:
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
        from operators.structure.atom_tables import write_csv, write_summary_csv

        out += [write_csv(stats, f"{stem}_atoms.csv"), write_summary_csv(stats, f"{stem}_summary.csv")]
    elif atoms is not None:
        p = atoms.positions_A
        out.append(_write_csv(Path(f"{stem}_atoms.csv"), {
            "x": p[:, 0], "y": p[:, 1], "z": p[:, 2], "correlation": atoms.correlation,
            "peak_intensity": atoms.peak_intensity, "coordination": atoms.coordination}))
    return [Path(p) for p in out]


def write_series_previews(path: Path, s: SeriesInput, rec, atoms, stats) -> list[Path]:
    """previews/<stem>_rfactor.png, <stem>_volume.png (central slices and sums along each axis,
    traced atoms marked on the sums) and the statistics histograms <stem>_atoms_*.png."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from operators.tomography.reconstruct import plot_r_factor
    from stream.files.previews import add_colorbar

    directory = path.parent / "previews"
    directory.mkdir(parents=True, exist_ok=True)
    out = [plot_r_factor(rec.r_factor, directory / f"{path.stem}_rfactor.png",
                         title=f"{s.series_id}: RESIRE R-factor")]
    v = rec.volume
    nz, ny, nx = v.shape
    vox = s.voxel_size_A
    fig = Figure(figsize=(12, 7.2))
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
        im = ax.imshow(img, cmap="gray", extent=extent, interpolation="nearest")
        add_colorbar(ax, im, "intensity per voxel" if cols is None else "summed intensity")
        if cols is not None and atoms is not None and len(atoms.positions_A):
            ax.plot(atoms.positions_A[:, cols[0]], atoms.positions_A[:, cols[1]], "+", color="tab:red",
                    ms=3, mew=0.6)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(labels[xy[0]], fontsize=8)
        ax.set_ylabel(labels[xy[1]], fontsize=8)
        ax.tick_params(labelsize=7)
    n = 0 if atoms is None else len(atoms.positions_A)
    fig.suptitle(f"{s.series_id}: RESIRE reconstruction, "
                 f"{nz}x{ny}x{nx} voxels of {vox:.3g} Å, R {rec.r_factor[-1]:.3f}"
                 + (f", {n} atoms (+)" if atoms is not None else ""), fontsize=10)
    fig.tight_layout()
    target = directory / f"{path.stem}_volume.png"
    fig.savefig(target, dpi=80)
    out.append(target)
    if stats is not None:
        from operators.structure.atom_tables import write_histograms

        out += write_histograms(stats, directory, stem=f"{path.stem}_atoms")
    return [Path(p) for p in out]
