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
def counts_kernel(frames, row0, counts, out):
    """Write ``frames[i, r, c]`` copies of (row0 + r)·w + c, frame after frame, pixels in
    ascending order, into ``out`` (sized by the caller to the frames' total); counts[i] =
    events of frame i. Rows of 16 zero pixels are skipped with one test."""
    n, rows, w = frames.shape
    e = 0
    for i in range(n):
        start = e
        for r in range(rows):
            base = (row0 + r) * w
            for c0 in range(0, w, 16):
                c1 = min(c0 + 16, w)
                any_hit = 0
                for c in range(c0, c1):
                    any_hit |= frames[i, r, c]
                if any_hit == 0:
                    continue
                for c in range(c0, c1):
                    for _ in range(frames[i, r, c]):
                        out[e] = base + c
                        e += 1
        counts[i] = e - start
    return e


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
    n = frames.shape[0]
    per_frame = frames.reshape(n, -1).sum(axis=1, dtype=np.uint64) if n else np.zeros(0, np.uint64)
    total = int(per_frame.sum())
    if max_events is not None and total > max_events:
        raise ValueError(f"the frames hold {total:,} electrons, more than the {max_events:,} one "
                         "message may carry; send fewer frames per message")
    counts = np.zeros(n, np.uint32)
    out = np.empty(total, np.uint32)
    written = counts_kernel(frames, int(row0), counts, out)
    assert written == total
    return counts, out
