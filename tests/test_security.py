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
from stream.security import (ClientKeys, KeyPair, SecurityError, SourceKeys, as_client, ensure_keys, generate,
                             read_keypair, read_public, source_keys, write_keypair)
from stream.session import Session
from stream.transport import control
from stream.transport.net import free_port_block
from stream.transport.protocol import encode_frames
from sim_detector.publisher import Publisher
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
