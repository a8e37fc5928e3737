"""Physics of the forward model: known answers, Z contrast with atom counts, CoM direction."""

import numpy as np
import pytest
from scipy.special import j1

from sim_detector import model
from sim_detector.simulate import Beam, Detector, ScanSpec, simulate_scan
from sim_detector.specimens import Grain, Specimen, make_specimen

A_MGO = 4.212


def test_wavelength_and_gamma_known_values():
    assert model.wavelength_A(300.0) == pytest.approx(0.019687, abs=2e-6)
    assert model.wavelength_A(80.0) == pytest.approx(0.041757, abs=2e-6)
    assert model.gamma(300.0) == pytest.approx(1.587, abs=1e-3)


def test_diffraction_limited_fwhm_is_the_airy_fwhm():
    # numerical FWHM of the Airy intensity [2 J1(v)/v]², v = 2π α r / λ
    lam, alpha = model.wavelength_A(300.0), 0.020
    r = np.linspace(1e-6, 1.0, 2_000_001)
    v = 2 * np.pi * alpha * r / lam
    inten = (2 * j1(v) / v) ** 2
    half = r[np.argmin(np.abs(inten[: np.argmax(inten < 0.1)] - 0.5))]
    assert model.diffraction_limited_fwhm_A(300.0, 20.0) == pytest.approx(2 * half, rel=1e-3)


def test_scattering_factor_limits():
    # screened Coulomb: f(0) = 2 Z R² / a0; Rutherford tail f -> 2Z / (a0 q²)
    Z, R = 29, 0.885 * 0.529177210903 * 29 ** (-1 / 3)
    assert model.electron_scattering_factor_A(Z, 0.0) == pytest.approx(2 * Z * R ** 2 / 0.529177210903)
    g = 50.0
    assert model.electron_scattering_factor_A(Z, g) == pytest.approx(
        2 * Z / (0.529177210903 * (2 * np.pi * g) ** 2), rel=1e-3)


def _mgo_grain():
    fcc = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    return Grain("MgO", np.eye(3) * A_MGO, np.vstack([fcc, fcc + [0.5, 0, 0]]),
                 np.array([12] * 4 + [8] * 4))


def test_mgo_001_reflections_positions_and_extinctions():
    m, E = 0.5, 300.0
    rf = model.grain_reflections(_mgo_grain(), 20.0, E, m, (576, 576), 40.0)
    lam = model.wavelength_A(E)
    # rocksalt: h, k, l all even or all odd
    par = rf.hkl % 2
    assert np.all((par == par[:, :1]).all(1))
    # disk offsets: θ = λ g, in px
    np.testing.assert_allclose(rf.offset_px[:, 1], lam * rf.hkl[:, 0] / A_MGO * 1e3 / m, rtol=1e-12)
    np.testing.assert_allclose(rf.offset_px[:, 0], lam * rf.hkl[:, 1] / A_MGO * 1e3 / m, rtol=1e-12)
    # the four {200} are the strongest, equal, and follow the kinematic formula
    top = {tuple(h) for h in rf.hkl[:4]}
    assert top == {(2, 0, 0), (-2, 0, 0), (0, 2, 0), (0, -2, 0)}
    np.testing.assert_allclose(rf.K[:4], rf.K[0], rtol=1e-12)
    g = 2 / A_MGO
    # excitation error of 200 at [001]: s = (k0² - |k0 + g|²) / (2 |k0 + g|)
    s = (1 / lam ** 2 - (1 / lam ** 2 + g ** 2)) / (2 * np.sqrt(1 / lam ** 2 + g ** 2))
    F = 4 * (model.electron_scattering_factor_A(12, g) + model.electron_scattering_factor_A(8, g))
    K = (lam * model.gamma(E) * F * 20.0 / A_MGO ** 3) ** 2 * np.sinc(s * 20.0) ** 2 \
        * np.exp(-0.5 * g ** 2 / 2)
    assert rf.K[0] == pytest.approx(K, rel=1e-12)
    # the 111 reflections are in the first-order Laue zone: far from the Ewald sphere at 20 Å
    assert not any(abs(h[2]) == 1 for h in rf.hkl[:20])


def test_fcc_extinctions_pt():
    fcc = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    g = Grain("Pt", np.eye(3) * 3.924, fcc, np.array([78] * 4))
    rf = model.grain_reflections(g, 30.0, 300.0, 0.5, (576, 576), 40.0)
    par = rf.hkl % 2
    assert np.all((par == par[:, :1]).all(1))  # no mixed-parity (forbidden) reflections
    assert len(rf.K) > 8


def test_diffuse_distribution_matches_analytic_radial_integral():
    th0, m, r_bf = 15.0, 0.5, 40.0
    q = model.diffuse_distribution((1200, 1200), (599.5, 599.5), r_bf, m, th0)
    d = np.hypot(*np.meshgrid(np.arange(1200) - 599.5, np.arange(1200) - 599.5))
    alpha = r_bf * m
    for R in (80.0, 200.0, 500.0):
        inside = q[d <= R].sum()
        analytic = 1 - (1 + alpha ** 2 / th0 ** 2) / (1 + (R * m) ** 2 / th0 ** 2)
        assert inside == pytest.approx(analytic, rel=5e-3)
    assert q[d <= r_bf].sum() == 0.0 and q.sum() < 1.0


def test_component_weights_add_up_to_dose():
    S = np.array([0.0, 0.1, 2.0])
    tau = np.array([[0.0, 0.05, 0.3], [0.0, 0.0, 0.1]])
    u, d, b = model.component_weights(S, tau, 150.0)
    np.testing.assert_allclose(u + d + b.sum(0), 150.0, rtol=1e-14)
    assert u[0] == 150.0 and d[0] == 0.0 and np.all(b[:, 0] == 0)
    assert b[0, 2] / b[1, 2] == pytest.approx(3.0)


def test_adf_grows_with_column_atom_count_mgo():
    spec = make_specimen("mgo", seed=0)  # [001], 3..12 atoms per column
    a2 = A_MGO / 2
    # centre a 37 x 37 grid of step a/4 on the column nearest the slab centre: every
    # column of the field sits exactly on a scan pixel
    c = spec.positions[np.argmin(((spec.positions[:, :2] - spec.centre[:2]) ** 2).sum(1)), :2]
    sim = simulate_scan(spec, Beam(dose=200.0), Detector(shape=(576, 576), mrad_per_px=0.5),
                        ScanSpec(shape=(37, 37), step_A=a2 / 2, centre_A=(c[0], c[1])))
    tr = sim.truth
    cols = tr.columns
    adf = tr.expected["adf"]
    r, k = np.round(cols["row_px"]), np.round(cols["col_px"])
    on = (np.abs(cols["row_px"] - r) < 1e-6) & (np.abs(cols["col_px"] - k) < 1e-6) & \
        (r >= 0) & (r < 37) & (k >= 0) & (k < 37)
    assert on.sum() > 250
    zi = list(tr.columns["species_Z"])
    n_mg = cols["species_counts"][on, zi.index(12)]
    n_o = cols["species_counts"][on, zi.index(8)]
    val = adf[r[on].astype(int), k[on].astype(int)]
    count = cols["count"][on]
    assert len(np.unique(count)) >= 5
    # species groups along [001]: Mg-rich (one more Mg), equal, O-rich columns
    for name, sel in (("Mg-rich", n_mg > n_o), ("equal", n_mg == n_o), ("O-rich", n_mg < n_o)):
        ns = np.unique(count[sel])
        means = [val[sel & (count == n)].mean() for n in ns]
        assert np.all(np.diff(means) > 0), (name, ns, means)
    # and across all columns, the mean ADF per count increases
    ns = np.unique(count)
    means = np.array([val[count == n].mean() for n in ns])
    assert np.all(np.diff(means) > 0), (ns, means)
    # one more atom adds signal of the order of one atom's diffuse scattering
    step = np.diff(means).min()
    assert step > 0.05


def _single_column(Z=78, n=8):
    pos = np.array([[0.0, 0.0, 2.0 * i] for i in range(n)])
    return Specimen("column", pos, np.full(n, Z), np.full(n, -1), [])


@pytest.mark.parametrize("spec_name", ["pt-column", "mgo"])
def test_centre_of_mass_deflects_towards_columns(spec_name):
    if spec_name == "mgo":
        spec = make_specimen("mgo", cells=4, thickness=(10, 12), seed=3)
        col = spec.positions[np.argmin(((spec.positions[:, :2] - spec.centre[:2]) ** 2).sum(1)), :2]
    else:
        spec = _single_column()
        col = np.zeros(2)
    off = 0.3  # Å
    # 3 x 3 scan with step 0.3 Å centred on the column: (1, 2) is right of it, (2, 1) below
    fpp = 400
    sim = simulate_scan(spec, Beam(dose=200.0), Detector(shape=(160, 160), mrad_per_px=0.5),
                        ScanSpec(shape=(3, 3), step_A=off, centre_A=(col[0], col[1]),
                                 frames_per_position=fpp), seed=11)
    h, w = sim.frame_shape
    ay, ax = (h - 1) / 2, (w - 1) / 2
    off_ = sim.offsets
    com = {}
    for rc in [(1, 1), (1, 2), (1, 0), (2, 1), (0, 1)]:
        f0 = sim.frame_index(*rc)
        ev = sim.indices[off_[f0]:off_[f0 + fpp]].astype(np.int64)
        y, x = np.divmod(ev, w)
        se = np.array([np.std(y), np.std(x)]) / np.sqrt(len(ev))
        com[rc] = (np.array([y.mean() - ay, x.mean() - ax]), se)
    (cy, cx), se = com[(1, 2)]
    assert cx < -8 * se[1]          # probe right of the column -> beam pulled to -x
    assert abs(cy) < 5 * se[0] + 0.05
    (cy, cx), se = com[(2, 1)]
    assert cy < -8 * se[0]          # probe below (+y) -> pulled to -y
    (cy, cx), se = com[(1, 0)]
    assert cx > 8 * se[1]           # left -> +x
    (cy, cx), se = com[(0, 1)]
    assert cy > 8 * se[0]           # above -> +y
    (cy, cx), se = com[(1, 1)]      # on the column: no net shift
    assert abs(cx) < 5 * se[1] + 0.05 and abs(cy) < 5 * se[0] + 0.05
