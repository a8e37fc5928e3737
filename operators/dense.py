"""Dense frames of electron counts (a counting detector's frames as pixel arrays) into events.

A counting detector that sends whole frames (Quantum Detectors Merlin, DECTRIS ARINA/QUADRO)
gives, per pixel and frame, the number of electrons that hit it. Every operator consumes
events, so a pixel holding k becomes k events at that pixel: the conversion is exact, and
sums over events (virtual images, diffraction sums, centre of mass) equal the same sums over
the dense frames. Independent of raw-frame counting (``electron_counting``).

Examples
--------
>>> import numpy as np
>>> from operators.dense import counts_to_events
>>> frames = np.zeros((2, 2, 3), np.uint8); frames[0, 1, 2] = 2; frames[1, 0, 0] = 1
>>> counts, indices = counts_to_events(frames, row0=4)   # rows 4..5 of a 3-px-wide detector
>>> counts.tolist(), indices.tolist()                     # (4+1)*3 + 2 = 17 twice, then 12
([2, 1], [17, 17, 12])
"""

from __future__ import annotations

import numpy as np
from numba import njit

from operators.kernels import NJIT


@njit(**NJIT)
def totals_kernel(frames, totals):
    """totals[i] = electrons of frame i (the sum of its counts); a row whose pixels are all
    zero costs one vectorised max. Returns the sum over the frames."""
    n, rows = frames.shape[0], frames.shape[1]
    t = 0
    for i in range(n):
        s = 0
        for r in range(rows):
            row = frames[i, r]
            if row.max():  # vectorised in the frame's own type (an OR would widen to 64 bit)
                for v in row:
                    s += v
        totals[i] = s
        t += s
    return t


@njit(**NJIT)
def counts_kernel(frames, row0, counts, out):
    """Write ``frames[i, r, c]`` copies of (row0 + r)·w + c, frame after frame, pixels in
    ascending order, into ``out`` (sized by the caller to the frames' total); counts[i] =
    events of frame i. A zero row is skipped with one vectorised max, then a zero run of 16
    pixels with one OR."""
    n, rows, w = frames.shape
    e = 0
    for i in range(n):
        start = e
        for r in range(rows):
            row = frames[i, r]
            if row.max() == 0:
                continue
            base = (row0 + r) * w
            for c0 in range(0, w, 16):
                acc = 0
                for v in row[c0:c0 + 16]:
                    acc |= v
                if acc == 0:
                    continue
                for c in range(c0, min(c0 + 16, w)):
                    for _ in range(row[c]):
                        out[e] = base + c
                        e += 1
        counts[i] = e - start
    return e


@njit(**NJIT)
def events_kernel(frames, row0, max_events):
    """(counts, indices, total) of ``frames`` in one call (a receiver makes one per message:
    one dispatch, not four); indices is empty when ``total`` exceeds ``max_events``."""
    n = frames.shape[0]
    total = totals_kernel(frames, np.zeros(n, np.uint64))
    counts = np.zeros(n, np.uint32)
    if total > max_events:
        return counts, np.empty(0, np.uint32), total
    out = np.empty(total, np.uint32)
    counts_kernel(frames, row0, counts, out)
    return counts, out, total


def counts_to_events(frames: np.ndarray, row0: int = 0, max_events: int | None = None):
    """Events of dense count frames.

    frames: (n, rows, w) unsigned integers, electrons per pixel of detector rows
    ``row0 .. row0+rows-1`` (full width w). Returns (counts (n,) uint32 events per frame,
    indices uint32 flat full-detector pixel y·w + x, ascending within each frame). Raises
    ValueError when the frames hold more than ``max_events`` electrons (checked before any
    memory is taken for them).
    """
    frames = np.asarray(frames)
    if frames.ndim != 3 or frames.dtype.kind != "u":
        raise ValueError(f"count frames must be (n, rows, w) unsigned integers, got {frames.dtype} "
                         f"{frames.shape}")
    limit = (1 << 62) if max_events is None else int(max_events)
    counts, out, total = events_kernel(frames, int(row0), limit)
    if total > limit:
        raise ValueError(f"the frames hold {int(total):,} electrons, more than the {limit:,} one "
                         "message may carry; send fewer frames per message")
    return counts, out
