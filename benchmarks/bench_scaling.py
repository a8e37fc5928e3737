"""Scaling of the streaming operators and of the pipeline (issue 5, item 3).

    .venv/bin/python benchmarks/bench_scaling.py [--quick] [--pipeline] [--json benchmarks/results/scaling.json]

1. Electrons per frame (10 … 1000, 128 × 128 scan, 576 × 576 detector): the default operators
   (two virtual images, centre of mass, diffraction sum; one pass each) on one core — the cost
   per frame should grow linearly, the cost per electron stay flat.
2. Detector size (256² … 1024²) at 100 e⁻/frame: flat — the work is per electron, the detector
   size only sets the size of the diffraction sum and the mask tables.
3. With ``--pipeline``: the whole pipeline (benchmarks/bench_streaming.py in its own process,
   unpaced) for scan sizes 128² … 1024² and 1 or 2 workers: the workers' peak memory must stay
   bounded apart from the result images (ny·nx·8 bytes per image) while the scan's events grow
   64× (receivers keep at most ``[memory] events_in_memory_mb`` in memory, the file is written
   block by block), and throughput per worker.
Medians of ``--repeats`` runs; one core for 1 and 2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_operators import make_chunks, synthetic_scan, time_op  # noqa: E402
from operators.com import CenterOfMass  # noqa: E402
from operators.diffraction import DiffractionSum  # noqa: E402
from operators.virtual import VirtualDetectors, annulus_mask, disk_mask  # noqa: E402


def default_ops(scan_shape, frame_shape):
    h, w = frame_shape
    c = ((h - 1) / 2, (w - 1) / 2)
    r = min(h, w) / 2
    masks = np.stack([disk_mask(frame_shape, c, r / 7), annulus_mask(frame_shape, c, r / 3.5, r)])
    return [VirtualDetectors(masks, ["bf", "adf"], scan_shape), CenterOfMass(scan_shape, frame_shape, center=c),
            DiffractionSum(frame_shape)]


def cost(scan_shape, frame_shape, events, repeats):
    """Seconds (median over repeats) of all default operators over the whole scan."""
    counts, indices = synthetic_scan(scan_shape, frame_shape, events, 0.6, min(frame_shape) / 14)
    chunks = make_chunks(counts, indices, 8192, 1, frame_shape)
    total = 0.0
    for op in default_ops(scan_shape, frame_shape):
        total += time_op(op, chunks, repeats)[0]
    return total, int(counts.sum())


def operator_scaling(a):
    scan = (64, 64) if a.quick else (128, 128)
    n = scan[0] * scan[1]
    rows = {"events_per_frame": [], "detector": []}
    print(f"## Operators, one core: {scan[0]} × {scan[1]} scan, median of {a.repeats}\n")
    print("| e⁻/frame | detector | s | µs per frame | ns per electron |")
    print("|---:|---:|---:|---:|---:|")
    for ev in ([10, 100, 1000] if a.quick else [10, 30, 100, 300, 1000]):
        t, n_ev = cost(scan, (576, 576), ev, a.repeats)
        rows["events_per_frame"].append({"events": ev, "detector": 576, "seconds": t, "frames": n,
                                         "electrons": n_ev})
        print(f"| {ev} | 576² | {t:.3f} | {t / n * 1e6:.2f} | {t / n_ev * 1e9:.2f} |")
    for d in ([256, 1024] if a.quick else [256, 512, 576, 1024]):
        t, n_ev = cost(scan, (d, d), 100, a.repeats)
        rows["detector"].append({"events": 100, "detector": d, "seconds": t, "frames": n, "electrons": n_ev})
        print(f"| 100 | {d}² | {t:.3f} | {t / n * 1e6:.2f} | {t / n_ev * 1e9:.2f} |")
    return rows


def pipeline_scaling(a):
    out = []
    sizes = ["128x128", "256x256"] if a.quick else ["128x128", "256x256", "512x512", "1024x1024"]
    print("\n## Pipeline, unpaced (bench_streaming.py, 4 sources, 100 e⁻/frame)\n")
    print("| scan | workers | frames/s | file after last frame s | worker peak memory MB | result images MB "
          "| events of the scan MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for scan in sizes:
        for workers in ([2] if scan != "256x256" else [1, 2]):
            with tempfile.TemporaryDirectory() as tmp:
                js = Path(tmp) / "s.json"
                subprocess.run([sys.executable, str(HERE / "bench_streaming.py"), "--scan", scan, "--workers",
                                str(workers), "--rates", "max", "--repeats", "1", "--out", tmp, "--json", str(js),
                                "--auth", "on"],
                               check=True, capture_output=True, text=True)
                r = json.loads(js.read_text())
            row = r["rows"][0]
            ny, nx = (int(v) for v in scan.split("x"))
            images_mb = ny * nx * 8 * 9 / 1e6  # bf, adf, 5 centre-of-mass maps (+ 2 in mrad)
            events_mb = row["events"] * 4 / 1e6
            out.append({"scan": scan, "workers": workers, "achieved": row["achieved"], "latency": row["latency"],
                        "worker_peak_mb": r["peak_memory_mb"]["workers"], "images_mb": images_mb,
                        "events_mb": events_mb, "events_in_memory_mb": r["events_in_memory_mb"]})
            print(f"| {scan} | {workers} | {row['achieved']:,.0f} | {row['latency']:.2f} | "
                  f"{', '.join(f'{m:.0f}' for m in r['peak_memory_mb']['workers'])} | {images_mb:.0f} "
                  f"| {events_mb:.0f} |")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller, for a smoke test")
    ap.add_argument("--pipeline", action="store_true", help="also the whole pipeline (scan size, workers)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", metavar="PATH")
    a = ap.parse_args(argv)
    if a.quick:
        a.repeats = min(a.repeats, 2)
    print(f"command: python benchmarks/bench_scaling.py {' '.join(argv or sys.argv[1:])}; "
          f"load average {os.getloadavg()[0]:.1f}\n")
    result = {"operators": operator_scaling(a), "load_average": os.getloadavg()[0]}
    if a.pipeline:
        result["pipeline"] = pipeline_scaling(a)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
