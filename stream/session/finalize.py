"""Finalize a closed scan: merge the workers' states, finalize every operator, write the scan
file. Returns a small summary and the result images.

The events are written block by block (a range of stored frames at a time): each worker
takes its parts of the range from the state it holds, one worker (in turn) merges them into
canonical CSR and compresses them, the writer writes the compressed bytes; so no process
holds a whole scan's events at once, and the work of the events is spread over the workers
(``finalize_on_cluster``; ``finalize_scan`` does the same in one process).
"""

from __future__ import annotations

import json
import logging
import platform
import socket
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from operators.base import Result
from operators.chunk import Chunk
from operators.completeness import Completeness, repeat_mask, runs
from operators.electron_counting import ElectronCounter
from operators.events import EventStore, plan_blocks

from stream import __version__
from stream.config import PipelineConfig, build_operators
from stream.transport.compact import narrow_map, widen_map
from stream.transport.protocol import Geometry
from stream.transport.receiver import WorkerScan
from stream.transport import handoff
from stream.transport.spill import SpillFile
from stream.files.storage import (EVENTS_CHUNK, EventBlock, JSONText, PublishError, ScanWriter, check_space,
                                  compress_block, publish, read_images)

log = logging.getLogger("stemstream.finalize")
IN_FLIGHT = 3  # blocks on their way to the writer at once
SMALL_SCAN_EVENTS = 4_000_000  # up to this many electrons a scan is written by one task


class WorkerLost(RuntimeError):
    """A worker holding part of a scan left the cluster while the scan was being written."""


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
    out_dir: str = ""  # where the file goes ("" : [output] dir)
    lost: dict = field(default_factory=dict)  # worker -> why dask removed it (it held frames)
    reported: np.ndarray | None = None  # packbits of (n_sources, n_frames): parts receivers reported
    late: np.ndarray | None = None  # packbits of (n_sources, n_frames): parts dropped as late
    late_frames: int = 0  # frame parts dropped because they came after the scan closed
    reject_reasons: dict = field(default_factory=dict)  # reason -> rejected messages naming it
    config_json: str = ""  # the configuration for /provenance, serialised once per session
    write_id: str = ""  # the same for every attempt at this scan's file (written_here)


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
    lost_ranges: list = field(default_factory=list)  # missing because their worker was lost
    lost_cause: str = ""
    late_ranges: list = field(default_factory=list)  # missing because they came after the close
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
    staged: str = ""  # finished but not yet in its directory: the writer's token for publish_staged
    write_error: str = ""  # why it could not be published there
    geometry: Geometry | None = None  # scan and detector geometry (calibration as streamed)
    metadata: dict = field(default_factory=dict)  # the scan's metadata (scan_step_A: Å per position)

    def __getstate__(self) -> dict:
        # pickled when it goes to the session: integer images narrowed (stream.transport.compact)
        return dict(self.__dict__, results=narrow_map(self.results))

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, results=widen_map(state["results"]))

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
    # merging adds into the first state: a copy, so that the workers' states stay as they
    # are (a write that fails is tried again from them)
    ops, states = held[0].operators, {name: _copy_state(st) for name, st in held[0].states.items()}
    for ws in held[1:]:
        for op in ops:
            op.merge(states[op.name], ws.states[op.name])
    return ops, states


def _copy_state(state: dict) -> dict:
    return {k: v.copy() if isinstance(v, np.ndarray) else list(v) if isinstance(v, list) else v
            for k, v in state.items()}


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


def without_events(ws: WorkerScan, handoff_dir: str = "", key: str = ""):
    """The worker's scan without its events (their counts per stored frame stay): what
    travels to the writer before the events do; with ``handoff_dir`` (the writer is on
    this host) handed over there under ``key`` (``transport.handoff.offer_object``;
    ``open_scan_file`` loads it)."""
    store = _store(ws)
    if store is not None:
        light = store.without_events(ws.states[store.name])
        light["counts"] = light["counts"].copy()  # merging adds into it
        ws = WorkerScan(ws.scan_id, ws.worker, ws.geometry, ws.operators,
                        {**ws.states, store.name: light}, ws.errors)
    return handoff.offer_object(ws, handoff_dir, key) if handoff_dir else ws


def events_in(ws: WorkerScan, lo: int, hi: int, handoff_dir: str = "", key: str = ""):
    """The frame parts of stored frames ``[lo, hi)`` this worker holds, as chunks; with
    ``handoff_dir`` (the builder is on this host) handed over there under ``key``
    (``transport.handoff.offer``)."""
    store = _store(ws)
    parts = store.events_in(ws.states[store.name], lo, hi) if store else []
    return handoff.offer(parts, handoff_dir, key) if handoff_dir and parts else parts


def _unpack(bits: np.ndarray | None, shape) -> np.ndarray:
    if bits is None:
        return np.zeros(shape, bool)
    return np.unpackbits(bits, axis=-1, count=shape[-1]).astype(bool).reshape(shape)


def _explained(info: ScanInfo, received: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Missing frames with a known cause: (lost, late), sorted int64 frame numbers. Lost: some
    part was processed by a receiver (the coordinator has its report) but is not in the
    merged states, so it went with a worker dask removed; late: some part was dropped
    because it came after the scan closed."""
    absent = received == 0
    lost = (absent & _unpack(info.reported, received.shape)).any(axis=0)
    late = (absent & _unpack(info.late, received.shape)).any(axis=0) & ~lost
    return np.flatnonzero(lost).astype(np.int64), np.flatnonzero(late).astype(np.int64)


def _reason(info: ScanInfo, config: PipelineConfig, n_missing: int, n_lost: int, n_late: int) -> str:
    """One line saying why the scan closed and what is missing, with each cause."""
    never = n_missing - n_lost - n_late
    reason = {"complete": "all frames arrived" if not n_missing else f"{n_missing} frames missing",
              "ended": f"every source sent its end; {n_missing} frames missing, every receiver drained",
              "timeout": f"no message for {config.scan.timeout_s} s and every receiver drained; "
                         "closed with what arrived",
              "abort": f"aborted by the source: {info.abort_reason}",
              "closed": "the session stopped while the scan was running"}[info.close_reason]
    if info.close_reason == "timeout":
        reason += _what_never_came(info)
    causes = []
    if never > 0 and info.close_reason in ("complete", "ended"):
        causes.append(f"{never} never arrived")
    if n_lost:
        causes.append(f"{n_lost} lost with worker {', '.join(f'{w} ({c})' for w, c in info.lost.items())}")
    if n_late:
        causes.append(f"{n_late} came after the scan closed (dropped as late, counted as rejected)")
    return reason + (f": {'; '.join(causes)}" if causes else "")


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
    result to return when the last block is in. ``head``: what ``write_head`` has still to
    write (everything but the events), None once written; until then ``writer`` is None, or
    the file grown while the scan ran."""

    writer: ScanWriter | None
    offsets: np.ndarray
    result: ScanResult
    write_id: str = ""
    head: dict | None = None
    head_error: str = ""
    staging: str = ""
    level: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


_OPEN: dict[str, _OpenScan] = {}  # token -> scan file being written in this process
_STAGED: dict[str, _OpenScan] = {}  # token -> finished file in staging, not yet published
_BUSY: dict[str, int] = {}  # write id -> attempts at it under way in this process
_DONE: dict[str, ScanResult] = {}  # write id -> result of a file this process published (last 256,
# without its arrays: they are in the file, and 256 detector-sized sums would be 100s of MB)


def _busy(write_id: str, delta: int) -> None:
    if not write_id:
        return
    with _OPEN_LOCK:
        n = _BUSY.get(write_id, 0) + delta
        if n > 0:
            _BUSY[write_id] = n
        else:
            _BUSY.pop(write_id, None)


def _done(write_id: str, result: ScanResult) -> None:
    if write_id:
        with _OPEN_LOCK:
            _DONE[write_id] = replace(result, results={}, position_frames=None)
            for old in list(_DONE)[:-256]:
                del _DONE[old]


def written_here(write_id: str) -> tuple:
    """On a worker that wrote (or writes) a scan's file: what became of attempt ``write_id``
    here — ("writing", None), ("written", ScanResult), ("staged", ScanResult) or
    ("none", None). A retry asks first, so that an attempt whose answer was lost is never
    written twice."""
    with _OPEN_LOCK:
        if write_id in _BUSY:
            return "writing", None
        done = _DONE.get(write_id)
        staged = next((t for t, sc in _STAGED.items() if sc.write_id == write_id), None)
        if done is None and staged is not None:
            sc = _STAGED[staged]
            return "staged", replace(sc.result, path=None, staged=staged, write_error="(found staged)")
    if done is not None:
        try:
            results, position_frames = read_images(done.path)
        except OSError:  # moved on since (a fallback file): written all the same
            return "written", done
        return "written", replace(done, results=results, position_frames=position_frames)
    return "none", None
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
                   *light, early: str = "") -> WritePlan | None:
    """On the writer: merge the workers' states (``without_events``: WorkerScans, or their
    handoffs), finalize every operator and start the scan file (the rest of it is written
    while the events come); returns how the events are to come. None, doing nothing, if
    frames arrived more than once and the states are not ``deduplicated`` yet
    (``keep_owned``). ``early``: the token of the file
    ``write_early`` wrote while the scan ran: kept, and only the frames after it planned,
    if its events are exactly those the states hold; else thrown away."""
    light = [handoff.loaded(x) for x in light]
    if not deduplicated and claim_frames(*map(received_counts, light)) is not None:
        return None
    _busy(info.write_id, +1)
    try:
        return _open_scan_file(info, config, token, light, take_early(early))
    except BaseException:
        _busy(info.write_id, -1)
        raise


def _open_scan_file(info: ScanInfo, config: PipelineConfig, token: str, light,
                    early: _EarlyFile | None = None) -> WritePlan:
    try:
        return _open_scan_file_(info, config, token, light, early)
    except BaseException:
        if early is not None and early.writer is not None and not early.adopted:
            early.writer.discard()
        raise


def _open_scan_file_(info: ScanInfo, config: PipelineConfig, token: str, light, early) -> WritePlan:
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
            completeness, summary = op.report(states[op.name])
        else:
            results.update(op.finalize(states[op.name]))
    offsets = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    errors = info.errors + [e for ws in light for e in ws.errors]
    n_missing = summary["n_missing"]
    lost, late = _explained(info, completeness["received"].data)
    status = "complete" if info.close_reason in ("complete", "ended") and not n_missing and not errors \
        else "incomplete"
    reason = _reason(info, config, n_missing, len(lost), len(late))
    if errors:
        reason += f"; {len(errors)} errors: {errors[0]}"
    completeness["lost_frames"] = Result(lost, "table", "frame", "missing frames a receiver had "
                                         "processed, lost with its worker (lost_cause)")
    completeness["late_frames"] = Result(late, "table", "frame", "missing frames that arrived after "
                                         "the scan closed and were dropped (counted as rejected)")
    listed = ("missing_frames", "missing_ranges", "duplicated_frames", "duplicated_ranges")
    summary_attrs = {k: v for k, v in summary.items() if k not in listed}  # those are datasets
    lost_cause = "; ".join(f"worker {w}: {c}" for w, c in info.lost.items())
    summary_attrs.update(n_lost=len(lost), lost_cause=lost_cause, n_late=len(late))
    keep = _early_kept(early, counts, completeness["received"].data, config)
    timings = dict(info.timings, finalize_start=t0, merged=time.time(), early_frames=keep)
    timings.setdefault("early_written", 0)
    timings.setdefault("early_cancelled", 0)
    provenance = {"software": "stemstream", "version": __version__, "python": platform.python_version(),
                  "numpy": np.__version__, "host": socket.gethostname(), "workers": info.workers,
                  "config": JSONText(info.config_json or config_json(config)), "frames_sent_per_source": {str(k): v for k, v in info.frames_sent.items()},
                  "rejected_messages": info.rejects, "rejects": dict(info.reject_reasons),
                  "late_frames": info.late_frames, "errors": errors}
    head = {"scan_id": info.scan_id, "status": status, "reason": reason,
            "geometry": info.geometry.for_sector(None).to_wire(), "metadata": info.metadata,
            "results": results, "offsets": offsets, "completeness": completeness,
            "completeness_summary": summary_attrs, "provenance": {**provenance, "timings": timings},
            "counting": counting}
    head["path"] = Path(info.out_dir or config.output.dir) / f"{info.scan_id}.h5"
    if keep:  # the events of stored frames [0, keep) are in it already
        writer = early.writer
        early.adopted = True
    else:
        if early is not None and early.writer is not None:
            early.writer.discard()
        writer = None
    g = info.geometry
    result = ScanResult(info.scan_id, None, status, reason, n_frames=g.n_frames,
                        frames_received=summary["n_frames_received"],
                        **{f"{a}_{b}": summary[f"{a}_{b}"] for a in ("missing", "duplicated")
                           for b in ("frames", "ranges")},
                        n_missing=n_missing, n_duplicated=summary["n_duplicated"],
                        lost_ranges=runs(lost), lost_cause=lost_cause, late_ranges=runs(late),
                        events=int(offsets[-1]), results={k: r.data for k, r in results.items()},
                        kinds={k: r.kind for k, r in results.items()},
                        units={k: r.unit for k, r in results.items()},
                        position_frames=completeness["position_frames"].data,
                        expected_frames_per_position=g.frames_per_position * g.n_sources,
                        timings=timings, errors=errors, geometry=g, metadata=dict(info.metadata))
    with _OPEN_LOCK:
        if token in _DISCARDED:  # the coordinator gave up on this file while it was opening
            _DISCARDED.discard(token)
            if writer is not None:
                writer.discard()
            raise RuntimeError(f"scan {info.scan_id}: given up while its file was opened")
        _OPEN[token] = _OpenScan(writer, offsets, result, info.write_id, head=head,
                                 staging=staging_dir(config), level=config.output.compression_level)
    blocks = [(lo + keep, hi + keep, int(offsets[lo + keep])) for lo, hi in
              plan_blocks(counts[keep:], max(1, int(config.memory.write_block_mb * 1e6 / 4)))]
    return WritePlan(token, blocks, store, int(offsets[-1]), config.output.compression_level)


@dataclass
class EarlySpec:
    """What the writer needs to write a scan's events while the scan runs (``write_early``):
    the file's name, where to build it (``[memory] spill_dir``, '' : the worker's local
    directory) and the compression level."""

    scan_id: str
    geometry: Geometry
    path: str
    spill_dir: str
    level: int


@dataclass
class _EarlyFile:
    """A scan file written while its scan runs, on this worker: the events of stored frames
    ``[0, stored)`` (frame numbers ``[0, frames)``), their count per stored frame, or the
    error that stopped it."""

    spec: EarlySpec
    store: EventStore
    writer: ScanWriter | None = None
    counts: np.ndarray | None = None
    stored: int = 0
    frames: int = 0
    error: str = ""
    adopted: bool = False
    abandoned: bool = False  # take_early stopped waiting for the block being written
    lock: threading.Lock = field(default_factory=threading.Lock)

    def status(self) -> dict:
        return {"stored": self.stored, "frames": self.frames, "error": self.error,
                "events": self.writer.given if self.writer is not None else 0}


EARLY_WAIT_S = 10.0  # at a scan's end, the block being written early is waited for this long at most
_EARLY: dict[str, _EarlyFile] = {}  # token -> file being written while its scan runs
_EARLY_GONE: dict[str, None] = {}  # tokens taken or discarded (the last 1024): later blocks do nothing


def _early_gone(token: str) -> None:
    _EARLY_GONE[token] = None
    for old in list(_EARLY_GONE)[:-1024]:
        del _EARLY_GONE[old]


def _early_store(spec: EarlySpec) -> EventStore:
    g = spec.geometry
    return EventStore(g.scan_shape, g.frame_shape, g.frames_per_position, g.flyback)


def early_csr(spec: EarlySpec, lo: int, hi: int, *parts) -> tuple[np.ndarray, np.ndarray]:
    """On any worker, while the scan runs: stored frames ``[lo, hi)`` in canonical CSR
    (offsets from 0, uint32 indices) from each worker's ``Receiver.events_in`` parts.
    Raises if a part is None (the scan was not open there: the early file is dropped)."""
    if any(p is None for p in parts):
        raise RuntimeError(f"scan {spec.scan_id}: no longer open on a worker that received its frames")
    return _early_store(spec).csr(handoff.chunks_of(parts), lo, hi)


def early_end(start: int, csr: tuple[np.ndarray, np.ndarray]) -> int:
    """The file position after a block that starts at ``start`` (events)."""
    return int(start) + int(csr[0][-1])


def early_compress(csr: tuple[np.ndarray, np.ndarray], start: int, level: int) -> tuple:
    """On the worker that built ``early_csr``: its whole chunks of the growing file's grid
    (``EVENTS_CHUNK``) compressed, from file position ``start``; returns (offsets,
    EventBlock) for ``write_early``."""
    offsets, indices = csr
    return offsets, compress_block(indices, int(start), None, level)


def write_early(token: str, spec: EarlySpec, lo: int, hi: int, frames: int, after, built) -> dict:
    """On the writer, while the scan runs: stored frames ``[lo, hi)`` (every part of frame
    numbers below ``frames`` was received), built and compressed by ``early_compress`` on
    some worker, into the scan's growing file (``token``). ``after``: the previous block's
    call (keeps the order). Returns the file's ``status``. An error is logged once, throws
    the file away and raises (the coordinator sees the failed task and submits no more; the
    scan is written at its end as if none had been started)."""
    with _OPEN_LOCK:
        early = _EARLY.get(token)
        if early is None:
            if token in _EARLY_GONE:
                return {"stored": 0, "frames": 0, "events": 0, "error": "discarded"}
            early = _EARLY[token] = _EarlyFile(spec, _early_store(spec))
    with early.lock:
        if early.error:
            return early.status()
        try:
            offsets, block = built
            if lo != early.stored:
                raise RuntimeError(f"a block from stored frame {lo} where {early.stored} is next")
            if early.writer is None:
                early.writer = ScanWriter(spec.path, compression_level=spec.level, growing=True,
                                          staging=spec.spill_dir or staging_dir(None))
                early.counts = np.zeros(early.store.n_stored, np.int64)
            check_space(early.writer.tmp.parent, 4 * int(offsets[-1]) + (1 << 20))
            early.writer.put_block(block)
            early.writer.sync()  # off the scan's end: the close's fsync has the rest only
            early.counts[lo:hi] = np.diff(offsets)
            early.stored, early.frames = hi, frames
        except Exception as e:  # noqa: BLE001 - the end writes the scan as if none had started
            early.error = f"{type(e).__name__}: {e}"
            log.warning("scan %s: writing its events while it runs stopped (%s); its file is written "
                        "when it ends", spec.scan_id, early.error)
            if early.writer is not None:
                early.writer.discard()
                early.writer = None
            raise RuntimeError(f"scan {spec.scan_id}: {early.error}") from None
        finally:
            if early.abandoned and early.writer is not None:  # take_early gave up waiting for it
                early.writer.discard()
                early.writer = None
        return early.status()


def discard_early(token: str) -> None:
    """On the writer: throw away the file ``write_early`` started (blocks still to come do
    nothing)."""
    with _OPEN_LOCK:
        early = _EARLY.pop(token, None)
        _early_gone(token)
    if early is not None:
        with early.lock:
            early.error = early.error or "discarded"
            if early.writer is not None:
                early.writer.discard()
                early.writer = None


def take_early(token: str, wait_s: float = EARLY_WAIT_S) -> _EarlyFile | None:
    """On the writer, at the scan's end: the file ``write_early`` wrote up to the last block
    written (None: none, or it stopped). Blocks not started by now never will be; the one
    being written is waited for, at most ``wait_s`` s (then the file is thrown away)."""
    if not token:
        return None
    with _OPEN_LOCK:
        early = _EARLY.pop(token, None)
        _early_gone(token)
    if early is None:
        return None
    if not early.lock.acquire(timeout=wait_s):
        early.abandoned = True  # the block being written throws the file away when it ends
        log.warning("scan %s: a block written while it ran did not end within %.0f s; the scan is "
                    "written at its end", early.spec.scan_id, wait_s)
        return None
    try:
        if early.error or early.writer is None:
            return None
        return early
    finally:
        early.lock.release()


def _early_kept(early: _EarlyFile | None, counts: np.ndarray, received: np.ndarray,
                config: PipelineConfig) -> int:
    """Stored frames of the early file to keep: all it holds when its events are exactly
    those the merged states hold (same counts per stored frame, no frame part received twice
    in them, the file's chunk length and level), else 0."""
    if early is None:
        return 0
    s = early.stored
    why = "" if s else "nothing written"
    if not why and int(counts.sum()) < EVENTS_CHUNK:
        why = "fewer events than one chunk"
    elif not why and early.spec.level != config.output.compression_level:
        why = "another compression level"
    elif not why and not np.array_equal(counts[:s], early.counts[:s]):
        why = "the workers hold other events for its frames (a worker lost?)"
    elif not why and early.frames and int(received[:, :early.frames].max()) > 1:
        why = "frames in it arrived more than once"
    elif not why and early.writer.given != int(counts[:s].sum()):
        why = "its event count is off"
    if why:
        log.info("scan %s: the events written while it ran are not used (%s); written at the end",
                 early.spec.scan_id, why)
        return 0
    return s


def write_head(token: str) -> None:
    """On the writer: everything of the scan file ``open_scan_file`` planned but its events
    still to come (results, completeness, offsets, provenance). A task of its own, so that
    the workers build the last blocks meanwhile; ``write_block`` and ``close_scan_file``
    write it first if it was not (one process: ``finalize_scan``)."""
    with _OPEN_LOCK:
        scan = _OPEN[token]
    _head_written(scan)


def _head_written(scan: _OpenScan) -> ScanWriter:
    with scan.lock:
        if scan.head_error:
            raise RuntimeError(f"scan {scan.result.scan_id}: its file could not be started ({scan.head_error})")
        if scan.head is not None:
            head, scan.head = scan.head, None
            try:
                if scan.writer is not None:  # grown while the scan ran
                    scan.writer.path = head.pop("path")
                    scan.writer.finish_head(**head)
                else:
                    scan.writer = ScanWriter(head.pop("path"), staging=scan.staging,
                                             compression_level=scan.level, **head)
            except BaseException as e:
                scan.head_error = f"{type(e).__name__}: {e}"
                if scan.writer is not None:
                    scan.writer.discard()
                    scan.writer = None
                raise
        return scan.writer


def build_block(plan: WritePlan, k: int, here: WorkerScan | None, *parts: list) -> tuple:
    """On any worker: block ``k`` of the plan from this worker's scan (``here``) and the
    other workers' ``events_in``: canonical CSR, its whole file chunks compressed. Returns
    (offsets of the block's frames from 0, EventBlock)."""
    lo, hi, first = plan.blocks[k]
    chunks = handoff.chunks_of(parts) + (events_in(here, lo, hi) if here is not None else [])
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
    writer = _head_written(scan)
    writer.put_block(block)
    return writer.given


def close_scan_file(token: str, after=None) -> ScanResult:
    """On the writer: check every event is in, name the file, return the scan's result. A
    finished file that cannot go into its directory stays staged here: the result then has
    no ``path`` but ``staged`` (for ``publish_staged``) and ``write_error``."""
    with _OPEN_LOCK:
        scan = _OPEN.pop(token)
    try:
        writer = _head_written(scan)
    except BaseException:
        _busy(scan.write_id, -1)
        raise
    try:
        scan.result.path = writer.close()
    except PublishError as e:
        with _OPEN_LOCK:
            _STAGED[token] = scan
        return replace(scan.result, path=None, staged=token, write_error=str(e))
    finally:
        _busy(scan.write_id, -1)
    scan.result.timings["written"] = time.time()
    _done(scan.write_id, scan.result)
    return scan.result


def publish_staged(token: str, out_dir: str) -> ScanResult:
    """On the writer: put a staged scan file (``close_scan_file``) into ``out_dir``; the
    result says where, or ``write_error`` why not (it stays staged). KeyError if this worker
    holds no such file (it restarted)."""
    with _OPEN_LOCK:
        scan = _STAGED.get(token)
    if scan is None:
        raise KeyError(f"no staged scan file {token} on this worker")
    try:
        final = publish(scan.writer.tmp, Path(out_dir) / scan.writer.path.name)
    except PublishError as e:
        return replace(scan.result, path=None, staged=token, write_error=str(e))
    drop_staged(token)
    result = replace(scan.result, path=final, staged="", write_error="",
                     timings=dict(scan.result.timings, written=time.time()))
    _done(scan.write_id, result)
    return result


def drop_staged(token: str) -> None:
    """On the writer: forget a staged file (published, or written elsewhere)."""
    with _OPEN_LOCK:
        scan = _STAGED.pop(token, None)
    if scan is not None:
        scan.writer.discard()


def config_json(config: PipelineConfig) -> str:
    """The configuration as /provenance keeps it (JSON text)."""
    return json.dumps(config.to_dict(), default=str)


def staging_dir(config: PipelineConfig | None) -> str:
    """Where this process builds scan files before publishing them: ``[memory] spill_dir``,
    else the dask worker's local directory, else the system's temporary directory."""
    if config is not None and config.memory.spill_dir:
        return config.memory.spill_dir
    try:
        from distributed import get_worker
        return get_worker().local_directory
    except (ImportError, ValueError):
        return tempfile.gettempdir()


def discard_scan_file(token: str) -> None:
    """On the writer: drop a file that could not be finished (nothing is left on disk); a
    file still being opened is dropped when it is."""
    with _OPEN_LOCK:
        scan = _OPEN.pop(token, None)
        if scan is None:
            _DISCARDED.add(token)
    if scan is not None:
        _busy(scan.write_id, -1)
        with scan.lock:  # a head not written yet never will be
            scan.head, scan.head_error = None, scan.head_error or "given up"
            if scan.writer is not None:
                scan.writer.discard()


def finalize_scan(info: ScanInfo, config: PipelineConfig, *worker_scans: WorkerScan) -> ScanResult:
    """Finalize and write a scan from the workers' states, all in this process."""
    worker_scans = drop_duplicates(list(worker_scans))
    plan = open_scan_file(info, config, uuid.uuid4().hex, True, *map(without_events, worker_scans))
    try:
        write_head(plan.token)
        for k, (lo, hi, _) in enumerate(plan.blocks):
            built = build_block(plan, k, None, *(events_in(ws, lo, hi) for ws in worker_scans))
            write_block(plan.token, lo, hi, None, built)
        return close_scan_file(plan.token)
    except BaseException:
        discard_scan_file(plan.token)
        raise


def portable(ws: WorkerScan) -> WorkerScan:
    """The worker's scan ready to travel to the writer, for small scans written by one task:
    every event in memory (chunks on disk read back), and without its operators (the writer
    has the same ones: they are built from the configuration and the geometry, and carry
    masks of megabytes)."""
    store = _store(ws)
    states = ws.states
    if store is not None and not all(isinstance(c, Chunk) for c in states[store.name]["chunks"]):
        states = {**states, store.name: dict(states[store.name],
                                             chunks=list(store.iter_chunks(states[store.name])))}
    return replace(ws, operators=[], states=states)


_BUILT: OrderedDict = OrderedDict()  # (configuration, geometry) -> operators, on this worker
_BUILT_LOCK = threading.Lock()
OPERATOR_CACHE = 8  # geometries whose operators a writer keeps built (bursts of similar scans)


def writer_operators(info: ScanInfo, config: PipelineConfig) -> list:
    """The operators of the scan's configuration and geometry, built once per pair on this
    worker: building them costs tens of ms (masks, kernel choice, fusion), as much as writing
    a small scan's file, and the writer of a burst's scan often holds none of its frames.
    Operators hold no per-scan state (their states are separate), so scans share them."""
    key = (info.config_json or config_json(config), info.geometry)
    with _BUILT_LOCK:
        ops = _BUILT.get(key)
        if ops is not None:
            _BUILT.move_to_end(key)
            return ops
    ops = build_operators(config, info.geometry)
    with _BUILT_LOCK:
        _BUILT[key] = ops
        while len(_BUILT) > OPERATOR_CACHE:
            _BUILT.popitem(last=False)
    return ops


def finalize_small(info: ScanInfo, config: PipelineConfig, here: WorkerScan | None,
                   *others: WorkerScan) -> ScanResult:
    """On the writer: a small scan finalized and written in one task, from this worker's
    state (``here``, as it is; None if it holds none) and the others' ``portable`` states."""
    ops = here.operators if here is not None and here.operators else writer_operators(info, config)
    others = [replace(ws, operators=ops) if ws.states else ws for ws in others]
    return finalize_scan(info, config, *(ws for ws in (here, *others) if ws is not None))


def result_of(future, timeout: float, stop: threading.Event | None = None, what: str = "a task"):
    """``future.result()`` waited for here, never with distributed's own timeout (which, when
    it expires as the task ends, can raise an UnboundLocalError instead of the outcome).
    TimeoutError after ``timeout`` s; WorkerLost as soon as ``stop`` is set."""
    done = threading.Event()
    future.add_done_callback(lambda _: done.set())
    deadline = time.monotonic() + timeout
    while not done.wait(min(0.5, max(0.0, deadline - time.monotonic()))):
        if stop is not None and stop.is_set():
            raise WorkerLost(f"{what}: a worker holding it left the cluster")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not done within {timeout:.0f} s")
    return future.result()


def finalize_on_cluster(client, info: ScanInfo, config: PipelineConfig, closed: dict,
                        writer: str, timeout: float, small: bool = False,
                        stop: threading.Event | None = None, travelling: set = frozenset(),
                        early: str = "") -> ScanResult:
    """``finalize_scan`` with every worker's state left where it is.

    closed: worker address → future of its ``WorkerScan`` (on that worker); writer: the
    worker that writes the file. Small states go to the writer first (on one host through
    ``[memory] handoff_dir``). Then the events, one block of frames at a time, at most
    ``IN_FLIGHT`` blocks under way: the workers take their parts of a block to its builder,
    which builds and compresses it, and the writer writes it. On one host the writer builds
    them all, the parts coming through ``handoff_dir``; on several the workers take turns.
    No process holds a whole scan.
    ``small``: the other workers send their whole states to the writer, which does
    everything in one task (fewer round trips; for scans of a few million electrons).
    ``stop``: set by another thread when a worker of the scan left; raises WorkerLost.
    ``travelling``: workers whose closed state is already ``portable``. ``early``: the
    token of the file ``write_early`` wrote on ``writer`` while the scan ran (not ``small``)."""
    deadline = time.monotonic() + timeout

    def on(worker, fn, *args, **kwargs):
        return client.submit(fn, *args, **kwargs, workers=[worker], allow_other_workers=False, pure=False)

    def wait(future):
        return result_of(future, max(0.0, deadline - time.monotonic()), stop, f"scan {info.scan_id}")

    workers = list(closed)
    token = uuid.uuid4().hex
    futures = []

    def on_(worker, fn, *args, **kwargs):  # a task to cancel if the scan fails
        futures.append(on(worker, fn, *args, **kwargs))
        return futures[-1]

    if small:
        try:
            return wait(on_(writer, finalize_small, info, config, closed.get(writer),
                            *(closed[w] if w in travelling else on(w, portable, closed[w])
                              for w in workers if w != writer)))
        except BaseException:
            client.cancel(futures)
            raise
    shared = config.memory.handoff_dir if handoff.on_one_host(workers) else ""

    def light(kept):  # the states without their events, on the writer's host through memory
        return [on(w, without_events, kept[w], shared if w != writer else "", token) for w in workers]

    try:
        kept = closed
        plan = wait(on_(writer, open_scan_file, info, config, token, False, *light(kept), early=early))
        if plan is None:  # frames arrived more than once: the workers drop the extra copies first
            owners = on(writer, claim_frames, *(on(w, received_counts, closed[w]) for w in workers))
            kept = {w: on(w, keep_owned, closed[w], owners, i) for i, w in enumerate(workers)}
            plan = wait(on_(writer, open_scan_file, info, config, token, True, *light(kept), early=early))
        # On one host the writer builds every block, the others handing their parts over in
        # memory (transport.handoff): no built block moves. Else the workers take turns, the
        # writer last (it has the most to do).
        builders = [writer] if shared else [w for w in workers if w != writer] + [writer]
        writes = []
        for k, (lo, hi, _) in enumerate(plan.blocks):
            at = builders[k % len(builders)]
            parts = [on(w, events_in, kept[w], lo, hi, shared, token) for w in workers if w != at]
            built = on(at, build_block, plan, k, kept.get(at), *parts)
            if not writes:  # the head, once the writer gave its part of the first block: the
                # other workers build that block while it is written
                writes.append(on_(writer, write_head, token))
            writes.append(on_(writer, write_block, token, lo, hi, writes[-1], built))
            if len(writes) > IN_FLIGHT + 1:
                wait(writes[-IN_FLIGHT - 2])
        if not writes:
            writes.append(on_(writer, write_head, token))
        return wait(on_(writer, close_scan_file, token, writes[-1]))
    except BaseException:
        client.cancel(futures)  # what has not started never will
        try:
            if early:  # (if it was not taken yet)
                from distributed import fire_and_forget
                fire_and_forget(on(writer, discard_early, early))
            result_of(on(writer, discard_scan_file, token), 10.0)
        except Exception:  # noqa: BLE001 - the first error is the one to report
            pass
        raise
    finally:
        if shared:  # forget the parts handed over; remove those of blocks never built
            from distributed import fire_and_forget
            fire_and_forget([on(w, handoff.release, token) for w in workers])
