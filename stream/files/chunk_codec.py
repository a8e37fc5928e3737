"""One HDF5 chunk through the shuffle and gzip (deflate) filters, without the library, fast.

HDF5's shuffle filter puts byte k of every element together (plane k); its gzip filter stores
a zlib stream (RFC 1950) of the shuffled bytes, which HDF5 reads back with zlib's
``inflate``. A deflate stream may mix block types (RFC 1951, 3.2.3), so each plane is
judged on its own: one that deflate cannot shrink by more than ``1 - KEEP`` (the low bytes
of event indices, which are all but random; the low mantissa bytes of floats) goes in
stored blocks, copied instead of searched for matches that are not there; the others are
compressed (ISA-L for levels 1-3, zlib above), neighbouring ones together. An event chunk
costs 1.1-1.6x less where the second byte of the indices is structured (a bright-field disk)
and about 3x less where electrons spread over the detector, at the same size
(BENCHMARKS.md); every HDF5 reader opens it, as any gzip-filtered dataset.
"""

from __future__ import annotations

import itertools
import zlib

import numpy as np
from isal import isal_zlib
from numba import njit

SAMPLE = 1 << 16  # bytes at the start of a plane deflated to judge it
KEEP = 0.95  # a plane whose sample deflates to more than this share of it is stored
_HEADER = b"\x78\x01"  # zlib: deflate, 32 KiB window, no dictionary (0x7801 % 31 == 0)


def _planes_kernel(m: int):
    @njit(cache=True, nogil=True)
    def planes(words, out):
        n = words.size
        for i in range(n):
            w = words[i]
            for k in range(m):  # m is a constant here: the loop unrolls
                out[k * n + i] = (w >> (8 * k)) & 0xFF
    return planes


_PLANES = {m: _planes_kernel(m) for m in (2, 4, 8)}
_WORDS = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def shuffle(data: np.ndarray) -> np.ndarray:
    """HDF5's shuffle filter: the bytes of ``data`` (any shape, C order) as planes, byte k
    of every element in plane k; (itemsize * size,) uint8. Little-endian, as HDF5 stores
    this machine's numbers."""
    data = np.ascontiguousarray(data).reshape(-1)
    m = data.itemsize
    if m == 1:
        return data.view(np.uint8)
    out = np.empty(data.nbytes, np.uint8)
    if m in _PLANES:
        _PLANES[m](data.view(_WORDS[m]), out)
    else:  # (complex, structured): numpy's transposing copy, 5-7x slower
        out.reshape(m, -1)[:] = data.view(np.uint8).reshape(-1, m).T
    return out


def _compressor(level: int):
    if level <= 3:
        return isal_zlib.compressobj(level, isal_zlib.DEFLATED, -15)
    return zlib.compressobj(level, zlib.DEFLATED, -15)


def _stored(plane: memoryview) -> bool:
    """Whether deflate would keep more than ``KEEP`` of the plane (judged on its start)."""
    sample = plane[:SAMPLE]
    return len(isal_zlib.compress(sample, 1)) > KEEP * len(sample)


def shuffle_deflate(data: np.ndarray, level: int) -> bytes:
    """The bytes HDF5 keeps for a chunk ``data`` with the shuffle and gzip (``level``,
    1-9) filters: a zlib stream of ``shuffle(data)``, incompressible planes stored."""
    raw = shuffle(data)
    m = data.dtype.itemsize
    n = raw.nbytes // m if m else 0
    planes = [memoryview(raw[k * n:(k + 1) * n]) for k in range(m)] if n else [memoryview(raw)]
    stored = [_stored(p) for p in planes]
    last = len(planes) - 1
    out = [_HEADER]
    for keep_raw, run in itertools.groupby(range(len(planes)), stored.__getitem__):
        run = list(run)  # neighbouring planes of one kind: one deflate segment
        c = zlib.compressobj(0, zlib.DEFLATED, -15) if keep_raw else _compressor(level)
        out.append(c.compress(memoryview(raw)[run[0] * n:(run[-1] + 1) * n] if n else raw))
        # a full flush ends the segment on a byte boundary with its last block not final, so
        # the next segment's blocks follow on; the last one finishes the stream
        out.append(c.flush(zlib.Z_FINISH if run[-1] == last else zlib.Z_FULL_FLUSH))
    out.append(isal_zlib.adler32(raw).to_bytes(4, "big"))
    return b"".join(out)
