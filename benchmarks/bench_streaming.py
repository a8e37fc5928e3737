"""End to end, emulator included: `stemstream simulate` (its own process) → ZeroMQ → a local
dask cluster (separate worker processes) → scan file on disk, at rising target rates.

    .venv/bin/python benchmarks/bench_streaming.py [--scan 512x512] [--dose 100] [--sources 4]
        [--workers 2] [--rates 87000 150000 300000 450000 max] [--repeats 3] [--out /tmp/bench-stream]

For every run: the rate the emulator achieved (PUSH blocks instead of dropping, so a pipeline
that cannot keep up slows the emulator down rather than losing frames), frames lost, the
latency from the emulator's last frame sent to the scan file renamed into place, CPU seconds
of the emulator, of each worker and of this process (scheduler + coordinator), and peak
memory (resident set high-water mark). A rate is "held" when the emulator achieved at least
95 % of it with zero frames lost. Medians over ``--repeats`` runs per rate.

The two cores while the frames stream (from the emulator's scan generated, in memory, to its
last frame sent): CPU seconds of every process over that time (/proc/PID/stat, 10 ms ticks),
as cores, so the emulator's share of the machine is visible. ``--pinned`` adds an unpaced
run with the emulator alone on CPU 1 (``taskset``; it sends its pre-generated scan from
memory) and everything else (scheduler, coordinator, workers, every thread) on CPU 0: the
pipeline's own ceiling on one core, with nothing else of ours on it.

``--early-table`` instead measures the file's latency against the scan's size with the
events written while the scan runs (``[output] write_while_scanning``) on and off, side by
side in one run on one cluster: ``--scans 128x128 512x512 1024x1024`` at the first of
``--rates`` (300,000 frames/s by default there), ``--repeats`` runs each (``--early-only``:
without the runs written at the end). It also says how far the receivers were behind the
emulator halfway through its sending and when it sent its last frame (frames processed, as
the coordinator heard of them, against the emulator's steady pace): a lag that grows over the
scan is a throughput deficit, one only at the end a burst.

``--plain-sources``: the emulator's links without CURVE (``simulate --insecure``, the
receivers told so by ``[security] plain_sources``), as a DECTRIS or Merlin detector delivers
its frames; every other channel as configured.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stream.config import load_config  # noqa: E402
from stream.transport.net import free_port_block  # noqa: E402
from stream.session import Session, expand_sources  # noqa: E402

RATES = ["87000", "150000", "300000", "450000", "max"]
SENT = re.compile(r"\] sent ([\d,]+) frames, ([\d,]+) electrons in ([\d.]+) s \(([\d,]+) frames/s\)")


def _proc_times():
    t = os.times()
    return t.user + t.system


def _vm_hwm_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far, all its threads, ended
    ones included (/proc/PID/stat, in clock ticks of 10 ms); 0 for a process that is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuTrace:
    """CPU seconds of processes sampled every ``every_s`` in a thread of its own, so that the
    CPU of any wall-clock window can be read afterwards (a process that ended keeps its last
    value)."""

    def __init__(self, pids, every_s: float = 0.02):
        self.pids, self.samples = list(pids), []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        last = [0.0] * len(self.pids)
        while not self._stop.is_set():
            last = [max(a, cpu_s(p)) for a, p in zip(last, self.pids)]
            self.samples.append((time.time(), last))
            self._stop.wait(0.02)

    def stop(self):
        self._stop.set()
        self._thread.join()

    def between(self, t0: float, t1: float) -> list[float]:
        """CPU seconds each process used from wall time t0 to t1 (linear between samples)."""
        import numpy as np
        t = np.array([x for x, _ in self.samples])
        c = np.array([y for _, y in self.samples])
        return [float(np.interp(t1, t, c[:, k]) - np.interp(t0, t, c[:, k])) for k in range(len(self.pids))]


def pin_tree(cpus) -> None:
    """Every thread of this process and of its descendants (nannies, workers) on ``cpus``."""
    import psutil
    for p in [psutil.Process()] + psutil.Process().children(recursive=True):
        try:
            for t in p.threads():
                try:
                    os.sched_setaffinity(t.id, cpus)
                except OSError:
                    pass  # a thread that just ended
        except psutil.Error:
            pass


def memory_args(cfg, a) -> None:
    """--events-in-memory-mb, --write-block-mb and --early-block-mb into the configuration,
    where given."""
    if a.events_in_memory_mb is not None:
        cfg.memory.events_in_memory_mb = a.events_in_memory_mb
    if a.write_block_mb is not None:
        cfg.memory.write_block_mb = a.write_block_mb
    if a.early_block_mb is not None:
        cfg.memory.early_block_mb = a.early_block_mb


def run_emulator(args, bind, scan_id, rate, on_generated=None, cpu=None, plain=False):
    """Run `stemstream simulate` (on CPU ``cpu`` alone if given, by taskset); call
    ``on_generated(pid)`` when its scan is generated and about to stream. Returns (achieved
    frames/s, wall time of the last frame sent, emulator pid)."""
    cmd = [sys.executable, "-m", "stream.cli", "simulate", "--specimen", args.specimen,
           "--scan", args.scan, "--detector", args.detector, "--dose", str(args.dose),
           "--sources", str(args.sources), "--bind", bind, "--rate", str(rate),
           "--scan-id", scan_id, "--wait", "60"] + (["--insecure"] if plain else [])
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu)] + cmd
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, bufsize=1)
    sent = {}

    def read():
        for line in proc.stdout:
            m = SENT.search(line)
            if m:
                sent.update(time=time.time(), rate=float(m.group(4).replace(",", "")))
                if on_generated is not None:
                    sent["cpu"] = on_generated(proc.pid)
            elif "] generated " in line and on_generated is not None:
                sent["cpu0"] = on_generated(proc.pid)
    reader = threading.Thread(target=read)
    reader.start()
    code = proc.wait()
    reader.join()
    if code != 0 or "rate" not in sent:
        raise RuntimeError(f"emulator failed (exit code {code}): {' '.join(cmd)}")
    return sent


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specimen", default="mgo")
    ap.add_argument("--scan", default="512x512")
    ap.add_argument("--detector", default="576x576")
    ap.add_argument("--dose", type=float, default=100.0)
    ap.add_argument("--sources", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rates", nargs="+", default=RATES)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None,
                    help="where the scan files go (default: a temporary directory, removed at the end)")
    ap.add_argument("--keep", action="store_true",
                    help="keep every scan file (default: each is deleted once measured; a 1024² scan is 190 MB)")
    ap.add_argument("--events-in-memory-mb", type=float, default=None,
                    help="[memory] events_in_memory_mb of the receivers (default: the configuration's)")
    ap.add_argument("--write-block-mb", type=float, default=None,
                    help="[memory] write_block_mb (default: the configuration's)")
    ap.add_argument("--early-block-mb", type=float, default=None,
                    help="[memory] early_block_mb (default: the configuration's)")
    ap.add_argument("--pinned", action="store_true",
                    help="add an unpaced run with the emulator alone on CPU 1, the pipeline on CPU 0")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON (benchmarks/results/...)")
    ap.add_argument("--early-table", action="store_true",
                    help="latency against scan size, events written while scanning on and off")
    ap.add_argument("--plain-sources", action="store_true",
                    help="the emulator's links without CURVE (simulate --insecure, [security] "
                         "plain_sources), as a DECTRIS or Merlin detector delivers; everything else as configured")
    ap.add_argument("--scans", nargs="+", default=["128x128", "512x512", "1024x1024"],
                    help="scan sizes of --early-table")
    ap.add_argument("--early-only", action="store_true",
                    help="--early-table without the runs written at the end")
    a = ap.parse_args(argv)
    temporary = a.out is None
    if temporary:
        a.out = tempfile.mkdtemp(prefix="stemstream-bench-streaming-")
    try:
        return early_table(a, argv) if a.early_table else rates_table(a, argv)
    finally:
        if temporary and not a.keep:
            shutil.rmtree(a.out, ignore_errors=True)


def measured(r, a) -> None:
    """A scan's file is measured: deleted unless ``--keep`` (the runs must not fill the disk)."""
    if r.path is not None and not a.keep:
        Path(r.path).unlink(missing_ok=True)


def rates_table(a, argv):
    """The rates of ``a.rates``, ``a.repeats`` runs each, in one session."""

    port = free_port_block(a.sources)
    bind = f"tcp://127.0.0.1:{port}"
    cfg = load_config(None)  # the defaults: previews included (drawn by the coordinator)
    memory_args(cfg, a)
    if a.plain_sources:  # the detector link without CURVE, as DECTRIS and Merlin deliver
        cfg = replace(cfg, security=replace(cfg.security, plain_sources=expand_sources([bind], a.sources)))
    print(f"command: python benchmarks/bench_streaming.py {' '.join(argv or sys.argv[1:])}")
    print(f"scan {a.scan}, detector {a.detector}, {a.dose:g} e-/frame, {a.sources} sources, "
          f"{a.workers} workers, {os.cpu_count()} cores; median of {a.repeats} runs per rate; "
          f"load average {os.getloadavg()[0]:.2f} at the start\n")
    rows = []
    plan = [(rate, None) for rate in a.rates] + ([("max", 1)] if a.pinned else [])
    with Session(expand_sources([bind], a.sources), out=a.out, config=cfg, workers=a.workers,
                 console=False) as s:
        client = s._client
        worker_pids = client.run(os.getpid)
        pids = [os.getpid()] + [worker_pids[k] for k in sorted(worker_pids)]

        def snapshot(emu_pid):  # (time, CPU s of: emulator, coordinator + scheduler, workers...)
            return time.perf_counter(), [cpu_s(emu_pid)] + [cpu_s(p) for p in pids]

        for rate, emu_cpu in plan:
            label = rate if emu_cpu is None else "max, emulator alone on CPU 1"
            if emu_cpu is not None:
                pin_tree({0})
            runs = []
            for i in range(a.repeats):
                sid = f"bench-{rate}-{'p' if emu_cpu is not None else ''}{i}"
                w0 = client.run(_proc_times)
                c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                me0 = _proc_times()
                trace = CpuTrace(pids)
                try:
                    sent = run_emulator(a, bind, sid, rate, snapshot, emu_cpu, a.plain_sources)
                    achieved, t_sent = sent["rate"], sent["time"]
                    r = s.wait(f"{sid}-0000", timeout=300)  # the emulator numbers its scans
                    measured(r, a)
                finally:
                    trace.stop()
                # the receiving side's CPU from the first frame received to the last: the cost
                # of the frames themselves, whatever the emulator's queues held meanwhile
                receiving = trace.between(r.timings["first_frame"], r.timings["last_frame"])
                c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                w1 = client.run(_proc_times)
                (ta, ca), (tb, cb) = sent["cpu0"], sent["cpu"]
                streaming = [(y - x) / (tb - ta) for x, y in zip(ca, cb)]  # cores while streaming
                runs.append({"achieved": achieved, "lost": r.n_missing,
                             "latency": r.timings["written"] - t_sent, "status": r.status,
                             "cpu_emulator": c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime,
                             "cpu_workers": [w1[k] - w0[k] for k in sorted(w0)],
                             "cpu_coordinator": _proc_times() - me0, "events": r.events,
                             "frames": r.frames_received,
                             "streaming_s": tb - ta, "cores_emulator": streaming[0],
                             "cores_coordinator": streaming[1], "cores_workers": streaming[2:],
                             # where the latency goes: the receivers' backlog, closing and merging
                             # the small states, then the events block by block
                             "catch_up": r.timings["last_frame"] - t_sent,
                             # the pipeline's own rate: what the emulator's queues hold is not in it
                             "received_rate": r.frames_received / max(1e-9, r.timings["last_frame"]
                                                                     - r.timings["first_frame"]),
                             "us_emulator": (sent["cpu"][1][0] - sent["cpu0"][1][0]) * 1e6 / r.frames_received,
                             "us_coordinator": receiving[0] * 1e6 / r.frames_received,
                             "us_workers": [c * 1e6 / r.frames_received for c in receiving[1:]],
                             "merge": r.timings["merged"] - r.timings["last_frame"],
                             "events_written": r.timings["written"] - r.timings["merged"]})
            if emu_cpu is not None:
                pin_tree(set(range(os.cpu_count())))
            med = {k: statistics.median(x[k] for x in runs)
                   for k in ("achieved", "latency", "cpu_emulator", "cpu_coordinator", "catch_up",
                             "merge", "events_written", "streaming_s", "cores_emulator",
                             "cores_coordinator", "received_rate", "us_emulator", "us_coordinator")}
            lost = max(x["lost"] for x in runs)
            held = rate != "max" and med["achieved"] >= 0.95 * float(rate) and lost == 0
            cpu_w = [statistics.median(x["cpu_workers"][k] for x in runs) for k in range(a.workers)]
            med["cores_workers"] = [statistics.median(x["cores_workers"][k] for x in runs)
                                    for k in range(a.workers)]
            med["us_workers"] = [statistics.median(x["us_workers"][k] for x in runs) for k in range(a.workers)]
            rows.append((label, med, lost, held, cpu_w, runs))
        mem_workers = client.run(_vm_hwm_mb)
    mem_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    mem_emu = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

    print("| target frames/s | achieved frames/s | frames lost | held | file written after last frame (s) "
          "| CPU s: emulator | CPU s: workers | CPU s: coordinator + scheduler |")
    print("|---:|---:|---:|:---:|---:|---:|---:|---:|")
    for rate, med, lost, held, cpu_w, runs in rows:
        lat = [round(x["latency"], 2) for x in runs]
        print(f"| {rate} | {med['achieved']:,.0f} | {lost} | {'yes' if held else '-'} | "
              f"{med['latency']:.2f} ({min(lat)}..{max(lat)}) | {med['cpu_emulator']:.1f} | "
              f"{' + '.join(f'{c:.1f}' for c in cpu_w)} | {med['cpu_coordinator']:.1f} |")
    print("\nWhere the latency goes (medians, s): the receivers catching up after the emulator's last "
          "frame; closing the scan and merging the workers' small states; writing the events "
          "block by block (and renaming the file)\n")
    print("| target frames/s | catching up | closing + merging | events written |")
    print("|---:|---:|---:|---:|")
    for rate, med, *_ in rows:
        print(f"| {rate} | {med['catch_up']:.2f} | {med['merge']:.2f} | {med['events_written']:.2f} |")
    print("\nThe two cores while the frames stream (from the emulator's scan generated to its last "
          "frame sent; medians): CPU seconds per second of each process, i.e. cores\n")
    print("| target frames/s | streaming s | emulator | workers | coordinator + scheduler | all "
          "| emulator's share |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for rate, med, *_ in rows:
        total = med["cores_emulator"] + med["cores_coordinator"] + sum(med["cores_workers"])
        print(f"| {rate} | {med['streaming_s']:.2f} | {med['cores_emulator']:.2f} | "
              f"{' + '.join(f'{c:.2f}' for c in med['cores_workers'])} | "
              f"{med['cores_coordinator']:.2f} | {total:.2f} | "
              f"{med['cores_emulator'] / total:.0%} |")
    print("\nWhere the cycles go (issue 19, item 3): CPU microseconds per frame of each process — the "
          "emulator's while it sends (its scan generated to its last frame sent), the others' from the "
          "first frame received to the last (what the emulator's socket queues hold is not in the "
          "emulator's rate) — and the rate the machine's cores would give at that cost "
          f"({os.cpu_count()} cores / total); medians\n")
    print("| target frames/s | sent frames/s | received frames/s (first to last frame) | emulator µs "
          "| workers µs | coordinator + scheduler µs | total µs | ceiling on these cores, frames/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for rate, med, *_ in rows:
        total = med["us_emulator"] + sum(med["us_workers"]) + med["us_coordinator"]
        print(f"| {rate} | {med['achieved']:,.0f} | {med['received_rate']:,.0f} | {med['us_emulator']:.2f} | "
              f"{' + '.join(f'{c:.2f}' for c in med['us_workers'])} | {med['us_coordinator']:.2f} | "
              f"{total:.2f} | {os.cpu_count() * 1e6 / total:,.0f} |")
    held = [r[0] for r in rows if r[3]]
    print(f"\nhighest target rate held with zero frames lost: {held[-1] if held else 'none'}")
    print(f"peak resident memory: workers {', '.join(f'{m:.0f}' for m in mem_workers.values())} MB; "
          f"coordinator + scheduler {mem_self:.0f} MB; emulator {mem_emu:.0f} MB")
    result = {"command": f"python benchmarks/bench_streaming.py {' '.join(argv or sys.argv[1:])}",
              "scan": a.scan, "detector": a.detector, "dose": a.dose, "sources": a.sources,
              "workers": a.workers, "repeats": a.repeats, "load_average": os.getloadavg()[0],
              "events_in_memory_mb": cfg.memory.events_in_memory_mb,
              "rows": [{"target": rate, **med, "lost": lost, "held": held, "cpu_workers": cpu_w,
                        "latency_runs": [x["latency"] for x in runs], "events": runs[0]["events"],
                        "frames": runs[0]["frames"]} for rate, med, lost, held, cpu_w, runs in rows],
              "peak_memory_mb": {"workers": list(mem_workers.values()), "coordinator": mem_self,
                                 "emulator": mem_emu}}
    if a.json:
        import json
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=1))
    return result


def early_table(a, argv):
    """The file's latency after the last frame against the scan's size, the events written
    while the scan runs on and off (one session each, on one cluster), at ``a.rates[0]``."""
    from stream.session import cluster as dask_cluster

    rate = "300000" if a.rates is RATES else a.rates[0]
    port = free_port_block(a.sources)
    bind = f"tcp://127.0.0.1:{port}"
    cfg = load_config(None)
    cfg.cluster.workers = a.workers
    memory_args(cfg, a)
    if a.plain_sources:  # the detector link without CURVE, as DECTRIS and Merlin deliver
        cfg = replace(cfg, security=replace(cfg.security, plain_sources=expand_sources([bind], a.sources)))
    print(f"command: python benchmarks/bench_streaming.py {' '.join(argv or sys.argv[1:])}")
    print(f"scans {', '.join(a.scans)}, detector {a.detector}, {a.dose:g} e-/frame, {a.sources} sources, "
          f"{a.workers} workers, {os.cpu_count()} cores, target {rate} frames/s; {a.repeats} runs each; "
          f"load average {os.getloadavg()[0]:.2f} at the start\n")
    client, cl = dask_cluster.connect(cfg.cluster, cfg.security)
    rows = {}
    try:
        for scan in a.scans:
            for early in (True,) if a.early_only else (True, False):
                c = replace(cfg, output=replace(cfg.output, write_while_scanning=early, dir=a.out))
                with Session(expand_sources([bind], a.sources), config=c, client=client, console=False) as s:
                    for i in range(a.repeats):
                        sid = f"early-{scan}-{'on' if early else 'off'}-{i}"
                        behind = Behind(s, f"{sid}-0000")
                        sent = run_emulator(replace_scan(a, scan), bind, sid, rate, plain=a.plain_sources,
                                            on_generated=behind.started)
                        r = s.wait(f"{sid}-0000", timeout=600)
                        measured(r, a)
                        rows.setdefault((scan, early), []).append(
                            {"latency": r.timings["written"] - sent["time"], "achieved": sent["rate"],
                             "behind_half": behind.at(0.5, sent["time"]),
                             "behind_end": r.timings["last_frame"] - sent["time"],
                             "tail": r.timings["written"] - r.timings["last_frame"],
                             "closing": r.timings["closed"] - r.timings["last_frame"],
                             "merging": r.timings["merged"] - r.timings["closed"],
                             "writing": r.timings["written"] - r.timings["merged"],
                             "lost": r.n_missing, "events": r.events, "early_frames": r.timings.get("early_frames", 0),
                             "cancelled": r.timings.get("early_cancelled", 0),
                             "stored": r.n_frames, "load": os.getloadavg()[0]})
    finally:
        client.close()
        if cl is not None:
            cl.close()
    print("| scan | electrons | achieved frames/s (on, off) | frames lost | file after last frame, written "
          "while scanning (s) | written at the end (s) | after the last frame processed: on, off (s) "
          "| frames written early (blocks cancelled at close) | behind the emulator halfway, at its last "
          "frame: on, off (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    out = []
    def med(runs, key, fmt):  # median of ``key`` over the runs, "-" for none (--early-only)
        return format(statistics.median(x[key] for x in runs), fmt) if runs else "-"

    def spread(runs):
        return f" ({min(x['latency'] for x in runs):.2f}..{max(x['latency'] for x in runs):.2f})" if runs else ""

    for scan in a.scans:
        on, off = rows[(scan, True)], rows.get((scan, False), [])
        early_share = statistics.median(x["early_frames"] / x["stored"] for x in on)
        print(f"| {scan} | {on[0]['events'] / 1e6:.1f} M | {med(on, 'achieved', ',.0f')}, "
              f"{med(off, 'achieved', ',.0f')} | {max(x['lost'] for x in on + off)} | "
              f"{med(on, 'latency', '.2f')}{spread(on)} | {med(off, 'latency', '.2f')}{spread(off)} | "
              f"{med(on, 'tail', '.2f')}, {med(off, 'tail', '.2f')} | "
              f"{early_share:.0%} ({med(on, 'cancelled', 'g')}) | {med(on, 'behind_half', '.2f')}, "
              f"{med(on, 'behind_end', '.2f')}; {med(off, 'behind_half', '.2f')}, {med(off, 'behind_end', '.2f')} |")
        out.append({"scan": scan, "on": on, "off": off})
    print("\nAfter the last frame processed (medians, s): until the coordinator closed the scan; from "
          "then until the states were merged (the early block being written finished, the scan closed on "
          "the workers, their small states merged); the rest of the events, the head and the rename\n")
    print("| scan | written while scanning | until closed | closed → merged | events and head written |")
    print("|---|:---:|---:|---:|---:|")
    for scan in a.scans:
        for early in (True, False):
            runs = rows.get((scan, early))
            if not runs:
                continue
            print(f"| {scan} | {'on' if early else 'off'} | "
                  + " | ".join(f"{statistics.median(x[k] for x in runs):.2f}" for k in ("closing", "merging", "writing"))
                  + " |")
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")
    if a.json:
        import json
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"command": " ".join(argv or sys.argv[1:]), "rows": out}, indent=1))
    return out


class Behind:
    """How far the pipeline is behind the emulator while a scan streams: ``s.status()``'s
    frames processed, sampled every 20 ms, against the frames the emulator had sent at its
    steady pace since it started (the clock starts at its "generated" line)."""

    def __init__(self, session, scan_id: str):
        self.session, self.scan_id = session, scan_id
        self.samples, self.t0 = [], None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def started(self, pid) -> None:  # run_emulator's on_generated: the first call only
        if self.t0 is None:
            self.t0 = time.time()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            for st in self.session.status():
                if st["scan_id"] == self.scan_id:
                    self.samples.append((time.time(), st["frames_received"], st["n_frames"]))

    def at(self, share: float, t_end: float) -> float:
        """Seconds behind when ``share`` of the sending time to ``t_end`` had passed."""
        self._stop.set()
        self._thread.join()
        if self.t0 is None or not self.samples:
            return float("nan")
        span = t_end - self.t0
        t = self.t0 + share * span
        got = max([f for when, f, _ in self.samples if when <= t] or [0])
        return share * span - got / self.samples[-1][2] * span


def replace_scan(a, scan):
    """The arguments with another scan size."""
    b = argparse.Namespace(**vars(a))
    b.scan = scan
    return b


if __name__ == "__main__":
    main()
