"""3D atom statistics of one sample: the entry function, and the per-atom table as CSV, HDF5
and histogram PNGs.

:func:`atom_statistics` runs every statistic of ``operators.structure.lattices``, ``coordination``,
``displacement``, ``depth_profile``, ``pair_distribution``, ``order3d``, ``voronoi`` and
``motifs`` on a set of atom positions and returns one :class:`AtomStatistics`:
per-atom arrays (the table), per-sample numbers and strings (the summary) and the pair
distribution function. The writers put the table into a CSV file or an h5py group and draw
the histograms with matplotlib's object API on an Agg canvas (no pyplot, as
``stream/files/previews.py``). They are the only code here that touches files.

Examples
--------
>>> import numpy as np
>>> from operators.structure.atom_tables import atom_statistics
>>> g = np.stack(np.meshgrid(*[np.arange(4)] * 3, indexing="ij"), -1).reshape(-1, 3)
>>> fcc = (g[:, None] + np.array([[0, 0, 0], [.5, .5, 0], [.5, 0, .5], [0, .5, .5]])).reshape(-1, 3)
>>> s = atom_statistics(fcc * 3.924, pdf_r_max=6.0)     # the lattice is inferred: fcc
>>> s.lattice, round(s.lattice_constant, 3), int(s.cn.max()), s.gcn_convention
('fcc', 3.924, 12, 'calle-vallejo')
"""

from __future__ import annotations

import csv
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from operators.structure.coordination import bond_lengths, generalized_coordination, radial_strain
from operators.structure.depth_profile import penetration_depth, surface_depth
from operators.structure.displacement import displacement_fit, zscore
from operators.structure.lattice_inference import infer_lattice
from operators.structure.lattices import (bulk_coordination, fit_lattice_constant, lattice_cutoff,
                                          lattice_density, nearest_neighbor_distance)
from operators.structure.motifs import KIND_NAMES, atom_motif_counts, find_motifs, motif_summary
from operators.structure.neighbors import check_per_atom, check_positions, nearest_distance, neighbor_list, triangulate
from operators.structure.order3d import bond_orientational_order
from operators.structure.pair_distribution import first_valley, pair_distribution
from operators.structure.voronoi import index_histogram, voronoi_indices

# Per-atom columns of the table, with units ('' = dimensionless or a count).
COLUMNS = {
    "x": "Å", "y": "Å", "z": "Å", "cn": "", "gcn": "", "bond_length": "Å",
    "nearest_distance": "Å", "radial_strain": "", "depth": "Å",
    "q4": "", "q6": "", "q4_bar": "", "q6_bar": "", "order": "", "crystalline": "",
    "crystalline_raw": "", "voronoi_n3": "", "voronoi_n4": "", "voronoi_n5": "", "voronoi_n6": "",
    "voronoi_cn": "", "voronoi_status": "", "voronoi_volume": "Å³", "n_tetrahedra": "",
    "n_triplet": "", "n_quadrilateral": "", "n_pentagonal": "", "n_hexagonal": "",
    "n_heptagonal": "", "n_octagonal": "", "pb_network": "", "pb_network_size": "",
    "intensity": "", "intensity_z": "", "sigma_iso": "Å", "sigma_1": "Å", "sigma_2": "Å",
    "sigma_3": "Å", "isotropy": "",
}


@dataclass(frozen=True)
class AtomStatistics:
    """Statistics of one sample. Per-atom fields are (N,) arrays (``positions`` (N, 3),
    ``voronoi_index`` (N, 4), ``sigma_principal`` (N, 3)); NaN / −1 where undefined.

    Per atom: positions Å; cn (int) atoms within ``cutoff``; gcn (``gcn_convention``);
    bond_length Å, mean distance to those neighbours; nearest_distance Å; radial_strain;
    depth Å below the convex-hull surface; q4, q6, q4_bar, q6_bar, order; crystalline (after
    the authors' cleaning of isolated crystalline atoms) and crystalline_raw (order > 0.5);
    voronoi_index ⟨n3,n4,n5,n6⟩ of the recomputed cell and voronoi_cn, its number of faces
    (−1: not indexed, voronoi_status says why: ``voronoi.STATUS``), voronoi_volume Å³ (the
    whole tessellation's cell); n_tetrahedra, n_triplet, n_quadrilateral, n_pentagonal,
    n_hexagonal, n_heptagonal, n_octagonal (motifs holding the atom), pb_network /
    pb_network_size (largest pentagonal-bipyramid network holding the atom, −1/0);
    intensity (given peak heights or fitted amplitudes), intensity_z; sigma_iso Å,
    sigma_principal Å, isotropy (from the volume; NaN without one).

    Per sample: see :meth:`summary`. pdf_*: the pair distribution function. Other arrays
    (HDF5 groups ``voronoi`` and ``motifs``): voronoi_top_labels / _counts / _fractions (the 20
    most frequent indices of the indexed cells), pb_vertex_sharing_hist and
    pb_edge_sharing_hist (selected pentagonal bipyramids by the number of others sharing one
    / two tetrahedra with them), icosahedral_filling (12,), network_size_{4,5,6} and
    network_length_{4,5,6} (Å; NaN below 5 motifs).
    """

    positions: np.ndarray
    cn: np.ndarray
    gcn: np.ndarray
    bond_length: np.ndarray
    nearest_distance: np.ndarray
    radial_strain: np.ndarray
    depth: np.ndarray
    q4: np.ndarray
    q6: np.ndarray
    q4_bar: np.ndarray
    q6_bar: np.ndarray
    order: np.ndarray
    crystalline: np.ndarray
    crystalline_raw: np.ndarray
    voronoi_index: np.ndarray
    voronoi_cn: np.ndarray
    voronoi_status: np.ndarray
    voronoi_volume: np.ndarray
    n_tetrahedra: np.ndarray
    n_triplet: np.ndarray
    n_quadrilateral: np.ndarray
    n_pentagonal: np.ndarray
    n_hexagonal: np.ndarray
    n_heptagonal: np.ndarray
    n_octagonal: np.ndarray
    pb_network: np.ndarray
    pb_network_size: np.ndarray
    intensity: np.ndarray
    intensity_z: np.ndarray
    sigma_iso: np.ndarray
    sigma_principal: np.ndarray
    isotropy: np.ndarray
    # per sample
    n_atoms: int
    lattice: str
    lattice_source: str
    lattice_constant: float
    cutoff: float
    cutoff_source: str
    bond_length_ideal: float
    gcn_convention: str
    gcn_norm: str
    cn_mean: float
    bond_length_mean: float
    crystalline_fraction: float
    crystalline_fraction_raw: float
    n_crystalline: int
    n_crystalline_raw: int
    voronoi_atoms: str
    voronoi_recompute: bool
    voronoi_n_indexed: int
    voronoi_valid_fraction: float
    voronoi_top_index: str
    voronoi_top_fraction: float
    icosahedral_fraction: float
    voronoi_0_2_8_x_fraction: float
    voronoi_0_1_10_x_fraction: float
    voronoi_face_fraction_n3: float
    voronoi_face_fraction_n4: float
    voronoi_face_fraction_n5: float
    voronoi_face_fraction_n6: float
    voronoi_cn_mean: float
    voronoi_cn_mean_compact: float
    delta_max: float
    motif_selection: str
    n_tetrahedra_total: int
    n_amorphous_tetrahedra: int
    tetrahedral_atom_fraction: float
    n_triplets: int
    n_quadrilateral_bipyramids: int
    n_pentagonal_bipyramids: int
    n_hexagonal_bipyramids: int
    n_heptagonal_bipyramids: int
    n_octagonal_bipyramids: int
    triplet_tetrahedron_fraction: float
    quadrilateral_tetrahedron_fraction: float
    pentagonal_tetrahedron_fraction: float
    hexagonal_tetrahedron_fraction: float
    heptagonal_tetrahedron_fraction: float
    octagonal_tetrahedron_fraction: float
    n_selected_pentagonal: int
    n_pb_networks: int
    pb_network_max: int
    pb_network_length_max: float
    n_networks_4fold: int
    network_max_4fold: int
    n_networks_6fold: int
    network_max_6fold: int
    penetration_statistic: str
    penetration_depth: float
    penetration_surface_value: float
    penetration_slope: float
    penetration_core_value: float
    sigma_iso_mean: float
    pdf_r: np.ndarray
    pdf_g: np.ndarray
    pdf_pairs: np.ndarray
    pdf_density: float
    pdf_correction: str
    voronoi_top_labels: np.ndarray
    voronoi_top_counts: np.ndarray
    voronoi_top_fractions: np.ndarray
    pb_vertex_sharing_hist: np.ndarray
    pb_edge_sharing_hist: np.ndarray
    icosahedral_filling: np.ndarray
    network_size_4: np.ndarray
    network_size_5: np.ndarray
    network_size_6: np.ndarray
    network_length_4: np.ndarray
    network_length_5: np.ndarray
    network_length_6: np.ndarray
    fit_radius: float = float("nan")  # Å patch radius of the displacement fit (NaN: not fitted)
    displacement_note: str = ""  # why the displacement fit used another radius or did not run

    def table(self) -> dict[str, np.ndarray]:
        """The per-atom table: column name → (N,) array, in ``COLUMNS`` order."""
        t = {"x": self.positions[:, 0], "y": self.positions[:, 1], "z": self.positions[:, 2]}
        for k, name in enumerate(("voronoi_n3", "voronoi_n4", "voronoi_n5", "voronoi_n6")):
            t[name] = self.voronoi_index[:, k]
        for k in range(3):
            t[f"sigma_{k + 1}"] = self.sigma_principal[:, k]
        return {name: (t[name] if name in t else getattr(self, name)) for name in COLUMNS}

    def summary(self) -> dict[str, float | int | str]:
        """Per-sample numbers and strings (everything but the per-atom and g(r) arrays)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if not isinstance(getattr(self, f.name), np.ndarray)}


def _nanmean(v) -> float:
    v = np.asarray(v, np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else float("nan")


def atom_statistics(positions, intensities=None, *, lattice: str = "auto",
                    lattice_constant: float | None = None, cutoff: float | None = None,
                    min_distance: float = 0.1, gcn_convention: str = "calle-vallejo",
                    gcn_max: float | None = None, volume=None, voxel_size=None,
                    volume_origin="center", volume_axes: str = "zyx",
                    fit_radius: float | None = None,
                    blur_sigma: float = 0.0, center=None, order_threshold: float = 0.5,
                    clean_crystalline: bool = True, area_fraction: float = 0.01,
                    voronoi_atoms: str = "amorphous", voronoi_recompute: bool = True,
                    delta_max: float = 0.255, alpha: float | None = 4.0,
                    motif_selection: str = "published",
                    pdf_r_max: float = 12.0, pdf_dr: float = 0.05, pdf_domain="alpha",
                    penetration_of: str = "bond_length", voronoi: bool = True,
                    motifs: bool = True) -> AtomStatistics:
    """Every per-atom and per-sample statistic of one atomic model.

    Parameters
    ----------
    positions : (N, 3) Å; N ≥ 5 atoms, not all in a plane.
    intensities : (N,) per-atom peak heights (any unit) for the z-score, or None (then the
        fitted amplitudes, when a volume is given).
    lattice : 'auto' (default: inferred from the data, ``lattice_inference.infer_lattice``,
        which refuses with a ValueError when the atoms are crystalline in no known lattice),
        'fcc', 'bcc', 'bcc14', 'hcp', 'sc' (cutoffs in ``operators.structure.lattices``) or
        'amorphous'.
    lattice_constant : Å; fitted to the first-shell distances when None (not for amorphous).
    cutoff : neighbour shell, Å; overrides the lattice cutoff. For 'amorphous' it defaults to
        the first valley of g(r) (4.12 Å for the Ta film).
    min_distance : neighbours closer than this (Å) are ignored.
    gcn_convention : 'calle-vallejo' (÷ gcn_max, default the bulk CN; 12 for amorphous) or
        'single' (÷ the largest neighbour CN).
    volume, voxel_size, volume_origin, volume_axes : the reconstructed volume for the
        displacement fit (skipped when None); by default indexed [z, y, x] with positions
        relative to its centre voxel, as ``operators.tomography.tracing`` returns them (see
        ``displacement.displacement_fit``).
    fit_radius : Å patch radius of the displacement fit (default 0.45 × median nearest
        distance). blur_sigma : Å removed in quadrature from the widths.
    center : (3,) Å, centre for the radial strain (default the centroid).
    order_threshold, clean_crystalline : crystalline when order > order_threshold, then the
        authors' cleaning of isolated crystalline atoms (``order3d.clean_crystalline``;
        False keeps the raw flags as ``crystalline``).
    area_fraction, voronoi_atoms, voronoi_recompute : Voronoi indices (``voronoi``) of the
        'amorphous' atoms (after cleaning; the authors' choice) or of 'all', the cells
        recomputed without the small faces' atoms (the authors' step) or not.
    delta_max, alpha, motif_selection : tetrahedra and motifs (``motifs.find_motifs``).
    pdf_r_max, pdf_dr, pdf_domain : g(r) range and bin (Å) and window ('hull' or a
        ``sample_windows.SampleMask``).
    penetration_of : per-atom field whose profile against depth gives the penetration depth.
    voronoi, motifs : compute those (the slowest parts).

    Returns
    -------
    AtomStatistics
    """
    pos = check_positions(positions, min_atoms=5)
    n = len(pos)
    if penetration_of not in COLUMNS:
        raise ValueError(f"penetration_of must be a per-atom column {sorted(COLUMNS)}, "
                         f"got {penetration_of!r}")
    if voronoi_atoms not in ("amorphous", "all"):
        raise ValueError(f"voronoi_atoms must be 'amorphous' or 'all', got {voronoi_atoms!r}")
    if lattice not in ("amorphous", "auto"):
        bulk_coordination(lattice)  # names the valid lattices if this one is not
    nearest = nearest_distance(pos)
    tri = triangulate(pos)  # one triangulation: Voronoi cells, motifs and the g(r) window
    pdf = None
    lattice_source = "given"
    if lattice == "auto":
        pdf = pair_distribution(pos, pdf_r_max, pdf_dr, domain=pdf_domain, triangulation=tri)
        inferred = infer_lattice(pos, cutoff=cutoff, pdf=pdf)
        lattice, lattice_source = inferred.lattice, f"inferred: {inferred.reason}"
    a = float("nan")
    density = None
    if lattice != "amorphous":
        a = float(lattice_constant) if lattice_constant is not None else \
            fit_lattice_constant(pos, lattice)
        if not (np.isfinite(a) and a > 0):
            raise ValueError(f"lattice_constant must be a positive length in Å, got {a}")
        density = lattice_density(lattice, a)
        pdf = None  # normalised by the lattice's density
    if pdf is None:
        pdf = pair_distribution(pos, pdf_r_max, pdf_dr, domain=pdf_domain, density=density,
                                triangulation=tri)
    if lattice == "amorphous":
        if cutoff is None:
            cutoff = first_valley(pdf)
            source = "first valley of g(r)"
            if not np.isfinite(cutoff):
                raise ValueError("no valley in g(r) up to pdf_r_max: give cutoff (Å)")
        else:
            source = "given"
        # Ideal bond length of a glass: the first peak of g(r).
        d0 = float(pdf.r[np.argmax(np.nan_to_num(pdf.g) * (pdf.r < cutoff))])
        cn_bulk = 12.0
    else:
        source = "given" if cutoff is not None else f"{lattice} lattice, a = {a:.4f} Å"
        cutoff = lattice_cutoff(lattice, a) if cutoff is None else float(cutoff)
        d0 = nearest_neighbor_distance(lattice, a)
        cn_bulk = float(bulk_coordination(lattice))
    nb = neighbor_list(pos, cutoff, min_distance)
    cn = nb.count
    norm = float(gcn_max) if gcn_max is not None else cn_bulk
    gcn = generalized_coordination(nb, gcn_convention, norm)
    gcn_norm = f"/{norm:g}" if gcn_convention == "calle-vallejo" else "/largest neighbour CN"
    bond = bond_lengths(nb)
    strain = radial_strain(pos, nb, d0, center=center)
    depth = surface_depth(pos)
    bo = bond_orientational_order(pos, cutoff, min_distance, order_threshold, neighbors=nb,
                                  clean=clean_crystalline)
    amorphous = ~bo.crystalline

    nan = float("nan")
    vs = dict(voronoi_n_indexed=0, voronoi_valid_fraction=nan, voronoi_top_index="",
              voronoi_top_fraction=nan, icosahedral_fraction=nan, voronoi_0_2_8_x_fraction=nan,
              voronoi_0_1_10_x_fraction=nan, voronoi_face_fraction_n3=nan,
              voronoi_face_fraction_n4=nan, voronoi_face_fraction_n5=nan,
              voronoi_face_fraction_n6=nan, voronoi_cn_mean=nan, voronoi_cn_mean_compact=nan)
    va = dict(voronoi_top_labels=np.zeros(0, dtype="U16"), voronoi_top_counts=np.zeros(0, np.int64),
              voronoi_top_fractions=np.zeros(0))
    vidx, vcn = np.full((n, 4), -1, np.int32), np.full(n, -1, np.int32)
    vstat, vvol = np.full(n, -1, np.int8), np.full(n, np.nan)
    if voronoi:
        select = amorphous if voronoi_atoms == "amorphous" else None
        vc = voronoi_indices(pos, area_fraction, select=select, recompute=voronoi_recompute,
                             triangulation=tri)
        vidx, vcn, vstat, vvol = vc.index, vc.n_faces, vc.status, vc.volume
        ok = vc.valid
        idx = vidx[ok]
        labels, fracs = index_histogram(vc, top=20)
        faces = idx.sum(axis=0)
        vs.update(voronoi_n_indexed=int(ok.sum()),
                  voronoi_valid_fraction=float(ok.sum() / (select.sum() if select is not None else n))
                  if (select is None or select.any()) else nan,
                  voronoi_top_index=labels[0] if labels else "",
                  voronoi_top_fraction=float(fracs[0]) if labels else nan)
        if ok.any():
            vs.update(icosahedral_fraction=float((idx == [0, 0, 12, 0]).all(axis=1).mean()),
                      voronoi_0_2_8_x_fraction=float(((idx[:, 0] == 0) & (idx[:, 1] == 2)
                                                      & (idx[:, 2] == 8)).mean()),
                      voronoi_0_1_10_x_fraction=float(((idx[:, 0] == 0) & (idx[:, 1] == 1)
                                                       & (idx[:, 2] == 10)).mean()),
                      voronoi_cn_mean=float(vcn[ok].mean()),
                      **{f"voronoi_face_fraction_n{k + 3}": float(faces[k] / faces.sum())
                         for k in range(4)})
        va.update(voronoi_top_labels=np.array(labels, dtype="U16"),
                  voronoi_top_counts=np.rint(fracs * ok.sum()).astype(np.int64),
                  voronoi_top_fractions=fracs)
        # the number this package reported before: faces left after removing the small ones
        # (not recomputed) of every cell whose vertices all lie within the cutoff (12.28 on
        # the Ta film); kept for comparison, with its definition in the docs
        compact = voronoi_indices(pos, area_fraction, recompute=False,
                                  max_vertex_distance=cutoff, triangulation=tri)
        if compact.valid.any():
            vs["voronoi_cn_mean_compact"] = float(compact.n_faces[compact.valid].mean())

    kinds = [name for k, name in KIND_NAMES.items()]
    if motifs:
        mt = find_motifs(pos, cutoff, delta_max, triangulation=tri, amorphous=amorphous,
                         alpha=alpha, selection=motif_selection)
        per_atom, ms = atom_motif_counts(mt), motif_summary(mt)
        ma = dict(pb_vertex_sharing_hist=np.bincount(mt.pb_vertex_sharing).astype(np.int64),
                  pb_edge_sharing_hist=np.bincount(mt.pb_edge_sharing).astype(np.int64),
                  icosahedral_filling=mt.icosahedral_filling,
                  **{f"network_size_{k}": getattr(mt, f"network_size_{k}") for k in (4, 5, 6)},
                  **{f"network_length_{k}": getattr(mt, f"network_length_{k}") for k in (4, 5, 6)})
    else:
        per_atom = {f"n_{k}": np.zeros(n, np.int64) for k in ["tetrahedra"] + kinds}
        per_atom.update(pb_network=np.full(n, -1, np.int64), pb_network_size=np.zeros(n, np.int64))
        ms = {f"{k}_tetrahedron_fraction": nan for k in kinds}
        ms.update(tetrahedral_atom_fraction=nan, network_length_max_5fold=nan)
        ms.update({f"n_{k}": -1 for k in ["tetrahedra", "amorphous_tetrahedra"] + kinds})
        ms.update({k: -1 for k in ("n_selected_5fold", "n_pb_networks", "pb_network_max",
                                   "n_networks_4fold", "network_max_4fold", "n_networks_6fold",
                                   "network_max_6fold")})
        ma = dict(pb_vertex_sharing_hist=np.zeros(0, np.int64), pb_edge_sharing_hist=np.zeros(0, np.int64),
                  icosahedral_filling=np.zeros(12, np.int64),
                  **{f"network_size_{k}": np.zeros(0, np.int64) for k in (4, 5, 6)},
                  **{f"network_length_{k}": np.zeros(0) for k in (4, 5, 6)})

    sig_iso, sig_p, iso = np.full(n, np.nan), np.full((n, 3), np.nan), np.full(n, np.nan)
    amp = None
    if volume is not None:
        if voxel_size is None:
            raise ValueError("voxel_size (Å) is needed with a volume")
        radius, note = _fit_radius(fit_radius, float(np.median(nearest)), float(np.max(voxel_size)))
        if radius is not None:
            fit = displacement_fit(volume, voxel_size, pos, radius, volume_origin, volume_axes,
                                   blur_sigma=blur_sigma)
            sig_iso, sig_p, iso, amp = fit.sigma_iso, fit.sigma_principal, fit.isotropy, fit.amplitude
    else:
        radius, note = None, "no volume given"
    if intensities is not None:
        inten = check_per_atom(intensities, n, "intensities")
    else:
        inten = amp if amp is not None else np.full(n, np.nan)

    cols = dict(positions=pos, cn=cn, gcn=gcn, bond_length=bond,
                nearest_distance=nearest, radial_strain=strain, depth=depth,
                q4=bo.q4, q6=bo.q6, q4_bar=bo.q4_bar, q6_bar=bo.q6_bar, order=bo.order,
                crystalline=bo.crystalline, crystalline_raw=bo.crystalline_raw,
                voronoi_index=vidx, voronoi_cn=vcn, voronoi_status=vstat, voronoi_volume=vvol,
                intensity=inten, intensity_z=zscore(inten), sigma_iso=sig_iso,
                sigma_principal=sig_p, isotropy=iso, **per_atom)
    stats = AtomStatistics(
        **cols, n_atoms=n, lattice=lattice, lattice_source=lattice_source, lattice_constant=a,
        cutoff=float(cutoff), cutoff_source=source, bond_length_ideal=float(d0),
        gcn_convention=gcn_convention, gcn_norm=gcn_norm, cn_mean=float(cn.mean()),
        bond_length_mean=_nanmean(bond), crystalline_fraction=bo.crystalline_fraction,
        crystalline_fraction_raw=bo.crystalline_fraction_raw,
        n_crystalline=int(bo.crystalline.sum()), n_crystalline_raw=int(bo.crystalline_raw.sum()),
        voronoi_atoms=voronoi_atoms, voronoi_recompute=bool(voronoi_recompute), **vs,
        delta_max=float(delta_max), motif_selection=motif_selection,
        n_tetrahedra_total=int(ms["n_tetrahedra"]),
        n_amorphous_tetrahedra=int(ms["n_amorphous_tetrahedra"]),
        tetrahedral_atom_fraction=float(ms["tetrahedral_atom_fraction"]),
        n_triplets=int(ms["n_triplet"]), n_quadrilateral_bipyramids=int(ms["n_quadrilateral"]),
        n_pentagonal_bipyramids=int(ms["n_pentagonal"]),
        n_hexagonal_bipyramids=int(ms["n_hexagonal"]),
        n_heptagonal_bipyramids=int(ms["n_heptagonal"]),
        n_octagonal_bipyramids=int(ms["n_octagonal"]),
        **{f"{k}_tetrahedron_fraction": float(ms[f"{k}_tetrahedron_fraction"]) for k in kinds},
        n_selected_pentagonal=int(ms["n_selected_5fold"]),
        n_pb_networks=int(ms["n_pb_networks"]), pb_network_max=int(ms["pb_network_max"]),
        pb_network_length_max=float(ms["network_length_max_5fold"]),
        n_networks_4fold=int(ms["n_networks_4fold"]), network_max_4fold=int(ms["network_max_4fold"]),
        n_networks_6fold=int(ms["n_networks_6fold"]), network_max_6fold=int(ms["network_max_6fold"]),
        penetration_statistic=penetration_of, penetration_depth=float("nan"),
        penetration_surface_value=float("nan"), penetration_slope=float("nan"),
        penetration_core_value=float("nan"), sigma_iso_mean=_nanmean(sig_iso),
        pdf_r=pdf.r, pdf_g=pdf.g, pdf_pairs=pdf.pairs, pdf_density=pdf.density,
        pdf_correction=pdf.correction, fit_radius=float("nan") if radius is None else float(radius),
        displacement_note=note, **va, **ma)
    try:
        pen = penetration_depth(depth, stats.table()[penetration_of])
    except ValueError:  # too few atoms with a finite value: the depth stays NaN
        return stats
    return dataclasses.replace(stats, penetration_depth=pen.depth,
                               penetration_surface_value=pen.surface_value,
                               penetration_slope=pen.slope, penetration_core_value=pen.core_value)


def _fit_radius(given: float | None, nearest_A: float, voxel_A: float) -> tuple[float | None, str]:
    """The displacement fit's patch radius (Å) and a note: ``given``, else 0.45 × the median
    nearest-neighbour distance; the fit needs at least 1.5 voxels, so a default below that is
    raised to 1.5 voxels while it stays within half the neighbour distance, and the fit is
    skipped (None) when the voxels are too coarse for that."""
    if given is not None:
        return float(given), ""
    radius, least = 0.45 * nearest_A, 1.5 * voxel_A
    if radius >= least:
        return radius, ""
    if least <= 0.5 * nearest_A:
        return least, (f"fit radius raised from 0.45 x the nearest-neighbour distance ({radius:.2f} Å) to "
                       f"1.5 voxels ({least:.2f} Å)")
    return None, (f"displacements not fitted: voxels of {voxel_A:.3g} Å are too coarse for atoms "
                  f"{nearest_A:.2f} Å apart (the fit needs 1.5 voxels within half that distance: voxels "
                  f"of at most {nearest_A / 3:.2f} Å)")


# ----------------------------------------------------------------------------- writers


def _fmt(col: np.ndarray) -> str:
    if col.dtype == bool or np.issubdtype(col.dtype, np.integer):
        return "%d"
    return "%.7g"


def write_csv(stats: AtomStatistics, path) -> Path:
    """The per-atom table as CSV: a header row of column names (units in ``COLUMNS``), one row
    per atom; booleans as 0/1, undefined values as ``nan``."""
    table = stats.table()
    cols = [np.asarray(c) for c in table.values()]
    path = Path(path)
    with open(path, "w", newline="") as fh:
        fh.write(",".join(table) + "\n")
        fmt = ",".join(_fmt(c) for c in cols)
        data = np.empty((stats.n_atoms, len(cols)), dtype=object)
        for k, c in enumerate(cols):
            data[:, k] = c.astype(np.int64) if c.dtype == bool else c
        np.savetxt(fh, data, fmt=fmt, delimiter=",")
    return path


def write_summary_csv(stats: AtomStatistics, path) -> Path:
    """The per-sample summary as CSV rows ``name,value``."""
    path = Path(path)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["name", "value"])
        for k, v in stats.summary().items():
            w.writerow([k, v])
    return path


def write_hdf5(stats: AtomStatistics, group) -> None:
    """Into an open h5py group: ``atoms/<column>`` datasets (gzip, attribute ``unit``), the
    summary as attributes of the group, and ``pdf/r``, ``pdf/g``, ``pdf/pairs``."""
    atoms = group.require_group("atoms")
    for name, col in stats.table().items():
        col = np.asarray(col)
        if col.dtype == bool:
            col = col.astype(np.uint8)
        ds = atoms.create_dataset(name, data=col, compression="gzip" if len(col) > 1024 else None,
                                  shuffle=len(col) > 1024)
        ds.attrs["unit"] = COLUMNS[name]
    for k, v in stats.summary().items():
        group.attrs[k] = v
    pdf = group.require_group("pdf")
    for name, data, unit in (("r", stats.pdf_r, "Å"), ("g", stats.pdf_g, ""),
                             ("pairs", stats.pdf_pairs, "")):
        pdf.create_dataset(name, data=data).attrs["unit"] = unit
    pdf.attrs["density"] = stats.pdf_density
    pdf.attrs["correction"] = stats.pdf_correction
    vor = group.require_group("voronoi")
    vor.create_dataset("top_labels", data=stats.voronoi_top_labels.astype(object),
                       dtype=h5_string())
    vor.create_dataset("top_counts", data=stats.voronoi_top_counts)
    vor.create_dataset("top_fractions", data=stats.voronoi_top_fractions)
    vor.attrs["of"] = "the 20 most frequent indices <n3,n4,n5,n6> of the indexed cells"
    mot = group.require_group("motifs")
    for name in ("pb_vertex_sharing_hist", "pb_edge_sharing_hist", "icosahedral_filling",
                 "network_size_4", "network_size_5", "network_size_6"):
        mot.create_dataset(name, data=getattr(stats, name))
    for k in (4, 5, 6):
        mot.create_dataset(f"network_length_{k}", data=getattr(stats, f"network_length_{k}")
                           ).attrs["unit"] = "Å"


def h5_string():
    """The HDF5 variable-length UTF-8 string type (h5py imported only by the writers)."""
    import h5py
    return h5py.string_dtype()


def _hist(ax, values, title, xlabel, integer=False, bins=40):
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    elif integer:
        lo, hi = int(v.min()), int(v.max())
        ax.hist(v, bins=np.arange(lo - 0.5, hi + 1.5), color="tab:blue")
    elif np.ptp(v) <= 1e-9 * (1 + np.abs(v).max()):  # one value: one bar around it
        w = max(0.01 * abs(float(v.mean())), 1e-3)
        ax.hist(v, bins=1, range=(v.min() - w, v.max() + w), color="tab:blue")
    else:
        ax.hist(v, bins=bins, color="tab:blue")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("atoms", fontsize=8)


def _panels(stats: AtomStatistics):
    """(name, draw(ax)) for every panel with data."""
    s = stats
    out = [
        ("cn", lambda ax: _hist(ax, s.cn, "coordination number", "CN", integer=True)),
        ("gcn", lambda ax: _hist(ax, s.gcn, f"generalised CN ({s.gcn_convention})", "GCN")),
        ("bond_length", lambda ax: _hist(ax, s.bond_length, "bond length", "Å")),
        ("radial_strain", lambda ax: _hist(ax, s.radial_strain, "radial strain", "ε_rr")),
        ("order", lambda ax: (_hist(ax, s.order, "normalised bond order", "order"),
                              ax.axvline(0.5, color="k", lw=0.8, ls="--"))),
    ]

    def boo(ax):
        ax.hist2d(s.q4_bar, s.q6_bar, bins=60, cmap="viridis", cmin=1)
        ax.set_xlabel("Q̄4", fontsize=8)
        ax.set_ylabel("Q̄6", fontsize=8)
        ax.set_title("bond-orientational order", fontsize=9)
    out.append(("q4_q6", boo))
    valid = s.voronoi_index[:, 0] >= 0
    if valid.any():
        def vor(ax):
            uniq, counts = np.unique(s.voronoi_index[valid], axis=0, return_counts=True)
            o = np.argsort(-counts, kind="stable")[:10]
            ax.bar(range(len(o)), counts[o] / valid.sum(), color="tab:blue")
            ax.set_xticks(range(len(o)))
            ax.set_xticklabels(["<%d,%d,%d,%d>" % tuple(u) for u in uniq[o]], rotation=60,
                               fontsize=6)
            ax.set_ylabel("fraction of cells", fontsize=8)
            ax.set_title("Voronoi indices", fontsize=9)
        out.append(("voronoi", vor))
    if s.n_tetrahedra_total > 0:  # (none found, or not computed: no panel)
        def mot(ax):
            names = ["3", "4", "5", "6", "7", "8"]
            fr = [getattr(s, f"{k}_tetrahedron_fraction") for k in KIND_NAMES.values()]
            ax.bar(names, fr, color="tab:blue")
            ax.set_xlabel("triplet, k-fold bipyramid", fontsize=8)
            ax.set_ylabel("fraction of amorphous tetrahedra", fontsize=8)
            ax.set_title(f"polytetrahedral motifs (δ ≤ {s.delta_max})", fontsize=9)
        out.append(("motifs", mot))

    def pdf(ax):
        ax.plot(s.pdf_r, s.pdf_g, color="tab:blue", lw=1)
        ax.axhline(1, color="k", lw=0.5)
        ax.axvline(s.cutoff, color="tab:red", lw=0.8, ls="--")
        ax.set_xlabel("r (Å)", fontsize=8)
        ax.set_ylabel("g(r)", fontsize=8)
        ax.set_title("pair distribution function", fontsize=9)
    out.append(("pdf", pdf))

    def prof(ax):
        v = s.table()[s.penetration_statistic]
        ax.plot(s.depth, v, ".", ms=2, alpha=0.4, color="tab:blue")
        if np.isfinite(s.penetration_depth):
            d = np.array([0, s.penetration_depth])
            ax.plot(d, s.penetration_surface_value + s.penetration_slope * d, color="tab:red")
            ax.plot([s.penetration_depth, np.nanmax(s.depth)], [s.penetration_core_value] * 2,
                    color="tab:red")
            ax.axvline(s.penetration_depth, color="k", lw=0.8, ls="--")
        ax.set_xlabel("depth below surface (Å)", fontsize=8)
        ax.set_ylabel(s.penetration_statistic, fontsize=8)
        ax.set_title(f"penetration depth {s.penetration_depth:.2f} Å", fontsize=9)
    out.append(("depth_profile", prof))
    if np.isfinite(s.sigma_iso).any():
        out.append(("sigma_iso",
                    lambda ax: _hist(ax, s.sigma_iso, "isotropic displacement σ", "Å")))
    if np.isfinite(s.isotropy).any():
        out.append(("isotropy",
                    lambda ax: _hist(ax, s.isotropy, "degree of isotropy", "σ²min/σ²max")))
    if np.isfinite(s.intensity_z).any():
        out.append(("intensity_z",
                    lambda ax: _hist(ax, s.intensity_z, "peak intensity z-score", "z")))
    return out


def write_histograms(stats: AtomStatistics, directory, stem: str = "atoms") -> list[Path]:
    """``<stem>_<statistic>.png`` for every statistic with data and ``<stem>_overview.png``
    with all of them; returns the paths."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    panels = _panels(stats)
    written = []
    for name, draw in panels:
        fig = Figure(figsize=(4, 3.2))
        FigureCanvasAgg(fig)
        draw(fig.add_subplot(1, 1, 1))
        fig.tight_layout()
        path = directory / f"{stem}_{name}.png"
        fig.savefig(path, dpi=90)
        written.append(path)
    ncol = 4
    nrow = -(-len(panels) // ncol)
    fig = Figure(figsize=(3.6 * ncol, 3.0 * nrow))
    FigureCanvasAgg(fig)
    for k, (name, draw) in enumerate(panels):
        draw(fig.add_subplot(nrow, ncol, k + 1))
    fig.suptitle(f"{stats.n_atoms} atoms, {stats.lattice}, cutoff {stats.cutoff:.3f} Å",
                 fontsize=10)
    fig.tight_layout()
    path = directory / f"{stem}_overview.png"
    fig.savefig(path, dpi=80)
    written.append(path)
    return written
