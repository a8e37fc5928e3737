"""Real detectors, side by side: stemstream's DECTRIS and Merlin sources against LiberTEM-live
receiving the same simulator stream, and against the detectors' own frame rates.

    .venv-bench/bin/python benchmarks/bench_detectors.py [--scan 32x32] [--dose 50 500]
        [--repeats 3] [--skip-end-to-end] [--json benchmarks/results/detectors.json]

1. Per worker core (this process pinned to one core, CPU time): the work a worker does per frame —
   decode the detector's bytes (Merlin: MIB payload to counts, done by the leader; DECTRIS:
   bitshuffle-LZ4 image), dense counts to events, and the default operators (virtual images,
   centre of mass, summed pattern, completeness, event store) — in frames/s and electrons/s.
2. End to end with LiberTEM-live's simulators (the same stream for both): a 2-worker
   stemstream session (frames/s from the scan's first to last frame) and LiberTEM-live's
   ``SumUDF`` (frames/s of ``run_udf``; its PipelinedExecutor uses every core). Per core:
   divided by the cores each used. The simulators share the machine's cores with the
   receivers, so these are lower bounds.
3. The detectors' own rates: no maker's datasheet figure could be confirmed while writing
   this (docs/DECTRIS.md, docs/MERLIN.md); the figures below are recollections, marked
   unverified, to put the per-core rates in scale only.

Medians over ``--repeats`` (the first, cold, run is dropped). The load average is printed:
on a busy machine every rate here is a lower bound.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from operators.chunk import Chunk  # noqa: E402
from operators.dense import counts_to_events  # noqa: E402
from stream.config import DetectorSpec, PipelineConfig, build_operators  # noqa: E402
from stream.sources import mib, simplon  # noqa: E402
from stream.transport.protocol import Geometry  # noqa: E402

# CPU time of this process: on a shared machine the wall clock counts the other processes' turns
CLOCK = time.process_time
UNVERIFIED_RATES = {  # frames/s, recollections: no datasheet found (docs/DECTRIS.md, docs/MERLIN.md)
    "dectris": ("ARINA 192x192", 120_000),
    "merlin-1bit": ("Merlin single chip, 1 bit", 10_000),
    "merlin-12bit": ("Merlin single chip, 12 bit", 1_000),
}


def frames_for(n, shape, dose, top, seed=0, dtype=np.uint16):
    """Counted frames: 70 % of ``dose`` electrons in a disk, the rest spread, clipped to ``top``."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    disk = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (h / 8) ** 2
    lam = np.where(disk, 0.7 * dose / disk.sum(), 0.3 * dose / (~disk).sum())
    return np.minimum(rng.poisson(lam, (n, h, w)), top).astype(dtype)


def pin_one_core():
    try:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        return True
    except (AttributeError, OSError):
        return False


def per_core(case: str, frames: np.ndarray, scan_shape, block: int = 64, repeats: int = 3) -> dict:
    """Seconds per frame of each step of one worker's work, on one core."""
    n, h, w = frames.shape
    g = Geometry(tuple(scan_shape), (h, w))
    if case.startswith("merlin"):
        bits, raw = (1, True) if case == "merlin-1bit" else (12, False)
        wire = np.frombuffer(b"".join(mib.frame_message(i + 1, frames[i], bits, raw) for i in range(n)),
                             np.uint8).reshape(n, -1)
        fh = mib.parse_frame_header(wire[0].tobytes())

        def decode(lo, hi):
            return mib.decode_payloads(wire[lo:hi, fh.header_size:], fh)
    else:
        blobs = [simplon.encode_image(f, "bslz4") for f in frames]
        meta = {"shape": [w, h], "type": frames.dtype.name, "encoding": blobs[0][1]}

        def decode(lo, hi):
            return np.stack([simplon.decode_image(blobs[i][0], meta) for i in range(lo, hi)])
    times = {"decode": [], "events": [], "operators": []}
    for rep in range(repeats + 1):
        ops = build_operators(PipelineConfig(), g)
        states = {op.name: op.new_state() for op in ops}
        t = {"decode": 0.0, "events": 0.0, "operators": 0.0}
        for lo in range(0, n, block):
            hi = min(n, lo + block)
            t0 = CLOCK()
            values = decode(lo, hi)
            t1 = CLOCK()
            counts, indices = counts_to_events(values)
            t2 = CLOCK()
            fr = np.arange(lo, hi)
            chunk = Chunk.from_counts(fr, np.zeros(hi - lo, np.int16), fr, counts, indices)
            for op in ops:
                op.process(states[op.name], chunk)
            t3 = CLOCK()
            t["decode"] += t1 - t0
            t["events"] += t2 - t1
            t["operators"] += t3 - t2
        if rep:  # the first run compiles and warms caches
            for k in t:
                times[k].append(t[k] / n)
    med = {k: statistics.median(v) for k, v in times.items()}
    total = sum(med.values())
    electrons = float(frames.reshape(n, -1).sum()) / n
    return {"case": case, "frame_shape": [h, w], "electrons_per_frame": electrons,
            "us_per_frame": {k: v * 1e6 for k, v in med.items()},
            "frames_per_s_core": 1 / total, "electrons_per_s_core": electrons / total}


def end_to_end(case: str, frames: np.ndarray, scan_shape, repeats: int, tmp: Path) -> dict:
    """stemstream (2 workers) and LiberTEM-live SumUDF on the same simulator stream."""
    from peer_sims import dectris_sim, merlin_sim
    from stream.session import Session

    n = len(frames)
    out = {"case": case, "stemstream_fps": [], "libertem_live_fps": []}
    if case.startswith("merlin"):
        bits, raw = (1, True) if case == "merlin-1bit" else (12, False)
        hdr, _ = mib.write_mib(str(tmp / case), frames.astype(mib.VALUE_DTYPE[bits]), bits, raw, scan_shape)

        def new_sim():
            return merlin_sim(hdr, scan_shape)
    else:
        simplon.write_dump(str(tmp / f"{case}.dump"), frames, series=1)

        def new_sim():
            return dectris_sim(str(tmp / f"{case}.dump"))
    with new_sim() as sim:
        if case.startswith("merlin"):
            det = DetectorSpec(kind="merlin", scan=list(scan_shape), data=sim.data, control=sim.control,
                               mode="active")
        else:
            det = DetectorSpec(kind="dectris", scan=list(scan_shape), dcu=sim.dcu, data=sim.stream, mode="active")
        cfg = PipelineConfig(detector=det)
        cfg = replace(cfg, output=replace(cfg.output, dir=str(tmp / "out"), previews=False))
        with Session([], config=cfg, workers=2, console=False) as s:
            for rep in range(repeats + 1):
                r = s.acquire(timeout=300)
                span = r.timings["last_frame"] - r.timings["first_frame"]
                if rep and r.status == "complete" and span > 0:
                    out["stemstream_fps"].append(n / span)
    with new_sim() as sim:  # a fresh one: Merlin's simulator hangs when a new client connects
        out["libertem_live_fps"] = libertem_live_sum(case, sim, scan_shape, repeats)
    for key in ("stemstream_fps", "libertem_live_fps"):
        out[key + "_median"] = statistics.median(out[key]) if out[key] else None
    out["libertem_live_cores"] = os.cpu_count()
    return out


def libertem_live_sum(case, sim, scan_shape, repeats) -> list[float]:
    """LiberTEM-live's own receivers and SumUDF on the simulator (as its docs do)."""
    from libertem.udf.sum import SumUDF
    from libertem_live.api import Hooks, LiveContext

    class Trigger(Hooks):
        def __init__(self, control):
            self.control = control

        def on_ready_for_data(self, env):
            # LiberTEM-live waits for the acquisition header after this returns: start
            # Merlin from a thread, as its own examples do
            from stream.sources.merlin import MerlinControl

            def go():
                c = MerlinControl(self.control)
                c.cmd("STARTACQUISITION")
                time.sleep(0.05)
                c.cmd("SOFTTRIGGER")
                c.close()
            threading.Thread(target=go, daemon=True).start()

    fps = []
    with LiveContext() as ctx:
        if case.startswith("merlin"):
            host, port = sim.data.split("//")[1].split(":")
            chost, cport = sim.control.split("//")[1].split(":")
            conn = ctx.make_connection("merlin").open(api_host=chost, api_port=int(cport), data_host=host,
                                                      data_port=int(port))
        else:
            ahost, aport = sim.dcu.split("//")[1].split(":")
            zhost, zport = sim.stream.split("//")[1].split(":")
            conn = ctx.make_connection("dectris").open(api_host=ahost, api_port=int(aport), data_host=zhost,
                                                       data_port=int(zport))
        try:
            for rep in range(repeats + 1):
                if case.startswith("merlin"):
                    aq = ctx.make_acquisition(conn=conn, nav_shape=tuple(scan_shape), hooks=Trigger(sim.control))
                else:
                    aq = ctx.make_acquisition(conn=conn, nav_shape=tuple(scan_shape),
                                              controller=conn.get_active_controller(trigger_mode="exte"))
                t0 = time.perf_counter()
                ctx.run_udf(dataset=aq, udf=SumUDF())
                if rep:
                    fps.append(scan_shape[0] * scan_shape[1] / (time.perf_counter() - t0))
        finally:
            conn.close()
    return fps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scan", default="32x32", help="scan of the end-to-end runs (default 32x32)")
    ap.add_argument("--dose", type=float, nargs="+", default=[50.0, 500.0], help="electrons per frame")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--per-core-frames", type=int, default=512)
    ap.add_argument("--skip-end-to-end", action="store_true")
    ap.add_argument("--json", help="write the results there")
    a = ap.parse_args(argv)
    ny, nx = (int(v) for v in a.scan.split("x"))
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the start", flush=True)
    results = {"load_start": os.getloadavg(), "per_core": [], "end_to_end": []}
    cases = {"merlin-1bit": ((256, 256), 1, np.uint8), "merlin-12bit": ((256, 256), 4095, np.uint16),
             "dectris": ((192, 192), 65535, np.uint16)}
    if not a.skip_end_to_end:
        with tempfile.TemporaryDirectory() as tmp:
            for case, (shape, top, dtype) in cases.items():
                frames = frames_for(ny * nx, shape, a.dose[0], top, dtype=dtype)
                try:
                    e = end_to_end(case, frames, (ny, nx), a.repeats, Path(tmp))
                except Exception as ex:  # noqa: BLE001 - report and go on with the others
                    e = {"case": case, "error": f"{type(ex).__name__}: {ex}"}
                results["end_to_end"].append(e)
                print(json.dumps(e), flush=True)
    pinned = pin_one_core()
    for case, (shape, top, dtype) in cases.items():
        for dose in a.dose:
            frames = frames_for(a.per_core_frames, shape, dose, top, dtype=dtype)
            r = per_core(case, frames, (1, a.per_core_frames), repeats=a.repeats)
            r["pinned"] = pinned
            results["per_core"].append(r)
    results["load_end"] = os.getloadavg()
    print(report(results), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


def report(res) -> str:
    lines = [f"load average {res['load_start'][0]:.1f} at the start, {res['load_end'][0]:.1f} at the end "
             f"({os.cpu_count()} cores)", "",
             "| source | frame | e-/frame | decode µs | events µs | operators µs | frames/s/core | M e-/s/core | maker's rate (unverified) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in res["per_core"]:
        us = r["us_per_frame"]
        name, rate = UNVERIFIED_RATES[r["case"]]
        lines.append(f"| {r['case']} | {r['frame_shape'][0]}² | {r['electrons_per_frame']:.0f} | {us['decode']:.1f} | "
                     f"{us['events']:.1f} | {us['operators']:.1f} | {r['frames_per_s_core']:,.0f} | "
                     f"{r['electrons_per_s_core'] / 1e6:.1f} | {name}: {rate:,} |")
    if res["end_to_end"]:
        lines += ["", "| simulator stream | stemstream, 2 workers: frames/s (per core) | LiberTEM-live SumUDF: frames/s (per core) |",
                  "| --- | --- | --- |"]
        for e in res["end_to_end"]:
            if "error" in e:
                lines.append(f"| {e['case']} | error: {e['error']} | |")
                continue
            s, lt = e["stemstream_fps_median"], e["libertem_live_fps_median"]
            c = e["libertem_live_cores"]
            lines.append(f"| {e['case']} | {s or 0:,.0f} ({(s or 0) / 2:,.0f}) | {lt or 0:,.0f} ({(lt or 0) / c:,.0f}) |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
