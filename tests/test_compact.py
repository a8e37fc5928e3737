"""Integer arrays narrowed for their trip between processes (stream.transport.compact): the
same values, dtype and shape come back, in fewer bytes; scan states and results use it when
pickled (dask moves them that way)."""

from __future__ import annotations

import pickle

import msgpack
import numpy as np
import pytest

from stream.session.finalize import ScanResult
from stream.transport.compact import MIN_BYTES, Narrowed, narrow, widen
from stream.transport.receiver import WorkerScan


def sparse_sum(seed=0, shape=(576, 576), events=100_000):
    """A small scan's summed pattern: int64 counts of a few per pixel (np.add.at, not the code
    under test)."""
    rng = np.random.default_rng(seed)
    total = np.zeros(shape[0] * shape[1], np.int64)
    np.add.at(total, rng.integers(0, total.size, events), 1)
    return total.reshape(shape)


def test_narrowed_arrays_come_back_exact():
    cases = [sparse_sum(), -sparse_sum(1), sparse_sum(2) * 300, sparse_sum(3).astype(">i8") + 70_000,
             np.full(20_000, 2**40, np.int64), np.arange(100_000, dtype=np.uint32)[::-1].copy(),
             np.asfortranarray(sparse_sum(4).astype(np.int32))]
    narrowest = [1, 1, 2, 4, 8, 4, 1]  # bytes per value on the way
    for a, size in zip(cases, narrowest):
        n = narrow(a)
        on_the_way = n.data if isinstance(n, Narrowed) else n
        assert on_the_way.dtype.itemsize == size, (a.dtype, a.min(), a.max())
        back = widen(pickle.loads(pickle.dumps(n)))
        assert back.dtype == a.dtype and back.shape == a.shape
        np.testing.assert_array_equal(back, a)


def test_small_float_and_non_array_values_travel_as_they_are():
    small = np.arange(MIN_BYTES // 8 - 1, dtype=np.int64)
    floats = np.linspace(0, 1, 100_000)
    for v in (small, floats, [1, 2], "text", None):
        assert narrow(v) is v


def test_a_workers_scan_state_and_a_result_pickle_smaller_and_exact():
    total = sparse_sum(5)
    ws = WorkerScan("s", "w0", None, [], {"fused": {"sum": total, "n": np.arange(1024)}, "events": {"chunks": []}}, [])
    raw = len(pickle.dumps(total, protocol=5))
    packed = pickle.dumps(ws, protocol=5)
    assert len(packed) < raw / 4  # counts of a few per pixel: one byte each
    back = pickle.loads(packed)
    assert back.states["fused"]["sum"].dtype == np.int64
    np.testing.assert_array_equal(back.states["fused"]["sum"], total)
    np.testing.assert_array_equal(back.states["fused"]["n"], np.arange(1024))
    assert ws.states["fused"]["sum"] is total  # the worker's own state is left as it was
    r = ScanResult("s", None, "complete", "", results={"diffraction_sum": total, "com_x": np.zeros((32, 32))})
    back = pickle.loads(pickle.dumps(r, protocol=5))
    assert back.results["diffraction_sum"].dtype == np.int64 and back.results["com_x"].dtype == np.float64
    np.testing.assert_array_equal(back.results["diffraction_sum"], total)
    assert r.results["diffraction_sum"] is total


def test_a_control_message_carries_narrowed_arrays_and_gives_back_the_originals():
    """A live snapshot's integer sums travel narrowed between a receiver and the coordinator
    (stream.transport.control): fewer bytes on the wire, the same values, dtype and shape out;
    floats and unnarrowed arrays as they were."""
    from stream.transport import control

    images = np.stack([sparse_sum(6, (1, 70_000))[0], sparse_sum(7, (1, 70_000))[0]])[:, 5:60_005]  # a view
    floats = np.linspace(0, 1, 20_000)
    arrays = {"fused/images": narrow(images), "fused/sum": narrow(sparse_sum(8) * 1000), "com": floats}
    parts = control.encode({"kind": "live", "lo": 5}, arrays)
    assert sum(memoryview(p).nbytes for p in parts[1:]) < (images.nbytes + 576 * 576 * 8) / 3 + floats.nbytes
    header, back = control.decode([bytes(memoryview(p)) for p in parts])
    assert header == {"kind": "live", "lo": 5}
    assert back["fused/images"].dtype == np.int64 and back["fused/sum"].dtype == np.int64
    np.testing.assert_array_equal(back["fused/images"], images)
    np.testing.assert_array_equal(back["fused/sum"], sparse_sum(8) * 1000)
    np.testing.assert_array_equal(back["com"], floats)
    header, as_sent = control.decode([bytes(memoryview(p)) for p in parts], widen=False)
    assert header["widen"] == {"fused/images": "<i8", "fused/sum": "<i8"}
    assert as_sent["fused/images"].dtype.itemsize < 8 and as_sent["com"].dtype == np.float64
    np.testing.assert_array_equal(as_sent["fused/images"], images)
    spec_parts = list(parts)
    head = msgpack.unpackb(bytes(memoryview(parts[0])))
    head["arrays"][0]["as"] = "<U100000"  # not an integer type: a forged report, refused
    spec_parts[0] = msgpack.packb(head)
    with pytest.raises(ValueError, match="'as' must be an integer dtype"):
        control.decode([bytes(memoryview(p)) for p in spec_parts], widen=False)
