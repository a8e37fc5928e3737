"""Storage: bytes per electron on disk, ours against stempy's file and dense 16-bit frames, with the
time to write and to read back each (issue 5, item 4).

    .venv/bin/python benchmarks/bench_storage.py [--quick] [--scan 256 256] [--doses 100 1000]
        [--levels 1 2 4 6] [--repeats 3] [--dense-frames 512] [--dir DIR] [--out DIR | --json PATH]
        [--report JSON]

Outputs as benchmarks/bench_peers.py's (storage.json, storage.md). ``--quick``: 64 x 64, 2 repeats.

The scan is benchmarks/common.py's (576 x 576 detector, Poisson electrons per frame, 60 % in a
bright-field disk, each pixel at most once per frame, sorted within frames), written as:

- ours: ``stream.files.storage.write_scan`` with gzip level 2 (the pipeline's default,
  ``[output] compression_level``; levels 1-3 are written by ISA-L, higher ones by zlib) and
  the other ``--levels`` (4 is h5py's default gzip level,
  6 zlib's), HDF5 shuffle filter first, events and the completeness tables only; and once more
  at the default level with the results the default configuration adds (bf, adf, centre of mass,
  diffraction sum), as a pipeline file holds them. Read back with
  ``stream.files.recording.open_recording(path).read()`` (every offset and pixel index checked, as
  replay and process-file do).
- stempy: ``stempy.io.save_electron_counts`` of the SparseArray (built outside the timing),
  read back with ``stempy.io.load_electron_counts``.
- dense: 16-bit frames in a raw file (``ndarray.tofile``, read with ``np.fromfile``). The whole
  scan is h*w*2 bytes per frame (43 GB at 256 x 256), so only the first ``--dense-frames``
  frames are written and read, and the times are scaled to the whole scan (marked
  "extrapolated"); its size is exact.

Bytes per electron = the whole file's size / electrons; "events only" counts just the event
datasets (ours: indices + offsets as stored). Each write ends with the file on disk (fsync;
``write_scan`` does it itself, the script does it for the others), and is the median of
``--repeats`` (min..max). Reading is timed warm (the file in the page cache, just written) and
cold (its pages dropped first with posix_fadvise DONTNEED: the disk, or the host's cache on a
virtual machine). Every file read back is compared with the scan: "lossless" means equal.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

import common
from operators.completeness import Completeness
from operators.events import EventStore
from stream.config import OutputSpec, PipelineConfig, build_operators, validate
from stream.transport.protocol import Geometry
from stream.files.recording import open_recording
from stream.files.chunk_codec import shuffle_deflate
from stream.files.storage import EVENTS_CHUNK, describe

DEFAULT_LEVEL = OutputSpec().compression_level  # the pipeline's


def fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_cache(path) -> None:
    """Evict the file's (clean) pages from the page cache, so the next read goes to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def entropy_bytes_per_electron(counts, indices, n_pixels) -> float:
    """An estimate of the fewest bytes per electron any lossless coder needs for this scan:
    each frame an unordered set of k_f pixels drawn from the scan's pixel histogram,
    sum_f (k_f H - log2 k_f!) / N bits (H: entropy of the histogram). It ignores what the
    histogram does not know (the disk's shift per position), so it is a little optimistic."""
    from scipy.special import gammaln
    p = np.bincount(indices, minlength=n_pixels).astype(np.float64)
    p = p[p > 0] / len(indices)
    h_bits = float(-(p * np.log2(p)).sum())
    order_bits = float(gammaln(counts + 1.0).sum() / np.log(2))
    return (len(indices) * h_bits - order_bits) / len(indices) / 8


def default_results(counts, indices, scan_shape, frame_shape) -> dict:
    """The results the pipeline's default configuration writes beside the events (bf, adf,
    centre of mass, diffraction sum): name -> operators.base.Result."""
    ops = [op for op in build_operators(validate(PipelineConfig()), Geometry(tuple(scan_shape), tuple(frame_shape)))
           if not isinstance(op, (Completeness, EventStore))]
    chunks, _ = common.chunks_in_halves(counts, indices, frame_shape)
    out = {}
    for op in ops:
        state = op.new_state()
        for c in chunks:
            op.process(state, c)
        out.update(op.finalize(state))
    return out


def delta_bytes_per_electron(counts, indices, level=DEFAULT_LEVEL) -> float:
    """Bytes per electron of the events stored as within-frame differences (the first of a
    frame absolute; uint32, lossless: a cumulative sum per frame restores them), through the
    same shuffle + gzip as our files, in memory: what a delta filter would give."""
    off = common.offsets_of(counts)
    d = np.empty_like(indices)
    d[1:] = indices[1:] - indices[:-1]  # uint32 wrap-around at frame starts is overwritten next
    first = off[:-1][counts > 0]
    d[first] = indices[first]
    size = sum(len(shuffle_deflate(d[a:a + EVENTS_CHUNK], level)) for a in range(0, len(d), EVENTS_CHUNK))
    return size / len(indices)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def measure(write, read, check, repeats, tmp: Path, scale=1.0) -> dict:
    """write(path) -> path, read(path) -> data, check(data) -> bool; times multiplied by scale."""
    writes, warm, cold, lossless, sizes = [], [], [], True, None
    for i in range(repeats):
        target = tmp / f"w{i}"
        t, path = timed(lambda: write(target))
        writes.append(t * scale)
        sizes = Path(path).stat().st_size
        t, data = timed(lambda: read(path))
        warm.append(t * scale)
        if i == 0:
            lossless = bool(check(data))
        del data
        drop_cache(path)
        t, data = timed(lambda: read(path))
        cold.append(t * scale)
        del data
        if i < repeats - 1:
            Path(path).unlink()
    return {"path": path, "file_bytes": sizes, "write": common.summary(writes),
            "read_warm": common.summary(warm), "read_cold": common.summary(cold), "lossless": lossless}


def run_dose(dose, args, tmp: Path) -> tuple[list, dict]:
    scan_shape, frame_shape = tuple(args.scan), common.FRAME_SHAPE
    h, w = frame_shape
    counts, indices = common.sparse_scan(scan_shape, frame_shape, dose)
    offsets = common.offsets_of(counts)
    n, n_ev = len(counts), int(len(indices))
    scan = {"e_per_frame": dose, "frames": n, "events": n_ev, "e_per_frame_actual": round(n_ev / n, 2),
            "entropy_bytes_per_electron": entropy_bytes_per_electron(counts, indices, h * w),
            "delta_gzip_bytes_per_electron": delta_bytes_per_electron(counts, indices)}
    print(f"{dose} e-/frame: {n_ev:,} electrons in {n:,} frames", file=sys.stderr)
    dense_bytes = n * h * w * 2
    rows = []

    def add(fmt, m, events_bytes, extra=None):
        r = {"format": fmt, "e_per_frame": dose, "e_per_frame_actual": scan["e_per_frame_actual"],
             "frames": n, "events": n_ev, "file_bytes": m["file_bytes"], "events_bytes": events_bytes,
             "bytes_per_electron": m["file_bytes"] / n_ev,
             "events_bytes_per_electron": None if events_bytes is None else events_bytes / n_ev,
             "write": m["write"], "read_warm": m["read_warm"], "read_cold": m["read_cold"],
             "lossless": m["lossless"], "extrapolated": False, **(extra or {})}
        rows.append(r)
        print(f"  {fmt}: {r['bytes_per_electron']:.3f} B/e, write {common.fmt_time(m['write'])}, "
              f"read {common.fmt_time(m['read_warm'])} warm, {common.fmt_time(m['read_cold'])} cold", file=sys.stderr)
        return r

    def same_csr(data):
        off, ind = data
        return np.array_equal(off, offsets) and np.array_equal(ind, indices)

    # -- ours
    for level in args.levels:
        d = tmp / f"ours{level}"
        d.mkdir()
        m = measure(lambda p, level=level: common.write_stemstream_scan(p.with_suffix(".h5"), counts, indices,
                                                                          scan_shape, frame_shape, level),
                    lambda p: open_recording(p).read(), same_csr, args.repeats, d)
        ev = describe(m["path"])["events"]["stored_bytes"]
        label = f"ours: write_scan, gzip level {level}" + (" (pipeline default)" if level == DEFAULT_LEVEL else "")
        add(label, m, ev, {"level": level})
        shutil.rmtree(d)

    # -- ours, as the pipeline writes a scan: with its default results
    results = default_results(counts, indices, scan_shape, frame_shape)
    d = tmp / "ours_results"
    d.mkdir()
    m = measure(lambda p: common.write_stemstream_scan(p.with_suffix(".h5"), counts, indices, scan_shape,
                                                       frame_shape, DEFAULT_LEVEL, results),
                lambda p: open_recording(p).read(), same_csr, args.repeats, d)
    ev = describe(m["path"])["events"]["stored_bytes"]
    raw = sum(np.asarray(r.data).nbytes for r in results.values())
    with h5py.File(m["path"], "r") as f:
        stored = sum(f["results"][k].id.get_storage_size() for k in f["results"])
    add(f"ours: write_scan, gzip level {DEFAULT_LEVEL}, with the default results", m, ev,
        {"level": DEFAULT_LEVEL, "results": sorted(results), "results_bytes": raw, "results_stored_bytes": stored})
    shutil.rmtree(d)

    # -- stempy
    try:
        import stempy.io as sio
        sa = common.stempy_sparse_array(counts, indices, scan_shape, frame_shape)

        def write_stempy(p):
            p = p.with_suffix(".h5")
            sio.save_electron_counts(str(p), sa)
            fsync(p)
            return p

        def stempy_equal(arr):
            frames = arr.data[:, 0]
            got = np.fromiter((len(f) for f in frames), np.int64, len(frames))
            return np.array_equal(got, counts) and np.array_equal(np.concatenate(frames), indices)

        d = tmp / "stempy"
        d.mkdir()
        m = measure(write_stempy, lambda p: sio.load_electron_counts(str(p)), stempy_equal, args.repeats, d)
        with h5py.File(m["path"], "r") as f:
            ev = f["electron_events/frames"].id.get_storage_size()
        # vlen data lives in the global heap, which get_storage_size does not count
        add("stempy: save_electron_counts", m, None, {"frames_dataset_bytes": ev})
        shutil.rmtree(d)
        del sa
    except ImportError as e:
        print(f"  stempy not installed ({e}); pip install -e '.[peers]'", file=sys.stderr)

    # -- dense 16-bit frames, the first k frames, scaled to the whole scan
    k = min(args.dense_frames, n)
    dense = np.zeros((k, h * w), np.uint16)
    frame_of = np.repeat(np.arange(k), counts[:k])
    dense[frame_of, indices[:offsets[k]]] = 1  # no pixel twice in a frame

    def write_dense(p):
        p = p.with_suffix(".raw")
        dense.tofile(p)
        fsync(p)
        return p

    d = tmp / "dense"
    d.mkdir()
    m = measure(write_dense, lambda p: np.fromfile(p, np.uint16), lambda a: np.array_equal(a, dense.ravel()),
                args.repeats, d, scale=n / k)
    m["file_bytes"] = dense_bytes
    add("dense 16-bit frames (raw file)", m, dense_bytes,
        {"extrapolated": k < n, "measured_frames": k})
    shutil.rmtree(d)
    del dense

    stempy_bytes = next((r["file_bytes"] for r in rows if r["format"].startswith("stempy")), None)
    for r in rows:
        r["dense_over_this"] = dense_bytes / r["file_bytes"]
        r["stempy_over_this"] = None if stempy_bytes is None else stempy_bytes / r["file_bytes"]
    return rows, scan


def print_report(payload):
    c = payload["conditions"]
    print(f"command: `{payload['command']}`\n")
    print(f"{payload['date']}; load average before {payload['load_average_before']}, after "
          f"{payload['load_average_after']}; {payload['machine']['cpus']} CPUs; run time "
          f"{payload['run_time_s']:.0f} s. {c['scan_shape'][0]} x {c['scan_shape'][1]} positions, "
          f"{c['frame_shape'][0]} x {c['frame_shape'][1]} detector; median (min..max) of {c['repeats']} "
          f"writes and reads; write = until fsync returns; read cold = after posix_fadvise DONTNEED.\n")

    def t(v, extrap):
        return common.fmt_time(v) + (" *" if extrap else "")
    table = [[r["format"], f"{r['e_per_frame']} ({r['e_per_frame_actual']})",
              f"{r['bytes_per_electron']:.3f}",
              "" if r["events_bytes_per_electron"] is None else f"{r['events_bytes_per_electron']:.3f}",
              f"{r['file_bytes'] / 1e6:,.1f}", f"{r['dense_over_this']:,.1f}",
              "" if r["stempy_over_this"] is None else f"{r['stempy_over_this']:.3g}",
              t(r["write"], r["extrapolated"]), t(r["read_warm"], r["extrapolated"]),
              t(r["read_cold"], r["extrapolated"]), "yes" if r["lossless"] else "**no**"]
             for r in payload["results"]]
    print(common.markdown_table(["format", "e⁻/frame", "bytes/electron", "events only", "MB",
                                 "dense / this", "stempy / this", "write", "read (warm)", "read (cold)",
                                 "lossless"], table, "lrrrrrrrrrl"))
    if any(r["extrapolated"] for r in payload["results"]):
        print(f"\n\\* dense: {c['dense_frames']} frames written and read, times scaled to the whole scan.")
    print("\nBounds, bytes/electron of the events: entropy estimate (unordered pixel sets drawn from "
          "the scan's pixel histogram; no lossless coder does much better): "
          + ", ".join(f"{s['e_per_frame']} e⁻/frame {s['entropy_bytes_per_electron']:.2f}" for s in payload["scans"])
          + f"; the same events as within-frame differences through the same shuffle + gzip level {DEFAULT_LEVEL} "
            "(in memory, a filter our files do not use): "
          + ", ".join(f"{s['e_per_frame']} e⁻/frame {s['delta_gzip_bytes_per_electron']:.2f}"
                      for s in payload["scans"]) + ".")
    for r in payload["results"]:
        if "results_bytes" in r:
            print(f"\n{r['e_per_frame']} e⁻/frame, with the default results: the result images take "
                  f"{r['results_bytes'] / 1e6:.1f} MB ({r['results_bytes'] / r['events']:.2f} bytes/electron), "
                  f"in memory; stored (shuffle + gzip level {r['level']}) "
                  f"{r['results_stored_bytes'] / 1e6:.1f} MB ({r['results_stored_bytes'] / r['events']:.2f}).")
    print("\nTarget (issue 5): at most 2.0 bytes per electron, losslessly; the whole file at the pipeline's "
          f"gzip level {DEFAULT_LEVEL}, events and completeness tables, and with the default results:")
    for tg in payload["targets"]:
        print(f"- {tg['e_per_frame']} e⁻/frame, {tg['format']}: {tg['bytes_per_electron']:.3f} bytes/electron, lossless "
              f"{tg['lossless']}: {'met' if tg['met'] else '**not met**'}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="64 x 64 scan, 2 repeats: a smoke test")
    ap.add_argument("--scan", type=int, nargs=2, default=None, metavar=("NY", "NX"))
    ap.add_argument("--doses", type=float, nargs="+", default=list(common.DOSES), help="mean e-/frame")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, DEFAULT_LEVEL, 4, 6], help="gzip levels of our file")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--dense-frames", type=int, default=512, help="dense frames actually written")
    ap.add_argument("--dir", default=None, help="where the files are written (default: a temporary "
                                                "directory under $TMPDIR), removed afterwards")
    ap.add_argument("--out", default=None, help="directory of storage.json and storage.md (default benchmarks/results)")
    common.add_output_args(ap, "storage")
    args = ap.parse_args(argv)
    if common.printed_old_report(args, print_report):
        return 0
    args.scan = args.scan or list(common.QUICK_SCAN_SHAPE if args.quick else common.SCAN_SHAPE)
    args.repeats = args.repeats or (2 if args.quick else 3)
    if any(not 0 <= lv <= 9 for lv in args.levels):
        ap.error("--levels: gzip levels are 0..9")
    doses = [int(d) if float(d).is_integer() else d for d in args.doses]

    start, load0 = time.perf_counter(), common.load_average()
    rows, scans = [], []
    tmp = Path(tempfile.mkdtemp(prefix="bench_storage_", dir=args.dir))
    try:
        for dose in doses:
            r, s = run_dose(dose, args, tmp)
            rows += r
            scans.append(s)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    targets = [{"e_per_frame": r["e_per_frame"], "format": r["format"], "required_max": 2.0,
                "bytes_per_electron": r["bytes_per_electron"], "lossless": r["lossless"],
                "met": r["bytes_per_electron"] <= 2.0 and r["lossless"]}
               for r in rows if r.get("level") == DEFAULT_LEVEL]
    payload = {
        "benchmark": "storage", "command": common.command_line("bench_storage.py", argv), "date": common.now(),
        "load_average_before": load0, "load_average_after": common.load_average(), "machine": common.machine(),
        "conditions": {"scan_shape": list(args.scan), "frame_shape": list(common.FRAME_SHAPE),
                       "repeats": args.repeats, "levels": args.levels, "dense_frames": args.dense_frames,
                       "bf_fraction": common.BF_FRACTION, "bf_radius_px": common.BF_RADIUS,
                       "filesystem_dir": str(Path(args.dir or tempfile.gettempdir()).resolve())},
        "scans": scans, "results": rows, "targets": targets, "run_time_s": time.perf_counter() - start,
    }
    common.save_results(args, payload, print_report, "storage")
    return 0 if all(r["lossless"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
