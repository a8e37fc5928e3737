"""Ground truth of a simulated scan, and its HDF5 layout.

Everything the emulator knows that a reconstruction should recover: the atoms, the projected
atomic columns and their atom counts, which grain sits under the probe, the scan geometry,
and the noiseless expected detector signals per probe position for a stated detector geometry.
Layout: docs/EMULATOR.md, "Truth file".

Example
-------
>>> from sim_detector import simulate  # doctest: +SKIP
>>> scan = simulate.simulate_scan(simulate.make_specimen("mgo"))  # doctest: +SKIP
>>> scan.truth.write("truth.h5"); Truth.read("truth.h5").expected["adf"].shape  # doctest: +SKIP
(128, 128)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

FORMAT = "stemstream-emulator-truth"
VERSION = 1
COLUMN_TOLERANCE_A = 0.1


def find_columns(positions: np.ndarray, Z: np.ndarray, grain: np.ndarray,
                 tol_A: float = COLUMN_TOLERANCE_A) -> dict:
    """Group atoms whose projected (x, y) lie within ``tol_A`` of each other (transitively).

    Returns a dict of per-column arrays: x_A, y_A (mean position), count (atoms),
    Z_major (most frequent Z), grain (most frequent grain id), species_counts (ncol, nspecies)
    and species_Z (nspecies,), plus ``atom_column`` (N,) the column of every atom.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    xy = np.asarray(positions, float)[:, :2]
    n = len(xy)
    pairs = cKDTree(xy).query_pairs(tol_A, output_type="ndarray") if n else np.zeros((0, 2), int)
    adj = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    ncol, lab = connected_components(adj, directed=False)
    count = np.bincount(lab, minlength=ncol)
    x = np.bincount(lab, xy[:, 0], ncol) / count
    y = np.bincount(lab, xy[:, 1], ncol) / count
    species = np.unique(Z)
    sp_idx = np.searchsorted(species, Z)
    sc = np.zeros((ncol, len(species)), np.int64)
    np.add.at(sc, (lab, sp_idx), 1)
    gids = np.unique(grain)
    gc = np.zeros((ncol, len(gids)), np.int64)
    np.add.at(gc, (lab, np.searchsorted(gids, grain)), 1)
    order = np.lexsort((x, y))  # rows of columns in raster order (y, then x)
    rank = np.empty(ncol, np.int64)
    rank[order] = np.arange(ncol)
    return {"x_A": x[order], "y_A": y[order], "count": count[order],
            "Z_major": species[sc.argmax(1)][order] if ncol else np.zeros(0, np.int64),
            "grain": gids[gc.argmax(1)][order] if ncol else np.zeros(0, np.int64),
            "species_counts": sc[order], "species_Z": species, "atom_column": rank[lab]}


@dataclass
class Truth:
    """Ground truth of one simulated scan (all arrays numpy).

    atoms: positions (N, 3) Å after tilt, Z (N,), grain (N,) (-1 amorphous).
    grains: per grain dict name, lattice (3, 3) Å rows a1..a3, basis_frac, basis_Z, origin,
        thickness_A, reflections_hkl (n, 3), reflections_offset_px (n, 2) (dy, dx) of each
        Bragg disk from the direct beam, reflections_K (n,) kinematic fraction at thickness_A.
    columns: see :func:`find_columns`, plus row_px, col_px (scan pixel coordinates).
    grain_map: (ny, nx) int32 grain with the largest probe-averaged thickness, -1 where none
        exceeds GRAIN_MAP_MIN_A; grain_thickness_A: (G, ny, nx) probe-averaged thickness.
    scan: step_A, origin_x_A, origin_y_A (position of scan pixel (0, 0)), scan_shape,
        frames_per_position, flyback, tilt_deg.
    expected: (ny, nx) float64 expected electrons per frame total / bf / adf and expected
        centre of mass com_y / com_x (px from the optical axis), detector effects included.
    detector: the geometry those were computed for: frame_shape, axis_yx, mrad_per_px,
        bf_radius_px, adf_inner_px, adf_outer_px, dead_pixels, hot_pixels, hot_rate,
        dark_rate.
    model: internal maps (ny, nx): diffuse_fraction, unscattered_fraction, deflection_y_px,
        deflection_x_px, and bragg_fraction (G, ny, nx).
    metadata: the scan's metadata dict.
    """

    positions: np.ndarray
    Z: np.ndarray
    grain: np.ndarray
    grains: list = field(default_factory=list)
    columns: dict = field(default_factory=dict)
    grain_map: np.ndarray | None = None
    grain_thickness_A: np.ndarray | None = None
    scan: dict = field(default_factory=dict)
    expected: dict = field(default_factory=dict)
    detector: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)

    @property
    def tilt_deg(self) -> float:
        return float(self.scan.get("tilt_deg", 0.0))

    # ------------------------------------------------------------ masks
    def detector_masks(self):
        """(bf, adf) boolean (h, w) masks of the stated detector geometry."""
        h, w = self.detector["frame_shape"]
        ay, ax = self.detector["axis_yx"]
        yy = (np.arange(h) - ay)[:, None]
        xx = (np.arange(w) - ax)[None, :]
        d2 = xx * xx + yy * yy
        rb, ri, ro = (float(self.detector[k])
                      for k in ("bf_radius_px", "adf_inner_px", "adf_outer_px"))
        return d2 <= rb * rb, (d2 >= ri * ri) & (d2 <= ro * ro)

    # ------------------------------------------------------------ HDF5
    def write(self, target) -> None:
        """Write to an HDF5 file path (created/overwritten) or into an open h5py Group."""
        import h5py

        if isinstance(target, h5py.Group):
            self._write(target)
        else:
            with h5py.File(target, "w") as f:
                self._write(f)

    def _write(self, g) -> None:
        g.attrs["format"] = FORMAT
        g.attrs["version"] = VERSION
        g.attrs["tilt_deg"] = self.tilt_deg
        g.attrs["metadata_json"] = json.dumps(self.metadata)
        a = g.create_group("atoms")
        a.create_dataset("positions", data=self.positions, compression="gzip")
        a.create_dataset("Z", data=self.Z.astype(np.int16), compression="gzip")
        a.create_dataset("grain", data=self.grain.astype(np.int32), compression="gzip")
        a.attrs["units"] = "Å; columns x, y, z; beam along +z"
        gg = g.create_group("grains")
        gg.attrs["count"] = len(self.grains)
        for i, gr in enumerate(self.grains):
            s = gg.create_group(str(i))
            for k, v in gr.items():
                if isinstance(v, (str, float, int)):
                    s.attrs[k] = v
                else:
                    s.create_dataset(k, data=np.asarray(v))
        c = g.create_group("columns")
        for k, v in self.columns.items():
            c.create_dataset(k, data=np.asarray(v))
        c.attrs["tolerance_A"] = COLUMN_TOLERANCE_A
        s = g.create_group("scan")
        for k, v in self.scan.items():
            s.attrs[k] = v
        s.create_dataset("grain_map", data=self.grain_map.astype(np.int32))
        s.create_dataset("grain_thickness_A", data=self.grain_thickness_A, compression="gzip")
        e = g.create_group("expected")
        for k, v in self.expected.items():
            e.create_dataset(k, data=v)
        for k, v in self.detector.items():
            if k in ("dead_pixels", "hot_pixels"):
                e.create_dataset(k, data=np.asarray(v, np.uint32))
            else:
                e.attrs[k] = v
        e.attrs["units"] = ("expected electrons per frame (total, bf, adf); px from the "
                            "optical axis (com_y, com_x)")
        e.attrs["masks"] = ("pixel (y, x), d² = (x-ax)² + (y-ay)²: bf d² <= bf_radius_px²; "
                            "adf adf_inner_px² <= d² <= adf_outer_px²")
        m = g.create_group("model")
        for k, v in self.model.items():
            m.create_dataset(k, data=v, compression="gzip")

    @classmethod
    def read(cls, path) -> "Truth":
        """Read a truth written by :meth:`write` (a path, or an open h5py Group)."""
        import h5py

        if isinstance(path, h5py.Group):
            return cls._read(path)
        with h5py.File(path, "r") as f:
            return cls._read(f)

    @classmethod
    def _read(cls, g) -> "Truth":
        if g.attrs.get("format") != FORMAT:
            raise ValueError(f"{g.file.filename}: not an emulator truth file "
                             f"(format attribute {g.attrs.get('format')!r}, expected {FORMAT!r})")
        grains = []
        for i in range(int(g["grains"].attrs["count"])):
            s = g["grains"][str(i)]
            d = {k: _attr(v) for k, v in s.attrs.items()}
            d.update({k: s[k][()] for k in s})
            grains.append(d)
        det = {k: _attr(v) for k, v in g["expected"].attrs.items() if k not in ("units", "masks")}
        for k in ("dead_pixels", "hot_pixels"):
            det[k] = g["expected"][k][()]
        return cls(positions=g["atoms/positions"][()], Z=g["atoms/Z"][()].astype(np.int64),
                   grain=g["atoms/grain"][()].astype(np.int64), grains=grains,
                   columns={k: g["columns"][k][()] for k in g["columns"]},
                   grain_map=g["scan/grain_map"][()],
                   grain_thickness_A=g["scan/grain_thickness_A"][()],
                   scan={k: _attr(v) for k, v in g["scan"].attrs.items()},
                   expected={k: g["expected"][k][()] for k in g["expected"]
                             if k not in ("dead_pixels", "hot_pixels")},
                   detector=det, model={k: g["model"][k][()] for k in g["model"]},
                   metadata=json.loads(g.attrs["metadata_json"]))


def _attr(v):
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.ndarray):
        return tuple(x.item() for x in v)
    if hasattr(v, "item"):
        return v.item()
    return v
