"""Authentication on and off, end to end, emulator included: `stemstream simulate` (its own process) → ZeroMQ → a local
dask cluster (separate worker processes) → scan file on disk, at rising target rates.

    .venv/bin/python benchmarks/bench_auth.py [--scan 512x512] [--dose 100] [--sources 4]
        [--workers 2] [--rates 87000 150000 300000 450000 max] [--repeats 3] [--out DIR]
        [--auth on off]

``--auth on`` is the default configuration: CURVE on the emulator's sources and every channel
of the session, the local cluster's dask traffic over TLS (docs/SECURITY.md); ``off`` is
``[security] curve = false, dask_tls = false``. With both, each repeat runs both, one after the
other, against two sessions started side by side, so that they see the same load.

For every run: the rate the emulator achieved (PUSH blocks instead of dropping, so a pipeline
that cannot keep up slows the emulator down rather than losing frames), frames lost, the
latency from the emulator's last frame sent to the scan file renamed into place, CPU seconds
of the emulator, of each worker and of this process (scheduler + coordinator), and peak
memory (resident set high-water mark). A rate is "held" when the emulator achieved at least
95 % of it with zero frames lost. Medians over ``--repeats`` runs per rate.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataclasses import replace  # noqa: E402

from stream.config import SecuritySpec, load_config  # noqa: E402
from stream.security import ensure_keys  # noqa: E402
from stream.transport.net import free_port_block  # noqa: E402
from stream.session import Session, expand_sources  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_streaming import _proc_times, _vm_hwm_mb  # noqa: E402  (one copy of the process probes)

SENT = re.compile(r"\] sent ([\d,]+) frames, ([\d,]+) electrons in ([\d.]+) s \(([\d,]+) frames/s\)")


def run_emulator(args, bind, scan_id, rate, security):
    """Run `stemstream simulate`; return (achieved frames/s, wall time of the last frame sent).
    security: its flags (``--curve-keys DIR`` or ``--insecure``)."""
    cmd = [sys.executable, "-m", "stream.cli", "simulate", "--specimen", args.specimen,
           "--scan", args.scan, "--detector", args.detector, "--dose", str(args.dose),
           "--sources", str(args.sources), "--bind", bind, "--rate", str(rate),
           "--scan-id", scan_id, "--wait", "60", *security]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, bufsize=1)
    sent = {}

    def read():
        for line in proc.stdout:
            m = SENT.search(line)
            if m:
                sent.update(time=time.time(), rate=float(m.group(4).replace(",", "")))
    reader = threading.Thread(target=read)
    reader.start()
    code = proc.wait()
    reader.join()
    if code != 0 or not sent:
        raise RuntimeError(f"emulator failed (exit code {code}): {' '.join(cmd)}")
    return sent["rate"], sent["time"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specimen", default="mgo")
    ap.add_argument("--scan", default="512x512")
    ap.add_argument("--detector", default="576x576")
    ap.add_argument("--dose", type=float, default=100.0)
    ap.add_argument("--sources", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rates", nargs="+", default=["87000", "150000", "300000", "450000", "max"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="where the scan files go and stay (default: a temporary directory, removed at the end)")
    ap.add_argument("--events-in-memory-mb", type=float, default=None,
                    help="[memory] events_in_memory_mb of the receivers (default: the configuration's)")
    ap.add_argument("--write-block-mb", type=float, default=None,
                    help="[memory] write_block_mb (default: the configuration's)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON (benchmarks/results/...)")
    ap.add_argument("--auth", nargs="+", default=["on", "off"], choices=["on", "off"],
                    help="on: CURVE and dask TLS (the defaults); off: plain (default: both, side by side)")
    a = ap.parse_args(argv)
    scratch = None if a.out else tempfile.mkdtemp(prefix="stemstream-bench-auth-")
    a.out = a.out or scratch

    cfg = load_config(None)  # the defaults: previews included (drawn by the coordinator)
    if a.events_in_memory_mb is not None:
        cfg.memory.events_in_memory_mb = a.events_in_memory_mb
    if a.write_block_mb is not None:
        cfg.memory.write_block_mb = a.write_block_mb
    load0 = os.getloadavg()
    print(f"command: python benchmarks/bench_auth.py {' '.join(argv or sys.argv[1:])}")
    print(f"scan {a.scan}, detector {a.detector}, {a.dose:g} e-/frame, {a.sources} sources, "
          f"{a.workers} workers, {os.cpu_count()} cores; median of {a.repeats} runs per rate; "
          f"authentication {' and '.join(a.auth)}; load average at start {load0[0]:.1f} (1 min), "
          f"{load0[1]:.1f} (5 min)\n")
    keys = tempfile.mkdtemp(prefix="stemstream-bench-keys-")  # this benchmark's keys only
    ensure_keys(keys)
    modes = {}  # auth -> (session, bind address, emulator flags)
    rows = []
    mem = {}
    try:
        for auth in a.auth:
            on = auth == "on"
            bind = f"tcp://127.0.0.1:{free_port_block(a.sources)}"
            c = replace(cfg, security=SecuritySpec(curve=on, dask_tls=on, keys=keys))
            s = Session(expand_sources([bind], a.sources), out=a.out, config=c, workers=a.workers, console=False)
            modes[auth] = (s.start(), bind, ["--curve-keys", keys] if on else ["--insecure"])
        runs = {(auth, rate): [] for rate in a.rates for auth in a.auth}
        for rate in a.rates:
            for i in range(a.repeats):
                for auth, (s, bind, flags) in modes.items():  # alternately: both see the same load
                    runs[auth, rate].append(one_run(a, s, bind, flags, f"bench-{auth}-{rate}-{i}", rate))
        for auth, rate in runs:
            rows.append((auth, rate, *summarize(runs[auth, rate], rate, a.workers)))
        for auth, (s, _, _) in modes.items():
            mem[auth] = s._client.run(_vm_hwm_mb)
    finally:
        for s, _, _ in modes.values():
            s.close()
        shutil.rmtree(keys, ignore_errors=True)
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    mem_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    mem_emu = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    load1 = os.getloadavg()

    print("| auth | target frames/s | achieved frames/s | frames lost | held | file written after last frame (s) "
          "| CPU s: emulator | CPU s: workers | CPU s: coordinator + scheduler |")
    print("|:---:|---:|---:|---:|:---:|---:|---:|---:|---:|")
    for auth, rate, med, lost, held, cpu_w, runs_ in rows:
        lat = [round(x["latency"], 2) for x in runs_]
        print(f"| {auth} | {rate} | {med['achieved']:,.0f} | {lost} | {'yes' if held else '-'} | "
              f"{med['latency']:.2f} ({min(lat)}..{max(lat)}) | {med['cpu_emulator']:.1f} | "
              f"{' + '.join(f'{c:.1f}' for c in cpu_w)} | {med['cpu_coordinator']:.1f} |")
    print("\nWhere the latency goes (medians, s): the receivers catching up after the emulator's last "
          "frame; closing the scan and merging the workers' small states; writing the events "
          "block by block (and renaming the file)\n")
    print("| auth | target frames/s | catching up | closing + merging | events written |")
    print("|:---:|---:|---:|---:|---:|")
    for auth, rate, med, *_ in rows:
        print(f"| {auth} | {rate} | {med['catch_up']:.2f} | {med['merge']:.2f} | {med['events_written']:.2f} |")
    for auth in a.auth:
        held = [r[1] for r in rows if r[0] == auth and r[4]]
        print(f"\nauthentication {auth}: highest target rate held with zero frames lost: {held[-1] if held else 'none'}")
    for auth in a.auth:
        print(f"peak resident memory, authentication {auth}: workers "
              f"{', '.join(f'{m:.0f}' for m in mem.get(auth, {}).values())} MB")
    print(f"coordinators + schedulers {mem_self:.0f} MB; emulator {mem_emu:.0f} MB; "
          f"load average at the end {load1[0]:.1f} (1 min), {load1[1]:.1f} (5 min)")
    result = {"command": f"python benchmarks/bench_auth.py {' '.join(argv or sys.argv[1:])}",
              "scan": a.scan, "detector": a.detector, "dose": a.dose, "sources": a.sources,
              "workers": a.workers, "repeats": a.repeats, "load_average": load0[0], "load_average_end": load1[0],
              "events_in_memory_mb": cfg.memory.events_in_memory_mb,
              "rows": [{"auth": auth, "target": rate, **med, "lost": lost, "held": held, "cpu_workers": cpu_w,
                        "latency_runs": [x["latency"] for x in runs_], "events": runs_[0]["events"],
                        "frames": runs_[0]["frames"]} for auth, rate, med, lost, held, cpu_w, runs_ in rows],
              "peak_memory_mb": {"workers": list(mem.get(a.auth[0], {}).values()), "coordinator": mem_self,
                                 "emulator": mem_emu}}
    if a.json:
        import json
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=1))
    return result


def one_run(a, s, bind, flags, sid, rate) -> dict:
    """One scan through session ``s``: the emulator's rate, what was lost, the latency and CPU."""
    client = s._client
    w0 = client.run(_proc_times)
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    me0 = _proc_times()
    achieved, t_sent = run_emulator(a, bind, sid, rate, flags)
    r = s.wait(f"{sid}-0000", timeout=300)  # the emulator numbers its scans
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    w1 = client.run(_proc_times)
    return {"achieved": achieved, "lost": r.n_missing, "latency": r.timings["written"] - t_sent, "status": r.status,
            "cpu_emulator": c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime,
            "cpu_workers": [w1[k] - w0[k] for k in sorted(w0)],
            "cpu_coordinator": _proc_times() - me0, "events": r.events, "frames": r.frames_received,
            # where the latency goes: the receivers' backlog, closing and merging the small
            # states, then the events block by block
            "catch_up": r.timings["last_frame"] - t_sent,
            "merge": r.timings["merged"] - r.timings["last_frame"],
            "events_written": r.timings["written"] - r.timings["merged"]}


def summarize(runs, rate, workers):
    """(medians, frames lost (most of any run), held?, median CPU s per worker, the runs)."""
    med = {k: statistics.median(x[k] for x in runs)
           for k in ("achieved", "latency", "cpu_emulator", "cpu_coordinator", "catch_up", "merge", "events_written")}
    lost = max(x["lost"] for x in runs)
    held = rate != "max" and med["achieved"] >= 0.95 * float(rate) and lost == 0
    cpu_w = [statistics.median(x["cpu_workers"][k] for x in runs) for k in range(workers)]
    return med, lost, held, cpu_w, runs


if __name__ == "__main__":
    main()
