"""The stage hand-off: stages run on finished scans (live on the cluster, after process-file,
or offline with `stemstream analyze`), write /stages/<name> into the scan file, and a failing
stage leaves the scan's own results intact."""

from __future__ import annotations

import subprocess
import sys

import h5py
import numpy as np
import pytest

from stream.config import ConfigError, PipelineConfig, StagesSpec, load_config, validate
from stream.stages.runner import run_stages
from test_recording import GEOM as REC_GEOM
from test_recording import events, stored, write_stemstream


def gaussian_phase(ny=48, nx=48, step=8.0, sigma=1.6):
    """A lattice of Gaussian bumps and its analytic gradient (the CoM field, in px)."""
    yy, xx = np.mgrid[:ny, :nx].astype(float)
    phi = np.zeros((ny, nx))
    gy, gx = np.zeros((ny, nx)), np.zeros((ny, nx))
    for cy in np.arange(step / 2, ny, step):
        for cx in np.arange(step / 2, nx, step):
            g = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma ** 2))
            phi += g
            gy += -(yy - cy) / sigma ** 2 * g
            gx += -(xx - cx) / sigma ** 2 * g
    return phi, gy, gx


def scan_with_results(path, results: dict):
    counts, indices = events(REC_GEOM)
    write_stemstream(path, stored(counts, indices, REC_GEOM), REC_GEOM)
    with h5py.File(path, "r+") as f:
        for name, data in results.items():
            f["results"].create_dataset(name, data=data)
    return path


def test_phase_stage_writes_into_the_file_and_a_failing_stage_changes_nothing(tmp_path):
    phi, gy, gx = gaussian_phase()
    adf = phi * 100
    path = scan_with_results(tmp_path / "scan.h5", {"com_y": gy, "com_x": gx, "adf": adf})
    reports = run_stages(path, ["phase", "counting", "columns"],
                         {"phase": {"rotation_deg": 0.0, "flip": False}, "columns": {"image": "haadf"}})
    assert [(r.name, r.status) for r in reports] == [("phase", "ok"), ("columns", "failed"), ("counting", "skipped")]
    assert "needs the result 'haadf'" in reports[1].error and "adf, com_x, com_y" in reports[1].error
    assert "columns" in reports[2].error
    with h5py.File(path, "r") as f:
        got = f["stages/phase/phase"][()]
        assert f["stages/phase"].attrs["status"] == "ok" and f["stages/columns"].attrs["status"] == "failed"
        np.testing.assert_array_equal(f["results/adf"][()], adf)  # the scan's own results untouched
    corr = np.corrcoef(got.ravel(), (phi - phi.mean()).ravel())[0, 1]
    assert corr > 0.99
    assert (tmp_path / "previews" / "scan_stage_phase_phase.png").is_file()


def test_stages_run_again_replace_their_group(tmp_path):
    phi, gy, gx = gaussian_phase()
    path = scan_with_results(tmp_path / "scan.h5", {"com_y": gy, "com_x": gx})
    run_stages(path, ["phase"], {"phase": {"rotation_deg": 0.0, "flip": False}}, previews=False)
    run_stages(path, ["phase"], {"phase": {"rotation_deg": 180.0, "flip": False}}, previews=False)
    with h5py.File(path, "r") as f:
        assert f["stages/phase"].attrs["rotation_deg"] % 360 == 180.0
        assert np.corrcoef(f["stages/phase/phase"][()].ravel(), phi.ravel())[0, 1] < -0.99


@pytest.mark.parametrize("text, words", [
    ('[stages]\nrun = ["phaze"]\n', "unknown stage 'phaze'"),
    ('[stages]\nrun = ["phase"]\n[stages.phase]\nrotation = 3\n', "unknown parameter(s) rotation"),
    ('[stages]\nrun = "phase"\n', "run must be a list of stage names"),
    ('[stages]\nrun = []\n[stages.tomo]\nx = 1\n', "[stages.tomo] is not a stage"),
])
def test_stage_configuration_errors(tmp_path, text, words):
    (tmp_path / "p.toml").write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "p.toml")
    assert words in str(e.value)


def test_stages_run_after_a_live_scan(client2, scripted_source, tmp_path):
    """A live scan of the emulator's MgO: the configured stages run on the cluster after the
    file is written; their output lands in the file."""
    from dataclasses import replace

    from stream.session import Session
    from test_pipeline import GEOM, config, emulated_events
    counts, indices = emulated_events(seed=1, dose=80)
    cfg = config(tmp_path, previews=True)  # previews are drawn before the stages start: no gap for wait_stages
    cfg = validate(replace(cfg, stages=StagesSpec(["phase"], {"phase": {}})), base=tmp_path)
    src = scripted_source(1)
    with Session(src.addresses, config=cfg, client=client2, console=False) as s:
        src.wait_for_receivers()
        src.start("staged", GEOM, {"scan_step_A": 0.3})
        src.frames("staged", GEOM, counts, indices)
        src.end("staged", GEOM.n_frames)
        r = s.wait("staged", timeout=60)
        reports = s.wait_stages("staged", timeout=120)
    assert [(x.name, x.status) for x in reports] == [("phase", "ok")], reports
    with h5py.File(r.path, "r") as f:
        assert f["stages/phase/phase"].shape == GEOM.scan_shape
        assert np.isfinite(f["stages/phase/phase"][()]).all()


def test_analyze_on_the_command_line(tmp_path):
    phi, gy, gx = gaussian_phase()
    path = scan_with_results(tmp_path / "scan.h5", {"com_y": gy, "com_x": gx})

    def run(*args):
        return subprocess.run([sys.executable, "-m", "stream.cli", "analyze", *map(str, args)],
                              capture_output=True, text=True, timeout=120)
    p = run(path, "--stage", "phase")
    assert p.returncode == 0 and "[scan] stage phase: phase" in p.stdout, p.stderr
    p = run(path, "--stage", "columns")  # no adf in this scan
    assert p.returncode == 1 and "stage columns failed" in p.stderr and "'adf'" in p.stderr
    p = run(path)
    assert p.returncode == 2 and "no stage to run" in p.stderr
    p = run(tmp_path / "none.h5", "--stage", "phase")
    assert p.returncode == 2 and "none.h5: no such file" in p.stderr


def test_grains_stage_after_a_live_scan_of_the_cluster_specimen(client2, scripted_source, tmp_path):
    """The emulator's nanocrystal cluster streamed through the pipeline with [stages] run =
    ["grains"]: every grain found, indexed to its phase and lattice (the emulator's truth),
    the per-grain peak table written as HDF5 and CSV."""
    from dataclasses import replace
    from types import SimpleNamespace

    from stream.config import OutputSpec
    from stream.transport.protocol import Geometry
    from stream.session import Session
    from test_stage_grains import check_against_truth, emulated_cluster
    _, sim, _ = emulated_cluster(seed=0)
    g = Geometry(sim.scan_shape, sim.frame_shape, mrad_per_px=0.2, convergence_mrad=2.5)
    cfg = validate(replace(PipelineConfig(), output=OutputSpec(dir=str(tmp_path), previews=False),
                           stages=StagesSpec(["grains"], {})))
    src = scripted_source(2)
    with Session(src.addresses, config=cfg, client=client2, console=False) as s:
        src.wait_for_receivers()
        src.start("cluster", g, {"beam_energy_keV": 300.0})
        src.frames("cluster", g, sim.counts, sim.indices, batch=256)
        src.end("cluster", g.n_frames)
        r = s.wait("cluster", timeout=60)
        reports = s.wait_stages("cluster", timeout=180)
    assert [(x.name, x.status) for x in reports] == [("grains", "ok")], reports
    with h5py.File(r.path, "r") as f:
        grp = f["stages/grains"]
        values = {k: (d.asstr()[()] if h5py.check_string_dtype(d.dtype) else d[()])
                  for k, d in grp.items() if isinstance(d, h5py.Dataset)}
        values.update({k: v for k, v in grp.attrs.items()})
        values["n_grains"] = len(values["grain_n_positions"])
        assert len(grp["table_peaks/d_A"]) == len(values["peak_grain"]) > 0
    check_against_truth(SimpleNamespace(**values), sim)
    assert (tmp_path / "cluster_grains_peaks.csv").read_text().startswith("grain,phase,")
