"""iCoM phase (operators/imaging/phase.py) against analytic phase fields and the emulator's truth.

References: analytic Gaussian bumps phi and their analytic gradient (the CoM field), mapped
into a detector frame by the inverse of the com_from_sums convention written out here; the
weak-phase relation theta = (lambda / 2 pi) grad(phi) for the units; the emulator's true column
positions (sim_detector Truth) for the MgO scan.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from operators.com import com_from_sums
from operators.imaging.phase import apply_rotation, find_scan_rotation, icom, integrate_gradient

try:
    from test_stage_columns import mgo_scan
except ImportError:  # collected as a package
    from tests.test_stage_columns import mgo_scan


def bumps(shape, n=20, seed=1, margin=5.0):
    """Phase of n Gaussian bumps and its analytic gradient (d/dy, d/dx), per px."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    y, x = np.mgrid[0:ny, 0:nx].astype(float)
    phi, gy, gx = (np.zeros(shape) for _ in range(3))
    for cy, cx, s, a in zip(rng.uniform(margin, ny - margin, n),
                            rng.uniform(margin, nx - margin, n),
                            rng.uniform(2.0, 5.0, n), rng.uniform(0.5, 2.0, n)):
        g = a * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * s * s))
        phi += g
        gy -= g * (y - cy) / s ** 2
        gx -= g * (x - cx) / s ** 2
    return phi, gy, gx


def to_detector(gy, gx, rotation_deg, flip):
    """Inverse of com_from_sums: the raw (dy, dx) that flip + rotation turn into (gy, gx).

    com_from_sums: fx = -dx if flip else dx; x' = fx c + dy s; y' = -fx s + dy c.
    Solving: fx = x' c - y' s, dy = x' s + y' c.
    """
    t = np.deg2rad(rotation_deg)
    c, s = np.cos(t), np.sin(t)
    fx = gx * c - gy * s
    dy = gx * s + gy * c
    return dy, (-fx if flip else fx)


def corr(a, b):
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def angle_diff(a, b):
    return abs((a - b + 180.0) % 360.0 - 180.0)


@pytest.mark.parametrize("rotation,flip", [(0.0, False), (37.0, True), (-120.0, False),
                                           (200.0, True), (90.0, False)])
def test_known_phase_recovered_with_scan_rotation_found(rotation, flip):
    phi, gy, gx = bumps((96, 128))
    dy, dx = to_detector(gy, gx, rotation, flip)
    # the inverse written above really is the inverse of the operator convention
    back = com_from_sums(np.ones(dy.shape, int), dy, dx, (0.0, 0.0), rotation, flip)
    np.testing.assert_allclose(back[0], gy, atol=1e-12)
    np.testing.assert_allclose(back[1], gx, atol=1e-12)
    res = icom(dy, dx)
    assert res.flip == flip and res.flip_source == "least curl"
    assert angle_diff(res.rotation_deg, rotation) < 1.0, res.rotation_deg
    assert corr(res.phase, phi) >= 0.99
    assert res.curl_residual < 0.05  # an exact gradient: curl only from finite differences
    assert res.sign_criterion.startswith("skewness +")
    assert abs(res.phase.mean()) < 1e-12  # DC set to zero
    assert res.phase.dtype == np.float64 and res.phase.shape == phi.shape


def test_rotation_search_is_exact_minimum_of_the_curl():
    # brute force over 0.1 degree steps, both flips, with plain numpy differences
    phi, gy, gx = bumps((64, 64), n=12, seed=4)
    dy, dx = to_detector(gy, gx, 63.0, True)
    rng = np.random.default_rng(0)
    dy = dy + rng.normal(0, 0.05, dy.shape)
    dx = dx + rng.normal(0, 0.05, dx.shape)

    def curl2(t_deg, flip):
        t = np.deg2rad(t_deg)
        fx = -dx if flip else dx
        x2 = fx * np.cos(t) + dy * np.sin(t)
        y2 = -fx * np.sin(t) + dy * np.cos(t)
        return ((np.gradient(y2, axis=1) - np.gradient(x2, axis=0)) ** 2).sum()

    grid = np.arange(0, 180, 0.1)
    brute = min((curl2(t, f), t, f) for f in (False, True) for t in grid)
    rot, flip, _ = find_scan_rotation(dy - dy.mean(), dx - dx.mean())
    assert flip == brute[2]
    assert angle_diff(rot, brute[1]) <= 0.06


def test_given_rotation_and_flip_are_used():
    phi, gy, gx = bumps((64, 80))
    dy, dx = to_detector(gy, gx, 25.0, False)
    res = icom(dy, dx, rotation_deg=25.0, flip=False)
    assert (res.rotation_deg, res.flip) == (25.0, False)
    assert res.rotation_source == "given" and res.sign_criterion == "given"
    assert corr(res.phase, phi) >= 0.99
    # the given rotation is used even when wrong: 180 degrees off gives the negative phase
    res2 = icom(dy, dx, rotation_deg=205.0, flip=False)
    assert corr(res2.phase, phi) <= -0.99
    # known rotation, unknown flip: the flip with less curl
    res3 = icom(dy, dx, rotation_deg=25.0)
    assert res3.flip is False and res3.flip_source == "least curl"


def test_sign_follows_the_adf_image_when_given():
    phi, gy, gx = bumps((64, 64))
    dy, dx = to_detector(gy, gx, 10.0, False)
    good = icom(dy, dx, adf=phi + 0.1)
    assert corr(good.phase, phi) >= 0.99 and good.sign_criterion.startswith("adf correlation +")
    # an "ADF" anticorrelated with the true phase flips the choice by 180 degrees
    bad = icom(dy, dx, adf=-phi)
    assert corr(bad.phase, phi) <= -0.99
    assert angle_diff(bad.rotation_deg, 190.0) < 1.0


def test_mirror_padding_avoids_edge_artefacts():
    # bumps cut by the scan edges: periodic integration wraps them around, mirror does not
    phi, gy, gx = bumps((64, 96), n=10, seed=3, margin=-3.0)
    c = {p: corr(integrate_gradient(gy, gx, padding=p), phi) for p in ("mirror", "zero", "none")}
    assert c["mirror"] >= 0.99
    assert c["mirror"] > c["none"] + 0.01
    assert c["zero"] > c["none"]


def test_calibrated_phase_in_radians():
    # weak phase: theta = lambda/(2 pi) grad(phi); CoM in detector px with m mrad/px
    lam, step, m = 0.019687, 0.25, 0.5
    # bumps well inside: no deflection at the edges, so nothing is lost to the mean removal
    phi, gy, gx = bumps((80, 80), n=6, margin=30)       # phi in rad, gradient per scan px
    theta_mrad_y = 1e3 * lam / (2 * np.pi) * gy / step  # grad per Å = per px / step
    theta_mrad_x = 1e3 * lam / (2 * np.pi) * gx / step
    res = icom(theta_mrad_y / m, theta_mrad_x / m, rotation_deg=0.0, flip=False,
               mrad_per_unit=m, wavelength_A=lam, step_A=step)
    assert res.unit == "rad" and res.scale_to_rad == 1.0
    ref = phi - phi.mean()
    assert np.abs(res.phase - ref).max() < 0.02 * np.ptp(phi)
    raw = icom(theta_mrad_y / m, theta_mrad_x / m, rotation_deg=0.0, flip=False)
    assert np.isnan(raw.scale_to_rad) and raw.unit != "rad"
    np.testing.assert_allclose(raw.phase * 2 * np.pi * 1e-3 * m * step / lam, res.phase,
                               rtol=1e-9, atol=1e-12)


def test_missing_positions_and_uniform_deflection():
    phi, gy, gx = bumps((64, 64))
    rng = np.random.default_rng(2)
    hole = rng.random(gy.shape) < 0.01
    dy = np.where(hole, np.nan, gy + 3.0)   # a uniform offset (reference centre) is removed
    dx = np.where(hole, np.nan, gx - 1.5)
    res = icom(dy, dx, rotation_deg=0.0, flip=False)
    assert res.n_missing == hole.sum() and np.isfinite(res.phase).all()
    assert corr(res.phase[~hole], phi[~hole]) >= 0.98


def test_rotation_helper_is_the_com_convention():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 5, 6))
    ry, rx = apply_rotation(a, b, 33.0, True)
    t = np.deg2rad(33.0)
    np.testing.assert_allclose(rx, -b * np.cos(t) + a * np.sin(t))
    np.testing.assert_allclose(ry, b * np.sin(t) + a * np.cos(t))


def test_bad_input():
    g = np.zeros((8, 8))
    with pytest.raises(ValueError, match="one shape"):
        icom(g, np.zeros((8, 9)))
    with pytest.raises(ValueError, match="padding"):
        icom(g + np.eye(8), g, padding="reflect")
    with pytest.raises(ValueError, match="no finite"):
        icom(g * np.nan, g)
    with pytest.raises(ValueError, match="adf"):
        icom(g, g, adf=np.zeros((3, 3)))
    with pytest.raises(ValueError, match="wavelength_A"):
        icom(g + np.eye(8), g, rotation_deg=0.0, flip=False, mrad_per_unit=1.0,
             wavelength_A=-1.0, step_A=1.0)
    with pytest.raises(ValueError, match="3 x 3"):
        icom(np.zeros((2, 8)), np.zeros((2, 8)))


# ----------------------------------------------------------------- emulated MgO

@pytest.fixture(scope="module")
def mgo_default():
    return mgo_scan()


def test_mgo_phase_peaks_on_true_columns(mgo_default):
    """Default MgO slab and dose (200 e-/frame): CoM from the events, scan rotation and flip
    found (the emulator has none), phase maxima on the true columns."""
    sim, img = mgo_default
    tr = sim.truth
    res = icom(img["com_y"], img["com_x"], adf=img["adf"])
    assert res.flip is False
    assert angle_diff(res.rotation_deg, 0.0) < 3.0, res.rotation_deg
    assert res.sign_criterion.startswith("adf correlation +")
    # without the ADF image the skewness criterion makes the same choice
    res_skew = icom(img["com_y"], img["com_x"])
    assert res_skew.sign_criterion.startswith("skewness +")
    assert angle_diff(res_skew.rotation_deg, res.rotation_deg) < 1e-9
    ph = res.phase
    cols = np.c_[tr.columns["row_px"], tr.columns["col_px"]]
    # phase on each column above the phase at the centre of its cell (between 4 columns)
    half = 0.25 * 4.212 / tr.scan["step_A"]
    on = ndi.map_coordinates(ph, cols.T, order=1)
    between = ndi.map_coordinates(ph, (cols + half).T, order=1)
    inside = (cols + half < np.array(ph.shape) - 1).all(1)
    assert (on > between)[inside].mean() >= 0.9
    # the column-averaged phase peaks on the true position (sub-pixel, parabolic)
    off = np.arange(-2, 3)
    stack = np.array([[ndi.map_coordinates(ph, (cols + [dy, dx]).T, order=1).mean()
                       for dx in off] for dy in off])
    assert np.unravel_index(stack.argmax(), stack.shape) == (2, 2)
    for prof in (stack[:, 2], stack[2, :]):
        vertex = 0.5 * (prof[1] - prof[3]) / (prof[1] - 2 * prof[2] + prof[3])
        assert abs(vertex) < 0.2
    # local maxima: thick columns nearly all have one within 1 px (0.4 Å), thin ones (3-7
    # atoms, weak at this dose) mostly; far above the chance level (random positions)
    ys, xs = np.nonzero(ph == ndi.maximum_filter(ph, size=5))
    from scipy.spatial import cKDTree

    tree = cKDTree(np.c_[ys, xs])
    d, _ = tree.query(cols)
    rand = np.random.default_rng(0).uniform(cols.min(0), cols.max(0), (4000, 2))
    chance = (tree.query(rand)[0] <= 1.0).mean()
    thick = tr.columns["count"] >= 8
    print(f"\nMgO preset: rotation {res.rotation_deg:.2f} deg, {res.sign_criterion}; phase "
          f"maximum within 1 px of {(d <= 1).mean():.3f} of the columns "
          f"({(d[thick] <= 1).mean():.3f} of those >= 8 atoms), chance {chance:.3f}")
    assert (d[thick] <= 1.0).mean() >= 0.9
    assert (d <= 1.0).mean() >= 0.7 and (d <= 1.0).mean() > chance + 0.4


def test_mgo_expected_com_gives_exact_geometry(mgo_default):
    """The noiseless expected CoM of the same scan: no rotation, no flip, sharp peaks."""
    sim, _ = mgo_default
    tr = sim.truth
    res = icom(tr.expected["com_y"], tr.expected["com_x"], adf=tr.expected["adf"])
    assert res.flip is False and angle_diff(res.rotation_deg, 0.0) < 0.1
    ph = res.phase
    ys, xs = np.nonzero((ph == ndi.maximum_filter(ph, size=5)) & (ph > np.percentile(ph, 80)))
    from scipy.spatial import cKDTree

    d, _ = cKDTree(np.c_[ys, xs]).query(np.c_[tr.columns["row_px"], tr.columns["col_px"]])
    assert (d <= 0.75).all()   # every column has a phase maximum on its nearest pixel
