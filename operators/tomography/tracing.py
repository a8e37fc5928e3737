"""Atom tracing in a reconstructed volume, as in the AET / SINGLE papers.

Steps of :func:`trace_atoms`:

1. denoise: correlate the volume with one simulated atom, a 3D Gaussian of width
   ``atom_sigma_A`` (``scipy.ndimage.gaussian_filter``);
2. threshold: Otsu's threshold of the denoised map, refined by trying multiples of it and
   keeping the one whose traced atoms, simulated as Gaussians of one height, correlate best
   with the denoised map;
3. connected components of the voxels above the threshold (``scipy.ndimage.label``), each
   reduced to its intensity-weighted centre of mass (weights: map − threshold);
4. components that hold more than one atom are split: the local maxima of the map at least
   ``min_distance_A`` apart are the seeds, and each atom is the weighted centre of mass of
   the component's voxels within ``min_distance_A / 2`` of its seed; a component
   whose integrated intensity is n ≥ 2 times that of a typical single atom but has fewer
   seeds (one maximum, 2 ≤ n ≤ 6) is split into n parts by weighted k-means;
5. refinement (``refine=True``): each centre with a maximum of its own moves to the peak of
   a Gaussian fitted to the 3×3×3 voxels around that maximum (neighbours pull a centre of
   mass, not a peak); k-means parts keep their centres;
6. validation: per atom, the correlation between the denoised map and the simulated atoms in
   a cube around it; atoms more than ``min_correlation_sigma`` σ below the mean correlation
   (σ at least ``correlation_sigma_floor``, so that uniformly good atoms keep their tail)
   and atoms with fewer than ``min_coordination`` neighbours within ``bond_cutoff_A`` are
   discarded (each test once, in that order).

Positions are returned in Å as (x, y, z) relative to the centre voxel
``(nz // 2, ny // 2, nx // 2)`` of a volume indexed ``[z, y, x]`` — the rotation centre of
:mod:`operators.tomography.projector` — and in voxel index coordinates ``(z, y, x)``.

Example
-------
>>> import numpy as np
>>> zz, yy, xx = np.mgrid[:24, :24, :24]
>>> centres = [(12, 12, 5), (12, 12, 12.5), (12, 12, 20), (12, 19, 8.5), (12, 19, 16)]
>>> vol = sum(np.exp(-((zz - z) ** 2 + (yy - y) ** 2 + (xx - x) ** 2) / (2 * 1.2 ** 2))
...           for z, y, x in centres)
>>> atoms = trace_atoms(vol, voxel_size_A=0.4, atom_sigma_A=0.48, min_coordination=0)
>>> np.round(np.sort(atoms.positions_vox[:, 2]), 2).tolist()
[5.0, 8.5, 12.5, 16.0, 20.0]
>>> np.round(np.sort(atoms.positions_A[:, 0]), 2).tolist()     # x in Å from voxel 12
[-2.8, -1.4, 0.2, 1.6, 3.2]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from operators.structure.coordination import coordination_numbers


# A component with one maximum but the intensity of more atoms than this is not split by
# k-means (it is a blob, not a few merged atoms).
MAX_KMEANS_SPLIT = 6


@dataclass
class TracedAtoms:
    """Atoms traced in a volume.

    positions_A : (N, 3) float64, Å, columns (x, y, z) relative to the centre voxel.
    positions_vox : (N, 3) float64, voxel index coordinates (z, y, x).
    correlation : (N,) float64, per-atom validation correlation in [-1, 1].
    peak_intensity : (N,) float64, denoised map at the atom (trilinear), volume units.
    integrated_intensity : (N,) float64, sum of the input volume over the voxels within
        min_distance_A / 2 of the atom.
    coordination : (N,) int64, neighbours within ``bond_cutoff_A`` among the kept atoms.
    threshold : threshold used on the denoised map.
    otsu_threshold : Otsu's threshold of the denoised map.
    bond_cutoff_A : cutoff used for the coordination.
    n_candidates : atoms before validation.
    n_rejected_correlation, n_rejected_coordination : atoms discarded by each test.
    """

    positions_A: np.ndarray
    positions_vox: np.ndarray
    correlation: np.ndarray
    peak_intensity: np.ndarray
    integrated_intensity: np.ndarray
    coordination: np.ndarray
    threshold: float
    otsu_threshold: float
    bond_cutoff_A: float
    n_candidates: int
    n_rejected_correlation: int
    n_rejected_coordination: int


def otsu_threshold(values, bins: int = 256) -> float:
    """Otsu's threshold of an array of values: over a histogram of ``bins`` equal bins from the
    minimum to the maximum, the cut between two bins that maximises the between-class
    variance w1·w2·(m1 − m2)²; the threshold is the centre of the last bin below the cut
    (values above it are foreground). This is scikit-image's ``threshold_otsu`` for
    floating-point data, to the last bit (tests/test_crosscheck.py). ValueError for fewer
    than two distinct values."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0 or v.min() == v.max():
        raise ValueError("Otsu threshold needs at least two distinct finite values")
    counts, edges = np.histogram(v, bins=int(bins), range=(v.min(), v.max()))
    centres = (edges[:-1] + edges[1:]) / 2
    w1 = np.cumsum(counts)
    w2 = np.cumsum(counts[::-1])[::-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        m1 = np.cumsum(counts * centres) / w1
        m2 = (np.cumsum((counts * centres)[::-1]) / w2[::-1])[::-1]
    between = w1[:-1] * w2[1:] * (m1[:-1] - m2[1:]) ** 2
    return float(centres[int(np.nanargmax(between))])


def simulate_atoms(shape, positions_vox, sigma_vox: float, amplitudes=None) -> np.ndarray:
    """(nz, ny, nx) float64 map of 3D Gaussians (peak ≈ amplitude, default 1) of width
    ``sigma_vox`` at ``positions_vox`` (N, 3) (z, y, x), built by trilinear splatting of the
    atoms and one Gaussian filter."""
    out = np.zeros(tuple(int(s) for s in shape))
    pos = np.asarray(positions_vox, dtype=np.float64).reshape(-1, 3)
    amp = np.ones(len(pos)) if amplitudes is None else np.asarray(amplitudes, np.float64)
    if len(pos):
        base = np.floor(pos).astype(np.int64)
        frac = pos - base
        for corner in range(8):
            off = np.array([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1])
            idx = base + off
            wgt = np.prod(np.where(off == 1, frac, 1.0 - frac), axis=1) * amp
            ok = np.all((idx >= 0) & (idx < out.shape), axis=1)
            np.add.at(out, tuple(idx[ok].T), wgt[ok])
    # the filter's kernel sums to 1: scale so that an isolated atom peaks at its amplitude
    return ndimage.gaussian_filter(out, sigma_vox, mode="constant") * \
        (2 * np.pi * sigma_vox ** 2) ** 1.5


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two arrays from dot products (no centred copies)."""
    a, b = a.ravel(), b.ravel()
    n = a.size
    sa, sb = a.sum(), b.sum()
    cov = float(a @ b) - sa * sb / n
    va, vb = float(a @ a) - sa * sa / n, float(b @ b) - sb * sb / n
    return cov / np.sqrt(va * vb) if va > 0 and vb > 0 else 0.0


def _suppress(points: np.ndarray, heights: np.ndarray, min_dist: float) -> np.ndarray:
    """Sorted indices of the points kept by greedy non-maximum suppression (strongest first):
    no two kept points closer than ``min_dist``."""
    n = len(points)
    if n == 0:
        return np.zeros(0, np.int64)
    pairs = cKDTree(points).query_pairs(min_dist, output_type="ndarray")
    if len(pairs) == 0:
        return np.arange(n)
    # only points with a close neighbour need the greedy pass
    both = np.concatenate([pairs, pairs[:, ::-1]])
    both = both[np.argsort(both[:, 0], kind="stable")]
    starts = np.searchsorted(both[:, 0], np.arange(n + 1))
    alive = np.ones(n, bool)
    involved = np.unique(pairs)
    for i in involved[np.argsort(-heights[involved], kind="stable")]:
        if alive[i]:
            alive[both[starts[i]:starts[i + 1], 1]] = False
    return np.flatnonzero(alive)


def _ball(radius: float) -> np.ndarray:
    """(m, 3) integer offsets within ``radius`` voxels of the origin."""
    r = int(np.floor(radius))
    g = np.arange(-r, r + 1)
    off = np.stack(np.meshgrid(g, g, g, indexing="ij"), axis=-1).reshape(-1, 3)
    return off[(off ** 2).sum(1) <= radius ** 2 + 1e-9]


def _gather(arr: np.ndarray, centres: np.ndarray, off: np.ndarray):
    """Values of ``arr`` at centres + offsets ((N, m), 0 outside) and the absolute indices."""
    idx = centres[:, None, :] + off[None]
    inside = np.all((idx >= 0) & (idx < np.array(arr.shape)), axis=2)
    idc = np.where(inside[..., None], idx, 0)
    vals = np.where(inside, arr[idc[..., 0], idc[..., 1], idc[..., 2]], 0.0)
    return vals, idc, inside


def _kmeans_split(coords, weights, seeds, k, n_iter=20):
    """Weighted Lloyd iterations on the voxels of one component, k centres (seeds first,
    then the voxels farthest from the current centres); returns the k centres."""
    centres = [c for c in seeds]
    while len(centres) < k:
        d = np.min(((coords[:, None, :] - np.asarray(centres)[None]) ** 2).sum(-1), axis=1)
        centres.append(coords[int(np.argmax(d * weights))])
    centres = np.asarray(centres, np.float64)
    for _ in range(n_iter):
        lab = np.argmin(((coords[:, None, :] - centres[None]) ** 2).sum(-1), axis=1)
        new = centres.copy()
        for j in range(k):
            m = lab == j
            if m.any():
                new[j] = (coords[m] * weights[m, None]).sum(0) / weights[m].sum()
        if np.allclose(new, centres):
            break
        centres = new
    return centres


def _candidates(den, peaks, thr, min_dist_vox) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3) voxel positions of the atoms above one threshold, and (N,) bool: the atom has
    a maximum of its own (False for k-means parts, which a peak fit would merge).

    A component with at most one seed (local maximum) is one atom at its intensity-weighted
    centre of mass (weights map − threshold), or n atoms by k-means when it holds the
    integrated intensity of n ≥ 2 single atoms; a component with several seeds is split: each
    atom is the weighted centre of mass of its component's voxels within min_dist / 2 of its
    seed (these balls never overlap, as seeds are ≥ min_dist apart)."""
    mask = den > thr
    lab, n = ndimage.label(mask)
    if n == 0:
        return np.zeros((0, 3)), np.zeros(0, bool)
    pk = np.argwhere(peaks & mask)
    pk = pk[_suppress(pk.astype(np.float64), den[tuple(pk.T)], min_dist_vox)]
    pk_lab = lab[tuple(pk.T)]
    n_seeds = np.bincount(pk_lab, minlength=n + 1)

    flat = np.flatnonzero(mask)
    vlab = lab.ravel()[flat]
    wgt = den.ravel()[flat] - thr
    coords = np.unravel_index(flat, den.shape)
    W = np.bincount(vlab, weights=wgt, minlength=n + 1)
    com = np.stack([np.bincount(vlab, weights=wgt * c, minlength=n + 1) for c in coords], 1)
    com[1:] /= np.where(W[1:] > 0, W[1:], 1.0)[:, None]
    few = np.flatnonzero(n_seeds[1:] <= 1) + 1
    atoms, own = [com[few]], [True]   # own: the atom has a maximum of its own

    # several seeds: local weighted centres of mass in disjoint balls around the seeds
    multi = n_seeds[pk_lab] >= 2
    if multi.any():
        seeds, slab = pk[multi], pk_lab[multi]
        off = _ball(0.5 * min_dist_vox)
        vals, idc, inside = _gather(den, seeds, off)
        same = inside & (lab[idc[..., 0], idc[..., 1], idc[..., 2]] == slab[:, None])
        w = np.where(same, vals - thr, 0.0)
        wsum = w.sum(1)
        local = seeds + (w[..., None] * off[None]).sum(1) / np.where(wsum > 0, wsum, 1)[:, None]
        atoms.append(local)
        own.append(True)

    # one seed but the intensity of n single atoms: k-means
    single = np.flatnonzero(n_seeds == 1)
    if len(single) >= 3:
        integ = np.bincount(vlab, weights=wgt, minlength=n + 1)
        i1 = float(np.median(integ[single]))
        n_est = np.rint(integ / i1).astype(np.int64) if i1 > 0 else np.ones(n + 1, np.int64)
        todo = (n_est >= 2) & (n_est <= MAX_KMEANS_SPLIT) & (n_seeds <= 1)
        todo[0] = False
        if todo.any():
            order = np.argsort(vlab, kind="stable")
            starts = np.searchsorted(vlab[order], np.arange(n + 2))
            cvox = np.stack(coords, 1).astype(np.float64)
            replaced = []
            for c in np.flatnonzero(todo):
                vs = order[starts[c]:starts[c + 1]]
                if len(vs) < 4 * n_est[c]:
                    continue
                seed = pk[pk_lab == c].astype(np.float64)
                if len(seed) == 0:
                    seed = cvox[vs[[int(np.argmax(wgt[vs]))]]]
                atoms.append(_kmeans_split(cvox[vs], wgt[vs] + 1e-12, seed, int(n_est[c])))
                own.append(False)
                replaced.append(c)
            if replaced:
                atoms[0] = com[np.setdiff1d(few, replaced)]
    own = np.concatenate([np.full(len(a), o) for a, o in zip(atoms, own)])
    pos = np.concatenate(atoms)
    # centres closer than the minimum distance are one atom (keep the stronger)
    keep = _suppress(pos, ndimage.map_coordinates(den, pos.T, order=1, mode="nearest"),
                     min_dist_vox * 0.999)
    return pos[keep], own[keep]


_OFF27 = np.stack(np.meshgrid([-1, 0, 1], [-1, 0, 1], [-1, 0, 1], indexing="ij"),
                  axis=-1).reshape(-1, 3)
# least squares of a full quadratic c + g·d + ½ dᵀHd on the 27 offsets d of a 3×3×3 cube
_Q_DESIGN = np.column_stack([np.ones(27), _OFF27,
                             0.5 * _OFF27 ** 2,
                             _OFF27[:, 0] * _OFF27[:, 1], _OFF27[:, 0] * _OFF27[:, 2],
                             _OFF27[:, 1] * _OFF27[:, 2]])
_Q_PINV = np.linalg.pinv(_Q_DESIGN)


def refine_peaks(den, positions_vox) -> np.ndarray:
    """(N, 3) positions moved to the maximum of a quadratic fitted to log(den) on the 3×3×3
    voxels around the nearest local maximum: exact for a Gaussian peak of any (anisotropic)
    shape, and hardly pulled by neighbouring atoms, unlike a centre of mass. Positions where
    the fit has no maximum within one voxel keep their input value."""
    pos = np.asarray(positions_vox, dtype=np.float64).reshape(-1, 3)
    if len(pos) == 0:
        return pos.copy()
    lim = np.array(den.shape) - 2
    v = np.clip(np.rint(pos).astype(np.int64), 1, lim)
    for _ in range(4):  # climb to the local maximum of the 27-cube
        vals = den[tuple((v[:, None, :] + _OFF27[None]).transpose(2, 0, 1))]
        step = _OFF27[np.argmax(vals, axis=1)]
        if not step.any():
            break
        v = np.clip(v + step, 1, lim)
    vals = den[tuple((v[:, None, :] + _OFF27[None]).transpose(2, 0, 1))]
    logv = np.log(np.maximum(vals, 1e-12 * np.maximum(vals.max(axis=1, keepdims=True), 1e-300)))
    c = logv @ _Q_PINV.T                          # (N, 10)
    g = c[:, 1:4]
    H = np.empty((len(pos), 3, 3))
    H[:, 0, 0], H[:, 1, 1], H[:, 2, 2] = c[:, 4], c[:, 5], c[:, 6]
    H[:, 0, 1] = H[:, 1, 0] = c[:, 7]
    H[:, 0, 2] = H[:, 2, 0] = c[:, 8]
    H[:, 1, 2] = H[:, 2, 1] = c[:, 9]
    out = pos.copy()
    negdef = np.all(np.linalg.eigvalsh(H) < 0, axis=1) & (vals.min(axis=1) > 0)
    if negdef.any():
        d = -np.linalg.solve(H[negdef], g[negdef][..., None])[..., 0]
        ok = np.abs(d).max(axis=1) <= 1.0
        idx = np.flatnonzero(negdef)[ok]
        out[idx] = v[idx] + d[ok]
    return out


def _local_correlation(den, sim, positions, half: int) -> np.ndarray:
    """Per atom, the correlation of ``den`` and ``sim`` over a cube of half-width ``half``
    voxels around the voxel nearest the atom."""
    pad = [(half, half)] * 3
    dp = np.pad(den, pad)
    sp = np.pad(sim, pad)
    r = np.arange(-half, half + 1)
    off = np.stack(np.meshgrid(r, r, r, indexing="ij"), axis=-1).reshape(-1, 3)
    centre = np.clip(np.rint(positions).astype(np.int64), 0, np.array(den.shape) - 1) + half
    out = np.empty(len(positions))
    for a in range(0, len(positions), 2048):  # bounded memory for large volumes
        idx = centre[a:a + 2048, None, :] + off[None]
        d = dp[idx[..., 0], idx[..., 1], idx[..., 2]]
        s = sp[idx[..., 0], idx[..., 1], idx[..., 2]]
        d = d - d.mean(axis=1, keepdims=True)
        s = s - s.mean(axis=1, keepdims=True)
        den_ = np.sqrt((d * d).sum(1) * (s * s).sum(1))
        out[a:a + 2048] = np.where(den_ > 0, (d * s).sum(1) / np.where(den_ > 0, den_, 1), 0.0)
    return out


def trace_atoms(volume, voxel_size_A: float, atom_sigma_A: float = 0.5, *,
                min_distance_A: float = 2.0, threshold: float | None = None,
                threshold_factors=(0.4, 0.55, 0.7, 0.85, 1.0, 1.2, 1.4, 1.7, 2.0),
                min_correlation_sigma: float | None = 2.0,
                correlation_sigma_floor: float = 0.05, min_coordination: int = 3,
                bond_cutoff_A: float | None = None, refine: bool = True) -> TracedAtoms:
    """Trace atoms in a reconstructed volume (see the module docstring for the steps).

    Parameters
    ----------
    volume : (nz, ny, nx) real array indexed [z, y, x], e.g. ``Reconstruction.volume``.
    voxel_size_A : voxel edge in Å.
    atom_sigma_A : Gaussian width (σ, Å) of one atom in the volume; the denoising kernel.
    min_distance_A : no two atoms are closer than this (Å); seeds and centres closer are one.
    threshold : threshold on the denoised map; None: Otsu's, refined (below).
    threshold_factors : multiples of Otsu's threshold tried by the refinement; the one whose
        atoms, simulated at the traced positions, correlate best with the map wins.
    min_correlation_sigma : discard atoms whose correlation is more than this many standard
        deviations below the mean; None keeps all.
    correlation_sigma_floor : the standard deviation used by that test is at least this, so
        that a set of uniformly good atoms (a spread of 0.001) does not lose its tail.
    min_coordination : discard atoms with fewer neighbours within ``bond_cutoff_A``; 0 keeps all.
    bond_cutoff_A : neighbour cutoff (Å); None: 1.2 × the median nearest-neighbour distance
        of the candidates (≈ the first minimum of the pair distribution for fcc metals).
    refine : move each centre of mass to the peak of a Gaussian (quadratic in log) fitted
        to the 3×3×3 voxels around its local maximum (:func:`refine_peaks`); False keeps the
        intensity-weighted centres of mass.

    Returns
    -------
    TracedAtoms (positions in Å and voxels, per-atom correlation, intensities, coordination).
    """
    vol = np.asarray(volume)
    if vol.ndim != 3 or min(vol.shape) < 3:
        raise ValueError(f"volume must be a 3-D array (nz, ny, nx) of at least 3 voxels per "
                         f"axis, got shape {vol.shape}")
    vol = np.ascontiguousarray(vol, dtype=np.float64)
    if not np.isfinite(vol).all():
        raise ValueError("volume contains NaN or inf: replace them before tracing")
    for name, val in (("voxel_size_A", voxel_size_A), ("atom_sigma_A", atom_sigma_A),
                      ("min_distance_A", min_distance_A)):
        if not (np.isfinite(val) and val > 0):
            raise ValueError(f"{name} must be a positive number of Å, got {val!r}")
    if min_coordination < 0:
        raise ValueError(f"min_coordination must be >= 0, got {min_coordination!r}")
    if bond_cutoff_A is not None and not bond_cutoff_A > 0:
        raise ValueError(f"bond_cutoff_A must be > 0 Å (or None), got {bond_cutoff_A!r}")
    vs = float(voxel_size_A)
    sig = float(atom_sigma_A) / vs
    min_dist = float(min_distance_A) / vs

    den = ndimage.gaussian_filter(vol, sig, mode="constant")
    if not den.max() > den.min():
        raise ValueError("volume is constant: there is nothing to trace")
    otsu = otsu_threshold(den)
    half_peak = max(1, int(min_dist // 2))
    peaks = den == ndimage.maximum_filter(den, size=2 * half_peak + 1, mode="constant")
    sig_map = np.sqrt(2.0) * sig  # an atom of width sig correlated with a Gaussian of width sig

    if threshold is None:
        factors = np.asarray(threshold_factors, dtype=np.float64).ravel()
        if factors.size == 0 or not (factors > 0).all():
            raise ValueError("threshold_factors must be positive multiples of Otsu's threshold")
        best = None
        for f in factors:
            c = _candidates(den, peaks, f * otsu, min_dist)
            score = _correlation(den, simulate_atoms(den.shape, c[0], sig_map)) if len(c[0]) \
                else -np.inf
            if best is None or score > best[0]:
                best = (score, f * otsu, c)
        thr, cand = best[1], best[2]
    else:
        thr = float(threshold)
        cand = _candidates(den, peaks, thr, min_dist)

    pos, own = cand
    if refine and own.any():
        pos = pos.copy()
        pos[own] = refine_peaks(den, pos[own])
        # two centres that climbed to the same maximum are one atom
        pos = pos[_suppress(pos, ndimage.map_coordinates(den, pos.T, order=1, mode="nearest"),
                            min_dist * 0.999)]
    n_cand = len(pos)
    sim = simulate_atoms(den.shape, pos, sig_map)
    corr = _local_correlation(den, sim, pos, max(1, int(np.ceil(2 * sig_map))))
    keep = np.ones(n_cand, bool)
    if min_correlation_sigma is not None and n_cand > 2:
        spread = max(float(corr.std()), float(correlation_sigma_floor))
        keep &= corr >= corr.mean() - float(min_correlation_sigma) * spread
    n_rej_corr = int((~keep).sum())

    centre = np.array(den.shape) // 2
    pos_A = (pos[:, ::-1] - centre[::-1]) * vs
    if bond_cutoff_A is None:
        if keep.sum() >= 2:
            d, _ = cKDTree(pos_A[keep]).query(pos_A[keep], k=2)
            cutoff = 1.2 * float(np.median(d[:, 1]))
        else:
            cutoff = float(min_distance_A) * 1.5
    else:
        cutoff = float(bond_cutoff_A)
    cn = np.zeros(n_cand, np.int64)
    if keep.any():
        cn[keep] = coordination_numbers(pos_A[keep], cutoff)
    low = keep & (cn < int(min_coordination))
    keep &= ~low
    cn_final = coordination_numbers(pos_A[keep], cutoff) if keep.any() else np.zeros(0, np.int64)
    pos = pos[keep]
    peak = ndimage.map_coordinates(den, pos.T, order=1, mode="constant") if len(pos) \
        else np.zeros(0)
    vals, _, _ = _gather(vol, np.rint(pos).astype(np.int64), _ball(0.5 * min_dist))
    integrated = vals.sum(axis=1)
    return TracedAtoms(positions_A=pos_A[keep], positions_vox=pos,
                       correlation=corr[keep], peak_intensity=peak,
                       integrated_intensity=integrated, coordination=cn_final,
                       threshold=float(thr), otsu_threshold=float(otsu),
                       bond_cutoff_A=cutoff, n_candidates=n_cand,
                       n_rejected_correlation=n_rej_corr,
                       n_rejected_coordination=int(low.sum()))
