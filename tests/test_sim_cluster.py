"""Real-space virtual apertures on the ``cluster`` specimen: the summed pattern of one grain's
probe positions shows that grain's Bragg reflections, and not the other grains'."""

import numpy as np
import pytest
from scipy import ndimage

from sim_detector.simulate import Beam, Detector, ScanSpec, simulate_scan
from sim_detector.specimens import make_specimen

H = W = 256
MRAD_PER_PX = 0.2
ALPHA = 2.5
R_BF = ALPHA / MRAD_PER_PX


def _wavelength(E):
    return 12.398419843320026 / np.sqrt(E * (E + 2 * 510.99895))


def predicted_spots(grain, z_extent_A, energy_keV=300.0):
    """Detector positions (y, x) px of the reflections of a grain near the Ewald sphere,
    from its lattice vectors and basis only."""
    lam = _wavelength(energy_keV)
    A = np.asarray(grain.lattice, float)
    B = np.linalg.inv(A).T
    n = 8
    r = np.arange(-n, n + 1)
    hkl = np.array(np.meshgrid(r, r, r, indexing="ij")).reshape(3, -1).T
    hkl = hkl[np.any(hkl != 0, axis=1)]
    F = np.zeros(len(hkl), complex)
    for xf, Z in zip(grain.basis_frac, grain.basis_Z):
        F += Z * np.exp(2j * np.pi * hkl @ np.asarray(xf, float))
    g = hkl @ B
    k0 = np.array([0.0, 0.0, 1 / lam])
    kg = np.linalg.norm(g + k0, axis=1)
    s = (1 / lam ** 2 - kg ** 2) / (2 * kg)
    pos = np.stack([(H - 1) / 2 + lam * 1e3 * g[:, 1] / MRAD_PER_PX,
                    (W - 1) / 2 + lam * 1e3 * g[:, 0] / MRAD_PER_PX], 1)
    ok = (np.abs(F) > 1e-6 * np.abs(F).max()) & (np.abs(s) <= 1.5 / z_extent_A) & \
        np.all((pos > -R_BF) & (pos < H + R_BF), axis=1)
    return pos[ok]


def aperture_pattern(sim, positions_mask):
    """Summed diffraction pattern (plain numpy) of the frames at the masked positions."""
    ny, nx = sim.scan_shape
    rows, cols = np.nonzero(positions_mask)
    off = sim.offsets
    ev = [sim.indices[off[f]:off[f + sim.frames_per_position]]
          for f in (rows * (nx + sim.flyback) + cols) * sim.frames_per_position]
    return np.bincount(np.concatenate(ev), minlength=H * W).reshape(H, W).astype(float)


def disk_signal(pattern):
    """Matched filter with the disk shape, minus a local median background; the direct beam
    region is blanked."""
    k = int(np.ceil(R_BF))
    yy, xx = np.mgrid[-k:k + 1, -k:k + 1]
    mf = ndimage.convolve(pattern, (xx ** 2 + yy ** 2 <= R_BF ** 2).astype(float), mode="constant")
    sig = mf - ndimage.median_filter(mf, size=41)
    Y, X = np.mgrid[:H, :W]
    sig[(Y - (H - 1) / 2) ** 2 + (X - (W - 1) / 2) ** 2 <= (2 * R_BF + 2) ** 2] = 0
    return sig


def top_peaks(sig, n):
    mx = ndimage.maximum_filter(sig, size=int(2 * R_BF + 1))
    cand = np.argwhere((sig == mx) & (sig > 0))
    cand = cand[np.argsort(-sig[cand[:, 0], cand[:, 1]])]
    peaks = []
    for p in cand:  # plateaus give neighbouring maxima: keep one per disk
        if all(np.hypot(*(p - q)) > R_BF for q in peaks):
            peaks.append(p)
        if len(peaks) == n:
            break
    return np.array(peaks, float)


@pytest.fixture(scope="module")
def cluster_scan():
    spec = make_specimen("cluster", seed=0)
    sim = simulate_scan(spec, Beam(dose=500.0, convergence_mrad=ALPHA),
                        Detector(shape=(H, W), mrad_per_px=MRAD_PER_PX), ScanSpec(shape=(48, 48)),
                        seed=1)
    return spec, sim


def test_real_space_aperture_shows_its_grains_reflections(cluster_scan):
    spec, sim = cluster_scan
    tr = sim.truth
    T = tr.grain_thickness_A
    n = len(spec.grains)
    peaks, sigs, preds = {}, {}, {}
    for k in range(n):
        others = np.delete(T, k, axis=0).max(0)
        mask = (tr.grain_map == k) & (others < 0.5) & (T[k] > 5.0)  # this grain only
        assert mask.sum() >= 20, k
        sig = disk_signal(aperture_pattern(sim, mask))
        z = spec.positions[spec.grain == k, 2]
        pred = predicted_spots(spec.grains[k], z.max() - z.min())
        assert 2 <= len(pred) < 40  # the prediction is specific, not a dense carpet
        peaks[k], sigs[k], preds[k] = top_peaks(sig, 3), sig, pred
    for k in range(n):
        if spec.grains[k].name == "MgO":
            continue  # light and weak: checked below only as "another grain"
        # the three brightest off-axis disks sit on this grain's reciprocal lattice
        for p in peaks[k]:
            d = np.hypot(*(preds[k] - p).T).min()
            assert d < 2.0, (k, p, d)
        third = sigs[k][int(peaks[k][-1][0]), int(peaks[k][-1][1])]
        # ... and not at another grain's reflections (where this grain has none)
        for j in range(n):
            if j == k:
                continue
            for q in peaks[j]:
                if np.hypot(*(preds[k] - q).T).min() < 2 * R_BF:
                    continue
                assert sigs[k][int(q[0]), int(q[1])] < 0.25 * third, (k, j, q)
