"""Forward projector Π and its exact adjoint Πᵀ (back-projector) for tilt-series tomography.

Convention (RESIRE's, Pham et al., Sci. Rep. 2023)
--------------------------------------------------
- A volume is an array ``(nz, ny, nx)`` indexed ``[z, y, x]``; a projection is an image
  ``(h, w)`` indexed ``[row, col] = [v, u]``, rows along y and columns along x like every scan
  image of this project. The beam travels along z: at zero angles a projection is
  ``volume.sum(axis=0)``.
- Coordinates are in voxels relative to the centre voxel ``(nz // 2, ny // 2, nx // 2)``; the
  projection centre is pixel ``(h // 2, w // 2)``. Both are the rotation centre, the same
  centres as RESIRE's ``round((n + 1) / 2)`` in MATLAB's 1-based indexing.
- Euler angles ``(phi, theta, psi)`` in degrees, about z, y, x by default (``axes="zyx"``,
  :data:`RESIRE_AXES`): ``M = Rz(phi) Ry(theta) Rx(psi)`` with right-handed active rotations
  ``R_a(t)`` (scipy's intrinsic ``"ZYX"``). That is RESIRE's published convention: its
  ``vector1 = [0 0 1]``, ``vector2 = [0 1 0]``, ``vector3 = [1 0 0]`` and
  ``R = (Rv1(phi) Rv2(theta) Rv3(psi))ᵀ`` (``RESIRE_reconstructor.m``, ``interp_pj_realspace.m``).
  A voxel at ``r = (x, y, z)`` lands on the detector at ``(u, v) = (Mᵀ r)_x, (Mᵀ r)_y``. For a
  single tilt ``(0, theta, 0)`` the tilt axis is y and ``u = x cos(theta) - z sin(theta)``,
  ``v = y`` — the same in every convention with the y axis second; ``axes`` ("zyz" for
  GENFIRE-style angles, …) matters only when phi or psi is not 0.
- The emulator (``sim_detector``) tilts the specimen by ``t`` about y with
  ``x' = x cos t + z sin t``: its scan at tilt ``t`` is the projection at ``(0, -t, 0)``.
- The measured tilt series of the AET papers (MATLAB arrays ``(x, y, n)``) becomes a stack
  ``(n, y, x)`` with ``np.transpose(p, (2, 1, 0))``; its angles are used as they are.

Discretisation: each voxel is a point splatted bilinearly onto the detector (forward); the
back-projector interpolates the detector bilinearly at each voxel's (u, v) (as RESIRE's
back-projection does). The two use the same weights, so they are adjoint to rounding error,
and at ``theta = 0`` every voxel falls exactly on a pixel. Pixels outside the detector are
dropped (zero boundary).

Example
-------
>>> import numpy as np
>>> vol = np.zeros((5, 5, 5)); vol[2, 1, 4] = 1.0          # z = 0, y = -1, x = +2
>>> p = project(vol, [(0.0, 90.0, 0.0)])                   # u = -z = 0, v = y = -1
>>> np.argwhere(p[0] > 0.5).tolist()
[[1, 2]]
"""

from __future__ import annotations

import math

import numpy as np

RESIRE_AXES = "zyx"  # rotation axes of (phi, theta, psi) in RESIRE's published scripts
from numba import njit, prange

from operators.kernels import NJIT

AXES = {"x": 0, "y": 1, "z": 2}


def axis_rotation(axis: str, angle_deg) -> np.ndarray:
    """(n, 3, 3) right-handed active rotations by ``angle_deg`` (n,) degrees about ``axis``
    ("x", "y" or "z"); multiples of 90° are exact."""
    a = np.atleast_1d(np.asarray(angle_deg, dtype=np.float64))
    t = np.deg2rad(a)
    c, s = np.cos(t), np.sin(t)
    q = a / 90.0
    exact = q == np.round(q)  # exact zeros so that 90° tilts land on pixels
    k = np.round(q[exact]).astype(np.int64) % 4
    c[exact] = np.array([1.0, 0.0, -1.0, 0.0])[k]
    s[exact] = np.array([0.0, 1.0, 0.0, -1.0])[k]
    i = AXES[axis]
    j, k2 = (i + 1) % 3, (i + 2) % 3
    R = np.zeros((len(a), 3, 3))
    R[:, i, i] = 1.0
    R[:, j, j] = c
    R[:, k2, k2] = c
    R[:, j, k2] = -s
    R[:, k2, j] = s
    return R


def check_angles(angles_deg, n: int | None = None) -> np.ndarray:
    """Euler angles as an (n, 3) float64 array (phi, theta, psi), degrees.

    A 1-D array is read as tilts theta with phi = psi = 0. ValueError for other shapes,
    non-finite values, or a count different from ``n`` (the number of projections).
    """
    a = np.asarray(angles_deg, dtype=np.float64)
    if a.ndim == 1:
        a = np.stack([np.zeros_like(a), a, np.zeros_like(a)], axis=1)
    if a.ndim != 2 or a.shape[1] != 3 or len(a) == 0:
        raise ValueError(f"angles must be (n, 3) Euler angles (phi, theta, psi) in degrees or "
                         f"(n,) tilts, got shape {np.shape(angles_deg)}")
    if not np.isfinite(a).all():
        raise ValueError("angles must be finite (degrees)")
    if n is not None and len(a) != n:
        raise ValueError(f"{len(a)} angle triplets for {n} projections: give one per projection")
    return a


def check_axes(axes: str) -> str:
    """Three rotation axes such as "zyx" (RESIRE's) or "zyz"; ValueError otherwise."""
    ax = str(axes).lower()
    if len(ax) != 3 or any(c not in AXES for c in ax):
        raise ValueError(f"axes must be three letters from 'x', 'y', 'z' such as 'zyx' (RESIRE) "
                         f"or 'zyz', got {axes!r}")
    return ax


def rotation_matrices(angles_deg, axes: str = RESIRE_AXES) -> np.ndarray:
    """(n, 3, 3) float64 ``M = R_a1(phi) R_a2(theta) R_a3(psi)`` for (n, 3) Euler angles in
    degrees (or (n,) tilts). A voxel at r projects to ``(Mᵀ r)[:2]`` (see the module doc)."""
    a = check_angles(angles_deg)
    ax = check_axes(axes)
    return axis_rotation(ax[0], a[:, 0]) @ axis_rotation(ax[1], a[:, 1]) @ \
        axis_rotation(ax[2], a[:, 2])


def _check_volume(volume, what="volume") -> np.ndarray:
    v = np.asarray(volume)
    if v.ndim != 3 or min(v.shape) < 1:
        raise ValueError(f"{what} must be a 3-D array (nz, ny, nx), got shape {v.shape}")
    if not np.issubdtype(v.dtype, np.number) or np.iscomplexobj(v):
        raise ValueError(f"{what} must be real numbers, got dtype {v.dtype}")
    return np.ascontiguousarray(v, dtype=np.float64)


def _detector_maps(mats: np.ndarray) -> np.ndarray:
    """(n, 2, 3) rows of Mᵀ giving (u, v) from (x, y, z)."""
    return np.ascontiguousarray(np.transpose(mats, (0, 2, 1))[:, :2, :])


def project(volume, angles_deg, proj_shape=None, axes: str = RESIRE_AXES) -> np.ndarray:
    """Projections Π_i O of a volume.

    Parameters
    ----------
    volume : (nz, ny, nx) real array, any units per voxel; z is the beam axis at zero angles.
    angles_deg : (n, 3) Euler angles (phi, theta, psi) in degrees, or (n,) tilts theta.
    proj_shape : (h, w) px of each projection; default (ny, nx).
    axes : rotation axes of phi, theta, psi; "zyx" (default, RESIRE's) or e.g. "zyz".

    Returns
    -------
    (n, h, w) float64: line integrals in voxel lengths (a voxel of value 1 adds 1 in total).

    See Also
    --------
    backproject : the exact adjoint.
    """
    vol = _check_volume(volume)
    A = _detector_maps(rotation_matrices(angles_deg, axes))
    h, w = vol.shape[1:] if proj_shape is None else _shape2(proj_shape, "proj_shape")
    out = np.zeros((len(A), h, w))
    nz, ny, nx = vol.shape
    _project_kernel(vol, A, out, nz // 2, ny // 2, nx // 2, h // 2, w // 2)
    return out


def backproject(projections, angles_deg, volume_shape, axes: str = RESIRE_AXES) -> np.ndarray:
    """Back-projection Σ_i Π_iᵀ p_i, the exact adjoint of :func:`project`.

    Parameters
    ----------
    projections : (n, h, w) real array, one image per angle (rows y, columns x).
    angles_deg : (n, 3) Euler angles (phi, theta, psi) in degrees, or (n,) tilts theta.
    volume_shape : (nz, ny, nx) voxels of the result.
    axes : as in :func:`project`.

    Returns
    -------
    (nz, ny, nx) float64: every voxel gets the bilinear interpolation of each projection at
    its detector position, summed over the projections.
    """
    p = _check_volume(projections, "projections")
    A = _detector_maps(rotation_matrices(check_angles(angles_deg, len(p)), axes))
    shape = volume_shape
    try:
        nz, ny, nx = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"volume_shape must be three integers (nz, ny, nx), got {shape!r}") \
            from None
    if min(nz, ny, nx) < 1:
        raise ValueError(f"volume_shape must be positive, got {shape!r}")
    out = np.zeros((nz, ny, nx))
    h, w = p.shape[1:]
    _backproject_kernel(p, A, out, nz // 2, ny // 2, nx // 2, h // 2, w // 2)
    return out


def _shape2(value, what):
    try:
        a, b = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be two integers (h, w), got {value!r}") from None
    if a < 1 or b < 1:
        raise ValueError(f"{what} must be positive, got {value!r}")
    return a, b


# Both kernels walk the voxels in memory order; along x the detector position moves by the
# constant (A[0, 0], A[1, 0]) per voxel, so u and v are updated, not recomputed.

@njit(parallel=True, **NJIT)
def _project_kernel(vol, A, out, cz, cy, cx, ch, cw):
    nz, ny, nx = vol.shape
    h, w = out.shape[1], out.shape[2]
    for p in prange(A.shape[0]):  # one projection per thread: no write conflicts
        a00, a01, a02 = A[p, 0, 0], A[p, 0, 1], A[p, 0, 2]
        a10, a11, a12 = A[p, 1, 0], A[p, 1, 1], A[p, 1, 2]
        for k in range(nz):
            z = k - cz
            for j in range(ny):
                y = j - cy
                col0 = a01 * y + a02 * z - a00 * cx + cw
                row0 = a11 * y + a12 * z - a10 * cx + ch
                for i in range(nx):
                    val = vol[k, j, i]
                    if val == 0.0:
                        continue  # positivity leaves most of a volume empty
                    col = col0 + a00 * i
                    row = row0 + a10 * i
                    c0 = int(math.floor(col))
                    r0 = int(math.floor(row))
                    if c0 < -1 or c0 >= w or r0 < -1 or r0 >= h:
                        continue
                    fc = col - c0
                    fr = row - r0
                    if r0 >= 0:
                        if c0 >= 0:
                            out[p, r0, c0] += val * (1.0 - fr) * (1.0 - fc)
                        if c0 + 1 < w:
                            out[p, r0, c0 + 1] += val * (1.0 - fr) * fc
                    if r0 + 1 < h:
                        if c0 >= 0:
                            out[p, r0 + 1, c0] += val * fr * (1.0 - fc)
                        if c0 + 1 < w:
                            out[p, r0 + 1, c0 + 1] += val * fr * fc


@njit(parallel=True, **NJIT)
def _backproject_kernel(proj, A, out, cz, cy, cx, ch, cw):
    nz, ny, nx = out.shape
    h, w = proj.shape[1], proj.shape[2]
    for k in prange(nz):  # one z slice per thread: no write conflicts
        z = k - cz
        for p in range(A.shape[0]):
            a00, a01, a02 = A[p, 0, 0], A[p, 0, 1], A[p, 0, 2]
            a10, a11, a12 = A[p, 1, 0], A[p, 1, 1], A[p, 1, 2]
            for j in range(ny):
                y = j - cy
                col0 = a01 * y + a02 * z - a00 * cx + cw
                row0 = a11 * y + a12 * z - a10 * cx + ch
                for i in range(nx):
                    col = col0 + a00 * i
                    row = row0 + a10 * i
                    c0 = int(math.floor(col))
                    r0 = int(math.floor(row))
                    if c0 < -1 or c0 >= w or r0 < -1 or r0 >= h:
                        continue
                    fc = col - c0
                    fr = row - r0
                    acc = 0.0
                    if r0 >= 0:
                        if c0 >= 0:
                            acc += proj[p, r0, c0] * (1.0 - fr) * (1.0 - fc)
                        if c0 + 1 < w:
                            acc += proj[p, r0, c0 + 1] * (1.0 - fr) * fc
                    if r0 + 1 < h:
                        if c0 >= 0:
                            acc += proj[p, r0 + 1, c0] * fr * (1.0 - fc)
                        if c0 + 1 < w:
                            acc += proj[p, r0 + 1, c0 + 1] * fr * fc
                    out[k, j, i] += acc
