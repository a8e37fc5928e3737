"""Atomic columns in 2D: find, refine, fit 2D Gaussians, fit the lattice, measure distances.

Works on any image that is brighter on the columns (annular dark field, iCoM phase). Pixel
(row, col) = (y, x) with pixel centres at integers; positions in px, in Å when a scan step is
given. The steps, each a public function:

1. :func:`find_candidates` — local maxima of the (optionally smoothed) image at least
   ``min_distance_px`` apart, whose contrast over the local background (window median)
   exceeds a threshold.
2. :func:`refine_com` — centre of mass of the background-subtracted image in a disk window.
3. :func:`fit_gaussians` — a 2D Gaussian per column (y, x, sigma_1, sigma_2, rotation,
   amplitude, background) by Levenberg–Marquardt in numba, all columns in parallel, each on
   the pixels of its window closer to it than to any other column (a Voronoi cell), so that
   neighbours do not pull it.
4. :func:`fit_lattice` — two basis vectors and an origin by least squares, integer indices of
   every column, displacement from the ideal lattice.
5. :func:`nearest_neighbour_distances`.

:func:`analyze_columns` runs them all and returns a :class:`ColumnsResult`.

Examples
--------
>>> import numpy as np
>>> from operators.imaging.columns import analyze_columns
>>> y, x = np.mgrid[0:40, 0:40]
>>> img = sum(np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / 2.0)
...           for cy in (10.3, 20.3, 30.3) for cx in (9.8, 19.8, 29.8))
>>> res = analyze_columns(img, min_distance_px=5)
>>> len(res.y_px), round(float(res.y_px[0]), 3), round(float(res.a1_px[0] + res.a2_px[0]), 3)
(9, 10.3, 10.0)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from operators.kernels import NJIT

N_PARAMS = 7  # y, x, sigma_1, sigma_2, theta, amplitude, background
FIT_FAILED, FIT_OK, FIT_MAX_ITER = 0, 1, 2


# ----------------------------------------------------------------- 1. candidates

def _check_image(image, what="image"):
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2 or min(img.shape) < 3:
        raise ValueError(f"{what} must be a 2D array of at least 3 x 3 px, got shape "
                         f"{np.shape(image)}")
    if not np.isfinite(img).all():
        raise ValueError(f"{what} contains NaN or inf; fill missing positions first (e.g. "
                         f"with the image median)")
    return img


def find_candidates(image, min_distance_px, threshold=None, smooth_px=0.0):
    """Candidate columns: local maxima at least ``min_distance_px`` apart.

    Parameters
    ----------
    image : (ny, nx) float, brighter on the columns.
    min_distance_px : px; of two local maxima closer than this only the higher is kept
        (greedy, highest first), so two candidates are never closer. About 0.6 x the
        nearest column distance.
    threshold : minimum contrast of a local maximum (image units, after smoothing): its
        value minus the median of the square window of half-width round(min_distance_px)
        around it (the local background). None: 5 x the noise of the smoothed image (see
        :func:`auto_threshold`).
    smooth_px : sigma in px of a Gaussian smoothing before the search (0: none); about the
        column width helps on shot-noise images.

    Returns
    -------
    ((n, 2) float64 (y, x) px of the candidates, on pixel centres; (n,) their contrasts),
    sorted by y then x.
    """
    from scipy import ndimage as ndi

    img = _check_image(image)
    if not (np.isfinite(min_distance_px) and min_distance_px >= 1):
        raise ValueError(f"min_distance_px must be a number >= 1 px, got {min_distance_px!r}")
    if threshold is None:
        threshold = auto_threshold(img, smooth_px)
    sm = ndi.gaussian_filter(img, float(smooth_px), mode="nearest") if smooth_px > 0 else img
    size = 2 * int(round(min_distance_px)) + 1
    # 3 x 3 maxima, then suppression by distance: a faint column next to a bright one is a
    # maximum of its own even where the bright one's tail exceeds it within min_distance
    is_max = sm == ndi.maximum_filter(sm, size=3, mode="nearest")
    # the contrast over the window's minimum bounds the one over its median: a cheap first cut
    is_max &= sm - ndi.minimum_filter(sm, size=size, mode="nearest") >= max(threshold, 0.0)
    ys, xs = np.nonzero(is_max)
    # local background: the median of the window, for the remaining maxima only
    half = size // 2
    ny, nx = sm.shape
    oy, ox = np.mgrid[-half:half + 1, -half:half + 1]
    win = sm[np.clip(ys[:, None] + oy.ravel(), 0, ny - 1), np.clip(xs[:, None] + ox.ravel(), 0,
                                                                   nx - 1)]
    contrast = sm[ys, xs] - np.median(win, axis=1) if len(ys) else np.zeros(0)
    keep = (contrast >= threshold) & (contrast > 0)   # a flat plateau is not a column
    ys, xs, contrast = ys[keep], xs[keep], contrast[keep]
    # greedy suppression, highest first (also merges plateaus of equal maxima)
    if len(ys) > 1:
        from scipy.spatial import cKDTree

        order = np.argsort(-sm[ys, xs], kind="stable")
        ys, xs, contrast = ys[order], xs[order], contrast[order]
        drop = np.zeros(len(ys), bool)
        for i, j in sorted(cKDTree(np.c_[ys, xs]).query_pairs(min_distance_px - 1e-9)):
            if not drop[i]:
                drop[j] = True
        ys, xs, contrast = ys[~drop], xs[~drop], contrast[~drop]
    order = np.lexsort((xs, ys))
    return np.c_[ys[order], xs[order]].astype(np.float64), contrast[order]


def auto_threshold(image, smooth_px=0.0, k=5.0):
    """Default threshold of :func:`find_candidates`: k x the noise of the smoothed image.

    The noise sigma of the raw image is the robust (median absolute deviation) spread of the
    differences of neighbouring pixels / sqrt 2 — columns occupy few pixels, so this is the
    background's noise; Gaussian smoothing by s px divides white noise by 2 sqrt(pi) s.
    """
    img = np.asarray(image, np.float64)
    d = np.diff(img, axis=1).ravel()
    noise = 1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2.0)
    if smooth_px > 0:
        noise *= min(1.0, 1.0 / (2.0 * np.sqrt(np.pi) * float(smooth_px)))
    return k * noise


def is_counts(image) -> bool:
    """True when ``image`` holds electron counts: finite, non-negative whole numbers (an ADF
    image summed from the events), so its noise is Poisson."""
    img = np.asarray(image)
    if img.dtype.kind in "ui":
        return True
    return bool(np.isfinite(img).all() and (img >= 0).all() and (img == np.rint(img)).all())


def _disk(radius):
    r = int(np.ceil(radius))
    oy, ox = np.mgrid[-r:r + 1, -r:r + 1]
    return (oy * oy + ox * ox <= radius * radius).astype(np.float64)


def detection_pvalues(image, yx, footprint_px):
    """Poisson significance of a column at each candidate of a counts image.

    N = the counts in the disk of radius ``footprint_px`` around the candidate's pixel, R =
    the counts in the ring footprint_px < d <= 2 footprint_px around it (pixels inside the
    image only). Without a column the disk and the ring see the same background rate, and
    given T = N + R counts in both, N is binomial(T, q) with q = disk area / (disk + ring
    area): the exact conditional test of two Poisson rates, which needs no estimate of the
    background and stays valid where it is uncertain (few counts, vacuum). Returns (n,)
    p-values P(binomial(T, q) >= N): small where the disk holds more than its share.
    """
    from scipy import ndimage as ndi
    from scipy.special import betainc

    img = _check_image(image)
    yx = np.asarray(yx, np.float64).reshape(-1, 2)
    if len(yx) == 0:
        return np.zeros(0)
    inner = _disk(footprint_px)
    outer = _disk(2.0 * footprint_px)
    pad = (outer.shape[0] - inner.shape[0]) // 2
    ring = outer - np.pad(inner, pad)
    y = np.clip(np.rint(yx[:, 0]).astype(np.int64), 0, img.shape[0] - 1)
    x = np.clip(np.rint(yx[:, 1]).astype(np.int64), 0, img.shape[1] - 1)
    ones = np.ones_like(img)
    n_in = np.rint(ndi.convolve(img, inner, mode="constant")[y, x])
    n_ring = np.rint(ndi.convolve(img, ring, mode="constant")[y, x])
    a_in = ndi.convolve(ones, inner, mode="constant")[y, x]
    a_ring = ndi.convolve(ones, ring, mode="constant")[y, x]
    q = a_in / (a_in + a_ring)
    # P(binomial(T, q) >= N) = I_q(N, T - N + 1) (regularised incomplete beta); 1 for N = 0
    return np.where(n_in > 0, betainc(np.maximum(n_in, 1), n_ring + 1, q), 1.0)


def _lattice_growth(yx, p, strong, p_lattice, tolerance=0.2):
    """Candidates on the lattice of the ``strong`` ones (at least 10, for a lattice fit that
    holds), next to an accepted column (within 1.1 x the longer basis vector) and with
    p < p_lattice, added repeatedly: a crystal's columns continue over a thin region where
    each one alone is not significant, filled from its edges inwards; vacuum off the lattice
    is never tested, and a site beyond the crystal's edge passes with probability p_lattice.
    Returns the mask of the grown candidates and the lattice fit (or None when it fails)."""
    from scipy.spatial import cKDTree

    grown = np.zeros(len(yx), bool)
    if strong.sum() < 10:
        return grown, None
    try:
        lat = fit_lattice(yx[strong])
    except ValueError:
        return grown, None
    B = np.stack([lat.a1_px, lat.a2_px], axis=1)
    frac = np.linalg.solve(B, (yx - lat.origin_px).T).T
    on = np.abs(frac - np.rint(frac)).max(axis=1) <= tolerance
    reach = 1.1 * max(np.hypot(*lat.a1_px), np.hypot(*lat.a2_px))
    near = cKDTree(yx).query_ball_point(yx, reach)
    accepted = strong.copy()
    todo = on & ~strong & (p < p_lattice)
    while todo.any():
        new = np.array([bool(todo[i]) and bool(accepted[near[i]].any()) for i in range(len(yx))])
        if not new.any():
            break
        accepted |= new
        todo &= ~new
    return accepted & ~strong, lat


# ----------------------------------------------------------------- 2. centre of mass

def _disk_offsets(radius):
    r = int(np.ceil(radius))
    oy, ox = np.mgrid[-r:r + 1, -r:r + 1]
    inside = oy * oy + ox * ox <= radius * radius
    return oy[inside].astype(np.int64), ox[inside].astype(np.int64)


def refine_com(image, yx, radius_px, n_iter=3):
    """Refine positions by the centre of mass in a disk window.

    Parameters
    ----------
    image : (ny, nx) float.
    yx : (n, 2) float (y, x) px starting positions.
    radius_px : disk window radius in px (around the nearest pixel of each position); about
        half the nearest column distance.
    n_iter : re-centre the window this many times.

    Returns
    -------
    (n, 2) float64 (y, x) px. Inside the window the local minimum is subtracted, so a flat
    background does not pull positions towards the window centre; windows are clipped at
    the image edges.
    """
    img = _check_image(image)
    yx = np.array(yx, dtype=np.float64).reshape(-1, 2)
    if not (np.isfinite(radius_px) and radius_px >= 1):
        raise ValueError(f"radius_px must be a number >= 1 px, got {radius_px!r}")
    oy, ox = _disk_offsets(radius_px)
    ny, nx = img.shape
    for _ in range(int(n_iter)):
        cy = np.rint(yx[:, 0]).astype(np.int64)
        cx = np.rint(yx[:, 1]).astype(np.int64)
        py = cy[:, None] + oy[None, :]
        px = cx[:, None] + ox[None, :]
        ok = (py >= 0) & (py < ny) & (px >= 0) & (px < nx)
        v = img[np.clip(py, 0, ny - 1), np.clip(px, 0, nx - 1)]
        v = np.where(ok, v, np.inf)
        v = np.where(ok, v - v.min(axis=1, keepdims=True), 0.0)
        s = v.sum(axis=1)
        good = s > 0
        new_y = (v * py).sum(axis=1) / np.where(good, s, 1.0)
        new_x = (v * px).sum(axis=1) / np.where(good, s, 1.0)
        yx = np.where(good[:, None], np.c_[new_y, new_x], yx)
    return yx


# ----------------------------------------------------------------- 3. Gaussian fits

@njit(**NJIT)
def _model_jac(p, yy, xx, jac):
    y0, x0, s1, s2, th, amp, bg = p[0], p[1], p[2], p[3], p[4], p[5], p[6]
    c, s = np.cos(th), np.sin(th)
    dy, dx = yy - y0, xx - x0
    u = dx * c + dy * s
    v = -dx * s + dy * c
    i1, i2 = 1.0 / (s1 * s1), 1.0 / (s2 * s2)
    e = np.exp(-0.5 * (u * u * i1 + v * v * i2))
    ae = amp * e
    jac[0] = ae * (u * s * i1 + v * c * i2)
    jac[1] = ae * (u * c * i1 - v * s * i2)
    jac[2] = ae * u * u * i1 / s1
    jac[3] = ae * v * v * i2 / s2
    jac[4] = ae * u * v * (i2 - i1)
    jac[5] = e
    jac[6] = 1.0
    return bg + ae


@njit(**NJIT)
def _cost(vals, pys, pxs, npx, p, jac):
    c = 0.0
    for k in range(npx):
        r = vals[k] - _model_jac(p, float(pys[k]), float(pxs[k]), jac)
        c += r * r
    return c


@njit(**NJIT)
def _peak(q, yy, xx):
    """Value of the Gaussian part (no background) of parameters q at (yy, xx)."""
    c, s = np.cos(q[4]), np.sin(q[4])
    dy, dx = yy - q[0], xx - q[1]
    u = dx * c + dy * s
    v = -dx * s + dy * c
    return q[5] * np.exp(-0.5 * (u * u / (q[2] * q[2]) + v * v / (q[3] * q[3])))


@njit(parallel=True, cache=True, nogil=True)
def _fit_all(img, start, nb_ptr, nb_idx, radius, free, round_, smin, smax, max_iter,
             params, rms, n_iter, status, n_pix, nb_params, subtract):
    ny, nx = img.shape
    n = start.shape[0]
    r = int(np.ceil(radius))
    npmax = (2 * r + 1) * (2 * r + 1)
    for i in prange(n):
        pys = np.empty(npmax, np.int64)
        pxs = np.empty(npmax, np.int64)
        vals = np.empty(npmax)
        cy, cx = start[i, 0], start[i, 1]
        iy, ix = int(np.rint(cy)), int(np.rint(cx))
        npx = 0
        for yy in range(iy - r, iy + r + 1):
            if yy < 0 or yy >= ny:
                continue
            for xx in range(ix - r, ix + r + 1):
                if xx < 0 or xx >= nx:
                    continue
                d2 = (yy - cy) ** 2 + (xx - cx) ** 2
                if d2 > radius * radius:
                    continue
                mine = True  # Voronoi cell: closer to this column than to any neighbour
                for q in range(nb_ptr[i], nb_ptr[i + 1]):
                    j = nb_idx[q]
                    if (yy - start[j, 0]) ** 2 + (xx - start[j, 1]) ** 2 < d2:
                        mine = False
                        break
                if mine:
                    pys[npx] = yy
                    pxs[npx] = xx
                    v = img[yy, xx]
                    if subtract:  # the neighbours' fitted peaks reach into this cell
                        for q in range(nb_ptr[i], nb_ptr[i + 1]):
                            v -= _peak(nb_params[nb_idx[q]], float(yy), float(xx))
                    vals[npx] = v
                    npx += 1
        n_pix[i] = npx
        p = params[i].copy()
        n_free = 0
        for a in range(N_PARAMS):
            n_free += free[a]
        if npx <= n_free:
            status[i] = FIT_FAILED
            rms[i] = np.nan
            continue
        jac = np.empty(N_PARAMS)
        JtJ = np.empty((N_PARAMS, N_PARAMS))
        Jtr = np.empty(N_PARAMS)
        lam = 1e-3
        cost = _cost(vals, pys, pxs, npx, p, jac)
        st = FIT_MAX_ITER
        it = 0
        while it < max_iter:
            it += 1
            JtJ[:, :] = 0.0
            Jtr[:] = 0.0
            for k in range(npx):
                res = vals[k] - _model_jac(p, float(pys[k]), float(pxs[k]), jac)
                if round_:
                    jac[2] += jac[3]
                for a in range(N_PARAMS):
                    if free[a] == 0:
                        continue
                    Jtr[a] += jac[a] * res
                    for b in range(a, N_PARAMS):
                        if free[b]:
                            JtJ[a, b] += jac[a] * jac[b]
            for a in range(N_PARAMS):
                for b in range(a):
                    JtJ[a, b] = JtJ[b, a]
                if free[a] == 0:
                    JtJ[a, :] = 0.0
                    JtJ[:, a] = 0.0
                    JtJ[a, a] = 1.0
                    Jtr[a] = 0.0
            improved = False
            rel = 0.0
            while lam < 1e12:
                M = JtJ.copy()
                for a in range(N_PARAMS):
                    M[a, a] += lam * max(JtJ[a, a], 1e-12)
                step = np.linalg.solve(M, Jtr)
                trial = p + step
                if round_:
                    trial[3] = trial[2]
                trial[2] = min(max(trial[2], smin), smax)
                trial[3] = min(max(trial[3], smin), smax)
                c_new = _cost(vals, pys, pxs, npx, trial, jac)
                if c_new <= cost:
                    rel = (cost - c_new) / max(cost, 1e-300)
                    p = trial
                    cost = c_new
                    lam = max(lam * 0.3, 1e-9)
                    improved = True
                    break
                lam *= 10.0
            if not improved or rel < 1e-10:
                st = FIT_OK
                break
        # a column that walked out of its window was not fitted
        if (p[0] - cy) ** 2 + (p[1] - cx) ** 2 > radius * radius:
            st = FIT_FAILED
        params[i] = p
        rms[i] = np.sqrt(cost / npx)
        n_iter[i] = it
        status[i] = st


def _neighbours(yx, reach):
    from scipy.spatial import cKDTree

    n = len(yx)
    if n < 2:
        return np.zeros(n + 1, np.int64), np.zeros(0, np.int64)
    pairs = cKDTree(yx).query_pairs(reach, output_type="ndarray")
    both = np.concatenate([pairs, pairs[:, ::-1]]) if len(pairs) else np.zeros((0, 2), np.int64)
    order = np.argsort(both[:, 0], kind="stable")
    both = both[order]
    ptr = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(both[:, 0], minlength=n), out=ptr[1:])
    return ptr, both[:, 1].astype(np.int64)


@dataclass
class GaussianFits:
    """Per column (n,) float64 unless stated: y_px, x_px, sigma1_px >= sigma2_px, theta_deg
    in [-90, 90) (direction of the sigma_1 axis, from +x towards +y, i.e. clockwise in the
    displayed image with y down), amplitude, background (image units), cross_section
    (2π·amplitude·sigma1·sigma2, image units·px²), rms_residual, n_pixels (int64), n_iter
    (int64), status (int8: 0 failed, 1 converged, 2 iteration limit)."""

    y_px: np.ndarray
    x_px: np.ndarray
    sigma1_px: np.ndarray
    sigma2_px: np.ndarray
    theta_deg: np.ndarray
    amplitude: np.ndarray
    background: np.ndarray
    cross_section: np.ndarray
    rms_residual: np.ndarray
    n_pixels: np.ndarray
    n_iter: np.ndarray
    status: np.ndarray


def fit_gaussians(image, yx, radius_px, *, sigma_px=None, shape="elliptical", max_iter=100,
                  sigma_bounds_px=None, n_passes=2) -> GaussianFits:
    """Fit a 2D Gaussian plus constant background to every column, all in parallel (numba).

    Model per column: ``b + A exp(-u²/2σ1² - v²/2σ2²)``, with (u, v) the pixel offset from
    (y, x) rotated by theta. Each column is fitted on the pixels within ``radius_px`` of its
    start that are closer to it than to any other start (its Voronoi cell); from the second
    pass on, the neighbours' fitted peaks (previous pass) are subtracted from those pixels
    first, so that a bright neighbour's tail does not pull a faint column.

    Parameters
    ----------
    image : (ny, nx) float.
    yx : (n, 2) float (y, x) px starting positions (e.g. from :func:`refine_com`).
    radius_px : window radius in px, about half the nearest column distance.
    sigma_px : starting width in px (float) or None (from the window's second moment); with
        ``shape="fixed"`` the width every column is fitted with (scalar or (n,)).
    shape : "elliptical" (σ1, σ2, theta free), "round" (σ1 = σ2 free) or "fixed" (width
        fixed to ``sigma_px``: position, amplitude and background only, as for atom counting
        with one width per column type).
    max_iter : Levenberg–Marquardt iteration limit.
    n_passes : 1 (cells only) or more (neighbours subtracted, each pass from the last).
    sigma_bounds_px : (min, max) px widths are kept within; default (0.15, radius_px).

    Returns
    -------
    GaussianFits (positions px, cross-sections in image units·px²).
    """
    img = _check_image(image)
    yx = np.array(yx, dtype=np.float64).reshape(-1, 2)
    n = len(yx)
    if not (np.isfinite(radius_px) and radius_px >= 1):
        raise ValueError(f"radius_px must be a number >= 1 px, got {radius_px!r}")
    if shape not in ("elliptical", "round", "fixed"):
        raise ValueError(f"shape must be 'elliptical', 'round' or 'fixed', got {shape!r}")
    if shape == "fixed" and sigma_px is None:
        raise ValueError("shape='fixed' needs sigma_px (the width in px to fit with)")
    smin, smax = sigma_bounds_px if sigma_bounds_px is not None else (0.15, float(radius_px))
    if not (0 < smin < smax):
        raise ValueError(f"sigma_bounds_px must be (min, max) with 0 < min < max, got "
                         f"{sigma_bounds_px!r}")
    # starting values from the window: background = low percentile, amplitude = peak - bg
    oy, ox = _disk_offsets(radius_px)
    ny, nx = img.shape
    py = np.clip(np.rint(yx[:, 0]).astype(np.int64)[:, None] + oy, 0, ny - 1)
    px = np.clip(np.rint(yx[:, 1]).astype(np.int64)[:, None] + ox, 0, nx - 1)
    v = img[py, px] if n else np.zeros((0, len(oy)))
    bg = np.percentile(v, 10, axis=1) if n else np.zeros(0)
    w = np.clip(v - bg[:, None], 0, None)
    amp = w.max(axis=1) if n else np.zeros(0)
    if sigma_px is None:
        d2 = (py - yx[:, [0]]) ** 2 + (px - yx[:, [1]]) ** 2
        sw = np.where(w.sum(1) > 0, w.sum(1), 1.0)
        s0 = np.sqrt(np.clip((w * d2).sum(1) / sw / 2.0, smin ** 2, smax ** 2))
    else:
        s0 = np.broadcast_to(np.asarray(sigma_px, np.float64), (n,)).copy()
        if not (np.isfinite(s0).all() and (s0 > 0).all()):
            raise ValueError(f"sigma_px must be > 0 px, got {sigma_px!r}")
    params = np.c_[yx, s0, s0, np.zeros(n), amp, bg].astype(np.float64)
    free = np.ones(N_PARAMS, np.int64)
    if shape == "round":
        free[3] = free[4] = 0
    elif shape == "fixed":
        free[2] = free[3] = free[4] = 0
        smin, smax = float(s0.min()) if n else smin, float(s0.max()) if n else smax
    if int(n_passes) < 1:
        raise ValueError(f"n_passes must be >= 1, got {n_passes!r}")
    ptr, idx = _neighbours(yx, 2.0 * float(radius_px))
    rms = np.zeros(n)
    n_iter = np.zeros(n, np.int64)
    status = np.zeros(n, np.int8)
    n_pix = np.zeros(n, np.int64)
    for k in range(int(n_passes) if n else 0):
        prev = params.copy()
        # a failed neighbour is not subtracted
        prev[status == FIT_FAILED, 5] = 0.0
        _fit_all(img, yx, ptr, idx, float(radius_px), free, shape == "round", float(smin),
                 float(smax), int(max_iter), params, rms, n_iter, status, n_pix, prev, k > 0)
    s1, s2, th = params[:, 2].copy(), params[:, 3].copy(), params[:, 4].copy()
    # canonical form: sigma_1 >= sigma_2, theta in [-90, 90) degrees
    swap = s2 > s1
    s1[swap], s2[swap] = s2[swap], s1[swap]
    th = np.where(swap, th + np.pi / 2, th)
    th_deg = (np.rad2deg(th) + 90.0) % 180.0 - 90.0
    amp, bg = params[:, 5], params[:, 6]
    return GaussianFits(y_px=params[:, 0].copy(), x_px=params[:, 1].copy(), sigma1_px=s1,
                        sigma2_px=s2, theta_deg=th_deg, amplitude=amp.copy(),
                        background=bg.copy(), cross_section=2.0 * np.pi * amp * s1 * s2,
                        rms_residual=rms, n_pixels=n_pix, n_iter=n_iter, status=status)


def column_uncertainties(image_shape, yx, amplitude, background, sigma_px, radius_px):
    """Shot-noise uncertainties of round Gaussian columns of known width in a counts image.

    Model of the expected counts: μ(p) = b_i + Σ_j A_j g_j(p) on the pixels of column i's
    window (within ``radius_px`` of it and closer to it than to any other column, as in
    :func:`fit_gaussians`), g_j(p) = exp(-|p - r_j|²/2σ²). For each column, with J the
    derivatives of μ by (A, b, y, x):

    - cross-section noise: the standard deviation of 2πσ²·Â for the least-squares amplitude
      (the estimator :func:`fit_gaussians` uses) under Poisson counts,
      sqrt([(JᵀJ)⁻¹ Jᵀ diag(μ) J (JᵀJ)⁻¹]_AA) · 2πσ²;
    - position bound: the Cramér–Rao bound of the radial position error of any unbiased
      estimator, sqrt(C_yy + C_xx) with C = (Jᵀ diag(1/μ) J)⁻¹ (A, b unknown, σ known).

    Parameters
    ----------
    image_shape : (ny, nx).
    yx : (n, 2) (y, x) px; amplitude, background : (n,) counts (from a fixed-width fit);
    sigma_px : the shared width, px; radius_px : window radius, px.

    Returns
    -------
    ((n,) cross-section noise, counts·px²; (n,) radial position bound, px); NaN where the
    window holds too few pixels.
    """
    from scipy.spatial import cKDTree

    yx = np.asarray(yx, np.float64).reshape(-1, 2)
    n = len(yx)
    if n == 0:
        return np.zeros(0), np.zeros(0)
    A = np.nan_to_num(np.asarray(amplitude, np.float64))
    b = np.nan_to_num(np.asarray(background, np.float64))
    s = float(sigma_px)
    ny, nx = image_shape
    # the model of every column's peak over the image (to 4 σ)
    model = np.zeros((ny, nx))
    R = int(np.ceil(4 * s))
    gy, gx = np.mgrid[-R:R + 1, -R:R + 1]
    cy, cx = np.rint(yx[:, 0]).astype(np.int64), np.rint(yx[:, 1]).astype(np.int64)
    py, px = cy[:, None] + gy.ravel(), cx[:, None] + gx.ravel()
    inside = (py >= 0) & (py < ny) & (px >= 0) & (px < nx)
    val = A[:, None] * np.exp(-((py - yx[:, [0]]) ** 2 + (px - yx[:, [1]]) ** 2) / (2 * s * s))
    np.add.at(model, (py[inside], px[inside]), val[inside])
    oy, ox = _disk_offsets(radius_px)
    py, px = cy[:, None] + oy, cx[:, None] + ox
    ok = (py >= 0) & (py < ny) & (px >= 0) & (px < nx)
    owner = cKDTree(yx).query(np.c_[py.ravel(), px.ravel()])[1].reshape(py.shape)
    ok &= owner == np.arange(n)[:, None]
    dy, dx = py - yx[:, [0]], px - yx[:, [1]]
    g = np.exp(-(dy * dy + dx * dx) / (2 * s * s))
    mu = b[:, None] + model[np.clip(py, 0, ny - 1), np.clip(px, 0, nx - 1)]
    mu = np.maximum(mu, 1e-6 * max(float(np.abs(A).max()), 1e-12))
    J = np.stack([g, np.ones_like(g), A[:, None] * g * dy / s ** 2,
                  A[:, None] * g * dx / s ** 2], axis=-1) * ok[..., None]
    cs_sigma = np.full(n, np.nan)
    crb = np.full(n, np.nan)
    good = ok.sum(axis=1) > 4
    if good.any():
        Jg, mg = J[good], mu[good]
        JtJ = np.einsum("npi,npj->nij", Jg, Jg)
        meat = np.einsum("npi,np,npj->nij", Jg, mg, Jg)
        fisher = np.einsum("npi,np,npj->nij", Jg, 1.0 / mg, Jg)
        with np.errstate(invalid="ignore"):
            inv = np.linalg.pinv(JtJ)
            cov = inv @ meat @ inv
            cs_sigma[good] = np.sqrt(np.clip(cov[:, 0, 0], 0, None)) * 2 * np.pi * s * s
            c = np.linalg.pinv(fisher)
            crb[good] = np.sqrt(np.clip(c[:, 2, 2] + c[:, 3, 3], 0, None))
    return cs_sigma, crb


# ----------------------------------------------------------------- 4. lattice

@dataclass
class LatticeFit:
    """a1_px, a2_px : (2,) basis vectors (dy, dx) px, a Lagrange-reduced pair (|a1| <= |a2|,
    angle between them in [60°, 120°]); origin_px : (2,) (y, x) of lattice point (0, 0), the
    fitted site nearest the centroid of the columns; indices : (n, 2) int64 (i, j) with
    ideal position origin + i a1 + j a2; displacement_px : (n, 2) (dy, dx) measured - ideal;
    on_lattice : (n,) bool, fractional index within ``tolerance`` of an integer (only those
    enter the least squares); rms_px : RMS displacement of those."""

    a1_px: np.ndarray
    a2_px: np.ndarray
    origin_px: np.ndarray
    indices: np.ndarray
    displacement_px: np.ndarray
    on_lattice: np.ndarray
    rms_px: float


def _fold(v):
    """Vectors into the half plane of angles [0, 180) (v and -v are the same lattice step)."""
    ang = np.arctan2(v[:, 0], v[:, 1])
    flip = (ang < 0) | (ang >= np.pi)
    return np.where(flip[:, None], -v, v)


def _reduce(a1, a2):
    """Lagrange–Gauss reduction of a 2D basis."""
    for _ in range(100):
        if a1 @ a1 > a2 @ a2:
            a1, a2 = a2, a1
        m = np.rint((a1 @ a2) / (a1 @ a1))
        if m == 0:
            break
        a2 = a2 - m * a1
    if a1 @ a1 > a2 @ a2:
        a1, a2 = a2, a1
    return a1, a2


def estimate_basis(yx):
    """Two primitive lattice vectors (dy, dx) px from nearest-neighbour vectors.

    a1: the typical shortest neighbour vector (median of the folded vectors within 15 % of
    the median nearest-neighbour distance, in the most common direction); a2: the same among
    the vectors more than 25° away from a1. Needs at least 4 columns on a lattice.
    """
    from scipy.spatial import cKDTree

    yx = np.asarray(yx, np.float64)
    if len(yx) < 4:
        raise ValueError(f"lattice fit needs at least 4 columns, got {len(yx)}")
    k = min(9, len(yx))
    d, j = cKDTree(yx).query(yx, k=k)
    vec = _fold((yx[j[:, 1:]] - yx[:, None, :]).reshape(-1, 2))
    length = np.hypot(vec[:, 0], vec[:, 1])
    dnn = np.median(d[:, 1])

    def typical(sel):
        v, ln = vec[sel], length[sel]
        lmin = np.percentile(ln, 10)
        v = v[ln <= 1.15 * lmin]
        ang = np.rad2deg(np.arctan2(v[:, 0], v[:, 1]))
        hist, edges = np.histogram(ang, bins=36, range=(0, 180))
        b = np.argmax(hist)
        c = 0.5 * (edges[b] + edges[b + 1])
        near = np.abs((ang - c + 90) % 180 - 90) <= 10
        return np.median(_fold_to(v[near], c), axis=0)

    a1 = typical(length <= 1.15 * dnn)
    ang_all = np.arctan2(vec[:, 0], vec[:, 1])
    a1_ang = np.arctan2(a1[0], a1[1])
    dang = np.abs((np.rad2deg(ang_all - a1_ang) + 90) % 180 - 90)
    if not (dang > 25).any():
        raise ValueError("lattice fit: all neighbour vectors are parallel; the columns do not "
                         "form a 2D lattice")
    a2 = typical(dang > 25)
    return _reduce(a1, a2)


def _fold_to(v, centre_deg):
    """Flip each vector to lie within 90° of the direction centre_deg."""
    c = np.deg2rad(centre_deg)
    dirn = np.array([np.sin(c), np.cos(c)])
    return np.where((v @ dirn)[:, None] < 0, -v, v)


def fit_lattice(yx, a1=None, a2=None, tolerance=0.25, n_iter=5) -> LatticeFit:
    """Fit origin + i a1 + j a2 to column positions by least squares.

    Parameters
    ----------
    yx : (n, 2) float (y, x) px.
    a1, a2 : optional starting basis vectors (dy, dx) px; default :func:`estimate_basis`.
    tolerance : a column whose fractional lattice index is farther than this from an
        integer (in either index) is not on the lattice (another sublattice, a defect) and
        is left out of the fit.
    n_iter : index assignment / least-squares rounds.

    Returns
    -------
    LatticeFit.
    """
    yx = np.asarray(yx, np.float64).reshape(-1, 2)
    if a1 is None or a2 is None:
        a1, a2 = estimate_basis(yx)
    a1, a2 = np.asarray(a1, np.float64), np.asarray(a2, np.float64)
    if abs(a1[0] * a2[1] - a1[1] * a2[0]) < 1e-9 * (a1 @ a1 + a2 @ a2):
        raise ValueError(f"lattice fit: basis vectors {a1} and {a2} are parallel")
    centre = yx.mean(axis=0)
    origin = yx[np.argmin(((yx - centre) ** 2).sum(1))].copy()
    for _ in range(int(n_iter)):
        B = np.stack([a1, a2], axis=1)  # columns a1, a2
        frac = np.linalg.solve(B, (yx - origin).T).T
        idx = np.rint(frac)
        on = np.all(np.abs(frac - idx) <= tolerance, axis=1)
        if on.sum() < 3:
            raise ValueError("lattice fit: fewer than 3 columns on the lattice; give a1/a2 "
                             "or a larger tolerance")
        # y = oy + i a1y + j a2y, x = ox + i a1x + j a2x
        M = np.c_[np.ones(on.sum()), idx[on]]
        coef, *_ = np.linalg.lstsq(M, yx[on], rcond=None)
        origin, a1, a2 = coef[0], coef[1], coef[2]
    B = np.stack([a1, a2], axis=1)
    frac = np.linalg.solve(B, (yx - origin).T).T
    idx = np.rint(frac)
    on = np.all(np.abs(frac - idx) <= tolerance, axis=1)
    # report the origin at the fitted site nearest the centroid, indices shifted to match
    i0 = np.rint(np.linalg.solve(B, centre - origin))
    origin = origin + B @ i0
    idx = (idx - i0).astype(np.int64)
    disp = yx - (origin + idx @ B.T)
    rms = float(np.sqrt((disp[on] ** 2).sum(1).mean())) if on.any() else np.nan
    return LatticeFit(a1_px=a1, a2_px=a2, origin_px=origin, indices=idx,
                      displacement_px=disp, on_lattice=on, rms_px=rms)


# ----------------------------------------------------------------- 5. distances

def nearest_neighbour_distances(yx):
    """(n,) float64 distance (px, or the unit of ``yx``) from each column to its nearest other
    column; NaN for a single column."""
    from scipy.spatial import cKDTree

    yx = np.asarray(yx, np.float64).reshape(-1, 2)
    if len(yx) < 2:
        return np.full(len(yx), np.nan)
    d, _ = cKDTree(yx).query(yx, k=2)
    return d[:, 1]


# ----------------------------------------------------------------- all together

@dataclass
class ColumnsResult:
    """Result of :func:`analyze_columns`; every field a numpy array, a number or a string.

    Per column (n,): y_px, x_px (fitted, px), y0_px, x0_px (centre-of-mass refinement),
    sigma1_px, sigma2_px, theta_deg, amplitude, background, cross_section (image units·px²;
    NaN where the fit failed),
    rms_residual, fit_status (0 failed, 1 converged, 2 iteration limit), nn_distance_px,
    lattice_indices (n, 2), displacement_px (n, 2) (dy, dx), on_lattice; and y_A, x_A,
    nn_distance_A, displacement_A when step_A is given (else NaN).
    Lattice: a1_px, a2_px (dy, dx), origin_px (y, x), lattice_rms_px (NaN arrays when
    ``lattice=False`` or the fit failed, with lattice_error saying why).
    shared_sigma_px : one width for all columns (median of sqrt(σ1·σ2) of the converged
    fits), and cross_section_shared (n,): 2π·amplitude·shared_sigma² from a second fit with
    that width fixed (position, amplitude, background free) — the cross-section to count
    atoms with, much less noisy than the free-width one (NaN where that fit failed, all NaN
    when not requested).
    step_A : Å per px (NaN if not given). Positions in Å are step_A × px from pixel (0, 0).
    noise_model : "poisson" (a counts image) or "gaussian". Detection, per column:
    p_value (Poisson significance, :func:`detection_pvalues`; NaN for gaussian noise) and
    detection (1: significant on its own, 2: on the lattice next to accepted columns);
    n_candidates (local maxima examined), false_alarms (expected false columns allowed among
    them). Shot-noise uncertainties (counts images only, else NaN;
    :func:`column_uncertainties`): cross_section_sigma (n,), the noise of
    cross_section_shared, and position_crb_px / position_crb_A (n,), the Cramér–Rao bound of
    the radial position error at this dose.
    """

    y_px: np.ndarray
    x_px: np.ndarray
    y0_px: np.ndarray
    x0_px: np.ndarray
    sigma1_px: np.ndarray
    sigma2_px: np.ndarray
    theta_deg: np.ndarray
    amplitude: np.ndarray
    background: np.ndarray
    cross_section: np.ndarray
    rms_residual: np.ndarray
    fit_status: np.ndarray
    nn_distance_px: np.ndarray
    lattice_indices: np.ndarray
    displacement_px: np.ndarray
    on_lattice: np.ndarray
    a1_px: np.ndarray
    a2_px: np.ndarray
    origin_px: np.ndarray
    lattice_rms_px: float
    lattice_error: str
    shared_sigma_px: float
    cross_section_shared: np.ndarray
    step_A: float
    y_A: np.ndarray
    x_A: np.ndarray
    nn_distance_A: np.ndarray
    displacement_A: np.ndarray
    noise_model: str = "gaussian"
    p_value: np.ndarray | None = None
    detection: np.ndarray | None = None
    n_candidates: int = 0
    false_alarms: float = float("nan")
    cross_section_sigma: np.ndarray | None = None
    position_crb_px: np.ndarray | None = None
    position_crb_A: np.ndarray | None = None


def analyze_columns(image, *, min_distance_px, threshold=None, smooth_px=0.0,
                    window_px=None, shape="elliptical", sigma_px=None, step_A=None,
                    lattice=True, shared_width=True, noise="auto", false_alarms=0.2,
                    p_lattice=0.01, footprint_px=None) -> ColumnsResult:
    """Find, refine and fit the atomic columns of an image; fit the lattice.

    Parameters
    ----------
    image : (ny, nx) float, brighter on the columns (ADF, or iCoM phase).
    min_distance_px : px, minimum separation of candidates (see :func:`find_candidates`).
    threshold, smooth_px : see :func:`find_candidates`.
    window_px : radius in px of the refinement and fit windows; default
        0.5 x the median nearest-neighbour distance of the candidates (at least 1.5 px).
    shape, sigma_px : see :func:`fit_gaussians`.
    step_A : scan step in Å per px, to report Å.
    lattice : fit the lattice (needs >= 4 columns on a 2D lattice).
    shared_width : also fit every column with one shared width (for atom counting).
    noise : "poisson" (an image of electron counts), "gaussian", or "auto" (poisson when
        every value is a non-negative whole number, :func:`is_counts`). With Poisson noise
        a candidate (any local maximum above its surroundings, or above ``threshold`` when
        given) is a column when its counts are significant, p < false_alarms / (number of
        pixels) (:func:`detection_pvalues`; a local maximum is the largest of the disks
        around it, so the disk of every pixel counts as a test: at most about ``false_alarms``
        false columns per image), or, with ``lattice``, when it sits on the lattice of those
        columns next to an accepted one with p < p_lattice. With Gaussian noise the contrast threshold of
        :func:`find_candidates` decides alone.
    footprint_px : radius of the disk whose counts are tested (default
        max(1, min_distance_px / 2)).

    Returns
    -------
    ColumnsResult (columns sorted by y, then x of the candidates). Columns whose Gaussian
    fit failed keep their centre-of-mass position (fit_status 0).
    """
    img = _check_image(image)
    if step_A is not None and not (np.isfinite(step_A) and step_A > 0):
        raise ValueError(f"step_A must be a number > 0 (Å per px) or None, got {step_A!r}")
    if noise not in ("auto", "poisson", "gaussian"):
        raise ValueError(f"noise must be 'auto', 'poisson' or 'gaussian', got {noise!r}")
    poisson = is_counts(img) if noise == "auto" else noise == "poisson"
    if poisson and not (img >= 0).all():
        raise ValueError("noise='poisson' needs an image of counts (>= 0); use noise='gaussian'")
    if poisson:
        cand, _ = find_candidates(img, min_distance_px, 0.0 if threshold is None else threshold,
                                  smooth_px)
        n_cand = len(cand)
        foot = max(1.0, 0.5 * float(min_distance_px)) if footprint_px is None \
            else float(footprint_px)
        pv = detection_pvalues(img, cand, foot)
        # candidates are local maxima, each the largest of the disks around it: every pixel's
        # disk is a test (Bonferroni over the pixels), not only the candidates'
        n_tests = max(img.size, 1)
        strong = pv < float(false_alarms) / n_tests
        grown = _lattice_growth(cand, pv, strong, float(p_lattice))[0] if lattice \
            else np.zeros(n_cand, bool)
        keep = strong | grown
        cand, pv = cand[keep], pv[keep]
        detection = np.where(strong[keep], 1, 2).astype(np.int8)
    else:
        cand, _ = find_candidates(img, min_distance_px, threshold, smooth_px)
        n_cand = len(cand)
        pv = np.full(n_cand, np.nan)
        detection = np.ones(n_cand, np.int8)
    if window_px is None:
        nn = nearest_neighbour_distances(cand)
        window_px = max(1.5, 0.5 * float(np.nanmedian(nn))) if len(cand) > 1 \
            else float(min_distance_px)
    com = refine_com(img, cand, window_px)
    fit = fit_gaussians(img, com, window_px, sigma_px=sigma_px, shape=shape)
    ok = fit.status > 0
    y = np.where(ok, fit.y_px, com[:, 0])
    x = np.where(ok, fit.x_px, com[:, 1])
    yx = np.c_[y, x]
    n = len(y)
    nan2 = np.full(2, np.nan)
    lat = None
    err = ""
    if lattice:
        try:
            lat = fit_lattice(yx)
        except ValueError as e:
            err = str(e)
    else:
        err = "not requested"
    shared, cs_shared = np.nan, np.full(n, np.nan)
    cs_sigma, crb = np.full(n, np.nan), np.full(n, np.nan)
    conv = fit.status == FIT_OK
    if shared_width and conv.any():
        shared = float(np.median(np.sqrt(fit.sigma1_px[conv] * fit.sigma2_px[conv])))
        fixed = fit_gaussians(img, yx, window_px, sigma_px=shared, shape="fixed")
        cs_shared = np.where(fixed.status > 0, fixed.cross_section, np.nan)
        if poisson:
            cs_sigma, crb = column_uncertainties(img.shape, yx, fixed.amplitude,
                                                 fixed.background, shared, window_px)
            cs_sigma[fixed.status == FIT_FAILED] = np.nan
    nn = nearest_neighbour_distances(yx)
    s = np.nan if step_A is None else float(step_A)
    disp = lat.displacement_px if lat else np.full((n, 2), np.nan)
    return ColumnsResult(
        y_px=y, x_px=x, y0_px=com[:, 0].copy(), x0_px=com[:, 1].copy(),
        sigma1_px=fit.sigma1_px, sigma2_px=fit.sigma2_px, theta_deg=fit.theta_deg,
        amplitude=fit.amplitude, background=fit.background,
        cross_section=np.where(ok, fit.cross_section, np.nan),
        rms_residual=fit.rms_residual, fit_status=fit.status, nn_distance_px=nn,
        lattice_indices=lat.indices if lat else np.zeros((n, 2), np.int64),
        displacement_px=disp, on_lattice=lat.on_lattice if lat else np.zeros(n, bool),
        a1_px=lat.a1_px if lat else nan2, a2_px=lat.a2_px if lat else nan2.copy(),
        origin_px=lat.origin_px if lat else nan2.copy(),
        lattice_rms_px=lat.rms_px if lat else np.nan, lattice_error=err,
        shared_sigma_px=shared, cross_section_shared=cs_shared, step_A=s,
        y_A=y * s, x_A=x * s, nn_distance_A=nn * s, displacement_A=disp * s,
        noise_model="poisson" if poisson else "gaussian", p_value=pv, detection=detection,
        n_candidates=int(n_cand), false_alarms=float(false_alarms) if poisson else np.nan,
        cross_section_sigma=cs_sigma, position_crb_px=crb, position_crb_A=crb * s)
