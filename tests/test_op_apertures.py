import numpy as np
import pytest

from operators.apertures import RealSpaceApertures, load_aperture_masks, rect_mask
from operators.chunk import Chunk

try:
    from test_op_common import GEOMETRIES, make_scan, run, split_variants
except ImportError:
    from tests.test_op_common import GEOMETRIES, make_scan, run, split_variants


def aperture_masks(scan_shape, seed=0):
    ny, nx = scan_shape
    rng = np.random.default_rng(seed)
    return np.stack([rect_mask(scan_shape, 0, 3, 0, 4),          # overlaps the next
                     rect_mask(scan_shape, 2, ny, 3, nx),
                     np.ones(scan_shape, bool),                   # whole scan
                     np.zeros(scan_shape, bool),                  # empty aperture
                     rng.random(scan_shape) < 0.4])


def test_rect_mask():
    m = rect_mask((7, 9), 2, 4, 3, 100)
    assert m.shape == (7, 9) and m.sum() == 2 * 6 and m[2, 3] and not m[4, 3] and m[3, 8]


@pytest.mark.parametrize("geo", GEOMETRIES)
def test_matches_dense_reference(geo):
    scan = make_scan(41, **geo)
    masks = aperture_masks(scan.scan_shape)
    names = ["a", "b", "all", "none", "random"]
    dense = scan.dense_positions()
    ref = masks.reshape(len(masks), -1).astype(np.int64) @ dense
    op = RealSpaceApertures(masks, names, scan.frame_shape)
    rng = np.random.default_rng(0)
    res = op.finalize(run(op, scan.chunks(rng, n_sources=2), rng, n_states=2))
    assert list(res) == [f"aperture_{n}" for n in names]
    for j, n in enumerate(names):
        r = res[f"aperture_{n}"]
        assert r.kind == "sig" and r.data.shape == scan.frame_shape and r.data.dtype == np.int64
        np.testing.assert_array_equal(r.data.ravel(), ref[j])
        assert r.attrs["n_positions"] == int(masks[j].sum())
    np.testing.assert_array_equal(res["aperture_all"].data.ravel(), dense.sum(axis=0))
    assert res["aperture_none"].data.sum() == 0


def test_identical_whatever_the_chunking():
    scan = make_scan(9, fpp=2, flyback=1)
    masks = aperture_masks(scan.scan_shape, seed=3)
    op = RealSpaceApertures(masks, list("abcde"), scan.frame_shape)
    results = [np.stack([r.data for r in op.finalize(run(op, c, np.random.default_rng(n),
                                                          n)).values()])
               for _, c, n in split_variants(scan)]
    for other in results[1:]:
        np.testing.assert_array_equal(other, results[0])


def test_single_2d_mask_and_bad_input():
    op = RealSpaceApertures(rect_mask((2, 2), 0, 1, 0, 1), "corner", (4, 4))
    state = op.new_state()
    op.process(state, Chunk.from_counts([0, 1], [0, 0], [0, 1], [1, 1],
                                        np.array([3, 4], np.uint32)))
    assert op.finalize(state)["aperture_corner"].data.ravel().tolist() == [0, 0, 0, 1] + [0] * 12
    with pytest.raises(ValueError, match="pixel index >= 16"):
        op.process(state, Chunk.from_counts([0], [0], [0], [1], np.array([16], np.uint32)))
    with pytest.raises(ValueError, match="position >= 4"):
        op.process(state, Chunk.from_counts([0], [0], [4], [1], np.array([1], np.uint32)))
    with pytest.raises(ValueError, match="2 masks but 1 names"):
        RealSpaceApertures(np.ones((2, 3, 3), bool), ["a"], (4, 4))


def test_load_aperture_masks_errors_name_the_path(tmp_path):
    p = tmp_path / "grains.npy"
    np.save(p, np.stack([rect_mask((7, 9), 0, 2, 0, 2)] * 3))
    assert load_aperture_masks(p, (7, 9)).shape == (3, 7, 9)
    p01 = tmp_path / "zeros_ones.npy"
    np.save(p01, rect_mask((7, 9), 0, 2, 0, 2).astype(np.uint8))
    assert load_aperture_masks(p01, (7, 9)).dtype == bool
    with pytest.raises(ValueError, match=r"grains\.npy.*7x9 positions but the scan is 8x9"):
        load_aperture_masks(p, (8, 9))
    bad = tmp_path / "values.npy"
    np.save(bad, np.full((7, 9), 0.5))
    with pytest.raises(ValueError, match=r"values\.npy.*only 0 and 1"):
        load_aperture_masks(bad, (7, 9))
    nd = tmp_path / "ndim.npy"
    np.save(nd, np.ones(9, bool))
    with pytest.raises(ValueError, match=r"ndim\.npy.*shape"):
        load_aperture_masks(nd, (7, 9))
    with pytest.raises(ValueError, match=r"nope\.npy.*no such file"):
        load_aperture_masks(tmp_path / "nope.npy", (7, 9))
