"""``stemstream calibrate``: the dark reference and thresholds of electron counting, into a
counting file that ``[counting] file`` gives every worker (docs/COUNTING.md).

Dark frames come from 4D Camera raw files, ``.npy`` stacks, or a dark scan streamed by the
detector (``--connect``); the thresholds from sample frames (the dark frames themselves, or
``--frames``), chosen by a seeded draw, computed as stempy's ``calculate_thresholds`` does,
or set by hand.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from operators.electron_counting import choose_samples, compute_thresholds

from stream.files.counting_file import (Calibration, CountingFileError, DarkAccumulator,
                                        write_calibration)
from stream.transport.links import LinkWatch, unreached


class CalibrateError(ValueError):
    """A bad argument or input; printed as one line, exit code 2."""


def add_calibrate_args(p: argparse.ArgumentParser) -> None:
    p.epilog = ("Examples: stemstream calibrate --dark dark/*.data --frames scan/*.data --out counting.h5; "
                "stemstream calibrate --connect tcp://127.0.0.1:6001 --sources 4 --out counting.h5 (then "
                "stream a dark scan, e.g. stemstream simulate --raw --dose 0 --sources 4). Use it with "
                "[counting] file = \"counting.h5\" in the pipeline configuration.")
    p.add_argument("--dark", nargs="+", metavar="FILE",
                   help="dark frames: 4D Camera raw files (.data), a .npy stack (n, h, w), a .npy dark "
                        "reference (h, w), or 'zero' for no dark subtraction (a camera that subtracts "
                        "its own pedestal)")
    p.add_argument("--connect", metavar="tcp://HOST:PORT",
                   help="instead of --dark: receive one dark scan of raw frames from this source")
    p.add_argument("--sources", type=int, default=1, metavar="N",
                   help="with --connect: the N sources PORT..PORT+N-1 (default 1)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S",
                   help="with --connect: give up S seconds after the last message (default 30)")
    g = p.add_argument_group("with --connect: security (docs/SECURITY.md)")
    g.add_argument("--curve-keys", metavar="DIR",
                   help="key directory (default ~/.config/stemstream/keys): connect with its receiver key and "
                        "expect its source key, as 'stemstream process' does")
    g.add_argument("--curve-server-key", metavar="KEY",
                   help="the source's public key (40 Z85 characters or a .key file), if not the key directory's")
    g.add_argument("--insecure", action="store_true",
                   help="connect without CURVE (a source that cannot authenticate, on a private network: "
                        "anyone who can answer on that address feeds the dark scan)")
    p.add_argument("--frames", nargs="+", metavar="FILE",
                   help="sample frames for the thresholds (raw files or a .npy stack; default: the dark frames)")
    p.add_argument("--raw-version", type=int, choices=(3, 4, 5), metavar="V",
                   help="version of the 4D Camera raw files (default: 5 for module files, else 3)")
    p.add_argument("--gain", metavar="gain.npy", help="a gain map (h, w); values are divided by it")
    p.add_argument("--config", metavar="pipeline.toml", help="defaults from its [counting] section")
    p.add_argument("--samples", type=int, metavar="N", help="sample frames for the thresholds (default 40)")
    p.add_argument("--background-n-sigma", type=float, metavar="X", help="background threshold in σ (default 4.5)")
    p.add_argument("--xray-n-sigma", type=float, metavar="X", help="x-ray threshold in σ (default 175)")
    p.add_argument("--seed", type=int, metavar="S", help="which frames are sampled (default 0)")
    p.add_argument("--background-threshold", type=float, metavar="ADU",
                   help="set the thresholds by hand (with --xray-threshold) instead of computing them")
    p.add_argument("--xray-threshold", type=float, metavar="ADU")
    p.add_argument("--out", default="counting.h5", metavar="FILE.h5", help="the counting file to write")


# ---------------------------------------------------------------- frame sources

class Frames:
    """Frames of files: ``n`` frames, ``frame(i)`` → (h, w)."""

    def __init__(self, paths, raw_version=None, what="frames"):
        from sim_detector.rawfile import RawFileReader

        paths = [Path(p) for p in paths]
        self.dark_map = None
        try:
            if all(p.suffix == ".npy" for p in paths):
                if len(paths) != 1:
                    raise CalibrateError(f"--{what}: give one .npy file, got {len(paths)}")
                arr = np.load(paths[0], mmap_mode="r", allow_pickle=False)
                if arr.ndim == 2 and what == "dark":
                    self.dark_map, arr = np.asarray(arr, np.float32), arr[None]
                if arr.ndim != 3 or arr.dtype.kind not in "ui":
                    raise CalibrateError(f"--{what} {paths[0]}: expected (n, h, w) integer frames, got "
                                         f"{arr.dtype} {arr.shape}")
                self._arr, self.n, self.shape = arr, len(arr), arr.shape[1:]
                self.frame = lambda i: np.asarray(self._arr[i])
            elif all(p.suffix == ".data" for p in paths):
                r = RawFileReader(paths, raw_version)
                self.n, self.shape, self.frame = r.n_frames, (576, 576), r.frame
            else:
                raise CalibrateError(f"--{what}: give 4D Camera raw files (.data) or one .npy file, "
                                     f"not {', '.join(p.name for p in paths[:3])}")
        except (OSError, ValueError) as e:
            if isinstance(e, CalibrateError):
                raise
            raise CalibrateError(f"--{what}: {e}") from None
        if self.n < 1:
            raise CalibrateError(f"--{what}: no frames in {paths[0]}")


def dark_from_files(frames: Frames, say) -> tuple[np.ndarray, int]:
    if frames.dark_map is not None:
        return frames.dark_map, 0
    acc = DarkAccumulator(frames.shape)
    t0 = time.monotonic()
    for i in range(frames.n):
        acc.add(frames.frame(i)[None], 0)
        if time.monotonic() - t0 > 1:
            say(f"  dark: {i + 1:,}/{frames.n:,} frames")
            t0 = time.monotonic()
    return acc.dark(), acc.n_frames


def waiting_note(connect: list[str], links: LinkWatch) -> str:
    """What a calibrate waiting for its dark scan tells: the sources it does not reach, or
    that they are connected and send nothing yet, and the command that sends a dark scan."""
    missing = unreached(connect, {"calibrate": links.report()})
    hint = (f"start the dark scan (stemstream simulate --raw --dose 0 --bind {connect[0]}"
            + (f" --sources {len(connect)}" if len(connect) > 1 else "") + "), or Ctrl-C")
    if missing:
        return (f"calibrate: waiting: not connected to {', '.join(missing)} "
                f"({next(iter(missing.values()))}); {hint}")
    return f"calibrate: waiting: connected to all {len(connect)} source(s), no scan yet; {hint}"


def dark_scan_keys(args):
    """The CURVE keys --connect uses (None with --insecure), as 'stemstream process' does."""
    from stream.security import ClientKeys, SecurityError, ensure_keys, read_public
    if args.insecure:
        if args.curve_keys or args.curve_server_key:
            raise CalibrateError("--insecure connects without CURVE: drop --curve-keys / --curve-server-key")
        return None
    try:
        kd = ensure_keys(args.curve_keys, roles=("source", "receiver"))
        server = read_public(args.curve_server_key) if args.curve_server_key else kd["source"].public
    except SecurityError as e:
        raise CalibrateError(str(e)) from None
    return ClientKeys(kd["receiver"], server)


def receive_dark_scan(connect: list[str], timeout_s: float, n_samples: int, seed: int, say,
                      keys=None, max_message_bytes: int = 0, first_note_s: float = 3.0,
                      every_s: float = 10.0):
    """One streamed scan of raw ``dense`` frames: (dark, dark frames, {frame: (h, w)} samples,
    scan id). The sample frames are drawn from the scan's frame numbers when its geometry
    arrives, and assembled from every source's sector as they pass. ``keys``: the CURVE
    ClientKeys to connect with (None: plain); ``max_message_bytes``: the largest message part
    taken ([limits] max_message_mb; a larger one drops the connection). Until a scan arrives,
    ``say`` hears after ``first_note_s`` and then every ``every_s`` what is not connected
    (``waiting_note``); while it arrives, frames, per cent and rate about once a second."""
    import zmq

    from stream.security import as_client
    from stream.transport.protocol import ProtocolError, decode

    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    if max_message_bytes:
        pull.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    as_client(pull, keys)
    links = LinkWatch(pull)  # before connecting: no event is missed
    for addr in connect:
        pull.connect(addr)
    scan_id = acc = geometry = None
    chosen, samples, filled, ended, got = set(), {}, {}, {}, {}
    last = report = t_start = time.monotonic()
    next_note = t_start + first_note_s
    say(f"calibrate: waiting for a dark scan of raw frames from {', '.join(connect)} ...")
    try:
        while True:
            if not pull.poll(200):
                links.poll()
                now = time.monotonic()
                if scan_id is None and now >= next_note:
                    say(waiting_note(connect, links))
                    next_note = now + every_s
                if scan_id is not None and now - last > timeout_s:
                    say(f"WARNING: no message for {timeout_s:g} s; using the frames that arrived")
                    break
                continue
            try:
                msg = decode(pull.recv_multipart(copy=False))
            except ProtocolError as e:
                say(f"WARNING: rejected a message ({e.reason}): {e.detail}")
                continue
            last = time.monotonic()
            if scan_id is None:
                if msg.kind not in ("start", "dense", "frames"):
                    continue
                scan_id, geometry = msg.scan_id, msg.geometry.for_sector(None)
                acc = DarkAccumulator(geometry.frame_shape)
                chosen = set(int(f) for f in choose_samples(geometry.n_frames, n_samples, seed))
                t_start = time.monotonic()
                say(f"calibrate: dark scan {scan_id}: {geometry.n_frames:,} frames of "
                    f"{geometry.frame_shape[0]}x{geometry.frame_shape[1]} px from {geometry.n_sources} source(s)")
            if msg.scan_id != scan_id:
                continue
            if msg.kind == "frames" or (msg.kind == "dense" and msg.header["values"] != "raw"):
                raise CalibrateError(f"scan {scan_id} sends counted electrons, not raw frames: a dark "
                                     "reference is measured from raw frames (stemstream simulate --raw)")
            if msg.kind == "dense":
                r0, r1 = msg.geometry.sector
                acc.add(msg.dense, r0)
                got[msg.source] = got.get(msg.source, 0) + msg.count
                for k in range(msg.count):
                    f = msg.first + k
                    if f in chosen:
                        frame = samples.setdefault(f, np.zeros(geometry.frame_shape, msg.dense.dtype))
                        frame[r0:r1] = msg.dense[k]
                        filled[f] = filled.get(f, 0) + (r1 - r0)
            elif msg.kind == "end":
                ended[msg.source] = msg.header["frames_sent"]
            elif msg.kind == "abort":
                raise CalibrateError(f"the dark scan {scan_id} was aborted: {msg.header.get('reason')}")
            if time.monotonic() - report > 1:
                report = time.monotonic()
                say(f"  [{scan_id}] {frames_text(min(got.values(), default=0), geometry.n_frames, report - t_start)}")
            if len(ended) == geometry.n_sources and all(got.get(k, 0) >= n for k, n in ended.items()):
                break
    finally:
        links.close()
        pull.close()
    if scan_id is None:
        raise CalibrateError("no scan arrived")
    say(f"calibrate: received {frames_text(acc.n_frames, geometry.n_frames, time.monotonic() - t_start)}")
    h = geometry.frame_shape[0]
    incomplete = [f for f in samples if filled[f] != h]
    for f in incomplete:
        del samples[f]
    if incomplete:
        say(f"WARNING: {len(incomplete)} sample frame(s) lack a sector and are not used")
    return acc.dark(), acc.n_frames, samples, scan_id


def frames_text(done: int, total: int, seconds: float) -> str:
    """'1,024/4,096 frames (25 %), 310 frames/s'."""
    rate = done / seconds if seconds > 0 else 0.0
    return f"{done:,}/{total:,} frames ({100 * done / max(1, total):.0f} %), {rate:,.0f} frames/s"


# ---------------------------------------------------------------- the command

def run_calibrate(args) -> int:
    def say(text):
        print(text, flush=True)

    try:
        cal = calibrate(args, say)
        path = write_calibration(args.out, cal)
    except (CalibrateError, CountingFileError) as e:
        print(f"stemstream calibrate: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"stemstream calibrate: error: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    say(f"calibrate: {cal.summary()}")
    say(f"calibrate: wrote {path}; use it with [counting] file = \"{path}\" (docs/COUNTING.md)")
    return 0


def calibrate(args, say) -> Calibration:
    """The counting file's contents from the command's arguments."""
    from stream.config import ConfigError, PipelineConfig, load_config
    from stream.session.coordinator import expand_sources

    try:
        cfg = load_config(args.config) if args.config else PipelineConfig()
    except ConfigError as e:
        raise CalibrateError(str(e)) from None
    spec = cfg.counting
    params = {k: getattr(args, k) for k in ("samples", "background_n_sigma", "xray_n_sigma", "seed")
              if getattr(args, k) is not None}
    spec = replace(spec, calibration=None, **params)
    if (args.background_threshold is None) != (args.xray_threshold is None):
        raise CalibrateError("give both --background-threshold and --xray-threshold, or neither")
    if bool(args.dark) == bool(args.connect):
        raise CalibrateError("give the dark frames with --dark FILE... (or --dark zero), or --connect a "
                             "source streaming a dark scan")
    gain = None
    if args.gain:
        try:
            gain = np.load(args.gain, allow_pickle=False).astype(np.float32)
        except (OSError, ValueError) as e:
            raise CalibrateError(f"--gain {args.gain}: not a readable .npy array ({e})") from None
    attrs = {"seed": spec.seed, "samples_requested": spec.samples}
    samples, sample_ids = None, np.zeros(0, np.int64)
    if args.connect:
        try:
            connect = expand_sources([args.connect], args.sources)
        except ValueError as e:
            raise CalibrateError(str(e)) from None
        dark, n_dark, got, scan_id = receive_dark_scan(connect, args.timeout, spec.samples, spec.seed, say,
                                                       dark_scan_keys(args),
                                                       cfg.limits.max_message_bytes(cfg.chunking))
        attrs.update(dark_frames=n_dark, dark_source=f"dark scan {scan_id} streamed from {args.connect}")
        if not args.frames:
            sample_ids = np.array(sorted(got), np.int64)
            samples = [got[f] for f in sample_ids]
            attrs["samples_source"] = f"frames of the dark scan {scan_id}"
    elif args.dark == ["zero"]:
        dark, n_dark = None, 0
        attrs.update(dark_frames=0, dark_source="zero (no dark subtraction)")
    else:
        frames = Frames(args.dark, args.raw_version, "dark")
        dark, n_dark = dark_from_files(frames, say)
        attrs.update(dark_frames=n_dark, dark_source=", ".join(map(str, args.dark[:4]))
                     + (" ..." if len(args.dark) > 4 else ""))
        if not args.frames and frames.dark_map is None:
            sample_ids = choose_samples(frames.n, spec.samples, spec.seed)
            samples = [frames.frame(int(i)) for i in sample_ids]
            attrs["samples_source"] = "the dark frames"
    if dark is not None:
        say(f"calibrate: dark reference from {n_dark:,} frames: mean {dark.mean():.2f} ADU, "
            f"pixels {dark.min():.1f}..{dark.max():.1f}")
    if args.frames:
        frames = Frames(args.frames, args.raw_version, "frames")
        sample_ids = choose_samples(frames.n, spec.samples, spec.seed)
        samples = [frames.frame(int(i)) for i in sample_ids]
        attrs["samples_source"] = ", ".join(map(str, args.frames[:4])) + (" ..." if len(args.frames) > 4 else "")
    for name, arr in (("dark reference", dark), ("gain map", gain)):
        if arr is not None and samples and arr.shape != samples[0].shape:
            raise CalibrateError(f"the {name} is {arr.shape[0]}x{arr.shape[1]} px but the frames are "
                                 f"{samples[0].shape[0]}x{samples[0].shape[1]} px")
    if args.background_threshold is not None:
        bg, xr = args.background_threshold, args.xray_threshold
        attrs["thresholds_source"] = "set by hand (stemstream calibrate --background-threshold/--xray-threshold)"
    else:
        if not samples:
            raise CalibrateError("no sample frames for the thresholds: give --frames FILE... (a dark "
                                 "reference alone has none), or set them by hand")
        say(f"calibrate: thresholds from {len(samples)} sample frames (seed {spec.seed}) ...")
        try:
            stats = compute_thresholds(samples, dark if dark is not None else np.zeros(samples[0].shape),
                                       gain, spec.background_n_sigma, spec.xray_n_sigma)
        except ValueError as e:
            raise CalibrateError(str(e)) from None
        bg, xr = stats.pop("background_threshold"), stats.pop("xray_threshold")
        attrs.update(stats, thresholds_source="computed by stemstream calibrate (stempy's "
                                              "calculate_thresholds on the sample frames)")
    return Calibration(dark, float(bg), float(xr), gain, attrs, np.asarray(sample_ids, np.int64))
