import numpy as np
import pytest

from operators.chunk import Chunk
from operators.completeness import Completeness, repeat_mask

try:
    from test_op_common import make_scan, run
except ImportError:
    from tests.test_op_common import make_scan, run


def lossy_repeat(n_parts, seed):
    """Copies of each part: mostly 1, some 0 (lost), some 2 or 3 (duplicated)."""
    rng = np.random.default_rng(seed)
    rep = np.ones(n_parts, dtype=np.int64)
    rep[rng.random(n_parts) < 0.05] = 0
    rep[rng.random(n_parts) < 0.05] = 2
    rep[rng.choice(n_parts, 2, replace=False)] = 3
    return rep


@pytest.mark.parametrize("fpp,flyback,n_sources", [(1, 0, 1), (2, 1, 4), (1, 1, 3), (2, 0, 2)])
def test_counts_missing_and_duplicated_parts(fpp, flyback, n_sources):
    scan = make_scan(51, fpp=fpp, flyback=flyback)
    n_frames = scan.n_frames
    rep = lossy_repeat(n_frames * n_sources, seed=fpp * 10 + flyback)
    expected = rep.reshape(n_frames, n_sources).T        # parts are frame-major
    rng = np.random.default_rng(1)
    op = Completeness(n_sources, scan.scan_shape, frames_per_position=fpp, flyback=flyback)
    assert op.n_frames == n_frames
    state = run(op, scan.chunks(rng, n_sources=n_sources, repeat=rep), rng, n_states=3)
    np.testing.assert_array_equal(state["received"], expected)

    s = op.summary(state)
    missing = [f for f in range(n_frames) if (expected[:, f] == 0).any()]
    dup = [f for f in range(n_frames) if (expected[:, f] > 1).any()]
    assert s["n_frames"] == n_frames and s["n_sources"] == n_sources
    assert s["missing_frames"] == missing and s["n_missing"] == len(missing)
    assert s["duplicated_frames"] == dup and s["n_duplicated"] == len(dup)
    assert s["complete"] is (not missing)  # duplicates count once: they leave a scan complete
    assert s["n_frames_received"] == int((expected > 0).all(axis=0).sum())
    assert sum(b - a for a, b in s["missing_ranges"]) == len(missing)
    for src in range(n_sources):
        ps = s["per_source"][src]
        assert ps["received"] == int((expected[src] > 0).sum())
        assert ps["missing"] == int((expected[src] == 0).sum())
        assert ps["duplicated"] == int((expected[src] > 1).sum())
        assert ps["extra_copies"] == int(np.maximum(expected[src] - 1, 0).sum())

    # Per position: distinct parts of its fpp frames, flyback frames belong to no position.
    ny, nx = scan.scan_shape
    ref = np.zeros(scan.scan_shape, dtype=np.int64)
    for f in range(n_frames):
        p = scan.positions(f)
        if p >= 0:
            ref[p // nx, p % nx] += int((expected[:, f] > 0).sum())
    res = op.finalize(state)
    np.testing.assert_array_equal(res["position_frames"].data, ref)
    assert res["position_frames"].kind == "nav" and res["received"].kind == "table"
    assert res["received"].attrs["n_missing"] == len(missing)
    assert s["incomplete_positions"] == int((ref < fpp * n_sources).sum())
    assert res["received"].data.dtype == np.uint16
    assert res["missing_frames"].data.tolist() == missing
    assert res["duplicated_frames"].data.tolist() == dup


def test_complete_scan_and_add_range_equals_process():
    scan = make_scan(5, fpp=2, flyback=1)
    op = Completeness(2, scan.scan_shape, frames_per_position=2, flyback=1)
    rng = np.random.default_rng(0)
    a = run(op, scan.chunks(rng, n_sources=2), rng)
    b = op.new_state()
    op.add_range(b, 0, 0, 50)
    op.add_range(b, 0, 50, scan.n_frames - 50)
    op.add_range(b, 1, 0, scan.n_frames)
    np.testing.assert_array_equal(a["received"], b["received"])
    s = op.summary(a)
    assert s["complete"] and s["missing_frames"] == [] and s["duplicated_ranges"] == []
    assert s["n_frames_received"] == scan.n_frames and s["incomplete_positions"] == 0
    assert (op.finalize(a)["position_frames"].data == 4).all()


def test_ranges_when_the_list_is_long():
    op = Completeness(1, (10, 10), max_listed=5)
    state = op.new_state()
    op.add_range(state, 0, 0, 40)
    op.add_range(state, 0, 50, 45)
    op.add_range(state, 0, 10, 3)
    s = op.summary(state)
    assert s["missing_frames"] == [40, 41, 42, 43, 44] and s["missing_truncated"]
    assert s["n_missing"] == 15 and not s["duplicated_truncated"]
    assert s["missing_ranges"] == [[40, 50], [95, 100]]
    assert s["duplicated_frames"] == [10, 11, 12] and s["duplicated_ranges"] == [[10, 13]]


def test_saturates_instead_of_wrapping():
    op = Completeness(1, (1, 2))
    a, b = op.new_state(), op.new_state()
    a["received"][0] = [65000, 3]
    b["received"][0] = [1000, 4]
    op.merge(a, b)
    assert a["received"].tolist() == [[65535, 7]]
    op.add_range(a, 0, 0, 2)
    op.process(a, Chunk.from_counts([0, 0], [0, 0], [0, 0], [0, 0], np.zeros(0, np.uint32)))
    assert a["received"].tolist() == [[65535, 8]]


def test_errors():
    op = Completeness(2, (2, 2), flyback=1)
    state = op.new_state()
    with pytest.raises(ValueError, match=r"frame numbers 6\.\.6 outside the scan's 0\.\.5"):
        op.process(state, Chunk.from_counts([6], [0], [-1], [0], np.zeros(0, np.uint32)))
    with pytest.raises(ValueError, match="sources"):
        op.process(state, Chunk.from_counts([1], [2], [1], [0], np.zeros(0, np.uint32)))
    with pytest.raises(ValueError, match="outside"):
        op.add_range(state, 0, 4, 3)
    assert state["received"].sum() == 0


def test_repeat_mask_keeps_exactly_one_copy():
    seen = np.zeros((2, 6), dtype=bool)
    frames = np.array([0, 1, 0, 1, 5, 1])
    sources = np.array([0, 0, 1, 0, 1, 0])
    assert repeat_mask(frames, sources, seen).tolist() == [False, False, False, True, False, True]
    assert repeat_mask([5, 2], [1, 1], seen).tolist() == [True, False]
    assert seen.sum() == 5
    with pytest.raises(ValueError, match="outside"):
        repeat_mask([6], [0], seen)
