import numpy as np
import pytest

from operators.chunk import Chunk
from operators.com import CenterOfMass, com_from_sums

try:
    from test_op_common import GEOMETRIES, make_scan, run, split_variants
except ImportError:
    from tests.test_op_common import GEOMETRIES, make_scan, run, split_variants


def dense_com(scan, center, radius):
    """Reference sums and centroid (no rotation) from dense frames."""
    h, w = scan.frame_shape
    yy, xx = np.mgrid[0:h, 0:w]
    inside = np.ones((h, w), bool) if radius is None else \
        (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius ** 2
    d = scan.dense_positions().reshape(-1, h, w) * inside
    n = d.sum(axis=(1, 2))
    sy = (d * yy).sum(axis=(1, 2))
    sx = (d * xx).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        cy = sy / n - center[0]
        cx = sx / n - center[1]
    return [a.reshape(scan.scan_shape) for a in (n, sy, sx, cy, cx)]


@pytest.mark.parametrize("geo", GEOMETRIES)
@pytest.mark.parametrize("center,radius", [(None, None), ((14.0, 21.5), 9.0), ((3, 4), 0.0)])
def test_matches_dense_reference(geo, center, radius):
    scan = make_scan(21, **geo)
    h, w = scan.frame_shape
    c = ((h - 1) / 2, (w - 1) / 2) if center is None else center
    n, sy, sx, cy, cx = dense_com(scan, c, radius)
    op = CenterOfMass(scan.scan_shape, scan.frame_shape, center=center, radius=radius,
                      mrad_per_px=0.25)
    rng = np.random.default_rng(0)
    res = op.finalize(run(op, scan.chunks(rng, n_sources=3), rng, n_states=2))
    np.testing.assert_array_equal(res["com_n"].data, n)
    np.testing.assert_array_equal(res["com_sum_y"].data, sy)
    np.testing.assert_array_equal(res["com_sum_x"].data, sx)
    assert (n == 0).any(), "test should cover positions without electrons"
    np.testing.assert_allclose(res["com_y"].data, cy, rtol=1e-6, atol=1e-12)  # NaNs compare equal
    np.testing.assert_allclose(res["com_x"].data, cx, rtol=1e-6, atol=1e-12)
    assert np.isnan(res["com_y"].data[n == 0]).all() and np.isnan(res["com_x"].data[n == 0]).all()
    np.testing.assert_allclose(res["com_y_mrad"].data, cy * 0.25, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(res["com_x_mrad"].data, cx * 0.25, rtol=1e-6, atol=1e-12)
    assert res["com_y"].unit == "px" and res["com_y_mrad"].unit == "mrad"
    assert all(r.kind == "nav" for r in res.values())


def test_identical_whatever_the_chunking():
    scan = make_scan(6, fpp=2, flyback=1)
    op = CenterOfMass(scan.scan_shape, scan.frame_shape, radius=12, rotation_deg=33.0, flip=True)
    results = []
    for label, chunks, n_states in split_variants(scan):
        res = op.finalize(run(op, chunks, np.random.default_rng(len(label)), n_states))
        results.append(res)
    for other in results[1:]:
        for key in results[0]:
            np.testing.assert_array_equal(other[key].data, results[0][key].data)


def one_electron_scan(dy, dx, frame_shape=(33, 41)):
    """A 1x2 scan: position 0 has 4 electrons at offset (dy, dx) from the detector centre,
    position 1 none."""
    h, w = frame_shape
    cy, cx = (h - 1) // 2, (w - 1) // 2
    idx = np.full(4, (cy + dy) * w + (cx + dx), dtype=np.uint32)
    return Chunk.from_counts([0, 1], [0, 0], [0, 1], [4, 0], idx)


# Offsets in (y, x) px, y down. Rotation is counter-clockwise in the displayed image.
KNOWN = [  # (dy, dx), rotation_deg, flip -> (com_y, com_x)
    ((0, 3), 0, False, (0, 3)),
    ((0, 3), 90, False, (-3, 0)),     # right -> up
    ((0, 3), 180, False, (0, -3)),    # right -> left
    ((0, 3), 270, False, (3, 0)),     # right -> down
    ((0, 3), -90, False, (3, 0)),
    ((2, 0), 90, False, (0, 2)),      # down -> right
    ((0, 3), 0, True, (0, -3)),       # flip mirrors detector x
    ((2, 0), 0, True, (2, 0)),
    ((0, 3), 90, True, (3, 0)),       # flip first (-> left), then rotate (left -> down)
    ((2, 1), 180, True, (-2, 1)),
]


@pytest.mark.parametrize("d,rot,flip,expected", KNOWN)
def test_rotation_and_flip_known_answers(d, rot, flip, expected):
    op = CenterOfMass((1, 2), (33, 41), rotation_deg=rot, flip=flip, mrad_per_px=2.0)
    state = op.new_state()
    op.process(state, one_electron_scan(*d))
    res = op.finalize(state)
    assert res["com_y"].data[0, 0] == expected[0] and res["com_x"].data[0, 0] == expected[1]
    assert res["com_y_mrad"].data[0, 0] == 2 * expected[0]
    assert np.isnan(res["com_y"].data[0, 1]) and np.isnan(res["com_x"].data[0, 1])
    assert res["com_n"].data.tolist() == [[4, 0]]


def test_45_degrees():
    op = CenterOfMass((1, 2), (33, 41), rotation_deg=45)
    state = op.new_state()
    op.process(state, one_electron_scan(0, 4))
    res = op.finalize(state)
    s = 4 / np.sqrt(2)  # right rotated 45 deg counter-clockwise on screen: up and right
    np.testing.assert_allclose([res["com_y"].data[0, 0], res["com_x"].data[0, 0]], [-s, s])


def test_com_from_sums_is_the_finalize_step():
    rng = np.random.default_rng(0)
    n = rng.integers(0, 5, (3, 4))
    sy, sx = n * 7 + rng.integers(0, 3, n.shape) * n, n * 9 + rng.integers(0, 3, n.shape) * n
    assert (n == 0).any()
    cy, cx = com_from_sums(n, sy, sx, center=(1.0, 2.0), rotation_deg=30.0, flip=True)
    t = np.deg2rad(30.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        dy, dx = sy / n - 1.0, -(sx / n - 2.0)
        np.testing.assert_allclose(cx, dx * np.cos(t) + dy * np.sin(t))
        np.testing.assert_allclose(cy, -dx * np.sin(t) + dy * np.cos(t))
    assert np.array_equal(np.isnan(cy), n == 0)


@pytest.mark.parametrize("rot,flip", [(0.0, False), (90.0, True), (-270.0, False), (33.3, True)])
@pytest.mark.parametrize("kind", ["int64", "float64", "uint32"])
def test_com_from_sums_bit_for_bit_as_numpy(rot, flip, kind):
    # the kernel promises the numpy expressions' exact float64 results (files written before
    # it must compare equal), for integer sums and for the float fields phase.py passes
    rng = np.random.default_rng(3)
    n = rng.integers(0, 4, (17, 23)).astype(kind)
    sy = (n * 300 + rng.integers(0, 50, n.shape) * n).astype(kind)
    sx = (n * 280 + rng.integers(0, 50, n.shape) * n).astype(kind)
    if kind == "float64":
        sy = sy + rng.random(n.shape) * n
    got_y, got_x = com_from_sums(n, sy, sx, center=(288.5, 287.25), rotation_deg=rot, flip=flip)
    q = rot / 90.0
    c, s = ([(1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.0, -1.0)][round(q) % 4] if q == round(q)
            else (np.cos(np.deg2rad(rot)), np.sin(np.deg2rad(rot))))
    empty = n == 0
    safe = np.where(empty, 1.0, n.astype(np.float64))
    dy = sy.astype(np.float64) / safe - 288.5
    dx = sx.astype(np.float64) / safe - 287.25
    dx = -dx if flip else dx
    want_x, want_y = dx * c + dy * s, -dx * s + dy * c
    want_x[empty] = want_y[empty] = np.nan
    assert empty.any() and got_y.shape == n.shape and got_y.dtype == np.float64
    np.testing.assert_array_equal(got_y, want_y)
    np.testing.assert_array_equal(got_x, want_x)


def test_radius_selects_pixel_centres_within_distance():
    op = CenterOfMass((1, 1), (5, 5), radius=1.0)
    # (2,2) centre, (2,3) at distance 1 (inside), (3,3) at sqrt2 (outside).
    chunk = Chunk.from_counts([0], [0], [0], [3], np.array([12, 13, 18], np.uint32))
    state = op.new_state()
    op.process(state, chunk)
    assert state["n"].tolist() == [2] and state["sum_x"].tolist() == [5]


def test_bad_parameters_and_events():
    with pytest.raises(ValueError, match="radius"):
        CenterOfMass((2, 2), (4, 4), radius=-1)
    with pytest.raises(ValueError, match="mrad_per_px"):
        CenterOfMass((2, 2), (4, 4), mrad_per_px=0)
    op = CenterOfMass((2, 2), (4, 4))
    state = op.new_state()
    # the good events of the chunk count (pixel 5 = (1, 1) at position 0); the error names
    # the operator and the problem
    with pytest.raises(ValueError, match=r"CenterOfMass 'com'.*1 event\(s\) with a pixel index >= 16"):
        op.process(state, Chunk.from_counts([0], [0], [0], [2], np.array([99, 5], np.uint32)))
    assert state["n"].tolist() == [1, 0, 0, 0] and state["sum_y"].tolist() == [1, 0, 0, 0]
