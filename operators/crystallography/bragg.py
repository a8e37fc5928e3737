"""Bragg peaks in one summed diffraction pattern, and their indexing to a cubic lattice.

Pure array code: a pattern (h, w) of counts in, dataclasses of arrays out. Detector axes are
the specimen's: column ↔ +x, row ↔ +y, beam along +z; a disk at (dy, dx) px from the direct
beam is the reflection g with (g_y, g_x) = (dy, dx) · ``inv_A_per_px``.

Examples
--------
>>> import numpy as np
>>> from operators.crystallography.bragg import find_bragg_peaks, direct_beam
>>> yy, xx = np.mgrid[:128, :128]
>>> def disk(cy, cx): return (yy - cy) ** 2 + (xx - cx) ** 2 <= 36
>>> pattern = 50 * disk(64, 64) + 5 * disk(64, 100)      # direct beam, one Bragg disk
>>> beam = direct_beam(pattern)
>>> peaks = find_bragg_peaks(pattern, beam.yx, beam.radius_px)
>>> np.round(peaks.yx, 2).tolist(), np.round(peaks.intensity).tolist()
([[64.0, 100.0]], [565.0])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numba import njit
from scipy import fft as sfft
from scipy import ndimage, optimize

from operators.kernels import NJIT

HC_KEV_A = 12.398419843320026   # h c (keV Å)
M_E_C2_KEV = 510.99895          # electron rest energy (keV)


def electron_wavelength_A(energy_keV: float) -> float:
    """Relativistic electron wavelength λ = hc / sqrt(E (E + 2 m c²)) in Å (E in keV)."""
    e = float(energy_keV)
    if not (e > 0 and math.isfinite(e)):
        raise ValueError(f"beam energy must be a positive number of keV, got {energy_keV!r}")
    return HC_KEV_A / math.sqrt(e * (e + 2.0 * M_E_C2_KEV))


def inv_A_per_px(energy_keV: float, mrad_per_px: float) -> float:
    """Reciprocal-space sampling of the detector, Å⁻¹ per px: mrad_per_px·10⁻³ / λ."""
    m = float(mrad_per_px)
    if not (m > 0 and math.isfinite(m)):
        raise ValueError(f"mrad_per_px must be a positive number, got {mrad_per_px!r}; "
                         f"give the detector calibration")
    return m * 1e-3 / electron_wavelength_A(energy_keV)


# ------------------------------------------------------------------ direct beam

@dataclass
class DirectBeam:
    """Direct (unscattered) disk of a pattern: yx (2,) centre px, radius_px."""

    yx: np.ndarray
    radius_px: float


def _disk(radius):
    k = int(math.ceil(radius))
    yy, xx = np.mgrid[-k:k + 1, -k:k + 1]
    return (yy * yy + xx * xx <= radius * radius).astype(np.float64)


def convolve_same(a, kernel):
    """Convolution of the last two axes of ``a`` with a small odd-sized 2-D ``kernel``,
    zero outside, same shape as ``a`` (FFT; float64)."""
    a = np.asarray(a, np.float64)
    kh, kw = kernel.shape
    h, w = a.shape[-2:]
    shape = (sfft.next_fast_len(h + kh - 1), sfft.next_fast_len(w + kw - 1))
    out = sfft.irfft2(sfft.rfft2(a, shape) * sfft.rfft2(kernel, shape), shape)
    return out[..., kh // 2:kh // 2 + h, kw // 2:kw // 2 + w]


def li_ma_significance(n_on, n_off, alpha):
    """Significance (σ) of an excess of ``n_on`` counts over ``alpha * n_off``, the background
    counted in a region 1/alpha times larger: Li & Ma (1983), eq. 17, signed. Arrays of
    counts (>= 0) in, float64 out."""
    on = np.maximum(np.asarray(n_on, np.float64), 0.0)
    off = np.maximum(np.asarray(n_off, np.float64), 0.0)
    tot = np.maximum(on + off, 1e-300)
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = np.where(on > 0, on * np.log((1 + alpha) / alpha * on / tot), 0.0)
        t2 = np.where(off > 0, off * np.log((1 + alpha) * off / tot), 0.0)
    return np.sign(on - alpha * off) * np.sqrt(np.maximum(2.0 * (t1 + t2), 0.0))


def direct_beam(pattern, center=None, radius_px=None) -> DirectBeam:
    """Centre and radius (px) of the direct disk, the brightest disk of ``pattern`` (h, w).

    A first guess is the connected region above half the maximum of the 3x3-smoothed
    pattern around its brightest pixel. The centre starts at ``center`` (y, x) or that
    region's centroid and is refined as the centroid of the counts within radius + 2 px.
    The radius, unless given, is that of the disk with the same counts and plateau:
    sqrt(N / (π P)), N the counts above the background (a ring beyond the disk) within
    1.5 radius + 3 px, P the mean counts per px within half the radius; for a disk of
    pixels whose centres lie within r of its centre this is sqrt(pixels / π) ≈ r.
    """
    p = np.asarray(pattern, np.float64)
    if p.ndim != 2 or p.sum() <= 0:
        raise ValueError(f"pattern must be a non-empty (h, w) image with counts, got shape "
                         f"{p.shape}")
    sm = ndimage.uniform_filter(p, 3)
    peak = np.unravel_index(np.argmax(sm), sm.shape)
    lab, _ = ndimage.label(sm >= 0.5 * sm[peak])
    region = lab == lab[peak]
    r = float(radius_px) if radius_px is not None else math.sqrt(region.sum() / math.pi)
    if not r > 0:
        raise ValueError(f"disk radius must be > 0 px, got {radius_px!r}")
    if center is None:
        cy, cx = ndimage.center_of_mass(p * region)
    else:
        cy, cx = (float(v) for v in center)
    yy, xx = np.indices(p.shape)
    for it in range(4):
        d2 = (yy - cy) ** 2 + (xx - cx) ** 2
        m = d2 <= (r + 2.0) ** 2
        s = p[m].sum()
        if s <= 0:
            break
        cy, cx = float((p[m] * yy[m]).sum() / s), float((p[m] * xx[m]).sum() / s)
        if radius_px is None and it < 3:
            d2 = (yy - cy) ** 2 + (xx - cx) ** 2
            r1, r2 = 1.5 * r + 3.0, 1.5 * r + 6.0
            inner = d2 <= r1 * r1
            bg = p[(d2 > r1 * r1) & (d2 <= r2 * r2)].mean()
            plateau = p[d2 <= (0.5 * r) ** 2].mean() - bg
            if plateau > 0:
                r = math.sqrt(max((p[inner] - bg).sum(), 0.0) / (math.pi * plateau)) or r
    return DirectBeam(np.array([cy, cx]), r)


# ------------------------------------------------------------------ peaks

@dataclass
class BraggPeaks:
    """Bragg disks of one pattern, strongest first; every field (n,) float64 unless noted.

    yx : (n, 2) sub-pixel centre (y, x) px (background-subtracted centroid).
    sigma_yx : (n, 2) its standard error px (Poisson).
    intensity : integrated counts in the disk minus the local background.
    sigma : standard error of ``intensity`` (Poisson: counts in the disk and background).
    background : background counts per px at the disk centre (plane fitted to the ring).
    significance : σ of the disk counts over the background (Li & Ma 1983).
    """

    yx: np.ndarray
    sigma_yx: np.ndarray
    intensity: np.ndarray
    sigma: np.ndarray
    background: np.ndarray
    significance: np.ndarray

    def __len__(self):
        return len(self.intensity)


def find_bragg_peaks(pattern, center, disk_radius_px, min_significance=5.0, max_peaks=64,
                     aperture_margin_px=2.0, ring_px=(3.0, 12.0)) -> BraggPeaks:
    """Bragg disks of a summed pattern: position, integrated intensity, uncertainties.

    Parameters
    ----------
    pattern : (h, w) counts.
    center : (y, x) px of the direct beam; disks closer than 2 radii + 1 px to it (they
        overlap the direct disk) are not reported.
    disk_radius_px : disk radius px (the convergence semi-angle / mrad_per_px).
    min_significance : keep disks whose counts exceed the background by this many σ
        (Li & Ma 1983: disk counts against the ring's, scaled by the areas).
    max_peaks : at most this many, strongest first.
    aperture_margin_px : the integration aperture is the disk radius + this margin.
    ring_px : background ring (inner, outer) beyond the disk radius, px.

    Returns
    -------
    :class:`BraggPeaks`. Candidates are the local maxima of that significance for a disk
    around every pixel (matched filter). Each is then
    measured: background b = a plane fitted to its ring (excluding other disks and the
    direct beam); centre = the centroid of (counts - b) within the aperture, iterated;
    intensity I = Σ_ap (c - b), σ_I² = Σ_ap c + N_ap² Σ_ring c / N_ring²; centre
    σ² = Σ_ap c (y - ȳ)² / I². Disks cut by the detector edge are skipped.
    """
    p = np.asarray(pattern, np.float64)
    if p.ndim != 2:
        raise ValueError(f"pattern must be (h, w), got shape {p.shape}")
    r = float(disk_radius_px)
    if not r > 0:
        raise ValueError(f"disk_radius_px must be > 0, got {disk_radius_px!r}")
    cy, cx = (float(v) for v in center)
    ra = r + float(aperture_margin_px)
    r_in, r_out = r + float(ring_px[0]), r + float(ring_px[1])
    disk = _disk(ra)
    k = int(math.ceil(r_out))
    yy, xx = np.mgrid[-k:k + 1, -k:k + 1]
    d2 = yy * yy + xx * xx
    ring = ((d2 >= r_in * r_in) & (d2 < r_out * r_out)).astype(np.float64)
    n_ap, n_ring = disk.sum(), ring.sum()
    z = li_ma_significance(convolve_same(p, disk), convolve_same(p, ring), n_ap / n_ring)
    Y, X = np.indices(p.shape)
    z[(Y - cy) ** 2 + (X - cx) ** 2 < (2.0 * r + 1.0) ** 2] = 0.0
    # Candidates a little below the threshold: the measured significance decides.
    cand = (z == ndimage.maximum_filter(z, size=2 * int(r) + 1)) & \
        (z >= 0.7 * min_significance)
    cy_, cx_ = np.nonzero(cand)
    order = np.argsort(-z[cy_, cx_], kind="stable")
    cand_yx = []
    for i in order:  # plateaus give neighbouring maxima: one per disk
        q = np.array([cy_[i], cx_[i]], float)
        if all(np.hypot(*(q - o)) > r for o in cand_yx):
            cand_yx.append(q)
        if len(cand_yx) >= 2 * max_peaks:
            break
    out = [_measure(p, c, ra, r_in, r_out, cand_yx, (cy, cx), r) for c in cand_yx]
    out = [o for o in out if o is not None and o[5] >= min_significance]
    out.sort(key=lambda o: -o[5])
    out = out[:max_peaks]
    cols = list(zip(*out)) if out else [()] * 6
    return BraggPeaks(np.array(cols[0], float).reshape(-1, 2),
                      np.array(cols[1], float).reshape(-1, 2),
                      np.array(cols[2], float), np.array(cols[3], float),
                      np.array(cols[4], float), np.array(cols[5], float))


def _measure(p, c0, ra, r_in, r_out, others, beam_yx, r):
    """Centroid, intensity and uncertainties of one disk (see find_bragg_peaks)."""
    h, w = p.shape
    k = int(math.ceil(r_out)) + 3
    y0, y1 = max(0, int(c0[0]) - k), min(h, int(c0[0]) + k + 1)
    x0, x1 = max(0, int(c0[1]) - k), min(w, int(c0[1]) + k + 1)
    sub = p[y0:y1, x0:x1]
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    # Other disks and the direct beam stay out of the background ring.
    blocked = (yy - beam_yx[0]) ** 2 + (xx - beam_yx[1]) ** 2 <= (r + 2.0) ** 2
    for o in others:
        if o is not c0:
            blocked |= (yy - o[0]) ** 2 + (xx - o[1]) ** 2 <= ra * ra
    cy, cx = float(c0[0]), float(c0[1])
    for _ in range(6):
        if not (ra <= cy <= h - 1 - ra and ra <= cx <= w - 1 - ra):
            return None  # the disk is cut by the detector edge: its centroid would be biased
        if math.hypot(cy - c0[0], cx - c0[1]) > r or \
                math.hypot(cy - beam_yx[0], cx - beam_yx[1]) < 2.0 * r + 1.0:
            return None  # wandered off, or onto the direct beam's edge
        d2 = (yy - cy) ** 2 + (xx - cx) ** 2
        ap = d2 <= ra * ra
        rg = (d2 >= r_in * r_in) & (d2 < r_out * r_out) & ~blocked
        if rg.sum() < 12:
            return None  # crowded: no background
        # The diffuse background slopes across a disk: a plane fitted to the ring, not a
        # constant, or the centroid is pulled towards the brighter side.
        A = np.stack([np.ones(int(rg.sum())), yy[rg] - cy, xx[rg] - cx], 1)
        coef = np.linalg.lstsq(A, sub[rg], rcond=None)[0]
        bg = coef[0] + coef[1] * (yy[ap] - cy) + coef[2] * (xx[ap] - cx)
        wgt = sub[ap] - bg
        tot = wgt.sum()
        if tot <= 0:
            return None
        ny_, nx_ = (wgt * yy[ap]).sum() / tot, (wgt * xx[ap]).sum() / tot
        moved = math.hypot(ny_ - cy, nx_ - cx)
        cy, cx = ny_, nx_
        if moved < 1e-3:
            break
    n_ap, n_rg = ap.sum(), rg.sum()
    c_ap, c_rg = sub[ap].sum(), sub[rg].sum()
    inten = float(tot)
    sig = math.sqrt(c_ap + n_ap * n_ap * c_rg / (n_rg * n_rg))
    z = float(li_ma_significance(c_ap, c_rg, n_ap / n_rg))
    sy = math.sqrt((sub[ap] * (yy[ap] - cy) ** 2).sum()) / inten
    sx = math.sqrt((sub[ap] * (xx[ap] - cx) ** 2).sum()) / inten
    return (cy, cx), (sy, sx), inten, sig, float(coef[0]), z


# ------------------------------------------------------------------ indexing

_FCC = ((0.0, 0.0, 0.0), (0.5, 0.5, 0.0), (0.5, 0.0, 0.5), (0.0, 0.5, 0.5))
_ANION = tuple((x + 0.5, y, z) for x, y, z in _FCC)


@dataclass(frozen=True)
class Phase:
    """A cubic candidate phase: name, lattice parameter a_A (Å), basis in fractional
    coordinates with atomic numbers (only used to decide which reflections are allowed)."""

    name: str
    a_A: float
    basis_frac: tuple = _FCC
    basis_Z: tuple = (1, 1, 1, 1)


PHASES = (Phase("Pt", 3.924, _FCC, (78,) * 4),
          Phase("Au", 4.078, _FCC, (79,) * 4),
          Phase("MgO", 4.212, _FCC + _ANION, (12,) * 4 + (8,) * 4))


def allowed_reflections(phase: Phase, g_max_inv_A: float):
    """Allowed hkl of ``phase`` with |g| <= g_max: (hkl (n, 3) int64, g (n, 3) Å⁻¹ in the
    crystal frame, g = hkl / a). Allowed: |Σ_j Z_j exp(2πi h·x_j)| > 10⁻⁶ Σ Z."""
    hkl = _allowed_hkl(phase, int(math.ceil(g_max_inv_A * phase.a_A)))
    g = hkl / phase.a_A
    keep = np.linalg.norm(g, axis=1) <= g_max_inv_A
    return hkl[keep], g[keep]


@lru_cache(maxsize=64)
def _allowed_hkl(phase: Phase, n: int):
    r = np.arange(-n, n + 1)
    hkl = np.stack(np.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    hkl = hkl[np.any(hkl != 0, axis=1)]
    x = np.asarray(phase.basis_frac, float)
    z = np.asarray(phase.basis_Z, float)
    F = np.exp(2j * np.pi * hkl @ x.T) @ z
    out = hkl[np.abs(F) > 1e-6 * z.sum()].astype(np.int64)
    out.flags.writeable = False  # shared by every caller through the cache
    return out


def _directions(step_deg):
    """Beam directions in the crystal frame, one per ``step_deg``, over 1/24 of the sphere
    (0 <= u_x, u_y <= u_z): every rotation is one of these times a cubic rotation."""
    n = int(4 * math.pi / math.radians(step_deg) ** 2) + 1
    i = np.arange(n) + 0.5
    z = 1 - 2 * i / n
    phi = math.pi * (1 + 5 ** 0.5) * i
    rr = np.sqrt(1 - z * z)
    u = np.stack([rr * np.cos(phi), rr * np.sin(phi), z], 1)
    u = u[(u[:, 0] >= 0) & (u[:, 1] >= 0) & (u[:, 0] <= u[:, 2]) & (u[:, 1] <= u[:, 2])]
    u = np.vstack([u, [[0, 0, 1], [0, 1, 1] / np.sqrt(2), [1, 1, 1] / np.sqrt(3)]])
    ref = np.where(np.abs(u[:, :1]) < 0.9, [[1.0, 0, 0]], [[0, 1.0, 0]])
    a1 = np.cross(u, ref)
    a1 /= np.linalg.norm(a1, axis=1)[:, None]
    a2 = np.cross(u, a1)
    return u, a1, a2


@njit(**NJIT)
def _vote_kernel(dirs, a1s, a2s, g, g2, lam, s_tol, q_r, q_th, w, tol, n_bins, score, psi):
    """Per beam direction, the in-plane rotation ψ best supported by the peaks: every
    (peak, excited reflection) pair of matching |q| votes for ψ = φ_ref - θ_peak."""
    hist = np.zeros(n_bins)
    two_pi = 2.0 * np.pi
    for d in range(dirs.shape[0]):
        hist[:] = 0.0
        for j in range(g.shape[0]):
            gz = g[j, 0] * dirs[d, 0] + g[j, 1] * dirs[d, 1] + g[j, 2] * dirs[d, 2]
            s = -gz - 0.5 * lam * g2[j]
            if abs(s) > 3.0 * s_tol:
                continue
            ex = np.exp(-(s / s_tol) ** 2)
            p1 = g[j, 0] * a1s[d, 0] + g[j, 1] * a1s[d, 1] + g[j, 2] * a1s[d, 2]
            p2 = g[j, 0] * a2s[d, 0] + g[j, 1] * a2s[d, 1] + g[j, 2] * a2s[d, 2]
            pr = np.sqrt(p1 * p1 + p2 * p2)
            phi = np.arctan2(p2, p1)
            for i in range(q_r.shape[0]):
                if abs(pr - q_r[i]) <= tol * q_r[i]:
                    a = (phi - q_th[i]) % two_pi
                    b = int(a / two_pi * n_bins) % n_bins
                    v = w[i] * ex
                    hist[b] += v
                    hist[(b + 1) % n_bins] += 0.5 * v
                    hist[(b - 1) % n_bins] += 0.5 * v
        best = 0
        for b in range(n_bins):
            if hist[b] > hist[best]:
                best = b
        score[d] = hist[best]
        psi[d] = (best + 0.5) * two_pi / n_bins


@dataclass
class Indexing:
    """A pattern's peaks indexed to one phase and orientation.

    phase : name of the best candidate phase ("" when nothing indexed; "unknown" when the
        fitted lattice parameter is more than ``phase_tol`` from every candidate, fewer
        than ``min_indexed_fraction`` of the peaks index, or the indexed peaks lie on one
        line through the origin, which fixes a spacing but not a lattice).
    a_ref_A, a_fit_A : reference and fitted lattice parameter, Å.
    orientation : (3, 3) rotation R taking crystal to specimen coordinates (g_spec = R g).
    lattice : (3, 3) Å, rows a1, a2, a3 of the fitted cell in the specimen frame (a_fit Rᵀ).
    zone_axis : (3,) int, the low-index direction [uvw] (|u|,|v|,|w| <= 3) nearest the beam.
    zone_angle_deg : angle between the beam and that zone axis.
    hkl : (n, 3) int, (0, 0, 0) where not indexed. indexed : (n,) bool.
    q_model_yx : (n, 2) Å⁻¹ in-plane position of the assigned reflection in the fit.
    excitation_error : (n,) Å⁻¹ s of the assigned reflection (≈ -g_z - λ|g|²/2).
    d_ideal_A : (n,) a_ref / |hkl|. rms_residual_inv_A : RMS |q - q_model| of indexed peaks.
    """

    phase: str
    a_ref_A: float
    a_fit_A: float
    orientation: np.ndarray
    lattice: np.ndarray
    zone_axis: np.ndarray
    zone_angle_deg: float
    hkl: np.ndarray
    indexed: np.ndarray
    q_model_yx: np.ndarray
    excitation_error: np.ndarray
    d_ideal_A: np.ndarray
    rms_residual_inv_A: float
    n_indexed: int


def _rot(omega):
    """Rotation matrix of the rotation vector ``omega`` (Rodrigues)."""
    t = math.sqrt(float(omega @ omega))
    if t < 1e-12:
        return np.eye(3)
    k = omega / t
    K = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return np.eye(3) + math.sin(t) * K + (1.0 - math.cos(t)) * (K @ K)


def _predict(R, g):
    """Specimen-frame g (n, 3) of crystal-frame g under R."""
    return g @ R.T


def _match(q_xy, sig, gs, s, s_max, tol):
    """Greedy one-to-one nearest matches of peaks to excited reflections within
    max(tol·|q|, 3σ) of each peak."""
    ok = np.abs(s) <= s_max
    idx = np.nonzero(ok)[0]
    out = np.full(len(q_xy), -1)
    if not len(idx):
        return out
    d = np.linalg.norm(q_xy[:, None, :] - gs[idx][None, :, :2], axis=2)
    lim = np.maximum(tol * np.linalg.norm(q_xy, axis=1), 3.0 * sig)[:, None]
    pairs = np.argwhere(d <= lim)
    used = set()
    for i, j in sorted(pairs.tolist(), key=lambda ij: d[ij[0], ij[1]]):
        if out[i] < 0 and j not in used:
            out[i] = idx[j]
            used.add(j)
    return out


def _refine(R, a, a0, q_xy, sig, g_hkl, lam, s_tol, tol, n_iter=3):
    """Least-squares orientation and lattice parameter on the matched peaks; re-match."""
    match = np.full(len(q_xy), -1)
    for _ in range(n_iter):
        gs = _predict(R, g_hkl * (a0 / a))
        s = -gs[:, 2] - 0.5 * lam * (gs ** 2).sum(1)
        match = _match(q_xy, sig, gs, s, 3.0 * s_tol, tol)
        m = match >= 0
        if m.sum() < 2:
            return R, a, match
        gm = g_hkl[match[m]] * a0
        qm, sm = q_xy[m], sig[m]

        def resid(x):
            Rx = _rot(x[:3]) @ R
            gg = (gm / (a * math.exp(x[3]))) @ Rx.T
            sx = -gg[:, 2] - 0.5 * lam * (gg ** 2).sum(1)
            return np.concatenate([((gg[:, :2] - qm) / sm[:, None]).ravel(), sx / s_tol])

        fit = optimize.least_squares(resid, np.zeros(4), method="lm")
        R = _rot(fit.x[:3]) @ R
        a = a * math.exp(fit.x[3])
    gs = _predict(R, g_hkl * (a0 / a))
    s = -gs[:, 2] - 0.5 * lam * (gs ** 2).sum(1)
    return R, a, _match(q_xy, sig, gs, s, 3.0 * s_tol, tol)


def _score(R, a, a0, q_xy, sig, g_hkl, lam, s_tol, tol):
    """How well orientation R and lattice parameter a index the peaks: ((n matched,
    -cost), match, rms |Δq|), cost = mean over matched peaks of (Δq/σ)² + (s/s_tol)².
    Few peaks can often be indexed in several orientations; the one that also puts the
    reflections nearest the Bragg condition is the physical one."""
    gs = _predict(R, g_hkl * (a0 / a))
    s = -gs[:, 2] - 0.5 * lam * (gs ** 2).sum(1)
    match = _match(q_xy, sig, gs, s, 3.0 * s_tol, tol)
    m = match >= 0
    if not m.any():
        return (0, -math.inf), match, math.inf
    d = gs[match[m], :2] - q_xy[m]
    cost = float(np.mean(((d / sig[m, None]) ** 2).sum(1) + (s[match[m]] / s_tol) ** 2))
    # Reflections this orientation puts right on the Bragg condition, within the range of
    # |q| where peaks were seen, should have been seen: each missing one counts against it
    # (two orientations can project a few reflections identically; their others differ).
    qr = np.hypot(gs[:, 0], gs[:, 1])
    qn = np.linalg.norm(q_xy, axis=1)
    unseen = np.ones(len(gs), bool)
    unseen[match[m]] = False
    unseen &= (qr >= qn.min() * 0.95) & (qr <= qn.max() * 1.02)
    missing = float(np.exp(-(s[unseen] / (0.5 * s_tol)) ** 2).sum())
    return (int(m.sum()), -(cost + missing)), match, float(np.sqrt(np.mean((d ** 2).sum(1))))


def _zone_axis(u):
    r = np.arange(-3, 4)
    c = np.stack(np.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    c = c[np.any(c != 0, axis=1)]
    c = c[np.gcd.reduce(np.abs(c), axis=1) == 1]
    cos = (c @ u) / np.linalg.norm(c, axis=1)
    ang = np.degrees(np.arccos(np.clip(cos, -1, 1)))
    best = np.lexsort(((c * c).sum(1), np.round(ang, 1)))[0]
    return c[best].astype(np.int64), float(ang[best])


def _empty_indexing(n):
    nan3 = np.full((3, 3), np.nan)
    return Indexing("", math.nan, math.nan, nan3, nan3.copy(), np.zeros(3, np.int64),
                    math.nan, np.zeros((n, 3), np.int64), np.zeros(n, bool),
                    np.full((n, 2), np.nan), np.full(n, np.nan), np.full(n, np.nan), math.nan, 0)


def index_peaks(q_yx, sigma_q=None, phases=PHASES, wavelength_A=None, energy_keV=300.0,
                excitation_tol_inv_A=0.05, match_tol=0.03, index_tol=0.015, step_deg=1.0,
                phase_tol=0.02, min_indexed_fraction=0.5, n_candidates=8) -> Indexing:
    """Index Bragg peaks of one grain: phase, lattice parameter, orientation and each (hkl).

    Parameters
    ----------
    q_yx : (n, 2) Å⁻¹, in-plane reciprocal position (g_y, g_x) of each peak relative to the
        direct beam.
    sigma_q : (n,) Å⁻¹ positional standard error of each peak (default 0.2 % of |q|); a floor
        of 0.1 % of |q| is added in quadrature.
    phases : candidate cubic :class:`Phase` list (default Pt, Au, MgO).
    wavelength_A : electron wavelength (Å); default from ``energy_keV``.
    excitation_tol_inv_A : how far (Å⁻¹) from the Bragg condition a visible reflection may
        be: about 1/thickness of the crystal (relrods of thin crystals are long).
    match_tol, index_tol : relative distance |q - q_model| / |q| for a peak to vote in the
        orientation search / to count as indexed after refinement (or 3 σ_q if larger).
    step_deg : angular step of the orientation search.
    phase_tol : relative |a_fit / a_ref - 1| up to which the nearest candidate is named.
    min_indexed_fraction : below this fraction of peaks indexed the phase is "unknown".
    n_candidates : orientations (best votes over all phases) refined.

    Returns
    -------
    :class:`Indexing`. Method: for every beam direction on a ``step_deg`` grid over the
    cubic fundamental zone, the reflections within 3 × excitation_tol of the Ewald sphere
    (s ≈ -g_z - λ|g|²/2, beam along +z) are projected; pairs of peaks and reflections of
    equal |q| vote for the in-plane rotation. The best-voted orientations are scored (see
    below) and the best ``n_candidates`` over all phases refined by least squares (rotation
    and lattice parameter; residuals the in-plane peak positions over their σ, plus
    s / excitation_tol per peak), re-matching each time. The orientation indexing the most
    peaks wins, ties broken by the smallest cost: mean (Δq/σ)² + (s/excitation_tol)² of the
    indexed peaks plus, for every reflection it puts near the Bragg condition within the
    |q| range of the peaks but that was not seen, exp(-(2 s/excitation_tol)²). The phase is
    the candidate nearest the fitted lattice parameter.

    Ambiguities: a kinematic pattern cannot tell R from R turned 180° about the beam; the
    tilt about in-plane axes is fixed only to about excitation_tol / |g|; and a few
    reflections (fewer than ~8) can be projected identically by two orientations that are
    not related by symmetry, so their (hkl) are then consistent but not unique.
    """
    q_yx = np.asarray(q_yx, np.float64).reshape(-1, 2)
    n = len(q_yx)
    if n < 2:
        return _empty_indexing(n)
    if not phases:
        raise ValueError("index_peaks: no candidate phases given")
    lam = float(wavelength_A) if wavelength_A is not None else electron_wavelength_A(energy_keV)
    q_xy = q_yx[:, ::-1].copy()
    q_r = np.linalg.norm(q_xy, axis=1)
    if np.any(q_r <= 0) or not np.all(np.isfinite(q_r)):
        raise ValueError("index_peaks: every peak needs a finite, non-zero q")
    sig = np.full(n, 0.002) * q_r if sigma_q is None else np.asarray(sigma_q, float).reshape(n)
    sig = np.sqrt(sig ** 2 + (1e-3 * q_r) ** 2)
    q_th = np.arctan2(q_xy[:, 1], q_xy[:, 0])
    w = np.ones(n)
    dirs, a1s, a2s = _directions(step_deg)
    n_bins = int(round(360.0 / max(step_deg, 0.25)))
    s_tol = float(excitation_tol_inv_A)
    cands, tables = [], []
    for pi, ph in enumerate(phases):
        hkl, g = allowed_reflections(ph, q_r.max() * (1 + 2 * match_tol) + 3 * s_tol)
        tables.append((hkl, g))
        if not len(hkl):
            continue
        score = np.zeros(len(dirs))
        psi = np.zeros(len(dirs))
        _vote_kernel(dirs, a1s, a2s, g, (g * g).sum(1), lam, s_tol, q_r, q_th, w,
                     float(match_tol), n_bins, score, psi)
        for d in np.argsort(-score)[:4 * n_candidates]:
            c, s_ = math.cos(psi[d]), math.sin(psi[d])
            R = np.stack([c * a1s[d] + s_ * a2s[d], -s_ * a1s[d] + c * a2s[d], dirs[d]])
            key = _score(R, ph.a_A, ph.a_A, q_xy, sig, g, lam, s_tol, match_tol)[0]
            cands.append((key, pi, R))
    best = None
    # Phases differ here mostly by scale, which the refinement fits: refine the best
    # orientations over all phases, not every phase's.
    for _, pi, R in sorted(cands, key=lambda c: c[0], reverse=True)[:n_candidates]:
        ph = phases[pi]
        hkl, g = tables[pi]
        R, a, _ = _refine(R, ph.a_A, ph.a_A, q_xy, sig, g, lam, s_tol, match_tol)
        R, a, _ = _refine(R, a, ph.a_A, q_xy, sig, g, lam, s_tol, index_tol, n_iter=2)
        key, match, rms = _score(R, a, ph.a_A, q_xy, sig, g, lam, s_tol, index_tol)
        if best is None or key > best[0]:
            best = (key, R, a, match, g, hkl, rms)
    if best is None or best[0][0] < 2:
        return _empty_indexing(n)
    _, R, a, match, g, hkl_all, rms = best
    ref = min(phases, key=lambda p: abs(a / p.a_A - 1))
    m = match >= 0
    # A phase is named only when its lattice explains most peaks, at a lattice parameter
    # near its own (partial coincidences of a foreign lattice do not make a phase), and
    # in two directions (one row of reflections fixes one spacing, not a lattice).
    u = q_xy[m] / np.linalg.norm(q_xy[m], axis=1)[:, None]
    planar = np.abs(np.outer(u[:, 0], u[:, 1]) - np.outer(u[:, 1], u[:, 0])).max() \
        > math.sin(math.radians(10.0))
    ok = abs(a / ref.a_A - 1) <= phase_tol and m.sum() >= min_indexed_fraction * n \
        and planar
    name = ref.name if ok else "unknown"
    # g of the winning phase is hkl / a_winner; re-express with the fitted a.
    hkl = np.zeros((n, 3), np.int64)
    hkl[m] = hkl_all[match[m]]
    gs = (hkl[m] / a) @ R.T
    q_model = np.full((n, 2), np.nan)
    q_model[m] = gs[:, 1::-1]
    s = np.full(n, np.nan)
    s[m] = -gs[:, 2] - 0.5 * lam * (gs ** 2).sum(1)
    d_ideal = np.full(n, np.nan)
    d_ideal[m] = ref.a_A / np.linalg.norm(hkl[m], axis=1)
    zone, zang = _zone_axis(R[2])
    return Indexing(name, float(ref.a_A), float(a), R, a * R.T, zone, zang, hkl, m, q_model,
                    s, d_ideal, rms, int(m.sum()))
