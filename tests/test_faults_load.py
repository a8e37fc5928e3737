"""Junk and load: malformed messages in the middle of a good scan, bursts of small scans, a
soak of many scans with the workers' memory and open files measured.

Each test names what was lost (nothing that arrived) and what survived."""

from __future__ import annotations

import collections
import time

import h5py
import numpy as np
import pytest

from conftest import dense_scan
from faults import fuzz_messages, rss_and_fds
from stream.config import ChunkingSpec, OutputSpec, PipelineConfig, ScanSpec, validate
from stream.session import Session, heap
from stream.transport.protocol import Geometry
from test_pipeline import GEOM, assert_matches, config, poll, reference, synthetic_events


def fuzz_during_a_good_scan(client, src, tmp_path, n_junk: int, seed: int):
    """Send n_junk malformed messages while a good scan streams; returns the good scan's
    result, the session's rejects, what the junk should have produced, and the out dir."""
    rng = np.random.default_rng(seed)
    junk = fuzz_messages(rng, n_junk, GEOM)
    events = synthetic_events(GEOM, seed=seed)
    with Session(src.addresses, config=config(tmp_path, timeout_s=60), client=client, console=False) as s:
        src.wait_for_receivers()
        src.start("good", GEOM)
        frames = np.arange(GEOM.n_frames)
        for i, part in enumerate(np.array_split(frames, 10)):  # the junk between the good frames
            src.frames("good", GEOM, *events, batch=4, only=part[:len(part) // 2])
            for parts, _, _ in junk[i * n_junk // 10:(i + 1) * n_junk // 10]:
                src.send(0, parts)
        # every junk message is rejected before the scan can close, so its file counts them all
        rejects = poll(s.rejects, lambda v: sum(v.values()) >= n_junk, timeout_s=300)
        for part in np.array_split(frames, 10):
            src.frames("good", GEOM, *events, batch=4, only=part[len(part) // 2:])
        src.end("good", GEOM.n_frames)
        r = s.wait("good", timeout=300)
        rejects = s.rejects()
    return r, rejects, junk, events


def check_fuzz(r, rejects, junk, events, out):
    expected = collections.Counter(reason for _, reason, _ in junk)
    naming_good = collections.Counter(reason for _, reason, good in junk if good)
    assert r.status == "complete", r.reason  # lost: nothing
    assert_matches(r, reference(*events, GEOM), r.path)  # survived: every frame, exactly
    assert dict(rejects) == dict(expected)  # every junk message counted under the documented reason
    with h5py.File(r.path) as f:
        assert f["provenance"].attrs["rejected_messages"] == sum(naming_good.values())
        assert dict(f["provenance/rejects"].attrs) == dict(naming_good)
        assert (f["completeness/received"][()] == 1).all()
    assert sorted(p.name for p in out.iterdir()) == ["good.h5"]  # no file from the junk


def test_500_malformed_messages_during_a_good_scan(client2, scripted_source, tmp_path):
    """Lost: nothing. Survived: the good scan, exact, with the junk naming it counted in its
    file by reason; no file from the junk."""
    src = scripted_source(1)
    r, rejects, junk, events = fuzz_during_a_good_scan(client2, src, tmp_path, 500, seed=51)
    check_fuzz(r, rejects, junk, events, tmp_path / "out")


@pytest.mark.slow
def test_5000_malformed_messages_during_a_good_scan(client2, scripted_source, tmp_path):
    """The same with 5,000 fuzzed messages."""
    src = scripted_source(1)
    t0 = time.monotonic()
    r, rejects, junk, events = fuzz_during_a_good_scan(client2, src, tmp_path, 5000, seed=52)
    check_fuzz(r, rejects, junk, events, tmp_path / "out")
    print(f"\n5,000 malformed messages: all rejected by reason, the good scan exact; "
          f"{time.monotonic() - t0:.1f} s in all")


def burst(client, src, tmp_path, geometry, n_scans, counts, indices, prefix, cfg=None):
    """n_scans copies of one scan, back to back as fast as the receivers take them."""
    cfg = cfg or validate(PipelineConfig(output=OutputSpec(dir=str(tmp_path / "out"), previews=False),
                                         scan=ScanSpec(timeout_s=60.0),
                                         chunking=ChunkingSpec(max_latency_ms=20)))
    with Session(src.addresses, config=cfg, client=client, console=False) as s:
        src.wait_for_receivers()
        t0 = time.monotonic()
        for i in range(n_scans):
            sid = f"{prefix}-{i:03d}"
            src.start(sid, geometry)
            src.frames(sid, geometry, counts, indices, batch=128)
            src.end(sid, geometry.n_frames)
        results = [s.wait(f"{prefix}-{i:03d}", timeout=600) for i in range(n_scans)]
        seconds = time.monotonic() - t0
    return results, seconds


def small_scan(seed=0, dose=20):
    g = Geometry((32, 32), (64, 64), mrad_per_px=1.0, convergence_mrad=8.0)
    rng = np.random.default_rng(seed)
    counts = rng.poisson(dose, g.n_frames).astype(np.uint32)
    return g, counts, rng.integers(0, 64 * 64, int(counts.sum())).astype(np.uint32)


def test_a_burst_of_100_small_scans_is_complete_and_labelled_so(client2, scripted_source, tmp_path):
    """100 scans of 32 x 32 positions sent back to back (after 20 to warm up): every one
    complete, labelled complete, exact (its diffraction sum equals the dense sum of its
    events); the workers' resident memory and open files do not grow with the scans.
    Lost: nothing. Survived: 120 scans."""
    g, counts, indices = small_scan()
    src = scripted_source(1)
    want = dense_scan(counts, indices, g).sum((0, 1))
    warm, _ = burst(client2, src, tmp_path, g, 20, counts, indices, "warm")
    before = rss_and_fds(client2)
    results, seconds = burst(client2, src, tmp_path, g, 100, counts, indices, "burst")
    after = rss_and_fds(client2)
    assert [r.status for r in warm + results] == ["complete"] * 120, \
        [(r.scan_id, r.status, r.reason) for r in warm + results if r.status != "complete"]
    for r in results:
        assert r.frames_received == g.n_frames and not r.n_missing and r.events == int(counts.sum())
        np.testing.assert_array_equal(r.results["diffraction_sum"], want)
    files = sorted(p.name for p in (tmp_path / "out").glob("*.h5"))
    assert len(files) == 120 and all("-2" not in f[-6:] for f in files)  # each written once
    growth = {w: ((after[w][0] - before[w][0]) / 1e6, after[w][1] - before[w][1]) for w in before}
    print(f"\n100 scans of 32x32 in {seconds:.1f} s ({100 / seconds:.1f} scans/s on this machine now); "
          f"worker RSS and open files after vs before: {growth}")
    for w, (mb, fds) in growth.items():
        assert mb < 60 and fds <= 4, (w, mb, fds)


@pytest.mark.slow
def test_a_soak_of_300_scans_keeps_worker_memory_and_files_flat(client2, scripted_source, tmp_path):
    """300 scans of 64 x 64 positions on a 256 x 256 detector, after 30 to warm up: worker
    memory and open files measured every 100 scans stay within bounds. Lost: nothing."""
    g = Geometry((64, 64), (256, 256), mrad_per_px=0.5, convergence_mrad=8.0)
    rng = np.random.default_rng(3)
    counts = rng.poisson(100, g.n_frames).astype(np.uint32)
    indices = rng.integers(0, 256 * 256, int(counts.sum())).astype(np.uint32)
    src = scripted_source(1)
    burst(client2, src, tmp_path, g, 30, counts, indices, "warm")
    marks = [rss_and_fds(client2)]
    for k in range(3):
        results, _ = burst(client2, src, tmp_path, g, 100, counts, indices, f"soak{k}")
        assert all(r.status == "complete" for r in results)
        for p in (tmp_path / "out").glob(f"soak{k}-*.h5"):
            p.unlink()  # the disk is not what is measured
        marks.append(rss_and_fds(client2))
    for w in marks[0]:
        rss = [m[w][0] / 1e6 for m in marks]
        fds = [m[w][1] for m in marks]
        print(f"\nworker {w}: RSS {', '.join(f'{x:.0f}' for x in rss)} MB, open files {fds} "
              "(after 30, 130, 230, 330 scans)")
        # the workers keep up to heap.TRIM_MAX of freed memory for the next scans (page faults
        # cost more than the memory: stream/session/heap.py), which the first hundred fill
        assert max(rss[1:]) - rss[0] < 100 + heap.TRIM_MAX / 1e6 and max(fds) - fds[0] <= 4
        assert rss[-1] - rss[1] < 50  # no growth from the second hundred on
