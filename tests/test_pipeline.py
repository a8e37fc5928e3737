"""The streaming core end to end on a real dask cluster: a scripted detector (real PUSH
sockets in this process) → receivers in separate worker processes → scan files.

Every expected number comes from a dense numpy computation over the same events."""

from __future__ import annotations

import time

import h5py
import numpy as np
import pytest

from conftest import dense_scan
from stream.config import (ApertureSpec, ChunkingSpec, ComSpec, LiveSpec, MemorySpec, OutputSpec,
                           PipelineConfig, ScanSpec, VirtualSpec, validate)
from stream.transport.protocol import Geometry
from stream.session import Session

GEOM = Geometry((12, 10), (40, 36), frames_per_position=2, flyback=1,
                mrad_per_px=0.5, convergence_mrad=4.0, center=(19.5, 17.5))
BF_R, ADF_IN, ADF_OUT, COM_R = 8.0, 12.0, 18.0, 10.0
APERTURE = (2, 7, 3, 9)


def synthetic_events(geometry, seed=0, dose=40):
    """Electron events with contrast: a bright-field disk whose centre and intensity vary over
    the scan, plus a diffuse background."""
    rng = np.random.default_rng(seed)
    h, w = geometry.frame_shape
    n = geometry.n_frames
    counts = rng.poisson(dose, n).astype(np.uint32)
    counts[rng.choice(n, 6, replace=False)] = 0
    total = int(counts.sum())
    frame_of = np.repeat(np.arange(n), counts)
    shift = np.sin(frame_of / 17.0) * 3
    inner = rng.random(total) < 0.7
    r = np.sqrt(rng.random(total)) * BF_R
    t = rng.random(total) * 2 * np.pi
    y = np.where(inner, 19.5 + shift + r * np.sin(t), rng.random(total) * h)
    x = np.where(inner, 17.5 - shift + r * np.cos(t), rng.random(total) * w)
    y = np.clip(np.round(y), 0, h - 1).astype(np.int64)
    x = np.clip(np.round(x), 0, w - 1).astype(np.int64)
    return counts, (y * w + x).astype(np.uint32)


def emulated_events(seed=0, dose=40):
    """Events of the detector emulator for GEOM: an MgO slab, 4 mrad probe, 0.5 mrad/px."""
    from sim_detector.simulate import Beam, Detector, ScanSpec, simulate_scan
    from sim_detector.specimens import make_specimen
    sim = simulate_scan(make_specimen("mgo", seed=seed),
                        Beam(convergence_mrad=GEOM.convergence_mrad, dose=dose),
                        Detector(shape=GEOM.frame_shape, mrad_per_px=GEOM.mrad_per_px),
                        ScanSpec(shape=GEOM.scan_shape, frames_per_position=GEOM.frames_per_position,
                                 flyback=GEOM.flyback), seed=seed, with_expected=False)
    assert (sim.scan_shape, sim.frame_shape) == (GEOM.scan_shape, GEOM.frame_shape)
    return sim.counts, sim.indices


def reference(counts, indices, geometry, keep=None, weights=None):
    """Every result the pipeline must produce, computed densely in plain numpy."""
    d = dense_scan(counts, indices, geometry, keep)  # (ny, nx, h, w)
    h, w = geometry.frame_shape
    yy, xx = np.mgrid[0:h, 0:w]
    rr = np.hypot(yy - 19.5, xx - 17.5)
    ref = {"bf": (d * (rr <= BF_R)).sum((2, 3)),
           "adf": (d * ((rr >= ADF_IN) & (rr < ADF_OUT))).sum((2, 3)),
           "diffraction_sum": d.sum((0, 1)),
           "aperture_grain": d[APERTURE[0]:APERTURE[1], APERTURE[2]:APERTURE[3]].sum((0, 1))}
    inside = rr <= COM_R
    n = (d * inside).sum((2, 3))
    ref["com_n"] = n
    ref["com_sum_y"] = (d * inside * yy).sum((2, 3))
    ref["com_sum_x"] = (d * inside * xx).sum((2, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        ref["com_y"] = ref["com_sum_y"] / n - 19.5
        ref["com_x"] = ref["com_sum_x"] / n - 17.5
    if weights is not None:
        ref["weighted"] = (d * weights).sum((2, 3))
    return ref


def config(tmp_path, weights=None, **changes):
    virtual = [VirtualSpec(name="bf", shape="disk", radius_px=BF_R),
               VirtualSpec(name="adf", shape="annulus", inner_mrad=ADF_IN * 0.5, outer_mrad=ADF_OUT * 0.5)]
    if weights is not None:
        np.save(tmp_path / "weights.npy", weights)
        virtual.append(VirtualSpec(name="weighted", shape="masks", file="weights.npy"))
    cfg = PipelineConfig(virtual=virtual, com=ComSpec(radius_px=COM_R),
                         aperture=[ApertureSpec(name="grain", rect=list(APERTURE))],
                         chunking=ChunkingSpec(max_frames=64, max_latency_ms=20),
                         scan=ScanSpec(timeout_s=changes.pop("timeout_s", 3.0)),
                         output=OutputSpec(dir=str(tmp_path / "out"), previews=changes.pop("previews", False)),
                         live=LiveSpec(rate_hz=changes.pop("live_rate", 0.0), publish=changes.pop("publish", None)),
                         memory=changes.pop("memory", MemorySpec()))
    assert not changes
    return validate(cfg, base=tmp_path)


def assert_matches(result, ref, path=None):
    for name, expected in ref.items():
        got = result.results[name]
        if np.issubdtype(np.asarray(expected).dtype, np.integer):
            np.testing.assert_array_equal(got, expected, err_msg=name)
        else:
            np.testing.assert_allclose(got, expected, rtol=1e-6, err_msg=name, equal_nan=True)
    if path is not None:  # the file holds exactly what the session returned
        with h5py.File(path, "r") as f:
            for name in ref:
                np.testing.assert_array_equal(f["results"][name][()], result.results[name])


def poll(get, done, timeout_s=20):
    """get() once done(get()) holds, or whatever it is after timeout_s (then the assert fails)."""
    deadline = time.monotonic() + timeout_s
    value = get()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(0.05)
        value = get()
    return value


def stored_events(path):
    with h5py.File(path, "r") as f:
        return f["events/offsets"][()], f["events/indices"][()]


def expected_stored(counts, indices, geometry, keep=None):
    """Per stored frame (position·fpp + k) the sorted events, flyback frames dropped."""
    off = np.r_[0, np.cumsum(counts)]
    ny, nxr = geometry.raster_shape
    fpp, nx = geometry.frames_per_position, geometry.scan_shape[1]
    out = []
    for f in range(geometry.n_frames):
        col = (f // fpp) % nxr
        if col >= nx:
            continue
        ev = indices[off[f]:off[f + 1]] if keep is None or keep[f] else indices[:0]
        out.append(np.sort(ev))
    return out


def assert_events_stored(path, counts, indices, geometry, keep=None):
    offsets, idx = stored_events(path)
    want = expected_stored(counts, indices, geometry, keep)
    assert len(offsets) == len(want) + 1
    for i, ev in enumerate(want):
        np.testing.assert_array_equal(idx[offsets[i]:offsets[i + 1]], ev)


# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_sources", [1, 2, 4])
def test_exact_with_two_workers(client2, scripted_source, tmp_path, n_sources):
    counts, indices = emulated_events(seed=n_sources)
    weights = np.random.default_rng(5).random(GEOM.frame_shape)
    src = scripted_source(n_sources)
    with Session(src.addresses, config=config(tmp_path, weights), client=client2, console=False) as s:
        src.wait_for_receivers()
        src.start("exact", GEOM, {"beam_energy_keV": 300.0})
        rng = np.random.default_rng(1)
        src.frames("exact", GEOM, counts, indices, batch=5, order=rng.permutation)  # any order
        src.end("exact", GEOM.n_frames)
        r = s.wait("exact", timeout=60)
    assert r.status == "complete", r.reason
    assert r.frames_received == GEOM.n_frames and not r.missing_frames
    assert r.events == int(counts.sum() - counts.reshape(12, 11, 2)[:, 10].sum())  # flyback dropped
    assert r.results["adf"].sum() > 0 and r.results["bf"].sum() > 0  # the emulator gives contrast
    assert_matches(r, reference(counts, indices, GEOM, weights=weights), r.path)
    assert_events_stored(r.path, counts, indices, GEOM)
    with h5py.File(r.path, "r") as f:
        assert f.attrs["status"] == "complete"
        assert f["metadata"].attrs["beam_energy_keV"] == 300.0
        assert f["completeness/received"].shape == (n_sources, GEOM.n_frames)
        assert (f["completeness/received"][()] == 1).all()


def test_exact_with_one_and_three_workers(client_1_or_3, scripted_source, tmp_path):
    counts, indices = emulated_events(seed=11)
    src = scripted_source(4)
    n_workers = len(client_1_or_3.scheduler_info()["workers"])
    with Session(src.addresses, config=config(tmp_path), client=client_1_or_3, console=False) as s:
        src.wait_for_receivers()
        src.start("exact3", GEOM)
        src.frames("exact3", GEOM, counts, indices, batch=3)
        src.end("exact3", GEOM.n_frames)
        r = s.wait("exact3", timeout=60)
    assert r.status == "complete", r.reason
    assert_matches(r, reference(counts, indices, GEOM), r.path)
    assert_events_stored(r.path, counts, indices, GEOM)
    assert len(s.workers) == n_workers


def test_duplicated_frames_are_counted_once(client2, scripted_source, tmp_path):
    counts, indices = synthetic_events(GEOM, seed=3)
    src = scripted_source(2)
    dup = list(range(40, 52)) + [100]
    with Session(src.addresses, config=config(tmp_path), client=client2, console=False) as s:
        src.wait_for_receivers()
        src.start("dups", GEOM)
        src.frames("dups", GEOM, counts, indices, batch=4)
        for _ in range(3):  # resent copies spread over both receivers (round-robin)
            src.frames("dups", GEOM, counts, indices, batch=1, only=dup)
        src.end("dups", GEOM.n_frames)
        r = s.wait("dups", timeout=60)
    assert r.duplicated_frames == dup
    assert r.status == "complete" and not r.missing_frames
    assert_matches(r, reference(counts, indices, GEOM), r.path)
    assert_events_stored(r.path, counts, indices, GEOM)
    with h5py.File(r.path, "r") as f:
        received = f["completeness/received"][()]
    np.testing.assert_array_equal(received[:, dup], 4)


def test_spilled_events_written_block_by_block_equal_the_reference(client2, scripted_source, tmp_path):
    """Receivers keeping at most 10 kB of events in memory (the rest in their spill files),
    the file written in blocks of ~1000 events, frames duplicated over both workers: the
    results, the stored events and the completeness equal the reference all the same."""
    counts, indices = emulated_events(seed=8)
    src = scripted_source(2)
    dup = [7, 30, 31, 200]
    cfg = config(tmp_path, memory=MemorySpec(events_in_memory_mb=0.01, write_block_mb=0.004))
    with Session(src.addresses, config=cfg, client=client2, console=False) as s:
        src.wait_for_receivers()
        src.start("spilled", GEOM)
        src.frames("spilled", GEOM, counts, indices, batch=3, order=np.random.default_rng(2).permutation)
        src.frames("spilled", GEOM, counts, indices, batch=1, only=dup)
        src.end("spilled", GEOM.n_frames)
        r = s.wait("spilled", timeout=60)
    assert r.status == "complete", r.reason
    assert r.duplicated_frames == dup
    assert int(counts.sum()) > 10 * 1000  # more than ten blocks
    assert_matches(r, reference(counts, indices, GEOM), r.path)
    assert_events_stored(r.path, counts, indices, GEOM)
    with h5py.File(r.path, "r") as f:
        np.testing.assert_array_equal(f["completeness/received"][()][:, dup], 2)


def test_missing_frames_are_named_and_scan_closes_on_timeout(client2, scripted_source, tmp_path, capsys):
    counts, indices = synthetic_events(GEOM, seed=4)
    src = scripted_source(2)
    sent = np.setdiff1d(np.arange(GEOM.n_frames), np.r_[17:29, 200:GEOM.n_frames])
    with Session(src.addresses, config=config(tmp_path, timeout_s=1.5), client=client2) as s:
        src.wait_for_receivers()
        src.start("lost", GEOM)
        src.frames("lost", GEOM, counts, indices, only=sent)  # then the detector goes silent
        t0 = time.monotonic()
        r = s.wait("lost", timeout=60)
        waited = time.monotonic() - t0
    assert 1.0 < waited < 30
    keep = np.zeros(GEOM.n_frames, bool)
    keep[sent] = True
    assert r.status == "incomplete" and "no message" in r.reason
    assert r.missing_frames == sorted(set(range(GEOM.n_frames)) - set(sent.tolist()))
    assert_matches(r, reference(counts, indices, GEOM, keep=keep), r.path)
    assert_events_stored(r.path, counts, indices, GEOM, keep=keep)
    with h5py.File(r.path, "r") as f:
        assert f.attrs["status"] == "incomplete"
        np.testing.assert_array_equal(f["completeness/missing_frames"][()], r.missing_frames)
    out = capsys.readouterr().out
    assert f"frames never arrived: 17-28, 200-{GEOM.n_frames - 1}" in out


def test_abort_closes_the_scan_at_once(client2, scripted_source, tmp_path):
    counts, indices = synthetic_events(GEOM, seed=6)
    src = scripted_source(1)
    with Session(src.addresses, config=config(tmp_path, timeout_s=60), client=client2, console=False) as s:
        src.wait_for_receivers()
        src.start("stopped", GEOM)
        src.frames("stopped", GEOM, counts, indices, only=range(50))
        src.abort("stopped", "beam blanked by the operator")
        r = s.wait("stopped", timeout=20)  # long before the 60 s timeout
    assert r.status == "incomplete" and "beam blanked" in r.reason
    assert r.frames_received == 50


def test_bad_messages_are_counted_and_change_nothing(client2, scripted_source, tmp_path):
    import msgpack

    from stream.transport.protocol import encode_frames
    counts, indices = synthetic_events(GEOM, seed=8)
    src = scripted_source(1)
    good = encode_frames("good", 0, GEOM, 0, counts[:2], indices[:int(counts[:2].sum())])
    header = msgpack.unpackb(good[0])

    def with_header(**changes):
        h = {k: v for k, v in {**header, **changes}.items() if v is not None}
        return [msgpack.packb(h)] + [bytes(memoryview(x)) for x in good[1:]]
    bad = {
        "not_msgpack": [np.random.default_rng(0).bytes(100)],
        "not_msgpack ": [b"\xc1\xc1 broken", b"", b""],
        "wrong_parts": [bytes(memoryview(good[0]))],
        "event_mismatch": [bytes(memoryview(good[0])), bytes(memoryview(good[1])), b"\x00" * 4],
        "index_out_of_range": with_header()[:2] + [np.full(int(counts[:2].sum()), 40 * 36, np.uint32).tobytes()],
        "unknown_kind": with_header(kind="telemetry"),
        "bad_version": with_header(proto="stemstream/9"),
        "missing_geometry": with_header(scan_shape=None, frame_shape=None),
    }
    with Session(src.addresses, config=config(tmp_path), client=client2, console=False) as s:
        src.wait_for_receivers()
        src.start("good", GEOM)
        for parts in bad.values():  # interleaved with the good scan's frames
            src.send(0, parts)
        src.frames("good", GEOM, counts, indices)
        for parts in bad.values():
            src.send(0, parts)
        src.end("good", GEOM.n_frames)
        r = s.wait("good", timeout=60)
        poll(s.rejects, lambda v: sum(v.values()) >= 2 * len(bad))  # (was +2: it always waited 20 s)
        time.sleep(0.5)  # any reject beyond the expected ones would show now
        rejects = s.rejects()
    assert r.status == "complete"
    assert_matches(r, reference(counts, indices, GEOM), r.path)
    expected = {}
    for reason in bad:
        expected[reason.strip()] = expected.get(reason.strip(), 0) + 2
    assert rejects == expected


def test_overlapping_and_back_to_back_scans_equal_scans_alone(client2, scripted_source, tmp_path):
    a = synthetic_events(GEOM, seed=21)
    b = synthetic_events(GEOM, seed=22)
    src = scripted_source(2)
    with Session(src.addresses, config=config(tmp_path), client=client2, console=False) as s:
        src.wait_for_receivers()
        src.start("scan-a", GEOM)
        src.start("scan-b", GEOM)
        for lo in range(0, GEOM.n_frames, 20):  # interleaved: both scans in flight at once
            src.frames("scan-a", GEOM, *a, only=range(lo, min(lo + 20, GEOM.n_frames)))
            src.frames("scan-b", GEOM, *b, only=range(lo, min(lo + 20, GEOM.n_frames)))
        src.end("scan-a", GEOM.n_frames)
        src.end("scan-b", GEOM.n_frames)
        src.start("scan-c", GEOM)  # back to back, no gap
        src.frames("scan-c", GEOM, *a)
        src.end("scan-c", GEOM.n_frames)
        ra, rb, rc = (s.wait(sid, timeout=60) for sid in ("scan-a", "scan-b", "scan-c"))
        # a stale message of a closed scan is rejected and changes nothing
        src.frames("scan-a", GEOM, *b, only=range(10))
        assert poll(s.rejects, lambda v: v.get("late", 0) >= 2).get("late") == 2  # one per source
    for r, ev in ((ra, a), (rb, b), (rc, a)):
        assert r.status == "complete"
        assert_matches(r, reference(*ev, GEOM), r.path)
    with h5py.File(ra.path, "r") as f:
        np.testing.assert_array_equal(f["results/bf"][()], reference(*a, GEOM)["bf"])


def test_live_results_fill_in_while_the_scan_runs(client2, scripted_source, tmp_path):
    import zmq

    from stream.security import as_client, viewer_keys
    from stream.transport import control
    from stream.transport.net import free_port_block
    counts, indices = synthetic_events(GEOM, seed=9)
    src = scripted_source(1)
    pub = f"tcp://127.0.0.1:{free_port_block(1)}"
    cfg = config(tmp_path, live_rate=10.0, publish=pub)
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    as_client(sub, viewer_keys())  # the live channel lets in the key directory's viewer
    with Session(src.addresses, config=cfg, client=client2, console=False) as s:
        sub.connect(pub)
        src.wait_for_receivers()
        src.start("live", GEOM)
        half = GEOM.n_frames // 2
        src.frames("live", GEOM, counts, indices, only=range(half))
        partial = {}
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                partial = s.live("live")
            except KeyError:  # the coordinator has not seen the scan's start yet
                partial = {}
            if partial and partial["bf"].sum() == reference(counts, indices, GEOM, keep=np.arange(GEOM.n_frames) < half)["bf"].sum():
                break
            time.sleep(0.1)
        keep = np.arange(GEOM.n_frames) < half
        np.testing.assert_array_equal(partial["bf"], reference(counts, indices, GEOM, keep=keep)["bf"])
        header, arrays = None, {}
        while sub.poll(5000):  # the PUB channel carries the same partial images
            header, arrays = control.decode(sub.recv_multipart())
            if header["kind"] == "live" and np.array_equal(arrays["bf"], partial["bf"]):
                break
        assert header["proto"] == "stemstream-live/1" and header["scan_id"] == "live"
        assert header["frames_received"] == half
        np.testing.assert_array_equal(arrays["bf"], partial["bf"])
        src.frames("live", GEOM, counts, indices, only=range(half, GEOM.n_frames))
        src.end("live", GEOM.n_frames)
        r = s.wait("live", timeout=60)
        while sub.poll(5000):
            header, _ = control.decode(sub.recv_multipart())
            if header["kind"] == "done":
                break
    sub.close(0)
    assert header["kind"] == "done" and header["path"] == str(r.path)
    assert_matches(r, reference(counts, indices, GEOM))


def test_one_aperture_per_grain_of_the_cluster_specimen(client2, scripted_source, tmp_path):
    """The crystallographer's case: a real-space aperture drawn over each crystal of the
    emulated `cluster` (from the truth's grain map, as .npy mask files) gives exactly the
    summed pattern of that crystal's probe positions, computed here in plain numpy."""
    from test_sim_cluster import ALPHA, H, MRAD_PER_PX, W, aperture_pattern

    from sim_detector.simulate import Beam, Detector, ScanSpec, simulate_scan
    from sim_detector.specimens import make_specimen
    spec = make_specimen("cluster", seed=0)
    sim = simulate_scan(spec, Beam(dose=100.0, convergence_mrad=ALPHA),
                        Detector(shape=(H, W), mrad_per_px=MRAD_PER_PX), ScanSpec(shape=(24, 24)),
                        seed=2, with_expected=False)
    g = Geometry(sim.scan_shape, sim.frame_shape, mrad_per_px=MRAD_PER_PX, convergence_mrad=ALPHA)
    grain_map = sim.truth.grain_map
    names = []
    for k in range(len(spec.grains)):
        if (grain_map == k).sum():
            np.save(tmp_path / f"grain{k}.npy", grain_map == k)
            names.append(k)
    cfg = PipelineConfig(aperture=[ApertureSpec(name=f"grain{k}", file=f"grain{k}.npy") for k in names],
                         output=OutputSpec(dir=str(tmp_path / "out"), previews=False))
    cfg = validate(cfg, base=tmp_path)
    src = scripted_source(4)
    with Session(src.addresses, config=cfg, client=client2, console=False) as s:
        src.wait_for_receivers()
        src.start("cluster", g)
        src.frames("cluster", g, sim.counts, sim.indices, batch=32)
        src.end("cluster", g.n_frames)
        r = s.wait("cluster", timeout=60)
    assert r.status == "complete" and len(names) >= 3
    for k in names:
        np.testing.assert_array_equal(r.results[f"aperture_grain{k}"], aperture_pattern(sim, grain_map == k))


def test_a_scan_the_configuration_cannot_process_fails_with_the_reason(client2, scripted_source, tmp_path, capsys):
    counts, indices = synthetic_events(GEOM, seed=12)
    uncalibrated = Geometry(GEOM.scan_shape, GEOM.frame_shape, GEOM.frames_per_position, flyback=GEOM.flyback)
    cfg = config(tmp_path, timeout_s=1.0)  # its adf is given in mrad
    src = scripted_source(1)
    with Session(src.addresses, config=cfg, client=client2) as s:
        src.wait_for_receivers()
        src.start("nocal", uncalibrated)
        src.frames("nocal", uncalibrated, counts, indices)
        src.end("nocal", uncalibrated.n_frames)
        r = s.wait("nocal", timeout=30)
    assert r.status == "failed" and r.path is None
    assert "mrad_per_px" in r.reason and "virtual detector 'adf'" in r.reason
    out = capsys.readouterr().out
    assert "ERROR [nocal]" in out and "set [detector] mrad_per_px" in out


def test_an_empty_scan_is_written_and_says_so(client2, scripted_source, tmp_path):
    src = scripted_source(2)
    with Session(src.addresses, config=config(tmp_path), client=client2, console=False) as s:
        src.wait_for_receivers()
        src.start("empty", GEOM, {"note": list(range(20_000))})  # and metadata too big for an attribute
        src.abort("empty", "beam blanked")
        r = s.wait("empty", timeout=30)
    assert r.status == "incomplete" and "beam blanked" in r.reason
    assert r.events == 0 and r.n_missing == GEOM.n_frames
    with h5py.File(r.path, "r") as f:
        assert f["events/indices"].shape == (0,) and f.attrs["status"] == "incomplete"
        np.testing.assert_array_equal(f["metadata/note"][()], np.arange(20_000))
        assert (f["results/bf"][()] == 0).all()


def test_closing_the_session_writes_the_scans_still_running(client2, scripted_source, tmp_path):
    counts, indices = synthetic_events(GEOM, seed=13)
    src = scripted_source(1)
    s = Session(src.addresses, config=config(tmp_path, timeout_s=60), client=client2, console=False).start()
    src.wait_for_receivers()
    src.start("running", GEOM)
    src.frames("running", GEOM, counts, indices, only=range(100))
    poll(s.status, lambda v: v and v[0]["frames_received"] == 100)
    s.close()
    r = s.results["running"]
    keep = np.arange(GEOM.n_frames) < 100
    assert r.status == "incomplete" and "stopped" in r.reason
    assert_matches(r, reference(counts, indices, GEOM, keep=keep), r.path)


def test_a_worker_that_joins_later_receives_too(scripted_source, tmp_path):
    from conftest import _cluster
    cluster, client = _cluster(1)
    try:
        a, b = synthetic_events(GEOM, seed=14), synthetic_events(GEOM, seed=15)
        src = scripted_source(1)
        with Session(src.addresses, config=config(tmp_path), client=client, console=False) as s:
            src.wait_for_receivers()
            src.start("one", GEOM)
            src.frames("one", GEOM, *a, batch=4)
            src.end("one", GEOM.n_frames)
            assert s.wait("one", timeout=60).status == "complete"
            cluster.scale(2)
            client.wait_for_workers(2)
            # its receiver compiles its kernels, connects to the source and says so (heartbeat)
            assert len(poll(s.receivers, lambda v: len([r for r in v if r["silent_s"] < 1]) == 2,
                            timeout_s=120)) == 2
            time.sleep(0.2)  # the source's side of the connection
            src.start("two", GEOM)
            src.frames("two", GEOM, *b, batch=4)
            src.end("two", GEOM.n_frames)
            r = s.wait("two", timeout=60)
            receivers = [st["worker_events"] for st in s.status() if st["scan_id"] == "two"][0]
        assert r.status == "complete"
        assert_matches(r, reference(*b, GEOM), r.path)
        assert len([w for w, n in receivers.items() if n > 0]) == 2, receivers
    finally:
        client.close()
        cluster.close()


def test_closing_right_after_the_last_frame_keeps_a_complete_scan_complete(client2, scripted_source, tmp_path):
    counts, indices = synthetic_events(GEOM, seed=16)
    src = scripted_source(2)
    s = Session(src.addresses, config=config(tmp_path, timeout_s=60), client=client2, console=False).start()
    src.wait_for_receivers()
    src.start("last", GEOM)
    src.frames("last", GEOM, counts, indices)
    src.end("last", GEOM.n_frames)
    s.close()  # reports still on their way are read before anything is closed
    r = s.wait(timeout=1)  # finished during close, not yet waited for
    assert r.status == "complete", r.reason
    assert_matches(r, reference(counts, indices, GEOM), r.path)
    with pytest.raises(RuntimeError, match="closed"):
        s.wait(timeout=1)


def _slow_flushes(seconds):
    """In a worker process: every chunk a receiver processes takes ``seconds`` longer (0: as
    it was)."""
    from stream.transport.receiver import Receiver
    flush = getattr(Receiver, "_flush_fast", Receiver._flush)
    Receiver._flush_fast = flush
    Receiver._flush = flush if not seconds else lambda self, *a, **kw: (time.sleep(seconds), flush(self, *a, **kw))[1]


def test_closing_while_the_receivers_still_process_the_last_frames_waits_for_them(client2, scripted_source, tmp_path):
    """The receivers take 0.4 s more over each chunk, so that their last reports come after a
    silence: closing the session waits until each has said it reported all it had read (its
    heartbeat), and the scan is complete."""
    counts, indices = synthetic_events(GEOM, seed=17)
    src = scripted_source(2)
    s = Session(src.addresses, config=config(tmp_path, timeout_s=60), client=client2, console=False).start()
    try:
        src.wait_for_receivers()
        client2.run(_slow_flushes, 0.4)
        src.start("slow", GEOM)
        src.frames("slow", GEOM, counts, indices)
        src.end("slow", GEOM.n_frames)
        time.sleep(0.2)  # the receivers have read the frames and are processing them
        s.close()
    finally:
        client2.run(_slow_flushes, 0)
    r = s.wait(timeout=1)
    assert r.status == "complete", r.reason
    assert_matches(r, reference(counts, indices, GEOM), r.path)


def test_events_that_disagree_with_their_counts_refuse_the_file(tmp_path):
    """In one process (stream.session.finalize.finalize_scan): a worker state whose stored events no
    longer match the counts the file's offsets were written from (a chunk lost after
    counting) fails with the frame named, and leaves no file, not even a partial one."""
    from operators.chunk import Chunk
    from stream.config import build_operators
    from stream.session.finalize import _OPEN, ScanInfo, finalize_scan
    from stream.transport.protocol import frame_positions
    from stream.transport.receiver import WorkerScan

    counts, indices = synthetic_events(GEOM, seed=6)
    (tmp_path / "stage").mkdir()
    cfg = config(tmp_path, memory=MemorySpec(spill_dir=str(tmp_path / "stage")))  # files are built there
    ops = build_operators(cfg, GEOM)
    states = {op.name: op.new_state() for op in ops}
    frames = np.arange(GEOM.n_frames)
    chunk = Chunk.from_counts(frames, np.zeros(len(frames)), frame_positions(frames, GEOM), counts, indices)
    for op in ops:
        op.process(states[op.name], chunk)
    store = next(op for op in ops if type(op).__name__ == "EventStore")
    states[store.name]["chunks"].pop()  # the events are gone, their counts are not
    states[store.name]["spans"].pop()
    info = ScanInfo("lost", GEOM, {}, "complete", frames_sent={0: GEOM.n_frames},
                    timings={"opened": 0.0, "first_frame": 0.0, "last_frame": 0.0, "closed": 0.0})
    with pytest.raises(RuntimeError, match="other events for stored frame 0 than they counted"):
        finalize_scan(info, cfg, WorkerScan("lost", "w", GEOM, ops, states, []))
    out = tmp_path / "out"
    assert not (out.exists() and list(out.iterdir())) and not list((tmp_path / "stage").iterdir()) and not _OPEN
