"""Exact noiseless detector signals of the model: total, bright field, annular dark field and
centre of mass per probe position, including detector effects -- without dense frames.

A disk component is uniform over its pixel set {(x - cx)² + (y - cy)² <= r²}; its share of
any detector region is (pixels of the set in the region) / (pixels of the set). Both counts,
and the sums of pixel coordinates needed for the centre of mass, are taken row by row: the set
and each circular detector mask are one interval per row, and dead pixels are subtracted with
per-row prefix sums. Cost: O(disk rows) per disk, exact to float rounding.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange


def row_intervals(frame_shape, axis, radius_px: float, strict: bool = False):
    """Per detector row y, the [lo, hi] pixel interval of the circle d² <= r² (or d² < r²
    with ``strict``) around ``axis`` (y, x); empty rows have lo > hi. Exact (brute force)."""
    h, w = frame_shape
    ay, ax = axis
    dx = np.arange(w, dtype=np.float64) - ax
    lo = np.full(h, 1, np.int64)
    hi = np.full(h, 0, np.int64)
    r2 = float(radius_px) * float(radius_px)
    for y in range(h):
        dy = y - ay
        d2 = dx * dx + dy * dy
        inside = d2 < r2 if strict else d2 <= r2
        idx = np.nonzero(inside)[0]
        if len(idx):
            lo[y], hi[y] = idx[0], idx[-1]
    return lo, hi


def dead_prefix(frame_shape, axis, dead: np.ndarray):
    """Per row prefix count and prefix Σ(x - ax) of dead pixels: (h, w+1) arrays."""
    h, w = frame_shape
    d = np.asarray(dead, np.uint8).reshape(h, w).astype(np.int64)
    cnt = np.zeros((h, w + 1), np.int64)
    np.cumsum(d, axis=1, out=cnt[:, 1:])
    sx = np.zeros((h, w + 1), np.float64)
    np.cumsum(d * (np.arange(w) - axis[1])[None, :], axis=1, out=sx[:, 1:])
    return cnt, sx


@njit(cache=True, inline="always")
def _live(y, a, b, dcnt, has_dead):
    if not has_dead:
        return b - a + 1
    return (b - a + 1) - (dcnt[y, b + 1] - dcnt[y, a])


@njit(cache=True, inline="always")
def _relation(D, r, R, strict):
    """1: the disk (centre at distance D from the axis, radius r) is surely inside the
    circle of radius R around the axis; 0: surely outside; -1: decide row by row. The 2 px
    margin keeps the classification exact despite float rounding."""
    if D + r + 2.0 <= R:
        return 1
    if D - r - 2.0 > R:
        return 0
    return -1


@njit(cache=True)
def disk_sums(cx, cy, r, r2, h, w, ax, ay, bf_lo, bf_hi, out_lo, out_hi, in_lo, in_hi,
              dcnt, dsx, has_dead, radii):
    """(n_set, n_live, n_bf, n_adf, Σ(x-ax), Σ(y-ay)) for the disk's pixel set; all but n_set
    count live on-detector pixels only. radii: (bf, adf outer, adf inner) of the masks."""
    n_set = 0
    n_live = 0
    n_bf = 0
    n_adf = 0
    sx = 0.0
    sy = 0.0
    D = math.sqrt((cx - ax) * (cx - ax) + (cy - ay) * (cy - ay))
    rel_bf = _relation(D, r, radii[0], False)
    rel_out = _relation(D, r, radii[1], False)
    rel_in = _relation(D, r, radii[2], True)
    if rel_out == 0 or rel_in == 1:
        rel_adf = 0
    elif rel_out == 1 and rel_in == 0:
        rel_adf = 1
    else:
        rel_adf = -1
    y_lo = int(math.ceil(cy - r)) - 1
    y_hi = int(math.floor(cy + r)) + 1
    for y in range(y_lo, y_hi + 1):
        dy = y - cy
        dyy = dy * dy
        rem = r2 - dyy
        if rem < 0.0:
            continue
        hw = math.sqrt(rem)
        lo = int(math.ceil(cx - hw))
        hi = int(math.floor(cx + hw))
        # make the interval agree exactly with the predicate dx*dx + dy*dy <= r2
        while True:
            d = (lo - 1) - cx
            if d * d + dyy <= r2:
                lo -= 1
            else:
                break
        while lo <= hi:
            d = lo - cx
            if d * d + dyy > r2:
                lo += 1
            else:
                break
        while True:
            d = (hi + 1) - cx
            if d * d + dyy <= r2:
                hi += 1
            else:
                break
        while hi >= lo:
            d = hi - cx
            if d * d + dyy > r2:
                hi -= 1
            else:
                break
        if hi < lo:
            continue
        n_set += hi - lo + 1
        if y < 0 or y >= h:
            continue
        a = max(lo, 0)
        b = min(hi, w - 1)
        if a > b:
            continue
        n = _live(y, a, b, dcnt, has_dead)
        n_live += n
        m = b - a + 1
        sx += (a + b) * m // 2 - ax * m
        if has_dead:
            sx -= dsx[y, b + 1] - dsx[y, a]
        sy += (y - ay) * n
        if rel_bf == 1:
            n_bf += n
        elif rel_bf == -1:
            a2 = max(a, bf_lo[y])
            b2 = min(b, bf_hi[y])
            if a2 <= b2:
                n_bf += _live(y, a2, b2, dcnt, has_dead)
        if rel_adf == 1:
            n_adf += n
        elif rel_adf == -1:
            a2 = max(a, out_lo[y])
            b2 = min(b, out_hi[y])
            if a2 <= b2:
                n_adf += _live(y, a2, b2, dcnt, has_dead)
            a2 = max(a, in_lo[y])
            b2 = min(b, in_hi[y])
            if a2 <= b2:
                n_adf -= _live(y, a2, b2, dcnt, has_dead)
    return n_set, n_live, n_bf, n_adf, sx, sy


@njit(cache=True, parallel=True, nogil=True)
def _expected_kernel(lam_u, lam_b, cx, cy, refl_dx, refl_dy, refl_start, refl_p, r, r2,
                     h, w, ax, ay, bf_lo, bf_hi, out_lo, out_hi, in_lo, in_hi, dcnt, dsx,
                     has_dead, radii, const):
    P = len(lam_u)
    G = lam_b.shape[1]
    res = np.zeros((5, P))
    for p in prange(P):
        tot = const[0]
        bf = const[1]
        adf = const[2]
        sy = const[3]
        sx = const[4]
        lu = lam_u[p]
        if lu > 0.0:
            n_set, n_live, n_bf, n_adf, dx, dy = disk_sums(
                cx[p], cy[p], r, r2, h, w, ax, ay, bf_lo, bf_hi, out_lo, out_hi, in_lo,
                in_hi, dcnt, dsx, has_dead, radii)
            c = lu / n_set
            tot += c * n_live
            bf += c * n_bf
            adf += c * n_adf
            sx += c * dx
            sy += c * dy
        for g in range(G):
            lb = lam_b[p, g]
            if lb <= 0.0:
                continue
            for j in range(refl_start[g], refl_start[g + 1]):
                n_set, n_live, n_bf, n_adf, dx, dy = disk_sums(
                    cx[p] + refl_dx[j], cy[p] + refl_dy[j], r, r2, h, w, ax, ay, bf_lo,
                    bf_hi, out_lo, out_hi, in_lo, in_hi, dcnt, dsx, has_dead, radii)
                c = lb * refl_p[j] / n_set
                tot += c * n_live
                bf += c * n_bf
                adf += c * n_adf
                sx += c * dx
                sy += c * dy
        res[0, p] = tot
        res[1, p] = bf
        res[2, p] = adf
        res[3, p] = sy
        res[4, p] = sx
    return res


def expected_signals(*, lam_u, lam_b, lam_d, cx, cy, refl_dx, refl_dy, refl_start, refl_p,
                     r_bf_px, frame_shape, axis, bf_radius_px, adf_inner_px, adf_outer_px,
                     diffuse_q, dead, hot_pix, hot_rate, dark_rate):
    """Expected electrons per frame per position in the whole detector, the BF disk
    (d <= bf_radius_px) and the ADF annulus (adf_inner_px <= d <= adf_outer_px), and the
    expected centre of mass (y, x) relative to the axis, px.

    lam_d: (P,) mean diffuse electrons on live pixels; diffuse_q: (h, w) its distribution
    (any scale). refl_p: per-reflection probability within its grain. Returns a dict of (P,)
    arrays total, bf, adf, com_y, com_x.
    """
    h, w = frame_shape
    ay, ax = (float(v) for v in axis)
    live = 1 - np.asarray(dead, np.uint8).reshape(h, w)
    yy = (np.arange(h) - ay)[:, None] * np.ones((1, w))
    xx = np.ones((h, 1)) * (np.arange(w) - ax)[None, :]
    d2 = xx * xx + yy * yy
    m_bf = d2 <= float(bf_radius_px) * float(bf_radius_px)
    m_adf = (d2 >= float(adf_inner_px) * float(adf_inner_px)) & \
        (d2 <= float(adf_outer_px) * float(adf_outer_px))
    q = np.asarray(diffuse_q, float) * live
    qs = q.sum()
    qn = q / qs if qs > 0 else q
    lam_d = np.asarray(lam_d, float)
    hot = np.zeros((h, w))
    if len(hot_pix) and hot_rate > 0:
        hot.reshape(-1)[np.asarray(hot_pix, np.int64)] = hot_rate
    dark = dark_rate / (h * w) * live
    # constant (position-independent) parts: dark counts and hot pixels
    fixed = dark + hot
    const = np.array([fixed.sum(), fixed[m_bf].sum(), fixed[m_adf].sum(),
                      (fixed * yy).sum(), (fixed * xx).sum()])
    bf_lo, bf_hi = row_intervals(frame_shape, (ay, ax), bf_radius_px)
    out_lo, out_hi = row_intervals(frame_shape, (ay, ax), adf_outer_px)
    in_lo, in_hi = row_intervals(frame_shape, (ay, ax), adf_inner_px, strict=True)
    # the annulus is (d <= outer) minus (d < inner AND d <= outer): an inner radius beyond the
    # outer one gives an empty annulus, not a negative one
    in_lo, in_hi = np.maximum(in_lo, out_lo), np.minimum(in_hi, out_hi)
    dcnt, dsx = dead_prefix(frame_shape, (ay, ax), dead)
    r = float(r_bf_px)
    lam_b = np.ascontiguousarray(lam_b, float).reshape(len(lam_u), -1)
    c = np.ascontiguousarray
    res = _expected_kernel(c(lam_u, float), lam_b, c(cx, float), c(cy, float),
                           c(refl_dx, float), c(refl_dy, float), c(refl_start, np.int64),
                           c(refl_p, float), r, r * r, h, w, ax, ay,
                           bf_lo, bf_hi, out_lo, out_hi, in_lo, in_hi, dcnt, dsx,
                           bool(np.any(np.asarray(dead) != 0)),
                           np.array([float(bf_radius_px), float(adf_outer_px),
                                     min(float(adf_inner_px), float(adf_outer_px))]), const)
    tot = res[0] + lam_d
    bf = res[1] + lam_d * qn[m_bf].sum()
    adf = res[2] + lam_d * qn[m_adf].sum()
    sy = res[3] + lam_d * (qn * yy).sum()
    sx = res[4] + lam_d * (qn * xx).sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        com_y = np.where(tot > 0, sy / tot, 0.0)
        com_x = np.where(tot > 0, sx / tot, 0.0)
    return {"total": tot, "bf": bf, "adf": adf, "com_y": com_y, "com_x": com_x}
