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
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stream.config import load_config  # noqa: E402
from stream.transport.net import free_port_block  # noqa: E402
from stream.session import Session, expand_sources  # noqa: E402

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


def run_emulator(args, bind, scan_id, rate):
    """Run `stemstream simulate`; return (achieved frames/s, wall time of the last frame sent)."""
    cmd = [sys.executable, "-m", "stream.cli", "simulate", "--specimen", args.specimen,
           "--scan", args.scan, "--detector", args.detector, "--dose", str(args.dose),
           "--sources", str(args.sources), "--bind", bind, "--rate", str(rate),
           "--scan-id", scan_id, "--wait", "60"]
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
    ap.add_argument("--out", default="/tmp/stemstream-bench-streaming")
    ap.add_argument("--events-in-memory-mb", type=float, default=None,
                    help="[memory] events_in_memory_mb of the receivers (default: the configuration's)")
    ap.add_argument("--write-block-mb", type=float, default=None,
                    help="[memory] write_block_mb (default: the configuration's)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON (benchmarks/results/...)")
    a = ap.parse_args(argv)

    port = free_port_block(a.sources)
    bind = f"tcp://127.0.0.1:{port}"
    cfg = load_config(None)  # the defaults: previews included (drawn by the coordinator)
    if a.events_in_memory_mb is not None:
        cfg.memory.events_in_memory_mb = a.events_in_memory_mb
    if a.write_block_mb is not None:
        cfg.memory.write_block_mb = a.write_block_mb
    print(f"command: python benchmarks/bench_streaming.py {' '.join(argv or sys.argv[1:])}")
    print(f"scan {a.scan}, detector {a.detector}, {a.dose:g} e-/frame, {a.sources} sources, "
          f"{a.workers} workers, {os.cpu_count()} cores; median of {a.repeats} runs per rate\n")
    rows = []
    with Session(expand_sources([bind], a.sources), out=a.out, config=cfg, workers=a.workers,
                 console=False) as s:
        client = s._client
        for rate in a.rates:
            runs = []
            for i in range(a.repeats):
                sid = f"bench-{rate}-{i}"
                w0 = client.run(_proc_times)
                c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                me0 = _proc_times()
                achieved, t_sent = run_emulator(a, bind, sid, rate)
                r = s.wait(f"{sid}-0000", timeout=300)  # the emulator numbers its scans
                c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                w1 = client.run(_proc_times)
                runs.append({"achieved": achieved, "lost": r.n_missing,
                             "latency": r.timings["written"] - t_sent, "status": r.status,
                             "cpu_emulator": c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime,
                             "cpu_workers": [w1[k] - w0[k] for k in sorted(w0)],
                             "cpu_coordinator": _proc_times() - me0, "events": r.events,
                             "frames": r.frames_received,
                             # where the latency goes: the receivers' backlog, closing and merging
                             # the small states, then the events block by block
                             "catch_up": r.timings["last_frame"] - t_sent,
                             "merge": r.timings["merged"] - r.timings["last_frame"],
                             "events_written": r.timings["written"] - r.timings["merged"]})
            med = {k: statistics.median(x[k] for x in runs)
                   for k in ("achieved", "latency", "cpu_emulator", "cpu_coordinator", "catch_up",
                             "merge", "events_written")}
            lost = max(x["lost"] for x in runs)
            held = rate != "max" and med["achieved"] >= 0.95 * float(rate) and lost == 0
            cpu_w = [statistics.median(x["cpu_workers"][k] for x in runs) for k in range(a.workers)]
            rows.append((rate, med, lost, held, cpu_w, runs))
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


if __name__ == "__main__":
    main()
