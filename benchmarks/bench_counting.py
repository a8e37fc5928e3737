"""Electron counting of raw 4D Camera frames: ours against stempy's ``electron_count`` on the
same frames, one core and all cores (issue 15).

    .venv/bin/python benchmarks/bench_counting.py [--frames 2048] [--repeats 3] [--quick]
        [--dir DIR] [--wait-for-load LOAD] [--out DIR | --json PATH] [--report JSON]

Data: the emulator's raw frames (sim_detector/raw.py: MgO, 100 e-/frame over a wide
bright-field disk, 0.12 mrad/px, X-rays 0.05 per frame, 576 x 576 uint16), written as 4D
Camera version-5 raw files (four sector files) into ``--dir`` (default /dev/shm when it
exists). Every run counts every frame.

- stempy 3.6: ``stempy.io.reader(files, version=5, backend='multi-pass', threads=T)`` then
  ``stempy.image.electron_count(reader, dark=zeros, threshold_num_blocks=1, 40 samples,
  4.5σ / 175σ)``: its own path from the files, its threshold computation included (one frame,
  40 samples: a few ms); and the classic ``SectorReader`` (one thread by design). "read only"
  iterates the classic reader without counting: what reading the files costs stempy.
- ours: ``ElectronCounter`` with stempy's thresholds on the frames in memory (as the receiver
  gets them off the wire), whole frames and the four 144-row sectors the 4D Camera sends;
  ``threads=T`` (the sectors as four contiguous arrays, as four sources' messages arrive). Checked: with ``ties='none'`` and ``xray_neighbours='kept'`` our events equal
  stempy's, frame by frame (the run fails otherwise); the default settings are timed too.

Cores: "1" pins the measuring process to one CPU (os.sched_setaffinity); "all" to every CPU,
with T = the number of CPUs. Each measurement runs in a process forked for it. Times are
medians of ``--repeats`` runs after one untimed warm-up; frames/s is wall-clock, "per CPU-s"
divides by the CPU time the process used (the per-core figure that survives a shared
machine), GB/s is raw bytes consumed (576 x 576 x 2 per frame) per wall second. "others' CPU"
is what the rest of the machine used meanwhile.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

FRAME_BYTES = 576 * 576 * 2
CAMERA_HZ = 87_000
NSIGMA = dict(number_of_samples=40, background_threshold_n_sigma=4.5, xray_threshold_n_sigma=175.0)


def make_frames(n: int, directory: Path, seed: int = 0):
    """n emulated raw frames, written as 4D Camera v5 files; (frames, files)."""
    from sim_detector.raw import RawDetector, RawFrames
    from sim_detector.rawfile import RawFileWriter
    from sim_detector.simulate import Beam, Detector, ScanSpec, simulate_scan
    from sim_detector.specimens import make_specimen

    nx = 64
    ny = -(-n // nx)
    sim = simulate_scan(make_specimen("mgo", seed=seed), Beam(dose=100.0), Detector(mrad_per_px=0.12),
                        ScanSpec(shape=(ny, nx)), seed=seed, with_expected=False)
    rf = RawFrames(RawDetector(), (576, 576), seed=seed)
    frames = np.empty((n, 576, 576), np.uint16)
    off = sim.offsets
    directory.mkdir(parents=True, exist_ok=True)
    with RawFileWriter(directory, scan_number=1, raster_shape=(ny, nx)) as w:
        for lo in range(0, n, 256):
            hi = min(lo + 256, n)
            rf.frames(lo, sim.counts[lo:hi], sim.indices[off[lo]:off[hi]], out=frames[lo:hi])
            w.write(lo, frames[lo:hi])
    return frames, [str(p) for p in w.files], int(sim.counts[:n].sum())


def stempy_count(files, threads, backend="multi-pass"):
    from stempy import image, io
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if backend == "multi-pass":
            reader = io.reader(files, version=5, backend="multi-pass", threads=threads)
        else:
            reader = io.reader(files, version=5)
        return image.electron_count(reader, np.zeros((576, 576), np.float32), threshold_num_blocks=1, **NSIGMA)


def stempy_read(files):
    from stempy import io
    n = 0
    for block in io.reader(files, version=5):
        n += len(block.header.image_numbers)
    return n


def ours_count(parts, bg, xray, threads, **kw):
    """parts: [(row0, (n, rows, 576) frames)], each contiguous, as a source's messages are."""
    from operators.electron_counting import ElectronCounter
    c = ElectronCounter((576, 576), None, bg, xray, threads=threads, **kw)
    return [c.count(f, a) for a, f in parts]


def _measure(conn, cpus, fn, repeats):
    try:
        os.sched_setaffinity(0, cpus)
        result, _ = common.time_runs(fn, repeats, min_time_s=1.0)
        result["cpu_s_per_run"] = result["median_s"] * (result["cpu_per_wall"] or float("nan"))
        conn.send(("ok", result))
    except BaseException as e:  # noqa: BLE001 - reported by the parent
        conn.send(("error", f"{type(e).__name__}: {e}"))


def measure(fn, cpus, repeats):
    """Time ``fn`` in a process forked for it and pinned to ``cpus``."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_measure, args=(child, cpus, fn, repeats))
    p.start()
    status, value = parent.recv()
    p.join()
    if status != "ok":
        raise RuntimeError(value)
    return value


def run(args) -> dict:
    all_cpus = sorted(os.sched_getaffinity(0))
    one = {all_cpus[-1]}
    n_cores = len(all_cpus)
    directory = Path(args.dir) if args.dir else Path("/dev/shm" if Path("/dev/shm").is_dir()
                                                     else tempfile.gettempdir()) / "stemstream-bench-counting"
    load_before = common.wait_for_load(args.wait_for_load)
    t0 = time.perf_counter()
    frames, files, electrons = make_frames(args.frames, directory)
    print(f"{args.frames} raw frames ({args.frames * FRAME_BYTES / 1e9:.2f} GB, {electrons / args.frames:.0f} "
          f"e-/frame) made and written to {directory} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    # stempy's thresholds and events, once, to give ours the same and to check them
    ec = stempy_count(files, 1)
    md = ec.metadata["electron_counting"]
    bg, xr = md["background_threshold"], md["x_ray_threshold"]
    theirs = [np.asarray(ec.data[i][0]) for i in range(args.frames)]
    whole = [(0, frames)]
    sectors = [(a, np.ascontiguousarray(frames[:, a:a + 144])) for a in range(0, 576, 144)]
    (counts, indices), = ours_count(whole, bg, xr, 1, ties="none", xray_neighbours="kept")
    off = np.r_[0, np.cumsum(counts.astype(np.int64))]
    identical = all(np.array_equal(indices[off[i]:off[i + 1]], theirs[i]) for i in range(args.frames))
    rows = []
    tasks = [
        ("stempy electron_count, multi-pass reader", "stempy", lambda t: lambda: stempy_count(files, t)),
        ("stempy electron_count, classic SectorReader", "stempy", lambda t: lambda: stempy_count(files, 1, "classic")),
        ("stempy reader only (no counting)", "stempy-read", lambda t: lambda: stempy_read(files)),
        ("ours, whole frames, as stempy (ties none, X-ray neighbours kept)", "ours",
         lambda t: lambda: ours_count(whole, bg, xr, t, ties="none", xray_neighbours="kept")),
        ("ours, whole frames, defaults", "ours", lambda t: lambda: ours_count(whole, bg, xr, t)),
        ("ours, four 144-row sectors, defaults", "ours", lambda t: lambda: ours_count(sectors, bg, xr, t)),
    ]
    for cores, cpus in (("1", one), ("all", set(all_cpus))):
        threads = 1 if cores == "1" else n_cores
        for name, kind, make in tasks:
            if cores == "all" and "classic" in name or cores == "all" and kind == "stempy-read":
                continue  # one thread by design
            r = measure(make(threads), cpus, args.repeats)
            fps = args.frames / r["median_s"]
            rows.append({"task": name, "kind": kind, "cores": cores, "threads": threads, **r,
                         "frames_per_s": fps, "frames_per_cpu_s": args.frames / r["cpu_s_per_run"],
                         "gb_per_s": fps * FRAME_BYTES / 1e9})
            print(f"  {cores:>3} core(s) {name}: {fps:,.0f} frames/s", file=sys.stderr)
    if not args.dir:  # the default directory is ours: leave nothing in /dev/shm
        for f in files:
            Path(f).unlink(missing_ok=True)
        directory.rmdir()
    return {"benchmark": "counting", "when": common.now(), "command": common.command_line("bench_counting.py", args.argv),
            "machine": common.machine(), "load_before": load_before, "load_after": common.load_average(),
            "frames": args.frames, "electrons_per_frame": electrons / args.frames,
            "thresholds": {"background": bg, "xray": xr}, "identical_to_stempy": identical,
            "events_per_frame": len(indices) / args.frames, "rows": rows}


def report(p: dict) -> None:
    print(f"### Electron counting of raw frames, ours vs stempy ({p['frames']} frames of 576 x 576, "
          f"{p['electrons_per_frame']:.0f} e-/frame)\n")
    print(f"`{p['command']}` — {p['when']}, {p['machine']['cpus']} CPUs, load average before "
          f"{p['load_before']}, after {p['load_after']}. Events identical to stempy's (ties none, X-ray "
          f"neighbours kept): **{p['identical_to_stempy']}**; thresholds {p['thresholds']['background']:.2f} / "
          f"{p['thresholds']['xray']:.1f} ADU.\n")
    print("| cores | task | frames/s | per CPU-s | GB/s raw | CPU/wall | others' CPU |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in p["rows"]:
        print(f"| {r['cores']} | {r['task']} | {r['frames_per_s']:,.0f} | {r['frames_per_cpu_s']:,.0f} | "
              f"{r['gb_per_s']:.2f} | {r['cpu_per_wall']} | {r['other_cpu']} |")
    by = {(r["cores"], r["task"]): r for r in p["rows"]}
    st = by.get(("1", "stempy electron_count, multi-pass reader"))
    mine = by.get(("1", "ours, four 144-row sectors, defaults"))
    if st and mine:
        for key, label in (("frames_per_s", "wall"), ("frames_per_cpu_s", "CPU")):
            print(f"\nOne core, ours (four sectors, defaults) over stempy (multi-pass), per {label} second: "
                  f"**{mine[key] / st[key]:.1f}x**.", end="")
        print(f"\n\nThe 4D Camera's {CAMERA_HZ:,} frames/s would need {CAMERA_HZ / mine['frames_per_cpu_s']:.0f} "
              f"cores at our per-CPU-second rate, {CAMERA_HZ / st['frames_per_cpu_s']:.0f} at stempy's.")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="256 frames, 1 repeat: a smoke test")
    ap.add_argument("--dir", metavar="DIR", help="where the raw files go and stay (default: /dev/shm, removed at the end)")
    ap.add_argument("--wait-for-load", type=float, default=None, metavar="LOAD")
    ap.add_argument("--out", type=Path, default=common.RESULTS, help="directory of counting.json and .md")
    common.add_output_args(ap, "counting")
    args = ap.parse_args(argv)
    args.argv = argv
    if common.printed_old_report(args, report):
        return 0
    if args.quick:
        args.frames, args.repeats = 256, 1
    payload = run(args)
    common.save_results(args, payload, report, "counting")
    return 0 if payload["identical_to_stempy"] else 1


if __name__ == "__main__":
    sys.exit(main())
