"""The viewer attached to a session running in another process (``stemstream view``).

:class:`AttachedSession` offers the read side of a :class:`stream.session.Session` that the
feed (feed.py) uses, from what a running session makes available to others:

- the scan receiving now, its progress and partial images: the session's live results channel
  (``process --publish tcp://HOST:PORT``, docs/PROTOCOL.md), subscribed to;
- the finished scans: their files in the session's output directory (``--out``), found when
  they appear (and the ``done`` messages of the live channel);
- drawn apertures: on the session's dask cluster (``--scheduler``), where the events are — the
  receivers of the open scan (their name comes with the live messages), the workers reading a
  scan file. Without ``--scheduler`` a finished scan's file is read by this process, and the
  running scan cannot be drawn on.

    stemstream view --subscribe tcp://127.0.0.1:6100 --out scans/ --scheduler tcp://127.0.0.1:8786
"""

from __future__ import annotations

import logging
import threading
import time
from collections import namedtuple
from pathlib import Path

import numpy as np

from stream.config import ConfigError, PipelineConfig, load_config
from stream.files.recording import open_recording
from stream.files.storage import ScanFileError, open_scan
from stream.security import SecurityError, as_client, viewer_keys
from stream.session import adhoc
from stream.session.finalize import ScanResult
from stream.session.offline import apply_to_range
from stream.transport import control
from stream.transport.links import LinkWatch
from stream.transport.protocol import Geometry, ProtocolError
from stream.viewer.feed import read_stage_outputs

log = logging.getLogger("stemstream.viewer")
STALE_S = 30.0  # a scan with no live message for this long is shown as closing
Stage = namedtuple("Stage", "name status headline")


class AttachedSession:
    """What the viewer reads of a session in another process (module docstring).

    subscribe: the session's live channel (``tcp://HOST:PORT`` of its ``--publish``), or None.
    out: its output directory (scan files), or None. scheduler: its dask scheduler, or None.
    config: a PipelineConfig or pipeline TOML: its ``[detector]`` calibrates the pattern when
    the stream does not; its ``[security]`` says how to reach the session (docs/SECURITY.md):
    the live channel with the key directory's ``viewer`` key (CURVE, unless ``curve = false``),
    a ``tls://`` scheduler with ``tls_ca_file``, ``tls_cert``, ``tls_key``.
    recent: how many of the scan files already in ``out`` are listed at the start (newest).
    client: a dask Client of the session's cluster to use instead of ``scheduler`` (kept open).
    security: a ``distributed.Security`` to join ``scheduler`` with instead of ``[security]``'s
    files (the session's own, in memory, when the session started this viewer).
    """

    def __init__(self, subscribe: str | None = None, out: str | None = None, scheduler: str | None = None,
                 config: str | None = None, recent: int = 32, client=None, security=None):
        if not subscribe and not out:
            raise ConfigError("stemstream view needs the session's --subscribe tcp://HOST:PORT (its "
                              "--publish address) or its --out directory, or both")
        self.config = config if isinstance(config, PipelineConfig) else load_config(config)
        self.out = Path(out) if out else None
        if self.out is not None and not self.out.is_dir():
            raise ConfigError(f"--out {out}: no such directory (the session's --out, where its scan files are)")
        self.connect = [x for x in (subscribe, str(self.out) if self.out else None) if x]
        self._lock = threading.Lock()
        self._live: dict[str, tuple[float, dict, dict]] = {}  # scan id -> (monotonic, header, arrays)
        self._results: dict[str, ScanResult] = {}
        self._seen: dict[str, float] = {}  # file path -> mtime when read (or failed)
        self._stages: dict[str, tuple[float, list | None]] = {}
        self._rejects: dict[str, int] = {}
        self._bad_messages = 0
        self.refused: str | None = None  # why the live channel's handshake failed (a wrong key), if it did
        self._stop = threading.Event()
        self._client, self._own_client = client, client is None
        if scheduler and client is None:
            from distributed import Client

            from stream.security.tls import client_security
            sec = self.config.security
            try:
                self._client = Client(scheduler, timeout=30, security=security or client_security(
                    scheduler, sec.tls_ca_file, sec.tls_cert, sec.tls_key))
            except SecurityError as e:
                raise ConfigError(str(e)) from None
            except OSError as e:
                raise ConfigError(f"--scheduler {scheduler}: cannot connect ({e}); give the address "
                                  "the session's cluster listens on") from None
        if self.out is not None:
            self._scan_dir(recent)
        self._live_keys = None
        if subscribe and self.config.security.curve:  # the live channel is a CURVE server (docs/SECURITY.md)
            try:
                self._live_keys = viewer_keys(self.config.security.keys or None)
            except SecurityError as e:
                raise ConfigError(str(e)) from None
        self._threads = []
        if subscribe:
            self._threads.append(threading.Thread(target=self._subscribe, args=(subscribe,), daemon=True,
                                                  name="stemstream-view-sub"))
        if self.out is not None:
            self._threads.append(threading.Thread(target=self._watch, daemon=True, name="stemstream-view-dir"))
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------ what the feed reads
    @property
    def results(self) -> dict[str, ScanResult]:
        with self._lock:
            return dict(self._results)

    def status(self) -> list[dict]:
        now = time.monotonic()
        with self._lock:
            return [{"scan_id": sid, "state": "receiving" if now - t < STALE_S else "closing",
                     "frames_received": int(h.get("frames_received", 0)), "n_frames": int(h.get("n_frames", 0)),
                     "events": int(h.get("events", 0)), "missing_so_far": int(h.get("missing_so_far", 0)),
                     "duplicates": int(h.get("duplicates", 0))}
                    for sid, (t, h, _) in self._live.items() if sid not in self._results]

    def rejects(self) -> dict[str, int]:
        with self._lock:
            out = dict(self._rejects)
        if self._bad_messages:
            out["bad_live_message (viewer)"] = self._bad_messages
        return out

    def scan_info(self, scan_id: str):
        with self._lock:
            hit = self._live.get(scan_id)
        if hit is None or not hit[1].get("geometry"):
            return None
        h = hit[1]
        try:
            g = Geometry.from_wire(h["geometry"])
        except (ProtocolError, ValueError, TypeError):
            return None
        return "receiving", g, ({"scan_step_A": h["scan_step_A"]} if h.get("scan_step_A") else {})

    def live(self, scan_id: str) -> dict:
        """The newest snapshot's arrays (read-only), those of the display variant included
        (``received_positions``, ``dose_block``: stream/session/live_view.py)."""
        with self._lock:
            hit = self._live.get(scan_id)
        return {} if hit is None else dict(hit[2])

    def stage_reports(self, scan_id: str) -> list | None:
        """The stages recorded in a finished scan's file (/stages), re-read when it changes."""
        r = self.results.get(scan_id)
        if r is None or r.path is None:
            return None
        path = str(r.path)
        try:
            mtime = Path(path).stat().st_mtime
        except OSError:
            return None
        hit = self._stages.get(path)
        if hit is not None and hit[0] == mtime:
            return hit[1]
        try:
            _, _, lines = read_stage_outputs(path, None)
        except OSError:
            return None  # a stage is writing it: next time
        reports = [Stage(*_stage_line(x)) for x in lines] or None
        self._stages[path] = (mtime, reports)
        return reports

    def apply(self, scan_id: str, op, timeout: float = 120):
        """``op`` over the scan's events where they are: the receivers (open scan, needs the
        scheduler), the workers reading its file, or this process reading it (no scheduler)."""
        deadline = time.monotonic() + timeout
        while True:
            r = self.results.get(scan_id)
            if r is not None:
                if r.path is None:
                    raise RuntimeError(f"scan {scan_id} has no file: {r.reason}")
                if self._client is not None:
                    return adhoc.on_file(self._client, r.path, op, timeout=timeout)
                return _on_file_here(str(r.path), op)
            with self._lock:
                hit = self._live.get(scan_id)
            if hit is None:
                raise KeyError(f"no scan {scan_id!r} seen by this viewer")
            if self._client is None:
                raise RuntimeError("the scan is still being received: start the viewer with --scheduler "
                                   "(the session's cluster) to draw on it, or wait for its file")
            run = adhoc.on_open_scan(self._client, hit[1].get("receivers", ""), scan_id, op, timeout=timeout)
            if run is not None:
                return run
            if time.monotonic() > deadline:  # closed meanwhile: its file comes next
                raise TimeoutError(f"scan {scan_id} was not written within {timeout:g} s")
            time.sleep(0.2)

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)
        if self._client is not None and self._own_client:
            self._client.close()

    # ------------------------------------------------------------ the live channel
    def _subscribe(self, address: str) -> None:
        import zmq
        ctx = zmq.Context.instance()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 4)  # only the newest snapshots matter
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        as_client(sub, self._live_keys)  # None: plain
        watch = LinkWatch(sub)  # a refused key is otherwise silent: the page would just stay empty
        sub.connect(address)
        try:
            while not self._stop.is_set():
                if watch.poll() or watch.dropped:
                    self.refused = _refusal(watch)
                if not sub.poll(200):
                    continue
                # what queued while the last picture was made: every 'done', but of each scan's
                # live images only the newest (a 1024² scan's are 78 MB, twice a second)
                batch, newest = [], {}
                while len(batch) < 64:
                    try:
                        parts = sub.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    try:
                        header, arrays = control.decode(parts)
                    except Exception as e:  # noqa: BLE001 - a bad message is counted and skipped
                        self._bad_messages += 1
                        log.warning("viewer: skipped a live message it cannot read: %s", e)
                        continue
                    if header.get("kind") == "live":
                        newest[str(header.get("scan_id"))] = len(batch)
                    batch.append((header, arrays))
                for i, (header, arrays) in enumerate(batch):
                    if header.get("kind") == "live" and newest.get(str(header.get("scan_id"))) != i:
                        continue  # superseded by a newer picture of the same scan
                    try:
                        self._on_message(header, arrays)
                    except Exception as e:  # noqa: BLE001 - a bad message is counted and skipped
                        self._bad_messages += 1
                        log.warning("viewer: skipped a live message it cannot read: %s", e)
        finally:
            watch.close()
            sub.close(0)

    def _on_message(self, h: dict, arrays: dict) -> None:
        sid, kind = str(h["scan_id"]), h.get("kind")
        if kind == "live":
            with self._lock:
                # the arrays stay the received message's buffers (read-only): nothing here writes
                # them, and a 1024² snapshot at every position is 78 MB to copy
                self._live[sid] = (time.monotonic(), h, arrays)
                # a scan id used again (a file of that name was already in --out): the running
                # scan is shown, not the old file, until its own 'done'
                self._results.pop(sid, None)
                self._rejects = {str(k): int(v) for k, v in (h.get("rejects") or {}).items()}
        elif kind == "done":
            path = h.get("path")
            if path and path != "None" and Path(path).is_file():
                self._read_file(Path(path))
            else:
                with self._lock:
                    self._results[sid] = ScanResult(sid, None, str(h.get("status")), str(h.get("reason", "")),
                                                    int(h.get("n_frames", 0)), int(h.get("frames_received", 0)),
                                                    events=int(h.get("events", 0)))
            with self._lock:
                self._live.pop(sid, None)

    # ------------------------------------------------------------ the output directory
    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            self._scan_dir(None)

    def _scan_dir(self, recent: int | None) -> None:
        try:
            files = sorted(self.out.glob("*.h5"), key=lambda p: p.stat().st_mtime)
        except OSError:
            return
        for p in files[-recent:] if recent else files:
            try:
                mtime = p.stat().st_mtime
            except OSError:
                continue
            if str(p) in self._seen:
                continue
            self._seen[str(p)] = mtime
            self._read_file(p)

    def _read_file(self, path: Path) -> None:
        """A finished scan from its file's attributes (results and images are read by the feed)."""
        try:
            with open_scan(path) as f:
                attrs = {k: f.attrs.get(k) for k in ("scan_id", "status", "reason")}
                comp = read_attrs_only(f["completeness"]) if "completeness" in f else {}
                geometry = read_attrs_only(f["geometry"])
                n_stored = int(f["events/offsets"].shape[0] - 1)
                n_events = int(f["events"].attrs["n_events"])
        except (ScanFileError, OSError, KeyError, ValueError):
            return  # not a stemstream scan file (a stage's output, an export...), or being written
        sid = str(attrs["scan_id"] or path.stem)
        n_frames = int(np.prod(geometry.get("scan_shape", [0, 0]))) * int(geometry.get("frames_per_position", 1))
        r = ScanResult(sid, path, str(attrs["status"]), str(attrs["reason"]), n_frames=n_frames,
                       frames_received=int(comp.get("n_frames_received", n_stored)),
                       n_missing=int(comp.get("n_missing", 0)), n_duplicated=int(comp.get("n_duplicated", 0)),
                       events=n_events)
        with self._lock:
            self._results.pop(sid, None)  # newest last
            self._results[sid] = r
            self._seen[str(path)] = path.stat().st_mtime


def _refusal(watch: LinkWatch) -> str | None:
    """Why the live channel's handshake fails, when it does: a CURVE server that does not know
    this viewer's key refuses it, and one whose key is not the one this viewer expects cannot
    read its hello and drops the connection (ZeroMQ then retries for ever, silently)."""
    if watch.connected:
        return None
    if watch.failed:
        return next(iter(watch.failed.values()))
    if watch.dropped:
        return "the connection was dropped in the handshake"
    return None


def read_attrs_only(group) -> dict:
    """A group's attributes as plain values (its datasets are not read)."""
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v.item() if isinstance(v, np.generic) else v)
            for k, v in group.attrs.items()}


def _stage_line(line: str) -> tuple[str, str, str]:
    """(name, status, headline) of a line of read_stage_outputs."""
    head, _, rest = line.partition(": ")
    name, _, status = head.partition(" ")
    return name, status or "ok", rest


def _on_file_here(path: str, op) -> adhoc.AdhocRun:
    """``op`` over a scan file in this process (an attached viewer without a scheduler)."""
    t0 = time.perf_counter()
    state, frames, events = apply_to_range(path, None, 0, open_recording(path).n_stored, op)
    return adhoc.AdhocRun(state, path, frames, events, 0, time.perf_counter() - t0)


# ------------------------------------------------------------------ the command

def add_view_args(p) -> None:
    """``stemstream view``: the viewer of a session running elsewhere, or of a directory."""
    from stream.viewer.server import DEFAULT_PORT, TOKEN_ENV
    p.add_argument("--subscribe", metavar="tcp://HOST:PORT",
                   help="the session's live results channel (its --publish address)")
    p.add_argument("--out", metavar="DIR", help="the session's output directory (its scan files)")
    p.add_argument("--scheduler", metavar="tcp://HOST:PORT",
                   help="the session's dask scheduler: drawn apertures run on its workers")
    p.add_argument("--config", metavar="FILE",
                   help="pipeline TOML (its [detector] calibration, its [security] keys and TLS files)")
    p.add_argument("--view", metavar="HOST:PORT", default=f"127.0.0.1:{DEFAULT_PORT}",
                   help=f"where to serve the page (default 127.0.0.1:{DEFAULT_PORT}); any other host than "
                        f"loopback needs the token printed with the URL (or ${TOKEN_ENV})")


def run_view(args, config=None) -> int:
    """``stemstream view``; ``config``: the PipelineConfig (else ``--config``) with the
    command line's security flags applied."""
    from stream.viewer.feed import SessionFeed
    from stream.viewer.server import ViewerError, ViewerServer

    attached = AttachedSession(args.subscribe, args.out, args.scheduler, config or args.config)
    try:
        save = (attached.out or Path(".")) / "viewer"
        server = ViewerServer(SessionFeed(attached), args.view, save_dir=save,
                              title=f"stemstream — {', '.join(attached.connect)}").start()
    except ViewerError as e:
        attached.close()
        raise ConfigError(str(e)) from None
    print(f"viewer: {server.url}", flush=True)
    where = "on the session's cluster" if args.scheduler else \
        "in this process for written scans (give --scheduler to draw on the running scan)"
    print(f"view: {', '.join(attached.connect)}; drawn apertures computed {where}; drawn files go to "
          f"{save}/; Ctrl-C to stop", flush=True)
    try:
        while True:
            time.sleep(0.5)
            if attached.refused:
                raise ConfigError(refused_message(args.subscribe, attached.refused, attached.config))
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        attached.close()
    return 0


def refused_message(subscribe: str, why: str, config) -> str:
    """One line: the session's live channel refused this viewer, and what to do."""
    from stream.security.keys import key_dir
    keys = key_dir(config.security.keys or None)
    return (f"the session's live channel {subscribe} refused this viewer ({why}): give --curve-keys DIR of "
            f"the session's key directory, or add this viewer's public key ({keys}/viewer.key) to the "
            "session's [security] live_clients")
