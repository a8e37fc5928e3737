"""Helpers and numba kernels shared by the streaming operators.

Every kernel walks the sparse events of a chunk once (``positions``, ``offsets``, ``indices`` as
in :class:`operators.chunk.Chunk`) and never builds a dense frame. Kernels check each pixel
index against the detector and each position against the scan instead of trusting them: numba
does not bounds-check, so one bad index would otherwise corrupt memory silently. They skip and
count what is out of range, and :func:`raise_if_bad` turns the counts into a clear error.
"""

from __future__ import annotations

import os

import numpy as np
from numba import njit


NJIT = dict(cache=True, nogil=True)


def shape2(value, what: str) -> tuple[int, int]:
    """``value`` as a pair of positive ints, or ValueError naming ``what``."""
    try:
        a, b = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be two integers, got {value!r}") from None
    if a < 1 or b < 1:
        raise ValueError(f"{what} must be two positive integers, got {value!r}")
    return a, b


def center_of(frame_shape, center) -> tuple[float, float]:
    """(cy, cx) in px; ``None`` means the detector centre ((h-1)/2, (w-1)/2)."""
    h, w = frame_shape
    if center is None:
        return (h - 1) / 2.0, (w - 1) / 2.0
    try:
        cy, cx = (float(v) for v in center)
    except (TypeError, ValueError):
        raise ValueError(f"center must be (y, x) in px, got {center!r}") from None
    if not (np.isfinite(cy) and np.isfinite(cx)):
        raise ValueError(f"center must be finite, got {center!r}")
    return cy, cx


def check_names(names, k: int, what: str) -> list[str]:
    """``k`` distinct, non-empty result names usable as HDF5 dataset names."""
    if isinstance(names, str):
        names = [names]
    names = [str(n) for n in names]
    if len(names) != k:
        raise ValueError(f"{what}: {k} masks but {len(names)} names {names}")
    for n in names:
        if not n or "/" in n or n in (".", ".."):
            raise ValueError(f"{what}: result name {n!r} must be non-empty and contain no '/'")
    if len(set(names)) != len(names):
        raise ValueError(f"{what}: result names must be distinct, got {names}")
    return names


def load_npy(path, what: str) -> np.ndarray:
    """One array from a ``.npy`` file, or ValueError naming ``what`` and ``path``."""
    path = os.fspath(path)
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ValueError(f"{what} {path!r}: no such file") from None
    except (ValueError, OSError) as exc:
        raise ValueError(f"{what} {path!r}: not a readable .npy array ({exc})") from None
    if not isinstance(arr, np.ndarray):  # an .npz archive
        raise ValueError(f"{what} {path!r}: expected a single .npy array, got an archive")
    return arr


def raise_if_bad(op_name: str, bad_events: int, bad_frames: int, n_pixels: int,
                 n_positions: int) -> None:
    """Turn the out-of-range counts a kernel returned into a ValueError."""
    if bad_events or bad_frames:
        raise ValueError(
            f"{op_name}: chunk has {bad_events} event(s) with a pixel index >= {n_pixels} (the "
            f"detector size) and {bad_frames} frame(s) with a position >= {n_positions} (the scan "
            f"size); they were skipped, the rest of the chunk was accumulated. The receiver "
            f"should have rejected them (protocol 'index_out_of_range' / 'frame_out_of_range').")


def _bitonic_network(m: int):
    """A kernel sorting ``buf[:m]`` in place by a bitonic network of ``m`` (a power of two):
    branch-free compare-exchanges, twice as fast as a comparison sort on the ~25 events of
    one detector sector of a frame."""
    @njit(inline="always")
    def network(buf):
        k = 2
        while k <= m:
            j = k // 2
            while j > 0:
                for t in range(m):
                    u = t ^ j
                    if u > t:
                        lo, hi = min(buf[t], buf[u]), max(buf[t], buf[u])
                        if t & k:
                            lo, hi = hi, lo
                        buf[t], buf[u] = lo, hi
                j //= 2
            k *= 2
    return network


_network8, _network16, _network32, _network64 = (_bitonic_network(m) for m in (8, 16, 32, 64))


@njit(**NJIT)
def sort_segments(offsets, indices):
    """Sort ``indices[offsets[i]:offsets[i+1]]`` in place for every i.

    Segments that are already sorted (one sector of a frame from a counting detector usually
    is) are only scanned; up to 64 values go through a sorting network (the segment padded
    with its largest value), longer ones through numpy's sort.
    """
    buf = np.empty(64, indices.dtype)
    for i in range(offsets.shape[0] - 1):
        a, b = offsets[i], offsets[i + 1]
        n = b - a
        top = indices[a] if n > 0 else indices.dtype.type(0)
        ordered = True
        for e in range(a + 1, b):
            if indices[e] < indices[e - 1]:
                ordered = False
                break
        if ordered:
            continue
        if n > 64:
            indices[a:b].sort()
            continue
        for e in range(n):
            buf[e] = indices[a + e]
            top = max(top, buf[e])
        m = 8 if n <= 8 else 16 if n <= 16 else 32 if n <= 32 else 64
        buf[n:m] = top  # the padding sorts to the end
        if m == 8:
            _network8(buf)
        elif m == 16:
            _network16(buf)
        elif m == 32:
            _network32(buf)
        else:
            _network64(buf)
        indices[a:b] = buf[:n]
