"""Small pieces of the detector sources, alone: the [detector] settings and their errors, the
MPX stream reader on a real socket pair (messages cut anywhere by TCP), the SIMPLON REST
client against our DCU emulator, and Merlin's control client against our Merlin emulator."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from sim_detector.detectors import DectrisEmulator, MerlinEmulator
from stream.config import ConfigError, DetectorSpec, PipelineConfig, validate
from stream.sources import mib
from stream.sources.base import DetectorError, DetectorRefused
from stream.sources.dectris import SimplonClient, dcu_url
from stream.sources.merlin import MerlinControl, MpxReader
from stream.transport.net import free_port_block


@pytest.mark.parametrize("det,message", [
    (DetectorSpec(kind="andor"), "kind 'andor' must be one of stemstream, dectris, merlin"),
    (DetectorSpec(kind="dectris", dcu="http://h:80"), "needs the scan shape"),
    (DetectorSpec(kind="dectris", scan=[4, 4]), "give the DCU"),
    (DetectorSpec(kind="dectris", scan=[4, 4], data="tcp://h:9999", mode="active"), "active mode arms"),
    (DetectorSpec(kind="dectris", scan=[4, 4], dcu="http://h:80", trigger_mode="soft"), "exte, exts, inte or ints"),
    (DetectorSpec(kind="merlin", scan=[4, 4]), "Merlin's data port"),
    (DetectorSpec(kind="merlin", data="tcp://h:6342", mode="active", scan=[4, 4]), "control port"),
    (DetectorSpec(kind="merlin", data="tcp://h:6342", mode="sometimes"), "mode 'sometimes'"),
    (DetectorSpec(kind="merlin", data="tcp://h:6342", gap_timeout_s=0), "gap_timeout_s must be > 0"),
])
def test_detector_settings_are_checked_with_the_fix(det, message):
    with pytest.raises(ConfigError, match=message):
        validate(PipelineConfig(detector=det))


def test_dcu_address_forms():
    assert dcu_url("10.0.0.2:80") == "http://10.0.0.2:80"
    with pytest.raises(ValueError, match="http://HOST:PORT"):
        dcu_url("tcp://10.0.0.2")


def test_mpx_reader_takes_frames_cut_anywhere_by_tcp():
    """Frames of one layout come back many at a time, whatever the TCP segments; a message
    that is not MPX is named as lost sync."""
    rng = np.random.default_rng(0)
    frames = rng.poisson(0.01, (7, 256, 256)).astype(np.uint16)
    wire = mib.mpx_prefix(20) + b"HDR," + b" " * 16
    wire += b"".join(mib.mpx_prefix(len(m)) + m for m in (mib.frame_message(i + 1, f, 12, False)
                                                          for i, f in enumerate(frames)))
    a, b = socket.socketpair()
    sender = threading.Thread(target=lambda: [a.sendall(wire[i:i + 977]) for i in range(0, len(wire), 977)])
    sender.start()
    reader = MpxReader(b, size=1 << 16)  # smaller than the stream: the buffer grows and compacts
    got, header = [], None
    while len(got) < 7:
        reader.fill(2.0)
        while (n := reader.peek()) is not None:
            body = reader.body(n)
            if bytes(body[:4]) == b"HDR,":
                header = bytes(body)
                reader.consume(mib.MPX_PREFIX_LEN + n)
                continue
            fh = mib.parse_frame_header(body)
            rows = reader.frames(n, 100)
            got += list(mib.decode_payloads(rows[:, mib.MPX_PREFIX_LEN + fh.header_size:], fh))
            reader.consume(len(rows) * (mib.MPX_PREFIX_LEN + n))
    sender.join()
    assert header.startswith(b"HDR,")
    np.testing.assert_array_equal(np.stack(got), frames)
    a.sendall(b"GARBAGE-NOT-MPX")
    reader.fill(2.0)
    with pytest.raises(mib.MibError, match="lost sync"):
        reader.peek()
    a.close()
    with pytest.raises(ConnectionError):
        reader.fill(2.0)
    b.close()


def test_simplon_client_against_the_dcu_emulator():
    api, stream = free_port_block(1), free_port_block(1)
    dcu = DectrisEmulator(f"http://127.0.0.1:{api}", f"tcp://127.0.0.1:{stream}", (32, 48))
    try:
        c = SimplonClient(dcu.api, timeout_s=5)
        assert (c.get_config("x_pixels_in_detector"), c.get_config("y_pixels_in_detector")) == (48, 32)
        c.configure(12, "ints", count_time=1e-4)
        assert (c.get_config("nimages"), c.get_config("ntrigger"), c.get_config("count_time")) == (12, 1, 1e-4)
        c.enable_stream()
        assert c.arm() == 1 and dcu.state == "ready"
        with pytest.raises(DetectorRefused, match="refused config/ntrigger"):  # busy: it says no
            c.set_config("ntrigger", 3)
        with pytest.raises(DetectorRefused, match="HTTP 404"):
            c.get_config("no_such_thing")
    finally:
        dcu.close()
    with pytest.raises(DetectorError, match=f"DCU http://127.0.0.1:{api} did not answer"):
        SimplonClient(f"http://127.0.0.1:{api}", timeout_s=2).arm()


def test_merlin_control_against_the_merlin_emulator():
    ctl, data = free_port_block(1), free_port_block(1)
    m = MerlinEmulator(f"tcp://127.0.0.1:{ctl}", f"tcp://127.0.0.1:{data}", bits=6)
    try:
        c = MerlinControl(m.control, timeout_s=5)
        assert c.get("COUNTERDEPTH") == "6"
        c.set("NUMFRAMESTOACQUIRE", 40)
        assert c.get("NUMFRAMESTOACQUIRE") == "40"
        with pytest.raises(DetectorError, match="code 3 .parameter out of range"):
            c.set("COUNTERDEPTH", 7)
        with pytest.raises(DetectorError, match="code 2 .command not recognised"):
            c.cmd("SELFDESTRUCT")
        c.close()
    finally:
        m.close()
