"""Our counting against stempy's own (the ``peers`` extra, stempy 3.6): the emulator's raw
frames written as 4D Camera raw files, counted by stempy's readers and ``electron_count``,
and by ``ElectronCounter`` with the same dark and thresholds, frame by frame, event by event
(docs/COUNTING.md says which stempy path has which dark semantics, and where we differ)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from operators.electron_counting import ElectronCounter, compute_thresholds

stempy_io = pytest.importorskip("stempy.io", reason="the peers extra (stempy) is not installed")
stempy_image = pytest.importorskip("stempy.image", reason="the peers extra (stempy) is not installed")
pytestmark = pytest.mark.peers
SCAN = (6, 8)  # ny, nx
NSIGMA = dict(number_of_samples=40, background_threshold_n_sigma=4.5, xray_threshold_n_sigma=175.0)


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """48 emulated raw frames (MgO, 100 e-/frame over a wide bright-field disk, X-rays at
    0.5 per frame), their 4D Camera files, and a fractional dark measured from dark frames."""
    from sim_detector.raw import RawDetector, RawFrames
    from sim_detector.rawfile import RawFileWriter
    from sim_detector.simulate import Beam, Detector, ScanSpec, simulate_scan
    from sim_detector.specimens import make_specimen

    sim = simulate_scan(make_specimen("mgo", seed=1), Beam(dose=100.0), Detector(mrad_per_px=0.12),
                        ScanSpec(shape=SCAN), seed=1, with_expected=False)
    rf = RawFrames(RawDetector(xray_rate=0.5), (576, 576), seed=1)
    frames = rf.frames(0, sim.counts, sim.indices)
    dark_frames = rf.frames(10_000, np.zeros(16, np.uint32), np.zeros(0, np.uint32))
    dark = dark_frames.mean(0).astype(np.float32)  # fractional; about half the pixels of a frame lie below it
    d = tmp_path_factory.mktemp("raw")
    with RawFileWriter(d, scan_number=1, raster_shape=SCAN) as w:
        w.write(0, frames)
    return frames, dark, [str(p) for p in w.files]


def stempy_events(sparse, n):
    return [np.asarray(sparse.data[i][0]) for i in range(n)]


def ours(frames, dark, bg, xray, **kw):
    c = ElectronCounter((576, 576), dark, bg, xray, **{"ties": "none", "xray_neighbours": "kept", **kw})
    counts, indices = c.count(frames)
    off = np.r_[0, np.cumsum(counts.astype(np.int64))]
    return [indices[off[i]:off[i + 1]] for i in range(len(frames))]


def assert_same(a, b):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        np.testing.assert_array_equal(x, y, err_msg=f"frame {i}")
    assert sum(map(len, a)) > 1000


def test_multipass_electron_count_with_its_own_thresholds(raw):
    """stempy's non-deprecated path: the multi-pass reader, dark zero (NCEM's practice), its
    thresholds from the first frame (one block, so every sample is that frame)."""
    frames, _, files = raw
    zeros = np.zeros((576, 576), np.float32)
    reader = stempy_io.reader(files, version=5, backend="multi-pass", threads=1)
    ec = stempy_image.electron_count(reader, zeros, threshold_num_blocks=1, **NSIGMA)
    md = ec.metadata["electron_counting"]
    # the thresholds: the same algorithm on the same 40 samples
    t = compute_thresholds([frames[0]] * 40, zeros, background_n_sigma=4.5, xray_n_sigma=175.0)
    for ours_key, theirs in [("background_threshold", "background_threshold"), ("xray_threshold", "x_ray_threshold"),
                             ("optimized_mean", "optimized_mean"), ("optimized_std_dev", "optimized_std_dev"),
                             ("mean", "mean"), ("std_dev", "std_dev")]:
        assert t[ours_key] == pytest.approx(md[theirs], rel=1e-9), ours_key
    # the events, with stempy's thresholds
    assert_same(ours(frames, None, md["background_threshold"], md["x_ray_threshold"]),
                stempy_events(ec, len(frames)))


def test_classic_reader_with_a_fractional_dark_and_explicit_thresholds(raw):
    """The classic SectorReader rounds a fractional dark the other way (raw - ceil(dark) above
    the background): our 'classic' semantics; thresholds given, as stempy issue 212 asks."""
    frames, dark, files = raw
    opt = stempy_image._image.ElectronCountOptionsClassic()
    opt.dark_reference = dark
    opt.background_threshold, opt.x_ray_threshold = 6.3, 400.0
    opt.gain = None
    opt.scan_dimensions = (SCAN[1], SCAN[0])
    opt.apply_row_dark_subtraction = False
    opt.optimized_mean = 0.0
    opt.apply_row_dark_use_mean = True
    reader = stempy_io.reader(files, version=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        sparse = stempy_image._image.electron_count(reader.begin(), reader.end(), opt)
    assert_same(ours(frames, dark, 6.3, 400.0, semantics="classic"), stempy_events(sparse, len(frames)))
    # the other rounding gives other events: the semantics matter
    threaded = ours(frames, dark, 6.3, 400.0, semantics="threaded")
    assert sum(len(np.setxor1d(a, b)) for a, b in zip(threaded, stempy_events(sparse, len(frames)))) > 10


def test_electron_count_frame_with_a_gain_map(raw):
    frames, dark, _ = raw
    gain = np.random.default_rng(2).uniform(0.9, 1.1, (576, 576)).astype(np.float32)
    theirs = [np.asarray(stempy_image.electron_count_frame(f, darkreference=dark, background_threshold=6.3,
                                                           xray_threshold=400.0, gain=gain).data[0][0])
              for f in frames[:16]]
    assert_same(ours(frames[:16], dark, 6.3, 400.0, gain=gain), theirs)


@pytest.mark.parametrize("use_mean", [True, False])
def test_row_dark(raw, use_mean):
    frames, _, files = raw
    zeros = np.zeros((576, 576), np.float32)
    reader = stempy_io.reader(files, version=5, backend="multi-pass", threads=1)
    ec = stempy_image.electron_count(reader, zeros, threshold_num_blocks=1, apply_row_dark=True,
                                     apply_row_dark_use_mean=use_mean, **NSIGMA)
    md = ec.metadata["electron_counting"]
    mine = ours(frames, None, md["background_threshold"], md["x_ray_threshold"],
                row_dark="mean" if use_mean else "median", optimized_mean=md["optimized_mean"])
    assert_same(mine, stempy_events(ec, len(frames)))


def test_where_we_differ_from_stempy_on_purpose(raw):
    """Our defaults: a plateau of equal maxima is one event (stempy: none), a sector that does
    not start at row 0 makes no event in its first row, and no neighbour of an X-ray pixel is
    an event. Every difference is bounded and lies where the docs say."""
    frames, _, files = raw
    zeros = np.zeros((576, 576), np.float32)
    reader = stempy_io.reader(files, version=5, backend="multi-pass", threads=1)
    ec = stempy_image.electron_count(reader, zeros, threshold_num_blocks=1, **NSIGMA)
    md = ec.metadata["electron_counting"]
    bg, xr = md["background_threshold"], md["x_ray_threshold"]
    theirs = stempy_events(ec, len(frames))
    n_theirs = sum(map(len, theirs))
    # ties: a superset, the extra events sitting on plateaus
    first = ours(frames, None, bg, xr, ties="first")
    extra = 0
    for f, t, frame in zip(first, theirs, frames):
        assert np.all(np.isin(t, f))
        v = np.where((frame > bg) & (frame < xr), frame.astype(np.int64), 0)
        for e in np.setdiff1d(f, t):
            y, x = divmod(int(e), 576)
            nb = v[max(y - 1, 0):y + 2, max(x - 1, 0):x + 2]
            assert nb.max() == v[y, x] and (nb == v[y, x]).sum() >= 2
            extra += 1
    assert 0 < extra < 0.06 * n_theirs
    # four sectors of 144 rows, counted apart: differences only in the rows at their borders
    # (an electron on a border: stempy's event in the lower sector's first row, ours one row up)
    c = ElectronCounter((576, 576), None, bg, xr, ties="none", xray_neighbours="kept")
    parts = [c.count(frames[:, a:a + 144], a) for a in range(0, 576, 144)]
    differ = n_mine = 0
    for i, t in enumerate(theirs):
        mine = np.concatenate([ind[np.r_[0, np.cumsum(cnt)][i]:np.r_[0, np.cumsum(cnt)][i + 1]] for cnt, ind in parts])
        rows = np.setxor1d(mine, t) // 576
        assert set(rows.tolist()) <= {143, 144, 287, 288, 431, 432}
        differ += len(rows)
        n_mine += len(mine)
    assert 0 < differ < 0.02 * n_theirs and abs(n_mine - n_theirs) < 0.005 * n_theirs
    # X-ray neighbours, at an x-ray threshold low enough for the charge an X-ray shares with
    # its neighbour to fall below it: stempy's events that we drop all touch an X-ray pixel
    xr = 600.0
    theirs = [np.asarray(stempy_image.electron_count_frame(f, darkreference=zeros, background_threshold=bg,
                                                           xray_threshold=xr).data[0][0]) for f in frames]
    halo = ours(frames, None, bg, xr, xray_neighbours="dropped")
    dropped = 0
    for h, t, frame in zip(halo, theirs, frames):
        assert np.all(np.isin(h, t))
        for e in np.setdiff1d(t, h):
            y, x = divmod(int(e), 576)
            assert frame[max(y - 1, 0):y + 2, max(x - 1, 0):x + 2].max() >= xr
            dropped += 1
    assert 0 < dropped < 0.01 * sum(map(len, theirs))
