"""Sampled events: Poisson statistics, per-pixel distribution, reproducibility, raster order."""

import math

import numpy as np
import pytest
from scipy import stats

from sim_detector import sampling
from sim_detector.simulate import Beam, Detector, ScanSpec, prepare_scan, simulate_scan
from sim_detector.specimens import Specimen, make_specimen

from test_sim_reference import dense_model


def _draw_poisson(lam, n, seed=1):
    from numba import njit

    @njit
    def run(lam, n, seed):
        out = np.empty(n, np.int64)
        st = sampling.stream_state(seed, 0, 0)
        for i in range(n):
            out[i], st = sampling.poisson(lam, st)
        return out

    return run(lam, n, seed)


@pytest.mark.parametrize("lam", [0.3, 4.0, 9.99, 10.0, 37.5, 800.0])
def test_poisson_sampler_matches_pmf(lam):
    n = 200_000
    k = _draw_poisson(lam, n)
    assert abs(k.mean() - lam) < 5 * math.sqrt(lam / n)
    assert abs(k.var() / lam - 1) < 5 * math.sqrt((2 + 1 / lam) / n)  # sd of s²/λ
    # chi-square against the exact pmf over bins with >= 20 expected
    ks = np.arange(k.max() + 1)
    exp = stats.poisson.pmf(ks, lam) * n
    obs = np.bincount(k, minlength=len(ks))
    big = exp >= 20
    o = np.r_[obs[big], obs[~big].sum()]
    e = np.r_[exp[big], n - exp[big].sum()]
    chi2 = ((o - e) ** 2 / e).sum()
    assert stats.chi2.sf(chi2, len(o) - 1) > 1e-4


def test_alias_tables_draw_their_distribution():
    from numba import njit

    @njit
    def draw(prob, alias, n):
        st = sampling.stream_state(5, 1, 1)
        out = np.zeros(len(prob), np.int64)
        for _ in range(n):
            i, st = sampling._alias_draw(prob, alias, 0, len(prob), st)
            out[i] += 1
        return out

    rng = np.random.default_rng(0)
    cases = [rng.random(37) ** 3, np.r_[rng.random(10), 0.0, 0.0, rng.random(5)],
             np.r_[1e4, np.ones(50)]]
    n = 400_000
    for p in cases:
        prob, alias = sampling.alias_table(p)
        obs = draw(prob, alias, n)
        exp = p / p.sum() * n
        assert np.all(obs[exp == 0] == 0)
        ok = exp > 0
        chi2 = ((obs[ok] - exp[ok]) ** 2 / exp[ok]).sum()
        assert stats.chi2.sf(chi2, ok.sum() - 1) > 1e-4


def test_vacuum_frames_are_poisson_with_exactly_the_dose():
    spec = Specimen("far atom", np.array([[500.0, 500.0, 0.0]]), [79], [-1], [])
    dose, n = 123.0, 20_000
    sim = simulate_scan(spec, Beam(dose=dose), Detector(shape=(128, 128), mrad_per_px=0.5),
                        ScanSpec(shape=(1, 1), step_A=1.0, centre_A=(0.0, 0.0),
                                 frames_per_position=n))
    assert sim.truth.expected["total"][0, 0] == pytest.approx(dose, rel=1e-13)  # nothing lost
    c = sim.counts.astype(float)
    assert len(c) == n and c.sum() == len(sim.indices)
    assert abs(c.mean() - dose) < 5 * math.sqrt(dose / n)
    assert abs(c.var(ddof=1) / dose - 1) < 5 * math.sqrt(2 / n)
    # all electrons in the bright-field disk around the axis (r = 40 px)
    y, x = np.divmod(sim.indices.astype(np.int64), 128)
    assert np.all((x - 63.5) ** 2 + (y - 63.5) ** 2 <= 40.0 ** 2)


def test_standardized_residuals_over_a_scan():
    spec = make_specimen("pt-particle", size_A=12.0)
    sim = simulate_scan(spec, Beam(dose=80.0), Detector(shape=(96, 96), mrad_per_px=0.7,
                                                        dark_rate=1.5, dead_pixels=40),
                        ScanSpec(shape=(24, 24), frames_per_position=8), seed=2)
    lam = np.repeat(sim.truth.expected["total"].ravel(), 8)
    assert lam.min() < 79 and lam.max() < 80.0 + 1.5  # losses off the detector and dead pixels
    z = (sim.counts - lam) / np.sqrt(lam)
    n = len(z)
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)


def test_pixel_histogram_matches_expected_frame():
    """Many frames at one probe position against the dense oracle's expected frame."""
    spec = make_specimen("mgo", cells=3, thickness=(8, 12), seed=4)
    col = spec.positions[np.argmin(((spec.positions[:, :2] - spec.centre[:2]) ** 2).sum(1))]
    centre = (col[0] + 0.15, col[1] + 0.1)
    n = 30_000
    beam = Beam(dose=60.0, convergence_mrad=20.0)
    det = Detector(shape=(48, 48), mrad_per_px=2.0, dark_rate=0.5, hot_pixels=4, hot_rate=0.2,
                   dead_pixels=20)
    sim = simulate_scan(spec, beam, det, ScanSpec(shape=(1, 1), step_A=1.0, centre_A=centre,
                                                  frames_per_position=n), seed=9)
    d = sim.truth.detector
    frames, parts = dense_model(spec, energy_keV=300.0, convergence_mrad=20.0, dose=60.0,
                                mrad_per_px=2.0, shape=(48, 48), scan_shape=(1, 1), step_A=1.0,
                                centre_xy=centre, dead=d["dead_pixels"], hot=d["hot_pixels"],
                                hot_rate=0.2, dark_rate=0.5)
    exp = frames[0, 0].ravel() * n
    obs = np.bincount(sim.indices, minlength=48 * 48).astype(float)
    assert np.all(obs[exp == 0] == 0)  # nothing where the model puts nothing (dead pixels)
    assert obs.sum() == pytest.approx(exp.sum(), rel=5 / math.sqrt(exp.sum()))
    big = exp >= 20
    assert big.sum() > 500 and parts["S"][0, 0] > 0.02 and abs(parts["dx"][0, 0]) > 0.1
    o = np.r_[obs[big], obs[~big].sum()]
    e = np.r_[exp[big], exp[~big].sum()]
    chi2 = ((o - e) ** 2 / e).sum()
    dof = len(o)
    assert (chi2 - dof) / math.sqrt(2 * dof) < 5, (chi2, dof)
    assert (chi2 - dof) / math.sqrt(2 * dof) > -5  # not suspiciously perfect either


def test_same_seed_same_events_and_chunking_invariance():
    spec = make_specimen("cluster", n_crystals=2, size_A=(10.0, 12.0), support_thickness_A=3.0)
    args = (spec, Beam(dose=50.0, convergence_mrad=3.0),
            Detector(shape=(64, 64), mrad_per_px=0.3, dark_rate=0.5, hot_pixels=3, dead_pixels=4),
            ScanSpec(shape=(6, 5), frames_per_position=2, flyback=1))
    a = simulate_scan(*args, seed=5)
    b = simulate_scan(*args, seed=5)
    np.testing.assert_array_equal(a.counts, b.counts)
    np.testing.assert_array_equal(a.indices, b.indices)
    c = simulate_scan(*args, seed=6)
    assert not np.array_equal(a.indices[:1000], c.indices[:1000])
    # any split into ranges of frames reproduces the same events
    prep = prepare_scan(*args, seed=5)
    parts = [prep.frames(0, 7), prep.frames(7, 20), prep.frames(27, prep.n_frames - 27)]
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), a.counts)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), a.indices)
    # progress reporting does not change events either
    seen = []
    d = simulate_scan(*args, seed=5, progress=seen.append)
    np.testing.assert_array_equal(d.indices, a.indices)
    assert seen[0] == 0.0 and seen[-1] == 1.0 and seen == sorted(seen)
    assert a.indices.dtype == np.uint32 and a.counts.dtype == np.uint32
    assert a.indices.max() < 64 * 64
    with pytest.raises(ValueError, match="outside the scan"):
        prep.frames(prep.n_frames - 1, 5)


def test_raster_order_flyback_and_frames_per_position():
    # a Pt column at scan position (row, 0) of every row; the rest in vacuum
    pos = np.array([[0.0, 0.0, 2.0 * i] for i in range(10)])
    spec = Specimen("column", pos, np.full(10, 78), np.full(10, -1), [])
    ny, nx, fb, fpp = 3, 4, 2, 300
    # step 6 Å: column k sits at x = -9 + 6k; put the column under col 0 of the middle row
    sim = simulate_scan(spec, Beam(dose=100.0), Detector(shape=(128, 128), mrad_per_px=0.5),
                        ScanSpec(shape=(ny, nx), step_A=6.0, centre_A=(9.0, 0.0),
                                 frames_per_position=fpp, flyback=fb), seed=1,
                        adf_px=(45.0, 64.0))
    assert len(sim.counts) == ny * (nx + fb) * fpp
    adf_exp = sim.truth.expected["adf"]
    assert adf_exp[1, 0] > 5 and adf_exp[1, 1:].max() == 0 and adf_exp[[0, 2]].max() == 0
    h, w = sim.frame_shape
    y, x = np.divmod(sim.indices.astype(np.int64), w)
    d2 = (x - 63.5) ** 2 + (y - 63.5) ** 2
    in_adf = d2 > 45.0 ** 2  # beyond the bright-field disk (r = 40 px)
    frame_of_event = np.repeat(np.arange(len(sim.counts)), sim.counts)
    per_frame = np.bincount(frame_of_event[in_adf], minlength=len(sim.counts))
    per_pos = per_frame.reshape(ny, nx + fb, fpp).sum(-1)
    # the column (row 1, col 0) and the flyback frames of row 1 are the only bright ones
    assert per_pos[1, 0] > 300
    assert np.all(per_pos[1, nx:] > 0.7 * per_pos[1, 0])
    assert per_pos[1, 1:nx].max() == 0 and per_pos[[0, 2]].max() == 0
    assert sim.frame_index(1, 0, 0) == (1 * (nx + fb)) * fpp
