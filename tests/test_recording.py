"""Reading recorded scans (stemstream and stempy files) and refusing bad ones.

Files are written here with plain h5py/write_scan from known events; every expectation comes
from those events, not from the reader."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from stream.transport.protocol import Geometry
from stream.files.recording import open_recording
from stream.files.storage import ScanFileError, write_scan

GEOM = Geometry((6, 5), (16, 12), frames_per_position=2, flyback=1)


def events(geometry, seed=0, dose=7.0):
    """Raster frames (flyback included): counts (n_frames,), indices uint32."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(dose, geometry.n_frames).astype(np.uint32)
    indices = rng.integers(0, geometry.n_pixels, int(counts.sum()), dtype=np.uint32)
    return counts, indices


def stored(counts, indices, geometry):
    """Per stored frame (flyback dropped) the sorted events, the plain way."""
    off = np.r_[0, np.cumsum(counts.astype(np.int64))]
    fpp, nxr, nx = geometry.frames_per_position, geometry.raster_shape[1], geometry.scan_shape[1]
    return [np.sort(indices[off[f]:off[f + 1]]) for f in range(geometry.n_frames) if (f // fpp) % nxr < nx]


def write_stemstream(path, frames, geometry, received=None):
    offsets = np.r_[0, np.cumsum([len(f) for f in frames])].astype(np.uint64)
    indices = np.concatenate(frames).astype(np.uint32)
    from operators.base import Result
    rec = np.ones((geometry.n_sources, geometry.n_frames), np.uint16) if received is None else received
    return write_scan(path, scan_id="rec", status="complete", reason="test", geometry=geometry.to_wire(),
                      metadata={"specimen": "test"}, results={}, offsets=offsets, indices=indices,
                      completeness={"received": Result(rec, "table")}, completeness_summary={},
                      provenance={"frames_sent_per_source": {"0": geometry.n_frames}}, compression_level=1)


def write_stempy(path, counts, indices, scan_nx_raster, scan_ny, frame_shape, version=3):
    """A stempy v3 file as stempy's writer lays it out (electron_events/frames vlen, raster order)."""
    off = np.r_[0, np.cumsum(counts.astype(np.int64))]
    with h5py.File(path, "w") as f:
        f.attrs["version"] = version
        ee = f.create_group("electron_events")
        pos = ee.create_dataset("scan_positions", data=np.arange(scan_nx_raster * scan_ny, dtype=np.uint32))
        pos.attrs["Nx"], pos.attrs["Ny"] = scan_nx_raster, scan_ny
        ds = ee.create_dataset("frames", (len(counts),), dtype=h5py.vlen_dtype(np.uint32))
        ds.attrs["Nx"], ds.attrs["Ny"] = frame_shape
        data = np.empty(len(counts), object)
        data[:] = [indices[off[i]:off[i + 1]] for i in range(len(counts))]
        ds[...] = data
        f.create_group("metadata").attrs["note"] = "written by the test"
    return path


def test_a_stemstream_file_reads_back_every_stored_frame(tmp_path):
    counts, indices = events(GEOM)
    frames = stored(counts, indices, GEOM)
    path = write_stemstream(tmp_path / "a.h5", frames, GEOM)
    rec = open_recording(path)
    assert (rec.kind, rec.scan_id, rec.geometry, rec.n_stored) == ("stemstream", "rec", GEOM, len(frames))
    assert rec.metadata == {"specimen": "test"} and rec.frames_sent == {0: GEOM.n_frames}
    off, idx = rec.read()
    assert [idx[off[i]:off[i + 1]].tolist() for i in range(len(frames))] == [f.tolist() for f in frames]
    off, idx = rec.read(7, 19)  # a range starts its offsets at 0
    assert off[0] == 0 and [idx[off[i]:off[i + 1]].tolist() for i in range(12)] == [f.tolist() for f in frames[7:19]]
    # raster numbering of stored frames: position p, frame k -> (row*(nx+flyback)+col)*fpp + k
    nx, fpp = 5, 2
    expect = [((p // nx) * (nx + 1) + p % nx) * fpp + k for p in range(30) for k in range(fpp)]
    np.testing.assert_array_equal(rec.raster_frames(np.arange(rec.n_stored)), expect)


@pytest.mark.parametrize("flyback", [0, 1])
def test_a_stempy_file_with_or_without_flyback_column(tmp_path, flyback):
    g = Geometry((6, 5), (16, 12), frames_per_position=2, flyback=flyback)
    counts, indices = events(g, seed=1)
    path = write_stempy(tmp_path / "s.h5", counts, indices, 5 + flyback, 6, (16, 12))
    rec = open_recording(path, flyback=flyback)
    assert rec.kind == "stempy" and rec.geometry == g and rec.metadata == {"note": "written by the test"}
    off, idx = rec.read()
    want = stored(counts, indices, g)
    assert [np.sort(idx[off[i]:off[i + 1]]).tolist() for i in range(len(want))] == [w.tolist() for w in want]
    off, idx = rec.read(13, 31)  # a range that crosses rows (and flyback frames)
    assert [np.sort(idx[off[i]:off[i + 1]]).tolist() for i in range(18)] == [w.tolist() for w in want[13:31]]


def _damage(path, how):
    with h5py.File(path, "r+") as f:
        how(f)
    return path


def _bad_index(f):
    idx, off = f["events/indices"][()], f["events/offsets"][()]
    assert off[4] > off[3]
    idx[off[3]] = 16 * 12  # one past the last pixel, in stored frame 3
    del f["events/indices"]
    f["events"].create_dataset("indices", data=idx)


def _bad_offsets(f):
    off = f["events/offsets"][()]
    assert off[11] > off[9]
    off[11] = off[9] - 0 if off[10] > off[9] else off[9]
    off[10] = off[11] + 1  # frame 10 ends before it starts: offsets go backwards
    del f["events/offsets"]
    f["events"].create_dataset("offsets", data=off)


def _short_offsets(f):
    off = f["events/offsets"][()]
    del f["events/offsets"]
    f["events"].create_dataset("offsets", data=off[:-3])


def _offsets_past_events(f):
    off = f["events/offsets"][()]
    off[-1] += 4
    del f["events/offsets"]
    f["events"].create_dataset("offsets", data=off)


@pytest.mark.parametrize("damage, words", [
    (lambda f: f.__delitem__("events/offsets"), ["/events/offsets is missing", "expected (61,) uint64"]),
    (lambda f: f["geometry"].attrs.__delitem__("scan_shape"), ["/geometry attribute scan_shape is missing"]),
    (lambda f: f.attrs.__setitem__("format", "something-else"), ["format is 'something-else'", "expected 'stemstream-scan'"]),
    (_bad_index, ["stored frame 3 has an event at pixel 192", "outside the detector's 192 pixels"]),
    (_bad_offsets, ["offsets decrease at stored frame 10"]),
    (_short_offsets, ["/events/offsets has shape (58,)", "expected (61,)"]),
    (_offsets_past_events, ["run from 0 to", "events; expected 0 to"]),
], ids=["no-offsets", "no-scan-shape", "other-format", "pixel-outside", "offsets-decrease",
        "offsets-short", "offsets-past-end"])
def test_a_damaged_scan_file_is_refused_with_path_and_reason(tmp_path, damage, words):
    counts, indices = events(GEOM)
    path = _damage(write_stemstream(tmp_path / "bad.h5", stored(counts, indices, GEOM), GEOM), damage)
    with pytest.raises(ScanFileError) as e:
        open_recording(path).read()
    msg = str(e.value)
    assert msg.startswith(str(path))
    for w in words:
        assert w in msg, msg


def test_files_that_are_not_recordings_are_refused(tmp_path):
    counts, indices = events(GEOM)
    good = write_stemstream(tmp_path / "good.h5", stored(counts, indices, GEOM), GEOM)
    data = good.read_bytes()
    (tmp_path / "truncated.h5").write_bytes(data[:len(data) // 2])
    (tmp_path / "text.h5").write_text("not a scan\n")
    with h5py.File(tmp_path / "empty.h5", "w"):
        pass
    cases = {"missing.h5": "no such file", "truncated.h5": "probably truncated",
             "text.h5": "not an HDF5 file", "empty.h5": "neither a stemstream scan file", ".": "is a directory"}
    for name, words in cases.items():
        with pytest.raises(ScanFileError, match=words):
            open_recording(tmp_path / name)


@pytest.mark.parametrize("change, words", [
    (lambda f: f.attrs.__setitem__("version", 2), "stempy file version 2; only version 3"),
    (lambda f: f["electron_events/scan_positions"].attrs.__delitem__("Nx"), "attribute Nx is missing"),
    (lambda f: f["electron_events/frames"].attrs.__delitem__("Ny"), "frames attribute Ny is missing"),
    (lambda f: f["electron_events/scan_positions"].attrs.__setitem__("Ny", 7), "not a multiple of the 7x5 scan"),
    (lambda f: f["electron_events"].__delitem__("frames"), "/electron_events/frames is missing"),
], ids=["version", "no-Nx", "no-frame-Ny", "wrong-size", "no-frames"])
def test_a_bad_stempy_file_is_refused(tmp_path, change, words):
    g = Geometry((6, 5), (16, 12), frames_per_position=2)
    counts, indices = events(g)
    path = _damage(write_stempy(tmp_path / "s.h5", counts, indices, 5, 6, (16, 12)), change)
    with pytest.raises(ScanFileError, match=words):
        open_recording(path)


def test_stempy_events_outside_the_frame_are_refused(tmp_path):
    g = Geometry((6, 5), (16, 12))
    counts, indices = events(g)
    indices[-1] = 10_000
    path = write_stempy(tmp_path / "s.h5", counts, indices, 5, 6, (16, 12))
    with pytest.raises(ScanFileError, match="pixel 10000, outside the detector's 192 pixels"):
        open_recording(path).read()


def test_a_damaged_chunk_is_refused_with_the_path(tmp_path):
    g = Geometry((40, 40), (64, 64))
    counts, indices = events(g, dose=30.0)
    path = write_stemstream(tmp_path / "d.h5", stored(counts, indices, g), g)
    with h5py.File(path, "r") as f:
        start = f["events/indices"].id.get_chunk_info(0).byte_offset
    data = bytearray(path.read_bytes())
    data[start + 100:start + 200] = bytes(100)  # a stretch of zeros inside the compressed events
    path.write_bytes(bytes(data))
    with pytest.raises(ScanFileError, match="cannot be read .* the file is damaged"):
        open_recording(path).read()


def test_scan_ids_are_made_fit_for_the_wire(tmp_path):
    counts, indices = events(Geometry((6, 5), (16, 12)))
    path = write_stempy(tmp_path / "scan (2).h5", counts, indices, 5, 6, (16, 12))
    assert open_recording(path).scan_id == "scan__2_"
    with h5py.File(path, "r+") as f:
        f["metadata"].attrs["scan_id"] = "../../x" + "y" * 200
    rec = open_recording(path)
    assert rec.scan_id == "x" + "y" * 119 and "/" not in rec.scan_id
