"""The live viewer: how long a drawn aperture takes, how often the page fills in while a scan
streams, and whether open pages slow the receivers.

    .venv/bin/python benchmarks/bench_viewer.py [--scans 256x256 1024x1024] [--dose 100]
        [--sources 4] [--workers 2] [--rate 87000] [--stream-scan 1024x1024] [--viewers 5]
        [--repeats 3] [--live-rate 2] [--json benchmarks/results/viewer.json]

1. Aperture latency, per scan size: a synthetic scan (benchmarks/bench_operators.py's) is
   sent by an emulator process, all frames but the last one, so that the scan stays open with
   every event in the receivers (past 128 MB in their spill files); then the last frame, and
   the scan file is written. On the open scan and on the file: the time of ``Session.apply``
   (the cluster part: tasks on the workers, states merged) for a drawn virtual detector (a
   disk on the pattern) and a drawn region (a block of positions), and, in headless Chromium,
   the time from releasing the mouse after dragging a disk on the pattern to the page holding
   the new image.
2. Update rate: the emulator process streams a scan at ``--rate`` frames/s with one page
   open; the page's bright-field image is checked every 10 ms for new data (updates per
   second while frames arrive) and for the last update after the last frame.
   Repeated ``--repeats`` times: the page's first scan (its panels built before it), then
   later ones; the session's ``--live-rate`` bounds what the page can show.
3. Open pages and the receivers: the same stream, in turn with no page, one page and
   ``--viewers`` pages open (one Chromium, one tab each): frames lost, the rate the emulator
   achieved (PUSH blocks when the receivers fall behind) and the latency from the last frame
   sent to the scan file, side by side. The pages are served by the viewer's own process
   (stream/viewer/child.py), as ``--view`` does.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from bench_operators import synthetic_scan
from test_viewer import wait_frames

from operators.apertures import RealSpaceApertures
from operators.virtual import VirtualDetectors
from stream.config import LiveSpec, OutputSpec, PipelineConfig, ScanSpec, validate
from stream.session import Session
from stream.transport.net import free_port_block
from stream.transport.protocol import Geometry
from stream.viewer import shapes

FRAME = (576, 576)
MRAD = 0.1  # mrad per px: the 576-px detector spans ±29 mrad


def shape_arg(text):
    ny, nx = (int(v) for v in text.lower().split("x"))
    return ny, nx


def geometry(scan, n_sources) -> Geometry:
    return Geometry(scan, FRAME, n_sources=n_sources, mrad_per_px=MRAD, convergence_mrad=4.0,
                    center=((FRAME[0] - 1) / 2, (FRAME[1] - 1) / 2))


def emulator(bind, n_sources, scan, dose, scan_id, rate, hold_last, queue, go):
    """A separate process publishing a synthetic scan like the detector. With ``hold_last``
    every frame but the last goes out, then the process waits for ``go`` (the scan stays open
    meanwhile) before the last frame and the end."""
    from sim_detector.publisher import Publisher, prepare_sources
    from stream.transport.protocol import encode_end, encode_frames, encode_start

    counts, indices = synthetic_scan(scan, FRAME, dose, 0.6, 40.0, seed=1)
    g = geometry(scan, n_sources)
    md = {"scan_step_A": 0.5}
    from stream.security import source_keys
    # CURVE as a detector bridge would: the bench's own key directory (main()), the session's too
    with Publisher(bind, n_sources, linger_s=30, curve=source_keys()) as pub:
        sources = prepare_sources(counts.astype(np.uint32), indices, g, n_sources)
        pub.wait_for_receivers(120)
        time.sleep(0.5)
        queue.put(("ready", int(counts.sum())))
        if not hold_last:
            st = pub.publish_scan(scan_id, sources, md, rate=rate)
            queue.put(("sent", time.time(), st.rate, st.seconds))
            return
        n = g.n_frames
        for k, src in enumerate(sources):
            pub.send(k, encode_start(scan_id, k, src.geometry, md))
        for lo, hi in [(lo, min(lo + 2048, n)) for lo in range(0, n, 2048)]:
            for k, src in enumerate(sources):
                hi_k = min(hi, n - 1) if hi == n else hi  # the last frame waits
                if hi_k > lo:
                    pub.send(k, encode_frames(scan_id, k, src.geometry, lo, src.counts[lo:hi_k],
                                              src.indices[src.offsets[lo]:src.offsets[hi_k]]))
        queue.put(("held", n - 1))
        go.wait()
        for k, src in enumerate(sources):
            pub.send(k, encode_frames(scan_id, k, src.geometry, n - 1, src.counts[n - 1:],
                                      src.indices[src.offsets[n - 1]:src.offsets[n]]))
            pub.send(k, encode_end(scan_id, k, n))
        queue.put(("sent", time.time()))


def timed_apply(s, scan_id, op, repeats):
    times, run = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        run = s.apply(scan_id, op)
        times.append(time.perf_counter() - t0)
    return times, run


def browser_disk(page, repeats, radius0=3.0):
    """Seconds from releasing the mouse after dragging a disk on the pattern to the page
    holding the drawn detector's new image (a new radius each time)."""
    out = []
    for k in range(repeats):
        page.js("() => { window.__drawn = Bokeh.documents[0].get_model_by_name('src-drawn').data.image[0]; }")
        r = radius0 + 1.1 * k
        a, b = page.screen("fig-diffraction_sum", [[0.0, 0.0], [r, 0.0]])
        page.drag([a, b])
        t0 = time.perf_counter()
        page.wait_for(lambda: page.js("() => Bokeh.documents[0].get_model_by_name('src-drawn').data.image[0] "
                                      "!== window.__drawn"), 120, "the drawn detector's image", every_s=0.01)
        out.append(time.perf_counter() - t0)
        time.sleep(0.5)
    return out


def part_latency(a, browser_cls, rows):
    for scan in a.scans:
        port = free_port_block(a.sources)
        bind = f"tcp://127.0.0.1:{port}"
        from stream.session import expand_sources
        cfg = validate(PipelineConfig(scan=ScanSpec(timeout_s=900), output=OutputSpec(dir=a.out, previews=False),
                                      live=LiveSpec(rate_hz=2.0)))
        sid = f"latency-{scan[0]}x{scan[1]}"
        q, go = mp.Queue(), mp.Event()
        with Session(expand_sources([bind], a.sources), config=cfg, workers=a.workers, console=False,
                     view="127.0.0.1:0") as s:
            p = mp.Process(target=emulator, args=(bind, a.sources, scan, a.dose, sid, None, True, q, go))
            p.start()
            _, n_events = q.get(timeout=900)
            q.get(timeout=900)
            n = scan[0] * scan[1]
            wait_frames(s, sid, n - 1, timeout_s=600)
            g = geometry(scan, a.sources)
            det = shapes.disk(shapes.DetectorAxes(FRAME, g.center, MRAD), 0.0, 0.0, 4.0)
            region = np.zeros(scan, bool)
            region[scan[0] // 4:scan[0] // 2, scan[1] // 4:scan[1] // 2] = True
            res = {"scan": f"{scan[0]}x{scan[1]}", "events": n_events}
            for where in ("open scan", "file"):
                if where == "file":
                    go.set()
                    s.wait(sid, timeout=900)
                t_img, run = timed_apply(s, sid, VirtualDetectors(det[None], ["d"], scan), a.repeats)
                t_pat, _ = timed_apply(s, sid, RealSpaceApertures(region[None], ["r"], FRAME), a.repeats)
                page = browser_cls.page(s.viewer.url)
                page.wait_for(lambda page=page: (img := page.image("src-diffraction_sum")) is not None and img.size > 1,
                              300, "the pattern")
                t_page = browser_disk(page, a.repeats)
                page.close()
                res[where] = {"image_s": t_img, "pattern_s": t_pat, "page_s": t_page, "source": run.source,
                              "workers": run.workers}
                print(f"  {res['scan']} {where}: image {statistics.median(t_img):.3f} s, pattern "
                      f"{statistics.median(t_pat):.3f} s, in the page {statistics.median(t_page):.3f} s", flush=True)
            p.join(60)
        rows.append(res)


def stream_once(s, a, scan_id, pages, browser_cls, watch_updates):
    q, go = mp.Queue(), mp.Event()
    port_bind = s._bench_bind
    # the pages open (and the watcher runs) before the emulator starts: a page opens in seconds
    # on a busy machine, longer than a scan streams
    opened = [browser_cls.page(s.viewer.url) for _ in range(pages)]
    time.sleep(2 if opened else 0)  # as a person opens the page before the scan: its panels drawn
    if watch_updates and opened:
        opened[0].js("""() => { window.__updates = []; let last = null;
            window.__watch = setInterval(() => { const m = Bokeh.documents[0].get_model_by_name('src-bf');
              const d = m ? m.data.image[0] : null;
              if (d && d !== last && d.length > 1) { last = d; window.__updates.push(Date.now()); } }, 10); }""")
    p = mp.Process(target=emulator, args=(port_bind, a.sources, a.stream_scan, a.dose, scan_id, a.rate, False, q, go))
    p.start()
    q.get(timeout=900)
    _, t_sent, achieved, seconds = q.get(timeout=900)
    r = s.wait(f"{scan_id}", timeout=900)
    out = {"lost": r.n_missing, "achieved": achieved, "stream_s": seconds,
           "latency_s": r.timings["written"] - t_sent, "status": r.status}
    if watch_updates and opened:
        time.sleep(3)
        ups = np.array(opened[0].js("() => window.__updates")) / 1000.0
        t_first = t_sent - seconds
        during = ups[(ups >= t_first) & (ups <= t_sent)]
        out["updates_per_s"] = len(during) / seconds if seconds > 0 else float("nan")
        out["last_update_after_last_frame_s"] = float(ups.max() - t_sent) if len(ups) else float("nan")
        gaps = np.diff(during)
        out["longest_gap_s"] = float(gaps.max()) if len(gaps) else float("nan")
    for pg in opened:
        pg.close()
    p.join(60)
    return out


def part_streaming(a, browser_cls, result):
    from stream.session import expand_sources
    port = free_port_block(a.sources)
    bind = f"tcp://127.0.0.1:{port}"
    cfg = validate(PipelineConfig(output=OutputSpec(dir=a.out, previews=False), live=LiveSpec(rate_hz=a.live_rate)))
    with Session(expand_sources([bind], a.sources), config=cfg, workers=a.workers, console=False,
                 view="127.0.0.1:0") as s:
        s._bench_bind = bind
        a.live_rate = s.config.live.rate_hz  # a session with a viewer raises it to 4 (docs/VIEWER.md)
        result["update_rate"] = []
        for i in range(a.repeats):  # the first scan of the page (its panels built before it), then later ones
            rate = stream_once(s, a, f"rate-{i}", 1, browser_cls, True)
            result["update_rate"].append(rate)
            print(f"  update rate while streaming {a.stream_scan[0]}x{a.stream_scan[1]} at {rate['achieved']:,.0f} "
                  f"frames/s, live rate {a.live_rate:g}/s: {rate['updates_per_s']:.2f} per s (longest gap "
                  f"{rate['longest_gap_s']:.2f} s); last update {rate['last_update_after_last_frame_s']:.2f} s "
                  f"after the last frame; frames lost {rate['lost']}", flush=True)
        if "streaming" not in a.parts:  # --parts rate: the update rate only
            return
        side = {0: [], 1: [], a.viewers: []}
        for i in range(a.repeats):
            for pages, runs in side.items():
                out = stream_once(s, a, f"viewers{pages}-{i}", pages, browser_cls, False)
                runs.append(out)
                print(f"  {pages} page(s): lost {out['lost']}, {out['achieved']:,.0f} frames/s, file "
                      f"{out['latency_s']:.2f} s after the last frame", flush=True)
        result["viewers"] = {str(k): v for k, v in side.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scans", type=shape_arg, nargs="+", default=[(256, 256), (1024, 1024)])
    ap.add_argument("--dose", type=float, default=100.0)
    ap.add_argument("--sources", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rate", type=float, default=87000.0)
    ap.add_argument("--stream-scan", type=shape_arg, default=(1024, 1024))
    ap.add_argument("--viewers", type=int, default=5)
    ap.add_argument("--live-rate", type=float, default=2.0, help="the session's [live] rate_hz (with the viewer at least 4)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--parts", nargs="+", default=["latency", "streaming"],
                    help="latency, streaming (the update rate, then 0, 1 and --viewers pages), rate (the update rate only)")
    ap.add_argument("--out", default=None, help="where the scan files go and stay (default: a temporary directory, removed at the end)")
    ap.add_argument("--json", metavar="PATH")
    a = ap.parse_args(argv)
    import shutil
    import tempfile
    scratch = None if a.out else tempfile.mkdtemp(prefix="stemstream-bench-viewer-out-")
    a.out = str(Path(a.out or scratch) / time.strftime("%Y%m%d-%H%M%S"))  # this run's files only: the scan ids repeat
    from browser import Browser

    mp.set_start_method("fork", force=True)
    keys_home = tempfile.mkdtemp(prefix="stemstream-bench-viewer-")  # this run's keys only
    os.environ["XDG_CONFIG_HOME"] = keys_home
    cmd = f"python benchmarks/bench_viewer.py {' '.join(argv or sys.argv[1:])}"
    print(f"command: {cmd}\n{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start; "
          f"detector {FRAME[0]}x{FRAME[1]}, {a.dose:g} e-/frame, {a.sources} sources, {a.workers} workers\n", flush=True)
    result = {"command": cmd, "load_average_start": os.getloadavg()[0], "latency": []}
    browser = Browser()
    try:
        if "latency" in a.parts:
            part_latency(a, browser, result["latency"])
        if "streaming" in a.parts or "rate" in a.parts:
            part_streaming(a, browser, result)
    finally:
        browser.close()
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    shutil.rmtree(keys_home, ignore_errors=True)
    result["load_average_end"] = os.getloadavg()[0]
    report(a, result)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=1, default=float))
    return result


def report(a, r):
    med = statistics.median
    print(f"\n{r['command']}  (load average {r['load_average_start']:.1f} → {r['load_average_end']:.1f})\n")
    if r["latency"]:
        print("Drawn aperture → its result (median of the repeats, s): `Session.apply` on the cluster, and in "
              "the page from releasing the mouse to the new image\n")
        print("| scan | electrons | where the events are | detector → image | region → pattern | in the page |")
        print("|---|---:|---|---:|---:|---:|")
        for row in r["latency"]:
            for where in ("open scan", "file"):
                x = row[where]
                src = "receivers (memory + spill)" if where == "open scan" else "scan file"
                print(f"| {row['scan']} | {row['events'] / 1e6:.0f} M | {src} | {med(x['image_s']):.3f} | "
                      f"{med(x['pattern_s']):.3f} | {med(x['page_s']):.3f} |")
    if "update_rate" in r:
        print(f"\nWhile streaming {a.stream_scan[0]}x{a.stream_scan[1]}, live rate {a.live_rate:g}/s, one page "
              "(the first scan, then the next):\n")
        print("| scan | achieved frames/s | stream, s | frames lost | page updates per s | longest gap, s | last update after the last frame, s |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for k, u in enumerate(r["update_rate"]):
            print(f"| {'first' if k == 0 else k + 1} | {u['achieved']:,.0f} | {u['stream_s']:.1f} | {u['lost']} | "
                  f"{u['updates_per_s']:.2f} | {u['longest_gap_s']:.2f} | {u['last_update_after_last_frame_s']:.2f} |")
    if "viewers" in r:
        print()
        print("| pages open | runs | frames lost | achieved frames/s (median) | file after last frame, s (median, range) |")
        print("|---:|---:|---:|---:|---|")
        for pages, runs in r["viewers"].items():
            lat = [x["latency_s"] for x in runs]
            print(f"| {pages} | {len(runs)} | {sum(x['lost'] for x in runs)} | "
                  f"{med([x['achieved'] for x in runs]):,.0f} | {med(lat):.2f} ({min(lat):.2f}..{max(lat):.2f}) |")


if __name__ == "__main__":
    main()
