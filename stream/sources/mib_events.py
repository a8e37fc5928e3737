"""MIB pixel payloads straight to events, in one numba pass over the received bytes.

The Merlin leader used to decode each frame into dense little-endian counts and let the
receivers turn the counts into events; the dense frame is the largest thing on that path (a
12-bit frame is 128 KiB, most of it zeros) and was written, read, sent and read again. Here
the payload bytes are read once: a block of 256 bytes, then a chunk of 32, whose bytes are
all zero (the common case: a zero count is zero in every encoding) costs one vectorised OR;
only the pixels of the other chunks are decoded, and a pixel that counted k electrons gives k
events.

Encodings (``mib.py`` describes them; big-endian throughout): U08, U16, U32 row-major;
R64 raw words of 64/s pixels, last pixel first (1 bit: one byte per 8 pixels, bit 0 first);
raw 24 bit: the high 12-bit frame, then the low one; raw quad chips reassembled (the bottom
chips rotated by 180°). Events come out in ascending pixel order within each frame, as
``operators.dense.counts_to_events`` gives them for the decoded frame.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from operators.kernels import NJIT
from stream.sources.mib import FrameHeader, MibError

# encodings the kernel knows
U08, U16, U32, R1, R6, R12, R24 = range(7)
# pixels per payload byte as (numerator, denominator); R24 counts one half's bytes
PX_PER_BYTE = {U08: (1, 1), U16: (1, 2), U32: (1, 4), R1: (8, 1), R6: (1, 1), R12: (1, 2), R24: (1, 2)}
CHUNK = 32  # bytes of the fine zero test: 16 pixels of 12 bit, 256 of raw 1 bit (whole raw words)
BLOCK = 256  # bytes of the coarse zero test (a multiple of CHUNK): most of a sparse frame is skipped here


def encoding(fh: FrameHeader) -> int:
    if not fh.raw:
        return {"U08": U08, "U16": U16, "U32": U32}[fh.code]
    return {1: R1, 6: R6, 12: R12, 24: R24}[fh.counter_depth]


def segments(fh: FrameHeader) -> np.ndarray:
    """(k, 4) int64 runs of stream pixels in assembled-pixel order: (first stream pixel,
    pixels, assembled index of that pixel, direction ±1). One run for every layout but raw
    quad, whose bottom chips come rotated: walked backwards, their pixels ascend."""
    h, w = fh.frame_shape
    if not (fh.raw and fh.quad):
        return np.array([[0, h * w, 0, 1]], np.int64)
    runs = []
    for y in range(512):  # stream row r holds one row of each chip: [Q4 | Q3 | Q2 | Q1]
        if y < 256:
            runs += [[y * 1024 + 3 * 256, 256, y * 512, 1], [y * 1024 + 2 * 256, 256, y * 512 + 256, 1]]
        else:
            r = 511 - y  # chip pixel (r, c) lands on (511 - r, 255 - c) of its half
            runs += [[r * 1024 + 1 * 256, 256, y * 512 + 255, -1], [r * 1024, 256, y * 512 + 511, -1]]
    return np.array(runs, np.int64)


@njit(**NJIT)
def _any(p, b, m, half):
    """OR of the bytes ``p[b:b+m]`` (and of ``p[b+half:b+half+m]`` when ``half``): zero
    exactly when every pixel there is zero, in every encoding. Iterating a slice lets LLVM
    vectorise it (an index sum would be range-checked byte by byte)."""
    acc = 0
    for v in p[b:b + m]:
        acc |= v
    if half:
        for v in p[b + half:b + half + m]:
            acc |= v
    return acc


@njit(**NJIT)
def _piece(first, length, size, i, n, step):
    """(start, bytes) of the i-th of the ``n`` pieces of ``size`` bytes of the run
    ``first .. first+length``, counted from its end when ``step`` < 0."""
    b = first + (i if step > 0 else n - 1 - i) * size
    return b, min(size, first + length - b)


@njit(**NJIT)
def _value(p, b, j, enc, half):
    """Count of pixel ``j`` (stream order) of the whole raw words starting at ``p[b]``."""
    if enc == U08:
        return np.uint32(p[b + j])
    if enc == U16:
        return (np.uint32(p[b + 2 * j]) << 8) | p[b + 2 * j + 1]
    if enc == U32:
        q = b + 4 * j
        return (np.uint32(p[q]) << 24) | (np.uint32(p[q + 1]) << 16) | (np.uint32(p[q + 2]) << 8) | p[q + 3]
    if enc == R6:  # one byte per pixel, the word's last pixel first
        return np.uint32(p[b + (j & ~7) + 7 - (j & 7)])
    # R12, and both halves of R24: big-endian 16-bit, the word's last pixel first
    q = b + 2 * ((j & ~3) + 3 - (j & 3))
    v = (np.uint32(p[q]) << 8) | p[q + 1]
    if enc == R24:
        v = (v << 12) | (np.uint32(p[q + half]) << 8) | p[q + half + 1]
    return v


@njit(**NJIT)
def _emit(out, e, cap, idx, k):
    """``k`` events at pixel ``idx`` from ``out[e]``; -1 when they do not fit."""
    if e + k > cap:
        return -1
    for _ in range(k):
        out[e] = idx
        e += 1
    return e


@njit(**NJIT)
def _chunk_events(p, b, m, enc, num, den, half, pix, step, out, e):
    """Events of the pixels of ``m`` bytes from ``p[b]``, whose first stream pixel lands on
    assembled pixel ``pix`` and the next ones ``step`` (±1) further each; walked so that
    the assembled pixels ascend. Returns the new ``e``, or -1 when ``out`` is full."""
    cap = out.shape[0]
    if enc == R1:  # byte 7-m' of a word holds pixels 8m' .. 8m'+7, the first in bit 0
        for gg in range(m):
            g = gg if step > 0 else m - 1 - gg
            byte = p[b + (g & ~7) + 7 - (g & 7)]
            if byte == 0:
                continue
            for jj in range(8):
                j = jj if step > 0 else 7 - jj
                if (byte >> j) & 1:
                    e = _emit(out, e, cap, pix + step * (8 * g + j), 1)
                    if e < 0:
                        return e
        return e
    n = m * num // den
    for jj in range(n):
        j = jj if step > 0 else n - 1 - jj
        k = _value(p, b, j, enc, half)
        if k:
            e = _emit(out, e, cap, pix + step * j, k)
            if e < 0:
                return e
    return e


@njit(**NJIT)
def payload_events_kernel(rows, offset, enc, num, den, segs, half, f0, counts, out, e):
    """Events of frames ``f0 ..`` of ``rows`` (n, stride) uint8, payload at ``offset``, into
    ``out`` from ``e`` on; ``counts[i]`` = events of frame i. ``num/den``: pixels per
    payload byte; ``segs``: runs as :func:`segments` gives them. Stops before the first
    frame whose events do not fit (``out`` full). Returns (frames done, events written)."""
    n = rows.shape[0]
    for f in range(f0, n):
        start = e
        p = rows[f]
        for s in range(segs.shape[0]):
            src, npx, dst, step = segs[s, 0], segs[s, 1], segs[s, 2], segs[s, 3]
            b0 = offset + src * den // num
            nbytes = npx * den // num
            nblocks = (nbytes + BLOCK - 1) // BLOCK
            for bi in range(nblocks):
                bk, mb = _piece(b0, nbytes, BLOCK, bi, nblocks, step)
                if _any(p, bk, mb, half) == 0:
                    continue
                nchunks = (mb + CHUNK - 1) // CHUNK
                for ci in range(nchunks):
                    b, m = _piece(bk, mb, CHUNK, ci, nchunks, step)
                    if _any(p, b, m, half) == 0:
                        continue
                    e = _chunk_events(p, b, m, enc, num, den, half, dst + step * ((b - b0) * num // den), step,
                                      out, e)
                    if e < 0:
                        return f, start
        counts[f] = e - start
    return n, e


class PayloadEvents:
    """Events of whole MIB frame messages of one layout, straight from their bytes.

    ``events(rows, offset, f0, counts, out, e)``: rows (n, stride) uint8 (one frame message
    each, contiguous), the payload at byte ``offset`` of each row (after the MQ1 header);
    as :func:`payload_events_kernel`."""

    def __init__(self, fh: FrameHeader):
        h, w = fh.frame_shape
        self.enc = encoding(fh)
        self.num, self.den = PX_PER_BYTE[self.enc]
        if fh.raw and (h * w) % 64:
            raise MibError(f"raw frames of {h}x{w} pixels are not whole 64-bit words")
        self.segs = segments(fh)
        self.half = fh.payload_size // 2 if self.enc == R24 else 0
        self.frame_px = h * w

    def events(self, rows: np.ndarray, offset: int, f0: int, counts: np.ndarray, out: np.ndarray,
               e: int = 0) -> tuple[int, int]:
        return payload_events_kernel(rows, offset, self.enc, self.num, self.den, self.segs, self.half, f0,
                                     counts, out, e)


def payload_events(payloads: np.ndarray, fh: FrameHeader) -> tuple[np.ndarray, np.ndarray]:
    """(counts (n,) uint32, indices uint32 y·w + x) of (n, payload_size) uint8 payloads:
    what ``counts_to_events(decode_payloads(payloads, fh))`` gives, without the dense frames."""
    rows = np.ascontiguousarray(payloads, np.uint8)
    pe = PayloadEvents(fh)
    n = len(rows)
    counts = np.zeros(n, np.uint32)
    out = np.empty(max(1024, 64 * n), np.uint32)
    f, e = 0, 0
    while f < n:
        f, e = pe.events(rows, 0, f, counts, out, e)
        if f < n:
            out = np.concatenate([out[:e], np.empty(max(len(out), 2 * (len(out) - e)), np.uint32)])
    return counts, out[:e]
