"""Kernels side by side: ours, stempy and LiberTEM on the same synthetic sparse scan (issue 5, item 1).

    .venv/bin/python benchmarks/bench_peers.py [--quick] [--scan 256 256] [--doses 100 1000]
        [--repeats 5] [--retries 2] [--wait-for-load LOAD] [--no-libertem]
        [--libertem-executor pipelined|dask] [--out DIR | --json PATH] [--report JSON]

Writes benchmarks/results/peers.json and peers.md (the markdown it prints), or with --json the
JSON to PATH and the markdown to stdout only; --report prints the markdown of an earlier JSON.
``--quick`` (64 x 64 scan, 2 repeats, no retries) is a smoke test of about 30 s.

Data: benchmarks/common.py's synthetic scan (576 x 576 detector, Poisson electrons per frame,
60 % in a bright-field disk of radius 40 px, each pixel at most once per frame, sorted within
frames). Tasks: two annular images (bf: 0 <= r < 40 px, adf: 60 <= r < 160 px around the
detector centre), centre of mass of all electrons, the summed diffraction pattern, and all three.

- stempy 3.6: ``create_stem_images`` (integer radii), ``com_sparse`` (its default loop,
  version 0, and the vectorised version 1), ``SparseArray.sum(axis=(0, 1))``, on a SparseArray
  built from the CSR events outside the timing.
- LiberTEM: the raw CSR dataset (``stream.files.storage.write_scan`` then
  ``stream.files.interop.export_libertem_csr``), loaded outside the timing; a run is everything
  ``ctx.run_udf`` does (reading the raw files, the UDF, the merge). ``ApplyMasksUDF`` with two
  masks, with its default backend and with ``use_sparse='scipy.sparse'`` (faster here);
  ``CoMUDF``; ``SumUDF``; the three in one ``run_udf`` pass.
- ours: ``new_state``, ``process`` over every chunk of 8192 frames, ``finalize``, for each
  operator alone, the three one after another on every chunk, and ``operators.fused`` when that
  module exists.

Cores: "1" is this process (BLAS/OpenMP threads limited to 1; the table's CPU/wall shows it).
"2" for ours and stempy is the scan split into two halves (rows 0..ny/2-1 and the rest),
processed in two worker processes forked beforehand (each already holds its half), results
pickled back and merged (states merged then finalized; stempy's images concatenated, its sums
added) in this process: all of that is timed. "2" for LiberTEM is its own executor with two
workers (``Context.make_with('pipelined', cpus=2)`` by default).

Bounds (rows that are not a task): a numba pass that only reads every event once, with
contiguous vector loads (the floor of any one-pass kernel; "ratio at the floor" in the targets
table is a peer's time over it, the most any such kernel could reach), and, when
operators/fused.py exists, its kernel doing one task only (what that operator alone could cost).

Issue 19, one core: the same events unsorted within each frame and cut into 4 row sectors in
the receiver's chunks (benchmarks/bench_operators.py ``receiver_chunks``: messages of 512
frames per source, sources taking turns, 4096 frame parts per chunk), as the 4D Camera and the
emulator deliver them: the fused operator on those chunks, and stempy's ``create_stem_images``
on the same frames whole (each frame's sector parts concatenated, unsorted).

Every time is the median of at least ``--repeats`` runs (more until they last 0.5 s) after one
untimed warm-up run, min..max given; the warm-up run's results are checked before the timed
runs start.
CPU/wall is the CPU time of this process (plus the two worker processes' for "2") over the
wall time: near 2 only when both cores really worked; on a shared machine another job on one
core shows as about 1. "others' CPU" is the cores every other process of the machine used
meanwhile (/proc/stat); above 0.3 the measurement is repeated (``--retries``, 20 s apart) and the
quietest attempt kept. ``--wait-for-load`` waits for a quiet machine before starting.
Results compared: ours against stempy's (its images divided by its weight of one electron,
65535 in 3.6; its sums exactly; its centre of mass to float32 precision), against LiberTEM's
(images and sum exactly, centre of mass to float32 precision), our fused and two-process
results against the separate operators' in one process (exactly). A failed comparison is
reported and the exit status is 1.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import functools  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

import common  # noqa: E402
from bench_operators import frame_events, receiver_chunks, shuffle_within_frames  # noqa: E402
from operators.com import CenterOfMass  # noqa: E402
from operators.diffraction import DiffractionSum  # noqa: E402
from operators.virtual import VirtualDetectors, annulus_mask  # noqa: E402

RINGS = [(0, 40), (60, 160)]  # px; integer radii, as stempy takes them
NAMES = ["bf", "adf"]
BOUNDS = "bounds (not a task)"
TASKS = ["two annular images", "centre of mass", "diffraction sum", "all three", BOUNDS]
OURS = {"two annular images": "ours: VirtualDetectors", "centre of mass": "ours: CenterOfMass",
        "diffraction sum": "ours: DiffractionSum", "all three": "ours: the three in sequence"}
FUSED = "ours: fused (operators.fused)"
FLOOR = "floor: one numba pass reading every event (sum of a frame's indices, contiguous loads)"
# Issue 19: events as a 4-sector detector delivers them, unsorted within frames, in the
# receiver's chunks; stempy reads the same frames whole.
FUSED_UNSORTED = "ours: fused, unsorted events in 4-sector chunks"
STEMPY_UNSORTED = "stempy: create_stem_images, unsorted events"


# ---------------------------------------------------------------- ours

def make_fused(vd, com, dsum):
    """operators.fused.FusedStreaming over the three operators, once that module exists:
    (operator or None, note)."""
    try:
        from operators.fused import FusedStreaming
    except ModuleNotFoundError as e:
        if e.name == "operators.fused":
            return None, "missing: operators/fused.py does not exist (yet); it is picked up when it does"
        raise
    return FusedStreaming(vd, com, dsum), "operators.fused.FusedStreaming(virtual, com, diffraction)"


def ours_states(ops, chunks):
    states = [op.new_state() for op in ops]
    for c in chunks:
        for op, s in zip(ops, states):
            op.process(s, c)
    return states


def ours_finalize(ops, states) -> dict:
    return {k: r.data for op, s in zip(ops, states) for k, r in op.finalize(s).items()}


def ours_merge_finalize(ops, halves) -> dict:
    a, b = halves
    for op, sa, sb in zip(ops, a, b):
        op.merge(sa, sb)
    return ours_finalize(ops, a)


# ---------------------------------------------------------------- stempy

def stempy_functions(frame_shape):
    """{name: (function of a SparseArray, merge of the two halves' results)}."""
    import stempy.image as si
    cy, cx = (frame_shape[0] - 1) / 2, (frame_shape[1] - 1) / 2
    inner, outer = [a for a, _ in RINGS], [b for _, b in RINGS]

    def stem(sa):
        return si.create_stem_images(sa, inner, outer, center=(cx, cy))

    def com0(sa):
        return si.com_sparse(sa)

    def com1(sa):
        return si.com_sparse(sa, version=1)

    def dsum(sa):
        return sa.sum(axis=(0, 1))

    def seq(sa):
        return stem(sa), com0(sa), dsum(sa)

    def cat(h):
        return np.concatenate(h, axis=1)

    def add(h):
        return h[0] + h[1]

    return {"stem": (stem, cat), "com0": (com0, cat), "com1": (com1, cat), "sum": (dsum, add),
            "seq": (seq, lambda h: (cat([h[0][0], h[1][0]]), cat([h[0][1], h[1][1]]),
                                    add([h[0][2], h[1][2]])))}


STEMPY = {"stem": ("two annular images", "stempy: create_stem_images"),
          "com0": ("centre of mass", "stempy: com_sparse (default, version 0)"),
          "com1": ("centre of mass", "stempy: com_sparse(version=1)"),
          "sum": ("diffraction sum", "stempy: SparseArray.sum"),
          "seq": ("all three", "stempy: the three in sequence")}


def stempy_unit(frame_shape):
    """stempy's weight of one electron in create_stem_images (65535 in 3.6)."""
    import stempy.io as sio
    import stempy.image as si
    h, w = frame_shape
    one = np.empty((1, 1), object)
    one[0, 0] = np.array([(h // 2) * w + w // 2], np.uint32)
    sa = sio.SparseArray(one, scan_shape=(1, 1), frame_shape=frame_shape)
    return int(si.create_stem_images(sa, [0], [2], center=((w - 1) / 2, (h - 1) / 2))[0, 0, 0])


# ---------------------------------------------------------------- LiberTEM

def libertem_dataset(counts, indices, scan_shape, frame_shape, tmp: Path) -> Path:
    """The scan as a stemstream file, exported to LiberTEM's raw CSR: the .toml path."""
    from stream.files.interop import export_libertem_csr
    path = common.write_stemstream_scan(tmp / "scan.h5", counts, indices, scan_shape, frame_shape)
    return export_libertem_csr(path, tmp / "scan.toml")


def libertem_udfs(masks_f32, frame_shape):
    """{name: (task, implementation, factory of the UDF or list of UDFs)}."""
    from libertem.udf.com import CoMUDF
    from libertem.udf.masks import ApplyMasksUDF
    from libertem.udf.sum import SumUDF
    cy, cx = (frame_shape[0] - 1) / 2, (frame_shape[1] - 1) / 2
    factories = [lambda m=m: m for m in masks_f32]
    return {
        "masks": ("two annular images", "LiberTEM: ApplyMasksUDF (default backend)",
                  lambda: ApplyMasksUDF(mask_factories=factories)),
        "masks_sparse": ("two annular images", "LiberTEM: ApplyMasksUDF(use_sparse='scipy.sparse')",
                         lambda: ApplyMasksUDF(mask_factories=factories, use_sparse="scipy.sparse")),
        "com": ("centre of mass", "LiberTEM: CoMUDF", lambda: CoMUDF.with_params(cy=cy, cx=cx)),
        "sum": ("diffraction sum", "LiberTEM: SumUDF", lambda: SumUDF()),
        "all": ("all three", "LiberTEM: the three UDFs in one run_udf",
                lambda: [ApplyMasksUDF(mask_factories=factories, use_sparse="scipy.sparse"),
                         CoMUDF.with_params(cy=cy, cx=cx), SumUDF()]),
    }


# ---------------------------------------------------------------- checks

class Checks:
    def __init__(self):
        self.items = []

    def add(self, what, ok, detail=""):
        self.items.append({"check": what, "ok": bool(ok), "detail": detail})
        if not ok:
            print(f"  check FAILED: {what} {detail}", file=sys.stderr)

    def equal(self, what, got, want):
        got, want = np.asarray(got), np.asarray(want)
        ok = got.shape == want.shape and np.array_equal(got, want)
        diff = "" if ok or got.shape != want.shape else \
            f"({int(np.sum(got != want))} of {want.size} values differ)"
        self.add(what, ok, diff if got.shape == want.shape else f"(shapes {got.shape} vs {want.shape})")

    def close(self, what, got, want, atol):
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        ok = got.shape == want.shape and np.allclose(got, want, rtol=0, atol=atol)
        err = float(np.nanmax(np.abs(got - want))) if got.shape == want.shape else float("nan")
        self.add(what, ok, f"(max |difference| {err:.2g} px, allowed {atol:g})")

    @property
    def all_ok(self):
        return all(c["ok"] for c in self.items)


def check_com(checks, label, y, x, ours):
    n = ours["com_n"].astype(np.float64)
    checks.close(f"{label} centre of mass y = ours", y, ours["com_sum_y"] / n, 2e-3)
    checks.close(f"{label} centre of mass x = ours", x, ours["com_sum_x"] / n, 2e-3)


# ---------------------------------------------------------------- one dose

def row(task, impl, dose, scan, cores, t):
    frames, events = scan["frames"], scan["events"]
    return {"task": task, "implementation": impl, "e_per_frame": dose,
            "e_per_frame_actual": round(events / frames, 2), "cores": cores,
            "frames": frames, "events": events, **t,
            "frames_per_s": frames / t["median_s"], "events_per_s": events / t["median_s"],
            "ours_reference": None, "ratio": None}


def same(checks, what, got: dict, want: dict):
    """Every result in ``want`` equal in ``got`` (NaN equal to NaN)."""
    for name, v in want.items():
        checks.equal(f"{what}: {name}", np.nan_to_num(got.get(name, np.nan), nan=-1e300),
                     np.nan_to_num(v, nan=-1e300))


def run_dose(dose, args, checks, notes) -> tuple[list, dict]:
    scan_shape, frame_shape = tuple(args.scan), common.FRAME_SHAPE
    ny, nx = scan_shape
    t0 = time.perf_counter()
    counts, indices = common.sparse_scan(scan_shape, frame_shape, dose)
    scan = {"e_per_frame": dose, "frames": len(counts), "events": int(len(indices)),
            "e_per_frame_actual": round(len(indices) / len(counts), 2)}
    print(f"{dose} e-/frame: {scan['events']:,} electrons in {scan['frames']:,} frames "
          f"(generated in {time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    chunks, halves = common.chunks_in_halves(counts, indices, frame_shape)
    masks = np.stack([annulus_mask(frame_shape, inner=a, outer=b) for a, b in RINGS])
    vd = VirtualDetectors(masks, NAMES, scan_shape)
    com = CenterOfMass(scan_shape, frame_shape)
    dsum = DiffractionSum(frame_shape)
    fused, notes["fused"] = make_fused(vd, com, dsum)
    ours_runs = [(task, OURS[task], ops) for task, ops in (
        ("two annular images", [vd]), ("centre of mass", [com]), ("diffraction sum", [dsum]),
        ("all three", [vd, com, dsum]))]
    if fused is not None:
        ours_runs.append(("all three", FUSED, [fused]))
    rows, R, ref = [], args.repeats, {}
    timed = functools.partial(common.time_runs, retries=args.retries, min_time_s=args.min_time)

    def log(r):
        rows.append(r)
        print(f"  {r['implementation']} x{r['cores']}: {common.fmt_time(r)}", file=sys.stderr)

    # -- ours, one process; the separate operators' results are the reference of every check
    for task, impl, ops in ours_runs:
        check = None if impl != FUSED else (lambda res: same(checks, f"{dose} e/f: fused = separate", res, ref))
        t, res = timed(lambda ops=ops: ours_finalize(ops, ours_states(ops, chunks)), R, check=check)
        if impl != FUSED:
            ref.update(res)
        log(row(task, impl, dose, scan, 1, t))

    floor_out = np.zeros(len(counts), np.int64)

    def floor():
        for c in chunks:
            common.read_pass(c.positions, c.offsets, c.indices, floor_out)
    log(row(BOUNDS, FLOOR, dose, scan, 1, timed(floor, R)[0]))
    if fused is not None:  # the fused kernel on one task: what each operator alone could cost
        for label, kw in (("two images", {"virtual": vd}), ("centre of mass", {"com": com}),
                          ("diffraction sum", {"diffraction": dsum})):
            try:
                op = type(fused)(**kw)
            except (TypeError, ValueError) as e:
                notes[f"probe {label}"] = f"the fused operator does not take {list(kw)} alone ({e})"
                continue
            t, _ = timed(lambda op=op: ours_finalize([op], ours_states([op], chunks)), R)
            log(row(BOUNDS, f"probe: the fused kernel doing {label} only", dose, scan, 1, t))

    # -- stempy, one process
    sp_funcs = sa = sa_halves = None
    try:
        sp_funcs = stempy_functions(frame_shape)
        unit = stempy_unit(frame_shape)
    except ImportError as e:
        notes["stempy"] = f"not installed ({e}); pip install -e '.[peers]'"
    if sp_funcs is not None:
        sa = common.stempy_sparse_array(counts, indices, scan_shape, frame_shape)
        half, cut = len(counts) // 2, int(counts[:len(counts) // 2].sum())
        sa_halves = [common.stempy_sparse_array(counts[:half], indices[:cut], (ny // 2, nx), frame_shape),
                     common.stempy_sparse_array(counts[half:], indices[cut:], (ny - ny // 2, nx), frame_shape)]

        def check_stempy(key, res, what):
            if key in ("stem", "seq"):
                imgs = res if key == "stem" else res[0]
                checks.add(f"{what}: images are multiples of stempy's weight of one electron {unit}",
                           np.all(imgs % unit == 0))
                same(checks, f"{what}: images / {unit} = ours", dict(zip(NAMES, imgs // unit)),
                     {k: ref[k] for k in NAMES})
            if key in ("com0", "com1", "seq"):  # stempy: [0] = mean column (x), [1] = mean row (y)
                c = res if key != "seq" else res[1]
                check_com(checks, what, c[1], c[0], ref)
            if key in ("sum", "seq"):
                checks.equal(f"{what}: sum = ours", res if key == "sum" else res[2], ref["diffraction_sum"])

        for key, (fn, _) in sp_funcs.items():
            task, impl = STEMPY[key]
            t, _ = timed(lambda fn=fn: fn(sa), R,
                                    check=lambda res, key=key: check_stempy(key, res, f"{dose} e/f: {impl} x1"))
            log(row(task, impl, dose, scan, 1, t))

    # -- one process, events unsorted within frames and cut in 4 sectors (issue 19)
    shuffled = shuffle_within_frames(counts, indices)
    chunks_u = receiver_chunks(counts, shuffled, frame_shape, n_sources=4)
    if fused is not None:
        t, _ = timed(lambda: ours_finalize([fused], ours_states([fused], chunks_u)), R,
                     check=lambda res: same(checks, f"{dose} e/f: {FUSED_UNSORTED} = separate", res, ref))
        log(row("all three", FUSED_UNSORTED, dose, scan, 1, t))
    if sp_funcs is not None:
        off_u, frames_u = frame_events(chunks_u)
        sa_u = common.stempy_sparse_array(np.diff(off_u), frames_u, scan_shape, frame_shape)
        t, _ = timed(lambda: sp_funcs["stem"][0](sa_u), R,
                     check=lambda res: check_stempy("stem", res, f"{dose} e/f: {STEMPY_UNSORTED} x1"))
        log(row("two annular images", STEMPY_UNSORTED, dose, scan, 1, t))
        del sa_u

    # -- two processes: ours, and stempy on the same halves
    tasks = {f"ours:{impl}": (lambda part, ops=ops: ours_states(ops, halves[part])) for _, impl, ops in ours_runs}
    for key, (fn, _) in (sp_funcs or {}).items():
        tasks[f"stempy:{key}"] = lambda part, fn=fn: fn(sa_halves[part])
    with common.TwoProcesses(tasks) as pair:
        for task, impl, ops in ours_runs:
            t, _ = timed(
                lambda impl=impl, ops=ops: ours_merge_finalize(ops, pair.run(f"ours:{impl}")), R, pair=pair,
                check=lambda res, impl=impl: same(checks, f"{dose} e/f: {impl} x2 = x1", res,
                                                   {k: ref[k] for k in res}))
            log(row(task, impl, dose, scan, 2, t))
        for key, (fn, merge) in (sp_funcs or {}).items():
            task, impl = STEMPY[key]
            t, _ = timed(
                lambda key=key, merge=merge: merge(pair.run(f"stempy:{key}")), R, pair=pair,
                check=lambda res, key=key, impl=impl: check_stempy(key, res, f"{dose} e/f: {impl} x2"))
            log(row(task, impl, dose, scan, 2, t))
    del sa, sa_halves

    # -- LiberTEM
    if not args.no_libertem:
        try:
            rows += run_libertem(dose, args, scan, counts, indices, masks, ref, checks)
        except ImportError as e:
            notes["libertem"] = f"not installed ({e}); pip install -e '.[peers]'"
    return rows, scan


def run_libertem(dose, args, scan, counts, indices, masks, ours, checks) -> list:
    from libertem.api import Context
    from libertem.executor.inline import InlineJobExecutor
    scan_shape, frame_shape = tuple(args.scan), common.FRAME_SHAPE
    udfs = libertem_udfs(masks.astype(np.float32), frame_shape)
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="bench_peers_", dir=args.tmp))
    try:
        toml = libertem_dataset(counts, indices, scan_shape, frame_shape, tmp)
        for cores in (1, 2):
            ctx = Context(executor=InlineJobExecutor()) if cores == 1 else \
                Context.make_with(args.libertem_executor, cpus=2)
            try:
                ds = ctx.load("raw_csr", path=str(toml))
                for key, (task, impl, make) in udfs.items():
                    label = impl if cores == 1 else f"{impl} [{args.libertem_executor}]"
                    t, _ = common.time_runs(
                        lambda make=make: ctx.run_udf(ds, make()), args.repeats,
                        retries=args.retries, min_time_s=args.min_time, own_cpu_known=cores == 1,
                        check=lambda res, key=key, label=label: check_libertem(
                            checks, f"{dose} e/f: {label} x{cores}", key, res, ours))
                    rows.append(row(task, label, dose, scan, cores, t))
                    print(f"  {label} x{cores}: {common.fmt_time(t)}", file=sys.stderr)
            finally:
                ctx.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def check_libertem(checks, label, key, res, ours):
    if key == "all":
        for k, r in zip(("masks_sparse", "com", "sum"), res):
            check_libertem(checks, label, k, r, ours)
        return
    if key.startswith("masks"):
        got = res["intensity"].data
        for i, name in enumerate(NAMES):
            checks.equal(f"{label}: {name} = ours", got[..., i], ours[name])
    elif key == "com":
        raw = res["raw_com"].data
        check_com(checks, label, raw[..., 0], raw[..., 1], ours)
    elif key == "sum":
        checks.equal(f"{label}: intensity = ours", res["intensity"].data, ours["diffraction_sum"])


# ---------------------------------------------------------------- ratios and targets

def add_ratios(rows, fused_present) -> list:
    """Each peer row gets ``ratio`` = its median / ours' median (same task, e/frame, cores):
    how many times faster ours is. Returns the list of all pairs."""
    ours = {(r["task"], r["e_per_frame"], r["cores"], r["implementation"]): r for r in rows
            if r["implementation"].startswith("ours")}
    pairs = []
    for r in rows:
        if r["task"] == BOUNDS or r["implementation"].startswith("ours") or \
                r["implementation"] == STEMPY_UNSORTED:  # (compared in the targets)
            continue
        refs = [OURS[r["task"]]] + ([FUSED] if r["task"] == "all three" and fused_present else [])
        for impl in refs:
            o = ours.get((r["task"], r["e_per_frame"], r["cores"], impl))
            if o is None:
                continue
            ratio = r["median_s"] / o["median_s"]
            pairs.append({"task": r["task"], "e_per_frame": r["e_per_frame"], "cores": r["cores"],
                          "ours": impl, "peer": r["implementation"], "ratio": ratio})
            r["ours_reference"], r["ratio"] = impl, ratio  # the fused one when there is one
    return pairs


def targets(rows, fused_present, doses) -> list:
    """Issue 5's speed targets, single core, as ratios measured in this run."""
    events = {r["e_per_frame"]: r["events"] for r in rows}

    def med(impl, dose):
        for r in rows:
            if r["implementation"] == impl and r["e_per_frame"] == dose and r["cores"] == 1:
                return r["median_s"]
        return None

    out = []

    def add(dose, what, ours_impl, peer_impl, need, note=""):
        a, b, f = med(ours_impl, dose), med(peer_impl, dose), med(FLOOR, dose)
        ratio = None if a is None or b is None else b / a
        out.append({"e_per_frame": dose, "target": what, "ours": ours_impl, "peer": peer_impl,
                    "required": need, "ratio": ratio, "met": None if ratio is None else ratio >= need,
                    "ratio_at_floor": None if f is None or b is None else b / f,
                    "ours_ns_per_event": None if a is None else a / events[dose] * 1e9,
                    "floor_ns_per_event": None if f is None else f / events[dose] * 1e9,
                    "note": note})

    for dose in doses:
        if fused_present:
            add(dose, "fused >= 2x stempy create_stem_images (two images alone)", FUSED,
                "stempy: create_stem_images", 2.0)
        else:
            add(dose, "fused >= 2x stempy create_stem_images (two images alone)", OURS["all three"],
                "stempy: create_stem_images", 2.0,
                "operators/fused.py missing: the three operators in sequence stand in for it")
        if fused_present:
            add(dose, "fused >= 2.5x stempy create_stem_images, unsorted 4-sector events (issue 19)",
                FUSED_UNSORTED, STEMPY_UNSORTED, 2.5)
        add(dose, "centre of mass >= 10x stempy com_sparse", OURS["centre of mass"],
            "stempy: com_sparse (default, version 0)", 10.0)
        add(dose, "centre of mass >= 10x stempy com_sparse", OURS["centre of mass"],
            "stempy: com_sparse(version=1)", 10.0, "stempy's vectorised variant (not its default)")
        masks_best = min(("LiberTEM: ApplyMasksUDF (default backend)",
                          "LiberTEM: ApplyMasksUDF(use_sparse='scipy.sparse')"),
                         key=lambda i: med(i, dose) or float("inf"))
        for ours_impl, peer in ((OURS["two annular images"], masks_best),
                                (OURS["centre of mass"], "LiberTEM: CoMUDF"),
                                (OURS["diffraction sum"], "LiberTEM: SumUDF"),
                                (FUSED if fused_present else OURS["all three"],
                                 "LiberTEM: the three UDFs in one run_udf")):
            add(dose, "every operator >= 50x LiberTEM's equivalent", ours_impl, peer, 50.0,
                "LiberTEM's faster ApplyMasksUDF backend" if peer == masks_best and med(peer, dose) else "")
    return out


# ---------------------------------------------------------------- output

def print_report(payload):
    c = payload["conditions"]
    print(f"command: `{payload['command']}`\n")
    print(f"{payload['date']}; load average before {payload['load_average_before']}, after "
          f"{payload['load_average_after']}; {payload['machine']['cpus']} CPUs; "
          f"stempy {payload['versions'].get('stempy')}, LiberTEM {payload['versions'].get('libertem')}, "
          f"numba {payload['machine']['numba']}; run time {payload['run_time_s']:.0f} s.\n")
    print(f"{c['scan_shape'][0]} x {c['scan_shape'][1]} positions, {c['frame_shape'][0]} x "
          f"{c['frame_shape'][1]} detector; median (min..max) of at least {c['repeats']} runs after a warm-up"
          + (f" (more until they last {c['min_time_s']} s)" if c.get("min_time_s") else "")
          + f"; cores 2 = {c['two_cores']}; ratio = peer's time / ours for the same task "
          f"(ours = {c['ratio_reference']}).\n")
    rows = payload["results"]
    table = [[r["task"], r["implementation"], f"{r['e_per_frame']} ({r['e_per_frame_actual']})", r["cores"],
              common.fmt_time(r), common.fmt_rate(r["frames_per_s"]), common.fmt_rate(r["events_per_s"]),
              "" if r["ratio"] is None else f"{r['ratio']:.1f}",
              "" if r.get("cpu_per_wall") is None or r["implementation"].startswith("LiberTEM") and r["cores"] == 2
              else f"{r['cpu_per_wall']:.2f}",
              "" if r.get("other_cpu") is None else f"{r['other_cpu']:.2f}"]
             for r in sorted(rows, key=lambda r: (r["e_per_frame"], r["cores"], TASKS.index(r["task"])))]
    print(common.markdown_table(["task", "implementation", "e⁻/frame", "cores", "time", "frames/s",
                                 "events/s", "ours × faster", "CPU/wall", "others' CPU"], table, "llrrrrrrrr"))
    print("\nTargets (issue 5; single core, ratios from this run):\n")
    def num(v, f=".1f"):
        return "n/a" if v is None else format(v, f)
    tt = [[t["e_per_frame"], t["target"], t["ours"], t["peer"], num(t["ratio"]), f"{t['required']:g}",
           {True: "yes", False: "**no**", None: "n/a"}[t["met"]], num(t["ours_ns_per_event"], ".2f"),
           num(t["ratio_at_floor"]), t["note"]] for t in payload["targets"]]
    print(common.markdown_table(["e⁻/frame", "target", "ours", "peer", "ratio", "required", "met",
                                 "ours ns/event", "ratio at the floor", "note"], tt, "rlllrrlrrl"))
    print("\n'ratio at the floor': the peer's time over the floor row's (a pass that only reads "
          "every event once): the ratio no one-pass kernel on this machine can exceed.")
    bad = [c for c in payload["checks"] if not c["ok"]]
    print(f"\nResult checks: {len(payload['checks']) - len(bad)} of {len(payload['checks'])} agree."
          + "".join(f"\n- FAILED: {c['check']} {c['detail']}" for c in bad))
    for k, v in payload["notes"].items():
        print(f"- {k}: {v}")


def versions() -> dict:
    out = {}
    for mod in ("stempy", "libertem"):
        try:
            from importlib.metadata import version
            out[mod] = version(mod)
        except Exception:
            out[mod] = None
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="64 x 64 scan, 2 repeats: a smoke test")
    ap.add_argument("--scan", type=int, nargs=2, default=None, metavar=("NY", "NX"))
    ap.add_argument("--doses", type=float, nargs="+", default=list(common.DOSES), help="mean e-/frame")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--no-libertem", action="store_true")
    ap.add_argument("--libertem-executor", default="pipelined", choices=["pipelined", "dask"])
    ap.add_argument("--out", default=None, help="directory of peers.json and peers.md (default benchmarks/results)")
    ap.add_argument("--tmp", default=None, help="directory for LiberTEM's dataset files")
    ap.add_argument("--retries", type=int, default=None,
                    help="re-time a measurement (up to this many times, 20 s apart) while other "
                         "processes use more than 0.3 of a core (default 2; 0 with --quick)")
    ap.add_argument("--wait-for-load", type=float, default=None, metavar="LOAD",
                    help="first wait (at most 10 min) for the 1-minute load average to fall to LOAD")
    common.add_output_args(ap, "peers")
    args = ap.parse_args(argv)
    if common.printed_old_report(args, print_report):
        return 0
    args.scan = args.scan or list(common.QUICK_SCAN_SHAPE if args.quick else common.SCAN_SHAPE)
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.retries = args.retries if args.retries is not None else (0 if args.quick else 2)
    args.min_time = 0.0 if args.quick else 0.5
    if args.scan[0] < 2 or args.scan[0] % 2:
        ap.error("--scan: NY must be even (the two-process runs split the rows in halves)")
    doses = [int(d) if float(d).is_integer() else d for d in args.doses]

    load0 = common.wait_for_load(args.wait_for_load)
    start = time.perf_counter()
    checks, notes, rows, scans = Checks(), {}, [], []
    for dose in doses:
        r, s = run_dose(dose, args, checks, notes)
        rows += r
        scans.append(s)
    fused_present = any(r["implementation"] == FUSED for r in rows)
    pairs = add_ratios(rows, fused_present)
    payload = {
        "benchmark": "peers", "command": common.command_line("bench_peers.py", argv), "date": common.now(),
        "load_average_before": load0, "load_average_after": common.load_average(),
        "machine": common.machine(), "versions": versions(),
        "conditions": {"scan_shape": list(args.scan), "frame_shape": list(common.FRAME_SHAPE),
                       "rings_px": RINGS, "bf_fraction": common.BF_FRACTION, "bf_radius_px": common.BF_RADIUS,
                       "chunk_frames": common.CHUNK_FRAMES, "repeats": args.repeats, "warmup": 1,
                       "min_time_s": args.min_time, "retries": args.retries, "max_other_cpu": 0.3,
                       "two_cores": ("ours and stempy: the scan's two halves in two forked worker processes, "
                                     "results merged in the parent (all timed); LiberTEM: "
                                     f"Context.make_with('{args.libertem_executor}', cpus=2)"),
                       "ratio_reference": "the operator of the same task; for all three, "
                                          + ("the fused operator" if fused_present else "the three in sequence")},
        "scans": scans, "results": rows, "ratios": pairs, "targets": targets(rows, fused_present, doses),
        "checks": checks.items, "notes": notes, "run_time_s": time.perf_counter() - start,
    }
    common.save_results(args, payload, print_report, "peers")
    return 0 if checks.all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
