"""A scan's events written while it runs, so that its end leaves only the last frames.

The coordinator knows, from the receivers' ``frames`` reports, which frame parts every source
delivered (a receiver reports frames only once their events are stored). The frames before
the first one some source has not delivered yet are complete: once they hold a block of
events (``[memory] early_block_mb``, the first block at least one HDF5 chunk of the events,
so that the file's chunking is the one a file written at the end has), the workers in turn
build blocks as ``finalize_on_cluster`` does at the end: every worker that received frames
hands its parts (``Receiver.events_in``) to the block's builder, which merges them into the
file's order (``finalize.early_csr``) and, once the block's first file position is known (a
tiny task per block adds the previous block's event count: ``early_end``), compresses its
whole chunks (``early_compress``); one writer worker appends them to the scan's file
(``finalize.write_early``; it stays under a temporary name in staging). At most
``IN_FLIGHT`` blocks are under way; the coordinator's thread only submits and looks at the
futures' states.

When the scan closes, the blocks already built (merged and compressed) are written, at
most ``coordinator.EARLY_SETTLE_S``; the later ones are cancelled (what has not started never
will; the one being written is waited for on the writer, at most ``finalize.EARLY_WAIT_S``)
and the end goes on from the last block written.

The file written this way is an optimisation that can always be thrown away: at the end the
writer keeps it only if its events are exactly those the workers' states hold
(``finalize._early_kept``); otherwise, and after any error, a frame part received twice in
it, a worker lost, the scan is written at its end as if none had been started.
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from stream.files.storage import EVENTS_CHUNK
from stream.session.finalize import EarlySpec, discard_early, early_compress, early_csr, early_end, write_early
from stream.session.worker import early_events_on_worker
from stream.transport.handoff import on_one_host
from stream.transport.protocol import Geometry

log = logging.getLogger("stemstream.session")
IN_FLIGHT = 4  # blocks of one scan under way at once (two per worker of a pair)
TICK_S = 0.05  # the complete frames of the open scans are looked at this often


def stored_before(g: Geometry, frames: int) -> int:
    """Stored frames (rows of the file's CSR: position·fpp + k, flyback dropped) whose frame
    number is below ``frames``."""
    fpp, nx = g.frames_per_position, g.scan_shape[1]
    raster, k = divmod(int(frames), fpp)
    row, col = divmod(raster, nx + g.flyback)
    return fpp * (row * nx + min(col, nx)) + (k if col < nx else 0)


@dataclass
class EarlyBlock:
    """A block under way: its write on the writer, its compressed events (``early_compress``),
    every task of it, its end (stored frame)."""

    write: object
    built: object
    tasks: list
    stored: int


@dataclass
class EarlyScan:
    """One scan being written while it runs: its file on ``writer`` (``token``), the frame
    numbers ``[0, frames)`` (stored frames ``[0, stored)``) given to blocks, the stored
    frames ``[0, written)`` of the blocks written, the blocks under way, the last block's
    write (the next one waits for it) and the file position after the last block (an int,
    or the future of ``early_end``)."""

    token: str
    writer: str
    spec: EarlySpec
    frames: int = 0
    stored: int = 0
    written: int = 0
    blocks: list = field(default_factory=list)
    last: object = None
    position: object = 0
    n_blocks: int = 0
    cancelled: int = 0  # blocks cancelled when the scan closed
    kept: list = field(default_factory=list)  # blocks built when it closed: written, not cancelled
    failed: str = ""


class EarlyWriter:
    """The coordinator's side of writing while scanning. ``tick`` (the coordinator's thread)
    submits blocks; ``finish`` (a writer thread, when the scan closed) cancels those not
    written yet and says whether the file can be used."""

    def __init__(self, client, plugin_name: str, config):
        self.client = client
        self.plugin_name = plugin_name
        self.config = config
        # a block is due once the complete frames hold early_block_mb; when the blocks fall
        # behind, what completed meanwhile goes in fewer, larger ones (up to write_block_mb):
        # small blocks keep the scan's tail short, large ones cost fewer round trips
        self.block_events = max(1, int(config.memory.early_block_mb * 1e6 / 4))
        self.max_block_events = max(self.block_events, int(config.memory.write_block_mb * 1e6 / 4))
        self._scans: dict[str, EarlyScan] = {}
        self._lock = threading.Lock()

    def progress(self, scan_id: str) -> int:
        """Stored frames of an open scan given to blocks written while it runs (0: none, or
        stopped)."""
        e = self._scans.get(scan_id)
        return 0 if e is None or e.failed else e.written

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
            why = self._reap(e)
            if why:
                self._stop(st.scan_id, why)
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
        first = max(self.block_events, EVENTS_CHUNK)
        if e is None and per_frame * g.n_frames < 2 * first:
            return  # a scan of a block or two: its end is quicker than a block written early
        if per_frame <= 0 or per_frame * (end - start) < (self.block_events if e is not None else first):
            return
        if e is None:
            writer = min(live, key=lambda w: (writing.get(w, 0), -st.worker_events.get(w, 0), str(w)))
            spec = EarlySpec(st.scan_id, g, str(Path(out_dir) / f"{st.scan_id}.h5"),
                             self.config.memory.spill_dir, self.config.output.compression_level)
            e = EarlyScan(uuid.uuid4().hex, writer, spec)
            with self._lock:
                self._scans[st.scan_id] = e
        step = max(1, int(self.max_block_events / per_frame))
        # Workers of the writer's host hand their parts over in memory (transport.handoff):
        # then the writer builds every block, and the built blocks need no move either.
        # Otherwise the workers take turns, the writer last (it has the most to do).
        shared = self.config.memory.handoff_dir if on_one_host([e.writer, *holders]) else ""
        builders = [e.writer] if shared else sorted(w for w in live if w != e.writer) + [e.writer]
        while len(e.blocks) < IN_FLIGHT and per_frame * (end - e.frames) >= self.block_events:
            hi_f = min(end, e.frames + step)
            lo, hi = e.stored, stored_before(g, hi_f)
            if hi > lo:
                at = builders[e.n_blocks % len(builders)]
                e.n_blocks += 1
                parts = [self._on(w, early_events_on_worker, self.plugin_name, st.scan_id, lo, hi,
                                  shared if w != at else "") for w in holders]
                csr = self._on(at, early_csr, e.spec, lo, hi, *parts)
                built = self._on(at, early_compress, csr, e.position, e.spec.level)
                e.position = self._on(at, early_end, e.position, csr)
                e.last = self._on(e.writer, write_early, e.token, e.spec, lo, hi, hi_f, e.last, built)
                e.blocks.append(EarlyBlock(e.last, built, [*parts, csr, built, e.position, e.last], hi))
            e.frames, e.stored = hi_f, hi

    @staticmethod
    def _reap(e: EarlyScan) -> str:
        """Forget the blocks written (their tasks are released); why to stop if one failed."""
        keep = []
        for b in e.blocks:
            if b.write.status == "finished":
                e.written = max(e.written, b.stored)
            elif b.write.status in ("error", "cancelled", "lost"):
                return f"a block {b.write.status}"
            else:
                keep.append(b)
        e.blocks = keep
        return ""

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

    def finish(self, st, live) -> EarlyScan | None:
        """The scan closed (a writer thread): its blocks already built (merged and
        compressed) are kept, to be written; the later ones are cancelled (never waits: the
        caller ``settle``s the kept ones before the end, and the writer waits for the one
        being written, ``finalize.take_early``); returns its early file (None if none was
        started), usable unless ``failed`` (then it is thrown away already; else the caller
        goes on writing it on ``writer``, from its last block written, or ``drop``s it).
        Must come before the workers close the scan (a block built needs them no more)."""
        with self._lock:
            e = self._scans.pop(st.scan_id, None)
        if e is None or e.failed or not e.token:
            return e if e is not None and e.token else None
        why = self._reap(e)
        n_built = next((i for i, b in enumerate(e.blocks) if b.built.status != "finished"), len(e.blocks))
        e.kept, e.blocks = e.blocks[:n_built], e.blocks[n_built:]
        if e.blocks:  # what has not started never will; a task under way ends on its own
            e.cancelled = len(e.blocks)
            self.client.cancel([t for b in e.blocks for t in b.tasks])
            log.info("scan %s: %d blocks not written while it ran are left to its end (%d built "
                     "are written)", st.scan_id, e.cancelled, len(e.kept))
        why = why or ("nothing written" if e.last is None else "a worker of it left"
                      if st.lost or e.writer not in live else "")
        if not why and st.repeated(0, e.frames):
            why = "frames written early arrived again"
        if why:
            e.failed = why
            log.warning("scan %s: the events written while it ran are thrown away (%s); written at its end",
                        st.scan_id, why)
            self.drop(e)
        return e

    def settle(self, e: EarlyScan, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) for the blocks ``finish`` kept to be written, and count
        them in ``written``: the end goes on after them. A block that failed throws the file
        away on the writer (the end then writes the whole scan); one still under way after the
        time out is waited for there, at most ``finalize.EARLY_WAIT_S``."""
        if not e.kept:
            return
        from distributed import wait
        try:
            wait([b.write for b in e.kept], timeout=timeout_s)
        except TimeoutError:
            pass
        for b in e.kept:  # a failed one is the writer's to report (take_early)
            if b.write.status == "finished":
                e.written = max(e.written, b.stored)
        e.kept = []

    def drop(self, e: EarlyScan) -> None:
        """Throw away the early file ``finish`` returned (it was not used)."""
        from distributed import fire_and_forget
        fire_and_forget(self._on(e.writer, discard_early, e.token))
