"""Where the cores go while one scan streams and while its file is finished: CPU seconds of
every thread of the workers, the coordinator (with the scheduler) and the emulator, from
/proc/PID/task (threads named from each process's ``threading.enumerate()``).

    .venv/bin/python benchmarks/bench_threads.py [--scan 1024x1024] [--rate 300000]
        [--early on|off] [--live-rate HZ] [--early-block-mb MB] [--plain-sources]

One run, the emulator on the same cores (as bench_streaming.py). "scan": from the emulator's
scan generated to its last frame sent; "end": from then to the file in place. Also each
process's full garbage collections in both spans, each one's wall time (the GIL is held
throughout: a receiver stops for as long), and the younger collections' total over the run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_streaming as B  # noqa: E402

from stream.config import load_config  # noqa: E402
from stream.session import Session, expand_sources  # noqa: E402
from stream.session import cluster as dask_cluster  # noqa: E402
from stream.transport.net import free_port_block  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def watch_gc() -> None:
    """Time this process's garbage collections from now on (``gc.callbacks``)."""
    import builtins
    import gc

    if hasattr(builtins, "_bench_gc"):
        return
    st = builtins._bench_gc = {"full": [], "young": 0.0, "start": 0.0}

    def cb(phase, info):
        if phase == "start":
            st["start"] = time.perf_counter()
        elif info["generation"] == 2:
            st["full"].append((time.time(), time.perf_counter() - st["start"]))
        else:
            st["young"] += time.perf_counter() - st["start"]
    gc.callbacks.append(cb)


def gc_pauses() -> dict:
    """Full collections of this process (wall time, seconds each) and the younger ones' total."""
    import builtins
    st = builtins._bench_gc
    return {"full": list(st["full"]), "young": st["young"]}


def thread_cpu(pid: int) -> dict:
    """(pid, tid, the OS's name of the thread) -> CPU seconds (user + system) of every thread
    of ``pid``."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        out[(pid, tid, comm)] = (int(fields[11]) + int(fields[12])) / TICK
    return out


def thread_names() -> dict:
    """native thread id -> Python thread name, in this process."""
    return {str(t.native_id): t.name for t in threading.enumerate()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scan", default="1024x1024")
    ap.add_argument("--rate", default="300000")
    ap.add_argument("--early", choices=("on", "off"), default="on", help="[output] write_while_scanning")
    ap.add_argument("--live-rate", type=float, default=None, help="[live] rate_hz (default: the configuration's)")
    ap.add_argument("--early-block-mb", type=float, default=None, help="[memory] early_block_mb (default: the configuration's)")
    ap.add_argument("--plain-sources", action="store_true",
                    help="the emulator's links without CURVE, as a DECTRIS or Merlin detector delivers")
    a = ap.parse_args(argv)
    args = argparse.Namespace(specimen="mgo", scan=a.scan, detector="576x576", dose=100.0, sources=4, workers=2)
    bind = f"tcp://127.0.0.1:{free_port_block(4)}"
    out = tempfile.mkdtemp(prefix="stemstream-bench-threads-")
    cfg = load_config(None)
    cfg.cluster.workers = 2
    cfg = replace(cfg, output=replace(cfg.output, write_while_scanning=a.early == "on", dir=out))
    if a.live_rate is not None:
        cfg = replace(cfg, live=replace(cfg.live, rate_hz=a.live_rate))
    if a.early_block_mb is not None:
        cfg.memory.early_block_mb = a.early_block_mb
    if a.plain_sources:
        cfg = replace(cfg, security=replace(cfg.security, plain_sources=expand_sources([bind], 4)))
    client, cluster = dask_cluster.connect(cfg.cluster, cfg.security)
    role = {p: f"worker {i}" for i, p in enumerate(client.run(os.getpid).values())}
    client.run(watch_gc)
    watch_gc()
    role[os.getpid()] = "coordinator + scheduler"
    samples, stop, started = [], threading.Event(), {}

    def sample():
        while not stop.is_set():
            cpu = {}
            for pid in list(role):
                try:
                    cpu.update(thread_cpu(pid))
                except OSError:
                    pass
            samples.append((time.time(), cpu))
            time.sleep(0.05)

    try:
        with Session(expand_sources([bind], 4), config=cfg, client=client, console=False) as s:
            sampler = threading.Thread(target=sample, daemon=True, name="this benchmark's sampler")
            sampler.start()

            def generated(pid):
                if "t" not in started:
                    role[pid] = "emulator"
                    started["t"] = time.time()

            sent = B.run_emulator(args, bind, "threads", a.rate, on_generated=generated, plain=a.plain_sources)
            r = s.wait("threads-0000", timeout=600)
            names = thread_names()
            for v in client.run(thread_names).values():
                names.update(v)
            time.sleep(0.1)
            stop.set()
            sampler.join()
        print(f"scan {a.scan}, {sent['rate']:,.0f} frames/s, writing while scanning {a.early}: file "
              f"{r.timings['written'] - sent['time']:.2f} s after the last frame, "
              f"{r.timings.get('early_frames', 0) / max(1, r.n_frames):.0%} of it written early")

        pauses = {f"worker {i}": v for i, v in enumerate(client.run(gc_pauses).values())}
        pauses["coordinator + scheduler"] = gc_pauses()
        spans = (("scan", started["t"], sent["time"]), ("end", sent["time"], r.timings["written"]))
        print("\nPython's garbage collections (full: each, s; younger: their total) while the scan "
              "streamed and at its end\n| process | full, scan | full, end | younger, whole run (s) |\n|---|---|---|---:|")
        for proc, v in pauses.items():
            each = [[f"{d:.3f}" for t, d in v["full"] if t0 <= t <= t1] for _, t0, t1 in spans]
            print(f"| {proc} | {', '.join(each[0]) or '-'} | {', '.join(each[1]) or '-'} | {v['young']:.3f} |")

        for label, t0, t1 in spans:
            # each thread from when it is first seen to when it is last seen in [t0, t1] (a
            # thread started or ended inside the span counts from or to then)
            first, last = {}, {}
            for ts, cpu in samples:
                if t0 - 0.05 <= ts <= t1 + 0.05:
                    for key, v in cpu.items():
                        first.setdefault(key, v)
                        last[key] = v
            rows = defaultdict(float)
            for key, cpu in last.items():
                name = names.get(key[1], key[2]).rstrip("0123456789_-/")
                name = "dask task thread" if "Dask-Default" in name else name
                rows[(role[key[0]], name)] += cpu - first[key]
            print(f"\n{label}: {t1 - t0:.2f} s\n| process | thread | CPU s | cores |\n|---|---|---:|---:|")
            for (proc, name), cpu in sorted(rows.items()):
                if cpu >= 0.01:
                    print(f"| {proc} | {name} | {cpu:.2f} | {cpu / (t1 - t0):.2f} |")
            print(f"| all | | {sum(rows.values()):.2f} | {sum(rows.values()) / (t1 - t0):.2f} |")
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
