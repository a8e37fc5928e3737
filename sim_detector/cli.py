"""``stemstream simulate``: generate scans of a specimen and publish them like the detector would."""

from __future__ import annotations

import argparse
import gc
import secrets
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import numpy as np
import zmq

from stream.transport.protocol import MAX_PIXELS, MAX_SIDE, Geometry

from sim_detector.publisher import (BindError, Publisher, StallError, prepare_sources, receivers_hint,
                                    source_addresses)


class SimulateError(ValueError):
    """A bad argument or input file; printed as one line, exit code 2."""


def shape_arg(text: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not ROWSxCOLUMNS, e.g. 128x128") from None
    if a < 1 or b < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: both sizes must be at least 1")
    return (a, b)


def rate_arg(text: str) -> float | None:
    if text == "max":
        return None
    try:
        r = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of frames/s or 'max'") from None
    if not (np.isfinite(r) and r > 0):
        raise argparse.ArgumentTypeError("the rate must be > 0 frames/s (or 'max')")
    return r


def number_arg(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not np.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return v


def nonneg_arg(text: str) -> float:
    v = number_arg(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0")
    return v


def positive_arg(text: str) -> float:
    v = number_arg(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be > 0")
    return v


def parse_tilts(text: str) -> list[float]:
    """'START:STOP:STEP' in degrees, STOP included: '-60:60:3' → -60, -57, …, 60."""
    try:
        start, stop, step = (float(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not START:STOP:STEP in degrees, e.g. -60:60:3") from None
    if step <= 0 or stop < start or max(abs(start), abs(stop)) > 90:
        raise argparse.ArgumentTypeError(f"{text!r}: need STEP > 0, START <= STOP, and angles within ±90°")
    n = int(np.floor((stop - start) / step + 1e-9)) + 1
    return [round(start + i * step, 6) for i in range(n)]


class _DefaultsFormatter(argparse.HelpFormatter):
    """Show a default only where the help does not already say it and there is one."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        default = "x".join(map(str, action.default)) if isinstance(action.default, tuple) else action.default
        return f"{text} (default: {default})"


def add_simulate_args(p: argparse.ArgumentParser) -> None:
    from sim_detector.specimens import SPECIMENS

    p.formatter_class = _DefaultsFormatter
    p.epilog = ("Example: stemstream simulate --specimen mgo --scan 128x128 --dose 200 --rate 87000 "
                "--sources 4 --truth truth.h5. Each source k binds the port of --bind plus k; start "
                "'stemstream process --connect tcp://127.0.0.1:6001 --sources 4' to receive. "
                "Physics and presets: docs/EMULATOR.md.")
    g = p.add_argument_group("specimen and scan")
    g.add_argument("--specimen", default="mgo", metavar="NAME|FILE",
                   help=f"one of {', '.join(SPECIMENS)}, or a file of atom positions (.mat, .xyz, .csv)")
    g.add_argument("--size", type=positive_arg, metavar="Å", help="particle or crystal size (pt-particle, cluster)")
    g.add_argument("--scan", type=shape_arg, default=(128, 128), metavar="NYxNX", help="probe positions: rows x columns")
    g.add_argument("--step", type=positive_arg, metavar="Å", help="scan step (default: the specimen's preset)")
    g.add_argument("--frames-per-position", type=int, default=1, metavar="N", help="detector frames per probe position")
    g.add_argument("--flyback", type=int, default=0, metavar="N",
                   help="extra flyback columns per scan row, as the 4D Camera records them")
    g.add_argument("--tilts", type=parse_tilts, metavar="START:STOP:STEP",
                   help="a tilt series: one scan per tilt angle (degrees, about the y axis)")
    g.add_argument("--scans", type=int, default=1, metavar="N", help="scans in sequence (each tilt series N times)")
    g.add_argument("--seed", type=int, default=0, help="random seed; same seed, same electrons")
    g = p.add_argument_group("beam and detector")
    g.add_argument("--energy", type=positive_arg, metavar="keV", help="beam energy (default 300)")
    g.add_argument("--convergence", type=positive_arg, metavar="mrad", help="probe convergence semi-angle")
    g.add_argument("--probe", type=positive_arg, metavar="Å", help="probe FWHM (default: diffraction limit)")
    g.add_argument("--dose", type=nonneg_arg, metavar="e/frame",
                   help="mean electrons per frame (default: the specimen's preset, 200)")
    g.add_argument("--detector", type=shape_arg, metavar="HxW",
                   help="detector pixels (default 576x576; 192x192 --as dectris, 256x256 --as merlin)")
    g.add_argument("--mrad-per-px", type=positive_arg, metavar="mrad", help="detector calibration")
    g.add_argument("--dark-rate", type=nonneg_arg, default=0.0, metavar="e/frame", help="mean dark counts per frame")
    g.add_argument("--hot-pixels", type=int, default=0, metavar="N", help="hot pixels (fire in most frames)")
    g.add_argument("--dead-pixels", type=int, default=0, metavar="N", help="dead pixels (never count)")
    g = p.add_argument_group("publishing")
    g.add_argument("--bind", default="tcp://127.0.0.1:6001", metavar="tcp://HOST:PORT",
                   help="address of source 0; source k binds PORT+k")
    g.add_argument("--sources", type=int, default=1, metavar="N",
                   help="split every frame into N detector row stripes, one source each (4D Camera: 4)")
    g.add_argument("--rate", type=rate_arg, default=87000.0, metavar="FRAMES/S|max", help="target frame rate")
    g.add_argument("--batch", type=int, metavar="N", help="frames per message (default 512; 16 with --raw)")
    g.add_argument("--scan-id", metavar="PREFIX", help="scan ids are PREFIX-0000, PREFIX-0001, … (default: date-time and a random tag)")
    g.add_argument("--truth", metavar="FILE.h5", help="write the ground truth of every scan there")
    g.add_argument("--wait", type=nonneg_arg, default=0, metavar="S",
                   help="give up if a source has no receiver for S seconds, before or during a scan "
                        "(0: wait as long as it takes, saying every few seconds what is not connected)")
    g.add_argument("--linger", type=nonneg_arg, default=10.0, metavar="S",
                   help="at exit, wait up to S seconds for the receivers to take the messages still "
                        "queued to them (a stalled receiver); what is left then is dropped, and said (default 10)")
    g.add_argument("--heartbeat", type=nonneg_arg, default=0, metavar="S",
                   help="ZeroMQ heartbeats every S seconds; a receiver silent for 5·S is dropped with "
                        "the frames queued to it (a vanished host, but also a stalled one). 0: never (default)")
    g.add_argument("--quiet", action="store_true", help="only the final summary")
    g = p.add_argument_group("raw frames (the 4D Camera before counting; docs/EMULATOR.md)")
    g.add_argument("--raw", action="store_true",
                   help="send raw detector frames (12-bit ADU: dark, noise, charge clouds, X-rays) as "
                        "'dense' messages, to be counted by the receivers ([counting], docs/COUNTING.md); "
                        "--dose 0 makes a dark scan for 'stemstream calibrate'")
    g.add_argument("--raw-files", metavar="DIR",
                   help="with --raw: also write each scan's raw frames as 4D Camera files that "
                        "stempy.io.reader reads (version 5, DIR/SCAN_ID/*.data; 576x576 detector)")
    g.add_argument("--xray-rate", type=nonneg_arg, default=0.05, metavar="HITS/FRAME",
                   help="with --raw: mean X-ray hits per frame")
    g = p.add_argument_group("speaking a real detector's protocol (docs/EMULATOR.md)")
    g.add_argument("--as", dest="as_detector", choices=("stemstream", "dectris", "merlin"), default="stemstream",
                   help="stemstream/1 (default); a DECTRIS DCU: REST API on --api, ZeroMQ stream "
                        "on --bind; a Merlin: control port --control, data port --bind")
    g.add_argument("--api", default="http://127.0.0.1:8910", metavar="http://HOST:PORT",
                   help="--as dectris: where the REST API listens")
    g.add_argument("--control", default="tcp://127.0.0.1:6341", metavar="tcp://HOST:PORT",
                   help="--as merlin: where the control port listens")
    g.add_argument("--compression", choices=simplon_compressions(), default="bslz4",
                   help="--as dectris: image compression")
    g.add_argument("--counter-depth", type=int, choices=(1, 6, 12, 24), default=12,
                   help="--as merlin: counter depth in bits (counts above 2^bits-1 are clipped)")
    g.add_argument("--mib-raw", action="store_true", help="--as merlin: raw (R64) MIB frames instead of U08/U16/U32")
    g.add_argument("--self-start", action="store_true",
                   help="--as dectris|merlin: arm and trigger every scan ourselves (as an operator "
                        "would; for passive sessions) instead of waiting to be armed")
    add_source_security_args(p)


def add_source_security_args(p: argparse.ArgumentParser) -> None:
    """--curve-keys, --curve-client-key, --insecure: how a source lets receivers in."""
    g = p.add_argument_group("security (docs/SECURITY.md)")
    g.add_argument("--curve-keys", metavar="DIR",
                   help="key directory: bind with its source key and accept its receiver key "
                        "(default ~/.config/stemstream/keys, created on first use)")
    g.add_argument("--curve-client-key", action="append", default=[], metavar="KEY",
                   help="also accept receivers with this public key (40 Z85 characters or a .key file); repeat")
    g.add_argument("--insecure", action="store_true",
                   help="bind plain sockets: anyone who reaches the port can take the frames (for "
                        "receivers that cannot authenticate, on a private network)")


def source_security(args):
    """The SourceKeys of the arguments, or None with --insecure. Raises SecurityError."""
    from stream.security import source_keys
    if args.insecure:
        if args.curve_client_key or args.curve_keys:
            raise SimulateError("--insecure binds plain sockets: drop --curve-keys / --curve-client-key")
        return None
    return source_keys(args.curve_keys, args.curve_client_key)


def simplon_compressions():
    from stream.sources.simplon import COMPRESSIONS
    return COMPRESSIONS


def _check(args) -> None:
    if args.detector is None:
        args.detector = {"dectris": (192, 192), "merlin": (256, 256)}.get(args.as_detector, (576, 576))
    if args.as_detector != "stemstream" and args.sources != 1:
        raise SimulateError(f"--as {args.as_detector} sends whole frames from one source: drop --sources")
    if args.as_detector != "stemstream" and args.raw:
        raise SimulateError(f"--raw sends the 4D Camera's raw frames over stemstream/1; --as {args.as_detector} "
                            "sends counted frames (for Merlin's raw MIB format: --mib-raw)")
    if args.mib_raw and args.as_detector != "merlin":
        raise SimulateError("--mib-raw is Merlin's raw MIB format: use it with --as merlin")
    problems = [(args.sources < 1, "--sources must be at least 1"),
                (args.sources > args.detector[0], f"--sources {args.sources} exceeds the detector's {args.detector[0]} rows"),
                (args.frames_per_position < 1, "--frames-per-position must be at least 1"),
                (args.flyback < 0, "--flyback must be >= 0"),
                (args.scans < 1, "--scans must be at least 1"),
                (args.batch is not None and args.batch < 1, "--batch must be at least 1"),
                ((args.raw_files is not None or args.xray_rate != 0.05) and not args.raw,
                 "--raw-files and --xray-rate describe raw frames: add --raw"),
                (args.raw_files is not None and tuple(args.detector) != (576, 576),
                 "--raw-files writes the 4D Camera format, whose frames are 576x576: use --detector 576x576"),
                (args.hot_pixels < 0 or args.dead_pixels < 0, "--hot-pixels and --dead-pixels must be >= 0"),
                (args.detector[0] * args.detector[1] > MAX_PIXELS or max(args.detector) > MAX_SIDE,
                 f"--detector {args.detector[0]}x{args.detector[1]} is beyond the protocol's bounds "
                 f"({MAX_SIDE} a side, {MAX_PIXELS:,} pixels)")]
    for bad, message in problems:
        if bad:
            raise SimulateError(message)
    try:
        source_addresses(args.bind, args.sources)
    except ValueError as e:
        raise SimulateError(str(e)) from None


def _models(args):
    """Specimen and simulation settings from the arguments and the specimen's presets."""
    from sim_detector.simulate import Beam, Detector, ScanSpec, presets
    from sim_detector.specimens import make_specimen

    params = {"size_A": args.size} if args.size else {}
    try:
        specimen = make_specimen(args.specimen, seed=args.seed, **params)
    except (ValueError, OSError) as e:
        raise SimulateError(str(e)) from None
    pre = presets(specimen.name)
    beam = Beam(**{**pre.get("beam", {}), **{k: v for k, v in dict(
        energy_keV=args.energy, convergence_mrad=args.convergence, probe_fwhm_A=args.probe,
        dose=args.dose).items() if v is not None}})
    det = Detector(**{**pre.get("detector", {}), **{k: v for k, v in dict(
        shape=args.detector, mrad_per_px=args.mrad_per_px, dark_rate=args.dark_rate,
        hot_pixels=args.hot_pixels, dead_pixels=args.dead_pixels).items() if v is not None}})
    scan = ScanSpec(**{**pre.get("scan", {}), **{k: v for k, v in dict(
        shape=args.scan, step_A=args.step, frames_per_position=args.frames_per_position,
        flyback=args.flyback).items() if v is not None}})
    return specimen, beam, det, scan


def _geometry(sim) -> Geometry:
    md = sim.metadata
    h, w = sim.frame_shape
    return Geometry(tuple(sim.scan_shape), tuple(sim.frame_shape), sim.frames_per_position,
                    flyback=sim.flyback, mrad_per_px=md.get("mrad_per_px"),
                    convergence_mrad=md.get("convergence_mrad"), center=((h - 1) / 2, (w - 1) / 2))


def run_simulate(args) -> int:
    """Generate and publish every requested scan. Returns the exit code."""
    from sim_detector.simulate import simulate_scan

    def say(text):
        if not args.quiet:
            print(text, flush=True)

    from stream.security import SecurityError

    try:
        _check(args)
        specimen, beam, det, scan = _models(args)
        if args.as_detector != "stemstream":  # a detector's protocol: no CURVE (docs/SECURITY.md)
            return run_as_detector(args, specimen, beam, det, scan, say)
        publisher = Publisher(args.bind, args.sources, curve=source_security(args),
                              heartbeat_s=args.heartbeat, linger_s=args.linger)
    except (SimulateError, BindError, SecurityError) as e:
        print(f"stemstream simulate: error: {e}", file=sys.stderr)
        return 2
    # date-time plus a random tag: two emulators started in the same second never share ids
    prefix = args.scan_id or f"{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
    tilts = args.tilts or [None]
    series_id = f"{prefix}-tilt" if args.tilts else None
    jobs = [(k, i, t) for k in range(args.scans) for i, t in enumerate(tilts)]

    def generate(job):
        k, i, tilt = job
        t0 = time.perf_counter()
        sim = simulate_scan(specimen, beam, det, scan, seed=args.seed + len(tilts) * k + i,
                            tilt_deg=tilt, with_expected=bool(args.truth))
        sources = None if args.raw else prepare_sources(sim.counts, sim.indices, _geometry(sim),
                                                        args.sources)
        return sim, sources, time.perf_counter() - t0

    totals = {"frames": 0, "events": 0, "seconds": 0.0}
    truth_file = None
    try:
        if args.truth:
            import h5py
            try:
                truth_file = h5py.File(args.truth, "w")
            except OSError as e:
                raise SimulateError(f"cannot write --truth {args.truth}: {e}") from None
        say(f"simulate: {specimen.name}, {len(jobs)} scan(s) of {scan.shape[0]}x{scan.shape[1]} positions, "
            f"detector {det.shape[0]}x{det.shape[1]}, {beam.dose:g} e-/frame, sources on "
            f"{', '.join(publisher.addresses)} ({security_note(publisher)})")
        with ThreadPoolExecutor(1) as pool:  # generate the next scan while this one streams
            pending = pool.submit(generate, jobs[0])
            for n, job in enumerate(jobs):
                try:
                    sim, sources, gen_s = pending.result()
                except ValueError as e:  # the model refuses a parameter the user chose
                    raise SimulateError(str(e)) from None
                if n + 1 < len(jobs):
                    pending = pool.submit(generate, jobs[n + 1])
                scan_id = f"{prefix}-{n:04d}"
                metadata = dict(sim.metadata, scan_id=scan_id, time=datetime.now().isoformat(timespec="seconds"))
                if series_id:
                    metadata.update(series_id=series_id, series_index=job[1], series_length=len(tilts))
                group = truth_file.create_group(scan_id) if truth_file is not None else None
                if group is not None:
                    sim.truth.write(group)
                say(f"[{scan_id}] generated {len(sim.counts):,} frames, {len(sim.indices):,} electrons "
                    f"in {gen_s:.1f} s" + (f"; tilt {job[2]:+.1f}°" if job[2] is not None else ""))
                wait_for_receivers(publisher, args.wait)
                progress = None if args.quiet else progress_printer(scan_id)
                if args.raw:
                    st = publish_raw(publisher, args, sim, scan_id, metadata, group, progress)
                else:
                    st = publisher.publish_scan(scan_id, sources, metadata, rate=args.rate,
                                                batch=args.batch or 512, progress=progress, notify=warn,
                                                stall_timeout_s=args.wait or None)
                totals["frames"] += st.frames
                totals["events"] += st.events
                totals["seconds"] += st.seconds
                say(f"[{scan_id}] sent {st.frames:,} frames, {st.events:,} electrons in {st.seconds:.2f} s "
                    f"({st.rate:,.0f} frames/s)")
    except (SimulateError, StallError) as e:
        print(f"stemstream simulate: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stemstream simulate: interrupted; receivers were sent an abort", file=sys.stderr)
        return 130
    finally:
        if truth_file is not None:
            truth_file.close()
        if not publisher.close():
            warn(publisher.dropped_note("simulate", "; raise --linger to wait longer for a stalled receiver"))
        # Nothing is left to clean up: the exit's last garbage collection would only walk the
        # scan's objects (0.5 CPU-s after a 1024² scan, on cores a pipeline on this machine
        # needs right then to finish that scan's file).
        gc.freeze()
    rate = totals["frames"] / totals["seconds"] if totals["seconds"] else float("nan")
    print(f"simulate: done: {len(jobs)} scan(s), {totals['frames']:,} frames, {totals['events']:,} electrons "
          f"in {totals['seconds']:.2f} s of streaming ({rate:,.0f} frames/s)"
          + (f"; truth in {args.truth}" if args.truth else ""), flush=True)
    return 0


def warn(text: str) -> None:
    """Waiting notes and warnings: printed even with --quiet."""
    print(text, flush=True)


def wait_for_receivers(publisher: Publisher, wait_s: float) -> None:
    """Wait until every source has a receiver, saying what is missing every few seconds;
    SimulateError naming the sources without one after ``wait_s`` (0: no limit)."""
    if not publisher.wait_for_receivers(wait_s or None, notify=warn):
        connected = [a not in publisher.unconnected() for a in publisher.addresses]
        refused = (f"; it refused {publisher.refused} connection attempt(s) from receivers with other keys "
                   "(docs/SECURITY.md)" if publisher.refused else "")
        raise SimulateError(f"after {wait_s:g} s, {receivers_hint(publisher.addresses, connected)}{refused}; "
                            "or raise --wait")
def security_note(publisher) -> str:
    """How a publisher's sockets let receivers in, for its first line."""
    if publisher.curve is None:
        return "plain: any receiver that reaches them gets frames"
    return f"CURVE, source key {publisher.curve.keypair.public.decode()}, {len(publisher.curve.clients)} receiver key(s) accepted"


def publish_raw(publisher, args, sim, scan_id: str, metadata: dict, truth_group, progress):
    """Stream one simulated scan as raw frames (``dense``, values 'raw'), made batch by batch
    from its electrons; with --raw-files also as 4D Camera files; the true electrons and
    X-ray hits go into ``truth_group`` (its ``raw`` subgroup)."""
    from sim_detector.raw import RawDetector, RawFrames
    from sim_detector.rawfile import RawFileWriter
    from sim_detector.publisher import sector_rows

    raw = RawFrames(RawDetector(xray_rate=args.xray_rate), sim.frame_shape, seed=sim.metadata["seed"])
    g = _geometry(sim)
    geometries = [replace(g, n_sources=args.sources, sector=sec)
                  for sec in sector_rows(g.frame_shape[0], args.sources)]
    offsets = sim.offsets
    xray_count = np.zeros(g.n_frames, np.int64)
    xray_pix = np.full((g.n_frames, 4), -1, np.int64)
    writer = None
    if args.raw_files:
        writer = RawFileWriter(Path(args.raw_files) / scan_id, scan_number=int(sim.metadata["seed"]) & 0xFFFFFFFF,
                               raster_shape=g.raster_shape, frames_per_position=g.frames_per_position)

    def make_frames(first, count):
        frames, xc, xp = raw.frames(first, sim.counts[first:first + count],
                                    sim.indices[offsets[first]:offsets[first + count]], xrays=True)
        xray_count[first:first + count], xray_pix[first:first + count] = xc, xp
        if writer is not None:
            writer.write(first, frames)
        return frames

    metadata = dict(metadata, values="raw", raw_detector=raw.detector.to_metadata(),
                    electrons=int(len(sim.indices)))
    try:
        st = publisher.publish_dense(scan_id, geometries, make_frames, metadata, "raw", rate=args.rate,
                                     batch=args.batch or 16, progress=progress, notify=warn,
                                     stall_timeout_s=args.wait or None)
    finally:
        if writer is not None:
            writer.close()
    st.events = int(len(sim.indices))
    if truth_group is not None:
        raw.write_truth(truth_group.create_group("raw"), sim.counts, sim.indices, xray_count, xray_pix)
    return st


def progress_printer(scan_id: str):
    last = [0.0]

    def progress(done, total):
        now = time.monotonic()
        if now - last[0] >= 1.0 or done == total:
            last[0] = now
            print(f"[{scan_id}] streaming {done:,}/{total:,} frames ({100 * done / total:.0f}%)", flush=True)
    return progress


def run_as_detector(args, specimen, beam, det, scan, say) -> int:
    """``--as dectris|merlin``: serve every scan the way that detector would, each once it
    is armed (or at once with --self-start)."""
    import threading

    from sim_detector.detectors import DectrisEmulator, MerlinEmulator, _Scan
    from sim_detector.simulate import simulate_scan

    try:
        if args.as_detector == "dectris":
            emu = DectrisEmulator(args.api, args.bind, args.detector, args.compression)
            where = f"DCU REST API {emu.api}, stream {args.bind}"
        else:
            emu = MerlinEmulator(args.control, args.bind, args.detector, args.counter_depth, args.mib_raw)
            where = f"Merlin control {emu.control}, data {emu.data}"
    except (OSError, zmq.ZMQError, ValueError) as e:
        print(f"stemstream simulate: error: cannot serve as {args.as_detector}: {e}", file=sys.stderr)
        return 2
    prefix = args.scan_id or f"{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
    totals = {"frames": 0, "clipped": 0}
    stop = threading.Event()
    truth_file = None
    try:
        if args.truth:
            import h5py
            truth_file = h5py.File(args.truth, "w")
        say(f"simulate --as {args.as_detector}: {specimen.name}, {args.scans} scan(s) of "
            f"{scan.shape[0]}x{scan.shape[1]}, detector {det.shape[0]}x{det.shape[1]}; {where}")
        for k in range(args.scans):
            sim = simulate_scan(specimen, beam, det, scan, seed=args.seed + k, with_expected=bool(args.truth))
            scan_id = f"{prefix}-{k:04d}"
            if truth_file is not None:
                sim.truth.write(truth_file.create_group(scan_id))
            md = dict(sim.metadata, scan_shape=tuple(sim.scan_shape))
            job = _Scan(scan_id, sim.counts, sim.indices, tuple(sim.frame_shape), md)
            if args.as_detector == "merlin":
                say(f"[{scan_id}] waiting for a data connection on {emu.data}")
                emu.accept_data(stop)
            if args.self_start:
                emu.start_self()
            else:
                say(f"[{scan_id}] ready: waiting to be {'armed' if args.as_detector == 'dectris' else 'started'}")
            started = emu.wait_armed(stop) if args.as_detector == "dectris" else emu.wait_started(stop)
            if not started:
                break
            st = emu.send_scan(job, rate=args.rate, progress=None if args.quiet else progress_printer(scan_id))
            totals["frames"] += st["frames"]
            totals["clipped"] += st["clipped_electrons"]
            series = f" (series {st['series']})" if "series" in st else ""
            say(f"[{scan_id}]{series} sent {st['frames']:,}/{st['of']:,} frames in {st['seconds']:.2f} s"
                + (" - aborted on the detector" if st["aborted"] else "")
                + (f"; {st['clipped_electrons']:,} electrons lost to the counter depth" if st["clipped_electrons"] else ""))
    except KeyboardInterrupt:
        print("stemstream simulate: interrupted", file=sys.stderr)
        return 130
    except ConnectionError as e:
        print(f"stemstream simulate: error: {e}", file=sys.stderr)
        return 2
    finally:
        stop.set()
        if truth_file is not None:
            truth_file.close()
        emu.close()
    print(f"simulate: done: {totals['frames']:,} frames as {args.as_detector}"
          + (f"; truth in {args.truth}" if args.truth else ""), flush=True)
    return 0

