"""The fused streaming pass against stempy, on one core, on events as a 4-sector detector delivers them.

    .venv/bin/python benchmarks/bench_fused.py [--events 100 1000] [--order sorted unsorted]
        [--scan 256 256] [--frame 576 576] [--sources 4] [--batch 512] [--chunk-frames 4096]
        [--repeats 7] [--cpu auto] [--wait-for-load LOAD] [--stempy-all] [--no-stempy]
        [--json PATH]

Same synthetic scan as benchmarks/bench_operators.py (Poisson electrons per frame, 60 % in a
bright-field disk of radius 40 px whose centre moves a little per position, the rest uniform).
Events arrive as the pipeline's receivers get them from the 4D Camera or the emulator: every
frame split into ``--sources`` row sectors, each source sending messages of ``--batch`` frames
(its sector's part of each), the sources taking turns, ``--chunk-frames`` frame parts per chunk
(the receiver's ``[chunking] max_frames``). ``sorted``: events sorted by pixel within each part;
``unsorted``: in random order within each frame (and so within each part), as a detector whose
sectors and readout threads interleave delivers them. Both orders, both doses, side by side.

Measured on the same events, in the same process, pinned to one CPU (``--cpu``; by default
the one idle longest over a second, since other programs may share the machine):

- ``FusedStreaming``: two annular images (BF 0-40 px, ADF 60-160 px), centre of mass (all
  electrons, or within 48 px), summed diffraction pattern, in one pass over the events;
- the three operators one after another, and each alone;
- the floor: a numba pass that only reads every event once (contiguous loads), the least any
  one-pass kernel costs;
- stempy (if installed): ``create_stem_images`` with the same two annuli on whole frames (the
  sectors' parts of a frame concatenated, in the same order), and with ``--stempy-all`` also
  ``com_sparse`` and ``SparseArray.sum``; its SparseArray is built outside the timing.

Every case runs once per round, ``--repeats`` rounds, the order of the cases rotating, so a
change in the machine's load falls on all of them alike. Times are the process's CPU time
(pinned to one core, so the time it really ran: on a shared machine the wall time also counts
the other programs' turns; both are in the tables, and the share of the core the benchmark
got); tables give the median (best). "fused ÷ stempy" is the median over rounds of stempy's
time over the fused pass's time in the same round. The script checks that the fused results equal the separate operators' bit
for bit and that stempy's images are ours times its weight of one electron.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_operators import (frame_events, receiver_chunks, shuffle_within_frames,
                             synthetic_scan)
from common import load_average, read_pass, wait_for_load
from operators.com import CenterOfMass
from operators.diffraction import DiffractionSum
from operators.fused import FusedStreaming
from operators.virtual import VirtualDetectors, annulus_mask

RADII = [(0, 40), (60, 160)]  # px; pixel centres are never at an integer distance here
FUSED = "FusedStreaming: 2 annuli + CoM + sum, one pass"
STEMPY = "stempy create_stem_images, 2 annuli"
FLOOR = "floor: one pass reading every event"
TARGET = 2.5  # issue 19: fused >= 2.5x stempy's create_stem_images, one core


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


def rounds(cases, repeats):
    """({label: [CPU seconds per round]}, {label: [wall seconds per round]}): one warm-up
    call each (numba compiled or loaded, caches filled), then ``repeats`` rounds of every
    case, the starting case rotating."""
    for fn in cases.values():
        fn()
    labels = list(cases)
    cpu = {k: [] for k in labels}
    wall = {k: [] for k in labels}
    for r in range(repeats):
        for k in labels[r % len(labels):] + labels[:r % len(labels)]:
            c0, t0 = time.process_time(), time.perf_counter()
            cases[k]()
            cpu[k].append(time.process_time() - c0)
            wall[k].append(time.perf_counter() - t0)
    return cpu, wall


def run_ops(ops, chunks):
    states = [op.new_state() for op in ops]
    for c in chunks:
        for op, st in zip(ops, states):
            op.process(st, c)
    return states


def stempy_cases(counts, indices, scan_shape, frame_shape, everything):
    """({label: function}, check(ours) -> note): stempy's kernels on whole frames."""
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
    out = {}
    cases = {STEMPY: lambda: out.__setitem__(
        "images", si.create_stem_images(sa, inner, outer, center=center_xy))}
    if everything:
        cases["stempy com_sparse"] = lambda: out.__setitem__("com", si.com_sparse(sa))
        cases["stempy SparseArray.sum"] = lambda: out.__setitem__("sum", sa.sum(axis=(0, 1)))

    def check(ours):
        # stempy weights each electron by its mask value (65535): find it from one electron.
        one = np.empty((1, 1), object)
        one[0, 0] = np.array([(h // 2) * w + w // 2], np.uint32)
        unit = int(si.create_stem_images(sio.SparseArray(one, scan_shape=(1, 1),
                                                         frame_shape=frame_shape),
                                         [0], [outer[0]], center=center_xy)[0, 0, 0])
        same = [np.array_equal(out["images"][k], ours[n] * unit) for k, n in enumerate(("bf", "adf"))]
        note = f"stempy's images = ours x {unit}: bf {same[0]}, adf {same[1]}"
        if "com" in out:
            n, sy, sx = (ours[k] for k in ("com_n", "com_sum_y", "com_sum_x"))
            ok = n > 0
            dev = max(np.abs(out["com"][1][ok] - sy[ok] / n[ok]).max(),
                      np.abs(out["com"][0][ok] - sx[ok] / n[ok]).max())
            note += f"; com_sparse within {dev:.2g} px of our sum/n (it works in float32)"
        if "sum" in out:  # it counts a pixel hit twice in one frame once
            note += (f"; SparseArray.sum equals our diffraction_sum: "
                     f"{np.array_equal(out['sum'], ours['diffraction_sum'])}")
        return all(same), note

    return cases, check


def bench(args, mean_events, order):
    load = load_average()
    scan_shape, frame_shape = tuple(args.scan), tuple(args.frame)
    counts, indices = synthetic_scan(scan_shape, frame_shape, mean_events, 0.6, 40.0)
    if order == "unsorted":
        indices = shuffle_within_frames(counts, indices)
    chunks = receiver_chunks(counts, indices, frame_shape, args.sources, args.batch,
                             args.chunk_frames)
    frame_off, frame_indices = frame_events(chunks)  # stempy reads whole frames
    n_frames, n_events = len(counts), len(indices)

    masks = np.stack([annulus_mask(frame_shape, inner=a, outer=b) for a, b in RADII])
    vd = VirtualDetectors(masks, ["bf", "adf"], scan_shape)
    com = CenterOfMass(scan_shape, frame_shape)
    com_r = CenterOfMass(scan_shape, frame_shape, radius=48.0, name="comr")
    ds = DiffractionSum(frame_shape)
    fused = FusedStreaming(vd, com, ds)
    fused_r = FusedStreaming(vd, com_r, ds, name="fused_r")
    floor_out = np.zeros(scan_shape[0] * scan_shape[1], np.int64)
    cases = {
        FUSED: lambda: run_ops([fused], chunks),
        f"FusedStreaming, CoM within 48 px ({fused_r.n_codes} pixel classes)":
            lambda: run_ops([fused_r], chunks),
        "separate operators in sequence: VirtualDetectors + CenterOfMass + DiffractionSum":
            lambda: run_ops([vd, com, ds], chunks),
        "VirtualDetectors alone, 2 annuli": lambda: run_ops([vd], chunks),
        "CenterOfMass alone": lambda: run_ops([com], chunks),
        "DiffractionSum alone": lambda: run_ops([ds], chunks),
        FLOOR: lambda: [read_pass(c.positions, c.offsets, c.indices, floor_out) for c in chunks],
    }
    # The fused results must be the separate operators' results, bit for bit.
    (fs,) = run_ops([fused], chunks)
    ours = fused.finalize(fs)
    sep = {}
    for op, st in zip((vd, com, ds), run_ops([vd, com, ds], chunks)):
        sep.update(op.finalize(st))
    same = list(ours) == list(sep) and all(
        np.array_equal(ours[k].data, sep[k].data, equal_nan=True) for k in sep)
    checks = [("fused results equal the separate operators' bit for bit", same)]
    notes = []
    check_stempy = None
    if not args.no_stempy:
        try:
            extra, check_stempy = stempy_cases(np.diff(frame_off), frame_indices, scan_shape,
                                               frame_shape, args.stempy_all)
            cases.update(extra)
        except ImportError:
            notes.append("stempy not installed: no stempy rows (pip install -e '.[peers]')")
    print(f"  {mean_events:g} e-/frame, {order}: {len(cases)} cases x {args.repeats} rounds",
          file=sys.stderr)
    times, wall = rounds(cases, args.repeats)
    cpu_share = sum(map(sum, times.values())) / sum(map(sum, wall.values()))
    if check_stempy is not None:
        ok, note = check_stempy({k: r.data for k, r in ours.items()})
        checks.append(("stempy's images equal ours (times its weight of one electron)", ok))
        notes.append(note)
    for label, ok in checks:
        if not ok:
            print(f"  check FAILED: {label}", file=sys.stderr)
    paired = None
    if STEMPY in times:
        paired = float(np.median(np.array(times[STEMPY]) / np.array(times[FUSED])))
    return dict(order=order, events=mean_events, n_frames=n_frames, n_events=n_events,
                n_chunks=len(chunks), n_codes=fused.n_codes,
                times={k: [round(t, 6) for t in v] for k, v in times.items()},
                wall={k: [round(t, 6) for t in v] for k, v in wall.items()},
                fused_over_stempy=paired, checks=checks, notes=notes, cpu_share=cpu_share,
                load=(load[0], load_average()[0]))


def med(v):
    return float(np.median(v))


def print_table(args, res):
    times = res["times"]
    ref = times.get(STEMPY)
    print(f"\n### {res['events']:g} e-/frame, events {res['order']} within frames\n")
    print(f"{res['n_frames']} frames ({args.scan[0]}x{args.scan[1]} positions), detector "
          f"{args.frame[0]}x{args.frame[1]}, {res['n_events']} events "
          f"({res['n_events'] / res['n_frames']:.1f}/frame), {args.sources} sources, "
          f"{res['n_chunks']} chunks of {args.chunk_frames} frame parts; fused: {res['n_codes']} "
          f"pixel classes; 1-minute load average {res['load'][0]:.2f} before, "
          f"{res['load'][1]:.2f} after; this thread got {res['cpu_share']:.0%} of its core.\n")
    head = "| | ms median (best) | wall ms | M frames/s | M events/s | × floor |"
    print(head + (" × stempy create_stem_images |" if ref else ""))
    print("|---|---:|---:|---:|---:|---:|" + ("---:|" if ref else ""))
    floor = med(times[FLOOR])
    for label, ts in times.items():
        m = med(ts)
        name = f"**{label}**" if label == FUSED else label
        line = (f"| {name} | {m * 1e3:.1f} ({min(ts) * 1e3:.1f}) | "
                f"{med(res['wall'][label]) * 1e3:.1f} | "
                f"{res['n_frames'] / m / 1e6:.2f} | {res['n_events'] / m / 1e6:.0f} | "
                f"{m / floor:.2f} |")
        if ref:
            line += f" {med(ref) / m:.2f} |"
        print(line)
    print()
    for label, ok in res["checks"]:
        print(f"- {label}: {'yes' if ok else '**NO**'}")
    for n in res["notes"]:
        print(f"- {n}")


def print_summary(results):
    print(f"\n### Summary: fused ÷ stempy `create_stem_images` (median of the rounds' ratios; "
          f"target ≥ {TARGET})\n")
    print("| e⁻/frame | order | fused M events/s | stempy M events/s | fused ÷ stempy | met | "
          "fused ÷ floor (time) |")
    print("|---:|---|---:|---:|---:|:---:|---:|")
    for r in results:
        t = r["times"]
        fused, floor = med(t[FUSED]), med(t[FLOOR])
        sp = med(t[STEMPY]) if STEMPY in t else None
        ratio = r["fused_over_stempy"]
        print(f"| {r['events']:g} | {r['order']} | {r['n_events'] / fused / 1e6:.0f} | "
              + (f"{r['n_events'] / sp / 1e6:.0f}" if sp else "-") + " | "
              + (f"{ratio:.2f}" if ratio else "-") + " | "
              + ("-" if ratio is None else "yes" if ratio >= TARGET else "**no**")
              + f" | {fused / floor:.2f} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scan", type=int, nargs=2, default=(256, 256))
    ap.add_argument("--frame", type=int, nargs=2, default=(576, 576))
    ap.add_argument("--events", type=float, nargs="+", default=[100.0, 1000.0],
                    help="mean electrons per frame (one table each)")
    ap.add_argument("--order", nargs="+", default=["sorted", "unsorted"],
                    choices=["sorted", "unsorted"])
    ap.add_argument("--sources", type=int, default=4, help="detector row sectors (4D Camera: 4)")
    ap.add_argument("--batch", type=int, default=512,
                    help="frames per message of each source (the emulator's default)")
    ap.add_argument("--chunk-frames", type=int, default=4096,
                    help="frame parts per chunk (the receiver's [chunking] max_frames)")
    ap.add_argument("--repeats", type=int, default=7, help="rounds (every case once per round)")
    ap.add_argument("--cpu", default="auto",
                    help="CPU to pin to: a number, 'auto' (the idlest over 1 s) or 'none'")
    ap.add_argument("--wait-for-load", type=float, default=None, metavar="LOAD",
                    help="first wait (up to 10 min) for the 1-minute load average to fall to LOAD")
    ap.add_argument("--stempy-all", action="store_true",
                    help="also time stempy's com_sparse and SparseArray.sum (slow)")
    ap.add_argument("--no-stempy", action="store_true")
    ap.add_argument("--json", metavar="PATH", help="also write the times as JSON")
    args = ap.parse_args(argv)
    if args.repeats < 5:
        ap.error("--repeats must be at least 5 (the tables report medians)")
    wait_for_load(args.wait_for_load)
    cpu = idlest_cpu() if args.cpu == "auto" else None if args.cpu == "none" else int(args.cpu)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    load_before = os.getloadavg()
    results = [bench(args, ev, order) for ev in args.events for order in args.order]
    load_after = os.getloadavg()

    cmd = [".venv/bin/python", "benchmarks/bench_fused.py"] + (sys.argv[1:] if argv is None else argv)
    print(f"`{' '.join(cmd)}`\n")
    print(f"One thread{'' if cpu is None else f', pinned to CPU {cpu}'}; "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; Python "
          f"{platform.python_version()}, numpy {np.__version__}; load average (1, 5, 15 min) "
          f"{', '.join(f'{x:.2f}' for x in load_before)} before, "
          f"{', '.join(f'{x:.2f}' for x in load_after)} after.")
    print_summary(results)
    for res in results:
        print_table(args, res)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(
            {"command": " ".join(cmd), "cpu": cpu, "load": [load_before, load_after],
             "args": vars(args), "results": results}, indent=1))
    failed = [label for r in results for label, ok in r["checks"] if not ok]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
