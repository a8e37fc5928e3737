"""Counting against the emulator's ground truth: at the 4D Camera's typical dose (100 e-/frame
over a wide bright-field disk) nearly every true electron is found within one pixel, few
events are false, and no X-ray hit becomes an event; whole frames and four sectors alike."""

from __future__ import annotations

import numpy as np
import pytest

from operators.electron_counting import ElectronCounter, choose_samples, compute_thresholds
from sim_detector.raw import RawDetector, RawFrames, score_events
from stream.files.counting_file import DarkAccumulator

H = W = 576


def emulated(dose, n_positions=(8, 16), xray_rate=0.5, seed=4):
    from sim_detector.simulate import Beam, Detector, ScanSpec, simulate_scan
    from sim_detector.specimens import make_specimen

    sim = simulate_scan(make_specimen("mgo", seed=seed), Beam(dose=dose), Detector(mrad_per_px=0.12),
                        ScanSpec(shape=n_positions), seed=seed, with_expected=False)
    rf = RawFrames(RawDetector(xray_rate=xray_rate), (H, W), seed=seed)
    frames, _, xray_pixels = rf.frames(0, sim.counts, sim.indices, xrays=True)
    return rf, sim, frames, xray_pixels


def calibrated(rf, n_dark=48, samples=40, seed=0):
    """Dark and thresholds as 'stemstream calibrate' makes them from a dark scan."""
    dark_frames = rf.frames(1_000_000, np.zeros(n_dark, np.uint32), np.zeros(0, np.uint32))
    acc = DarkAccumulator((H, W))
    acc.add(dark_frames)
    dark = acc.dark()
    t = compute_thresholds([dark_frames[i] for i in choose_samples(n_dark, samples, seed)], dark)
    return dark, t


@pytest.fixture(scope="module")
def at_100():
    rf, sim, frames, xp = emulated(100.0)
    dark, t = calibrated(rf)
    return rf, sim, frames, xp, dark, t


def score(rf, sim, frames, xp, counter, sectors):
    parts = [counter.count(frames[:, a:b], a) for a, b in sectors]
    offs = [np.r_[0, np.cumsum(c.astype(np.int64))] for c, _ in parts]
    electrons = rf.electrons(0, sim.counts, sim.indices)
    eoff = sim.offsets
    total = dict(electrons=0, events=0, found=0, false=0, xray_events=0)
    for i in range(len(frames)):
        ev = np.concatenate([ind[o[i]:o[i + 1]] for (_, ind), o in zip(parts, offs)])
        s = score_events(electrons[eoff[i]:eoff[i + 1], :2], ev, W, xp[i])
        for k in total:
            total[k] += s[k]
    return total


@pytest.mark.parametrize("sectors", [[(0, 576)], [(a, a + 144) for a in range(0, 576, 144)]],
                         ids=["whole frames", "four sectors"])
def test_at_100_electrons_per_frame_nearly_every_electron_is_found(at_100, sectors):
    rf, sim, frames, xp, dark, t = at_100
    counter = ElectronCounter((H, W), dark, t["background_threshold"], t["xray_threshold"])
    s = score(rf, sim, frames, xp, counter, sectors)
    assert 90 < s["electrons"] / len(frames) < 110
    assert s["found"] >= 0.98 * s["electrons"], s
    assert s["false"] < 0.01 * s["events"], s
    assert (xp >= 0).sum() >= 40 and s["xray_events"] == 0, s  # X-rays hit, none became an event


def test_the_thresholds_sit_where_the_noise_and_xrays_put_them(at_100):
    """The background threshold is the fitted noise level plus 4.5σ of the emulator's read
    noise (rounded to ADU), the x-ray threshold far above an electron's peak pixel and far
    below an X-ray's."""
    rf, sim, frames, xp, dark, t = at_100
    d = rf.detector
    noise = np.sqrt(d.read_noise_adu ** 2 + d.row_noise_adu ** 2 + 1 / 12)
    assert t["optimized_std_dev"] == pytest.approx(noise, rel=0.05)
    assert t["background_threshold"] == pytest.approx(t["optimized_mean"] + 4.5 * t["optimized_std_dev"])
    peak = d.adu_per_electron * 0.354  # a centred electron's share on its central pixel: (2Φ(0.5/0.6) − 1)²
    assert 5 * peak < t["xray_threshold"] < d.xray_adu[0] * 0.5


def test_counting_strictly_as_stempy_loses_the_electrons_that_split_evenly(at_100):
    """stempy's rule (strict maxima) drops a pixel pair of equal values: a few % of the
    electrons at this cloud size. Our default counts them once."""
    rf, sim, frames, xp, dark, t = at_100
    strict = score(rf, sim, frames[:64], xp[:64], ElectronCounter((H, W), dark, t["background_threshold"],
                                                                   t["xray_threshold"], ties="none"), [(0, 576)])
    first = score(rf, sim, frames[:64], xp[:64], ElectronCounter((H, W), dark, t["background_threshold"],
                                                                  t["xray_threshold"]), [(0, 576)])
    assert strict["found"] < first["found"] and strict["false"] <= first["false"] + 2
    assert first["found"] - strict["found"] > 0.01 * first["electrons"]
