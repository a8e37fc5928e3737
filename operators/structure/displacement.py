"""Atom peaks in a reconstructed volume: the intensity-weighted log-Gaussian fit of each atom's
blob (isotropic and anisotropic widths = displacement, centre, amplitude) and the z-score of
per-atom peak intensities.

Volumes
-------
By default a volume is indexed ``vol[z, y, x]`` and positions are (x, y, z) Å relative to
the centre voxel (nz//2, ny//2, nx//2), as ``operators.tomography.projector`` and ``operators.tomography.tracing``
use them (``axes="zyx"``, ``origin="center"``). With ``axes="xyz"`` position column k runs
along volume axis k; a given ``origin`` is the (x, y, z) position in Å of voxel (0, 0, 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from operators.kernels import NJIT
from operators.structure.neighbors import check_positions


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
    origin : 'center' (positions relative to the centre voxel, as ``operators.tomography.tracing``) or
        the (x, y, z) position in Å of voxel (0, 0, 0).
    axes : 'zyx' (volume indexed [z, y, x], as ``operators.tomography.tracing``) or 'xyz'.
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
        raise ValueError(f"fit radius {radius} Å spans too few voxels of {vs.max()} Å: use at least "
                         f"{1.5 * vs.max():.3g} Å (at most about half the nearest-neighbour distance), or "
                         "finer voxels")
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


def zscore(values) -> np.ndarray:
    """(N,) (v − mean) / std over the finite values (population std); NaN stays NaN, a constant
    gives 0."""
    v = np.asarray(values, dtype=np.float64)
    fin = np.isfinite(v)
    if not fin.any():
        return np.full(v.shape, np.nan)
    mu, sd = v[fin].mean(), v[fin].std()
    return (v - mu) / sd if sd > 0 else np.where(fin, 0.0, np.nan)
