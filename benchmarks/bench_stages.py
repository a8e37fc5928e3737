"""Downstream 2D stages on a 512 × 512 scan: phase (iCoM), columns, counting, grains.

    .venv/bin/python benchmarks/bench_stages.py [--repeats 3] [--no-grains]

phase / columns / counting: a 512 × 512 image of Gaussian columns on a square lattice (5.3 px
apart, the demo's MgO spacing; amplitudes from 3 to 12 "atoms"), Poisson noise at 200 counts
per column peak, and the analytic gradient of the same image as the centre-of-mass field.
grains: the emulator's `cluster` specimen scanned at 512 × 512 positions on a 576 × 576
detector at its preset dose (52 M electrons), from its events. Each function is called once to
compile (numba caches), then timed; medians of ``--repeats``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from operators.imaging.columns import analyze_columns  # noqa: E402
from operators.imaging.atom_counting import count_atoms  # noqa: E402
from operators.imaging.phase import icom  # noqa: E402


def column_image(n=512, spacing=5.3, sigma=1.1, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n, :n].astype(float)
    centres = np.arange(spacing / 2, n - 1, spacing)
    phi = np.zeros((n, n))
    for cy in centres:  # one row of columns at a time: (len(centres), n, n) would be too big
        amp = rng.integers(3, 13, len(centres)).astype(float)
        dy = np.exp(-(yy[None, :, 0] - cy) ** 2 / (2 * sigma ** 2))  # (1, n)
        dx = np.exp(-(xx[0][None, :] - centres[:, None]) ** 2 / (2 * sigma ** 2))  # (m, n)
        phi += dy.T * (amp @ dx)[None, :]
    gy, gx = np.gradient(phi)
    return rng.poisson(phi / phi.max() * 200).astype(float), gy, gx


def timed(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), max(times), out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-grains", action="store_true")
    a = ap.parse_args(argv)
    img, gy, gx = column_image()
    print(f"command: {' '.join(['python', 'benchmarks/bench_stages.py'] + (argv or sys.argv[1:]))}\n")
    print("| stage | input | seconds (median, min..max) | required |")
    print("|---|---|---:|---:|")
    med, lo, hi, _ = timed(lambda: icom(gy, gx), a.repeats)
    print(f"| phase (iCoM, rotation and flip found) | 512 × 512 CoM field | {med:.2f} ({lo:.2f}..{hi:.2f}) | < 10 |")
    med, lo, hi, cols = timed(lambda: analyze_columns(img, min_distance_px=3.5, smooth_px=1.0), a.repeats)
    n = len(cols.y_px)
    print(f"| columns (find, refine, fit all, lattice) | 512 × 512 image, {n:,} columns | "
          f"{med:.2f} ({lo:.2f}..{hi:.2f}) | < 10 |")
    xs = cols.cross_section_shared[np.isfinite(cols.cross_section_shared)]
    med, lo, hi, _ = timed(lambda: count_atoms(xs, seed=0, n_mc=100), a.repeats)
    print(f"| counting (mixture, ICL, 100 Monte Carlo runs) | {len(xs):,} cross-sections | "
          f"{med:.2f} ({lo:.2f}..{hi:.2f}) | < 10 |")
    if not a.no_grains:
        from operators.crystallography.grains import grain_diffraction
        from sim_detector.simulate import Beam, Detector, ScanSpec, presets, simulate_scan
        from sim_detector.specimens import make_specimen
        p = presets("cluster")
        sim = simulate_scan(make_specimen("cluster", seed=0), Beam(**p["beam"]),
                            Detector(shape=(576, 576), mrad_per_px=0.2), ScanSpec(shape=(512, 512)),
                            seed=10, with_expected=False)
        dsum = np.bincount(sim.indices, minlength=576 * 576).reshape(576, 576)
        med, lo, hi, res = timed(lambda: grain_diffraction(sim.offsets, sim.indices, (512, 512), (576, 576), 1,
                                                           dsum, mrad_per_px=0.2, energy_keV=300.0), a.repeats)
        print(f"| grains (spots, segmentation, apertures, peaks, indexing) | 512 × 512 scan, "
              f"{len(sim.indices) / 1e6:.0f} M electrons, {res.n_grains} grains | {med:.2f} ({lo:.2f}..{hi:.2f}) | < 10 |")


if __name__ == "__main__":
    main()
