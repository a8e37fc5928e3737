"""What the page draws, from result arrays: binned copies for large images, contrast limits
from percentiles, and the centre of mass as a colour wheel (direction → hue, magnitude →
brightness, the previews' wheel). Pure numpy; the page only colours what it is given.

Examples
--------
>>> import numpy as np
>>> binned(np.arange(16.0).reshape(4, 4), 2)[0]
array([[ 2.5,  4.5],
       [10.5, 12.5]], dtype=float32)
>>> rgba = com_rgba(np.array([[0.0, 1.0]]), np.array([[1.0, 0.0]]), clip=1.0)
>>> [hex(v) for v in rgba.ravel()]      # +x is red, +y (down the image) is chartreuse, opaque
['0xff0000ff', '0xff00ff80']
"""

from __future__ import annotations

import numpy as np

from operators.blocks import bin_factor as _bin_factor
from operators.blocks import block_mean
from stream.files.previews import com_rgb
from stream.session.live_view import VIEW_MAX_SIDE

MAX_SIDE = 512  # images larger than this are binned for the page (the files keep every pixel)
# while a scan runs, images are binned to this: a browser redraws four 256² images several
# times a second but 512² ones about once (bench_viewer.py); the panels are 300 px wide. The
# session publishes its viewer's live images at this size already (stream/session/live_view.py)
LIVE_MAX_SIDE = VIEW_MAX_SIDE


def bin_factor(shape, max_side: int = MAX_SIDE) -> int:
    """The smallest integer factor that brings both sides of ``shape`` to ≤ ``max_side``."""
    return _bin_factor(shape, max_side)


def binned(image: np.ndarray, factor: int | None = None) -> tuple[np.ndarray, int]:
    """(image averaged over factor × factor blocks as float32, factor; default: the factor
    that brings it to ``MAX_SIDE``); NaN pixels are left out of their block's mean (a block of
    NaN stays NaN). Edges that do not fill a block are kept as partial blocks
    (operators.blocks.block_mean)."""
    factor = bin_factor(np.shape(image)) if factor is None else int(factor)
    if factor == 1:
        return np.asarray(image, dtype=np.float32), 1
    return block_mean(image, factor), factor


def limits(image: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5,
           positive: bool = False) -> tuple[float, float]:
    """(low, high) display limits: percentiles of the finite pixels (of the positive ones
    when ``positive``, for a log scale). Never equal; (0, 1) for an image with nothing to show."""
    data = np.asarray(image)
    data = data[np.isfinite(data)]
    if positive:
        data = data[data > 0]
    if not data.size:
        return (1.0, 10.0) if positive else (0.0, 1.0)
    if data.size > 200_000:  # percentiles of a regular subsample: same limits, 10x faster
        data = data[:: data.size // 200_000]
    lo, hi = (float(v) for v in np.percentile(data, [low_pct, high_pct]))
    if hi <= lo:
        hi = lo * 10 if positive else lo + 1
    return lo, hi


def com_rgba(com_y: np.ndarray, com_x: np.ndarray, clip: float | None = None) -> np.ndarray:
    """The centre of mass (scan frame, y down) as colours, (ny, nx) uint32 RGBA (little-endian
    0xAABBGGRR, as Bokeh's ``image_rgba`` takes them): the previews' colour wheel
    (stream.files.previews.com_rgb: hue = direction, 0° = +x red, 90° = +y chartreuse, ...;
    brightness = magnitude / ``clip``, default the 99th percentile), transparent where NaN."""
    rgb, _ = com_rgb(com_y, com_x, clip)
    ok = np.isfinite(rgb).all(axis=-1)
    out = np.zeros(ok.shape, np.uint32)
    for c in range(3):
        out |= np.round(np.where(ok, rgb[..., c], 0) * 255).astype(np.uint32) << np.uint32(8 * c)
    out |= np.where(ok, np.uint32(255), np.uint32(0)) << np.uint32(24)
    return out


def color_wheel(size: int = 64) -> np.ndarray:
    """(size, size) uint32 RGBA legend of :func:`com_rgba`: direction and magnitude (centre
    dark, rim bright) of a unit disk; transparent outside."""
    c = (size - 1) / 2
    y, x = np.mgrid[0:size, 0:size]
    dy, dx = (y - c) / c, (x - c) / c
    outside = np.hypot(dy, dx) > 1
    return com_rgba(np.where(outside, np.nan, dy), np.where(outside, np.nan, dx), clip=1.0)


def com_arrows(com_y: np.ndarray, com_x: np.ndarray, step: float = 1.0, max_side: int = 16) -> dict:
    """The centre of mass as a quiver: the field averaged over blocks of f × f positions (f the
    smallest that leaves at most ``max_side`` blocks a side; NaN positions left out, blocks
    without a value dropped), one arrow per block from its centre, in page units (``step`` per
    position, y down as the images). Lengths are proportional to the magnitude, the largest
    (the 95th percentile of the blocks) one block long: ``scale`` is the magnitude (unit of
    ``com_*``) of an arrow one block long. Returns {"x0", "y0", "x1", "y1"} (n,) float64,
    "scale", "block" (positions per block side), "length" (page units of one block)."""
    cy, cx = np.asarray(com_y, np.float64), np.asarray(com_x, np.float64)
    f = max(1, -(-max(cy.shape) // max_side))
    my, _ = binned(cy, f)
    mx, _ = binned(cx, f)
    ny, nx = cy.shape
    rows, cols = np.mgrid[0:my.shape[0], 0:my.shape[1]]
    # block centres: partial blocks at the edges are centred on the positions they hold
    yc = (rows * f + (np.minimum((rows + 1) * f, ny) - rows * f) / 2) * step
    xc = (cols * f + (np.minimum((cols + 1) * f, nx) - cols * f) / 2) * step
    ok = np.isfinite(my) & np.isfinite(mx)
    mag = np.hypot(my, mx)[ok]
    scale = float(np.percentile(mag, 95)) if mag.size and np.percentile(mag, 95) > 0 else 1.0
    k = f * step / scale  # page units per unit of the field
    y0, x0 = yc[ok], xc[ok]
    return {"x0": x0, "y0": y0, "x1": x0 + k * mx[ok].astype(np.float64), "y1": y0 + k * my[ok].astype(np.float64),
            "scale": scale, "block": f, "length": f * step}
