"""Real-space virtual apertures: the summed diffraction pattern of a set of probe positions.

Examples
--------
>>> import numpy as np
>>> from operators.apertures import RealSpaceApertures, rect_mask
>>> scan_shape, frame_shape = (7, 9), (32, 40)
>>> masks = np.stack([rect_mask(scan_shape, 0, 3, 0, 4), rect_mask(scan_shape, 2, 7, 3, 9)])
>>> op = RealSpaceApertures(masks, ["grain_a", "grain_b"], frame_shape)
>>> state = op.new_state()                  # then op.process(state, chunk) per chunk
>>> sorted(op.finalize(state))
['aperture_grain_a', 'aperture_grain_b']
"""

from __future__ import annotations

import os

import numpy as np
from numba import njit

from operators.base import Operator, Result, State
from operators.chunk import Chunk
from operators.kernels import NJIT, check_names, load_npy, raise_if_bad, shape2


def rect_mask(scan_shape, y0, y1, x0, x1) -> np.ndarray:
    """(ny, nx) bool, True on rows y0 <= row < y1 and columns x0 <= col < x1 (half-open).

    Bounds are clipped to the scan like Python slices.
    """
    ny, nx = shape2(scan_shape, "scan_shape")
    m = np.zeros((ny, nx), dtype=bool)
    m[int(y0):int(y1), int(x0):int(x1)] = True
    return m


def check_aperture_masks(masks, scan_shape, where="aperture masks") -> np.ndarray:
    """Validate real-space masks: (ny, nx) or (k, ny, nx), bool (or 0/1 integers) -> (k, ny, nx)."""
    ny, nx = shape2(scan_shape, "scan_shape")
    masks = np.asarray(masks)
    if masks.ndim not in (2, 3):
        raise ValueError(f"{where}: expected shape (ny, nx) or (k, ny, nx), got {masks.shape}")
    if masks.ndim == 2:
        masks = masks[None]
    if masks.dtype != bool:
        if not (np.issubdtype(masks.dtype, np.integer) or np.issubdtype(masks.dtype, np.floating)):
            raise ValueError(f"{where}: masks must be bool, got dtype {masks.dtype}")
        if not np.isin(masks, (0, 1)).all():
            raise ValueError(f"{where}: masks of dtype {masks.dtype} must hold only 0 and 1 "
                             f"(positions in or out of the aperture); found other values")
        masks = masks.astype(bool)
    if masks.shape[1:] != (ny, nx):
        raise ValueError(f"{where}: masks cover {masks.shape[1]}x{masks.shape[2]} positions but "
                         f"the scan is {ny}x{nx} (ny x nx)")
    if masks.shape[0] == 0:
        raise ValueError(f"{where}: no masks")
    return masks


def load_aperture_masks(path, scan_shape) -> np.ndarray:
    """Read real-space aperture masks from a ``.npy`` of shape (ny, nx) or (k, ny, nx).

    Returns (k, ny, nx) bool. Raises ValueError naming ``path`` and the problem.
    """
    arr = load_npy(path, "aperture mask file")
    return check_aperture_masks(arr, scan_shape, f"aperture mask file {os.fspath(path)!r}")


@njit(**NJIT)
def _aperture_kernel(positions, offsets, indices, mptr, mids, patterns):
    n_pix = patterns.shape[1]
    n_pos = mptr.shape[0] - 1
    bad_ev = 0
    bad_fr = 0
    for i in range(positions.shape[0]):
        p = positions[i]
        if p < 0:
            continue
        if p >= n_pos:
            bad_fr += 1
            continue
        for t in range(mptr[p], mptr[p + 1]):
            row = patterns[mids[t]]
            for e in range(offsets[i], offsets[i + 1]):
                idx = np.int64(indices[e])
                if idx < n_pix:
                    row[idx] += 1
                elif t == mptr[p]:
                    bad_ev += 1
    return bad_ev, bad_fr


class RealSpaceApertures(Operator):
    """Summed diffraction pattern of the probe positions inside each real-space mask.

    Parameters
    ----------
    masks : (k, ny, nx) or (ny, nx) bool over scan positions; any number, may overlap.
    names : k distinct names; results are ``aperture_{name}``.
    frame_shape : (h, w) detector pixels.
    name : operator name.

    Notes
    -----
    State ``{"patterns": (k, h*w) int64}``. Each position carries the list of apertures it
    belongs to, so an event is touched once per aperture containing its position and events
    of positions outside every aperture cost nothing. Results: (h, w) int64 counts, kind
    "sig", attrs ``n_positions`` (positions in the aperture).
    """

    state_kinds = {"patterns": "sig"}

    def __init__(self, masks, names, frame_shape, name="apertures"):
        masks = np.asarray(masks)
        if masks.ndim not in (2, 3):
            raise ValueError(f"RealSpaceApertures {name!r}: masks must be (ny, nx) or "
                             f"(k, ny, nx), got shape {masks.shape}")
        scan_shape = masks.shape[-2:]
        masks = check_aperture_masks(masks, scan_shape, f"RealSpaceApertures {name!r}")
        self.name = name
        self.k = masks.shape[0]
        self.names = check_names(names, self.k, f"RealSpaceApertures {name!r}")
        self.scan_shape = scan_shape
        self.frame_shape = shape2(frame_shape, "frame_shape")
        self.n_pixels = self.frame_shape[0] * self.frame_shape[1]
        flat = masks.reshape(self.k, -1)
        self._n_in = flat.sum(axis=1)
        pos, ap = np.nonzero(flat.T)
        self._mptr = np.zeros(flat.shape[1] + 1, dtype=np.int64)
        np.cumsum(np.bincount(pos, minlength=flat.shape[1]), out=self._mptr[1:])
        self._mids = ap.astype(np.int64)

    def new_state(self) -> State:
        return {"patterns": np.zeros((self.k, self.n_pixels), dtype=np.int64)}

    def process(self, state: State, chunk: Chunk) -> None:
        bad = _aperture_kernel(chunk.positions, chunk.offsets, chunk.indices, self._mptr,
                               self._mids, state["patterns"])
        raise_if_bad(f"RealSpaceApertures {self.name!r}", *bad, self.n_pixels,
                     len(self._mptr) - 1)

    def finalize(self, state: State) -> dict[str, Result]:
        return {f"aperture_{n}": Result(
            state["patterns"][j].reshape(self.frame_shape).copy(), "sig", "counts",
            f"summed diffraction pattern of the probe positions in real-space aperture {n!r}",
            {"n_positions": int(self._n_in[j])}) for j, n in enumerate(self.names)}
