"""Atom tracing in a volume (operators/tomography/tracing.py) against volumes built from known atoms.

References are independent of the code under test: volumes are sums of analytic Gaussians at
atom positions of the emulator's fcc Pt particle (sim_detector.specimens), matches are made
with a KD-tree here, components are counted with scipy.ndimage directly, and Otsu's
threshold is compared with scikit-image's when that is installed.
"""

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import cKDTree

from operators.tomography.tracing import otsu_threshold, refine_peaks, simulate_atoms, trace_atoms
from sim_detector.specimens import A_PT, make_specimen

VOX = 0.4  # Å


# ------------------------------------------------------------------ helpers (shared)

def fcc_particle(size_A=12.0, shape="cuboctahedron"):
    """(N, 3) Å atom positions (x, y, z) of the emulator's Pt particle, centroid at 0."""
    p = make_specimen("pt-particle", size_A=size_A, shape=shape).positions
    return p - p.mean(axis=0)


def gaussian_volume(pos_A, n, vox=VOX, sigma_A=0.45, sigma_z_A=None, amp=1.0):
    """(n, n, n) [z, y, x] sum of Gaussians (peak amp) at (x, y, z) Å positions relative to
    the centre voxel n // 2."""
    g = (np.arange(n) - n // 2) * vox
    sz = sigma_A if sigma_z_A is None else sigma_z_A
    out = np.zeros((n, n, n))
    for x, y, z in np.asarray(pos_A).reshape(-1, 3):
        out += amp * (np.exp(-(g - z) ** 2 / (2 * sz ** 2))[:, None, None]
                      * np.exp(-(g - y) ** 2 / (2 * sigma_A ** 2))[None, :, None]
                      * np.exp(-(g - x) ** 2 / (2 * sigma_A ** 2))[None, None, :])
    return out


def match_atoms(found_A, true_A, tol_A=0.3):
    """One-to-one matching within tol_A: (fraction of true atoms found, fraction of found
    atoms that match no true atom, rms distance of the matches in Å)."""
    found_A = np.asarray(found_A).reshape(-1, 3)
    if len(found_A) == 0:
        return 0.0, 0.0, np.inf
    d, j = cKDTree(found_A).query(true_A)
    used = np.zeros(len(found_A), bool)
    dist = []
    for i in np.argsort(d):
        if d[i] <= tol_A and not used[j[i]]:
            used[j[i]] = True
            dist.append(d[i])
    rms = float(np.sqrt(np.mean(np.square(dist)))) if dist else np.inf
    return len(dist) / len(true_A), float((~used).mean()), rms


# ------------------------------------------------------------------ tests

def test_traces_noisy_fcc_particle():
    truth = fcc_particle(16.0)                       # 309 atoms
    rng = np.random.default_rng(3)
    vol = gaussian_volume(truth, 56, sigma_A=0.5) + 0.08 * rng.standard_normal((56,) * 3)
    atoms = trace_atoms(vol, VOX, atom_sigma_A=0.5)
    found, false, rms = match_atoms(atoms.positions_A, truth, 0.3)
    print(f"{len(truth)} atoms: found {found:.3f}, false {false:.3f}, rms {rms:.3f} Å, "
          f"threshold {atoms.threshold:.3f} (Otsu {atoms.otsu_threshold:.3f})")
    assert found >= 0.98 and false < 0.02
    assert rms < 0.1
    # voxel coordinates and Å are the same points: (z, y, x) voxel vs (x, y, z) Å from n // 2
    np.testing.assert_allclose(atoms.positions_A, (atoms.positions_vox[:, ::-1] - 28) * VOX,
                               atol=1e-12)
    # fcc interior atoms have 12 neighbours at a/√2 = 2.77 Å, none closer
    assert atoms.bond_cutoff_A == pytest.approx(1.2 * A_PT / np.sqrt(2), rel=0.03)
    assert np.bincount(atoms.coordination).argmax() == 12
    tree = cKDTree(atoms.positions_A)
    np.testing.assert_array_equal(atoms.coordination, [
        len(tree.query_ball_point(p, atoms.bond_cutoff_A)) - 1 for p in atoms.positions_A])
    assert atoms.correlation.min() > 0.9 and atoms.correlation.max() <= 1.0
    assert (atoms.peak_intensity > 0).all() and (atoms.integrated_intensity > 0).all()


def test_splits_a_component_with_two_maxima():
    truth = np.array([[-1.15, 0.3, 0.0], [1.15, 0.3, 0.0]])   # 2.3 Å apart
    vol = gaussian_volume(truth, 32, sigma_A=0.55)
    den = ndimage.gaussian_filter(vol, 0.55 / VOX, mode="constant")
    thr = 0.2 * den.max()
    assert ndimage.label(den > thr)[1] == 1, "the test needs the two atoms in one component"
    atoms = trace_atoms(vol, VOX, 0.55, threshold=thr, min_coordination=0,
                        min_correlation_sigma=None)
    found, false, _ = match_atoms(atoms.positions_A, truth, 0.3)
    assert len(atoms.positions_A) == 2 and found == 1.0 and false == 0.0


def test_splits_a_component_with_one_maximum_by_intensity():
    # two atoms along the beam, blurred along z (missing wedge) into one elongated peak,
    # next to four single atoms of the same shape that set the single-atom intensity
    pair = np.array([[0.0, 0.0, -1.2], [0.0, 0.0, 1.2]])
    singles = np.array([[-5.0, -5.0, 0.0], [5.0, -5.0, 0.0], [-5.0, 5.0, 0.0], [5.0, 5.0, 0.0]])
    truth = np.concatenate([pair, singles])
    vol = gaussian_volume(truth, 40, sigma_A=0.45, sigma_z_A=1.3)
    den = ndimage.gaussian_filter(vol, 0.45 / VOX, mode="constant")
    line = den[:, 20, 20]
    assert ((line[1:-1] > line[:-2]) & (line[1:-1] > line[2:])).sum() == 1, \
        "the test needs one maximum for the pair"
    atoms = trace_atoms(vol, VOX, 0.45, min_coordination=0, min_correlation_sigma=None)
    found, false, _ = match_atoms(atoms.positions_A, truth, 0.3)
    assert len(atoms.positions_A) == 6 and found == 1.0 and false == 0.0


def test_discards_isolated_and_misshapen_peaks():
    truth = fcc_particle(12.0)                                     # 147 atoms, radius ≈ 8 Å
    ghost = np.array([[0.0, 0.0, 14.0]])                           # far from every atom
    vol = gaussian_volume(np.concatenate([truth, ghost]), 72)
    atoms = trace_atoms(vol, VOX, 0.45)
    found, false, _ = match_atoms(atoms.positions_A, truth)
    assert found == 1.0 and false == 0.0
    assert atoms.n_candidates == len(truth) + 1 and atoms.n_rejected_coordination == 1
    kept = trace_atoms(vol, VOX, 0.45, min_coordination=0)
    assert len(kept.positions_A) == len(truth) + 1                 # configurable

    # a flat plate of atom-like intensity is not an atom: its correlation is an outlier
    g = (np.arange(40) - 20) * VOX
    zz, yy, xx = np.meshgrid(g, g, g, indexing="ij")
    four = np.array([[-4.0, -4.0, 0.0], [4.0, -4.0, 0.0], [-4.0, 4.0, 0.0], [4.0, 4.0, 0.0],
                     [0.0, 0.0, 0.0]])
    plate = 0.5 * ((np.abs(zz) < 0.3) & (xx ** 2 + (yy - 6.5) ** 2 < 4.0))
    atoms = trace_atoms(gaussian_volume(four, 40) + plate, VOX, 0.45, min_coordination=0)
    found, false, _ = match_atoms(atoms.positions_A, four)
    assert found == 1.0 and false == 0.0
    assert atoms.n_candidates == 6 and atoms.n_rejected_correlation == 1


def test_otsu_threshold_known_answers():
    rng = np.random.default_rng(0)
    low, high = rng.normal(1.0, 0.1, 5000), rng.normal(5.0, 0.1, 5000)
    both = np.concatenate([low, high])
    t = otsu_threshold(both)
    # the cut lies in the gap; the threshold is the centre of the bin below it (scikit-image's
    # definition), so within half a bin of the lower class's maximum
    assert low.max() - np.ptp(both) / 256 < t < high.min()
    assert ((both > t) == (both > 3.0)).mean() >= 0.999
    skimage_filters = pytest.importorskip("skimage.filters")
    mixed = np.concatenate([rng.normal(0.0, 1.0, 20000), rng.normal(4.0, 1.5, 6000)])
    bin_width = np.ptp(mixed) / 256
    assert abs(otsu_threshold(mixed) - skimage_filters.threshold_otsu(mixed, nbins=256)) \
        <= bin_width
    with pytest.raises(ValueError, match="distinct"):
        otsu_threshold(np.ones(10))


def test_peak_refinement_and_simulated_atom_are_exact_for_gaussians():
    # an anisotropic Gaussian at a sub-voxel position: the log-quadratic fit is exact
    n = 21
    zz, yy, xx = np.mgrid[:n, :n, :n].astype(float)
    centre = np.array([10.3, 9.6, 10.45])
    d = np.stack([zz, yy, xx], axis=-1) - centre
    cov_inv = np.linalg.inv(np.array([[4.0, 0.8, 0.0], [0.8, 1.5, 0.3], [0.0, 0.3, 1.2]]))
    vol = np.exp(-0.5 * np.einsum("...i,ij,...j->...", d, cov_inv, d))
    np.testing.assert_allclose(refine_peaks(vol, [[11.0, 9.0, 11.0]]), [centre], atol=1e-9)
    # simulate_atoms: an isolated atom peaks at its amplitude, centred where it was put
    sim = simulate_atoms((n, n, n), [[10.0, 10.0, 10.0]], sigma_vox=1.5, amplitudes=[2.0])
    assert sim.max() == pytest.approx(2.0, rel=1e-3)
    assert np.allclose(ndimage.center_of_mass(sim), (10.0, 10.0, 10.0))


def test_bad_input_raises_clear_errors():
    vol = np.zeros((8, 8, 8))
    vol[4, 4, 4] = 1.0
    with pytest.raises(ValueError, match="3-D"):
        trace_atoms(np.zeros((8, 8)), VOX)
    with pytest.raises(ValueError, match="voxel_size_A"):
        trace_atoms(vol, 0.0)
    with pytest.raises(ValueError, match="atom_sigma_A"):
        trace_atoms(vol, VOX, atom_sigma_A=-1)
    with pytest.raises(ValueError, match="NaN"):
        trace_atoms(np.full((8, 8, 8), np.nan), VOX)
    with pytest.raises(ValueError, match="min_coordination"):
        trace_atoms(vol, VOX, min_coordination=-1)
    with pytest.raises(ValueError, match="threshold_factors"):
        trace_atoms(vol, VOX, threshold_factors=())
