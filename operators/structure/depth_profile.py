"""Depth of each atom below the sample surface (the convex hull of the atoms) and the
surface-to-core penetration depth: the break of a per-atom statistic's profile against depth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit
from scipy.spatial import ConvexHull, QhullError

from operators.kernels import NJIT
from operators.structure.neighbors import check_positions


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
