"""DECTRIS bitshuffle-LZ4 images straight to events, many images in one numba call.

A DCU compresses each image with bitshuffle + LZ4 in the HDF5 filter's framing
(``simplon.py``): a uint64 BE byte count, a uint32 BE block size in bytes, then per block of
``block`` elements a uint32 BE length and one LZ4 block; the last ``n % 8`` elements follow
uncompressed. Inside a block of ``m`` elements of ``s`` bytes, bitshuffle stores 8·s bit
planes of ``m / 8`` bytes: plane ``r`` holds bit ``r`` of every element (little-endian),
element ``j`` at bit ``j % 8`` of byte ``j // 8``.

Decompressing to dense counts, then turning the counts into events, writes and reads every
pixel twice more than needed, and in Python one image at a time costs a call per image on
each side. Here each block is LZ4-decoded into a small scratch buffer that stays in cache;
the OR of its bit planes says which pixels are not zero (at 50 e⁻ in a 192² image: a few
dozen of 36,864), and only those pixels' bits are gathered into counts. A pixel that counted
k electrons gives k events, in ascending pixel order within each image: the same events as
``operators.dense.counts_to_events`` of the decoded image (tested against
``dectris-compression``'s decoder).

Every length and offset of the stream is checked before it is used (numba does not bounds-
check): a corrupt or forged image gets a status, never a read or write out of bounds.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from operators.kernels import NJIT

# per-image status
OK, BAD_FRAMING, BAD_LZ4, TOO_MANY = range(4)
STATUS_TEXT = {BAD_FRAMING: "its bitshuffle-LZ4 framing does not fit the image (size, block size or lengths)",
               BAD_LZ4: "its LZ4 data is corrupt", TOO_MANY: "it holds more electrons than one message may carry"}


@njit(**NJIT)
def _be(buf, p, n):
    """The big-endian unsigned integer of ``buf[p:p+n]``."""
    v = 0
    for k in range(n):
        v = (v << 8) | np.int64(buf[p + k])
    return v


@njit(**NJIT)
def _copy(dst, d, src, s, n):
    """dst[d:d+n] = src[s:s+n] for ranges that do not overlap, as a loop LLVM vectorises
    (unsigned indices: a signed one costs a negative-index test per byte, which stops it)."""
    d, s = np.uint64(d), np.uint64(s)
    for k in range(np.uint64(n)):
        dst[d + k] = src[s + k]


@njit(**NJIT)
def _fill(dst, d, n, v):
    """dst[d:d+n] = v (a memset; unsigned indices as in ``_copy``)."""
    d = np.uint64(d)
    for k in range(np.uint64(n)):
        dst[d + k] = v


@njit(**NJIT)
def _length(buf, s, end, n):
    """An LZ4 length whose 4-bit field is ``n`` (15: more bytes follow, each added, until
    one below 255). Returns (length, next position), or (-1, s) past ``end``."""
    if n != 15:
        return n, s
    while True:
        if s >= end:
            return -1, s
        b = np.int64(buf[s])
        s += 1
        n += b
        if b != 255:
            return n, s


@njit(**NJIT)
def lz4_block(src, s, end, dst, size):
    """Decode one LZ4 block ``src[s:end]`` into ``dst[:size]``; returns the bytes written,
    or -1 when the block is corrupt or would write past ``size``."""
    d = 0
    while s < end:
        token = np.int64(src[s])
        s += 1
        lit, s = _length(src, s, end, token >> 4)
        if lit < 0 or s + lit > end or d + lit > size:
            return -1
        _copy(dst, d, src, s, lit)
        s += lit
        d += lit
        if s == end:  # the last sequence has literals only
            break
        if s + 2 > end:
            return -1
        off = np.int64(src[s]) | (np.int64(src[s + 1]) << 8)
        s += 2
        ml, s = _length(src, s, end, token & 15)
        if ml < 0 or off == 0 or off > d:
            return -1
        ml += 4
        if d + ml > size:
            return -1
        m = d - off
        if off >= ml:
            _copy(dst, d, dst, m, ml)
            d += ml
            continue
        # an overlapping match repeats the ``off`` bytes before it. In a sparse bitshuffled
        # block most bytes are such repeats of zeros (offsets 1-7): filled as one value,
        # not a byte at a time (each byte's load would wait for the store before it)
        v = dst[m]
        same = True
        for k in range(1, off):
            if dst[m + k] != v:
                same = False
                break
        if same:
            _fill(dst, d, ml, v)
            d += ml
            continue
        while ml > 0:  # pieces that do not overlap their source, doubling in length
            n = min(ml, d - m)
            _copy(dst, d, dst, m, n)
            d += n
            ml -= n
    return d


@njit(**NJIT)
def _block_events(blk, m, isz, acc, base, out, e, limit):
    """Events of one decoded bitshuffled block of ``m`` elements (pixels base ..
    base+m−1) appended to ``out`` from ``e``. Returns (new e, out) (``out`` grows when
    full), or (-1, out) beyond ``limit`` events."""
    nq = np.uint64(m // 8)
    rows = 8 * isz
    _copy(acc, 0, blk, 0, nq)
    for r in range(1, rows):  # unsigned indices, so that LLVM vectorises (``_copy``)
        p = np.uint64(r) * nq
        for q in range(nq):
            acc[q] |= blk[p + q]
    for q in range(nq):
        a = acc[q]
        if a == 0:
            continue
        for j in range(8):
            if not (a >> j) & 1:
                continue
            v = 0
            for r in range(rows):
                v |= np.int64((blk[r * nq + q] >> j) & 1) << r
            if e + v > limit:
                return -1, out
            if e + v > out.size:
                grown = np.empty(max(2 * out.size, e + v), np.uint32)
                grown[:e] = out[:e]
                out = grown
            px = np.uint32(base + 8 * q + j)
            for _ in range(v):
                out[e] = px
                e += 1
    return e, out


@njit(**NJIT)
def _image_events(buf, s, end, n_el, isz, blk, acc, out, e, limit):
    """Events of one framed bitshuffle-LZ4 image ``buf[s:end]`` of ``n_el`` elements of
    ``isz`` bytes, appended from ``e``. Returns (status, new e, out)."""
    if end - s < 12 or _be(buf, s, 8) != n_el * isz:
        return BAD_FRAMING, e, out
    bs = _be(buf, s + 8, 4)
    if bs <= 0 or bs % (8 * isz) != 0 or bs > blk.size:
        return BAD_FRAMING, e, out
    block = bs // isz
    p = s + 12
    el = 0
    tail = n_el % 8
    while el < n_el - tail:
        m = min(block, n_el - tail - el)
        m -= m % 8
        if p + 4 > end:
            return BAD_FRAMING, e, out
        ln = _be(buf, p, 4)
        p += 4
        if ln > end - p:
            return BAD_FRAMING, e, out
        if lz4_block(buf, p, p + ln, blk, m * isz) != m * isz:
            return BAD_LZ4, e, out
        p += ln
        e, out = _block_events(blk, m, isz, acc, el, out, e, limit)
        if e < 0:
            return TOO_MANY, e, out
        el += m
    if end - p != tail * isz:  # the last elements, uncompressed, and nothing after them
        return BAD_FRAMING, e, out
    for k in range(tail):
        v = 0
        for b in range(isz):
            v |= np.int64(buf[p + k * isz + b]) << (8 * b)
        if e + v > limit:
            return TOO_MANY, e, out
        if e + v > out.size:
            grown = np.empty(max(2 * out.size, e + v), np.uint32)
            grown[:e] = out[:e]
            out = grown
        for _ in range(v):
            out[e] = np.uint32(el + k)
            e += 1
    return OK, e, out


@njit(**NJIT)
def images_events(buf, starts, ends, n_el, isz, max_block, limit, counts, status, out):
    """Events of images ``buf[starts[i]:ends[i]]`` (each ``n_el`` elements of ``isz``
    bytes, blocks of at most ``max_block`` bytes), image after image into ``out`` (grown
    when full). counts[i] = events of image i; status[i] = OK, or why image i gave none
    (its events are dropped, the others kept); an image may give at most ``limit``.
    Returns (out, total events)."""
    blk = np.empty(max_block, np.uint8)
    acc = np.empty(max_block // 8, np.uint8)
    e = 0
    for i in range(starts.size):
        st, e2, out = _image_events(buf, starts[i], ends[i], n_el, isz, blk, acc, out, e, e + limit)
        status[i] = st
        if st == OK:
            counts[i] = e2 - e
            e = e2
        else:
            counts[i] = 0
    return out, e


MAX_BLOCK = 1 << 20  # bytes of one bitshuffle block we decode (DCUs use 8 KiB; the filter's default is 8 KiB)


def bslz4_events(blobs: list, n_pixels: int, itemsize: int, limit: int, expect: int = 64):
    """Events of a batch of bitshuffle-LZ4 images (``blobs``: bytes-like, one per image, all
    of ``n_pixels`` pixels of ``itemsize`` bytes). Returns (counts (n,) uint32, indices
    uint32 flat pixel index, status (n,) uint8): image i's events are the next counts[i]
    indices; an image with status ≠ OK (``STATUS_TEXT``) gave none. At most ``limit``
    events per image. ``expect``: events per image to allocate for first."""
    n = len(blobs)
    lengths = np.fromiter((len(b) for b in blobs), np.int64, n)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    buf = np.frombuffer(b"".join(blobs), np.uint8)
    counts = np.zeros(n, np.uint32)
    status = np.zeros(n, np.uint8)
    out = np.empty(max(1, expect * n), np.uint32)
    out, e = images_events(buf, starts, ends, int(n_pixels), int(itemsize), MAX_BLOCK, int(limit), counts,
                           status, out)
    return counts, out[:e], status
