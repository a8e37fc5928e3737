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
from stream.session import cluster, stopping
from stream.transport import control
from stream.transport.links import unreached
from stream.transport.protocol import Geometry
from stream.transport.receiver import OVER_BUDGET, TOO_MANY_SCANS
from stream.config import (ConfigError, PipelineConfig, build_operators, calibration, coordinator_state_bytes,
                           detector_regions, load_config, validate)
from stream.session.finalize import ScanInfo, ScanResult, finalize_on_cluster
from stream.session.lifecycle import DONE, ScanStatus, ScanTracker
from stream.files.previews import write_scan_previews
from stream.stages.series import SeriesCollector
from stream.stages.runner import run_stages
from stream.stages.tomo import reconstruct_series
from stream.session.worker import STAGE_EXECUTOR, ReceiverPlugin, close_on_worker, source_command
from stream.session.detector import DetectorLink, detector_workers, source_plan

log = logging.getLogger("stemstream.session")
LIVE_PROTO = "stemstream-live/1"
KEEP_RESULTS = 16  # finished scans whose images Session.results keeps (all keep their summary)
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
    """Progress lines: one per active scan about once a second, and one per finished scan."""

    def __init__(self, enabled: bool = True, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self._last = 0.0
        self._seen: dict[str, tuple[float, int]] = {}  # scan -> (time, frames) at the last line

    def say(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)

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
        up and printed when not given). ``session.viewer.url`` is its address.
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
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="stemstream-finalize")
        self._plugin_name = f"stemstream-receiver-{uuid.uuid4().hex[:8]}"
        self._thread = None
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

    # -------------------------------------------------------------- start / stop
    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()

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
            except zmq.ZMQError as e:
                raise ConfigError(f"cannot bind the live results socket {self.config.live.publish}: "
                                  f"{e.strerror}; choose another --publish address") from None
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
        self.workers = sorted(self._client.scheduler_info()["workers"])
        self._thread = threading.Thread(target=self._loop, name="stemstream-coordinator", daemon=True)
        self._thread.start()

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

    def close(self) -> None:
        """Stop receiving. Reports already sent are read first; then scans still receiving
        are closed with what arrived (written as incomplete, reason 'the session stopped');
        scans already closing are finished first."""
        if self.viewer is not None:
            self.viewer.close()
        if self._thread is not None and self._thread.is_alive():
            self._stop.set()
            self._thread.join(30)
        if self._pull is not None and not (self._thread and self._thread.is_alive()):
            self._drain_reports()  # this thread owns the sockets from here on
            for st in self._tracker.due():
                self._executor.submit(self._finalize, st)
            for st in self._tracker.active():
                self._tracker.close(st, "closed")
                self._executor.submit(self._finalize, st)
        self._executor.shutdown(wait=True)
        for scan_id, fut in list(self._stage_runs.items()) + list(self._series_runs.items()):  # they write files
            try:
                fut.result(timeout=self.config.scan.finalize_timeout_s)
            except Exception as e:  # noqa: BLE001 - reported, closing anyway
                self.console.say(f"WARNING [{scan_id}] stages did not finish: {type(e).__name__}: {e}")
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        while self._pub is not None and not self._outbox.empty():  # the last 'done' messages
            self._pub.send_multipart(self._outbox.get())
        if self._client is not None and self._thread is not None:
            try:
                self._client.unregister_worker_plugin(self._plugin_name)
            except Exception as e:  # noqa: BLE001 - shutting down anyway
                log.debug("unregistering the receiver plugin failed: %s", e)
            if self._cluster is None:
                stopping.uninstall(self._client, f"{self._plugin_name}-stop")  # a held SIGTERM goes on now
        if self.detector is not None:
            self.detector.close()
        for sock in (self._pull, self._pub, self._control):
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

    def _drain_reports(self, quiet_s: float = 0.3, max_s: float = 2.0) -> None:
        """Handle every report already on its way (until ``quiet_s`` without one, at most
        ``max_s``: a detector still sending must not keep a stopping session open)."""
        end = time.monotonic() + max_s
        while time.monotonic() < end and self._pull.poll(int(quiet_s * 1000)):
            while True:
                try:
                    parts = self._pull.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self._handle_report(parts, set())

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

    def status(self) -> list[dict]:
        """Plain-value status of every scan seen (for dashboards and tests)."""
        return [{"scan_id": s.scan_id, "state": s.state, "frames_received": s.frames_received,
                 "n_frames": s.n_frames, "events": s.events, "missing_so_far": s.missing_so_far(),
                 "duplicates": s.duplicates, "worker_events": dict(s.worker_events)}
                for s in list(self._tracker.scans.values())]

    def acquire(self, timeout: float | None = None) -> ScanResult:
        """Active mode (``[detector] mode = "active"``): arm (and trigger) one acquisition of
        the detector and return its finished scan. Raises DetectorError naming the detector
        when it refuses, does not answer, or sends no frame (docs/DECTRIS.md, MERLIN.md)."""
        if self.detector is None:
            raise ConfigError("acquire() needs a DECTRIS or Merlin detector ([detector] kind)")
        return self.detector.acquire(timeout)

    def source_command(self, name: str, *args) -> None:
        """Send a control request to every worker's detector source (and wait for them)."""
        self._client.run(source_command, self._plugin_name, name, *args)

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
        images are then in ``wait(scan_id).results``). KeyError naming the scans there are for
        a scan id this session has not seen."""
        with self._cond:
            finished = scan_id in self._results
        if scan_id not in self._tracker.scans and not finished:
            seen = [st.scan_id for st in list(self._tracker.scans.values())]
            running = [sid for sid in seen if sid not in self._results]
            raise KeyError(f"no scan {scan_id!r} in this session; running: {', '.join(running) or 'none'}"
                           f" (session.status() lists every scan seen, session.results the finished ones)")
        states = {}
        with self._live_lock:  # the workers' arrays are updated in place under this lock
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
        live_period = 1.0 / self.config.live.rate_hz if self.config.live.rate_hz > 0 else None
        next_live = next_forget = next_announce = time.monotonic()
        next_links = next_live + LINK_GRACE_S  # connecting takes a moment; then say what is not
        warned = set()
        while not self._stop.is_set():
            try:
                if self._pull.poll(50):
                    for _ in range(1000):
                        try:
                            parts = self._pull.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._handle_report(parts, warned)
                due = self._tracker.due()
                for st in due:
                    self._executor.submit(self._finalize, st)
                if due:  # receivers stop counting them as open
                    self._tell_receivers("closing", [st.scan_id for st in due])
                if self._tracker.expire_unannounced() and "unannounced" not in warned:
                    warned.add("unannounced")
                    self.console.say("WARNING: end or abort messages of a scan no source announced with "
                                     "start were dropped (further ones are counted, not shown)")
                self.console.progress(self._tracker.active())
                now = time.monotonic()
                if now >= next_announce:  # for receivers that joined late or missed a message
                    next_announce = now + ANNOUNCE_PERIOD_S
                    active = [st.scan_id for st in self._tracker.active()]
                    if active:
                        self._tell_receivers("announced", active)
                if live_period and now >= next_live:
                    next_live = now + live_period
                    self._publish_live()
                if now >= next_forget:
                    next_forget = now + 10
                    self._tracker.forget_done()
                if now >= next_links:
                    next_links = now + 1.0
                    self._check_links()
                while not self._outbox.empty():  # ZMQ sockets belong to one thread: this one
                    parts = self._outbox.get()
                    if self._pub is not None:
                        self._pub.send_multipart(parts)
            except Exception as e:  # noqa: BLE001 - the coordinator must go on
                log.exception("coordinator turn failed")
                if type(e).__name__ not in warned:
                    warned.add(type(e).__name__)
                    self.console.say(f"WARNING: coordinator error (the session goes on): {e!r}")

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

    def _handle_report(self, parts, warned: set) -> None:
        try:
            self._on_report(*control.decode(parts), warned)
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
                self.console.say(f"WARNING: messages of scan {sid} arrive after it was closed and are "
                                 "dropped (after an abort or a failure, a stale stream, or a scan id "
                                 "used twice)")
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
        st = self._tracker.handle(report)
        if new and st is not None:  # receivers that did not see its start open it now
            self._tell_receivers("announced", [sid])
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
            if st.state != "receiving":
                return
            if sid not in self._live_ops:
                try:
                    self._live_ops[sid] = [op for op in build_operators(self.config, st.geometry) if op.live]
                except ValueError:
                    self._live_ops[sid] = []
            held = self._live.setdefault(sid, {}).setdefault(report["worker"], {})
            lo, hi, n_pos = report["lo"], report["hi"], st.geometry.n_positions
            for key, value in arrays.items():
                if key in report["nav"]:
                    if key not in held:
                        held[key] = np.zeros(value.shape[:-1] + (n_pos,), value.dtype)
                    held[key][..., lo:hi] = value
                else:
                    held[key] = value

    def _publish_live(self) -> None:
        if self._pub is None:
            return
        for st in self._tracker.active():
            images = self.live(st.scan_id)
            if images:
                header = {"proto": LIVE_PROTO, "kind": "live", "scan_id": st.scan_id,
                          "frames_received": st.frames_received, "n_frames": st.n_frames,
                          "events": st.events, "missing_so_far": st.missing_so_far()}
                header.update(_live_context(st, self._tracker.rejects, self._plugin_name))
                self._pub.send_multipart(control.encode(header, images))

    def links(self) -> dict[str, str]:
        """Sources no receiver is connected to now, each with why as far as known (empty
        when every source is reached)."""
        return unreached(self.connect, dict(self._links))

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
            self.console.say(
                f"waiting for the detector: no receiver could connect to {len(never)} of {len(self.connect)} "
                "source(s) yet: " + "; ".join(f"{address_ranges([a for a in never if never[a] == why])} ({why})"
                                              for why in dict.fromkeys(never.values()))
                + f". If the detector or emulator runs, check that it binds exactly these addresses "
                  f"(e.g. 'stemstream simulate --bind tcp://{first.hostname}:{first.port}"
                  f"{f' --sources {len(self.connect)}' if len(self.connect) > 1 else ''}') and that no "
                  "firewall is in between; the receivers keep trying")
        if gone:
            active = [st.scan_id for st in self._tracker.active() if not st.all_ended]  # (not: sent all, then left)
            self.console.say(
                (f"WARNING: during scan {', '.join(active)}, " if active else "")
                + f"the source(s) {address_ranges(gone)} closed their connection (the detector or emulator "
                  "ended or stopped); the receivers reconnect when they are back")
        if not missing and self._links_said:
            self.console.say(f"connected to all {len(self.connect)} source(s)")
        self._links_said = missing

    # -------------------------------------------------------------- finalization
    def _finalize(self, st: ScanStatus) -> None:
        try:
            result = self._run_finalize(st)
        except Exception as e:  # noqa: BLE001 - reported, and the session goes on
            log.exception("finalizing scan %s failed", st.scan_id)
            result = ScanResult(st.scan_id, None, "failed", f"finalize failed: {type(e).__name__}: {e}")
        self._start_stages(result)  # before wait() can return: wait_stages() then finds them
        self._feed_series(result, st.metadata)
        with self._live_lock:
            st.state = DONE
            self._live.pop(st.scan_id, None)
            self._live_ops.pop(st.scan_id, None)
        st.release()
        self._report_result(result)
        with self._cond:
            self._results[st.scan_id] = result
            self._order.append(st.scan_id)
            for old in self._order[-KEEP_RESULTS - 1:-KEEP_RESULTS]:  # a session may run for weeks:
                self._results[old] = replace(self._results[old], results={})  # the caller's copy stays whole
            self._cond.notify_all()
        self.console.forget(st.scan_id)
        self._write_previews(result)

    def _run_finalize(self, st: ScanStatus) -> ScanResult:
        """Close the scan on every worker (its state stays there), then finalize it with the
        worker that processed most of its electrons as the writer: the others' states travel
        to it, their events block by block."""
        from distributed import wait

        client = self._client
        workers = sorted(client.scheduler_info()["workers"])
        closed = [client.submit(close_on_worker, self._plugin_name, st.scan_id, workers=[w],
                                allow_other_workers=False, pure=False) for w in workers]
        timeout = self.config.scan.finalize_timeout_s
        workers, closed, lost = _without_lost_workers(client, workers, closed, timeout)
        gone = sorted(set(lost) | (set(st.worker_events) - set(workers) - {None}))
        if gone:  # a host cut off or a worker that died: what it had received is gone with it
            st.errors.append(f"worker{'s' if len(gone) > 1 else ''} {', '.join(gone)} left the cluster during "
                             "the scan; the frames received there are missing")
        if st.geometry is None:  # nothing but rejects or an abort before any geometry
            wait(closed, timeout=timeout)  # the workers forget the scan; nothing comes here
            why = st.errors[0] if st.errors else f"aborted by the source: {st.abort_reason}" \
                if st.abort_reason else "no valid message gave its geometry"
            return ScanResult(st.scan_id, None, "failed", f"closed ({st.close_reason}): {why}")
        writer = max(workers, key=lambda w: st.worker_events.get(w, 0))
        info = ScanInfo(st.scan_id, st.geometry, st.metadata, st.close_reason, st.abort_reason,
                        dict(st.frames_sent), st.rejects,
                        {"opened": st.opened, "first_frame": st.first_frame_time,
                         "last_frame": st.last_frame_time, "closed": st.closed_time}, workers,
                        errors=list(st.errors))
        return finalize_on_cluster(client, info, self.config, dict(zip(workers, closed)), writer, timeout)

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
            if r.n_missing:
                self.console.say(f"WARNING [{r.scan_id}] {r.n_missing:,} frames never arrived: "
                                 f"{_ranges_text(r.missing_ranges)}; see /completeness in {r.path}")
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
        except Exception as e:  # noqa: BLE001 - a preview is not worth a scan
            log.exception("previews of scan %s failed", r.scan_id)
            self.console.say(f"WARNING [{r.scan_id}] previews not written: {type(e).__name__}: {e}")


def _live_context(st: ScanStatus, rejects: dict, plugin_name: str) -> dict:
    """What a viewer attached to the live channel needs besides the images (docs/PROTOCOL.md):
    the geometry for its units, the scan step, duplicates, rejected messages, and the
    receivers' plugin name to compute drawn apertures on the cluster."""
    step = st.metadata.get("scan_step_A") if isinstance(st.metadata, dict) else None
    return {"duplicates": st.duplicates, "rejects": dict(rejects), "receivers": plugin_name,
            "geometry": st.geometry.to_wire() if st.geometry is not None else None,
            "scan_step_A": float(step) if isinstance(step, (int, float)) else None}


def _without_lost_workers(client, workers: list, closed: list, timeout: float):
    """Wait for every worker's close of a scan; a worker that leaves the cluster meanwhile
    (the scheduler drops it after ``distributed.scheduler.worker-ttl`` without a heartbeat)
    is lost, with its part of the scan. Returns the workers left, their futures, the lost."""
    deadline = time.monotonic() + timeout
    pending = dict(zip(workers, closed))
    lost = []
    while time.monotonic() < deadline and not all(f.done() for f in pending.values()):
        time.sleep(0.2)
        present = set(client.scheduler_info()["workers"])
        for w in [w for w, f in pending.items() if not f.done() and w not in present]:
            pending.pop(w).cancel()
            lost.append(w)
    return list(pending), list(pending.values()), lost


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
