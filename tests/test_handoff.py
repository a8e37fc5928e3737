"""Event chunks handed between processes of one host through a memory file system
(stream/transport/handoff.py): exact round trip, nothing left behind, clear refusals.

The cross-process path on a real cluster (two worker processes, /dev/shm, the blocks of a
scan written while it runs) is in tests/test_write_while_scanning.py."""

from __future__ import annotations

import errno
import multiprocessing
import os
import stat
import time

import numpy as np
import pytest

from operators.chunk import Chunk
from stream.session import worker
from stream.transport import handoff
from stream.transport.handoff import PREFIX, Handoff, put, sweep
from stream.transport.receiver import WorkerScan


def chunks(seed=0):
    """Random chunks: 40 frames of two sources, one with no frames, one with frames but no
    events."""
    rng = np.random.default_rng(seed)
    out = []
    for n in (40, 0, 3):
        counts = rng.integers(0, 30, n) if n != 3 else np.zeros(n, int)
        idx = rng.integers(0, 576 * 576, int(counts.sum())).astype(np.uint32)
        frames = rng.permutation(1000)[:n]
        out.append(Chunk.from_counts(frames, rng.integers(0, 2, n), frames // 2, counts, idx))
    return out


def same(a: list[Chunk], b: list[Chunk]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for name in ("frames", "sources", "positions", "offsets", "indices"):
            u, v = getattr(x, name), getattr(y, name)
            assert u.dtype == v.dtype and u.flags.writeable and u.flags.aligned, name
            np.testing.assert_array_equal(u, v)


def _load_in_child(h: Handoff, q) -> None:
    c = h.load()
    q.put([(x.frames.tolist(), x.indices.tolist()) for x in c])


def test_chunks_come_back_exactly_in_another_process_and_the_file_goes(tmp_path):
    sent = chunks()
    h = put(sent, str(tmp_path))
    assert stat.S_IMODE(os.stat(h.path).st_mode) == 0o600  # no other user reads the events
    q = multiprocessing.get_context("spawn").Queue()
    p = multiprocessing.get_context("spawn").Process(target=_load_in_child, args=(h, q))
    p.start()
    got = q.get(timeout=60)
    p.join(60)
    assert got == [(c.frames.tolist(), c.indices.tolist()) for c in sent]
    assert not os.path.exists(h.path)


def test_loaded_chunks_are_writable_views_equal_to_what_was_put(tmp_path):
    sent = chunks(1)
    h = put(sent, str(tmp_path))
    same(h.load(), sent)
    assert list(tmp_path.iterdir()) == []


def test_the_chunks_of_parts_handed_over_or_not_come_in_their_order(tmp_path):
    a, b = chunks(3), chunks(4)
    same(handoff.chunks_of([put(a, str(tmp_path)), b]), a + b)
    assert list(tmp_path.iterdir()) == []


def test_a_handoff_from_another_host_gone_or_not_one_is_refused_naming_the_file(tmp_path):
    h = put(chunks(), str(tmp_path))
    with pytest.raises(RuntimeError, match=f"{h.path} on another host; set \\[memory\\] handoff_dir"):
        Handoff(h.path, "some-other-boot-id", h.sizes).load()
    os.unlink(h.path)
    with pytest.raises(RuntimeError, match=f"{h.path}: No such file"):
        h.load()
    other = tmp_path / "results.h5"
    other.write_bytes(b"x")
    with pytest.raises(RuntimeError, match="is not a handoff file"):
        Handoff(str(other), h.host, h.sizes).load()
    assert other.exists()


def light_state(seed=0) -> WorkerScan:
    """A worker's closed scan as the writer gets it: int64 sums (narrowed on the way), a
    float image, a non-contiguous view, a stored-events state with its counts only."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 200, 4096)
    return WorkerScan("s", "w0", None, [], {
        "fused": {"bf": rng.integers(0, 70, (64, 64)), "com_x": rng.normal(size=(64, 64)),
                  "strided": rng.integers(0, 9, (64, 64))[:, ::2], "n": 7},
        "events": {"chunks": [], "spans": [], "counts": counts}}, ["an error"])


def same_state(a: WorkerScan, b: WorkerScan) -> None:
    assert (a.scan_id, a.worker, a.errors) == (b.scan_id, b.worker, b.errors)
    assert a.states.keys() == b.states.keys()
    for op, state in a.states.items():
        assert state.keys() == b.states[op].keys()
        for k, v in state.items():
            w = b.states[op][k]
            if isinstance(v, np.ndarray):
                assert v.dtype == w.dtype and v.shape == w.shape and w.flags.writeable, (op, k)
            np.testing.assert_array_equal(v, w)


def _load_object_in_child(h, q) -> None:
    ws = h.load()
    q.put({op: {k: np.asarray(v).tolist() if isinstance(v, np.ndarray) else v for k, v in st.items()}
           for op, st in ws.states.items()})


def test_a_state_comes_back_exactly_in_another_process_with_its_arrays_in_the_file(tmp_path):
    sent = light_state()
    h = handoff.put_object(sent, str(tmp_path))
    assert stat.S_IMODE(os.stat(h.path).st_mode) == 0o600
    # the contiguous arrays are in the file, not in the pickle that travels (a strided view
    # is pickled as a copy)
    assert len(h.pickled) < sent.states["fused"]["strided"].nbytes + 4096
    assert sum(h.sizes) >= sent.states["fused"]["com_x"].nbytes + sent.states["events"]["counts"].nbytes
    q = multiprocessing.get_context("spawn").Queue()
    p = multiprocessing.get_context("spawn").Process(target=_load_object_in_child, args=(h, q))
    p.start()
    got = q.get(timeout=60)
    p.join(60)
    assert got == {op: {k: np.asarray(v).tolist() if isinstance(v, np.ndarray) else v for k, v in st.items()}
                   for op, st in sent.states.items()}
    assert not os.path.exists(h.path)


def test_the_light_state_of_a_closed_scan_is_handed_over_or_falls_back(tmp_path, caplog):
    """``finalize.without_events`` with a handoff directory: the writer loads the same state
    it would have got over dask (``handoff.loaded``); a directory that cannot take it gives
    the state itself; a released key keeps no file."""
    from stream.session.finalize import without_events

    sent = light_state(1)
    h = without_events(sent, str(tmp_path), "scan-a")
    assert isinstance(h, handoff.HandedObject)
    same_state(sent, handoff.loaded(h))
    assert list(tmp_path.iterdir()) == []
    same_state(sent, handoff.loaded(without_events(sent)))  # on the writer itself: no file
    with caplog.at_level("WARNING", logger="stemstream.transport"):
        fallback = without_events(sent, str(tmp_path / "missing"), "scan-a")
    assert isinstance(fallback, WorkerScan) and "over dask's connections" in caplog.text
    same_state(sent, fallback)
    handoff.release("scan-b")
    assert isinstance(without_events(sent, str(tmp_path), "scan-b"), WorkerScan)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_put_leaves_no_file(tmp_path, monkeypatch):
    with pytest.raises(OSError):
        put(chunks(), str(tmp_path / "missing"))

    def full(fd, a, offset):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(handoff, "pwrite_all", full)
    with pytest.raises(OSError, match="No space"):
        put(chunks(), str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_sweep_removes_only_stale_handoff_files(tmp_path):
    old = put(chunks(), str(tmp_path))
    fresh = put(chunks(), str(tmp_path))
    other = tmp_path / f"{PREFIX}notours"
    other.write_bytes(b"x")
    then = time.time() - handoff.STALE_S - 5
    for p in (old.path, other):
        os.utime(p, (then, then))
    assert sweep(str(tmp_path)) == 1
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(fresh.path), other.name])
    assert sweep(str(tmp_path / "missing")) == 0


def test_on_one_host_compares_the_hosts_of_dask_addresses():
    assert handoff.on_one_host(["tls://127.0.0.1:4001", "tcp://127.0.0.1:4002"])
    assert not handoff.on_one_host(["tls://10.0.0.5:4001", "tls://10.0.0.6:4001"])
    assert handoff.on_one_host([])


class _Receiver:
    """Stands in for a worker's receiver: holds the chunks of one scan."""

    def __init__(self, parts):
        self.parts = parts

    def events_in(self, scan_id, lo, hi):
        return self.parts

    def close_scan(self, scan_id):
        return scan_id


def test_the_worker_hands_over_or_falls_back_and_removes_what_was_not_loaded(tmp_path, monkeypatch, caplog):
    sent = chunks(2)
    monkeypatch.setattr(worker, "_receiver", lambda name: _Receiver(sent))
    for name, fresh in (("_failed", set()), ("_filed", {}), ("_released", type(handoff._released)())):
        monkeypatch.setattr(handoff, name, fresh)
    assert worker.early_events_on_worker("p", "s", 0, 10) is sent  # no handoff_dir: as they are
    loaded = worker.early_events_on_worker("p", "s", 0, 10, str(tmp_path))
    same(loaded.load(), sent)
    unloaded = worker.early_events_on_worker("p", "s", 10, 20, str(tmp_path))
    assert os.path.exists(unloaded.path)
    # a directory that cannot take them: the chunks themselves, and one warning naming it
    for _ in range(2):
        assert worker.early_events_on_worker("p", "s", 0, 10, str(tmp_path / "missing")) is sent
    warned = [r.getMessage() for r in caplog.records if "handed" in r.getMessage()]
    assert len(warned) == 1 and str(tmp_path / "missing") in warned[0] and "handoff_dir" in warned[0]
    # the scan closes: the file of the block that never ran is removed, and a block of it
    # still under way then keeps no file either
    assert worker.close_on_worker("p", "s") == "s"
    assert list(tmp_path.iterdir()) == []
    assert worker.early_events_on_worker("p", "s", 20, 30, str(tmp_path)) is sent
    assert list(tmp_path.iterdir()) == []
