"""The emulator's raw frames against docs/EMULATOR.md ("Raw frames"), rebuilt in numpy from
the ground truth; the noise and X-rays by their statistics; counter-based reproducibility."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import erf

from sim_detector.raw import RawDetector, RawFrames

H, W = 40, 48


def rebuild(dark, gain, electrons, sigma):
    """dark + Σ signal · gain · (cloud integral over each pixel of the 5 x 5 around), rounded."""
    img = dark.astype(np.float64).copy()
    cdf = lambda x: 0.5 * (1 + erf(x / np.sqrt(2)))  # noqa: E731
    for y, x, s in electrons:
        y, x = y + 0.5, x + 0.5  # pixel k spans [k, k + 1)
        py, px = int(np.floor(y)), int(np.floor(x))
        for yy in range(max(py - 2, 0), min(py + 3, H)):
            fy = cdf((yy + 1 - y) / sigma) - cdf((yy - y) / sigma)
            for xx in range(max(px - 2, 0), min(px + 3, W)):
                fx = cdf((xx + 1 - x) / sigma) - cdf((xx - x) / sigma)
                img[yy, xx] += s * fy * fx * gain[yy, xx]
    return np.clip(np.floor(img + 0.5), 0, 4095)


def test_electron_deposits_equal_the_documented_model():
    det = RawDetector(read_noise_adu=0.0, row_noise_adu=0.0, xray_rate=0.0)
    rf = RawFrames(det, (H, W), seed=3)
    rng = np.random.default_rng(3)
    counts = np.array([5, 0, 9, 3], np.uint32)
    indices = rng.integers(0, H * W, counts.sum()).astype(np.uint32)
    frames = rf.frames(7, counts, indices)
    truth = rf.electrons(7, counts, indices)
    off = np.r_[0, np.cumsum(counts)]
    # each true electron lies in the pixel the model put it in, with a Landau-like signal
    np.testing.assert_array_equal(np.floor(truth[:, 0] + 0.5).astype(int) * W + np.floor(truth[:, 1] + 0.5).astype(int),
                                  indices)
    assert np.all((truth[:, 2] > 0) & (truth[:, 2] < 20 * det.adu_per_electron))
    for i in range(len(counts)):
        ref = rebuild(rf.dark, rf.gain, truth[off[i]:off[i + 1]], det.cloud_sigma_px)
        diff = frames[i].astype(np.int64) - ref
        assert np.abs(diff).max() <= 1 and (diff != 0).mean() < 0.002  # float32 sums vs float64 at .5
    # the same frames again, in another order and range: counter-based
    again = rf.frames(9, counts[2:], indices[off[2]:])
    np.testing.assert_array_equal(again, frames[2:])


def test_noise_row_offsets_and_xrays_have_the_documented_statistics():
    det = RawDetector()
    rf = RawFrames(det, (144, 576), seed=1)
    n = 200
    frames, xc, xp = rf.frames(0, np.zeros(n, np.uint32), np.zeros(0, np.uint32), xrays=True)
    v = frames.astype(np.float64) - rf.dark
    quiet = np.ones_like(v, bool)
    for i in range(n):  # leave the X-ray hits (and their right neighbours) out of the noise
        for p in xp[i][xp[i] >= 0]:
            quiet[i, p // 576, p % 576:p % 576 + 2] = False
    # per pixel: read noise, half-row offsets and rounding add up
    assert v[quiet].std() == pytest.approx(np.sqrt(det.read_noise_adu ** 2 + det.row_noise_adu ** 2 + 1 / 12), rel=0.02)
    assert abs(v[quiet].mean()) < 0.02
    # a half row's mean is its common offset (σ 0.5) plus the read noise averaged over 288 pixels
    half_means = v[:, :, :288].mean(2)
    assert half_means.std() == pytest.approx(np.sqrt(det.row_noise_adu ** 2 + det.read_noise_adu ** 2 / 288 + 1 / 12 / 288),
                                             rel=0.05)
    # the dark and gain maps
    assert rf.dark.mean() == pytest.approx(det.dark_mean_adu, abs=0.02)
    assert rf.dark.std() == pytest.approx(det.dark_spread_adu, rel=0.02)
    assert rf.gain.std() == pytest.approx(det.gain_spread, rel=0.05)
    # X-rays: Poisson hits of 1,500-4,000 ADU
    assert xc.mean() == pytest.approx(det.xray_rate, abs=4 * np.sqrt(det.xray_rate / n))
    hits = xp[xp >= 0]
    assert len(hits) == xc.sum()
    hit_values = np.array([v[i, p // 576, p % 576] for i in range(n) for p in xp[i][xp[i] >= 0]])
    assert np.all(hit_values > det.xray_adu[0] - 10) and np.all(hit_values < det.xray_adu[1] + 10)
