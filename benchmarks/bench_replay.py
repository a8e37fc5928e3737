"""Replay speed: a recorded scan file published again, received and decoded in another process.

    .venv/bin/python benchmarks/bench_replay.py [--scan 512x512] [--detector 576x576]
        [--dose 100] [--sources 1 4] [--repeats 5]

A scan file is written once (Poisson electrons per frame, uniform over the detector, sorted
within each frame, gzip level 1 as the pipeline writes it). Each run then does what
``stemstream replay FILE --rate max`` does: load and check the file (``replay.prepare``), and
publish it to a receiver process that decodes every message with the protocol's validation
(benchmarks/bench_publisher.py's receiver). Reported: the load time, and frames/s from the
first send until the receiver has every frame and every ``end``, median of ``--repeats``.
Requirement (issue 4): at least 1,000,000 frames/s at 100 e-/frame.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_publisher import receiver  # noqa: E402
from operators.completeness import Completeness  # noqa: E402
from sim_detector.publisher import Publisher  # noqa: E402
from stream.transport.net import free_port_block  # noqa: E402
from stream.files.recording import open_recording  # noqa: E402
from stream.files.replay import prepare  # noqa: E402
from stream.files.storage import write_scan  # noqa: E402


def write_file(path, ny, nx, h, w, dose):
    rng = np.random.default_rng(0)
    counts = rng.poisson(dose, ny * nx)
    offsets = np.zeros(ny * nx + 1, np.uint64)
    np.cumsum(counts, out=offsets[1:])
    frame = np.repeat(np.arange(ny * nx), counts)
    indices = rng.integers(0, h * w, int(offsets[-1]), dtype=np.uint32)
    indices = indices[np.lexsort((indices, frame))]
    geo = dict(scan_shape=[ny, nx], frame_shape=[h, w], frames_per_position=1, n_sources=1,
               sector=[0, h], flyback=0)
    comp = Completeness(1, (ny, nx))
    state = comp.new_state()
    comp.add_range(state, 0, 0, ny * nx)
    return write_scan(path, scan_id="bench", status="complete", reason="benchmark", geometry=geo,
                      metadata={}, results={}, offsets=offsets, indices=indices,
                      completeness=comp.finalize(state), completeness_summary={}, provenance={},
                      compression_level=1)


def run_once(path, n_sources):
    t0 = time.perf_counter()
    prep = prepare(open_recording(path, with_received=True), n_sources)
    load_s = time.perf_counter() - t0
    n_frames = prep.sources[0].geometry.n_frames
    with Publisher(f"tcp://127.0.0.1:{free_port_block(n_sources)}", n_sources, sndhwm=64) as pub:
        result, ready = mp.Queue(), mp.Event()
        p = mp.Process(target=receiver, args=(pub.addresses, n_sources, ready, result))
        p.start()
        ready.wait(30)
        pub.wait_for_receivers(30)
        time.sleep(0.3)
        t1 = time.time()
        pub.publish_scan("bench", prep.sources, {}, rate=None, batch=512, copies=prep.copies)
        frames, t_end = result.get(timeout=120)
        p.join(60)
    assert frames == n_frames * n_sources, frames
    return load_s, n_frames / (t_end - t1), prep.n_events


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scan", default="512x512")
    ap.add_argument("--detector", default="576x576")
    ap.add_argument("--dose", type=float, default=100.0)
    ap.add_argument("--sources", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)
    ny, nx = (int(v) for v in a.scan.split("x"))
    h, w = (int(v) for v in a.detector.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        path = write_file(Path(tmp) / "bench.h5", ny, nx, h, w, a.dose)
        size = path.stat().st_size
        print(f"command: {' '.join(['python', 'benchmarks/bench_replay.py'] + (argv or sys.argv[1:]))}")
        print(f"scan {ny}x{nx}, detector {h}x{w}, {a.dose:g} e-/frame, file {size / 1e6:.0f} MB, "
              f"median of {a.repeats}\n")
        print("| sources | load + check s | replay frames/s | M events/s | min..max frames/s |")
        print("|---:|---:|---:|---:|---:|")
        for n_sources in a.sources:
            runs = [run_once(path, n_sources) for _ in range(a.repeats)]
            rates = [r[1] for r in runs]
            med = statistics.median(rates)
            print(f"| {n_sources} | {statistics.median(r[0] for r in runs):.2f} | {med:,.0f} | "
                  f"{med * runs[0][2] / (ny * nx) / 1e6:.0f} | {min(rates):,.0f}..{max(rates):,.0f} |")


if __name__ == "__main__":
    main()
