"""The region a finite sample occupies, as a voxel mask (α-shape or convex hull of the atoms,
dilated by a surface offset), and its isotropised set covariance γ̄(r)/V: the window of the
edge correction in :mod:`operators.structure.pair_distribution`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit
from scipy.ndimage import distance_transform_edt, map_coordinates
from scipy.spatial import ConvexHull, QhullError

from operators.kernels import NJIT
from operators.structure.neighbors import check_positions, nearest_distance, triangulate


@dataclass(frozen=True)
class SampleMask:
    """The region a sample occupies, as voxels: ``mask[i0, i1, i2]`` is centred at
    ``origin + (i0, i1, i2) * voxel`` (Å), axes as the position columns."""

    mask: np.ndarray
    origin: np.ndarray
    voxel: np.ndarray


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
