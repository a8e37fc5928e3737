"""Real detectors, played by the peers' own simulators (LiberTEM-live: the Merlin simulator
serving a MIB file, DectrisSim replaying a SIMPLON stream dump), through our sources on a
real 2-worker cluster. Every number is compared with a dense numpy reference of the frames
that were encoded (test_sources_formats.py shows independent readers decode those files to
the same frames): events (every frame, every count), a mask image, centre-of-mass sums, the
summed pattern and completeness.
"""

from __future__ import annotations

import urllib.request
from dataclasses import replace

import h5py
import numpy as np
import pytest

from peer_sims import dectris_sim, merlin_sim
from stream.config import DetectorSpec, PipelineConfig, VirtualSpec, validate
from stream.session import Session
from stream.sources import mib, simplon
from stream.sources.merlin import MerlinControl

pytest.importorskip("libertem_live", reason="the peers extra (libertem-live[sim]) is not installed")
pytestmark = pytest.mark.peers
SCAN = (12, 10)  # not square: rows and columns cannot be swapped unnoticed


def electron_frames(n, shape, dose, top, seed=0, dtype=np.uint16):
    """Sparse counted frames: a bright disk and a dim background, counts clipped to ``top``."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    disk = (yy - h / 2 + 3) ** 2 + (xx - w / 2 - 5) ** 2 < (h / 8) ** 2
    lam = np.where(disk, 0.7 * dose / disk.sum(), 0.3 * dose / (~disk).sum())
    return np.minimum(rng.poisson(lam, (n, h, w)), top).astype(dtype)


def config_for(tmp_path, detector: DetectorSpec, frame_shape) -> PipelineConfig:
    mask = np.random.default_rng(7).random(frame_shape) < 0.3
    np.save(tmp_path / "mask.npy", mask)
    cfg = PipelineConfig(detector=detector, virtual=[VirtualSpec(name="m", shape="masks",
                                                                 file=str(tmp_path / "mask.npy"))])
    cfg = replace(cfg, output=replace(cfg.output, dir=str(tmp_path / "out"), previews=False),
                  scan=replace(cfg.scan, timeout_s=20.0))
    return validate(cfg)


def check_against_frames(r, frames: np.ndarray, scan_shape, tmp_path, session=None):
    """The scan file and results equal dense numpy sums over ``frames`` (n, h, w)."""
    n, h, w = frames.shape
    assert r.status == "complete", r.reason
    assert (r.n_frames, r.frames_received, r.n_missing) == (n, n, 0)
    flat = frames.reshape(n, -1).astype(np.int64)
    assert r.events == int(flat.sum())
    with h5py.File(r.path) as f:
        offsets, indices = f["events/offsets"][:], f["events/indices"][:]
    np.testing.assert_array_equal(np.diff(offsets), flat.sum(axis=1))
    expected = np.concatenate([np.repeat(np.arange(h * w), row) for row in flat])  # k events per count k
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_array_equal(r.results["diffraction_sum"], flat.sum(axis=0).reshape(h, w))
    mask = np.load(tmp_path / "mask.npy")
    np.testing.assert_array_equal(r.results["m"], (flat * mask.ravel()).sum(axis=1).reshape(scan_shape))
    yy, xx = np.mgrid[:h, :w]
    np.testing.assert_array_equal(r.results["com_n"], flat.sum(axis=1).reshape(scan_shape))
    np.testing.assert_array_equal(r.results["com_sum_y"], (flat * yy.ravel()).sum(axis=1).reshape(scan_shape))
    np.testing.assert_array_equal(r.results["com_sum_x"], (flat * xx.ravel()).sum(axis=1).reshape(scan_shape))
    if session is not None:  # the electrons were shared by both workers
        st = next(s for s in session.status() if s["scan_id"] == r.scan_id)
        assert len(st["worker_events"]) == 2 and min(st["worker_events"].values()) > 0, st["worker_events"]


@pytest.mark.parametrize("bits,raw,mode", [(12, False, "passive"), (1, True, "active")],
                         ids=["12bit-U16-passive", "1bit-raw-active"])
def test_merlin_simulator_through_two_workers(tmp_path, client2, bits, raw, mode):
    n = SCAN[0] * SCAN[1]
    frames = electron_frames(n, (256, 256), 60, (1 << bits) - 1, seed=bits, dtype=mib.VALUE_DTYPE[bits])
    hdr, _ = mib.write_mib(str(tmp_path / "scan"), frames, bits, raw, SCAN)
    with merlin_sim(hdr, SCAN) as sim:
        det = DetectorSpec(kind="merlin", scan=list(SCAN), data=sim.data, control=sim.control, mode=mode)
        with Session([], config=config_for(tmp_path, det, (256, 256)), client=client2, console=False) as s:
            if mode == "active":
                r = s.acquire(timeout=120)
            else:  # someone else (here the test) starts Merlin on its control port
                ctl = MerlinControl(sim.control)
                ctl.start_acquisition(n)
                ctl.close()
                r = s.wait(timeout=120)
            check_against_frames(r, frames, SCAN, tmp_path, s)
            with h5py.File(r.path) as f:
                md = f["metadata"]
                assert (md.attrs["detector"], int(md.attrs["counter_depth"])) == ("merlin", bits)
                assert md.attrs["pixel_type"] == ("R64" if raw else "U16")
                assert int(md["acquisition_header"].attrs["Frames in Acquisition (Number)"]) == n


@pytest.mark.parametrize("mode", ["active", "passive"])
def test_dectris_simulator_bslz4_through_two_workers(tmp_path, client2, mode):
    n = SCAN[0] * SCAN[1]
    frames = electron_frames(n, (192, 192), 40, 65535, seed=5)
    frames[3, 10, 11] = 1000  # a count far above one electron still becomes that many events
    simplon.write_dump(str(tmp_path / "scan.dump"), frames, series=17, compression="bslz4")
    with dectris_sim(str(tmp_path / "scan.dump")) as sim:
        det = DetectorSpec(kind="dectris", scan=list(SCAN), dcu=sim.dcu, data=sim.stream, mode=mode)
        with Session([], config=config_for(tmp_path, det, (192, 192)), client=client2, console=False) as s:
            if mode == "active":
                r = s.acquire(timeout=120)
            else:  # someone else arms, once both workers' streams are connected (else the
                # first to connect takes every image, and the test of the sharing fails)
                assert s.detector.wait_connected(30) == []
                req = urllib.request.Request(f"{sim.dcu}/detector/api/1.8.0/command/arm", method="PUT")
                urllib.request.urlopen(req, timeout=10).read()
                r = s.wait(timeout=120)
            check_against_frames(r, frames, SCAN, tmp_path, s)
            assert r.scan_id.endswith("-17")
            with h5py.File(r.path) as f:
                md = f["metadata"]
                assert (md.attrs["detector"], int(md.attrs["series"]), md.attrs["mode"]) == ("dectris", 17, mode)
                cfg = md["detector_config"].attrs
                assert (cfg["compression"], int(cfg["ntrigger"]), int(cfg["x_pixels_in_detector"])) == ("bslz4", n, 192)
