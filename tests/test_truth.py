"""Ground truth: expected images against a dense independent computation, columns, file I/O."""

import numpy as np
import pytest

from sim_detector.simulate import Beam, Detector, ScanSpec, simulate_scan
from sim_detector.specimens import make_specimen
from sim_detector.truth import Truth

from test_sim_reference import dense_model, signals


def _compare(spec, beam, det, scan, tilt=0.0):
    sim = simulate_scan(spec, beam, det, scan, seed=3, tilt_deg=tilt)
    tr = sim.truth
    d = tr.detector
    rot = spec.rotated(tilt) if tilt else spec
    frames, parts = dense_model(
        rot, energy_keV=beam.energy_keV, convergence_mrad=beam.convergence_mrad, dose=beam.dose,
        mrad_per_px=det.mrad_per_px, shape=det.shape, scan_shape=scan.shape,
        step_A=scan.step_A, centre_xy=scan.centre_A, dead=d["dead_pixels"],
        hot=d["hot_pixels"], hot_rate=det.hot_rate, dark_rate=det.dark_rate,
        fwhm=beam.probe_fwhm_A)
    ref = signals(frames, det.shape, beam.convergence_mrad / det.mrad_per_px,
                  d["adf_inner_px"], d["adf_outer_px"])
    # the geometry the truth states is the one asked for
    assert d["bf_radius_px"] == pytest.approx(beam.convergence_mrad / det.mrad_per_px)
    assert d["adf_inner_px"] == pytest.approx(2 * d["bf_radius_px"])
    assert d["adf_outer_px"] == pytest.approx(min(det.shape) / 2)
    assert len(d["dead_pixels"]) == det.dead_pixels and len(d["hot_pixels"]) == det.hot_pixels
    for k in ("total", "bf", "adf"):
        np.testing.assert_allclose(tr.expected[k], ref[k], rtol=1e-9, atol=1e-12 * beam.dose,
                                   err_msg=k)
    for k in ("com_y", "com_x"):
        np.testing.assert_allclose(tr.expected[k], ref[k], rtol=1e-9, atol=1e-10, err_msg=k)
    # the test case must exercise the model: atoms under the probe, deflections, Bragg
    assert parts["S"].max() > 1e-3
    assert np.abs(parts["dx"]).max() > 0.05
    return tr, ref, frames


def test_expected_images_equal_dense_model_mgo():
    spec = make_specimen("mgo", cells=3, thickness=(2, 6), terraces=3, seed=1)
    col = spec.positions[np.argmin(((spec.positions[:, :2] - spec.centre[:2]) ** 2).sum(1))]
    tr, ref, frames = _compare(
        spec, Beam(energy_keV=300.0, convergence_mrad=20.0, dose=150.0),
        Detector(shape=(64, 64), mrad_per_px=1.5, dark_rate=2.0, hot_pixels=3, hot_rate=0.3,
                 dead_pixels=15),
        ScanSpec(shape=(6, 6), step_A=0.45, centre_A=(col[0] + 0.2, col[1] - 0.1)))
    assert tr.model["bragg_fraction"].max() > 0.003


def test_expected_images_equal_dense_model_tilted_cluster():
    spec = make_specimen("cluster", n_crystals=2, size_A=(10.0, 12.0), support_thickness_A=4.0,
                         seed=2)
    c = spec.positions[spec.grain >= 0].mean(0)
    tr, ref, frames = _compare(
        spec, Beam(energy_keV=200.0, convergence_mrad=4.0, probe_fwhm_A=2.0, dose=300.0),
        Detector(shape=(48, 56), mrad_per_px=1.0, hot_pixels=2),
        ScanSpec(shape=(5, 6), step_A=2.5, centre_A=(c[0], c[1])), tilt=15.0)
    assert tr.model["bragg_fraction"].max() > 0.005


def test_columns_and_counts_of_mgo():
    spec = make_specimen("mgo", cells=4, seed=5)
    sim = simulate_scan(spec, Beam(dose=10.0), Detector(shape=(32, 32), mrad_per_px=2.0),
                        ScanSpec(shape=(4, 4)), with_expected=False)
    cols = sim.truth.columns
    # independent grouping: [001] columns sit on an a/2 grid
    key = np.round(spec.positions[:, :2] / (4.212 / 2)).astype(int)
    _, counts = np.unique(key, axis=0, return_counts=True)
    assert sorted(cols["count"]) == sorted(counts)
    assert cols["count"].sum() == len(spec.Z)
    # scan-pixel coordinates follow the stated geometry
    s = sim.truth.scan
    np.testing.assert_allclose(cols["col_px"], (cols["x_A"] - s["origin_x_A"]) / s["step_A"])
    np.testing.assert_allclose(cols["row_px"], (cols["y_A"] - s["origin_y_A"]) / s["step_A"])


def test_truth_roundtrip(tmp_path):
    spec = make_specimen("cluster", n_crystals=2, size_A=(10.0, 12.0), support_thickness_A=3.0)
    sim = simulate_scan(spec, Beam(dose=20.0, convergence_mrad=3.0),
                        Detector(shape=(40, 40), mrad_per_px=0.5, hot_pixels=2, dead_pixels=3),
                        ScanSpec(shape=(5, 7)), seed=4, tilt_deg=-20.0)
    path = tmp_path / "truth.h5"
    sim.truth.write(path)
    back = Truth.read(path)
    t = sim.truth
    np.testing.assert_array_equal(back.positions, t.positions)
    np.testing.assert_array_equal(back.grain_map, t.grain_map)
    for k in t.expected:
        np.testing.assert_array_equal(back.expected[k], t.expected[k])
    for k in t.columns:
        np.testing.assert_array_equal(back.columns[k], t.columns[k])
    np.testing.assert_array_equal(back.detector["dead_pixels"], t.detector["dead_pixels"])
    assert back.detector["bf_radius_px"] == t.detector["bf_radius_px"]
    assert back.tilt_deg == -20.0
    assert back.metadata == t.metadata
    np.testing.assert_array_equal(back.grains[1]["lattice"], t.grains[1]["lattice"])
    # masks rebuilt from the stored geometry give back the stored images' sums
    bf, adf = back.detector_masks()
    assert bf.shape == (40, 40) and bf.sum() > 0 and adf.sum() > 0


def test_truth_read_rejects_other_files(tmp_path):
    import h5py

    p = tmp_path / "other.h5"
    with h5py.File(p, "w") as f:
        f["x"] = 1
    with pytest.raises(ValueError, match="not an emulator truth file"):
        Truth.read(p)


def test_expected_images_dense_model_large_annulus():
    """Small disks on a wide annulus: Bragg disks that lie wholly inside the ADF detector."""
    spec = make_specimen("pt-particle", size_A=10.0, zone=(0, 1, 1), seed=0)
    c = spec.centre
    tr, ref, frames = _compare(
        spec, Beam(energy_keV=300.0, convergence_mrad=4.0, probe_fwhm_A=1.2, dose=100.0),
        Detector(shape=(72, 72), mrad_per_px=0.8, dead_pixels=7, dark_rate=0.5),
        ScanSpec(shape=(5, 5), step_A=1.3, centre_A=(c[0] + 0.4, c[1])))
    off = np.hypot(*tr.grains[0]["reflections_offset_px"].T)
    r = tr.detector["bf_radius_px"]
    inside = (off - r - 2 >= 2 * r) & (off + r + 2 <= 36)
    assert inside.sum() >= 2  # disks wholly within the annulus are part of the test


def test_truth_roundtrip_without_grains_or_expected(tmp_path):
    spec = make_specimen("amorphous", size_A=12.0)
    sim = simulate_scan(spec, Beam(dose=10.0), Detector(shape=(32, 32), mrad_per_px=2.0),
                        ScanSpec(shape=(4, 5)), with_expected=False)
    sim.truth.write(tmp_path / "t.h5")
    back = Truth.read(tmp_path / "t.h5")
    assert back.grains == [] and back.expected == {}
    assert back.grain_thickness_A.shape == (0, 4, 5)
    assert np.all(back.grain_map == -1)
    np.testing.assert_array_equal(back.Z, spec.Z)
