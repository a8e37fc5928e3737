"""Replay: a recorded scan published again by `stemstream replay` (a real process) through the
same pipeline (a real cluster) gives the live run's results bit for bit; stempy files replay;
a bad file publishes nothing."""

from __future__ import annotations

import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import zmq

from conftest import dense_scan
from stream.config import (ChunkingSpec, DetectorSpec, OutputSpec, PipelineConfig, ScanSpec,
                           VirtualSpec, validate)
from stream.transport.net import free_port_block
from stream.transport.protocol import Geometry
from stream.session import Session
from test_pipeline import BF_R, GEOM, assert_matches, config, reference, synthetic_events
from test_recording import write_stempy


def replay(args, timeout=120):
    """Run `stemstream replay ARGS` in its own process; (exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, "-m", "stream.cli", "replay", *map(str, args)],
                       capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def datasets(path, group):
    with h5py.File(path, "r") as f:
        return {name: d[()] for name, d in f[group].items()}


def assert_same_file_contents(a, b):
    for group in ("results", "completeness"):
        da, db = datasets(a, group), datasets(b, group)
        assert sorted(da) == sorted(db), group
        for name in da:
            assert da[name].dtype == db[name].dtype, name
            assert da[name].tobytes() == db[name].tobytes(), f"/{group}/{name} differs"  # bit for bit
    for group in ("events",):
        da, db = datasets(a, group), datasets(b, group)
        for name in da:
            np.testing.assert_array_equal(da[name], db[name])


def live_scan_with_gaps(client, src, tmp_path):
    """A live scan over 2 sources where frames 30-41 never arrive, frames 50-53 arrive twice,
    and source 1's part of frames 60-63 never arrives."""
    counts, indices = synthetic_events(GEOM, seed=11)
    from sim_detector.publisher import prepare_sources
    from stream.transport.protocol import encode_frames
    sent = np.setdiff1d(np.arange(GEOM.n_frames), np.r_[30:42, 60:64])
    with Session(src.addresses, config=config(tmp_path / "live", timeout_s=1.5), client=client,
                 console=False) as s:
        src.wait_for_receivers()
        src.start("gappy", GEOM)
        src.frames("gappy", GEOM, counts, indices, only=sent)
        src.frames("gappy", GEOM, counts, indices, only=range(50, 54))
        part = prepare_sources(counts, indices, GEOM, 2)[0]  # source 0 alone for frames 60-63
        a, b = part.offsets[60], part.offsets[64]
        src.send(0, encode_frames("gappy", 0, part.geometry, 60, part.counts[60:64], part.indices[a:b]))
        src.end("gappy", GEOM.n_frames)
        r = s.wait("gappy", timeout=60)
    assert r.n_missing == 16 and r.n_duplicated == 4  # the live run saw the gaps
    # and its results are right: frames 60-63 hold source 0's rows (0-19 of 40) only
    whole, part = np.ones(GEOM.n_frames, bool), np.zeros(GEOM.n_frames, bool)
    whole[np.r_[30:42, 60:64]] = False
    part[60:64] = True
    d_part = dense_scan(counts, indices, GEOM, keep=part)
    d_part[..., 20:, :] = 0
    d = dense_scan(counts, indices, GEOM, keep=whole) + d_part
    assert_matches(r, {"diffraction_sum": d.sum((0, 1)), "bf": reference(counts, indices, GEOM, keep=whole)["bf"]
                       + (d_part * (np.hypot(*np.mgrid[:40, :36] - np.array([19.5, 17.5])[:, None, None]) <= BF_R)).sum((2, 3))})
    return r


def test_replaying_a_live_scan_gives_identical_results(client2, scripted_source, tmp_path):
    (tmp_path / "live").mkdir()
    live = live_scan_with_gaps(client2, scripted_source(2), tmp_path)
    port = free_port_block(2)
    with Session([f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{port + 1}"],
                 config=config(tmp_path / "replayed", timeout_s=1.5), client=client2, console=False) as s:
        code, out, err = replay([live.path, "--bind", f"tcp://127.0.0.1:{port}", "--rate", "max", "--wait", "60"])
        assert code == 0, err
        r = s.wait("gappy", timeout=60)
    assert "replaying the recording's gaps as they were" in out
    assert r.path.parent == tmp_path / "replayed" / "out"
    assert_same_file_contents(live.path, r.path)
    with h5py.File(r.path, "r") as f:
        assert f["metadata/replay"].attrs["file"] == str(live.path)


def test_replay_at_a_set_rate_and_in_a_loop(client2, tmp_path):
    """--rate paces the frames; --loop sends the scan again under a new id, same results."""
    g = Geometry((30, 40), (24, 24), center=(11.5, 11.5))
    counts, indices = synthetic_events(g, seed=2, dose=20)
    from test_recording import stored, write_stemstream
    path = write_stemstream(tmp_path / "rec.h5", stored(counts, indices, g), g)
    port = free_port_block(1)
    cfg = validate(PipelineConfig(virtual=[VirtualSpec(name="bf", shape="disk", radius_px=6.0)],
                                  output=OutputSpec(dir=str(tmp_path / "out"), previews=False),
                                  scan=ScanSpec(timeout_s=2.0)))
    with Session([f"tcp://127.0.0.1:{port}"], config=cfg, client=client2, console=False) as s:
        p = subprocess.Popen([sys.executable, "-m", "stream.cli", "replay", str(path), "--bind",
                              f"tcp://127.0.0.1:{port}", "--rate", "600", "--loop"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            first = s.wait("rec", timeout=60)
            second = s.wait("rec-loop1", timeout=60)
        finally:
            p.terminate()
            out, _ = p.communicate(timeout=30)
    d = dense_scan(counts, indices, g)
    yy, xx = np.mgrid[:24, :24]
    bf = (d * (np.hypot(yy - 11.5, xx - 11.5) <= 6.0)).sum((2, 3))
    for r in (first, second):
        np.testing.assert_array_equal(r.results["bf"], bf)
    sent = [line for line in out.splitlines() if line.startswith("[rec] sent")]
    rate = float(sent[0].split("(")[1].split(" frames/s")[0].replace(",", ""))
    assert 500 < rate < 620, sent  # 1,200 frames at 600 frames/s take 2 s


@pytest.mark.parametrize("flyback", [0, 1])
def test_a_stempy_file_replays_through_the_pipeline(client2, tmp_path, flyback):
    """A stempy v3 file (flyback column or not, 2 frames per position) gives the results of a
    dense numpy computation over its events."""
    g = Geometry((12, 10), (40, 36), frames_per_position=2, flyback=flyback, center=(19.5, 17.5))
    counts, indices = synthetic_events(g, seed=5)
    path = write_stempy(tmp_path / "s.h5", counts, indices, 10 + flyback, 12, (40, 36))
    port = free_port_block(2)
    cfg = validate(PipelineConfig(detector=DetectorSpec(center=[19.5, 17.5]),
                                  virtual=[VirtualSpec(name="bf", shape="disk", radius_px=8.0)],
                                  chunking=ChunkingSpec(max_frames=64),
                                  output=OutputSpec(dir=str(tmp_path / "out"), previews=False),
                                  scan=ScanSpec(timeout_s=2.0)))
    with Session([f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{port + 1}"], config=cfg,
                 client=client2, console=False) as s:
        code, out, err = replay([path, "--bind", f"tcp://127.0.0.1:{port}", "--sources", "2", "--rate", "max",
                                 "--flyback", flyback, "--wait", "60"])
        assert code == 0, err
        r = s.wait("s", timeout=60)
    assert r.status == "complete" and r.frames_received == g.n_frames
    d = dense_scan(counts, indices, g)
    yy, xx = np.mgrid[:40, :36]
    np.testing.assert_array_equal(r.results["bf"], (d * (np.hypot(yy - 19.5, xx - 17.5) <= 8.0)).sum((2, 3)))
    np.testing.assert_array_equal(r.results["diffraction_sum"], d.sum((0, 1)))


def test_a_bad_file_is_refused_and_nothing_is_published(tmp_path):
    from test_recording import events, stored, write_stemstream
    g = Geometry((6, 5), (16, 12))
    counts, indices = events(g)
    good = write_stemstream(tmp_path / "good.h5", stored(counts, indices, g), g)
    bad = write_stemstream(tmp_path / "bad.h5", stored(counts, indices, g), g)
    with h5py.File(bad, "r+") as f:
        idx = f["events/indices"][()]
        idx[-1] = 999
        del f["events/indices"]
        f["events"].create_dataset("indices", data=idx)
    port = free_port_block(1)
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.connect(f"tcp://127.0.0.1:{port}")
    try:
        code, out, err = replay([bad, "--bind", f"tcp://127.0.0.1:{port}", "--rate", "max"])
        assert code == 2
        assert str(bad) in err and "pixel 999, outside the detector's 192 pixels" in err
        assert "nothing of this file was" in err
        code, out, err = replay([tmp_path / "nope.h5", good, "--bind", f"tcp://127.0.0.1:{port}"])
        assert code == 2 and "nope.h5: no such file" in err  # checked before anything is sent
        time.sleep(0.5)
        assert pull.poll(500) == 0  # not one message went out
    finally:
        pull.close(0)
        ctx.term()
