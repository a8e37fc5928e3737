"""Per-atom statistics of a 3D atomic model: coordination, generalised coordination, bond
length, radial strain, atomic displacement from the volume, intensity z-score, surface
penetration depth, and the pair distribution function of a finite sample.

Lattices and neighbour shells
-----------------------------
``a`` is the conventional lattice constant (for hcp: the nearest-neighbour distance, ideal
c/a). The coordination cutoff lies halfway between the last shell counted and the next one:

======  ==================  ===========================  ====
name    shells counted      cutoff                       CN
======  ==================  ===========================  ====
fcc     a/√2                a/2·(1 + 1/√2)               12
bcc     a√3/2               a/2·(1 + √3/2)                8
bcc14   a√3/2 and a         a/2·(1 + √2)                 14
hcp     a                   a/2·(1 + √2)                 12
sc      a                   a/2·(1 + √2)                  6
======  ==================  ===========================  ====

For an amorphous sample give the cutoff directly (the first valley of g(r); 4.12 Å for Ta),
see :func:`first_valley`.

Volumes
-------
By default a volume is indexed ``vol[z, y, x]`` and positions are (x, y, z) Å relative to
the centre voxel (nz//2, ny//2, nx//2), as ``operators.projector`` and ``operators.tracing``
use them (``axes="zyx"``, ``origin="center"``). With ``axes="xyz"`` position column k runs
along volume axis k; a given ``origin`` is the (x, y, z) position in Å of voxel (0, 0, 0).

Examples
--------
>>> import numpy as np
>>> from operators.atoms3d import lattice_cutoff, coordination_numbers
>>> round(lattice_cutoff("fcc", 3.924), 4)
3.3493
>>> cn = coordination_numbers(np.array([[0., 0, 0], [2.77, 0, 0], [0, 2.77, 0], [9, 9, 9]]), 3.35)
>>> cn.tolist()
[2, 1, 1, 0]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from numba import njit
from scipy.ndimage import distance_transform_edt, gaussian_filter1d, map_coordinates
from scipy.spatial import ConvexHull, QhullError

from .kernels import NJIT
from .neighbors import (Neighbors, check_positions, nearest_distance, neighbor_list, triangulate,
                        wrap)


class _Lattice(NamedTuple):
    first: float      # nearest-neighbour distance / a
    second: float     # second-shell distance / a
    last: float       # outermost shell counted in the CN / a
    beyond: float     # the shell after it / a
    cn: int           # bulk coordination number
    density: float    # atoms per a³


_R2, _R3 = math.sqrt(2), math.sqrt(3)
LATTICES = {
    "fcc": _Lattice(1 / _R2, 1.0, 1 / _R2, 1.0, 12, 4.0),
    "bcc": _Lattice(_R3 / 2, 1.0, _R3 / 2, 1.0, 8, 2.0),
    "bcc14": _Lattice(_R3 / 2, 1.0, 1.0, _R2, 14, 2.0),
    "hcp": _Lattice(1.0, _R2, 1.0, _R2, 12, _R2),  # a = nearest-neighbour distance, ideal c/a
    "sc": _Lattice(1.0, _R2, 1.0, _R2, 6, 1.0),
}


def _lattice(lattice: str) -> _Lattice:
    if lattice not in LATTICES:
        raise ValueError(f"lattice must be one of {sorted(LATTICES)}, got {lattice!r} "
                         "(for an amorphous sample give the cutoff in Å instead)")
    return LATTICES[lattice]


def lattice_cutoff(lattice: str, a: float) -> float:
    """Coordination cutoff (Å) of a lattice with constant ``a`` (Å): see the module table."""
    lat = _lattice(lattice)
    return 0.5 * a * (lat.last + lat.beyond)


def lattice_density(lattice: str, a: float) -> float:
    """Bulk number density (atoms/Å³) of the lattice with constant ``a`` (Å)."""
    return _lattice(lattice).density / a ** 3


def nearest_neighbor_distance(lattice: str, a: float) -> float:
    """Ideal nearest-neighbour distance (Å) of the lattice."""
    return _lattice(lattice).first * a


def bulk_coordination(lattice: str) -> int:
    """Coordination number of a bulk atom with the module's cutoff (12 for fcc)."""
    return _lattice(lattice).cn


def fit_lattice_constant(positions, lattice: str = "fcc", iterations: int = 3) -> float:
    """Lattice constant (Å) fitted to the first-shell distances.

    Starts from the median nearest-neighbour distance; then, ``iterations`` times, takes every
    pair closer than halfway to the second shell and sets a to the least-squares solution of
    d_ij = f·a (f = nearest-neighbour distance / a), i.e. a = mean(d_ij) / f.
    """
    pos = check_positions(positions, min_atoms=2)
    lat = _lattice(lattice)
    f = lat.first
    a = float(np.median(nearest_distance(pos))) / f
    for _ in range(iterations):
        nb = neighbor_list(pos, 0.5 * a * (f + lat.second))
        if len(nb.distance) == 0:
            break
        a = float(nb.distance.mean()) / f
    return a


def coordination_numbers(positions, cutoff: float) -> np.ndarray:
    """(N,) int64 number of atoms within ``cutoff`` (Å) of each atom."""
    return neighbor_list(positions, cutoff).count


def generalized_coordination(nb: Neighbors, convention: str = "calle-vallejo",
                             cn_max: float = 12.0) -> np.ndarray:
    """(N,) float64 generalised coordination number GCN(i) = Σ_{j ∈ nn(i)} CN(j) / norm.

    convention : 'calle-vallejo' (norm = ``cn_max``, the bulk CN: 12 for fcc, Calle-Vallejo et
        al., Angew. Chem. 53, 8316 (2014)) or 'single' (norm = the largest CN among atom i's
        neighbours, as in the SINGLE papers). Atoms without neighbours get 0.
    """
    cn = nb.count.astype(np.float64)
    s = np.bincount(nb.center, cn[nb.index], minlength=nb.n_atoms)
    if convention == "calle-vallejo":
        if not cn_max > 0:
            raise ValueError(f"cn_max must be positive, got {cn_max}")
        return s / float(cn_max)
    if convention == "single":
        big = np.zeros(nb.n_atoms)
        np.maximum.at(big, nb.center, cn[nb.index])
        return np.divide(s, big, out=np.zeros_like(s), where=big > 0)
    raise ValueError(f"convention must be 'calle-vallejo' or 'single', got {convention!r}")


def bond_lengths(nb: Neighbors) -> np.ndarray:
    """(N,) float64 mean distance (Å) from each atom to its neighbours; NaN without neighbours."""
    s = np.bincount(nb.center, nb.distance, minlength=nb.n_atoms)
    c = nb.count
    return np.divide(s, c, out=np.full(nb.n_atoms, np.nan), where=c > 0)


@njit(**NJIT)
def _strain_tensors(offsets, vector, distance, d0, rcond):
    n = len(offsets) - 1
    out = np.full((n, 6), np.nan)
    for i in range(n):
        m = np.zeros((6, 6))
        rhs = np.zeros(6)
        for k in range(offsets[i], offsets[i + 1]):
            u = vector[k] / distance[k]
            row = np.array([u[0] * u[0], u[1] * u[1], u[2] * u[2],
                            2 * u[0] * u[1], 2 * u[0] * u[2], 2 * u[1] * u[2]])
            s = (distance[k] - d0) / d0
            for p in range(6):
                rhs[p] += row[p] * s
                for q in range(6):
                    m[p, q] += row[p] * row[q]
        if offsets[i + 1] - offsets[i] < 6:
            continue
        ev = np.linalg.eigvalsh(m)
        if ev[0] <= rcond * ev[-1]:
            continue  # bond directions do not determine all six components
        out[i] = np.linalg.solve(m, rhs)
    return out


def radial_strain(positions, nb: Neighbors, d0: float, center=None,
                  rcond: float = 1e-3) -> np.ndarray:
    """(N,) float64 radial strain ε_rr of each atom (dimensionless).

    The local strain tensor ε of atom i is the least-squares solution of
    (d_ij − d0)/d0 = n_ijᵀ ε n_ij over its bonds (n_ij unit bond vector, d0 the ideal bond
    length, e.g. :func:`nearest_neighbor_distance`); rotations do not change bond lengths, so
    no lattice orientation is needed. ε_rr = r̂ᵀ ε r̂ with r̂ the direction from ``center``
    (default: the centroid) to the atom. NaN where the bonds do not fix ε (fewer than six
    bond axes, or smallest/largest eigenvalue of the normal matrix ≤ ``rcond``: corners,
    edges) and for an atom at the centre.
    """
    pos = check_positions(positions)
    if not d0 > 0:
        raise ValueError(f"d0 must be a positive bond length in Å, got {d0}")
    c = pos.mean(axis=0) if center is None else np.asarray(center, np.float64).reshape(3)
    t = _strain_tensors(nb.offsets, nb.vector, nb.distance, float(d0), float(rcond))
    r = pos - c
    rn = np.linalg.norm(r, axis=1)
    u = np.divide(r, rn[:, None], out=np.full_like(r, np.nan), where=rn[:, None] > 1e-9)
    return (t[:, 0] * u[:, 0] ** 2 + t[:, 1] * u[:, 1] ** 2 + t[:, 2] * u[:, 2] ** 2
            + 2 * (t[:, 3] * u[:, 0] * u[:, 1] + t[:, 4] * u[:, 0] * u[:, 2]
                   + t[:, 5] * u[:, 1] * u[:, 2]))


# ----------------------------------------------------------------------------- displacement


@dataclass(frozen=True)
class DisplacementFit:
    """Gaussian widths of every atom's blob in the volume, from log-Gaussian least squares.

    sigma_iso : (N,) Å, width of the isotropic fit ln I = c + b·x − |x|²/(2σ²).
    sigma_principal : (N, 3) Å, principal widths of the anisotropic fit, largest first.
    axes : (N, 3, 3), columns = principal directions in (x, y, z).
    isotropy : (N,) σ_min² / σ_max² (1 for a sphere), the crystallographic anisotropy ratio.
    center : (N, 3) Å fitted blob centre. amplitude : (N,) fitted peak value.
    n_voxels : (N,) int64 voxels used. NaN everywhere a fit failed (too few voxels or a
    curvature that is not a peak). blur_sigma : Å subtracted in quadrature.
    """

    sigma_iso: np.ndarray
    sigma_principal: np.ndarray
    axes: np.ndarray
    isotropy: np.ndarray
    center: np.ndarray
    amplitude: np.ndarray
    n_voxels: np.ndarray
    blur_sigma: float


@njit(**NJIT)
def _well_posed(m):
    ev = np.linalg.eigvalsh(m)
    return ev[0] > 1e-12 * ev[-1]


@njit(**NJIT)
def _gauss_fits(vol, vs, origin, pos, radius, floor):
    n = pos.shape[0]
    iso = np.full(n, np.nan)
    quad = np.full((n, 10), np.nan)
    nvox = np.zeros(n, np.int64)
    sh = vol.shape
    for i in range(n):
        lo = np.empty(3, np.int64)
        hi = np.empty(3, np.int64)
        for k in range(3):
            ck = (pos[i, k] - origin[k]) / vs[k]
            lo[k] = max(0, int(np.floor(ck - radius / vs[k])))
            hi[k] = min(sh[k] - 1, int(np.ceil(ck + radius / vs[k])))
        peak = 0.0
        for a in range(lo[0], hi[0] + 1):
            for b in range(lo[1], hi[1] + 1):
                for c in range(lo[2], hi[2] + 1):
                    peak = max(peak, vol[a, b, c])
        if peak <= 0:
            continue
        m10 = np.zeros((10, 10))
        r10 = np.zeros(10)
        m5 = np.zeros((5, 5))
        r5 = np.zeros(5)
        cnt = 0
        row = np.empty(10)
        row5 = np.empty(5)
        for a in range(lo[0], hi[0] + 1):
            x = origin[0] + a * vs[0] - pos[i, 0]
            for b in range(lo[1], hi[1] + 1):
                y = origin[1] + b * vs[1] - pos[i, 1]
                for c in range(lo[2], hi[2] + 1):
                    z = origin[2] + c * vs[2] - pos[i, 2]
                    if x * x + y * y + z * z > radius * radius:
                        continue
                    v = vol[a, b, c]
                    if v <= floor * peak:
                        continue
                    # Weight I²: the log residual times I approximates the intensity residual.
                    w = v * v
                    lv = np.log(v)
                    row[0] = 1.0
                    row[1] = x
                    row[2] = y
                    row[3] = z
                    row[4] = x * x
                    row[5] = y * y
                    row[6] = z * z
                    row[7] = x * y
                    row[8] = x * z
                    row[9] = y * z
                    row5[0] = 1.0
                    row5[1] = x
                    row5[2] = y
                    row5[3] = z
                    row5[4] = x * x + y * y + z * z
                    for p in range(10):
                        r10[p] += w * row[p] * lv
                        for q in range(10):
                            m10[p, q] += w * row[p] * row[q]
                    for p in range(5):
                        r5[p] += w * row5[p] * lv
                        for q in range(5):
                            m5[p, q] += w * row5[p] * row5[q]
                    cnt += 1
        nvox[i] = cnt
        if cnt >= 5 and _well_posed(m5):
            iso_c = np.linalg.solve(m5, r5)
            if iso_c[4] < 0:
                iso[i] = np.sqrt(-0.5 / iso_c[4])
        if cnt >= 10 and _well_posed(m10):
            quad[i] = np.linalg.solve(m10, r10)
    return iso, quad, nvox


def displacement_fit(volume, voxel_size, positions, radius: float, origin="center",
                     axes: str = "zyx", floor: float = 0.05,
                     blur_sigma: float = 0.0) -> DisplacementFit:
    """Isotropic and anisotropic Gaussian widths of each atom's blob in a reconstructed volume.

    On the voxels within ``radius`` (Å) of each atom with value > ``floor`` × the patch peak,
    fits ln I = c + bᵀx − ½ xᵀPx (anisotropic, 10 parameters) and ln I = c + bᵀx + a|x|²
    (isotropic, 5 parameters) by least squares weighted by I² (Guo's weighting: the weighted
    log residual approximates the intensity residual). Σ = P⁻¹ (Å²) minus ``blur_sigma``²
    (the reconstruction's own blur, Å) is the atom's displacement covariance.

    Parameters
    ----------
    volume : (n0, n1, n2) real, atoms bright and positive.
    voxel_size : Å, scalar or 3 (along x, y, z).
    positions : (N, 3) Å, (x, y, z).
    radius : patch radius, Å; below half the nearest-neighbour distance so that neighbours
        stay out, and at least ~2 voxels.
    origin : 'center' (positions relative to the centre voxel, as ``operators.tracing``) or
        the (x, y, z) position in Å of voxel (0, 0, 0).
    axes : 'zyx' (volume indexed [z, y, x], as ``operators.tracing``) or 'xyz'.
    floor : voxels ≤ floor × peak are left out (log of noise).
    blur_sigma : Å removed in quadrature from every width.

    Returns
    -------
    DisplacementFit
    """
    vol = np.asarray(volume)
    if vol.ndim != 3 or not np.issubdtype(vol.dtype, np.number) or np.iscomplexobj(vol):
        raise ValueError(f"volume must be a real 3D array, got shape {vol.shape} dtype {vol.dtype}")
    vol = np.ascontiguousarray(vol, dtype=np.float64)
    if axes not in ("zyx", "xyz"):
        raise ValueError(f"axes must be 'zyx' (volume[z, y, x]) or 'xyz', got {axes!r}")
    perm = np.array([2, 1, 0] if axes == "zyx" else [0, 1, 2])  # position column of each axis
    vs = np.broadcast_to(np.asarray(voxel_size, np.float64), (3,))[perm].copy()
    if not (np.isfinite(vs).all() and (vs > 0).all()):
        raise ValueError(f"voxel_size must be positive (Å), got {voxel_size!r}")
    if isinstance(origin, str):
        if origin != "center":
            raise ValueError(f"origin must be 'center' or (x, y, z) in Å, got {origin!r}")
        org = -(np.array(vol.shape) // 2) * vs
    else:
        org = np.broadcast_to(np.asarray(origin, np.float64), (3,))[perm].copy()
    pos_xyz = check_positions(positions)
    pos = np.ascontiguousarray(pos_xyz[:, perm])  # columns in volume-axis order
    if not (radius > 0 and np.isfinite(radius)):
        raise ValueError(f"radius must be a positive distance in Å, got {radius}")
    if radius < 1.5 * vs.max():
        raise ValueError(f"radius {radius} Å spans too few voxels of {vs.max()} Å: use at least "
                         f"{1.5 * vs.max():.3g} Å (about half the nearest-neighbour distance)")
    if not (0 <= floor < 1):
        raise ValueError(f"floor must be in [0, 1), got {floor}")
    iso, quad, nvox = _gauss_fits(vol, vs, org, pos, float(radius), float(floor))
    n = len(pos)
    b = quad[:, 1:4]
    a = quad[:, 4:]
    p = np.empty((n, 3, 3))
    p[:, 0, 0], p[:, 1, 1], p[:, 2, 2] = -2 * a[:, 0], -2 * a[:, 1], -2 * a[:, 2]
    p[:, 0, 1] = p[:, 1, 0] = -a[:, 3]
    p[:, 0, 2] = p[:, 2, 0] = -a[:, 4]
    p[:, 1, 2] = p[:, 2, 1] = -a[:, 5]
    ok = np.isfinite(quad).all(axis=1)
    p[~ok] = np.eye(3)
    ev_p = np.linalg.eigvalsh(p)
    ok &= ev_p[:, 0] > 0
    p[~ok] = np.eye(3)
    cov = np.linalg.inv(p)
    shift = np.einsum("nij,nj->ni", cov, np.where(ok[:, None], b, 0.0))
    amp = np.exp(quad[:, 0] + 0.5 * np.einsum("ni,ni->n", b, shift))
    blur2 = float(blur_sigma) ** 2
    ev, vec = np.linalg.eigh(cov - blur2 * np.eye(3))
    ev, vec = ev[:, ::-1], vec[:, :, ::-1]
    ok &= ev[:, 2] > 0
    sig = np.sqrt(np.where(ok[:, None], ev, np.nan))
    iso2 = iso ** 2 - blur2
    back = np.argsort(perm)  # volume-axis order -> (x, y, z)
    return DisplacementFit(
        sigma_iso=np.sqrt(np.where(iso2 > 0, iso2, np.nan)),
        sigma_principal=sig,
        axes=np.where(ok[:, None, None], vec[:, back, :], np.nan),
        isotropy=np.where(ok, ev[:, 2] / np.where(ok, ev[:, 0], 1.0), np.nan),
        center=np.where(ok[:, None], pos_xyz + shift[:, back], np.nan),
        amplitude=np.where(ok, amp, np.nan),
        n_voxels=nvox, blur_sigma=float(blur_sigma))


# ----------------------------------------------------------------------------- depth profile


def zscore(values) -> np.ndarray:
    """(N,) (v − mean) / std over the finite values (population std); NaN stays NaN, a constant
    gives 0."""
    v = np.asarray(values, dtype=np.float64)
    fin = np.isfinite(v)
    if not fin.any():
        return np.full(v.shape, np.nan)
    mu, sd = v[fin].mean(), v[fin].std()
    return (v - mu) / sd if sd > 0 else np.where(fin, 0.0, np.nan)


@njit(**NJIT)
def _plane_depth(pos, eq):
    out = np.empty(pos.shape[0])
    for i in range(pos.shape[0]):
        best = np.inf
        for f in range(eq.shape[0]):
            d = -(eq[f, 0] * pos[i, 0] + eq[f, 1] * pos[i, 1] + eq[f, 2] * pos[i, 2] + eq[f, 3])
            if d < best:
                best = d
        out[i] = best
    return out


def surface_depth(positions) -> np.ndarray:
    """(N,) float64 depth (Å) of each atom below the sample surface: its distance to the
    nearest face of the convex hull of all atoms (0 for hull atoms). For a spherical particle
    this is the radial depth R − |r − c|."""
    pos = check_positions(positions, min_atoms=4)
    try:
        hull = ConvexHull(pos)
    except QhullError as exc:
        raise ValueError(f"convex hull failed (atoms coplanar?): "
                         f"{str(exc).splitlines()[0]}") from None
    return np.maximum(_plane_depth(pos, np.ascontiguousarray(hull.equations)), 0.0)


@dataclass(frozen=True)
class PenetrationFit:
    """Piecewise linear–constant fit of a statistic s against depth d.

    s(d) = surface_value + slope·d for d < depth, core_value for d ≥ depth.
    depth : Å, the surface-to-core penetration depth (halfway between the two atoms at the
    break). n_surface : atoms in the linear part. rms : residual RMS.
    """

    depth: float
    surface_value: float
    slope: float
    core_value: float
    n_surface: int
    rms: float


def penetration_depth(depth, values, min_points: int = 5,
                      min_fraction: float = 0.02) -> PenetrationFit:
    """Surface-to-core penetration depth: the break of the least-squares piecewise fit
    (linear from the surface, constant in the core, each with its own parameters, so that
    both a step and a ramp into a plateau are fitted exactly) of ``values`` against ``depth``
    (Å); atoms with a NaN in either are left out. Every break between distinct depths with at
    least max(``min_points``, ``min_fraction`` × N) atoms on each side is tried (exact search,
    O(N) after sorting); the minimum keeps a handful of outermost atoms from being fitted
    as a "surface" of their own."""
    d = np.asarray(depth, dtype=np.float64).ravel()
    v = np.asarray(values, dtype=np.float64).ravel()
    if d.shape != v.shape:
        raise ValueError(f"depth and values must have the same length, got {d.shape} and {v.shape}")
    keep = np.isfinite(d) & np.isfinite(v)
    d, v = d[keep], v[keep]
    o = np.argsort(d, kind="stable")
    d, v = d[o], v[o]
    n = len(d)
    if min_points < 2 or not (0 <= min_fraction < 0.5):
        raise ValueError(f"need min_points ≥ 2 and 0 ≤ min_fraction < 0.5, got {min_points}, "
                         f"{min_fraction}")
    min_points = max(int(min_points), int(np.ceil(min_fraction * n)))
    if n < 2 * min_points:
        raise ValueError(f"need at least {2 * min_points} atoms with a finite depth and value, "
                         f"got {n}")
    # Centre for numerical stability of the prefix sums.
    dm, vm = d.mean(), v.mean()
    dc, vc = d - dm, v - vm
    c1 = np.cumsum(np.ones(n))
    cd, cdd = np.cumsum(dc), np.cumsum(dc * dc)
    cv, cvv, cdv = np.cumsum(vc), np.cumsum(vc * vc), np.cumsum(dc * vc)
    k = np.arange(min_points, n - min_points + 1)  # points in the linear part
    k = k[d[k - 1] < d[k]]  # break only between distinct depths
    if len(k) == 0:
        raise ValueError("no break point: all depths are equal")
    nk, sd, sdd = c1[k - 1], cd[k - 1], cdd[k - 1]
    sv, svv, sdv = cv[k - 1], cvv[k - 1], cdv[k - 1]
    sxx = sdd - sd * sd / nk
    sxy = sdv - sd * sv / nk
    slope = np.divide(sxy, sxx, out=np.zeros_like(sxx), where=sxx > 0)
    sse_lin = np.maximum(svv - sv * sv / nk - slope * sxy, 0.0)
    tn = n - nk
    tv, tvv = cv[-1] - sv, cvv[-1] - svv
    sse_core = np.maximum(tvv - tv * tv / tn, 0.0)
    best = int(np.argmin(sse_lin + sse_core))
    kb = int(k[best])
    b_slope = float(slope[best])
    icpt = sv[best] / nk[best] - b_slope * sd[best] / nk[best]  # in centred units
    surface_value = float(icpt + vm - b_slope * dm)
    return PenetrationFit(depth=float(0.5 * (d[kb - 1] + d[kb])), surface_value=surface_value,
                          slope=b_slope, core_value=float(tv[best] / tn[best] + vm),
                          n_surface=kb, rms=float(np.sqrt((sse_lin[best] + sse_core[best]) / n)))


# ----------------------------------------------------------------------------- g(r)


@dataclass(frozen=True)
class SampleMask:
    """The region a sample occupies, as voxels: ``mask[i0, i1, i2]`` is centred at
    ``origin + (i0, i1, i2) * voxel`` (Å), axes as the position columns."""

    mask: np.ndarray
    origin: np.ndarray
    voxel: np.ndarray


@dataclass(frozen=True)
class PairDistribution:
    """Pair distribution function of a sample.

    r : (B,) Å bin centres; edges : (B+1,) Å; g : (B,) g(r); pairs : (B,) ordered pairs per
    bin; density : atoms/Å³ (N / volume); volume : Å³; window_fraction : (B,) the isotropised
    set covariance γ̄(r)/V used in the edge correction (1 without edges); correction : str.
    """

    r: np.ndarray
    edges: np.ndarray
    g: np.ndarray
    pairs: np.ndarray
    density: float
    volume: float
    window_fraction: np.ndarray
    correction: str


@njit(**NJIT)
def _pair_histogram(pos, r_max, dr, n_bins, box, periodic):
    """Histogram of unordered pair distances below r_max, with a cell list."""
    n = pos.shape[0]
    hist = np.zeros(n_bins, np.int64)
    lo = np.empty(3)
    nc = np.empty(3, np.int64)
    size = np.empty(3)
    for k in range(3):
        if periodic:
            lo[k] = 0.0
            nc[k] = max(1, int(box[k] // r_max))
            size[k] = box[k] / nc[k]
        else:
            lo[k] = pos[:, k].min()
            nc[k] = max(1, int((pos[:, k].max() - lo[k]) // r_max) + 1)
            size[k] = r_max
    cell = np.empty(n, np.int64)
    for i in range(n):
        c = 0
        for k in range(3):
            ck = min(nc[k] - 1, int((pos[i, k] - lo[k]) / size[k]))
            c = c * nc[k] + ck
        cell[i] = c
    order = np.argsort(cell)
    n_cells = nc[0] * nc[1] * nc[2]
    start = np.zeros(n_cells + 1, np.int64)
    for i in range(n):
        start[cell[i] + 1] += 1
    for c in range(n_cells):
        start[c + 1] += start[c]
    spos = pos[order]
    r2 = r_max * r_max
    offs = np.empty((27, 3), np.int64)
    for c0 in range(nc[0]):
        for c1 in range(nc[1]):
            for c2 in range(nc[2]):
                me = (c0 * nc[1] + c1) * nc[2] + c2
                # Neighbour cells, each once even when a periodic axis has fewer than 3 cells.
                m = 0
                for d0 in range(-1, 2):
                    for d1 in range(-1, 2):
                        for d2 in range(-1, 2):
                            q = np.array([c0 + d0, c1 + d1, c2 + d2])
                            inside = True
                            for k in range(3):
                                if periodic:
                                    q[k] = q[k] % nc[k]
                                elif q[k] < 0 or q[k] >= nc[k]:
                                    inside = False
                            if not inside:
                                continue
                            dup = False
                            for t in range(m):
                                if offs[t, 0] == q[0] and offs[t, 1] == q[1] and offs[t, 2] == q[2]:
                                    dup = True
                            if not dup:
                                offs[m] = q
                                m += 1
                for t in range(m):
                    other = (offs[t, 0] * nc[1] + offs[t, 1]) * nc[2] + offs[t, 2]
                    if other < me:
                        continue
                    for i in range(start[me], start[me + 1]):
                        j0 = i + 1 if other == me else start[other]
                        for j in range(j0, start[other + 1]):
                            s = 0.0
                            for k in range(3):
                                dk = spos[j, k] - spos[i, k]
                                if periodic:
                                    dk -= box[k] * np.round(dk / box[k])
                                s += dk * dk
                            if s < r2:
                                b = int(np.sqrt(s) / dr)
                                if b < n_bins:
                                    hist[b] += 1
    return hist


def _fibonacci_sphere(n: int) -> np.ndarray:
    k = np.arange(n) + 0.5
    z = 1 - 2 * k / n
    phi = np.pi * (1 + 5 ** 0.5) * k
    s = np.sqrt(1 - z * z)
    return np.stack([s * np.cos(phi), s * np.sin(phi), z], axis=1)


def sample_window_offset(positions) -> float:
    """Default surface offset of :func:`sample_window` (Å): 0.4 × the median
    nearest-neighbour distance."""
    return 0.4 * float(np.median(nearest_distance(positions)))


def sample_window(positions, kind: str = "alpha", alpha: float | None = None,
                  surface_offset: float | None = None, voxel: float | None = None,
                  max_voxels: int = 4_000_000, triangulation=None) -> SampleMask:
    """Voxel mask of the region a finite sample occupies.

    kind : 'alpha' — the α-shape of the atoms (union of the Delaunay tetrahedra with
        circumradius < ``alpha``; Yuan et al. use MATLAB's alphaShape with α = 4 Å), which
        follows a non-convex sample; or 'hull' — the convex hull.
    alpha : Å, default 1.6 × the median nearest-neighbour distance d (4.0 Å for the Ta film).
    surface_offset : Å the region extends beyond the outermost atom centres, default 0.4 d —
        half the spacing of close-packed layers (d·√(2/3)/2), the volume the surface atoms own.
        Without it the density of a thin film or a small particle comes out too high.
    voxel : Å, default the size that gives about ``max_voxels`` voxels, at least d/5.
    triangulation : a ``scipy.spatial.Delaunay`` of the positions to reuse, or None.
    """
    pos = check_positions(positions, min_atoms=5)
    d = float(np.median(nearest_distance(pos)))
    alpha = 1.6 * d if alpha is None else float(alpha)
    off = 0.4 * d if surface_offset is None else float(surface_offset)
    if not (alpha > 0 and off >= 0):
        raise ValueError(f"alpha must be > 0 and surface_offset >= 0 (Å), got {alpha}, {off}")
    lo = pos.min(axis=0) - off - 1e-6
    ext = pos.max(axis=0) + off + 1e-6 - lo
    if voxel is None:  # about max_voxels voxels, but no finer than a fifth of a bond
        voxel = max(float(np.prod(ext) / max_voxels) ** (1 / 3), 0.2 * d)
    voxel = float(voxel)
    shape = np.ceil(ext / voxel).astype(np.int64) + 1
    try:
        if kind == "hull":
            eq = np.ascontiguousarray(ConvexHull(pos).equations)
            axes = [lo[k] + np.arange(shape[k]) * voxel for k in range(3)]
            mask = _hull_columns(eq, axes[0], axes[1], axes[2])
        elif kind == "alpha":
            tri = triangulate(pos) if triangulation is None else triangulation
            simp = np.ascontiguousarray(tri.simplices, dtype=np.int64)
            keep = _circumradius(pos, simp) < alpha
            mask = _raster_tetrahedra(pos, simp, keep, lo, voxel, shape)
        else:
            raise ValueError(f"window kind must be 'alpha' or 'hull', got {kind!r}")
    except QhullError as exc:
        raise ValueError(f"sample window: qhull failed (atoms coplanar?): "
                         f"{str(exc).splitlines()[0]}") from None
    if off > 0:
        mask = distance_transform_edt(~mask, sampling=voxel) <= off
    return SampleMask(mask, lo, np.full(3, voxel))


def _circumradius(pos, simplices):
    """(T,) circumradius of each tetrahedron (Å); inf for flat ones."""
    a = pos[simplices[:, 0]]
    b, c, d = (pos[simplices[:, k]] - a for k in (1, 2, 3))
    cd, db, bc = np.cross(c, d), np.cross(d, b), np.cross(b, c)
    den = 2 * np.einsum("ij,ij->i", b, cd)
    num = (np.einsum("ij,ij->i", b, b)[:, None] * cd + np.einsum("ij,ij->i", c, c)[:, None] * db
           + np.einsum("ij,ij->i", d, d)[:, None] * bc)
    flat = np.abs(den) < 1e-12 * np.einsum("ij,ij->i", b, b) ** 1.5
    r = np.linalg.norm(num, axis=1) / np.where(flat, 1.0, np.abs(den))
    return np.where(flat, np.inf, r)


@njit(**NJIT)
def _raster_tetrahedra(pos, simplices, keep, lo, voxel, shape):
    """Voxels whose centre lies in any kept tetrahedron (barycentric test per bounding box)."""
    mask = np.zeros((shape[0], shape[1], shape[2]), np.bool_)
    t_mat = np.empty((3, 3))
    blo = np.empty(3, np.int64)
    bhi = np.empty(3, np.int64)
    eps = 1e-9
    for t in range(simplices.shape[0]):
        if not keep[t]:
            continue
        a = pos[simplices[t, 0]]
        for k in range(3):
            for j in range(3):
                t_mat[k, j] = pos[simplices[t, j + 1], k] - a[k]
        inv = np.linalg.inv(t_mat)
        for k in range(3):
            mn = a[k]
            mx = a[k]
            for j in range(1, 4):
                mn = min(mn, pos[simplices[t, j], k])
                mx = max(mx, pos[simplices[t, j], k])
            blo[k] = max(0, int(np.ceil((mn - lo[k]) / voxel)))
            bhi[k] = min(shape[k] - 1, int(np.floor((mx - lo[k]) / voxel)))
        for i in range(blo[0], bhi[0] + 1):
            x = lo[0] + i * voxel - a[0]
            for j in range(blo[1], bhi[1] + 1):
                y = lo[1] + j * voxel - a[1]
                for l in range(blo[2], bhi[2] + 1):
                    z = lo[2] + l * voxel - a[2]
                    u = inv[0, 0] * x + inv[0, 1] * y + inv[0, 2] * z
                    v = inv[1, 0] * x + inv[1, 1] * y + inv[1, 2] * z
                    w = inv[2, 0] * x + inv[2, 1] * y + inv[2, 2] * z
                    if u >= -eps and v >= -eps and w >= -eps and u + v + w <= 1 + eps:
                        mask[i, j, l] = True
    return mask


@njit(**NJIT)
def _hull_columns(eq, x0, x1, x2):
    """Inside-hull mask: for each (x0, x1) column the hull is one interval along axis 2."""
    mask = np.zeros((len(x0), len(x1), len(x2)), np.bool_)
    for a in range(len(x0)):
        for b in range(len(x1)):
            zlo, zhi = -np.inf, np.inf
            ok = True
            for f in range(eq.shape[0]):
                rest = eq[f, 0] * x0[a] + eq[f, 1] * x1[b] + eq[f, 3]
                nz = eq[f, 2]
                if abs(nz) < 1e-12:
                    if rest > 1e-9:
                        ok = False
                        break
                elif nz > 0:
                    zhi = min(zhi, -rest / nz)
                else:
                    zlo = max(zlo, -rest / nz)
            if not ok or zlo > zhi:
                continue
            for c in range(len(x2)):
                if zlo <= x2[c] <= zhi:
                    mask[a, b, c] = True
    return mask


def window_fraction(mask: SampleMask, r: np.ndarray, n_directions: int = 400) -> np.ndarray:
    """γ̄(r)/γ(0): the mean over directions u of vol(W ∩ (W + r u)) / vol(W), from the voxel
    autocorrelation of the mask (FFT, padded so that shifts up to max(r) do not wrap)."""
    m = np.asarray(mask.mask, dtype=np.float64)
    r = np.asarray(r, dtype=np.float64)
    pad = [int(s + np.ceil(r.max() / v) + 2) for s, v in zip(m.shape, mask.voxel)]
    f = np.fft.rfftn(m, pad, axes=(0, 1, 2))
    cov = np.fft.irfftn(f * np.conj(f), pad, axes=(0, 1, 2))
    c0 = cov[0, 0, 0]
    if c0 <= 0:
        raise ValueError("sample mask is empty")
    u = _fibonacci_sphere(n_directions)
    coords = (r[:, None, None] * u[None, :, :] / mask.voxel).reshape(-1, 3).T
    vals = map_coordinates(cov, coords, order=1, mode="grid-wrap").reshape(len(r), n_directions)
    return np.clip(vals.mean(axis=1) / c0, 0.0, None)


def pair_distribution(positions, r_max: float = 12.0, dr: float = 0.05, domain="alpha",
                      box_size=None, density: float | None = None, n_directions: int = 400,
                      triangulation=None) -> PairDistribution:
    """Pair distribution function g(r) with an edge correction for a finite sample.

    g(r) = H(r) / (N · ρ · γ̄(r)/V · 4π r² dr), H the ordered pairs at distance r, ρ the
    number density ((N − 1)/V of the window, so that an ideal gas of N atoms gives exactly 1,
    or the ``density`` given). The edge correction is the isotropised set covariance (the
    "translation" correction of spatial statistics, Ohser & Stoyan 1981): a pair of
    separation r·u is seen only where both ends fall in the sample window W, a volume
    γ(r·u) = vol(W ∩ (W + r·u)); its direction average γ̄(r) (from the FFT autocorrelation of
    the window's voxels) replaces V. This is unbiased for a homogeneous isotropic structure
    whatever the window's shape, and is the average of the per-atom "fraction of the sphere
    inside the sample" weighting Yuan et al. use, at a fraction of the cost.

    Parameters
    ----------
    positions : (N, 3) Å.
    r_max, dr : Å; bins [k·dr, (k+1)·dr) up to r_max.
    domain : the window W: 'alpha' (α-shape of the atoms, any shape), 'hull' (convex hull),
        both with the defaults of :func:`sample_window`, or a :class:`SampleMask` (e.g. the
        support of a reconstruction). Ignored with ``box_size``.
    box_size : periodic box edges, Å (simulation cells): no edges, V = box volume.
    density : atoms/Å³, overrides (N − 1)/V.
    n_directions : directions averaged for γ̄.
    triangulation : a ``scipy.spatial.Delaunay`` of the positions to reuse for 'alpha'.

    Returns
    -------
    PairDistribution
    """
    pos = check_positions(positions, min_atoms=2)
    if not (dr > 0 and r_max > dr):
        raise ValueError(f"need 0 < dr < r_max (Å), got dr={dr}, r_max={r_max}")
    n_bins = int(round(r_max / dr))
    edges = np.arange(n_bins + 1) * dr
    r_max = float(edges[-1])
    centers = edges[:-1] + dr / 2
    if box_size is not None:
        box = np.broadcast_to(np.asarray(box_size, np.float64), (3,)).copy()
        if not (box > 2 * r_max).all():
            raise ValueError(f"r_max {r_max} Å must be below half the box {box} Å")
        hist = _pair_histogram(wrap(pos, box), r_max, float(dr), n_bins, box, True)
        vol = float(np.prod(box))
        frac = np.ones(n_bins)
        correction = "periodic box: none needed"
    else:
        hist = _pair_histogram(pos, r_max, float(dr), n_bins, np.zeros(3), False)
        if isinstance(domain, SampleMask):
            win = domain
            what = "the given sample mask"
        elif domain in ("alpha", "hull"):
            win = sample_window(pos, domain, triangulation=triangulation)
            what = {"alpha": "the alpha shape", "hull": "the convex hull"}[domain] + \
                f" of the atoms + {sample_window_offset(pos):.3g} Å"
        else:
            raise ValueError(f"domain must be 'alpha', 'hull' or a SampleMask, got {domain!r}")
        vol = float(np.count_nonzero(win.mask) * np.prod(win.voxel))
        if vol <= 0:
            raise ValueError("the sample window is empty")
        frac = window_fraction(win, centers, n_directions)
        correction = f"isotropised set covariance (translation) of {what}"
    n = len(pos)
    rho = (n - 1) / vol if density is None else float(density)
    if not rho > 0:
        raise ValueError(f"density must be positive (atoms/Å³), got {density}")
    correction += "; density given" if density is not None else "; density (N−1)/V"
    shell = 4.0 / 3.0 * np.pi * (edges[1:] ** 3 - edges[:-1] ** 3)
    pairs = 2 * hist
    denom = n * rho * frac * shell
    g = np.divide(pairs, denom, out=np.full(n_bins, np.nan), where=denom > 0)
    return PairDistribution(centers, edges, g, pairs, n / vol if density is None else rho,
                            vol, frac, correction)


def first_valley(pdf: PairDistribution, smooth: float = 0.15) -> float:
    """r (Å) of the first minimum of g after its highest peak, g smoothed by a Gaussian of
    ``smooth`` Å (Yuan et al. smooth over 1.5 bins of 0.1 Å before reading the valley, 4.12 Å
    for the Ta film); NaN if there is none."""
    g = np.nan_to_num(pdf.g)
    dr = float(pdf.edges[1] - pdf.edges[0])
    gs = gaussian_filter1d(g, smooth / dr) if smooth > 0 else g
    p = int(np.argmax(gs))
    for k in range(p + 1, len(gs) - 1):
        if gs[k] <= gs[k - 1] and gs[k] < gs[k + 1]:
            return float(pdf.r[k])
    return float("nan")
