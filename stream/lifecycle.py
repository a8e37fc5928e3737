"""Scan lifecycle, decided from the receivers' reports.

open (first report of a scan_id) → receiving → closed when every source's ``end`` arrived and
every frame it announced is accounted for, or when nothing arrived for ``timeout_s``, or on
``abort`` → finalized by the session. The tracker is plain Python over small messages: no
sockets, no dask, so that it can be tested alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from operators.completeness import Completeness

from .protocol import Geometry

RECEIVING, CLOSING, DONE = "receiving", "closing", "done"


@dataclass
class ScanStatus:
    scan_id: str
    opened: float
    last_activity: float
    geometry: Geometry | None = None
    metadata: dict = field(default_factory=dict)
    state: str = RECEIVING
    close_reason: str = ""  # complete | timeout | abort
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
        return max((sent - int(self._distinct[s]) for s, sent in self.frames_sent.items()), default=0)

    @property
    def all_ended(self) -> bool:
        return self.geometry is not None and len(self.frames_sent) == self.geometry.n_sources


class ScanTracker:
    """Follow every scan from the receivers' reports and say when each must close."""

    def __init__(self, timeout_s: float = 5.0, clock=time.monotonic):
        self.timeout_s = timeout_s
        self.clock = clock
        self.scans: dict[str, ScanStatus] = {}
        self.rejects: dict[str, int] = {}

    def _scan(self, scan_id: str) -> ScanStatus:
        now = self.clock()
        st = self.scans.get(scan_id)
        if st is None:
            st = self.scans[scan_id] = ScanStatus(scan_id, opened=now, last_activity=now)
        st.last_activity = now
        return st

    def _set_geometry(self, st: ScanStatus, wire: dict) -> None:
        if st.geometry is None:
            st.geometry = Geometry.from_wire(wire).for_sector(None)
            st._completeness = Completeness(st.geometry.n_sources, st.geometry.scan_shape,
                                            st.geometry.frames_per_position, st.geometry.flyback)
            st._received = st._completeness.new_state()
            st._distinct = np.zeros(st.geometry.n_sources, np.int64)

    def handle(self, report: dict) -> ScanStatus | None:
        """Take one receiver report; returns the scan it concerns (None for non-scan reports)."""
        kind = report["kind"]
        if kind == "reject":
            self.rejects[report["reason"]] = self.rejects.get(report["reason"], 0) + 1
            sid = report.get("scan_id")
            if sid:  # a reject that names its scan is part of that scan's story
                st = self.scans.get(sid) or self._scan(sid)
                st.rejects += 1
                if report["reason"] == "operator_error" and len(st.errors) < 5:
                    st.errors.append(report.get("detail", ""))
            return None
        if kind not in ("start", "frames", "end", "abort", "geometry"):
            return None
        sid = report["scan_id"]
        existing = self.scans.get(sid)
        if existing is not None and existing.state != RECEIVING:
            return None  # the receivers reject late messages; nothing more changes this scan
        st = self._scan(sid)
        worker = report.get("worker")
        st.worker_events[worker] = st.worker_events.get(worker, 0)
        if kind == "start":
            self._set_geometry(st, report["geometry"])
            st.metadata = st.metadata or report.get("metadata", {})
        elif kind == "geometry":
            self._set_geometry(st, report["geometry"])
        elif kind == "frames":
            now = self.clock()
            st.first_frame_time = st.first_frame_time or now
            st.last_frame_time = now
            st.events += report["events"]
            st.worker_events[worker] += report["events"]
            if st._received is not None:
                rec = st._received["received"]
                for source, first, count in report["ranges"]:
                    st._distinct[source] += count - np.count_nonzero(rec[source, first:first + count])
                    st._completeness.add_range(st._received, source, first, count)
        elif kind == "end":
            st.frames_sent[report["source"]] = report["frames_sent"]
        elif kind == "abort":
            st.abort_reason = st.abort_reason or report.get("reason", "") or "aborted by the source"
        return st

    def due(self) -> list[ScanStatus]:
        """Scans that must close now; each is returned once and marked closing."""
        now = self.clock()
        out = []
        for st in self.scans.values():
            if st.state != RECEIVING:
                continue
            reason = None
            if st.abort_reason:
                reason = "abort"
            elif st.all_ended and st.missing_so_far() <= 0:
                reason = "complete"
            elif now - st.last_activity >= self.timeout_s:
                reason = "timeout"
            if reason:
                st.state, st.close_reason, st.closed_time = CLOSING, reason, now
                out.append(st)
        return out

    def active(self) -> list[ScanStatus]:
        return [s for s in self.scans.values() if s.state == RECEIVING]
