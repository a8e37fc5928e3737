"""``stemstream process-file``: the streaming operators over recorded scans, on the cluster.

The client reads only a file's header. The stored frames are cut into ranges; each range is a
task in which a worker opens the file itself, reads its frames and runs the operators (no
sockets, no bulk data through the client or the scheduler). The partial states merge pairwise on
the workers (integer sums: exact, so the results equal a live run's), and one worker writes the
new scan file: new results, the recording's events and completeness copied unchanged.
"""

from __future__ import annotations

import platform
import socket
import time
from pathlib import Path

import numpy as np

from operators.chunk import Chunk
from operators.completeness import Completeness
from operators.events import EventStore
from operators.kernels import sort_segments

from stream import __version__
from stream.config import PipelineConfig, build_operators
from stream.session.finalize import ScanResult, config_json
from stream.files.recording import Recording, open_recording
from stream.stages.runner import run_stages
from stream.files.storage import JSONText, write_scan

FRAMES_PER_TASK = 1 << 16  # at 100 e-/frame: 26 MB of events per task


def result_operators(config: PipelineConfig, rec: Recording) -> list:
    """The operators that make /results (completeness and events come from the recording)."""
    return [op for op in build_operators(config, rec.geometry)
            if not isinstance(op, (Completeness, EventStore))]


def frame_ranges(n_stored: int, n_workers: int, per_task: int = FRAMES_PER_TASK) -> list[tuple[int, int]]:
    """[lo, hi) ranges of stored frames: at least 2 per worker (so a slow one is helped),
    at most ``per_task`` frames each."""
    n = max(1, min(n_stored, max(2 * n_workers, -(-n_stored // per_task))))
    edges = np.linspace(0, n_stored, n + 1).round().astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a] or [(0, 0)]


def chunk_of(rec: Recording, lo: int, hi: int) -> Chunk:
    """Stored frames lo:hi of a recording as one chunk (source 0, raster frame numbers)."""
    offsets, indices = rec.read(lo, hi)
    stored = np.arange(lo, hi, dtype=np.int64)
    return Chunk(rec.raster_frames(stored), np.zeros(hi - lo, np.int16),
                 stored // rec.geometry.frames_per_position, offsets, indices)


def process_range(path: str, flyback: int | None, lo: int, hi: int, config: PipelineConfig) -> dict:
    """On a worker: the operator states of stored frames lo:hi of the file at ``path``."""
    rec = open_recording(path, flyback)
    ops = result_operators(config, rec)
    states = {op.name: op.new_state() for op in ops}
    if hi > lo:
        chunk = chunk_of(rec, lo, hi)
        for op in ops:
            op.process(states[op.name], chunk)
    return states


def apply_to_range(path: str, flyback: int | None, lo: int, hi: int, op) -> tuple[dict, int, int]:
    """On a worker: an ad-hoc operator over stored frames lo:hi of the file at ``path``;
    (its state, frames, events)."""
    state = op.new_state()
    if hi <= lo:
        return state, 0, 0
    chunk = chunk_of(open_recording(path, flyback), lo, hi)
    op.process(state, chunk)
    return state, chunk.n_frames, chunk.n_events


def merge_pair(path: str, flyback: int | None, config: PipelineConfig, a: dict, b: dict) -> dict:
    rec = open_recording(path, flyback)
    for op in result_operators(config, rec):
        op.merge(a[op.name], b[op.name])
    return a


def write_result(path: str, flyback: int | None, config: PipelineConfig, states: dict,
                 workers: list, t_start: float) -> ScanResult:
    """On a worker: finalize the merged states and write the new scan file."""
    rec = open_recording(path, flyback)
    results = {}
    for op in result_operators(config, rec):
        results.update(op.finalize(states[op.name]))
    t_merged = time.time()
    g = rec.geometry
    provenance = {"software": "stemstream", "version": __version__, "python": platform.python_version(),
                  "numpy": np.__version__, "host": socket.gethostname(), "workers": workers,
                  "config": JSONText(config_json(config)), "source_file": str(Path(path).resolve()),
                  "source_format": rec.kind, "source_provenance": rec.provenance,
                  "timings": {"started": t_start, "merged": t_merged}}
    fields = dict(scan_id=rec.scan_id, geometry=g.to_wire(), metadata=rec.metadata, results=results,
                  provenance=provenance, compression_level=config.output.compression_level)
    if rec.kind == "stemstream":
        import h5py
        with h5py.File(path, "r") as f:
            status, reason = str(f.attrs.get("status", "")), str(f.attrs.get("reason", ""))
            summary = {k: v for k, v in f["completeness"].attrs.items()}
            position_frames = f["completeness/position_frames"][...] if "position_frames" in f["completeness"] else None
        n_events = rec.n_events
        out = write_scan(Path(config.output.dir) / f"{rec.scan_id}.h5", status=status,
                         reason=f"{reason}; re-analysed by process-file", copy_from=path, **fields)
    else:  # a stempy file: its events become stemstream CSR, every frame counted as received
        offsets, indices = rec.read()
        sort_segments(offsets, indices)
        comp = Completeness(1, g.scan_shape, g.frames_per_position, g.flyback)
        state = comp.new_state()
        comp.add_range(state, 0, 0, g.n_frames)
        completeness, summary = comp.report(state)
        status, reason = "complete", f"converted from the stempy file {Path(path).name}"
        n_events, position_frames = len(indices), completeness["position_frames"].data
        out = write_scan(Path(config.output.dir) / f"{rec.scan_id}.h5", status=status, reason=reason,
                         offsets=offsets, indices=indices, completeness=completeness,
                         completeness_summary={k: v for k, v in summary.items()
                                               if not k.endswith(("_frames", "_ranges"))}, **fields)
    n_missing = int(summary.get("n_missing", 0))
    return ScanResult(rec.scan_id, out, status, reason, n_frames=g.n_frames,
                      frames_received=int(summary.get("n_frames_received", g.n_frames - n_missing)),
                      n_missing=n_missing, n_duplicated=int(summary.get("n_duplicated", 0)),
                      events=int(n_events), results={k: r.data for k, r in results.items()},
                      kinds={k: r.kind for k, r in results.items()}, position_frames=position_frames,
                      units={k: r.unit for k, r in results.items()},
                      expected_frames_per_position=g.frames_per_position * g.n_sources,
                      timings={"started": t_start, "merged": t_merged, "written": time.time()},
                      geometry=g, metadata=dict(rec.metadata))


def process_file(path, config: PipelineConfig, client, flyback: int | None = None,
                 progress=None) -> ScanResult:
    """Run the operators of ``config`` over one recorded scan on ``client``'s cluster and write
    the new scan file into ``config.output.dir``. Raises ScanFileError (bad file) or
    ConfigError (a configuration that does not fit the scan) before any task runs.

    progress: optional callable(ranges_done, n_ranges).
    """
    from distributed import as_completed

    t0 = time.time()
    path = str(Path(path).resolve())  # workers may run in another directory
    rec = open_recording(path, flyback)
    result_operators(config, rec)  # a configuration that does not fit fails here, not on a worker
    workers = sorted(client.scheduler_info()["workers"])
    ranges = frame_ranges(rec.n_stored, len(workers))
    shared = client.scatter(config, broadcast=True, hash=False)  # once, not with every task (mask stacks)
    parts = [client.submit(process_range, path, flyback, lo, hi, shared, pure=False) for lo, hi in ranges]
    merging = as_completed(parts)
    waiting, done, n_parts = None, 0, len(parts)
    parts = set(parts)
    for fut in merging:  # merge as ranges finish: early ones merge while others still run
        if fut in parts:
            done += 1
            if progress:
                progress(done, n_parts)
        if waiting is None:
            waiting = fut
        else:
            merging.add(client.submit(merge_pair, path, flyback, shared, waiting, fut, pure=False))
            waiting = None
    result = client.submit(write_result, path, flyback, shared, waiting, workers, t0, pure=False).result()
    stages = config.stages
    if stages.run:
        result.stages = client.submit(run_stages, str(result.path), list(stages.run), dict(stages.params),
                                      config.output.previews, pure=False).result()
    return result

