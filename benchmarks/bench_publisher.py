"""Emulator publishing speed: prepared frames over loopback to receivers in other processes.

    .venv/bin/python benchmarks/bench_publisher.py [--scan 512x512] [--detector 576x576]
        [--dose 100] [--sources 1 4] [--receivers 1] [--batch 512] [--repeats 5]

The frames are prepared once (Poisson electrons per frame, uniform over the detector), split
into the sources' row sectors, then published as fast as the receivers take them
(``--rate max``). Each receiver is a separate process with one PULL socket connected to every
source that decodes every message with the protocol's validation (as the real receivers do)
and counts frames. The figure is frames/s from the publisher's first send until the receiver
has every frame and every ``end`` (so socket buffers cannot flatter it), median of
``--repeats`` runs. Requirement: at least 500,000 frames/s at 100 e-/frame.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sim_detector.publisher import Publisher, prepare_sources  # noqa: E402
from stream.transport.net import free_port_block  # noqa: E402
from stream.transport.protocol import Geometry  # noqa: E402


def receiver(addresses, n_ends, ready, result):
    import zmq

    from stream.transport.protocol import decode
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    for a in addresses:
        pull.connect(a)
    ready.set()
    frames = ends = 0
    while ends < n_ends:
        m = decode(pull.recv_multipart(copy=False))
        if m.kind == "frames":
            frames += m.count
        ends += m.kind == "end"
    result.put((frames, time.time()))
    pull.close()
    ctx.term()


def run_once(counts, indices, geometry, n_sources, n_receivers, batch):
    port = free_port_block(n_sources)
    with Publisher(f"tcp://127.0.0.1:{port}", n_sources, sndhwm=64) as pub:
        sources = prepare_sources(counts, indices, geometry, n_sources)
        result = mp.Queue()
        # every end message reaches exactly one receiver: the first to see them all stops the rest
        procs, ready = [], []
        for _ in range(n_receivers):
            ev = mp.Event()
            p = mp.Process(target=receiver, args=(pub.addresses, n_sources if n_receivers == 1 else 1, ev, result))
            p.start()
            procs.append(p)
            ready.append(ev)
        for ev in ready:
            ev.wait(30)
        pub.wait_for_receivers(30)
        time.sleep(0.3)
        t0 = time.time()
        pub.publish_scan("bench", sources, {}, rate=None, batch=batch)
        frames, t_end = result.get(timeout=120)
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.terminate()
    assert frames == geometry.n_frames * n_sources or n_receivers > 1, frames  # parts of frames
    return geometry.n_frames / (t_end - t0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scan", default="512x512")
    ap.add_argument("--detector", default="576x576")
    ap.add_argument("--dose", type=float, default=100.0)
    ap.add_argument("--sources", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--receivers", type=int, default=1)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)
    ny, nx = (int(v) for v in a.scan.split("x"))
    h, w = (int(v) for v in a.detector.split("x"))
    g = Geometry((ny, nx), (h, w))
    rng = np.random.default_rng(0)
    counts = rng.poisson(a.dose, g.n_frames).astype(np.uint32)
    indices = rng.integers(0, h * w, int(counts.sum()), dtype=np.uint32)
    print(f"command: {' '.join(['python', 'benchmarks/bench_publisher.py'] + (argv or sys.argv[1:]))}")
    print(f"scan {ny}x{nx} ({g.n_frames:,} frames), detector {h}x{w}, {a.dose:g} e-/frame, "
          f"batch {a.batch}, {a.receivers} receiver process(es), median of {a.repeats}\n")
    print("| sources | frames/s | M events/s | MB/s of events | min..max frames/s |")
    print("|---:|---:|---:|---:|---:|")
    for n_sources in a.sources:
        rates = []
        for _ in range(a.repeats):
            rates.append(run_once(counts, indices, g, n_sources, a.receivers, a.batch))
        med = statistics.median(rates)
        ev_rate = med * counts.mean()
        print(f"| {n_sources} | {med:,.0f} | {ev_rate / 1e6:.1f} | {ev_rate * 4 / 1e6:,.0f} | "
              f"{min(rates):,.0f}..{max(rates):,.0f} |")


if __name__ == "__main__":
    main()
