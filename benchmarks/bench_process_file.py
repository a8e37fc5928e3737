"""Re-analysis speed: `process-file` over a recorded scan on a local cluster.

    .venv/bin/python benchmarks/bench_process_file.py [--scan 512x512] [--dose 100] [--workers 2] [--repeats 3]

The scan file is the one benchmarks/bench_replay.py writes (Poisson electrons, uniform over a
576 × 576 detector, sorted within frames, gzip level 1). Each run is ``stream.session.offline.process_file``
with the default configuration (bf, adf, centre of mass, diffraction sum): workers read their own
frame ranges, merge, and one writes the new file (events copied raw). The cluster is started
once, outside the timing; the first run (numba compilation in the workers) is not counted.
For scale, the same script times reading the file's events alone in this process (one thread).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_replay import write_file  # noqa: E402
from stream.config import ClusterSpec, OutputSpec, PipelineConfig, validate  # noqa: E402
from stream.session.offline import process_file  # noqa: E402
from stream.files.recording import open_recording  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scan", default="512x512")
    ap.add_argument("--dose", type=float, default=100.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    ny, nx = (int(v) for v in a.scan.split("x"))
    from stream.session import cluster
    with tempfile.TemporaryDirectory() as tmp:
        path = write_file(Path(tmp) / "bench.h5", ny, nx, 576, 576, a.dose)
        cfg = validate(PipelineConfig(output=OutputSpec(dir=str(Path(tmp) / "out"), previews=False),
                                      cluster=ClusterSpec(workers=a.workers)))
        client, local = cluster.connect(cfg.cluster)
        try:
            process_file(path, cfg, client)  # warm-up: numba compiles (or loads its cache) in the workers
            times, reads = [], []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                r = process_file(path, cfg, client)
                times.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                open_recording(path).read()
                reads.append(time.perf_counter() - t0)
        finally:
            client.close()
            if local:
                local.close()
        med, rmed = statistics.median(times), statistics.median(reads)
        print(f"command: {' '.join(['python', 'benchmarks/bench_process_file.py'] + (argv or sys.argv[1:]))}")
        print(f"scan {ny}x{nx}, 576x576 detector, {a.dose:g} e-/frame ({r.events / 1e6:.1f} M electrons), "
              f"{a.workers} workers, median of {a.repeats}\n")
        print("| step | seconds | frames/s | M electrons/s |")
        print("|---|---:|---:|---:|")
        print(f"| process-file (read, 4 operators, merge, write) | {med:.2f} ({min(times):.2f}..{max(times):.2f}) | "
              f"{ny * nx / med:,.0f} | {r.events / med / 1e6:.0f} |")
        print(f"| reading the events alone, one thread | {rmed:.2f} | {ny * nx / rmed:,.0f} | {r.events / rmed / 1e6:.0f} |")


if __name__ == "__main__":
    main()
