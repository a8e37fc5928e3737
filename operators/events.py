"""Event store: every electron of a scan, kept for compressed storage as canonical CSR.

Examples
--------
>>> from operators.events import EventStore
>>> op = EventStore(scan_shape=(7, 9), frame_shape=(32, 40), frames_per_position=2)
>>> state = op.new_state()        # then op.process(state, chunk) per chunk, op.merge(...)
>>> offsets, indices = op.finalize(state)
>>> offsets.shape                 # one CSR row per stored frame: position*fpp + k
(127,)
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
from numba import njit

from operators.base import Operator, State
from operators.chunk import Chunk
from operators.kernels import NJIT, shape2, sort_segments


@njit(**NJIT)
def _sort_check_kernel(offsets, indices, n_pix):
    """Sort every frame's events in place; return how many are >= n_pix."""
    bad = 0
    for e in range(np.uint64(indices.shape[0])):  # (unsigned: contiguous vector loads)
        bad += np.int64(indices[e]) >= n_pix
    sort_segments(offsets, indices)
    return bad


@njit(**NJIT)
def _stored_kernel(frames, nx, flyback, fpp, positions, stored):
    """``stored[i]``: the CSR row of frame number ``frames[i]`` (position·fpp + frame % fpp,
    -1 for flyback; frame numbers >= 0). With ``positions`` (one per frame, or empty: not
    checked) returns how many of them disagree with their frame's position."""
    wrong = 0
    check = positions.shape[0] > 0
    for i in range(frames.shape[0]):
        f = frames[i]
        raster = f // fpp
        row = raster // (nx + flyback)
        col = raster - row * (nx + flyback)
        pos = row * nx + col if col < nx else -1
        if check and pos != positions[i]:
            wrong += 1
        stored[i] = pos * fpp + (f - raster * fpp) if pos >= 0 else -1
    return wrong


@njit(**NJIT)
def _count_kernel(stored, offsets, counts):
    for i in range(stored.shape[0]):
        s = stored[i]
        if s >= 0:
            counts[s] += offsets[i + 1] - offsets[i]


@njit(**NJIT)
def _scatter_kernel(stored, sources, source, offsets, indices, cursor, out):
    """Append the events of this chunk's parts from ``source`` to their stored frames."""
    for i in range(stored.shape[0]):
        s = stored[i]
        if s < 0 or sources[i] != source:
            continue
        c = cursor[s]
        for e in range(offsets[i], offsets[i + 1]):
            out[c] = indices[e]
            c += 1
        cursor[s] = c


def plan_blocks(counts: np.ndarray, max_events: int) -> list[tuple[int, int]]:
    """Split stored frames into consecutive ranges ``[lo, hi)`` of at most ``max_events``
    events each (a frame with more events than that gets a range of its own).

    counts: (n,) events per stored frame. Used to write a scan's events block by block."""
    counts = np.asarray(counts, dtype=np.int64)
    bounds, lo, n = [], 0, len(counts)
    ends = np.cumsum(counts)
    while lo < n:
        start = ends[lo - 1] if lo else 0
        hi = int(np.searchsorted(ends, start + max_events, side="right"))
        hi = max(hi, lo + 1)
        bounds.append((lo, hi))
        lo = hi
    return bounds


class EventStore(Operator):
    """Keeps every event of a scan; finalizes to one CSR over the stored frames.

    Parameters
    ----------
    scan_shape : (ny, nx) probe positions.
    frame_shape : (h, w) detector pixels.
    frames_per_position : fpp.
    flyback : flyback frames per scan row (their events are kept until finalize drops them).
    name : operator name.

    Notes
    -----
    State: ``chunks``, copies of the chunks as they arrived, with the events of every frame
    part sorted by pixel index (canonical, and compresses better); an entry may also be any
    object with ``load() -> Chunk`` (a chunk its owner moved to disk); ``spans``, the stored
    frames ``[lo, hi)`` each chunk touches; ``counts`` (n_stored,) int64, the events held per
    stored frame. ``merge`` concatenates the lists and adds the counts.

    Stored frame = ``position*fpp + frame % fpp`` (flyback frames dropped). ``finalize``
    returns ``(offsets, indices)`` of the whole scan, ``csr`` of any range of stored frames
    from the parts ``events_in`` takes from each state: the parts of all sources of a frame
    together and sorted, frames never received empty; offsets int64 from 0, indices uint32
    flat detector pixel y*w + x. Unlike other operators, finalize returns these two arrays
    rather than Results.
    """

    live = False

    def __init__(self, scan_shape, frame_shape, frames_per_position=1, flyback=0, name="events"):
        self.name = name
        self.scan_shape = shape2(scan_shape, "scan_shape")
        self.frame_shape = shape2(frame_shape, "frame_shape")
        self.fpp = int(frames_per_position)
        self.flyback = int(flyback)
        if self.fpp < 1 or self.flyback < 0:
            raise ValueError(f"EventStore: need frames_per_position >= 1 and flyback >= 0, got "
                             f"{frames_per_position}, {flyback}")
        ny, nx = self.scan_shape
        self.n_frames = ny * (nx + self.flyback) * self.fpp
        self.n_positions = ny * nx
        self.n_stored = self.n_positions * self.fpp
        self.n_pixels = self.frame_shape[0] * self.frame_shape[1]

    def stored_frames(self, frames: np.ndarray) -> np.ndarray:
        """Stored CSR row (position*fpp + frame % fpp) of each frame number (>= 0); -1 for
        flyback."""
        frames = np.ascontiguousarray(frames, dtype=np.int64)
        stored = np.empty(len(frames), np.int64)
        _stored_kernel(frames, self.scan_shape[1], self.flyback, self.fpp, frames[:0], stored)
        return stored

    def new_state(self) -> State:
        return {"chunks": [], "spans": [], "counts": np.zeros(self.n_stored, dtype=np.int64)}

    def process(self, state: State, chunk: Chunk) -> None:
        """Store a sorted copy of ``chunk`` (flyback frames included).

        Raises ValueError, storing nothing, if frames, positions or pixel indices are
        inconsistent with the scan.
        """
        where = f"EventStore {self.name!r}"
        frames = np.ascontiguousarray(chunk.frames, dtype=np.int64)  # one compiled layout for the kernel
        if len(frames) and (frames.min() < 0 or frames.max() >= self.n_frames):
            raise ValueError(f"{where}: frame numbers {frames.min()}..{frames.max()} outside the "
                             f"scan's 0..{self.n_frames - 1}")
        if len(frames) and int(np.min(chunk.sources)) < 0:
            raise ValueError(f"{where}: negative source numbers in the chunk")
        stored = np.empty(len(frames), np.int64)
        positions = np.ascontiguousarray(chunk.positions, dtype=np.int64)
        if len(positions) != len(frames) or _stored_kernel(frames, self.scan_shape[1], self.flyback, self.fpp,
                                                           positions, stored):
            raise ValueError(f"{where}: chunk positions disagree with its frame numbers for "
                             f"scan {self.scan_shape}, fpp {self.fpp}, flyback {self.flyback}")
        indices = np.array(chunk.indices, dtype=np.uint32, copy=True)
        offsets = np.array(chunk.offsets, dtype=np.int64, copy=True)
        bad = _sort_check_kernel(offsets, indices, np.int64(self.n_pixels))
        if bad:
            raise ValueError(f"{where}: {bad} event(s) with a pixel index >= {self.n_pixels} "
                             f"(the detector size); chunk not stored")
        _count_kernel(stored, offsets, state["counts"])
        kept = stored[stored >= 0]
        state["spans"].append((int(kept.min()), int(kept.max()) + 1) if len(kept) else (0, 0))
        state["chunks"].append(Chunk(frames.copy(), np.array(chunk.sources, dtype=np.int16),
                                     np.array(chunk.positions, dtype=np.int64), offsets, indices))

    def merge(self, dest: State, src: State) -> None:
        """Concatenate the stored chunk lists (the chunks are shared, not copied)."""
        dest["chunks"].extend(src["chunks"])
        dest["spans"].extend(src["spans"])
        dest["counts"] += src["counts"]

    def iter_chunks(self, state: State) -> Iterator[Chunk]:
        """The stored chunks in stored order, e.g. to re-run other operators over them."""
        for c in state["chunks"]:
            yield c if isinstance(c, Chunk) else c.load()

    def without_events(self, state: State) -> State:
        """The state with its counts but none of its chunks: what a writer needs to plan."""
        return {"chunks": [], "spans": [], "counts": state["counts"]}

    def events_in(self, state: State, lo: int, hi: int) -> list[Chunk]:
        """The frame parts held in ``state`` whose stored frame is in ``[lo, hi)``, as
        chunks (stored chunks inside the range as they are, no copy; chunks on disk are
        read; flyback frames left out)."""
        parts = []
        for c, (a, b) in zip(state["chunks"], state["spans"]):
            if a < hi and b > lo:
                c = c if isinstance(c, Chunk) else c.load()
                sf = self.stored_frames(c.frames)
                keep = (sf >= lo) & (sf < hi)
                parts.append(c if keep.all() else c.select(keep))
        return parts

    def csr(self, parts, lo: int = 0, hi: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Canonical CSR of stored frames ``[lo, hi)`` from chunks holding them (any order,
        any chunking; frame parts outside the range ignored): ``(offsets (hi - lo + 1,)
        int64 from 0, indices uint32)``."""
        hi = self.n_stored if hi is None else hi
        parts = [c if isinstance(c, Chunk) else c.load() for c in parts]
        counts = np.zeros(hi - lo, dtype=np.int64)
        stored = []
        for c in parts:
            sf = self.stored_frames(c.frames)
            sf = np.where((sf >= lo) & (sf < hi), sf - lo, -1)
            stored.append(sf)
            _count_kernel(sf, c.offsets, counts)
        offsets = np.zeros(hi - lo + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        indices = np.empty(int(offsets[-1]), dtype=np.uint32)
        cursor = offsets[:-1].copy()
        # Source by source: sectors are row stripes, so with sorted parts each frame comes out
        # sorted already when sources number their stripes top to bottom; sort_segments then
        # only checks. Any other numbering is sorted there.
        n_sources = max((int(c.sources.max()) + 1 for c in parts if c.n_frames), default=0)
        for source in range(n_sources):
            for c, sf in zip(parts, stored):
                _scatter_kernel(sf, c.sources, source, c.offsets, c.indices, cursor, indices)
        sort_segments(offsets, indices)
        return offsets, indices

    def finalize(self, state: State) -> tuple[np.ndarray, np.ndarray]:
        """Canonical CSR of the scan: ``(offsets (ny*nx*fpp + 1,) int64, indices uint32)``.

        Every stored copy is kept: drop repeated (source, frame) parts before (see
        ``completeness.repeat_mask``). The result does not depend on chunking, merge or
        arrival order.
        """
        return self.csr(state["chunks"])
