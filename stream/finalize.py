"""Finalize a closed scan on one worker: merge the workers' states, finalize every operator,
write the scan file. Returns a small summary and the result images."""

from __future__ import annotations

import platform
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from operators.base import Result
from operators.completeness import Completeness, repeat_mask
from operators.events import EventStore

from . import __version__
from .config import PipelineConfig, build_operators
from .protocol import Geometry
from .receiver import WorkerScan
from .storage import write_scan


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
    position_frames: np.ndarray | None = None  # (ny, nx) frame parts received per position
    expected_frames_per_position: int = 1  # frames_per_position · n_sources
    timings: dict = field(default_factory=dict)
    errors: list = field(default_factory=list)
    previews: list = field(default_factory=list)
    stages: list = field(default_factory=list)  # StageReports, when the stages ran with the scan

    @property
    def result_objects(self) -> dict:
        return {n: Result(d, self.kinds.get(n, "table")) for n, d in self.results.items()}

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
    Completeness keeps counting every copy that arrived."""
    store = next(op for op in ws.operators if isinstance(op, EventStore))
    seen = ~own  # frames owned elsewhere count as already seen: every copy here is dropped
    fresh = {op.name: op.new_state() for op in ws.operators if not isinstance(op, Completeness)}
    for chunk in store.iter_chunks(ws.states[store.name]):
        kept = chunk.select(~repeat_mask(chunk.frames, chunk.sources, seen))
        for op in ws.operators:
            if op.name in fresh:
                op.process(fresh[op.name], kept)
    states = {**ws.states, **fresh}
    return WorkerScan(ws.scan_id, ws.worker, ws.geometry, ws.operators, states, ws.errors)


def drop_duplicates(worker_scans: list[WorkerScan]) -> list[WorkerScan]:
    """Frames that arrived more than once (on one worker or on several) count once: the first
    worker holding a copy keeps one, every other copy is dropped and the states of the
    workers concerned are recomputed from their stored events (rare, so not optimised)."""
    counts = [received_counts(ws) for ws in worker_scans]
    held = [c for c in counts if c is not None]
    if not held or (max(int(c.max(initial=0)) for c in held) <= 1
                    and int(sum((c > 0).astype(np.int64) for c in held).max(initial=0)) <= 1):
        return worker_scans
    claimed = np.zeros(held[0].shape, bool)
    out = []
    for ws, c in zip(worker_scans, counts):
        if c is None:
            out.append(ws)
            continue
        own = (c > 0) & ~claimed
        claimed |= own
        # recompute only where copies are dropped: frames owned elsewhere, or held twice here
        out.append(keep_owned_frames(ws, own) if ((c > 0) & ~own).any() or c.max() > 1 else ws)
    return out


def _what_never_came(info: ScanInfo) -> str:
    """Why a scan timed out: the sources whose ``end`` never arrived (a source that stopped
    early, or a lost connection), so that an operator knows where to look."""
    silent = [s for s in range(info.geometry.n_sources) if s not in info.frames_sent]
    if not silent:
        return " (every source sent its end; frames it announced are missing)"
    return f" (no end message from source{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))})"


def finalize_scan(info: ScanInfo, config: PipelineConfig, *worker_scans: WorkerScan) -> ScanResult:
    t0 = time.time()
    ops, states = merge_states(drop_duplicates(list(worker_scans)), config, info.geometry)
    results, completeness, summary = {}, {}, {}
    offsets = indices = None
    for op in ops:
        if isinstance(op, EventStore):
            offsets, indices = op.finalize(states[op.name])
        elif isinstance(op, Completeness):
            completeness = op.finalize(states[op.name])
            summary = op.summary(states[op.name])
        else:
            results.update(op.finalize(states[op.name]))
    errors = info.errors + [e for ws in worker_scans for e in ws.errors]
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
    t_merged = time.time()
    timings = dict(info.timings, finalize_start=t0, merged=t_merged)
    provenance = {"software": "stemstream", "version": __version__, "python": platform.python_version(),
                  "numpy": np.__version__, "host": socket.gethostname(), "workers": info.workers,
                  "config": config.to_dict(), "frames_sent_per_source": {str(k): v for k, v in info.frames_sent.items()},
                  "rejected_messages": info.rejects, "errors": errors}
    path = write_scan(Path(config.output.dir) / f"{info.scan_id}.h5", scan_id=info.scan_id,
                      status=status, reason=reason, geometry=info.geometry.for_sector(None).to_wire(),
                      metadata=info.metadata, results=results, offsets=offsets, indices=indices,
                      completeness=completeness,
                      completeness_summary={k: v for k, v in summary.items()
                                            if not k.endswith(("_frames", "_ranges"))},  # datasets
                      provenance={**provenance, "timings": timings},
                      compression_level=config.output.compression_level)
    timings["written"] = time.time()
    g = info.geometry
    return ScanResult(info.scan_id, path, status, reason, n_frames=g.n_frames,
                      frames_received=summary["n_frames_received"],
                      **{f"{a}_{b}": summary[f"{a}_{b}"] for a in ("missing", "duplicated")
                         for b in ("frames", "ranges")},
                      n_missing=n_missing, n_duplicated=summary["n_duplicated"],
                      events=int(len(indices)), results={k: r.data for k, r in results.items()},
                      kinds={k: r.kind for k, r in results.items()},
                      position_frames=completeness["position_frames"].data,
                      expected_frames_per_position=g.frames_per_position * g.n_sources,
                      timings=timings, errors=errors)
