"""Scan files: atomic writes that never overwrite, and what is refused when reading."""

import h5py
import numpy as np
import pytest

from operators.base import Result
from stream.files.storage import ScanFileError, describe, write_scan


def fields(scan_id="s1", n_events=10):
    rng = np.random.default_rng(0)
    counts = np.array([n_events // 2, n_events - n_events // 2])
    return dict(scan_id=scan_id, status="complete", reason="all frames arrived",
                geometry={"scan_shape": [1, 2], "frame_shape": [4, 4], "frames_per_position": 1},
                metadata={"beam_energy_keV": 300.0, "nested": {"a": 1}, "mixed": [1, "x"]},
                results={"bf": Result(np.arange(2).reshape(1, 2), "nav", "counts")},
                offsets=np.r_[0, np.cumsum(counts)], indices=rng.integers(0, 16, n_events).astype(np.uint32),
                completeness={}, completeness_summary={"n_missing": 0}, provenance={"version": "x"},
                compression_level=1)


def test_a_scan_id_written_twice_gets_a_new_name(tmp_path):
    first = write_scan(tmp_path / "s1.h5", **fields())
    second = write_scan(tmp_path / "s1.h5", **fields(n_events=4))
    assert (first.name, second.name) == ("s1.h5", "s1-2.h5")
    assert describe(first)["events"]["n_events"] == 10 and describe(second)["events"]["n_events"] == 4
    assert not list(tmp_path.glob("*.partial"))


def test_values_survive_the_round_trip(tmp_path):
    f = fields()
    path = write_scan(tmp_path / "s1.h5", **f)
    with h5py.File(path, "r") as h:
        np.testing.assert_array_equal(h["events/indices"][()], f["indices"])
        np.testing.assert_array_equal(h["events/offsets"][()], f["offsets"])
        assert h["events/indices"].compression == "gzip" and h["events/indices"].shuffle
    d = describe(path)
    assert d["metadata"]["nested"] == {"a": 1} and d["metadata"]["mixed"] == [1, "x"]


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    bad = fields()
    bad["results"] = {"bf": Result(object(), "nav")}  # HDF5 cannot store it
    with pytest.raises(TypeError):
        write_scan(tmp_path / "s1.h5", **bad)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("make,match", [
    (lambda p: p.write_bytes(b"not hdf5 at all"), "not an HDF5 file"),
    (lambda p: h5py.File(p, "w").close(), "not a stemstream scan file"),
    (lambda p: p.mkdir(), "is a directory"),
])
def test_files_that_are_not_scans_are_refused_with_the_path(tmp_path, make, match):
    p = tmp_path / "x.h5"
    make(p)
    with pytest.raises(ScanFileError, match=match) as e:
        describe(p)
    assert str(p) in str(e.value)


def test_metadata_of_every_kind_reads_back_as_written(tmp_path):
    f = fields()
    f["metadata"] = {"looks_like_json": "[1, 2]", "big": list(range(5000)), "none": None,
                     "list_of_maps": [{"a": 1}], "flag": True}
    d = describe(write_scan(tmp_path / "s1.h5", **f))["metadata"]
    assert d["looks_like_json"] == "[1, 2]" and d["big"] == list(range(5000))
    assert d["none"] is None and d["list_of_maps"] == [{"a": 1}] and d["flag"] is True


def test_a_scan_named_like_a_suffixed_one_never_overwrites_it(tmp_path):
    a = write_scan(tmp_path / "x.h5", **fields("x"))
    b = write_scan(tmp_path / "x.h5", **fields("x"))
    c = write_scan(tmp_path / "x-2.h5", **fields("x-2"))
    assert [p.name for p in (a, b, c)] == ["x.h5", "x-2.h5", "x-2-2.h5"]


@pytest.mark.parametrize("level", [0, 1, 2, 3, 6])
def test_every_level_writes_standard_gzip_that_h5py_reads_back(tmp_path, level):
    """Levels 1-3 (ISA-L) and 4-9 (zlib) write the standard filter pipeline: h5py's own
    decoder returns every value, events and result arrays alike, chunk edges included."""
    rng = np.random.default_rng(level)
    f = fields(n_events=3_000_001)  # three chunks of 1 Mi events, the last one cut
    f["compression_level"] = level
    f["offsets"] = np.array([0, 1_000_000, 3_000_001])
    image = np.round(rng.normal(size=(3000, 257)), 1)  # 6 MB, rows not a multiple of a chunk
    noise = rng.normal(size=(300, 257))  # 600 kB of full-precision noise: shrinks by a tenth only
    table = rng.integers(0, 5, (70_000, 3)).astype(np.int16)
    f["results"] = {"image": Result(image, "nav"), "table": Result(table, "table"),
                    "small": Result(np.arange(5.0), "table"), "noise": Result(noise, "nav")}
    path = write_scan(tmp_path / "s1.h5", **f)
    with h5py.File(path, "r") as h:
        np.testing.assert_array_equal(h["events/indices"][()], f["indices"])
        np.testing.assert_array_equal(h["results/image"][()], image)
        np.testing.assert_array_equal(h["results/table"][()], table)
        np.testing.assert_array_equal(h["results/small"][()], np.arange(5.0))
        np.testing.assert_array_equal(h["results/noise"][()], noise)
        assert h["results/small"].compression is None  # too small to be worth a chunk
        assert h["results/noise"].compression is None  # not worth compressing (storage.INCOMPRESSIBLE)
        assert h["results/noise"].chunks is not None
        for name in ("events/indices", "results/image", "results/table"):
            assert h[name].compression == ("gzip" if level else None), name
            assert bool(h[name].shuffle) == bool(level), name
        if level:
            assert h["results/image"].id.get_storage_size() < image.nbytes / 2  # shuffle helps rounded floats
            assert h["results/table"].id.get_storage_size() < table.nbytes / 2


@pytest.mark.parametrize("level", [0, 2])
def test_events_appended_in_any_blocks_read_back_whole(tmp_path, monkeypatch, level):
    """ScanWriter: events appended in blocks that do not fit the HDF5 chunks (7-event chunks
    here, blocks of 0..20 events) read back as the whole array, in standard gzip chunks."""
    import stream.files.storage as storage
    monkeypatch.setattr(storage, "EVENTS_CHUNK", 7)
    rng = np.random.default_rng(3)
    f = fields(n_events=100)
    f["compression_level"] = level
    indices = f.pop("indices")
    cuts = np.sort(rng.integers(0, 101, 12))
    with storage.ScanWriter(tmp_path / "s1.h5", **f) as w:
        for block in np.split(indices, cuts):
            w.append(block)
    with h5py.File(w.final, "r") as h:
        np.testing.assert_array_equal(h["events/indices"][()], indices)
        assert h["events/indices"].chunks == (7,)
        assert h["events/indices"].compression == ("gzip" if level else None)


def test_a_writer_with_too_few_or_too_many_events_keeps_nothing(tmp_path):
    from stream.files.storage import ScanWriter
    f = fields(n_events=10)
    indices = f.pop("indices")
    with pytest.raises(ValueError, match="9 events written, the offsets announce 10"):
        with ScanWriter(tmp_path / "s1.h5", **f) as w:
            w.append(indices[:9])
    with pytest.raises(ValueError, match="more events than the 10"):
        with ScanWriter(tmp_path / "s1.h5", **f) as w:
            w.append(indices)
            w.append(indices[:1])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("level", [0, 2])
def test_blocks_compressed_elsewhere_make_the_same_file(tmp_path, monkeypatch, level):
    """compress_block on arbitrary cuts (inside one chunk, on boundaries, across several,
    the short last chunk), put_block in order: the events read back whole."""
    import stream.files.storage as storage
    monkeypatch.setattr(storage, "EVENTS_CHUNK", 7)
    f = fields(n_events=100)
    f["compression_level"] = level
    indices = f.pop("indices")
    cuts = [0, 3, 5, 7, 14, 15, 30, 31, 31, 60, 63, 97, 100]
    with storage.ScanWriter(tmp_path / "s1.h5", **f) as w:
        for a, b in zip(cuts[:-1], cuts[1:]):
            w.put_block(storage.compress_block(indices[a:b], a, 100, level))
    with h5py.File(w.final, "r") as h:
        np.testing.assert_array_equal(h["events/indices"][()], indices)
    block = storage.compress_block(indices[10:40], 10, 100, level)
    with pytest.raises(ValueError, match="from 10 where 0 is next"):
        with storage.ScanWriter(tmp_path / "s2.h5", **f) as w:
            w.put_block(block)
    assert not (tmp_path / "s2.h5").exists()


@pytest.mark.parametrize("level", [0, 2])
def test_a_file_grown_while_its_scan_runs_equals_one_written_at_once(tmp_path, monkeypatch, level):
    """ScanWriter(growing=True): events appended before their number is known (blocks that
    cut the 7-event chunks anywhere), then the head, then the rest as compressed blocks: the
    same file, dataset by dataset and attribute by attribute, as write_scan of the same
    fields; fewer events than one chunk are refused."""
    import stream.files.storage as storage
    from faults import assert_same_file
    monkeypatch.setattr(storage, "EVENTS_CHUNK", 7)
    f = fields(n_events=100)
    f["compression_level"] = level
    indices = f.pop("indices")
    at_once = storage.write_scan(tmp_path / "once" / "s1.h5", indices=indices, **f)
    w = storage.ScanWriter(tmp_path / "grown" / "s1.h5", compression_level=level, growing=True)
    for a, b in [(0, 3), (3, 10), (10, 11), (11, 40), (40, 52)]:
        w.append(indices[a:b])
    head = {k: v for k, v in f.items() if k != "compression_level"}
    w.finish_head(**head)
    for a, b in [(52, 60), (60, 97), (97, 100)]:
        w.put_block(storage.compress_block(indices[a:b], a, 100, level))
    grown = w.close()
    assert_same_file(grown, at_once)
    with h5py.File(grown, "r") as h:
        assert h["events/indices"].maxshape == (None,) and h["events/indices"].chunks == (7,)
    small = storage.ScanWriter(tmp_path / "small" / "s1.h5", compression_level=level, growing=True)
    small.append(indices[:3])
    head["offsets"] = np.array([0, 3, 5])
    with pytest.raises(ValueError, match="at least 7"):
        small.finish_head(**head)
    small.discard()
    assert not list((tmp_path / "small").iterdir())
