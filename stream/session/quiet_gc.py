"""Python's full garbage collections kept off the stream.

CPython walks every container object its process holds at each full (generation 2)
collection, with the GIL held. A worker holds about 150,000 objects once dask, numpy, h5py
and the kernels are loaded, the coordinator's process about 230,000 (the scheduler, matplotlib
for the previews); a full collection then stopped a receiver for 0.1 s and the coordinator for
0.2 s, once in every 1024² scan at 300,000 frames/s (BENCHMARKS.md "Full garbage collections").
Those objects live as long as the process: :func:`freeze` collects once, then moves them out of
the collector's reach (``gc.freeze``), so a full collection walks only what came later. The
previews' figures leave tens of thousands of objects in reference cycles; the coordinator
collects them right after drawing them (``Session._write_previews``), rather than in a full
collection at the next scan's end (0.08-0.14 s each).
"""

from __future__ import annotations

import gc

_frozen = [False]


def freeze() -> int:
    """Once per process (a later session in it, or another worker plugin, does nothing):
    collect now, then exempt every object the process holds from later collections. Call it
    once the process is set up; objects made later are collected as usual. Returns how many
    objects are exempt."""
    if not _frozen[0]:
        _frozen[0] = True
        gc.collect()
        gc.freeze()
    return gc.get_freeze_count()
