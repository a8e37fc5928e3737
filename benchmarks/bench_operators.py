"""Throughput of each streaming operator alone, on one core, on a synthetic sparse scan.

    python benchmarks/bench_operators.py [--scan 256 256] [--frame 576 576] [--events 100]
                                         [--chunk-frames 8192] [--repeats 7] [--sources 1]

The scan: Poisson(events) electrons per frame, ``--bf-fraction`` of them in a bright-field
disk (radius ``--bf-radius`` px, centre shifted a little per position), the rest uniform over
the detector. Each operator's ``process`` runs over every chunk into a fresh state; numba is
warmed first; the table gives the median of ``--repeats`` runs (min in brackets) as frames/s
and events/s. ``finalize`` is timed separately where it does real work.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from operators.apertures import RealSpaceApertures, rect_mask  # noqa: E402
from operators.chunk import Chunk  # noqa: E402
from operators.com import CenterOfMass  # noqa: E402
from operators.completeness import Completeness  # noqa: E402
from operators.diffraction import DiffractionSum  # noqa: E402
from operators.events import EventStore  # noqa: E402
from operators.virtual import VirtualDetectors, annulus_mask, disk_mask  # noqa: E402


def synthetic_scan(scan_shape, frame_shape, mean_events, bf_fraction, bf_radius, seed=0):
    """(counts (n,), indices uint32) of a raster scan without flyback, fpp 1."""
    rng = np.random.default_rng(seed)
    n = scan_shape[0] * scan_shape[1]
    h, w = frame_shape
    counts = rng.poisson(mean_events, n)
    n_ev = int(counts.sum())
    frame_of = np.repeat(np.arange(n), counts)
    shift = rng.normal(0, 2.0, (n, 2)).astype(np.float32)
    in_bf = rng.random(n_ev, dtype=np.float32) < bf_fraction
    r = bf_radius * np.sqrt(rng.random(n_ev, dtype=np.float32))
    t = rng.random(n_ev, dtype=np.float32) * np.float32(2 * np.pi)
    y = np.where(in_bf, (h - 1) / 2 + shift[frame_of, 0] + r * np.sin(t),
                 rng.random(n_ev, dtype=np.float32) * h - 0.5)
    x = np.where(in_bf, (w - 1) / 2 + shift[frame_of, 1] + r * np.cos(t),
                 rng.random(n_ev, dtype=np.float32) * w - 0.5)
    y = np.clip(np.rint(y), 0, h - 1).astype(np.uint32)
    x = np.clip(np.rint(x), 0, w - 1).astype(np.uint32)
    # Counted detectors read out row by row: events of a frame arrive sorted.
    order = np.lexsort((y * w + x, frame_of))
    return counts, (y * w + x)[order]


def make_chunks(counts, indices, chunk_frames, n_sources, frame_shape):
    """Split into chunks of ``chunk_frames`` frames; with n_sources > 1, row sectors."""
    n = len(counts)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    chunks = []
    h, w = frame_shape
    bounds = np.linspace(0, h, n_sources + 1).round().astype(np.int64)
    for a in range(0, n, chunk_frames):
        b = min(a + chunk_frames, n)
        ev = indices[offsets[a]:offsets[b]]
        frames = np.arange(a, b)
        if n_sources == 1:
            chunks.append(Chunk.from_counts(frames, np.zeros(b - a), frames, counts[a:b], ev))
            continue
        frame_of = np.repeat(np.arange(b - a), counts[a:b])
        sector = np.searchsorted(bounds, ev // w, side="right") - 1
        for s in range(n_sources):
            sel = sector == s
            c = np.bincount(frame_of[sel], minlength=b - a)
            chunks.append(Chunk.from_counts(frames, np.full(b - a, s), frames, c, ev[sel]))
    return chunks


def shuffle_within_frames(counts, indices, seed=1):
    """The same events in a random order within each frame, as a detector whose sectors or
    readout threads interleave delivers them."""
    frame_of = np.repeat(np.arange(len(counts)), counts)
    order = np.lexsort((np.random.default_rng(seed).random(len(indices)), frame_of))
    return indices[order]


def receiver_chunks(counts, indices, frame_shape, n_sources=4, batch=512, chunk_parts=4096):
    """Chunks as a receiver builds them from a detector of ``n_sources`` row sectors: each
    source sends messages of ``batch`` frames (its sector's part of each), the sources take
    turns, and every ``chunk_parts`` frame parts (``[chunking] max_frames``) become a chunk.
    Event order within a part is the frame's (stable split)."""
    n = len(counts)
    h, w = frame_shape
    frame_of = np.repeat(np.arange(n), counts)
    bounds = np.linspace(0, h, n_sources + 1).round().astype(np.int64)
    sector = np.searchsorted(bounds, indices // w, side="right") - 1
    per_source = []
    for s in range(n_sources):
        sel = sector == s
        c = np.bincount(frame_of[sel], minlength=n)
        per_source.append((c, indices[sel], np.concatenate([[0], np.cumsum(c)])))
    chunks, pending, parts = [], [], 0

    def flush():
        frames = np.concatenate([np.arange(a, a + len(c)) for _, a, c, _ in pending])
        sources = np.concatenate([np.full(len(c), s) for s, _, c, _ in pending])
        chunks.append(Chunk.from_counts(frames, sources, frames,
                                        np.concatenate([c for _, _, c, _ in pending]),
                                        np.concatenate([e for _, _, _, e in pending])))

    for a in range(0, n, batch):
        b = min(a + batch, n)
        for s, (c, ev, off) in enumerate(per_source):
            pending.append((s, a, c[a:b], ev[off[a]:off[b]]))
            parts += b - a
            if parts >= chunk_parts:
                flush()
                pending, parts = [], 0
    if pending:
        flush()
    return chunks


def frame_events(chunks):
    """The events of ``chunks`` frame by frame (each frame's parts in source order), as a
    tool that reads whole frames (stempy) gets them: (n_frames + 1,) offsets, indices."""
    frames = np.concatenate([c.frames for c in chunks])
    order = np.lexsort((np.concatenate([c.sources for c in chunks]), frames))
    offsets = np.concatenate([[0], np.cumsum(np.concatenate([c.counts for c in chunks]))])
    indices = np.concatenate([c.indices for c in chunks])
    out = np.concatenate([indices[offsets[i]:offsets[i + 1]] for i in order])
    per_frame = np.bincount(frames, weights=np.diff(offsets), minlength=frames.max() + 1)
    return np.concatenate([[0], np.cumsum(per_frame)]).astype(np.int64), out


def time_op(op, chunks, repeats):
    def once():
        state = op.new_state()
        t0 = time.perf_counter()
        for c in chunks:
            op.process(state, c)
        return time.perf_counter() - t0, state

    once()  # warm numba (compiled or loaded from cache) and the caches
    runs = [once() for _ in range(repeats)]
    times = sorted(r[0] for r in runs)
    return float(np.median(times)), times[0], runs[-1][1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scan", type=int, nargs=2, default=(256, 256))
    ap.add_argument("--frame", type=int, nargs=2, default=(576, 576))
    ap.add_argument("--events", type=float, default=100.0, help="mean electrons per frame")
    ap.add_argument("--bf-fraction", type=float, default=0.6)
    ap.add_argument("--bf-radius", type=float, default=40.0)
    ap.add_argument("--chunk-frames", type=int, default=8192)
    ap.add_argument("--sources", type=int, default=1, help="split frames into row sectors")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    scan_shape, frame_shape = tuple(args.scan), tuple(args.frame)

    counts, indices = synthetic_scan(scan_shape, frame_shape, args.events, args.bf_fraction,
                                     args.bf_radius)
    chunks = make_chunks(counts, indices, args.chunk_frames, args.sources, frame_shape)
    n_frames, n_events = len(counts), len(indices)
    r = args.bf_radius
    ny, nx = scan_shape
    ops = [
        ("VirtualDetectors: 2 annuli (bool)",
         VirtualDetectors(np.stack([annulus_mask(frame_shape, inner=0, outer=r),
                                    annulus_mask(frame_shape, inner=1.5 * r, outer=4 * r)]),
                          ["bf", "adf"], scan_shape)),
        ("VirtualDetectors: 8 rings (bool)",
         VirtualDetectors(np.stack([annulus_mask(frame_shape, inner=i * r / 2,
                                                 outer=(i + 1) * r / 2) for i in range(8)]),
                          [f"ring{i}" for i in range(8)], scan_shape)),
        ("VirtualDetectors: 16 random masks (bool)",
         VirtualDetectors(np.random.default_rng(1).random((16, *frame_shape)) < 0.1,
                          [f"m{i}" for i in range(16)], scan_shape)),
        ("VirtualDetectors: 100 random masks (bool)",
         VirtualDetectors(np.random.default_rng(1).random((100, *frame_shape)) < 0.01,
                          [f"m{i}" for i in range(100)], scan_shape)),
        ("VirtualDetectors: 2 piecewise-constant float masks",
         VirtualDetectors(np.stack([disk_mask(frame_shape, radius=r) * 0.5,
                                    annulus_mask(frame_shape, inner=r, outer=3 * r) * 1.7]),
                          ["p0", "p1"], scan_shape)),
        ("VirtualDetectors: 2 random float masks",
         VirtualDetectors(np.random.default_rng(2).random((2, *frame_shape)), ["w0", "w1"],
                          scan_shape)),
        ("CenterOfMass (all electrons)", CenterOfMass(scan_shape, frame_shape)),
        ("CenterOfMass (radius 1.2 x BF)", CenterOfMass(scan_shape, frame_shape, radius=1.2 * r)),
        ("DiffractionSum", DiffractionSum(frame_shape)),
        ("RealSpaceApertures: 4 overlapping rects",
         RealSpaceApertures(np.stack([rect_mask(scan_shape, 0, ny // 2, 0, nx // 2),
                                      rect_mask(scan_shape, ny // 4, 3 * ny // 4,
                                                nx // 4, 3 * nx // 4),
                                      rect_mask(scan_shape, ny // 2, ny, 0, nx),
                                      rect_mask(scan_shape, 0, ny, nx - 8, nx)]),
                            ["a", "b", "c", "d"], frame_shape)),
        ("Completeness", Completeness(args.sources, scan_shape)),
        ("EventStore (copy + sort)", EventStore(scan_shape, frame_shape)),
    ]
    rows = []
    for label, op in ops:
        med, best, state = time_op(op, chunks, args.repeats)
        fin = f"kernel {op.kernel!r}" if isinstance(op, VirtualDetectors) else ""
        if isinstance(op, EventStore):
            op.finalize(state)
            t = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                op.finalize(state)
                t.append(time.perf_counter() - t0)
            fin = f"finalize {np.median(t) * 1e3:.0f} ms"
        rows.append((label, med, best, fin))
        print(f"  {label}: {n_events / med / 1e6:.1f} M events/s", file=sys.stderr)

    cmd = ["python", "benchmarks/bench_operators.py"] + (sys.argv[1:] if argv is None else argv)
    print(f"`{' '.join(cmd)}`\n")
    print(f"{n_frames} frames ({ny}x{nx} positions), detector {frame_shape[0]}x{frame_shape[1]}, "
          f"{n_events} events ({n_events / n_frames:.1f}/frame, {args.bf_fraction:.0%} in a BF "
          f"disk of radius {r:g} px), {len(chunks)} chunks of {args.chunk_frames} frames, "
          f"{args.sources} source(s); one thread; median (best) of {args.repeats} runs; "
          f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, "
          f"numpy {np.__version__}.\n")
    print("| operator | ms | M frames/s | M events/s | notes |")
    print("|---|---:|---:|---:|---|")
    for label, med, best, fin in rows:
        print(f"| {label} | {med * 1e3:.1f} ({best * 1e3:.1f}) | {n_frames / med / 1e6:.2f} | "
              f"{n_events / med / 1e6:.0f} | {fin} |")


if __name__ == "__main__":
    main()
