"""The per-grain Bragg peak table of :func:`operators.crystallography.grains.grain_diffraction`, as columns,
as CSV and as HDF5 datasets. The only file code of the per-grain diffraction feature.

Examples
--------
>>> from operators.crystallography.peak_table import write_peak_table_csv, write_peak_table_h5  # doctest: +SKIP
>>> write_peak_table_csv(result, "scan_peaks.csv")                              # doctest: +SKIP
>>> with h5py.File("scan.h5", "a") as f:                                        # doctest: +SKIP
...     write_peak_table_h5(result, f.require_group("stages/grains"))
"""

from __future__ import annotations

import csv
import os

import numpy as np

FORMAT = "stemstream-grain-peaks"
VERSION = 1

# name -> (unit, description), in table order
PEAK_COLUMNS = {
    "grain": ("", "grain number (index into the grain table)"),
    "phase": ("", "phase the grain indexed to ('' not indexed, 'unknown' no candidate fits)"),
    "y_px": ("px", "disk centre, detector row (background-subtracted centroid)"),
    "x_px": ("px", "disk centre, detector column"),
    "sigma_y_px": ("px", "standard error of y_px (Poisson)"),
    "sigma_x_px": ("px", "standard error of x_px (Poisson)"),
    "qy_inv_A": ("1/Å", "g_y from the grain's direct beam"),
    "qx_inv_A": ("1/Å", "g_x from the grain's direct beam"),
    "q_inv_A": ("1/Å", "|q| in the detector plane"),
    "d_A": ("Å", "1/|q|, measured (in-plane) spacing"),
    "h": ("", "Miller index h (0 0 0 when not indexed)"),
    "k": ("", "Miller index k"),
    "l": ("", "Miller index l"),
    "indexed": ("", "1 when the peak is indexed by the grain's lattice and orientation"),
    "d_ideal_A": ("Å", "a_ref / |hkl|, the reference spacing of the reflection"),
    "qy_model_inv_A": ("1/Å", "g_y of (hkl) in the fitted lattice and orientation"),
    "qx_model_inv_A": ("1/Å", "g_x of (hkl) in the fitted lattice and orientation"),
    "excitation_error_inv_A": ("1/Å", "excitation error s of (hkl) in the fit"),
    "intensity": ("counts", "integrated counts in the disk minus background"),
    "sigma": ("counts", "standard error of intensity (Poisson: disk and background)"),
    "significance": ("σ", "disk counts over background (Li & Ma 1983)"),
}

GRAIN_COLUMNS = {
    "grain": ("", "grain number"),
    "phase": ("", "indexed phase"),
    "n_positions": ("", "probe positions in the grain's real-space aperture"),
    "a_ref_A": ("Å", "reference lattice parameter of the phase"),
    "a_fit_A": ("Å", "fitted lattice parameter"),
    "zone_axis": ("", "(G, 3) low-index direction [uvw] nearest the beam"),
    "zone_angle_deg": ("degrees", "angle between the beam and zone_axis"),
    "lattice_A": ("Å", "(G, 3, 3) rows a1, a2, a3 of the fitted cell, specimen frame"),
    "orientation": ("", "(G, 3, 3) rotation crystal -> specimen frame"),
    "center_yx_px": ("px", "(G, 2) direct beam in the grain's summed pattern"),
    "n_peaks": ("", "Bragg peaks found"),
    "n_indexed": ("", "peaks indexed"),
    "rms_residual_inv_A": ("1/Å", "RMS |q - q_model| of the indexed peaks"),
}


def peak_table(result) -> dict:
    """Columns of the peak table (one row per peak), each a (P,) numpy array, keyed and
    ordered as :data:`PEAK_COLUMNS`. ``result`` is a :class:`~operators.crystallography.grains.
    GrainDiffraction`."""
    r = result
    g = np.asarray(r.peak_grain, np.int64)
    phase = np.asarray(r.grain_phase)[g] if len(g) else np.zeros(0, dtype="U16")
    hkl = np.asarray(r.peak_hkl).reshape(-1, 3)
    cols = {
        "grain": g, "phase": phase,
        "y_px": r.peak_yx[:, 0], "x_px": r.peak_yx[:, 1],
        "sigma_y_px": r.peak_sigma_yx[:, 0], "sigma_x_px": r.peak_sigma_yx[:, 1],
        "qy_inv_A": r.peak_q_yx[:, 0], "qx_inv_A": r.peak_q_yx[:, 1],
        "q_inv_A": r.peak_q, "d_A": r.peak_d_A,
        "h": hkl[:, 0], "k": hkl[:, 1], "l": hkl[:, 2],
        "indexed": np.asarray(r.peak_indexed, np.int8),
        "d_ideal_A": r.peak_d_ideal_A,
        "qy_model_inv_A": r.peak_q_model_yx[:, 0], "qx_model_inv_A": r.peak_q_model_yx[:, 1],
        "excitation_error_inv_A": r.peak_excitation_error,
        "intensity": r.peak_intensity, "sigma": r.peak_sigma,
        "significance": r.peak_significance,
    }
    return {k: np.asarray(cols[k]) for k in PEAK_COLUMNS}


def grain_table(result) -> dict:
    """Columns of the per-grain table, keyed as :data:`GRAIN_COLUMNS` (first axis G)."""
    r = result
    cols = {
        "grain": np.arange(r.n_grains), "phase": np.asarray(r.grain_phase),
        "n_positions": r.grain_n_positions, "a_ref_A": r.grain_a_ref_A,
        "a_fit_A": r.grain_a_fit_A, "zone_axis": r.grain_zone_axis,
        "zone_angle_deg": r.grain_zone_angle_deg, "lattice_A": r.grain_lattice,
        "orientation": r.grain_orientation, "center_yx_px": r.grain_center_yx,
        "n_peaks": r.grain_n_peaks, "n_indexed": r.grain_n_indexed,
        "rms_residual_inv_A": r.grain_rms_inv_A,
    }
    return {k: np.asarray(cols[k]) for k in GRAIN_COLUMNS}


def _cell(v):
    if isinstance(v, (np.floating, float)):
        return format(float(v), ".9g")  # nan stays "nan"
    if isinstance(v, (np.integer, int)):
        return str(int(v))
    return str(v)


def write_peak_table_csv(result, path) -> str:
    """Write the peak table as CSV: a header row of :data:`PEAK_COLUMNS` names, then one
    row per peak (floats to 9 significant digits, ``nan`` where undefined). Returns the
    path. Raises ValueError naming the path if it cannot be written."""
    path = os.fspath(path)
    cols = peak_table(result)
    rows = zip(*(list(v) for v in cols.values()))
    try:
        with open(path, "w", newline="", encoding="utf-8") as fh:
            wr = csv.writer(fh)
            wr.writerow(list(cols))
            for row in rows:
                wr.writerow([_cell(v) for v in row])
    except OSError as exc:
        raise ValueError(f"peak table CSV {path!r}: cannot write ({exc})") from None
    return path


def write_peak_table_h5(result, group) -> None:
    """Write the peak and grain tables into an open h5py Group: datasets ``peaks/<column>``
    ((P,) each) and ``grains/<column>`` (first axis G), each with attributes ``unit`` and
    ``description``; strings as fixed-length UTF-8 bytes. Group attributes: ``format``,
    ``version``, ``wavelength_A``, ``inv_A_per_px``, ``center_yx_px``, ``disk_radius_px``,
    ``n_grains``, ``n_peaks``. Existing ``peaks``/``grains`` subgroups are replaced."""
    for name, cols, meta in (("peaks", peak_table(result), PEAK_COLUMNS),
                             ("grains", grain_table(result), GRAIN_COLUMNS)):
        if name in group:
            del group[name]
        sub = group.create_group(name)
        for key, values in cols.items():
            if values.dtype.kind == "U":
                width = max(1, max((len(v.encode()) for v in values.tolist()), default=1))
                values = np.array([v.encode() for v in values.tolist()], dtype=f"S{width}")
            ds = sub.create_dataset(key, data=values)
            ds.attrs["unit"], ds.attrs["description"] = meta[key]
    group.attrs["format"] = FORMAT
    group.attrs["version"] = VERSION
    group.attrs["wavelength_A"] = float(result.wavelength_A)
    group.attrs["inv_A_per_px"] = float(result.inv_A_per_px)
    group.attrs["center_yx_px"] = np.asarray(result.center_yx, float)
    group.attrs["disk_radius_px"] = float(result.disk_radius_px)
    group.attrs["n_grains"] = int(result.n_grains)
    group.attrs["n_peaks"] = int(len(result.peak_grain))
