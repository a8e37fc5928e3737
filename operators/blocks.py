"""Block means of images: a large scan's images averaged to the size a screen shows.

One pass over the image in numba (a 1024² image in a few milliseconds); values that are NaN
or infinite, and positions marked hidden, are left out of their block's mean, and a block
with none left is NaN. Edges that do not fill a block are partial blocks.

Examples
--------
>>> import numpy as np
>>> block_mean(np.arange(16.0).reshape(4, 4), 2)
array([[ 2.5,  4.5],
       [10.5, 12.5]], dtype=float32)
>>> block_mean(np.array([[1, 3, 5]]), 2, hide=np.array([[False, True, False]]))
array([[1., 5.]], dtype=float32)
>>> bin_factor((1024, 1000), 256)
4
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from operators.kernels import NJIT


def bin_factor(shape, max_side: int) -> int:
    """The smallest integer factor that brings both sides of ``shape`` to ≤ ``max_side``."""
    return max(1, -(-max(shape) // max_side))


def block_mean(image: np.ndarray, factor: int, hide: np.ndarray | None = None) -> np.ndarray:
    """``image`` (h, w), any real dtype, averaged over ``factor`` × ``factor`` blocks:
    (ceil(h / factor), ceil(w / factor)) float32. NaN and infinite values, and pixels where
    ``hide`` (h, w) bool is True, are left out of their block's mean; a block with none left
    is NaN. The sums are float64."""
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"block_mean takes a 2-D image, got shape {image.shape}")
    if image.dtype.kind not in "iuf" and image.dtype != bool:
        raise ValueError(f"block_mean takes real numbers, got dtype {image.dtype}")
    factor = int(factor)
    if factor < 1:
        raise ValueError(f"the block factor must be >= 1, got {factor}")
    if image.dtype.kind == "f" and image.dtype != np.float64:
        image = image.astype(np.float64)
    elif image.dtype.kind in "ub" or image.dtype != np.int64 and image.dtype.kind == "i":
        image = image.astype(np.int64)
    if hide is None:
        hide = np.zeros((0, 0), bool)
    else:
        hide = np.asarray(hide, bool)
        if hide.shape != image.shape:
            raise ValueError(f"hide has shape {hide.shape}, the image {image.shape}")
    h, w = image.shape
    out = np.empty((-(-h // factor), -(-w // factor)), np.float32)
    _block_mean(np.ascontiguousarray(image), np.ascontiguousarray(hide), factor, out)
    return out


@njit(**NJIT)
def _block_mean(image, hide, factor, out):
    oh, ow = out.shape
    sums = np.zeros((oh, ow), np.float64)
    n = np.zeros((oh, ow), np.int64)
    masked = hide.shape[0] > 0
    for y in range(image.shape[0]):
        by = y // factor
        for x in range(image.shape[1]):
            if masked and hide[y, x]:
                continue
            v = float(image[y, x])
            if math.isfinite(v):
                sums[by, x // factor] += v
                n[by, x // factor] += 1
    for by in range(oh):
        for bx in range(ow):
            out[by, bx] = sums[by, bx] / n[by, bx] if n[by, bx] > 0 else np.nan
