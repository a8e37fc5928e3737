"""DECTRIS bitshuffle-LZ4 images straight to events (stream/sources/bslz4_events.py), against
a dense numpy reference: the frames that were encoded, each pixel's count k repeated as k
events. The images are compressed by the ``bitshuffle`` package (not by this code) and
decoded back to the same frames by DECTRIS' ``dectris-compression`` first, so the blobs are
what a DCU sends. Every bit depth, image sizes with a partial last block and an uncompressed
tail, other block sizes; corrupt, truncated and too-full images are refused alone."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from stream.sources import simplon
from stream.sources.bslz4_events import BAD_FRAMING, BAD_LZ4, OK, TOO_MANY, bslz4_events


def reference_events(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flat = frames.reshape(len(frames), -1).astype(np.int64)
    idx = np.concatenate([np.repeat(np.arange(flat.shape[1]), row) for row in flat])
    return flat.sum(axis=1), idx


def edge_frames(dtype, shape, n: int = 5, seed: int = 0) -> np.ndarray:
    """Sparse counts; in every frame a large count (the type's maximum where the events stay
    few), a 1 and a 2 at places that move; (of 4 or more) frame 1 all zeros, frame 3 dense in
    a corner;
    the last pixel counted in the last frame."""
    rng = np.random.default_rng(seed)
    big = min(np.iinfo(dtype).max, 70_000)
    f = rng.poisson(0.02, (n,) + shape).astype(dtype)
    h, w = shape
    for i in range(n):
        f[i, (37 * i) % h, (11 * i + 5) % w] = big
        f[i, h - 1, (w - 1 - i) % w] = 1
        f[i, (5 * i) % h, w - 1] = 2
    if n > 3:
        f[1] = 0
        f[3, :min(h, 8), :min(w, 70)] = rng.integers(1, 21, (min(h, 8), min(w, 70)))
    f[n - 1, h - 1, w - 1] = 3
    return f


def framed(frame: np.ndarray, block_elements: int | None = None) -> bytes:
    """The HDF5 filter's framing of ``bitshuffle.compress_lz4`` (the ``bitshuffle`` package,
    not our code) with a chosen block size."""
    import bitshuffle
    isz = frame.dtype.itemsize
    bs = block_elements or simplon.bslz4_block_size(isz)
    body = bitshuffle.compress_lz4(np.ascontiguousarray(frame).ravel(), bs)
    return struct.pack(">QI", frame.nbytes, bs * isz) + body.tobytes()


def check(frames: np.ndarray, blobs: list, expect: int = 64):
    h, w = frames.shape[1:]
    meta = {"shape": [w, h], "type": frames.dtype.name, "encoding": f"bs{8 * frames.dtype.itemsize}-lz4<"}
    for blob, frame in zip(blobs, frames):  # DECTRIS' decoder reads them as these frames
        assert np.array_equal(simplon.decode_image(blob, meta), frame)
    counts, indices, status = bslz4_events(blobs, h * w, frames.dtype.itemsize, 1 << 40, expect=expect)
    ref_counts, ref_indices = reference_events(frames)
    assert status.tolist() == [OK] * len(frames)
    np.testing.assert_array_equal(counts, ref_counts)
    np.testing.assert_array_equal(indices, ref_indices)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32])
@pytest.mark.parametrize("shape", [(192, 192), (5, 7), (64, 67), (1, 3)],
                         ids=["arina", "tail-only", "partial-block-and-tail", "tiny"])
def test_events_equal_the_dense_reference(dtype, shape):
    frames = edge_frames(dtype, shape)
    check(frames, [framed(f) for f in frames], expect=1)  # expect=1: the output grows many times


@pytest.mark.parametrize("block", [8, 256, 4096 * 4])
def test_other_block_sizes(block):
    frames = edge_frames(np.uint16, (96, 100), seed=1)
    check(frames, [framed(f, block) for f in frames])


def test_dense_images_and_repeating_patterns():
    """Every pixel counted, and periodic values (LZ4 matches that overlap their source with
    a pattern of several different bytes, not a run of one)."""
    rng = np.random.default_rng(2)
    frames = np.stack([rng.integers(0, 5, (48, 48)), np.tile(np.array([1, 2, 3, 0, 7], np.uint16), 48 * 48 // 5 + 1)
                       [:48 * 48].reshape(48, 48), np.full((48, 48), 65535)]).astype(np.uint16)
    check(frames, [framed(f) for f in frames])


def test_bad_images_are_refused_alone():
    frames = edge_frames(np.uint16, (64, 64), n=4)
    good = [framed(f) for f in frames]
    corrupt = bytearray(good[1])
    corrupt[20:40] = bytes(range(200, 220))
    wrong_size = struct.pack(">Q", 12345) + good[2][8:]
    blobs = [good[0], bytes(corrupt), wrong_size, good[3], good[0][:30]]
    counts, indices, status = bslz4_events(blobs, 64 * 64, 2, 1 << 40)
    assert status[0] == OK and status[3] == OK
    assert status[1] in (BAD_LZ4, BAD_FRAMING) and status[2] == BAD_FRAMING and status[4] != OK
    ref_counts, ref_indices = reference_events(frames[[0, 3]])
    assert counts.tolist() == [ref_counts[0], 0, 0, ref_counts[1], 0]
    np.testing.assert_array_equal(indices, ref_indices)


def test_every_byte_flipped_or_cut_is_survived():
    """No corruption of any byte, nor a cut at any length, reads or writes out of bounds; a
    cut image is always refused."""
    frame = edge_frames(np.uint16, (40, 41), n=1)[0]
    blob = framed(frame)
    for k in range(len(blob)):
        bad = bytearray(blob)
        bad[k] ^= 0xFF
        bslz4_events([bytes(bad)], 40 * 41, 2, 1 << 24)
        assert bslz4_events([blob[:k]], 40 * 41, 2, 1 << 24)[2][0] != OK


def test_an_image_beyond_the_limit_gives_none():
    frames = edge_frames(np.uint32, (32, 32), n=3)
    limit = int(reference_events(frames[:2])[0].max())  # frames 0 and 1 fit (one exactly); frame 2 not
    frames[2, 5, 5] = limit + 1
    counts, indices, status = bslz4_events([framed(f) for f in frames], 32 * 32, 4, limit)
    assert status.tolist() == [OK, OK, TOO_MANY]
    ref_counts, ref_indices = reference_events(frames[:2])
    np.testing.assert_array_equal(counts, list(ref_counts) + [0])
    np.testing.assert_array_equal(indices, ref_indices)


def test_the_source_converts_what_is_queued_in_one_batch(monkeypatch):
    """A worker's DECTRIS source reads the images queued on its socket and hands them on as
    one ``frames`` message with their frame numbers, in stream order: images out of order, a
    corrupt one (refused alone, named), the series end after them."""
    import time

    import zmq

    from stream.sources import dectris
    from stream.sources.base import UNDECODABLE, SourcePlan
    from stream.sources.dectris import DectrisSource
    from stream.sources.simplon import detector_config, end_part, header_parts, image_parts
    from stream.transport.net import free_port_block

    frames = edge_frames(np.uint16, (48, 40), n=8, seed=3)
    order = [0, 1, 2, 6, 7, 3, 5, 4]  # runs 0-2, 6-7, 3-4 (5 corrupt)
    msgs = [header_parts(9, detector_config(8, (48, 40), np.dtype(np.uint16)))]
    for i in order:
        parts = image_parts(9, i, frames[i], "bslz4")
        if i == 5:
            parts[2] = parts[2][:12] + bytes(len(parts[2]) - 12)  # the LZ4 blocks zeroed
        msgs.append(parts)
    msgs.append([end_part(9)])
    monkeypatch.setattr(dectris, "BATCH_S", 10.0)  # a loaded machine's pauses must not cut the batch
    port = free_port_block(1)
    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    push.bind(f"tcp://127.0.0.1:{port}")
    rejects = []
    src = DectrisSource(SourcePlan("dectris", (2, 4), f"tcp://127.0.0.1:{port}", prefix="p"), "w0")
    src.open(ctx, lambda *a: rejects.append(a), lambda n: None)
    try:
        deadline = time.monotonic() + 10
        while not src.command("connected") and time.monotonic() < deadline:
            src.receive(20)
        for parts in msgs:
            push.send_multipart(parts)
        time.sleep(0.5)  # all queued: one receive takes them
        got = []
        while not any(m.kind == "end" for m in got) and time.monotonic() < deadline:
            got += src.receive(100)
    finally:
        src.close()
        push.close(0)
    assert [m.kind for m in got] == ["start", "frames", "end"]
    assert [(r[0], r[2]) for r in rejects] == [(UNDECODABLE, "p-9")] and "image 5 of DECTRIS series 9" in rejects[0][1]
    m = got[1]
    assert m.frame_ids.tolist() == [0, 1, 2, 6, 7, 3, 4] and (m.first, m.count) == (0, 7)
    assert m.ranges() == [[0, 0, 3], [0, 6, 2], [0, 3, 2]]
    ref_counts, ref_indices = reference_events(frames[m.frame_ids])
    np.testing.assert_array_equal(m.counts, ref_counts)
    np.testing.assert_array_equal(m.indices, ref_indices)
    assert m.header["events"] == len(m.indices) and m.geometry.frame_shape == (48, 40)


WARM_UP = """
import sys
import numpy as np
from stream.session.worker import warm_up_sources
from stream.sources import bslz4_events as k, simplon
warm_up_sources()
before = len(k.images_events.signatures)
for dtype in (np.uint8, np.uint16, np.uint32):
    frames = np.random.default_rng(0).poisson(0.05, (3, 40, 48)).astype(dtype)
    k.bslz4_events([simplon.encode_image(f, "bslz4")[0] for f in frames], 40 * 48, frames.dtype.itemsize, 1 << 20)
print("signatures", before, len(k.images_events.signatures))
sys.exit(0 if before == len(k.images_events.signatures) == 1 else 1)
"""


def test_warm_up_compiles_the_kernel_real_images_need():
    """In a fresh process: after the workers' warm-up, images off the wire of every bit depth
    need no new compilation (the first images of a scan never wait for the compiler)."""
    import subprocess
    import sys
    from pathlib import Path
    r = subprocess.run([sys.executable, "-c", WARM_UP], cwd=Path(__file__).resolve().parents[1],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
