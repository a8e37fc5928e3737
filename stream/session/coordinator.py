"""A processing session: receivers on a dask cluster, the scan coordinator, live results.

    from stream.session import Session

    if __name__ == "__main__":        # the local cluster starts worker processes
        with Session(connect=["tcp://127.0.0.1:6001"], out="out") as s:
            r = s.wait()              # the next scan to finish, as a ScanResult
            r.results["bf"]           # (ny, nx) bright-field image

The session starts a LocalCluster (or joins ``scheduler``), installs a receiver in every
worker, follows each scan from the receivers' reports, and finalizes every closed scan with
tasks on the workers that hold its state. Bulk data never reaches this process.

Its sockets (receivers' reports, the control channel to the receivers, live results) are CURVE
servers that let in only this session's receivers (keys made for this session and handed to
the workers with the plugin) and, on the live channel, the configured viewers
(docs/SECURITY.md).
"""

from __future__ import annotations

import gc
import logging
import queue
import sys
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import dask
import numpy as np
import zmq

from sim_detector.publisher import address_ranges

from stream.security import (ClientKeys, Gatekeeper, ReceiverKeys, SecurityError, as_server, ensure_keys,
                             generate, read_public)
from stream.session import cluster, quiet_gc, stopping
from stream.transport import control
from stream.transport.links import unreached
from stream.transport.protocol import Geometry
from stream.transport.receiver import OVER_BUDGET, TOO_MANY_SCANS
from stream.config import (ConfigError, PipelineConfig, build_operators, calibration, coordinator_state_bytes,
                           detector_regions, load_config, validate)
from stream.session.ask import ControlError, ControlServer
from stream.session.finalize import (SMALL_SCAN_EVENTS, ScanInfo, ScanResult, config_json, drop_staged,
                                     finalize_on_cluster, publish_staged, result_of, written_here)
from stream.session.early import TICK_S, EarlyWriter
from stream.session.live_view import VIEW_MAX_SIDE, VIEW_RATE_HZ, display_snapshot, warm_up
from stream.session.held import BACKOFF_S, NO_WORKER, REMIND_S, HeldScan, MovingFile, loud_lines, rescue_dir
from stream.session.lifecycle import DONE, SILENT_S, ScanStatus, ScanTracker
from stream.files.storage import move_into
from stream.files.previews import write_scan_previews
from stream.stages.series import SeriesCollector
from stream.stages.runner import STAGES, run_stages
from stream.stages.tomo import reconstruct_series
from stream.session.worker import STAGE_EXECUTOR, ReceiverPlugin, close_on_worker, source_command
from stream.session.detector import DetectorLink, detector_workers, source_plan

log = logging.getLogger("stemstream.session")
LIVE_PROTO = "stemstream-live/1"
KEEP_RESULTS = 16  # finished scans whose images Session.results keeps (all keep their summary)
BACKOFF_LAST = BACKOFF_S[-1]
WRITERS = 4  # scans written at once (the threads mostly wait for the workers)
EARLY_SETTLE_S = 5.0  # at a scan's end, the blocks built early are waited for this long before the rest
GONE_AFTER_S = 10.0  # a worker missing from the scheduler's list this long has left
PREVIEW_BACKLOG = 8  # scans whose previews may wait to be drawn; more are skipped
LINK_GRACE_S = 5.0  # after this, sources no receiver could connect to are named on the console
REPORTS, LIVE = "stemstream-reports", "stemstream-live"  # ZAP domains of this process's servers
ANNOUNCE_PERIOD_S = 0.5  # the open scans are announced again this often (receivers that joined late)


def expand_sources(connect: list[str], sources: int = 1) -> list[str]:
    """Check ``tcp://HOST:PORT`` addresses; with ``sources`` N each becomes the N addresses
    PORT … PORT+N−1 (as ``stemstream simulate --sources N`` binds them)."""
    out = []
    for addr in connect:
        parts = urlsplit(addr)
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.scheme != "tcp" or not parts.hostname or port is None:
            raise ValueError(f"--connect {addr!r} must look like tcp://HOST:PORT, e.g. tcp://127.0.0.1:6001")
        if port + sources - 1 > 65535:
            raise ValueError(f"--connect {addr!r} with {sources} sources goes beyond port 65535")
        out += [f"tcp://{parts.hostname}:{port + k}" for k in range(sources)]
    return out


class Console:
    """Progress lines: one per active scan about once a second, and one per finished scan.
    Disabled (``Session(console=False)``), what it would say goes to the ``stemstream.session``
    log instead (no progress lines): warnings and errors (a scan that cannot be written, its
    retries, a stop that waits for them) at their level, the rest at INFO."""

    def __init__(self, enabled: bool = True, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self._last = 0.0
        self._seen: dict[str, tuple[float, int]] = {}  # scan -> (time, frames) at the last line
        self._lock = threading.Lock()  # lines from the coordinator and the main thread never mix

    def say(self, text: str, level: int | None = None, unless: threading.Event | None = None) -> None:
        """One line; ``level``: its log level when the console is disabled (default: from
        its ERROR / WARNING prefix, else INFO). ``unless``: not said once this event is set,
        checked as the line is written (a line said after it was set comes first)."""
        with self._lock:
            if unless is not None and unless.is_set():
                return
            if self.enabled:  # one write: print() writes the text and its newline apart
                self.stream.write(text + "\n")
                self.stream.flush()
                return
            if level is None:
                level = logging.ERROR if text.startswith("ERROR") else \
                    logging.WARNING if text.startswith("WARNING") else logging.INFO
            log.log(level, "%s", text)

    def progress(self, scans: list[ScanStatus]) -> None:
        now = time.time()
        if not self.enabled or now - self._last < 1.0:
            return
        self._last = now
        for st in scans:
            if st.geometry is None:
                continue
            t0, f0 = self._seen.get(st.scan_id, (st.opened, 0))
            rate = (st.frames_received - f0) / max(1e-9, now - t0)  # since the last line
            self._seen[st.scan_id] = (now, st.frames_received)
            waiting = f"  waiting for {st.missing_so_far():,} frames the sources sent" \
                if st.all_ended and st.missing_so_far() > 0 else ""
            self.say(f"[{st.scan_id}] {st.frames_received:>9,}/{st.n_frames:,} frames "
                     f"({100 * st.frames_received / st.n_frames:5.1f}%)  {st.events / 1e6:8.2f} M e-  "
                     f"{rate / 1e3:7.1f} kframes/s  duplicated {st.duplicates:,}  "
                     f"rejected {st.rejects:,}{waiting}")

    def forget(self, scan_id: str) -> None:
        self._seen.pop(scan_id, None)


class Session:
    """Process every scan that arrives from the given sources until closed.

    connect: source addresses the receivers connect to: a list of ``tcp://HOST:PORT`` (or
        one such string).
    sources: each address of ``connect`` stands for this many sources on consecutive ports,
        PORT … PORT+N−1, as ``stemstream simulate --sources N`` binds them (``expand_sources``).
    config: a PipelineConfig or a path to a TOML file; ``out``, ``scheduler`` and ``workers``
        override its [output] dir and [cluster] settings.
    client: an existing distributed.Client to use (the session neither starts nor stops it).
        Two sessions on one cluster must receive from different sources.
    ``wait()`` returns each finished scan's ScanResult with its images; ``results`` keeps the
    images of the last 16 scans only (a session may run for weeks).
    view: ``HOST:PORT`` to serve the live viewer in the browser (docs/VIEWER.md), e.g.
        ``"127.0.0.1:8800"``; any other host than loopback needs ``view_token`` (one is made
        up and printed when not given). ``session.viewer.url`` is its address. With a viewer,
        live images come at least 4 times a second (``[live] rate_hz`` raised to 4 unless 0).
    Raises ConfigError for a configuration or address it cannot use.
    """

    def __init__(self, connect: list[str] | str, out: str | None = None,
                 config: PipelineConfig | str | None = None, scheduler: str | None = None,
                 workers: int | None = None, client=None, console: bool = True, sources: int = 1,
                 view: str | None = None, view_token: str | None = None):
        cfg = config if isinstance(config, PipelineConfig) else load_config(config)
        if out is not None:
            cfg = replace(cfg, output=replace(cfg.output, dir=str(out)))
        if scheduler is not None or workers is not None:
            cfg = replace(cfg, cluster=replace(cfg.cluster, scheduler=scheduler or cfg.cluster.scheduler,
                                               workers=workers or cfg.cluster.workers))
        if view and 0 < cfg.live.rate_hz < VIEW_RATE_HZ:  # someone watches: the page fills in >= 2/s
            cfg = replace(cfg, live=replace(cfg.live, rate_hz=VIEW_RATE_HZ))
        self.config = validate(cfg)
        if isinstance(connect, (str, bytes)):  # one address, not a sequence of characters
            connect = [connect.decode() if isinstance(connect, bytes) else connect]
        self.detector = None  # the DetectorLink of a DECTRIS or Merlin detector (stream/session/detector.py)
        if self.config.detector.kind != "stemstream":  # the detector's own addresses ([detector])
            connect = []
        elif not connect:
            raise ConfigError("no source to connect to: give at least one --connect tcp://HOST:PORT")
        if not isinstance(sources, int) or isinstance(sources, bool) or sources < 1:
            raise ConfigError(f"sources must be a whole number >= 1 (sources per address), got {sources!r}")
        try:
            self.connect = expand_sources(list(connect), sources)
        except (ValueError, AttributeError, TypeError) as e:
            raise ConfigError(f"connect: {e}" if not isinstance(e, ValueError) else str(e)) from None
        self.console = Console(console)
        self._client = client
        self._own_client = client is None
        self._cluster = None
        self._ctx = self._pull = self._pub = None
        self.live_address: str | None = None  # the live results channel (--publish, or the viewer's)
        self._view_pub = None  # the viewer's own live channel (images at the page's size), with view=
        self.view_address: str | None = None  # its address (127.0.0.1, a free port)
        self._tracker = ScanTracker(cfg.scan.timeout_s, announce_grace_s=cfg.limits.announce_grace_s)
        self._control = None  # PUB: announced, closing and dropped scans, to the receivers
        self._gate: Gatekeeper | None = None
        self._refused: OrderedDict[str, str] = OrderedDict()  # scans this session refused -> reason
        self._refusals_warned: set[str] = set()
        self.state_budget = 0  # bytes a scan's bookkeeping may take here (set at start)
        self.coordinator_key: bytes | None = None  # this session's CURVE server key (public half)
        self._results: dict[str, ScanResult] = {}
        self._order: list[str] = []
        self._waited: set[str] = set()
        self._cond = threading.Condition()
        self._live: dict[str, dict[str, dict]] = {}  # scan -> worker -> state arrays
        self._live_ops: dict[str, list] = {}
        self._live_lock = threading.Lock()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()  # PUB messages from other threads
        self._late_warned: set[str] = set()
        self._stop = threading.Event()
        self._interrupted = threading.Event()  # interrupt(): previews not drawn yet are skipped
        self._closed = False
        self._executor = ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="stemstream-finalize")
        self._preview_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stemstream-previews")
        self._previews_waiting = self._previews_skipped = 0
        self._held: dict[str, HeldScan] = {}  # closed scans whose file is not in place yet
        self._moving: dict[str, MovingFile] = {}  # files in the fallback directory, to move
        self._held_lock = threading.Lock()
        self._written: list[tuple[str, str]] = []  # (scan id, path) of the last files written
        self._writing: dict[str, int] = {}  # worker -> files it is writing now
        self._events: queue.SimpleQueue = queue.SimpleQueue()  # from dask's event thread
        self._missing_since: dict[str, float] = {}  # worker -> when the scheduler stopped listing it
        self._pending_ctl: ControlServer | None = None  # answers `stemstream pending` (ipc://)
        self._config_json = config_json(self.config)  # /provenance of every scan file
        self._plugin_name = f"stemstream-receiver-{uuid.uuid4().hex[:8]}"
        self._thread = None
        self._live_thread = None  # publishes live images and 'done' messages (the PUB socket's thread)
        self._live_dirty: set = set()  # scans with live states newer than their last publication
        self._live_active: list = []  # the scans receiving, as the coordinator's last turn saw them
        self._failure: BaseException | None = None
        self._stage_runs: dict[str, object] = {}  # scan id -> future of its stages (last KEEP_RESULTS)
        self.series = SeriesCollector()  # tilt series being collected (stream/stages/series.py)
        self._series_runs: dict[str, object] = {}  # series id -> future of its reconstruction
        self.workers: list[str] = []
        self._view = (view, view_token)
        self.viewer = None  # the browser viewer (stream/viewer/), when ``view`` is given
        self._links: dict[str, dict] = {}  # worker -> its receiver's last links report
        self._links_said: dict[str, str] | None = None  # unreached sources when last told
        self._ever_linked: set[str] = set()  # sources a receiver was connected to at some time
        self._early: EarlyWriter | None = None  # writes the events while scans run ([output] write_while_scanning)

    # -------------------------------------------------------------- start / stop
    def __enter__(self):
        self.start()
        return self

    def __exit__(self, exc_type, *exc):
        # leaving on an error: held scans get a bounded retry, then go to the rescue directory
        self.close(wait_held_s=None if exc_type is None else 30.0)

    def start(self) -> "Session":
        """Start (or join) the cluster, install the receivers, start coordinating."""
        try:
            self._start()
            if self._view[0]:
                from stream.viewer import start_viewer  # the one upward import (pyproject.toml)
                self.viewer = start_viewer(self, *self._view)
        except BaseException:
            self.close()
            raise
        source = self.detector.describe() if self.detector else ", ".join(self.connect)
        self.console.say(f"stemstream: {len(self.workers)} workers receiving from "
                         f"{source}; writing to {self.config.output.dir}")
        self.console.say(f"security: {self.describe_security()}")
        if self.config.counting.enabled:  # what raw frames will be counted with (docs/COUNTING.md)
            c = self.config.counting
            self.console.say(f"counting raw frames: {c.calibration.summary()}; semantics {c.semantics}, "
                             f"row dark {c.row_dark}; thresholds {c.calibration.attrs['thresholds_source']}")
        if self.viewer is not None:
            self.console.say(f"viewer: {self.viewer.url}")
        return self

    def _start(self) -> None:
        out = Path(self.config.output.dir)
        try:  # fail now, not at the end of the first scan
            out.mkdir(parents=True, exist_ok=True)
            (out / ".stemstream-write-test").touch()
            (out / ".stemstream-write-test").unlink()
        except OSError as e:
            raise ConfigError(f"output directory {out} is not writable: {e.strerror or e}") from None
        if self.config.detector.kind != "stemstream":  # its control first: a wrong address fails fast
            self.detector = DetectorLink(self, self.config.detector)
            self.detector.prepare()
        if self._client is None:
            self._client, self._cluster = cluster.connect(self.config.cluster, self.config.security)
        receiver_keys, coordinator_kp, live_kp, viewers = self._session_keys()
        self.coordinator_key = coordinator_kp.public if coordinator_kp else None  # public: no secret
        host = self._control_host()
        self._ctx = zmq.Context()
        if receiver_keys is not None:
            self._gate = Gatekeeper(self._ctx, on_refuse=self._refused_connection)
            self._gate.allow(REPORTS, [receiver_keys.coordinator.keypair.public])
            self._gate.allow(LIVE, viewers)
        self._pull = self._ctx.socket(zmq.PULL)
        self._control = self._ctx.socket(zmq.PUB)
        for sock in (self._pull, self._control):
            if coordinator_kp is not None:
                as_server(sock, coordinator_kp, REPORTS)
        workers = self._client.scheduler_info()["workers"]
        limits = [w.get("memory_limit") or 0 for w in workers.values()]
        self.state_budget = self.config.limits.scan_state_bytes(min(limits) if limits and all(limits) else None)
        self._pull.setsockopt(zmq.MAXMSGSIZE, self.state_budget + 1_000_000)  # a live snapshot at most
        port = self._pull.bind_to_random_port(f"tcp://{host}")
        self.control_address = f"tcp://{host}:{port}"
        self.announce_address = f"tcp://{host}:{self._control.bind_to_random_port(f'tcp://{host}')}"
        if self.config.live.publish:
            self._pub = self._ctx.socket(zmq.PUB)
            if live_kp is not None:
                as_server(self._pub, live_kp, LIVE)
            try:
                self._pub.bind(self.config.live.publish)
                self.live_address = self.config.live.publish
            except zmq.ZMQError as e:
                raise ConfigError(f"cannot bind the live results socket {self.config.live.publish}: "
                                  f"{e.strerror}; choose another --publish address") from None
        if self._view[0]:  # the viewer's process subscribes to its own (stream/viewer/child.py)
            self._view_pub = self._ctx.socket(zmq.PUB)
            if live_kp is not None:
                as_server(self._view_pub, live_kp, LIVE)
            self.view_address = f"tcp://127.0.0.1:{self._view_pub.bind_to_random_port('tcp://127.0.0.1')}"
            self.live_address = self.live_address or self.view_address
        if self._cluster is None:  # a cluster started elsewhere: a batch system stops it with us
            stopping.install(self._client, f"{self._plugin_name}-stop", self.config.cluster.stop_grace_s)
        plan = None
        if self.detector is not None:
            plan = source_plan(self.config.detector, self._client, detector_workers(self._client),
                               curve=receiver_keys is not None,
                               max_message_bytes=self.config.limits.max_message_bytes(self.config.chunking))
            self.detector.set_plan(plan)
        plugin = ReceiverPlugin(self._plugin_name, self.connect, self.control_address, self.config,
                                keys=receiver_keys, announce_address=self.announce_address,
                                source_plan=plan)
        self._client.register_plugin(plugin, name=self._plugin_name)
        if self.config.output.write_while_scanning:
            self._early = EarlyWriter(self._client, self._plugin_name, self.config)
        self.workers = sorted(self._client.scheduler_info()["workers"])
        self._client.subscribe_topic("all", self._on_dask_event)  # workers that join or leave, and why
        threading.Thread(target=self._watch_workers, name="stemstream-workers", daemon=True).start()
        try:
            self._pending_ctl = ControlServer(self._ctx, {"out": str(self.config.output.dir),
                                                      "fallback": self.config.output.fallback_dir,
                                                      "connect": self.connect})
        except (ControlError, zmq.ZMQError, OSError) as e:  # the session still works without it
            self.console.say(f"WARNING: no control socket for 'stemstream pending': {e}")
        quiet_gc.freeze()  # set up (the scheduler too, if it runs here): no full collection walks it again
        self._thread = threading.Thread(target=self._loop, name="stemstream-coordinator", daemon=True)
        self._thread.start()
        if self._pub is not None or self._view_pub is not None:  # the live sockets belong to this thread alone
            self._live_thread = threading.Thread(target=self._live_loop, name="stemstream-live", daemon=True)
            self._live_thread.start()

    def _session_keys(self):
        """(receiver keys, this session's server keypair, the live channel's keypair, the viewer
        keys it accepts), or Nones with ``[security] curve = false``. The receivers get the
        user's receiver key (sources accept it) and a keypair made for this session only, the
        one key the report and control sockets accept."""
        sec = self.config.security
        if not sec.curve:
            return None, None, None, None
        try:
            kd = ensure_keys(sec.keys)
            source = read_public(sec.source_key) if sec.source_key else kd["source"].public
            viewers = {kd["viewer"].public, *(read_public(k) for k in sec.live_clients)}
        except SecurityError as e:
            raise ConfigError(str(e)) from None
        coordinator, report = generate(), generate()
        plain = set(sec.plain_sources)
        sources = {a: None if a in plain else ClientKeys(kd["receiver"], source) for a in self.connect}
        return ReceiverKeys(sources, ClientKeys(report, coordinator.public)), coordinator, kd["live"], viewers

    def _refused_connection(self, domain: str, key: bytes) -> None:
        """Called by the authenticator's thread for a client with a key this session does not know."""
        if domain not in self._refusals_warned:
            self._refusals_warned.add(domain)
            what = "the receivers' report socket" if domain == REPORTS else "the live results channel"
            self.console.say(f"WARNING: refused a connection to {what} from a program without an "
                             f"accepted key ({key.decode(errors='replace')}); see docs/SECURITY.md "
                             "(further refusals are counted, not shown)")

    @property
    def scheduler_address(self) -> str | None:
        """The address of the session's dask scheduler (None before start)."""
        return None if self._client is None else self._client.scheduler.address

    @property
    def scheduler_security(self):
        """The ``distributed.Security`` this session joined its scheduler with (None before start)."""
        return None if self._client is None else self._client.security

    def describe_security(self) -> str:
        """One line: how each channel is protected (for the start message)."""
        sec = self.config.security
        det = self.config.detector
        if not sec.curve:
            chan = "plain ZeroMQ ([security] curve = false): anyone who reaches a port can talk to it"
        elif det.kind != "stemstream":  # its makers' protocol cannot authenticate
            chan = (f"CURVE on every channel stemstream opens; the {det.kind} detector's data "
                    f"{det.data or '(from the DCU)'} is plain: trusted network only")
        else:
            plain = [a for a in self.connect if a in set(sec.plain_sources)]
            chan = "CURVE on every channel" + (f" except the plain sources {', '.join(plain)}" if plain else "")
        dask = "dask over TLS" if self._client.scheduler.address.startswith("tls://") else \
            "dask traffic NOT encrypted (tcp://)"
        return f"{chan}; {dask}"

    def _control_host(self) -> str:
        """The address workers can reach this process at."""
        if self._cluster is not None:
            return "127.0.0.1"
        from distributed.utils import get_ip
        sched = urlsplit(self._client.scheduler.address.replace("tcp://", "http://")).hostname
        return "127.0.0.1" if sched in ("127.0.0.1", "localhost") else get_ip(sched)

    def interrupt(self) -> None:
        """The operator asked to stop (Ctrl-C, SIGTERM): previews not drawn yet are skipped, so
        that ``close()`` waits only for the scan files. Call before ``close()``."""
        self._interrupted.set()

    def close(self, wait_held_s: float | None = None) -> None:
        """Stop receiving. Reports already sent are read first; then scans still receiving
        are closed with what arrived (written as incomplete, reason 'the session stopped');
        scans already closing are finished first. A scan whose file cannot be written is
        tried again while the console says so, for ``wait_held_s`` seconds (None: until it is
        written, or the session is interrupted again, e.g. a second Ctrl-C); whatever is
        still held then is written to ~/stemstream-rescued, or named as lost."""
        if self.viewer is not None:
            self.viewer.close()
        if self._thread is not None and self._thread.is_alive():
            self._stop.set()
            self._thread.join(30)
        if self._live_thread is not None:
            self._stop.set()
            self._live_thread.join(30)
        if self._pull is not None and not (self._thread and self._thread.is_alive()):
            self._drain_reports()  # this thread owns the sockets from here on
            for st in self._tracker.due():
                self._close_scan(st)
            for st in self._tracker.active():
                self._tracker.close(st, "closed")
                self._close_scan(st)
            self._settle_held(wait_held_s)
        self._executor.shutdown(wait=True)
        self._preview_pool.shutdown(wait=True)
        for scan_id, fut in list(self._stage_runs.items()) + list(self._series_runs.items()):  # they write files
            try:
                fut.result(timeout=self.config.scan.finalize_timeout_s)
            except Exception as e:  # noqa: BLE001 - reported, closing anyway
                self.console.say(f"WARNING [{scan_id}] stages did not finish: {type(e).__name__}: {e}")
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        while self._live_sockets() and not (self._live_thread and self._live_thread.is_alive()) \
                and not self._outbox.empty():  # the last 'done' messages (this thread owns the socket now)
            parts = self._outbox.get()
            for sock in self._live_sockets():
                sock.send_multipart(parts)
        if self._client is not None and self._thread is not None:
            try:
                self._client.unsubscribe_topic("all")
            except Exception as e:  # noqa: BLE001 - shutting down anyway
                log.debug("unsubscribing from dask's events failed: %s", e)
            try:
                self._client.unregister_worker_plugin(self._plugin_name)
            except Exception as e:  # noqa: BLE001 - shutting down anyway
                log.debug("unregistering the receiver plugin failed: %s", e)
            if self._cluster is None:
                stopping.uninstall(self._client, f"{self._plugin_name}-stop")  # a held SIGTERM goes on now
        if self._pending_ctl is not None:
            self._pending_ctl.close()
        if self.detector is not None:
            self.detector.close()
        for sock in (self._pull, self._pub, self._view_pub, self._control):
            if sock is not None:
                sock.close(linger=1000)
        if self._gate is not None:
            self._gate.stop()
        if self._ctx is not None:
            self._ctx.term()
        if self._own_client and self._client is not None:
            self._client.close()
            if self._cluster is not None:
                self._cluster.close()

    def _settle_held(self, wait_s: float | None) -> None:
        """While stopping: write what is held, retrying (every <= 5 s) and saying so, for
        ``wait_s`` (None: until done or interrupted); then rescue what is left."""
        deadline = None if wait_s is None else time.monotonic() + wait_s
        said = 0.0
        try:
            while True:
                now = time.monotonic()
                with self._held_lock:
                    held = list(self._held.values())
                    for h in held:
                        h.next_try = min(h.next_try, now + 5.0)
                if not held:
                    break
                if deadline is not None and now >= deadline and not any(h.busy for h in held):
                    break
                if now - said >= 10.0 and not all(h.busy and not h.attempts for h in held):
                    said = now
                    self.console.say(f"stopping: {len(held)} scan(s) not written yet ("
                                     + ", ".join(f"{h.scan_id}: {h.error or 'writing'}" for h in held)
                                     + "); retrying. 'stemstream pending' shows them; stop again to "
                                     f"write them to {rescue_dir()}", logging.WARNING)
                self._retry_due(now, moves=False)
                self._serve_pending()
                self._handle_events()
                time.sleep(0.1)
        except KeyboardInterrupt:
            self.console.say(f"stopped again: writing the scans still held to {rescue_dir()}", logging.WARNING)
        self._rescue()

    def _rescue(self) -> None:
        """Last resort when the session stops: held scans to ~/stemstream-rescued, once
        (after the attempts under way have ended: one of them may still succeed)."""
        deadline = time.monotonic() + self.config.scan.finalize_timeout_s
        while time.monotonic() < deadline:
            with self._held_lock:
                if not any(h.busy for h in self._held.values()):
                    break
            time.sleep(0.1)
        with self._held_lock:
            held = [h for h in self._held.values() if not h.busy]
        for h in held:
            h.target = str(rescue_dir())
            h.busy = True
            self._attempt(h)
        with self._held_lock:
            for h in self._held.values():
                self.console.say(f"ERROR [{h.scan_id}] LOST: the session stopped and the scan could not be "
                                 f"written anywhere ({h.error}); its {h.status.frames_received:,} frames are gone")
            for m in self._moving.values():
                self.console.say(f"WARNING [{m.scan_id}] {m.path} stays in the fallback directory: move it to "
                                 f"{self.config.output.dir} yourself (it is a complete scan file)")

    def _drain_reports(self, quiet_s: float = 0.3, max_s: float = 2.0) -> None:
        """Handle every report already on its way: until ``quiet_s`` without one other than
        heartbeats (which never stop), and while scans are open until every live receiver
        has said (heartbeat ``empty_at``, ``pending``) that it read and reported all that
        reached it before this began: on a busy machine a receiver's last reports can come
        after a silence. At most ``max_s``: a detector still sending must not keep a
        stopping session open."""
        since = time.time()
        deadline, end = time.monotonic() + quiet_s, time.monotonic() + max_s
        while time.monotonic() < end:
            if not self._pull.poll(50):
                if not self._receivers_behind(since):
                    return
                continue
            while True:
                try:
                    parts = self._pull.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                if self._handle_report(parts, set()) != "heartbeat":
                    deadline = time.monotonic() + quiet_s
            if time.monotonic() >= deadline and not self._receivers_behind(since):
                return

    def _receivers_behind(self, since: float) -> bool:
        """Whether an open scan may still have frames a live receiver read before ``since``
        (wall-clock s) and has not reported."""
        open_ids = {st.scan_id for st in self._tracker.active()}
        return bool(open_ids) and any(rv.empty_at < since or open_ids & rv.pending
                                      for rv in self._tracker.live())

    # -------------------------------------------------------------- results
    def wait(self, scan_id: str | None = None, timeout: float | None = None) -> ScanResult:
        """The ScanResult of ``scan_id``, or of the next finished scan not yet waited for."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if scan_id is not None and scan_id in self._results:
                    self._waited.add(scan_id)
                    return self._results[scan_id]
                if scan_id is None:
                    for sid in self._order:
                        if sid not in self._waited:
                            self._waited.add(sid)
                            return self._results[sid]
                if self._closed:
                    raise RuntimeError("the session is closed: no more scans will finish")
                if self._failure is not None:
                    raise RuntimeError(f"the session's coordinator stopped: {self._failure!r}")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"no finished scan {scan_id or ''} within {timeout} s")
                self._cond.wait(min(remaining, 1.0) if remaining is not None else 1.0)

    def wait_stages(self, scan_id: str, timeout: float | None = None) -> list:
        """The StageReports of a finished scan's stages (stream/stages/runner.py), once they ran."""
        self.wait(scan_id, timeout)
        fut = self._stage_runs.get(scan_id)
        if fut is None:
            return []
        return fut.result(timeout=timeout)

    @property
    def results(self) -> dict[str, ScanResult]:
        with self._cond:
            return dict(self._results)

    def pending(self) -> list[dict]:
        """Scans closed but not yet in the output directory (held, or in the fallback
        directory to be moved), as plain values; ``stemstream pending`` shows the same."""
        now = time.monotonic()
        with self._held_lock:
            return [h.describe(now) for h in self._held.values()] + \
                [m.describe(now) for m in self._moving.values()]

    def status(self) -> list[dict]:
        """Plain-value status of every scan seen (for dashboards and tests)."""
        return [{"scan_id": s.scan_id, "state": s.state, "frames_received": s.frames_received,
                 "n_frames": s.n_frames, "events": s.events, "missing_so_far": s.missing_so_far(),
                 "duplicates": s.duplicates, "worker_events": dict(s.worker_events),
                 "written_early": self._early.progress(s.scan_id) if self._early is not None else 0}
                for s in list(self._tracker.scans.values())]

    def receivers(self) -> list[dict]:
        """The receivers the session hears from (their heartbeats, docs/PROTOCOL.md): worker,
        seconds since its last report, whether its input queue has messages waiting, the
        frame parts of each open scan it read and processed, and why its worker left (if)."""
        now = time.monotonic()
        return [{"worker": rv.worker, "silent_s": now - rv.last_seen, "input_waiting": rv.input_waiting,
                 "scans": dict(rv.scans), "gone": rv.gone} for rv in list(self._tracker.receivers.values())]

    def acquire(self, timeout: float | None = None) -> ScanResult:
        """Active mode (``[detector] mode = "active"``): arm (and trigger) one acquisition of
        the detector and return its finished scan. Raises DetectorError naming the detector
        when it refuses, does not answer, or sends no frame (docs/DECTRIS.md, MERLIN.md)."""
        if self.detector is None:
            raise ConfigError("acquire() needs a DECTRIS or Merlin detector ([detector] kind)")
        return self.detector.acquire(timeout)

    def source_command(self, name: str, *args) -> dict:
        """Send a control request to every worker's detector source (and wait for them);
        returns each worker's answer."""
        return self._client.run(source_command, self._plugin_name, name, *args)

    def rejects(self) -> dict[str, int]:
        """Rejected messages so far, by reason (docs/PROTOCOL.md)."""
        return dict(self._tracker.rejects)

    def scan_info(self, scan_id: str):
        """(state, geometry, metadata) of a scan the session follows, None for one it does not
        (or no longer) know; state is receiving, closing or done."""
        st = self._tracker.scans.get(scan_id)
        return None if st is None else (st.state, st.geometry, dict(st.metadata))

    def stage_reports(self, scan_id: str) -> list | None:
        """The StageReports of a finished scan's stages once they ran; None while they run
        (or if none are configured, or the scan is unknown)."""
        fut = self._stage_runs.get(scan_id)
        if fut is None or not fut.done():
            return None
        try:
            return fut.result()
        except Exception:  # noqa: BLE001 - reported on the console by the stage callback
            return None

    def apply(self, scan_id: str, op, timeout: float | None = None):
        """Run an ad-hoc operator over every event of a scan, where the events are: the
        receivers while it is open, its file once written (stream/session/adhoc.py). Waits
        for the file when the scan is being written. Returns an ``AdhocRun`` (its ``state``
        goes to ``op.finalize``). Raises KeyError for a scan this session does not know and
        RuntimeError for one that has no file (failed)."""
        from stream.session import adhoc

        timeout = self.config.scan.finalize_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                r = self._results.get(scan_id)
            if r is not None:
                if r.path is None:
                    raise RuntimeError(f"scan {scan_id} has no file: {r.reason}")
                return adhoc.on_file(self._client, r.path, op, timeout=timeout)
            info = self.scan_info(scan_id)
            if info is None:
                raise KeyError(f"no scan {scan_id!r} in this session")
            if info[0] == "receiving":
                run = adhoc.on_open_scan(self._client, self._plugin_name, scan_id, op, timeout=timeout)
                if run is not None:
                    return run
            with self._cond:  # closing: its file comes next (not wait(): that is the caller's)
                if scan_id not in self._results:
                    if time.monotonic() > deadline or self._closed:
                        raise TimeoutError(f"scan {scan_id} was not written within {timeout:g} s")
                    self._cond.wait(0.2)

    def live(self, scan_id: str) -> dict[str, np.ndarray]:
        """Partial results of a scan that is still running (merged over workers): name →
        array, as ``ScanResult.results``; empty until the first live snapshot arrives (about
        ``1 / [live] rate_hz`` after its first frames) and once the scan has finished (its
        images are then in ``wait(scan_id).results``); it stops changing once every source
        ended (its file comes next). KeyError naming the scans there are for
        a scan id this session has not seen."""
        with self._cond:
            finished = scan_id in self._results
        if scan_id not in self._tracker.scans and not finished:
            seen = [st.scan_id for st in list(self._tracker.scans.values())]
            running = [sid for sid in seen if sid not in self._results]
            raise KeyError(f"no scan {scan_id!r} in this session; running: {', '.join(running) or 'none'}"
                           f" (session.status() lists every scan seen, session.results the finished ones)")
        states = {}
        st = self._tracker.scans.get(scan_id)
        with self._live_lock:  # the workers' arrays are updated in place under this lock
            if scan_id not in self._live_ops and st is not None and st.geometry is not None \
                    and scan_id in self._live:  # built when first asked for, not per scan
                try:
                    self._live_ops[scan_id] = [op for op in build_operators(self.config, st.geometry) if op.live]
                except ValueError:
                    self._live_ops[scan_id] = []
            ops = self._live_ops.get(scan_id)
            for arrays in self._live.get(scan_id, {}).values():
                for key, value in arrays.items():
                    if key not in states:
                        states[key] = value.copy()
                    elif states[key].shape == value.shape:  # (receivers that disagreed on the
                        states[key] += value                  # geometry are not merged)
        out = {}
        for op in ops or []:
            state = {k.split("/", 1)[1]: v for k, v in states.items() if k.startswith(op.name + "/")}
            if state.keys() == op.state_kinds.keys():
                out.update({name: r.data for name, r in op.finalize(state).items()})
        return out

    # -------------------------------------------------------------- the coordinator loop
    def _loop(self) -> None:
        try:
            self._coordinate()
        except BaseException as e:  # noqa: BLE001 - reported through wait()
            log.exception("the coordinator stopped")
            self._failure = e
            self.console.say(f"ERROR: the coordinator stopped: {type(e).__name__}: {e}")
            with self._cond:
                self._cond.notify_all()

    def _coordinate(self) -> None:
        next_forget = next_announce = next_early = time.monotonic()
        next_links = next_forget + LINK_GRACE_S  # connecting takes a moment; then say what is not
        warned = set()
        poller = zmq.Poller()
        poller.register(self._pull, zmq.POLLIN)
        if self._pending_ctl is not None:
            poller.register(self._pending_ctl.socket, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                ready = dict(poller.poll(50))
                if self._pull in ready:
                    for _ in range(1000):
                        try:
                            parts = self._pull.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._handle_report(parts, warned)
                if self._pending_ctl is not None and self._pending_ctl.socket in ready:
                    self._serve_pending()
                self._handle_events()
                now = time.monotonic()
                due = self._tracker.due()
                for st in due:
                    self._close_scan(st)
                if due:  # receivers stop counting them as open
                    self._tell_receivers("closing", [st.scan_id for st in due])
                if self._tracker.expire_unannounced() and "unannounced" not in warned:
                    warned.add("unannounced")
                    self.console.say("WARNING: end or abort messages of a scan no source announced with "
                                     "start were dropped (further ones are counted, not shown)")
                self._retry_due(now)
                if self._early is not None and now >= next_early:
                    next_early = now + TICK_S
                    self._early.tick(self._tracker.active(), self._live_workers(), self._writing,
                                     str(self.config.output.dir))
                self.console.progress(self._tracker.active())
                self._say_waiting(now)
                if now >= next_announce:  # for receivers that joined late or missed a message
                    next_announce = now + ANNOUNCE_PERIOD_S
                    active = [st.scan_id for st in self._tracker.active()]
                    if active:
                        self._tell_receivers("announced", active)
                self._live_active = self._tracker.active()  # for the live thread (a new list each turn)
                if now >= next_forget:
                    next_forget = now + 10
                    self._tracker.forget_done()
                if now >= next_links:
                    next_links = now + 1.0
                    self._check_links()
            except Exception as e:  # noqa: BLE001 - the coordinator must go on
                log.exception("coordinator turn failed")
                if type(e).__name__ not in warned:
                    warned.add(type(e).__name__)
                    self.console.say(f"WARNING: coordinator error (the session goes on): {e!r}")

    # -------------------------------------------------------------- workers that stall or leave
    def _on_dask_event(self, event) -> None:
        """dask's 'all' topic (in the client's thread): a worker that joined, or that the
        scheduler removed, and why."""
        msg = event[1] if isinstance(event, tuple) and len(event) == 2 else event
        if not isinstance(msg, dict) or not msg.get("worker"):
            return
        if msg.get("action") == "add-worker":
            self._events.put(("added", msg["worker"], ""))
        elif msg.get("action") == "remove-worker":
            stimulus = str(msg.get("stimulus_id", ""))
            if "worker-ttl" in stimulus:
                cause = "dask removed it: no heartbeat within distributed.scheduler.worker-ttl (stalled)"
            elif msg.get("expected"):
                cause = "dask retired it from the cluster"
            else:
                cause = f"its process died or lost its connection (dask: {stimulus or 'removed'})"
            self._events.put(("gone", msg["worker"], cause))

    def _watch_workers(self, every_s: float = 10.0) -> None:
        """In its own thread (asking the scheduler can take long on a busy machine): the
        scheduler's list of workers every ``every_s``, in case an event was missed."""
        while not self._stop.wait(every_s):
            try:
                workers = set(self._client.scheduler_info()["workers"])
            except Exception:  # noqa: BLE001 - asked again later
                continue
            if workers:  # a momentarily empty list is not believed
                self._events.put(("listed", workers, ""))

    def _handle_events(self) -> None:
        now = time.monotonic()
        while not self._events.empty():
            kind, worker, cause = self._events.get()
            if kind == "gone":
                self._worker_gone(worker, cause)
            elif kind == "added" and worker not in self.workers:
                self.workers = sorted(self.workers + [worker])
            elif kind == "listed":
                listed = worker
                self.workers = sorted(listed)
                for w, rv in list(self._tracker.receivers.items()):  # a worker off the list has left
                    if rv.gone or w in listed:
                        self._missing_since.pop(w, None)
                    elif now - self._missing_since.setdefault(w, now) >= GONE_AFTER_S:
                        self._worker_gone(w, "it left the cluster")

    def _live_workers(self) -> list[str]:
        gone = {w for w, rv in self._tracker.receivers.items() if rv.gone}
        return [w for w in self.workers if w not in gone]

    def _worker_gone(self, worker: str, cause: str) -> None:
        rv = self._tracker.receivers.get(worker)
        if rv is not None and rv.gone:
            return
        hit = self._tracker.worker_gone(worker, cause)
        self.workers = [w for w in self.workers if w != worker]
        lost = ", ".join(f"{st.scan_id} ({st.worker_frames.get(worker, 0):,} frame parts)" for st in hit)
        self.console.say(f"WARNING: worker {worker} left the cluster: {cause}"
                         + (f"; what it had processed is lost: {lost}" if lost else ""))
        with self._held_lock:
            for h in self._held.values():
                fut = h.closed.pop(worker, None)
                if fut is not None:
                    self._client.cancel([fut])
                    h.status.lost.setdefault(worker, cause)
                    h.stop.set()  # an attempt under way gives up at once, and is tried again
                    h.next_try = 0.0
                if h.staged is not None and h.staged[0] == worker:
                    h.staged = None

    def _say_waiting(self, now: float) -> None:
        """Every 5 s per scan: a scan that must close but waits for a silent receiver."""
        for st in self._tracker.active():
            if st.settle_from is None or now - st.said_waiting < 5.0:
                continue
            silent = [rv for rv in self._tracker.waiting_for(st) if now - rv.last_seen >= SILENT_S]
            if silent:
                st.said_waiting = now
                for rv in silent:
                    self.console.say(f"[{st.scan_id}] waiting for worker {rv.worker}: no report for "
                                     f"{now - rv.last_seen:.0f} s (stopped or overloaded?); the frames "
                                     "in its queue count when it resumes; if it never does, dask removes "
                                     "it (distributed.scheduler.worker-ttl) and its frames are named lost")

    def _tell_receivers(self, kind: str, scan_ids: list[str], **fields) -> None:
        """Publish on the control channel (this thread owns the socket)."""
        if self._control is not None:
            self._control.send_multipart(control.encode({"kind": kind, "scan_ids": scan_ids, **fields}))

    def _admit(self, report: dict) -> tuple[str, str] | None:
        """None if a new scan fits this session's limits, else (reason, detail)."""
        sid = report["scan_id"]
        g = Geometry.from_wire(report["geometry"]).for_sector(None)
        need = coordinator_state_bytes(self.config, g, len(self.workers))
        if need > self.state_budget:
            return OVER_BUDGET, (f"scan {sid}: {g.scan_shape[0]}x{g.scan_shape[1]} positions need about "
                                 f"{need / 1e6:,.0f} MB of bookkeeping here, over the budget of "
                                 f"{self.state_budget / 1e6:,.0f} MB ([limits] scan_state_mb); raise it or "
                                 "scan fewer positions")
        n_open = len(self._tracker.active())
        if n_open >= self.config.limits.max_open_scans:
            return TOO_MANY_SCANS, (f"scan {sid}: {n_open} scans are receiving, the most [limits] "
                                    "max_open_scans allows; end or abort scans, or raise it")
        return None

    def _refuse_scan(self, sid: str, reason: str, detail: str) -> None:
        """Refuse a scan announced to this session: count it, say it once per reason, and tell
        the receivers to drop what they hold of it."""
        self._refused[sid] = reason
        while len(self._refused) > 4096:
            self._refused.popitem(last=False)
        self._tracker.rejects[reason] = self._tracker.rejects.get(reason, 0) + 1
        if reason not in self._refusals_warned:
            self._refusals_warned.add(reason)
            self.console.say(f"ERROR: refused a scan ({reason}): {detail} (further refusals of this kind "
                             "are counted, not shown)")
        self._tell_receivers("drop", [sid], reason=reason, detail=detail)

    def _handle_report(self, parts, warned: set) -> str | None:
        try:
            report, arrays = control.decode(parts, widen=False)  # (_on_live widens as it copies)
            self._on_report(report, arrays, warned)
            return report.get("kind")
        except Exception as e:  # noqa: BLE001 - one odd report must not stop the session
            log.exception("a receiver report could not be handled")
            self._tracker.rejects["bad_report"] = self._tracker.rejects.get("bad_report", 0) + 1
            if "bad_report" not in warned:
                warned.add("bad_report")
                self.console.say(f"WARNING: a receiver report could not be handled: {e!r}")

    def _on_report(self, report: dict, arrays: dict, warned: set) -> None:
        kind = report["kind"]
        if kind == "links":
            self._links[report["worker"]] = report
            return
        if kind != "reject" and report.get("scan_id") in self._refused:
            return  # what receivers still report of a scan this session refused
        if kind == "live":
            self._on_live(report, arrays)
            return
        if kind == "notice":  # a detector source's news: connection lost, frames dropped, ...
            self.console.say(report["text"])
            return
        if kind == "reject":
            reason, sid = report["reason"], report.get("scan_id")
            if reason == "late" and sid not in self._late_warned:
                self._late_warned.add(sid)
                written = "its file is written and lists them as missing" if self._tracker.finished(sid) \
                    else "they are counted as rejected in its file"
                self.console.say(f"WARNING: messages of scan {sid} arrive after it was closed and are "
                                 f"dropped as late ({written}; a stale stream, or a scan id used twice)")
            elif reason != "late" and reason not in warned:
                warned.add(reason)
                self.console.say(f"WARNING: rejected a message ({reason}): {report['detail']} "
                                 "(further rejects of this kind are counted, not shown)")
        if kind in ("geometry", "start") and self._tracker.finished(report["scan_id"]):
            # a worker that joined after the scan closed saw a stale message: close it there
            from distributed import fire_and_forget
            fire_and_forget(self._client.submit(close_on_worker, self._plugin_name, report["scan_id"],
                                                workers=[report["worker"]], pure=False))
            return
        sid = report.get("scan_id")
        new = kind in ("geometry", "start") and sid not in self._tracker.scans
        if new:
            refusal = self._admit(report)
            if refusal is not None:
                self._refuse_scan(sid, *refusal)
                return
        before = self._tracker.scans.get(sid)
        done_before = before is not None and before.sending_done
        st = self._tracker.handle(report)
        if new and st is not None:  # receivers that did not see its start open it now
            self._tell_receivers("announced", [sid])
        if st is not None and st.sending_done and not done_before and self.config.live.rate_hz > 0:
            self._tell_receivers("ended", [sid])  # no more live snapshots of it: its file comes next
        if kind == "abort" and st is not None:
            self.console.say(f"[{st.scan_id}] aborted by source {report['source']}: {report.get('reason')}")

    def _on_live(self, report: dict, arrays: dict) -> None:
        """Keep each worker's partial state; scan-shaped arrays arrive as the positions
        lo:hi that changed since that worker's previous snapshot."""
        sid = report["scan_id"]
        st = self._tracker.scans.get(sid)
        if st is None or st.geometry is None:
            return
        with self._live_lock:
            if st.state != "receiving" or st.sending_done:  # (one in flight when it ended)
                return
            self._live_dirty.add(sid)
            held = self._live.setdefault(sid, {}).setdefault(report["worker"], {})
            lo, hi, n_pos = report["lo"], report["hi"], st.geometry.n_positions
            dtypes = report.get("widen", {})  # integer sums travel narrowed (control.encode)
            for key, value in arrays.items():
                dtype = np.dtype(dtypes.get(key, value.dtype))
                if key in report["nav"]:
                    if key not in held:
                        held[key] = np.zeros(value.shape[:-1] + (n_pos,), dtype)
                    held[key][..., lo:hi] = value
                else:
                    held[key] = value.astype(dtype, copy=False)

    def _live_loop(self) -> None:
        """The live channel's thread: the 'done' messages as they come, and every ``1 /
        [live] rate_hz`` s the partial images of each scan whose live states changed. Merging
        and encoding a large scan's images takes long (60 MB at 1024² positions): here it
        delays neither the reports nor the scans' closing."""
        period = 1.0 / self.config.live.rate_hz if self.config.live.rate_hz > 0 else None
        if period and (self._view_pub is not None or self.config.live.max_side):
            warm_up()  # (about 1 s on a busy machine: not at the first picture)
        next_live = time.monotonic()
        while not self._stop.is_set():
            try:
                parts = self._outbox.get(timeout=0.05)
                for sock in self._live_sockets():
                    sock.send_multipart(parts)
                continue
            except queue.Empty:
                pass
            if period and time.monotonic() >= next_live:
                next_live = time.monotonic() + period
                try:
                    self._publish_live()
                except Exception:  # noqa: BLE001 - a picture missed; the next one comes
                    log.exception("publishing live images failed")

    def _live_sockets(self) -> list:
        return [sock for sock in (self._pub, self._view_pub) if sock is not None]

    @property
    def _dose_image(self) -> str | None:
        """The image whose received rows the viewer's first-look dose advice needs at every
        position: the ``columns`` stage's, when it runs (stream/viewer/dose.py)."""
        if "columns" not in self.config.stages.run:
            return None
        params = {**STAGES["columns"].params, **self.config.stages.params.get("columns", {})}
        return str(params.get("image") or "adf")

    def _publish_live(self) -> None:
        """Each changed scan's merged images: on ``--publish`` at every position (or at most
        ``[live] max_side`` a side), on the viewer's channel at the page's size
        (stream/session/live_view.py, docs/PROTOCOL.md)."""
        channels = [(sock, side) for sock, side in ((self._pub, self.config.live.max_side),
                                                    (self._view_pub, VIEW_MAX_SIDE)) if sock is not None]
        if not channels:
            return
        for st in list(self._live_active):
            with self._live_lock:
                if st.scan_id not in self._live_dirty or st.sending_done:
                    continue  # nothing new since its last picture; or its file comes next
                self._live_dirty.discard(st.scan_id)
            images = self.live(st.scan_id)
            if not images or st.geometry is None:
                continue
            header = {"proto": LIVE_PROTO, "kind": "live", "scan_id": st.scan_id,
                      "frames_received": st.frames_received, "n_frames": st.n_frames,
                      "events": st.events, "missing_so_far": st.missing_so_far()}
            header.update(_live_context(st, self._tracker.rejects, self._plugin_name))
            small = {}
            for sock, side in channels:
                if not side:
                    sock.send_multipart(control.encode(header, images))
                    continue
                if side not in small:  # made once for the channels of one size
                    arrays, info = display_snapshot(images, st.geometry.scan_shape, st.geometry.frame_shape,
                                                    side, self._dose_image)
                    small[side] = control.encode({**header, "display": info}, arrays)
                sock.send_multipart(small[side])

    def links(self) -> dict[str, str]:
        """Sources no receiver is connected to now, each with why as far as known (empty
        when every source is reached)."""
        return unreached(self.connect, dict(self._links))

    def _say_link(self, text: str) -> None:
        # once the operator stops the session, sources going away is expected: not said, and
        # "stopping" stays the last word about them
        self.console.say(text, unless=self._interrupted)

    def _check_links(self) -> None:
        """Say which sources no receiver reaches, when that changes (first after
        LINK_GRACE_S): ZeroMQ retries a wrong address silently for ever. A source that was
        connected and went away (an emulator that finished) is only noted, unless a scan is
        receiving."""
        missing = self.links()
        self._ever_linked.update(a for a in self.connect if a not in missing)
        if missing == (self._links_said or {}):
            return
        never = {a: why for a, why in missing.items() if a not in self._ever_linked}
        gone = [a for a in missing if a in self._ever_linked and a not in (self._links_said or {})]
        if never.keys() - (self._links_said or {}).keys():  # sources not named yet
            first = urlsplit(self.connect[0])
            self._say_link(
                f"waiting for the detector: no receiver could connect to {len(never)} of {len(self.connect)} "
                "source(s) yet: " + "; ".join(f"{address_ranges([a for a in never if never[a] == why])} ({why})"
                                              for why in dict.fromkeys(never.values()))
                + f". If the detector or emulator runs, check that it binds exactly these addresses "
                  f"(e.g. 'stemstream simulate --bind tcp://{first.hostname}:{first.port}"
                  f"{f' --sources {len(self.connect)}' if len(self.connect) > 1 else ''}') and that no "
                  "firewall is in between; the receivers keep trying")
        if gone:
            active = [st.scan_id for st in self._tracker.active() if not st.all_ended]  # (not: sent all, then left)
            self._say_link(
                (f"WARNING: during scan {', '.join(active)}, " if active else "")
                + f"the source(s) {address_ranges(gone)} closed their connection (the detector or emulator "
                  "ended or stopped); the receivers reconnect when they are back")
        if not missing and self._links_said:
            self._say_link(f"connected to all {len(self.connect)} source(s)")
        self._links_said = missing

    # -------------------------------------------------------------- finalization
    def _close_scan(self, st: ScanStatus) -> None:
        """A scan closed: its state stays on the workers until its file is in place."""
        h = HeldScan(st.scan_id, busy=True, status=st)
        with self._held_lock:
            self._held[st.scan_id] = h
        self._executor.submit(self._attempt, h)

    def _retry_due(self, now: float, moves: bool = True) -> None:
        """Held scans (and files to move) whose next attempt is due, to the writer threads."""
        with self._held_lock:
            due = [h for h in self._held.values() if h.due(now)]
            todo = [m for m in self._moving.values() if m.due(now)] if moves else []
            for job in due + todo:
                job.busy = True
        for h in due:
            self._executor.submit(self._attempt, h)
        for m in todo:
            self._executor.submit(self._move, m)

    def _attempt(self, h: HeldScan) -> None:
        """One attempt at a held scan's file (a writer thread); on failure it is scheduled
        again, and the console says where the data is."""
        h.stop.clear()
        try:
            result = self._write(h)
            error = "" if result.path is not None or result.status == "failed" else result.write_error
        except Exception as e:  # noqa: BLE001 - the scan stays held and is tried again
            log.info("writing scan %s failed", h.scan_id, exc_info=True)
            result, error = None, f"{type(e).__name__}: {e}"
        if error:
            now = time.monotonic()
            with self._held_lock:
                h.busy = False
                delay = h.failed(error, now)
                say = h.attempts == 1 or now - h.said >= REMIND_S
                h.said = now if say else h.said
            if h.attempts == 1:
                for line in loud_lines(h, h.target or self.config.output.dir, self.config.output.fallback_dir):
                    self.console.say(line)
            elif say:
                self.console.say(f"WARNING [{h.scan_id}] still not written after {h.attempts} attempts "
                                 f"(next in {delay:.0f} s): {error}; it is held in {h.where()}")
            return
        with self._held_lock:
            self._held.pop(h.scan_id, None)
            h.busy = False
        if h.attempts:
            self.console.say(f"[{h.scan_id}] written after {h.attempts + 1} attempts: {result.path}",
                             logging.WARNING)  # (after the warnings of its failed attempts)
        self._finish(h.status, result)

    def _write(self, h: HeldScan) -> ScanResult:
        """Publish the finished file of a held scan, or finalize it from the workers' states
        (closing it on the workers first), into its target; a file that cannot go there goes
        to the fallback directory when one is configured."""
        st = h.status
        out = h.target or str(self.config.output.dir)
        fallback = "" if h.target else self.config.output.fallback_dir
        timeout = self.config.scan.finalize_timeout_s
        live = set(self._live_workers())
        for w in [w for w in h.writers if w in live]:  # did an earlier attempt finish after all?
            state, r = result_of(self._on(w, written_here, h.write_id), timeout, h.stop, st.scan_id)
            if state == "writing":
                raise RuntimeError(f"an earlier attempt is still writing it on worker {w}")
            if state == "written":
                return self._landed(r, w)
            if state == "staged":
                h.staged = (w, r.staged)
        if h.staged is not None:
            worker, token = h.staged
            try:
                r = result_of(self._on(worker, publish_staged, token, out), timeout, h.stop, st.scan_id)
            except KeyError:  # that worker restarted: build the file again from the states
                h.staged = None
            else:
                return self._maybe_fallback(r, worker, fallback)
        early = self._early.finish(st, live) if self._early is not None else None
        if early is not None:
            h.early_written, h.early_cancelled = early.written, early.cancelled
            if early.failed:  # thrown away: written at the end as if none had started
                early = None
        try:
            return self._write_closed(h, live, out, fallback, timeout, early)
        except BaseException:
            if early is not None and early.token not in h.early_used:
                self._early.drop(early)
            raise

    def _write_closed(self, h: HeldScan, live: set, out: str, fallback: str, timeout: float, early) -> ScanResult:
        """``_write`` once no finished file is waiting: close the scan on the workers, then
        finalize it (``early``: its events written while it ran, on ``early.writer``)."""
        st, client = h.status, self._client
        small = st.events <= SMALL_SCAN_EVENTS and early is None
        if early is not None:
            h.planned = early.writer  # the end goes on writing that file
        if small and h.planned is None:  # the writer first: the others close straight to it
            h.planned = min(live or [None], key=lambda w: (self._writing.get(w, 0),
                                                           -st.worker_events.get(w, 0), str(w)))
        self._ensure_closed(h, travel=small)
        if st.geometry is None:  # nothing but rejects or an abort before any geometry
            from distributed import wait
            wait(list(h.closed.values()), timeout=timeout)  # the workers forget the scan
            why = st.errors[0] if st.errors else f"aborted by the source: {st.abort_reason}" \
                if st.abort_reason else "no valid message gave its geometry"
            return ScanResult(st.scan_id, None, "failed", f"closed ({st.close_reason}): {why}")
        closed = dict(h.closed)
        live = self._live_workers()
        writer = h.planned if h.planned in closed or (not closed and h.planned in live) else \
            min(closed or live or [None], key=lambda w: (self._writing.get(w, 0), -st.worker_events.get(w, 0), str(w)))
        if writer is None:
            raise RuntimeError(f"{NO_WORKER} to write it")
        reported, late = st.reported(), st.late_mask()
        info = ScanInfo(st.scan_id, st.geometry, st.metadata, st.close_reason, st.abort_reason,
                        dict(st.frames_sent), st.rejects,
                        {"opened": st.opened, "first_frame": st.first_frame_time,
                         "last_frame": st.last_frame_time, "closed": st.closed_time,
                         "early_written": h.early_written, "early_cancelled": h.early_cancelled},
                        sorted(closed),
                        errors=list(st.errors), out_dir=out, lost=dict(st.lost),
                        reported=None if reported is None else np.packbits(reported, axis=-1),
                        late=None if late is None else np.packbits(late, axis=-1),
                        late_frames=st.late_frames, reject_reasons=dict(st.reject_reasons),
                        config_json=self._config_json, write_id=h.write_id)
        if writer not in h.writers:
            h.writers.append(writer)
        self._writing[writer] = self._writing.get(writer, 0) + 1
        token = early.token if early is not None and writer == early.writer else ""
        if token:
            h.early_used.add(token)
        elif early is not None:  # its writer cannot write the end
            h.early_used.add(early.token)
            self._early.drop(early)
        if token:  # the blocks built when it closed are written first (the workers closed meanwhile)
            self._early.settle(early, EARLY_SETTLE_S)
            info.timings["early_written"] = h.early_written = early.written
        try:
            r = finalize_on_cluster(client, info, self.config, closed, writer, timeout,
                                    small=small, stop=h.stop, travelling=h.travelling, early=token)
        finally:
            self._writing[writer] -= 1
        if r.path is None and r.staged:
            h.staged = (writer, r.staged)
            return self._maybe_fallback(r, writer, fallback)
        return r

    def _on(self, worker: str, fn, *args):
        return self._client.submit(fn, *args, workers=[worker], allow_other_workers=False, pure=False)

    def _ensure_closed(self, h: HeldScan, travel: bool) -> None:
        """Close the scan on every live worker not closed yet (a worker that joined, or an
        earlier attempt that found none); the states stay there as futures. Silent workers
        that processed none of its frames are closed without waiting for them. ``travel``:
        workers other than the planned writer make their state ready to go to it."""
        st = h.status
        silent = {rv.worker for rv in self._tracker.stalled()}
        for w in self._live_workers():
            if w in h.closed or w in h.asked:
                continue
            h.asked.add(w)
            moves = travel and w != h.planned
            fut = self._on(w, close_on_worker, self._plugin_name, st.scan_id, moves)
            if moves:
                h.travelling.add(w)
            if st.worker_frames.get(w) or w not in silent:
                h.closed[w] = fut
            else:
                from distributed import fire_and_forget
                fire_and_forget(fut)

    def _maybe_fallback(self, r: ScanResult, worker: str, fallback: str) -> ScanResult:
        """A finished file its directory refused: into the fallback directory, if any (then
        it moves into the output directory when that can be written)."""
        if r.path is not None or not fallback:
            return r
        r2 = result_of(self._on(worker, publish_staged, r.staged, fallback), self.config.scan.finalize_timeout_s)
        if r2.path is None:
            return replace(r, write_error=f"{r.write_error}; fallback: {r2.write_error}")
        self.console.say(f"WARNING [{r.scan_id}] {r.write_error}: written to the fallback directory instead, "
                         f"{r2.path}; it moves to {self.config.output.dir} once that can be written "
                         "('stemstream pending' shows it)")
        return self._landed(r2, worker)

    def _landed(self, r: ScanResult, worker: str) -> ScanResult:
        """A written file: one in the fallback directory is to move into the output directory."""
        fallback = self.config.output.fallback_dir
        if r.path is not None and fallback and Path(r.path).parent == Path(fallback):
            with self._held_lock:
                if r.scan_id not in self._moving:
                    self._moving[r.scan_id] = MovingFile(r.scan_id, next_try=time.monotonic() + 1.0,
                                                         path=Path(r.path), worker=worker)
        return r

    def _move(self, m: MovingFile) -> None:
        """One attempt to move a fallback file into the output directory."""
        out = str(self.config.output.dir)
        try:
            fut = self._client.submit(move_into, str(m.path), out, workers=[m.worker],
                                      allow_other_workers=True, pure=False)
            final = result_of(fut, self.config.scan.finalize_timeout_s)
        except Exception as e:  # noqa: BLE001 - tried again later; the file is safe where it is
            now = time.monotonic()
            with self._held_lock:
                m.busy = False
                delay = m.failed(f"{type(e).__name__}: {e}", now)
            if m.attempts == 1 or delay >= BACKOFF_LAST:
                self.console.say(f"WARNING [{m.scan_id}] still in the fallback directory ({m.path}): {e}")
            return
        with self._held_lock:
            self._moving.pop(m.scan_id, None)
        with self._cond:
            if m.scan_id in self._results:
                self._results[m.scan_id] = replace(self._results[m.scan_id], path=final)
        self._note_written(m.scan_id, final)
        self.console.say(f"[{m.scan_id}] moved from the fallback directory to {final}")

    def _note_written(self, scan_id: str, path) -> None:
        with self._held_lock:
            self._written.append((scan_id, str(path)))
            del self._written[:-50]

    def _finish(self, st: ScanStatus, result: ScanResult) -> None:
        """A scan's file is in place (or the scan failed without one): report it."""
        self._start_stages(result)  # before wait() can return: wait_stages() then finds them
        self._feed_series(result, st.metadata)
        with self._live_lock:
            st.state = DONE
            self._live.pop(st.scan_id, None)
            self._live_ops.pop(st.scan_id, None)
        st.release()
        self._report_result(result)
        if result.path is not None:
            self._note_written(st.scan_id, result.path)
        with self._cond:
            self._results[st.scan_id] = result
            self._order.append(st.scan_id)
            for old in self._order[-KEEP_RESULTS - 1:-KEEP_RESULTS]:  # a session may run for weeks:
                self._results[old] = replace(self._results[old], results={})  # the caller's copy stays whole
            self._cond.notify_all()
        self.console.forget(st.scan_id)
        if self.config.output.previews and result.path is not None:
            self._queue_previews(result)

    def _queue_previews(self, r: ScanResult) -> None:
        """Previews in their own thread, off the path that writes files; in a burst of scans
        faster than they can be drawn, those of the scans beyond PREVIEW_BACKLOG are skipped."""
        with self._held_lock:
            if self._previews_waiting >= PREVIEW_BACKLOG:
                skip, self._previews_skipped = True, self._previews_skipped + 1
            else:
                skip, self._previews_waiting = False, self._previews_waiting + 1
        if skip:
            if self._previews_skipped == 1:
                self.console.say(f"WARNING [{r.scan_id}] previews skipped: scans finish faster than previews "
                                 "are drawn (a burst); the scan files are complete ('stemstream info FILE')")
            return

        def draw():
            try:
                self._write_previews(r)
            finally:
                with self._held_lock:
                    self._previews_waiting -= 1
        self._preview_pool.submit(draw)

    # -------------------------------------------------------------- the control socket
    def _serve_pending(self) -> None:
        """Answer ``stemstream pending`` (stream/session/ask.py)."""
        if self._pending_ctl is None:
            return
        for ident, req in self._pending_ctl.requests():
            try:
                answer = self._control_answer(req)
            except Exception as e:  # noqa: BLE001 - answered, the session goes on
                answer = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            self._pending_ctl.reply(ident, answer)

    def _control_answer(self, req: dict) -> dict:
        op, sid = req.get("op"), req.get("scan")
        if op == "list":
            with self._held_lock:
                written = list(self._written)
            return {"ok": True, "held": self.pending(), "written": written,
                    "session": {"out": str(self.config.output.dir), "fallback": self.config.output.fallback_dir,
                                "connect": self.connect, "workers": self._live_workers()}}
        with self._held_lock:
            if sid is not None and sid not in self._held and sid not in self._moving:
                return {"ok": False, "error": f"no held scan {sid!r} in this session"}
            chosen = [h for h in self._held.values() if sid in (None, h.scan_id)]
            moving = [m for m in self._moving.values() if sid in (None, m.scan_id)]
            if op == "retry":
                for job in chosen + moving:
                    job.next_try = 0.0
                return {"ok": True, "scans": [j.scan_id for j in chosen + moving]}
            if op == "finish":
                to = req.get("to")
                if not sid or not to or not chosen:
                    return {"ok": False, "error": "finish needs a held scan id and a directory (--to DIR)"}
                chosen[0].target, chosen[0].next_try = str(Path(to).expanduser().resolve()), 0.0
                return {"ok": True, "scans": [sid]}
            if op == "drop":
                if not sid or not chosen or chosen[0].busy:
                    return {"ok": False, "error": "drop needs the id of a held scan that is not being written"}
                h = self._held.pop(sid)
        if op == "drop":
            if h.staged is not None:
                self._on(h.staged[0], drop_staged, h.staged[1])
            self.console.say(f"WARNING [{sid}] dropped on request ('stemstream pending --drop'): its "
                             f"{h.status.frames_received:,} frames are discarded")
            self._finish(h.status, ScanResult(sid, None, "failed", "dropped on request before its file "
                                              f"could be written ({h.error})"))
            return {"ok": True, "scans": [sid]}
        return {"ok": False, "error": f"unknown op {op!r}: list, retry, finish or drop"}

    def _report_result(self, r: ScanResult) -> None:
        if r.status == "failed":
            self.console.say(f"ERROR [{r.scan_id}] {r.reason}")
        else:
            t = r.timings
            span = (t.get("last_frame") or 0) - t["opened"]  # first message to last frame processed
            rate = f"processed at {r.frames_received / span / 1e3:.1f} kframes/s" if span > 0 else "-"
            written = f"{r.path} written" + (f" {t['written'] - t['last_frame']:.2f} s after the last frame"
                                             if t.get("last_frame") else "")
            why = "" if r.status == "complete" else f" ({r.reason})"
            self.console.say(f"[{r.scan_id}] {r.status}: {r.frames_received:,}/{r.n_frames:,} frames, "
                             f"{r.events / 1e6:.2f} M e- ({rate}); {written}{why}")
            never = _minus(r.missing_ranges, r.lost_ranges + r.late_ranges)
            if never:
                self.console.say(f"WARNING [{r.scan_id}] {sum(b - a for a, b in never):,} frames never arrived: "
                                 f"{_ranges_text(never)}; see /completeness in {r.path}")
            if r.lost_ranges:
                self.console.say(f"WARNING [{r.scan_id}] {sum(b - a for a, b in r.lost_ranges):,} frames were "
                                 f"lost with a worker ({r.lost_cause}): {_ranges_text(r.lost_ranges)}")
            if r.late_ranges:
                self.console.say(f"WARNING [{r.scan_id}] {sum(b - a for a, b in r.late_ranges):,} frames came "
                                 f"after the scan closed and were dropped (late; counted in rejected_messages): "
                                 f"{_ranges_text(r.late_ranges)}")
            if r.n_duplicated:
                self.console.say(f"WARNING [{r.scan_id}] {r.n_duplicated:,} frames arrived more "
                                 f"than once and were counted once: {_ranges_text(r.duplicated_ranges)}")
        header = {"proto": LIVE_PROTO, "kind": "done", "scan_id": r.scan_id, "status": r.status,
                  "reason": r.reason, "path": str(r.path), "frames_received": r.frames_received,
                  "n_frames": r.n_frames, "events": r.events}
        self._outbox.put(control.encode(header))

    def _start_stages(self, r: ScanResult) -> None:
        """The configured stages as one task on the cluster, in each worker's own stage thread
        (stream.session.worker.STAGE_EXECUTOR): a long stage never delays closing and writing the next
        scan, which run in the worker's task thread; receivers are threads of their own."""
        stages = self.config.stages
        if not stages.run or r.path is None:
            return
        with dask.annotate(executor=STAGE_EXECUTOR):  # not the task thread that closes and writes scans
            fut = self._client.submit(run_stages, str(r.path), list(stages.run), dict(stages.params),
                                      self.config.output.previews, pure=False, priority=-10)
        self._stage_runs[r.scan_id] = fut
        for old in list(self._stage_runs)[:-KEEP_RESULTS]:
            if self._stage_runs[old].done():
                del self._stage_runs[old]

        def report(f, scan_id=r.scan_id):
            try:
                reports = f.result()
            except Exception as e:  # noqa: BLE001 - the task itself failed (file unreadable, lost worker)
                self.console.say(f"ERROR [{scan_id}] stages failed: {type(e).__name__}: {e}")
                return
            for rep in reports:
                if rep.status == "ok":
                    self.console.say(f"[{scan_id}] stage {rep.name}: {rep.headline} ({rep.seconds:.1f} s)")
                else:
                    self.console.say(f"ERROR [{scan_id}] stage {rep.name} {rep.status}: {rep.error}")
        fut.add_done_callback(report)

    def _feed_series(self, r: ScanResult, metadata: dict) -> None:
        """Collect scans of tilt series; reconstruct a series when its last scan is written."""
        if not self.config.series.reconstruct or r.path is None or r.status == "failed":
            return
        try:
            done = self.series.add(r.scan_id, r.path, metadata)
        except ValueError as e:
            self.console.say(f"WARNING [{r.scan_id}] not added to its tilt series: {e}")
            return
        if done is not None:
            self.reconstruct_series(done)

    def reconstruct_series(self, series):
        """Reconstruct a collected tilt series (complete, or taken early with
        ``session.series.take(series_id)``) as a task in a worker's stage thread."""
        kw = {**self.config.series.params, "previews": self.config.output.previews}
        with dask.annotate(executor=STAGE_EXECUTOR):
            fut = self._client.submit(reconstruct_series, [str(p) for p in series.paths],
                                      str(self.config.output.dir), **kw, pure=False, priority=-20)
        self._series_runs[series.series_id] = fut
        self.console.say(f"[{series.series_id}] {series.describe()}: reconstructing")

        def report(f, sid=series.series_id):
            try:
                res = f.result()
            except Exception as e:  # noqa: BLE001 - reported, the session goes on
                self.console.say(f"ERROR [{sid}] tilt series failed: {type(e).__name__}: {e}")
                return
            self.console.say(f"[{sid}] tomo: {res.headline}")
            for w in res.warnings:
                self.console.say(f"WARNING [{sid}] {w}")
        fut.add_done_callback(report)
        return fut

    def wait_series(self, series_id: str, timeout: float | None = None):
        """The SeriesResult of a tilt series' reconstruction (it must have started)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while series_id not in self._series_runs:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"tilt series {series_id} did not start within {timeout} s")
            time.sleep(0.2)
        return self._series_runs[series_id].result(
            timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))

    def _write_previews(self, r: ScanResult) -> None:
        """PNG previews, here rather than on the writer worker: they are not needed for the
        file to be complete, and this process is otherwise idle."""
        if not self.config.output.previews or r.path is None:
            return
        try:
            # after interrupt() the operator waits for nothing but the files: "stopping" stays the last line
            r.previews = scan_previews(r, self.config, stop=self._interrupted.is_set)
            # the figures' reference cycles (tens of thousands of objects at 1024²) go now, not in
            # a full collection that stops this process at the next scan's end (stream/session/quiet_gc.py)
            gc.collect()
        except OSError as e:  # the output went read-only or full: the scan file is safe, say so in one line
            log.info("previews of scan %s not written", r.scan_id, exc_info=True)
            self.console.say(f"WARNING [{r.scan_id}] previews not written: {e}; the scan file is not affected")
        except Exception as e:  # noqa: BLE001 - a preview is not worth a scan
            log.exception("previews of scan %s failed", r.scan_id)
            self.console.say(f"WARNING [{r.scan_id}] previews not written: {type(e).__name__}: {e}")


def _minus(ranges: list, remove: list) -> list:
    """[first, stop) runs of ``ranges`` not covered by any run of ``remove``."""
    out = []
    cuts = sorted(map(tuple, remove))
    for a, b in ranges:
        for c, d in cuts:
            if d <= a or c >= b:
                continue
            if c > a:
                out.append([a, c])
            a = max(a, d)
            if a >= b:
                break
        if a < b:
            out.append([a, b])
    return out


def _live_context(st: ScanStatus, rejects: dict, plugin_name: str) -> dict:
    """What a viewer attached to the live channel needs besides the images (docs/PROTOCOL.md):
    the geometry for its units, the scan step, duplicates, rejected messages, and the
    receivers' plugin name to compute drawn apertures on the cluster."""
    step = st.metadata.get("scan_step_A") if isinstance(st.metadata, dict) else None
    return {"duplicates": st.duplicates, "rejects": dict(rejects), "receivers": plugin_name,
            "geometry": st.geometry.to_wire() if st.geometry is not None else None,
            "scan_step_A": float(step) if isinstance(step, (int, float)) else None}


def scan_previews(r: ScanResult, config: PipelineConfig, stop=None) -> list[str]:
    """The PNG previews of a written scan, with the detector calibration and the virtual
    detectors ``config`` gave it (stream/files/previews.py); ``stop`` as write_scan_previews."""
    if r.geometry is None:
        return write_scan_previews(r, stop=stop)
    try:
        cal = calibration(config, r.geometry)
        detectors = detector_regions(config, r.geometry)
    except ConfigError:  # the scan was written with what fitted; draw without the detectors
        return write_scan_previews(r, stop=stop)
    return write_scan_previews(r, detectors, cal.mrad_per_px, cal.center, stop=stop)


def _ranges_text(ranges, limit: int = 8) -> str:
    """'3-7, 12, 40-41' from [first, stop) runs, shortened after ``limit`` runs."""
    parts = [f"{a}" if b - a == 1 else f"{a}-{b - 1}" for a, b in ranges]
    more = f", ... ({len(parts) - limit} more ranges)" if len(parts) > limit else ""
    return ", ".join(parts[:limit]) + more
