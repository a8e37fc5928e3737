"""Synthetic sparse scans and dense references shared by the operator tests (test_op_*.py).

Every expected number in the operator tests comes from the DENSE frames built here with
np.add.at and plain numpy, never from the operators under test.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from operators.chunk import Chunk


@dataclass
class Scan:
    """A random sparse scan: one CSR row per detector frame (flyback frames included)."""

    scan_shape: tuple
    frame_shape: tuple
    fpp: int
    flyback: int
    offsets: np.ndarray  # (n_frames + 1,)
    indices: np.ndarray  # uint32

    @property
    def n_frames(self):
        ny, nx = self.scan_shape
        return ny * (nx + self.flyback) * self.fpp

    @property
    def n_positions(self):
        return self.scan_shape[0] * self.scan_shape[1]

    @property
    def n_pixels(self):
        return self.frame_shape[0] * self.frame_shape[1]

    def positions(self, frames):
        ny, nx = self.scan_shape
        row, col = np.divmod(np.asarray(frames) // self.fpp, nx + self.flyback)
        return np.where(col < nx, row * nx + col, -1)

    def dense_frames(self):
        """(n_frames, h*w) int64 electrons per pixel of every frame."""
        dense = np.zeros((self.n_frames, self.n_pixels), dtype=np.int64)
        frame_of_event = np.repeat(np.arange(self.n_frames), np.diff(self.offsets))
        np.add.at(dense, (frame_of_event, self.indices.astype(np.int64)), 1)
        return dense

    def dense_positions(self):
        """(n_positions, h*w) int64: frames of each position summed, flyback frames dropped."""
        dense = self.dense_frames()
        pos = self.positions(np.arange(self.n_frames))
        out = np.zeros((self.n_positions, self.n_pixels), dtype=np.int64)
        np.add.at(out, pos[pos >= 0], dense[pos >= 0])
        return out

    def parts(self, n_sources=1):
        """Split every frame into n_sources row sectors.

        Returns frames, sources, counts (per part, frame-major) and indices in part order.
        Every sector of every frame is a part, even when it has no event.
        """
        h, w = self.frame_shape
        bounds = np.linspace(0, h, n_sources + 1).round().astype(int)
        frame_of_event = np.repeat(np.arange(self.n_frames), np.diff(self.offsets))
        sector = np.searchsorted(bounds, self.indices // w, side="right") - 1
        key = frame_of_event * n_sources + sector
        order = np.argsort(key, kind="stable")
        counts = np.bincount(key, minlength=self.n_frames * n_sources)
        frames = np.repeat(np.arange(self.n_frames), n_sources)
        sources = np.tile(np.arange(n_sources), self.n_frames)
        return frames, sources, counts, self.indices[order]

    def chunks(self, rng, n_sources=1, max_parts=None, shuffle=True, repeat=None):
        """The scan as a list of Chunks of frame parts in random order and random sizes.

        repeat : optional (n_parts,) int, copies of each part to send (0 = lost, 2 = duplicated).
        """
        frames, sources, counts, indices = self.parts(n_sources)
        starts = np.concatenate([[0], np.cumsum(counts)])
        order = np.arange(len(frames))
        if repeat is not None:
            order = np.repeat(order, repeat)
        if shuffle:
            order = rng.permutation(order)
        max_parts = max_parts or max(1, len(order) // 5)
        out = []
        i = 0
        while i < len(order):
            n = int(rng.integers(1, max_parts + 1))
            sel = order[i:i + n]
            i += n
            ev = np.concatenate([indices[starts[s]:starts[s + 1]] for s in sel])
            out.append(Chunk.from_counts(frames[sel], sources[sel], self.positions(frames[sel]),
                                         counts[sel], ev))
        return out


def make_scan(seed=0, scan_shape=(7, 9), frame_shape=(32, 40), fpp=1, flyback=0,
              max_mean=25.0, empty_fraction=0.15, disk_fraction=0.6):
    """Poisson counts with uneven per-frame means and some empty frames; events concentrated
    around a position-dependent shifted disk plus a uniform background."""
    rng = np.random.default_rng(seed)
    ny, nx = scan_shape
    h, w = frame_shape
    n_frames = ny * (nx + flyback) * fpp
    counts = rng.poisson(rng.uniform(0, max_mean, n_frames))
    counts[rng.random(n_frames) < empty_fraction] = 0
    n_ev = int(counts.sum())
    frame_of_event = np.repeat(np.arange(n_frames), counts)
    shift = rng.normal(0, 2.0, (n_frames, 2))
    in_disk = rng.random(n_ev) < disk_fraction
    y = np.where(in_disk, (h - 1) / 2 + shift[frame_of_event, 0] + rng.normal(0, 3, n_ev),
                 rng.uniform(-0.5, h - 0.5, n_ev))
    x = np.where(in_disk, (w - 1) / 2 + shift[frame_of_event, 1] + rng.normal(0, 3, n_ev),
                 rng.uniform(-0.5, w - 0.5, n_ev))
    y = np.clip(np.rint(y), 0, h - 1).astype(np.int64)
    x = np.clip(np.rint(x), 0, w - 1).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return Scan(tuple(scan_shape), tuple(frame_shape), fpp, flyback, offsets,
                (y * w + x).astype(np.uint32))


def run(op, chunks, rng, n_states=1):
    """Process chunks into n_states states (chunk i to a random state), merge in random order."""
    states = [op.new_state() for _ in range(n_states)]
    for c in chunks:
        op.process(states[int(rng.integers(n_states))], c)
    order = rng.permutation(n_states)
    dest = states[order[0]]
    for j in order[1:]:
        op.merge(dest, states[j])
    return dest


def split_variants(scan, seed=1):
    """(label, chunks, n_states) of the same events: in order, shuffled, 4 sectors, 1-3 states."""
    rng = np.random.default_rng(seed)
    return [("ordered", scan.chunks(rng, shuffle=False, max_parts=1000000), 1),
            ("shuffled-2", scan.chunks(rng), 2),
            ("sectors4-3", scan.chunks(rng, n_sources=4, max_parts=7), 3),
            ("sectors3-1", scan.chunks(rng, n_sources=3, max_parts=50), 1),
            ("one-part-chunks-3", scan.chunks(rng, n_sources=2, max_parts=1), 3)]


GEOMETRIES = [dict(fpp=1, flyback=0), dict(fpp=2, flyback=0), dict(fpp=1, flyback=1),
              dict(fpp=2, flyback=1)]


@pytest.mark.parametrize("geo", GEOMETRIES)
def test_chunks_reassemble_to_the_dense_frames(geo):
    scan = make_scan(3, **geo)
    dense = scan.dense_frames()
    assert dense.sum() == len(scan.indices)
    assert (dense.sum(axis=1) == 0).any(), "the scan should contain empty frames"
    rng = np.random.default_rng(0)
    rebuilt = np.zeros_like(dense)
    for c in scan.chunks(rng, n_sources=4):
        f = np.repeat(c.frames, c.counts)
        np.add.at(rebuilt, (f, c.indices.astype(np.int64)), 1)
        assert np.array_equal(c.positions, scan.positions(c.frames))
    assert np.array_equal(rebuilt, dense)
