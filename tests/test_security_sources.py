"""Security of the detector sources (docs/SECURITY.md): the Merlin leader's forwarding
channel lets in only this session's workers, and what we decode from a detector's own
protocol (Merlin TCP, DECTRIS ZeroMQ) is bounded by the per-message budget.

Real sockets: the Merlin emulator's TCP data port, the leader's PUSH socket, the workers'
and a stranger's PULL sockets."""

from __future__ import annotations

import json
import struct
import threading
import time

import numpy as np
import pytest
import zmq

from sim_detector.detectors import MerlinEmulator, _Scan
from stream.security import ClientKeys, as_client, generate
from stream.sources.base import SourcePlan
from stream.sources.merlin import MerlinSource
from stream.transport.net import free_port_block

N = 16  # frames of the acquisition: a 4 x 4 scan on Merlin's 256 x 256 chip


def acquisition(seed=3, heavy=None):
    """The emulator's scan and its dense reference (N, 256, 256) electrons per pixel;
    ``heavy`` = (frame, electrons) gives that frame that many."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(40, N).astype(np.uint32)
    if heavy is not None:
        counts[heavy[0]] = heavy[1]
    indices = rng.integers(0, 256 * 256, int(counts.sum())).astype(np.uint32)
    dense = np.bincount(np.repeat(np.arange(N), counts) * 65536 + indices, minlength=N * 65536)
    return _Scan("a", counts, indices, (256, 256), {"scan_shape": (4, 4)}), dense.reshape(N, 256, 256)


def run_merlin(curve: bool, strangers, max_message_bytes=0, done=None, timeout_s=30, heavy=None):
    """A Merlin acquisition through a leader (worker w0) to the worker w1's source, with
    ``strangers(forward_address, plan)`` connected to the forwarding socket before the
    frames flow; until the end message, or ``done(notices)``. Returns (messages the two
    workers received, what each stranger received, notices)."""
    m = MerlinEmulator(f"tcp://127.0.0.1:{free_port_block(1)}", f"tcp://127.0.0.1:{free_port_block(1)}")
    scan, _ = acquisition(heavy=heavy)
    plan = SourcePlan("merlin", (4, 4), m.data, leader="w0", prefix="t",
                      forward=f"tcp://127.0.0.1:{free_port_block(1)}", gap_timeout_s=5.0,
                      max_message_bytes=max_message_bytes)
    if curve:
        plan.forward_server, plan.forward_client = generate(), generate()
    ctx = zmq.Context()
    notices, rejects = [], []
    leader, worker = MerlinSource(plan, "w0"), MerlinSource(plan, "w1")
    stop = threading.Event()

    def serve():
        m.accept_data(stop)
        if not stop.is_set():
            m.start_self()
            m.send_scan(scan)

    try:
        leader.open(ctx, lambda *a: rejects.append(a), notices.append)
        worker.open(ctx, lambda *a: rejects.append(a), notices.append)
        socks = strangers(ctx, plan)
        time.sleep(1.0)  # every peer connected (or refused) before the first frame
        t = threading.Thread(target=serve, daemon=True)
        t.start()
        got, stolen = [], [[] for _ in socks]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not any(msg.kind == "end" for msg in got) \
                and not (done and done(notices)):
            got += worker.receive(20)
            got += leader.receive(20)
            for sock, loot in zip(socks, stolen):
                while sock.poll(0):
                    loot.append(sock.recv_multipart())
        drain = time.monotonic() + 1.0  # blocks queued at the other worker when the end came
        while time.monotonic() < drain:
            got += worker.receive(20)
            got += leader.receive(20)
        for sock, loot in zip(socks, stolen):
            while sock.poll(50):
                loot.append(sock.recv_multipart())
            sock.close(0)
        return got, stolen, notices
    finally:
        stop.set()
        leader.close()
        worker.close()
        m.close()
        ctx.term()


def strangers_plain_and_forged(ctx, plan):
    """A plain PULL, and a CURVE PULL that knows the leader's public key but has a key of
    its own (not the session's)."""
    plain = ctx.socket(zmq.PULL)
    plain.connect(plan.forward)
    forged = ctx.socket(zmq.PULL)
    if plan.forward_server is not None:
        as_client(forged, ClientKeys(generate(), plan.forward_server.public))
    forged.connect(plan.forward)
    return [plain, forged]


def frames_of(msgs):
    """The dense frames rebuilt from the received blocks of events: (N, 256, 256)."""
    out = np.zeros((N, 256 * 256), np.int64)
    for msg in msgs:
        if msg.kind == "frames":
            frame = np.repeat(np.arange(msg.first, msg.first + msg.count), msg.counts)
            np.add.at(out, (frame, msg.indices), 1)
    return out.reshape(N, 256, 256)


def test_a_stranger_pulling_from_the_merlin_forwarding_socket_gets_nothing():
    got, stolen, notices = run_merlin(True, strangers_plain_and_forged)
    assert stolen == [[], []]  # neither the plain nor the forged client got a single message
    kinds = [m.kind for m in got]
    assert kinds.count("start") == 1 and kinds.count("end") == 1, kinds
    _, dense = acquisition()
    np.testing.assert_array_equal(frames_of(got), dense)  # the workers got every electron
    assert any("refused a program without this session's key" in n for n in notices), notices


def test_without_curve_the_same_stranger_takes_frames():
    """The attack the CURVE test guards against is real: on a plain forwarding socket a
    stray PULL is handed its share of the blocks (the test above can fail)."""
    got, stolen, _ = run_merlin(False, strangers_plain_and_forged, timeout_s=5)  # the end may be stolen
    assert sum(len(s) for s in stolen) >= 1
    _, dense = acquisition()
    assert frames_of(got).sum() < dense.sum() or not any(m.kind == "end" for m in got)


def test_a_merlin_frame_beyond_the_message_budget_opens_no_scan():
    """256 x 256 frames of 16-bit values are 131,072 bytes: with a 100 kB budget the leader
    refuses them before decoding, forwards nothing and says so once."""
    got, _, notices = run_merlin(True, lambda ctx, plan: [], max_message_bytes=100_000,
                                 done=lambda ns: any("per-message budget" in n for n in ns))
    assert got == []
    refused = [n for n in notices if "per-message budget" in n]
    assert len(refused) == 1 and "256x256 Merlin frame of 131,072 bytes" in refused[0], notices


def test_a_merlin_frame_with_more_electrons_than_a_message_may_carry_is_named_and_skipped():
    """A 200 kB budget lets 50,000 events into one message: frame 5 holds 60,000 electrons
    (the frame itself, 131,072 bytes of values, is within the budget). It is not forwarded,
    one console line names it, and every other frame arrives whole."""
    got, _, notices = run_merlin(True, lambda ctx, plan: [], max_message_bytes=200_000, heavy=(5, 60_000))
    _, dense = acquisition(heavy=(5, 60_000))
    received = frames_of(got)
    assert received[5].sum() == 0
    dense[5] = 0
    np.testing.assert_array_equal(received, dense)
    refused = [n for n in notices if "frame 5 holds more than 50,000 electrons" in n]
    assert len(refused) == 1, notices


# ------------------------------------------------------------------ DECTRIS: decoded sizes

def dectris_image(shape=(16, 16), declared=None):
    """The parts of one bitshuffle-LZ4 DECTRIS image message; ``declared`` forges the
    decompressed size its blob states."""
    pytest.importorskip("bitshuffle")
    from stream.sources.simplon import image_parts
    image = np.arange(shape[0] * shape[1], dtype=np.uint16).reshape(shape)
    parts = image_parts(1, 0, image, "bslz4")
    if declared is not None:
        parts[2] = struct.pack(">Q", declared) + parts[2][8:]
    return parts, image


def test_a_forged_bslz4_size_is_refused_before_decompression():
    from stream.sources.simplon import SimplonError, decode_image
    parts, image = dectris_image(declared=1 << 40)  # a terabyte, if it were believed
    with pytest.raises(SimplonError, match="declares 1099511627776 bytes; a 16x16 uint16 image has 512"):
        decode_image(parts[2], json.loads(parts[1]))
    pytest.importorskip("dectris.compression")
    good, _ = dectris_image()
    np.testing.assert_array_equal(decode_image(good[2], json.loads(good[1])), image)


def test_a_dectris_image_beyond_the_message_budget_is_rejected_unopened():
    """A DCU stream declaring 4096 x 4096 32-bit images (64 MB each) under a 1 MB budget:
    each is rejected as over_budget, no start is made, nothing decompressed."""
    from stream.sources.dectris import DectrisSource
    plan = SourcePlan("dectris", (2, 2), "tcp://127.0.0.1:9", prefix="d", max_message_bytes=1_000_000)
    src = DectrisSource(plan, "w0")
    rejects, out = [], []
    src._reject, src._notice = (lambda *a: rejects.append(a)), (lambda n: None)
    src._pending_meta = {"series": 1}
    head = json.dumps({"htype": "dimage-1.0", "series": 1, "frame": 0}).encode()
    dimage_d = json.dumps({"htype": "dimage_d-1.0", "shape": [4096, 4096], "type": "uint32",
                           "encoding": "bs32-lz4<"}).encode()
    src._handle([head, dimage_d, b"\x00" * 64, b"{}"], out)
    assert out == []
    assert len(rejects) == 1 and rejects[0][0] == "over_budget"
    assert "4096x4096 uint32 image of 67,108,864 bytes is beyond the per-message budget" in rejects[0][1]


def test_a_dectris_part_beyond_the_budget_drops_the_connection_which_is_made_again():
    """A 10 kB part under a 4 kB budget: ZeroMQ drops the connection before allocating it
    (and would not connect again after that protocol error); the source connects again and
    the next series arrives whole."""
    pytest.importorskip("dectris.compression")
    from stream.sources.dectris import DectrisSource
    from stream.sources.simplon import (
        detector_config,
        end_part,
        header_parts,
        image_parts,
    )
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    port = push.bind_to_random_port("tcp://127.0.0.1")
    plan = SourcePlan("dectris", (1, 2), f"tcp://127.0.0.1:{port}", prefix="d", max_message_bytes=4000)
    src = DectrisSource(plan, "w0")
    notices, rejects, got = [], [], []
    images = (np.arange(2 * 16 * 16) % 3).astype(np.uint16).reshape(2, 16, 16)  # 255 e- each: in budget
    series = [header_parts(1, detector_config(2, (16, 16), np.uint16)),
              *(image_parts(1, i, images[i], "bslz4") for i in range(2)), [end_part(1)]]

    def pump(until, timeout_s=20):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not until():
            got.extend(src.receive(20))
        assert until(), (notices, rejects, [m.kind for m in got])

    try:
        src.open(ctx, lambda *a: rejects.append(a), notices.append)
        pump(lambda: src._connected)
        push.send_multipart([b'{"htype": "dimage-1.0"}', b"x" * 10_000])
        pump(lambda: any("connected again" in n for n in notices))
        for parts in series:
            push.send_multipart(parts)
        pump(lambda: any(m.kind == "end" for m in got))
    finally:
        src.close()
        push.close(0)
        ctx.term()
    kinds = [m.kind for m in got]  # bitshuffle-LZ4 images become events, in batches
    assert kinds[0] == "start" and kinds[-1] == "end" and set(kinds[1:-1]) == {"frames"}, kinds
    counts = np.concatenate([m.counts for m in got if m.kind == "frames"])
    np.testing.assert_array_equal(counts, images.reshape(2, -1).sum(1))
    indices = np.concatenate([m.indices for m in got if m.kind == "frames"])
    split = np.split(indices, np.cumsum(counts)[:-1])
    for image, events in zip(images, split):  # a pixel that counted k electrons: k events
        np.testing.assert_array_equal(np.sort(events), np.repeat(np.arange(image.size), image.ravel()))
    assert rejects == []  # the oversized part never reached the decoder
