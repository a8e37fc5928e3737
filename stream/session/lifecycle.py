"""Scan lifecycle, decided from the receivers' reports.

open (first report of a scan_id) → receiving → closed when every source's ``end`` arrived and
every frame it announced is accounted for, or when nothing arrived for ``timeout_s``, or
shortly after an ``abort`` → finalized by the session. The tracker is plain Python over small
messages: no sockets, no dask, so that it can be tested alone.

A scan exists for the tracker once a receiver reports its ``start`` or opens it (receivers open
only announced scans, docs/PROTOCOL.md). An ``end`` or ``abort`` of a scan not seen yet waits
for it (``WAIT_FOR_START_S``); if none comes it is counted as an ``unannounced`` reject.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from operators.completeness import Completeness

from stream.transport.protocol import Geometry, ProtocolError

RECEIVING, CLOSING, DONE = "receiving", "closing", "done"
ABORT_GRACE_S = 1.0  # after an abort, frames already queued in other receivers still count
WAIT_FOR_START_S = 60.0  # an end or abort of a scan not seen yet waits this long for its start
MAX_WAITING = 4096  # scans whose end or abort waits for their start


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
    close_reason: str = ""  # complete | timeout | abort | closed
    abort_reason: str = ""
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
        if self._received is None:
            return 0
        r = self._received["received"]
        return int(np.maximum(r.astype(np.int64) - 1, 0).sum())

    def missing_so_far(self) -> int:
        """Frames announced by the sources' ``end`` messages that have not all arrived yet:
        the most any one source still owes (0 until a source has ended)."""
        if self._distinct is None:
            return 0
        return max((sent - int(self._distinct[s]) for s, sent in self.frames_sent.items()
                    if 0 <= s < len(self._distinct)), default=0)

    @property
    def all_ended(self) -> bool:
        return self.geometry is not None and len(self.frames_sent) == self.geometry.n_sources

    def release(self) -> None:
        """Drop the per-frame bookkeeping once the scan is done (the file has it)."""
        self._completeness = self._received = None


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
        # end / abort reports of scans not opened yet: scan -> (first seen, reports)
        self._waiting: OrderedDict[str, tuple[float, list]] = OrderedDict()
        self._forgotten: OrderedDict[str, None] = OrderedDict()  # finished long ago: never reopened

    def _scan(self, scan_id: str) -> ScanStatus:
        st = self.scans.get(scan_id)
        if st is None:
            st = self.scans[scan_id] = ScanStatus(scan_id, opened=self.wall(), last_activity=self.clock())
        st.last_activity = self.clock()
        return st

    def _count_reject(self, reason: str, st: ScanStatus | None = None, n: int = 1) -> None:
        self.rejects[reason] = self.rejects.get(reason, 0) + n
        if st is not None:
            st.rejects += n

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
            self._count_reject(report["reason"], st, int(report.get("count", 1)))
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

    def _frames(self, st: ScanStatus, worker, report: dict) -> None:
        now = self.wall()
        st.first_frame_time = st.first_frame_time or now
        st.last_frame_time = now
        st.events += report["events"]
        st.worker_events[worker] += report["events"]
        if st._received is None:
            return
        rec = st._received["received"]
        for source, first, count in report["ranges"]:
            if not (0 <= source < rec.shape[0] and 0 <= first and first + count <= rec.shape[1]):
                raise ProtocolError("bad_geometry", f"frames {first}+{count} of source {source}")
            st._distinct[source] += count - np.count_nonzero(rec[source, first:first + count])
            st._completeness.add_range(st._received, source, first, count)

    def due(self) -> list[ScanStatus]:
        """Scans that must close now; each is returned once and marked closing."""
        now = self.clock()
        out = []
        for st in self.active():
            quiet = now - st.last_activity
            reason = None
            if st.abort_reason and quiet >= min(ABORT_GRACE_S, self.timeout_s):
                reason = "abort"
            elif not st.abort_reason and st.all_ended and st.missing_so_far() <= 0:
                reason = "complete"
            elif quiet >= self.timeout_s:
                reason = "timeout"
            if reason:
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
