"""The live viewer: drawn shapes → masks, the page's images, files it writes, its token, the
ad-hoc operators it runs where the events are, and the page itself in a real headless
Chromium during an emulated scan on a real cluster.

Every expected number is a dense numpy computation over the same electrons (or the shape's
definition, computed here another way); none comes from the code under test.
"""

from __future__ import annotations

import asyncio
import os
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import h5py
import numpy as np
import pytest
from browser import available as browser_missing
from conftest import dense_frames

from operators.apertures import RealSpaceApertures
from operators.virtual import VirtualDetectors
from stream.config import (
    ChunkingSpec,
    LiveSpec,
    MemorySpec,
    OutputSpec,
    PipelineConfig,
    ScanSpec,
    build_operators,
    load_config,
    validate,
)
from stream.session import Session
from stream.transport.protocol import Geometry
from stream.viewer import exports, shapes
from stream.viewer.display import binned, com_rgba
from stream.viewer.server import ViewerError, ViewerServer, is_loopback, parse_address

# ------------------------------------------------------------------ shapes → masks

def centres(shape, center, scale):
    """Page coordinates (ky, kx) of every detector pixel centre."""
    r, c = np.mgrid[0:shape[0], 0:shape[1]]
    return (r - center[0]) * scale, (c - center[1]) * scale


def test_a_drawn_disk_and_annulus_select_the_pixels_whose_centre_is_inside():
    ax = shapes.DetectorAxes((40, 36), center=(19.2, 17.6), mrad_per_px=0.5)
    ky, kx = centres(ax.shape, ax.center, 0.5)
    d = np.hypot(ky - 1.3, kx + 2.1)
    np.testing.assert_array_equal(shapes.disk(ax, 1.3, -2.1, 4.37), d <= 4.37)
    np.testing.assert_array_equal(shapes.annulus(ax, 1.3, -2.1, 2.2, 6.1), (d >= 2.2) & (d < 6.1))
    raw = shapes.DetectorAxes((40, 36), center=(19.2, 17.6))  # uncalibrated: px from the centre
    ky, kx = centres(raw.shape, raw.center, 1.0)
    np.testing.assert_array_equal(shapes.disk(raw, 0, 0, 5.5), np.hypot(ky, kx) <= 5.5)
    assert (ax.unit, raw.unit) == ("mrad", "px")


def test_a_drawn_polygon_selects_the_pixels_inside_it():
    ax = shapes.DetectorAxes((30, 30), center=(14.5, 14.5), mrad_per_px=2.0)
    ky, kx = centres(ax.shape, ax.center, 2.0)
    # a convex quadrilateral: inside = on the inner side of its four edges (cross products)
    ys, xs = np.array([-11.1, -6.3, 13.2, 9.9]), np.array([-9.7, 12.4, 8.8, -13.1])
    inside = np.ones(ax.shape, bool)
    for k in range(4):
        (y0, x0), (y1, x1) = (ys[k], xs[k]), (ys[(k + 1) % 4], xs[(k + 1) % 4])
        inside &= (x1 - x0) * (ky - y0) - (y1 - y0) * (kx - x0) >= 0
    if not inside.any():  # the vertices run the other way round
        inside = np.ones(ax.shape, bool)
        for k in range(4):
            (y0, x0), (y1, x1) = (ys[k], xs[k]), (ys[(k + 1) % 4], xs[(k + 1) % 4])
            inside &= (x1 - x0) * (ky - y0) - (y1 - y0) * (kx - x0) <= 0
    np.testing.assert_array_equal(shapes.detector_polygon(ax, ys, xs), inside)


def test_regions_of_probe_positions_rectangle_polygon_brush():
    ax = shapes.ScanAxes((20, 24), step_A=0.35)
    cy, cx = np.mgrid[0:20, 0:24]
    cy, cx = (cy + 0.5) * 0.35, (cx + 0.5) * 0.35  # position centres, Å
    want = (cy >= 1.0) & (cy < 3.1) & (cx >= 0.4) & (cx < 2.9)
    np.testing.assert_array_equal(shapes.rectangle(ax, 3.1, 1.0, 2.9, 0.4), want)  # corners any order
    assert shapes.rectangle_rows_cols(want) == [int(np.argmax(want.any(1))), 9, 1, 8]
    tri = shapes.scan_polygon(ax, [0.2, 0.2, 6.0], [0.2, 7.0, 0.2])  # right triangle at the corner
    np.testing.assert_array_equal(tri, (cy > 0.2) & (cx > 0.2) & ((cy - 0.2) / 5.8 + (cx - 0.2) / 6.8 < 1))
    # a brush stroke: every position whose centre is within r of the polyline (sampled densely)
    ys, xs, r = np.array([1.0, 2.0, 5.5]), np.array([1.0, 6.0, 6.5]), 0.8
    t = np.linspace(0, 1, 4001)[:, None]
    line = np.vstack([np.column_stack([ys[k] + t[:, 0] * (ys[k + 1] - ys[k]), xs[k] + t[:, 0] * (xs[k + 1] - xs[k])])
                      for k in range(2)])
    dist = np.min(np.hypot(cy.ravel()[:, None] - line[:, 0], cx.ravel()[:, None] - line[:, 1]), axis=1)
    want = (dist <= r + 1e-3).reshape(cy.shape)
    got = shapes.brush(ax, ys, xs, r)
    assert (got == want).mean() > 0.995 and got.sum() > 20  # sampling decides only at the very edge
    assert not got[dist.reshape(cy.shape) > r + 0.01].any() and got[dist.reshape(cy.shape) < r - 0.01].all()


@pytest.mark.parametrize("draw, message", [
    (lambda ax, sa: shapes.disk(ax, 500.0, 500.0, 1.0), "contains no pixel"),
    (lambda ax, sa: shapes.annulus(ax, 0, 0, 3.0, 2.0), "inner < outer"),
    (lambda ax, sa: shapes.detector_polygon(ax, [0, 1], [0, 1]), "at least 3 vertices"),
    (lambda ax, sa: shapes.scan_polygon(sa, [0, 1, np.nan], [0, 1, 2]), "finite"),
    (lambda ax, sa: shapes.brush(sa, [1], [1], 0.0), "radius must be > 0"),
    (lambda ax, sa: shapes.brush(sa, np.zeros(30_000), np.zeros(30_000), 1.0), "at most"),
])
def test_shapes_that_select_nothing_or_cannot_be_masks_say_why(draw, message):
    with pytest.raises(shapes.ShapeError, match=message):
        draw(shapes.DetectorAxes((20, 20), (9.5, 9.5), 1.0), shapes.ScanAxes((8, 8), 1.0))


# ------------------------------------------------------------------ display

def test_centre_of_mass_colours_and_binning():
    cy = np.array([[0.0, 1.0, 0.0, -1.0, np.nan]])
    cx = np.array([[1.0, 0.0, -1.0, 0.0, 0.0]])
    rgba = com_rgba(cy, cx, clip=1.0)
    channels = [(int(v) & 255, (int(v) >> 8) & 255, (int(v) >> 16) & 255, int(v) >> 24) for v in rgba.ravel()]
    assert channels[0] == (255, 0, 0, 255)      # +x: red
    assert channels[2] == (0, 255, 255, 255)    # -x: cyan (180°)
    assert channels[1][1] == 255 and channels[1][2] == 0   # +y (down): green-yellow (90°)
    assert channels[3][2] == 255 and channels[3][1] == 0   # -y: blue-violet (270°)
    assert channels[4][3] == 0                             # NaN: transparent
    img = np.arange(36.0).reshape(6, 6)
    img[0, 0] = np.nan
    b, f = binned(img, 4)  # 6x6 in blocks of 4: 2x2 blocks, the edge ones partial
    assert f == 4 and b.shape == (2, 2)
    assert b[0, 0] == pytest.approx(np.nanmean(img[:4, :4])) and b[1, 1] == pytest.approx(img[4:, 4:].mean())



@pytest.mark.parametrize("shape, factor", [((9, 7), 2), ((8, 8), 4), ((5, 6), 1), ((1, 11), 3)])
def test_block_means_are_numpy_nanmeans_of_the_blocks(shape, factor):
    """operators.blocks.block_mean against numpy's nanmean of each block, slice by slice
    (partial blocks at the edges, NaN and hidden pixels left out, empty blocks NaN)."""
    from operators.blocks import block_mean
    rng = np.random.default_rng(sum(shape) + factor)
    counts = rng.poisson(3.0, shape)
    hide = rng.random(shape) < 0.3
    comp = rng.normal(size=shape)
    comp[rng.random(shape) < 0.2] = np.nan
    for image, h in ((counts, hide), (comp, None), (comp.astype(np.float32), hide)):
        ref_in = np.where(hide, np.nan, image.astype(np.float64)) if h is not None else image.astype(np.float64)
        got = block_mean(image, factor, h)
        assert got.dtype == np.float32 and got.shape == (-(-shape[0] // factor), -(-shape[1] // factor))
        for by in range(got.shape[0]):
            for bx in range(got.shape[1]):
                block = ref_in[by * factor:(by + 1) * factor, bx * factor:(bx + 1) * factor]
                if np.isfinite(block).any():
                    assert got[by, bx] == pytest.approx(np.nanmean(block), rel=1e-6)
                else:
                    assert np.isnan(got[by, bx])
    with pytest.raises(ValueError, match="2-D"):
        block_mean(np.zeros(4), 2)


def test_live_images_at_the_pages_size_are_block_means_of_the_electrons_received(client2, scripted_source, tmp_path):
    """``[live] max_side``: the live channel carries each image averaged over blocks (the
    variant the session's own viewer gets, stream/session/live_view.py). Against dense numpy of
    the frames sent: each block's mean over the positions with electrons, the positions
    received (one bit each), and what the feed makes of it — the images, the positions shown
    as missing at every position, the dose so far."""
    from stream.session.live_view import unpack_received
    from stream.transport.net import free_port_block
    from stream.viewer.attach import AttachedSession
    from stream.viewer.feed import SessionFeed

    counts, indices, md = emulated(GEOM, seed=6)
    pub = f"tcp://127.0.0.1:{free_port_block(1)}"
    cfg = session_config(tmp_path)
    cfg = validate(PipelineConfig(**{**cfg.__dict__, "live": LiveSpec(rate_hz=5.0, publish=pub, max_side=8)}))
    src = scripted_source(2)
    with Session(src.addresses, config=cfg, client=client2, console=False) as s:
        attached = AttachedSession(pub, None)
        try:
            src.wait_for_receivers()
            src.start("small", GEOM, md)
            first = np.arange(0, 101)  # 7 rows and 3 positions: blocks partly received
            src.frames("small", GEOM, counts, indices, only=first, batch=6)
            wait_frames(s, "small", len(first))
            d = dense(counts, indices, GEOM, first)
            received = d.sum((2, 3)) > 0
            t0 = time.monotonic()
            while time.monotonic() - t0 < 30:  # the receivers' states follow the frame counts
                live = attached.live("small")
                if "received_positions" in live and \
                        (unpack_received(live["received_positions"], GEOM.scan_shape) == received).all():
                    break
                time.sleep(0.1)
            from stream.config import calibration, detector_regions
            disk = next(x for x in detector_regions(cfg, GEOM) if x["name"] == "bf")
            cy, cx = calibration(cfg, GEOM).center
            yy, xx = np.mgrid[0:GEOM.frame_shape[0], 0:GEOM.frame_shape[1]]
            inside = np.hypot(yy - cy, xx - cx) <= disk["outer_px"]  # closed disk (operators.virtual)
            bf_full = (d * inside).sum((2, 3))
            f = 2  # 16 x 14 positions to at most 8 a side
            assert live["bf"].dtype == np.float32 and live["bf"].shape == (8, 7)
            np.testing.assert_array_equal(unpack_received(live["received_positions"], GEOM.scan_shape), received)
            bf_ref = np.where(received, bf_full, np.nan)
            for by in range(8):
                for bx in range(7):
                    block = bf_ref[by * f:(by + 1) * f, bx * f:(bx + 1) * f]
                    want = np.nanmean(block) if np.isfinite(block).any() else np.nan
                    np.testing.assert_allclose(live["bf"][by, bx], want, rtol=1e-6)
            # the diffraction sum: 40 x 36 pixels averaged over 5 x 5 to 8 x 8, of the dense sum
            ds = d.sum((0, 1)).astype(float)
            ref = np.array([[ds[y * 5:(y + 1) * 5, x * 5:(x + 1) * 5].mean() for x in range(8)] for y in range(8)])
            np.testing.assert_allclose(live["diffraction_sum"], ref, rtol=1e-6)
            assert not {"com_n", "com_sum_y", "com_sum_x"} & set(live)
            feed = SessionFeed(attached)
            view = feed.view("small")
            np.testing.assert_array_equal(view.not_received, ~received)
            np.testing.assert_allclose(view.images["bf"].data, live["bf"], rtol=1e-6, equal_nan=True)
            per = int(counts[first].sum()) / received.sum()
            assert view.dose[0].startswith(f"dose so far {per / md['scan_step_A'] ** 2:.3g} e⁻/Å²"), view.dose
            src.frames("small", GEOM, counts, indices, only=np.arange(len(first), GEOM.n_frames), batch=9)
            src.end("small", GEOM.n_frames)
            s.wait("small", timeout=60)
        finally:
            attached.close()


# ------------------------------------------------------------------ files the viewer writes

def test_saved_apertures_are_a_configuration_process_takes(tmp_path):
    det = np.zeros((40, 36), bool)
    det[5:9, 20:31] = True
    region = np.zeros((12, 10), bool)
    region[[1, 2, 5], [3, 3, 7]] = True
    paths = exports.save_apertures(tmp_path, "grain1", detector=det, region=region, note="from a test")
    cfg = load_config(paths[0])
    g = Geometry((12, 10), (40, 36))
    ops = {type(op).__name__: op for op in build_operators(cfg, g)}
    assert "RealSpaceApertures" in ops
    np.testing.assert_array_equal(cfg.virtual[0].masks[0], det)
    np.testing.assert_array_equal(np.load(tmp_path / "grain1_region.npy"), region)
    with pytest.raises(exports.ExportError, match="exists"):
        exports.save_apertures(tmp_path, "grain1", detector=det)
    # a block of positions is written as a rect, no mask file
    block = np.zeros((12, 10), bool)
    block[2:6, 3:9] = True
    paths = exports.save_apertures(tmp_path, "block", region=block)
    assert tomllib.loads(paths[0].read_text())["aperture"] == [{"name": "block", "rect": [2, 6, 3, 9]}]
    assert len(paths) == 1
    for bad in ("", "1abc", "a/b", "com_x", "x" * 80):
        with pytest.raises(exports.ExportError):
            exports.save_apertures(tmp_path, bad, detector=det)


def test_an_exported_pattern_reads_back_exactly(tmp_path):
    import tifffile

    pattern = np.random.default_rng(1).integers(0, 5000, (40, 36))
    region = np.zeros((12, 10), bool)
    region[3:5, 2:4] = True
    h5, tif = exports.export_pattern(tmp_path, "p", pattern, region, "scan-1", mrad_per_px=0.5, center=(19.5, 17.5))
    with h5py.File(h5) as f:
        np.testing.assert_array_equal(f["pattern"][()], pattern)
        np.testing.assert_array_equal(f["region"][()], region)
        assert f["pattern"].attrs["n_positions"] == 4 and f["pattern"].attrs["mrad_per_px"] == 0.5
    t = tifffile.imread(tif)
    assert t.dtype == np.float32 and t.shape == (40, 36)
    np.testing.assert_array_equal(t, pattern)


# ------------------------------------------------------------------ the server's address and token

def test_addresses_and_tokens():
    assert parse_address("127.0.0.1:8800") == ("127.0.0.1", 8800)
    assert parse_address(":9000") == ("127.0.0.1", 9000)
    assert parse_address("9001") == ("127.0.0.1", 9001)
    assert parse_address("[::1]:8800") == ("::1", 8800)
    assert parse_address("http://localhost:8800/") == ("localhost", 8800)
    with pytest.raises(ViewerError, match="port must be a number"):
        parse_address("127.0.0.1:http")
    assert is_loopback("127.0.0.1") and is_loopback("::1") and not is_loopback("0.0.0.0")
    # any other address than loopback gets a token (made up, or from the environment)
    open_ = ViewerServer(None, "0.0.0.0:8800")
    assert open_.token and len(open_.token) >= 24 and f"?token={open_.token}" in open_.url
    os.environ["STEMSTREAM_VIEW_TOKEN"] = "from-the-environment"
    try:
        assert ViewerServer(None, "10.1.2.3:8800").token == "from-the-environment"
    finally:
        del os.environ["STEMSTREAM_VIEW_TOKEN"]
    assert ViewerServer(None, "127.0.0.1:8800").token is None
    with pytest.raises(ViewerError, match="at least 8"):
        ViewerServer(None, "127.0.0.1:8800", token="short")


class _NoScans:
    """A feed without scans: enough for the page to load."""

    def scans(self):
        return []

    def current(self):
        return None

    def rejects(self):
        return {}

    def view(self, scan_id):
        return None


def test_with_a_token_the_page_needs_it_and_then_a_cookie(tmp_path):
    server = ViewerServer(_NoScans(), "127.0.0.1:0", token="correct-horse-battery", save_dir=tmp_path).start()
    base = f"http://127.0.0.1:{server.port}/"
    try:
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
        for url in (base, base + "?token=wrong-horse-battery"):
            with pytest.raises(urllib.error.HTTPError) as e:  # redirected to the token form: 403
                urllib.request.urlopen(url, timeout=30)
            assert e.value.code == 403 and b"token" in e.value.read()
        with opener.open(base + "?token=correct-horse-battery", timeout=30) as r:
            assert r.status == 200 and b"Bokeh" in r.read()
        with opener.open(base, timeout=30) as r:  # the cookie is enough from now on
            assert r.status == 200
        # the page's websocket too: closed at once without the cookie, a session with it
        assert asyncio.run(_bokeh_websocket(server.port, None)) is None
        assert '"ACK"' in asyncio.run(_bokeh_websocket(server.port, "correct-horse-battery"))
    finally:
        server.close()


async def _bokeh_websocket(port: int, cookie: str | None):
    """The first message a Bokeh websocket client gets (None: the server closed it)."""
    from bokeh.util.token import generate_jwt_token, generate_session_id
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    headers = {"Origin": f"http://127.0.0.1:{port}"}
    if cookie:
        headers["Cookie"] = f"stemstream-viewer-{port}={cookie}"
    ws = await websocket_connect(HTTPRequest(f"ws://127.0.0.1:{port}/ws", headers=headers),
                                 subprotocols=["bokeh", generate_jwt_token(generate_session_id())])
    try:
        return await asyncio.wait_for(ws.read_message(), 30)
    finally:
        ws.close()


# ------------------------------------------------------------------ ad-hoc operators where the events are

GEOM = Geometry((16, 14), (40, 36), frames_per_position=1, mrad_per_px=0.5, convergence_mrad=4.0,
                center=(19.5, 17.5))


def emulated(geometry, seed=0, dose=60):
    """The detector emulator's electrons for ``geometry`` (an MgO slab) and its metadata."""
    from sim_detector.simulate import Beam, Detector, simulate_scan
    from sim_detector.simulate import ScanSpec as SimScan
    from sim_detector.specimens import make_specimen
    sim = simulate_scan(make_specimen("mgo", seed=seed), Beam(convergence_mrad=geometry.convergence_mrad, dose=dose),
                        Detector(shape=geometry.frame_shape, mrad_per_px=geometry.mrad_per_px),
                        SimScan(shape=geometry.scan_shape, frames_per_position=geometry.frames_per_position),
                        seed=seed, with_expected=False)
    return sim.counts, sim.indices, sim.metadata


def dense(counts, indices, geometry, frames):
    """(ny, nx, h, w) of the given frames only (raster order, fpp 1, no flyback)."""
    d = dense_frames(counts, indices, geometry.frame_shape)
    keep = np.zeros(geometry.n_frames, bool)
    keep[frames] = True
    d[~keep] = 0
    return d.reshape(*geometry.scan_shape, *geometry.frame_shape)


def session_config(tmp_path, **kw):
    return validate(PipelineConfig(chunking=ChunkingSpec(max_frames=32, max_latency_ms=20),
                                   scan=ScanSpec(timeout_s=kw.pop("timeout_s", 120.0)),
                                   output=OutputSpec(dir=str(tmp_path / "out"), previews=False),
                                   live=LiveSpec(rate_hz=kw.pop("live_rate", 4.0)),
                                   memory=MemorySpec(events_in_memory_mb=0.02)))  # most events spilled


def wait_frames(s, scan_id, n, timeout_s=60):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        st = [x for x in s.status() if x["scan_id"] == scan_id]
        if st and st[0]["frames_received"] >= n:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{n} frames of {scan_id} not received within {timeout_s} s")


def test_adhoc_operators_run_where_the_events_are_open_scan_and_file(client2, scripted_source, tmp_path):
    """A drawn detector and region over an open scan (the receivers' memory and spill files,
    two workers) and over its file equal dense numpy over the same frames."""
    counts, indices, md = emulated(GEOM, seed=3)
    det = shapes.disk(shapes.DetectorAxes(GEOM.frame_shape, GEOM.center, 0.5), 2.0, -1.5, 3.3)
    region = np.zeros(GEOM.scan_shape, bool)
    region[2:9, 3:6] = True
    region[12, 10] = True
    src = scripted_source(2)
    with Session(src.addresses, config=session_config(tmp_path), client=client2, console=False) as s:
        src.wait_for_receivers()
        src.start("adhoc", GEOM, md)
        first = np.arange(0, 150)
        src.frames("adhoc", GEOM, counts, indices, only=first, batch=5)
        wait_frames(s, "adhoc", len(first))
        image = s.apply("adhoc", VirtualDetectors(det[None], ["d"], GEOM.scan_shape))
        pattern = s.apply("adhoc", RealSpaceApertures(region[None], ["r"], GEOM.frame_shape))
        d = dense(counts, indices, GEOM, first)
        assert image.source == "receivers" and image.workers == 2 and image.events == int(counts[first].sum())
        np.testing.assert_array_equal(image.state["images"][0].reshape(GEOM.scan_shape), (d * det).sum((2, 3)))
        np.testing.assert_array_equal(pattern.state["patterns"][0].reshape(GEOM.frame_shape), d[region].sum(0))
        src.frames("adhoc", GEOM, counts, indices, only=np.arange(150, GEOM.n_frames), batch=7)
        src.end("adhoc", GEOM.n_frames)
        r = s.wait("adhoc", timeout=60)
        image = s.apply("adhoc", VirtualDetectors(det[None], ["d"], GEOM.scan_shape))
        d = dense(counts, indices, GEOM, np.arange(GEOM.n_frames))
        assert image.source == str(r.path)
        np.testing.assert_array_equal(image.state["images"][0].reshape(GEOM.scan_shape), (d * det).sum((2, 3)))
        with pytest.raises(KeyError, match="no scan"):
            s.apply("never-seen", VirtualDetectors(det[None], ["d"], GEOM.scan_shape))


def test_a_viewer_attached_from_another_process_sees_the_session_and_draws_on_its_cluster(
        client2, scripted_source, tmp_path):
    """``stemstream view``'s AttachedSession: the live channel gives progress, geometry and the
    partial images; the drawn detector runs on the session's receivers through the scheduler
    while the scan is open and on its file afterwards; the finished scan is found in --out
    (with the file's completeness), and the images the page would draw carry the units."""
    from stream.transport.net import free_port_block
    from stream.viewer.attach import AttachedSession
    from stream.viewer.feed import SessionFeed

    counts, indices, md = emulated(GEOM, seed=5)
    det = shapes.disk(shapes.DetectorAxes(GEOM.frame_shape, GEOM.center, 0.5), -1.0, 0.5, 2.7)
    pub = f"tcp://127.0.0.1:{free_port_block(1)}"
    cfg = session_config(tmp_path, timeout_s=10.0)  # the frames never sent: closed 10 s after the last message
    cfg = validate(PipelineConfig(**{**cfg.__dict__, "live": LiveSpec(rate_hz=5.0, publish=pub)}))
    src = scripted_source(2)
    with Session(src.addresses, config=cfg, client=client2, console=False) as s:
        attached = AttachedSession(pub, cfg.output.dir, client=client2)
        try:
            feed = SessionFeed(attached)
            src.wait_for_receivers()
            src.start("attached", GEOM, md)
            first = np.arange(0, 120)
            src.frames("attached", GEOM, counts, indices, only=first, batch=6)
            wait_frames(s, "attached", len(first))
            d = dense(counts, indices, GEOM, first)
            t0 = time.monotonic()
            while time.monotonic() - t0 < 30:  # the live channel's next snapshots carry them all
                st = attached.status()
                if st and st[0]["frames_received"] == len(first):
                    break
                time.sleep(0.1)
            assert st[0]["scan_id"] == "attached" and st[0]["state"] == "receiving"
            assert st[0]["n_frames"] == GEOM.n_frames and st[0]["events"] == int(counts[first].sum())
            np.testing.assert_array_equal(attached.live("attached")["bf"],
                                          s.live("attached")["bf"])  # what the session itself merged
            view = feed.view("attached")
            assert view.scan_axes.unit == "Å" and view.det_axes.unit == "mrad" and "bf" in view.images
            run = attached.apply("attached", VirtualDetectors(det[None], ["d"], GEOM.scan_shape))
            assert run.source == "receivers" and run.workers == 2
            np.testing.assert_array_equal(run.state["images"][0].reshape(GEOM.scan_shape), (d * det).sum((2, 3)))

            rest = np.arange(len(first), GEOM.n_frames)
            keep = rest[rest % 17 != 3]  # a few frames never sent: the file says so
            src.frames("attached", GEOM, counts, indices, only=keep, batch=9)
            src.end("attached", GEOM.n_frames)
            r = s.wait("attached", timeout=90)
            t0 = time.monotonic()
            while "attached" not in attached.results and time.monotonic() - t0 < 30:
                time.sleep(0.1)
            got = attached.results["attached"]
            assert (got.status, got.n_missing, got.events) == (r.status, r.n_missing, r.events)
            never_sent = np.setdiff1d(np.arange(GEOM.n_frames), np.concatenate([first, keep]))
            # the frames never sent are missing (on a loaded machine a few late ones may be too)
            assert set(never_sent.tolist()) <= set(r.missing_frames) and got.n_missing == len(r.missing_frames)
            d = dense(counts, indices, GEOM, np.setdiff1d(np.arange(GEOM.n_frames), r.missing_frames))
            run = attached.apply("attached", VirtualDetectors(det[None], ["d"], GEOM.scan_shape))
            assert run.source == str(r.path)
            np.testing.assert_array_equal(run.state["images"][0].reshape(GEOM.scan_shape), (d * det).sum((2, 3)))
            summary = next(x for x in feed.scans() if x.scan_id == "attached")
            assert summary.state == "incomplete" and summary.missing == got.n_missing
        finally:
            attached.close()
    # without a scheduler: the written scan is read by the viewer's own process
    here = AttachedSession(out=cfg.output.dir)
    try:
        run = here.apply("attached", VirtualDetectors(det[None], ["d"], GEOM.scan_shape))
        np.testing.assert_array_equal(run.state["images"][0].reshape(GEOM.scan_shape), (d * det).sum((2, 3)))
    finally:
        here.close()


# ------------------------------------------------------------------ the page in a real browser

# screenshots go here (pytest's own temporary directories are pruned by later runs)
ARTIFACTS = Path(os.environ.get("STEMSTREAM_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))
VIEW_GEOM = Geometry((24, 20), (64, 64), frames_per_position=1, mrad_per_px=0.5, convergence_mrad=4.0,
                     center=(31.5, 31.5))


@pytest.mark.skipif(browser_missing() is not None, reason=str(browser_missing()))
def test_the_page_in_chromium_fills_in_and_draws_exact_apertures(client2, scripted_source, tmp_path):
    """A session with the viewer; the emulator's scan sent in two halves. In headless Chromium:
    the images fill in; a disk dragged on the pattern gives the image of dense numpy over the
    frames received so far, a rectangle dragged on the bright field the summed pattern of its
    positions; after the scan both come again from the file and equal the whole scan's."""
    from browser import Browser

    g = VIEW_GEOM
    counts, indices, md = emulated(g, seed=7, dose=80)
    step = md["scan_step_A"]
    shots = ARTIFACTS / "viewer"
    shots.mkdir(parents=True, exist_ok=True)
    src = scripted_source(2)
    half = np.arange(g.n_frames * 11 // 24)  # the first 11 rows
    rest = np.arange(len(half), g.n_frames)
    # the drawn disk (mrad) and rectangle (Å): no pixel or position centre near their edges
    ky, kx, radius = 1.3, -0.7, 5.27
    y0, y1, x0, x1 = 2.3 * step, 7.7 * step, 4.2 * step, 9.6 * step
    hh, ww = np.mgrid[0:64, 0:64]
    disk_ref = np.hypot((hh - 31.5) * 0.5 - ky, (ww - 31.5) * 0.5 - kx) <= radius
    rows, cols = np.mgrid[0:g.scan_shape[0], 0:g.scan_shape[1]]
    rect_ref = ((rows + 0.5) * step >= y0) & ((rows + 0.5) * step < y1) & \
               ((cols + 0.5) * step >= x0) & ((cols + 0.5) * step < x1)

    browser = Browser()
    try:
        with Session(src.addresses, config=session_config(tmp_path), client=client2, console=False,
                     view="127.0.0.1:0") as s:
            assert s.viewer.url.startswith("http://127.0.0.1:") and "token" not in s.viewer.url
            src.wait_for_receivers()
            src.start("viewed", g, md)
            src.frames("viewed", g, counts, indices, only=half, batch=8)
            wait_frames(s, "viewed", len(half))
            d = dense(counts, indices, g, half)
            received = d.sum((2, 3)) > 0

            page = browser.page(s.viewer.url)
            bf = page.wait_for(lambda: _img_when(page, "src-bf", lambda a: np.isfinite(a).sum() == received.sum()),
                               90, "the bright field of the first half")
            assert bf.shape == g.scan_shape and not np.isfinite(bf[~received]).any()  # not there yet: missing
            page.screenshot(shots / "1-half.png")

            # a disk dragged on the pattern, from its centre to its edge
            a, b = page.screen("fig-diffraction_sum", [[kx, ky], [kx + radius, ky]])
            page.drag([a, b])
            drawn = page.wait_for(lambda: _img_when(page, "src-drawn", lambda x: x.shape == g.scan_shape),
                                  90, "the drawn detector's image")
            want = (d * disk_ref).sum((2, 3)).astype(float)
            np.testing.assert_array_equal(np.where(received, drawn, 0), want)
            assert "receivers" in page.prop("detector-status", "text")

            # a rectangle dragged on the bright field
            a, b = page.screen("fig-bf", [[x0, y0], [x1, y1]])
            page.drag([a, [(a[0] + b[0]) / 2, (a[1] + b[1]) / 2], b])
            pattern = page.wait_for(lambda: _img_when(page, "src-region", lambda x: x.shape == g.frame_shape),
                                    90, "the region's pattern")
            np.testing.assert_array_equal(pattern, d[rect_ref].sum(0))
            page.screenshot(shots / "2-drawn.png")

            # the rest of the scan: the images fill in, the apertures come from the file
            src.frames("viewed", g, counts, indices, only=rest, batch=8)
            src.end("viewed", g.n_frames)
            r = s.wait("viewed", timeout=60)
            assert r.status == "complete"
            d = dense(counts, indices, g, np.arange(g.n_frames))
            bf = page.wait_for(lambda: _img_when(page, "src-bf", lambda a: np.isfinite(a).all()), 60,
                               "the whole bright field")
            assert bf.shape == g.scan_shape
            want = (d * disk_ref).sum((2, 3))
            page.wait_for(lambda: _img_when(page, "src-drawn", lambda x: np.array_equal(x, want)), 60,
                          "the drawn detector's image of the whole scan")
            page.wait_for(lambda: _img_when(page, "src-region", lambda x: np.array_equal(x, d[rect_ref].sum(0))),
                          60, "the region's pattern of the whole scan")
            assert str(r.path) in page.prop("detector-status", "text")
            page.screenshot(shots / "3-complete.png")

            # a polygon on the pattern (press the first corner, click the next, press the last),
            # on the written scan; matplotlib's point-in-polygon over the pixel centres is the reference
            from matplotlib.path import Path as MplPath
            corners = [(-6.0, -4.0), (-6.0, 4.0), (4.0, 9.0), (4.0, -9.0)]  # (ky, kx) mrad; no pixel centre near an edge
            inside = MplPath([(x, y) for y, x in corners]).contains_points(
                np.column_stack([((ww - 31.5) * 0.5).ravel(), ((hh - 31.5) * 0.5).ravel()])).reshape(64, 64)
            page.set("pattern-mode", "active", 2)
            time.sleep(1.0)  # the tools switch in Python, then on the page
            pts = page.screen("fig-diffraction_sum", [[x, y] for y, x in corners])
            page.press(*pts[0])
            for p in pts[1:-1]:
                page.click(*p)
                time.sleep(0.3)
            page.press(*pts[-1])
            want = (d * inside).sum((2, 3))
            page.wait_for(lambda: _img_when(page, "src-drawn", lambda x: np.array_equal(x, want)), 90,
                          "the drawn polygon's image of the whole scan")
            assert "polygon of 4 vertices" in page.prop("detector-status", "text")
            page.screenshot(shots / "4-polygon.png")
            assert not browser.errors, browser.errors
    finally:
        browser.close()
        print(f"\nviewer screenshots: {shots}")


def html_escape(text: str) -> str:
    import html
    return html.escape(text)


def _img_when(page, source, ok):
    img = page.image(source)
    return img if img is not None and img.size > 1 and ok(img) else None


@pytest.mark.skipif(browser_missing() is not None, reason=str(browser_missing()))
def test_demo_with_view_fills_in_the_page_and_stays_open(tmp_path):
    """``stemstream demo --view``: the scan waits for the page, the page sees the bright field
    partly filled while the emulator streams, then whole and equal to the file's; the scan
    list shows it complete; the viewer stays until Ctrl-C, which ends the demo cleanly."""
    import re
    import signal

    from browser import Browser
    from test_cli import Cli

    from stream.transport.net import free_port_block

    port = free_port_block(1)
    out = tmp_path / "out"
    cli = Cli(["demo", "--scan", "24x24", "--detector", "64x64", "--out", out, "--rate", "150",
               "--sources", "2", "--workers", "2", "--counting-dose", "0", "--view", f"127.0.0.1:{port}"])
    browser = Browser()
    try:
        line = cli.wait_for(r"open http://127\.0\.0\.1:\d+/ in a browser", 240)
        page = browser.page(re.search(r"http://\S+", line).group(0))
        page.wait_for(lambda: _img_when(page, "src-bf", lambda a: 0 < np.isfinite(a).sum() < a.size), 180,
                      "a partly filled bright field while the scan streams")
        page.screenshot(ARTIFACTS / "viewer" / "demo-live.png")
        cli.wait_for(r"viewer stays open", 600)
        with h5py.File(out / "demo-0000.h5") as f:
            bf = f["results/bf"][()]
        page.wait_for(lambda: _img_when(page, "src-bf", lambda a: np.array_equal(a, bf)), 60,
                      "the whole bright field, as in the file")
        page.wait_for(lambda: "complete" in (page.prop("scans", "data") or {}).get("status", []), 30,
                      "the scan listed as complete")
        # the dose (electrons of the file over its positions and the step²) and the advice its
        # stages stored, with the column precision the median of the columns' Cramér–Rao bounds
        import json
        with h5py.File(out / "demo-0000.h5") as f:
            electrons = int(f["events/offsets"][-1])
            step = float(f["metadata"].attrs["scan_step_A"])
            crb_pm = 100 * np.nanmedian(f["stages/columns/position_crb_A"][()])
            stored = json.loads(f["stages/counting/dose_advice"].attrs["lines"])
        per = electrons / (24 * 24)
        text = page.wait_for(lambda: t if "stage counting" in (t := page.prop("dose", "text") or "") else None, 120,
                             "the dose advice of the written scan")
        assert f"dose {per / step ** 2:.3g} e⁻/Å² ({per:.3g} e⁻ per probe position)" in text, text
        assert all(html_escape(line) in text for line in stored), (text, stored)
        if np.isfinite(crb_pm):
            assert f"±{crb_pm:.2g} pm" in text, (text, crb_pm)
        else:  # this small scan's columns stage found none: the advice says so
            assert "no columns found" in text, text
        page.screenshot(ARTIFACTS / "viewer" / "demo-done.png")
        assert "complete" in cli.stdout and not browser.errors, (cli.stdout, browser.errors)
        os.killpg(cli.p.pid, signal.SIGINT)
        assert cli.wait(120) == 0, cli.stderr
    finally:
        browser.close()
        cli.kill()


# the page's own record of every new bright field it received: (ms since epoch, the values)
WATCH_JS = """(name) => { window.__seen = []; let last = null;
  window.__watch = setInterval(() => { const m = Bokeh.documents[0].get_model_by_name(name);
    const d = m ? m.data.image[0] : null;
    if (d && d !== last && d.length > 1) {
      last = d; window.__seen.push([Date.now(), Array.from(d, v => Number.isNaN(v) ? null : v)]); } }, 10); }"""


@pytest.mark.skipif(browser_missing() is not None, reason=str(browser_missing()))
@pytest.mark.parametrize("seconds, min_rate", [(8.0, None), pytest.param(12.0, 2.0, marks=pytest.mark.slow)])
def test_the_page_fills_in_repeatedly_while_the_scan_streams(client2, scripted_source, tmp_path, seconds, min_rate):
    """The emulator's scan sent over ``seconds`` (live rate 4 per second); the page, open
    before it, records every new bright field it receives. While frames arrive it shows several
    partial images, each with more electrons than the last and, where it has a value, at most
    the value of the written file; the slow variant asserts at least ``min_rate`` a second."""
    from browser import Browser

    g = VIEW_GEOM
    counts, indices, md = emulated(g, seed=11, dose=80)
    src = scripted_source(2)
    browser = Browser()
    try:
        with Session(src.addresses, config=session_config(tmp_path, live_rate=4.0), client=client2, console=False,
                     view="127.0.0.1:0") as s:
            page = browser.page(s.viewer.url)
            page.wait_for(lambda: page.prop("src-bf", "data") is not None, 60, "the bright field's panel, built "
                          "before the scan")
            time.sleep(1.0)
            page.js(WATCH_JS, "src-bf")
            src.wait_for_receivers()
            src.start("filling", g, md)
            batches = np.array_split(np.arange(g.n_frames), int(seconds * 4))
            t_first = time.time()
            for k, frames in enumerate(batches):
                src.frames("filling", g, counts, indices, only=frames, batch=len(frames))
                time.sleep(max(0.0, t_first + (k + 1) * seconds / len(batches) - time.time()))
            t_last = time.time()
            src.end("filling", g.n_frames)
            r = s.wait("filling", timeout=60)
            with h5py.File(r.path) as f:
                bf = f["results/bf"][()].astype(float)
            page.wait_for(lambda: _img_when(page, "src-bf", lambda a: np.array_equal(a, bf)), 60,
                          "the whole bright field")
            seen = page.js("() => window.__seen")
            # the centre of mass as arrows: at most 16 a side, from the centres of 2 x 2 blocks here
            x0 = page.js("() => Array.from(Bokeh.documents[0].get_model_by_name('com-arrows').data.x0)")
            step = md["scan_step_A"]
            np.testing.assert_allclose(sorted(x0), sorted(np.tile((2 * np.arange(g.scan_shape[1] // 2) + 1) * step,
                                                                  g.scan_shape[0] // 2)))
            page.screenshot(ARTIFACTS / "viewer" / "filling.png")
    finally:
        browser.close()
    partial = []
    for t_ms, values in seen:
        img = np.array([np.nan if v is None else v for v in values], float).reshape(g.scan_shape)
        if t_first <= t_ms / 1000 <= t_last and 0 < np.isfinite(img).sum() < img.size:
            partial.append(img)
    filled = [int(np.isfinite(a).sum()) for a in partial]
    assert len(partial) >= 2, f"only {len(partial)} partial images seen in {seconds:g} s: {filled}"
    # positions only fill, and each picture holds more electrons than the last: a frame's two
    # sources' parts can come in different snapshots, so the positions need not grow every time
    assert filled == sorted(filled), filled
    electrons = [float(np.nansum(a)) for a in partial]
    assert all(b > a for a, b in zip(electrons, electrons[1:])), (filled, electrons)
    before = np.zeros(g.scan_shape)
    for img in partial:  # counts only grow, up to the file's (a frame's parts come from both sources)
        have = np.isfinite(img)
        assert (img[have] <= bf[have]).all() and (img[have] >= before[have]).all()
        before = np.where(have, img, before)
    if min_rate is not None:
        rate = len(partial) / (t_last - t_first)
        assert rate >= min_rate, f"{rate:.2f} partial images a second ({filled})"


def test_stemstream_view_with_a_wrong_key_is_refused_in_one_line(client2, tmp_path):
    """``stemstream view`` with another key directory than the session's: the session's live
    channel refuses it in the CURVE handshake, and the command says so in one line naming the
    fix (exit 2) instead of showing an empty page for ever."""
    from test_cli import Cli

    from stream.transport.net import free_port_block

    pub = f"tcp://127.0.0.1:{free_port_block(1)}"
    cfg = session_config(tmp_path)
    cfg = validate(PipelineConfig(**{**cfg.__dict__, "live": LiveSpec(rate_hz=2.0, publish=pub)}))
    with Session([f"tcp://127.0.0.1:{free_port_block(1)}"], config=cfg, client=client2, console=False):
        cli = Cli(["view", "--subscribe", pub, "--curve-keys", tmp_path / "not-the-sessions-keys",
                   "--view", "127.0.0.1:0"])
        try:
            assert cli.wait(120) == 2, (cli.stdout, cli.stderr)
        finally:
            cli.kill()
    errors = [x for x in cli.err if x.strip()]
    assert len(errors) == 1, cli.stderr
    assert errors[0].startswith("stemstream view: error: the session's live channel") and "refused" in errors[0]
    assert "--curve-keys" in errors[0] and "live_clients" in errors[0] and str(tmp_path) in errors[0]


def test_centre_of_mass_arrows_are_block_means_scaled_to_the_block():
    """The quiver of the centre of mass against plain numpy: block means of a known field
    (NaN left out), from block centres, the 95th-percentile arrow one block long."""
    from stream.viewer.display import com_arrows

    rng = np.random.default_rng(4)
    cy, cx = rng.normal(size=(50, 30)), rng.normal(size=(50, 30)) + 0.5
    cy[3, 4] = cx[3, 4] = np.nan
    a = com_arrows(cy, cx, step=0.25, max_side=24)
    f = 3  # 50 rows in at most 24 blocks
    assert a["block"] == f and a["length"] == pytest.approx(0.75)
    want_y, want_x, centres = [], [], []
    for r in range(0, 50, f):
        for c in range(0, 30, f):
            by, bx = cy[r:r + f, c:c + f], cx[r:r + f, c:c + f]
            want_y.append(np.nanmean(by))
            want_x.append(np.nanmean(bx))
            centres.append(((r + min(r + f, 50)) / 2 * 0.25, (c + min(c + f, 30)) / 2 * 0.25))
    want_y, want_x, centres = np.array(want_y), np.array(want_x), np.array(centres)
    scale = np.percentile(np.hypot(want_y, want_x), 95)
    assert a["scale"] == pytest.approx(scale, rel=1e-5)
    np.testing.assert_allclose(a["y0"], centres[:, 0])
    np.testing.assert_allclose(a["x0"], centres[:, 1])
    np.testing.assert_allclose(a["y1"] - a["y0"], want_y / scale * 0.75, rtol=1e-5)
    np.testing.assert_allclose(a["x1"] - a["x0"], want_x / scale * 0.75, rtol=1e-5)


def _segment_distance(py, px, ys, xs):
    """Distance of points (py, px) to the polyline (ys, xs), exactly (projection on each segment)."""
    best = np.full(py.shape, np.inf)
    for k in range(len(ys) - 1):
        ay, ax_, by, bx = ys[k], xs[k], ys[k + 1], xs[k + 1]
        dy, dx = by - ay, bx - ax_
        L2 = dy * dy + dx * dx
        t = np.clip(((py - ay) * dy + (px - ax_) * dx) / L2, 0, 1) if L2 > 0 else np.zeros(py.shape)
        best = np.minimum(best, np.hypot(py - (ay + t * dy), px - (ax_ + t * dx)))
    return best


@pytest.mark.skipif(browser_missing() is not None, reason=str(browser_missing()))
def test_annulus_lasso_and_brush_drawn_in_chromium_equal_dense_numpy(client2, scripted_source, tmp_path):
    """On a written scan, in headless Chromium: an annulus dragged on the pattern, a lasso and a
    brush stroke dragged on the bright field. Each result equals dense numpy over the scan's
    electrons with the shape the page drew (its centre and radii as the page's fields show
    them; the lasso's and the stroke's vertices as the page holds them), the pixels or
    positions selected by their centres, computed here without the viewer's code."""
    from browser import Browser
    from matplotlib.path import Path as MplPath

    g = VIEW_GEOM
    counts, indices, md = emulated(g, seed=9, dose=80)
    step = md["scan_step_A"]
    src = scripted_source(2)
    browser = Browser()
    shots = ARTIFACTS / "viewer"
    shots.mkdir(parents=True, exist_ok=True)
    try:
        with Session(src.addresses, config=session_config(tmp_path), client=client2, console=False,
                     view="127.0.0.1:0") as s:
            src.wait_for_receivers()
            src.start("shapes", g, md)
            src.frames("shapes", g, counts, indices, batch=16)
            src.end("shapes", g.n_frames)
            r = s.wait("shapes", timeout=60)
            d = dense(counts, indices, g, np.setdiff1d(np.arange(g.n_frames), r.missing_frames))
            page = browser.page(s.viewer.url)
            page.wait_for(lambda: _img_when(page, "src-bf", lambda a: np.isfinite(a).all()), 90, "the bright field")

            # annulus: drag from its centre to its outer edge; inner = outer x 0.5
            page.set("pattern-mode", "active", 1)
            time.sleep(1.0)
            a, b = page.screen("fig-diffraction_sum", [[0.8, -1.1], [0.8 + 9.1, -1.1]])
            page.drag([a, b])
            page.wait_for(lambda: "annulus" in (page.prop("detector-status", "text") or "")
                          and _img_when(page, "src-drawn", lambda x: x.shape == g.scan_shape), 90, "the annulus image")
            cy, cx, inner, outer = (page.prop(f"det-{k}", "value") for k in ("y", "x", "inner", "outer"))
            hh, ww = np.mgrid[0:64, 0:64]
            dist = np.hypot((hh - 31.5) * 0.5 - cy, (ww - 31.5) * 0.5 - cx)
            assert not (np.abs(dist - outer) < 1e-4).any() and not (np.abs(dist - inner) < 1e-4).any()
            ring = (dist >= inner) & (dist < outer)
            assert inner == pytest.approx(outer * 0.5, rel=1e-4) and ring.sum() > 50
            want = (d * ring).sum((2, 3))
            page.wait_for(lambda: _img_when(page, "src-drawn", lambda x: np.array_equal(x, want)), 90,
                          "the annulus image equal to dense numpy")

            # lasso around a blob of positions on the bright field
            rows, cols = np.mgrid[0:g.scan_shape[0], 0:g.scan_shape[1]]
            pcy, pcx = (rows + 0.5) * step, (cols + 0.5) * step
            page.set("region-mode", "active", 1)
            time.sleep(1.0)
            loop = [(3.3, 2.2), (3.1, 12.6), (9.7, 14.4), (15.2, 8.1), (11.4, 3.7)]  # (row, col) of the corners
            pts = page.screen("fig-bf", [[c * step, r_ * step] for r_, c in loop + loop[:1]])
            page.drag(pts, steps=6)
            page.wait_for(lambda: "lasso" in (page.prop("region-status", "text") or ""), 90, "the lasso region")
            lasso = page.js("() => { const d = Bokeh.documents[0].get_model_by_name('region-lasso').data;"
                            " return [Array.from(d.xs[0]), Array.from(d.ys[0])]; }")
            inside = MplPath(np.column_stack(lasso)).contains_points(
                np.column_stack([pcx.ravel(), pcy.ravel()])).reshape(g.scan_shape)
            assert 20 < inside.sum() < inside.size
            page.wait_for(lambda: _img_when(page, "src-region", lambda x: np.array_equal(x, d[inside].sum(0))), 90,
                          "the lasso's pattern equal to dense numpy")
            page.screenshot(shots / "5-lasso.png")

            # brush: a stroke of radius 1.3 positions
            page.set("region-mode", "active", 3)
            page.set("brush-radius", "value", 1.3 * step)
            time.sleep(1.0)
            stroke = [(18.0, 2.0), (14.0, 9.0), (19.0, 16.0)]
            pts = page.screen("fig-bf", [[c * step, r_ * step] for r_, c in stroke])
            page.drag(pts, steps=10)
            page.wait_for(lambda: "brush" in (page.prop("region-status", "text") or ""), 90, "the brush region")
            xs, ys = page.js("() => { const d = Bokeh.documents[0].get_model_by_name('region-stroke').data;"
                             " return [Array.from(d.xs[d.xs.length - 1]), Array.from(d.ys[d.ys.length - 1])]; }")
            radius = page.prop("brush-radius", "value")
            dist = _segment_distance(pcy, pcx, np.array(ys, float), np.array(xs, float))
            assert not (np.abs(dist - radius) < 1e-3).any()
            brushed = dist <= radius
            assert brushed.sum() > 20
            page.wait_for(lambda: _img_when(page, "src-region", lambda x: np.array_equal(x, d[brushed].sum(0))), 90,
                          "the brushed pattern equal to dense numpy")
            page.screenshot(shots / "6-brush.png")
            assert not browser.errors, browser.errors
    finally:
        browser.close()
