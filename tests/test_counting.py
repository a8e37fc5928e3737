"""The counting operator's kernels against a dense numpy reference written from stempy's
algorithm (docs/COUNTING.md), the thresholds against known answers, dense count frames
against np.repeat, and the errors a user can cause."""

from __future__ import annotations

import numpy as np
import pytest

from operators.dense import counts_to_events
from operators.electron_counting import (ElectronCounter, SampleHistogram, choose_samples,
                                         compute_thresholds, thresholds_from_histogram)


# ---------------------------------------------------------------- the dense numpy reference

def reference_values(raw, dark, bg, xray, gain=None, semantics="threaded", row_dark="none", om=None,
                     halo=False):
    """stempy 3.6.0's thresholded frame, plain numpy (float64 where C++ uses double); with
    ``halo`` the X-ray pixels are +inf instead of 0 (they then beat every neighbour). A pixel
    below the dark, which stempy's uint16 wraps to ~65535, is 0 (not an X-ray) either way."""
    raw = np.asarray(raw)
    h, w = raw.shape
    dark32 = np.zeros((h, w), np.float32) if dark is None else np.asarray(dark, np.float32)

    def u16(x):  # C++ float -> uint16 as compiled: truncate, keep 16 bits
        return (np.trunc(np.asarray(x, np.float64)).astype(np.int64) & 0xFFFF).astype(np.float64)

    below = (raw.astype(np.float32) - dark32 < 0) if gain is None else np.zeros((h, w), bool)
    if row_dark != "none":
        out = np.empty((h, w), np.float64)
        for r in range(h):
            for a, b in ((0, w // 2), (w // 2, w)):
                seg = raw[r, a:b]
                stat = np.float32(np.float32(seg.astype(np.int64).sum()) / np.float32(b - a)) \
                    if row_dark == "mean" else np.float32(np.median(seg.astype(np.float32)))
                scale = np.float32(om) / stat
                d = seg.astype(np.float32) - dark32[r, a:b]
                if gain is None:
                    out[r, a:b] = u16(u16(d).astype(np.float32) * scale)
                else:
                    out[r, a:b] = (d * scale) * (1 / np.asarray(gain, np.float64)).astype(np.float32)[r, a:b]
        v = out
    elif gain is not None:
        g_inv = (1 / np.asarray(gain, np.float64)).astype(np.float32)
        v = ((raw.astype(np.float32) - dark32) * g_inv).astype(np.float64)
    elif semantics == "classic":
        v = u16(raw.astype(np.float32) - dark32)
    else:
        v = ((raw.astype(np.int64) - (np.trunc(dark32).astype(np.int64) & 0xFFFF)) & 0xFFFF).astype(np.float64)
    kept = np.where((v > bg) & (v < xray), v, 0.0)
    return np.where(below, 0.0, np.where(v >= xray, np.inf, kept) if halo else kept)


def reference_maxima(v, ties="none", skip_top=False):
    """Events of a thresholded frame: pixels > 0 greater than every neighbour ('none'), or
    greater than the neighbours before them in raster order and not less than those after
    ('first'); neighbours outside the frame ignored."""
    h, w = v.shape
    p = np.full((h + 2, w + 2), -np.inf)
    p[1:-1, 1:-1] = v
    c = p[1:-1, 1:-1]
    m = (c > 0) & (c < np.inf)  # an X-ray pixel (+inf) is no event
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy == dx == 0:
                continue
            q = p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
            earlier = dy < 0 or (dy == 0 and dx < 0)
            m &= (c > q) if (earlier or ties == "none") else (c >= q)
    if skip_top:
        m[0] = False
    return np.flatnonzero(m)


def synthetic_raw(n, shape=(48, 40), seed=0, electrons=12, dark_level=20.0, dtype=np.uint16):
    """Raw frames: a fractional per-pixel dark, noise, compact electron clouds (some at
    pixel corners, so equal neighbours occur), and an X-ray hit per few frames."""
    rng = np.random.default_rng(seed)
    h, w = shape
    dark = (dark_level + rng.normal(0, 1.5, shape)).astype(np.float32)
    frames = np.empty((n, h, w), dtype)
    for i in range(n):
        img = dark + rng.normal(0, 2.0, shape)
        for _ in range(rng.poisson(electrons)):
            y, x = rng.integers(1, h - 2), rng.integers(1, w - 2)
            a = rng.uniform(40, 120)
            if rng.random() < 0.3:  # charge split over two pixels: ties after rounding
                img[y, x] += a / 2
                img[y, x + 1] += a / 2
            else:
                img[y - 1:y + 2, x - 1:x + 2] += a * np.array([[.05, .1, .05], [.1, .4, .1], [.05, .1, .05]])
        if i % 3 == 0:
            img[rng.integers(h), rng.integers(w)] += 3000
        frames[i] = np.clip(np.rint(img), 0, np.iinfo(dtype).max)
    return frames, dark


def events_by_frame(counts, indices):
    off = np.r_[0, np.cumsum(counts.astype(np.int64))]
    return [indices[off[i]:off[i + 1]] for i in range(len(counts))]


# ---------------------------------------------------------------- the kernels

@pytest.mark.parametrize("semantics", ["threaded", "classic"])
@pytest.mark.parametrize("ties,halo", [("none", False), ("first", False), ("first", True), ("none", True)])
def test_integer_path_equals_the_dense_reference(semantics, ties, halo):
    frames, dark = synthetic_raw(24, seed=1)
    bg, xray = 7.3, 900.0
    c = ElectronCounter(frames.shape[1:], dark, bg, xray, semantics=semantics, ties=ties,
                        xray_neighbours="dropped" if halo else "kept")
    state = c.new_state()
    counts, indices = c.count(frames, 0, state)
    got = events_by_frame(counts, indices)
    total = 0
    for i, f in enumerate(frames):
        ref = reference_maxima(reference_values(f, dark, bg, xray, semantics=semantics, halo=halo), ties)
        np.testing.assert_array_equal(got[i], ref, err_msg=f"frame {i}")
        total += len(ref)
    assert total > 200 and state["frames"][0] == 24 and state["events"][0] == total
    # the X-ray pixels (raw - dark >= xray) were counted, and never became events
    dark_int = np.trunc(dark) if semantics == "threaded" else np.ceil(dark)
    above = int(((frames.astype(np.int64) - dark_int.astype(np.int64)) >= xray).sum())
    assert state["xray_pixels"][0] == above >= 8


def test_ties_first_adds_one_event_per_plateau_and_keeps_every_strict_one():
    frames, dark = synthetic_raw(16, seed=2)
    strict = ElectronCounter(frames.shape[1:], dark, 7.3, 900.0, ties="none", xray_neighbours="kept")
    first = ElectronCounter(frames.shape[1:], dark, 7.3, 900.0, ties="first", xray_neighbours="kept")
    extra = 0
    for s, f, frame in zip(events_by_frame(*strict.count(frames)), events_by_frame(*first.count(frames)), frames):
        assert np.all(np.isin(s, f))  # stempy's events are all there
        v = reference_values(frame, dark, 7.3, 900.0)
        for e in np.setdiff1d(f, s):  # and every other one sits on a plateau of equal maxima
            y, x = divmod(int(e), frame.shape[1])
            nb = v[max(y - 1, 0):y + 2, max(x - 1, 0):x + 2]
            assert nb.max() == v[y, x] and (nb == v[y, x]).sum() >= 2
            extra += 1
    assert extra >= 5  # the frames do have ties


@pytest.mark.parametrize("row_dark,halo", [("none", False), ("mean", False), ("median", False),
                                           ("none", True), ("mean", True)])
def test_float_path_gain_and_row_dark_equal_the_dense_reference(row_dark, halo):
    frames, dark = synthetic_raw(12, seed=3)
    rng = np.random.default_rng(4)
    gain = rng.uniform(0.8, 1.25, frames.shape[1:]).astype(np.float32)
    for g in (None, gain):
        if row_dark == "none" and g is None:
            continue
        # stempy's row dark scales by optimized_mean / statistic of the raw half row: it is meant
        # for data whose background sits well above zero (a dark of zero, as NCEM counts)
        d = dark if row_dark == "none" else None
        bg, om = (7.3, None) if row_dark == "none" else (26.0, 20.0)
        c = ElectronCounter(frames.shape[1:], d, bg, 900.0, gain=g, row_dark=row_dark, optimized_mean=om,
                            ties="none", xray_neighbours="dropped" if halo else "kept")
        got = events_by_frame(*c.count(frames))
        for i, f in enumerate(frames):
            ref = reference_maxima(reference_values(f, d, bg, 900.0, gain=g, row_dark=row_dark, om=om, halo=halo))
            np.testing.assert_array_equal(got[i], ref, err_msg=f"frame {i}, gain {g is not None}")


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32])
def test_sectors_threads_and_dtypes(dtype):
    """Sector by sector (rows of a source, top row dropped below row 0) equals the reference
    on each sector; threads and the growth of the output buffer change nothing."""
    frames, dark = synthetic_raw(20, seed=5, dark_level=10.0, dtype=dtype)
    bg, xray = 5.5, 250.0 if dtype == np.uint8 else 900.0
    one = ElectronCounter(frames.shape[1:], dark, bg, xray, threads=1)
    three = ElectronCounter(frames.shape[1:], dark, bg, xray, threads=3)
    edges = [(0, 16), (16, 30), (30, 48)]
    for a, b in edges:
        sec = frames[:, a:b]  # a strided view, as the kernel may get it
        counts, indices = one.count(sec, a)
        np.testing.assert_array_equal(np.concatenate(events_by_frame(counts, indices)), indices)
        c3, i3 = three.count(sec, a)
        np.testing.assert_array_equal(counts, c3)
        np.testing.assert_array_equal(indices, i3)
        for i, f in enumerate(frames):
            ref = reference_maxima(reference_values(f[a:b], dark[a:b], bg, xray, halo=True), "first", skip_top=a > 0)
            np.testing.assert_array_equal(events_by_frame(counts, indices)[i], ref + a * f.shape[1])
    # a frame of nothing but isolated maxima: tens of thousands of events, the buffer grows
    dense = np.zeros((3, 200, 200), np.uint16)
    dense[:, ::2, ::2] = 100
    c = ElectronCounter((200, 200), None, 10.0, 1000.0)
    counts, indices = c.count(dense)
    assert counts.tolist() == [10_000] * 3
    np.testing.assert_array_equal(indices[:10_000], np.flatnonzero(dense[0].ravel()))


def test_a_dark_of_another_detector_is_one_clear_error():
    c = ElectronCounter((576, 576), np.zeros((256, 256)), 5.0, 500.0)  # builds: frames may never come
    with pytest.raises(ValueError, match=r"dark reference is 256x256 px but the detector is 576x576 px"):
        c.count(np.zeros((1, 576, 576), np.uint16))
    c = ElectronCounter((16, 16), np.zeros((16, 16)), 5.0, 500.0)
    with pytest.raises(ValueError, match=r"do not fit the 16x16 px detector"):
        c.count(np.zeros((1, 4, 12), np.uint16), 14)
    for kwargs, match in [(dict(background_threshold=-1), "background threshold"),
                          (dict(xray_threshold=3.0), "x-ray threshold"),
                          (dict(row_dark="mean"), "optimized_mean"),
                          (dict(semantics="nearest"), "semantics")]:
        with pytest.raises(ValueError, match=match):
            ElectronCounter((16, 16), None, **{"background_threshold": 5.0, "xray_threshold": 500.0, **kwargs})


# ---------------------------------------------------------------- thresholds

def test_thresholds_recover_a_known_background_and_follow_stempys_formulas():
    rng = np.random.default_rng(6)
    mu, sigma = 3.0, 2.5
    dark = np.full((64, 64), 20.0, np.float32)
    frames = np.rint(20 + mu + rng.normal(0, sigma, (40, 64, 64)))
    frames[:, ::9, ::7] += 60  # electrons: they raise the x-ray threshold, not the background
    frames = frames.astype(np.uint16)
    t = compute_thresholds(list(frames), dark, background_n_sigma=4.5, xray_n_sigma=175)
    samples = frames.astype(np.int64) - 20
    assert t["mean"] == pytest.approx(samples.mean(), rel=1e-12)
    assert t["std_dev"] == pytest.approx(samples.std(ddof=1), rel=1e-12)
    assert t["xray_threshold"] == pytest.approx(samples.mean() + 175 * samples.std(ddof=1), rel=1e-12)
    # the Gaussian fit sees the noise peak (integer bins of rounded values: σ² + 1/12)
    assert t["optimized_mean"] == pytest.approx(mu, abs=0.05)
    assert t["optimized_std_dev"] == pytest.approx(np.sqrt(sigma ** 2 + 1 / 12), rel=0.02)
    assert t["background_threshold"] == pytest.approx(t["optimized_mean"] + 4.5 * t["optimized_std_dev"])
    assert (t["min_sample"], t["max_sample"]) == (samples.min(), samples.max())
    # the histogram is the same however the samples were split up
    h = SampleHistogram()
    for part in np.array_split(samples.ravel(), 7):
        h.add(part)
    again = thresholds_from_histogram(h, 4.5, 175)
    assert again == pytest.approx(t)


def test_sample_frames_are_drawn_reproducibly():
    a = choose_samples(1000, 40, seed=3)
    assert np.array_equal(a, choose_samples(1000, 40, seed=3)) and len(set(a)) == 40
    assert not np.array_equal(a, choose_samples(1000, 40, seed=4))
    assert np.array_equal(choose_samples(5, 40, seed=0), np.arange(5))


def test_thresholds_refuse_frames_without_spread():
    with pytest.raises(ValueError, match="too few distinct values"):
        compute_thresholds([np.full((8, 8), 7, np.uint16)] * 3, np.zeros((8, 8)))


# ---------------------------------------------------------------- dense count frames

@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32])
def test_count_frames_become_exactly_that_many_events(dtype):
    rng = np.random.default_rng(7)
    frames = rng.poisson(0.05, (9, 13, 37)).astype(dtype)
    frames[2, 4, 36] = 200  # a bright pixel at the row end
    frames[5] = 0  # an empty frame
    counts, indices = counts_to_events(frames, row0=11)
    ref = [np.repeat(np.flatnonzero(f) + 11 * 37, f.ravel()[np.flatnonzero(f)].astype(np.int64))
           for f in frames]
    assert counts.tolist() == [len(r) for r in ref] and counts[5] == 0
    np.testing.assert_array_equal(indices, np.concatenate(ref))
    # sums over events equal the sums over the dense frames (what every operator relies on)
    np.testing.assert_array_equal(np.bincount(indices - 11 * 37, minlength=13 * 37).reshape(13, 37),
                                  frames.sum(0, dtype=np.int64))
    with pytest.raises(ValueError, match="more than the 100 one message may carry"):
        counts_to_events(frames, 0, max_events=100)
