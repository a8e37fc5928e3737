"""One HDF5 chunk of events through shuffle + gzip: ours (stream/files/chunk_codec.py) against
the HDF5 library's own filters (h5py, the same chunk and level) and the byte-transposed
buffer compressed whole by ISA-L (how the scan file's chunks were written before), one core.

    .venv/bin/python benchmarks/bench_codec.py [--level 2] [--repeats 15] [--cpu 0]

Chunks of 2^20 events (the scan file's ``EVENTS_CHUNK``), indices sorted within frames:
the emulator's MgO scan (stream simulate's default specimen), benchmarks/common.py's synthetic
scan (60 % in a bright-field disk) and electrons uniform over the detector. Also a 1024²
float64 image and a scan's int64 frame offsets, as the file's head holds them. ns per element,
median of ``--repeats``; size = stored bytes / raw bytes. Every chunk is inflated again and
compared with the shuffled input.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
import zlib
from pathlib import Path

import h5py
import numpy as np
from isal import isal_zlib

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stream.files.chunk_codec import shuffle, shuffle_deflate
from stream.files.storage import EVENTS_CHUNK


def whole_isal(data: np.ndarray, level: int) -> bytes:
    """The chunk as it was written before: numpy's byte transposition, ISA-L over all of it."""
    a = np.ascontiguousarray(data).reshape(-1)
    planes = np.ascontiguousarray(a.view(np.uint8).reshape(a.size, a.itemsize).T)
    return isal_zlib.compress(planes, level)


def hdf5_filters(data: np.ndarray, level: int) -> int:
    """The HDF5 library's shuffle + gzip on the chunk (an in-memory file); its stored size."""
    with h5py.File(f"codec-{os.getpid()}.h5", "w", driver="core", backing_store=False) as f:
        ds = f.create_dataset("x", data=data, chunks=data.shape, compression="gzip",
                              compression_opts=level, shuffle=True)
        return ds.id.get_storage_size()


def chunks(level: int) -> dict:
    import common

    from sim_detector.simulate import Beam, Detector, ScanSpec, presets, simulate_scan
    from sim_detector.specimens import make_specimen

    rng = np.random.default_rng(0)
    sp = make_specimen("mgo", seed=0)
    pre = presets(sp.name)
    sim = simulate_scan(sp, Beam(**{**pre.get("beam", {}), "dose": 100}),
                        Detector(**{**pre.get("detector", {}), "shape": (576, 576)}),
                        ScanSpec(**{**pre.get("scan", {}), "shape": (128, 128)}), seed=0)
    off = np.concatenate([[0], np.cumsum(sim.counts.ravel())]).astype(np.int64)
    mgo = np.concatenate([np.sort(sim.indices[a:b]) for a, b in itertools.pairwise(off)])
    indices = common.sparse_scan((128, 128), (576, 576), 100)[1]
    uniform = np.sort(rng.integers(0, 576 * 576, (EVENTS_CHUNK // 100 + 1, 100)), axis=1).ravel()
    n = EVENTS_CHUNK
    return {"events, emulator (MgO)": mgo[:n].astype(np.uint32),
            "events, synthetic (60 % in the BF disk)": np.asarray(indices[:n], np.uint32),
            "events, uniform over the detector": uniform[:n].astype(np.uint32),
            "float64 image, 128 rows of 1024 (1 MB)": rng.normal(1000, 30, (128, 1024)),
            "int64 frame offsets": np.cumsum(rng.poisson(100, n // 2)).astype(np.int64)}


def median_ns(fn, data, level, repeats) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(data, level)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / data.size * 1e9


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--level", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--cpu", type=int, default=0, help="core to pin to (-1: none)")
    a = ap.parse_args(argv)
    if a.cpu >= 0:
        os.sched_setaffinity(0, {a.cpu})
    print(f"command: python benchmarks/bench_codec.py {' '.join(argv or sys.argv[1:])}")
    print(f"gzip level {a.level}, pinned to CPU {a.cpu}, median of {a.repeats}; load average "
          f"{os.getloadavg()[0]:.2f} at the start\n")
    print("| chunk | elements | ours ns/element | size | HDF5's filters ns/element | size | ours ÷ HDF5 | "
          "ISA-L whole ns/element | size | ours ÷ ISA-L whole |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, data in chunks(a.level).items():
        ours = shuffle_deflate(data, a.level)
        assert zlib.decompress(ours) == shuffle(data).tobytes(), name
        raw = data.nbytes
        t_ours = median_ns(shuffle_deflate, data, a.level, a.repeats)
        t_h5 = median_ns(hdf5_filters, data, a.level, a.repeats)
        t_old = median_ns(whole_isal, data, a.level, a.repeats)
        print(f"| {name} | {data.size:,} | {t_ours:.2f} | {len(ours) / raw:.3f} | {t_h5:.2f} | "
              f"{hdf5_filters(data, a.level) / raw:.3f} | {t_h5 / t_ours:.1f}× faster | {t_old:.2f} | "
              f"{len(whole_isal(data, a.level)) / raw:.3f} | {t_old / t_ours:.2f}× faster |")
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
