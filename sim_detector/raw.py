"""Raw frames of a monolithic direct-electron detector (the NCEM 4D Camera), from the
emulator's electrons.

Every electron the model samples (``FrameSampler``) lands at a uniform sub-pixel position in
its pixel and deposits a Landau-distributed signal spread over its neighbours by a Gaussian
charge cloud (integrated over each pixel's area); every pixel adds its own dark offset and
Gaussian read noise, each half row a common-mode offset per frame, every pixel its gain;
occasional X-ray hits deposit thousands of ADU on one or two pixels; the result is rounded
and clipped to the 12-bit range. The numbers, and which of them are measured values and
which are assumptions, are in docs/EMULATOR.md ("Raw frames").

Randomness is counter-based like the events': frame f's noise, row offsets, X-rays and
electron deposits depend only on (seed, f), so any range of frames is regenerated
identically, in any order, on any number of threads.

>>> from sim_detector.raw import RawDetector, RawFrames
>>> raw = RawFrames(RawDetector(), (64, 64), seed=1)
>>> counts = np.array([1], np.uint32); indices = np.array([32 * 64 + 32], np.uint32)
>>> frames = raw.frames(0, counts, indices)
>>> frames.shape, frames.dtype.name, int(frames[0, 32, 32]) > 50   # an electron's peak pixel
((1, 64, 64), 'uint16', True)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import numba
from numba import njit, prange

from sim_detector.sampling import _GOLDEN, _mix, stream_state, uniform

RAW_SALT = 0x52415746524D  # "RAWFRM": raw-frame streams never coincide with the event streams
_TABLE_BITS = 12  # 4097 float64 (32 kB): stays in L1; the two end cells are exact tails


@dataclass
class RawDetector:
    """Raw-signal model; ADU are the camera's digital units after its own pedestal subtraction.

    dark_mean_adu, dark_spread_adu: per-pixel dark offsets ~ N(mean, spread), fixed per seed;
    read_noise_adu: Gaussian noise per pixel and frame; row_noise_adu: common-mode offset of
    each half row (left, right) per frame; gain_spread: relative σ of the per-pixel gain;
    adu_per_electron: most probable signal of one electron, landau_width_adu the width of the
    Landau (Moyal) distribution around it; cloud_sigma_px: Gaussian charge-cloud σ;
    xray_rate: mean X-ray hits per frame, xray_adu: their (min, max) signal, uniform;
    max_adu: the ADC's top value (12 bit).
    """

    dark_mean_adu: float = 19.5
    dark_spread_adu: float = 1.0
    read_noise_adu: float = 1.6
    row_noise_adu: float = 0.5
    gain_spread: float = 0.05
    adu_per_electron: float = 100.0
    landau_width_adu: float = 15.0
    cloud_sigma_px: float = 0.6
    xray_rate: float = 0.05
    xray_adu: tuple[float, float] = (1500.0, 4000.0)
    max_adu: int = 4095

    def check(self) -> None:
        problems = [name for name, ok in (
            ("dark_mean_adu >= 0", self.dark_mean_adu >= 0), ("dark_spread_adu >= 0", self.dark_spread_adu >= 0),
            ("read_noise_adu >= 0", self.read_noise_adu >= 0), ("row_noise_adu >= 0", self.row_noise_adu >= 0),
            ("0 <= gain_spread < 0.5", 0 <= self.gain_spread < 0.5),
            ("adu_per_electron > 0", self.adu_per_electron > 0),
            ("landau_width_adu >= 0", self.landau_width_adu >= 0),
            ("cloud_sigma_px > 0", self.cloud_sigma_px > 0), ("xray_rate >= 0", self.xray_rate >= 0),
            ("0 < xray_adu[0] <= xray_adu[1]", 0 < self.xray_adu[0] <= self.xray_adu[1]),
            ("max_adu in 1..65535", 1 <= self.max_adu <= 65535)) if not ok]
        if problems:
            raise ValueError("raw detector: need " + ", ".join(problems))

    def to_metadata(self) -> dict:
        d = asdict(self)
        d["xray_adu"] = list(self.xray_adu)
        return d


# ---------------------------------------------------------------- Gaussian variates, fast

def _inverse_normal_table(bits: int = _TABLE_BITS) -> np.ndarray:
    """Φ⁻¹(i / 2^bits) for i = 0 .. 2^bits (the ends ±inf), float64: linear interpolation
    between its knots is the inverse CDF to better than 1e-3 σ inside ±3.3σ."""
    from scipy.special import ndtri
    return ndtri(np.arange(2 ** bits + 1) / 2 ** bits)


@njit(cache=True, inline="always")
def _ndtri_tail(p):
    """Φ⁻¹(p) for p < 0.0003 (Acklam's rational approximation, relative error < 1.2e-9)."""
    q = math.sqrt(-2.0 * math.log(p))
    return ((((((-7.784894002430293e-03 * q - 3.223964580411365e-01) * q - 2.400758277161838e+00) * q
               - 2.549732539343734e+00) * q + 4.374664141464968e+00) * q + 2.938163982698783e+00)
            / ((((7.784695709041462e-03 * q + 3.224671290700398e-01) * q + 2.445134137142996e+00) * q
                + 3.754408661907416e+00) * q + 1.0))


_MASK32 = np.uint64(0xFFFFFFFF)
_S32 = np.uint64(32)
_INV32 = 1.0 / 4294967296.0


@njit(cache=True, inline="always")
def _normal_of(u32, table, slope):
    """Φ⁻¹((u32 + ½) / 2³²): the table's linear interpolation in its bulk, the exact tail in
    its two end cells (so the tails stay Gaussian out to 6σ)."""
    cells = table.shape[0] - 1
    shift = 32 - _TABLE_BITS
    i = np.int64(u32 >> np.uint64(shift))
    if i == 0 or i == cells - 1:
        u = (np.float64(u32) + 0.5) * _INV32
        return _ndtri_tail(u) if i == 0 else -_ndtri_tail(1.0 - u)
    frac = np.float64(u32 & np.uint64((1 << shift) - 1)) * (1.0 / (1 << shift))
    return table[i] + slope[i] * frac


@njit(cache=True, inline="always")
def _normal2(state, table, slope):
    """(z1, z2 ~ N(0, 1) independent, new state): two variates from one 64-bit draw."""
    state = state + _GOLDEN
    x = _mix(state)
    return _normal_of(x & _MASK32, table, slope), _normal_of(x >> _S32, table, slope), state


@njit(cache=True, inline="always")
def _normal(state, table, slope):
    """(z ~ N(0, 1), new state)."""
    z, _, state = _normal2(state, table, slope)
    return z, state


@njit(cache=True, inline="always")
def _cdf(x):
    return 0.5 * (1.0 + math.erf(x * 0.7071067811865476))


# ---------------------------------------------------------------- kernels

@njit(cache=True, inline="always")
def _electron(seed, frame, rank, mpv, width, table, slope):
    """(dy, dx in [0, 1), signal ADU) of electron ``rank`` of ``frame``: its sub-pixel
    position within its pixel and its deposited signal (Moyal: mpv + width·(-ln z²))."""
    state = stream_state(seed, frame * 65536 + rank, 0)
    dy, state = uniform(state)
    dx, state = uniform(state)
    z, state = _normal(state, table, slope)
    z2 = max(z * z, 1e-12)
    signal = min(max(mpv - width * math.log(z2), 0.0), 20.0 * mpv)
    return dy, dx, signal


@njit(cache=True, nogil=True, parallel=True)
def raw_frames_kernel(first, count, seed, offsets, indices, dark, gain, read_noise, row_noise,
                      mpv, width, cloud_sigma, xray_rate, xray_lo, xray_hi, max_adu, table, slope,
                      out, xray_count, xray_pix, n_parts):
    """Raw frames first .. first+count-1 into ``out`` (count, h, w) uint16, in ``n_parts``
    parallel runs of consecutive frames.

    offsets/indices: the frames' electrons (CSR, flat pixel y·w + x); dark, gain (h, w)
    float32. xray_count (count,) and xray_pix (count, 4) receive each frame's X-ray hit
    pixels (at most 4 recorded; -1 unused)."""
    n_out, h, w = out.shape
    half = w // 2
    for part in prange(n_parts):
        img = np.empty((h, w), np.float32)  # one per run: no page faults per frame
        fy = np.empty(5)
        fx = np.empty(5)
        for i in range(part * count // n_parts, (part + 1) * count // n_parts):
            f = first + i
            state = stream_state(seed, f, 1)
            for r in range(h):
                off_l, off_r, state = _normal2(state, table, slope)
                off_l *= row_noise
                off_r *= row_noise
                for c in range(0, w - 1, 2):
                    z1, z2, state = _normal2(state, table, slope)
                    off = off_l if c < half else off_r
                    img[r, c] = dark[r, c] + read_noise * z1 + off
                    img[r, c + 1] = dark[r, c + 1] + read_noise * z2 + (off_l if c + 1 < half else off_r)
                if w & 1:
                    z1, z2, state = _normal2(state, table, slope)
                    img[r, w - 1] = dark[r, w - 1] + read_noise * z1 + off_r
            for k in range(offsets[i + 1] - offsets[i]):
                p = indices[offsets[i] + k]
                py, px = p // w, p % w
                dy, dx, signal = _electron(seed, f, k, mpv, width, table, slope)
                y, x = py + dy, px + dx  # pixel k covers [k, k+1)
                for j in range(5):
                    fy[j] = _cdf((py - 1 + j - y) / cloud_sigma) - _cdf((py - 2 + j - y) / cloud_sigma)
                    fx[j] = _cdf((px - 1 + j - x) / cloud_sigma) - _cdf((px - 2 + j - x) / cloud_sigma)
                for yy in range(max(py - 2, 0), min(py + 3, h)):
                    for xx in range(max(px - 2, 0), min(px + 3, w)):
                        img[yy, xx] += signal * fy[yy - py + 2] * fx[xx - px + 2] * gain[yy, xx]
            st = stream_state(seed, f, 2)
            u, st = uniform(st)
            n_x = 0  # Poisson(xray_rate) by inversion (the rate is small)
            pk = math.exp(-xray_rate)
            cdf = pk
            while u > cdf and n_x < 16:
                n_x += 1
                pk *= xray_rate / n_x
                cdf += pk
            xray_count[i] = n_x
            for j in range(n_x):
                a, st = uniform(st)
                b, st = uniform(st)
                pix = min(int(a * h * w), h * w - 1)
                y0, x0 = pix // w, pix % w
                s, st = uniform(st)
                img[y0, x0] += xray_lo + (xray_hi - xray_lo) * s
                if j < 4:
                    xray_pix[i, j] = pix
                if b < 0.5 and x0 + 1 < w:  # half of them spill into the next pixel
                    s, st = uniform(st)
                    img[y0, x0 + 1] += 0.3 * (xray_lo + (xray_hi - xray_lo) * s)
            for r in range(h):
                for c in range(w):
                    v = min(max(img[r, c] + np.float32(0.5), np.float32(0.0)), np.float32(max_adu))
                    out[i, r, c] = np.uint16(v)  # truncation of v >= 0: rounding to nearest


@njit(cache=True, nogil=True)
def electron_truth_kernel(first, count, seed, offsets, indices, w, mpv, width, table, slope, out):
    """True (y, x, signal) of every electron of frames first .. first+count-1, pixel centres
    at integers (the electron at y lies in pixel round(y)); out (n_electrons, 3) float64."""
    for i in range(count):
        for k in range(offsets[i + 1] - offsets[i]):
            e = offsets[i] + k
            p = indices[e]
            dy, dx, signal = _electron(seed, first + i, k, mpv, width, table, slope)
            out[e, 0] = p // w + dy - 0.5
            out[e, 1] = p % w + dx - 0.5
            out[e, 2] = signal


class RawFrames:
    """Raw frames of one detector and seed: the fixed dark and gain maps, and any frame.

    detector: :class:`RawDetector`; frame_shape (h, w); seed: the same seed gives the same
    maps, noise, X-rays and deposits.
    """

    def __init__(self, detector: RawDetector, frame_shape, seed: int = 0):
        detector.check()
        self.detector = detector
        self.frame_shape = (int(frame_shape[0]), int(frame_shape[1]))
        self.seed = (int(seed) ^ RAW_SALT) & 0xFFFFFFFFFFFFFFFF
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x4441524B])  # "DARK"
        h, w = self.frame_shape
        self.dark = np.clip(rng.normal(detector.dark_mean_adu, detector.dark_spread_adu, (h, w)),
                            0, None).astype(np.float32)
        self.gain = np.clip(rng.normal(1.0, detector.gain_spread, (h, w)), 0.5, 1.5).astype(np.float32)
        self._table = _inverse_normal_table()
        self._slope = np.diff(self._table)
        self._table[0], self._table[-1] = -np.inf, np.inf  # (the tails never read them)
        self._slope[[0, -1]] = 0.0

    def frames(self, first: int, counts: np.ndarray, indices: np.ndarray, out=None,
               xrays: bool = False):
        """Raw frames (len(counts), h, w) uint16 of frames first, first+1, … whose electrons
        are ``counts`` per frame and flat pixel ``indices``; with ``xrays`` also
        (per-frame hit counts, (n, 4) hit pixels, -1 unused)."""
        counts = np.asarray(counts, np.int64)
        n = len(counts)
        h, w = self.frame_shape
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        out = np.empty((n, h, w), np.uint16) if out is None else out
        xc = np.zeros(n, np.int64)
        xp = np.full((n, 4), -1, np.int64)
        d = self.detector
        raw_frames_kernel(int(first), n, self.seed, offsets, np.asarray(indices, np.int64),
                          self.dark, self.gain, d.read_noise_adu, d.row_noise_adu,
                          d.adu_per_electron, d.landau_width_adu, d.cloud_sigma_px, d.xray_rate,
                          float(d.xray_adu[0]), float(d.xray_adu[1]), float(d.max_adu),
                          self._table, self._slope, out, xc, xp,
                          max(1, min(n, numba.get_num_threads())))
        return (out, xc, xp) if xrays else out

    def electrons(self, first: int, counts: np.ndarray, indices: np.ndarray) -> np.ndarray:
        """(n_electrons, 3) float64: true y, x (px, pixel centres at integers) and signal
        (ADU, before the gain) of every electron of frames first, first+1, …"""
        counts = np.asarray(counts, np.int64)
        offsets = np.zeros(len(counts) + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        out = np.empty((int(offsets[-1]), 3), np.float64)
        d = self.detector
        electron_truth_kernel(int(first), len(counts), self.seed, offsets,
                              np.asarray(indices, np.int64), self.frame_shape[1],
                              d.adu_per_electron, d.landau_width_adu, self._table, self._slope, out)
        return out

    def write_truth(self, g, counts: np.ndarray, indices: np.ndarray, xray_count: np.ndarray,
                    xray_pixels: np.ndarray) -> None:
        """The raw ground truth of a scan into h5py group ``g`` (docs/EMULATOR.md, "Raw
        frames"): the model, the dark and gain maps, every electron's true position and
        signal (frames in raster order, CSR by ``electron_offsets``) and the X-ray hits."""
        import json

        offsets = np.zeros(len(counts) + 1, np.int64)
        np.cumsum(np.asarray(counts, np.int64), out=offsets[1:])
        g.attrs["model_json"] = json.dumps(self.detector.to_metadata())
        g.attrs["units"] = ("electrons: y, x in px (pixel centres at integers), signal in ADU "
                            "before the pixel gain; dark in ADU; xray_pixels flat y*w + x, -1 unused")
        g.create_dataset("dark", data=self.dark, compression="gzip")
        g.create_dataset("gain", data=self.gain, compression="gzip")
        g.create_dataset("electrons", data=self.electrons(0, counts, indices), compression="gzip")
        g.create_dataset("electron_offsets", data=offsets, compression="gzip")
        g.create_dataset("xray_count", data=np.asarray(xray_count, np.int64), compression="gzip")
        g.create_dataset("xray_pixels", data=np.asarray(xray_pixels, np.int64), compression="gzip")


def score_events(electrons_yx: np.ndarray, events: np.ndarray, width: int, xray_pixels=(),
                 radius: int = 1) -> dict:
    """Compare one frame's counted events with its true electrons.

    electrons_yx: (n, 2) true positions (px, pixel centres at integers); events: flat pixel
    indices y·w + x; xray_pixels: flat pixels of the frame's X-ray hits. An event and an
    electron match when the event's pixel is within ``radius`` px (in y and in x) of the
    pixel the electron landed in; matching is one to one, nearest pairs first. Returns
    counts: electrons, events, found (electrons matched), false (events matched to no
    electron), xray_events (unmatched events within ``radius`` of an X-ray hit pixel).
    """
    ev = np.asarray(events, np.int64)
    ey, ex = ev // width, ev % width
    ty = np.floor(np.asarray(electrons_yx)[:, 0] + 0.5).astype(np.int64)
    tx = np.floor(np.asarray(electrons_yx)[:, 1] + 0.5).astype(np.int64)
    dy = np.abs(ty[:, None] - ey[None, :])
    dx = np.abs(tx[:, None] - ex[None, :])
    close = np.argwhere((dy <= radius) & (dx <= radius))
    used_t, used_e = set(), set()
    if len(close):
        d2 = (np.asarray(electrons_yx)[close[:, 0], 0] - ey[close[:, 1]]) ** 2 + \
             (np.asarray(electrons_yx)[close[:, 0], 1] - ex[close[:, 1]]) ** 2
        for k in np.argsort(d2, kind="stable"):
            t, e = close[k]
            if t not in used_t and e not in used_e:
                used_t.add(t)
                used_e.add(e)
    free = np.array([e for e in range(len(ev)) if e not in used_e], np.int64)
    xray_events = 0
    for p in xray_pixels:
        if p >= 0 and len(free):
            xray_events += int(np.sum((np.abs(ey[free] - p // width) <= radius)
                                      & (np.abs(ex[free] - p % width) <= radius)))
    return {"electrons": len(ty), "events": len(ev), "found": len(used_t),
            "false": len(ev) - len(used_e), "xray_events": xray_events}
