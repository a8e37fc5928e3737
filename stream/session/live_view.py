"""Live snapshots at the size a screen shows (docs/PROTOCOL.md, "Live results channel").

A 1024² scan's merged live images are 78 MB (float64 and int64 at every position); a browser
page shows at most 256 px a side while the scan runs. :func:`display_snapshot` turns the
session's merged live results into what a viewer draws: every scan-shaped and detector-shaped
image averaged over blocks to at most ``max_side`` a side (float32; positions without an
electron yet left out, NaN where a whole block has none), the positions received as one bit
each, and — for the first-look dose advice — the last complete rows of one image at full
resolution (at most 128 × 128). About 3 MB for a 1024² scan instead of 78.
"""

from __future__ import annotations

import numpy as np

from operators.blocks import bin_factor, block_mean

VIEW_MAX_SIDE = 256  # the session's own viewer gets live images at most this size a side
VIEW_RATE_HZ = 4.0  # and at least this often: jitter kept the page under 2 fills a second at 2
RECEIVED = "received_positions"  # the array of the positions received, one bit each (np.packbits)
DOSE_BLOCK = "dose_block"  # the array of the last complete rows of one image, full resolution
DOSE_BLOCK_SIDE = 128  # the live dose advice looks at most at this many rows and columns
# the centre of mass's sums: its components are drawn, their block means are not
NOT_DRAWN = ("com_n", "com_sum_y", "com_sum_x")


def not_received(results: dict, scan_shape=None) -> np.ndarray | None:
    """Positions without a single electron counted yet (the live states carry no
    completeness): zero in every integer count image (virtual images, ``com_n``); None when
    there is none. ``scan_shape``: consider only images of that shape."""
    counts = [np.asarray(a) for n, a in results.items()
              if np.ndim(a) == 2 and (n == "com_n" or not n.startswith(("com_", "aperture_", "diffraction_")))
              and np.asarray(a).dtype.kind in "iu" and (scan_shape is None or np.shape(a) == tuple(scan_shape))]
    if not counts:
        return None
    return np.all([c == 0 for c in counts], axis=0)


def received_block(image: np.ndarray, max_side: int = DOSE_BLOCK_SIDE, min_side: int = 16):
    """(rows, cols) slices of the rows of ``image`` (NaN: not received) that are complete, at
    most ``max_side`` of the last ones and the middle ``max_side`` columns; None when fewer
    than ``min_side``."""
    full = np.isfinite(image).all(axis=1)
    rows = np.flatnonzero(full)
    if len(rows) < min_side:
        return None
    # the last run of consecutive complete rows: a gap would join rows that are not neighbours
    start = len(rows) - 1
    while start > 0 and rows[start - 1] == rows[start] - 1:
        start -= 1
    rows = rows[start:][-max_side:]
    if len(rows) < min_side:
        return None
    nx = image.shape[1]
    c0 = max(0, (nx - max_side) // 2)
    c1 = min(nx, c0 + max_side)
    if c1 - c0 < min_side:
        return None
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(c0, c1)


def display_snapshot(results: dict, scan_shape, frame_shape, max_side: int = VIEW_MAX_SIDE,
                     dose_image: str | None = None) -> tuple[dict, dict]:
    """(arrays, header entries) of the display variant of a live snapshot.

    results: the merged live results (name → array, full resolution, as ``Session.live``).
    Every 2-D array of ``scan_shape`` becomes its block mean (operators.blocks) to at most
    ``max_side`` a side, float32, the positions not received yet left out; every 2-D array of
    ``frame_shape`` its block mean to at most ``max_side``; other arrays are passed unchanged,
    except the centre of mass's sums (``com_n``, ``com_sum_y``, ``com_sum_x``), left out.
    Added: ``received_positions``, uint8, ``np.packbits`` of the (ny · nx) flat positions that
    counted at least one electron (present when the results have count images); with
    ``dose_image`` (a result name) ``dose_block``, float32, that image over the last complete
    rows (at most 128, the middle 128 columns) at full resolution.
    The header entries: ``display`` = {``max_side``, ``scan_shape``, ``binned``: name →
    factor of every averaged array, ``dose_block``: [row0, row1, col0, col1] or absent}.
    """
    scan_shape, frame_shape = tuple(int(v) for v in scan_shape), tuple(int(v) for v in frame_shape)
    hidden = not_received(results, scan_shape)
    f_nav, f_sig = bin_factor(scan_shape, max_side), bin_factor(frame_shape, max_side)
    arrays, factors = {}, {}
    for name, a in results.items():
        a = np.asarray(a)
        if name in NOT_DRAWN:
            continue
        if a.ndim == 2 and a.shape == scan_shape and a.dtype.kind in "iuf":
            arrays[name], factors[name] = block_mean(a, f_nav, hidden), f_nav
        elif a.ndim == 2 and a.shape == frame_shape and a.dtype.kind in "iuf":
            arrays[name], factors[name] = block_mean(a, f_sig), f_sig
        else:
            arrays[name] = a
    info = {"max_side": int(max_side), "scan_shape": list(scan_shape), "binned": factors}
    if hidden is not None:
        arrays[RECEIVED] = np.packbits(~hidden.ravel())
    image = results.get(dose_image) if dose_image else None
    if image is not None and np.shape(image) == scan_shape:
        img = np.asarray(image, np.float64)
        if hidden is not None:
            img = np.where(hidden, np.nan, img)
        block = received_block(img)
        if block is not None:
            rows, cols = block
            arrays[DOSE_BLOCK] = img[rows, cols].astype(np.float32)
            info["dose_block"] = [rows.start, rows.stop, cols.start, cols.stop]
    return arrays, info


def warm_up() -> None:
    """Load the block-mean kernel (numba's cache) now rather than at the first snapshot."""
    block_mean(np.zeros((2, 2), np.int64), 2, np.zeros((2, 2), bool))
    block_mean(np.zeros((2, 2)), 2)


def unpack_received(bits: np.ndarray, scan_shape) -> np.ndarray:
    """(ny, nx) bool, True where received, from the ``received_positions`` bits."""
    n = int(np.prod(scan_shape))
    return np.unpackbits(np.asarray(bits, np.uint8), count=n).astype(bool).reshape(scan_shape)
