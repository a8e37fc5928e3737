"""Real detectors, side by side: stemstream's DECTRIS and Merlin sources against LiberTEM-live
receiving the same simulator stream, and against the detectors' own frame rates.

    .venv/bin/python benchmarks/bench_detectors.py [--scan 32x32] [--dose 50 500]
        [--repeats 3] [--skip-end-to-end] [--skip-per-core] [--cases dectris ...]
        [--json benchmarks/results/detectors.json]

1. Per worker core (this process pinned to one core, CPU time): the work per frame, step by
   step. Merlin, as the leader does it now: the frame messages' payloads straight to events
   (``stream.sources.mib_events``), the block of events forwarded to a worker (``frames``
   message through a CURVE PUSH/PULL pair, both ends and ZeroMQ's threads in this process),
   and the default operators (virtual images, centre of mass, summed pattern, completeness,
   event store); and, in the same run, the path before it: decode to dense counts
   (``mib.decode_payloads``), forward the dense block (CURVE), counts to events
   (``operators.dense``). Every counter depth, raw, and 12 bit U16. DECTRIS, as a worker
   does it now: a block of bitshuffle-LZ4 images straight to events
   (``stream.sources.bslz4_events``, one call), operators; before: each image decoded
   (``dectris-compression``), counts to events (``operators.dense``).
2. End to end with LiberTEM-live's simulators (the same stream for both): a stemstream session
   of one worker and LiberTEM-live 0.3's own receivers running ``SumUDF`` on a
   PipelinedExecutor of one worker, each pinned to CPU 0 (``sched_setaffinity``, inherited by
   the processes they start) with the simulator pinned to the last CPU. Two rates each: frames
   per second of wall clock of the whole acquisition (stemstream: ``Session.acquire``, which
   arms, triggers, receives, finalizes and writes the scan file; LiberTEM: ``run_udf``, which
   arms, triggers and receives, and writes nothing), and
   frames per CPU-second of every process of the receiving side (this process and its
   children but the simulator's: CPU time is what a core gives, and it holds up on a shared
   machine where wall clock does not). The ratio of the second is the per-core comparison.
3. The detectors' own rates: no maker's datasheet figure could be confirmed while writing
   this (docs/DECTRIS.md, docs/MERLIN.md); the figures below are recollections, marked
   unverified, to put the per-core rates in scale only: cores needed = rate / per-core rate.

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
from stream.sources import bslz4_events, mib, simplon  # noqa: E402
from stream.sources.merlin import BLOCK_FRAMES  # noqa: E402
from stream.sources.mib_events import PayloadEvents  # noqa: E402
from stream.transport.protocol import Geometry, decode, encode_dense, encode_frames  # noqa: E402

# CPU time of this process: on a shared machine the wall clock counts the other processes' turns
CLOCK = time.process_time
UNVERIFIED_RATES = {  # frames/s, recollections: no datasheet found (docs/DECTRIS.md, docs/MERLIN.md)
    "dectris": ("ARINA 192x192", 120_000),
    "merlin-1bit": ("Merlin single chip, 1 bit", 18_000),
    "merlin-6bit": ("Merlin single chip, 6 bit", None),
    "merlin-12bit": ("Merlin single chip, 12 bit", 1_000),
    "merlin-12bit-u16": ("Merlin single chip, 12 bit", 1_000),
    "merlin-24bit": ("Merlin single chip, 24 bit", None),
}
# case: (frame shape, counter depth or None for DECTRIS, raw, value dtype)
CASES = {"merlin-1bit": ((256, 256), 1, True), "merlin-6bit": ((256, 256), 6, True),
         "merlin-12bit": ((256, 256), 12, True), "merlin-24bit": ((256, 256), 24, True),
         "merlin-12bit-u16": ((256, 256), 12, False), "dectris": ((192, 192), None, False)}
END_TO_END = ("merlin-1bit", "merlin-12bit-u16", "dectris")
WHO = ("stemstream", "libertem_live")


def frames_for(n, shape, dose, top, seed=0, dtype=np.uint16):
    """Counted frames: 70 % of ``dose`` electrons in a disk, the rest spread, clipped to ``top``."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    disk = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (h / 8) ** 2
    lam = np.where(disk, 0.7 * dose / disk.sum(), 0.3 * dose / (~disk).sum())
    return np.minimum(rng.poisson(lam, (n, h, w)), top).astype(dtype)


def case_frames(case: str, n: int, dose: float) -> np.ndarray:
    shape, bits, _ = CASES[case]
    if bits is None:
        return frames_for(n, shape, dose, 65535, dtype=np.uint16)
    return frames_for(n, shape, dose, (1 << bits) - 1, dtype=mib.VALUE_DTYPE[bits])


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` (and so what it starts later) on ``cpus``."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:
            pass


class Forward:
    """The leader's forwarding channel as the session makes it: a CURVE PUSH and a PULL on
    TCP loopback, both in this process (their CPU, ZeroMQ's threads included, is ours)."""

    def __init__(self):
        import zmq
        from stream.security import ClientKeys, as_client, generate
        self.ctx = zmq.Context()
        server, client = generate(), generate()
        self.push, self.pull = self.ctx.socket(zmq.PUSH), self.ctx.socket(zmq.PULL)
        self.push.curve_secretkey, self.push.curve_publickey = server.secret, server.public
        self.push.curve_server = True
        as_client(self.pull, ClientKeys(client, server.public))
        port = self.push.bind_to_random_port("tcp://127.0.0.1")
        self.pull.connect(f"tcp://127.0.0.1:{port}")
        time.sleep(0.3)

    def __call__(self, parts):
        self.push.send_multipart(parts, copy=False)
        return decode(self.pull.recv_multipart(copy=False))

    def close(self):
        self.push.close(0)
        self.pull.close(0)
        self.ctx.term()


def per_core(case: str, frames: np.ndarray, block: int = BLOCK_FRAMES, repeats: int = 3, forward=None) -> dict:
    """CPU seconds per frame of each step of the work, on one core (blocks of ``block``
    frames: what the Merlin leader forwards at most per message)."""
    n, h, w = frames.shape
    g = Geometry((1, n), (h, w))
    _, bits, raw = CASES[case]
    if bits is not None:
        msgs = [mib.frame_message(i + 1, frames[i], bits, raw) for i in range(n)]
        rows = np.frombuffer(b"".join(mib.mpx_prefix(len(m)) + m for m in msgs), np.uint8).reshape(n, -1)
        fh = mib.parse_frame_header(msgs[0])
        off = mib.MPX_PREFIX_LEN + fh.header_size
        pe = PayloadEvents(fh)
        steps = {"events (leader)": [], "forward events": [], "operators": [],
                 "before: decode": [], "before: forward dense": [], "before: events": []}
    else:
        blobs = [simplon.encode_image(f, "bslz4") for f in frames]
        meta = {"shape": [w, h], "type": frames.dtype.name, "encoding": blobs[0][1]}
        steps = {"images to events": [], "operators": [], "before: decode": [], "before: events": []}
    for rep in range(repeats + 1):
        ops = build_operators(PipelineConfig(), g)
        states = {op.name: op.new_state() for op in ops}
        t = dict.fromkeys(steps, 0.0)
        for lo in range(0, n, block):
            hi = min(n, lo + block)
            if bits is not None:
                t0 = CLOCK()
                counts = np.zeros(hi - lo, np.uint32)
                out = np.empty(1 << 20, np.uint32)
                done, e = pe.events(rows[lo:hi], off, 0, counts, out, 0)
                t1 = CLOCK()
                msg = forward(encode_frames("b", 0, g, lo, counts, out[:e]))
                t2 = CLOCK()
                counts, indices = msg.counts, msg.indices
                values = mib.decode_payloads(rows[lo:hi, off:off + fh.payload_size], fh)
                t3 = CLOCK()
                dense = forward(encode_dense("b", 0, g, lo, values, "counts")).dense
                t4 = CLOCK()
                c2, i2 = counts_to_events(dense)
                t5 = CLOCK()
                assert done == hi - lo and np.array_equal(c2, counts) and np.array_equal(i2, indices)
                t["events (leader)"] += t1 - t0
                t["forward events"] += t2 - t1
                t["before: decode"] += t3 - t2
                t["before: forward dense"] += t4 - t3
                t["before: events"] += t5 - t4
            else:
                t0 = CLOCK()
                counts, indices, status = bslz4_events.bslz4_events([blobs[i][0] for i in range(lo, hi)], h * w, 2, 1 << 30)
                t1 = CLOCK()
                values = np.stack([simplon.decode_image(blobs[i][0], meta) for i in range(lo, hi)])
                t2 = CLOCK()
                c2, i2 = counts_to_events(values)
                t3 = CLOCK()
                assert not status.any() and np.array_equal(c2, counts) and np.array_equal(i2, indices)
                t["images to events"] += t1 - t0
                t["before: decode"] += t2 - t1
                t["before: events"] += t3 - t2
            t6 = CLOCK()
            fr = np.arange(lo, hi)
            chunk = Chunk.from_counts(fr, np.zeros(hi - lo, np.int16), fr, counts, indices)
            for op in ops:
                op.process(states[op.name], chunk)
            t["operators"] += CLOCK() - t6
        if rep:  # the first run compiles and warms caches
            for k in t:
                steps[k].append(t[k] / n)
    med = {k: statistics.median(v) for k, v in steps.items()}
    now = sum(v for k, v in med.items() if not k.startswith("before"))
    electrons = float(frames.reshape(n, -1).sum()) / n
    r = {"case": case, "frame_shape": [h, w], "electrons_per_frame": electrons,
         "us_per_frame": {k: v * 1e6 for k, v in med.items()},
         "frames_per_s_core": 1 / now, "electrons_per_s_core": electrons / now}
    before = sum(v for k, v in med.items() if k.startswith("before")) + med["operators"]
    r["before_frames_per_s_core"] = 1 / before
    return r


class CpuMeter:
    """CPU seconds of this process and its descendants, but those of ``exclude`` (the
    simulator), between ``start`` and ``stop``; processes that ended in between are lost,
    so the meter is read while the receivers still run."""

    def __init__(self, exclude_pid: int):
        import psutil
        self.psutil, self.exclude = psutil, exclude_pid

    def _now(self) -> dict:
        me = self.psutil.Process()
        skip = {self.exclude} | {c.pid for c in self.psutil.Process(self.exclude).children(recursive=True)}
        out = {}
        for p in [me] + me.children(recursive=True):
            if p.pid in skip:
                continue
            try:
                t = p.cpu_times()
                out[p.pid] = t.user + t.system
            except self.psutil.NoSuchProcess:
                continue
        return out

    def start(self):
        self._t0 = self._now()

    def stop(self) -> float:
        t1 = self._now()
        return sum(v - self._t0.get(pid, 0.0) for pid, v in t1.items())


def end_to_end(case: str, frames: np.ndarray, scan_shape, repeats: int, tmp: Path) -> dict:
    """stemstream (one worker) and LiberTEM-live SumUDF (one worker) on the same simulator
    stream, the receivers on CPU 0 and the simulator on the last CPU."""
    from peer_sims import dectris_sim, merlin_sim
    from stream.session import Session

    n = len(frames)
    _, bits, raw = CASES[case]
    out = {"case": case, "frames": n}
    if bits is not None:
        hdr, _ = mib.write_mib(str(tmp / case), frames, bits, raw, scan_shape)

        def new_sim():
            return merlin_sim(hdr, scan_shape)
    else:
        simplon.write_dump(str(tmp / f"{case}.dump"), frames, series=1)

        def new_sim():
            return dectris_sim(str(tmp / f"{case}.dump"))
    last = max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {0})
    for who in WHO:
        fps, cpu = [], []
        with new_sim() as sim:  # a fresh one each: Merlin's simulator hangs when a new client connects
            pin(sim.proc.pid, {last})
            meter = CpuMeter(sim.proc.pid)
            if who == "stemstream":
                stemstream_runs(case, sim, scan_shape, repeats, tmp, meter, fps, cpu, Session)
            else:
                libertem_live_runs(case, sim, scan_shape, repeats, meter, fps, cpu)
        out[who + "_fps"] = fps
        out[who + "_frames_per_cpu_s"] = [n / c for c in cpu if c > 0]
        out[who + "_fps_median"] = statistics.median(fps) if fps else None
        out[who + "_frames_per_cpu_s_median"] = (statistics.median(out[who + "_frames_per_cpu_s"])
                                                 if out[who + "_frames_per_cpu_s"] else None)
    s, lt = out.get("stemstream_frames_per_cpu_s_median"), out.get("libertem_live_frames_per_cpu_s_median")
    out["ratio_per_cpu_s"] = s / lt if s and lt else None
    return out


def stemstream_runs(case, sim, scan_shape, repeats, tmp, meter, fps, cpu, Session):
    if case.startswith("merlin"):
        det = DetectorSpec(kind="merlin", scan=list(scan_shape), data=sim.data, control=sim.control, mode="active")
    else:
        det = DetectorSpec(kind="dectris", scan=list(scan_shape), dcu=sim.dcu, data=sim.stream, mode="active")
    cfg = PipelineConfig(detector=det)
    cfg = replace(cfg, output=replace(cfg.output, dir=str(tmp / "out"), previews=False))
    n = scan_shape[0] * scan_shape[1]
    with Session([], config=cfg, workers=1, console=False) as s:
        for rep in range(repeats + 1):
            meter.start()
            t0 = time.perf_counter()
            r = s.acquire(timeout=300)  # arm, trigger, receive, finalize and write the scan file
            wall = time.perf_counter() - t0
            used = meter.stop()
            if r.status != "complete":
                print(f"stemstream {case}: scan {r.status}: {r.reason}", flush=True)
            elif rep:
                fps.append(n / wall)
                cpu.append(used)


def libertem_live_runs(case, sim, scan_shape, repeats, meter, fps, cpu):
    """LiberTEM-live's own receivers and SumUDF on the simulator (as its docs do), on a
    PipelinedExecutor of one worker on CPU 0."""
    from libertem.executor.pipelined import PipelinedExecutor
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

    executor = PipelinedExecutor(spec=PipelinedExecutor.make_spec(cpus=[0], cudas=[]))
    n = scan_shape[0] * scan_shape[1]
    with LiveContext(executor=executor) as ctx:
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
                meter.start()
                t0 = time.perf_counter()
                ctx.run_udf(dataset=aq, udf=SumUDF())
                wall = time.perf_counter() - t0
                used = meter.stop()
                if rep:
                    fps.append(n / wall)
                    cpu.append(used)
        finally:
            conn.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scan", default="32x32", help="scan of the end-to-end runs (default 32x32)")
    ap.add_argument("--dose", type=float, nargs="+", default=[50.0, 500.0], help="electrons per frame")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--per-core-frames", type=int, default=512)
    ap.add_argument("--skip-end-to-end", action="store_true")
    ap.add_argument("--skip-per-core", action="store_true")
    ap.add_argument("--cases", nargs="+", choices=END_TO_END, default=list(END_TO_END),
                    help="end-to-end cases to run (default: all)")
    ap.add_argument("--json", help="write the results there")
    a = ap.parse_args(argv)
    ny, nx = (int(v) for v in a.scan.split("x"))
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the start", flush=True)
    results = {"load_start": os.getloadavg(), "per_core": [], "end_to_end": []}
    cpus = os.sched_getaffinity(0)
    if not a.skip_end_to_end:
        with tempfile.TemporaryDirectory() as tmp:
            for case in a.cases:
                frames = case_frames(case, ny * nx, a.dose[0])
                try:
                    e = end_to_end(case, frames, (ny, nx), a.repeats, Path(tmp))
                except Exception as ex:  # noqa: BLE001 - report and go on with the others
                    e = {"case": case, "error": f"{type(ex).__name__}: {ex}"}
                finally:
                    os.sched_setaffinity(0, cpus)
                results["end_to_end"].append(e)
                print(json.dumps(e), flush=True)
    results["load_mid"] = os.getloadavg()
    if not a.skip_per_core:
        os.sched_setaffinity(0, {min(cpus)})  # this process and ZeroMQ's threads, started after
        forward = Forward()
        try:
            for case in CASES:
                for dose in a.dose:
                    r = per_core(case, case_frames(case, a.per_core_frames, dose), repeats=a.repeats,
                                 forward=forward)
                    results["per_core"].append(r)
                    print(json.dumps(r), flush=True)
        finally:
            forward.close()
    results["load_end"] = os.getloadavg()
    print(report(results), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


def report(res) -> str:
    lines = [f"load average {res['load_start'][0]:.1f} at the start, {res['load_end'][0]:.1f} at the end "
             f"({os.cpu_count()} cores)"]
    if res["per_core"]:
        lines += ["", "| source | e-/frame | µs per frame, step by step | frames/s/core | before: frames/s/core | "
                  "M e-/s/core | maker's rate (unverified): cores at this rate |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in res["per_core"]:
            us = ", ".join(f"{k} {v:.1f}" for k, v in r["us_per_frame"].items())
            name, rate = UNVERIFIED_RATES[r["case"]]
            before = r.get("before_frames_per_s_core")
            cores = f"{name}: {rate:,} → {rate / r['frames_per_s_core']:.2f}" if rate else ""
            lines.append(f"| {r['case']} | {r['electrons_per_frame']:.0f} | {us} | {r['frames_per_s_core']:,.0f} | "
                         f"{f'{before:,.0f}' if before else ''} | {r['electrons_per_s_core'] / 1e6:.1f} | {cores} |")
    if res["end_to_end"]:
        lines += ["", "| simulator stream | stemstream: frames/s wall | frames per CPU-s | LiberTEM-live SumUDF: "
                  "frames/s wall | frames per CPU-s | stemstream ÷ LiberTEM-live per CPU-s |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for e in res["end_to_end"]:
            if "error" in e:
                lines.append(f"| {e['case']} | error: {e['error']} | | | | |")
                continue

            def f(v):
                return f"{v:,.0f}" if v else "–"
            ratio = e["ratio_per_cpu_s"]
            lines.append(f"| {e['case']} | {f(e['stemstream_fps_median'])} | {f(e['stemstream_frames_per_cpu_s_median'])} | "
                         f"{f(e['libertem_live_fps_median'])} | {f(e['libertem_live_frames_per_cpu_s_median'])} | "
                         f"{f'{ratio:.2f}' if ratio else '–'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
