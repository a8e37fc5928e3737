import numpy as np
import pytest

from operators.chunk import Chunk
from operators.diffraction import DiffractionSum

try:
    from test_op_common import GEOMETRIES, make_scan, run, split_variants
except ImportError:
    from tests.test_op_common import GEOMETRIES, make_scan, run, split_variants


@pytest.mark.parametrize("geo", GEOMETRIES)
def test_matches_dense_reference(geo):
    scan = make_scan(31, **geo)
    ref = scan.dense_positions().sum(axis=0).reshape(scan.frame_shape)
    op = DiffractionSum(scan.frame_shape)
    rng = np.random.default_rng(0)
    res = op.finalize(run(op, scan.chunks(rng, n_sources=4), rng, n_states=3))
    r = res["diffraction_sum"]
    assert r.kind == "sig" and r.unit == "counts" and r.data.dtype == np.int64
    np.testing.assert_array_equal(r.data, ref)
    assert r.attrs["total_counts"] == int(ref.sum())
    if geo["flyback"]:  # flyback frames carry events that must not be summed
        assert ref.sum() < len(scan.indices)


def test_identical_whatever_the_chunking():
    scan = make_scan(8, fpp=2, flyback=1)
    op = DiffractionSum(scan.frame_shape)
    results = [op.finalize(run(op, chunks, np.random.default_rng(n), n))["diffraction_sum"].data
               for _, chunks, n in split_variants(scan)]
    for other in results[1:]:
        np.testing.assert_array_equal(other, results[0])


def test_name_and_bad_events():
    op = DiffractionSum((4, 4), name="early")
    state = op.new_state()
    op.process(state, Chunk.from_counts([0, 1], [0, 0], [0, -1], [2, 1],
                                        np.array([5, 5, 6], np.uint32)))
    res = op.finalize(state)
    assert list(res) == ["diffraction_early"]
    assert res["diffraction_early"].data.ravel().tolist() == [0] * 5 + [2] + [0] * 10
    with pytest.raises(ValueError, match="pixel index >= 16"):
        op.process(state, Chunk.from_counts([0], [0], [0], [1], np.array([16], np.uint32)))
    op = DiffractionSum((4, 4), n_positions=2)
    with pytest.raises(ValueError, match="position >= 2"):
        op.process(op.new_state(), Chunk.from_counts([0], [0], [2], [1], np.array([1], np.uint32)))
