"""Freed memory kept for the next chunk instead of given back to the system and faulted in again.

dask's nanny starts every worker with ``MALLOC_TRIM_THRESHOLD_=65536``
(``distributed.nanny.pre-spawn-environ``), so that a worker's memory goes back to the system
as soon as it is freed. Setting any of glibc's malloc thresholds also turns off glibc's own
adjustment of ``M_MMAP_THRESHOLD``: every array of 128 kB or more is then mapped afresh and
unmapped when freed. A receiver makes and drops such arrays for every chunk, the blocks
written while scanning for every block: a 1024² scan faulted in 600,000 new pages (2.4 GB) on
two workers. A page fault costs 0.3-0.5 µs on a plain machine and 3-4.5 µs on the virtual
machines this project is measured on (BENCHMARKS.md), about 2 CPU s of the scan's 12.

:func:`keep_freed_memory` raises both thresholds, once per process: arrays up to
``MMAP_MAX`` come from the heap, and up to ``TRIM_MAX`` of free heap stays mapped for the
next ones. The price is memory: a worker's resident size stays near its high-water mark
instead of falling back after each scan (in a soak of small scans, 100-120 MB more per worker
after the first hundred, then flat: tests/test_faults_load.py); the scans' events stay
bounded by ``[memory] events_in_memory_mb``.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger("stemstream.session")

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_MAX = 32 << 20  # glibc's largest mmap threshold on 64-bit systems
TRIM_MAX = 256 << 20  # free heap kept mapped (per malloc arena)
_done: list[bool] = []


def keep_freed_memory() -> bool:
    """Once per process: glibc keeps freed memory for reuse (see the module). False, doing
    nothing, where the C library is not glibc."""
    if _done:
        return _done[0]
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): their allocators are left alone
        _done.append(False)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_MAX))
    if not ok:
        log.info("glibc refused the malloc thresholds; freed memory goes back to the system")
    _done.append(ok)
    return ok
