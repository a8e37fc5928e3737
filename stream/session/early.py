"""A scan's events written while it runs, so that its end leaves only the last frames.

The coordinator knows, from the receivers' ``frames`` reports, which frame parts every source
delivered (a receiver reports frames only once their events are stored). The frames before
the first one some source has not delivered yet are complete: once they hold a block of
events (``[memory] write_block_mb``, the first block at least one HDF5 chunk of the events,
so that the file's chunking is the one a file written at the end has), every worker that
received frames hands its parts of them (``Receiver.events_in``) to one writer worker, which
merges them into the file's order, compresses them and appends them to the scan's file
(``finalize.write_early``; it stays under a temporary name in staging). At most
``IN_FLIGHT`` blocks are under way; the coordinator's thread only submits and looks at the
futures' states.

The file written this way is an optimisation that can always be thrown away: at the end the
writer keeps it only if its events are exactly those the workers' states hold
(``finalize._early_kept``); otherwise, and after any error, a frame part received twice in
it, a worker lost, the scan is written at its end as if none had been started.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from stream.files.storage import EVENTS_CHUNK
from stream.session.finalize import EarlySpec, discard_early, write_early
from stream.session.worker import early_events_on_worker
from stream.transport.protocol import Geometry

log = logging.getLogger("stemstream.session")
IN_FLIGHT = 3  # blocks of one scan under way at once (as at the end: finalize.IN_FLIGHT)
TICK_S = 0.05  # the complete frames of the open scans are looked at this often


def stored_before(g: Geometry, frames: int) -> int:
    """Stored frames (rows of the file's CSR: position·fpp + k, flyback dropped) whose frame
    number is below ``frames``."""
    fpp, nx = g.frames_per_position, g.scan_shape[1]
    raster, k = divmod(int(frames), fpp)
    row, col = divmod(raster, nx + g.flyback)
    return fpp * (row * nx + min(col, nx)) + (k if col < nx else 0)


@dataclass
class EarlyScan:
    """One scan being written while it runs: its file on ``writer`` (``token``), the frame
    numbers ``[0, frames)`` (stored frames ``[0, stored)``) given to blocks, and the blocks
    under way as (write future, part futures)."""

    token: str
    writer: str
    spec: EarlySpec
    frames: int = 0
    stored: int = 0
    blocks: list = field(default_factory=list)
    last: object = None  # the last block's write future (the next one waits for it)
    failed: str = ""


class EarlyWriter:
    """The coordinator's side of writing while scanning. ``tick`` (the coordinator's thread)
    submits blocks; ``finish`` (a writer thread, when the scan closed) waits for them and
    says whether the file can be used."""

    def __init__(self, client, plugin_name: str, config):
        self.client = client
        self.plugin_name = plugin_name
        self.config = config
        self.block_events = max(1, int(config.memory.write_block_mb * 1e6 / 4))
        self._scans: dict[str, EarlyScan] = {}
        self._lock = threading.Lock()

    def progress(self, scan_id: str) -> int:
        """Stored frames of an open scan given to blocks written while it runs (0: none, or
        stopped)."""
        e = self._scans.get(scan_id)
        return 0 if e is None or e.failed else e.stored

    def _on(self, worker, fn, *args):
        return self.client.submit(fn, *args, workers=[worker], allow_other_workers=False, pure=False)

    def tick(self, scans: list, live: list[str], writing: dict, out_dir: str) -> None:
        """Submit the blocks that are due for the open ``scans`` (ScanStatus) on the ``live``
        workers; ``writing``: files each worker is writing now (a new scan's writer is the least
        busy)."""
        for st in scans:
            try:
                self._advance(st, live, writing, out_dir)
            except Exception as e:
                log.exception("scan %s: writing while it runs failed", st.scan_id)
                self._stop(st.scan_id, f"{type(e).__name__}: {e}")

    def _advance(self, st, live: list[str], writing: dict, out_dir: str) -> None:
        g = st.geometry
        if g is None or not live:
            return
        with self._lock:
            e = self._scans.get(st.scan_id)
        if e is not None:
            if e.failed:
                return
            self._reap(e)
            if e.failed:
                return
        holders = [w for w, n in st.worker_frames.items() if n]
        if st.lost or any(w not in live for w in holders) or (e is not None and e.writer not in live):
            if e is not None:  # frames will be missing, or the file is gone with its writer
                self._stop(st.scan_id, "a worker of it left")
            return
        start = e.frames if e is not None else 0
        end = st.complete_prefix(start)
        if end <= start:
            return
        if st.repeated(start, end):
            if e is not None:
                self._stop(st.scan_id, "frames of it arrived more than once")
            else:  # never started: the scan is written at its end
                with self._lock:
                    self._scans[st.scan_id] = EarlyScan("", "", None, failed="frames arrived twice")
            return
        per_frame = st.events / max(1, st.frames_received)  # electrons per frame, all sources
        if per_frame <= 0 or per_frame * (end - start) < (self.block_events if e is not None else
                                                          max(self.block_events, EVENTS_CHUNK)):
            return
        if e is None:
            writer = min(live, key=lambda w: (writing.get(w, 0), -st.worker_events.get(w, 0), str(w)))
            spec = EarlySpec(st.scan_id, g, str(Path(out_dir) / f"{st.scan_id}.h5"),
                             self.config.memory.spill_dir, self.config.output.compression_level)
            e = EarlyScan(uuid.uuid4().hex, writer, spec)
            with self._lock:
                self._scans[st.scan_id] = e
        step = max(1, int(self.block_events / per_frame))
        while len(e.blocks) < IN_FLIGHT and per_frame * (end - e.frames) >= self.block_events:
            hi_f = min(end, e.frames + step)
            lo, hi = e.stored, stored_before(g, hi_f)
            if hi > lo:
                parts = [self._on(w, early_events_on_worker, self.plugin_name, st.scan_id, lo, hi)
                         for w in holders]
                e.last = self._on(e.writer, write_early, e.token, e.spec, lo, hi, hi_f, e.last, *parts)
                e.blocks.append((e.last, parts))
            e.frames, e.stored = hi_f, hi

    def _reap(self, e: EarlyScan) -> None:
        """Forget the blocks written (their parts are released); stop on one that failed."""
        keep = []
        for write, parts in e.blocks:
            if write.status == "finished":
                continue
            if write.status in ("error", "cancelled", "lost"):
                self._stop(e.spec.scan_id, f"a block {write.status}")
                return
            keep.append((write, parts))
        e.blocks = keep

    def _stop(self, scan_id: str, why: str) -> None:
        """No more early blocks for this scan; its early file is thrown away."""
        with self._lock:
            e = self._scans.get(scan_id)
            if e is None:
                self._scans[scan_id] = EarlyScan("", "", None, failed=why)
                return
            if e.failed:
                return
            e.failed, blocks = why, e.blocks
            e.blocks = []
        log.warning("scan %s: writing while it runs stopped (%s); its file is written when it ends", scan_id, why)
        if e.token:
            from distributed import fire_and_forget
            fire_and_forget(self._on(e.writer, discard_early, e.token))
        del blocks  # what has not run yet never will

    def finish(self, st, live, timeout: float, stop: threading.Event | None = None) -> EarlyScan | None:
        """The scan closed (a writer thread): wait for its blocks under way; returns its
        early file (None if none was started), usable unless ``failed`` (then it is thrown
        away already; else the caller writes it on ``writer``, or ``drop``s it). Must come
        before the workers close the scan (the blocks read it)."""
        with self._lock:
            e = self._scans.pop(st.scan_id, None)
        if e is None or e.failed or not e.token:
            return e if e is not None and e.token else None
        from distributed import wait
        why = "nothing written" if e.last is None else "a worker of it left" \
            if st.lost or e.writer not in live else ""
        deadline = time.monotonic() + timeout
        pending = [] if why else [e.last] + [p for _, parts in e.blocks for p in parts]
        while pending and not why:  # (a task of a worker that left would never end)
            try:
                wait(pending, timeout=min(0.5, max(0.01, deadline - time.monotonic())))
                break
            except TimeoutError:
                if stop is not None and stop.is_set():
                    why = "a worker of it left"
                elif time.monotonic() >= deadline:
                    why = f"its blocks did not finish within {timeout:.0f} s"
        if not why and e.last.status != "finished":
            why = f"a block {e.last.status}"
        elif not why and st.repeated(0, e.frames):
            why = "frames written early arrived again"
        if why:
            e.failed = why
            log.warning("scan %s: the events written while it ran are thrown away (%s); written at its end",
                        st.scan_id, why)
            self.drop(e)
        return e

    def drop(self, e: EarlyScan) -> None:
        """Throw away the early file ``finish`` returned (it was not used)."""
        from distributed import fire_and_forget
        fire_and_forget(self._on(e.writer, discard_early, e.token))
