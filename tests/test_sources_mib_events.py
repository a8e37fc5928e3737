"""MIB payloads straight to events (stream/sources/mib_events.py), against a dense numpy
reference: the frames that were encoded, each pixel's count k repeated as k events. Every
counter depth, raw and not, single chip and quad, with the edge values (0, 1, the counter's
maximum); the MIB encoder itself is checked against LiberTEM's reader in
test_sources_formats.py."""

from __future__ import annotations

import numpy as np
import pytest

from stream.sources import mib
from stream.sources.mib_events import PayloadEvents, payload_events


def reference_events(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flat = frames.reshape(len(frames), -1).astype(np.int64)
    idx = np.concatenate([np.repeat(np.arange(flat.shape[1]), row) for row in flat])
    return flat.sum(axis=1), idx


def edge_frames(bits: int, shape, n: int = 5, seed: int = 0) -> np.ndarray:
    """Sparse counts, plus in every frame the counter's maximum, a 1 and a 2 (where the
    depth allows) at places that move from frame to frame; frame 1 is all zeros and frame 3
    is dense (every pixel counted) near the top left."""
    rng = np.random.default_rng(seed)
    top = (1 << bits) - 1
    small = min(top, 20)  # a dense corner of modest counts: the events stay few
    f = np.minimum(rng.poisson(0.02, (n,) + shape), top).astype(mib.VALUE_DTYPE[bits])
    h, w = shape
    for i in range(n):
        f[i, (37 * i) % h, (11 * i + 5) % w] = top
        f[i, h - 1, w - 1 - i] = 1
        f[i, (5 * i) % h, w - 1] = min(top, 2)
    f[1] = 0
    f[3, :8, :70] = rng.integers(1, small + 1, (8, 70))
    f[0, 0, 0] = top  # pixel 0 at the maximum
    return f


LAYOUTS = [(bits, raw, quad) for bits in (1, 6, 12, 24) for raw in (False, True) for quad in (False, True)
           if not (raw and quad and bits == 24)]  # 24-bit raw quad is refused (mib.parse_frame_header)


@pytest.mark.parametrize("bits,raw,quad", LAYOUTS,
                         ids=[f"{b}bit-{'raw' if r else 'u'}-{'quad' if q else 'single'}" for b, r, q in LAYOUTS])
def test_payload_events_equal_the_dense_reference(bits, raw, quad):
    shape = (512, 512) if quad else (256, 256)
    frames = edge_frames(bits, shape, seed=bits)
    payloads = np.stack([np.frombuffer(mib.encode_payload(f, bits, raw, quad), np.uint8) for f in frames])
    fh = mib.parse_frame_header(mib.frame_header(1, bits, raw, quad))
    counts, indices = payload_events(payloads, fh)
    ref_counts, ref_indices = reference_events(frames)
    np.testing.assert_array_equal(counts, ref_counts)
    np.testing.assert_array_equal(indices, ref_indices)
    assert indices.dtype == np.uint32 and counts.dtype == np.uint32


@pytest.mark.parametrize("bits", [1, 12])
def test_gap_quad_frames_keep_their_gap_pixels(bits):
    """2x2G: 514 x 514 with zero gap rows and columns, whose pixel count is not a multiple of
    a 16-pixel group (the last group is short)."""
    frames = edge_frames(bits, (512, 512), seed=3)
    frames[:, 511, 511] = 1  # the very last pixel, in the short last group
    payloads = np.stack([np.frombuffer(mib.encode_payload(f, bits, False, True, gap=True), np.uint8)
                         for f in frames])
    fh = mib.parse_frame_header(mib.frame_header(1, bits, False, True, gap=True))
    assert fh.frame_shape == (514, 514)
    full = np.zeros((len(frames), 514, 514), frames.dtype)
    full[:, :256, :256], full[:, :256, 258:] = frames[:, :256, :256], frames[:, :256, 256:]
    full[:, 258:, :256], full[:, 258:, 258:] = frames[:, 256:, :256], frames[:, 256:, 256:]
    counts, indices = payload_events(payloads, fh)
    ref_counts, ref_indices = reference_events(full)
    np.testing.assert_array_equal(counts, ref_counts)
    np.testing.assert_array_equal(indices, ref_indices)


def test_whole_messages_in_a_buffer_and_an_output_that_fills():
    """Frame messages as the leader holds them (MPX prefix + MQ1 header + payload per row),
    events into an output too small for all of them: the kernel stops before the first frame
    that does not fit and goes on from there into the next output."""
    bits, raw = 12, True
    frames = edge_frames(bits, (256, 256), n=6, seed=9)
    msgs = [mib.frame_message(i + 1, f, bits, raw) for i, f in enumerate(frames)]
    rows = np.stack([np.frombuffer(mib.mpx_prefix(len(m)) + m, np.uint8) for m in msgs])
    fh = mib.parse_frame_header(msgs[0])
    ref_counts, ref_indices = reference_events(frames)
    pe = PayloadEvents(fh)
    counts = np.zeros(len(frames), np.uint32)
    cap = int(ref_counts[:2].sum()) + int(ref_counts[2]) - 1  # frames 0 and 1 fit, frame 2 does not
    out = np.empty(cap, np.uint32)
    f, e = pe.events(rows, mib.MPX_PREFIX_LEN + fh.header_size, 0, counts, out, 0)
    assert (f, e) == (2, int(ref_counts[:2].sum()))
    np.testing.assert_array_equal(out[:e], ref_indices[:e])
    out2 = np.empty(int(ref_counts.sum()), np.uint32)
    f2, e2 = pe.events(rows, mib.MPX_PREFIX_LEN + fh.header_size, f, counts, out2, 0)
    assert (f2, e2) == (6, int(ref_counts[2:].sum()))
    np.testing.assert_array_equal(counts, ref_counts)
    np.testing.assert_array_equal(out2[:e2], ref_indices[e:])
