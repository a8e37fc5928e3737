"""Virtual detectors: images of the electrons that fall inside detector-space masks.

Examples
--------
>>> import numpy as np
>>> from operators.virtual import VirtualDetectors, disk_mask, annulus_mask
>>> frame_shape, scan_shape = (32, 40), (7, 9)
>>> masks = np.stack([disk_mask(frame_shape, radius=6),
...                   annulus_mask(frame_shape, inner=8, outer=15)])
>>> op = VirtualDetectors(masks, ["bf", "adf"], scan_shape)
>>> state = op.new_state()                   # then op.process(state, chunk) per chunk
>>> op.finalize(state)["adf"].data.shape
(7, 9)
"""

from __future__ import annotations

import os

import numpy as np
from numba import njit

from operators.base import Operator, Result, State
from operators.chunk import Chunk
from operators.fused import one_pass
from operators.kernels import NJIT, center_of, check_names, load_npy, raise_if_bad, shape2

# Fixed-point float weights: the largest |weight| of a mask maps to at most 2**WEIGHT_BITS, so
# 2**EVENT_BUDGET_BITS events of that weight at one position still fit in an int64.
EVENT_BUDGET_BITS = 28
WEIGHT_BITS = 62 - EVENT_BUDGET_BITS
# Masks whose pixels fall into at most this many distinct (membership, weight) combinations
# use the one-histogram-bin-per-event kernel; beyond it the per-frame expansion costs more
# than it saves.
MAX_COMBOS = 64


def _r2(frame_shape, center):
    h, w = shape2(frame_shape, "frame_shape")
    cy, cx = center_of((h, w), center)
    y = np.arange(h, dtype=np.float64)[:, None] - cy
    x = np.arange(w, dtype=np.float64)[None, :] - cx
    return y * y + x * x


def disk_mask(frame_shape, center=None, radius=None) -> np.ndarray:
    """Pixels whose centre lies within ``radius`` px of ``center``.

    Parameters
    ----------
    frame_shape : (h, w) detector pixels.
    center : (cy, cx) px, default the detector centre ((h-1)/2, (w-1)/2). Pixel centres are at
        integer coordinates.
    radius : px, required. The disk is closed: distance <= radius.

    Returns
    -------
    (h, w) bool.

    See Also
    --------
    annulus_mask : half-open ring, inner <= r < outer.
    """
    if radius is None or not np.isfinite(radius) or radius < 0:
        raise ValueError(f"disk_mask: radius must be a finite number >= 0 px, got {radius!r}")
    return _r2(frame_shape, center) <= float(radius) ** 2


def annulus_mask(frame_shape, center=None, inner=0.0, outer=None) -> np.ndarray:
    """Pixels whose centre is at a distance r from ``center`` with ``inner <= r < outer`` (px).

    The ring is half-open so that rings sharing a boundary (inner of one = outer of the
    next) tile the detector without overlap or gaps. Note that ``disk_mask(radius=r)`` is
    closed and so includes pixels at exactly r, which ``annulus_mask(inner=0, outer=r)`` does not.

    Parameters
    ----------
    frame_shape : (h, w) detector pixels.
    center : (cy, cx) px, default the detector centre ((h-1)/2, (w-1)/2).
    inner, outer : px; ``outer`` is required and must be >= ``inner``.

    Returns
    -------
    (h, w) bool.
    """
    if outer is None or not (np.isfinite(inner) and np.isfinite(outer)) or not 0 <= inner <= outer:
        raise ValueError(f"annulus_mask: need finite 0 <= inner <= outer px, got inner={inner!r}, "
                         f"outer={outer!r}")
    r2 = _r2(frame_shape, center)
    return (r2 >= float(inner) ** 2) & (r2 < float(outer) ** 2)


def check_mask_array(masks, where: str) -> np.ndarray:
    """Validate a mask stack: (h, w) or (k, h, w), bool or finite float -> (k, h, w)."""
    masks = np.asarray(masks)
    if masks.ndim not in (2, 3):
        raise ValueError(f"{where}: masks must have shape (h, w) or (k, h, w), got shape "
                         f"{masks.shape} ({masks.ndim} dimensions)")
    if masks.ndim == 2:
        masks = masks[None]
    if masks.shape[0] == 0 or masks.shape[1] == 0 or masks.shape[2] == 0:
        raise ValueError(f"{where}: masks are empty, shape {masks.shape}")
    if masks.dtype == bool:
        return masks
    if not np.issubdtype(masks.dtype, np.floating):
        raise ValueError(f"{where}: masks must be bool (exact counts) or float (weights), got "
                         f"dtype {masks.dtype}; convert with .astype(bool) or .astype(float)")
    bad = ~np.isfinite(masks)
    if bad.any():
        k, y, x = np.argwhere(bad)[0]
        raise ValueError(f"{where}: masks contain {int(bad.sum())} NaN or infinite weight(s), "
                         f"first at mask {k}, pixel (y={y}, x={x})")
    return masks.astype(np.float64, copy=False)


def load_masks(path) -> np.ndarray:
    """Read a mask stack from a ``.npy`` file.

    Parameters
    ----------
    path : file holding an array of shape (h, w) or (k, h, w), dtype bool or float.

    Returns
    -------
    (k, h, w) bool or float64. Check it against the detector with :func:`check_masks`.

    Raises
    ------
    ValueError naming ``path`` and the problem (not a .npy file, wrong ndim, wrong dtype,
    NaN/inf weights).
    """
    arr = load_npy(path, "mask file")
    return check_mask_array(arr, f"mask file {os.fspath(path)!r}")


def check_masks(masks, frame_shape, path=None) -> np.ndarray:
    """Raise ValueError (naming ``path``, the file the masks came from) unless the masks are
    a valid (k, h, w) or (h, w) stack for this (h, w) detector. Returns them as (k, h, w)."""
    where = "masks" if path is None else f"mask file {os.fspath(path)!r}"
    masks = check_mask_array(masks, where)
    h, w = shape2(frame_shape, "frame_shape")
    if masks.shape[1:] != (h, w):
        raise ValueError(f"{where}: masks are {masks.shape[1]}x{masks.shape[2]} pixels but the "
                         f"detector is {h}x{w} (h x w)")
    return masks


# Kernels. All share the frame loop (skip flyback, count out-of-range) and differ only in how
# an event's pixel maps to the k images; each keeps per-frame sums in a small local buffer and
# adds them to images[:, position] once per frame.

@njit(**NJIT)
def _bits_kernel(positions, offsets, indices, bits, images):
    """Bool masks, k <= 64: bit j of bits[pixel] says whether the pixel is in mask j."""
    n_pix = bits.shape[0]
    n_pos = images.shape[1]
    k = images.shape[0]
    acc = np.zeros(k, dtype=np.int64)
    bad_ev = 0
    bad_fr = 0
    for i in range(positions.shape[0]):
        p = positions[i]
        if p < 0:
            continue
        if p >= n_pos:
            bad_fr += 1
            continue
        for e in range(offsets[i], offsets[i + 1]):
            idx = np.int64(indices[e])
            if idx < n_pix:
                b = np.int64(bits[idx])
                for j in range(k):
                    acc[j] += (b >> j) & 1
            else:
                bad_ev += 1
        for j in range(k):
            images[j, p] += acc[j]
            acc[j] = 0
    return bad_ev, bad_fr


@njit(**NJIT)
def _table_kernel(positions, offsets, indices, table, images):
    """Fixed-point weights as a dense (n_pix, k) int64 table: one cache line per event."""
    n_pix = table.shape[0]
    n_pos = images.shape[1]
    k = images.shape[0]
    acc = np.zeros(k, dtype=np.int64)
    bad_ev = 0
    bad_fr = 0
    for i in range(positions.shape[0]):
        p = positions[i]
        if p < 0:
            continue
        if p >= n_pos:
            bad_fr += 1
            continue
        for e in range(offsets[i], offsets[i + 1]):
            idx = np.int64(indices[e])
            if idx < n_pix:
                for j in range(k):
                    acc[j] += table[idx, j]
            else:
                bad_ev += 1
        for j in range(k):
            images[j, p] += acc[j]
            acc[j] = 0
    return bad_ev, bad_fr


@njit(**NJIT)
def _lists_kernel(positions, offsets, indices, ptr, mids, qweights, images):
    """Per pixel, the list of (mask, weight) it contributes to (many or sparse masks)."""
    n_pix = ptr.shape[0] - 1
    n_pos = images.shape[1]
    acc = np.zeros(images.shape[0], dtype=np.int64)
    bad_ev = 0
    bad_fr = 0
    for i in range(positions.shape[0]):
        p = positions[i]
        if p < 0:
            continue
        if p >= n_pos:
            bad_fr += 1
            continue
        for e in range(offsets[i], offsets[i + 1]):
            idx = np.int64(indices[e])
            if idx < n_pix:
                for t in range(ptr[idx], ptr[idx + 1]):
                    acc[mids[t]] += qweights[t]
            else:
                bad_ev += 1
        for j in range(acc.shape[0]):
            # Many masks, few hit per frame: skip the scattered writes of zeros.
            if acc[j]:
                images[j, p] += acc[j]
                acc[j] = 0
    return bad_ev, bad_fr


def _csr(values_kn):
    """(k, n) int64 or bool -> per column n, the list of (row, value) with value != 0:
    (ptr (n+1,) int64, rows (nnz,) int64, values (nnz,) int64)."""
    col, row = np.nonzero(values_kn.T)
    ptr = np.zeros(values_kn.shape[1] + 1, dtype=np.int64)
    np.cumsum(np.bincount(col, minlength=values_kn.shape[1]), out=ptr[1:])
    return ptr, row.astype(np.int64), values_kn[row, col].astype(np.int64)


def _group_pixels(q, max_groups):
    """Group pixels whose weight vectors q[:, pixel] are identical.

    Returns (label (n_pix,), reps (n_groups, k)) or None if there are more than max_groups.
    """
    k, n_pix = q.shape
    # A 64-bit hash per pixel finds the groups fast; comparing every pixel with its group's
    # representative makes a (practically impossible) collision harmless.
    mult = np.random.default_rng(12345).integers(1, 2**63, size=k, dtype=np.uint64) | np.uint64(1)
    h = np.zeros(n_pix, dtype=np.uint64)
    for j in range(k):
        h += q[j].view(np.uint64) * mult[j]
    uh, first, label = np.unique(h, return_index=True, return_inverse=True)
    if len(uh) > max_groups:
        return None
    reps = q[:, first].T
    if not np.array_equal(reps[label].T, q):
        return None
    return label, reps


class VirtualDetectors(Operator):
    """Virtual-detector images: per position, the electrons inside each detector-space mask.

    Parameters
    ----------
    masks : (k, h, w) or (h, w). bool -> exact int64 counts; float -> weighted sums
        sum(weight[pixel] over events), float64 results.
    names : k distinct result names (HDF5 dataset names under /results).
    scan_shape : (ny, nx) probe positions.
    name : operator name.

    Notes
    -----
    State ``{"images": (k, ny*nx) int64}``. Float weights are accumulated in fixed point
    (each mask scaled by a power of two so that its largest |weight| is < 2**34) so that sums,
    like counts, are exact integers and results are bit-identical however the events were
    chunked, split into sectors or merged. The price: each weight is rounded to a multiple of
    2**-34 times the mask's power of two above max|weight| (relative error <= 2**-34, about
    6e-11, of the largest weight), and at most 2**28 events per position; ``finalize``
    converts to float64.

    One kernel is chosen at construction (``self.kernel``), each walking every event once:
    "combos" when pixels fall into at most 64 distinct (membership, weight) combinations
    (disks, annuli, segmented detectors, piecewise-constant weights: one histogram increment
    per event, run by the fused kernel, ``operators.fused.one_pass``); "bits" for other bool masks, k <= 64 (a bit per mask per pixel); "table" for
    few or dense float masks (a row of k weights per pixel); "lists" otherwise (per pixel, the
    masks it belongs to).
    """

    fused_role = "virtual"
    state_kinds = {"images": "nav"}

    def __init__(self, masks, names, scan_shape, name="virtual"):
        masks = check_mask_array(masks, f"VirtualDetectors {name!r}")
        self.name = name
        self.k = k = masks.shape[0]
        self.names = check_names(names, k, f"VirtualDetectors {name!r}")
        self.frame_shape = masks.shape[1:]
        self.scan_shape = shape2(scan_shape, "scan_shape")
        self.weighted = masks.dtype != bool
        self.n_pixels = self.frame_shape[0] * self.frame_shape[1]
        flat = masks.reshape(k, self.n_pixels)
        self.scale_exp = np.zeros(k, dtype=np.int64)
        if self.weighted:
            self._attrs = [{"weight_sum": float(m.sum()), "weight_max_abs": float(np.abs(m).max())}
                           for m in flat]
            for j, m in enumerate(flat):
                mx = float(np.abs(m).max())
                if mx > 0:
                    self.scale_exp[j] = WEIGHT_BITS - np.frexp(mx)[1]
            q = np.rint(flat * np.ldexp(1.0, self.scale_exp)[:, None]).astype(np.int64)
        else:
            self._attrs = [{"mask_pixels": int(m.sum())} for m in flat]
            q = None
        self._choose_kernel(flat, q)

    def _choose_kernel(self, flat, q):
        k = self.k
        if not self.weighted and k <= 64:
            # Bit j of a pixel's word = membership in mask j; groups by word are exact.
            word = np.zeros(self.n_pixels, dtype=np.uint64)
            for j in range(k):
                word |= flat[j].astype(np.uint64) << np.uint64(j)
            uw, first, label = np.unique(word, return_index=True, return_inverse=True)
            grouped = (label, flat[:, first].T.astype(np.int64)) if len(uw) <= MAX_COMBOS else None
        elif self.weighted:
            grouped = _group_pixels(q, MAX_COMBOS)
        else:
            grouped = None
        if grouped is not None:
            label, reps = grouped
            self.kernel = "combos"
            self._label = label.astype(np.uint8 if len(reps) <= 256 else np.int32)
            self._cptr, self._cmask, self._cweight = _csr(np.ascontiguousarray(reps.T))
        elif not self.weighted and k <= 64:
            self.kernel = "bits"
            wdt = next(d for d in (np.uint8, np.uint16, np.uint32, np.uint64)
                       if np.iinfo(d).bits >= k)
            self._bits = word.astype(wdt)
        elif self.weighted and (k <= 8 or np.count_nonzero(q) >= 0.25 * q.size):
            self.kernel = "table"
            self._table = np.ascontiguousarray(q.T)
        else:
            self.kernel = "lists"
            self._ptr, self._mids, self._qweights = _csr(q if self.weighted else flat)

    @property
    def n_positions(self) -> int:
        return self.scan_shape[0] * self.scan_shape[1]

    def new_state(self) -> State:
        return {"images": np.zeros((self.k, self.n_positions), dtype=np.int64)}

    def process(self, state: State, chunk: Chunk) -> None:
        if self.kernel == "combos":
            one_pass(self).process(state, chunk)
            return
        args = (chunk.positions, chunk.offsets, chunk.indices)
        img = state["images"]
        if self.kernel == "bits":
            bad = _bits_kernel(*args, self._bits, img)
        elif self.kernel == "table":
            bad = _table_kernel(*args, self._table, img)
        else:
            bad = _lists_kernel(*args, self._ptr, self._mids, self._qweights, img)
        raise_if_bad(f"VirtualDetectors {self.name!r}", *bad, self.n_pixels,
                     self.n_positions)

    def finalize(self, state: State) -> dict[str, Result]:
        out = {}
        for j, rname in enumerate(self.names):
            img = state["images"][j].reshape(self.scan_shape)
            if self.weighted:
                data = np.ldexp(img.astype(np.float64), -int(self.scale_exp[j]))
                unit, what = "weighted counts", "weighted sum of electrons"
            else:
                data = img.copy()
                unit, what = "counts", "electrons"
            out[rname] = Result(data, "nav", unit,
                                f"virtual detector {rname!r}: {what} inside the detector mask "
                                f"per probe position", dict(self._attrs[j]))
        return out
