"""One receiver alone (no dask): real PUSH sources and a real report socket in this process."""

from __future__ import annotations

import time

import numpy as np
import pytest
import zmq

from conftest import dense_scan
from stream.transport import control
from stream.config import ChunkingSpec, LiveSpec, PipelineConfig, ScanSpec, validate
from stream.transport.protocol import Geometry
from stream.transport.receiver import Receiver

G = Geometry((6, 8), (24, 24), frames_per_position=1, n_sources=1, mrad_per_px=1.0,
             convergence_mrad=5.0, center=(11.5, 11.5))


@pytest.fixture
def rig(scripted_source):
    """A source, a receiver connected to it, and the coordinator's end of the report socket."""
    made = []

    def make(max_frames=10_000, max_latency_ms=50.0, live_rate=0.0, control_pub=None):
        src = scripted_source(1, curve=False)  # the receiver alone: plain sockets
        ctx = zmq.Context.instance()
        pull = ctx.socket(zmq.PULL)
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        cfg = validate(PipelineConfig(chunking=ChunkingSpec(max_frames=max_frames, max_latency_ms=max_latency_ms),
                                      scan=ScanSpec(timeout_s=5), live=LiveSpec(rate_hz=live_rate)))
        rec = Receiver(src.addresses, f"tcp://127.0.0.1:{port}", cfg, worker="w0", announce_address=control_pub)
        rec.start()
        src.wait_for_receivers()
        made.append((rec, pull))
        return src, rec, pull
    yield make
    for rec, pull in made:
        rec.stop()
        pull.close(0)


def reports(pull, until, timeout_s=10):
    """Collect reports until ``until(list)`` is true."""
    got = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not until(got):
        if pull.poll(50):
            got.append(control.decode(pull.recv_multipart()))
    return got


def events(seed=0):
    rng = np.random.default_rng(seed)
    counts = rng.poisson(20, G.n_frames).astype(np.uint32)
    return counts, rng.integers(0, 24 * 24, int(counts.sum())).astype(np.uint32)


def frames_reported(got):
    return sum(c for h, _ in got if h["kind"] == "frames" for _, _, c in h["ranges"])


def test_chunks_are_bounded_by_frames_and_close_returns_exact_state(rig):
    src, rec, pull = rig(max_frames=10)
    counts, indices = events(1)
    src.start("a", G)
    src.frames("a", G, counts, indices, batch=4)
    got = reports(pull, lambda g: frames_reported(g) >= G.n_frames)
    sizes = [sum(c for _, _, c in h["ranges"]) for h, _ in got if h["kind"] == "frames"]
    assert sum(sizes) == G.n_frames and max(sizes) <= 12  # chunks close at >= 10 frames of 4-frame messages
    ws = rec.close_scan("a")
    fused = next(op for op in ws.operators if op.name == "fused")  # virtual, com and sum in one pass
    np.testing.assert_array_equal(fused.finalize(ws.states["fused"])["diffraction_sum"].data,
                                  dense_scan(counts, indices, G).sum((0, 1)))


def test_a_lone_message_is_processed_within_the_latency_bound(rig):
    src, rec, pull = rig(max_frames=10_000, max_latency_ms=30)
    counts, indices = events(2)
    src.start("b", G)
    t0 = time.monotonic()
    src.frames("b", G, counts, indices, only=range(3))
    got = reports(pull, lambda g: frames_reported(g) >= 3)
    assert frames_reported(got) == 3 and time.monotonic() - t0 < 2.0


def test_late_and_broken_messages_are_reported_and_the_receiver_goes_on(rig, monkeypatch):
    from stream.transport.protocol import encode_frames
    src, rec, pull = rig()
    counts, indices = events(3)
    src.start("c", G)
    src.frames("c", G, counts, indices, only=range(5))
    reports(pull, lambda g: frames_reported(g) >= 5)
    rec.close_scan("c")
    build = PipelineConfig.operators

    def build_or_fail(cfg, g):  # a bug anywhere while handling one message
        if g.scan_shape == (7, 7):
            raise RuntimeError("boom")
        return build(cfg, g)
    monkeypatch.setattr(PipelineConfig, "operators", build_or_fail)
    src.frames("c", G, counts, indices, only=range(5, 7))                 # late
    src.send(0, [b"\x00garbage"])                                         # not msgpack
    src.start("bug", Geometry((7, 7), (24, 24)))                          # the bug
    src.send(0, encode_frames("bug", 0, Geometry((7, 7), (24, 24)), 0, np.array([1], np.uint32),
                              np.array([5], np.uint32)))
    too_big = Geometry((4, 4), (24, 24)).to_wire() | {"scan_shape": [2**20, 2**20]}
    import msgpack
    header = msgpack.packb({"proto": "stemstream/1", "kind": "frames", "scan_id": "huge", "source": 0,
                            "first": 0, "count": 0, "events": 0, **too_big})
    src.send(0, [header, b"", b""])                                       # absurd geometry
    src.start("d", G)
    src.frames("d", G, counts, indices)                                   # still receiving
    got = reports(pull, lambda g: frames_reported(g) >= G.n_frames)
    rejects = [(h["reason"], h["scan_id"]) for h, _ in got if h["kind"] == "reject"]
    assert ("late", "c") in rejects and ("not_msgpack", None) in rejects
    assert ("internal_error", None) in rejects and ("bad_geometry", "huge") in rejects, rejects
    assert frames_reported(got) == G.n_frames
    assert rec._thread.is_alive()


def test_live_snapshots_send_only_the_positions_that_changed(rig):
    src, rec, pull = rig(max_latency_ms=10, live_rate=20.0)
    counts, indices = events(4)
    src.start("e", G)
    src.frames("e", G, counts, indices, only=range(8, 16))  # scan row 1 only
    got = reports(pull, lambda g: any(h["kind"] == "live" for h, _ in g))
    header, arrays = next((h, a) for h, a in got if h["kind"] == "live")
    assert (header["lo"], header["hi"]) == (8, 16)
    assert arrays["fused/n"].shape == (8,) and arrays["fused/sum"].shape == (24 * 24,)
    np.testing.assert_array_equal(arrays["fused/sum"], np.bincount(indices[counts[:8].sum():counts[:16].sum()],
                                                                 minlength=24 * 24))


def test_no_live_snapshot_of_a_scan_every_source_ended(rig):
    """The coordinator's ``ended`` on the control channel: that scan's file comes next, so its
    detector-sized sums are not copied and sent again; a scan still running keeps getting
    snapshots (docs/PROTOCOL.md, receiver reports)."""
    pub = zmq.Context.instance().socket(zmq.PUB)
    control_port = pub.bind_to_random_port("tcp://127.0.0.1")
    try:
        src, rec, pull = rig(max_latency_ms=10, live_rate=20.0, control_pub=f"tcp://127.0.0.1:{control_port}")
        counts, indices = events(5)
        for sid in ("ended", "running"):
            src.start(sid, G)
            src.frames(sid, G, counts, indices, only=range(8))
        got = reports(pull, lambda g: {h["scan_id"] for h, _ in g if h["kind"] == "live"} == {"ended", "running"})
        assert {h["scan_id"] for h, _ in got if h["kind"] == "live"} == {"ended", "running"}
        deadline = time.monotonic() + 5
        while "ended" not in rec._ended:  # (a SUB socket joins a moment after connecting)
            assert time.monotonic() < deadline, "the receiver never heard 'ended'"
            pub.send_multipart(control.encode({"kind": "ended", "scan_ids": ["ended"]}))
            time.sleep(0.05)
        time.sleep(0.2)  # a snapshot taken before it heard comes first
        reports(pull, lambda g: False, timeout_s=0.3)
        for sid in ("ended", "running"):  # frames still queued when the sources ended
            src.frames(sid, G, counts, indices, only=range(8, 16))
        got = reports(pull, lambda g: frames_reported(g) >= 16)
        got += reports(pull, lambda g: False, timeout_s=0.5)  # ten live periods more
        live = [h for h, _ in got if h["kind"] == "live"]
        assert frames_reported(got) == 16  # both scans' frames were processed ...
        assert live and {h["scan_id"] for h in live} == {"running"}  # ... only the running one is shown
        arrays = [a for h, a in got if h["kind"] == "live"][-1]  # (after its last chunk)
        np.testing.assert_array_equal(arrays["fused/sum"], np.bincount(indices[:counts[:16].sum()],
                                                                     minlength=24 * 24))
        ws = rec.close_scan("ended")  # its final state has every frame: the file is complete
        fused = next(op for op in ws.operators if op.name == "fused")
        np.testing.assert_array_equal(fused.finalize(ws.states["fused"])["diffraction_sum"].data,
                                      np.bincount(indices[:counts[:16].sum()], minlength=24 * 24).reshape(24, 24))
    finally:
        pub.close(0)


WARM_UP_CHECK = """
import numpy as np, numba, operators, pkgutil, importlib, sys
from stream.config import PipelineConfig, build_operators
from stream.transport.protocol import Geometry, decode, encode_frames
from stream.session.worker import warm_up
from stream.transport.receiver import chunk_from_messages

mods = [importlib.import_module(m.name) for m in pkgutil.walk_packages(operators.__path__, "operators.")]
kernels = {f"{m.__name__}.{k}": v for m in mods for k, v in vars(m).items()
           if isinstance(v, numba.core.registry.CPUDispatcher)}
warm_up(PipelineConfig())
before = {k: len(v.signatures) for k, v in kernels.items()}
# a real scan with another geometry, 4 sources, as the receiver builds its chunks
g = Geometry((16, 12), (192, 160), n_sources=4, center=(90.0, 80.0), mrad_per_px=0.5, convergence_mrad=20.0)
rng = np.random.default_rng(1)
msgs = []
for s in range(4):
    counts = rng.poisson(30, g.n_frames).astype(np.uint32)
    idx = rng.integers(0, g.n_pixels, int(counts.sum())).astype(np.uint32)
    msgs.append(decode(encode_frames("real", s, g, 0, counts, idx)))
for op in build_operators(PipelineConfig(), g):
    a, b = op.new_state(), op.new_state()
    op.process(a, chunk_from_messages(msgs[:1], g))  # read-only buffers of one message
    op.process(b, chunk_from_messages(msgs, g))  # a concatenated copy
    op.merge(a, b)
    op.finalize(a)
compiled = sorted(k for k, v in kernels.items() if len(v.signatures) > before[k])
print("compiled after warm-up:", compiled)
sys.exit(1 if compiled or not any(before.values()) else 0)
"""


def test_warm_up_compiles_every_kernel_a_real_scan_uses(tmp_path):
    """In a fresh process (no kernel compiled yet): after warm_up, a real chunk of another
    geometry through the same operators needs no new compilation."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", WARM_UP_CHECK], cwd=root, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def test_numba_cache_directory_follows_the_source(tmp_path, monkeypatch):
    """A change in any source file gives another cache directory (numba alone would keep a
    stale kernel that calls one from another file); the same tree gives the same one."""
    import shutil
    from pathlib import Path

    from operators.numba_cache import PACKAGES, source_hash
    root = Path(__file__).resolve().parents[1]
    copy = tmp_path / "tree"
    for pkg in PACKAGES:
        shutil.copytree(root / pkg, copy / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    same = source_hash(copy)
    assert same == source_hash(root)
    kernels = copy / "operators" / "kernels.py"
    kernels.write_text(kernels.read_text() + "\n# an edit\n")
    assert source_hash(copy) != same
