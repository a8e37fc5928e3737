"""A dense, slow, plain-numpy implementation of the emulator's documented forward model
(docs/EMULATOR.md), written independently of sim_detector's code, used as the oracle of the
truth and sampling tests. Only the *inputs* come from the code under test: the specimen atoms
and grain lattices, and the randomly chosen dead/hot pixels.

Also checks the oracle itself against published numbers.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import ConvexHull

# Constants as documented in docs/EMULATOR.md
MC2 = 510.99895
HC = 12.398419843320026
A0 = 0.529177210903
KAPPA = 3.0e-5
ZEXP = 1.7
PEXP = 0.7
ATOM_SIGMA = 0.25
C_DEFLECT = 0.011
B_DW = 0.5
BRAGG_BLUR = 4.0
REL_THR = 3e-3
S_MAX_T = 5.0
CUT = 6.0
AIRY = 0.5145
FWHM2SIG = 2.0 * np.sqrt(2.0 * np.log(2.0))


def wavelength(E):
    return HC / np.sqrt(E * (E + 2 * MC2))


def gauss2(d2, sigma):
    """Normalised 2D Gaussian, zero beyond CUT sigma."""
    v = np.exp(-d2 / (2 * sigma ** 2)) / (2 * np.pi * sigma ** 2)
    return np.where(d2 <= (CUT * sigma) ** 2, v, 0.0)


def fe(Z, g):
    R = 0.885 * A0 * np.asarray(Z, float) ** (-1 / 3)
    q = 2 * np.pi * np.asarray(g, float)
    return 2 * np.asarray(Z, float) / (A0 * (q ** 2 + R ** -2))


def reflections(grain, t, E, m, shape, r):
    """(offsets (n, 2) [dy, dx] px, K (n,)) by brute force over a generous hkl box."""
    lam = wavelength(E)
    gam = 1 + E / MC2
    A = np.asarray(grain.lattice, float)
    B = np.linalg.inv(A).T
    n = 20
    rng = np.arange(-n, n + 1)
    hkl = np.array(np.meshgrid(rng, rng, rng, indexing="ij")).reshape(3, -1).T
    hkl = hkl[np.any(hkl != 0, axis=1)]
    g = hkl @ B
    k0 = 1 / lam
    kg = np.linalg.norm(g + np.array([0, 0, k0]), axis=1)
    s = (k0 ** 2 - kg ** 2) / (2 * kg)
    ppx = lam * 1e3 / m
    offx, offy = g[:, 0] * ppx, g[:, 1] * ppx
    h, w = shape
    ok = (np.abs(offx) <= w / 2 + r + 4) & (np.abs(offy) <= h / 2 + r + 4) & (np.abs(s) <= S_MAX_T / t)
    hkl, g, s, offx, offy = hkl[ok], g[ok], s[ok], offx[ok], offy[ok]
    gabs = np.linalg.norm(g, axis=1)
    F = np.zeros(len(g), complex)
    for xf, Z in zip(grain.basis_frac, grain.basis_Z):
        F += fe(Z, gabs) * np.exp(2j * np.pi * hkl @ np.asarray(xf, float))
    V = abs(np.linalg.det(A))
    K = (lam * gam * np.abs(F) * t / V) ** 2 * np.sinc(s * t) ** 2 * np.exp(-B_DW * gabs ** 2 / 2)
    keep = K >= REL_THR * K.max()
    # the enumeration box must be large enough: nothing kept may touch its edge
    assert np.abs(hkl[keep]).max() < n
    return np.stack([offy[keep], offx[keep]], 1), K[keep]


def thickness(xy, rho):
    rb = 0.5 * rho ** (-1 / 3)
    hull = ConvexHull(xy)
    return len(xy) / (rho * (hull.volume + hull.area * rb + np.pi * rb ** 2))


def disk_mask(cx, cy, r, h, w):
    """(mask on the detector (h, w), number of pixels of the disk's full pixel set)."""
    xs = np.arange(int(np.floor(cx - r)) - 2, int(np.ceil(cx + r)) + 3, dtype=float)
    ys = np.arange(int(np.floor(cy - r)) - 2, int(np.ceil(cy + r)) + 3, dtype=float)
    dx = xs[None, :] - cx
    dy = ys[:, None] - cy
    inside = dx * dx + dy * dy <= r * r
    n_all = int(inside.sum())
    X = np.arange(w, dtype=float)[None, :] - cx
    Y = np.arange(h, dtype=float)[:, None] - cy
    return X * X + Y * Y <= r * r, n_all


def dense_model(spec, *, energy_keV, convergence_mrad, dose, mrad_per_px, shape, scan_shape,
                step_A, centre_xy, dead=(), hot=(), hot_rate=0.0, dark_rate=0.0, fwhm=None):
    """Expected frames (ny, nx, h, w) of the documented model, plus per-position parts."""
    h, w = shape
    ny, nx = scan_shape
    ay, ax = (h - 1) / 2, (w - 1) / 2
    lam = wavelength(energy_keV)
    alpha = convergence_mrad
    m = mrad_per_px
    r = alpha / m
    fwhm = AIRY * lam / (alpha * 1e-3) if fwhm is None else fwhm
    sp = fwhm / FWHM2SIG
    sc = np.sqrt(sp ** 2 + ATOM_SIGMA ** 2)
    sb = max(fwhm, BRAGG_BLUR) / FWHM2SIG
    x0 = centre_xy[0] - (nx - 1) / 2 * step_A
    y0 = centre_xy[1] - (ny - 1) / 2 * step_A
    pos, Z, grain = spec.positions, spec.Z.astype(float), spec.grain
    # Z^1.7-weighted mean Z -> screened-Coulomb angle of the diffuse fall-off
    wz = Z ** ZEXP
    zeff = (wz * Z).sum() / wz.sum()
    theta0 = 1e3 * lam / (2 * np.pi * 0.885 * A0 * zeff ** (-1 / 3))
    X = np.arange(w, dtype=float)[None, :] - ax
    Y = np.arange(h, dtype=float)[:, None] - ay
    d2 = X * X + Y * Y
    th2 = d2 * m * m
    q = m * m / (1 + th2 / theta0 ** 2) ** 2 / (np.pi * theta0 ** 2 / (1 + (r * m) ** 2 / theta0 ** 2))
    q[d2 <= r * r] = 0.0
    assert q.sum() < 1.0
    live = np.ones((h, w))
    live.reshape(-1)[np.asarray(dead, int)] = 0.0
    refl = []
    for gi, gr in enumerate(spec.grains):
        sel = grain == gi
        rho = len(gr.basis_Z) / abs(np.linalg.det(gr.lattice))
        t = thickness(pos[sel, :2], rho)
        off, K = reflections(gr, t, energy_keV, m, (h, w), r)
        refl.append((rho, t, off, K))
    frames = np.zeros((ny, nx, h, w))
    parts = {"S": np.zeros((ny, nx)), "dx": np.zeros((ny, nx)), "dy": np.zeros((ny, nx))}
    for row in range(ny):
        for col in range(nx):
            px, py = x0 + col * step_A, y0 + row * step_A
            ddx, ddy = px - pos[:, 0], py - pos[:, 1]
            dd2 = ddx * ddx + ddy * ddy
            S = (KAPPA * Z ** ZEXP * gauss2(dd2, sp)).sum()
            e = Z ** PEXP * gauss2(dd2, sc) / sc ** 2
            gx, gy = -(e * ddx).sum(), -(e * ddy).sum()
            dxp, dyp = C_DEFLECT * gx / m, C_DEFLECT * gy / m
            taus = []
            for gi, (rho, t, off, K) in enumerate(refl):
                Tg = gauss2(dd2[grain == gi], sb).sum() / rho
                taus.append(K.sum() * Tg / t)
            tau = float(np.sum(taus)) if taus else 0.0
            cxp, cyp = ax + dxp, ay + dyp
            f = np.zeros((h, w))
            lu = dose * np.exp(-S) * np.exp(-tau)
            mk, n = disk_mask(cxp, cyp, r, h, w)
            f += lu * mk / n
            for gi, (rho, t, off, K) in enumerate(refl):
                if tau == 0:
                    continue
                lb = dose * np.exp(-S) * -np.expm1(-tau) * taus[gi] / tau
                for (oy, ox), k in zip(off, K):
                    mk, n = disk_mask(cxp + ox, cyp + oy, r, h, w)
                    f += lb * (k / K.sum()) * mk / n
            f += dose * -np.expm1(-S) * q
            f *= live
            f += dark_rate / (h * w) * live
            f.reshape(-1)[np.asarray(hot, int)] += hot_rate
            frames[row, col] = f
            parts["S"][row, col] = S
            parts["dx"][row, col] = dxp
            parts["dy"][row, col] = dyp
    return frames, parts


def signals(frames, shape, bf_r, adf_in, adf_out):
    h, w = shape
    ay, ax = (h - 1) / 2, (w - 1) / 2
    X = np.arange(w, dtype=float)[None, :] - ax
    Y = np.arange(h, dtype=float)[:, None] - ay
    d2 = X * X + Y * Y
    bf = d2 <= bf_r * bf_r
    adf = (d2 >= adf_in * adf_in) & (d2 <= adf_out * adf_out)
    tot = frames.sum((-2, -1))
    return {"total": tot, "bf": (frames * bf).sum((-2, -1)), "adf": (frames * adf).sum((-2, -1)),
            "com_y": (frames * Y).sum((-2, -1)) / tot, "com_x": (frames * X).sum((-2, -1)) / tot}


# ------------------------------------------------------------ the oracle's own checks

def test_wavelength_published():
    # 300 kV: 1.9687 pm; 200 kV: 2.5079 pm; 100 kV: 3.7014 pm (standard tables)
    assert wavelength(300.0) == pytest.approx(0.019687, abs=2e-6)
    assert wavelength(200.0) == pytest.approx(0.025079, abs=2e-6)
    assert wavelength(100.0) == pytest.approx(0.037014, abs=2e-6)


def test_diffuse_normalisation_integrates_to_one():
    # the analytic normalisation of 1/(1+(θ/θ0)²)² outside α: numerical integral = 1
    th0, alpha = 15.0, 20.0
    th = np.linspace(alpha, 2e5, 4_000_001)
    f = 2 * np.pi * th / (1 + (th / th0) ** 2) ** 2
    integral = np.trapezoid(f, th)
    assert integral / (np.pi * th0 ** 2 / (1 + alpha ** 2 / th0 ** 2)) == pytest.approx(1.0, rel=1e-5)
