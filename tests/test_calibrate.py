"""Dark and thresholds as users manage them: ``stemstream calibrate`` from 4D Camera raw files,
the counting file, ``[counting]`` and its one-line errors, the ``/counting`` group of a scan
file, and the emulator's raw files as stempy's format defines them."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from operators.electron_counting import ElectronCounter, choose_samples, compute_thresholds
from sim_detector.raw import RawDetector, RawFrames
from sim_detector.rawfile import FRAME, SECTOR, RawFileError, RawFileReader, RawFileWriter, record_dtype
from stream.cli.commands import main
from stream.config import ConfigError, build_operators, load_config
from stream.transport.protocol import Geometry
from stream.files.counting_file import Calibration, CountingFileError, read_calibration, write_calibration


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A dark scan (24 frames) and a data scan (16 frames, 60 e-/frame), as 4D Camera files."""
    d = tmp_path_factory.mktemp("raw")
    rf = RawFrames(RawDetector(), (FRAME, FRAME), seed=5)
    rng = np.random.default_rng(5)
    dark = rf.frames(0, np.zeros(24, np.uint32), np.zeros(0, np.uint32))
    counts = rng.poisson(60, 16).astype(np.uint32)
    data = rf.frames(100, counts, rng.integers(0, FRAME * FRAME, counts.sum()).astype(np.uint32))
    with RawFileWriter(d / "dark", 1, (4, 6)) as w:
        w.write(0, dark)
    with RawFileWriter(d / "data", 2, (4, 4)) as w2:
        w2.write(0, data[:10])
        w2.write(10, data[10:])
    return d, dark, data, w.files, w2.files


def test_raw_files_hold_the_frames_in_stempys_layout(files):
    d, dark, data, dark_files, data_files = files
    assert [p.name for p in data_files] == [f"data_scan0000000002_module{m}.data" for m in range(4)]
    for m, path in enumerate(data_files):  # read back by the format's definition, not our reader
        rec = np.fromfile(path, record_dtype(5))
        assert len(rec) == 16 and rec.dtype.itemsize == 16 + FRAME * SECTOR * 2
        np.testing.assert_array_equal(rec["frame_number"], np.arange(1, 17))
        np.testing.assert_array_equal(rec["scan_position"][:, 0], np.arange(16) % 4)  # x
        np.testing.assert_array_equal(rec["scan_position"][:, 1], np.arange(16) // 4)  # y
        np.testing.assert_array_equal(rec["data"].reshape(16, SECTOR, FRAME), data[:, m * SECTOR:(m + 1) * SECTOR])
    r = RawFileReader(list(reversed(data_files)))  # any order of files
    np.testing.assert_array_equal(np.stack([r.frame(i) for i in range(r.n_frames)]), data)
    short = d / "short_module0.data"
    short.write_bytes(data_files[0].read_bytes()[:-10])
    with pytest.raises(RawFileError, match="not a whole number of version-5 records"):
        RawFileReader([short])


def test_calibrate_from_raw_files(files, tmp_path, capsys):
    d, dark, data, dark_files, data_files = files
    out = tmp_path / "counting.h5"
    assert main(["calibrate", "--dark", *map(str, dark_files), "--frames", *map(str, data_files),
                 "--samples", "5", "--seed", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "background" in printed and "x-ray" in printed and str(out) in printed
    cal = read_calibration(out)
    # the dark: per pixel the mean of the dark frames without the largest value
    s = dark.astype(np.int64)
    np.testing.assert_allclose(cal.dark, (s.sum(0) - s.max(0)) / 23, rtol=1e-6)
    # the thresholds: the seeded samples of the data frames, through the same computation
    ids = choose_samples(16, 5, 3)
    np.testing.assert_array_equal(cal.sample_frames, ids)
    t = compute_thresholds([data[i] for i in ids], cal.dark)
    assert cal.background_threshold == pytest.approx(t["background_threshold"], rel=1e-12)
    assert cal.xray_threshold == pytest.approx(t["xray_threshold"], rel=1e-12)
    assert cal.attrs["seed"] == 3 and cal.attrs["dark_frames"] == 24
    # by hand, and with no dark
    assert main(["calibrate", "--dark", "zero", "--background-threshold", "28", "--xray-threshold", "400",
                 "--out", str(tmp_path / "hand.h5")]) == 0
    hand = read_calibration(tmp_path / "hand.h5")
    assert (hand.dark, hand.background_threshold, hand.xray_threshold) == (None, 28.0, 400.0)


@pytest.mark.parametrize("args,message", [
    (["--out", "x.h5"], "give the dark frames with --dark"),
    (["--dark", "nowhere_module0.data"], "nowhere_module0.data: no such file"),
    (["--dark", "zero"], "no sample frames for the thresholds"),
    (["--dark", "zero", "--background-threshold", "5"], "both --background-threshold and --xray-threshold"),
    (["--dark", "a.txt"], "give 4D Camera raw files"),
])
def test_calibrate_refuses_with_one_line(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["calibrate", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def write(tmp_path, text):
    (tmp_path / "p.toml").write_text(text)
    return tmp_path / "p.toml"


def test_counting_configuration_and_its_errors(tmp_path):
    np.save(tmp_path / "dark.npy", np.full((32, 40), 20.0))
    np.save(tmp_path / "stack.npy", np.zeros((2, 32, 40)))
    good = load_config(write(tmp_path, '[counting]\ndark = "dark.npy"\nbackground_threshold = 6.0\n'
                                       'xray_threshold = 500.0\nties = "none"\n'))
    assert good.counting.enabled and good.counting.calibration.attrs["thresholds_source"].startswith("set by hand")
    ops = build_operators(good, Geometry((3, 4), (32, 40)))
    assert isinstance(ops[0], ElectronCounter) and ops[0].ties == "none"  # first: it makes the events
    # a scan of another detector still builds (its counted frames are fine); raw frames get the error
    other = build_operators(good, Geometry((3, 4), (64, 64)))
    with pytest.raises(ValueError, match="32x40 px but the detector is 64x64 px"):
        other[0].count(np.zeros((1, 64, 64), np.uint16))
    assert not load_config(None).counting.enabled
    for text, message in [
        ('[counting]\nfile = "none.h5"\n', "none.h5: no such counting file (make one with 'stemstream calibrate')"),
        ('[counting]\ndark = "missing.npy"\nbackground_threshold = 6.0\nxray_threshold = 500.0\n',
         "dark reference"),
        ('[counting]\ndark = "dark.npy"\n', "no thresholds"),
        ('[counting]\nbackground_threshold = 6.0\nxray_threshold = 500.0\n', "no dark reference"),
        ('[counting]\ndark = "stack.npy"\nbackground_threshold = 6.0\nxray_threshold = 500.0\n', "3-D array"),
        ('[counting]\ndark = "zero"\nbackground_threshold = 6.0\n', "give both background_threshold"),
        ('[counting]\ndark = "zero"\nbackground_threshold = 9.0\nxray_threshold = 5.0\n', "x-ray threshold 5.0"),
        ('[counting]\nsemantics = "round"\n', "semantics 'round'"),
        ('[counting]\ncalibration = 1\n', "unknown key(s) calibration"),
    ]:
        with pytest.raises(ConfigError, match="counting") as e:
            load_config(write(tmp_path, text))
        assert message in str(e.value), str(e.value)
    h5py.File(tmp_path / "notcounting.h5", "w").close()
    with pytest.raises(ConfigError, match="not a counting file"):
        load_config(write(tmp_path, '[counting]\nfile = "notcounting.h5"\n'))


def test_a_counting_file_and_the_scan_files_counting_group(tmp_path):
    from stream.files.storage import describe, write_scan
    from test_storage import fields

    cal = Calibration(np.full((4, 4), 19.5, np.float32), 7.5, 300.0, np.ones((4, 4), np.float32),
                      {"seed": 1, "optimized_mean": 0.5}, np.array([3, 9]))
    back = read_calibration(write_calibration(tmp_path / "c.h5", cal))
    assert (back.background_threshold, back.xray_threshold, back.attrs["seed"]) == (7.5, 300.0, 1)
    np.testing.assert_array_equal(back.dark, cal.dark)
    np.testing.assert_array_equal(back.sample_frames, [3, 9])
    with pytest.raises(CountingFileError, match="no such counting file"):
        read_calibration(tmp_path / "none.h5")
    counter = ElectronCounter((4, 4), cal.dark, 7.5, 300.0, record={"thresholds_source": "c.h5",
                                                                      "sample_frames": np.array([3, 9])})
    state = counter.new_state()
    frames = np.full((2, 4, 4), 20, np.uint16)
    frames[0, 1, 2] = 60
    counter.count(frames, 0, state)
    record = counter.describe(state)
    path = write_scan(tmp_path / "s.h5", **fields(), counting=(record.attrs, record.arrays))
    with h5py.File(path) as f:
        g = f["counting"]
        assert (g.attrs["background_threshold"], g.attrs["frames_counted"], g.attrs["events"]) == (7.5, 2, 1)
        assert g.attrs["thresholds_source"] == "c.h5" and g.attrs["ties"] == "first"
        np.testing.assert_array_equal(g["dark"][()], cal.dark)
        np.testing.assert_array_equal(g["sample_frames"][()], [3, 9])
    assert describe(path)["status"] == "complete"
    from stream.cli.commands import format_info
    assert "counting: background 7.500 ADU, x-ray 300.0 ADU (c.h5); 2 frame parts counted into 1 events" \
        in format_info(describe(path))


def test_simulate_raw_refuses_what_it_cannot_do(capsys):
    assert main(["simulate", "--raw-files", "x"]) == 2
    assert "add --raw" in capsys.readouterr().err
    assert main(["simulate", "--raw", "--raw-files", "x", "--detector", "64x64"]) == 2
    assert "576x576" in capsys.readouterr().err


def test_calibrate_waiting_for_a_dark_scan_says_what_is_not_connected(tmp_path):
    """No emulator at the address: after a few seconds calibrate names the sources it does not
    reach and the command that sends a dark scan (not silence)."""
    import subprocess
    import sys
    import time

    from stream.transport.net import free_port_block

    port = free_port_block(2)
    p = subprocess.Popen([sys.executable, "-m", "stream.cli", "calibrate", "--connect", f"tcp://127.0.0.1:{port}",
                          "--sources", "2", "--out", str(tmp_path / "c.h5")],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = p.stdout.readline()
            lines.append(line)
            if "waiting:" in line or not line:
                break
    finally:
        p.kill()
        p.communicate()
    note = lines[-1]
    assert note.startswith("calibrate: waiting: not connected to "), lines
    assert f"tcp://127.0.0.1:{port}" in note and f"tcp://127.0.0.1:{port + 1}" in note, note
    assert f"stemstream simulate --raw --dose 0 --bind tcp://127.0.0.1:{port} --sources 2" in note, note
    assert not (tmp_path / "c.h5").exists()
