"""Stalls and deaths: a worker stopped (SIGSTOP) or killed (SIGKILL) mid-scan, the emulator
killed mid-scan, every worker stopped (back-pressure reaches the source).

Each test names what was lost and what survived. A stalled worker loses nothing: its queued
frames count when it resumes. A killed worker loses what it held, named in the file with
that cause; every other frame survives exactly."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import h5py
import numpy as np
import pytest
import zmq

from faults import assert_same_scan, stopped, wait_for, worker_pids
from stream.session import Session
from stream.transport.net import free_port_block
from test_pipeline import GEOM, assert_matches, config, poll, reference, synthetic_events


def frames_of(s, scan_id):
    return next((st for st in s.status() if st["scan_id"] == scan_id), {})


def first_half_on_both_workers(s, src, scan_id, events):
    """Start the scan and send its first half; return once both workers processed some of it
    and every frame of it is counted."""
    half = GEOM.n_frames // 2
    src.start(scan_id, GEOM)
    src.frames(scan_id, GEOM, *events, batch=4, only=range(half))
    return poll(lambda: frames_of(s, scan_id), lambda v: v and v["frames_received"] == half
                and len([w for w, n in v["worker_events"].items() if n]) == 2, timeout_s=60)


def test_a_stopped_worker_delays_the_scan_and_loses_nothing(client2, scripted_source, tmp_path, capsys):
    """One worker stopped for 3 s mid-scan with a 0.5 s silence timeout: the scan waits for
    it (the old timeout would have closed it and dropped its queue as late). Lost: nothing.
    Survived: every frame, the stopped worker's queue included; no message was rejected."""
    events = synthetic_events(GEOM, seed=41)
    src = scripted_source(2)
    half = GEOM.n_frames // 2
    with Session(src.addresses, config=config(tmp_path, timeout_s=0.5), client=client2) as s:
        src.wait_for_receivers()
        first_half_on_both_workers(s, src, "stall", events)
        victim, pid = sorted(worker_pids(client2).items())[1]
        with stopped(pid):
            src.frames("stall", GEOM, *events, batch=4, only=range(half, GEOM.n_frames))
            src.end("stall", GEOM.n_frames)
            time.sleep(3.0)
            with pytest.raises(TimeoutError):
                s.wait("stall", timeout=0.1)
            st = frames_of(s, "stall")
            queued = GEOM.n_frames - st["frames_received"]
            assert st["state"] == "receiving" and queued > 0  # the stopped worker holds them
        r = s.wait("stall", timeout=120)
        rejects = s.rejects()
    assert r.status == "complete", r.reason
    assert_matches(r, reference(*events, GEOM), r.path)
    assert rejects == {} and not r.late_ranges and not r.lost_ranges
    assert f"waiting for worker {victim}: no report for" in capsys.readouterr().out
    with capsys.disabled():
        print(f"\nstopped worker: {queued} of {GEOM.n_frames} frames were queued at it while it was "
              "stopped; all counted")



def test_a_momentarily_empty_worker_list_delays_the_file_and_loses_nothing(client2, scripted_source, tmp_path, capsys):
    """Issue 13's intermittent crash: the writer was chosen from a worker list that was
    momentarily empty, and a complete scan was lost. Here the session's list of live workers
    is made empty (the fault injected in this session only) while a scan closes: the attempt
    fails, the scan is held, and it is written on a retry once workers are known again.
    Lost: nothing. Survived: the whole scan, exact."""
    events = synthetic_events(GEOM, seed=43)
    src = scripted_source(2)
    empty = threading.Event()
    empty.set()
    with Session(src.addresses, config=config(tmp_path), client=client2) as s:
        src.wait_for_receivers()
        live_workers = s._live_workers
        s._live_workers = lambda: [] if empty.is_set() else live_workers()
        src.start("blank", GEOM)
        src.frames("blank", GEOM, *events, batch=4)
        src.end("blank", GEOM.n_frames)
        held = wait_for(lambda: [p for p in s.pending() if p["scan_id"] == "blank" and p["attempts"] >= 1], 120)
        assert "no worker in the cluster right now" in held[0]["error"], held
        assert held[0]["frames_received"] == GEOM.n_frames
        empty.clear()
        r = s.wait("blank", timeout=120)
    assert r.status == "complete", r.reason
    assert_matches(r, reference(*events, GEOM), r.path)
    out = capsys.readouterr().out
    assert "ERROR [blank] its file cannot be written" in out and "[blank] written after" in out

@pytest.fixture
def own_cluster():
    """Two workers of our own: this test kills one (its nanny starts a new one)."""
    from conftest import _cluster
    cluster, client = _cluster(2)
    yield client
    client.close()
    cluster.close()


def test_a_killed_worker_loses_what_it_held_and_the_file_names_it(own_cluster, scripted_source, tmp_path, capsys):
    """SIGKILL of one worker after it processed frames of the first half of the scan. Lost:
    exactly the frames that worker had processed, listed in /completeness/lost_frames with
    the cause dask gave; nothing else. Survived: every frame the other worker processed and
    every frame sent after the death, exact."""
    client = own_cluster
    events = synthetic_events(GEOM, seed=42)
    src = scripted_source(1)
    half = GEOM.n_frames // 2
    with Session(src.addresses, config=config(tmp_path, timeout_s=60), client=client) as s:
        src.wait_for_receivers()
        before = first_half_on_both_workers(s, src, "kill", events)
        victim, pid = sorted(worker_pids(client).items())[1]
        import os
        import signal
        os.kill(pid, signal.SIGKILL)
        gone = wait_for(lambda: [r for r in s.receivers() if r["worker"] == victim and r["gone"]], 60)
        src.frames("kill", GEOM, *events, batch=4, only=range(half, GEOM.n_frames))
        src.end("kill", GEOM.n_frames)
        r = s.wait("kill", timeout=120)
    assert "its process died" in gone[0]["gone"]
    with h5py.File(r.path) as f:
        received = f["completeness/received"][()][0] > 0
        lost = f["completeness/lost_frames"][()]
        assert victim in f["completeness"].attrs["lost_cause"]
        assert f["completeness/late_frames"].shape == (0,)
    assert r.status == "incomplete" and "lost with worker" in r.reason
    assert received[half:].all()  # everything sent after the death survived
    np.testing.assert_array_equal(lost, np.flatnonzero(~received))  # what is missing is what it held
    assert 0 < len(lost) < half and before["worker_events"][victim] > 0
    assert_matches(r, reference(*events, GEOM, keep=received), r.path)  # the rest is exact
    out = capsys.readouterr().out
    assert f"frames were lost with a worker (worker {victim}" in out
    assert "never arrived" not in out


def test_a_killed_emulator_leaves_a_scan_with_its_missing_frames_named(client2, tmp_path):
    """`stemstream simulate` killed (SIGKILL) mid-scan: no end ever comes. Lost: the frames
    it never sent, named as never arrived because source 0 sent no end. Survived: every
    frame it sent, identical to the same frames of a clean run with the same seed."""
    port = free_port_block(1)
    addr = f"tcp://127.0.0.1:{port}"
    cfg = config(tmp_path, timeout_s=1.0)
    cfg.virtual.clear()  # the emulator's own calibration, default detectors
    cfg.com.radius_px = None
    cfg.aperture.clear()
    common = [sys.executable, "-m", "stream.cli", "simulate", "--scan", "48x48", "--detector", "64x64",
              "--dose", "50", "--seed", "7", "--bind", addr, "--batch", "16", "--quiet", "--wait", "60"]
    with Session([addr], config=cfg, client=client2, console=False) as s:
        emulator = subprocess.Popen(common + ["--rate", "400", "--scan-id", "killed"])
        try:
            poll(lambda: frames_of(s, "killed-0000"), lambda v: v and v["frames_received"] >= 400, timeout_s=120)
        finally:
            emulator.kill()
            emulator.wait()
        r = s.wait("killed-0000", timeout=120)
        clean = subprocess.run(common + ["--rate", "max", "--scan-id", "clean"], timeout=300)
        assert clean.returncode == 0
        c = s.wait("clean-0000", timeout=120)
    assert c.status == "complete" and r.status == "incomplete"
    assert "no message" in r.reason and "no end message from source 0" in r.reason
    with h5py.File(r.path) as f, h5py.File(c.path) as g:
        got = f["completeness/received"][()][0] > 0
        assert 400 <= got.sum() < 48 * 48
        np.testing.assert_array_equal(f["completeness/missing_frames"][()], np.flatnonzero(~got))
        assert f["completeness/lost_frames"].shape == (0,) and f["completeness/late_frames"].shape == (0,)
        off_f, off_g = f["events/offsets"][()], g["events/offsets"][()]
        ind_f, ind_g = f["events/indices"][()], g["events/indices"][()]
        for i in np.flatnonzero(got):  # every frame it sent survived, event for event
            np.testing.assert_array_equal(ind_f[off_f[i]:off_f[i + 1]], ind_g[off_g[i]:off_g[i + 1]])
        assert (np.diff(off_f)[~got] == 0).all()
        dense = np.bincount(np.concatenate([ind_g[off_g[i]:off_g[i + 1]] for i in np.flatnonzero(got)]),
                            minlength=64 * 64).reshape(64, 64)
        np.testing.assert_array_equal(f["results/diffraction_sum"][()], dense)


@pytest.mark.slow
def test_a_worker_stopped_for_15_s_while_the_emulator_streams(client2, tmp_path):
    """SIGSTOP of one worker for 15 s in the middle of an emulated 128 x 128 scan, then
    SIGCONT. Lost: nothing. Survived: the whole scan, dataset by dataset equal to a clean run
    of the same seed; no message rejected."""
    port = free_port_block(1)
    addr = f"tcp://127.0.0.1:{port}"
    cfg = config(tmp_path, timeout_s=5.0)
    cfg.virtual.clear()
    cfg.com.radius_px = None
    cfg.aperture.clear()
    common = [sys.executable, "-m", "stream.cli", "simulate", "--scan", "128x128", "--detector", "128x128",
              "--dose", "100", "--seed", "11", "--bind", addr, "--batch", "64", "--quiet", "--wait", "60",
              "--linger", "60"]  # what is queued to the stopped worker waits for it at the emulator's exit
    with Session([addr], config=cfg, client=client2) as s:
        emulator = subprocess.Popen(common + ["--rate", "4000", "--scan-id", "stall"])
        poll(lambda: frames_of(s, "stall-0000"), lambda v: v and v["frames_received"] >= 2000, timeout_s=120)
        victim, pid = sorted(worker_pids(client2).items())[1]
        t0 = time.monotonic()
        with stopped(pid):
            at_stop = frames_of(s, "stall-0000")["frames_received"]
            time.sleep(15.0)
            during = frames_of(s, "stall-0000")["frames_received"]
            assert frames_of(s, "stall-0000")["state"] == "receiving"
        assert emulator.wait(timeout=300) == 0
        r = s.wait("stall-0000", timeout=300)
        resumed = time.monotonic() - t0 - 15.0
        assert subprocess.run(common + ["--rate", "max", "--scan-id", "clean"], timeout=300).returncode == 0
        c = s.wait("clean-0000", timeout=300)
        rejects = s.rejects()
    assert r.status == "complete" and c.status == "complete", (r.reason, c.reason)
    assert_same_scan(r.path, c.path)
    assert rejects == {}
    print(f"\nworker stopped 15 s: {at_stop} frames counted at the stop, {during} after 15 s "
          f"(the other worker went on), {128 * 128 - during} queued at the stopped worker; file "
          f"{resumed:.1f} s after SIGCONT, complete")


@pytest.mark.slow
def test_with_every_worker_stopped_the_source_blocks_and_nothing_is_dropped(client2, tmp_path):
    """Back-pressure: both workers stopped, a source sends without blocking until every
    receiver's queues are full, then cannot send (PUSH blocks, never drops). Lost: nothing.
    Survived: the whole scan once they resume. Prints how much stopped workers absorb.
    The source is a CURVE server with the key directory's source key, as `stemstream
    simulate` binds: the session's receivers are CURVE clients by default, and a plain PUSH
    never completes a handshake with them (nothing ever arrives)."""
    from stream.security import Gatekeeper, SourceKeys, as_server, source_keys
    from stream.transport.protocol import Geometry, encode_end, encode_frames, encode_start
    g = Geometry((128, 128), (64, 64), mrad_per_px=1.0, convergence_mrad=8.0)  # far more than the queues hold
    rng = np.random.default_rng(5)
    counts = rng.poisson(200, g.n_frames).astype(np.uint32)
    indices = rng.integers(0, 64 * 64, int(counts.sum())).astype(np.uint32)
    off = np.r_[0, np.cumsum(counts)]
    port = free_port_block(1)
    keys = source_keys()
    ctx = zmq.Context()  # its own: one ZAP handler (the Gatekeeper) per context
    gate = Gatekeeper(ctx)
    gate.allow(SourceKeys.DOMAIN, keys.clients)
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 16)
    as_server(push, keys.keypair, SourceKeys.DOMAIN)
    push.bind(f"tcp://127.0.0.1:{port}")
    cfg = config(tmp_path, timeout_s=5.0)
    cfg.virtual.clear()
    cfg.com.radius_px = None
    cfg.aperture.clear()
    batch = 64
    messages = [encode_frames("bp", 0, g, a, counts[a:a + batch], indices[off[a]:off[min(a + batch, g.n_frames)]])
                for a in range(0, g.n_frames, batch)]
    try:
        with Session([f"tcp://127.0.0.1:{port}"], config=cfg, client=client2, console=False) as s:
            wait_for(lambda: len([r for r in s.receivers() if r["silent_s"] < 1]) == 2, 120)
            assert push.poll(60_000, zmq.POLLOUT), f"no receiver reached the source: {s.links()}"
            time.sleep(0.5)  # the other receiver connects too: round-robin spreads
            push.setsockopt(zmq.SNDTIMEO, 120_000)  # receivers that never resume fail the test, not hang it
            push.send_multipart(encode_start("bp", 0, g, {}))
            pids = list(worker_pids(client2).values())
            with stopped(pids[0]), stopped(pids[1]):
                sent, blocked_since = 0, None
                while sent < len(messages):
                    try:
                        push.send_multipart(messages[sent], flags=zmq.NOBLOCK)
                        sent, blocked_since = sent + 1, None
                    except zmq.Again:
                        blocked_since = blocked_since or time.monotonic()
                        if time.monotonic() - blocked_since > 2.0:
                            break
                        time.sleep(0.01)
                absorbed = sent
            assert absorbed < len(messages), "the stopped workers took the whole scan: make it larger"
            for k, m in enumerate(messages[absorbed:] + [encode_end("bp", 0, g.n_frames)]):
                try:
                    push.send_multipart(m)  # blocks until the receivers take more
                except zmq.Again:
                    pytest.fail(f"the resumed receivers took nothing for 120 s ({absorbed + k} of "
                                f"{len(messages)} messages sent): {s.receivers()}, unreached: {s.links()}")
            r = s.wait("bp", timeout=300)
    finally:
        push.close(linger=1000)
        gate.stop()
        ctx.term()
    assert r.status == "complete" and r.events == int(counts.sum())
    mb = sum(len(bytes(memoryview(p))) for m in messages[:absorbed] for p in m) / 1e6
    print(f"\nboth workers stopped: the source blocked after {absorbed} of {len(messages)} messages "
          f"({absorbed * batch} frames, {mb:.1f} MB) queued at the two stopped receivers; none dropped")
