"""The fused streaming pass against the separate operators and stempy, on one core.

    python benchmarks/bench_fused.py [--events 100 1000] [--order sorted unsorted]
                                     [--scan 256 256] [--frame 576 576] [--repeats 7]
                                     [--chunk-frames 8192] [--sources 1] [--cpu auto] [--no-stempy]

Same synthetic scan as benchmarks/bench_operators.py (Poisson electrons per frame, 60 % in a
bright-field disk of radius 40 px whose centre moves a little per position, the rest uniform).
Measured on the same events, in the same process, pinned to one CPU (``--cpu``; by default
the one idle longest over a second, since other programs may share the machine):

- ``FusedStreaming``: two annular images (BF 0-40 px, ADF 60-160 px), centre of mass (all
  electrons, or within 48 px), summed diffraction pattern, in one pass;
- the three separate operators in sequence (VirtualDetectors, CenterOfMass, DiffractionSum),
  and each alone;
- stempy (if installed): ``create_stem_images`` with the same two annuli, ``com_sparse`` and
  ``SparseArray.sum``, on a SparseArray built from the same CSR events (not timed).

Median (best) of ``--repeats`` runs after a warm-up; frames/s and events/s; ratio to stempy's
``create_stem_images``. Events are sorted within frames as the receiver delivers them;
``--order unsorted`` shuffles them within frames. The script checks that the fused results
equal the separate operators' bit for bit, and compares stempy's images (each electron
weighted by a constant, found from a one-electron array) with ours.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_operators import make_chunks, synthetic_scan  # noqa: E402
from operators.com import CenterOfMass  # noqa: E402
from operators.diffraction import DiffractionSum  # noqa: E402
from operators.fused import FusedStreaming  # noqa: E402
from operators.virtual import VirtualDetectors, annulus_mask  # noqa: E402

RADII = [(0, 40), (60, 160)]  # px; pixel centres are never at an integer distance here


def idlest_cpu(seconds=1.0):
    """The CPU that was idle the longest over ``seconds`` (from /proc/stat), or None."""
    def idle():
        with open("/proc/stat") as f:
            return {int(p[0][3:]): int(p[4]) for p in (line.split() for line in f)
                    if p[0].startswith("cpu") and p[0] != "cpu"}
    try:
        a = idle()
        time.sleep(seconds)
        b = idle()
    except OSError:
        return None
    allowed = os.sched_getaffinity(0)
    return max((c for c in b if c in allowed), key=lambda c: b[c] - a.get(c, 0), default=None)


def median_best(fn, repeats):
    fn()  # warm: numba compiled or loaded from its cache, caches filled
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), float(min(times))


def run_ops(ops, chunks):
    states = [op.new_state() for op in ops]
    for c in chunks:
        for op, st in zip(ops, states):
            op.process(st, c)
    return states


def shuffle_within_frames(counts, indices, seed=1):
    frame_of = np.repeat(np.arange(len(counts)), counts)
    order = np.lexsort((np.random.default_rng(seed).random(len(indices)), frame_of))
    return indices[order]


def stempy_cases(counts, indices, scan_shape, frame_shape, ours, repeats):
    """[(label, median, best)] for stempy's kernels, and a line comparing its images with ours."""
    import stempy.image as si
    import stempy.io as sio

    off = np.r_[0, np.cumsum(counts)]
    data = np.empty((len(counts), 1), object)
    for i in range(len(counts)):
        data[i, 0] = indices[off[i]:off[i + 1]]
    sa = sio.SparseArray(data, scan_shape=scan_shape, frame_shape=frame_shape)
    h, w = frame_shape
    center_xy = ((w - 1) / 2, (h - 1) / 2)  # stempy takes (x, y)
    inner, outer = [r[0] for r in RADII], [r[1] for r in RADII]
    rows = []
    out = {}

    def stem():
        out["images"] = si.create_stem_images(sa, inner, outer, center=center_xy)

    def com():
        out["com"] = si.com_sparse(sa)

    def total():
        out["sum"] = sa.sum(axis=(0, 1))

    for label, fn in (("stempy create_stem_images, 2 annuli", stem),
                      ("stempy com_sparse", com), ("stempy SparseArray.sum", total)):
        rows.append((label, *median_best(fn, repeats)))
        print(f"  {label}: done", file=sys.stderr)
    # stempy weights each electron by its mask value (65535): find it from one electron.
    one = np.empty((1, 1), object)
    one[0, 0] = np.array([(h // 2) * w + w // 2], np.uint32)
    unit = int(si.create_stem_images(sio.SparseArray(one, scan_shape=(1, 1),
                                                     frame_shape=frame_shape),
                                     [0], [outer[0]], center=center_xy)[0, 0, 0])
    same = [np.array_equal(out["images"][k], ours[n] * unit) for k, n in enumerate(("bf", "adf"))]
    com_x, com_y = out["com"][0], out["com"][1]
    n, sy, sx = (ours[k] for k in ("com_n", "com_sum_y", "com_sum_x"))
    ok = n > 0
    dev = max(np.abs(com_y[ok] - sy[ok] / n[ok]).max(), np.abs(com_x[ok] - sx[ok] / n[ok]).max())
    note = (f"stempy's images = ours x {unit}: bf {same[0]}, adf {same[1]}; stempy's com_sparse "
            f"differs from our sum/n by at most {dev:.2g} px (it works in float32); "
            f"SparseArray.sum equals our diffraction_sum: ")
    if np.array_equal(out["sum"], ours["diffraction_sum"]):
        note += "True"
    else:
        # stempy's sum sets a frame's pixels rather than adding them: a pixel hit twice in
        # one frame counts once. Check that this is the whole difference.
        frame_of = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
        once = np.unique(frame_of * (h * w) + indices) % (h * w)
        ok = np.array_equal(out["sum"], np.bincount(once, minlength=h * w).reshape(h, w))
        note += (f"False: it counts a pixel hit twice in one frame once "
                 f"({len(indices) - len(once)} such events here); with those dropped, equal: {ok}")
    return rows, note


def bench(args, mean_events, order):
    load = os.getloadavg()[0]
    scan_shape, frame_shape = tuple(args.scan), tuple(args.frame)
    counts, indices = synthetic_scan(scan_shape, frame_shape, mean_events, 0.6, 40.0)
    if order == "unsorted":
        indices = shuffle_within_frames(counts, indices)
    chunks = make_chunks(counts, indices, args.chunk_frames, args.sources, frame_shape)
    n_frames, n_events = len(counts), len(indices)

    masks = np.stack([annulus_mask(frame_shape, inner=a, outer=b) for a, b in RADII])
    vd = VirtualDetectors(masks, ["bf", "adf"], scan_shape)
    com = CenterOfMass(scan_shape, frame_shape)
    com_r = CenterOfMass(scan_shape, frame_shape, radius=48.0, name="comr")
    ds = DiffractionSum(frame_shape)
    fused = FusedStreaming(vd, com, ds)
    fused_r = FusedStreaming(vd, com_r, ds, name="fused_r")
    cases = [
        (f"**FusedStreaming: 2 annuli + CoM + sum, one pass** ({fused.n_codes} pixel classes)",
         [fused]),
        (f"FusedStreaming, CoM within 48 px ({fused_r.n_codes} pixel classes)", [fused_r]),
        ("separate operators in sequence: VirtualDetectors + CenterOfMass + DiffractionSum",
         [vd, com, ds]),
        ("VirtualDetectors alone, 2 annuli", [vd]),
        ("CenterOfMass alone", [com]),
        ("DiffractionSum alone", [ds]),
    ]
    rows = []
    for label, ops in cases:
        med, best = median_best(lambda: run_ops(ops, chunks), args.repeats)
        rows.append((label, med, best))
        print(f"  {label}: {n_events / med / 1e6:.0f} M events/s", file=sys.stderr)

    # The fused results must be the separate operators' results, bit for bit.
    (fs,) = run_ops([fused], chunks)
    ours = fused.finalize(fs)
    sep = {}
    for op, st in zip((vd, com, ds), run_ops([vd, com, ds], chunks)):
        sep.update(op.finalize(st))
    assert list(ours) == list(sep) and all(
        np.array_equal(ours[k].data, sep[k].data, equal_nan=True) for k in sep), "fused != separate"
    notes = ["fused results equal the separate operators' bit for bit (checked)"]

    if not args.no_stempy:
        try:
            srows, note = stempy_cases(counts, indices, scan_shape, frame_shape,
                                       {k: r.data for k, r in ours.items()}, args.repeats)
            rows += srows
            notes.append(note)
        except ImportError:
            notes.append("stempy not installed: no stempy rows")
    return dict(order=order, events=mean_events, n_frames=n_frames, n_events=n_events,
                n_chunks=len(chunks), rows=rows, notes=notes, load=(load, os.getloadavg()[0]))


def print_table(args, res):
    rows = res["rows"]
    ref = next((r for r in rows if r[0].startswith("stempy create_stem_images")), None)
    print(f"\n### {res['events']:g} e-/frame, events {res['order']} within frames\n")
    print(f"{res['n_frames']} frames ({args.scan[0]}x{args.scan[1]} positions), detector "
          f"{args.frame[0]}x{args.frame[1]}, {res['n_events']} events "
          f"({res['n_events'] / res['n_frames']:.1f}/frame), {res['n_chunks']} chunks of "
          f"{args.chunk_frames} frames, {args.sources} source(s); 1-minute load average "
          f"{res['load'][0]:.2f} before, {res['load'][1]:.2f} after.\n")
    head = "| | ms median (best) | M frames/s | M events/s |"
    print(head + (" × stempy create_stem_images |" if ref else ""))
    print("|---|---:|---:|---:|" + ("---:|" if ref else ""))
    for label, med, best in rows:
        line = (f"| {label} | {med * 1e3:.1f} ({best * 1e3:.1f}) | "
                f"{res['n_frames'] / med / 1e6:.2f} | {res['n_events'] / med / 1e6:.0f} |")
        if ref:
            line += f" {ref[1] / med:.2f} |"
        print(line)
    print()
    for n in res["notes"]:
        print(f"- {n}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scan", type=int, nargs=2, default=(256, 256))
    ap.add_argument("--frame", type=int, nargs=2, default=(576, 576))
    ap.add_argument("--events", type=float, nargs="+", default=[100.0, 1000.0],
                    help="mean electrons per frame (one table each)")
    ap.add_argument("--order", nargs="+", default=["sorted", "unsorted"],
                    choices=["sorted", "unsorted"])
    ap.add_argument("--chunk-frames", type=int, default=8192)
    ap.add_argument("--sources", type=int, default=1, help="split frames into row sectors")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--cpu", default="auto",
                    help="CPU to pin to: a number, 'auto' (the idlest over 1 s) or 'none'")
    ap.add_argument("--no-stempy", action="store_true")
    args = ap.parse_args(argv)
    if args.repeats < 5:
        ap.error("--repeats must be at least 5 (the tables report medians)")
    cpu = idlest_cpu() if args.cpu == "auto" else None if args.cpu == "none" else int(args.cpu)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    load_before = os.getloadavg()
    results = [bench(args, ev, order) for ev in args.events for order in args.order]
    load_after = os.getloadavg()

    cmd = ["python", "benchmarks/bench_fused.py"] + (sys.argv[1:] if argv is None else argv)
    print(f"`{' '.join(cmd)}`\n")
    print(f"One thread{'' if cpu is None else f', pinned to CPU {cpu}'}; "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; Python "
          f"{platform.python_version()}, numpy {np.__version__}; load average (1, 5, 15 min) "
          f"{', '.join(f'{x:.2f}' for x in load_before)} before, "
          f"{', '.join(f'{x:.2f}' for x in load_after)} after.")
    for res in results:
        print_table(args, res)


if __name__ == "__main__":
    main()
