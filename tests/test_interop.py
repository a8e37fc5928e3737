"""Export to stempy / LiberTEM CSR / dense numpy and import from stempy, checked with plain
h5py and numpy against the events the files were made from (the peers themselves: test_peers.py)."""

from __future__ import annotations

import subprocess
import sys

import h5py
import numpy as np
import pytest

from conftest import dense_scan
from stream.files.interop import ExportError, export, export_stempy, import_stempy
from stream.transport.protocol import Geometry
from stream.files.recording import open_recording
from test_recording import events, stored, write_stemstream, write_stempy

GEOM = Geometry((6, 5), (16, 12), frames_per_position=2, flyback=1, mrad_per_px=0.5)


@pytest.fixture
def recorded(tmp_path):
    counts, indices = events(GEOM, seed=3)
    counts[4] = 0  # an empty frame survives every conversion
    indices = indices[:int(counts.sum())]
    path = write_stemstream(tmp_path / "rec.h5", stored(counts, indices, GEOM), GEOM)
    return path, counts, indices


def test_stempy_export_has_stempys_layout(recorded, tmp_path):
    path, counts, indices = recorded
    out = export_stempy(path, tmp_path / "st.h5")
    want = stored(counts, indices, GEOM)
    with h5py.File(out, "r") as f:
        assert f.attrs["version"] == 3
        frames, pos = f["electron_events/frames"], f["electron_events/scan_positions"]
        assert h5py.check_vlen_dtype(frames.dtype) == np.dtype(np.uint32)
        assert frames.shape == (6 * 5 * 2,)  # positions x frames per position
        assert (pos.attrs["Nx"], pos.attrs["Ny"]) == (5, 6)  # scan width, height
        assert (frames.attrs["Nx"], frames.attrs["Ny"]) == (16, 12)
        np.testing.assert_array_equal(pos[()], np.arange(30))
        assert [np.asarray(a).tolist() for a in frames[()]] == [w.tolist() for w in want]
        assert f["metadata/stemstream"].attrs["scan_id"] == "rec"


def test_stemstream_to_stempy_to_stemstream_keeps_every_event(recorded, tmp_path):
    path, _, _ = recorded
    back = import_stempy(export_stempy(path, tmp_path / "st.h5"), tmp_path / "back.h5")
    a, b = open_recording(path), open_recording(back)
    assert b.kind == "stemstream" and b.scan_id == "rec"
    # the same geometry and calibration, except the flyback frames, which were never stored
    assert b.geometry == a.geometry.__class__(**{**a.geometry.__dict__, "flyback": 0})
    assert b.geometry.mrad_per_px == 0.5
    for x, y in zip(a.read(), b.read()):
        np.testing.assert_array_equal(x, y)
    with h5py.File(back, "r") as f:
        assert f.attrs["status"] == "complete" and f["completeness"].attrs["n_missing"] == 0


def test_importing_a_stempy_file_with_flyback_drops_the_flyback_frames(tmp_path):
    counts, indices = events(GEOM, seed=8)
    src = write_stempy(tmp_path / "fb.h5", counts, indices, 6, 6, (16, 12))
    out = import_stempy(src, tmp_path / "fb-in.h5", flyback=1)
    off, idx = open_recording(out).read()
    want = stored(counts, indices, GEOM)  # GEOM has the flyback column: dropped here
    assert [idx[off[i]:off[i + 1]].tolist() for i in range(len(want))] == [w.tolist() for w in want]
    with h5py.File(out, "r") as f:  # flyback frames are counted as received, as live
        assert f["completeness/received"].shape == (1, GEOM.n_frames)


def test_libertem_csr_export_reads_back_as_the_events(recorded, tmp_path):
    path, counts, indices = recorded
    toml = export(path, "libertem-csr", tmp_path / "lt.toml")
    text = toml.read_text()
    assert 'filetype = "raw_csr"' in text and "nav_shape = [6, 5, 2]" in text and "sig_shape = [16, 12]" in text
    indptr = np.fromfile(tmp_path / "lt.indptr.raw", "<i8")
    pix = np.fromfile(tmp_path / "lt.indices.raw", "<u4")
    val = np.fromfile(tmp_path / "lt.values.raw", "<u2")
    assert len(indptr) == 61 and indptr[-1] == len(pix) == len(val)
    dense = np.zeros((60, 16 * 12), np.int64)
    for i in range(60):
        np.add.at(dense[i], pix[indptr[i]:indptr[i + 1]].astype(np.int64), val[indptr[i]:indptr[i + 1]])
    want = np.zeros_like(dense)
    for i, ev in enumerate(stored(counts, indices, GEOM)):
        np.add.at(want[i], ev.astype(np.int64), 1)
    np.testing.assert_array_equal(dense, want)
    assert all(np.all(np.diff(pix[indptr[i]:indptr[i + 1]].astype(np.int64)) > 0) for i in range(60))  # merged


def test_dense_npy_region(recorded, tmp_path):
    path, counts, indices = recorded
    out = export(path, "npy", tmp_path / "block.npy", region="1:4,2:5")
    block = np.load(out)
    assert block.shape == (3, 3, 16, 12) and block.dtype == np.uint16
    np.testing.assert_array_equal(block, dense_scan(counts, indices, GEOM)[1:4, 2:5])


@pytest.mark.parametrize("fmt, out, region, words", [
    ("npy", "x.npy", None, "needs --region"),
    ("npy", "x.npy", "0:7,0:2", "outside the 6x5 scan"),
    ("npy", "x.npy", "a:b", "is not Y0:Y1,X0:X1"),
    ("stempy", "x.h5", "0:1,0:1", "applies to --format npy only"),
    ("libertem-csr", "x.csr", None, "must be a .toml file"),
    ("stempy", "rec.h5", None, "exists already"),
])
def test_export_refusals(recorded, tmp_path, fmt, out, region, words):
    path, _, _ = recorded
    with pytest.raises(ExportError, match=words):
        export(path, fmt, tmp_path / out, region=region)


def test_export_and_import_on_the_command_line(recorded, tmp_path):
    path, _, _ = recorded

    def run(*args):
        return subprocess.run([sys.executable, "-m", "stream.cli", *map(str, args)],
                              capture_output=True, text=True, timeout=120)
    p = run("export", path, tmp_path / "st.h5", "--format", "stempy")
    assert p.returncode == 0 and "-> " in p.stdout, p.stderr
    p = run("import-stempy", tmp_path / "st.h5", tmp_path / "in.h5")
    assert p.returncode == 0 and "process-file" in p.stdout, p.stderr
    p = run("import-stempy", tmp_path / "st.h5", tmp_path / "in.h5")
    assert p.returncode == 2 and "exists already" in p.stderr and "Traceback" not in p.stderr
    p = run("export", tmp_path / "missing.h5", tmp_path / "m.h5", "--format", "stempy")
    assert p.returncode == 2 and "missing.h5: no such file" in p.stderr


@pytest.mark.parametrize("dose", [0, "uniform"])
def test_empty_and_uniform_scans_export(tmp_path, dose):
    """Frames that all hold the same number of events (none, or 3) are still one array each."""
    g = Geometry((3, 4), (8, 8))
    n = g.n_frames
    frames = [np.arange(3, dtype=np.uint32) + i % 5 for i in range(n)] if dose else [np.zeros(0, np.uint32)] * n
    path = write_stemstream(tmp_path / "u.h5", frames, g)
    back = import_stempy(export_stempy(path, tmp_path / "st.h5"), tmp_path / "back.h5")
    off, idx = open_recording(back).read()
    assert [idx[off[i]:off[i + 1]].tolist() for i in range(n)] == [f.tolist() for f in frames]
