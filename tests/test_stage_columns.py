"""Atomic columns in 2D (operators/imaging/columns.py) against known answers and the emulator's truth.

References: synthetic images drawn here from Gaussians at known sub-pixel positions (plus
Poisson noise), known lattices and displacement fields, brute-force distances, and the true
atomic columns of an emulated MgO slab (sim_detector Truth.columns). Images of emulated scans
are built here from the events with plain numpy (the Truth's detector masks); the dense
helpers of conftest would need 128² × 576² values.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from operators.imaging.columns import (analyze_columns, find_candidates, fit_gaussians, fit_lattice,
                                       nearest_neighbour_distances, refine_com)

PM_PER_A = 100.0


# ----------------------------------------------------------------- emulator helpers

def emulated_images(sim, com=True, com_radius=None, chunk_frames=8192):
    """ADF image (electrons in the Truth's ADF mask) and, if ``com``, the centre of mass (px
    from the optical axis; all electrons, or those within com_radius px) per scan position,
    from the events: per-frame sums as differences of running sums, then frames summed per
    position (flyback frames dropped)."""
    tr = sim.truth
    h, w = sim.frame_shape
    ay, ax = tr.detector["axis_yx"]
    adf = tr.detector_masks()[1].ravel()
    ny, nx = sim.scan_shape
    fpp, fly = sim.frames_per_position, sim.flyback
    nf = len(sim.counts)
    off = sim.offsets
    sums = np.zeros((4 if com else 1, nf))
    for f0 in range(0, nf, chunk_frames):
        f1 = min(nf, f0 + chunk_frames)
        idx = sim.indices[off[f0]:off[f1]]
        local = off[f0:f1 + 1] - off[f0]
        cols = [adf[idx]]
        if com:
            y, x = np.divmod(idx.astype(np.int64), w)
            keep = np.ones(len(idx), bool) if com_radius is None else \
                (y - ay) ** 2 + (x - ax) ** 2 <= com_radius ** 2
            cols += [keep, y * keep, x * keep]
        for k, v in enumerate(cols):
            c = np.zeros(len(v) + 1, np.int64)
            np.cumsum(v, out=c[1:])
            sums[k, f0:f1] = c[local[1:]] - c[local[:-1]]
    per_pos = sums.reshape(len(sums), ny, nx + fly, fpp).sum(-1)[:, :, :nx]
    out = {"adf": per_pos[0]}
    if com:
        n, sy, sx = per_pos[1:]
        with np.errstate(invalid="ignore", divide="ignore"):
            out.update(n=n, com_y=sy / n - ay, com_x=sx / n - ax)
    return out


def mgo_scan(dose=None, seed=0, scan=None, com=True, **specimen):
    """The emulator's MgO preset (slab, beam, detector, scan), optionally another dose."""
    from sim_detector.simulate import Beam, Detector, ScanSpec, presets, simulate_scan
    from sim_detector.specimens import make_specimen

    p = presets("mgo")
    beam = dict(p["beam"], **({} if dose is None else {"dose": float(dose)}))
    sim = simulate_scan(make_specimen("mgo", seed=seed, **specimen), Beam(**beam),
                        Detector(**p["detector"]), ScanSpec(**dict(p["scan"], **(scan or {}))),
                        seed=seed)
    return sim, emulated_images(sim, com=com)


def true_columns_px(truth):
    return np.c_[truth.columns["row_px"], truth.columns["col_px"]]


def match(found, true, tol=1.0):
    """(distance of each true column to the nearest found, its index, number of found
    columns with no true column within tol)."""
    d, j = cKDTree(found).query(true) if len(found) else (np.full(len(true), np.inf), None)
    d2, _ = cKDTree(true).query(found)
    return d, j, int((d2 > tol).sum())


def probe_sigma_px(truth):
    return truth.metadata["probe_fwhm_A"] / (2 * np.sqrt(2 * np.log(2))) / truth.scan["step_A"]


def photon_limit_pm(truth, dose_factor=1.0, yx=None):
    """RMS over the columns (all true ones, or those at ``yx``) of the Cramér–Rao bound of
    the radial position error (pm) from the truth's expected ADF image at dose_factor × its
    dose (operators.imaging.dose.position_bound_known_image, checked against the closed form
    below)."""
    from operators.imaging.dose import position_bound_known_image

    yx = true_columns_px(truth) if yx is None else yx
    b = position_bound_known_image(truth.expected["adf"] * dose_factor, yx, probe_sigma_px(truth))
    return float(np.sqrt(np.mean(b ** 2)) * truth.scan["step_A"] * PM_PER_A)


def test_position_bound_of_an_isolated_column_is_the_closed_form():
    # N counts in a Gaussian of width s on no background: each axis has variance s²/N, so the
    # radial bound is sqrt(2 s² / N) for any estimator
    from operators.imaging.dose import position_bound_known_image

    s, amp = 0.6, 50.0
    y, x = np.mgrid[0:21, 0:21].astype(float)
    img = amp * np.exp(-((y - 10.3) ** 2 + (x - 9.8) ** 2) / (2 * s * s)) + 1e-12
    n = 2 * np.pi * s * s * amp
    got = position_bound_known_image(img, [[10.3, 9.8]], s, radius_px=3.0)[0]
    assert got == pytest.approx(np.sqrt(2 * s * s / n), rel=0.01)
    # on a background the bound grows
    assert position_bound_known_image(img + 5.0, [[10.3, 9.8]], s, radius_px=3.0)[0] > 1.2 * got


# ----------------------------------------------------------------- synthetic images

def lattice_image(shape=(160, 176), a1=(0.4, 9.0), a2=(9.3, -0.6), origin=(4.0, 5.0),
                  sigma=1.5, amp=(40.0, 80.0), bg=5.0, jitter=0.25, seed=0, noise=True,
                  margin=4.0):
    """Poisson image of round Gaussian columns on a lattice with random sub-pixel jitter.
    Returns (image, true positions (n, 2), amplitudes)."""
    rng = np.random.default_rng(seed)
    a1, a2 = np.asarray(a1), np.asarray(a2)
    m = int(2 * max(shape) / min(np.hypot(*a1), np.hypot(*a2))) + 2
    ii, jj = np.meshgrid(np.arange(-m, m + 1), np.arange(-m, m + 1), indexing="ij")
    P = np.asarray(origin) + ii.reshape(-1, 1) * a1 + jj.reshape(-1, 1) * a2
    P = P + rng.uniform(-jitter, jitter, P.shape)
    ny, nx = shape
    P = P[(P[:, 0] > margin) & (P[:, 0] < ny - 1 - margin) & (P[:, 1] > margin)
          & (P[:, 1] < nx - 1 - margin)]
    A = rng.uniform(*amp, len(P))
    y, x = np.mgrid[0:ny, 0:nx].astype(float)
    img = np.full(shape, bg, float)
    for (py, px), a in zip(P, A):
        sl = (slice(max(int(py) - 9, 0), int(py) + 10), slice(max(int(px) - 9, 0), int(px) + 10))
        img[sl] += a * np.exp(-((y[sl] - py) ** 2 + (x[sl] - px) ** 2) / (2 * sigma ** 2))
    if noise:
        img = rng.poisson(img).astype(float)
    return img, P, A


def test_synthetic_columns_all_found_subpixel_accurate():
    img, P, A = lattice_image()
    res = analyze_columns(img, min_distance_px=5, smooth_px=1.0, step_A=0.2)
    found = np.c_[res.y_px, res.x_px]
    d, j, false = match(found, P)
    assert len(found) == len(P) and false == 0 and (d < 1).all()
    rms = np.sqrt((d ** 2).mean())
    # photon limit: ~ sigma / sqrt(counts) = 1.5 / sqrt(2 pi 60 1.5²) ≈ 0.06 px per axis
    assert rms < 0.15, rms
    assert (res.fit_status == 1).all()
    np.testing.assert_allclose(np.median(res.sigma1_px), 1.5, rtol=0.1)
    np.testing.assert_allclose(res.y_A, res.y_px * 0.2)
    # cross-sections: the volume under each true Gaussian, 2 pi A sigma²
    cs = res.cross_section_shared[j]
    assert np.median(np.abs(cs / (2 * np.pi * A * 1.5 ** 2) - 1)) < 0.05
    assert res.shared_sigma_px == pytest.approx(1.5, rel=0.05)


def test_gaussian_fit_recovers_elliptical_parameters_exactly():
    # noiseless, isolated elliptical Gaussians: every parameter comes back
    ny, nx = 60, 90
    y, x = np.mgrid[0:ny, 0:nx].astype(float)
    truth = [  # y, x, s1, s2, theta_deg (sigma_1 axis from +x towards +y), amplitude
        (15.3, 20.7, 2.0, 1.2, 30.0, 10.0),
        (40.6, 45.2, 1.8, 1.0, -60.0, 7.0),
        (20.1, 70.4, 1.5, 1.5, 0.0, 4.0),
    ]
    bg = 2.0
    img = np.full((ny, nx), bg)
    for cy, cx, s1, s2, th, a in truth:
        t = np.deg2rad(th)
        u = (x - cx) * np.cos(t) + (y - cy) * np.sin(t)
        v = -(x - cx) * np.sin(t) + (y - cy) * np.cos(t)
        img += a * np.exp(-u ** 2 / (2 * s1 ** 2) - v ** 2 / (2 * s2 ** 2))
    start = np.array([[t[0] + 0.4, t[1] - 0.3] for t in truth])
    fit = fit_gaussians(img, start, radius_px=9)
    assert (fit.status == 1).all()
    for k, (cy, cx, s1, s2, th, a) in enumerate(truth):
        assert fit.y_px[k] == pytest.approx(cy, abs=1e-6)
        assert fit.x_px[k] == pytest.approx(cx, abs=1e-6)
        assert fit.sigma1_px[k] == pytest.approx(s1, abs=1e-5)
        assert fit.sigma2_px[k] == pytest.approx(s2, abs=1e-5)
        if s1 != s2:
            assert abs((fit.theta_deg[k] - th + 90) % 180 - 90) < 1e-3
        assert fit.amplitude[k] == pytest.approx(a, rel=1e-6)
        assert fit.background[k] == pytest.approx(bg, abs=1e-6)
        assert fit.cross_section[k] == pytest.approx(2 * np.pi * a * s1 * s2, rel=1e-5)
    # round and fixed-width models on the round column
    rnd = fit_gaussians(img, start[2:], radius_px=9, shape="round")
    assert rnd.sigma1_px[0] == pytest.approx(1.5, abs=1e-5) == rnd.sigma2_px[0]
    fx = fit_gaussians(img, start[2:], radius_px=9, shape="fixed", sigma_px=1.5)
    assert fx.amplitude[0] == pytest.approx(4.0, rel=1e-6) and fx.sigma1_px[0] == 1.5


def test_neighbours_do_not_pull_the_fit():
    # two columns 4 px apart, one 5x brighter: Voronoi windows keep the faint one in place
    ny, nx = 30, 40
    y, x = np.mgrid[0:ny, 0:nx].astype(float)
    P = np.array([[15.2, 17.6], [15.0, 21.6]])
    img = sum(a * np.exp(-((y - p[0]) ** 2 + (x - p[1]) ** 2) / (2 * 1.0 ** 2))
              for p, a in zip(P, (50.0, 10.0)))
    fit = fit_gaussians(img, np.rint(P), radius_px=3.5, shape="round")
    np.testing.assert_allclose(np.c_[fit.y_px, fit.x_px], P, atol=0.02)


def test_candidates_min_distance_and_threshold():
    img = np.zeros((40, 40))
    img[10, 10] = 5.0
    img[10, 13] = 4.0   # 3 px from a brighter maximum: suppressed at min distance 4
    img[30, 30] = 0.5   # below threshold 1
    img[30, 10] = 2.0
    img[20, 20] = img[20, 21] = 3.0   # a plateau of two equal pixels: one candidate
    yx, contrast = find_candidates(img, min_distance_px=4, threshold=1.0)
    assert sorted(map(tuple, yx.astype(int))) == [(10, 10), (20, 20), (30, 10)] or \
        sorted(map(tuple, yx.astype(int))) == [(10, 10), (20, 21), (30, 10)]
    assert contrast.max() == 5.0
    yx2, _ = find_candidates(img, min_distance_px=2, threshold=1.0)
    assert (10, 13) in set(map(tuple, yx2.astype(int)))


def test_centre_of_mass_refinement_on_a_background():
    y, x = np.mgrid[0:21, 0:21].astype(float)
    img = 7.0 + np.exp(-((y - 10.3) ** 2 + (x - 9.6) ** 2) / (2 * 1.2 ** 2))
    yx = refine_com(img, [[10.0, 10.0]], radius_px=5, n_iter=5)
    np.testing.assert_allclose(yx[0], [10.3, 9.6], atol=0.02)


def test_lattice_vectors_recovered():
    t1, t2 = np.array([0.4, 9.0]), np.array([9.3, -0.6])
    img, P, _ = lattice_image(a1=t1, a2=t2, jitter=0.0, seed=3)
    res = analyze_columns(img, min_distance_px=5, smooth_px=1.0)
    B = np.c_[res.a1_px, res.a2_px]
    M = np.linalg.solve(B, np.c_[t1, t2])     # true basis in the fitted one
    Mi = np.rint(M)
    assert abs(round(np.linalg.det(Mi))) == 1 and np.abs(M - Mi).max() < 0.01
    np.testing.assert_allclose(B @ Mi, np.c_[t1, t2], atol=0.01)
    assert res.on_lattice.all() and res.lattice_rms_px < 0.15
    # integer indices reproduce the positions
    ideal = res.origin_px + res.lattice_indices @ B.T
    np.testing.assert_allclose(ideal + res.displacement_px, np.c_[res.y_px, res.x_px], atol=1e-9)


def test_hexagonal_lattice_basis():
    a = 8.0
    t1, t2 = np.array([0.0, a]), np.array([a * np.sqrt(3) / 2, a / 2])
    i, j = np.meshgrid(np.arange(12), np.arange(12), indexing="ij")
    P = i.reshape(-1, 1) * t1 + j.reshape(-1, 1) * t2
    lat = fit_lattice(P + np.random.default_rng(0).normal(0, 0.05, P.shape))
    assert np.hypot(*lat.a1_px) == pytest.approx(a, abs=0.02)
    assert np.hypot(*lat.a2_px) == pytest.approx(a, abs=0.02)
    cosang = lat.a1_px @ lat.a2_px / (np.hypot(*lat.a1_px) * np.hypot(*lat.a2_px))
    assert abs(abs(cosang) - 0.5) < 0.01


def test_known_displacement_field_recovered():
    t1, t2 = np.array([0.0, 10.0]), np.array([10.0, 0.0])
    i, j = np.meshgrid(np.arange(15), np.arange(14), indexing="ij")
    i, j = i.ravel(), j.ravel()
    ideal = np.array([12.0, 11.0]) + np.c_[i] * t1 + np.c_[j] * t2
    # a smooth field (a strain wave), up to 0.6 px
    u = np.c_[0.6 * np.sin(2 * np.pi * i / 7.0) * np.cos(2 * np.pi * j / 9.0),
              0.4 * np.cos(2 * np.pi * (i + j) / 6.5)]
    # positions -> lattice fit; the reference: u minus its own least-squares affine part
    # (a uniform strain or shift of u is absorbed by the fitted lattice, by definition)
    M = np.c_[np.ones(len(i)), i, j]
    u_ref = u - M @ np.linalg.lstsq(M, u, rcond=None)[0]
    lat = fit_lattice(ideal + u)
    np.testing.assert_allclose(lat.displacement_px, u_ref, atol=1e-9)
    # the same through an image: Gaussian columns at the displaced sites, Poisson noise
    ny, nx = 156, 166
    y, x = np.mgrid[0:ny, 0:nx].astype(float)
    P = ideal + u
    img = 3.0 + sum(80 * np.exp(-((y - p[0]) ** 2 + (x - p[1]) ** 2) / (2 * 1.4 ** 2)) for p in P)
    img = np.random.default_rng(1).poisson(img).astype(float)
    res = analyze_columns(img, min_distance_px=5, smooth_px=1.0)
    d, k, false = match(np.c_[res.y_px, res.x_px], P)
    assert false == 0 and len(res.y_px) == len(P)
    err = res.displacement_px[k] - u_ref
    assert np.sqrt((err ** 2).sum(1).mean()) < 0.1


def test_nearest_neighbour_distances_brute_force():
    P = np.random.default_rng(0).uniform(0, 50, (60, 2))
    d = np.hypot(*(P[:, None, :] - P[None, :, :]).transpose(2, 0, 1))
    np.fill_diagonal(d, np.inf)
    np.testing.assert_allclose(nearest_neighbour_distances(P), d.min(1))
    assert np.isnan(nearest_neighbour_distances(P[:1])).all()


def test_bad_input():
    with pytest.raises(ValueError, match="2D array"):
        analyze_columns(np.zeros(10), min_distance_px=3)
    with pytest.raises(ValueError, match="NaN"):
        analyze_columns(np.full((10, 10), np.nan), min_distance_px=3)
    with pytest.raises(ValueError, match="min_distance_px"):
        find_candidates(np.zeros((10, 10)), min_distance_px=0)
    with pytest.raises(ValueError, match="shape"):
        fit_gaussians(np.zeros((10, 10)), [[5, 5]], 3, shape="square")
    with pytest.raises(ValueError, match="sigma_px"):
        fit_gaussians(np.zeros((10, 10)), [[5, 5]], 3, shape="fixed")
    with pytest.raises(ValueError, match="at least 4"):
        fit_lattice(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="step_A"):
        analyze_columns(np.zeros((10, 10)), min_distance_px=3, step_A=-1)
    with pytest.raises(ValueError, match="noise"):
        analyze_columns(np.zeros((10, 10)), min_distance_px=3, noise="shot")
    with pytest.raises(ValueError, match="counts"):
        analyze_columns(np.full((10, 10), -1.0), min_distance_px=3, noise="poisson")
    # too few columns for a lattice: reported, not raised
    img = np.zeros((20, 20))
    img[5, 5] = img[12, 14] = 1.0
    res = analyze_columns(img, min_distance_px=3, noise="gaussian")
    assert len(res.y_px) == 2 and "at least 4" in res.lattice_error
    assert np.isnan(res.a1_px).all()


# ----------------------------------------------------------------- emulated MgO

MGO_HIGH_DOSE = 64  # x the preset's 200 e-/frame


@pytest.fixture(scope="module")
def mgo_high_dose():
    """A smaller MgO slab (5 x 5 cells, 100 columns, 3..12 atoms) at the preset's scan step
    (0.398 Å), 64 x the preset dose, from the emulator's events."""
    return mgo_scan(dose=200.0 * MGO_HIGH_DOSE, cells=5, terraces=10, com=False,
                    scan={"shape": (64, 64), "step_A": 0.398})


def test_mgo_columns_at_high_dose_within_5_pm(mgo_high_dose):
    sim, img = mgo_high_dose
    tr = sim.truth
    step = tr.scan["step_A"]
    res = analyze_columns(img["adf"], min_distance_px=3, smooth_px=0.6, step_A=step)
    assert res.noise_model == "poisson"   # the ADF image holds electron counts
    true = true_columns_px(tr)
    d, j, false = match(np.c_[res.y_px, res.x_px], true)
    assert len(res.y_px) == len(true) and false == 0 and (d < 1).all()
    rms_pm = np.sqrt((d ** 2).mean()) * step * PM_PER_A
    bound = photon_limit_pm(tr)  # the truth's expected image is at this scan's dose
    print(f"\nMgO x{MGO_HIGH_DOSE} dose: {len(true)} columns, RMS {rms_pm:.2f} pm, "
          f"photon-limited lower bound {bound:.2f} pm")
    assert rms_pm <= 5.0
    assert rms_pm <= 1.5 * bound   # close to the photon limit
    # the lattice: square, a/2 = 2.106 Å along x and y (no scan rotation in the emulator)
    a = sorted([np.hypot(*res.a1_px) * step, np.hypot(*res.a2_px) * step])
    np.testing.assert_allclose(a, [4.212 / 2] * 2, rtol=2e-3)
    assert res.on_lattice.all()
    # the nearest of four noisy distances is biased low by about the position noise
    nn = np.median(res.nn_distance_A)
    assert 4.212 / 2 - 3 * rms_pm / PM_PER_A < nn <= 4.212 / 2
    # a perfect crystal: displacements are noise only
    assert np.sqrt((res.displacement_A ** 2).sum(1).mean()) * PM_PER_A < 2 * 5.0


@pytest.fixture(scope="module")
def mgo_preset():
    """The emulator's MgO preset (128², 200 e-/frame, 400 columns of 3..12 atoms) from its
    events, with the truth's expected images."""
    return mgo_scan()


def test_mgo_default_dose_is_photon_limited_above_5_pm(mgo_preset):
    """Why 5 pm (the old target) is out of reach of the ADF image at the preset dose: at 200
    e-/frame a column gives 2-8 ADF electrons, and even an estimator that knew every
    column's amplitude, width and background could not beat ~20 pm RMS."""
    sim, _ = mgo_preset
    bound = photon_limit_pm(sim.truth)
    print(f"\nMgO preset dose: photon-limited lower bound {bound:.1f} pm RMS; 5 pm needs "
          f">= {(bound / 5.0) ** 2:.0f} x the dose")
    assert bound > 2 * 5.0


DOSE_TABLE = (1, 2.5, 4, 16, 64, 256, 1024)   # x the preset's 200 e-/frame; 2.5: the demo's dose


def mgo_image(mgo_preset, factor, seed):
    """The preset scan's ADF image from its events at 1x; above, a Poisson draw of the truth's
    expected ADF image times the factor (the emulator's per-frame counts are Poisson and the
    ADF count of a position their thinning: the same distribution, without 10⁹ events)."""
    sim, img = mgo_preset
    if factor == 1:
        return img["adf"]
    return np.random.default_rng(seed).poisson(sim.truth.expected["adf"] * factor).astype(float)


@pytest.mark.parametrize("factor", DOSE_TABLE)
def test_mgo_positions_within_1p5_cramer_rao_at_every_dose(mgo_preset, factor):
    """Over the dose table (preset to 1024x): the matched columns' RMS position error is
    within 1.5x the Cramér–Rao bound of the same columns (from the truth's noiseless image);
    false columns (none of the 400 true ones within 1 Å) are at most 1 % of the true ones;
    the advisor's bound, from the scan's own counts, agrees with the truth's within 35 %."""
    from operators.imaging.dose import advise

    sim, _ = mgo_preset
    tr = sim.truth
    step = tr.scan["step_A"]
    true = true_columns_px(tr)
    for seed in (1, 2):
        res = analyze_columns(mgo_image(mgo_preset, factor, seed), min_distance_px=3.5,
                              smooth_px=1.0, step_A=step)
        d, j, false = match(np.c_[res.y_px, res.x_px], true, tol=1.0 / step)
        hit = d < 1.0 / step
        rms = np.sqrt((d[hit] ** 2).mean()) * step * PM_PER_A
        bound = photon_limit_pm(tr, factor, true[hit])
        adv = advise(res, dose_e_per_position=200.0 * factor)
        print(f"\nMgO x{factor} seed {seed}: {hit.sum()}/400 found, {false} false, RMS {rms:.2f} pm, "
              f"Cramér–Rao {bound:.2f} pm (advisor, from the counts: {adv.position_precision_rms_pm:.2f} pm)")
        assert false <= 0.01 * len(true)
        assert rms <= 1.5 * bound
        # the share of columns significant at this dose (measured: 2-7 % at 1x, 65-70 % at
        # 2.5x, 85-90 % at 4x, all from 16x)
        assert hit.sum() >= (0.99 if factor >= 16 else 0.8 if factor >= 4 else 0.6 if factor >= 2.5
                             else 0.01) * len(true)
        if factor >= 2.5:
            assert adv.position_precision_rms_pm == pytest.approx(bound, rel=0.35)


def test_demo_dose_false_columns_from_the_emulators_events():
    """At the demo's dose (500 e-/frame, 128², events emulated): at most 1 % false columns
    (the old detection found 457 for 400, 65 matching none, mostly in the vacuum border)."""
    sim, img = mgo_scan(dose=500.0, com=False)
    tr = sim.truth
    step = tr.scan["step_A"]
    res = analyze_columns(img["adf"], min_distance_px=3.5, smooth_px=1.0, step_A=step)
    d, j, false = match(np.c_[res.y_px, res.x_px], true_columns_px(tr), tol=1.0 / step)
    print(f"\nMgO demo dose: {len(res.y_px)} found, {(d < 1 / step).sum()} of 400 matched, {false} false "
          f"({(res.detection == 2).sum()} through the lattice)")
    assert false <= 4 and (d < 1 / step).sum() >= 240


def test_poisson_detection_keeps_vacuum_noise_out():
    """A counts image of pure background (a uniform rate, and an empty vacuum with a few
    stray electrons): no column is significant; one real column among them is found."""
    rng = np.random.default_rng(3)
    for rate in (0.0, 0.02, 0.5, 5.0, 50.0):
        false = 0
        for _ in range(10):
            img = rng.poisson(np.full((96, 96), rate)).astype(float)
            img[rng.integers(0, 96, 6), rng.integers(0, 96, 6)] += 1   # stray electrons
            res = analyze_columns(img, min_distance_px=3.5, smooth_px=1.0)
            assert res.noise_model == "poisson"
            false += len(res.y_px)
        # false_alarms = 0.2 per image by design (measured 0 to 0.1)
        assert false <= 2, (rate, false)
    y, x = np.mgrid[0:96, 0:96]
    lam = 0.5 + 40 * np.exp(-((y - 40.3) ** 2 + (x - 51.7) ** 2) / (2 * 0.8 ** 2))
    res = analyze_columns(rng.poisson(lam).astype(float), min_distance_px=3.5, smooth_px=1.0)
    assert len(res.y_px) == 1 and abs(res.y_px[0] - 40.3) < 0.3 and abs(res.x_px[0] - 51.7) < 0.3
    assert res.p_value[0] < 1e-6


def test_cross_section_noise_predicts_the_scatter_of_known_columns():
    """Poisson images of identical columns: the predicted shot noise of the cross-section and
    the Cramér–Rao bound of the positions equal the scatter over many columns (independent
    draws) within 10 %."""
    img, P, A = lattice_image(shape=(200, 200), a1=(0.0, 10.0), a2=(10.0, 0.0), amp=(30.0, 30.0),
                              bg=2.0, sigma=1.2, jitter=0.2, seed=4)
    res = analyze_columns(img, min_distance_px=5, smooth_px=1.0)
    d, j, false = match(np.c_[res.y_px, res.x_px], P)
    assert false == 0 and len(res.y_px) == len(P)
    scatter = np.std(res.cross_section_shared)
    assert np.median(res.cross_section_sigma) == pytest.approx(scatter, rel=0.1)
    err = np.sqrt((d ** 2).mean())
    assert np.sqrt(np.mean(res.position_crb_px ** 2)) == pytest.approx(err, rel=0.15)
