"""Finalize a closed scan: merge the workers' states, finalize every operator, write the scan
file. Returns a small summary and the result images.

The events are written block by block (a range of stored frames at a time): each worker
takes its parts of the range from the state it holds, one worker (in turn) merges them into
canonical CSR and compresses them, the writer writes the compressed bytes; so no process
holds a whole scan's events at once, and the work of the events is spread over the workers
(``finalize_on_cluster``; ``finalize_scan`` does the same in one process).
"""

from __future__ import annotations

import platform
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from operators.base import Result
from operators.chunk import Chunk
from operators.completeness import Completeness, repeat_mask
from operators.electron_counting import ElectronCounter
from operators.events import EventStore, plan_blocks

from stream import __version__
from stream.config import PipelineConfig, build_operators
from stream.transport.protocol import Geometry
from stream.transport.receiver import WorkerScan
from stream.transport.spill import SpillFile
from stream.files.storage import EventBlock, ScanWriter, compress_block

IN_FLIGHT = 3  # blocks on their way to the writer at once


@dataclass
class ScanInfo:
    """What the coordinator knows of a closed scan."""

    scan_id: str
    geometry: Geometry
    metadata: dict
    close_reason: str  # complete | timeout | abort | closed
    abort_reason: str = ""
    frames_sent: dict = field(default_factory=dict)
    rejects: int = 0
    timings: dict = field(default_factory=dict)  # wall-clock seconds since the epoch
    workers: list = field(default_factory=list)
    errors: list = field(default_factory=list)  # problems the coordinator saw


@dataclass
class ScanResult:
    """A finalized scan as the session returns it."""

    scan_id: str
    path: Path | None
    status: str  # complete | incomplete | failed
    reason: str
    n_frames: int = 0
    frames_received: int = 0
    n_missing: int = 0
    missing_frames: list = field(default_factory=list)  # the first 100,000
    missing_ranges: list = field(default_factory=list)  # [first, stop) runs, all of them
    n_duplicated: int = 0
    duplicated_frames: list = field(default_factory=list)
    duplicated_ranges: list = field(default_factory=list)
    events: int = 0
    results: dict = field(default_factory=dict)  # name -> np.ndarray
    kinds: dict = field(default_factory=dict)  # name -> 'nav' | 'sig' | 'table'
    units: dict = field(default_factory=dict)  # name -> unit of the values ('counts', 'mrad', ...)
    position_frames: np.ndarray | None = None  # (ny, nx) frame parts received per position
    expected_frames_per_position: int = 1  # frames_per_position · n_sources
    timings: dict = field(default_factory=dict)
    errors: list = field(default_factory=list)
    previews: list = field(default_factory=list)
    stages: list = field(default_factory=list)  # StageReports, when the stages ran with the scan
    geometry: Geometry | None = None  # scan and detector geometry (calibration as streamed)
    metadata: dict = field(default_factory=dict)  # the scan's metadata (scan_step_A: Å per position)

    @property
    def result_objects(self) -> dict:
        return {n: Result(d, self.kinds.get(n, "table"), self.units.get(n, ""))
                for n, d in self.results.items()}

    @property
    def complete(self) -> bool:
        return self.status == "complete"


def merge_states(worker_scans: list[WorkerScan], config: PipelineConfig, geometry: Geometry):
    """Operators of the scan and their merged state (any order; integer sums exact)."""
    held = [ws for ws in worker_scans if ws.operators]
    if not held:  # no frame arrived anywhere: empty but well-formed results
        ops = build_operators(config, geometry)
        return ops, {op.name: op.new_state() for op in ops}
    ops, states = held[0].operators, held[0].states
    for ws in held[1:]:
        for op in ops:
            op.merge(states[op.name], ws.states[op.name])
    return ops, states


def received_counts(ws: WorkerScan) -> np.ndarray | None:
    """(n_sources, n_frames) uint16 copies of each (source, frame) this worker holds."""
    for op in ws.operators:
        if isinstance(op, Completeness):
            return ws.states[op.name]["received"]
    return None


def keep_owned_frames(ws: WorkerScan, own: np.ndarray) -> WorkerScan:
    """Keep one copy of each (source, frame) for which ``own`` (n_sources, n_frames) bool is
    True and none of the others, then recompute every operator from the kept events.

    Used only when a frame arrived more than once, so that duplicated frames count once.
    Completeness keeps counting every copy that arrived. Chunks the receiver had moved to disk
    go back to disk (a new spill file beside the old), so memory stays bounded here too."""
    store = _store(ws)
    seen = ~own  # frames owned elsewhere count as already seen: every copy here is dropped
    fresh = {op.name: op.new_state() for op in ws.operators if not isinstance(op, Completeness)}
    stored, spill = fresh[store.name]["chunks"], None
    for entry in ws.states[store.name]["chunks"]:
        chunk = entry if isinstance(entry, Chunk) else entry.load()
        kept = chunk.select(~repeat_mask(chunk.frames, chunk.sources, seen))
        for op in ws.operators:
            if op.name in fresh:
                op.process(fresh[op.name], kept)
        if not isinstance(entry, Chunk):
            spill = spill or SpillFile(entry.file.directory)
            stored[-1] = spill.write(stored[-1])
    states = {**ws.states, **fresh}
    return WorkerScan(ws.scan_id, ws.worker, ws.geometry, ws.operators, states, ws.errors)


def claim_frames(*counts: np.ndarray | None) -> list[np.ndarray | None] | None:
    """Who keeps which (source, frame), from each worker's ``received_counts``: the first
    worker holding a copy keeps one. None when no frame arrived twice (the usual case);
    else per worker its (n_sources, n_frames) bool mask, or None where it has nothing to drop."""
    held = [c for c in counts if c is not None]
    if not held or (max(int(c.max(initial=0)) for c in held) <= 1
                    and int(sum((c > 0).astype(np.int64) for c in held).max(initial=0)) <= 1):
        return None
    claimed = np.zeros(held[0].shape, bool)
    owners = []
    for c in counts:
        if c is None:
            owners.append(None)
            continue
        own = (c > 0) & ~claimed
        claimed |= own
        # recompute only where copies are dropped: frames owned elsewhere, or held twice here
        owners.append(own if ((c > 0) & ~own).any() or c.max() > 1 else None)
    return owners


def keep_owned(ws: WorkerScan, owners: list | None, i: int) -> WorkerScan:
    """Worker ``i``'s scan with the copies ``claim_frames`` gave to others dropped."""
    own = owners[i] if owners is not None else None
    return ws if own is None else keep_owned_frames(ws, own)


def drop_duplicates(worker_scans: list[WorkerScan]) -> list[WorkerScan]:
    """Frames that arrived more than once (on one worker or on several) count once: the first
    worker holding a copy keeps one, every other copy is dropped and the states of the
    workers concerned are recomputed from their stored events (rare, so not optimised)."""
    owners = claim_frames(*[received_counts(ws) for ws in worker_scans])
    return [keep_owned(ws, owners, i) for i, ws in enumerate(worker_scans)]


def _store(ws: WorkerScan) -> EventStore | None:
    return next((op for op in ws.operators if isinstance(op, EventStore)), None)


def without_events(ws: WorkerScan) -> WorkerScan:
    """The worker's scan without its events (their counts per stored frame stay): what
    travels to the writer before the events do."""
    store = _store(ws)
    if store is None:
        return ws
    light = store.without_events(ws.states[store.name])
    light["counts"] = light["counts"].copy()  # merging adds into it
    return WorkerScan(ws.scan_id, ws.worker, ws.geometry, ws.operators,
                      {**ws.states, store.name: light}, ws.errors)


def events_in(ws: WorkerScan, lo: int, hi: int) -> list[Chunk]:
    """The frame parts of stored frames ``[lo, hi)`` this worker holds, as chunks."""
    store = _store(ws)
    return store.events_in(ws.states[store.name], lo, hi) if store else []


def _what_never_came(info: ScanInfo) -> str:
    """Why a scan timed out: the sources whose ``end`` never arrived (a source that stopped
    early, or a lost connection), so that an operator knows where to look."""
    silent = [s for s in range(info.geometry.n_sources) if s not in info.frames_sent]
    if not silent:
        return " (every source sent its end; frames it announced are missing)"
    return f" (no end message from source{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))})"


@dataclass
class _OpenScan:
    """A scan file being written on this worker: its writer, the events' layout, and the
    result to return when the last block is in."""

    writer: ScanWriter
    offsets: np.ndarray
    result: ScanResult


_OPEN: dict[str, _OpenScan] = {}  # token -> scan file being written in this process
_DISCARDED: set[str] = set()  # tokens given up before their file was opened (a timeout)
_OPEN_LOCK = threading.Lock()


@dataclass
class WritePlan:
    """How a scan's events go to its file: ``blocks`` of stored frames ``(lo, hi, first
    event)`` in file order, for ``build_block`` on any worker then ``write_block`` on the
    writer (``token``)."""

    token: str
    blocks: list
    store: EventStore
    n_events: int
    level: int


def open_scan_file(info: ScanInfo, config: PipelineConfig, token: str, deduplicated: bool,
                   *light: WorkerScan) -> WritePlan | None:
    """On the writer: merge the workers' states (``without_events``), finalize every operator
    and start the scan file (the rest of it is written while the events come); returns how
    the events are to come. None, doing nothing, if frames arrived more than once and the
    states are not ``deduplicated`` yet (``keep_owned``)."""
    if not deduplicated and claim_frames(*map(received_counts, light)) is not None:
        return None
    t0 = time.time()
    ops, states = merge_states(list(light), config, info.geometry)
    results, completeness, summary = {}, {}, {}
    store = counts = counting = None
    for op in ops:
        if isinstance(op, EventStore):
            store, counts = op, states[op.name]["counts"]
        elif isinstance(op, ElectronCounter):
            if states[op.name]["frames"][0]:  # raw frames were counted: say how, in /counting
                record = op.describe(states[op.name])
                counting = (record.attrs, record.arrays)
        elif isinstance(op, Completeness):
            completeness = op.finalize(states[op.name])
            summary = op.summary(states[op.name])
        else:
            results.update(op.finalize(states[op.name]))
    offsets = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    errors = info.errors + [e for ws in light for e in ws.errors]
    n_missing = summary["n_missing"]
    status = "complete" if info.close_reason == "complete" and not n_missing and not errors else "incomplete"
    reason = {"complete": "all frames arrived" if not n_missing else f"{n_missing} frames never arrived",
              "timeout": f"no message for {config.scan.timeout_s} s; closed with what arrived",
              "abort": f"aborted by the source: {info.abort_reason}",
              "closed": "the session stopped while the scan was running"}[info.close_reason]
    if info.close_reason == "timeout":
        reason += _what_never_came(info)
    if errors:
        reason += f"; {len(errors)} errors: {errors[0]}"
    timings = dict(info.timings, finalize_start=t0, merged=time.time())
    provenance = {"software": "stemstream", "version": __version__, "python": platform.python_version(),
                  "numpy": np.__version__, "host": socket.gethostname(), "workers": info.workers,
                  "config": config.to_dict(), "frames_sent_per_source": {str(k): v for k, v in info.frames_sent.items()},
                  "rejected_messages": info.rejects, "errors": errors}
    writer = ScanWriter(Path(config.output.dir) / f"{info.scan_id}.h5", scan_id=info.scan_id,
                        status=status, reason=reason, geometry=info.geometry.for_sector(None).to_wire(),
                        metadata=info.metadata, results=results, offsets=offsets,
                        completeness=completeness,
                        completeness_summary={k: v for k, v in summary.items()
                                              if not k.endswith(("_frames", "_ranges"))},  # datasets
                        provenance={**provenance, "timings": timings}, counting=counting,
                        compression_level=config.output.compression_level)
    g = info.geometry
    result = ScanResult(info.scan_id, None, status, reason, n_frames=g.n_frames,
                        frames_received=summary["n_frames_received"],
                        **{f"{a}_{b}": summary[f"{a}_{b}"] for a in ("missing", "duplicated")
                           for b in ("frames", "ranges")},
                        n_missing=n_missing, n_duplicated=summary["n_duplicated"],
                        events=int(offsets[-1]), results={k: r.data for k, r in results.items()},
                        kinds={k: r.kind for k, r in results.items()},
                        units={k: r.unit for k, r in results.items()},
                        position_frames=completeness["position_frames"].data,
                        expected_frames_per_position=g.frames_per_position * g.n_sources,
                        timings=timings, errors=errors, geometry=g, metadata=dict(info.metadata))
    with _OPEN_LOCK:
        if token in _DISCARDED:  # the coordinator gave up on this file while it was opening
            _DISCARDED.discard(token)
            writer.discard()
            raise RuntimeError(f"scan {info.scan_id}: given up while its file was opened")
        _OPEN[token] = _OpenScan(writer, offsets, result)
    blocks = [(lo, hi, int(offsets[lo])) for lo, hi in
              plan_blocks(counts, max(1, int(config.memory.write_block_mb * 1e6 / 4)))]
    return WritePlan(token, blocks, store, int(offsets[-1]), config.output.compression_level)


def build_block(plan: WritePlan, k: int, here: WorkerScan | None, *parts: list) -> tuple:
    """On any worker: block ``k`` of the plan from this worker's scan (``here``) and the
    other workers' ``events_in``: canonical CSR, its whole file chunks compressed. Returns
    (offsets of the block's frames from 0, EventBlock)."""
    lo, hi, first = plan.blocks[k]
    chunks = [c for p in parts for c in p] + (events_in(here, lo, hi) if here is not None else [])
    offsets, indices = plan.store.csr(chunks, lo, hi)
    return offsets, compress_block(indices, first, plan.n_events, plan.level)


def write_block(token: str, lo: int, hi: int, after, built: tuple[np.ndarray, EventBlock]) -> int:
    """On the writer: block ``[lo, hi)`` into the file, once its frames are checked against
    the counts the file's offsets were written from. ``after``: the previous block's call
    (keeps the order). Returns the events given so far."""
    scan = _OPEN[token]
    offsets, block = built
    expected = scan.offsets[lo:hi + 1] - scan.offsets[lo]
    if not np.array_equal(offsets, expected):
        bad = lo + int(np.flatnonzero(offsets != expected)[0]) - 1
        raise RuntimeError(f"scan {scan.result.scan_id}: the workers sent other events for stored "
                           f"frame {bad} than they counted; the file is not written")
    scan.writer.put_block(block)
    return scan.writer.given


def close_scan_file(token: str, after=None) -> ScanResult:
    """On the writer: check every event is in, name the file, return the scan's result."""
    with _OPEN_LOCK:
        scan = _OPEN.pop(token)
    scan.result.path = scan.writer.close()
    scan.result.timings["written"] = time.time()
    return scan.result


def discard_scan_file(token: str) -> None:
    """On the writer: drop a file that could not be finished (nothing is left on disk); a
    file still being opened is dropped when it is."""
    with _OPEN_LOCK:
        scan = _OPEN.pop(token, None)
        if scan is None:
            _DISCARDED.add(token)
    if scan is not None:
        scan.writer.discard()


def finalize_scan(info: ScanInfo, config: PipelineConfig, *worker_scans: WorkerScan) -> ScanResult:
    """Finalize and write a scan from the workers' states, all in this process."""
    worker_scans = drop_duplicates(list(worker_scans))
    plan = open_scan_file(info, config, uuid.uuid4().hex, True, *map(without_events, worker_scans))
    try:
        for k, (lo, hi, _) in enumerate(plan.blocks):
            built = build_block(plan, k, None, *(events_in(ws, lo, hi) for ws in worker_scans))
            write_block(plan.token, lo, hi, None, built)
        return close_scan_file(plan.token)
    except BaseException:
        discard_scan_file(plan.token)
        raise


def finalize_on_cluster(client, info: ScanInfo, config: PipelineConfig, closed: dict,
                        writer: str, timeout: float) -> ScanResult:
    """``finalize_scan`` with every worker's state left where it is.

    closed: worker address → future of its ``WorkerScan`` (on that worker); writer: the
    worker that writes the file. Small states go to the writer first. Then the events, one
    block of frames at a time, at most ``IN_FLIGHT`` blocks under way: the workers take
    their parts of a block to one of them (in turn), which builds and compresses it, and
    the writer writes it. No process holds a whole scan, and the workers share the work."""
    deadline = time.monotonic() + timeout

    def on(worker, fn, *args):
        return client.submit(fn, *args, workers=[worker], allow_other_workers=False, pure=False)

    def wait(future):
        return future.result(timeout=max(0.0, deadline - time.monotonic()))

    workers = list(closed)
    token = uuid.uuid4().hex
    futures = []

    def on_(worker, fn, *args):  # a task to cancel if the scan fails
        futures.append(on(worker, fn, *args))
        return futures[-1]

    try:
        kept = closed
        plan = wait(on_(writer, open_scan_file, info, config, token, False,
                        *(on(w, without_events, kept[w]) for w in workers)))
        if plan is None:  # frames arrived more than once: the workers drop the extra copies first
            owners = on(writer, claim_frames, *(on(w, received_counts, closed[w]) for w in workers))
            kept = {w: on(w, keep_owned, closed[w], owners, i) for i, w in enumerate(workers)}
            plan = wait(on_(writer, open_scan_file, info, config, token, True,
                            *(on(w, without_events, kept[w]) for w in workers)))
        builders = [w for w in workers if w != writer] + [writer]  # the writer has the most to do
        writes = []
        for k, (lo, hi, _) in enumerate(plan.blocks):
            at = builders[k % len(builders)]
            parts = [on(w, events_in, kept[w], lo, hi) for w in workers if w != at]
            built = on(at, build_block, plan, k, kept[at], *parts)
            writes.append(on_(writer, write_block, token, lo, hi, writes[-1] if writes else None, built))
            if len(writes) > IN_FLIGHT:
                wait(writes[-IN_FLIGHT - 1])
        return wait(on_(writer, close_scan_file, token, writes[-1] if writes else None))
    except BaseException:
        client.cancel(futures)  # what has not started never will
        try:
            on(writer, discard_scan_file, token).result(timeout=10)
        except Exception:  # noqa: BLE001 - the first error is the one to report
            pass
        raise
