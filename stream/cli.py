"""The ``stemstream`` command: simulate, process, demo, info.

Errors a user can cause print one line naming the problem and the fix, and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys


class CliError(Exception):
    """A user error: printed as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _fix_negative_values(argv: list[str], options=("--tilts",)) -> list[str]:
    """Let ``--tilts -60:60:3`` work: argparse would take -60:60:3 for an option."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in options and i + 1 < len(argv) and argv[i + 1][:1] == "-" and argv[i + 1][1:2].isdigit():
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


# ---------------------------------------------------------------- process

def add_process_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--connect", action="append", metavar="tcp://HOST:PORT",
                   help="a detector or emulator source to receive from; repeat for several "
                        "(default tcp://127.0.0.1:6001)")
    p.add_argument("--sources", type=int, default=1, metavar="N",
                   help="expand each --connect PORT to the N sources PORT..PORT+N-1, as "
                        "'stemstream simulate --sources N' binds them (default 1)")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="use a running dask scheduler (e.g. tcp://10.0.0.5:8786) instead of a local cluster")
    p.add_argument("--workers", type=int, metavar="N", help="worker processes of the local cluster (default 2)")
    p.add_argument("--config", metavar="pipeline.toml", help="pipeline configuration (docs/CONFIG.md)")
    p.add_argument("--out", metavar="DIR", help="where scan files and previews go (default: [output] dir, 'out')")
    p.add_argument("--timeout", type=float, metavar="S",
                   help="close an unfinished scan after S seconds without messages (default 5)")
    p.add_argument("--live-rate", type=float, metavar="HZ", help="live results rate (default 2; 0 = off)")
    p.add_argument("--publish", metavar="tcp://HOST:PORT",
                   help="bind a ZeroMQ PUB socket there for live results (docs/PROTOCOL.md)")


def session_from_args(args, **overrides):
    from dataclasses import replace

    from .config import ConfigError, load_config
    from .session import Session, expand_sources

    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        raise CliError(str(e)) from None
    if args.timeout is not None:
        if args.timeout <= 0:
            raise CliError("--timeout must be > 0 seconds")
        cfg = replace(cfg, scan=replace(cfg.scan, timeout_s=args.timeout))
    if args.live_rate is not None or args.publish:
        cfg = replace(cfg, live=replace(cfg.live, rate_hz=cfg.live.rate_hz if args.live_rate is None
                                        else args.live_rate, publish=args.publish or cfg.live.publish))
    if args.workers is not None and args.workers < 1:
        raise CliError("--workers must be at least 1")
    try:
        connect = expand_sources(args.connect or ["tcp://127.0.0.1:6001"], args.sources)
    except ValueError as e:
        raise CliError(str(e)) from None
    return Session(connect, out=args.out, config=cfg, scheduler=args.scheduler,
                   workers=args.workers, **overrides)


def cmd_process(args) -> int:
    session = session_from_args(args)
    with session:
        session.console.say("processing every scan that arrives; Ctrl-C to stop")
        try:
            while True:
                session.wait(timeout=None)
        except KeyboardInterrupt:
            session.console.say("stopping")
    return 0


# ---------------------------------------------------------------- info

def cmd_info(args) -> int:
    from .storage import ScanFileError, describe

    out = []
    for path in args.files:
        try:
            out.append(describe(path))
        except ScanFileError as e:
            raise CliError(str(e)) from None
    if args.json:
        print(json.dumps(out if len(out) > 1 else out[0], indent=2, default=str))
        return 0
    for d in out:
        print(format_info(d))
    return 0


def format_info(d: dict) -> str:
    g = d.get("geometry", {})
    c = d.get("completeness", {})
    ev = d["events"]
    def shape(v):
        return "x".join(str(x) for x in v) if isinstance(v, list) else str(v)
    lines = [f"{d['path']}: scan {d['scan_id']} — {d['status']} ({d['reason']})",
             f"  scan {shape(g.get('scan_shape'))} positions, {g.get('frames_per_position')} frame(s) each, "
             f"detector {shape(g.get('frame_shape'))} px, {g.get('n_sources')} source(s)",
             f"  events: {ev['n_events']:,} in {ev['n_frames']:,} frames; "
             f"{ev['stored_bytes'] / max(1, ev['n_events']):.2f} bytes/electron on disk; file {d['file_bytes'] / 1e6:.1f} MB"]
    if "n_missing" in c or "n_duplicated" in c:
        lines.append(f"  completeness: {c.get('n_missing', 0):,} missing, {c.get('n_duplicated', 0):,} duplicated frames")
    lines.append("  results:")
    for name, r in d["results"].items():
        lines.append(f"    {name:<24} {r.get('kind', ''):<5} {str(r['shape']):<14} {r['dtype']:<8} {r.get('unit', '')}")
    md = d.get("metadata", {})
    if md:
        lines.append("  metadata: " + ", ".join(f"{k}={v}" for k, v in md.items() if not isinstance(v, dict)))
    return "\n".join(lines)


# ---------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    from sim_detector.cli import add_simulate_args

    from .demo import add_demo_args

    parser = Parser(prog="stemstream", description="Real-time processing of electron-counted 4D-STEM data.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    p = sub.add_parser("simulate", help="emulate a counting detector and publish its frames",
                       description="Emulate an electron-counting 4D-STEM detector (the NCEM 4D Camera by "
                       "default) scanning a specimen, and publish the counted frames over ZeroMQ.")
    add_simulate_args(p)
    p = sub.add_parser("process", help="process every scan that arrives, until stopped",
                       description="Receive frames from the given sources on a dask cluster and write one "
                       "HDF5 file (plus PNG previews) per scan.")
    add_process_args(p)
    p = sub.add_parser("demo", help="emulator + local cluster + processing of one scan, end to end",
                       description="Start a local cluster, the emulator and the processing; stream one scan; "
                       "write its results and print where they are.")
    add_demo_args(p)
    p = sub.add_parser("info", help="describe scan files", description="Describe stemstream scan files.")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _interrupt(*_):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError

    argv = _fix_negative_values(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # a batch system's stop ends as cleanly as Ctrl-C
    try:
        if args.command == "simulate":
            from sim_detector.cli import run_simulate
            return run_simulate(args)
        if args.command == "process":
            return cmd_process(args)
        if args.command == "demo":
            from .demo import run_demo
            return run_demo(args)
        return cmd_info(args)
    except (CliError, ConfigError) as e:
        print(f"stemstream {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stemstream {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `stemstream info FILE | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
