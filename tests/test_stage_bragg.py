"""Bragg peaks of one pattern and their indexing (operators/crystallography/bragg.py).

References are independent of the code under test: published electron wavelengths,
synthetic patterns of uniform disks drawn here with known centres and counts, the Poisson
null distribution sampled here, and peak sets generated here from a cubic lattice in a
known random orientation.
"""

import math

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from operators.crystallography.bragg import (PHASES, Phase, direct_beam, electron_wavelength_A,
                                             find_bragg_peaks, index_peaks, inv_A_per_px, li_ma_significance)

LAM_300 = 0.019687  # Å at 300 keV (e.g. Williams & Carter, Transmission Electron Microscopy)


# ------------------------------------------------------------------ calibration

@pytest.mark.parametrize("kev, lam", [(100, 0.037014), (200, 0.025079), (300, 0.019687)])
def test_wavelength_matches_published_values(kev, lam):
    assert electron_wavelength_A(kev) == pytest.approx(lam, abs=6e-7)  # 5 digits published


def test_reciprocal_sampling():
    # 0.2 mrad per px at 300 keV: θ/λ = 2e-4 / 0.019687 Å
    assert inv_A_per_px(300.0, 0.2) == pytest.approx(2e-4 / LAM_300, rel=3e-5)
    with pytest.raises(ValueError, match="mrad_per_px"):
        inv_A_per_px(300.0, 0.0)
    with pytest.raises(ValueError, match="beam energy"):
        electron_wavelength_A(-5)


# ------------------------------------------------------------------ synthetic patterns

def disk_pixels(shape, cy, cx, r):
    yy, xx = np.indices(shape)
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def synthetic_pattern(rng, shape=(256, 256), r=12.5, disks=(), direct=(127.5, 127.5, 4000.0),
                      background=(0.5, 0.004, -0.003)):
    """Expected counts: a uniform direct disk, uniform Bragg disks (cy, cx, total counts)
    and a sloped background b0 + by·(y - cy0) + bx·(x - cx0); returns (Poisson draw,
    expected counts per disk above background)."""
    h, w = shape
    yy, xx = np.indices(shape)
    lam = np.maximum(background[0] + background[1] * (yy - h / 2) + background[2] * (xx - w / 2),
                     0.0)
    m = disk_pixels(shape, direct[0], direct[1], r)
    lam = lam + m * direct[2] / m.sum()
    for cy, cx, n in disks:
        m = disk_pixels(shape, cy, cx, r)
        lam = lam + m * n / m.sum()
    return rng.poisson(lam).astype(np.int64)


def test_direct_beam_centre_and_radius():
    rng = np.random.default_rng(1)
    p = synthetic_pattern(rng, direct=(100.3, 90.7, 1e6), background=(0.2, 0, 0))
    beam = direct_beam(p)
    assert np.allclose(beam.yx, [100.3, 90.7], atol=0.05)
    # pixel centres within 12.5 px: 489 px, sqrt(489/π) = 12.48
    assert beam.radius_px == pytest.approx(12.5, abs=0.1)
    with pytest.raises(ValueError, match="non-empty"):
        direct_beam(np.zeros((8, 8)))


DISKS = [(127.5 + 43.3 * math.sin(t), 127.5 + 43.3 * math.cos(t), n)
         for t, n in zip(np.linspace(0.3, 2 * math.pi + 0.3, 6, endpoint=False),
                         (3000, 1500, 800, 400, 300, 200))] + \
        [(127.2 + 81.7, 127.9 - 52.1, 600.0), (30.4, 200.6, 900.0)]


def test_peaks_positions_intensities_and_their_errors():
    """Over many Poisson draws the measured centres and intensities scatter around the
    truth as their stated standard errors say, despite a sloped background."""
    rng = np.random.default_rng(7)
    pulls_pos, pulls_int = [], []
    for _ in range(12):
        p = synthetic_pattern(rng, disks=DISKS)
        pk = find_bragg_peaks(p, (127.5, 127.5), 12.5, min_significance=5.0)
        assert len(pk) == len(DISKS)  # every disk, nothing else
        for (cy, cx, n) in DISKS:
            i = np.argmin(np.hypot(pk.yx[:, 0] - cy, pk.yx[:, 1] - cx))
            pulls_pos += list((pk.yx[i] - (cy, cx)) / pk.sigma_yx[i])
            pulls_int.append((pk.intensity[i] - n) / pk.sigma[i])
        assert np.all(np.diff(pk.significance) <= 0)  # strongest first
    pulls_pos, pulls_int = np.array(pulls_pos), np.array(pulls_int)
    assert np.all(np.abs(pulls_pos) < 4.5) and np.all(np.abs(pulls_int) < 4.5)
    assert 0.7 < pulls_pos.std() < 1.3, pulls_pos.std()
    assert 0.7 < pulls_int.std() < 1.3, pulls_int.std()
    assert abs(pulls_pos.mean()) < 0.25 and abs(pulls_int.mean()) < 0.3


def test_no_peaks_in_pure_background_and_edge_disks_skipped():
    rng = np.random.default_rng(3)
    p = synthetic_pattern(rng, disks=[])
    assert len(find_bragg_peaks(p, (127.5, 127.5), 12.5)) == 0
    # a disk cut by the detector edge has a biased centroid: not reported
    p = synthetic_pattern(rng, disks=[(127.5, 5.0, 3000.0), (127.5, 200.0, 3000.0)])
    pk = find_bragg_peaks(p, (127.5, 127.5), 12.5)
    assert len(pk) == 1 and abs(pk.yx[0, 1] - 200.0) < 0.5
    # disks overlapping the direct beam are not reported either
    p = synthetic_pattern(rng, disks=[(127.5, 127.5 + 20, 3000.0)])
    assert len(find_bragg_peaks(p, (127.5, 127.5), 12.5)) == 0
    with pytest.raises(ValueError, match="disk_radius_px"):
        find_bragg_peaks(p, (127.5, 127.5), 0)


def test_li_ma_significance_under_the_null_is_standard_normal():
    rng = np.random.default_rng(11)
    alpha, b = 0.4, 30.0
    on = rng.poisson(b, 400_000)
    off = rng.poisson(b / alpha, 400_000)
    s = li_ma_significance(on, off, alpha)
    assert abs(s.mean()) < 0.02 and s.std() == pytest.approx(1.0, abs=0.03)
    assert (s > 3).mean() == pytest.approx(0.00135, abs=0.0004)
    # large counts: Li & Ma's eq. 9, (on - α off) / sqrt(α (on + off)), to first order
    on, off = 10_500.0, 25_000.0
    assert li_ma_significance(on, off, alpha) == pytest.approx(
        (on - alpha * off) / math.sqrt(alpha * (on + off)), rel=0.02)


# ------------------------------------------------------------------ indexing

CUBIC = [m for m in (np.array(p) * s for p in
                     [np.eye(3)[list(q)] for q in ((0, 1, 2), (1, 2, 0), (2, 0, 1),
                                                  (1, 0, 2), (0, 2, 1), (2, 1, 0))]
                     for s in [np.array(v)[:, None] for v in
                               ((1, 1, 1), (1, -1, -1), (-1, 1, -1), (-1, -1, 1),
                                (-1, -1, -1), (-1, 1, 1), (1, -1, 1), (1, 1, -1))])
         if np.linalg.det(m) > 0]
RZ180 = np.diag([-1.0, -1.0, 1.0])
assert len(CUBIC) == 24


def misorientation_deg(R_fit, R_true):
    """Smallest rotation angle between two crystal->specimen rotations, over the 24 cubic
    symmetry operations and the 180° turn about the beam a kinematic pattern cannot see.
    Returns (angle, S, z) with R_fit ≈ Z R_true S, z = +1 (Z = I) or -1 (Z = Rz(180°))."""
    best = (180.0, None, 1)
    for z, Z in ((1, np.eye(3)), (-1, RZ180)):
        for S in CUBIC:
            M = R_fit.T @ Z @ R_true @ S
            ang = math.degrees(math.acos(np.clip((np.trace(M) - 1) / 2, -1, 1)))
            if ang < best[0]:
                best = (ang, S, z)
    return best


def unmixed(n):
    r = np.arange(-n, n + 1)
    hkl = np.stack(np.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    par = hkl % 2
    return hkl[np.all(par == par[:, :1], axis=1) & np.any(hkl != 0, axis=1)]


def simulated_peaks(rng, a, R, lam=LAM_300, q_max=1.3, s_max=0.03, noise=0.001):
    """In-plane (g_y, g_x) of the fcc/rocksalt reflections near the Ewald sphere of a
    crystal in orientation R (crystal -> specimen), with relative position noise."""
    hkl = unmixed(7)
    g = (hkl / a) @ R.T
    s = -g[:, 2] - 0.5 * lam * (g ** 2).sum(1)
    ok = (np.abs(s) <= s_max) & (np.hypot(g[:, 0], g[:, 1]) <= q_max) & \
        (np.hypot(g[:, 0], g[:, 1]) > 0.3)
    q = g[ok][:, 1::-1]
    q = q + noise * np.linalg.norm(q, axis=1)[:, None] * rng.standard_normal(q.shape)
    return q, hkl[ok]


@pytest.mark.parametrize("phase", PHASES, ids=[p.name for p in PHASES])
def test_index_recovers_phase_lattice_orientation_and_hkl(phase):
    """Rich patterns (>= 10 reflections near the Ewald sphere): phase, a within 0.2 %, the
    orientation within 5° modulo symmetry (the tilt is fixed only to about the relrod
    length over |g|), and every (hkl) the true one in that setting."""
    rng = np.random.default_rng(sum(map(ord, phase.name)))
    done = 0
    for R in Rotation.random(60, random_state=rng.integers(1 << 31)).as_matrix():
        q, hkl_true = simulated_peaks(rng, phase.a_A, R, q_max=2.0)
        if len(q) < 10:
            continue
        if done == 4:
            break
        ix = index_peaks(q, energy_keV=300.0)
        assert ix.phase == phase.name
        assert ix.a_fit_A == pytest.approx(phase.a_A, rel=0.002)
        assert ix.indexed.all()
        ang, S, z = misorientation_deg(ix.orientation, R)
        assert ang < 5.0
        assert np.array_equal(hkl_true, z * ix.hkl @ S.T)
        err = np.linalg.norm(ix.q_model_yx - q, axis=1)
        assert np.all(err < 0.01 * np.linalg.norm(q, axis=1))
        assert np.allclose(ix.lattice, ix.a_fit_A * ix.orientation.T)
        assert np.allclose(ix.d_ideal_A, phase.a_A / np.linalg.norm(hkl_true, axis=1))
        done += 1
    assert done >= 3


def test_index_sparse_patterns_give_phase_and_spacing():
    """3 to 9 reflections: the orientation may be ambiguous (another orientation can
    project the same few reflections identically), but phase, lattice parameter and a
    consistent indexing of every peak are still found."""
    rng = np.random.default_rng(21)
    n = 0
    for phase in PHASES:
        for R in Rotation.random(6, random_state=rng.integers(1 << 31)).as_matrix():
            q, _ = simulated_peaks(rng, phase.a_A, R)
            u = q / np.linalg.norm(q, axis=1)[:, None]
            sin = np.abs(np.outer(u[:, 0], u[:, 1]) - np.outer(u[:, 1], u[:, 0]))
            if not 3 <= len(q) < 10 or sin.max() < 0.2:
                continue  # fewer than two independent directions: one spacing, no lattice
            ix = index_peaks(q)
            assert ix.phase == phase.name and ix.indexed.all()
            assert ix.a_fit_A == pytest.approx(phase.a_A, rel=0.005)
            assert np.all(np.linalg.norm(ix.q_model_yx - q, axis=1)
                          < 0.01 * np.linalg.norm(q, axis=1))
            n += 1
    assert n >= 6


def test_a_single_row_of_reflections_names_no_phase():
    q = np.array([[0.3, 0.2], [-0.3, -0.2]]) * (math.sqrt(3) / 3.924 / math.hypot(0.3, 0.2))
    ix = index_peaks(q)  # a ±(111) pair of Pt, or ±(311) of MgO...: one spacing only
    assert ix.phase == "unknown" and ix.n_indexed == 2


def test_index_leaves_foreign_peaks_unindexed():
    rng = np.random.default_rng(5)
    R = Rotation.random(random_state=12).as_matrix()
    q, _ = simulated_peaks(rng, 3.924, R)
    foreign = np.array([[0.31, 0.52], [-0.47, 0.61]])  # on no Pt reflection of R
    ix = index_peaks(np.vstack([q, foreign]))
    assert ix.phase == "Pt" and ix.indexed[:len(q)].all() and not ix.indexed[len(q):].any()
    assert np.all(ix.hkl[len(q):] == 0) and np.isnan(ix.d_ideal_A[len(q):]).all()


def test_index_unknown_and_too_few_peaks():
    rng = np.random.default_rng(9)
    R = Rotation.random(random_state=3).as_matrix()
    q, _ = simulated_peaks(rng, 4.60, R)  # no candidate has a = 4.6 Å
    ix = index_peaks(q)
    assert ix.phase == "unknown" and ix.n_indexed < len(q) / 2  # only coincidences index
    x = index_peaks(q, phases=[Phase("X", 4.6)])
    assert x.phase == "X" and x.indexed.all() and x.a_fit_A == pytest.approx(4.6, rel=0.002)
    one = index_peaks(q[:1])
    assert one.phase == "" and one.n_indexed == 0 and not one.indexed.any()
    with pytest.raises(ValueError, match="non-zero q"):
        index_peaks(np.zeros((3, 2)))
