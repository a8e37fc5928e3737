"""The ``dense`` message kind (docs/PROTOCOL.md): round trips without copies, every rejection,
and a receiver turning dense frames into the same events as ``frames`` messages: electron
counts per pixel exactly, raw frames through the counting operator."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import zmq

from conftest import dense_scan
from test_receiver import frames_reported
from test_receiver import reports as _reports
from operators.electron_counting import ElectronCounter
from stream.config import ChunkingSpec, CountingSpec, LimitsSpec, LiveSpec, PipelineConfig, ScanSpec, validate
from stream.files.counting_file import Calibration
from stream.transport import protocol as p
from stream.transport.receiver import Receiver

GEOM = p.Geometry((4, 5), (16, 12), frames_per_position=2, n_sources=2, sector=(8, 16), flyback=1)


def wire(parts):
    return [bytes(memoryview(x)) for x in parts]


@pytest.mark.parametrize("dtype", ["<u1", "<u2", "<u4"])
@pytest.mark.parametrize("values", ["raw", "counts"])
def test_dense_round_trip(dtype, values):
    frames = np.random.default_rng(0).integers(0, 200, (3, 8, 12)).astype(dtype)
    m = p.decode(wire(p.encode_dense("scan-1", 1, GEOM, 7, frames, values)))
    assert (m.kind, m.first, m.count, m.header["values"], m.header["dtype"]) == ("dense", 7, 3, values, dtype)
    assert m.geometry == GEOM
    np.testing.assert_array_equal(m.dense, frames)
    assert m.dense.dtype == np.dtype(dtype) and not m.dense.flags.writeable


def test_dense_is_zero_copy_on_both_ends():
    ctx = zmq.Context.instance()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    port = a.bind_to_random_port("tcp://127.0.0.1")
    b.connect(f"tcp://127.0.0.1:{port}")
    try:
        frames = np.arange(40 * 8 * 12, dtype=np.uint16).reshape(40, 8, 12)
        parts = p.encode_dense("z", 1, GEOM, 0, frames, "raw")
        assert np.shares_memory(parts[1], frames)  # sent from the caller's buffer, no copy
        a.send_multipart(parts, copy=False)
        got = b.recv_multipart(copy=False)
        m = p.decode(got)
        assert np.shares_memory(m.dense, np.frombuffer(got[1].buffer, np.uint16))
        np.testing.assert_array_equal(m.dense, frames)
    finally:
        a.close(0)
        b.close(0)


def test_the_encoder_refuses_what_the_decoder_would():
    with pytest.raises(ValueError, match=r"expected \(n, 8, 12\)"):
        p.encode_dense("s", 1, GEOM, 0, np.zeros((2, 16, 12), np.uint16), "raw")  # the whole frame
    with pytest.raises(ValueError, match="unsigned"):
        p.encode_dense("s", 1, GEOM, 0, np.zeros((2, 8, 12), np.int16), "raw")
    with pytest.raises(ValueError, match="values"):
        p.encode_dense("s", 1, GEOM, 0, np.zeros((2, 8, 12), np.uint16), "electrons")


def good():
    return wire(p.encode_dense("s", 1, GEOM, 0, np.ones((2, 8, 12), np.uint16), "counts"))


def header_with(**changes):
    h = msgpack.unpackb(good()[0])
    h.update(changes)
    return msgpack.packb(h)


@pytest.mark.parametrize("parts,reason", [
    (good()[:1] + [good()[1][:-2]], "dense_truncated"),  # the last value cut short
    (good()[:1] + [good()[1][:2 * 12 * 8]], "dense_truncated"),  # a whole frame missing
    (good()[:1] + [good()[1] + b"\0\0"], "dense_mismatch"),
    ([header_with(count=3)] + good()[1:], "dense_truncated"),  # the header claims more
    ([header_with(count=1)] + good()[1:], "dense_mismatch"),
    ([header_with(dtype="<i2")] + good()[1:], "bad_dtype"),
    ([header_with(dtype=">u2")] + good()[1:], "bad_dtype"),
    ([header_with(dtype=None)] + good()[1:], "bad_dtype"),
    ([header_with(values="electrons")] + good()[1:], "bad_values"),
    ([header_with(sector=[8, 20])] + good()[1:], "bad_geometry"),  # rows beyond the detector
    ([header_with(sector=[-1, 8])] + good()[1:], "bad_geometry"),
    ([header_with(first=GEOM.n_frames - 1)] + good()[1:], "frame_out_of_range"),
    (good() + [b""], "wrong_parts"),
    (good()[:1], "wrong_parts"),
])
def test_bad_dense_messages_are_rejected_with_their_reason(parts, reason):
    with pytest.raises(p.ProtocolError) as e:
        p.decode(parts)
    assert e.value.reason == reason and e.value.scan_id == "s"
    assert str(e.value)


# ---------------------------------------------------------------- a receiver

G = p.Geometry((6, 8), (24, 20), n_sources=2)
SECTORS = [(0, 10), (10, 24)]
DARK = np.random.default_rng(1).uniform(15, 25, (24, 20)).astype(np.float32)


def rig(scripted_source, counting: CountingSpec | None = None, rcvhwm=64, limits=None):
    src = scripted_source(2, curve=False)  # the receiver alone: plain sockets
    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    cfg = validate(PipelineConfig(chunking=ChunkingSpec(max_frames=10_000, max_latency_ms=20.0),
                                  scan=ScanSpec(timeout_s=5), live=LiveSpec(rate_hz=0.0),
                                  counting=counting or CountingSpec(), limits=limits or LimitsSpec()))
    rec = Receiver(src.addresses, f"tcp://127.0.0.1:{port}", cfg, worker="w0", rcvhwm=rcvhwm)
    rec.start()
    src.wait_for_receivers()
    return src, rec, pull


def reports(pull, until):
    """The receiver's reports until ``until``; a minute, for the first kernel compilations."""
    return _reports(pull, until, timeout_s=60)


def send_sectors(src, scan_id, frames, values, batch=8, first=0):
    """Each sector's frames from ``first`` on as dense messages, after its start (the scan
    is announced) when ``first`` is 0."""
    for k, (a, b) in enumerate(SECTORS):
        g = G.for_sector((a, b))
        if first == 0:
            src.send(k, p.encode_start(scan_id, k, g, {}))
        for lo in range(0, len(frames), batch):
            src.send(k, p.encode_dense(scan_id, k, g, first + lo, np.ascontiguousarray(frames[lo:lo + batch, a:b]),
                                       values))


def test_count_frames_arrive_as_the_same_events(scripted_source):
    """Dense counts per pixel from two sectors give the scan that the same electrons sent as
    ``frames`` messages give (dense numpy of both)."""
    src, rec, pull = rig(scripted_source)
    try:
        rng = np.random.default_rng(2)
        counts = rng.poisson(0.02, (G.n_frames, 24, 20)).astype(np.uint8)
        counts[3, 9, 19] = 7
        send_sectors(src, "c", counts, "counts")
        reports(pull, lambda g: frames_reported(g) >= 2 * G.n_frames)
        ws = rec.close_scan("c")
        fused = next(op for op in ws.operators if op.name == "fused")
        pattern = fused.finalize(ws.states["fused"])["diffraction_sum"].data
        np.testing.assert_array_equal(pattern, counts.sum(0, dtype=np.int64))
        store = next(op for op in ws.operators if op.name == "events")
        offsets, indices = store.finalize(ws.states["events"])
        n_ev = np.diff(offsets)
        flat = counts.reshape(len(counts), -1)
        np.testing.assert_array_equal(dense_scan(n_ev.astype(np.uint32), indices, G).sum((0, 1)), pattern)
        np.testing.assert_array_equal(n_ev, flat.sum(1))
    finally:
        rec.stop()
        pull.close(0)


def counting_spec(bg=6.5, xray=600.0, **kw):
    spec = CountingSpec(**kw)
    spec.calibration = Calibration(DARK, bg, xray, attrs={"dark_source": "test", "thresholds_source": "test"})
    return spec


def raw_frames(n, seed=3):
    rng = np.random.default_rng(seed)
    img = DARK + rng.normal(0, 1.5, (n, 24, 20))
    for i in range(n):
        for _ in range(4):
            y, x = rng.integers(1, 23), rng.integers(1, 19)
            img[i, y - 1:y + 2, x - 1:x + 2] += rng.uniform(30, 90) * np.array([[.05, .1, .05], [.1, .4, .1], [.05, .1, .05]])
    img[min(5, n - 1), 12, 6] += 2500  # an X-ray
    return np.clip(np.rint(img), 0, 4095).astype(np.uint16)


def test_raw_frames_are_counted_as_offline_and_bad_messages_lose_nothing(scripted_source):
    src, rec, pull = rig(scripted_source, counting_spec())
    try:
        frames = raw_frames(G.n_frames)
        good = frames.copy()
        send_sectors(src, "r", frames[:20], "raw")
        # malformed messages in between: each rejected with its reason, nothing else lost
        h = msgpack.unpackb(wire(p.encode_dense("r", 0, G.for_sector(SECTORS[0]), 20, frames[20:22, :10].copy(), "raw"))[0])
        bad = [[msgpack.packb(dict(h, dtype="<f4")), frames[20:22, :10].tobytes()],
               [msgpack.packb(dict(h, values="photons")), frames[20:22, :10].tobytes()],
               [msgpack.packb(h), frames[20:22, :10].tobytes()[:-7]],
               [msgpack.packb(dict(h, sector=[0, 30])), frames[20:22, :10].tobytes()]]
        for parts in bad:
            src.send(0, parts)
        send_sectors(src, "r", frames[20:], "raw", first=20)
        got = reports(pull, lambda g: frames_reported(g) >= 2 * G.n_frames and
                      sum(h["kind"] == "reject" for h, _ in g) >= 4)
        rejects = sorted(h["reason"] for h, _ in got if h["kind"] == "reject")
        assert rejects == ["bad_dtype", "bad_geometry", "bad_values", "dense_truncated"]
        ws = rec.close_scan("r")
        store = next(op for op in ws.operators if op.name == "events")
        offsets, indices = store.finalize(ws.states["events"])
        # offline: the same operator on each sector (the second drops its top row: a border)
        counter = ElectronCounter((24, 20), DARK, 6.5, 600.0)
        parts = [counter.count(good[:, a:b], a) for a, b in SECTORS]
        expect = [np.concatenate([ind[np.r_[0, np.cumsum(c)][i]:np.r_[0, np.cumsum(c)][i + 1]] for c, ind in parts])
                  for i in range(G.n_frames)]
        got_frames = [indices[offsets[i]:offsets[i + 1]] for i in range(G.n_frames)]
        assert sum(map(len, expect)) > 100
        for i in range(G.n_frames):
            np.testing.assert_array_equal(got_frames[i], np.sort(expect[i]), err_msg=f"frame {i}")
        st = ws.states["counting"]
        assert st["frames"][0] == 2 * G.n_frames and st["events"][0] == len(indices)
        assert st["xray_pixels"][0] >= 1
        rec_ = counter.describe(st)
        assert rec_.attrs["background_threshold"] == 6.5 and rec_.arrays["dark"].shape == (24, 20)
    finally:
        rec.stop()
        pull.close(0)


def test_raw_frames_without_counting_or_with_a_wrong_dark_are_refused_clearly(scripted_source):
    src, rec, pull = rig(scripted_source)
    try:
        send_sectors(src, "n", raw_frames(4), "raw")
        got = reports(pull, lambda g: any(h["kind"] == "reject" for h, _ in g))
        detail = next(h["detail"] for h, _ in got if h["kind"] == "reject")
        assert "raw frames arrived but [counting] gives no dark reference" in detail
        assert "stemstream calibrate" in detail
        assert rec.close_scan("n").errors  # the scan says why it has no frames
    finally:
        rec.stop()
        pull.close(0)
    wrong = counting_spec()
    wrong.calibration.dark = np.zeros((576, 576), np.float32)
    src, rec, pull = rig(scripted_source, wrong)
    try:
        send_sectors(src, "w", raw_frames(4), "raw")
        got = reports(pull, lambda g: any(h["kind"] == "reject" for h, _ in g))
        detail = next(h["detail"] for h, _ in got if h["kind"] == "reject")
        assert "dark reference is 576x576 px but the detector is 24x20 px" in detail
    finally:
        rec.stop()
        pull.close(0)


def test_a_counts_message_may_not_expand_beyond_its_budget(scripted_source):
    """A counts message may expand to no more events than a frames message of the largest
    accepted size carries ([limits] max_message_mb / 4 bytes per event): 4,000 bytes here."""
    src, rec, pull = rig(scripted_source, limits=LimitsSpec(max_message_mb=0.004))
    try:
        heavy = np.full((2, 24, 20), 3, np.uint8)  # per sector: 600 and 840 electrons per frame
        light = np.ones((2, 24, 20), np.uint8)  # 200 and 280: 400 and 560 per message
        send_sectors(src, "t", heavy, "counts")
        send_sectors(src, "u", light, "counts")
        def u_frames(g):
            return sum(c for h, _ in g if h["kind"] == "frames" and h["scan_id"] == "u" for _, _, c in h["ranges"])
        got = reports(pull, lambda g: sum(h["kind"] == "reject" for h, _ in g) >= 2 and u_frames(g) >= 4)
        assert u_frames(got) == 4  # both sectors' 2 frames of the light scan
        rejects = [h for h, _ in got if h["kind"] == "reject"]
        # 2 x 10 x 20 x 3 = 1,200 and 2 x 14 x 20 x 3 = 1,680 electrons, beyond 4,000 / 4 = 1,000
        assert sorted(h["reason"] for h in rejects) == ["too_many_events"] * 2
        assert {h["scan_id"] for h in rejects} == {"t"}
    finally:
        rec.stop()
        pull.close(0)


WARM_UP_DENSE = """
import numpy as np, numba, sys
import operators.dense as dense, operators.electron_counting as ec
from stream.config import CountingSpec, PipelineConfig, validate
from stream.files.counting_file import Calibration
from stream.transport.protocol import Geometry, decode, encode_dense
from stream.session.worker import warm_up

spec = CountingSpec()
spec.calibration = Calibration(np.full((576, 576), 19.5, np.float32), 8.0, 400.0, attrs={"thresholds_source": "x"})
cfg = validate(PipelineConfig(counting=spec))
# the kernels a message calls (the ones they call are compiled into them, and from numba's cache
# never show signatures of their own)
kernels = [dense.events_kernel, ec.count_integer_kernel]
warm_up(cfg)
before = [len(k.signatures) for k in kernels]
g = Geometry((4, 4), (576, 576), n_sources=4, sector=(144, 288))
rng = np.random.default_rng(0)
raw = decode(encode_dense("s", 1, g, 0, rng.integers(10, 60, (3, 144, 576)).astype(np.uint16), "raw"))
counter = next(op for op in cfg.operators(g.for_sector(None)) if op.name == "counting")
counter.count(raw.dense, 144)
for dtype in (np.uint8, np.uint16, np.uint32):
    m = decode(encode_dense("s", 1, g, 0, rng.poisson(0.01, (3, 144, 576)).astype(dtype), "counts"))
    dense.counts_to_events(m.dense, 144)
after = [len(k.signatures) for k in kernels]
print("signatures before", before, "after", after)
sys.exit(0 if after == before and all(before) else 1)
"""


def test_warm_up_compiles_the_dense_kernels_a_real_message_needs():
    """In a fresh process: after warm_up, raw and count frames off the wire (read-only, a
    144-row sector) need no new compilation, so the first raw frame never waits for it."""
    import subprocess
    import sys
    from pathlib import Path
    r = subprocess.run([sys.executable, "-c", WARM_UP_DENSE], cwd=Path(__file__).resolve().parents[1],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
