"""Scans whose file is not in the output directory yet: held, retried, never dropped silently.

A closed scan's state stays on the workers that received it (dask futures of each receiver's
state) until its file is in place. When writing fails (output read-only, full or gone, no
worker in the cluster for a moment, a worker leaving while the file is written), the scan is
*held*: the session tries again after 1, 2, 4 … 60 s, and the console says where the data is
and what to do. A file that was built but could not be published waits, finished, in the
writer's staging directory and is only copied next time. With ``[output] fallback_dir`` the
file goes there at once (a normal scan file) and moves into the output directory when it can.

Held scans are listed and finished with ``stemstream pending`` (stream/cli/pending.py)
through the session's control socket (stream/session/ask.py).
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0)  # between attempts; the last repeats
REMIND_S = 60.0  # a held scan is named on the console again this often


@dataclass
class Retried:
    """Attempts at something that may fail for a while: counted, spaced by BACKOFF_S."""

    scan_id: str
    attempts: int = 0
    next_try: float = 0.0  # monotonic
    error: str = ""
    busy: bool = False  # an attempt is under way
    since: float = field(default_factory=time.time)

    def failed(self, error: str, now: float) -> float:
        """Count a failed attempt and schedule the next; returns the delay (s)."""
        self.attempts += 1
        self.error = error
        delay = BACKOFF_S[min(self.attempts, len(BACKOFF_S)) - 1]
        self.next_try = now + delay
        return delay

    def due(self, now: float) -> bool:
        return not self.busy and now >= self.next_try


@dataclass
class HeldScan(Retried):
    """A closed scan on its way to a file. ``closed``: worker → future of its state;
    ``staged``: (worker, token) of a finished file waiting in that worker's staging
    directory; ``target``: where the next attempt writes ('' : the output directory)."""

    status: object = None  # the tracker's ScanStatus
    closed: dict = field(default_factory=dict)
    staged: tuple | None = None
    target: str = ""
    said: float = 0.0  # monotonic time of the last console line about it
    asked: set = field(default_factory=set)  # workers asked to close it
    writers: list = field(default_factory=list)  # workers an attempt wrote it on (asked first next time)
    planned: str | None = None  # the writer chosen when it was closed (small scans)
    travelling: set = field(default_factory=set)  # workers whose state is ready to travel (portable)
    write_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # one per scan, every attempt
    early_used: set = field(default_factory=set)  # tokens of files written while it ran, handed to an attempt
    early_written: int = 0  # stored frames written while it ran (kept or not)
    early_cancelled: int = 0  # blocks of them not written yet when it closed (left to its end)
    stop: threading.Event = field(default_factory=threading.Event)

    def where(self) -> str:
        if self.staged is not None:
            return f"a finished file in the staging directory of worker {self.staged[0]}, and the workers' memory"
        holders = list(self.closed) or [w for w, n in getattr(self.status, "worker_frames", {}).items() if n]
        n = len(holders)
        return f"the memory of {n} worker{'s' if n != 1 else ''} ({', '.join(holders) or 'none'})"

    def describe(self, now: float) -> dict:
        """Plain values for ``stemstream pending`` and Session.pending()."""
        st = self.status
        return {"scan_id": self.scan_id, "state": "held", "since": self.since,
                "frames_received": st.frames_received, "n_frames": st.n_frames, "events": st.events,
                "closed": st.close_reason, "where": self.where(), "attempts": self.attempts,
                "error": self.error, "next_try_s": max(0.0, self.next_try - now) if not self.busy else 0.0,
                "writing": self.busy, "target": self.target}


@dataclass
class MovingFile(Retried):
    """A scan file written to the fallback directory, to move into the output directory."""

    path: Path | None = None
    worker: str = ""

    def describe(self, now: float) -> dict:
        return {"scan_id": self.scan_id, "state": "in fallback", "since": self.since,
                "where": str(self.path), "attempts": self.attempts, "error": self.error,
                "next_try_s": max(0.0, self.next_try - now), "writing": self.busy}


NO_WORKER = "no worker in the cluster right now"


def loud_lines(held: HeldScan, out_dir: str, fallback: str) -> list[str]:
    """What the console says the first time a scan cannot be written."""
    st = held.status
    what = f"{st.frames_received:,}/{st.n_frames:,} frames, {st.events / 1e6:.2f} M e-"
    fix = "start a worker (it is tried again when one joins)" if NO_WORKER in held.error else \
        f"make {out_dir} writable or free space there"
    return [f"ERROR [{held.scan_id}] its file cannot be written: {held.error}",
            f"ERROR [{held.scan_id}] nothing is lost: the scan ({what}) is held in {held.where()}; "
            f"writing is tried again every <= {BACKOFF_S[-1]:.0f} s"
            + (f" (the fallback directory {fallback} failed too)" if fallback else ""),
            f"ERROR [{held.scan_id}] to finish it: {fix}; or from another terminal "
            f"'stemstream pending' lists held scans and 'stemstream pending --finish {held.scan_id} "
            "--to DIR' writes it elsewhere. Stopping this session first tries once more, then waits "
            "for you (a second stop writes held scans to ~/stemstream-rescued)"]


def rescue_dir() -> Path:
    """Where held scans go when the session is stopped twice while they cannot be written."""
    return Path.home() / "stemstream-rescued"
