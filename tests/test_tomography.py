"""Projector, alignment and RESIRE reconstruction (operators/tomography/projector.py, tomography.py).

References: scipy's Euler rotations, analytic projections of Gaussian atoms (a 3D Gaussian
projects to a 2D Gaussian), a brute-force numpy projector written here, the emulator's own
tilt (Specimen.rotated) and ground truth, and the measured tilt series published with
RESIRE / Yuan et al. 2022 in ../shared/data/aet-amorphous.
"""

from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from conftest import SHARED_DATA
from operators.tomography.projector import backproject, project, rotation_matrices
from operators.tomography.reconstruct import (align_projections, extended_volume_shape, plot_r_factor,
                                              resire, shift_images)
from operators.tomography.tracing import trace_atoms
from sim_detector.specimens import make_specimen

try:
    from test_tracing import fcc_particle, match_atoms
except ImportError:
    from tests.test_tracing import fcc_particle, match_atoms

AET = SHARED_DATA / "aet-amorphous"
needs_tilt_series = pytest.mark.skipif(
    not (AET / "RESIRE_example_projections.mat").is_file(),
    reason=f"measured tilt series not found at {AET}")
TILTS = np.arange(-70.0, 70.1, 3.0)          # ±70° in 3° steps: 47 projections
VOX = 0.4


# ------------------------------------------------------------------ references

def scipy_matrices(angles, axes="ZYX"):
    """M = Rz(phi) Ry(theta) Rx(psi) (RESIRE's): scipy's intrinsic "ZYX" Euler angles."""
    return Rotation.from_euler(axes, np.asarray(angles, float), degrees=True).as_matrix()


def matrix_quaternion_rot(vector, theta_deg):
    """Literal port of MatrixQuaternionRot.m, the rotation helper RESIRE calls."""
    t = np.deg2rad(theta_deg)
    v = np.asarray(vector, float) / np.linalg.norm(vector)
    w = np.cos(t / 2)
    x, y, z = -np.sin(t / 2) * v
    return np.array([[1 - 2 * y ** 2 - 2 * z ** 2, 2 * x * y + 2 * w * z, 2 * x * z - 2 * w * y],
                     [2 * x * y - 2 * w * z, 1 - 2 * x ** 2 - 2 * z ** 2, 2 * y * z + 2 * w * x],
                     [2 * x * z + 2 * w * y, 2 * y * z - 2 * w * x, 1 - 2 * x ** 2 - 2 * y ** 2]])


def resire_R(phi, theta, psi):
    """RESIRE's rotation: R = (Rv1(phi) Rv2(theta) Rv3(psi))' with vector1 = [0 0 1], vector2 =
    [0 1 0], vector3 = [1 0 0] (RESIRE_reconstructor.m l.51-53, interp_pj_realspace.m l.48-53);
    a voxel (X, Y, Z) lands on detector (dim1, dim2) = R(1:2, :) [X; Y; Z]."""
    return (matrix_quaternion_rot((0, 0, 1), phi) @ matrix_quaternion_rot((0, 1, 0), theta)
            @ matrix_quaternion_rot((1, 0, 0), psi)).T


def resire_backproject_matlab_order(pjs, angles, obj_shape):
    """A literal numpy port of RESIRE's interp_pj_realspace.m: projections (dimx, dimy, n) in
    MATLAB order, the (obj_dimx, obj_dimy, obj_dimz) sum of the back-rotated projections
    (splinterp2 = linear interpolation, zero outside)."""
    from scipy.ndimage import map_coordinates

    dimx, dimy, n = pjs.shape
    ox, oy, oz = obj_shape
    ncx, ncy = round((dimx + 1) / 2 + 1e-9) - 1, round((dimy + 1) / 2 + 1e-9) - 1
    ks = [np.arange(-int(np.ceil((m - 1) / 2)), int(np.floor((m - 1) / 2)) + 1) for m in obj_shape]
    XX, YY, ZZ = np.meshgrid(*ks, indexing="ij")
    XYZ = np.stack([XX.ravel(), YY.ravel(), ZZ.ravel()])
    out = np.zeros(obj_shape)
    for k in range(n):
        rot = resire_R(*angles[k])[:2] @ XYZ
        out += map_coordinates(pjs[:, :, k], [rot[0] + ncx, rot[1] + ncy], order=1,
                               mode="grid-constant", cval=0.0).reshape(obj_shape)
    return out


def euler(tilts):
    t = np.asarray(tilts, float)
    return np.stack([np.zeros_like(t), t, np.zeros_like(t)], axis=1)


def dense_project(vol, angles, shape):
    """Brute force: every voxel's (u, v) = (Mᵀ r)[:2], four bilinear weights, np.add.at."""
    nz, ny, nx = vol.shape
    h, w = shape
    z, y, x = np.meshgrid(np.arange(nz) - nz // 2, np.arange(ny) - ny // 2,
                          np.arange(nx) - nx // 2, indexing="ij")
    r = np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1).astype(float)
    out = np.zeros((len(angles), h, w))
    for i, M in enumerate(scipy_matrices(angles)):
        uv = r @ M                       # row k is (Mᵀ r_k)ᵀ
        col, row = uv[:, 0] + w // 2, uv[:, 1] + h // 2
        c0, r0 = np.floor(col).astype(int), np.floor(row).astype(int)
        fc, fr = col - c0, row - r0
        for dr, dc, wt in [(0, 0, (1 - fr) * (1 - fc)), (0, 1, (1 - fr) * fc),
                           (1, 0, fr * (1 - fc)), (1, 1, fr * fc)]:
            rr, cc = r0 + dr, c0 + dc
            ok = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
            np.add.at(out[i], (rr[ok], cc[ok]), (vol.ravel() * wt)[ok])
    return out


def analytic_projections(pos_A, angles, shape, vox=VOX, sigma_A=0.45, shifts_px=None):
    """Line integrals (in voxel lengths) of unit-peak 3D Gaussian atoms: 2D Gaussians at
    (u, v) = (Mᵀ r)[:2], optionally displaced by (dy, dx) px per projection."""
    h, w = shape
    gv = (np.arange(h) - h // 2) * vox
    gu = (np.arange(w) - w // 2) * vox
    norm = np.sqrt(2 * np.pi) * sigma_A / vox
    out = np.zeros((len(angles), h, w))
    for i, M in enumerate(scipy_matrices(angles)):
        uv = pos_A @ M
        dy, dx = (0.0, 0.0) if shifts_px is None else shifts_px[i] * vox
        ey = np.exp(-(gv[None, :] - uv[:, 1:2] - dy) ** 2 / (2 * sigma_A ** 2))
        ex = np.exp(-(gu[None, :] - uv[:, 0:1] - dx) ** 2 / (2 * sigma_A ** 2))
        out[i] = norm * ey.T @ ex
    return out


def r_factor(proj, b):
    return np.abs(proj - b).sum() / np.abs(b).sum()


# ------------------------------------------------------------------ projector

ANGLE_SETS = [euler([0.0, 35.0, -70.0]),
              np.array([[10.0, 35.0, -20.0], [33.0, 12.0, 77.0], [-120.0, 64.0, 5.0]]),
              np.array([[0.0, 90.0, 0.0], [90.0, 90.0, 90.0]])]


def test_rotation_convention_is_resires_zyx_with_theta_about_y():
    rng = np.random.default_rng(1)
    ang = rng.uniform(-180, 180, (20, 3))
    np.testing.assert_allclose(rotation_matrices(ang), scipy_matrices(ang), atol=1e-12)
    # RESIRE's own formula (its quaternion helper, axes z, y, x) is Mᵀ
    for a in ang[:5]:
        np.testing.assert_allclose(resire_R(*a), rotation_matrices(a[None])[0].T, atol=1e-12)
    # ZYZ (GENFIRE-style angles) stays available, and differs when psi is not 0
    np.testing.assert_allclose(rotation_matrices(ang, "zyz"), scipy_matrices(ang, "ZYZ"), atol=1e-12)
    assert not np.allclose(rotation_matrices(ang, "zyz"), rotation_matrices(ang))
    # single tilt: u = x cos(theta) - z sin(theta), v = y (RESIRE's Radon form)
    t = np.deg2rad(25.0)
    M = rotation_matrices([25.0])[0]
    r = np.array([1.3, -0.7, 2.1])
    np.testing.assert_allclose((M.T @ r)[:2], [r[0] * np.cos(t) - r[2] * np.sin(t), r[1]])


@pytest.mark.parametrize("angles", ANGLE_SETS, ids=["tilts", "euler", "90deg"])
def test_backprojector_is_the_adjoint(angles):
    rng = np.random.default_rng(2)
    vol = rng.random((13, 17, 19))
    b = rng.standard_normal((len(angles), 15, 21))
    lhs = np.vdot(project(vol, angles, (15, 21)), b)
    rhs = np.vdot(vol, backproject(b, angles, vol.shape))
    assert abs(lhs) > 1.0
    assert abs(lhs - rhs) <= 1e-5 * abs(lhs)


def test_projection_at_zero_tilt_is_the_sum_along_the_beam():
    rng = np.random.default_rng(3)
    vol = rng.random((11, 17, 19))
    np.testing.assert_allclose(project(vol, [0.0])[0], vol.sum(axis=0), rtol=1e-12)
    # a larger detector: the sum sits centred, (21 // 2 - 17 // 2, 25 // 2 - 19 // 2) = (2, 3)
    big = project(vol, [[0.0, 0.0, 0.0]], (21, 25))[0]
    np.testing.assert_allclose(big[2:19, 3:22], vol.sum(axis=0), rtol=1e-12)
    assert big.sum() == pytest.approx(vol.sum(), rel=1e-12)
    # theta = 90°: u = -z, v = y, the sum along x with z reversed
    p90 = project(vol, [90.0], (17, 11))[0]
    np.testing.assert_allclose(p90, vol.sum(axis=2).T[:, ::-1], rtol=1e-12)


def test_projector_matches_brute_force_and_keeps_mass_and_centroid():
    rng = np.random.default_rng(4)
    vol = np.zeros((15, 16, 17))
    vol[4:11, 5:11, 4:12] = rng.random((7, 6, 8))      # well inside: no mass leaves
    angles = np.array([[0.0, -63.0, 0.0], [17.0, 41.0, -80.0], [-150.0, 8.5, 33.0]])
    p = project(vol, angles, (19, 21))
    np.testing.assert_allclose(p, dense_project(vol, angles, (19, 21)), atol=1e-12)
    # bilinear splatting keeps the mass and the first moments: the centroid of each
    # projection is (Mᵀ c)[:2] for the volume's centroid c
    z, y, x = np.indices(vol.shape)
    c = np.array([(x * vol).sum(), (y * vol).sum(), (z * vol).sum()]) / vol.sum() \
        - np.array([17 // 2, 16 // 2, 15 // 2])
    rows, cols = np.indices((19, 21))
    for pi, M in zip(p, scipy_matrices(angles)):
        assert pi.sum() == pytest.approx(vol.sum(), rel=1e-12)
        centroid = np.array([(cols * pi).sum(), (rows * pi).sum()]) / pi.sum() - [10, 9]
        np.testing.assert_allclose(centroid, (M.T @ c)[:2], atol=1e-9)


def test_emulator_tilt_t_is_theta_minus_t():
    spec = make_specimen("pt-particle", size_A=10.0)
    c = spec.centre
    for t in (-60.0, 25.0):
        tilted = spec.rotated(t).positions - c
        uv = (spec.positions - c) @ rotation_matrices([-t])[0]   # (Mᵀ r) for each atom
        np.testing.assert_allclose(uv[:, :2], tilted[:, :2], atol=1e-12)


def test_extended_volume_covers_every_ray_of_a_film():
    # single tilt: half-width (w // 2) / cos(t) + (nz // 2) tan(t)
    shape = extended_volume_shape((31, 41), [-74.3, 0.0, 66.4], 21)
    t = np.deg2rad(74.3)
    assert shape == (21, 31, 2 * int(np.ceil(20 / np.cos(t) + 10 * np.tan(t))) + 1)
    assert extended_volume_shape((31, 41), [0.0], 21) == (21, 31, 41)
    with pytest.raises(ValueError, match="90"):
        extended_volume_shape((31, 41), [90.0], 21)


# ------------------------------------------------------------------ alignment

def test_alignment_recovers_known_shifts():
    pos = fcc_particle(12.0)
    tilts = np.arange(-60.0, 60.1, 6.0)
    rng = np.random.default_rng(5)
    applied = rng.uniform(-3.0, 3.0, (len(tilts), 2))             # (dy, dx) px
    clean = analytic_projections(pos, euler(tilts), (53, 53))
    shifted = analytic_projections(pos, euler(tilts), (53, 53), shifts_px=applied)

    com = align_projections(shifted, tilts, method="com")
    np.testing.assert_allclose(com.shifts_px, -applied, atol=0.05)
    np.testing.assert_allclose(com.projections, clean, atol=0.02 * clean.max())

    xc = align_projections(shifted, tilts, method="xcorr")
    ref = xc.reference
    assert tilts[ref] == 0.0
    np.testing.assert_allclose(xc.shifts_px - xc.shifts_px[ref], -(applied - applied[ref]),
                               atol=0.25)

    both = align_projections(shifted, tilts)                         # "com+xcorr"
    np.testing.assert_allclose(both.shifts_px, -applied, atol=0.25)


def test_shift_images_whole_pixels_is_a_zero_filled_roll():
    rng = np.random.default_rng(6)
    im = rng.random((2, 9, 12))
    out = shift_images(im, [[2, -3], [-1, 0]])
    want0 = np.zeros((9, 12))
    want0[2:, :9] = im[0, :7, 3:]
    want1 = np.zeros((9, 12))
    want1[:8] = im[1, 1:]
    np.testing.assert_allclose(out[0], want0, atol=1e-12)
    np.testing.assert_allclose(out[1], want1, atol=1e-12)


# ------------------------------------------------------------------ RESIRE + tracing

def _reconstruct_and_trace(size_A, n, iterations, noise, seed):
    truth = fcc_particle(size_A)
    b = analytic_projections(truth, euler(TILTS), (n, n))
    b += noise * b.max() * np.random.default_rng(seed).standard_normal(b.shape)
    rec = resire(b, TILTS, iterations=iterations)
    atoms = trace_atoms(rec.volume, VOX, atom_sigma_A=0.45)
    return truth, b, rec, atoms


def test_resire_reconstructs_a_pt_particle_that_traces_to_its_atoms():
    truth, b, rec, atoms = _reconstruct_and_trace(12.0, 40, 40, 0.02, 7)   # 147 atoms
    assert rec.volume.shape == (40, 40, 40) and rec.volume.min() >= 0
    assert (np.diff(rec.r_factor) < 0).all()
    assert rec.r_factor[-1] < 0.5 * rec.r_factor[0]
    assert rec.step == pytest.approx(1.0 / (len(TILTS) * 40))
    # the reported R-factor is Σ|ΠO − b| / Σ|b| of the final volume (brute-force projector)
    assert rec.r_factor[-1] == pytest.approx(
        r_factor(dense_project(rec.volume, euler(TILTS), (40, 40)), b), rel=1e-9)
    found, false, rms = match_atoms(atoms.positions_A, truth, 0.3)
    print(f"R {rec.r_factor[0]:.3f} -> {rec.r_factor[-1]:.3f}; {len(truth)} atoms: found "
          f"{found:.3f}, false {false:.3f}, rms {rms:.3f} Å")
    assert found >= 0.98 and false < 0.02


@pytest.mark.slow
def test_resire_bigger_particle_with_more_noise():
    truth, b, rec, atoms = _reconstruct_and_trace(20.0, 64, 100, 0.05, 8)  # 561 atoms
    assert (np.diff(rec.r_factor[:20]) < 0).all()
    found, false, rms = match_atoms(atoms.positions_A, truth, 0.3)
    print(f"R {rec.r_factor[-1]:.3f}; {len(truth)} atoms: found {found:.3f}, false {false:.3f}, "
          f"rms {rms:.3f} Å")
    assert found >= 0.98 and false < 0.02


@pytest.mark.slow
def test_emulated_tilt_series_reconstructs_and_traces():
    """ADF images counted from the emulator's events (dense, per frame) of a Pt particle with
    one corner cut off (no mirror symmetry, so the tilt sign is tested too)."""
    from dataclasses import replace

    from sim_detector.simulate import Beam, Detector, ScanSpec, simulate_scan

    full = make_specimen("pt-particle", size_A=12.0, shape="cuboctahedron")
    p = full.positions - full.centre
    sel = ~((p[:, 2] > 2.0) & (p[:, 0] > 1.0))
    spec = replace(full, positions=full.positions[sel], Z=full.Z[sel], grain=full.grain[sel])
    n = 49
    images = []
    for i, t in enumerate(TILTS):
        sim = simulate_scan(spec, Beam(dose=200.0), Detector(shape=(64, 64)),
                            ScanSpec(shape=(n, n), step_A=VOX), seed=i, tilt_deg=float(t),
                            with_expected=False)
        _, adf = sim.truth.detector_masks()
        frame = np.repeat(np.arange(len(sim.counts)), sim.counts)
        images.append(np.bincount(frame, weights=adf.ravel()[sim.indices],
                                  minlength=len(sim.counts)).reshape(n, n))
    images = np.array(images)
    truth = spec.positions - spec.centre
    aligned = align_projections(images, -TILTS, method="com")
    assert np.abs(aligned.shifts_px).max() < 1.0      # the emulator centres every scan
    rec = resire(aligned.projections, -TILTS, iterations=100)
    assert (np.diff(rec.r_factor[:20]) < 0).all()
    atoms = trace_atoms(rec.volume, VOX, atom_sigma_A=0.45)
    found, false, rms = match_atoms(atoms.positions_A, truth, 0.3)
    print(f"emulator: R {rec.r_factor[-1]:.3f}; {len(truth)} atoms: found {found:.3f}, "
          f"false {false:.3f}, rms {rms:.3f} Å")
    assert found >= 0.98 and false < 0.02
    # the opposite tilt sign reconstructs the mirror image: hardly any atom in place
    mirrored = trace_atoms(resire(aligned.projections, TILTS, iterations=100).volume, VOX,
                           atom_sigma_A=0.45)
    assert match_atoms(mirrored.positions_A, truth, 0.3)[0] < 0.5


def _measured():
    from scipy.io import loadmat

    p = loadmat(AET / "RESIRE_example_projections.mat")["example_projections"]
    a = loadmat(AET / "RESIRE_example_angles.mat")["refined_angles"]
    return np.asarray(p, np.float64), np.asarray(a, np.float64)


def test_backprojection_equals_resires_on_matlab_arrays():
    """Projections stored as MATLAB (x, y, n), transposed to (n, y, x), back-projected here:
    the same volume as a literal port of RESIRE's interp_pj_realspace.m, transposed from
    MATLAB's (x, y, z) (angles with phi and psi not 0; ZYZ does not match)."""
    rng = np.random.default_rng(4)
    pjs = rng.random((15, 13, 4))
    angles = np.array([[12.0, -40.0, 7.0], [-30.0, 55.0, 20.0], [5.0, 10.0, -35.0], [0.0, 33.0, 0.0]])
    theirs = np.transpose(resire_backproject_matlab_order(pjs, angles, (15, 13, 11)), (2, 1, 0))
    ours = backproject(np.transpose(pjs, (2, 1, 0)), angles, (11, 13, 15))
    inner = (slice(2, -2),) * 3     # splinterp and this kernel differ only at the detector edge
    np.testing.assert_allclose(ours[inner], theirs[inner], rtol=1e-10, atol=1e-12)
    zyz = backproject(np.transpose(pjs, (2, 1, 0)), angles, (11, 13, 15), axes="zyz")
    assert np.abs(zyz[inner] - theirs[inner]).max() > 0.05 * np.abs(theirs).max()


def _write_matlab_series(tmp_path, pos_A, angles, shape, vox):
    """The authors' inputs: a MATLAB (x, y, n) stack and an (n, 3) angle array."""
    from scipy.io import savemat

    proj = analytic_projections(pos_A, angles, shape, vox=vox)           # (n, y, x)
    savemat(tmp_path / "projections.mat", {"projections": np.transpose(proj, (2, 1, 0))})
    savemat(tmp_path / "angles.mat", {"angles": angles})
    return tmp_path / "projections.mat", tmp_path / "angles.mat"


def test_tomo_reads_the_authors_inputs_with_phi_and_psi(tmp_path):
    """A synthetic series with phi and psi up to ±35° (the shared measured series has phi =
    psi = 0 and cannot tell the conventions apart), projected analytically with RESIRE's
    rotation and written as the authors' MATLAB inputs: ``stemstream tomo --projections
    --angles`` reconstructs and traces the particle (every atom within 0.3 Å); read with
    ZYZ angles (--euler-axes zyz) the same data trace far worse."""
    import subprocess
    import sys

    import h5py

    rng = np.random.default_rng(9)
    pos = fcc_particle(8.0)                                       # 55 atoms
    pos = pos[np.argsort(pos @ [0.3, 0.5, 0.8])[:-9]]            # cut a corner: no symmetry
    n = 30
    angles = np.c_[rng.uniform(-35, 35, n), np.linspace(-65, 65, n), rng.uniform(-35, 35, n)]
    shape = (33, 33)
    proj, ang = _write_matlab_series(tmp_path, pos, angles, shape, VOX)
    results = {}
    for axes in ("zyx", "zyz"):
        out = tmp_path / axes
        r = subprocess.run([sys.executable, "-m", "stream.cli", "tomo", "--projections", f"{proj}:projections",
                            "--angles", str(ang), "--euler-axes", axes, "--voxel-size", str(VOX),
                            "--iterations", "40", "--lattice", "fcc", "--no-previews", "--out", str(out)],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "Euler axes " + axes in r.stdout
        with h5py.File(out / "projections-tomo.h5", "r") as f:
            got = f["atoms/positions_A"][()]
            assert f["reconstruction"].attrs["axes"] == axes
            assert "about the axes " + axes in f["sources/euler_deg"].attrs["unit"]
        results[axes] = match_atoms(got, pos, 0.3)   # projected about the centre voxel
        print(axes, results[axes])
    found, false, rms = results["zyx"]
    assert found == 1.0 and false == 0
    assert results["zyz"][0] < 0.7


def test_tomo_refuses_bad_matlab_inputs_in_one_line(tmp_path):
    import subprocess
    import sys
    from scipy.io import savemat

    savemat(tmp_path / "p.mat", {"p": np.zeros((9, 9, 4))})
    savemat(tmp_path / "a.mat", {"a": np.arange(4.0)})
    savemat(tmp_path / "a3.mat", {"a": np.zeros((5, 3))})

    def run(*args):
        return subprocess.run([sys.executable, "-m", "stream.cli", "tomo", *map(str, args), "--out",
                               str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    for args, words in ((("--projections", tmp_path / "p.mat", "--angles", tmp_path / "a.mat"), "--tilt-only"),
                        (("--projections", tmp_path / "p.mat", "--angles", tmp_path / "a3.mat"), "(4, 3)"),
                        (("--projections", tmp_path / "p.mat:q", "--angles", tmp_path / "a3.mat"), "no numeric variable 'q'"),
                        (("--projections", tmp_path / "p.mat"), "go together"),
                        (("--projections", tmp_path / "p.mat", "--angles", tmp_path / "a.mat", "--euler-axes", "zyq"), "axes")):
        r = run(*args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and words in r.stderr, (args, r.stderr)


@needs_tilt_series
def test_measured_tilt_series_r_factor_falls():
    p, angles = _measured()
    assert p.shape == (61, 61, 59) and angles.shape == (59, 3)
    stack = np.transpose(p, (2, 1, 0))         # MATLAB (x, y, n) -> (n, y, x); y = tilt axis
    shape = (61, 61, 121)                       # a film: wider than the field of view in x
    rec = resire(stack, angles, iterations=10, volume_shape=shape)
    print("measured R-factor:", np.round(rec.r_factor, 4))
    assert (np.diff(rec.r_factor) < 0).all()
    assert rec.r_factor[-1] < 0.6 * rec.r_factor[0]
    # the convention check: the same data read with the axes swapped (tilt axis along x)
    # cannot be explained as well
    swapped = resire(np.transpose(p, (2, 0, 1)), angles, iterations=10, volume_shape=shape)
    print("axes swapped:", np.round(swapped.r_factor, 4))
    assert swapped.r_factor[-1] > 1.3 * rec.r_factor[-1]


@needs_tilt_series
@pytest.mark.slow
def test_measured_tilt_series_in_the_full_extended_volume():
    p, angles = _measured()
    stack = np.transpose(p, (2, 1, 0))
    shape = extended_volume_shape(stack.shape[1:], angles, 61)
    assert shape == (61, 61, 437)               # RESIRE's objectsize for this series
    rec = resire(stack, angles, iterations=50, volume_shape=shape)
    print("measured, extended volume:", np.round(rec.r_factor[[0, 9, 19, 49]], 4))
    assert (np.diff(rec.r_factor) < 0).all()
    assert rec.r_factor[-1] < 0.05


# ------------------------------------------------------------------ plot and errors

def test_r_factor_plot_is_a_png(tmp_path):
    import matplotlib.image

    path = plot_r_factor(np.linspace(0.5, 0.1, 30), tmp_path / "sub" / "r.png")
    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(path)
    assert img.shape[0] > 100 and img.shape[1] > 100
    with pytest.raises(ValueError, match="empty"):
        plot_r_factor([], tmp_path / "empty.png")


def test_bad_input_raises_clear_errors():
    vol = np.zeros((5, 5, 5))
    with pytest.raises(ValueError, match="3-D"):
        project(np.zeros((5, 5)), [0.0])
    with pytest.raises(ValueError, match=r"\(n, 3\)"):
        project(vol, np.zeros((3, 2)))
    with pytest.raises(ValueError, match="finite"):
        project(vol, [np.nan])
    with pytest.raises(ValueError, match="axes"):
        project(vol, [0.0], axes="zyq")
    with pytest.raises(ValueError, match="2 angle triplets for 3 projections"):
        backproject(np.zeros((3, 5, 5)), [0.0, 1.0], (5, 5, 5))
    b = np.ones((2, 5, 5))
    with pytest.raises(ValueError, match="step_scale"):
        resire(b, [0.0, 10.0], step_scale=5.0)
    with pytest.raises(ValueError, match="iterations"):
        resire(b, [0.0, 10.0], iterations=0)
    with pytest.raises(ValueError, match="NaN"):
        resire(np.full((2, 5, 5), np.nan), [0.0, 10.0])
    with pytest.raises(ValueError, match="initial"):
        resire(b, [0.0, 10.0], initial=np.zeros((4, 4, 4)))
    with pytest.raises(ValueError, match="method"):
        align_projections(b, [0.0, 10.0], method="fourier")
    with pytest.raises(ValueError, match="shifts_px"):
        shift_images(b, np.zeros((3, 2)))
