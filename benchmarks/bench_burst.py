"""Bursts of small scans: how many 32 x 32 scans a session finalizes per second, and whether
every one is complete and labelled so.

    .venv/bin/python benchmarks/bench_burst.py [--scans 100] [--scan 32x32] [--detector 576x576]
        [--dose 100] [--workers 2] [--repeats 3] [--previews] [--out /tmp/stemstream-bench-burst]

A publisher process (the emulator's Publisher, its own process) sends ``--scans`` copies of one
emulated MgO scan (start, frames, end; new scan ids) as fast as the receivers take them; a
session with a local cluster writes one file per scan. Reported per run: scans finalized per
second (from the first scan opened to the last file written), how each scan was labelled
(complete / incomplete / failed: a complete scan labelled anything else is a mislabel), the
latency from each scan's last frame to its file, and CPU seconds per scan of the workers and
of this process (coordinator + scheduler). Medians over ``--repeats`` bursts.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stream.config import load_config  # noqa: E402
from stream.security import ensure_keys  # noqa: E402
from stream.session import Session  # noqa: E402
from stream.transport.net import free_port_block  # noqa: E402


def _cpu():
    t = os.times()
    return t.user + t.system


def publish(bind: str, prefix: str, n_scans: int, scan: str, detector: str, dose: float, keys: str) -> None:
    """The publisher process: one emulated scan, sent n_scans times under new ids, with the
    CURVE keys of the key directory ``keys`` (as the session's receivers expect)."""
    from sim_detector.cli import _geometry
    from sim_detector.publisher import Publisher, prepare_sources
    from sim_detector.simulate import Beam, Detector, ScanSpec, simulate_scan
    from sim_detector.specimens import make_specimen
    from stream.security import source_keys

    ny, nx = (int(v) for v in scan.split("x"))
    h, w = (int(v) for v in detector.split("x"))
    sim = simulate_scan(make_specimen("mgo", seed=0), Beam(dose=dose), Detector(shape=(h, w)),
                        ScanSpec(shape=(ny, nx)), seed=0, with_expected=False)
    g = _geometry(sim)
    with Publisher(bind, 1, linger_s=30, curve=source_keys(keys)) as pub:
        sources = prepare_sources(sim.counts, sim.indices, g, 1)
        if not pub.wait_for_receivers(120):
            raise SystemExit("no receiver connected")
        time.sleep(1.0)  # every receiver connected: round-robin spreads
        print(f"sending {time.time():.6f}", flush=True)
        for i in range(n_scans):
            pub.publish_scan(f"{prefix}-{i:04d}", sources, {}, rate=None)
        print(f"sent {time.time():.6f} {int(sim.counts.sum())}", flush=True)


def run_burst(s, a, bind: str, prefix: str, keys: str) -> dict:
    client = s._client
    w0, me0 = client.run(_cpu), _cpu()
    pub = subprocess.Popen([sys.executable, __file__, "--publish", bind, prefix, str(a.scans), a.scan,
                            a.detector, str(a.dose), keys], stdout=subprocess.PIPE, text=True)
    results = []
    for i in range(a.scans):
        while True:
            try:
                results.append(s.wait(f"{prefix}-{i:04d}", timeout=5))
                break
            except TimeoutError:
                if pub.poll():  # the publisher failed (it said why on stderr): no scan will come
                    raise SystemExit(f"the publisher process exited with {pub.returncode}") from None
    out, _ = pub.communicate(timeout=60)
    w1, me1 = client.run(_cpu), _cpu()
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    t_sent0 = float(lines["sending"])
    events = int(lines["sent"].split()[1])
    opened = min(r.timings["opened"] for r in results)
    written = max(r.timings["written"] for r in results)
    n_frames = results[0].n_frames
    complete = [r.status == "complete" and r.frames_received == n_frames and not r.n_missing for r in results]
    # a scan whose every frame arrived, and no more, labelled anything but complete
    mislabelled = [r.scan_id for r in results if r.frames_received == n_frames and not r.n_missing
                   and not r.n_duplicated and r.status != "complete"]
    latency = sorted(r.timings["written"] - r.timings["last_frame"] for r in results)
    return {"scans_per_s": a.scans / (written - opened), "from_first_sent_s": written - t_sent0,
            "complete": sum(complete), "statuses": {st: [r.status for r in results].count(st)
                                                     for st in ("complete", "incomplete", "failed")},
            "mislabelled": mislabelled, "events_each": events, "events_ok": all(r.events == events for r in results),
            "latency_median": statistics.median(latency), "latency_p90": latency[int(0.9 * (len(latency) - 1))],
            "latency_max": latency[-1],
            "cpu_workers_per_scan": [(w1[k] - w0[k]) / a.scans for k in sorted(w0)],
            "cpu_coordinator_per_scan": (me1 - me0) / a.scans}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--publish":
        bind, prefix, n, scan, detector, dose, keys = argv[1:]
        return publish(bind, prefix, int(n), scan, detector, float(dose), keys)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scans", type=int, default=100)
    ap.add_argument("--scan", default="32x32")
    ap.add_argument("--detector", default="576x576")
    ap.add_argument("--dose", type=float, default=100.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--previews", action="store_true", help="draw PNG previews too (off the writing path)")
    ap.add_argument("--live-rate", type=float, default=None,
                    help="[live] rate_hz: partial images per second (0: none; default: the configuration's)")
    ap.add_argument("--out", default=None, help="where the scan files go and stay (default: a temporary directory, removed at the end)")
    a = ap.parse_args(argv)
    scratch = None if a.out else tempfile.mkdtemp(prefix="stemstream-bench-burst-")
    a.out = a.out or scratch
    port = free_port_block(1)
    bind = f"tcp://127.0.0.1:{port}"
    keys = tempfile.mkdtemp(prefix="stemstream-bench-keys-")  # this benchmark's keys only
    ensure_keys(keys)
    cfg = load_config(None)
    cfg.output.previews = a.previews
    cfg.security.keys = keys
    if a.live_rate is not None:
        cfg.live.rate_hz = a.live_rate
    command = f"python benchmarks/bench_burst.py {' '.join(argv)}".rstrip()
    print(f"command: {command}")
    print(f"{a.scans} scans of {a.scan} positions, detector {a.detector}, {a.dose:g} e-/frame (emulated "
          f"MgO), {a.workers} workers, {os.cpu_count()} cores, previews {'on' if a.previews else 'off'}, "
          f"live images {cfg.live.rate_hz:g}/s; "
          f"load average {os.getloadavg()[0]:.1f} at the start\n")
    runs = []
    try:
        with Session([bind], out=a.out, config=cfg, workers=a.workers, console=False) as s:
            for k in range(a.repeats):
                runs.append(run_burst(s, a, bind, f"burst{k}-{int(time.time())}", keys))
                r = runs[-1]
                print(f"burst {k + 1}: {r['scans_per_s']:.1f} scans/s, {r['complete']}/{a.scans} complete, "
                      f"statuses {r['statuses']}, mislabelled {len(r['mislabelled'])}; latency median "
                      f"{r['latency_median']:.2f} s, p90 {r['latency_p90']:.2f} s, max {r['latency_max']:.2f} s; "
                      f"CPU per scan: workers {' + '.join(f'{1e3 * c:.0f}' for c in r['cpu_workers_per_scan'])} ms, "
                      f"coordinator + scheduler {1e3 * r['cpu_coordinator_per_scan']:.0f} ms", flush=True)
    finally:
        shutil.rmtree(keys, ignore_errors=True)
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    med = statistics.median(r["scans_per_s"] for r in runs)
    print(f"\nmedian {med:.1f} scans/s finalized; complete {sum(r['complete'] for r in runs)}/"
          f"{a.scans * a.repeats}; mislabelled {sum(len(r['mislabelled']) for r in runs)}; "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    return {"command": command, "runs": runs, "median_scans_per_s": med}


if __name__ == "__main__":
    main()
