"""Counting live, end to end, as a user runs it: ``stemstream calibrate`` takes a dark scan
that ``stemstream simulate --raw --dose 0`` streams; ``stemstream process`` on 2 workers
counts the raw frames of ``stemstream simulate --raw --sources 4`` with that counting file.
The scan file's images equal dense numpy over its events, its events equal counting the
same raw frames (written as 4D Camera files) offline, and /counting says how."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from operators.electron_counting import ElectronCounter
from sim_detector.raw import score_events
from sim_detector.rawfile import RawFileReader
from stream.files.counting_file import read_calibration
from stream.transport.net import free_port_block

SCAN = (10, 12)
CENTRE = (287.5, 287.5)


def cli(*args):
    return [sys.executable, "-m", "stream.cli", *map(str, args)]


def run(*args, timeout=600):
    r = subprocess.run(cli(*args), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.mark.slow  # three emulator runs and a 2-worker cluster; tests/test_dense.py covers the receiver path
def test_simulate_raw_into_process_counts_like_offline(tmp_path):
    port = free_port_block(4)
    bind = f"tcp://127.0.0.1:{port}"
    # 1. the dark scan, streamed into calibrate
    cal = subprocess.Popen(cli("calibrate", "--connect", bind, "--sources", 4, "--out", tmp_path / "counting.h5",
                               "--timeout", 120), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        run("simulate", "--raw", "--dose", 0, "--scan", "8x8", "--sources", 4, "--bind", bind, "--rate", "max",
            "--wait", 120, "--quiet", "--scan-id", "dark")
        out, _ = cal.communicate(timeout=300)
    finally:
        cal.kill()
    assert cal.returncode == 0, out
    assert "background" in out and "x-ray" in out and "64 frames" in out
    calibration = read_calibration(tmp_path / "counting.h5")
    (tmp_path / "pipeline.toml").write_text(
        '[counting]\nfile = "counting.h5"\n'
        '[[virtual]]\nname = "bf"\nshape = "disk"\nradius_px = 150.0\n'
        '[[virtual]]\nname = "adf"\nshape = "annulus"\ninner_px = 170.0\nouter_px = 288.0\n'
        f'[detector]\ncenter = [{CENTRE[0]}, {CENTRE[1]}]\n')
    # 2. the scan, counted live on two workers
    proc = subprocess.Popen(cli("process", "--connect", bind, "--sources", 4, "--workers", 2,
                                "--config", tmp_path / "pipeline.toml", "--out", tmp_path / "out"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        run("simulate", "--raw", "--dose", 100, "--mrad-per-px", 0.12, "--scan", f"{SCAN[0]}x{SCAN[1]}",
            "--sources", 4, "--bind", bind, "--rate", "max", "--wait", 300, "--quiet", "--scan-id", "live",
            "--raw-files", tmp_path / "raw", "--truth", tmp_path / "truth.h5", "--xray-rate", 0.5)
        deadline = time.monotonic() + 300
        while not list((tmp_path / "out").glob("live-0000*.h5")) and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        log, _ = proc.communicate(timeout=120)
    files = list((tmp_path / "out").glob("live-0000*.h5"))
    assert files, log
    assert "counting raw frames: background" in log
    with h5py.File(files[0]) as f:
        assert f.attrs["status"] == "complete", (f.attrs["reason"], log)
        offsets, indices = f["events/offsets"][()].astype(np.int64), f["events/indices"][()]
        bf, adf, pattern = f["results/bf"][()], f["results/adf"][()], f["results/diffraction_sum"][()]
        c = f["counting"]
        assert c.attrs["background_threshold"] == calibration.background_threshold
        assert c.attrs["xray_threshold"] == calibration.xray_threshold
        assert c.attrs["frames_counted"] == 4 * SCAN[0] * SCAN[1] and c.attrs["events"] == len(indices)
        np.testing.assert_array_equal(c["dark"][()], calibration.dark)
    # the images: dense numpy over the file's events
    n = SCAN[0] * SCAN[1]
    frames_of = np.repeat(np.arange(n), np.diff(offsets))
    dense = np.zeros((n, 576 * 576), np.int64)
    np.add.at(dense, (frames_of, indices.astype(np.int64)), 1)
    yy, xx = np.mgrid[:576, :576]
    r = np.hypot(yy - CENTRE[0], xx - CENTRE[1]).ravel()
    np.testing.assert_array_equal(bf.ravel(), dense[:, r <= 150].sum(1))
    np.testing.assert_array_equal(adf.ravel(), dense[:, (r >= 170) & (r < 288)].sum(1))
    np.testing.assert_array_equal(pattern.ravel(), dense.sum(0))
    # the events: the same raw frames counted offline, sector by sector as the sources sent them
    raw = RawFileReader(sorted((tmp_path / "raw").glob("live-0000/*.data")))
    frames = np.stack([raw.frame(i) for i in range(raw.n_frames)])
    assert raw.n_frames == n
    counter = ElectronCounter((576, 576), calibration.dark, calibration.background_threshold,
                              calibration.xray_threshold)
    parts = [counter.count(frames[:, a:a + 144], a) for a in range(0, 576, 144)]
    offs = [np.r_[0, np.cumsum(cnt.astype(np.int64))] for cnt, _ in parts]
    for i in range(n):
        offline = np.sort(np.concatenate([ind[o[i]:o[i + 1]] for (_, ind), o in zip(parts, offs)]))
        np.testing.assert_array_equal(indices[offsets[i]:offsets[i + 1]], offline, err_msg=f"frame {i}")
    # and they are the electrons the emulator sent
    with h5py.File(tmp_path / "truth.h5") as t:
        g = t["live-0000/raw"]
        el, eoff, xp = g["electrons"][()], g["electron_offsets"][()], g["xray_pixels"][()]
    total = {"electrons": 0, "events": 0, "found": 0, "false": 0, "xray_events": 0}
    for i in range(n):
        s = score_events(el[eoff[i]:eoff[i + 1], :2], indices[offsets[i]:offsets[i + 1]], 576, xp[i])
        total = {k: total[k] + s[k] for k in total}
    assert total["found"] >= 0.98 * total["electrons"] and total["false"] < 0.01 * total["events"], total
    assert total["xray_events"] == 0
