import numpy as np
import pytest

from operators.chunk import Chunk
from operators.virtual import (VirtualDetectors, annulus_mask, check_masks, disk_mask,
                               load_masks)

try:
    from test_op_common import GEOMETRIES, make_scan, run, split_variants
except ImportError:  # tests collected as a package
    from tests.test_op_common import GEOMETRIES, make_scan, run, split_variants


def dense_images(scan, masks):
    """(k, ny, nx) reference: dense position sums contracted with the masks."""
    ref = np.tensordot(masks.reshape(len(masks), -1).astype(np.float64 if masks.dtype != bool
                                                             else np.int64),
                       scan.dense_positions(), axes=([1], [1]))
    return ref.reshape(len(masks), *scan.scan_shape)


def standard_masks(frame_shape):
    return np.stack([disk_mask(frame_shape, radius=6), annulus_mask(frame_shape, inner=6, outer=12),
                     annulus_mask(frame_shape, inner=10, outer=30)])


def make_masks(kind, frame_shape, seed=5):
    """Masks that exercise each kernel: kind -> (masks, expected kernel)."""
    rng = np.random.default_rng(seed)
    if kind == "standard":      # disk and overlapping annuli: few membership combinations
        return standard_masks(frame_shape), "combos"
    if kind == "many":          # random bool masks: too many combinations
        return rng.random((9, *frame_shape)) < 0.3, "bits"
    if kind == "huge":          # more than 64 bool masks
        return rng.random((70, *frame_shape)) < 0.05, "lists"
    if kind == "weights":       # dense float weights
        return rng.normal(size=(4, *frame_shape)), "table"
    if kind == "piecewise":     # float weights constant on rings
        m = standard_masks(frame_shape).astype(float)
        return np.stack([0.5 * m[0] - 2.25 * m[1], 1e-3 * m[2], m[1] + 7 * m[2]]), "combos"
    if kind == "sparse-weights":
        w = rng.random((12, *frame_shape)) * (rng.random((12, *frame_shape)) < 0.05)
        return w, "lists"
    raise ValueError(kind)


KINDS = ["standard", "many", "huge", "weights", "piecewise", "sparse-weights"]


def test_disk_and_annulus_known_pixels():
    # 5x5 detector, centre (2, 2): distances 0, 1, sqrt2, 2, sqrt5, sqrt8.
    assert disk_mask((5, 5), radius=0).sum() == 1
    assert disk_mask((5, 5), radius=1).sum() == 5          # closed disk includes r == 1
    assert disk_mask((5, 5), radius=np.sqrt(2)).sum() == 9
    ring = annulus_mask((5, 5), inner=1, outer=2)          # 1 <= r < 2: r = 1, sqrt2
    assert ring.sum() == 8 and not ring[2, 2] and not ring[0, 2]
    assert annulus_mask((5, 5), inner=0, outer=1).sum() == 1   # half-open: r == 1 excluded
    # Rings sharing a boundary tile the plane without overlap.
    a, b = annulus_mask((9, 9), inner=0, outer=2), annulus_mask((9, 9), inner=2, outer=99)
    assert not (a & b).any() and (a | b).all()
    # Explicit centre, even detector: default centre is at (h-1)/2, (w-1)/2 between pixels.
    assert disk_mask((4, 4), radius=0.75).sum() == 4
    m = disk_mask((6, 8), center=(0, 7), radius=1)
    assert m.sum() == 3 and m[0, 7] and m[1, 7] and m[0, 6]
    with pytest.raises(ValueError, match="radius"):
        disk_mask((5, 5))
    with pytest.raises(ValueError, match="inner"):
        annulus_mask((5, 5), inner=3, outer=2)


@pytest.mark.parametrize("geo", GEOMETRIES)
@pytest.mark.parametrize("kind", KINDS)
def test_matches_dense_reference(geo, kind):
    scan = make_scan(11, **geo)
    masks, kernel = make_masks(kind, scan.frame_shape)
    names = [f"m{j}" for j in range(len(masks))]
    op = VirtualDetectors(masks, names, scan.scan_shape)
    assert op.kernel == kernel
    ref = dense_images(scan, masks)
    rng = np.random.default_rng(0)
    res = op.finalize(run(op, scan.chunks(rng, n_sources=2), rng, n_states=2))
    assert list(res) == names
    for j, n in enumerate(names):
        r = res[n]
        assert r.kind == "nav" and r.data.shape == scan.scan_shape
        if masks.dtype != bool:
            assert r.data.dtype == np.float64 and r.unit == "weighted counts"
            np.testing.assert_allclose(r.data, ref[j], rtol=1e-6, atol=1e-9)
        else:
            assert r.data.dtype == np.int64 and r.unit == "counts"
            np.testing.assert_array_equal(r.data, ref[j])
            assert r.attrs["mask_pixels"] == int(masks[j].sum())


@pytest.mark.parametrize("kind", KINDS)
def test_identical_whatever_the_chunking(kind):
    scan = make_scan(4, fpp=2, flyback=1)
    masks, _ = make_masks(kind, scan.frame_shape, seed=3)
    op = VirtualDetectors(masks, [f"v{j}" for j in range(len(masks))], scan.scan_shape)
    results = []
    for label, chunks, n_states in split_variants(scan):
        res = op.finalize(run(op, chunks, np.random.default_rng(len(label)), n_states))
        results.append(np.stack([r.data for r in res.values()]))
    for other in results[1:]:
        # Float weights too: fixed-point accumulation makes them bit-identical.
        np.testing.assert_array_equal(other, results[0])


def test_single_2d_mask_and_empty_positions_are_zero_counts():
    scan = make_scan(2, empty_fraction=0.5)
    mask = disk_mask(scan.frame_shape, radius=100)
    op = VirtualDetectors(mask, "all", scan.scan_shape)
    res = op.finalize(run(op, scan.chunks(np.random.default_rng(1)), np.random.default_rng(2)))
    expected = scan.dense_positions().sum(axis=1).reshape(scan.scan_shape)
    np.testing.assert_array_equal(res["all"].data, expected)
    assert (expected == 0).any()


def test_weight_quantisation_is_tiny_for_a_wide_dynamic_range():
    frame_shape = (8, 8)
    weights = np.geomspace(1e-6, 3.0, 64).reshape(1, *frame_shape)
    op = VirtualDetectors(weights, ["w"], (1, 64))
    idx = np.arange(64, dtype=np.uint32)
    chunk = Chunk.from_counts(np.arange(64), np.zeros(64), np.arange(64), np.ones(64, int), idx)
    state = op.new_state()
    op.process(state, chunk)
    np.testing.assert_allclose(op.finalize(state)["w"].data.ravel(), weights.ravel(), rtol=1e-5,
                               atol=3.0 * 2.0 ** -34)


def test_bad_masks_and_names():
    with pytest.raises(ValueError, match="dtype int"):
        VirtualDetectors(np.ones((1, 4, 4), dtype=np.int32), ["a"], (2, 2))
    w = np.ones((1, 4, 4))
    w[0, 1, 2] = np.nan
    with pytest.raises(ValueError, match=r"NaN.*mask 0, pixel \(y=1, x=2\)"):
        VirtualDetectors(w, ["a"], (2, 2))
    with pytest.raises(ValueError, match="2 masks but 1 names"):
        VirtualDetectors(np.ones((2, 4, 4), bool), ["a"], (2, 2))
    with pytest.raises(ValueError, match="distinct"):
        VirtualDetectors(np.ones((2, 4, 4), bool), ["a", "a"], (2, 2))


@pytest.mark.parametrize("kind", KINDS)
def test_out_of_range_events_raise(kind):
    masks, kernel = make_masks(kind, (16, 16))
    op = VirtualDetectors(masks, [f"m{j}" for j in range(len(masks))], (2, 2))
    assert op.kernel == kernel
    chunk = Chunk.from_counts([0, 1], [0, 0], [0, 1], [2, 1], np.array([3, 256, 5], np.uint32))
    state = op.new_state()
    with pytest.raises(ValueError, match=r"VirtualDetectors 'virtual'.*1 event\(s\) with a pixel index >= 256"):
        op.process(state, chunk)
    chunk = Chunk.from_counts([0], [0], [4], [1], np.array([3], np.uint32))
    with pytest.raises(ValueError, match=r"1 frame\(s\) with a position >= 4"):
        op.process(state, chunk)


def test_load_masks_errors_name_the_path(tmp_path):
    good = tmp_path / "good.npy"
    np.save(good, np.stack([disk_mask((32, 40), radius=5)] * 2))
    masks = load_masks(good)
    assert masks.shape == (2, 32, 40) and masks.dtype == bool
    assert check_masks(masks, (32, 40), good).shape == (2, 32, 40)
    with pytest.raises(ValueError, match=r"good\.npy.*32x40.*detector is 64x64"):
        check_masks(masks, (64, 64), good)
    f2 = tmp_path / "float2d.npy"
    np.save(f2, np.ones((32, 40), np.float32))
    assert load_masks(f2).shape == (1, 32, 40) and load_masks(f2).dtype == np.float64
    cases = {"ndim.npy": (np.ones((2, 2, 32, 40), bool), "4 dimensions"),
             "nan.npy": (np.full((32, 40), np.nan), "NaN"),
             "int.npy": (np.ones((32, 40), np.uint8), "dtype uint8"),
             "obj.npy": (None, "not a readable")}
    for fname, (arr, msg) in cases.items():
        p = tmp_path / fname
        if arr is None:
            p.write_bytes(b"this is not numpy")
        else:
            np.save(p, arr)
        with pytest.raises(ValueError, match=msg) as err:
            load_masks(p)
        assert fname in str(err.value)
    with pytest.raises(ValueError, match=r"missing\.npy.*no such file"):
        load_masks(tmp_path / "missing.npy")
