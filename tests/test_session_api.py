"""The Python Session as a new user meets it (README "In Python"): the arguments it takes, what
it says when a source cannot be reached, ``live()`` for a scan it does not know, and the
previews of a scan with missing frames, on a real dask cluster with real sockets."""

from __future__ import annotations

import time

import h5py
import numpy as np
import pytest
from PIL import Image

from stream.config import ConfigError, OutputSpec, PipelineConfig, ScanSpec, validate
from stream.files.previews import MISSING_COLOUR
from stream.session import Session, coordinator
from stream.transport.net import free_port_block
from stream.transport.protocol import Geometry


def test_connect_takes_one_address_or_a_list_and_sources_expands_each():
    s = Session("tcp://127.0.0.1:6001", console=False)  # a string is one address, not characters
    assert s.connect == ["tcp://127.0.0.1:6001"]
    s = Session(connect=["tcp://127.0.0.1:6001"], sources=4, console=False)  # as simulate --sources 4
    assert s.connect == [f"tcp://127.0.0.1:{p}" for p in (6001, 6002, 6003, 6004)]
    s = Session(["tcp://a:7000", "tcp://b:7000"], sources=2, console=False)
    assert s.connect == ["tcp://a:7000", "tcp://a:7001", "tcp://b:7000", "tcp://b:7001"]


@pytest.mark.parametrize("connect, sources, words", [
    ("tcp://127.0.0.1:6001", 0, "sources must be a whole number >= 1"),
    ("tcp://127.0.0.1:6001", 2.5, "sources must be a whole number >= 1"),
    ("127.0.0.1:6001", 1, "must look like tcp://HOST:PORT"),
    ([6001], 1, "connect"),
    ([], 1, "no source to connect to"),
])
def test_bad_connect_or_sources_is_a_config_error(connect, sources, words):
    with pytest.raises(ConfigError, match=words):
        Session(connect, sources=sources, console=False)


@pytest.mark.parametrize("rate, view, expected", [(2.0, None, 2.0), (2.0, "127.0.0.1:0", 4.0),
                                                   (0.0, "127.0.0.1:0", 0.0), (10.0, "127.0.0.1:0", 10.0)])
def test_a_viewer_gets_live_images_at_least_four_times_a_second(rate, view, expected):
    """docs/VIEWER.md: a session serving the viewer raises [live] rate_hz to 4 (the page's
    >= 2 fills a second), keeps a higher one, and 0 (live results off) stays off."""
    from dataclasses import replace

    from stream.config import LiveSpec
    cfg = replace(PipelineConfig(), live=LiveSpec(rate_hz=rate))
    assert Session("tcp://127.0.0.1:1", config=cfg, view=view).config.live.rate_hz == expected


def test_live_of_an_unknown_scan_says_so():
    s = Session("tcp://127.0.0.1:6001", console=False)
    with pytest.raises(KeyError, match="no scan 'nope' in this session; running: none"):
        s.live("nope")


class _SlowStream:
    """A console stream whose every write takes a moment, as a busy terminal's can: lines
    written by two threads would mix if a line were more than one write."""

    def __init__(self):
        self.parts: list[str] = []

    def write(self, text):
        time.sleep(1e-4)
        self.parts.append(text)

    def flush(self):
        pass


def test_console_lines_from_two_threads_never_mix_and_unless_holds_a_line_back():
    import threading

    stream = _SlowStream()
    console = coordinator.Console(stream=stream)
    said = {f"{who} says line {i}" for who in ("coordinator", "main") for i in range(100)}

    def talk(who):
        for i in range(100):
            console.say(f"{who} says line {i}")

    threads = [threading.Thread(target=talk, args=(who,)) for who in ("coordinator", "main")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = "".join(stream.parts).split("\n")
    assert lines[-1] == "" and set(lines[:-1]) == said and len(lines) == len(said) + 1

    stopped = threading.Event()
    console.say("a source closed", unless=stopped)
    stopped.set()
    console.say("stopping")
    console.say("another source closed", unless=stopped)  # after 'stopping': held back
    assert "".join(stream.parts).endswith("a source closed\nstopping\n")


def _wait_for(predicate, timeout_s):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_a_source_nobody_listens_at_is_named_then_its_arrival(client2, tmp_path, capsys):
    """ZeroMQ retries a wrong port silently; the session says after a few seconds which
    sources no receiver reaches, and when they come."""
    from sim_detector.publisher import Publisher

    port = free_port_block(2)
    cfg = validate(PipelineConfig(output=OutputSpec(dir=str(tmp_path), previews=False)))
    with Session(f"tcp://127.0.0.1:{port}", sources=2, config=cfg, client=client2) as s:
        t0 = time.monotonic()
        assert _wait_for(lambda: "no receiver could connect" in capsys.readouterr().out,
                         coordinator.LINK_GRACE_S + 20)
        took = time.monotonic() - t0
        assert coordinator.LINK_GRACE_S - 1 <= took
        assert s.links() == {f"tcp://127.0.0.1:{port + k}": "nothing accepts the connection there" for k in (0, 1)}
        from stream.security import source_keys
        with Publisher(f"tcp://127.0.0.1:{port}", 2, linger_s=0, curve=source_keys()):
            assert _wait_for(lambda: s.links() == {}, 30)
            assert _wait_for(lambda: "connected to all 2 source(s)" in capsys.readouterr().out, 10)
        assert _wait_for(lambda: "closed their connection" in capsys.readouterr().out, 15)


def test_the_printed_warning_names_the_addresses(client2, tmp_path, capsys):
    port = free_port_block(3)
    cfg = validate(PipelineConfig(output=OutputSpec(dir=str(tmp_path), previews=False)))
    with Session(f"tcp://127.0.0.1:{port}", sources=3, config=cfg, client=client2):
        out = []
        assert _wait_for(lambda: out.append(capsys.readouterr().out) or "waiting for the detector" in "".join(out),
                         coordinator.LINK_GRACE_S + 20)
    text = next(line for line in "".join(out).splitlines() if line.startswith("waiting for the detector"))
    assert f"no receiver could connect to 3 of 3 source(s) yet: tcp://127.0.0.1:{port}..{port + 2} " \
           "(nothing accepts the connection there)" in text
    assert f"stemstream simulate --bind tcp://127.0.0.1:{port} --sources 3" in text


def test_previews_of_a_scan_with_missing_frames_show_them_in_their_colour(client2, scripted_source, tmp_path):
    """Frames lost on their way: the written previews mark the missing positions (the
    completeness map's) in the missing colour; a complete scan's previews have none of it."""
    g = Geometry((16, 20), (24, 24), mrad_per_px=1.0, convergence_mrad=5.0, center=(11.5, 11.5))
    rng = np.random.default_rng(0)
    counts = rng.poisson(30, g.n_frames).astype(np.uint32)
    indices = rng.integers(0, 24 * 24, int(counts.sum())).astype(np.uint32)
    src = scripted_source(2)
    cfg = validate(PipelineConfig(output=OutputSpec(dir=str(tmp_path), previews=True), scan=ScanSpec(timeout_s=1.5)))
    lost = np.r_[60:100, 200:203]
    with Session(src.addresses, config=cfg, client=client2, console=False) as s:
        src.wait_for_receivers()
        for scan_id, only in (("gaps", np.setdiff1d(np.arange(g.n_frames), lost)), ("whole", None)):
            src.start(scan_id, g, {"scan_step_A": 0.5})
            src.frames(scan_id, g, counts, indices, only=only)
            src.end(scan_id, g.n_frames)
            r = s.wait(scan_id, timeout=90)
            assert _wait_for(lambda r=r: len(r.previews) >= 5, 60), r.previews
            with h5py.File(r.path) as f:
                missing = f["completeness/position_frames"][()] < 2  # 1 frame x 2 sources each
            assert missing.sum() == (0 if only is None else len(lost))
            png = np.asarray(Image.open(tmp_path / "previews" / f"{scan_id}_bf.png").convert("RGB"))
            green = (np.abs(png.astype(int) - [int(MISSING_COLOUR[i:i + 2], 16) for i in (1, 3, 5)])
                     .max(axis=-1) <= 8)
            if only is None:
                assert not green.any()
            else:  # 43 of 320 positions: the colour covers a matching share of the image's pixels
                assert green.sum() > 0.5 * missing.mean() * (png.shape[0] * png.shape[1]) * 0.3
