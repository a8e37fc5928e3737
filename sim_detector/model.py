"""The forward model: physics of one probe position, as a discrete distribution over pixels.

Every probe position p has an expected frame that is a weighted sum of a few *components*,
each a normalised discrete distribution over detector pixels (mass that falls outside the
detector is lost):

- unscattered: uniform over the pixels whose centres lie within r_BF of the disk centre
  c(p) = optical axis + δ(p);
- Bragg, per crystalline grain and reflection h: uniform over the pixels within r_BF of
  c(p) + d_h, with fixed relative weights per grain (kinematic intensities);
- diffuse: a fixed distribution q(pixel) ∝ 1/(1 + (θ/θ0)²)² outside r_BF around the axis,
  normalised by its analytic integral over the plane.

Weights per position (dose D electrons per frame, S the probe-weighted Σ κ Z^1.7, τ_g the
Bragg optical depth of grain g):
  diffuse D (1 - e^-S); Bragg of grain g D e^-S (1 - e^-τ) τ_g / τ; unscattered D e^-S e^-τ.
See docs/EMULATOR.md for every formula and constant. Units: Å, mrad, keV, px.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

# ---------------------------------------------------------------- constants
M_E_C2_KEV = 510.99895          # electron rest energy
HC_KEV_A = 12.398419843320026   # h c
BOHR_A = 0.529177210903         # Bohr radius a0

# Calibrated constants of the model (why: docs/EMULATOR.md, "Constants").
KAPPA_A2 = 3.0e-5               # diffuse cross-section per atom = KAPPA_A2 · Z^1.7 (Å²)
Z_EXPONENT = 1.7                # Z-contrast exponent of the diffuse (ADF) scattering
POTENTIAL_Z_EXPONENT = 0.7      # projected-potential weight of an atom ∝ Z^0.7
ATOM_SIGMA_A = 0.25             # Gaussian width of one atom's projected potential
DEFLECTION_MRAD_A3 = 0.011      # deflection (mrad) per unit ∇(probe * potential) (Å⁻³)
DEBYE_WALLER_B_A2 = 0.5         # isotropic B of every atom (Bragg intensities)
BRAGG_BLUR_FWHM_A = 4.0         # minimum FWHM of the "grain under the probe" kernel
REFLECTION_REL_THRESHOLD = 3e-3  # keep reflections with K_h >= this · max K_h of the grain
EXCITATION_ERROR_MAX_T = 5.0    # reflections with |s| > 5 / t are not modelled (sinc² < 0.4 %)
GAUSS_CUTOFF_SIGMA = 6.0        # every Gaussian kernel is exactly zero beyond 6 σ
GRAIN_MAP_MIN_A = 1.0           # grain map: -1 where no grain is thicker than this under the probe
AIRY_FWHM_FACTOR = 0.5145       # FWHM of the aberration-free Airy probe = 0.5145 λ / α

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


def wavelength_A(energy_keV: float) -> float:
    """Relativistic electron wavelength (Å): λ = hc / sqrt(E (E + 2 m c²))."""
    return HC_KEV_A / math.sqrt(energy_keV * (energy_keV + 2.0 * M_E_C2_KEV))


def gamma(energy_keV: float) -> float:
    """Relativistic mass factor γ = 1 + E / m c²."""
    return 1.0 + energy_keV / M_E_C2_KEV


def diffraction_limited_fwhm_A(energy_keV: float, convergence_mrad: float) -> float:
    """FWHM (Å) of the aberration-free probe intensity (Airy disk): 0.5145 λ / α."""
    return AIRY_FWHM_FACTOR * wavelength_A(energy_keV) / (convergence_mrad * 1e-3)


def screening_radius_A(Z) -> np.ndarray:
    """Thomas-Fermi screening radius R = 0.885 a0 Z^(-1/3) (Å)."""
    return 0.885 * BOHR_A * np.asarray(Z, dtype=np.float64) ** (-1.0 / 3.0)


def electron_scattering_factor_A(Z, g_inv_A) -> np.ndarray:
    """First-Born electron scattering factor (Å, non-relativistic) of a screened-Coulomb
    (Wentzel/Yukawa) atom: f(g) = 2 Z / (a0 (q² + R⁻²)), q = 2π g, g = |g| in Å⁻¹."""
    Z = np.asarray(Z, dtype=np.float64)
    q = 2.0 * np.pi * np.asarray(g_inv_A, dtype=np.float64)
    R = screening_radius_A(Z)
    return 2.0 * Z / (BOHR_A * (q * q + 1.0 / (R * R)))


def diffuse_theta0_mrad(Z: np.ndarray, energy_keV: float) -> float:
    """Characteristic angle θ0 = λ / (2π R(Z_eff)) of the diffuse fall-off, with Z_eff the
    Z^1.7-weighted mean atomic number (the atoms that dominate the diffuse signal)."""
    Z = np.asarray(Z, dtype=np.float64)
    w = Z ** Z_EXPONENT
    z_eff = float((w * Z).sum() / w.sum()) if len(Z) else 6.0
    return 1e3 * wavelength_A(energy_keV) / (2.0 * np.pi * float(screening_radius_A(z_eff)))


# ---------------------------------------------------------------- Bragg reflections

def _candidate_reflections(A, gx_max, gy_max, s_max, lam):
    """All hkl != 0 with |g_x| <= gx_max, |g_y| <= gy_max and |g_z| small enough that the
    excitation error can be within s_max. Enumerates two indices on a grid and, for each,
    only the few values of the third index (the one whose reciprocal vector is steepest in
    z) that keep g_z in range: O(in-plane reflections), not O(volume)."""
    B = np.linalg.inv(A).T
    gz_max = s_max + lam * (gx_max ** 2 + gy_max ** 2) / 2.0 + 1e-9
    i3 = int(np.argmax(np.abs(B[:, 2])))
    i1, i2 = [i for i in range(3) if i != i3]
    gmax = math.sqrt(gx_max ** 2 + gy_max ** 2 + gz_max ** 2)
    n1 = int(math.ceil(gmax * np.linalg.norm(A[i1])))
    n2 = int(math.ceil(gmax * np.linalg.norm(A[i2])))
    a1, a2 = np.meshgrid(np.arange(-n1, n1 + 1), np.arange(-n2, n2 + 1), indexing="ij")
    a1, a2 = a1.ravel(), a2.ravel()
    b3z = B[i3, 2]
    z0 = a1 * B[i1, 2] + a2 * B[i2, 2]
    L = int(math.ceil(gz_max / abs(b3z))) + 1
    n3c = np.round(-z0 / b3z).astype(np.int64)
    off = np.arange(-L, L + 1)
    a3 = (n3c[:, None] + off[None, :]).ravel()
    a1 = np.repeat(a1, len(off))
    a2 = np.repeat(a2, len(off))
    hkl = np.zeros((len(a1), 3), np.int64)
    hkl[:, i1], hkl[:, i2], hkl[:, i3] = a1, a2, a3
    g = hkl @ B
    keep = (np.abs(g[:, 0]) <= gx_max) & (np.abs(g[:, 1]) <= gy_max) & \
        (np.abs(g[:, 2]) <= gz_max) & np.any(hkl != 0, axis=1)
    return hkl[keep], g[keep]


@dataclass
class Reflections:
    """Kinematic reflections of one grain.

    hkl: (n, 3) int Miller indices (conventional cell).
    g: (n, 3) Å⁻¹ reciprocal-lattice vectors in the specimen frame.
    offset_px: (n, 2) disk-centre offset (dy, dx) from the direct-beam centre, px.
    K: (n,) kinematic fraction of incident electrons in each reflection at thickness t.
    thickness_A: the grain's mean thickness t along the beam.
    """

    hkl: np.ndarray
    g: np.ndarray
    offset_px: np.ndarray
    K: np.ndarray
    thickness_A: float

    @property
    def total(self) -> float:
        return float(self.K.sum())


def grain_thickness_A(xy: np.ndarray, density_per_A3: float) -> float:
    """Mean thickness of a grain along the beam: N / (ρ A), with A the area of the convex
    hull of the projected atoms grown by half the mean interatomic distance (Steiner)."""
    from scipy.spatial import ConvexHull

    n = len(xy)
    rb = 0.5 * density_per_A3 ** (-1.0 / 3.0)
    try:
        hull = ConvexHull(xy)
        area = hull.volume + hull.area * rb + np.pi * rb * rb  # 2D: volume=area, area=perimeter
    except Exception:  # fewer than 3 non-collinear columns
        area = np.pi * rb * rb * max(n, 1)
    return float(n / (density_per_A3 * area))


def grain_reflections(grain, thickness_A: float, energy_keV: float, mrad_per_px: float,
                      frame_shape, r_bf_px: float) -> Reflections:
    """Kinematic reflections of ``grain`` whose disks can reach the detector.

    K_h = (λ γ |F_h| t / V_c)² sinc²(s_h t) exp(-B |g|² / 2), with F_h = Σ_j f_j(|g|)
    exp(2πi h·x_j), s_h the excitation error for a beam along +z, V_c the cell volume.
    A reflection is kept when its undeflected disk centre is within (h/2 + r_BF + 4,
    w/2 + r_BF + 4) px of the axis, |s_h| <= EXCITATION_ERROR_MAX_T / t, and
    K_h >= REFLECTION_REL_THRESHOLD · max K. Returned strongest first.
    """
    lam = wavelength_A(energy_keV)
    gam = gamma(energy_keV)
    h, w = frame_shape
    lim_y = h / 2 + r_bf_px + 4.0
    lim_x = w / 2 + r_bf_px + 4.0
    px_per_inv_A = lam * 1e3 / mrad_per_px   # disk offset (px) per Å⁻¹ of g
    t = max(float(thickness_A), 1e-3)
    s_max = EXCITATION_ERROR_MAX_T / t
    hkl, g = _candidate_reflections(np.asarray(grain.lattice, float),
                                    lim_x / px_per_inv_A, lim_y / px_per_inv_A, s_max, lam)
    off_x = g[:, 0] * px_per_inv_A
    off_y = g[:, 1] * px_per_inv_A
    k0 = 1.0 / lam
    kg = np.sqrt(g[:, 0] ** 2 + g[:, 1] ** 2 + (k0 + g[:, 2]) ** 2)
    s = (k0 * k0 - kg * kg) / (2.0 * kg)
    keep = (np.abs(off_x) <= lim_x) & (np.abs(off_y) <= lim_y) & (np.abs(s) <= s_max)
    hkl, g, off_x, off_y, s = hkl[keep], g[keep], off_x[keep], off_y[keep], s[keep]
    A = np.asarray(grain.lattice, float)
    gabs = np.linalg.norm(g, axis=1)
    phase = np.exp(2j * np.pi * (hkl @ np.asarray(grain.basis_frac, float).T))   # (n, M)
    f = electron_scattering_factor_A(np.asarray(grain.basis_Z)[None, :], gabs[:, None])
    F = (f * phase).sum(1)
    V = abs(np.linalg.det(A))
    K = (lam * gam * np.abs(F) * t / V) ** 2 * np.sinc(s * t) ** 2 \
        * np.exp(-DEBYE_WALLER_B_A2 * gabs ** 2 / 2.0)
    if len(K) and K.max() > 0:
        sel = K >= REFLECTION_REL_THRESHOLD * K.max()
    else:
        sel = np.zeros(len(K), bool)
    order = np.argsort(-K[sel], kind="stable")
    return Reflections(hkl[sel][order], g[sel][order],
                       np.stack([off_y[sel][order], off_x[sel][order]], 1), K[sel][order], t)


# ---------------------------------------------------------------- diffuse distribution

def diffuse_distribution(frame_shape, axis, r_bf_px: float, mrad_per_px: float,
                         theta0_mrad: float) -> np.ndarray:
    """(h, w) float64 probability that a diffusely scattered electron lands in each pixel.

    q(pixel) = m² / (1 + (θ/θ0)²)² / Z for d² > r_BF² (d: distance of the pixel centre from
    the axis in px, θ = d·m, m = mrad/px) and 0 inside, with the analytic normalisation
    Z = ∫_{θ>α} 2πθ dθ / (1 + (θ/θ0)²)² = π θ0² / (1 + α²/θ0²), α = r_BF·m. The sum over the
    detector is below 1: the rest falls off the detector and is lost. (If a huge detector
    made the sum exceed 1, q is divided by it.)
    """
    h, w = frame_shape
    ay, ax = axis
    m = float(mrad_per_px)
    yy = (np.arange(h, dtype=np.float64) - ay)[:, None]
    xx = (np.arange(w, dtype=np.float64) - ax)[None, :]
    d2 = xx * xx + yy * yy
    theta2 = d2 * (m * m)
    alpha = r_bf_px * m
    norm = np.pi * theta0_mrad ** 2 / (1.0 + alpha ** 2 / theta0_mrad ** 2)
    q = (m * m) / (1.0 + theta2 / theta0_mrad ** 2) ** 2 / norm
    q[d2 <= r_bf_px * r_bf_px] = 0.0
    total = q.sum()
    if total > 1.0:
        q /= total
    return q


# ---------------------------------------------------------------- probe-weighted maps

@njit(cache=True, parallel=True, nogil=True)
def _maps_kernel(ax, ay, wS, wP, grain, rho, ny, nx, x0, y0, step,
                 sig_p, sig_c, sig_b, n_grains):
    """Probe-weighted maps on the scan grid; atoms sorted by y (ay ascending)."""
    S = np.zeros((ny, nx))
    gx = np.zeros((ny, nx))
    gy = np.zeros((ny, nx))
    T = np.zeros((max(n_grains, 1), ny, nx))
    cut = GAUSS_CUTOFF_SIGMA
    rp2, rc2, rb2 = (cut * sig_p) ** 2, (cut * sig_c) ** 2, (cut * sig_b) ** 2
    rmax = cut * max(sig_p, sig_c, sig_b)
    np_ = 1.0 / (2.0 * np.pi * sig_p * sig_p)
    nc_ = 1.0 / (2.0 * np.pi * sig_c * sig_c)
    nb_ = 1.0 / (2.0 * np.pi * sig_b * sig_b)
    for row in prange(ny):
        yp = y0 + row * step
        i0 = np.searchsorted(ay, yp - rmax)
        i1 = np.searchsorted(ay, yp + rmax, side="right")
        for i in range(i0, i1):
            dy = yp - ay[i]
            c_lo = int(math.ceil((ax[i] - rmax - x0) / step))
            c_hi = int(math.floor((ax[i] + rmax - x0) / step))
            if c_lo < 0:
                c_lo = 0
            if c_hi > nx - 1:
                c_hi = nx - 1
            g = grain[i]
            for col in range(c_lo, c_hi + 1):
                dx = (x0 + col * step) - ax[i]
                d2 = dx * dx + dy * dy
                if d2 <= rp2:
                    S[row, col] += wS[i] * np_ * math.exp(-d2 / (2.0 * sig_p * sig_p))
                if d2 <= rc2:
                    e = wP[i] * nc_ * math.exp(-d2 / (2.0 * sig_c * sig_c)) / (sig_c * sig_c)
                    gx[row, col] -= e * dx
                    gy[row, col] -= e * dy
                if g >= 0 and d2 <= rb2:
                    T[g, row, col] += nb_ * math.exp(-d2 / (2.0 * sig_b * sig_b)) / rho[g]
    return S, gx, gy, T


def probe_maps(positions, Z, grain, densities, scan_shape, origin_xy, step_A,
               probe_fwhm_A: float):
    """Probe-weighted quantities on the scan grid.

    Scan pixel (row, col) sits at (x, y) = origin_xy + (col, row)·step_A (Å).
    Returns a dict of (ny, nx) float64 arrays (T: (n_grains, ny, nx)):
      S: Σ_i κ Z_i^1.7 N(r_p - r_i; σ_p), the diffuse optical depth (N: normalised Gaussian);
      grad_x, grad_y: ∇_p Σ_i Z_i^0.7 N(r_p - r_i; σ_c), σ_c² = σ_p² + σ_atom² (Å⁻³);
      T: per grain Σ_{i∈g} N(r_p - r_i; σ_b) / ρ_g, the probe-averaged thickness (Å),
         σ_b from FWHM max(probe, BRAGG_BLUR_FWHM_A).
    All Gaussians are cut to zero beyond GAUSS_CUTOFF_SIGMA σ.
    """
    pos = np.asarray(positions, float)
    order = np.argsort(pos[:, 1], kind="stable")
    pos = pos[order]
    Zs = np.asarray(Z, float)[order]
    gr = np.asarray(grain, np.int64)[order]
    sig_p = probe_fwhm_A / FWHM_PER_SIGMA
    sig_c = math.sqrt(sig_p ** 2 + ATOM_SIGMA_A ** 2)
    sig_b = max(probe_fwhm_A, BRAGG_BLUR_FWHM_A) / FWHM_PER_SIGMA
    ny, nx = scan_shape
    rho = np.asarray(densities, float) if len(densities) else np.ones(1)
    S, gx, gy, T = _maps_kernel(np.ascontiguousarray(pos[:, 0]), np.ascontiguousarray(pos[:, 1]),
                                KAPPA_A2 * Zs ** Z_EXPONENT, Zs ** POTENTIAL_Z_EXPONENT, gr, rho,
                                int(ny), int(nx), float(origin_xy[0]), float(origin_xy[1]),
                                float(step_A), sig_p, sig_c, sig_b, len(densities))
    return {"S": S, "grad_x": gx, "grad_y": gy, "T": T[:len(densities)],
            "sigma_probe_A": sig_p, "sigma_potential_A": sig_c, "sigma_bragg_A": sig_b}


def component_weights(S, tau, dose):
    """Mean electrons per frame in each component.

    S: (P,) diffuse optical depth; tau: (G, P) Bragg optical depth per grain; dose: mean
    incident electrons per frame. Returns (unscattered (P,), diffuse (P,), bragg (G, P)).
    """
    S = np.asarray(S, float)
    tau = np.asarray(tau, float).reshape(-1, len(S))
    ttot = tau.sum(0)
    unsc = dose * np.exp(-S) * np.exp(-ttot)
    diff = dose * -np.expm1(-S)
    frac = np.divide(tau, ttot, out=np.zeros_like(tau), where=ttot > 0)
    bragg = dose * np.exp(-S) * -np.expm1(-ttot) * frac
    return unsc, diff, bragg
