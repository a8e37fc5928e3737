"""process-file: the operators over recorded files on a real cluster, workers reading the file
themselves. Same results as the live run; new apertures after the fact match dense numpy."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import replace

import h5py
import numpy as np
import pytest

from conftest import dense_scan
from stream.config import ApertureSpec, ConfigError, VirtualSpec, validate
from stream.session.offline import frame_ranges, process_file
from stream.session import Session
from stream.files.storage import ScanFileError
from test_pipeline import GEOM, assert_events_stored, config, synthetic_events
from test_recording import write_stempy
from test_replay import assert_same_file_contents, datasets


@pytest.fixture(scope="module")
def live_file(client2, tmp_path_factory):
    """A scan processed live (2 sources, 2 frames per position, flyback) and its events."""
    from conftest import ScriptedSource
    tmp = tmp_path_factory.mktemp("live")
    counts, indices = synthetic_events(GEOM, seed=21)
    src = ScriptedSource(2)
    try:
        with Session(src.addresses, config=config(tmp), client=client2, console=False) as s:
            src.wait_for_receivers()
            src.start("rec", GEOM)
            src.frames("rec", GEOM, counts, indices, batch=8)
            src.end("rec", GEOM.n_frames)
            r = s.wait("rec", timeout=60)
    finally:
        src.close()
    assert r.status == "complete"
    return r.path, counts, indices


def test_frame_ranges_cover_every_frame_once():
    for n, workers in ((1, 2), (7, 2), (240, 3), (1_000_000, 2)):
        ranges = frame_ranges(n, workers, per_task=1 << 16)
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a < b for a, b in ranges) and all(b == c for (_, b), (c, _) in zip(ranges, ranges[1:]))
        assert len(ranges) >= min(n, 2 * workers) and max(b - a for a, b in ranges) <= 1 << 16


def test_process_file_gives_the_live_results(client2, live_file, tmp_path):
    path, _, _ = live_file
    cfg = config(tmp_path)  # the live run's configuration, another output directory
    r = process_file(path, cfg, client2)
    assert r.path.parent == tmp_path / "out" and r.status == "complete"
    assert_same_file_contents(path, r.path)  # results, completeness and events, bit for bit
    with h5py.File(r.path, "r") as f:
        assert f["provenance"].attrs["source_file"] == str(path)
        assert "re-analysed" in f.attrs["reason"]


def test_new_apertures_after_the_session_match_dense_numpy(client2, live_file, tmp_path):
    path, counts, indices = live_file
    cfg = config(tmp_path)
    cfg = validate(replace(cfg, virtual=cfg.virtual + [VirtualSpec(name="ring", shape="annulus", inner_px=5.0,
                                                                   outer_px=11.0)],
                           aperture=cfg.aperture + [ApertureSpec(name="corner", rect=[0, 4, 6, 10])]),
                   base=tmp_path)
    r = process_file(path, cfg, client2)
    d = dense_scan(counts, indices, GEOM)
    yy, xx = np.mgrid[:40, :36]
    rr = np.hypot(yy - 19.5, xx - 17.5)
    np.testing.assert_array_equal(r.results["ring"], (d * ((rr >= 5.0) & (rr < 11.0))).sum((2, 3)))
    np.testing.assert_array_equal(r.results["aperture_corner"], d[0:4, 6:10].sum((0, 1)))
    live = datasets(path, "results")
    for name in live:  # everything the live run had is still the same
        np.testing.assert_array_equal(r.results[name], live[name])


def test_process_file_of_a_stempy_file(client2, tmp_path):
    g = replace(GEOM, mrad_per_px=None, convergence_mrad=None, center=None)
    counts, indices = synthetic_events(g, seed=4)
    src = write_stempy(tmp_path / "stempy.h5", counts, indices, 11, 12, (40, 36))
    cfg = validate(replace(config(tmp_path), virtual=[VirtualSpec(name="bf", shape="disk", radius_px=8.0)],
                           aperture=[], detector=replace(config(tmp_path).detector, center=[19.5, 17.5])))
    r = process_file(src, cfg, client2, flyback=1)
    d = dense_scan(counts, indices, GEOM)
    yy, xx = np.mgrid[:40, :36]
    np.testing.assert_array_equal(r.results["bf"], (d * (np.hypot(yy - 19.5, xx - 17.5) <= 8.0)).sum((2, 3)))
    with h5py.File(r.path, "r") as f:  # a complete stemstream file: its events, sorted per frame
        assert f.attrs["status"] == "complete" and f["completeness"].attrs["n_missing"] == 0
    assert_events_stored(r.path, counts, indices, GEOM)


def test_bad_input_is_refused_before_any_task(client2, live_file, tmp_path):
    path, _, _ = live_file
    with pytest.raises(ScanFileError, match="no such file"):
        process_file(tmp_path / "nope.h5", config(tmp_path), client2)
    np.save(tmp_path / "small.npy", np.ones((1, 10, 10), bool))  # masks for another detector
    cfg = config(tmp_path)
    cfg = validate(replace(cfg, virtual=cfg.virtual + [VirtualSpec(name="small", shape="masks", file="small.npy")]),
                   base=tmp_path)
    with pytest.raises(ConfigError, match="small.npy"):
        process_file(path, cfg, client2)


def test_the_command_line(live_file, tmp_path):
    """`stemstream process-file` in its own process, with its own local cluster."""
    path, counts, indices = live_file
    (tmp_path / "p.toml").write_text('[[virtual]]\nname = "ring"\nshape = "annulus"\ninner_px = 5.0\n'
                                     'outer_px = 11.0\n[com]\nenabled = false\n')
    p = subprocess.run([sys.executable, "-m", "stream.cli", "process-file", str(path), str(tmp_path / "nope.h5"),
                        "--config", str(tmp_path / "p.toml"), "--out", str(tmp_path / "o"), "--workers", "1"],
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 2 and "nope.h5: no such file" in p.stderr  # checked before the cluster starts
    p = subprocess.run([sys.executable, "-m", "stream.cli", "process-file", str(path),
                        "--config", str(tmp_path / "p.toml"), "--out", str(tmp_path / "o"), "--workers", "1"],
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr
    assert "results: ring, diffraction_sum" in p.stdout
    assert "process-file: 1 file on 1 worker;" in p.stdout  # counted nouns, not "1 workers"
    rate = re.search(r"([\d,.]+) (k?)frames/s\)", p.stdout)  # not "(0 kframes/s)" for a small file
    assert rate and float(rate.group(1).replace(",", "")) > 0, p.stdout
    d = dense_scan(counts, indices, GEOM)
    rr = np.hypot(*(np.mgrid[:40, :36] - np.array([19.5, 17.5])[:, None, None]))
    with h5py.File(tmp_path / "o" / "rec.h5", "r") as f:
        np.testing.assert_array_equal(f["results/ring"][()], (d * ((rr >= 5.0) & (rr < 11.0))).sum((2, 3)))
    assert (tmp_path / "o" / "previews" / "rec_ring.png").is_file()
