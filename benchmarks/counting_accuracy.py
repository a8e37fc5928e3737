"""Counting against the emulator's ground truth at rising dose: the table of docs/COUNTING.md.

    .venv/bin/python benchmarks/counting_accuracy.py [--frames 128] [--doses 25 50 100 200 400 800 1600]

For each dose, raw frames of the emulator (sim_detector/raw.py defaults: MgO, a wide
bright-field disk at 0.12 mrad/px, X-rays 0.5 per frame so that enough of them hit), a dark
reference and thresholds made as ``stemstream calibrate`` makes them from 48 dark frames (40
samples, 4.5σ / 175σ), then counting with our defaults (whole frames, and four 144-row
sectors as the 4D Camera's sources send them) and with stempy's rule (ties none, X-ray
neighbours kept, whole frames). Scores (``sim_detector.raw.score_events``): true electrons
found within one pixel, events that match no electron, events next to an X-ray hit.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from operators.electron_counting import ElectronCounter, choose_samples, compute_thresholds  # noqa: E402
from sim_detector.raw import RawDetector, RawFrames, score_events  # noqa: E402
from stream.files.counting_file import DarkAccumulator  # noqa: E402


def measure(dose, n_frames, seed=4):
    from sim_detector.simulate import Beam, Detector, ScanSpec, simulate_scan
    from sim_detector.specimens import make_specimen

    nx = 16
    sim = simulate_scan(make_specimen("mgo", seed=seed), Beam(dose=float(dose)), Detector(mrad_per_px=0.12),
                        ScanSpec(shape=(-(-n_frames // nx), nx)), seed=seed, with_expected=False)
    rf = RawFrames(RawDetector(xray_rate=0.5), (576, 576), seed=seed)
    frames, _, xp = rf.frames(0, sim.counts, sim.indices, xrays=True)
    dark_frames = rf.frames(1_000_000, np.zeros(48, np.uint32), np.zeros(0, np.uint32))
    acc = DarkAccumulator((576, 576))
    acc.add(dark_frames)
    dark = acc.dark()
    t = compute_thresholds([dark_frames[i] for i in choose_samples(48, 40, 0)], dark)
    electrons = rf.electrons(0, sim.counts, sim.indices)
    eoff = sim.offsets
    out = {"dose": dose, "electrons_per_frame": len(sim.indices) / len(frames)}
    for label, sectors, kw in (("ours", [(0, 576)], {}),
                               ("ours, 4 sectors", [(a, a + 144) for a in range(0, 576, 144)], {}),
                               ("stempy rule", [(0, 576)], {"ties": "none", "xray_neighbours": "kept"})):
        c = ElectronCounter((576, 576), dark, t["background_threshold"], t["xray_threshold"], **kw)
        parts = [c.count(np.ascontiguousarray(frames[:, a:b]), a) for a, b in sectors]
        offs = [np.r_[0, np.cumsum(cnt.astype(np.int64))] for cnt, _ in parts]
        tot = dict(electrons=0, events=0, found=0, false=0, xray_events=0)
        for i in range(len(frames)):
            ev = np.concatenate([ind[o[i]:o[i + 1]] for (_, ind), o in zip(parts, offs)])
            s = score_events(electrons[eoff[i]:eoff[i + 1], :2], ev, 576, xp[i])
            tot = {k: tot[k] + s[k] for k in tot}
        out[label] = tot
    out["xray_hits"] = int((xp >= 0).sum())
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=128)
    ap.add_argument("--doses", type=float, nargs="+", default=[25, 50, 100, 200, 400, 800, 1600])
    args = ap.parse_args(argv)
    print(f"`.venv/bin/python benchmarks/counting_accuracy.py --frames {args.frames}`: {args.frames} frames per dose\n")
    print("| e-/frame | found (ours) | false (ours) | found (4 sectors) | false (4 sectors) | found (stempy rule) "
          "| false (stempy rule) | events next to X-rays (ours / stempy rule) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for dose in args.doses:
        r = measure(dose, args.frames)
        cells = []
        for label in ("ours", "ours, 4 sectors", "stempy rule"):
            t = r[label]
            cells += [f"{100 * t['found'] / t['electrons']:.1f} %", f"{100 * t['false'] / max(1, t['events']):.2f} %"]
        print(f"| {r['electrons_per_frame']:.0f} | " + " | ".join(cells) +
              f" | {r['ours']['xray_events']} / {r['stempy rule']['xray_events']} of {r['xray_hits']} hits |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
