"""Acquisition lifecycle with real detectors (LiberTEM-live issues 35, 63, 90, 167): timeouts
name the address; stale series never reach the next scan; a detector that stops or drops
its connection mid-scan gives a scan finalized with the missing frames named, and the
session goes on.

Played by LiberTEM-live's Merlin simulator where it can (a MIB file whose header promises
more frames than it holds) and by our own emulator (sim_detector/detectors.py) where the
peers' simulators cannot: DectrisSim repeats one series id on every arm and does nothing on
abort, and Merlin's simulator cannot drop a connection mid-acquisition.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace

import h5py
import numpy as np
import pytest

from peer_sims import merlin_sim
from sim_detector.detectors import DectrisEmulator, MerlinEmulator, _Scan
from stream.config import DetectorSpec, PipelineConfig, validate
from stream.session import Session
from stream.sources import mib
from stream.sources.base import DetectorError
from stream.transport.net import free_port_block

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def random_scan(scan_id, n, shape, seed, dose=30) -> tuple[_Scan, np.ndarray]:
    """Events of n frames and their dense reference (n, h, w)."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(dose, n).astype(np.uint32)
    indices = rng.integers(0, shape[0] * shape[1], int(counts.sum())).astype(np.uint32)
    frame = np.repeat(np.arange(n), counts)
    dense = np.bincount(frame * shape[0] * shape[1] + indices, minlength=n * shape[0] * shape[1])
    return _Scan(scan_id, counts, indices, shape, {}), dense.reshape(n, *shape)


def config(tmp_path, det: DetectorSpec, timeout_s=10.0) -> PipelineConfig:
    cfg = PipelineConfig(detector=det)
    return validate(replace(cfg, output=replace(cfg.output, dir=str(tmp_path / "out"), previews=False),
                            scan=replace(cfg.scan, timeout_s=timeout_s)))


def events_of(path) -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(path) as f:
        return f["events/offsets"][:], f["events/indices"][:]


def assert_events_equal(path, dense):
    offsets, indices = events_of(path)
    flat = dense.reshape(len(dense), -1)
    np.testing.assert_array_equal(np.diff(offsets), flat.sum(axis=1))
    np.testing.assert_array_equal(indices, np.concatenate([np.repeat(np.arange(flat.shape[1]), r) for r in flat]))


# ------------------------------------------------------------------ timeouts: one line, the address

def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "stream.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_arm_timeout_is_one_line_naming_the_dcu(tmp_path):
    """A DCU that accepts the connection and never answers: the REST call times out, and
    the command says so in one line with the address, before any worker started."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    (tmp_path / "p.toml").write_text("[detector]\nrequest_timeout_s = 1.0\n")
    try:
        t0 = time.monotonic()
        r = run_cli("process", "--detector", "dectris", "--dcu", f"http://127.0.0.1:{port}", "--scan", "4x4",
                    "--mode", "active", "--config", str(tmp_path / "p.toml"), "--out", str(tmp_path / "o"))
        elapsed = time.monotonic() - t0
    finally:
        silent.close()
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and f"http://127.0.0.1:{port}" in lines[0] and "did not answer" in lines[0], lines
    assert "Traceback" not in r.stderr and elapsed < 60


def test_merlin_control_refused_is_one_line(tmp_path):
    port = free_port_block(1)
    r = run_cli("process", "--detector", "merlin", "--connect", "tcp://127.0.0.1:1", "--control",
                f"tcp://127.0.0.1:{port}", "--scan", "4x4", "--mode", "active", "--out", str(tmp_path / "o"))
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and f"tcp://127.0.0.1:{port}" in lines[0], r.stderr


def test_detector_flags_need_a_detector():
    r = run_cli("process", "--dcu", "http://127.0.0.1:8910")
    assert r.returncode == 2 and "--dcu needs --detector dectris or merlin" in r.stderr


@pytest.mark.peers
def test_dectris_stream_that_never_connects_is_one_line_naming_it():
    """A wrong stream port is silent in ZeroMQ (it retries for ever): the source says once,
    after its grace, which address it cannot reach and what to check; then, once, that it
    connected. Its ``connected`` answer (what the session waits for before arming) is False
    until then."""
    import zmq

    from stream.sources.base import SourcePlan
    from stream.sources.dectris import DectrisSource

    port = free_port_block(1)
    src = DectrisSource(SourcePlan("dectris", (4, 4), f"tcp://127.0.0.1:{port}"), "w0")
    src.connect_grace_s = 0.5
    notes = []
    ctx = zmq.Context.instance()
    src.open(ctx, lambda *a: None, notes.append)
    try:
        deadline = time.monotonic() + 10
        while not notes and time.monotonic() < deadline:
            src.receive(50)
        assert len(notes) == 1, notes
        assert src.command("connected") is False
        assert notes[0].startswith(f"WARNING: DECTRIS stream tcp://127.0.0.1:{port}: not connected after 0.5 s "
                                   "(worker w0); check the DCU's stream address"), notes
        for _ in range(10):
            src.receive(20)
        assert len(notes) == 1, notes  # said once
        push = ctx.socket(zmq.PUSH)  # the stream comes up
        push.bind(f"tcp://127.0.0.1:{port}")
        try:
            while len(notes) < 2 and time.monotonic() < deadline:
                src.receive(50)
            while not src.command("connected") and time.monotonic() < deadline:  # the handshake follows
                src.receive(50)
            assert src.command("connected") is True
        finally:
            push.close(0)
        assert notes[1:] == [f"DECTRIS stream tcp://127.0.0.1:{port} connected (worker w0)"], notes
    finally:
        src.close()


@pytest.mark.peers
def test_dectris_source_reads_nothing_once_held_until_told_the_series():
    """Active mode, the same series id armed again (LiberTEM-live's DectrisSim replays one
    dump): the session holds the sources, arms, then tells them the new scan id. A source
    already waiting for messages when the hold came must not read the new series' header and
    images under the previous scan's id (they were rejected as late, and the new scan lost
    its start); it reads them only after ``expect``, as the new scan."""
    import zmq

    from stream.sources.base import SourcePlan
    from stream.sources.dectris import DectrisSource
    from stream.sources.simplon import detector_config, end_part, header_parts, image_parts

    port = free_port_block(1)
    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDTIMEO, 10_000)  # a lost connection fails the test, not hangs it
    push.bind(f"tcp://127.0.0.1:{port}")
    src = DectrisSource(SourcePlan("dectris", (1, 2), f"tcp://127.0.0.1:{port}", mode="active", prefix="p"), "w0")
    src.open(ctx, lambda *a: None, lambda n: None)
    frames = np.ones((2, 4, 4), np.uint16)
    acquisition = [header_parts(1, detector_config(2, (4, 4), np.dtype(np.uint16), "exte", "none"))]
    acquisition += [image_parts(1, i, f, "none") for i, f in enumerate(frames)] + [[end_part(1)]]
    try:
        src.command("expect", 1, "p-1")
        deadline = time.monotonic() + 10
        while not src.command("connected") and time.monotonic() < deadline:  # the stream is up
            src.receive(50)
        got = []
        waiting = threading.Thread(target=lambda: got.extend(src.receive(3000)))
        waiting.start()  # the source waits in its poll
        time.sleep(0.3)
        src.command("hold")  # the session is about to arm: series 1 again
        for parts in acquisition:
            push.send_multipart(parts)
        waiting.join()
        assert got == [], [m.kind for m in got]
        src.command("expect", 1, "p-1.1")
        while not any(m.kind == "end" for m in got) and time.monotonic() < deadline:
            got += src.receive(100)
        assert [(m.kind, m.scan_id) for m in got] == [("start", "p-1.1"), ("dense", "p-1.1"),
                                                      ("dense", "p-1.1"), ("end", "p-1.1")]
    finally:
        src.close()
        push.close(0)


def test_trigger_timeout_names_the_data_address(tmp_path, client2):
    """Merlin armed for an external trigger that never comes: acquire() fails naming the
    data address after [detector] trigger_timeout_s, and the session can go on."""
    pytest.importorskip("libertem_live")
    frames = np.zeros((20, 256, 256), np.uint8)
    hdr, _ = mib.write_mib(str(tmp_path / "t"), frames, 1, True, (4, 5))
    with merlin_sim(hdr, (4, 5)) as sim:
        det = DetectorSpec(kind="merlin", scan=[4, 5], data=sim.data, control=sim.control, mode="active",
                           trigger_mode="external", trigger_timeout_s=2.0)
        with Session([], config=config(tmp_path, det), client=client2, console=False) as s:
            with pytest.raises(DetectorError, match=f"no frame arrived on {sim.data} within 2 s"):
                s.acquire(timeout=30)


# ------------------------------------------------------------------ a detector that stops mid-scan

@pytest.mark.peers
def test_merlin_that_stops_mid_scan_names_the_missing_frames(tmp_path, client2):
    """LiberTEM-live's simulator serves a header promising 120 frames and only 90 follow:
    after the gap timeout the scan is finalized as aborted, frames 90-119 named missing, and
    the 90 that came are exact."""
    pytest.importorskip("libertem_live")
    rng = np.random.default_rng(4)
    frames = np.minimum(rng.poisson(0.001, (90, 256, 256)), 4095).astype(np.uint16)
    hdr, _ = mib.write_mib(str(tmp_path / "short"), frames, 12, False, (9, 10))
    text = open(hdr, "rb").read().replace(b"Frames in Acquisition (Number):\t90",
                                          b"Frames in Acquisition (Number):\t120")
    open(hdr, "wb").write(text)
    with merlin_sim(hdr, (9, 10)) as sim:
        det = DetectorSpec(kind="merlin", scan=[12, 10], data=sim.data, control=sim.control, mode="active",
                           gap_timeout_s=1.0)
        with Session([], config=config(tmp_path, det), client=client2, console=False) as s:
            r = s.acquire(timeout=120)
    assert r.status == "incomplete" and r.n_missing == 30, r.reason
    assert r.missing_ranges == [[90, 120]] or [list(x) for x in r.missing_ranges] == [[90, 120]]
    assert "90 of 120 frames" in r.reason, r.reason
    offsets, indices = events_of(r.path)
    flat = frames.reshape(90, -1)
    np.testing.assert_array_equal(np.diff(offsets)[:90], flat.sum(axis=1))
    assert np.diff(offsets)[90:].sum() == 0


# ------------------------------------------------------------------ stale series, lost connections

def test_stale_series_never_reaches_the_next_scan(tmp_path, client2):
    """Series 1 is armed while no one reads and aborted on the DCU; its images wait in the
    sockets. The session then arms series 2: every message of series 1 is dropped as
    stale (counted), and the scan holds exactly series 2's electrons."""
    shape = (48, 64)
    api, stream = free_port_block(1), free_port_block(1)
    dcu = DectrisEmulator(f"http://127.0.0.1:{api}", f"tcp://127.0.0.1:{stream}", shape, "bslz4", sndhwm=100)
    stale, _ = random_scan("stale", 40, shape, seed=1)
    scan, dense = random_scan("good", 30, shape, seed=2)

    def detector():
        for job in (stale, scan):
            if dcu.wait_armed():
                dcu.send_scan(job)
    t = threading.Thread(target=detector, daemon=True)
    t.start()
    try:
        assert dcu.start_self() == 1  # someone arms series 1 before the session reads
        det = DetectorSpec(kind="dectris", scan=[5, 6], dcu=dcu.api, data=f"tcp://127.0.0.1:{stream}",
                           mode="active")
        with Session([], config=config(tmp_path, det), client=client2, console=False) as s:
            time.sleep(1.0)  # the workers connect (and hold): series 1 fills their queues
            dcu.rest("PUT", "/detector/api/1.8.0/command/abort", None)
            t_end = time.monotonic() + 30
            while dcu.state != "idle" and time.monotonic() < t_end:
                time.sleep(0.1)
            r = s.acquire(timeout=60)
            status = s.status()
            rejects = s.rejects()
    finally:
        dcu.close()
    assert r.status == "complete", r.reason
    assert r.scan_id.endswith("-2") and [st["scan_id"] for st in status] == [r.scan_id]
    assert rejects.get("stale_series", 0) >= 1, rejects
    assert_events_equal(r.path, dense)


def test_merlin_disconnect_mid_scan_then_reconnect(tmp_path, client2):
    """Our Merlin emulator drops its data connection in the middle of an acquisition: the
    scan ends as aborted with the frames that never came named; the leader reconnects and
    the next acquisition is complete and exact, in the same session."""
    ctl, data = free_port_block(1), free_port_block(1)
    merlin = MerlinEmulator(f"tcp://127.0.0.1:{ctl}", f"tcp://127.0.0.1:{data}", (256, 256), bits=12)
    first, _ = random_scan("a", 60, (256, 256), seed=3)
    first.metadata["scan_shape"] = (6, 10)
    second, dense = random_scan("b", 60, (256, 256), seed=4)
    second.metadata["scan_shape"] = (6, 10)
    stop = threading.Event()

    def detector():
        for job, cut in ((first, 25), (second, None)):  # the cable goes after 25 frames
            merlin.accept_data(stop)
            if not merlin.wait_started(stop):
                return
            merlin.send_scan(job, drop_after=cut)
    t = threading.Thread(target=detector, daemon=True)
    t.start()
    try:
        det = DetectorSpec(kind="merlin", scan=[6, 10], data=merlin.data, control=merlin.control, mode="active")
        with Session([], config=config(tmp_path, det), client=client2, console=False) as s:
            r1 = s.acquire(timeout=60)
            r2 = s.acquire(timeout=60)
    finally:
        stop.set()
        merlin.close()
    assert r1.status == "incomplete" and r1.n_missing == 35, r1.reason
    assert "connection lost" in r1.reason and "after 25 of 60 frames" in r1.reason, r1.reason
    assert r2.status == "complete", r2.reason
    assert_events_equal(r2.path, dense)
