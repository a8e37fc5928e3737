"""Exact sampling of electron events from the model, in numba, with no dense frames.

Randomness is counter-based: frame f draws from splitmix64 streams seeded by (seed, f): one
for the numbers of electrons, one for where they land, one for the hot pixels. So a frame's
events depend only on (seed, f) -- not on threads, chunking or which frames are generated first -- and
any range of frames can be regenerated identically (:meth:`FrameSampler.frames`).

Per frame: Poisson numbers of unscattered, Bragg (per grain) and diffuse electrons and dark
counts; unscattered and Bragg electrons are placed uniformly on a disk's pixel set by
rejection within its bounding box; diffuse electrons and reflections are drawn from Vose
alias tables; hot pixels fire independently; anything off the detector or on a dead pixel
is dropped.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_S11 = np.uint64(11)
_INV53 = 1.0 / 9007199254740992.0


@njit(cache=True, inline="always")
def _mix(z):
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@njit(cache=True, inline="always")
def stream_state(seed, frame, stream):
    """Initial state of the splitmix64 stream ``stream`` of ``frame`` under ``seed``."""
    s = _mix(np.uint64(seed) * _GOLDEN + np.uint64(0x5EED))
    return _mix(s ^ ((np.uint64(frame) * np.uint64(4) + np.uint64(stream)) * _M2))


@njit(cache=True, inline="always")
def uniform(state):
    """(u in [0, 1), new state)."""
    state = state + _GOLDEN
    return float(_mix(state) >> _S11) * _INV53, state


@njit(cache=True)
def poisson(lam, state):
    """(k ~ Poisson(lam), new state). Inversion below 10, PTRS (Hörmann 1993) above."""
    if lam <= 0.0:
        return 0, state
    if lam < 10.0:
        u, state = uniform(state)
        p = math.exp(-lam)
        F = p
        k = 0
        # the tail beyond kmax (< 1e-30) only matters if rounding left F short of u
        kmax = int(lam + 20.0 * math.sqrt(lam) + 30.0)
        while u > F and k < kmax:
            k += 1
            p *= lam / k
            F += p
        return k, state
    slam = math.sqrt(lam)
    loglam = math.log(lam)
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    invalpha = 1.1239 + 1.1328 / (b - 3.4)
    vr = 0.9277 - 3.6224 / (b - 2.0)
    while True:
        u, state = uniform(state)
        U = u - 0.5
        V, state = uniform(state)
        us = 0.5 - abs(U)
        if us <= 0.0:
            continue
        k = math.floor((2.0 * a / us + b) * U + lam + 0.43)
        if us >= 0.07 and V <= vr:
            return int(k), state
        if k < 0.0 or (us < 0.013 and V > us):
            continue
        if (math.log(V) + math.log(invalpha) - math.log(a / (us * us) + b)
                <= -lam + k * loglam - math.lgamma(k + 1.0)):
            return int(k), state


@njit(cache=True, nogil=True)
def _alias_table_kernel(q):
    n = len(q)
    prob = np.ones(n)
    alias = np.arange(n)
    small = np.empty(n, np.int64)
    large = np.empty(n, np.int64)
    ns = 0
    nl = 0
    for i in range(n):
        if q[i] < 1.0:
            small[ns] = i
            ns += 1
        else:
            large[nl] = i
            nl += 1
    while ns > 0 and nl > 0:
        ns -= 1
        s = small[ns]
        nl -= 1
        l = large[nl]
        prob[s] = q[s]
        alias[s] = l
        q[l] = (q[l] + q[s]) - 1.0
        if q[l] < 1.0:
            small[ns] = l
            ns += 1
        else:
            large[nl] = l
            nl += 1
    return prob, alias


def alias_table(p: np.ndarray):
    """Vose alias table for weights ``p`` (non-negative, normalised here).

    Returns (prob float64, alias int64): draw i = floor(u1 n), keep i if u2 < prob[i], else
    take alias[i]. Entries left over by rounding keep prob 1 (Vose's rule)."""
    p = np.asarray(p, dtype=np.float64)
    if len(p) == 0:
        return np.ones(1), np.zeros(1, np.int64)
    return _alias_table_kernel(p * (len(p) / p.sum()))


@njit(cache=True, inline="always")
def _alias_draw(prob, alias, start, n, state):
    u, state = uniform(state)
    v, state = uniform(state)
    i = int(u * n)
    if i >= n:
        i = n - 1
    if v >= prob[start + i]:
        i = alias[start + i]
    return i, state


@njit(cache=True, inline="always")
def _disk_pixel(cx, cy, r, r2, state):
    """A pixel (x, y) uniform over {(x-cx)² + (y-cy)² <= r²} by rejection in its box."""
    x0 = math.floor(cx - r)
    y0 = math.floor(cy - r)
    nxb = int(math.floor(cx + r) - x0) + 1
    nyb = int(math.floor(cy + r) - y0) + 1
    while True:
        u, state = uniform(state)
        v, state = uniform(state)
        x = x0 + int(u * nxb)
        y = y0 + int(v * nyb)
        dx = x - cx
        dy = y - cy
        if dx * dx + dy * dy <= r2:
            return int(x), int(y), state


@njit(cache=True, inline="always")
def _position_of_frame(f, fpp, nx, flyback):
    raster = f // fpp
    row = raster // (nx + flyback)
    col = raster % (nx + flyback)
    if col >= nx:
        col = 0  # flyback: the probe waits at the row's first position
    return row * nx + col


@njit(cache=True, inline="always")
def _draw_counts(p, lam_u, lam_d, lam_b, dark_rate, state, nb):
    """Numbers of electrons per component for one frame (stream 0). nb: out (G,) array."""
    n_u, state = poisson(lam_u[p], state)
    for g in range(lam_b.shape[1]):
        nb[g], state = poisson(lam_b[p, g], state)
    n_d, state = poisson(lam_d[p], state)
    n_k, state = poisson(dark_rate, state)
    return n_u, n_d, n_k, state


@njit(cache=True, parallel=True, nogil=True)
def _upper_bounds(first, count, seed, fpp, nx, flyback, lam_u, lam_d, lam_b, dark_rate, n_hot):
    bound = np.empty(count, np.int64)
    G = lam_b.shape[1]
    for i in prange(count):
        f = first + i
        p = _position_of_frame(f, fpp, nx, flyback)
        st = stream_state(seed, f, 0)
        nb = np.empty(G, np.int64)
        n_u, n_d, n_k, st = _draw_counts(p, lam_u, lam_d, lam_b, dark_rate, st, nb)
        bound[i] = n_u + nb.sum() + n_d + n_k + n_hot
    return bound


@njit(cache=True, parallel=True, nogil=True)
def _fill(first, count, seed, fpp, nx, flyback, h, w, r, r2,
          lam_u, lam_d, lam_b, cx, cy,
          refl_dx, refl_dy, refl_start, refl_prob, refl_alias,
          diff_pix, diff_prob, diff_alias, dead, dark_rate, hot_pix, hot_rate,
          offsets, out, n_out):
    G = lam_b.shape[1]
    n_diff = len(diff_pix)
    npix = h * w
    for i in prange(count):
        f = first + i
        p = _position_of_frame(f, fpp, nx, flyback)
        sa = stream_state(seed, f, 0)
        sb = stream_state(seed, f, 1)
        nb = np.empty(G, np.int64)
        n_u, n_d, n_k, sa = _draw_counts(p, lam_u, lam_d, lam_b, dark_rate, sa, nb)
        o = offsets[i]
        k = 0
        ccx = cx[p]
        ccy = cy[p]
        for _ in range(n_u):
            x, y, sb = _disk_pixel(ccx, ccy, r, r2, sb)
            if 0 <= x < w and 0 <= y < h:
                idx = y * w + x
                if dead[idx] == 0:
                    out[o + k] = idx
                    k += 1
        for g in range(G):
            s0 = refl_start[g]
            ng = refl_start[g + 1] - s0
            for _ in range(nb[g]):
                j, sb = _alias_draw(refl_prob, refl_alias, s0, ng, sb)
                x, y, sb = _disk_pixel(ccx + refl_dx[s0 + j], ccy + refl_dy[s0 + j], r, r2, sb)
                if 0 <= x < w and 0 <= y < h:
                    idx = y * w + x
                    if dead[idx] == 0:
                        out[o + k] = idx
                        k += 1
        for _ in range(n_d):
            j, sb = _alias_draw(diff_prob, diff_alias, 0, n_diff, sb)
            out[o + k] = diff_pix[j]
            k += 1
        for _ in range(n_k):
            u, sb = uniform(sb)
            idx = int(u * npix)
            if idx >= npix:
                idx = npix - 1
            if dead[idx] == 0:
                out[o + k] = idx
                k += 1
        if hot_rate > 0.0:
            sh = stream_state(seed, f, 2)
            for j in range(len(hot_pix)):
                u, sh = uniform(sh)
                if u < hot_rate:
                    out[o + k] = hot_pix[j]
                    k += 1
        n_out[i] = k


@njit(cache=True, nogil=True)
def _compact(offsets, n_out, out):
    """Move each frame's events to follow the previous frame's (in place, dst <= src)."""
    dst = 0
    for i in range(len(n_out)):
        src = offsets[i]
        n = n_out[i]
        if src != dst:
            for j in range(n):
                out[dst + j] = out[src + j]
        dst += n
    return dst


class FrameSampler:
    """Draws the events of any range of frames of one prepared scan.

    Built by :func:`sim_detector.simulate.prepare_scan`. Frame f's events depend only on
    (seed, f), so ``frames(a, n)`` followed by ``frames(a + n, m)`` equals ``frames(a, n + m)``.

    Arrays (P = ny·nx positions, G grains):
      lam_u, lam_d: (P,) mean unscattered electrons and mean diffuse electrons landing on
        live detector pixels, per frame; lam_b: (P, G) mean Bragg electrons per grain;
      cx, cy: (P,) direct-beam disk centre (px, detector coordinates);
      reflections of grain g: refl_dx/dy[refl_start[g]:refl_start[g+1]] (px) with alias
        tables refl_prob/refl_alias (indices local to the grain);
      diff_pix: live detector pixels with diffuse probability > 0 and their alias table;
      dead: (h·w,) uint8, 1 for dead pixels; hot_pix: hot pixel indices.
    """

    def __init__(self, *, seed, scan_shape, frame_shape, frames_per_position, flyback,
                 r_bf_px, lam_u, lam_d, lam_b, cx, cy, refl_dx, refl_dy, refl_start,
                 refl_prob, refl_alias, diff_pix, diff_prob, diff_alias, dead, dark_rate,
                 hot_pix, hot_rate):
        self.seed = int(seed) & 0xFFFFFFFFFFFFFFFF
        self.scan_shape = tuple(int(v) for v in scan_shape)
        self.frame_shape = tuple(int(v) for v in frame_shape)
        self.frames_per_position = int(frames_per_position)
        self.flyback = int(flyback)
        self.r = float(r_bf_px)
        f64 = lambda a: np.ascontiguousarray(a, dtype=np.float64)
        i64 = lambda a: np.ascontiguousarray(a, dtype=np.int64)
        self.lam_u, self.lam_d, self.cx, self.cy = f64(lam_u), f64(lam_d), f64(cx), f64(cy)
        self.lam_b = f64(lam_b).reshape(len(self.lam_u), -1)
        self.refl_dx, self.refl_dy = f64(refl_dx), f64(refl_dy)
        self.refl_start, self.refl_alias = i64(refl_start), i64(refl_alias)
        self.refl_prob = f64(refl_prob)
        self.diff_pix = np.ascontiguousarray(diff_pix, dtype=np.uint32)
        self.diff_prob, self.diff_alias = f64(diff_prob), i64(diff_alias)
        self.dead = np.ascontiguousarray(dead, dtype=np.uint8)
        self.dark_rate = float(dark_rate)
        self.hot_pix = np.ascontiguousarray(hot_pix, dtype=np.uint32)
        self.hot_rate = float(hot_rate) if len(self.hot_pix) else 0.0
        if len(self.diff_pix) == 0:
            self.lam_d = np.zeros_like(self.lam_d)

    @property
    def n_frames(self) -> int:
        ny, nx = self.scan_shape
        return ny * (nx + self.flyback) * self.frames_per_position

    def frames(self, first: int = 0, count: int | None = None):
        """Events of frames first .. first+count-1: (counts (count,) uint32, indices uint32)."""
        if count is None:
            count = self.n_frames - first
        if first < 0 or count < 0 or first + count > self.n_frames:
            raise ValueError(f"frames {first}..{first + count - 1} outside the scan's "
                             f"{self.n_frames} frames")
        nx = self.scan_shape[1]
        n_hot = len(self.hot_pix) if self.hot_rate > 0 else 0
        bound = _upper_bounds(first, count, self.seed, self.frames_per_position, nx,
                              self.flyback, self.lam_u, self.lam_d, self.lam_b,
                              self.dark_rate, n_hot)
        offsets = np.zeros(count + 1, np.int64)
        np.cumsum(bound, out=offsets[1:])
        out = np.empty(int(offsets[-1]), np.uint32)
        n_out = np.empty(count, np.int64)
        h, w = self.frame_shape
        _fill(first, count, self.seed, self.frames_per_position, nx, self.flyback, h, w,
              self.r, self.r * self.r, self.lam_u, self.lam_d, self.lam_b, self.cx, self.cy,
              self.refl_dx, self.refl_dy, self.refl_start, self.refl_prob, self.refl_alias,
              self.diff_pix, self.diff_prob, self.diff_alias, self.dead, self.dark_rate,
              self.hot_pix, self.hot_rate, offsets, out, n_out)
        total = _compact(offsets, n_out, out)
        indices = out[:total] if total > 0.9 * len(out) else out[:total].copy()
        return n_out.astype(np.uint32), indices
