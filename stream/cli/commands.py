"""The ``stemstream`` command: simulate, process, demo, info, replay, process-file, export,
import-stempy, analyze, tomo, atoms, calibrate, keys, pending.

Errors a user can cause print one line naming the problem and the fix, and exit with code 2.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
import time
from pathlib import Path


class CliError(Exception):
    """A user error: printed as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        if args is not None:
            args = _values_not_options(list(args))
        return super().parse_known_args(args, namespace)


_KEY_OPTIONS = ("--curve-server-key", "--curve-client-key")


def _values_not_options(argv: list[str]) -> list[str]:
    """Let ``--tilts -60:60:3`` and a Z85 key that starts with '-' work: argparse would take
    either for an option."""
    out, i = [], 0
    while i < len(argv):
        nxt = argv[i + 1] if i + 1 < len(argv) else ""
        if nxt[:1] == "-" and ((argv[i] == "--tilts" and nxt[1:2].isdigit())
                               or (argv[i] in _KEY_OPTIONS and len(nxt) == 40)):
            out.append(f"{argv[i]}={nxt}")
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
    p.add_argument("--fallback-dir", metavar="DIR",
                   help="where scan files go when --out cannot be written (they move to --out later; "
                        "default: [output] fallback_dir, else they are held by the workers)")
    from stream.viewer.server import add_view_arg
    add_view_arg(p)
    g = p.add_argument_group("a real detector (docs/DECTRIS.md, docs/MERLIN.md)")
    g.add_argument("--detector", choices=("stemstream", "dectris", "merlin"),
                   help="what sends the frames: the stemstream/1 protocol (default), a DECTRIS "
                        "SIMPLON DCU (ARINA, QUADRO) or a Quantum Detectors Merlin; for Merlin "
                        "--connect is its data port (tcp://HOST:6342), for DECTRIS its stream "
                        "(default: the --dcu host, port 9999)")
    g.add_argument("--dcu", metavar="http://HOST:PORT", help="DECTRIS: the DCU's REST API")
    g.add_argument("--control", metavar="tcp://HOST:PORT", help="Merlin: its control port (6341)")
    g.add_argument("--scan", metavar="NYxNX", help="probe positions of every scan (rows x columns)")
    g.add_argument("--mode", choices=("passive", "active"),
                   help="passive (default): follow the acquisitions someone else starts; active: "
                        "arm (and trigger) --acquisitions scans, then stop")
    g.add_argument("--trigger-mode", metavar="MODE",
                   help="active mode: DECTRIS exte (default; the scan engine triggers), exts, inte, "
                        "ints (we trigger); Merlin soft (default; we trigger) or external")
    g.add_argument("--acquisitions", type=int, default=1, metavar="N",
                   help="active mode: scans to acquire one after the other (default 1)")
    g = p.add_argument_group("security (docs/SECURITY.md)")
    g.add_argument("--curve-keys", metavar="DIR",
                   help="key directory (default ~/.config/stemstream/keys, created on first use): the "
                        "receivers present its receiver key and expect its source key from every source")
    g.add_argument("--curve-server-key", metavar="KEY",
                   help="the sources' public key (40 Z85 characters or a .key file), if not the key "
                        "directory's source key")
    g.add_argument("--insecure-source", action="append", metavar="tcp://HOST:PORT",
                   help="also receive from this source without authentication or encryption (a detector "
                        "that cannot do CURVE, on a private network; expanded by --sources); repeat")
    add_tls_args(g)


def add_tls_args(g) -> None:
    g.add_argument("--tls-ca-file", metavar="PEM", help="joining a tls:// --scheduler: the CA certificate")
    g.add_argument("--tls-cert", metavar="PEM", help="joining a tls:// --scheduler: this client's certificate")
    g.add_argument("--tls-key", metavar="PEM", help="joining a tls:// --scheduler: the certificate's key")


def security_from_args(cfg, args):
    """The configuration with the security flags of ``args`` applied."""
    from dataclasses import replace

    changes = {k: getattr(args, a) for k, a in (("tls_ca_file", "tls_ca_file"), ("tls_cert", "tls_cert"),
                                                 ("tls_key", "tls_key"), ("keys", "curve_keys"),
                                                 ("source_key", "curve_server_key"))
               if getattr(args, a, None)}
    return replace(cfg, security=replace(cfg.security, **changes)) if changes else cfg


def detector_from_args(cfg, args):
    """The configuration with the detector flags applied over ``[detector]``."""
    from dataclasses import replace

    if not getattr(args, "detector", None) and cfg.detector.kind == "stemstream":
        for flag in ("dcu", "control", "scan", "mode", "trigger_mode"):
            if getattr(args, flag, None):
                raise CliError(f"--{flag.replace('_', '-')} needs --detector dectris or merlin")
        return cfg
    d = cfg.detector
    changes = {"kind": args.detector or d.kind}
    if args.scan:
        try:
            ny, nx = (int(v) for v in args.scan.lower().split("x"))
        except ValueError:
            raise CliError(f"--scan {args.scan!r} is not ROWSxCOLUMNS, e.g. 256x256") from None
        changes["scan"] = [ny, nx]
    for flag in ("dcu", "control", "mode", "trigger_mode"):
        if getattr(args, flag):
            changes[flag] = getattr(args, flag)
    if args.connect:
        if len(args.connect) > 1 or args.sources != 1:
            raise CliError("a DECTRIS or Merlin detector has one data address: give --connect once")
        changes["data"] = args.connect[0]
    if args.acquisitions < 1:
        raise CliError("--acquisitions must be at least 1")
    return replace(cfg, detector=replace(d, **changes))


def session_from_args(args, **overrides):
    from dataclasses import replace

    from stream.config import ConfigError, load_config
    from stream.session import Session, expand_sources

    try:
        cfg = security_from_args(load_config(args.config), args)
    except ConfigError as e:
        raise CliError(str(e)) from None
    if hasattr(args, "detector"):
        cfg = detector_from_args(cfg, args)
    if args.timeout is not None:
        if args.timeout <= 0:
            raise CliError("--timeout must be > 0 seconds")
        cfg = replace(cfg, scan=replace(cfg.scan, timeout_s=args.timeout))
    if args.live_rate is not None or args.publish:
        cfg = replace(cfg, live=replace(cfg.live, rate_hz=cfg.live.rate_hz if args.live_rate is None
                                        else args.live_rate, publish=args.publish or cfg.live.publish))
    if getattr(args, "fallback_dir", None):
        cfg = replace(cfg, output=replace(cfg.output, fallback_dir=args.fallback_dir))
    if args.workers is not None and args.workers < 1:
        raise CliError("--workers must be at least 1")
    try:
        plain = expand_sources(args.insecure_source or [], args.sources)
        default = [] if plain else ["tcp://127.0.0.1:6001"]
        connect = expand_sources(args.connect or default, args.sources) + plain
    except ValueError as e:
        raise CliError(str(e)) from None
    if plain:
        cfg = replace(cfg, security=replace(cfg.security, plain_sources=[*cfg.security.plain_sources, *plain]))
    return Session(connect, out=args.out, config=cfg, scheduler=args.scheduler,
                   workers=args.workers, view=args.view, **overrides)


TERM_WAIT_S = 10.0  # stopped by a batch system: how long held scans are retried before rescue


def cmd_process(args) -> int:
    from stream.sources.base import DetectorError

    session = session_from_args(args)
    try:
        session.start()
        try:
            if session.config.detector.mode == "active" and session.detector is not None:
                failed = sum(session.acquire().status != "complete" for _ in range(args.acquisitions))
                return 1 if failed else 0
            session.console.say("processing every scan that arrives; Ctrl-C to stop")
            while True:
                session.wait(timeout=None)
        except KeyboardInterrupt:
            session.interrupt()  # the scan files are finished; previews not drawn yet are not
            session.console.say("stopping")
        finally:  # a batch system's SIGTERM is followed by SIGKILL: do not wait for a person then
            session.close(wait_held_s=TERM_WAIT_S if _TERMINATED else None)
    except DetectorError as e:
        raise CliError(str(e)) from None
    return 0


# ---------------------------------------------------------------- info

def cmd_info(args) -> int:
    from stream.files.storage import ScanFileError, describe
    from stream.stages.runner import read_dose_advice

    out = []
    for path in args.files:
        try:
            out.append(describe(path))
        except ScanFileError as e:
            raise CliError(str(e)) from None
        advice = read_dose_advice(path)  # what the scan's dose can measure, from its 2D stages
        if advice:
            out[-1]["dose_advice"] = {k: (v.item() if hasattr(v, "item") else v) for k, v in advice.items()}
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
    ct = d.get("counting")
    if ct:
        lines.append(f"  counting: background {ct['background_threshold']:.3f} ADU, x-ray {ct['xray_threshold']:.1f} ADU "
                     f"({ct.get('thresholds_source', '?')}); {ct['frames_counted']:,} frame parts counted into "
                     f"{ct['events']:,} events, {ct['xray_pixels']:,} X-ray pixels rejected")
    lines.append("  results:")
    for name, r in d["results"].items():
        lines.append(f"    {name:<24} {r.get('kind', ''):<5} {str(r['shape']):<14} {r['dtype']:<8} {r.get('unit', '')}")
    adv = d.get("dose_advice")
    if adv:
        lines.append(f"  dose advice (stage {adv['stage']}): " + "\n    ".join(adv["lines"]))
    stages = d.get("stages", {})
    if stages:
        lines.append("  stages (/stages; stemstream info --json for their values and arrays):")
    for name, st in stages.items():
        seconds = f" in {st['seconds']:.1f} s" if isinstance(st.get("seconds"), (int, float)) else ""
        what = st.get("headline") if st.get("status") == "ok" else st.get("error")
        lines.append(f"    {name:<10} {st.get('status', '?')}{seconds}: {what or ''}")
        tables = ", ".join(f"{t} ({v['rows']:,} rows)" for t, v in st.get("tables", {}).items())
        if tables:
            lines.append(f"    {'':<10} tables: {tables}; {len(st.get('arrays', {}))} arrays")
    md = d.get("metadata", {})
    if md:
        lines.append("  metadata: " + ", ".join(f"{k}={v}" for k, v in md.items() if not isinstance(v, dict)))
    return "\n".join(lines)


# ---------------------------------------------------------------- recorded scans

def add_process_file_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", metavar="FILE", help="stemstream scan files or stempy sparse files (v3)")
    p.add_argument("--config", metavar="pipeline.toml", help="pipeline configuration (docs/CONFIG.md)")
    p.add_argument("--out", metavar="DIR", help="where the new scan files and previews go (default: [output] dir, 'out')")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="use a running dask scheduler instead of a local cluster (its workers must "
                        "see the files at the same paths)")
    p.add_argument("--workers", type=int, metavar="N", help="worker processes of the local cluster (default 2)")
    p.add_argument("--flyback", type=int, metavar="N",
                   help="stempy files: flyback columns at the end of every row (default: from the "
                        "file's metadata, else 0)")
    add_tls_args(p.add_argument_group("security (docs/SECURITY.md)"))


def cmd_process_file(args) -> int:
    from dataclasses import replace

    from stream.session import cluster
    from stream.config import ConfigError, load_config, validate
    from stream.session.offline import process_file
    from stream.session.coordinator import scan_previews
    from stream.files.previews import plural
    from stream.files.recording import open_recording
    from stream.files.storage import ScanFileError

    try:
        cfg = security_from_args(load_config(args.config), args)
    except ConfigError as e:
        raise CliError(str(e)) from None
    if args.workers is not None and args.workers < 1:
        raise CliError("--workers must be at least 1")
    cfg = replace(cfg, output=replace(cfg.output, dir=args.out or cfg.output.dir),
                  cluster=replace(cfg.cluster, scheduler=args.scheduler or cfg.cluster.scheduler,
                                  workers=args.workers or cfg.cluster.workers))
    cfg = validate(cfg)
    try:  # every file's header before the cluster starts: a bad file is named at once
        for path in args.files:
            open_recording(path, args.flyback)
        Path(cfg.output.dir).mkdir(parents=True, exist_ok=True)
    except ScanFileError as e:
        raise CliError(str(e)) from None
    except OSError as e:
        raise CliError(f"output directory {cfg.output.dir} cannot be created: {e.strerror or e}") from None
    client, local = cluster.connect(cfg.cluster, cfg.security)
    failed = 0
    try:
        n_workers = len(client.scheduler_info()["workers"])
        print(f"process-file: {plural(len(args.files), 'file')} on {plural(n_workers, 'worker')}; writing to "
              f"{cfg.output.dir}", flush=True)
        for path in args.files:
            t0 = time.perf_counter()
            try:
                r = process_file(path, cfg, client, args.flyback, progress=_range_progress(path))
            except (ScanFileError, ConfigError, OSError) as e:  # this file; the others still go
                print(f"stemstream process-file: error: {e}", file=sys.stderr, flush=True)
                failed += 1
                continue
            dt = time.perf_counter() - t0
            if cfg.output.previews:
                scan_previews(r, cfg)
            print(f"[{r.scan_id}] {path} -> {r.path}: {r.n_frames:,} frames, {r.events / 1e6:.2f} M e- in "
                  f"{dt:.2f} s ({rate_text(r.n_frames, dt)}); results: {', '.join(r.results)}", flush=True)
            if r.n_missing:
                print(f"WARNING [{r.scan_id}] the recording misses {r.n_missing:,} frames (see /completeness)",
                      flush=True)
            failed += print_stage_reports(r.scan_id, r.stages)
    finally:
        client.close()
        if local is not None:
            local.close()
    return 2 if failed else 0


def rate_text(n_frames: int, seconds: float) -> str:
    """'87.0 kframes/s', '1,250 frames/s', '12 frames/s': enough digits at every rate."""
    rate = n_frames / seconds if seconds > 0 else float("inf")
    if rate >= 1e4:
        return f"{rate / 1e3:,.0f} kframes/s"
    return f"{rate / 1e3:.1f} kframes/s" if rate >= 1e3 else f"{rate:,.0f} frames/s"


def _range_progress(path):
    last = [time.monotonic()]

    def progress(done, total):
        now = time.monotonic()
        if now - last[0] >= 1.0 and done < total:
            last[0] = now
            print(f"  {path}: {done}/{total} frame ranges processed", flush=True)
    return progress


def print_stage_reports(scan_id: str, reports) -> int:
    """Print one line per stage; the number that did not succeed."""
    for rep in reports:
        if rep.status == "ok":
            print(f"[{scan_id}] stage {rep.name}: {rep.headline} ({rep.seconds:.1f} s)", flush=True)
        else:
            print(f"ERROR [{scan_id}] stage {rep.name} {rep.status}: {rep.error}", file=sys.stderr, flush=True)
    return sum(rep.status != "ok" for rep in reports)


def add_analyze_args(p: argparse.ArgumentParser) -> None:
    from stream.stages.runner import STAGES

    p.add_argument("files", nargs="+", metavar="FILE", help="stemstream scan files")
    p.add_argument("--stage", action="append", metavar="NAME",
                   help=f"a stage to run ({', '.join(STAGES)}); repeat for several "
                        "(default: [stages] run of --config)")
    p.add_argument("--config", metavar="pipeline.toml", help="stage parameters ([stages.NAME], docs/CONFIG.md)")
    p.add_argument("--no-previews", action="store_true", help="write no PNG previews (tables still go to CSV)")


def cmd_analyze(args) -> int:
    from stream.config import ConfigError, load_config
    from stream.stages.runner import run_stages
    from stream.files.storage import ScanFileError, open_scan

    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        raise CliError(str(e)) from None
    run = args.stage or cfg.stages.run
    if not run:
        raise CliError("no stage to run: give --stage NAME or a --config with [stages] run = [...]")
    failed = 0
    for path in args.files:
        try:
            open_scan(path).close()
            reports = run_stages(path, run, cfg.stages.params, previews=not args.no_previews)
        except (ScanFileError, ValueError, OSError) as e:
            raise CliError(str(e)) from None
        failed += print_stage_reports(Path(path).stem, reports)
    return 1 if failed else 0


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="a stemstream scan file (or a stempy file, for libertem-csr / npy)")
    p.add_argument("out", metavar="OUT", help="output: .h5 (stempy), .toml (libertem-csr) or .npy")
    p.add_argument("--format", required=True, choices=("stempy", "libertem-csr", "npy"),
                   help="stempy: sparse HDF5 v3; libertem-csr: LiberTEM raw CSR (TOML + raw files); "
                        "npy: a dense block of --region")
    p.add_argument("--region", metavar="Y0:Y1,X0:X1", help="npy: scan rows and columns to export, end exclusive")
    p.add_argument("--flyback", type=int, metavar="N", help="stempy input: flyback columns per row (default 0)")


def cmd_export(args) -> int:
    from stream.files.interop import ExportError, export, libertem_raw_files
    from stream.files.storage import ScanFileError

    try:
        t0 = time.perf_counter()
        out = export(args.file, args.format, args.out, args.region, args.flyback)
    except (ExportError, ScanFileError) as e:
        raise CliError(str(e)) from None
    files = [out] + (list(libertem_raw_files(out).values()) if args.format == "libertem-csr" else [])
    also = f" and {len(files) - 1} raw files beside it" if len(files) > 1 else ""
    print(f"export: {args.file} -> {out}{also} ({args.format}, {_size(sum(f.stat().st_size for f in files))}, "
          f"{time.perf_counter() - t0:.1f} s)")
    return 0


def _size(n_bytes: int) -> str:
    """'33.9 MB', '412 kB', '870 bytes'."""
    if n_bytes >= 1e6:
        return f"{n_bytes / 1e6:.1f} MB"
    return f"{n_bytes / 1e3:.0f} kB" if n_bytes >= 1e3 else f"{n_bytes} bytes"


def cmd_import_stempy(args) -> int:
    from stream.files.interop import ExportError, import_stempy
    from stream.files.storage import ScanFileError

    try:
        t0 = time.perf_counter()
        out = import_stempy(args.file, args.out, args.flyback)
    except (ExportError, ScanFileError) as e:
        raise CliError(str(e)) from None
    print(f"import-stempy: {args.file} -> {out} ({_size(out.stat().st_size)}, "
          f"{time.perf_counter() - t0:.1f} s); 'stemstream process-file {out}' makes its images")
    return 0


# ---------------------------------------------------------------- keys

def add_keys_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", metavar="DIR", help="key directory (default ~/.config/stemstream/keys)")
    p.add_argument("--tls", metavar="DIR",
                   help="instead: write a CA certificate, a certificate and its key (ca.pem, cert.pem, "
                        "key.pem) for a dask cluster started by hand (dask scheduler --tls-...)")
    p.epilog = ("Copy NAME.key (public) files to the peers that must accept a key; never copy a "
                "NAME.key_secret. See docs/SECURITY.md.")


def cmd_keys(args) -> int:
    from stream.security import ROLES, SecurityError, ensure_keys, key_dir
    from stream.security.tls import write_tls_files

    try:
        if args.tls:
            files = write_tls_files(args.tls)
            print(f"TLS files for a dask cluster in {Path(args.tls).resolve()}:")
            for name, path in files.items():
                print(f"  {name:<5} {path}")
            print(f"  dask scheduler --tls-ca-file {files['ca']} --tls-cert {files['cert']} --tls-key {files['key']}"
                  " --protocol tls ...; the same three flags for dask worker and stemstream process")
            return 0
        directory = key_dir(args.dir)
        kps = ensure_keys(directory)
    except SecurityError as e:
        raise CliError(str(e)) from None
    print(f"key directory: {directory} (secret keys readable by you only)")
    for role, what in ROLES.items():
        print(f"  {role:<9} {kps[role].public.decode()}  {directory / role}.key  ({what})")
    return 0


# ---------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    from sim_detector.cli import add_simulate_args

    from stream.cli.calibrate import add_calibrate_args
    from stream.stages.atoms import add_atoms_args
    from stream.cli.demo import add_demo_args
    from stream.cli.pending import add_pending_args
    from stream.files.replay import add_replay_args
    from stream.stages.tomo import add_tomo_args

    def add_info_args(p):
        p.add_argument("files", nargs="+", metavar="FILE")
        p.add_argument("--json", action="store_true", help="machine-readable output")

    def add_import_args(p):
        p.add_argument("file", metavar="IN.h5")
        p.add_argument("out", metavar="OUT.h5")
        p.add_argument("--flyback", type=int, metavar="N",
                       help="flyback columns at the end of every row, dropped (default: from metadata, else 0)")

    commands = [  # name, one-line help, description, arguments
        ("simulate", "emulate a counting detector and publish its frames",
         "Emulate an electron-counting 4D-STEM detector (the NCEM 4D Camera by default) scanning a "
         "specimen, and publish the counted frames over ZeroMQ.", add_simulate_args),
        ("process", "process every scan that arrives, until stopped",
         "Receive frames from the given sources on a dask cluster and write one HDF5 file (plus PNG "
         "previews) per scan.", add_process_args),
        ("demo", "emulator + local cluster + processing of one scan, end to end",
         "Start a local cluster, the emulator and the processing; stream one scan; write its results "
         "and print where they are.", add_demo_args),
        ("info", "describe scan files", "Describe stemstream scan files.", add_info_args),
        ("replay", "publish recorded scans again, like the detector",
         "Publish recorded scans (stemstream scan files or stempy sparse files) with the wire protocol, "
         "at the detector's rate or as fast as received.", add_replay_args),
        ("process-file", "run the operators over recorded scans on the cluster",
         "Run the pipeline's operators over recorded scans on a dask cluster (workers read the files "
         "themselves) and write new scan files with the results.", add_process_file_args),
        ("export", "write a scan for stempy, LiberTEM or numpy",
         "Export a recorded scan to stempy's sparse HDF5 (v3), LiberTEM's raw CSR dataset, or a dense "
         "numpy block of a region.", add_export_args),
        ("analyze", "run downstream stages (phase, columns, counting, ...) on scan files",
         "Run downstream stages on finished scan files, in this process; results go into each file "
         "under /stages/NAME, previews and CSV tables beside it.", add_analyze_args),
        ("tomo", "reconstruct tilt series from scan files (RESIRE, atom tracing, statistics)",
         "Group scan files by their tilt series (metadata series_id), reconstruct each series, trace "
         "its atoms and compute their statistics; one SERIES-tomo.h5 per series (docs/SERIES.md).",
         add_tomo_args),
        ("atoms", "3D atom statistics of an atomic model file (CSV, XYZ, npy, MATLAB, HDF5)",
         "Per-atom and per-sample statistics (coordination, GCN, bond lengths, strain, order, Voronoi, "
         "motifs, g(r)) of atom positions in Å from any pipeline: CSV and HDF5 tables, PNG histograms "
         "(docs/STAGES_3D_STATS.md).", add_atoms_args),
        ("calibrate", "dark reference and thresholds for counting raw frames, into a counting file",
         "Measure the dark reference (4D Camera raw files, .npy, or a streamed dark scan) and compute "
         "the counting thresholds from sample frames as stempy's calculate_thresholds does (seeded), "
         "or set them by hand; writes the counting file [counting] file reads (docs/COUNTING.md).",
         add_calibrate_args),
        ("pending", "scans a running session could not write yet: list, retry, finish elsewhere",
         "List the scans running sessions hold because their output directory could not be written "
         "(read-only, full, gone), try them again, write one into another directory, or give one up.",
         add_pending_args),
        ("import-stempy", "convert a stempy sparse file into a stemstream scan file",
         "Convert a stempy sparse HDF5 file (version 3) into a stemstream scan file.", add_import_args),
        ("view", "the live viewer in the browser, attached to a running session or a directory",
         "Serve the live viewer (docs/VIEWER.md) for a session running in another process: its live "
         "channel (--subscribe, the session's --publish), its scan files (--out) and its cluster "
         "(--scheduler, where drawn apertures are computed).", _add_view_args),
        ("keys", "create and show the CURVE keys (and TLS files) sources, receivers and viewers use",
         "Create the key directory's keypairs where missing and print their public keys "
         "(docs/SECURITY.md).", add_keys_args),
    ]
    parser = Parser(prog="stemstream", description="Real-time processing of electron-counted 4D-STEM data.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name, help_, description, add_args in commands:
        add_args(sub.add_parser(name, help=help_, description=description))
    return parser


def _add_view_args(p) -> None:
    from stream.viewer.attach import add_view_args
    add_view_args(p)
    g = p.add_argument_group("security (docs/SECURITY.md)")
    g.add_argument("--curve-keys", metavar="DIR",
                   help="key directory (default ~/.config/stemstream/keys): the live channel is joined with "
                        "its viewer key and expected to present its live key")
    add_tls_args(g)


_TERMINATED: list = []  # set by SIGTERM


def _interrupt(*_):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a repeated stop request must not cut the clean-up short
    _TERMINATED.append(True)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    from stream.config import ConfigError

    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    signal.signal(signal.SIGTERM, _interrupt)  # a batch system's stop ends as cleanly as Ctrl-C
    try:
        if args.command == "simulate":
            from sim_detector.cli import run_simulate
            return run_simulate(args)
        if args.command == "process":
            return cmd_process(args)
        if args.command == "demo":
            from stream.cli.demo import run_demo
            return run_demo(args)
        if args.command == "replay":
            from stream.files.replay import run_replay
            return run_replay(args)
        if args.command == "pending":
            from stream.cli.pending import run_pending
            return run_pending(args)
        if args.command == "view":
            from stream.config import load_config
            from stream.viewer.attach import run_view
            return run_view(args, security_from_args(load_config(args.config), args))
        if args.command == "calibrate":
            from stream.cli.calibrate import run_calibrate
            return run_calibrate(args)
        if args.command == "atoms":
            from stream.stages.atoms import run_atoms
            return run_atoms(args)
        if args.command == "tomo":
            from stream.stages.tomo import run_tomo
            return run_tomo(args)
        commands = {"process-file": cmd_process_file, "export": cmd_export, "analyze": cmd_analyze,
                    "import-stempy": cmd_import_stempy, "info": cmd_info, "keys": cmd_keys}
        return commands[args.command](args)
    except (CliError, ConfigError) as e:
        print(f"stemstream {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stemstream {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `stemstream info FILE | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:  # a place the user named cannot be read or written (not our bug: one line)
        if not (e.filename or e.errno in USER_ERRNOS):
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"stemstream {args.command}: error: {where}{os.strerror(e.errno) if e.errno else e}; check the "
              "path, its permissions and the free space", file=sys.stderr)
        return 2


USER_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOENT, errno.EEXIST,
               errno.EISDIR, errno.ENOTDIR}


if __name__ == "__main__":
    sys.exit(main())
