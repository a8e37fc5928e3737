"""Events spilled to local disk: the spill file alone, a receiver over a tiny memory budget fed
real messages, and the ``[memory]`` configuration.

Every expectation is computed here from the data sent (plain numpy), never by the code tested.
"""

from __future__ import annotations

import asyncio
import errno
import os
import pickle
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
import zmq

from operators.chunk import Chunk
from operators.events import EventStore
from stream.transport import control
from stream.config import (
    ChunkingSpec,
    ConfigError,
    LiveSpec,
    MemorySpec,
    PipelineConfig,
    load_config,
    validate,
)
from stream.transport.protocol import Geometry
from stream.transport.receiver import Receiver
from stream.transport.spill import SpilledChunk, SpillFile

NAMES = ("frames", "sources", "positions", "offsets", "indices")
DTYPES = (np.int64, np.int16, np.int64, np.int64, np.uint32)


def random_chunk(rng, n: int, mean_events: float = 30.0) -> Chunk:
    """n frame parts with extreme values in every array (the file must not care)."""
    counts = rng.poisson(mean_events, n)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return Chunk(rng.integers(-2**62, 2**62, n, dtype=np.int64),
                 rng.integers(-2**15, 2**15, n, dtype=np.int16),
                 rng.integers(-1, 2**40, n, dtype=np.int64), offsets,
                 rng.integers(0, 2**32, int(offsets[-1]), dtype=np.uint32))


def assert_same_bits(got: Chunk, want: Chunk):
    assert isinstance(got, Chunk)
    for name, dtype in zip(NAMES, DTYPES):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), name


def disk_bytes(n_frames: int, n_events: int) -> int:
    """frames, positions, offsets (n + 1) int64; sources int16; indices uint32."""
    return 8 * n_frames + 2 * n_frames + 8 * n_frames + 8 * (n_frames + 1) + 4 * n_events


# ------------------------------------------------------------------ the spill file

def test_spilled_chunks_read_back_bit_for_bit_from_two_threads(tmp_path):
    rng = np.random.default_rng(7)
    chunks = [random_chunk(rng, n) for n in (5, 0, 1, 300, 64, 2000)]
    chunks.append(Chunk.from_counts([3], [0], [3], [0], np.zeros(0, np.uint32)))  # a frame, no events
    directory = tmp_path / "not" / "yet"
    spill = SpillFile(directory)
    spilled = [spill.write(c) for c in chunks]
    assert os.listdir(directory) == []  # unlinked at once: nothing to clean up, ever
    sizes = [disk_bytes(len(c.frames), len(c.indices)) for c in chunks]
    assert [s.nbytes for s in spilled] == sizes
    assert os.fstat(spill.fd).st_size == sum(sizes)
    assert [(s.n_frames, s.n_events) for s in spilled] == [(len(c.frames), len(c.indices)) for c in chunks]

    start = threading.Barrier(2)

    def load_all(seed):
        order = np.random.default_rng(seed).permutation(np.tile(np.arange(len(chunks)), 20))
        start.wait()
        return [(int(i), spilled[i].load()) for i in order]

    with ThreadPoolExecutor(2) as pool:
        for loads in pool.map(load_all, [1, 2]):
            for i, got in loads:
                assert_same_bits(got, chunks[i])


def test_a_pickled_spilled_chunk_is_the_plain_chunk(tmp_path):
    chunk = random_chunk(np.random.default_rng(3), 40)
    spilled = SpillFile(tmp_path).write(chunk)
    assert isinstance(spilled, SpilledChunk)
    back = pickle.loads(pickle.dumps(spilled))
    assert type(back) is Chunk
    assert_same_bits(back, chunk)
    state = pickle.loads(pickle.dumps({"chunks": [spilled, chunk]}))  # as a state travels
    assert [type(c) for c in state["chunks"]] == [Chunk, Chunk]


def test_a_directory_that_cannot_hold_the_file_is_named_with_the_fix(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match=r"a-file/sub.*\[memory\] spill_dir"):
        SpillFile(blocker / "sub")


def test_a_full_disk_is_named_and_the_file_stays_usable(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    first, lost, last = (random_chunk(rng, n) for n in (10, 20, 30))
    spill = SpillFile(tmp_path)
    kept = spill.write(first)
    real_pwrite = os.pwrite

    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space")
    monkeypatch.setattr(os, "pwrite", disk_full)
    with pytest.raises(OSError, match=rf"{tmp_path}.*No space.*\[memory\] spill_dir") as e:
        spill.write(lost)
    assert e.value.errno == errno.ENOSPC
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    after = spill.write(last)
    assert_same_bits(kept.load(), first)
    assert_same_bits(after.load(), last)
    assert os.fstat(spill.fd).st_size == disk_bytes(10, first.n_events) + disk_bytes(30, last.n_events)


# ------------------------------------------------------------------ a receiver over budget

G = Geometry((32, 32), (32, 32), frames_per_position=1, n_sources=1, mrad_per_px=1.0,
             convergence_mrad=5.0, center=(15.5, 15.5))
N_SOURCES = 3
TINY_MB = 0.05


@pytest.fixture
def rig(scripted_source, tmp_path):
    """Sources of 3 sectors, a receiver with the given budget, the report socket's far end."""
    made = []

    def make(budget_mb=None, spill_dir=None):
        src = scripted_source(N_SOURCES, curve=False)  # the receiver alone: plain sockets
        pull = zmq.Context.instance().socket(zmq.PULL)
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        memory = MemorySpec() if budget_mb is None else MemorySpec(events_in_memory_mb=budget_mb)
        cfg = validate(PipelineConfig(chunking=ChunkingSpec(max_frames=48), live=LiveSpec(rate_hz=0),
                                      memory=memory))
        rec = Receiver(src.addresses, f"tcp://127.0.0.1:{port}", cfg, worker="w0",
                       spill_dir=str(spill_dir or tmp_path / "spill"))
        flushed = []  # the in-memory bytes after every flush
        flush = rec._flush

        def tracked(work, spill=True):
            flush(work, spill)
            flushed.append(rec.events_in_memory_bytes)
        rec._flush = tracked
        rec.start()
        src.wait_for_receivers()
        made.append((rec, pull))
        return src, rec, pull, flushed
    yield make
    for rec, pull in made:
        rec.stop()
        pull.close(0)


def scan_events(seed):
    rng = np.random.default_rng(seed)
    counts = rng.poisson(40, G.n_frames).astype(np.uint32)
    return counts, rng.integers(0, G.n_pixels, int(counts.sum())).astype(np.uint32)


def send_scan(src, pull, scan_id, counts, indices, seed):
    """Every frame of every source, batches in random order; wait until all are processed."""
    src.start(scan_id, G)
    shuffle = np.random.default_rng(seed).permutation
    src.frames(scan_id, G, counts, indices, batch=16, order=shuffle)
    got, done = [], 0
    deadline = time.monotonic() + 30
    while done < G.n_frames * N_SOURCES and time.monotonic() < deadline:
        if pull.poll(50):
            header, _ = control.decode(pull.recv_multipart())
            got.append(header)
            done += sum(c for _, _, c in header["ranges"]) if header["kind"] == "frames" else 0
    assert done == G.n_frames * N_SOURCES
    return got


def reference_csr(counts, indices):
    """Each frame's events sorted by pixel (fpp 1, no flyback: stored frame = frame)."""
    rows = np.repeat(np.arange(len(counts)), counts)
    return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]), indices[np.lexsort((indices, rows))]


def in_memory_bytes(rec, scan_id):
    with rec._lock:
        chunks = rec._scans[scan_id].states["events"]["chunks"]
        return sum(disk_bytes(len(c.frames), len(c.indices)) for c in chunks if isinstance(c, Chunk))


def results(ws):
    return {(op.name, k): r.data for op in ws.operators if not isinstance(op, EventStore)
            for k, r in op.finalize(ws.states[op.name]).items()}


def test_a_receiver_over_budget_spills_and_loses_nothing(rig, tmp_path):
    counts, indices = scan_events(1)
    src, rec, pull, flushed = rig(budget_mb=TINY_MB)
    got = send_scan(src, pull, "big", counts, indices, seed=2)
    assert not [h for h in got if h["kind"] == "reject"]
    assert os.listdir(tmp_path / "spill") == []
    held = in_memory_bytes(rec, "big")
    assert rec.events_in_memory_bytes == held

    ws = rec.close_scan("big")
    assert rec.events_in_memory_bytes == 0
    chunks = ws.states["events"]["chunks"]
    spilled = [c for c in chunks if isinstance(c, SpilledChunk)]
    assert len(spilled) > 0.75 * len(chunks)
    largest = max(disk_bytes(c.n_frames, c.n_events) for c in chunks)
    budget = TINY_MB * 1e6
    assert held <= budget + largest
    assert max(flushed) <= budget + largest

    store = next(op for op in ws.operators if isinstance(op, EventStore))
    offsets, csr = store.finalize(ws.states["events"])
    want_offsets, want_indices = reference_csr(counts, indices)
    np.testing.assert_array_equal(offsets, want_offsets)
    np.testing.assert_array_equal(csr, want_indices)

    src2, rec2, pull2, _ = rig()  # the default budget: nothing spilled
    send_scan(src2, pull2, "big", counts, indices, seed=3)
    plain = rec2.close_scan("big")
    assert not any(isinstance(c, SpilledChunk) for c in plain.states["events"]["chunks"])
    want = results(plain)
    have = results(ws)
    assert have.keys() == want.keys() and len(want) > 5
    for key in want:
        np.testing.assert_array_equal(have[key], want[key], err_msg=str(key))


def test_a_spill_dir_that_fails_keeps_the_events_in_memory_and_says_so(rig, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    counts, indices = scan_events(5)
    src, rec, pull, _ = rig(budget_mb=TINY_MB, spill_dir=blocker / "spill")
    got = send_scan(src, pull, "kept", counts, indices, seed=6)
    rejects = [h for h in got if h["kind"] == "reject"]
    assert len(rejects) == 1 and rejects[0]["reason"] == "spill_failed"
    assert "kept" in rejects[0]["detail"] and "a-file/spill" in rejects[0]["detail"]
    assert rec.events_in_memory_bytes == in_memory_bytes(rec, "kept") > TINY_MB * 1e6
    ws = rec.close_scan("kept")
    assert rec.events_in_memory_bytes == 0 and ws.errors == []
    assert all(isinstance(c, Chunk) for c in ws.states["events"]["chunks"])
    offsets, csr = next(op for op in ws.operators if isinstance(op, EventStore)).finalize(ws.states["events"])
    want_offsets, want_indices = reference_csr(counts, indices)
    np.testing.assert_array_equal(offsets, want_offsets)
    np.testing.assert_array_equal(csr, want_indices)


@pytest.mark.parametrize("configured", ["", "/somewhere/fast"])
def test_the_plugin_spills_to_the_configured_or_the_worker_directory(monkeypatch, tmp_path, configured):
    import stream.session.worker
    monkeypatch.setattr(stream.session.worker, "warm_up", lambda config: 0.0)  # not what is tested here
    monkeypatch.setattr(stream.session.worker.Receiver, "start", lambda self: None)
    cfg = validate(PipelineConfig(memory=MemorySpec(spill_dir=configured)))
    plugin = stream.session.worker.ReceiverPlugin("p", ["tcp://127.0.0.1:1"], "tcp://127.0.0.1:2", cfg)
    worker = SimpleNamespace(address="w", local_directory=str(tmp_path), executors={})
    asyncio.run(plugin.setup(worker))
    assert plugin.receiver.spill_dir == (configured or str(tmp_path))


# ------------------------------------------------------------------ configuration

def write(tmp_path, text):
    p = tmp_path / "pipeline.toml"
    p.write_text(text)
    return p


def test_memory_defaults_and_parsing(tmp_path):
    assert load_config(None).memory == MemorySpec(128.0, "")
    cfg = load_config(write(tmp_path, "[memory]\nevents_in_memory_mb = 0.5\nspill_dir = '/scratch/x'\n"))
    assert (cfg.memory.events_in_memory_mb, cfg.memory.spill_dir) == (0.5, "/scratch/x")
    assert load_config(write(tmp_path, "[memory]\nevents_in_memory_mb = 64\n")).memory.events_in_memory_mb == 64
    assert Receiver([], "tcp://127.0.0.1:1", load_config(None)).spill_dir == tempfile.gettempdir()


@pytest.mark.parametrize("text,match", [
    ("[memory]\nevents_in_memory_mb = 0\n", r"\[memory\] events_in_memory_mb must be > 0"),
    ("[memory]\nevents_in_memory_mb = -3.5\n", r"\[memory\] events_in_memory_mb must be > 0"),
    ("[memory]\nevents_in_memory_mb = nan\n", r"\[memory\] events_in_memory_mb must be > 0"),
    ("[memory]\nevents_in_memory_mb = '1GB'\n", r"events_in_memory_mb = '1GB' has the wrong type; expected float"),
    ("[memory]\nspill_dir = 3\n", r"spill_dir = 3 has the wrong type; expected a string"),
    ("[memory]\nwrite_block_mb = 0\n", r"\[memory\] write_block_mb must be > 0"),
    ("[memory]\nearly_block_mb = 0\n", r"\[memory\] early_block_mb must be > 0"),
    ("[memory]\nhandoff_dir = 'shm'\n", r"\[memory\] handoff_dir must be an absolute path .* or \"\""),
    ("[memory]\nspill = '/tmp'\n", r"unknown key\(s\) spill; valid keys are early_block_mb, events_in_memory_mb, handoff_dir, spill_dir, write_block_mb"),
    ("spill_dir = '/tmp'\n", r"did you mean spill_dir under \[memory\]"),
])
def test_bad_memory_settings_name_the_key(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, text))


def test_dropping_duplicates_puts_spilled_events_back_on_disk(tmp_path):
    """finalize.keep_owned_frames on a state whose chunks were spilled: the kept events are
    on disk again (not in memory), and they are exactly the owned frame parts."""
    from stream.config import build_operators
    from stream.session.finalize import keep_owned_frames
    from stream.transport.receiver import WorkerScan

    g = Geometry((4, 6), (16, 16), n_sources=2)
    ops = [op for op in build_operators(PipelineConfig(), g) if isinstance(op, EventStore)]
    store = ops[0]
    rng = np.random.default_rng(9)
    state, spill, parts = store.new_state(), SpillFile(tmp_path), {}
    for first in range(0, g.n_frames, 8):  # both sources, every frame
        frames = np.repeat(np.arange(first, first + 8), 2)
        sources = np.tile([0, 1], 8)
        counts = rng.integers(0, 5, len(frames))
        indices = np.sort(rng.integers(0, 256, counts.sum())).astype(np.uint32)
        chunk = Chunk.from_counts(frames, sources, frames, counts, indices)
        off = chunk.offsets
        for i, (f, s) in enumerate(zip(frames, sources)):
            parts[(int(s), int(f))] = np.sort(indices[off[i]:off[i + 1]])
        store.process(state, chunk)
    state["chunks"] = [spill.write(c) for c in state["chunks"]]
    own = rng.random((2, g.n_frames)) < 0.5  # the other copies belong to another worker
    ws = keep_owned_frames(WorkerScan("s", "w", g, ops, {store.name: state}, []), own)
    kept = ws.states[store.name]["chunks"]
    assert kept and all(isinstance(c, SpilledChunk) for c in kept)
    offsets, indices = store.finalize(ws.states[store.name])
    for f in range(g.n_frames):
        want = np.sort(np.concatenate([parts[(s, f)] for s in (0, 1) if own[s, f]] + [np.zeros(0, np.uint32)]))
        np.testing.assert_array_equal(indices[offsets[f]:offsets[f + 1]], want)
