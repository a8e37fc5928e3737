"""A real detector behind the session: the plan its workers' sources follow, and, in active
mode, arming (and triggering) one acquisition per scan (docs/DECTRIS.md, docs/MERLIN.md)."""

from __future__ import annotations

import time
from urllib.parse import urlsplit

from stream.config import DetectorSpec
from stream.security import generate
from stream.sources.base import DetectorError, DetectorRefused, SourcePlan, new_prefix
from stream.sources.dectris import DectrisControl, SimplonClient, dcu_url, default_stream
from stream.sources.merlin import MerlinControl
from stream.transport.net import free_port_block


def detector_workers(client, timeout_s: float = 60.0) -> list[str]:
    """The workers now, asked of the workers themselves (the client's cached list may be
    empty while workers restart); waits for at least one."""
    client.wait_for_workers(1, timeout=timeout_s)
    return sorted(client.run(_alive))


def _alive():
    return True


def source_plan(spec: DetectorSpec, client, workers: list[str], prefix: str | None = None,
                curve: bool = False, max_message_bytes: int = 0) -> SourcePlan | None:
    """The SourcePlan every worker builds its source from; None for ``stemstream``.

    Merlin: the first worker holds the data connection and forwards on a free port of the
    host its dask worker listens on (the interface dask was configured with; 127.0.0.1 for
    the local cluster), found there, through dask, before any receiver starts. With ``curve``
    that channel is CURVE with keys made for this session (they travel in the plan, over
    dask's TLS). ``max_message_bytes``: the per-message budget ([limits] max_message_mb)."""
    if spec.kind == "stemstream":
        return None
    calibration = {k: getattr(spec, k) for k in ("mrad_per_px", "convergence_mrad", "center")
                   if getattr(spec, k) is not None}
    scan = tuple(spec.scan) if spec.scan else None
    plan = SourcePlan(spec.kind, scan, spec.data or "", mode=spec.mode, prefix=prefix or new_prefix(),
                      gap_timeout_s=spec.gap_timeout_s, calibration=calibration, control=spec.control,
                      max_message_bytes=max_message_bytes)
    if spec.kind == "dectris":
        plan.dcu = dcu_url(spec.dcu) if spec.dcu else None
        plan.data = spec.data or default_stream(plan.dcu)
    else:
        plan.leader = workers[0]
        plan.n_workers = len(workers)
        host = urlsplit(workers[0]).hostname
        port = client.run(free_port_block, 1, host, workers=[workers[0]])[workers[0]]
        plan.forward = f"tcp://{host}:{port}"
        if curve:
            plan.forward_server, plan.forward_client = generate(), generate()
    return plan


class DetectorLink:
    """The session's side of a detector: settings read at start, and in active mode one
    acquisition per call of :meth:`acquire`."""

    def __init__(self, session, spec: DetectorSpec):
        """Connect to the detector's control (before any worker starts: a wrong address
        fails in seconds); ``plan`` is set once the workers are known."""
        self.session = session
        self.spec = spec
        self.plan: SourcePlan | None = None
        self.dectris = self.merlin = self.control = None
        if spec.kind == "dectris" and spec.dcu:
            self.dectris = SimplonClient(spec.dcu, spec.request_timeout_s)
        if spec.kind == "merlin" and spec.control and spec.mode == "active":
            # only in active mode: Merlin serves one control client, which in passive mode is
            # whoever starts the acquisitions
            self.merlin = MerlinControl(spec.control, spec.request_timeout_s)

    def set_plan(self, plan: SourcePlan) -> None:
        self.plan = plan
        if self.dectris is not None:
            self.control = DectrisControl(plan, self.dectris, self.session.source_command,
                                          self.spec.trigger_mode or "exte")

    def describe(self) -> str:
        where = f"DCU {self.plan.dcu}, stream {self.plan.data}" if self.plan.kind == "dectris" else \
            f"data {self.plan.data}" + (f", control {self.spec.control}" if self.spec.control else "")
        scan = "x".join(map(str, self.plan.scan_shape)) if self.plan.scan_shape else "from each header"
        return f"{self.plan.kind} ({where}), {self.plan.mode} mode, scan {scan}"

    def prepare(self) -> None:
        """Turn the DCU's stream on with the configuration in each series header (as
        LiberTEM-live does, passive mode too); check a Merlin answers."""
        if self.dectris is not None:
            try:
                self.dectris.enable_stream()
            except DetectorRefused as e:  # busy with an acquisition: it answers, that is enough
                self.session.console.say(f"WARNING: {e}; the stream settings are left as they are")
        if self.merlin is not None:
            self.merlin.get("COUNTERDEPTH")

    def wait_connected(self, timeout_s: float = 10.0) -> list[str]:
        """DECTRIS: wait until every worker's stream socket has completed its handshake with
        the DCU's (the workers' own monitors say so). ZeroMQ hands each image to a worker
        connected when it is pushed: one that connects after the series began gets none of
        it. Returns the workers still not connected after ``timeout_s`` (empty: all are)."""
        deadline = time.monotonic() + timeout_s
        while True:
            late = sorted(w for w, ok in self.session.source_command("connected").items() if not ok)
            if not late or time.monotonic() >= deadline:
                return late
            time.sleep(0.02)

    def close(self) -> None:
        if self.merlin is not None:
            self.merlin.close()

    def acquire(self, timeout: float | None = None):
        """Active mode: start one acquisition of the scan and return its ScanResult.

        Raises DetectorError naming the detector when it refuses, does not answer within
        ``[detector] request_timeout_s``, or sends no frame within ``trigger_timeout_s``."""
        if self.plan.mode != "active":
            raise DetectorError("acquire() needs [detector] mode = active (--mode active)")
        s = self.session
        before = {st["scan_id"] for st in s.status()}
        ny, nx = self.plan.scan_shape
        scan_id = None
        if self.plan.kind == "dectris":
            late = self.wait_connected(self.spec.request_timeout_s)
            if late:  # the others take every image; the scan is still whole
                s.console.say(f"WARNING: DECTRIS stream {self.plan.data} not connected on worker(s) "
                              f"{', '.join(late)} after {self.spec.request_timeout_s:g} s; arming anyway, "
                              "the connected workers take every image")
            series, scan_id = self.control.start_acquisition()
            s.console.say(f"[{scan_id}] armed DECTRIS series {series} at {self.plan.dcu} "
                          f"({ny}x{nx} images, trigger {self.control.trigger_mode})")
            stop = self.control.stop
        else:
            self.merlin.start_acquisition(ny * nx, soft_trigger=(self.spec.trigger_mode or "soft") == "soft")
            s.console.say(f"started a Merlin acquisition of {ny * nx} frames at {self.spec.control}")
            stop = self._merlin_stop
        deadline = time.monotonic() + self.spec.trigger_timeout_s
        while True:  # the first frame within the trigger timeout
            seen = [st for st in s.status() if st["scan_id"] not in before and st["frames_received"] > 0]
            seen = [st for st in seen if scan_id is None or st["scan_id"] == scan_id]
            if seen or scan_id in s.results:
                scan_id = scan_id or seen[0]["scan_id"]
                break
            if time.monotonic() > deadline:
                stop()
                raise DetectorError(
                    f"armed {self.describe()}, but no frame arrived on {self.plan.data} within "
                    f"{self.spec.trigger_timeout_s:g} s; check the trigger (the scan engine's for "
                    "external triggers) and the data address, or raise [detector] trigger_timeout_s")
            time.sleep(0.05)
        return s.wait(scan_id, timeout)

    def _merlin_stop(self) -> None:
        try:
            self.merlin.cmd("STOPACQUISITION")
        except DetectorError:
            pass
