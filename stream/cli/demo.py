"""``stemstream demo``: the whole pipeline on one machine — emulator process → ZeroMQ → local
dask cluster → scan files, previews and a summary checked against the emulator's ground truth.

Two scans: an MgO slab at a low dose, where columns are found to the precision the dose
allows and the stages say that atom counting is not possible; and a Pt particle at a dose
where counting is possible, whose counts are compared with the true ones.

The demo makes CURVE keys for itself alone (a temporary key directory, deleted at the end):
the emulator accepts only this session's receivers, and the session only this emulator."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np


def add_demo_args(p) -> None:
    from sim_detector.cli import nonneg_arg, rate_arg, shape_arg

    p.add_argument("--out", default="demo-out", metavar="DIR", help="output directory (default demo-out)")
    p.add_argument("--specimen", default="mgo", help="emulated specimen (default mgo)")
    p.add_argument("--scan", type=shape_arg, default=(128, 128), metavar="NYxNX", help="probe positions (default 128x128)")
    p.add_argument("--detector", type=shape_arg, default=(576, 576), metavar="HxW", help="detector (default 576x576)")
    p.add_argument("--dose", type=nonneg_arg, default=500.0, metavar="e/frame",
                   help="mean electrons per frame (default 500: atomic columns visible in one scan)")
    p.add_argument("--rate", type=rate_arg, default=87000.0, metavar="FRAMES/S|max",
                   help="emulator frame rate (default 87000)")
    p.add_argument("--sources", type=int, default=4, help="emulator sources / detector sectors (default 4)")
    p.add_argument("--workers", type=int, default=2, help="local dask worker processes (default 2)")
    from stream.viewer.server import add_view_arg
    add_view_arg(p)
    p.add_argument("--counting-dose", type=nonneg_arg, default=COUNTING_DOSE, metavar="e/frame",
                   help=f"dose of the second scan, a Pt particle where atoms can be counted (default "
                        f"{COUNTING_DOSE:g}); 0 skips that scan")
    p.add_argument("--counting-scan", type=shape_arg, default=COUNTING_SCAN, metavar="NYxNX",
                   help="probe positions of the second scan (default {0}x{1})".format(*COUNTING_SCAN))


COUNTING_SPECIMEN = "pt-particle"   # heavy atoms: one Pt atom adds ~24x the ADF signal of an Mg atom
COUNTING_SCAN = (96, 96)            # 0.27 Å per px over a 20 Å particle: 81 columns of 1..6 atoms
COUNTING_DOSE = 2000.0            # counting possible in every noise draw tried (1000: 7 of 8)


def run_demo(args) -> int:
    from stream.files.storage import OutputError, output_dir
    from stream.transport.net import free_port_block

    try:
        out = output_dir(args.out)
    except OutputError as e:
        print(f"stemstream demo: error: {e}", file=sys.stderr)  # as commands.main prints a CliError
        return 2
    port = free_port_block(args.sources)
    bind = f"tcp://127.0.0.1:{port}"
    scans = [("demo", args.specimen, args.scan, args.dose, out / "truth.h5")]
    if args.counting_dose > 0:
        scans.append(("demo-counting", COUNTING_SPECIMEN, args.counting_scan, args.counting_dose,
                      out / "truth-counting.h5"))
    print(f"demo: local cluster of {args.workers} workers, emulator with {args.sources} sources at {bind}, "
          f"output in {out}/", flush=True)
    from operators.numba_cache import compiled_kernels
    if compiled_kernels() == 0:  # README: what the first run costs
        print("demo: first run of this version: the numba kernels are compiled as they are first needed "
              "and cached for later runs (about a minute more on a 2-core machine)", flush=True)
    keys = tempfile.mkdtemp(prefix="stemstream-demo-keys-")  # this demo's keys only (0700)
    try:
        return _run(args, out, bind, scans, keys)
    finally:
        shutil.rmtree(keys, ignore_errors=True)


def _run(args, out: Path, bind: str, scans: list, keys: str) -> int:
    from stream.session import Session, expand_sources

    done = []
    cfg = demo_config()
    cfg = replace(cfg, security=replace(cfg.security, keys=keys))
    with Session(expand_sources([bind], args.sources), out=out, workers=args.workers, config=cfg,
                 view=args.view) as session:
        if session.viewer is not None:
            _wait_for_a_page(session.viewer)
        for prefix, specimen, shape, dose, truth in scans:
            cmd = [sys.executable, "-m", "stream.cli", "simulate", "--specimen", specimen,
                   "--scan", f"{shape[0]}x{shape[1]}", "--detector", f"{args.detector[0]}x{args.detector[1]}",
                   "--dose", str(dose), "--rate", "max" if args.rate is None else str(args.rate),
                   "--sources", str(args.sources), "--bind", bind, "--truth", str(truth),
                   "--scan-id", prefix, "--wait", "120", "--curve-keys", keys]
            t0 = time.time()
            emulator = subprocess.Popen(cmd)
            result = None
            try:
                result = _wait_for_scan(session, emulator)
                stages = session.wait_stages(result.scan_id, timeout=600) if result and result.path else []
            finally:
                try:  # the emulator exits by itself once its scan is sent; give it that time
                    code = emulator.wait(timeout=60 if result is not None else 1)
                except subprocess.TimeoutExpired:
                    emulator.terminate()
                    code = emulator.wait(timeout=30)
            if result is None or code != 0 or result.status == "failed":
                why = f"scan {result.status}: {result.reason}" if result else "no scan arrived"
                print(f"demo: FAILED (emulator exit code {code}; {why})", file=sys.stderr)
                return 1
            done.append((result, stages, truth, time.time() - t0, specimen, dose))
        if session.viewer is not None:  # the summary first, then the viewer stays
            _summaries(done)
            print(f"demo: the viewer stays open at {session.viewer.url} (draw apertures on the finished "
                  "scans); Ctrl-C to stop", flush=True)
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
            return 0
    _summaries(done)
    return 0


def _summaries(done) -> None:
    for result, stages, truth, seconds, specimen, dose in done:
        print(summary(result, truth, seconds, f"{specimen}, {dose:g} e⁻/frame"))
        print(stage_summary(result, stages, truth))


def _wait_for_a_page(viewer, timeout_s: float = 60) -> None:
    """With --view, the scan starts once a browser shows the page (or after ``timeout_s``)."""
    print(f"demo: open {viewer.url} in a browser; the scan starts when the page is open "
          f"(or in {timeout_s:.0f} s)", flush=True)
    deadline = time.monotonic() + timeout_s
    while viewer.sessions() == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0 if viewer.sessions() else 0)  # let the page draw before the frames come


def demo_config():
    """Default operators plus the 2D stages on the MgO scan (columns about 5 px apart)."""
    from stream.config import PipelineConfig, StagesSpec, validate
    return validate(PipelineConfig(stages=StagesSpec(["phase", "columns", "counting"],
                                                     {"columns": {"min_distance_px": 3.5, "smooth_px": 1.0}})))


def stage_summary(result, reports, truth_path: Path) -> str:
    """Each stage's headline, the dose advice, and the columns and counts against the
    emulator's true ones."""
    lines = ["  stages    :"]
    for r in reports:
        lines.append(f"    {r.name:<9} {r.headline if r.status == 'ok' else r.status + ': ' + r.error} "
                     f"({r.seconds:.1f} s)")
    if not any(r.name == "columns" and r.status == "ok" for r in reports):
        return "\n".join(lines)
    try:
        import h5py
        from scipy.spatial import cKDTree

        from operators.imaging.dose import position_bound_known_image
        from sim_detector.truth import Truth
        from stream.stages.runner import read_dose_advice
        with h5py.File(truth_path, "r") as f:
            truth = Truth.read(f[result.scan_id])
        with h5py.File(result.path, "r") as f:
            c = f["stages/columns"]
            found = np.column_stack([c["y_px"][()], c["x_px"][()]])
            counting = f["stages/counting"] if "counting" in f["stages"] and \
                f["stages/counting"].attrs["status"] == "ok" else None
            counts = counting["counts"][()] if counting is not None else None
            predicted = float(counting.attrs.get("confidence_overall", np.nan)) if counting is not None \
                else float("nan")
            counted = bool(counting.attrs.get("counted", False)) if counting is not None else False
        advice = read_dose_advice(result.path)
        if advice:
            lines.append("  dose      : " + "\n              ".join(advice["lines"]))
        cols = truth.columns
        true_yx = np.column_stack([cols["row_px"], cols["col_px"]])
        ny, nx = result.results["adf"].shape
        inside = (true_yx[:, 0] > 1) & (true_yx[:, 0] < ny - 2) & (true_yx[:, 1] > 1) & (true_yx[:, 1] < nx - 2)
        step = float(truth.scan["step_A"])
        d, j = cKDTree(found).query(true_yx[inside]) if len(found) else (np.full(inside.sum(), np.inf), None)
        hit = d < 1.0 / step  # within 1 Å
        false = int((cKDTree(true_yx).query(found)[0] >= 1.0 / step).sum()) if len(found) else 0
        rms_pm = float(np.sqrt(np.mean((d[hit] * step) ** 2)) * 100) if hit.any() else float("nan")
        # the best any estimator could do: Cramér–Rao from the truth's noiseless image at this dose
        fpp = int(truth.scan.get("frames_per_position", 1))
        sigma = truth.metadata["probe_fwhm_A"] / (2 * np.sqrt(2 * np.log(2))) / step
        bound = position_bound_known_image(truth.expected["adf"] * fpp, true_yx[inside][hit], sigma)
        bound_pm = float(np.sqrt(np.nanmean(bound ** 2)) * step * 100) if hit.any() else float("nan")
        rms = f" (RMS {rms_pm:.2g} pm; Cramér–Rao bound {bound_pm:.2g} pm)" if hit.any() else ""
        lines.append(f"    vs truth  {hit.sum()}/{inside.sum()} true columns found within 1 Å{rms}, "
                     f"{false} found columns match none")
        if counts is not None and hit.any():
            if counted:
                got = counts[j[hit]]
                exact = got == np.asarray(cols["count"])[inside][hit]
                lines.append(f"    vs truth  atom counts exact for {exact.mean():.0%} of the found true columns "
                             f"(predicted by the stage: {predicted:.0%})")
            else:
                lines.append("    vs truth  no counts given: the stage says this dose cannot count atoms")
    except (OSError, KeyError, ValueError) as e:
        lines.append(f"    (truth comparison skipped: {e})")
    return "\n".join(lines)


def _wait_for_scan(session, emulator, timeout_s: float = 600):
    """The demo's scan result, or None as soon as the emulator has failed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            return session.wait(timeout=0.5)
        except TimeoutError:
            if emulator.poll() not in (None, 0):
                return None
    return None


def summary(result, truth_path: Path, seconds: float, what: str = "") -> str:
    """Where everything is, and how the images compare with the emulator's noiseless truth."""
    what = f" ({what})" if what else ""
    t = result.timings
    took = [f"frames received and processed in {t['last_frame'] - t['first_frame']:.2f} s"
            if t.get("first_frame") and t.get("last_frame") else "",
            f"file written {t['written'] - t['last_frame']:.2f} s after the last frame"
            if t.get("written") and t.get("last_frame") else "",
            f"{seconds:.1f} s in all, with the emulator generating the scan"]
    lines = [f"\ndemo: scan {result.scan_id}{what} {result.status} ({result.frames_received:,}/{result.n_frames:,} frames, "
             f"{result.events:,} electrons)",
             f"  time      : {'; '.join(x for x in took if x)}",
             f"  scan file : {result.path}   (stemstream info {result.path})",
             f"  previews  : {Path(result.path).parent / 'previews' / Path(result.path).stem}_summary.png "
             + "(and one PNG per image there)"]
    try:
        import h5py
        with h5py.File(truth_path, "r") as f:
            group = f[result.scan_id]
            expected = {k: group["expected"][k][()] for k in group["expected"]}
        for name, key in (("bf", "bf"), ("adf", "adf"), ("com_x", "com_x"), ("com_y", "com_y")):
            if name in result.results and key in expected:
                a, b = result.results[name].ravel(), expected[key].ravel()
                ok = np.isfinite(a) & np.isfinite(b)
                if ok.sum() > 1 and a[ok].std() > 0 and b[ok].std() > 0:
                    r = np.corrcoef(a[ok], b[ok])[0, 1]
                    lines.append(f"  {name:<5}: correlation with the noiseless truth {r:.3f}")
                else:
                    lines.append(f"  {name:<5}: no correlation (an image is constant on this detector)")
        lines.append(f"  truth     : {truth_path}")
    except (OSError, KeyError) as e:
        lines.append(f"  (truth comparison skipped: {e})")
    return "\n".join(lines)
