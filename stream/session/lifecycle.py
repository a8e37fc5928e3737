"""Scan lifecycle, decided from the receivers' reports.

open (first report of a scan_id) → receiving → closed → finalized by the session. A scan
closes

- ``complete``: at once when every source's ``end`` arrived and every frame it announced was
  processed (an announcement counts at most the scan's frames);
- otherwise when it must (every source ended: ``ended``; an ``abort``; no message of it for
  ``timeout_s``: ``timeout``) *and* every live receiver has drained: its heartbeat says its
  input queue was empty at least ``DRAIN_GRACE_S`` after that moment and it holds no
  unprocessed message of the scan. A silent receiver (a stopped or overloaded worker) keeps
  the scan open, so its frames count when it resumes; only when dask removes its worker
  (``worker_gone``) does it stop counting, and the frames it had processed are named lost
  with that cause.

The tracker is plain Python over small messages: no sockets, no dask, so that it can be
tested alone.

A scan exists for the tracker once a receiver reports its ``start`` or opens it (receivers open
only announced scans, docs/PROTOCOL.md). An ``end`` or ``abort`` of a scan not seen yet waits
for it (``WAIT_FOR_START_S``); if none comes it is counted as an ``unannounced`` reject.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from operators.completeness import SATURATED, Completeness

from stream.transport.protocol import Geometry, ProtocolError

RECEIVING, CLOSING, DONE = "receiving", "closing", "done"
# Frames a source sent before its end (or abort, or the timeout) are in a live receiver's
# queue within this long (s, wall clock; receivers on other hosts need clocks synchronised
# well within it, as NTP keeps them).
DRAIN_GRACE_S = 1.0
SILENT_S = 2.0  # a receiver without a heartbeat for this long is stalled (named on the console)
EARLY_REJECTS_S = 60.0  # a reject naming a scan not open yet counts in it if it opens this soon
EARLY_REJECTS_MAX = 4096  # scan ids whose early rejects are remembered (a flood costs no more)
WAIT_FOR_START_S = 60.0  # an end or abort of a scan not seen yet waits this long for its start
MAX_WAITING = 4096  # scans whose end or abort waits for their start


@dataclass
class ReceiverView:
    """One receiver as its heartbeats describe it. ``last_seen`` is monotonic (this clock);
    ``empty_at`` wall-clock s (the receiver's) when its input queue was last found empty;
    ``pending``: scans with messages read but not yet reported; ``gone``: why dask removed
    its worker ('' while it is there)."""

    worker: str
    last_seen: float
    empty_at: float = 0.0
    pending: frozenset = frozenset()
    input_waiting: bool = False
    scans: dict = field(default_factory=dict)  # scan -> [frame parts read, processed]
    gone: str = ""


@dataclass
class ScanStatus:
    """One scan as the coordinator follows it. Times named ``*_time`` and ``opened`` are
    wall-clock seconds (for reports); ``last_activity`` is monotonic (for timeouts)."""

    scan_id: str
    opened: float
    last_activity: float
    geometry: Geometry | None = None
    metadata: dict = field(default_factory=dict)
    state: str = RECEIVING
    close_reason: str = ""  # complete | ended | timeout | abort | closed
    abort_reason: str = ""
    settle_from: float | None = None  # wall-clock s from which receivers must drain to close it
    lost: dict = field(default_factory=dict)  # worker -> why dask removed it (it held frames)
    worker_frames: dict = field(default_factory=dict)  # worker -> frame parts it processed
    late_frames: int = 0  # frame parts dropped because they came after the scan closed
    reject_reasons: dict = field(default_factory=dict)  # reason -> rejected messages naming it
    said_waiting: float = 0.0  # monotonic time the console last named the receivers it waits for
    frames_sent: dict = field(default_factory=dict)  # source -> frames its end announced
    events: int = 0
    worker_events: dict = field(default_factory=dict)  # worker -> electrons it processed
    first_frame_time: float | None = None
    last_frame_time: float | None = None
    closed_time: float | None = None
    rejects: int = 0
    errors: list = field(default_factory=list)  # why the scan's operators failed, if they did
    _completeness: Completeness | None = None
    _received: dict | None = None
    _distinct: np.ndarray | None = None  # distinct frames received per source
    _extra: int = 0  # frame parts received again (what ``duplicates`` says), kept as reports come
    _late: np.ndarray | None = None  # (n_sources, n_frames) bool: parts dropped as late

    @property
    def n_frames(self) -> int:
        return self.geometry.n_frames if self.geometry else 0

    @property
    def frames_received(self) -> int:
        """Distinct frames received, summed over sources, divided by the number of sources."""
        if self._distinct is None:
            return 0
        return int(self._distinct.sum()) // max(1, len(self._distinct))

    @property
    def duplicates(self) -> int:
        # counted as the reports come: summing the scan-sized counts took 1.7 ms at 1024²,
        # and status() and every live snapshot read it
        return 0 if self._received is None else self._extra

    def missing_so_far(self) -> int:
        """Frames announced by the sources' ``end`` messages that have not all arrived yet:
        the most any one source still owes (0 until a source has ended). ``frames_sent``
        counts distinct frames; a larger number (a source that counted its re-sends) owes at
        most the scan's frames."""
        if self._distinct is None:
            return 0
        return max((min(sent, self.n_frames) - int(self._distinct[s]) for s, sent in self.frames_sent.items()
                    if 0 <= s < len(self._distinct)), default=0)

    def late_mask(self) -> np.ndarray | None:
        """(n_sources, n_frames) bool: frame parts dropped because they came after the close."""
        return self._late

    def reported(self) -> np.ndarray | None:
        """(n_sources, n_frames) bool: frame parts some receiver processed and reported."""
        return None if self._received is None else self._received["received"] > 0

    def complete_prefix(self, start: int = 0) -> int:
        """The first frame number >= ``start`` that some source's part has not been reported
        for yet (``n_frames`` if none): frames ``[start, it)`` arrived from every source."""
        if self._received is None:
            return start
        rec, n, step = self._received["received"], self.n_frames, 1 << 14
        lo = start
        while lo < n:  # windows: the answer is usually near the receivers' front
            hi = min(n, lo + step)
            gap = np.flatnonzero((rec[:, lo:hi] == 0).any(axis=0))
            if len(gap):
                return lo + int(gap[0])
            lo, step = hi, step * 2
        return n

    def repeated(self, lo: int, hi: int) -> bool:
        """Some part of frames ``[lo, hi)`` was reported more than once."""
        return self._received is not None and hi > lo and int(self._received["received"][:, lo:hi].max()) > 1

    @property
    def all_ended(self) -> bool:
        return self.geometry is not None and len(self.frames_sent) == self.geometry.n_sources

    @property
    def sending_done(self) -> bool:
        """Every source sent its ``end``, or one aborted: no source sends more of it, the scan
        is about to close (once the receivers drained) and its file is its final picture."""
        return self.all_ended or bool(self.abort_reason)

    def release(self) -> None:
        """Drop the per-frame bookkeeping once the scan is done (the file has it)."""
        self._completeness = self._received = self._late = None


class ScanTracker:
    """Follow every scan from the receivers' reports and say when each must close.

    clock: monotonic seconds for timeouts; wall: seconds since the epoch for timestamps.
    """

    def __init__(self, timeout_s: float = 5.0, clock=time.monotonic, wall=time.time,
                 announce_grace_s: float = 5.0):
        self.timeout_s = timeout_s
        self.announce_grace_s = announce_grace_s
        self.clock = clock
        self.wall = wall
        self.scans: dict[str, ScanStatus] = {}
        self.rejects: dict[str, int] = {}
        self.receivers: dict[str, ReceiverView] = {}
        self._early: OrderedDict[str, tuple[float, dict]] = OrderedDict()  # scan -> (time, reason counts)
        # end / abort reports of scans not opened yet: scan -> (first seen, reports)
        self._waiting: OrderedDict[str, tuple[float, list]] = OrderedDict()
        self._forgotten: OrderedDict[str, None] = OrderedDict()  # finished long ago: never reopened

    def _scan(self, scan_id: str) -> ScanStatus:
        st = self.scans.get(scan_id)
        if st is None:
            st = self.scans[scan_id] = ScanStatus(scan_id, opened=self.wall(), last_activity=self.clock())
            t, reasons = self._early.pop(scan_id, (0.0, {}))
            if self.clock() - t <= EARLY_REJECTS_S:  # rejected before any receiver reported it open
                for reason, n in reasons.items():
                    st.rejects += n
                    st.reject_reasons[reason] = st.reject_reasons.get(reason, 0) + n
        st.last_activity = self.clock()
        return st

    def _remember_early(self, scan_id: str, reason: str, n: int = 1) -> None:
        """A reject naming a scan that is not open (its receiver's report may simply come
        later): kept, bounded, for the scan's file."""
        t, reasons = self._early.pop(scan_id, (self.clock(), {}))
        reasons[reason] = reasons.get(reason, 0) + n
        self._early[scan_id] = (t, reasons)
        while len(self._early) > EARLY_REJECTS_MAX:
            self._early.popitem(last=False)

    def _count_reject(self, reason: str, st: ScanStatus | None = None, n: int = 1) -> None:
        self.rejects[reason] = self.rejects.get(reason, 0) + n
        if st is not None:
            st.rejects += n
            st.reject_reasons[reason] = st.reject_reasons.get(reason, 0) + n

    # -------------------------------------------------------------- receivers
    def _receiver(self, worker) -> ReceiverView | None:
        if worker is None:
            return None
        rv = self.receivers.get(worker)
        if rv is None:
            rv = self.receivers[worker] = ReceiverView(worker, self.clock())
        rv.last_seen = self.clock()
        return rv

    def heartbeat(self, report: dict) -> None:
        """A receiver's heartbeat (stream.transport.receiver.Receiver._heartbeat)."""
        rv = self._receiver(report.get("worker"))
        if rv is None or rv.gone:
            return
        rv.empty_at = float(report.get("empty_at", 0.0))
        rv.pending = frozenset(report.get("pending", ()))
        rv.input_waiting = bool(report.get("input_waiting"))
        rv.scans = dict(report.get("scans", {}))

    def worker_gone(self, worker: str, cause: str) -> list[ScanStatus]:
        """Dask removed ``worker``: its receiver no longer holds scans open, and the scans
        whose frames it processed lose them (``lost``, with ``cause``). Returns those scans."""
        rv = self.receivers.get(worker) or self.receivers.setdefault(worker, ReceiverView(worker, self.clock()))
        rv.gone = rv.gone or cause
        hit = []
        for st in self.scans.values():
            if st.state != DONE and st.worker_frames.get(worker):
                st.lost.setdefault(worker, cause)
                hit.append(st)
        return hit

    def live(self) -> list[ReceiverView]:
        return [rv for rv in self.receivers.values() if not rv.gone]

    def _drained(self, rv: ReceiverView, st: ScanStatus) -> bool:
        return rv.empty_at >= st.settle_from + DRAIN_GRACE_S and st.scan_id not in rv.pending

    def waiting_for(self, st: ScanStatus) -> list[ReceiverView]:
        """Live receivers a scan that must close still waits for (their queue may hold its
        frames)."""
        if st.settle_from is None:
            return []
        return [rv for rv in self.live() if not self._drained(rv, st)]

    def stalled(self, silent_s: float = SILENT_S) -> list[ReceiverView]:
        """Live receivers that sent nothing for ``silent_s``."""
        now = self.clock()
        return [rv for rv in self.live() if now - rv.last_seen >= silent_s]

    def _set_geometry(self, st: ScanStatus, wire: dict) -> None:
        g = Geometry.from_wire(wire).for_sector(None)
        if st.geometry is None:
            st.geometry = g
            st._completeness = Completeness(g.n_sources, g.scan_shape, g.frames_per_position, g.flyback)
            st._received = st._completeness.new_state()
            st._distinct = np.zeros(g.n_sources, np.int64)
            for source in [s for s in st.frames_sent if not 0 <= s < g.n_sources]:
                del st.frames_sent[source]  # an end that came before the geometry, from no source
                self._count_reject("bad_header", st)
        elif not st.geometry.same_scan(g):  # two receivers opened it with different geometry
            self._count_reject("bad_geometry", st)
            if len(st.errors) < 5:
                st.errors.append(f"receivers saw two geometries for this scan: {st.geometry} and {g}")

    def handle(self, report: dict) -> ScanStatus | None:
        """Take one receiver report; returns the scan it concerns (None for non-scan reports).
        A report that does not fit the scan is counted as a reject, never raised."""
        kind = report.get("kind")
        if kind == "heartbeat":
            self.heartbeat(report)
            return None
        self._receiver(report.get("worker"))
        if kind == "reject":
            sid = report.get("scan_id")
            st = None
            if sid:  # a reject that names its scan is part of that scan's story
                st = self.scans.get(sid)
                if st is None and report["reason"] in ("operator_error", "bad_geometry") \
                        and sid not in self._forgotten:
                    st = self._scan(sid)  # a scan that failed before any receiver could open it
                # operators that could not be built: the only trace of the scan (failures while
                # processing come with the receivers' states)
                if st is not None and st.geometry is None and report["reason"] == "operator_error" \
                        and len(st.errors) < 5:
                    st.errors.append(report.get("detail", ""))
                if st is None and sid not in self._forgotten:
                    self._remember_early(sid, report["reason"], int(report.get("count", 1)))
            self._count_reject(report["reason"], st, int(report.get("count", 1)))
            if st is not None and report["reason"] == "late":
                self._late(st, report.get("ranges") or [])
            return None
        if kind not in ("start", "frames", "end", "abort", "geometry"):
            return None
        sid = report["scan_id"]
        existing = self.scans.get(sid)
        if (existing is not None and existing.state != RECEIVING) or sid in self._forgotten:
            return None  # the receivers reject late messages; nothing more changes this scan
        if existing is None and kind in ("end", "abort", "frames"):
            self._wait_for_start(sid, report)
            return None
        st = self._scan(sid)
        waiting = self._waiting.pop(sid, None)
        if waiting is not None:  # its end or abort came first, through another receiver
            self._apply(st, report)
            for early in waiting[1]:
                self._apply(st, early)
            return st
        return self._apply(st, report)

    def _wait_for_start(self, sid: str, report: dict) -> None:
        since, reports = self._waiting.get(sid, (self.clock(), []))
        if len(reports) < 2 * 256:  # at most an end and an abort per source
            reports.append(report)
        self._waiting[sid] = (since, reports)

    def expire_unannounced(self) -> int:
        """Drop the end / abort reports of scans no start came for (counted as ``unannounced``
        rejects): after ``WAIT_FOR_START_S`` (the start's report may be late behind a busy
        receiver's backlog, and these reports are small), or the oldest beyond
        ``MAX_WAITING`` scans. Returns how many were dropped."""
        now, dropped = self.clock(), 0
        while self._waiting:
            sid, (since, reports) = next(iter(self._waiting.items()))
            if now - since < max(WAIT_FOR_START_S, self.announce_grace_s) and len(self._waiting) <= MAX_WAITING:
                break
            del self._waiting[sid]
            self._count_reject("unannounced", None, len(reports))
            dropped += len(reports)
        return dropped

    def _apply(self, st: ScanStatus, report: dict) -> ScanStatus:
        kind = report["kind"]
        worker = report.get("worker")
        st.worker_events.setdefault(worker, 0)
        try:
            if kind in ("start", "geometry"):
                self._set_geometry(st, report["geometry"])
                if kind == "start":  # several starts (a detector's header and configuration
                    # may reach different receivers): the first value of each key stays
                    st.metadata = {**report.get("metadata", {}), **st.metadata}
            elif kind == "frames":
                self._frames(st, worker, report)
            elif kind == "end":
                if st.geometry is not None and not 0 <= report["source"] < st.geometry.n_sources:
                    raise ProtocolError("bad_header", f"end from source {report['source']}")
                st.frames_sent[report["source"]] = report["frames_sent"]
            else:
                st.abort_reason = st.abort_reason or report.get("reason", "") or "aborted by the source"
        except ProtocolError as e:
            self._count_reject(e.reason, st)
        return st

    @staticmethod
    def _late(st: ScanStatus, ranges: list) -> None:
        for source, first, count in ranges:
            st.late_frames += int(count)
            if st.geometry is None:
                continue
            if st._late is None:
                st._late = np.zeros((st.geometry.n_sources, st.n_frames), bool)
            if 0 <= source < st._late.shape[0] and 0 <= first and first + count <= st._late.shape[1]:
                st._late[source, first:first + count] = True

    def _frames(self, st: ScanStatus, worker, report: dict) -> None:
        now = self.wall()
        st.first_frame_time = st.first_frame_time or now
        st.last_frame_time = now
        st.events += report["events"]
        st.worker_events[worker] += report["events"]
        st.worker_frames[worker] = st.worker_frames.get(worker, 0) + sum(r[2] for r in report["ranges"])
        if st._received is None:
            return
        rec = st._received["received"]
        for source, first, count in report["ranges"]:
            if not (0 <= source < rec.shape[0] and 0 <= first and first + count <= rec.shape[1]):
                raise ProtocolError("bad_geometry", f"frames {first}+{count} of source {source}")
            seen = rec[source, first:first + count]
            before = int(np.count_nonzero(seen))
            st._distinct[source] += count - before
            # one more copy of each frame seen before, but where its count is saturated
            st._extra += before - int(np.count_nonzero(seen == SATURATED))
            st._completeness.add_range(st._received, source, first, count)

    def due(self) -> list[ScanStatus]:
        """Scans that must close now; each is returned once and marked closing."""
        now, wall = self.clock(), self.wall()
        out = []
        for st in self.active():
            if not st.abort_reason and st.all_ended and st.missing_so_far() <= 0:
                reason = "complete"
            else:
                reason = "abort" if st.abort_reason else "ended" if st.all_ended else \
                    "timeout" if now - st.last_activity >= self.timeout_s else None
                if reason is None:  # a source is still sending
                    st.settle_from = None
                    continue
                if st.settle_from is None:
                    st.settle_from = wall
                if self.waiting_for(st):
                    continue
            self.close(st, reason)
            out.append(st)
        return out

    def close(self, st: ScanStatus, reason: str) -> None:
        st.state, st.close_reason, st.closed_time = CLOSING, reason, self.wall()

    def finished(self, scan_id: str) -> bool:
        """Closed and written (or forgotten): nothing of it should be open anywhere."""
        st = self.scans.get(scan_id)
        return (st is not None and st.state == DONE) or scan_id in self._forgotten

    def active(self) -> list[ScanStatus]:
        return [s for s in self.scans.values() if s.state == RECEIVING]

    def forget_done(self, keep: int = 256) -> None:
        """Keep only the newest ``keep`` finished scans (a session may run for weeks); their
        ids are remembered so that a late report never reopens one. Call it from the thread
        that calls handle() and due()."""
        done = [sid for sid, s in self.scans.items() if s.state == DONE]
        for sid in done[:max(0, len(done) - keep)]:
            del self.scans[sid]
            self._forgotten[sid] = None
        while len(self._forgotten) > 100_000:
            self._forgotten.popitem(last=False)
