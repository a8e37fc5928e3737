"""Centre of mass of the diffraction patterns, as exact integer sums per probe position.

Convention (``com_from_sums``, the finalize step)
-------------------------------------------------
Detector coordinates are (y, x) in px with pixel centres at integers, y down the displayed
detector image (row index) and x to the right. The raw centre of mass relative to ``center`` is
``(dy, dx) = (sum_y / n - cy, sum_x / n - cx)``. It is brought into the scan frame in two steps:

1. ``flip``: mirror the detector x axis, ``dx -> -dx``.
2. rotate counter-clockwise *as seen in the displayed image* (y down) by ``rotation_deg``::

       x' =  dx cos(t) + dy sin(t)
       y' = -dx sin(t) + dy cos(t)

   so a vector pointing right (0, +1) becomes, at 90 deg, one pointing up (-1, 0); at 180 deg,
   one pointing left (0, -1).

The results are ``(com_y, com_x) = (y', x')`` in px, NaN where no electron counted.

Examples
--------
>>> import numpy as np
>>> from operators.com import com_from_sums
>>> n, sy, sx = np.array([4, 0]), np.array([0, 0]), np.array([12, 0])   # (y, x) = (0, 3)
>>> com_from_sums(n, sy, sx, center=(0.0, 0.0), rotation_deg=90.0, flip=False)
(array([-3., nan]), array([ 0., nan]))
"""

from __future__ import annotations

import numpy as np
from numba import njit

from operators.base import Operator, Result, State
from operators.chunk import Chunk
from operators.fused import one_pass
from operators.kernels import NJIT, center_of, shape2


def com_from_sums(n, sy, sx, center, rotation_deg=0.0, flip=False):
    """Centre of mass from raw sums, relative to ``center``, flipped and rotated.

    Parameters
    ----------
    n, sy, sx : arrays of equal shape: electrons counted, sum of their pixel y, sum of their
        pixel x (px, absolute detector coordinates).
    center : (cy, cx) px subtracted from the mean position.
    rotation_deg : counter-clockwise rotation in the displayed image (y down), degrees.
    flip : mirror detector x before rotating.

    Returns
    -------
    (com_y, com_x) float64 px, same shape as ``n``; NaN where n == 0.
    See the module docstring for the exact convention.
    """
    n = np.asarray(n)
    sy, sx = np.asarray(sy), np.asarray(sx)
    if not (n.shape == sy.shape == sx.shape):
        raise ValueError(f"com_from_sums: n, sy, sx must have one shape, got {n.shape}, {sy.shape}, {sx.shape}")
    cy, cx = (float(c) for c in center)
    # Exact values at multiples of 90 deg so that known answers are exact, not 1e-16 off.
    c, s = _cos_sin_exact(np.deg2rad(float(rotation_deg)), float(rotation_deg))
    out_y, out_x = np.empty(n.shape), np.empty(n.shape)
    _com_kernel(n.ravel(), sy.ravel(), sx.ravel(), cy, cx, float(c), float(s), bool(flip),
                out_y.reshape(-1), out_x.reshape(-1))
    return out_y, out_x


@njit(**NJIT)
def _com_kernel(n, sy, sx, cy, cx, c, s, flip, out_y, out_x):
    # one pass, the same float64 operations in the same order as the numpy expressions
    # (dy = sy / n - cy, ...; x' = dx c + dy s; y' = -dx s + dy c), so results are identical
    for i in range(n.shape[0]):
        if n[i] == 0:
            out_y[i] = np.nan
            out_x[i] = np.nan
            continue
        nf = np.float64(n[i])
        dy = np.float64(sy[i]) / nf - cy
        dx = np.float64(sx[i]) / nf - cx
        if flip:
            dx = -dx
        out_x[i] = dx * c + dy * s
        out_y[i] = -dx * s + dy * c


def _cos_sin_exact(t, deg):
    q = deg / 90.0
    if q == np.round(q):
        return [(1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.0, -1.0)][int(np.round(q)) % 4]
    return np.cos(t), np.sin(t)


class CenterOfMass(Operator):
    """Centre of mass of each diffraction pattern (e.g. for DPC / iCoM phase).

    Parameters
    ----------
    scan_shape : (ny, nx) probe positions.
    frame_shape : (h, w) detector pixels.
    center : (cy, cx) px, reference the CoM is measured from; default ((h-1)/2, (w-1)/2).
    radius : px or None. Only electrons whose pixel centre is within ``radius`` of ``center``
        (distance <= radius) count; None = all.
    mrad_per_px : scattering angle per detector pixel; adds the ``*_mrad`` results.
    rotation_deg, flip : bring detector vectors into the scan frame; see the module docstring.
    name : operator name, and the prefix of its result names.

    Notes
    -----
    State: ``{"n", "sum_y", "sum_x"}``, each (ny*nx,) int64 (electrons counted, sums of their
    absolute pixel y and x), so merging is exact. Results (prefix ``name``, default "com"):
    ``com_n`` (counts), ``com_sum_y``/``com_sum_x`` (px·counts), ``com_y``/``com_x`` (px,
    scan frame, NaN where com_n == 0), and ``com_y_mrad``/``com_x_mrad`` if calibrated.
    Chunks are processed by the fused kernel (``operators.fused.one_pass``).
    """

    fused_role = "com"
    state_kinds = {"n": "nav", "sum_y": "nav", "sum_x": "nav"}

    def __init__(self, scan_shape, frame_shape, center=None, radius=None, mrad_per_px=None,
                 rotation_deg=0.0, flip=False, name="com"):
        self.name = name
        self.scan_shape = shape2(scan_shape, "scan_shape")
        self.frame_shape = shape2(frame_shape, "frame_shape")
        self.center = center_of(self.frame_shape, center)
        if radius is not None and not (np.isfinite(radius) and radius >= 0):
            raise ValueError(f"CenterOfMass: radius must be None or a finite number >= 0 px, "
                             f"got {radius!r}")
        if mrad_per_px is not None and not (np.isfinite(mrad_per_px) and mrad_per_px > 0):
            raise ValueError(f"CenterOfMass: mrad_per_px must be None or > 0, got {mrad_per_px!r}")
        if not np.isfinite(rotation_deg):
            raise ValueError(f"CenterOfMass: rotation_deg must be finite, got {rotation_deg!r}")
        self.radius = None if radius is None else float(radius)
        self.mrad_per_px = None if mrad_per_px is None else float(mrad_per_px)
        self.rotation_deg = float(rotation_deg)
        self.flip = bool(flip)
        h, w = self.frame_shape
        if self.radius is None:
            self._inside = np.ones(h * w, dtype=np.uint8)
        else:
            from operators.virtual import disk_mask
            self._inside = disk_mask(self.frame_shape, self.center,
                                     self.radius).ravel().astype(np.uint8)

    @property
    def n_positions(self) -> int:
        return self.scan_shape[0] * self.scan_shape[1]

    def new_state(self) -> State:
        return {k: np.zeros(self.n_positions, dtype=np.int64) for k in ("n", "sum_y", "sum_x")}

    def process(self, state: State, chunk: Chunk) -> None:
        one_pass(self).process(state, chunk)

    def finalize(self, state: State) -> dict[str, Result]:
        shp = self.scan_shape
        n, sy, sx = (state[k].reshape(shp) for k in ("n", "sum_y", "sum_x"))
        com_y, com_x = com_from_sums(n, sy, sx, self.center, self.rotation_deg, self.flip)
        attrs = {"center_y_px": self.center[0], "center_x_px": self.center[1],
                 "radius_px": np.nan if self.radius is None else self.radius,
                 "rotation_deg": self.rotation_deg, "flip": self.flip,
                 "convention": "dx -> -dx if flip; then rotate counter-clockwise in the "
                               "displayed image (y down): x' = dx cos t + dy sin t, "
                               "y' = -dx sin t + dy cos t"}
        p = self.name
        sel = "all electrons" if self.radius is None else f"electrons within {self.radius} px"
        out = {
            f"{p}_n": Result(n.copy(), "nav", "counts", f"{sel} counted for the centre of mass",
                             dict(attrs)),
            f"{p}_sum_y": Result(sy.copy(), "nav", "px*counts",
                                 "sum of detector y (absolute px) of the counted electrons",
                                 dict(attrs)),
            f"{p}_sum_x": Result(sx.copy(), "nav", "px*counts",
                                 "sum of detector x (absolute px) of the counted electrons",
                                 dict(attrs)),
            f"{p}_y": Result(com_y, "nav", "px", "centre of mass y relative to center, scan "
                             "frame (after flip and rotation); NaN where no electron", dict(attrs)),
            f"{p}_x": Result(com_x, "nav", "px", "centre of mass x relative to center, scan "
                             "frame (after flip and rotation); NaN where no electron", dict(attrs)),
        }
        if self.mrad_per_px is not None:
            a = dict(attrs, mrad_per_px=self.mrad_per_px)
            out[f"{p}_y_mrad"] = Result(com_y * self.mrad_per_px, "nav", "mrad",
                                        "centre of mass y as a beam deflection angle", a)
            out[f"{p}_x_mrad"] = Result(com_x * self.mrad_per_px, "nav", "mrad",
                                        "centre of mass x as a beam deflection angle", dict(a))
        return out
