"""Electron counting of raw detector frames: dark, gain, thresholds, one event per local maximum.

The first operator of a scan whose detector sends raw frames (the NCEM 4D Camera): the
receiver gives it each ``dense`` message's frames (this source's sector rows) and it returns
the electron events every other operator consumes. The algorithm is stempy's
``electron_count`` (3.6.0), reproduced event for event (docs/COUNTING.md):

1. ``v = raw - dark`` per pixel (``semantics`` says how a fractional dark is rounded), or with
   a gain map ``v = (raw - dark) / gain`` in float32;
2. optionally stempy's row-dark correction (each half row scaled by the background mean over
   the half row's mean or median);
3. pixels with ``v <= background`` or ``v >= xray`` are set to 0 (by default no neighbour of
   an X-ray pixel becomes an event either: ``xray_neighbours``);
4. an event at every pixel strictly greater than each of its 8 neighbours (neighbours outside
   the frame, or outside this source's sector rows, are ignored); by default a plateau of
   equal maxima, which stempy drops, gives one event at its first pixel (``ties``).

Examples
--------
>>> import numpy as np
>>> from operators.electron_counting import ElectronCounter
>>> counter = ElectronCounter((8, 8), dark=np.zeros((8, 8)), background_threshold=5,
...                           xray_threshold=1000)
>>> frames = np.zeros((1, 8, 8), np.uint16); frames[0, 3, 4] = 50; frames[0, 3, 5] = 20
>>> counts, indices = counter.count(frames)
>>> counts.tolist(), indices.tolist()         # one electron, at pixel (3, 4) = 3*8 + 4
([1], [28])

The integer path (no gain, no row dark) never builds a thresholded frame: each row is
thresholded into a three-row ring buffer (one pass over the raw values, branch-free, in
cache) and tested for maxima one row behind; a batch of frames may be split over threads
(the kernels release the GIL).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from numba import njit

from operators.base import Operator, State
from operators.chunk import Chunk
from operators.kernels import NJIT, shape2

SEMANTICS = ("threaded", "classic")
ROW_DARK = ("none", "mean", "median")
TIES = ("first", "none")  # a plateau of equal maxima: one event at its first pixel | none (stempy)
SECTOR_EDGES = ("top-row-dropped", "kept")
XRAY_NEIGHBOURS = ("dropped", "kept")  # no event next to an X-ray pixel | as stempy
_RING = {1: np.int32, 2: np.int32, 4: np.int64}  # wider than the raw values: room for a mark
RAW_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.uint32))


# ---------------------------------------------------------------- kernels

@njit(inline="always")
def _threshold_row(raw, dark, lo, hi, xray_mark, out):
    """out[1:w+1] = raw - dark where lo <= raw - dark <= hi, ``xray_mark`` above hi, else 0
    (out[0], out[w+1] stay 0); returns (pixels above hi, OR of the row: 0 when nothing in it
    needs a look)."""
    w = raw.shape[0]
    above = 0
    any_kept = 0
    for c in range(w):
        t = np.int64(raw[c]) - np.int64(dark[c])
        x = t > hi
        above += x
        if t < lo:
            t = 0
        if x:
            t = xray_mark
        out[c + 1] = t
        any_kept |= t
    return above, any_kept


@njit(**NJIT)
def count_integer_kernel(frames, dark, lo, hi, row0, strict, skip_top, mark, ring, out, counts,
                         stats, start, e):
    """Count frames ``start..`` of ``frames`` (n, rows, w) into ``out`` from position ``e``.

    dark: (rows, w) integer dark, already rounded (``dark_for``); a pixel is kept when
    lo <= raw - dark <= hi. An event is a kept pixel greater than its neighbours: all of them
    when ``strict`` (stempy), else greater than those before it in raster order and not less
    than those after (a plateau of equal maxima gives one event, at its first pixel);
    ``skip_top``: no events in the first row (a sector border, see ``ElectronCounter``);
    ``mark``: the value pixels above hi get: 0 (stempy), or one above any kept value, so
    that no neighbour of an X-ray pixel is an event. ring: (3, w + 2) scratch of an integer
    type that holds ``mark``.
    Events are flat indices (row0 + r)·w + c, ascending per frame;
    ``counts[i]`` the events of frame i; ``stats[0]`` += pixels above hi (X-ray pixels).
    Returns (next frame, events written): stops before a frame that would overflow ``out``.
    """
    n, rows, w = frames.shape
    mark = ring.dtype.type(mark)
    kept = np.zeros(3, np.int64)
    for i in range(start, n):
        f = frames[i]
        first = e
        ring[:] = 0
        kept[:] = 0
        for r in range(rows + 1):
            slot = r % 3
            if r < rows:
                above, k = _threshold_row(f[r], dark[r], lo, hi, mark, ring[slot])
                stats[0] += above
                kept[slot] = k
            else:
                ring[slot, :] = 0
                kept[slot] = 0
            m = r - 1  # the row whose maxima can now be decided
            if m < 0 or kept[m % 3] == 0:
                continue
            cur = ring[m % 3]
            below = ring[r % 3]
            above_row = ring[(m - 1) % 3]
            top = m == 0
            if top and skip_top:
                continue
            tie = 1 if strict else 0  # a later neighbour q beats v when q > v - tie
            for c in range(1, w + 1):
                v = np.int64(cur[c])
                if v == 0 or cur[c] == mark:
                    continue
                vt = v - tie
                if cur[c - 1] >= v or cur[c + 1] > vt:
                    continue
                if below[c - 1] > vt or below[c] > vt or below[c + 1] > vt:
                    continue
                if not top and (above_row[c - 1] >= v or above_row[c] >= v or above_row[c + 1] >= v):
                    continue
                if e >= out.shape[0]:
                    return i, first
                out[e] = (row0 + m) * w + (c - 1)
                e += 1
        counts[i] = e - first
    return n, e


@njit(inline="always")
def _to_u16(x):
    """C++ float -> uint16_t as stempy 3.6.0's wheel does it: truncate, keep the low 16 bits."""
    return np.float32(np.int64(x) & 0xFFFF)


@njit(**NJIT)
def _row_statistic(row, median, scratch):
    """stempy's half-row statistic of raw values: float32 mean, or the median."""
    n = row.shape[0]
    if not median:
        s = np.int64(0)
        for c in range(n):
            s += np.int64(row[c])
        return np.float32(s) / np.float32(n)
    for c in range(n):
        scratch[c] = np.float32(row[c])
    v = np.sort(scratch[:n])
    h = n // 2
    if n & 1:
        return v[h]
    return (v[h - 1] + v[h]) / np.float32(2.0)


@njit(**NJIT)
def count_float_kernel(frames, dark, gain_inv, use_gain, row_dark, optimized_mean, bg, xray,
                       row0, strict, skip_top, xray_halo, out, counts, stats, start, e):
    """The general path, float32 as stempy: ``(raw - dark) * gain_inv`` when ``use_gain``,
    else ``uint16(raw - dark)``; row_dark 0 (none), 1 (mean) or 2 (median) scales each half
    row by optimized_mean / statistic of its raw values; then values <= bg or >= xray are 0
    and maxima (``strict``, ``skip_top``, ``xray_halo`` as in :func:`count_integer_kernel`)
    are events.
    Arguments and return as :func:`count_integer_kernel`; dark and gain_inv are float32
    (rows, w)."""
    n, rows, w = frames.shape
    buf = np.zeros((rows + 2, w + 2), np.float32)  # the thresholded frame with a zero border
    scratch = np.empty(w, np.float32)
    halves = (0, w // 2, w)
    om = np.float32(optimized_mean)
    for i in range(start, n):
        f = frames[i]
        first = e
        for r in range(rows):
            for hh in range(2 if row_dark else 1):
                a, b = (halves[hh], halves[hh + 1]) if row_dark else (0, w)
                scale = np.float32(1.0)
                if row_dark:
                    stat = _row_statistic(f[r, a:b], row_dark == 2, scratch)
                    scale = om / stat if stat != 0 else np.float32(0.0)  # a dead half row
                for c in range(a, b):
                    v = np.float32(f[r, c]) - dark[r, c]
                    if use_gain:
                        if row_dark:
                            v = v * scale
                        v = v * gain_inv[r, c]
                    elif v < 0:  # below the dark: stempy's uint16 wraps it above any x-ray threshold
                        v = np.float32(0.0)
                    else:
                        v = _to_u16(v)
                        if row_dark:
                            v = _to_u16(v * scale)
                    if v >= xray:
                        stats[0] += 1
                        v = np.float32(np.inf) if xray_halo else np.float32(0.0)
                    elif v <= bg:
                        v = np.float32(0.0)
                    buf[r + 1, c + 1] = v
        for r in range(2 if skip_top else 1, rows + 1):
            for c in range(1, w + 1):
                v = buf[r, c]
                if v == 0 or v == np.inf:
                    continue
                if buf[r - 1, c - 1] >= v or buf[r - 1, c] >= v or buf[r - 1, c + 1] >= v or buf[r, c - 1] >= v:
                    continue
                if strict:
                    if buf[r, c + 1] >= v or buf[r + 1, c - 1] >= v or buf[r + 1, c] >= v or buf[r + 1, c + 1] >= v:
                        continue
                elif buf[r, c + 1] > v or buf[r + 1, c - 1] > v or buf[r + 1, c] > v or buf[r + 1, c + 1] > v:
                    continue
                if e >= out.shape[0]:
                    return i, first
                out[e] = (row0 + r - 1) * w + (c - 1)
                e += 1
        counts[i] = e - first
    return n, e


# ---------------------------------------------------------------- thresholds

def choose_samples(n_frames: int, n_samples: int, seed: int) -> np.ndarray:
    """Sorted frame numbers to take threshold samples from: ``n_samples`` distinct frames of
    ``n_frames`` (all of them when there are fewer), drawn by numpy's PCG64 from ``seed``
    (stempy draws with replacement from an unseeded std::random_device)."""
    k = min(int(n_samples), int(n_frames))
    return np.sort(np.random.default_rng(int(seed)).choice(int(n_frames), k, replace=False))


def sample_values(frame: np.ndarray, dark, gain_inv=None) -> np.ndarray:
    """Threshold samples of one raw frame, as stempy's calculate_thresholds takes them:
    ``raw - trunc(dark)`` (integers), or ``trunc((raw - dark) * gain_inv)`` in float32 with a
    gain. Unlike stempy's uint16 samples, values below the dark stay negative."""
    raw = np.asarray(frame)
    if gain_inv is None:
        return raw.astype(np.int64) - np.trunc(np.asarray(dark, np.float32)).astype(np.int64)
    v = (raw.astype(np.float32) - np.asarray(dark, np.float32)) * np.asarray(gain_inv, np.float32)
    return np.trunc(v).astype(np.int64)


class SampleHistogram:
    """Integer threshold samples accumulated as a histogram (exact sum, any number of frames,
    memory independent of the sample count: stempy holds every sample, 0.8 GB for NCEM's 1200)."""

    def __init__(self):
        self.lo = 0
        self.hist = np.zeros(0, np.int64)
        self.n = 0
        self.total = 0

    def add(self, values: np.ndarray) -> None:
        v = np.asarray(values, np.int64).ravel()
        if not v.size:
            return
        vmin, vmax = int(v.min()), int(v.max())
        if self.n == 0:
            self.lo, self.hist = vmin, np.zeros(vmax - vmin + 1, np.int64)
        lo, hi = min(self.lo, vmin), max(self.lo + len(self.hist) - 1, vmax)
        if (lo, hi) != (self.lo, self.lo + len(self.hist) - 1):
            grown = np.zeros(hi - lo + 1, np.int64)
            grown[self.lo - lo:self.lo - lo + len(self.hist)] = self.hist
            self.lo, self.hist = lo, grown
        self.hist += np.bincount(v - self.lo, minlength=len(self.hist))
        self.n += v.size
        self.total += int(v.sum())


def _c_int(x: float) -> int:
    """static_cast<int>(double) on x86-64: out of range gives INT_MIN."""
    return int(x) if -2.0 ** 31 <= x < 2.0 ** 31 else -2 ** 31


def _fit_gaussian(bins: np.ndarray, hist: np.ndarray, start) -> tuple[float, float, float]:
    """A·exp(-(x-mu)²/(2s²)) fitted to (bins, hist) by MINPACK's Levenberg-Marquardt (lmder,
    the algorithm of the Eigen port stempy uses), from ``start`` = (A, mu, s)."""
    from scipy.optimize import least_squares

    def residual(p):
        return p[0] * np.exp(-((bins - p[1]) ** 2) / (2 * p[2] ** 2)) - hist

    def jacobian(p):
        t = bins - p[1]
        g = np.exp(-(t ** 2) / (2 * p[2] ** 2))
        d_mu = p[0] * t * g / p[2] ** 2
        return np.stack([g, d_mu, t * d_mu / p[2]], 1)

    fit = least_squares(residual, np.asarray(start, float), jac=jacobian, method="lm")
    if not fit.success:
        raise ValueError(f"the Gaussian fit of the background histogram did not converge: {fit.message}")
    return float(fit.x[0]), float(fit.x[1]), abs(float(fit.x[2]))


def thresholds_from_histogram(h: SampleHistogram, background_n_sigma: float,
                              xray_n_sigma: float) -> dict:
    """stempy's calculate_thresholds on accumulated samples.

    xray = mean + xray_n_sigma · std of all samples (electrons included); background =
    mu + background_n_sigma · |s| of a Gaussian fitted to the histogram of the samples,
    integer bins from the smallest sample up to (not including) the largest, started at
    (max count, mean, std). Returns background_threshold, xray_threshold (ADU above the
    dark), mean, std_dev, variance, optimized_mean, optimized_std_dev, min_sample,
    max_sample, number_of_bins, n_samples. Raises ValueError without samples or spread.
    """
    if h.n < 2:
        raise ValueError("thresholds need at least two samples (give sample frames)")
    values = h.lo + np.arange(len(h.hist), dtype=np.int64)
    mean = h.total / h.n  # the integer sum is exact: stempy's double sum of integers is too
    variance = float(np.sum(h.hist * (values - mean) ** 2)) / (h.n - 1)
    std = math.sqrt(variance)
    xray = mean + xray_n_sigma * std
    present = np.flatnonzero(h.hist)
    min_s, max_s = int(values[present[0]]), int(values[present[-1]])
    # stempy bounds the histogram with xray_threshold*std (sic), which in practice keeps the
    # whole sample range; reproduced as written.
    max_bin = min(max_s, _c_int(mean + xray * std))
    min_bin = max(min_s, _c_int(mean - xray * std))
    n_bins = max_bin - min_bin
    if n_bins < 3 or std == 0:
        raise ValueError(f"threshold samples span {n_bins} ADU (min {min_s}, max {max_s}): too "
                         "few distinct values to fit the background; are the sample frames raw "
                         "detector frames?")
    bins = np.arange(min_bin, max_bin, dtype=np.float64)
    hist = h.hist[min_bin - h.lo:max_bin - h.lo].astype(np.float64)
    _, mu, s = _fit_gaussian(bins, hist, (hist.max(), mean, std))
    return {"background_threshold": mu + background_n_sigma * s, "xray_threshold": xray,
            "mean": mean, "std_dev": std, "variance": variance, "optimized_mean": mu,
            "optimized_std_dev": s, "min_sample": min_s, "max_sample": max_s,
            "number_of_bins": n_bins, "n_samples": h.n,
            "background_n_sigma": float(background_n_sigma), "xray_n_sigma": float(xray_n_sigma)}


def compute_thresholds(frames, dark, gain=None, background_n_sigma: float = 4.5,
                       xray_n_sigma: float = 175.0) -> dict:
    """Thresholds from sample frames (an iterable of (h, w) raw frames), as
    :func:`thresholds_from_histogram`. dark: (h, w) ADU; gain: optional (h, w) map (divided)."""
    gain_inv = None if gain is None else gain_inverse(gain)
    h = SampleHistogram()
    for frame in frames:
        h.add(sample_values(frame, dark, gain_inv))
    return thresholds_from_histogram(h, background_n_sigma, xray_n_sigma)


def gain_inverse(gain) -> np.ndarray:
    """float32(1/gain): stempy's Python wrapper passes the inverse, so a gain map is divided."""
    g = np.asarray(gain, np.float64)
    if not np.all(np.isfinite(g)) or np.any(g <= 0):
        raise ValueError("the gain map must be finite and > 0 everywhere")
    return np.power(g, -1).astype(np.float32)


def dark_for(dark: np.ndarray, semantics: str) -> np.ndarray:
    """The integer dark of the integer path: raw - dark_for(dark) equals stempy's value for
    every pixel above the background threshold. 'threaded' (the multi-pass reader,
    electron_count_frame): trunc(dark); 'classic' (SectorReader, PyReader): float32(raw) -
    float32(dark) truncated, i.e. ceil(dark) for a fractional dark."""
    d = np.asarray(dark, np.float32)
    d = np.trunc(d) if semantics == "threaded" else np.ceil(d)
    return d.astype(np.uint16)


# ---------------------------------------------------------------- the operator

@dataclass
class CountingRecord:
    """What a scan file keeps of the counting (its ``/counting`` group, docs/FORMAT.md)."""

    attrs: dict = field(default_factory=dict)
    arrays: dict = field(default_factory=dict)


class ElectronCounter(Operator):
    """Counts raw frames into electron events (see the module's docstring).

    Parameters
    ----------
    frame_shape : (h, w) detector pixels.
    dark : (h, w) dark reference in ADU (>= 0), or None for no dark subtraction. A dark or
        gain of another shape than the detector makes :meth:`count` raise (``problem``), so
        the operator can be built for any scan and only raw frames are refused.
    background_threshold, xray_threshold : ADU above the dark (after the gain): a pixel is
        kept when background < value < xray.
    gain : optional (h, w) gain map; values are divided by it (float32 path).
    row_dark : 'none', 'mean' or 'median': stempy's row-dark correction (float32 path), which
        needs ``optimized_mean`` (the fitted background mean of the thresholds).
    semantics : 'threaded' or 'classic': how a fractional dark rounds (``dark_for``); row
        dark and gain always compute in float32 as stempy's readers all do.
    ties : 'first' (default): a plateau of equal maximal pixels is one event, at its first
        pixel in raster order; 'none': only strict maxima, as stempy (an electron whose
        charge splits equally over two pixels is lost).
    sector_edges : frames of a source that does not start at row 0 (a sector of several)
        lack the row above: 'top-row-dropped' (default) makes no event in their first row,
        so an electron on a sector border is counted once, in the sector above; 'kept'
        counts every sector as a frame of its own (an electron on a border may count twice).
    xray_neighbours : 'dropped' (default): a pixel next to an X-ray pixel (value >= xray) is
        no event (the charge an X-ray shares with its neighbours is not an electron); 'kept':
        as stempy, the X-ray pixel counts as 0 and a neighbour may become an event.
    threads : frames of one batch are split over this many threads.
    record : attributes describing where dark and thresholds came from (kept in the file).

    Notes
    -----
    State ``{"frames": (1,), "events": (1,), "xray_pixels": (1,)}`` int64: frame parts
    counted, events they gave, pixels rejected as X-ray hits; merged by addition.
    ``process`` does nothing: the receiver calls :meth:`count` on each raw message before
    any chunk exists, so counting runs before every other operator.
    """

    name = "counting"
    live = False

    def __init__(self, frame_shape, dark=None, background_threshold: float = 0.0,
                 xray_threshold: float = math.inf, gain=None, row_dark: str = "none",
                 optimized_mean: float | None = None, semantics: str = "threaded",
                 ties: str = "first", sector_edges: str = "top-row-dropped",
                 xray_neighbours: str = "dropped",
                 threads: int = 1, record: dict | None = None):
        self.frame_shape = shape2(frame_shape, "frame_shape")
        h, w = self.frame_shape
        problems = []
        if semantics not in SEMANTICS:
            problems.append(f"semantics {semantics!r} must be one of {', '.join(SEMANTICS)}")
        if row_dark not in ROW_DARK:
            problems.append(f"row_dark {row_dark!r} must be one of {', '.join(ROW_DARK)}")
        if ties not in TIES:
            problems.append(f"ties {ties!r} must be one of {', '.join(TIES)}")
        if sector_edges not in SECTOR_EDGES:
            problems.append(f"sector_edges {sector_edges!r} must be one of {', '.join(SECTOR_EDGES)}")
        if xray_neighbours not in XRAY_NEIGHBOURS:
            problems.append(f"xray_neighbours {xray_neighbours!r} must be one of {', '.join(XRAY_NEIGHBOURS)}")
        if row_dark != "none" and not (optimized_mean is not None and np.isfinite(optimized_mean)
                                       and optimized_mean > 0):
            problems.append("row dark needs the fitted background mean (optimized_mean > 0) of "
                            "the thresholds: compute them with 'stemstream calibrate'")
        bg, xr = float(background_threshold), float(xray_threshold)
        if not (np.isfinite(bg) and bg >= 0):
            problems.append(f"background threshold {bg} must be a number >= 0 (ADU above the dark)")
        if not (xr > bg):
            problems.append(f"x-ray threshold {xr} must be above the background threshold {bg}")
        if int(threads) < 1:
            problems.append(f"threads {threads} must be >= 1")
        if problems:
            raise ValueError("counting: " + "; ".join(problems))
        self.problem = None  # why these maps cannot count this detector's frames
        self.dark = None if dark is None else self._map(dark, "dark reference")
        if self.dark is not None and self.problem is None and (self.dark.min() < 0 or self.dark.max() > 65535):
            self.problem = (f"counting: the dark reference spans {self.dark.min():g}..{self.dark.max():g} "
                            "ADU; a dark reference lies in 0..65535")
        self.gain = None if gain is None else self._map(gain, "gain map")
        if self.problem is not None:  # count() raises it: frames of this detector cannot be counted
            self.dark = self.gain = None
        self.background_threshold, self.xray_threshold = bg, xr
        self.row_dark, self.semantics, self.threads = row_dark, semantics, int(threads)
        self.ties, self.sector_edges, self.xray_neighbours = ties, sector_edges, xray_neighbours
        self.optimized_mean = optimized_mean
        self.record_attrs = dict(record or {})
        self.float_path = self.gain is not None or row_dark != "none"
        zero = np.zeros((h, w), np.float32)
        if self.float_path:
            self._dark_f = zero if self.dark is None else self.dark.astype(np.float32)
            self._gain_inv = zero
            if self.gain is not None:
                try:
                    self._gain_inv = gain_inverse(self.gain)
                except ValueError as e:
                    self.problem = f"counting: {e}"
        else:
            self._dark_i = dark_for(zero if self.dark is None else self.dark, semantics)
            self._lo = math.floor(bg) + 1  # v > bg
            self._hi = math.ceil(xr) - 1 if np.isfinite(xr) else 2 ** 40  # v < xray
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    def _map(self, arr, what: str) -> np.ndarray | None:
        """The map as float32, or None with ``self.problem`` saying why it does not fit."""
        arr = np.asarray(arr)
        if arr.shape != self.frame_shape:
            self.problem = self.problem or (
                f"counting: the {what} is {'x'.join(map(str, arr.shape)) or 'a scalar'} px but the "
                f"detector is {self.frame_shape[0]}x{self.frame_shape[1]} px; take it with this "
                "detector ('stemstream calibrate') or fix [counting] in the configuration")
            return None
        if not np.all(np.isfinite(arr)):
            self.problem = self.problem or f"counting: the {what} has non-finite values"
            return None
        return arr.astype(np.float32)

    def __getstate__(self):  # the thread pool stays behind when the operator travels
        state = dict(self.__dict__)
        state["_pool"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    # -------------------------------------------------------------- counting
    def count(self, frames: np.ndarray, row0: int = 0, state: State | None = None):
        """Events of raw frames.

        frames: (n, rows, w) uint8/16/32, detector rows ``row0 .. row0+rows-1`` of n frames
        (a source's sector), any strides. Returns (counts (n,) uint32, indices uint32 flat
        full-detector pixel y·w + x, ascending within each frame); with ``state`` adds the
        frame parts, events and X-ray pixels to it. Raises ValueError for frames that do not
        fit the detector.
        """
        if self.problem is not None:
            raise ValueError(self.problem)
        frames = np.asarray(frames)
        if frames.ndim != 3 or frames.dtype not in RAW_DTYPES:
            raise ValueError(f"counting: raw frames must be (n, rows, w) unsigned integers, got "
                             f"{frames.dtype} {frames.shape}")
        n, rows, w = frames.shape
        h, fw = self.frame_shape
        if w != fw or not 0 <= row0 <= row0 + rows <= h:
            raise ValueError(f"counting: frames of {rows}x{w} px at row {row0} do not fit the "
                             f"{h}x{fw} px detector the dark reference and gain were taken with")
        if self._pool is not None and n > 1:
            parts = np.array_split(np.arange(n), min(self.threads, n))
            done = list(self._pool.map(lambda p: self._count(frames[p[0]:p[-1] + 1], row0), parts))
        else:
            done = [self._count(frames, row0)]
        counts = np.concatenate([d[0] for d in done]) if len(done) > 1 else done[0][0]
        indices = np.concatenate([d[1] for d in done]) if len(done) > 1 else done[0][1]
        if state is not None:
            state["frames"][0] += n
            state["events"][0] += len(indices)
            state["xray_pixels"][0] += sum(int(d[2]) for d in done)
        return counts, indices

    def _count(self, frames, row0):
        n, rows, w = frames.shape
        counts = np.zeros(n, np.uint32)
        stats = np.zeros(1, np.int64)
        out = np.empty(max(4096, 256 * n), np.uint32)
        i, e = 0, 0
        rs = slice(row0, row0 + rows)
        strict = self.ties == "none"
        halo = self.xray_neighbours == "dropped"
        ring = np.zeros((3, w + 2), _RING[frames.dtype.itemsize])
        mark = int(np.iinfo(ring.dtype).max) if halo else 0
        skip_top = row0 > 0 and self.sector_edges == "top-row-dropped"
        while i < n:
            if self.float_path:
                i, e = count_float_kernel(frames, self._dark_f[rs], self._gain_inv[rs],
                                          self.gain is not None, ROW_DARK.index(self.row_dark),
                                          float(self.optimized_mean or 0.0),
                                          self.background_threshold, self.xray_threshold, row0,
                                          strict, skip_top, halo, out, counts, stats, i, e)
            else:
                i, e = count_integer_kernel(frames, self._dark_i[rs], self._lo, self._hi, row0,
                                            strict, skip_top, mark, ring, out, counts, stats, i, e)
            if i < n:  # the buffer filled up: make room and go on from frame i
                grown = np.empty(2 * len(out) + rows * w, np.uint32)
                grown[:e] = out[:e]
                out = grown
        return counts, out[:e].copy() if e < len(out) // 2 else out[:e], stats[0]

    # -------------------------------------------------------------- the operator protocol
    def new_state(self) -> State:
        return {k: np.zeros(1, np.int64) for k in ("frames", "events", "xray_pixels")}

    def process(self, state: State, chunk: Chunk) -> None:
        """Nothing: counting happens before chunks exist (:meth:`count`)."""

    def finalize(self, state: State) -> dict:
        return {}

    def describe(self, state: State) -> CountingRecord:
        """The scan file's ``/counting`` group: parameters, thresholds, their origin, the
        dark and gain maps, and the totals of ``state``."""
        attrs = {"algorithm": "stempy 3.6.0 electron_count: dark, gain, thresholds, strict "
                              "8-neighbour local maxima",
                 "background_threshold": self.background_threshold,
                 "xray_threshold": self.xray_threshold, "semantics": self.semantics,
                 "row_dark": self.row_dark, "ties": self.ties, "sector_edges": self.sector_edges,
                 "xray_neighbours": self.xray_neighbours,
                 "gain": self.gain is not None,
                 "dark": "none" if self.dark is None else "dataset dark",
                 "frames_counted": int(state["frames"][0]), "events": int(state["events"][0]),
                 "xray_pixels": int(state["xray_pixels"][0])}
        if self.optimized_mean is not None:
            attrs["optimized_mean"] = float(self.optimized_mean)
        arrays = {k: v for k, v in self.record_attrs.items() if isinstance(v, np.ndarray) and v.ndim}
        attrs.update({k: v for k, v in self.record_attrs.items() if k not in arrays})
        if self.dark is not None:
            arrays["dark"] = self.dark
        if self.gain is not None:
            arrays["gain"] = self.gain
        return CountingRecord(attrs, arrays)
