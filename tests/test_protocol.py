"""Wire protocol: round trips of every kind, zero-copy decoding, and every rejection."""

import msgpack
import numpy as np
import pytest
import zmq

from stream.transport import protocol as p

GEOM = p.Geometry((4, 5), (16, 12), frames_per_position=2, n_sources=2, sector=(8, 16), flyback=1,
                  mrad_per_px=0.5, convergence_mrad=20.0, center=(7.5, 5.5))


def wire(parts):
    """What a socket delivers: bytes for every part."""
    return [bytes(memoryview(x)) for x in parts]


def test_start_round_trip():
    md = {"beam_energy_keV": 300.0, "specimen": "mgo", "tilt_deg": -12.5, "nested": {"a": [1, 2]}}
    m = p.decode(wire(p.encode_start("scan-1", 1, GEOM, md)))
    assert (m.kind, m.scan_id, m.source) == ("start", "scan-1", 1)
    assert m.geometry == GEOM
    assert m.metadata == md


def test_frames_round_trip():
    counts = np.array([3, 0, 2], np.uint32)
    indices = np.array([96, 100, 191, 120, 97], np.uint32)  # rows 8..15 of a 12-wide detector
    m = p.decode(wire(p.encode_frames("scan-1", 1, GEOM, 7, counts, indices)))
    assert (m.kind, m.first, m.count) == ("frames", 7, 3)
    assert m.geometry == GEOM
    np.testing.assert_array_equal(m.counts, counts)
    np.testing.assert_array_equal(m.indices, indices)


@pytest.mark.parametrize("parts,field,value", [
    (p.encode_end("s", 0, 1234), "frames_sent", 1234),
    (p.encode_abort("s", 0, "beam blanked"), "reason", "beam blanked"),
])
def test_end_and_abort_round_trip(parts, field, value):
    m = p.decode(wire(parts))
    assert m.header[field] == value


def test_decode_is_zero_copy_over_a_socket():
    ctx = zmq.Context.instance()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    port = a.bind_to_random_port("tcp://127.0.0.1")
    b.connect(f"tcp://127.0.0.1:{port}")
    try:
        indices = np.arange(96, 96 + 50_000, dtype=np.uint32) % 96 + 96  # large: sent by reference
        counts = np.array([len(indices)], np.uint32)
        a.send_multipart(p.encode_frames("z", 1, GEOM, 0, counts, indices), copy=False)
        frames = b.recv_multipart(copy=False)
        m = p.decode(frames)
        # the decoded array is a view of the received ZeroMQ frame, not a copy
        assert not m.indices.flags.owndata and not m.indices.flags.writeable
        assert np.shares_memory(m.indices, np.frombuffer(frames[2].buffer, np.uint32))
        np.testing.assert_array_equal(m.indices, indices)
    finally:
        a.close(0)
        b.close(0)


def test_geometry_derived_numbers():
    assert GEOM.raster_shape == (4, 6)
    assert GEOM.n_frames == 4 * 6 * 2
    frames = np.arange(GEOM.n_frames)
    pos = p.frame_positions(frames, GEOM)
    raster = frames // 2
    row, col = raster // 6, raster % 6
    np.testing.assert_array_equal(pos, np.where(col < 5, row * 5 + col, -1))


def good_frames():
    return p.encode_frames("s", 1, GEOM, 0, np.array([1, 1], np.uint32), np.array([100, 101], np.uint32))


def header_with(**changes):
    h = msgpack.unpackb(good_frames()[0])
    h.update(changes)
    for k, v in list(h.items()):
        if v is None:
            del h[k]
    return msgpack.packb(h)


@pytest.mark.parametrize("parts,reason", [
    ([b"\x93\xff\x00garbage"], "not_msgpack"),
    ([msgpack.packb([1, 2, 3])], "not_msgpack"),
    ([np.random.default_rng(1).bytes(64)], "not_msgpack"),
    ([header_with(proto="stemstream/0")] + wire(good_frames())[1:], "bad_version"),
    ([header_with(kind="hello")] + wire(good_frames())[1:], "unknown_kind"),
    (wire(good_frames())[:2], "wrong_parts"),
    (wire(good_frames()) + [b""], "wrong_parts"),
    ([header_with(count=3)] + wire(good_frames())[1:], "count_mismatch"),
    ([header_with(events=3)] + wire(good_frames())[1:], "event_mismatch"),
    ([header_with()] + [np.array([3, 0], np.uint32).tobytes(), wire(good_frames())[2]], "event_mismatch"),
    ([header_with()] + [wire(good_frames())[1], np.array([100, 16 * 12], np.uint32).tobytes()], "index_out_of_range"),
    ([header_with()] + [wire(good_frames())[1], np.array([5, 100], np.uint32).tobytes()], "index_out_of_range"),
    ([header_with(scan_shape=None, frame_shape=None)] + wire(good_frames())[1:], "missing_geometry"),
    ([header_with(first=GEOM.n_frames - 1)] + wire(good_frames())[1:], "frame_out_of_range"),
    ([header_with(scan_id="../etc")] + wire(good_frames())[1:], "bad_header"),
    ([header_with(source=5)] + wire(good_frames())[1:], "bad_header"),
    ([header_with(scan_shape=[0, 5])] + wire(good_frames())[1:], "bad_geometry"),
    ([header_with(mrad_per_px=float("nan"))] + wire(good_frames())[1:], "bad_geometry"),
    ([header_with(convergence_mrad=-1.0)] + wire(good_frames())[1:], "bad_geometry"),
    ([header_with(center=[7.5, float("inf")])] + wire(good_frames())[1:], "bad_geometry"),
])
def test_bad_messages_are_rejected_with_their_reason(parts, reason):
    with pytest.raises(p.ProtocolError) as e:
        p.decode(parts)
    assert e.value.reason == reason
    assert str(e.value)  # a readable message


def test_encoder_refuses_unsafe_scan_ids():
    with pytest.raises(ValueError, match="scan_id"):
        p.encode_end("a/b", 0, 1)


def test_same_scan_ignores_the_sector_only():
    from dataclasses import replace
    assert GEOM.same_scan(replace(GEOM, sector=(0, 8))) and GEOM.same_scan(GEOM.for_sector(None))
    for change in ({"scan_shape": (4, 6)}, {"frame_shape": (16, 13)}, {"frames_per_position": 1},
                   {"n_sources": 3}, {"flyback": 0}, {"mrad_per_px": 0.25},
                   {"convergence_mrad": None}, {"center": (7.5, 5.0)}):
        assert not GEOM.same_scan(replace(GEOM, **change)), change


def test_a_remembered_geometry_never_lets_a_bad_one_through():
    """Decoding remembers the geometries it validated; a header whose values only compare
    equal to a remembered one (True for 1, 2.0 for 2) is still checked and refused."""
    good = wire(good_frames())
    assert p.decode(good).geometry == GEOM and p.decode(good).geometry == GEOM
    for change, reason in (({"frames_per_position": True}, "bad_header"),
                           ({"frames_per_position": 2.0}, "bad_header"),
                           ({"n_sources": True}, "bad_header"),
                           ({"scan_shape": [4.0, 5]}, "bad_header")):
        with pytest.raises(p.ProtocolError) as e:
            p.decode([header_with(**change)] + good[1:])
        assert e.value.reason == reason, change
    assert p.decode(good).geometry == GEOM
