"""A client written from docs/PROTOCOL.md and docs/FORMAT.md alone: it speaks the wire protocol
with zmq and msgpack and reads the scan file with h5py, importing nothing of stemstream but
the session it tests. Every number it checks follows from the documents and its own data."""

from __future__ import annotations

import json
import time

import h5py
import msgpack
import numpy as np
import zmq

from stream.config import OutputSpec, PipelineConfig, ScanSpec, SecuritySpec, validate
from stream.session import Session, expand_sources
from stream.transport.net import free_port_block

NY, NX, FLYBACK, H, W = 6, 5, 1, 16, 16
N_FRAMES = NY * (NX + FLYBACK)  # raster frames, flyback included (fpp = 1)
SECTORS = [(0, 8), (8, 16)]


def header(kind, scan_id, source, **fields):
    return {"proto": "stemstream/1", "kind": kind, "scan_id": scan_id, "source": source, **fields}


def geometry(source):
    return {"scan_shape": [NY, NX], "frame_shape": [H, W], "frames_per_position": 1, "n_sources": 2,
            "sector": list(SECTORS[source]), "flyback": FLYBACK, "mrad_per_px": 1.0,
            "convergence_mrad": 3.0, "center": [7.5, 7.5]}


class Detector:
    """Two sources (detector sectors), source k bound at PORT + k, PUSH sockets."""

    def __init__(self):
        port = free_port_block(2)
        self.ctx = zmq.Context()
        self.socks = []
        for k in range(2):
            s = self.ctx.socket(zmq.PUSH)
            s.bind(f"tcp://127.0.0.1:{port + k}")
            self.socks.append(s)
        self.first = f"tcp://127.0.0.1:{port}"

    def wait_for_receivers(self):
        poller = zmq.Poller()
        for s in self.socks:
            poller.register(s, zmq.POLLOUT)
        deadline = time.monotonic() + 120
        while len(dict(poller.poll(200))) < 2:
            assert time.monotonic() < deadline, "no receiver connected"
        time.sleep(1.0)  # the others connect too: round-robin spreads

    def send(self, source, head, *parts):
        self.socks[source].send_multipart([msgpack.packb(head)] + list(parts))

    def frames(self, scan_id, source, first, per_frame):
        """``per_frame``: list of uint32 arrays of full-detector pixel indices y*w + x."""
        counts = np.array([len(p) for p in per_frame], "<u4")
        flat = np.concatenate(per_frame).astype("<u4") if len(per_frame) else np.zeros(0, "<u4")
        self.send(source, header("frames", scan_id, source, first=first, count=len(per_frame),
                                 events=int(counts.sum()), **geometry(source)), counts.tobytes(), flat.tobytes())

    def close(self):
        for s in self.socks:
            s.close(linger=5000)
        self.ctx.term()


def electrons(rng):
    """Per raster frame and source: the pixel indices of that source's rows."""
    out = []
    for f in range(N_FRAMES):
        parts = []
        for r0, r1 in SECTORS:
            n = int(rng.poisson(12))
            y = rng.integers(r0, r1, n)
            x = rng.integers(0, W, n)
            parts.append((y * W + x).astype(np.uint32))
        out.append(parts)
    return out


def send_scan(det, scan_id, ev, skip=(), resend=()):
    for k in range(2):
        det.send(k, header("start", scan_id, k, metadata={"beam_energy_keV": 300.0}, **geometry(k)))
    for k in range(2):
        sent = [f for f in range(N_FRAMES) if not (k == 1 and f in skip)]
        runs = np.split(np.array(sent), np.flatnonzero(np.diff(sent) != 1) + 1)
        for run in runs:
            for a in range(0, len(run), 4):
                first = int(run[a])
                det.frames(scan_id, k, first, [ev[f][k] for f in run[a:a + 4]])
    for f in resend:  # source 0 sends these frames again
        det.frames(scan_id, 0, f, [ev[f][0]])


def test_what_the_documents_promise_about_a_scan_with_missing_duplicated_and_bad_messages(client2, tmp_path):
    rng = np.random.default_rng(7)
    ev = electrons(rng)
    det = Detector()
    # a detector that cannot authenticate, allowed by configuration (docs/SECURITY.md)
    cfg = validate(PipelineConfig(output=OutputSpec(dir=str(tmp_path / "out"), previews=False),
                                  scan=ScanSpec(timeout_s=60.0),
                                  security=SecuritySpec(plain_sources=expand_sources([det.first], 2))))
    missing, dup = [10, 11, 12], [3, 4]
    with Session(expand_sources([det.first], 2), config=cfg, client=client2, console=False) as s:
        det.wait_for_receivers()
        send_scan(det, "docs", ev, skip=missing, resend=dup)
        det.send(0, header("frames", "docs", 0, first=0, count=0, events=0, **geometry(0)) | {"proto": "stemstream/2"},
                 b"", b"")                                                     # wrong proto: counted in "docs"
        det.send(1, header("telemetry", "docs", 1))                           # unknown kind: counted in "docs"
        det.socks[0].send_multipart([b"\x00 not msgpack"])                    # names no scan: not counted there
        det.send(0, header("end", "docs", 0, frames_sent=N_FRAMES))          # distinct frames sent
        det.send(1, header("end", "docs", 1, frames_sent=N_FRAMES - len(missing)))
        t0 = time.monotonic()
        path = s.wait("docs", timeout=50).path  # every source ended: no 60 s timeout to wait for
        assert time.monotonic() - t0 < 50
        # a second scan whose source 0 counted its re-sends in frames_sent: complete all the same
        send_scan(det, "docs2", ev, resend=dup)
        det.send(0, header("end", "docs2", 0, frames_sent=N_FRAMES + len(dup)))
        det.send(1, header("end", "docs2", 1, frames_sent=N_FRAMES))
        path2 = s.wait("docs2", timeout=50).path
    det.close()

    with h5py.File(path, "r") as f:  # FORMAT.md, read with h5py only
        assert f.attrs["format"] == "stemstream-scan" and f.attrs["format_version"] == 1
        assert f.attrs["scan_id"] == "docs" and f.attrs["status"] == "incomplete"
        g = f["geometry"].attrs
        assert list(g["scan_shape"]) == [NY, NX] and list(g["frame_shape"]) == [H, W]
        assert g["n_sources"] == 2 and g["flyback"] == FLYBACK and list(g["sector"]) == [0, H]
        assert f["metadata"].attrs["beam_energy_keV"] == 300.0
        c = f["completeness"]
        assert c.attrs["n_frames"] == N_FRAMES and c.attrs["n_sources"] == 2
        assert not c.attrs["complete"] and c.attrs["n_missing"] == len(missing)
        assert c.attrs["n_duplicated"] == len(dup) and c.attrs["n_lost"] == 0 and c.attrs["n_late"] == 0
        assert c.attrs["n_frames_received"] == N_FRAMES - len(missing)
        assert json.loads(c.attrs["per_source"])[1]["missing"] == len(missing)
        assert "per_source" in list(c.attrs["json_keys"])
        received = c["received"][()]
        expect = np.ones((2, N_FRAMES), np.uint16)
        expect[0, dup] = 2
        expect[1, missing] = 0
        np.testing.assert_array_equal(received, expect)
        np.testing.assert_array_equal(c["missing_frames"][()], missing)
        np.testing.assert_array_equal(c["duplicated_frames"][()], dup)
        assert c["lost_frames"].shape == (0,) and c["late_frames"].shape == (0,)
        pf = np.full((NY, NX), 2)
        for fr in missing:
            row, col = divmod(fr, NX + FLYBACK)
            if col < NX:
                pf[row, col] = 1
        np.testing.assert_array_equal(c["position_frames"][()], pf)
        # events: stored frame = position (fpp 1), flyback frames not stored, sorted in frame
        off, idx = f["events/offsets"][()], f["events/indices"][()]
        assert f["events"].attrs["layout"] == "csr" and len(off) == NY * NX + 1
        total = np.zeros(H * W, np.int64)
        for row in range(NY):
            for col in range(NX):
                fr = row * (NX + FLYBACK) + col
                parts = [ev[fr][0]] + ([] if fr in missing else [ev[fr][1]])
                want = np.sort(np.concatenate(parts))
                i = row * NX + col
                np.testing.assert_array_equal(idx[off[i]:off[i + 1]], want)
                np.add.at(total, want.astype(np.int64), 1)
        np.testing.assert_array_equal(f["results/diffraction_sum"][()].ravel(), total)
        p = f["provenance"]
        assert p.attrs["rejected_messages"] == 2
        assert dict(p["rejects"].attrs) == {"bad_version": 1, "unknown_kind": 1}
        assert dict(p["frames_sent_per_source"].attrs) == {"0": N_FRAMES, "1": N_FRAMES - len(missing)}
        assert "config" in list(p.attrs["json_keys"]) and "output" in json.loads(p.attrs["config"])
        for name in ("opened", "first_frame", "last_frame", "closed", "finalize_start", "merged"):
            assert name in p["timings"].attrs
    with h5py.File(path2, "r") as f:
        assert f.attrs["status"] == "complete" and f["completeness"].attrs["complete"]
        assert f["completeness"].attrs["n_duplicated"] == len(dup)
