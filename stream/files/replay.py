"""``stemstream replay``: publish recorded scans again with the wire protocol.

A recording (stemstream scan file or stempy sparse file, ``stream.files.recording``) is loaded and
checked completely before its first message goes out, then sent exactly as a detector would:
``start`` with the recorded geometry and metadata, the frames in raster order (flyback frames
included, empty: their events were never stored), ``end``. A stemstream file also says which
(source, frame) parts arrived live; replay sends those parts only, and those that arrived twice
twice, so the receiving pipeline sees the same scan — same results, same completeness.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from sim_detector.cli import (SimulateError, add_source_security_args, progress_printer, rate_arg,
                              security_note, source_security, wait_for_receivers, warn)
from sim_detector.publisher import BindError, Publisher, SourceFrames, StallError, prepare_sources

from stream.files.recording import Recording, open_recording
from stream.files.storage import ScanFileError


@dataclass
class Prepared:
    """A recording ready to publish: per-source buffers, copies of each part, what each
    source's ``end`` announces, and notes for the operator."""

    recording: Recording
    sources: list[SourceFrames]
    copies: np.ndarray | None
    frames_sent: list[int] | None
    n_events: int
    notes: list[str]


def prepare(rec: Recording, n_sources: int | None = None) -> Prepared:
    """Load every event of ``rec`` (checked), split it over ``n_sources`` row sectors (default:
    as many as recorded) and work out which parts to send."""
    offsets, indices = rec.read()
    g = rec.geometry
    counts = np.zeros(g.n_frames, np.uint32)
    counts[rec.raster_frames(np.arange(rec.n_stored))] = np.diff(offsets)
    n_sources = n_sources or g.n_sources
    notes, copies, sent = [], None, None
    if rec.received is not None:
        received = rec.received
        if n_sources != g.n_sources:
            # parts per source cannot be re-cut: send every frame of which any part arrived
            received = np.repeat(received.max(axis=0, keepdims=True), n_sources, axis=0)
            notes.append(f"recorded with {g.n_sources} source(s), replayed on {n_sources}: frames of which "
                         "only some parts arrived are sent whole, so completeness will differ")
        if (received != 1).any():
            copies = received
            n_missing = int((received == 0).sum())
            n_dup = int((received > 1).sum())
            notes.append(f"replaying the recording's gaps as they were: {n_missing:,} part(s) never arrived, "
                         f"{n_dup:,} arrived more than once")
    if rec.frames_sent and n_sources == g.n_sources and len(rec.frames_sent) == n_sources:
        sent = [rec.frames_sent.get(k, g.n_frames) for k in range(n_sources)]
    sources = prepare_sources(counts, indices, replace(g, n_sources=1), n_sources)
    return Prepared(rec, sources, copies, sent, int(len(indices)), notes)


# ---------------------------------------------------------------- command line

def add_replay_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", metavar="FILE", help="stemstream scan files or stempy sparse files (v3)")
    p.add_argument("--bind", default="tcp://127.0.0.1:6001", metavar="tcp://HOST:PORT",
                   help="first source address; source k binds PORT+k (default tcp://127.0.0.1:6001)")
    p.add_argument("--rate", type=rate_arg, default=87000.0, metavar="FRAMES/S|max",
                   help="frames per second, or 'max': as fast as the receivers take them (default 87000)")
    p.add_argument("--sources", type=int, metavar="N",
                   help="sources (detector sectors) to publish on (default: as recorded)")
    p.add_argument("--loop", action="store_true",
                   help="replay the files again and again until Ctrl-C; later passes get scan ids "
                        "SCAN-loopN")
    p.add_argument("--flyback", type=int, metavar="N",
                   help="stempy files: flyback columns at the end of every row, dropped as the 4D "
                        "Camera's flyback frames (default: from the file's metadata, else 0)")
    p.add_argument("--batch", type=int, default=512, metavar="N", help="frames per message (default 512)")
    p.add_argument("--wait", type=float, default=0.0, metavar="S",
                   help="give up if a source has no receiver for S seconds, before or during a scan "
                        "(default 0: wait as long as it takes, saying what is not connected)")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    add_source_security_args(p)
    p.epilog = ("Example: stemstream replay out/scan-0000.h5 --rate max --sources 4 & "
                "stemstream process --connect tcp://127.0.0.1:6001 --sources 4 --out replayed")


def run_replay(args) -> int:
    def say(text):
        if not args.quiet:
            print(text, flush=True)

    def fail(text):
        print(f"stemstream replay: error: {text}", file=sys.stderr)
        return 2

    if args.sources is not None and args.sources < 1:
        return fail("--sources must be at least 1")
    if args.batch < 1:
        return fail("--batch must be at least 1")
    if args.flyback is not None and args.flyback < 0:
        return fail("--flyback must be >= 0")
    try:  # every file's structure first: a bad file stops the replay before anything is sent
        recordings = [open_recording(p, args.flyback, with_received=True) for p in args.files]
        n_sources = args.sources or max(r.geometry.n_sources for r in recordings)
        publisher = Publisher(args.bind, n_sources, curve=source_security(args))
    except (ScanFileError, BindError, SimulateError, ValueError) as e:  # SecurityError is a ValueError
        return fail(str(e))
    say(f"replay: {len(recordings)} file(s) on {', '.join(publisher.addresses)} ({security_note(publisher)}), "
        f"{'as fast as received' if args.rate is None else f'{args.rate:,.0f} frames/s'}"
        + (", looping until Ctrl-C" if args.loop else ""))
    totals = {"frames": 0, "events": 0, "seconds": 0.0, "scans": 0}
    order = list(range(len(recordings)))
    loaded: dict[int, Prepared] = {}  # with --loop every file stays in memory after its first pass
    try:
        with ThreadPoolExecutor(1) as pool:  # load the next file while this one streams
            pending = {0: pool.submit(prepare, recordings[0], n_sources)}
            npass = 0
            while True:
                for n in order:
                    prep = loaded[n] if n in loaded else pending.pop(n).result()
                    if args.loop:
                        loaded[n] = prep
                    nxt = (n + 1) % len(order)
                    if nxt not in loaded and nxt not in pending and (args.loop or nxt > n):
                        pending[nxt] = pool.submit(prepare, recordings[nxt], n_sources)
                    totals["scans"] += 1
                    st = _publish(publisher, prep, npass, args, say)
                    for key in ("frames", "events", "seconds"):
                        totals[key] += getattr(st, key)
                npass += 1
                if not args.loop:
                    break
    except ScanFileError as e:
        return fail(f"{e} (scans before it were sent; nothing of this file was)")
    except (SimulateError, StallError) as e:
        return fail(str(e))
    except KeyboardInterrupt:
        print("stemstream replay: interrupted; receivers were sent an abort", file=sys.stderr)
        return 130
    finally:
        if not publisher.close():
            print(publisher.dropped_note("replay"), flush=True)
    rate = totals["frames"] / totals["seconds"] if totals["seconds"] else float("nan")
    print(f"replay: done: {totals['scans']} scan(s), {totals['frames']:,} frames, {totals['events']:,} electrons "
          f"in {totals['seconds']:.2f} s of streaming ({rate:,.0f} frames/s)", flush=True)
    return 0


def _publish(publisher: Publisher, prep: Prepared, npass: int, args, say):
    rec = prep.recording
    suffix = f"-loop{npass}" if npass else ""
    scan_id = rec.scan_id[:128 - len(suffix)] + suffix  # the protocol's limit: 128 characters
    metadata = dict(rec.metadata, scan_id=scan_id,
                    replay={"file": str(rec.path), "format": rec.kind, "pass": npass})
    say(f"[{scan_id}] {rec.path}: {rec.n_stored:,} frames, {prep.n_events:,} electrons")
    for note in prep.notes:
        say(f"[{scan_id}] note: {note}")
    wait_for_receivers(publisher, args.wait)
    st = publisher.publish_scan(scan_id, prep.sources, metadata, rate=args.rate, batch=args.batch,
                                copies=prep.copies, frames_sent=prep.frames_sent,
                                progress=None if args.quiet else progress_printer(scan_id),
                                notify=warn, stall_timeout_s=args.wait or None)
    say(f"[{scan_id}] sent {st.frames:,} frames, {st.events:,} electrons in {st.seconds:.2f} s "
        f"({st.rate:,.0f} frames/s)")
    return st
