"""A scan's events written while it runs ([output] write_while_scanning) make the same file
as the same stream written at its end: every dataset (values, dtype, shape, maxshape,
chunking, filters) and every attribute but the timings, the host and the switch itself.

Real sockets (a scripted detector in this process), a real cluster of two worker
processes, real HDF5 files. Each stream is run twice, with the switch on and off; the
file must also hold exactly the events sent (computed here from the stream), and early
writing must really have happened (``timings.early_written``: stored frames written while
the scan ran; ``early_frames``: those kept in the file)."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import h5py
import numpy as np
import pytest

from conftest import ScriptedSource
from faults import assert_same_file, set_read_only, wait_for, writable_dir
from stream.config import MemorySpec
from stream.session import Session, coordinator
from stream.session.early import stored_before
from stream.transport.protocol import Geometry
from test_pipeline import assert_events_stored, assert_matches, config, reference, synthetic_events

# 4160 frames of 2 sources, ~2.5 M electrons: a few 1 M-event chunks, blocks of 250 k events
GEOM = Geometry((40, 50), (40, 36), frames_per_position=2, flyback=2,
                mrad_per_px=0.5, convergence_mrad=4.0, center=(19.5, 17.5))
DOSE = 600
SKIP = {"/provenance/timings", "/provenance@host", "/provenance@config"}


def run(client, src, out, early: bool, memory_mb: float, cases: dict, handoff_dir="/dev/shm") -> dict:
    """Every case's scan, one after the other, through one session with early writing on or
    off: case -> ScanResult."""
    cfg = config(out, timeout_s=30, memory=MemorySpec(events_in_memory_mb=memory_mb, write_block_mb=1.0,
                                                      early_block_mb=1.0, handoff_dir=handoff_dir))
    cfg.output = replace(cfg.output, write_while_scanning=early)
    results = {}
    with Session(src.addresses, config=cfg, client=client, console=False) as s:
        src.wait_for_receivers()
        for case, script in cases.items():
            src.start(case, GEOM)
            script(src, s, early, case, events_of(case))
            results[case] = s.wait(case, timeout=120)
    return results


def events_of(case):
    return synthetic_events(GEOM, seed=len(case), dose=DOSE)


def written_early(s, name, at_least=1):
    """Wait until the session has given ``at_least`` stored frames to blocks written early."""
    return wait_for(lambda: [st["written_early"] for st in s.status()
                             if st["scan_id"] == name and st["written_early"] >= at_least], 60)[0]


def in_order(src, s, early, name, events):
    src.frames(name, GEOM, *events, batch=8)
    if early:
        written_early(s, name, at_least=stored_before(GEOM, GEOM.n_frames) // 2)
    src.end(name, GEOM.n_frames)


def out_of_order(src, s, early, name, events):
    src.frames(name, GEOM, *events, batch=5, order=np.random.default_rng(4).permutation)
    if early:
        written_early(s, name)
    src.end(name, GEOM.n_frames)


HOLE = list(range(3001, 3012))


def missing(src, s, early, name, events):
    src.frames(name, GEOM, *events, batch=8, only=[f for f in range(GEOM.n_frames) if f not in HOLE])
    if early:
        written_early(s, name)
    src.end(name, GEOM.n_frames)


DUP_EARLY = list(range(10, 30))


def duplicated_in_the_early_part(src, s, early, name, events):
    src.frames(name, GEOM, *events, batch=8)
    if early:
        written_early(s, name, at_least=stored_before(GEOM, 100))
    src.frames(name, GEOM, *events, batch=3, only=DUP_EARLY)  # resent after they were written
    src.end(name, GEOM.n_frames)


TAIL = 200
DUP_TAIL = list(range(GEOM.n_frames - 150, GEOM.n_frames - 140))


def duplicated_at_the_end(src, s, early, name, events):
    """The last 200 frames come after early writing started, some of them twice: the file
    written early is kept, the end drops the extra copies. The tail's first frame is held
    back until the copies have come, so that early writing (which stops at the first frame
    some source has not delivered) cannot reach them first, however fast it runs."""
    gate = GEOM.n_frames - TAIL
    src.frames(name, GEOM, *events, batch=8, only=range(gate))
    if early:
        written_early(s, name)
    src.frames(name, GEOM, *events, batch=8, only=range(gate + 1, GEOM.n_frames))
    src.frames(name, GEOM, *events, batch=2, only=DUP_TAIL)
    src.frames(name, GEOM, *events, batch=1, only=[gate])
    src.end(name, GEOM.n_frames)


CASES = {"in_order": in_order, "out_of_order": out_of_order, "missing": missing,
         "duplicated_early": duplicated_in_the_early_part, "duplicated_end": duplicated_at_the_end}
KEPT = {"duplicated_early": False}  # frames resent into the part written early: thrown away


@pytest.fixture(scope="module")
def written(client2, tmp_path_factory):
    """case -> (ScanResult with early writing on, the same with it off): the cases through
    one pair of sessions, an out-of-order scan through a pair whose receivers keep at most
    50 kB of events in memory (the rest in their spill files), an in-order one through a pair
    that hands no events over in memory, and the in-order scan written at its end block by
    block; "handoffs", "handoffs_at_end", "handoffs_over_dask": each worker's handoffs
    (transport.handoff) during the first pair's run with early writing, the run block by
    block, and the pair without handoffs."""
    src = ScriptedSource(2)
    try:
        out = {}
        before = handoffs(client2)
        on = run(client2, src, tmp_path_factory.mktemp("on"), True, 128.0, CASES)
        out["handoffs"] = handoffs(client2, before)
        off = run(client2, src, tmp_path_factory.mktemp("off"), False, 128.0, CASES)
        out.update({case: (on[case], off[case]) for case in CASES})
        before = handoffs(client2)
        with pytest.MonkeyPatch.context() as mp:  # written at the end block by block, not in one task
            mp.setattr(coordinator, "SMALL_SCAN_EVENTS", 0)
            blocks = run(client2, src, tmp_path_factory.mktemp("blocks"), False, 128.0, {"in_order": in_order})
        out["handoffs_at_end"] = handoffs(client2, before)
        out["in_blocks_at_the_end"] = (on["in_order"], blocks["in_order"])
        spill = {"spilled": out_of_order}
        on = run(client2, src, tmp_path_factory.mktemp("spill_on"), True, 0.05, spill)
        off = run(client2, src, tmp_path_factory.mktemp("spill_off"), False, 0.05, spill)
        out["spilled"] = (on["spilled"], off["spilled"])
        before = handoffs(client2)
        on = run(client2, src, tmp_path_factory.mktemp("dask_on"), True, 128.0, {"over_dask": in_order}, "")
        off = run(client2, src, tmp_path_factory.mktemp("dask_off"), False, 128.0, {"over_dask": in_order}, "")
        out["handoffs_over_dask"] = handoffs(client2, before)
        out["over_dask"] = (on["over_dask"], off["over_dask"])
        return out
    finally:
        src.close()


def handoffs(client, before=None) -> dict:
    """Handoffs (put, loaded) of every worker process, since ``before`` if given."""
    def counts():
        from stream.transport.handoff import COUNTS
        return dict(COUNTS)
    now = client.run(counts)
    if before is None:
        return now
    return {w: {k: now[w][k] - before[w][k] for k in now[w]} for w in now}


@pytest.mark.parametrize("case", [*CASES, "spilled", "over_dask", "in_blocks_at_the_end"])
def test_written_while_scanning_equals_written_at_the_end(written, case):
    """over_dask: an in-order stream with [memory] handoff_dir = "" (the parts of the blocks
    move over dask's connections), against the same stream written at the end;
    in_blocks_at_the_end: the in-order stream written at its end block by block (as a scan
    of more than SMALL_SCAN_EVENTS is), against it written while it ran."""
    on, off = written[case]
    events = events_of("in_order" if case == "in_blocks_at_the_end" else case)
    assert on.events > 2 * (1 << 20)  # more than two HDF5 chunks of events
    # early writing happened, and its file was kept (or, with frames resent into it, not)
    assert on.timings["early_written"] > 0
    assert (on.timings["early_frames"] > 0) == KEPT.get(case, True), on.timings
    assert off.timings["early_written"] == off.timings["early_frames"] == 0
    assert_same_file(on.path, off.path, skip=SKIP)
    configs = []
    for r in (on, off):
        with h5py.File(r.path, "r") as f:
            configs.append(json.loads(f["provenance"].attrs["config"]))
    assert [c["output"].pop("write_while_scanning") for c in configs] == [True, False]
    assert [c["output"].pop("dir") for c in configs] != [None, None]
    assert configs[0] == configs[1]
    # and it holds what was sent, computed here from the stream
    keep = np.ones(GEOM.n_frames, bool)
    if case == "missing":
        keep[HOLE] = False
        assert on.missing_frames == HOLE
    assert_events_stored(on.path, *events, GEOM, keep=keep)
    assert_matches(on, reference(*events, GEOM, keep=keep), on.path)
    if case.startswith("duplicated"):
        assert on.duplicated_frames == (DUP_EARLY if case == "duplicated_early" else DUP_TAIL)


def test_the_workers_hand_the_blocks_parts_over_in_memory_and_leave_no_file(written, client2):
    """On one host the scan's writer builds every block, while the scan runs and at its end:
    the other worker hands its parts over through /dev/shm, and at the end its closed state
    without the events; the writer loads each once. The files of blocks cancelled at a
    scan's close are removed with it: none is left. With handoff_dir = "" nothing goes
    through /dev/shm."""
    import os

    from stream.transport.handoff import PREFIX

    a, b = written["handoffs"].values()  # a scan's writer loads what the other worker put
    assert a["loaded"] + b["loaded"] > 0, written["handoffs"]
    assert a["loaded"] <= b["put"] and b["loaded"] <= a["put"], written["handoffs"]  # cancelled at close: not loaded
    # written at the end (block by block): the writer loads every part and the closed state
    # the other worker put, and puts none itself
    writer, other = sorted(written["handoffs_at_end"].values(), key=lambda c: c["loaded"], reverse=True)
    assert writer["loaded"] == other["put"] > 1 and writer["put"] == other["loaded"] == 0, \
        written["handoffs_at_end"]
    assert (writer["objects"], other["objects"]) == (1, 0), written["handoffs_at_end"]
    assert all(not any(c.values()) for c in written["handoffs_over_dask"].values())
    pids = set(client2.run(os.getpid).values())
    left = [n for n in os.listdir("/dev/shm") if n.startswith(PREFIX) and int(n[len(PREFIX):].split("-")[0]) in pids]
    assert left == []


def test_the_sessions_workers_and_its_own_process_are_frozen_for_the_garbage_collector(written, client2):
    """stream/session/quiet_gc.py: once a session has started, the objects its workers and
    its own process held then are out of the collector's reach (a full collection would
    walk them all with the GIL held: 0.1-0.2 s each)."""
    import gc

    assert all(n > 50_000 for n in client2.run(gc.get_freeze_count).values())
    assert gc.get_freeze_count() > 50_000


def test_the_sessions_workers_keep_freed_memory_for_reuse(written, client2):
    """stream/session/heap.py: dask's nanny starts the workers with MALLOC_TRIM_THRESHOLD_,
    under which every array of 128 kB or more is faulted in afresh; the receiver plugin lifts
    it when it is set up (what that does is checked in a fresh interpreter in
    tests/test_heap.py)."""
    import os

    from stream.session import heap

    assert set(client2.run(os.environ.get, "MALLOC_TRIM_THRESHOLD_").values()) == {"65536"}
    done = client2.run(lambda: list(heap._done))  # what the plugin's call did (not called here)
    assert all(d == [True] for d in done.values()), done


def test_a_scan_written_early_into_a_read_only_output_is_held_then_written_once(client2, written, tmp_path):
    """The output goes read-only while the scan's events are being written early: the
    finished file waits in staging (the early file, adopted), is published once the output
    is writable again, equal to the same scan written at the end; nothing is left in staging
    and no second copy appears."""
    staging = tmp_path / "staging"
    src = ScriptedSource(2)
    try:
        with writable_dir(tmp_path) as out:
            cfg = config(tmp_path, timeout_s=30, memory=MemorySpec(write_block_mb=1.0, early_block_mb=1.0, spill_dir=str(staging)))
            cfg.output = replace(cfg.output, dir=str(out), write_while_scanning=True)
            with Session(src.addresses, config=cfg, client=client2, console=False) as s:
                src.wait_for_receivers()
                src.start("in_order", GEOM)
                events = events_of("in_order")
                src.frames("in_order", GEOM, *events, batch=8)
                written_early(s, "in_order")
                set_read_only(out, True)
                try:
                    src.end("in_order", GEOM.n_frames)
                    held = wait_for(lambda: [p for p in s.pending() if p["attempts"] >= 1], 120)
                    assert "staging" in held[0]["where"], held[0]
                    assert len(list(staging.glob(".in_order.h5.*.partial"))) == 1  # the one finished file
                finally:
                    set_read_only(out, False)
                r = s.wait("in_order", timeout=120)
            assert r.path == out / "in_order.h5" and [p.name for p in out.glob("*.h5")] == ["in_order.h5"]
            assert r.timings["early_frames"] > 0
            assert_same_file(r.path, written["in_order"][1].path, skip=SKIP)
            assert not list(staging.glob("*.partial")) and not list(staging.glob(".*.partial"))
    finally:
        src.close()


def test_a_scan_that_closes_with_blocks_queued_keeps_what_was_written_and_ends_the_same(client2, written, tmp_path):
    """Half the scan arrives and is written early; then both workers are kept busy (one
    thread each: a sleeping task) while the other half arrives, so that the blocks of it wait
    behind the sleeps, and the scan closes. The waiting blocks are cancelled, not waited for:
    the file keeps the early part up to the last block written, the end writes the rest, and
    the file is the one written all at the end."""
    src = ScriptedSource(2)
    try:
        cfg = config(tmp_path, timeout_s=30, memory=MemorySpec(write_block_mb=1.0, early_block_mb=1.0))
        cfg.output = replace(cfg.output, write_while_scanning=True)
        events = events_of("in_order")
        half = GEOM.n_frames // 2
        with Session(src.addresses, config=cfg, client=client2, console=False) as s:
            src.wait_for_receivers()
            src.start("in_order", GEOM)
            src.frames("in_order", GEOM, *events, batch=8, only=range(half))
            written_early(s, "in_order")
            time.sleep(2.0)  # the blocks of the first half are written
            before = written_early(s, "in_order")
            workers = list(client2.scheduler_info()["workers"])
            busy = [client2.submit(time.sleep, 5, workers=[w], pure=False) for w in workers]
            time.sleep(0.5)
            src.frames("in_order", GEOM, *events, batch=8, only=range(half, GEOM.n_frames))
            time.sleep(1.0)  # blocks of the second half are submitted, and wait
            src.end("in_order", GEOM.n_frames)
            r = s.wait("in_order", timeout=120)
            del busy
        assert r.timings["early_cancelled"] >= 1, r.timings
        assert r.timings["early_frames"] == r.timings["early_written"] == before > 0, (before, r.timings)
        assert before <= stored_before(GEOM, half)
        assert_same_file(r.path, written["in_order"][1].path, skip=SKIP)
        assert_events_stored(r.path, *events, GEOM)
    finally:
        src.close()


def _slow_block_writes(seconds):
    """In a worker process: every block written to a scan file takes ``seconds`` longer (0:
    as it was)."""
    from stream.files.storage import ScanWriter
    put = getattr(ScanWriter, "_put_block_fast", ScanWriter.put_block)
    ScanWriter._put_block_fast = put
    ScanWriter.put_block = put if not seconds else lambda self, block: (time.sleep(seconds), put(self, block))[1]


def test_blocks_built_when_the_scan_closes_are_written_not_done_again(client2, written, tmp_path):
    """The workers build blocks faster than the writer writes them (every write 0.4 s
    longer), so that when the scan closes blocks are merged and compressed but not written:
    they are written before the end goes on (the file keeps more frames than were written
    when it closed), the blocks not built are left to the end, and the file is the one
    written all at the end."""
    src = ScriptedSource(2)
    client2.run(_slow_block_writes, 0.4)
    try:
        cfg = config(tmp_path, timeout_s=30, memory=MemorySpec(write_block_mb=1.0, early_block_mb=1.0))
        cfg.output = replace(cfg.output, write_while_scanning=True)
        events = events_of("in_order")
        with Session(src.addresses, config=cfg, client=client2, console=False) as s:
            src.wait_for_receivers()
            src.start("in_order", GEOM)
            src.frames("in_order", GEOM, *events, batch=8)
            written_early(s, "in_order")  # the first block is written: the next ones are built
            time.sleep(0.3)
            before = written_early(s, "in_order")
            src.end("in_order", GEOM.n_frames)
            r = s.wait("in_order", timeout=120)
        assert r.timings["early_frames"] == r.timings["early_written"] > before > 0, (before, r.timings)
        assert_same_file(r.path, written["in_order"][1].path, skip=SKIP)
        assert_events_stored(r.path, *events, GEOM)
    finally:
        client2.run(_slow_block_writes, 0)
        src.close()


def test_stored_before_counts_the_stored_frames_below_a_frame_number():
    """Against the frames one by one: position·fpp + k, flyback frames dropped."""
    for g in (GEOM, Geometry((3, 4), (8, 8)), Geometry((3, 4), (8, 8), frames_per_position=3, flyback=1)):
        fpp, nx, w = g.frames_per_position, g.scan_shape[1], g.scan_shape[1] + g.flyback
        stored = [(f // fpp) % w < nx for f in range(g.n_frames)]
        for frames in range(g.n_frames + 1):
            assert stored_before(g, frames) == sum(stored[:frames]), (g, frames)


def test_the_end_waits_for_the_block_being_written_early_a_bounded_time(tmp_path, monkeypatch):
    """``take_early`` (the writer, at the scan's end) waits for the block being written at
    most ``wait_s``; past that it gives the early file up, and the block, when it ends,
    deletes the file it was writing (nothing is left in staging)."""
    import threading

    from stream.files.storage import EVENTS_CHUNK, ScanWriter, compress_block
    from stream.session.finalize import EarlySpec, take_early, write_early

    spec = EarlySpec("slow", Geometry((3, 4), (8, 8)), str(tmp_path / "slow.h5"), str(tmp_path), 2)
    n = EVENTS_CHUNK + 5
    built = (np.array([0, n]), compress_block(np.arange(n, dtype=np.uint32) % 64, 0, None, 2))
    put = ScanWriter.put_block
    monkeypatch.setattr(ScanWriter, "put_block", lambda self, block: (time.sleep(1.5), put(self, block)))
    writing = threading.Thread(target=write_early, args=("tok", spec, 0, 1, 1, None, built))
    writing.start()
    time.sleep(0.3)  # the block is being written
    t0 = time.monotonic()
    assert take_early("tok", wait_s=0.2) is None
    assert 0.2 <= time.monotonic() - t0 < 1.0
    writing.join()
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob(".*.partial"))
