"""Emulator generation speed: a 256 x 256 scan at 200 e-/frame on a 576 x 576 detector.

Run: .venv/bin/python benchmarks/bench_emulator_generate.py [--specimen mgo] [--scan 256x256]
         [--dose 200] [--repeats 3]
Prints the median of the timed runs (after one warm-up run that compiles the numba kernels):
the whole simulate_scan (model, truth with expected images, events), its split into
preparation and event sampling, frames/s and events/s. Requirement: < 30 s for the default.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from sim_detector.simulate import Beam, Detector, ScanSpec, prepare_scan, presets  # noqa: E402
from sim_detector.specimens import make_specimen  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specimen", default="mgo")
    ap.add_argument("--scan", default="256x256")
    ap.add_argument("--detector", default="576x576")
    ap.add_argument("--dose", type=float, default=200.0)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    ny, nx = (int(v) for v in a.scan.split("x"))
    h, w = (int(v) for v in a.detector.split("x"))
    p = presets(a.specimen)
    spec = make_specimen(a.specimen)
    beam = Beam(**{**p["beam"], "dose": a.dose})
    det = Detector(**{**p["detector"], "shape": (h, w)})
    scan = ScanSpec(**{**p["scan"], "shape": (ny, nx)})

    def run():
        t0 = time.perf_counter()
        prep = prepare_scan(spec, beam, det, scan, seed=0)
        t1 = time.perf_counter()
        counts, indices = prep.frames()
        t2 = time.perf_counter()
        return t2 - t0, t1 - t0, t2 - t1, len(counts), len(indices)

    run()  # warm-up: numba compilation / cache load
    runs = [run() for _ in range(a.repeats)]
    total = statistics.median(r[0] for r in runs)
    prep_t = statistics.median(r[1] for r in runs)
    samp_t = statistics.median(r[2] for r in runs)
    n_frames, n_events = runs[0][3], runs[0][4]
    print(f"emulator generate: {a.specimen}, scan {ny}x{nx}, detector {h}x{w}, "
          f"dose {a.dose:g} e-/frame, {os.cpu_count()} cpus, median of {a.repeats}")
    print(f"  total      {total:8.3f} s  ({n_frames / total:,.0f} frames/s, "
          f"{n_events / total:,.0f} events/s)")
    print(f"  prepare    {prep_t:8.3f} s  (probe maps, reflections, truth incl. expected images)")
    print(f"  sample     {samp_t:8.3f} s  ({n_frames / samp_t:,.0f} frames/s, "
          f"{n_events / samp_t:,.0f} events/s)")
    print(f"  {n_frames:,} frames, {n_events:,} events; requirement < 30 s: "
          f"{'OK' if total < 30 else 'TOO SLOW'}")


if __name__ == "__main__":
    main()
