"""The unit of work of every streaming operator: a chunk of electron events in CSR layout."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Chunk:
    """Electron events of ``n`` frames (or of one detector sector of each frame).

    frames: (n,) int64 frame number within the scan (raster order, flyback included).
    sources: (n,) int16 source (detector sector) each frame part came from.
    positions: (n,) int64 flat scan index row·nx + column; -1 for flyback frames, which
        operators skip.
    offsets: (n + 1,) int64; the events of frame i are ``indices[offsets[i]:offsets[i+1]]``.
    indices: (offsets[-1],) uint32 flat detector pixel index y·w + x.
    """

    frames: np.ndarray
    sources: np.ndarray
    positions: np.ndarray
    offsets: np.ndarray
    indices: np.ndarray

    def __post_init__(self):
        n = len(self.frames)
        if not (len(self.sources) == len(self.positions) == n and len(self.offsets) == n + 1):
            raise ValueError(f"chunk arrays disagree: {n} frames, {len(self.sources)} sources, "
                             f"{len(self.positions)} positions, {len(self.offsets)} offsets (n+1)")
        if n and int(self.offsets[-1]) != len(self.indices):
            raise ValueError(f"offsets end at {int(self.offsets[-1])} but there are "
                             f"{len(self.indices)} events")

    @property
    def n_frames(self) -> int:
        return len(self.frames)

    @property
    def n_events(self) -> int:
        return len(self.indices)

    @property
    def nbytes(self) -> int:
        """Bytes held by the chunk's arrays."""
        return sum(a.nbytes for a in (self.frames, self.sources, self.positions, self.offsets,
                                      self.indices))

    @property
    def counts(self) -> np.ndarray:
        """(n,) int64 events per frame."""
        return np.diff(self.offsets)

    @classmethod
    def from_counts(cls, frames, sources, positions, counts, indices) -> "Chunk":
        """Build a chunk from per-frame event counts instead of offsets."""
        offsets = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        return cls(np.asarray(frames, dtype=np.int64), np.asarray(sources, dtype=np.int16),
                   np.asarray(positions, dtype=np.int64), offsets,
                   np.asarray(indices, dtype=np.uint32))

    def select(self, keep: np.ndarray) -> "Chunk":
        """The chunk restricted to the frames where boolean ``keep`` (n,) is True."""
        keep = np.asarray(keep, dtype=bool)
        starts, stops = self.offsets[:-1][keep], self.offsets[1:][keep]
        counts = stops - starts
        if len(starts):
            # Gather the kept frames' event ranges without a Python loop over frames.
            ev_keep = np.repeat(keep, self.counts)
            indices = self.indices[ev_keep]
        else:
            indices = self.indices[:0]
        return Chunk.from_counts(self.frames[keep], self.sources[keep], self.positions[keep],
                                 counts, indices)
