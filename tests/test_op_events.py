import numpy as np
import pytest

from operators.chunk import Chunk
from operators.completeness import repeat_mask
from operators.diffraction import DiffractionSum
from operators.events import EventStore
from operators.virtual import VirtualDetectors, disk_mask

try:
    from test_op_common import GEOMETRIES, make_scan, run, split_variants
except ImportError:
    from tests.test_op_common import GEOMETRIES, make_scan, run, split_variants


def reference_csr(scan, lost_frames=()):
    """Stored-frame CSR from the scan's own frames: position*fpp + k, flyback dropped, each
    frame's events sorted (a plain Python loop: the reference, not the code under test)."""
    rows = [[] for _ in range(scan.n_positions * scan.fpp)]
    for f in range(scan.n_frames):
        p = int(scan.positions(f))
        if p >= 0 and f not in lost_frames:
            rows[p * scan.fpp + f % scan.fpp] = sorted(
                scan.indices[scan.offsets[f]:scan.offsets[f + 1]].tolist())
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
    return offsets, np.array([i for r in rows for i in r], dtype=np.uint32)


def csr_to_dense(offsets, indices, n_pixels):
    dense = np.zeros((len(offsets) - 1, n_pixels), dtype=np.int64)
    np.add.at(dense, (np.repeat(np.arange(len(offsets) - 1), np.diff(offsets)),
                      indices.astype(np.int64)), 1)
    return dense


@pytest.mark.parametrize("geo", GEOMETRIES)
def test_round_trip_gives_back_the_dense_frames(geo):
    scan = make_scan(61, **geo)
    op = EventStore(scan.scan_shape, scan.frame_shape, scan.fpp, scan.flyback)
    rng = np.random.default_rng(0)
    offsets, indices = op.finalize(run(op, scan.chunks(rng, n_sources=4), rng, n_states=3))
    assert offsets.dtype == np.int64 and indices.dtype == np.uint32
    assert offsets.shape == (scan.n_positions * scan.fpp + 1,)
    # Dense frames in stored order from the independent dense builder.
    dense = scan.dense_frames()
    pos = scan.positions(np.arange(scan.n_frames))
    keep = pos >= 0
    stored = pos[keep] * scan.fpp + np.arange(scan.n_frames)[keep] % scan.fpp
    ref = np.zeros((scan.n_positions * scan.fpp, scan.n_pixels), dtype=np.int64)
    ref[stored] = dense[keep]
    np.testing.assert_array_equal(csr_to_dense(offsets, indices, scan.n_pixels), ref)
    ref_off, ref_idx = reference_csr(scan)
    np.testing.assert_array_equal(offsets, ref_off)
    np.testing.assert_array_equal(indices, ref_idx)


def test_canonical_whatever_the_chunking():
    scan = make_scan(7, fpp=2, flyback=1)
    op = EventStore(scan.scan_shape, scan.frame_shape, 2, 1)
    outs = [op.finalize(run(op, c, np.random.default_rng(n), n))
            for _, c, n in split_variants(scan)]
    for off, idx in outs[1:]:
        np.testing.assert_array_equal(off, outs[0][0])
        np.testing.assert_array_equal(idx, outs[0][1])


def test_stored_chunks_are_sorted_copies():
    op = EventStore((1, 2), (4, 4))
    idx = np.array([9, 3, 3, 1, 15, 2], np.uint32)
    chunk = Chunk.from_counts([0, 1], [0, 0], [0, 1], [4, 2], idx)
    state = op.new_state()
    op.process(state, chunk)
    assert chunk.indices.tolist() == [9, 3, 3, 1, 15, 2]   # the caller's buffer is untouched
    (stored,) = op.iter_chunks(state)
    assert stored.indices.tolist() == [1, 3, 3, 9, 2, 15]
    offsets, indices = op.finalize(state)
    assert offsets.tolist() == [0, 4, 6] and indices.tolist() == [1, 3, 3, 9, 2, 15]


def test_duplicates_and_missing_frames():
    scan = make_scan(13, fpp=2, flyback=1)
    n_sources = 2
    n_parts = scan.n_frames * n_sources
    rng = np.random.default_rng(4)
    rep = np.ones(n_parts, dtype=np.int64)
    dup = rng.choice(n_parts, 15, replace=False)
    rep[dup] = 2
    lost = [f for f in range(scan.n_frames) if f % 17 == 3 and scan.positions(f) >= 0]
    rep.reshape(scan.n_frames, n_sources)[lost] = 0     # both sectors of these frames lost
    op = EventStore(scan.scan_shape, scan.frame_shape, 2, 1)
    chunks = scan.chunks(rng, n_sources=n_sources, repeat=rep)

    ref_off, ref_idx = reference_csr(scan, lost_frames=set(lost))
    state = run(op, chunks, rng, n_states=2)
    frames, _, counts, _ = scan.parts(n_sources)
    twice = (rep == 2) & (scan.positions(frames) >= 0)
    assert counts[twice].sum() > 0
    kept_all = op.finalize(state)[1]                     # every stored copy is kept
    assert len(kept_all) == len(ref_idx) + counts[twice].sum()

    # Drop the repeated copies as the pipeline does, then finalize and re-run another
    # operator over the stored events: both agree with the dense reference.
    seen = np.zeros((n_sources, scan.n_frames), dtype=bool)
    state["chunks"] = [c.select(~repeat_mask(c.frames, c.sources, seen)) for c in op.iter_chunks(state)]
    offsets, indices = op.finalize(state)
    np.testing.assert_array_equal(offsets, ref_off)
    np.testing.assert_array_equal(indices, ref_idx)
    for f in lost:
        s = int(scan.positions(f)) * 2 + f % 2
        assert offsets[s] == offsets[s + 1]              # never-received frames are empty
    ds = DiffractionSum(scan.frame_shape)
    ds_state = ds.new_state()
    for c in op.iter_chunks(state):
        ds.process(ds_state, c)
    dense = scan.dense_frames()
    pos = scan.positions(np.arange(scan.n_frames))
    good = (pos >= 0) & ~np.isin(np.arange(scan.n_frames), lost)
    np.testing.assert_array_equal(ds.finalize(ds_state)["diffraction_sum"].data.ravel(),
                                  dense[good].sum(axis=0))


def test_repeat_mask_removes_duplicates_before_other_operators():
    scan = make_scan(17)
    n_parts = scan.n_frames * 3
    rep = np.where(np.arange(n_parts) % 5 == 0, 2, 1)
    rng = np.random.default_rng(0)
    chunks = scan.chunks(rng, n_sources=3, repeat=rep)
    masks = disk_mask(scan.frame_shape, radius=8)[None]
    op = VirtualDetectors(masks, ["bf"], scan.scan_shape)
    seen = np.zeros((3, scan.n_frames), dtype=bool)
    state = op.new_state()
    for c in chunks:
        op.process(state, c.select(~repeat_mask(c.frames, c.sources, seen)))
    ref = scan.dense_positions() @ masks.reshape(-1).astype(np.int64)
    np.testing.assert_array_equal(op.finalize(state)["bf"].data.ravel(), ref)


@pytest.mark.parametrize("fpp,flyback", [(1, 0), (1, 3), (2, 0), (3, 2)])
def test_stored_frames_follow_the_raster_with_flyback_and_frames_per_position(fpp, flyback):
    """The CSR row of every frame number, against the raster walked in Python: rows of
    ``nx + flyback`` positions, ``fpp`` frames at each; flyback frames get -1. A chunk whose
    positions agree is stored; one wrong position among them is refused."""
    ny, nx = 3, 5
    op = EventStore((ny, nx), (4, 4), frames_per_position=fpp, flyback=flyback)
    expect, positions, f = [], [], 0
    for row in range(ny):
        for col in range(nx + flyback):
            for k in range(fpp):
                expect.append((row * nx + col) * fpp + k if col < nx else -1)
                positions.append(row * nx + col if col < nx else -1)
                f += 1
    frames = np.arange(f)
    np.testing.assert_array_equal(op.stored_frames(frames), expect)
    np.testing.assert_array_equal(op.stored_frames(frames[::-1]), expect[::-1])
    state = op.new_state()
    op.process(state, Chunk.from_counts(frames, np.zeros(f), positions, np.ones(f, int), np.arange(f) % 16))
    wrong = list(positions)
    wrong[f - 2] += 1
    with pytest.raises(ValueError, match="positions disagree"):
        op.process(state, Chunk.from_counts(frames, np.zeros(f), wrong, np.ones(f, int), np.arange(f) % 16))
    assert len(state["chunks"]) == 1


def test_bad_chunks_are_not_stored():
    op = EventStore((2, 2), (4, 4), flyback=1)
    state = op.new_state()
    with pytest.raises(ValueError, match="pixel index >= 16"):
        op.process(state, Chunk.from_counts([0], [0], [0], [2], np.array([1, 16], np.uint32)))
    with pytest.raises(ValueError, match="positions disagree"):
        op.process(state, Chunk.from_counts([2], [0], [2], [0], np.zeros(0, np.uint32)))
    with pytest.raises(ValueError, match="outside the scan"):
        op.process(state, Chunk.from_counts([6], [0], [-1], [0], np.zeros(0, np.uint32)))
    with pytest.raises(ValueError, match="negative source"):
        op.process(state, Chunk.from_counts([0], [-1], [0], [0], np.zeros(0, np.uint32)))
    assert state["chunks"] == []
    offsets, indices = op.finalize(state)
    assert offsets.tolist() == [0, 0, 0, 0, 0] and len(indices) == 0


@pytest.mark.parametrize("dtype", [np.uint32, np.int64, np.int32, np.uint16])
def test_sort_segments_equals_numpy_sort_for_every_length(dtype):
    """Every segment length from 0 to 300 (the vector sorting networks of 8..128 lanes and
    numpy's sort beyond), random, with repeated values, already sorted and reversed, with the
    dtype's extremes (its largest value is what pads a network's unused lanes): each segment
    equal to np.sort of it, and nothing outside the segments moves, the last segment ending
    at the end of the array."""
    from operators.kernels import sort_segments
    rng = np.random.default_rng(3)
    info = np.iinfo(dtype)
    segments = []
    for n in list(range(301)) * 2:
        kind = rng.integers(5)
        v = rng.integers(0, min(2**31 - 1, info.max) if kind else 5, n).astype(dtype)  # kind 0: repeats
        if kind == 4 and n:  # the extremes
            v[rng.integers(n, size=max(1, n // 4))] = info.max
            v[rng.integers(n, size=max(1, n // 4))] = info.min
        segments.append(np.sort(v) if kind == 2 else np.sort(v)[::-1].copy() if kind == 3 else v)
    offsets = np.r_[0, np.cumsum([len(v) for v in segments])].astype(np.int64)
    indices = np.concatenate(segments)
    sort_segments(offsets, indices)
    np.testing.assert_array_equal(indices, np.concatenate([np.sort(v) for v in segments]))
    # sorting a part of an array (offsets not starting at 0) leaves the rest alone
    part = np.array([9, 8, 7, 3, 1, 2, 0], dtype)
    sort_segments(np.array([3, 6]), part)
    np.testing.assert_array_equal(part, np.array([9, 8, 7, 1, 2, 3, 0], dtype))


def test_sort_segments_finds_the_one_unsorted_segment_among_sorted_ones():
    """The shortcut for spans whose segments are all in order already (one vectorised pass
    over the span, its descents at segment boundaries not counted) must still sort a single
    unsorted segment among many sorted ones: past the first segments it looks at one by
    one, between empty segments (a boundary that repeats), with a descent at every boundary
    (each segment starts below where the last ended), in an array whose ends lie outside the
    segments. Reference: np.sort of each segment."""
    from operators.kernels import sort_segments
    rng = np.random.default_rng(11)
    for trial in range(200):
        lengths = rng.choice([0, 0, 1, 2, 25, 100, 130], size=40)
        k = int(rng.integers(5, 39))
        lengths[k - 1] = lengths[k + 1] = 0  # empty neighbours: the boundary repeats
        lengths[k] = max(2, lengths[k])
        top = 10 ** 6 - trial  # every segment sorted, below the last: a descent at each boundary
        segments = []
        for n in lengths:
            v = np.sort(rng.integers(top - 1000, top, n)).astype(np.uint32)
            segments.append(v)
            top -= 1000
        seg = segments[k]
        i = int(rng.integers(1, len(seg)))
        seg[i - 1], seg[i] = seg[i], seg[i - 1]  # one swap: one descent inside one segment
        if seg[i - 1] == seg[i]:
            seg[0] = seg[-1] + 1
        offsets = np.r_[7, 7 + np.cumsum(lengths)].astype(np.int64)
        indices = np.concatenate([np.array([9, 3, 5, 1, 0, 8, 2], np.uint32), *segments,
                                  np.array([4, 2], np.uint32)])
        expect = np.concatenate([indices[:7], *[np.sort(v) for v in segments], indices[-2:]])
        sort_segments(offsets, indices)
        np.testing.assert_array_equal(indices, expect, err_msg=f"trial {trial}, segment {k}")


def test_plan_blocks_cover_every_frame_within_the_limit():
    rng = np.random.default_rng(5)
    counts = rng.integers(0, 30, 500)
    counts[[10, 11, 300]] = 200  # frames larger than a block get a block of their own
    from operators.events import plan_blocks
    blocks = plan_blocks(counts, 100)
    assert blocks[0][0] == 0 and blocks[-1][1] == 500
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    for lo, hi in blocks:
        assert counts[lo:hi].sum() <= 100 or hi - lo == 1
        # maximal: one more frame would exceed the limit
        assert hi == 500 or counts[lo:hi + 1].sum() > 100
    assert plan_blocks(np.zeros(0, np.int64), 10) == []


def test_blocks_of_frames_from_several_states_make_the_whole_csr():
    """events_in on each state, then csr per range of stored frames, concatenated: equal to
    the reference CSR of the scan, whatever the ranges."""
    scan = make_scan(23, fpp=2, flyback=1)
    op = EventStore(scan.scan_shape, scan.frame_shape, 2, 1)
    rng = np.random.default_rng(6)
    chunks = scan.chunks(rng, n_sources=3)
    states = [op.new_state() for _ in range(3)]
    for c in chunks:
        op.process(states[rng.integers(3)], c)
    ref_off, ref_idx = reference_csr(scan)
    np.testing.assert_array_equal(sum(s["counts"] for s in states), np.diff(ref_off))
    edges = np.unique(np.r_[0, rng.integers(0, op.n_stored, 6), op.n_stored])
    pieces = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        off, idx = op.csr([c for s in states for c in op.events_in(s, lo, hi)], lo, hi)
        np.testing.assert_array_equal(off, ref_off[lo:hi + 1] - ref_off[lo])
        pieces.append(idx)
    np.testing.assert_array_equal(np.concatenate(pieces), ref_idx)
