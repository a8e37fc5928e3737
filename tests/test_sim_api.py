"""The emulator's public API: presets, metadata, tilt semantics, geometry, errors."""

import msgpack
import numpy as np
import pytest

from sim_detector.simulate import (Beam, Detector, ScanSpec, SimulatedScan, presets,
                                   simulate_scan)
from conftest import TA_MODEL, needs_shared_data
from sim_detector.specimens import SPECIMENS, make_specimen

SMALL = dict(detector=Detector(shape=(48, 48), mrad_per_px=1.0), scan=ScanSpec(shape=(6, 7)))


def test_presets_cover_every_specimen_and_build():
    for name in SPECIMENS + ("some_file.xyz",):
        p = presets(name)
        assert set(p) == {"beam", "detector", "scan"}
        Beam(**p["beam"]), Detector(**p["detector"]), ScanSpec(**p["scan"])
    assert presets("cluster")["beam"]["convergence_mrad"] < presets("mgo")["beam"]["convergence_mrad"]
    # presets are copies: editing one does not change the next
    presets("mgo")["beam"]["dose"] = -1
    assert presets("mgo")["beam"]["dose"] > 0


def test_metadata_is_msgpack_plain_and_complete():
    spec = make_specimen("pt-particle", size_A=10.0)
    sim = simulate_scan(spec, Beam(dose=30.0), Detector(shape=(48, 48), mrad_per_px=1.0,
                                                        hot_pixels=2, dead_pixels=2, dark_rate=1.0),
                        ScanSpec(shape=(6, 7), frames_per_position=2, flyback=1), seed=3,
                        tilt_deg=12.0)
    md = sim.metadata
    assert msgpack.unpackb(msgpack.packb(md)) == md
    for key in ("beam_energy_keV", "convergence_mrad", "probe_fwhm_A", "mrad_per_px",
                "scan_step_A", "dose_e_per_frame", "specimen", "tilt_deg", "seed",
                "detector_effects", "bf_radius_px", "adf_inner_px", "adf_outer_px",
                "optical_axis_yx_px", "frames_per_position", "flyback"):
        assert key in md, key
    assert md["tilt_deg"] == 12.0 and md["seed"] == 3 and md["dose_e_per_frame"] == 30.0
    assert md["probe_fwhm_A"] == pytest.approx(0.5145 * 0.0196875 / 0.020, rel=1e-3)
    assert md["bf_radius_px"] == 20.0
    assert len(md["detector_effects"]["hot_pixels"]) == 2
    assert isinstance(sim, SimulatedScan)
    assert sim.scan_shape == (6, 7) and sim.frame_shape == (48, 48)
    assert len(sim.counts) == 6 * 8 * 2
    assert sim.truth.expected["total"].shape == (6, 7)


def test_tilt_is_absolute():
    spec = make_specimen("pt-particle", size_A=10.0)
    a = simulate_scan(spec, Beam(dose=20.0), **SMALL, seed=1, tilt_deg=30.0)
    b = simulate_scan(spec.rotated(30.0), Beam(dose=20.0), **SMALL, seed=1, tilt_deg=30.0)
    c = simulate_scan(spec.rotated(30.0), Beam(dose=20.0), **SMALL, seed=1)
    for other in (b, c):
        np.testing.assert_array_equal(a.indices, other.indices)
        np.testing.assert_allclose(a.truth.positions, other.truth.positions, atol=1e-12)
        assert other.metadata["tilt_deg"] == 30.0
    np.testing.assert_allclose(a.truth.positions, spec.rotated(30.0).positions, atol=1e-12)
    d = simulate_scan(spec, Beam(dose=20.0), **SMALL, seed=1)
    assert d.metadata["tilt_deg"] == 0.0
    assert not np.allclose(d.truth.positions, a.truth.positions)


def test_default_scan_fits_specimen_at_every_tilt():
    spec = make_specimen("pt-particle", size_A=16.0)
    steps, origins = set(), set()
    for t in (-60.0, 0.0, 45.0):
        sim = simulate_scan(spec, Beam(dose=5.0), Detector(shape=(32, 32), mrad_per_px=2.0),
                            ScanSpec(shape=(20, 24)), tilt_deg=t)
        s = sim.truth.scan
        steps.add(s["step_A"])
        origins.add((s["origin_x_A"], s["origin_y_A"]))
        x = sim.truth.positions[:, 0]
        y = sim.truth.positions[:, 1]
        assert x.min() >= s["origin_x_A"] and x.max() <= s["origin_x_A"] + 23 * s["step_A"]
        assert y.min() >= s["origin_y_A"] and y.max() <= s["origin_y_A"] + 19 * s["step_A"]
    assert len(steps) == 1 and len(origins) == 1  # one geometry for the whole tilt series


def test_scan_geometry_is_as_stated():
    spec = make_specimen("pt-particle", size_A=10.0)
    sim = simulate_scan(spec, Beam(dose=5.0), Detector(shape=(32, 32), mrad_per_px=2.0),
                        ScanSpec(shape=(5, 9), step_A=0.7, centre_A=(1.0, -2.0)))
    s = sim.truth.scan
    assert s["step_A"] == 0.7
    assert s["origin_x_A"] == pytest.approx(1.0 - 4 * 0.7)
    assert s["origin_y_A"] == pytest.approx(-2.0 - 2 * 0.7)
    assert sim.metadata["scan_origin_A"] == [s["origin_x_A"], s["origin_y_A"]]


@pytest.mark.parametrize("kwargs, match", [
    (dict(beam=Beam(dose=-1.0)), "dose"),
    (dict(beam=Beam(convergence_mrad=0.0)), "convergence"),
    (dict(detector=Detector(shape=(0, 10))), "detector shape"),
    (dict(detector=Detector(shape=(8, 8), hot_pixels=40, dead_pixels=40)), "fit on the detector"),
    (dict(scan=ScanSpec(shape=(4, 4), frames_per_position=0)), "frames_per_position"),
    (dict(scan=ScanSpec(shape=(4, 4), step_A=-1.0)), "scan step"),
])
def test_bad_settings_raise_clear_errors(kwargs, match):
    spec = make_specimen("pt-particle", size_A=8.0)
    args = dict(beam=Beam(), detector=Detector(shape=(16, 16), mrad_per_px=2.0),
                scan=ScanSpec(shape=(4, 4)))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        simulate_scan(spec, **args)


@needs_shared_data
def test_cli_style_parameters():
    # one size_A for every built-in specimen (the CLI's --size)
    for name in SPECIMENS:
        s = make_specimen(name, size_A=14.0)
        assert len(s.Z) > 10
    with pytest.raises(ValueError, match="do not apply to a file"):
        make_specimen(str(TA_MODEL), size_A=3.0)


@pytest.mark.slow
def test_generation_speed_requirement():
    """256 x 256 positions at 200 e-/frame on 576 x 576 in under 30 s, warm."""
    import time

    spec = make_specimen("mgo")
    p = presets("mgo")
    args = (spec, Beam(**{**p["beam"], "dose": 200.0}), Detector(**p["detector"]),
            ScanSpec(**{**p["scan"], "shape": (256, 256)}))
    simulate_scan(*args)  # warm (numba compilation)
    t = time.perf_counter()
    sim = simulate_scan(*args)
    dt = time.perf_counter() - t
    assert len(sim.counts) == 65536 and sim.counts.mean() > 190
    assert dt < 30.0, dt
