"""No one in (docs/SECURITY.md): CURVE keys and their files, authenticated and encrypted sockets,
and the session under attack — with real sockets, real worker processes and real files.

Each attack is run with CURVE on (it must fail: the attacker is refused or gets nothing, and the
scan is complete and equal to the dense numpy reference) and, in the slow run, with CURVE off
(it must succeed: the proof that the attack is real and the test could fail).
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import replace

import numpy as np
import pytest
import zmq
import zmq.auth

from stream.config import SecuritySpec
from stream.security import (ClientKeys, SecurityError, as_client, ensure_keys, generate,
                             read_keypair, read_public, source_keys, write_keypair)
from stream.session import Session
from stream.transport import control
from stream.transport.net import free_port_block
from stream.transport.protocol import encode_end, encode_frames, encode_start
from sim_detector.publisher import Publisher
from faults import wait_for
from test_pipeline import GEOM, assert_matches, config, poll, reference, synthetic_events

REPORTS = "stemstream-reports"


# ---------------------------------------------------------------- keys and key files

def test_a_key_directory_is_made_private_on_first_use_and_kept(tmp_path):
    d = tmp_path / "keys"
    kps = ensure_keys(d)
    assert set(kps) == {"source", "receiver", "live", "viewer"}
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for role, kp in kps.items():
        assert stat.S_IMODE((d / f"{role}.key_secret").stat().st_mode) == 0o600
        # the format of zmq.auth.create_certificates: pyzmq's own reader gets the same keys
        assert zmq.auth.load_certificate(d / f"{role}.key_secret") == (kp.public, kp.secret)
        assert zmq.auth.load_certificate(d / f"{role}.key") == (kp.public, None)
        assert zmq.curve_public(kp.secret) == kp.public  # a real keypair
    assert ensure_keys(d) == kps  # kept, not regenerated
    assert len({kp.public for kp in kps.values()}) == 4


def test_key_files_written_by_pyzmq_are_read(tmp_path):
    pub, sec = zmq.auth.create_certificates(tmp_path, "detector")
    os.chmod(sec, 0o600)
    kp = read_keypair(sec)
    assert read_public(pub) == kp.public == zmq.curve_public(kp.secret)
    assert read_public(kp.public.decode()) == kp.public  # a Z85 string works as well


@pytest.mark.parametrize("bad", ["not-a-key", "_" * 40, "missing.key"])
def test_a_bad_public_key_is_refused_with_its_name(tmp_path, bad):
    with pytest.raises(SecurityError, match="Z85|key file"):
        read_public(bad if bad != "missing.key" else tmp_path / bad)


def test_a_secret_key_others_can_read_is_refused_with_the_fix(tmp_path):
    _, sec = write_keypair(tmp_path, "k", generate())
    os.chmod(sec, 0o644)
    with pytest.raises(SecurityError, match="chmod 600"):
        read_keypair(sec)


# ---------------------------------------------------------------- sockets

def _immediate_push(ctx, addr, keys=None):
    """A PUSH that queues only on an established (authenticated) connection."""
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.IMMEDIATE, 1)
    s.setsockopt(zmq.LINGER, 0)
    as_client(s, keys)
    s.connect(addr)
    return s


def _drain(sock, wait_ms=300) -> int:
    n = 0
    while sock.poll(wait_ms):
        sock.recv_multipart()
        n += 1
    return n


def test_a_curve_source_sends_only_to_the_receivers_it_accepts(tmp_path):
    """Receivers with the accepted key get every message; a stray PULL (plain, or with a key of its
    own even if it knows the source's public key) is refused and gets nothing."""
    keys = source_keys(tmp_path / "keys")
    receiver = ensure_keys(tmp_path / "keys")["receiver"]
    port = free_port_block(1)
    ctx = zmq.Context()
    with Publisher(f"tcp://127.0.0.1:{port}", curve=keys) as pub:
        socks = {}
        for name, k in (("good", ClientKeys(receiver, keys.keypair.public)), ("plain", None),
                        ("stranger", ClientKeys(generate(), keys.keypair.public))):
            s = socks[name] = ctx.socket(zmq.PULL)
            s.setsockopt(zmq.LINGER, 0)
            as_client(s, k)
            s.connect(pub.addresses[0])
        assert pub.wait_for_receivers(10)
        time.sleep(0.5)  # every handshake has been tried
        for i in range(200):
            pub.send(0, [b"frame %d" % i])
        got = {name: _drain(s) for name, s in socks.items()}
        refused = pub.refused
    for s in socks.values():
        s.close()
    ctx.term()
    assert got == {"good": 200, "plain": 0, "stranger": 0}
    assert refused >= 1  # the stranger's key was refused (the plain one cannot even speak CURVE)


# ---------------------------------------------------------------- attacks on a running scan

def _curve(cfg, on: bool):
    return replace(cfg, security=SecuritySpec(curve=on))


def _forged(kind, sid, **fields):
    return control.encode({"kind": kind, "scan_id": sid, "worker": "tcp://forged", **fields})


def _attack_report_socket(s, sid, kind):
    """Push a forged report to the coordinator: plainly, and as a CURVE client with a key of
    its own that knows the coordinator's public key. True if any was delivered."""
    ctx = zmq.Context.instance()
    server = s.coordinator_key
    attackers = [_immediate_push(ctx, s.control_address)]
    if server:
        attackers.append(_immediate_push(ctx, s.control_address, ClientKeys(generate(), server)))
    done = s.status()[0]["frames_received"]
    msg = _forged("end", sid, source=0, frames_sent=done) if kind == "close" else \
        _forged("abort", sid, source=0, reason="a stranger says stop")
    sent = False
    for a in attackers:
        if a.poll(3000, zmq.POLLOUT):
            a.send_multipart(msg)
            sent = True
        a.close()
    return sent


def _attack_steal(src):
    """A stray PULL connected to the source: plain, and with a key of its own."""
    ctx = zmq.Context.instance()
    strays = []
    for keys in (None, ClientKeys(generate(), src.publisher.curve.keypair.public) if src.publisher.curve else None):
        s = ctx.socket(zmq.PULL)
        s.setsockopt(zmq.LINGER, 0)
        as_client(s, keys)
        s.connect(src.addresses[0])
        strays.append(s)
    time.sleep(1.0)  # the strays are connected (or refused) before the rest of the scan goes out
    return strays


@pytest.mark.parametrize("curve", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["curve", "plain"])
@pytest.mark.parametrize("attack", ["close", "abort", "inject", "steal"])
def test_an_attacker_cannot_close_abort_inject_or_steal(client2, scripted_source, tmp_path, attack, curve):
    """close: a forged report says every frame arrived a quarter into the scan; abort: a stranger's
    abort report; inject: an impostor source on an address the session connects to sends frames of
    the scan; steal: a stray PULL connects to the detector. With CURVE each fails and the scan is
    complete and equal to the reference; without, each succeeds."""
    counts, indices = synthetic_events(GEOM, seed=21)
    src = scripted_source(1, curve=curve)
    impostor_addr = f"tcp://127.0.0.1:{free_port_block(1)}"
    connect = src.addresses + ([impostor_addr] if attack == "inject" else [])
    cfg = _curve(config(tmp_path, timeout_s=30), curve)  # only the attack may close it early
    sid, quarter = f"attacked-{attack}", GEOM.n_frames // 4
    delivered = None
    with Session(connect, config=cfg, client=client2, console=False) as s:
        src.wait_for_receivers()
        src.start(sid, GEOM)
        src.frames(sid, GEOM, counts, indices, only=range(quarter), batch=6)
        poll(lambda: s.status(), lambda st: st and st[0]["frames_received"] >= quarter)
        if attack in ("close", "abort"):
            delivered = _attack_report_socket(s, sid, attack)
            time.sleep(1.5)  # the forgery has been read, and acted on if it got in
        elif attack == "inject":
            impostor = Publisher(impostor_addr)  # plain: it has no source key
            try:
                arrived = impostor.wait_for_receivers(5)
                if arrived:  # the same frames again with other electrons: duplicates, other results
                    fake = encode_frames(sid, 0, GEOM, 0, np.full(quarter, 3, np.uint32),
                                         np.zeros(3 * quarter, np.uint32))
                    impostor.send(0, fake)
                delivered = arrived
                time.sleep(0.5)
            finally:
                impostor.close(linger_s=1)
        else:
            strays = _attack_steal(src)
        src.frames(sid, GEOM, counts, indices, only=range(quarter, GEOM.n_frames), batch=6)
        src.end(sid, GEOM.n_frames)
        r = s.wait(sid, timeout=60)
        refused = sum(s._gate.refused.values()) if s._gate else 0
    if attack == "steal":
        delivered = sum(_drain(x, 100) for x in strays)
        for x in strays:
            x.close()
        delivered = delivered or None
    if curve:
        assert not delivered, f"the attacker got through: {delivered}"
        assert r.status == "complete" and r.n_missing == 0 and r.n_duplicated == 0, r.reason
        assert_matches(r, reference(counts, indices, GEOM), r.path)
        if attack in ("close", "abort"):
            assert refused >= 1  # the CURVE attacker's key was refused by the coordinator
    else:  # the same attack on plain sockets works: the test above can fail
        assert delivered
        spoiled = {"close": lambda: r.frames_received == quarter,  # closed early, the rest dropped as late
                   "abort": lambda: r.status != "complete" and "stranger" in r.reason,
                   "inject": lambda: r.n_duplicated > 0,
                   "steal": lambda: r.n_missing > 0}[attack]
        assert spoiled(), (r.status, r.reason, r.frames_received, r.n_missing, r.n_duplicated)


# ---------------------------------------------------------------- budgets

def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # Linux: the peak (VmHWM) restarts from now
        f.write("5")


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def _reset_peaks(client) -> dict:
    """Restart the peak memory of the workers and this process (the coordinator); their
    resident memory now."""
    client.run(_reset_peak_rss)
    _reset_peak_rss()
    return {"session": _rss_mb(), **client.run(_rss_mb)}


def _growth(client, base: dict) -> dict:
    peaks = {"session": _peak_rss_mb(), **client.run(_peak_rss_mb)}
    return {k: peaks[k] - base[k] for k in base}


def _limits(cfg, **kw):
    from stream.config import LimitsSpec
    return replace(cfg, limits=replace(LimitsSpec(), **kw))


def test_a_16000_square_scan_is_refused_before_anything_is_allocated(client2, scripted_source, tmp_path, capsys):
    """One 200-byte start (and a frames message) for a 16000 x 16000 scan would need ~13 GB of
    state per receiver: it is refused with the reason and the fix, no process grows by more
    than the budget, no file appears, and the next scan runs."""
    from stream.transport.protocol import Geometry
    budget_mb = 200
    huge = Geometry((16000, 16000), (576, 576), mrad_per_px=0.5, convergence_mrad=4.0)
    src = scripted_source(1)
    counts, indices = synthetic_events(GEOM, seed=4)
    with Session(src.addresses, config=_limits(config(tmp_path), scan_state_mb=budget_mb),
                 client=client2) as s:
        src.wait_for_receivers()
        base = _reset_peaks(client2)
        src.send(0, encode_start("huge", 0, huge, {}))  # (the scripted source's start() would build it)
        src.send(0, encode_frames("huge", 0, huge, 0, np.array([2], np.uint32), np.array([5, 9], np.uint32)))
        src.send(0, encode_end("huge", 0, huge.n_frames))
        poll(lambda: s.rejects().get("over_budget", 0), lambda n: n >= 2)
        grown = _growth(client2, base)
        src.start("after", GEOM)
        src.frames("after", GEOM, counts, indices, batch=6)
        src.end("after", GEOM.n_frames)
        r = s.wait("after", timeout=60)
        rejects = s.rejects()
    out = capsys.readouterr().out
    assert rejects["over_budget"] >= 2, rejects
    assert "16000x16000 positions" in out and "[limits] scan_state_mb" in out and "raise it" in out, out
    assert max(grown.values()) < budget_mb, grown
    assert sorted(p.name for p in (tmp_path / "out").glob("*.h5")) == ["after.h5"]
    assert r.status == "complete"
    assert_matches(r, reference(counts, indices, GEOM))


def test_the_coordinator_refuses_a_scan_its_bookkeeping_cannot_afford(client2, scripted_source, tmp_path, capsys):
    """1024 x 1024 positions on a 16 x 16 detector fit a receiver's 100 MB budget, but the
    coordinator's bookkeeping with live results (every worker's partial images) does not: it
    refuses the scan, the receivers drop what they built, and no file is written."""
    from stream.config import coordinator_state_bytes, scan_state_bytes
    from stream.transport.protocol import Geometry
    wide = Geometry((1024, 1024), (16, 16), mrad_per_px=1.0, convergence_mrad=4.0)  # mrad: the default detectors
    cfg = _limits(config(tmp_path, live_rate=2.0), scan_state_mb=100)
    assert scan_state_bytes(cfg, wide) < 100e6 < coordinator_state_bytes(cfg, wide, 2)
    src = scripted_source(1)

    def receiver_state(dask_worker):
        rec = next(p.receiver for p in dask_worker.plugins.values() if hasattr(p, "receiver"))
        return sorted(rec._scans), dict(rec._refused)

    with Session(src.addresses, config=cfg, client=client2) as s:
        src.wait_for_receivers()
        src.send(0, encode_start("wide", 0, wide, {}))
        src.send(0, encode_frames("wide", 0, wide, 0, np.array([2], np.uint32), np.array([5, 9], np.uint32)))
        poll(lambda: s.rejects().get("over_budget", 0), lambda n: n >= 1)
        held = poll(lambda: client2.run(receiver_state),
                    lambda got: all(not scans for scans, _ in got.values()))
        src.send(0, encode_end("wide", 0, wide.n_frames))
        time.sleep(1)
    out = capsys.readouterr().out
    assert "ERROR: refused a scan (over_budget)" in out and "bookkeeping" in out, out
    assert all(not scans for scans, _ in held.values()), held  # the receivers dropped it
    assert not list((tmp_path / "out").glob("*.h5"))


def test_more_scans_than_max_open_scans_are_refused(client2, scripted_source, tmp_path, capsys):
    src = scripted_source(1)
    events = {sid: synthetic_events(GEOM, seed=k) for k, sid in enumerate("abc")}
    with Session(src.addresses, config=_limits(config(tmp_path, timeout_s=30), max_open_scans=2),
                 client=client2) as s:
        src.wait_for_receivers()
        for sid in "ab":
            src.start(sid, GEOM)
        poll(lambda: len(s.status()), lambda n: n >= 2)
        src.start("c", GEOM)
        for sid, (counts, indices) in events.items():
            src.frames(sid, GEOM, counts, indices, batch=12)
            src.end(sid, GEOM.n_frames)
        results = {sid: s.wait(sid, timeout=60) for sid in "ab"}
        poll(lambda: s.rejects().get("too_many_scans", 0), lambda n: n >= 1)
        rejects = s.rejects()
    for sid, r in results.items():
        assert r.status == "complete"
        assert_matches(r, reference(*events[sid], GEOM))
    assert rejects.get("too_many_scans", 0) >= 1, rejects
    assert "too_many_scans" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").glob("*.h5")) == ["a.h5", "b.h5"]


def test_the_state_estimate_bounds_what_building_a_scan_allocates(tmp_path):
    """scan_state_bytes, from the geometry alone, against what building the operators and their
    states really allocates (tracemalloc sees numpy's allocations): never less, at most 3x."""
    import tracemalloc

    from stream.config import ApertureSpec, PipelineConfig, build_operators, scan_state_bytes, validate
    from stream.transport.protocol import Geometry
    configs = [validate(PipelineConfig()),
               validate(PipelineConfig(aperture=[ApertureSpec("a", rect=[0, 8, 0, 8]),
                                                 ApertureSpec("b", rect=[2, 5, 2, 5])])),
               config(tmp_path, np.random.default_rng(0).random((40, 36)))]
    for cfg in configs:
        det = (40, 36) if cfg is configs[-1] else (576, 576)
        for scan, n_sources in (((128, 128), 1), ((512, 256), 4), ((16, 16), 1)):
            g = Geometry(scan, det, n_sources=n_sources, mrad_per_px=0.5, convergence_mrad=4.0)
            tracemalloc.start()
            try:
                ops = build_operators(cfg, g)
                states = [op.new_state() for op in ops]
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            del ops, states
            estimate = scan_state_bytes(cfg, g)
            assert peak <= estimate <= 3 * peak + 2e6, (scan, det, peak, estimate)


def test_the_protocol_refuses_geometries_beyond_any_instrument():
    from stream.transport.protocol import Geometry, ProtocolError
    for scan, det in (((46340, 46340), (64, 64)), ((64, 64), (65536, 65536)), ((64, 64), (16384, 16384))):
        with pytest.raises(ProtocolError, match="bad_geometry|must be|more than|beyond"):
            Geometry(scan, det)
    Geometry((16000, 16000), (576, 576))  # within the bounds: the budget decides


# ---------------------------------------------------------------- floods

def _junk(n: int, seed: int = 0):
    """``n`` messages a broken or hostile source might send: frames of scans no start announced
    (each a new scan id), end and abort of unknown scans, frames of an absurdly large scan,
    and malformed messages."""
    import msgpack

    from stream.transport.protocol import Geometry, encode_abort, encode_end
    rng = np.random.default_rng(seed)
    shapes = [Geometry((32, 32), (64, 64)), Geometry((8, 200), (24, 24)), Geometry((100, 3), (576, 576))]
    huge = Geometry((16000, 16000), (576, 576))
    out = []
    for k in range(n):
        sid = f"junk-{seed}-{k}"
        kind = k % 10
        if kind < 6:
            g = shapes[k % len(shapes)]
            c = rng.integers(0, 4, 2).astype(np.uint32)
            out.append(encode_frames(sid, 0, g, int(rng.integers(0, g.n_frames - 2)), c,
                                     rng.integers(0, g.n_pixels, int(c.sum())).astype(np.uint32)))
        elif kind == 6:
            out.append(encode_end(sid, 0, 100))
        elif kind == 7:
            out.append(encode_abort(sid, 0, "junk"))
        elif kind == 8:
            out.append(encode_frames(sid, 0, huge, 0, np.array([1], np.uint32), np.array([7], np.uint32)))
        else:
            out.append([msgpack.packb({"proto": "stemstream/0", "kind": "frames", "scan_id": sid})]
                       if k % 20 == 9 else [bytes(rng.integers(0, 256, 40, dtype=np.uint8))])
    return out


def _timed_scan(s, src, sid, counts, indices, geometry):
    """Send a whole scan; seconds from its last message sent to its file in place."""
    src.start(sid, geometry)
    src.frames(sid, geometry, counts, indices, batch=32)
    src.end(sid, geometry.n_frames)
    t_sent = time.time()
    r = s.wait(sid, timeout=120)
    assert r.status == "complete", r.reason
    return r, r.timings["written"] - t_sent


def test_a_flood_of_junk_makes_no_file_and_does_not_slow_the_next_scan(client2, scripted_source, tmp_path, capsys):
    """5,000 junk messages with new scan ids: no file, a bounded number of console lines, every
    one counted, and the next real scan written within 2x the latency of a clean run (or 0.3 s
    more: a clean run takes some 60 ms)."""
    g = replace(GEOM, scan_shape=(48, 48), frames_per_position=1, flyback=0)  # GEOM's detector
    counts, indices = synthetic_events(g, seed=2, dose=60)
    src, broken = scripted_source(1), scripted_source(1)  # the detector, and a broken source
    cfg = config(tmp_path, timeout_s=10)
    junk = _junk(5000)
    with Session(src.addresses + broken.addresses, config=cfg, client=client2) as s:
        src.wait_for_receivers()
        broken.wait_for_receivers()
        clean = [_timed_scan(s, src, f"clean-{k}", counts, indices, g)[1] for k in range(2)]
        for parts in junk:
            broken.send(0, parts)
        # a real scan from the broken source after its junk: once it is written the receivers
        # have taken the junk (which they still hold, waiting for starts that never come)
        _timed_scan(s, broken, "marker", counts[:1], indices[:int(counts[0])], replace(g, scan_shape=(1, 1)))
        r, after = _timed_scan(s, src, "after", counts, indices, g)
        time.sleep(cfg.limits.announce_grace_s + 1)  # the junk held by the receivers is dropped
        rejects = s.rejects()
    out = capsys.readouterr().out.splitlines()
    assert sorted(p.name for p in (tmp_path / "out").glob("*.h5")) == ["after.h5", "clean-0.h5", "clean-1.h5",
                                                                       "marker.h5"]
    # within 2x a clean run's latency, or 0.3 s more than it: clean runs take some 60 ms, where
    # one scheduling hiccup on a busy machine doubles them (the flood once cost 72 s)
    assert after <= max(2 * np.mean(clean), np.mean(clean) + 0.3), \
        (after, clean, " ".join(f"{k} {v - r.timings['opened']:.3f}" for k, v in r.timings.items()))
    assert_matches(r, reference(counts, indices, g))
    # every junk message is counted under one reason or another (the end and abort messages
    # of unknown scans wait a minute for their start at the coordinator: not yet counted)
    assert sum(rejects.values()) >= len(junk) * 8 // 10, rejects
    assert rejects.get("unannounced", 0) >= 3000 and rejects.get("over_budget", 0) >= 500, rejects
    warnings = [line for line in out if "WARNING" in line or "ERROR" in line]
    assert len(warnings) <= 10 and len(out) <= 40, "\n".join(out)


# ---------------------------------------------------------------- plain sources

def test_a_plain_source_is_received_only_when_the_configuration_trusts_it(client2, scripted_source, tmp_path):
    """A detector that cannot do CURVE is received from when [security] plain_sources names it
    (beside a CURVE source); without that, the receivers do not connect to it at all."""
    curve_src, plain_src = scripted_source(1), scripted_source(1, curve=False)
    both = curve_src.addresses + plain_src.addresses
    events = {sid: synthetic_events(GEOM, seed=k) for k, sid in enumerate(("via-curve", "via-plain"))}
    cfg = config(tmp_path)
    trusting = replace(cfg, security=SecuritySpec(plain_sources=plain_src.addresses))
    with Session(both, config=trusting, client=client2, console=False) as s:
        for sid, src in (("via-curve", curve_src), ("via-plain", plain_src)):
            src.wait_for_receivers()
            src.start(sid, GEOM)
            src.frames(sid, GEOM, *events[sid], batch=12)
            src.end(sid, GEOM.n_frames)
        results = {sid: s.wait(sid, timeout=60) for sid in events}
    for sid, r in results.items():
        assert r.status == "complete"
        assert_matches(r, reference(*events[sid], GEOM))
    with Session(both, config=cfg, client=client2, console=False):
        assert curve_src.publisher.wait_for_receivers(10)
        assert not plain_src.publisher.wait_for_receivers(3)  # every receiver insists on CURVE


# ---------------------------------------------------------------- commands: keys, loopback, TLS

def test_keys_prints_every_public_key_and_keeps_the_secrets_private(tmp_path):
    from test_cli import run_cli
    r = run_cli("keys", "--dir", tmp_path / "k")
    assert r.returncode == 0, r.stderr
    kps = ensure_keys(tmp_path / "k")
    for role, kp in kps.items():
        assert kp.public.decode() in r.stdout and kp.secret.decode() not in r.stdout
    r = run_cli("keys", "--tls", tmp_path / "tls")
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE((tmp_path / "tls" / "key.pem").stat().st_mode) == 0o600
    assert (tmp_path / "tls" / "ca.pem").read_text().startswith("-----BEGIN CERTIFICATE-----")


def test_a_source_with_other_keys_gets_no_receiver_and_says_why(tmp_path):
    """The two-terminal session with mismatched keys: the emulator's receivers are refused, it
    says so while it waits, and gives up with one line."""
    from test_cli import Cli, run_cli
    port = free_port_block(1)
    proc = Cli(["process", "--connect", f"tcp://127.0.0.1:{port}", "--workers", 1, "--out", tmp_path / "out"],
               cwd=tmp_path)
    try:
        proc.wait_for(r"processing every scan", 120)
        sim = run_cli("simulate", "--scan", "8x8", "--detector", "32x32", "--bind", f"tcp://127.0.0.1:{port}",
                      "--curve-keys", tmp_path / "other-keys", "--wait", "11", cwd=tmp_path, timeout=240)
    finally:
        proc.kill()
    assert sim.returncode == 2 and "no receiver has connected" in sim.stderr, sim.stderr
    assert "refused" in sim.stderr and "other keys" in sim.stderr, sim.stderr
    assert "refused" in sim.stdout and "docs/SECURITY.md" in sim.stdout, sim.stdout


def _listening(pids):
    """(pid, ip, port) of every socket these processes listen on (TCP) or have bound (UDP)."""
    import psutil
    out = []
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        for c in conns:
            if c.laddr and (c.status == psutil.CONN_LISTEN or c.type == 2):  # SOCK_DGRAM
                out.append((pid, c.laddr.ip, c.laddr.port))
    return out


def _is_dashboard(port: int) -> bool:
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:  # dask's
            return r.status == 200 and r.read() == b"ok"
    except OSError:
        return False


def test_every_process_of_a_session_listens_on_loopback_only(tmp_path):
    """`stemstream process` (scheduler, dashboard, report, control and live sockets; nannies and
    workers) and `stemstream simulate`, both running: every listening socket is on 127.0.0.1."""
    import psutil

    from test_cli import Cli
    port, live = free_port_block(2), free_port_block(1)
    proc = Cli(["process", "--connect", f"tcp://127.0.0.1:{port}", "--sources", 2, "--workers", 2,
                "--out", tmp_path / "out", "--publish", f"tcp://127.0.0.1:{live}"], cwd=tmp_path)
    sim = None
    try:
        proc.wait_for(r"processing every scan", 120)
        sim = Cli(["simulate", "--scan", "64x64", "--detector", "64x64", "--sources", 2, "--rate", "3000",
                   "--scans", 3, "--bind", f"tcp://127.0.0.1:{port}", "--wait", 60], cwd=tmp_path)
        proc.wait_for(r"\] complete: ", 120)  # a scan went all the way through
        pids = [proc.p.pid, *(c.pid for c in psutil.Process(proc.p.pid).children(recursive=True)), sim.p.pid]
        bound = _listening(pids)
        dashboards = [p for pid, _, p in bound if pid == proc.p.pid and _is_dashboard(p)]
    finally:
        for c in (sim, proc):
            if c is not None:
                c.kill()
    assert "security: CURVE on every channel; dask over TLS" in proc.stdout, proc.stdout
    assert len(pids) >= 4 and len(bound) >= 9, bound  # 2 sources; scheduler, dashboard, 3 of ours; 2 workers, 2 nannies
    assert all(ip in ("127.0.0.1", "::1") for _, ip, _ in bound), bound
    assert dashboards, f"no dashboard among {bound}"  # it is there, and on loopback


@pytest.fixture
def tls_cluster(tmp_path):
    """`dask scheduler` and two `dask worker`s started by hand with the TLS files that
    `stemstream keys --tls` writes, as deploy/slurm/stemstream.sbatch does."""
    from conftest import external_dask
    from stream.security.tls import write_tls_files
    files = write_tls_files(tmp_path / "tls")
    tls = ["--protocol", "tls", "--tls-ca-file", str(files["ca"]), "--tls-cert", str(files["cert"]),
           "--tls-key", str(files["key"])]
    with external_dask(tmp_path, tls) as address:
        yield address, files


def test_a_session_joins_a_tls_scheduler_with_its_files_and_nobody_joins_without(tls_cluster, scripted_source,
                                                                                  tmp_path):
    from distributed import Client

    from stream.config import ConfigError
    address, files = tls_cluster
    assert address.startswith("tls://")
    with pytest.raises(ConfigError, match="--tls-ca-file"):  # a tls:// scheduler and no files: the fix
        Session(["tcp://127.0.0.1:1"], config=config(tmp_path), scheduler=address).start()
    with pytest.raises(Exception):  # a client without a certificate the cluster's CA signed
        Client(address.replace("tls://", "tcp://"), timeout=5)
    counts, indices = synthetic_events(GEOM, seed=33)
    src = scripted_source(2)
    cfg = config(tmp_path)
    cfg = replace(cfg, security=replace(cfg.security, tls_ca_file=str(files["ca"]), tls_cert=str(files["cert"]),
                                        tls_key=str(files["key"])))
    from stream.security.tls import client_security
    with Client(address, security=client_security(address, *(str(files[k]) for k in ("ca", "cert", "key")))) as c:
        c.wait_for_workers(2, timeout=120)
    with Session(src.addresses, config=cfg, scheduler=address) as s:
        assert len(s.workers) == 2 and "dask over TLS" in s.describe_security()
        src.wait_for_receivers(120)
        src.start("tls", GEOM)
        src.frames("tls", GEOM, counts, indices, batch=6)
        src.end("tls", GEOM.n_frames)
        r = s.wait("tls", timeout=60)
    assert r.status == "complete"
    assert_matches(r, reference(counts, indices, GEOM), r.path)


@pytest.mark.slow  # a whole job: scheduler, worker and session started by the script (about a minute)
def test_the_slurm_script_starts_its_dask_cluster_over_tls(scripted_source, tmp_path):
    """deploy/slurm/stemstream.sbatch with srun replaced by a stand-in that runs each command
    here: the scheduler it starts speaks TLS only, the session joins it with the job's files and
    writes the scan, and the job's TLS directory is gone when it ends."""
    import json
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "srun").write_text('#!/bin/bash\n# stand-in for srun: run the command here, --ntasks times\n'
                               'n=1; while [[ "$1" == --* ]]; do [[ "$1" == --ntasks=* ]] && n=${1#--ntasks=}; shift; done\n'
                               'for _ in $(seq "$n"); do "$@" & done; wait\n')
    (stub / "srun").chmod(0o755)
    src = scripted_source(1)
    counts, indices = synthetic_events(GEOM, seed=44)
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{stub}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "DETECTOR": src.addresses[0], "SOURCES": "1", "OUT": str(out), "VENV": str(Path(sys.executable).parents[1]),
           "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "3"}
    job = subprocess.Popen(["bash", str(root / "deploy/slurm/stemstream.sbatch")], env=env, cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        src.wait_for_receivers(180)
        address = json.loads((out / "scheduler-4242.json").read_text())["address"]
        tls_dir_existed = (out / "tls-4242" / "key.pem").is_file()
        src.start("slurm", GEOM)
        src.frames("slurm", GEOM, counts, indices, batch=6)
        src.end("slurm", GEOM.n_frames)
        deadline = time.monotonic() + 60
        while not (out / "slurm.h5").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        os.killpg(job.pid, signal.SIGTERM)
        try:
            log = job.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)
            log = job.communicate()[0]
    assert address.startswith("tls://") and tls_dir_existed, log
    assert "dask over TLS" in log, log
    import h5py
    with h5py.File(out / "slurm.h5", "r") as f:
        assert f.attrs["status"] == "complete", log
        np.testing.assert_array_equal(f["results/bf"][()], reference(counts, indices, GEOM)["bf"])
    assert not (out / "tls-4242").exists(), "the job's TLS files outlive it"


# ---------------------------------------------------------------- one receiver: announcements, sizes

@pytest.fixture
def lone_receiver(scripted_source):
    """A receiver alone (plain sockets): a source, the report socket's far end, and a control
    PUB socket standing in for the coordinator's."""
    from stream.config import ChunkingSpec, LimitsSpec, LiveSpec, PipelineConfig, validate
    from stream.transport.receiver import Receiver
    made = []

    def make(**limits):
        src = scripted_source(1, curve=False)
        ctx = zmq.Context.instance()
        pull, pub = ctx.socket(zmq.PULL), ctx.socket(zmq.PUB)
        port, cport = pull.bind_to_random_port("tcp://127.0.0.1"), pub.bind_to_random_port("tcp://127.0.0.1")
        cfg = validate(PipelineConfig(chunking=ChunkingSpec(max_frames=16, max_latency_ms=20),
                                      live=LiveSpec(rate_hz=0), limits=LimitsSpec(**limits)))
        rec = Receiver(src.addresses, f"tcp://127.0.0.1:{port}", cfg, worker="w0",
                       announce_address=f"tcp://127.0.0.1:{cport}")
        rec.start()
        src.wait_for_receivers()
        made.append((rec, pull, pub))
        return src, rec, pull, pub
    yield make
    for rec, pull, pub in made:
        rec.stop()
        pull.close(0)
        pub.close(0)


def _reports(pull, until, timeout_s=20):
    got, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline and not until(got):
        if pull.poll(50):
            got.append(control.decode(pull.recv_multipart())[0])
    return got


def test_frames_wait_for_the_announcement_and_unannounced_ones_are_dropped(lone_receiver):
    """Frames of a scan whose start went to another receiver are held, then processed exactly
    once the coordinator announces the scan; frames of a scan nobody announces are dropped after
    the grace and counted, and nothing was built for them."""
    src, rec, pull, pub = lone_receiver(announce_grace_s=1.0)
    counts, indices = synthetic_events(GEOM, seed=5)
    src.frames("told", GEOM, counts, indices, batch=8)   # no start: it went elsewhere
    src.frames("junk", GEOM, counts, indices, batch=8)
    assert poll(lambda: sorted(rec._held), lambda held: held == ["junk", "told"]) == ["junk", "told"]
    early = _reports(pull, lambda g: False, timeout_s=0.3)
    assert not [h for h in early if h["kind"] in ("geometry", "frames")]
    pub.send_multipart(control.encode({"kind": "announced", "scan_ids": ["told"]}))
    got = _reports(pull, lambda g: sum(c for h in g if h["kind"] == "frames" for _, _, c in h["ranges"])
                   >= GEOM.n_frames and any(h["kind"] == "reject" for h in g))
    n_msgs = -(-GEOM.n_frames // 8)
    rejects = [h for h in got if h["kind"] == "reject"]
    assert [(h["reason"], h["scan_id"], h["count"]) for h in rejects] == [("unannounced", "junk", n_msgs)]
    assert {h["scan_id"] for h in got if h["kind"] in ("geometry", "frames")} == {"told"}
    ws = rec.close_scan("told")
    fused = next(op for op in ws.operators if op.name == "fused")
    np.testing.assert_array_equal(fused.finalize(ws.states["fused"])["diffraction_sum"].data,
                                  reference(counts, indices, GEOM)["diffraction_sum"])
    assert rec.held_bytes == 0 and not rec._held


def test_a_receiver_holds_back_when_unannounced_frames_fill_their_budget(lone_receiver):
    """Past [limits] unannounced_mb of waiting frames the receiver stops reading (the source is
    held back, nothing is dropped) until the announcement comes."""
    src, rec, pull, pub = lone_receiver(unannounced_mb=0.05, announce_grace_s=60)
    counts, indices = synthetic_events(GEOM, seed=6, dose=200)  # about 210 kB of events
    src.frames("big", GEOM, counts, indices, batch=4)
    poll(lambda: rec.held_bytes, lambda b: b >= 50_000)
    time.sleep(0.5)
    assert 50_000 <= rec.held_bytes < 50_000 + 4 * 4 * 250 + 500  # one message past the budget at most
    pub.send_multipart(control.encode({"kind": "announced", "scan_ids": ["big"]}))
    got = _reports(pull, lambda g: sum(c for h in g if h["kind"] == "frames" for _, _, c in h["ranges"])
                   >= GEOM.n_frames)
    assert sum(c for h in got if h["kind"] == "frames" for _, _, c in h["ranges"]) == GEOM.n_frames
    assert not [h for h in got if h["kind"] == "reject"]


def test_a_message_larger_than_max_message_mb_is_not_taken(lone_receiver):
    """ZMQ_MAXMSGSIZE: a message part beyond the limit never reaches the receiver; ZeroMQ drops
    the connection and does not make it again, the receiver does (and says so), and the
    messages after it arrive."""
    from stream.transport.protocol import Geometry
    src, rec, pull, pub = lone_receiver(max_message_mb=0.1)
    big = Geometry((64, 64), (64, 64))
    src.publisher.count_receivers()  # (reads the sockets' monitors)
    accepted = src.publisher.accepted[0]
    src.send(0, encode_start("big", 0, big, {}))
    src.send(0, encode_frames("big", 0, big, 0, np.array([40_000], np.uint32),
                              np.zeros(40_000, np.uint32)))  # a 160 kB part
    # the source has seen the old connection close and the new one come (what it sends
    # before that goes down the dropped connection, and is lost with it)
    wait_for(lambda: src.publisher.count_receivers() == [1] and src.publisher.accepted[0] > accepted, 30)
    counts, indices = synthetic_events(GEOM, seed=7)
    src.start("small", GEOM)
    src.frames("small", GEOM, counts, indices, batch=8)
    got = _reports(pull, lambda g: sum(c for h in g if h["kind"] == "frames" for _, _, c in h["ranges"])
                   >= GEOM.n_frames)
    assert sum(c for h in got if h["kind"] == "frames" and h["scan_id"] == "small" for _, _, c in h["ranges"]) \
        == GEOM.n_frames
    assert not [h for h in got if h["kind"] == "frames" and h["scan_id"] == "big"]
    assert [h["reason"] for h in got if h["kind"] == "reject"] == ["connection_dropped"]



def test_a_source_that_fails_the_handshake_is_tried_again_without_a_reject():
    """A receiver that expects a CURVE source meets a plain one (the usual mistake): its links
    report names the failed handshake and no connection_dropped reject is counted (the
    handshake never completed: no message was in flight). ZeroMQ never retries after a
    failed handshake; the receiver does, so once the source binds the same address with
    CURVE and the right keys, its frames arrive, every one."""
    from stream.config import ChunkingSpec, LiveSpec, PipelineConfig, validate
    from stream.security import ReceiverKeys, SourceKeys
    from stream.transport.receiver import Receiver
    source, receiver = generate(), generate()
    addr = f"tcp://127.0.0.1:{free_port_block(1)}"
    pull = zmq.Context.instance().socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    cfg = validate(PipelineConfig(chunking=ChunkingSpec(max_frames=16, max_latency_ms=20), live=LiveSpec(rate_hz=0)))
    rec = Receiver([addr], f"tcp://127.0.0.1:{port}", cfg, worker="w0",
                   keys=ReceiverKeys({addr: ClientKeys(receiver, source.public)}, None))
    try:
        with Publisher(addr, linger_s=0) as plain:  # no CURVE
            rec.start()
            got = _reports(pull, lambda g: False, timeout_s=3.0)
            plain.count_receivers()  # (reads the socket's monitor)
            attempts = plain.accepted[0]
        failed = [h["failed"].get(addr, "") for h in got if h["kind"] == "links"]
        assert any(f.startswith("the handshake failed") for f in failed), got
        assert not [h for h in got if h["kind"] == "reject"], got
        assert attempts >= 2  # the receiver tried again (ZeroMQ alone would not have)
        counts, indices = synthetic_events(GEOM, seed=8)
        with Publisher(addr, linger_s=2.0, curve=SourceKeys(source, frozenset({receiver.public}))) as pub:
            assert pub.wait_for_receivers(10)
            pub.send(0, encode_start("fixed", 0, GEOM, {}))
            off = np.r_[0, np.cumsum(counts)]
            for a in range(0, GEOM.n_frames, 16):
                b = min(a + 16, GEOM.n_frames)
                pub.send(0, encode_frames("fixed", 0, GEOM, a, counts[a:b], indices[off[a]:off[b]]))
            pub.send(0, encode_end("fixed", 0, GEOM.n_frames))
            got = _reports(pull, lambda g: sum(c for h in g if h["kind"] == "frames" for _, _, c in h["ranges"])
                           >= GEOM.n_frames)
        assert sum(c for h in got if h["kind"] == "frames" for _, _, c in h["ranges"]) == GEOM.n_frames
        assert sum(h["events"] for h in got if h["kind"] == "frames") == counts.sum()
        assert not [h for h in got if h["kind"] == "reject"], got
    finally:
        rec.stop()
        pull.close(0)

def test_the_security_flags_of_process_reach_the_session(tmp_path):
    """--insecure-source adds plain sources (expanded by --sources, and no default source);
    --curve-keys, --curve-server-key and the TLS flags land in [security]."""
    from stream.cli.commands import build_parser, session_from_args
    key = ensure_keys(tmp_path / "k")["source"].public.decode()
    args = build_parser().parse_args(
        ["process", "--insecure-source", "tcp://10.0.0.5:6001", "--sources", "2", "--curve-keys", str(tmp_path / "k"),
         "--curve-server-key", key, "--tls-ca-file", "ca.pem", "--tls-cert", "c.pem", "--tls-key", "k.pem",
         "--out", str(tmp_path / "out")])
    s = session_from_args(args)  # not started
    assert s.connect == ["tcp://10.0.0.5:6001", "tcp://10.0.0.5:6002"]
    sec = s.config.security
    assert sec.plain_sources == s.connect and sec.keys == str(tmp_path / "k") and sec.source_key == key
    assert (sec.tls_ca_file, sec.tls_cert, sec.tls_key) == ("ca.pem", "c.pem", "k.pem")
    args = build_parser().parse_args(["process", "--connect", "tcp://127.0.0.1:7000", "--insecure-source",
                                      "tcp://10.0.0.5:6001", "--out", str(tmp_path / "out")])
    s = session_from_args(args)
    assert s.connect == ["tcp://127.0.0.1:7000", "tcp://10.0.0.5:6001"]
    assert s.config.security.plain_sources == ["tcp://10.0.0.5:6001"]


def test_a_key_that_starts_with_a_dash_is_a_value_not_an_option():
    """Z85 has '-' in its alphabet: about one key in 85 starts with it, and argparse took such a
    key for an option (seen in CI)."""
    from stream.cli.commands import build_parser
    key = "-" + "a" * 39
    args = build_parser().parse_args(["process", "--curve-server-key", key])
    assert args.curve_server_key == key
    args = build_parser().parse_args(["simulate", "--curve-client-key", key, "--curve-client-key", key])
    assert args.curve_client_key == [key, key]
