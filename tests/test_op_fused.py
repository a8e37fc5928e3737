"""FusedStreaming: one pass giving exactly what VirtualDetectors + CenterOfMass + DiffractionSum
give, checked against those operators (bit for bit) and against dense numpy frames."""

import numpy as np
import pytest

from operators.chunk import Chunk
from operators.com import CenterOfMass
from operators.completeness import Completeness
from operators.diffraction import DiffractionSum
from operators.events import EventStore
from operators.fused import (HIST_BITS, PACKED_BITS, FusedStreaming, _division_magic,
                             fold_cells, fuse_operators)
from operators.virtual import VirtualDetectors, annulus_mask, disk_mask
from stream.transport.protocol import Geometry

try:
    from conftest import dense_scan
    from test_op_common import Scan, make_scan, run, split_variants
except ImportError:  # tests collected as a package
    from tests.conftest import dense_scan
    from tests.test_op_common import Scan, make_scan, run, split_variants

FRAME = (24, 31)  # not square, width not a power of two


def edge_scan(seed, fpp=2, flyback=1, scan_shape=(5, 6), frame_shape=FRAME, shuffle=False,
              big_frame=0):
    """make_scan's events plus events on every detector edge and corner, empty frames, and
    optionally ``big_frame`` extra events in one frame; events sorted within frames (as the
    receiver delivers them) or shuffled."""
    base = make_scan(seed, scan_shape, frame_shape, fpp=fpp, flyback=flyback)
    rng = np.random.default_rng(seed + 100)
    h, w = frame_shape
    frame_of = np.repeat(np.arange(base.n_frames), np.diff(base.offsets))
    edges = np.unique(np.concatenate([np.arange(w), (h - 1) * w + np.arange(w),
                                      np.arange(h) * w, np.arange(h) * w + w - 1]))
    extra_f = rng.integers(0, base.n_frames, 3 * len(edges))
    extra_i = np.tile(edges, 3)
    if big_frame:
        # frame 1: half of them on the central pixel; frame 2: all of them. One class
        # fills the packed fields to the brim.
        centre = (h // 2) * w + w // 2
        extra_f = np.r_[extra_f, np.full(big_frame, 1), np.full(big_frame, 2)]
        extra_i = np.r_[extra_i, rng.integers(0, h * w, big_frame - big_frame // 2),
                        np.full(big_frame // 2 + big_frame, centre)]
    frame_of = np.r_[frame_of, extra_f]
    idx = np.r_[base.indices.astype(np.int64), extra_i]
    empty = rng.random(base.n_frames) < 0.2
    empty[1:3] &= not big_frame
    keep = ~empty[frame_of]
    frame_of, idx = frame_of[keep], idx[keep]
    tie = rng.random(len(idx)) if shuffle else idx
    order = np.lexsort((tie, frame_of))
    counts = np.bincount(frame_of, minlength=base.n_frames)
    offsets = np.r_[0, np.cumsum(counts)].astype(np.int64)
    return Scan(base.scan_shape, base.frame_shape, fpp, flyback, offsets,
                idx[order].astype(np.uint32))


def geometry(scan):
    return Geometry(scan.scan_shape, scan.frame_shape, frames_per_position=scan.fpp,
                    flyback=scan.flyback)


def counts_of(scan):
    return np.diff(scan.offsets)


def configs(scan_shape, frame_shape=FRAME):
    """name -> (virtual operators, CenterOfMass or None, DiffractionSum or None, masks: result
    name -> the (h, w) mask or weights behind it, for the dense reference)."""
    c = (11.25, 14.5)
    ann = [annulus_mask(frame_shape, c, 0, 4.5), annulus_mask(frame_shape, c, 6, 14)]
    two_annuli = VirtualDetectors(np.stack(ann), ["bf", "adf"], scan_shape)
    dl = [disk_mask(frame_shape, radius=3), annulus_mask(frame_shape, inner=6, outer=12)]
    default_like = VirtualDetectors(np.stack(dl), ["bf", "adf"], scan_shape)
    m0, m1 = disk_mask(frame_shape, c, 4) * 1.0, annulus_mask(frame_shape, c, 4, 9) * 1.0
    wts = [0.5 * m0 - 2.25 * m1, 1e-3 * m1]  # piecewise-constant weights
    weighted = VirtualDetectors(np.stack(wts), ["w0", "w1"], scan_shape, name="weighted")
    rng = [annulus_mask(frame_shape, c, 1.5 * i, 1.5 * (i + 1)) for i in range(10)]
    rings = VirtualDetectors(np.stack(rng), [f"ring{i}" for i in range(10)], scan_shape,
                             name="rings")
    com_r = CenterOfMass(scan_shape, frame_shape, center=c, radius=7.5, mrad_per_px=0.25)
    com_all = CenterOfMass(scan_shape, frame_shape, rotation_deg=90, flip=True)
    com_rot = CenterOfMass(scan_shape, frame_shape, center=(12.0, 15.0), radius=5.0,
                           rotation_deg=33.0, mrad_per_px=1.5)
    ds = DiffractionSum(frame_shape)
    m_ann, m_dl = dict(bf=ann[0], adf=ann[1]), dict(bf=dl[0], adf=dl[1])
    m_w, m_rings = dict(w0=wts[0], w1=wts[1]), {f"ring{i}": r for i, r in enumerate(rng)}
    return {
        "2annuli+com_r+sum": ([two_annuli], com_r, ds, m_ann),
        "default+com_all+sum": ([default_like], com_all, ds, m_dl),
        "2 virtual ops+com_rot+sum": ([two_annuli, weighted], com_rot, ds, {**m_ann, **m_w}),
        "rings (many classes)+com_r+sum": ([rings], com_r, ds, m_rings),
        "virtual+sum": ([default_like], None, ds, m_dl),
        "virtual+com": ([two_annuli], com_rot, None, m_ann),
        "com+sum": ([], com_r, ds, {}),
        "virtual only": ([weighted], None, None, m_w),
    }


def separate_results(parts, chunks, n_states, seed):
    out = {}
    for op in parts:
        out.update(op.finalize(run(op, chunks, np.random.default_rng(seed), n_states)))
    return out


def assert_same_results(got, want):
    assert list(got) == list(want)  # same names, same order
    for name, r in want.items():
        g = got[name]
        assert g.data.dtype == r.data.dtype and g.data.shape == r.data.shape, name
        np.testing.assert_array_equal(g.data, r.data, err_msg=name)  # NaNs compare equal
        assert (g.kind, g.unit, g.description) == (r.kind, r.unit, r.description), name
        assert g.attrs.keys() == r.attrs.keys(), name
        for k, v in r.attrs.items():
            assert g.attrs[k] == v or (np.isnan(v) and np.isnan(g.attrs[k])), (name, k)


def dense_reference(scan, masks, com, ds):
    """Every expected number from dense frames (tests/conftest.py dense_scan) and plain numpy."""
    d = dense_scan(counts_of(scan), scan.indices, geometry(scan))  # (ny, nx, h, w)
    h, w = scan.frame_shape
    out = {}
    for name, mask in masks.items():
        out[name] = (d * mask).sum(axis=(2, 3))
    if com is not None:
        yy, xx = np.mgrid[0:h, 0:w]
        cy, cx = com.center
        inside = np.ones((h, w), bool) if com.radius is None else \
            (yy - cy) ** 2 + (xx - cx) ** 2 <= com.radius ** 2
        n = (d * inside).sum(axis=(2, 3))
        sy = (d * inside * yy).sum(axis=(2, 3))
        sx = (d * inside * xx).sum(axis=(2, 3))
        with np.errstate(invalid="ignore", divide="ignore"):
            dy, dx = sy / n - cy, sx / n - cx
        if com.flip:
            dx = -dx
        t = np.deg2rad(com.rotation_deg)
        out.update(com_n=n, com_sum_y=sy, com_sum_x=sx, com_y=-dx * np.sin(t) + dy * np.cos(t),
                   com_x=dx * np.cos(t) + dy * np.sin(t))
        if com.mrad_per_px is not None:
            out.update(com_y_mrad=out["com_y"] * com.mrad_per_px,
                       com_x_mrad=out["com_x"] * com.mrad_per_px)
    if ds is not None:
        out["diffraction_sum"] = d.sum(axis=(0, 1))
    return out


@pytest.mark.parametrize("config", list(configs((1, 1))))
@pytest.mark.parametrize("fpp,flyback,shuffle", [(2, 1, False), (1, 0, True), (3, 2, False)])
def test_same_results_as_separate_operators_and_dense_frames(config, fpp, flyback, shuffle):
    scan = edge_scan(7, fpp=fpp, flyback=flyback, shuffle=shuffle)
    virtual, com, ds, masks = configs(scan.scan_shape)[config]
    parts = virtual + [p for p in (com, ds) if p is not None]
    op = FusedStreaming(virtual, com, ds)
    chunks = scan.chunks(np.random.default_rng(3), n_sources=2, max_parts=9)
    got = op.finalize(run(op, chunks, np.random.default_rng(4), n_states=3))
    assert_same_results(got, separate_results(parts, chunks, 2, 5))

    ref = dense_reference(scan, masks, com, ds)
    assert set(ref) == set(got)
    for name, want in ref.items():
        g = got[name].data
        if g.dtype.kind == "i":
            np.testing.assert_array_equal(g, want, err_msg=name)
        else:  # weighted images (fixed point), centres of mass (divisions, rotations)
            np.testing.assert_allclose(g, want, rtol=1e-9, atol=1e-9, err_msg=name)
    if com is not None:
        assert (got["com_n"].data == 0).any(), "the scan should have positions without electrons"
    if "rings" in config:
        assert op.n_codes > 8, "this configuration should use the histogram path"
    elif virtual:
        assert op.n_codes <= 8, "this configuration should use the packed path"


def test_states_equal_separate_states_whatever_the_split():
    scan = edge_scan(11, fpp=2, flyback=1)
    virtual, com, ds, _ = configs(scan.scan_shape)["2 virtual ops+com_rot+sum"]
    op = FusedStreaming(virtual, com, ds)
    states = []
    for label, chunks, n_states in split_variants(scan):
        rng = np.random.default_rng(len(label))
        state = run(op, chunks, rng, n_states)
        for p, sub in op.split_state(state).items():
            sep = next(o for o in virtual + [com, ds] if o.name == p)
            want = run(sep, chunks, np.random.default_rng(0), 1)
            assert sub.keys() == want.keys()
            for k in want:
                np.testing.assert_array_equal(sub[k], want[k], err_msg=f"{label} {p} {k}")
        states.append(state)
    for other in states[1:]:
        for k in states[0]:
            np.testing.assert_array_equal(other[k], states[0][k])


@pytest.mark.parametrize("n_masks", [3, 5])
def test_frames_longer_than_a_packed_block(n_masks):
    """Up to 8 classes, counts are packed in a register and unpacked every 2**bits - 1
    events: a frame of thousands of events crosses many unpacks."""
    scan = edge_scan(5, fpp=1, flyback=0, big_frame=6000)
    assert counts_of(scan).max() > 6000
    vd = VirtualDetectors(np.stack([annulus_mask(FRAME, inner=2 * i, outer=2 * i + 2)
                                    for i in range(n_masks)]),
                          [f"a{i}" for i in range(n_masks)], scan.scan_shape)
    com = CenterOfMass(scan.scan_shape, FRAME, radius=5.0)
    op = FusedStreaming(vd, com, DiffractionSum(FRAME))
    assert 5 <= op.n_codes <= 8  # fields of 8 to 12 bits: unpacked every 255 to 4095 events
    chunks = scan.chunks(np.random.default_rng(1))
    got = op.finalize(run(op, chunks, np.random.default_rng(2), 2))
    ref = dense_scan(counts_of(scan), scan.indices, geometry(scan))
    for i in range(n_masks):
        mask = annulus_mask(FRAME, inner=2 * i, outer=2 * i + 2)
        np.testing.assert_array_equal(got[f"a{i}"].data, (ref * mask).sum(axis=(2, 3)))
    assert_same_results(got, separate_results([vd, com, op.diffraction], chunks, 1, 0))


def test_flyback_frames_and_bad_events():
    frame = (4, 5)
    vd = VirtualDetectors(disk_mask(frame, radius=1.0), ["bf"], (1, 2))
    com = CenterOfMass((1, 2), frame)
    ds = DiffractionSum(frame)
    op = FusedStreaming(vd, com, ds)
    state = op.new_state()
    # frame 0 -> position 0; frame 1 is flyback (ignored); frame 2 -> position 1: one event
    # outside the detector (skipped, reported), the others counted.
    chunk = Chunk.from_counts([0, 1, 2], [0, 0, 0], [0, -1, 1], [2, 3, 3],
                              np.array([7, 19, 0, 1, 2, 12, 20, 19], np.uint32))
    with pytest.raises(ValueError, match=r"1 event\(s\) with a pixel index >= 20"):
        op.process(state, chunk)
    assert state["images"].tolist() == [[1, 1]]           # pixel 7 and 12 in the disk
    assert state["n"].tolist() == [2, 2]
    assert state["sum_y"].tolist() == [1 + 3, 2 + 3] and state["sum_x"].tolist() == [2 + 4, 2 + 4]
    assert state["sum"].sum() == 4 and state["sum"][19] == 2
    with pytest.raises(ValueError, match=r"1 frame\(s\) with a position >= 2"):
        op.process(op.new_state(), Chunk.from_counts([0], [0], [2], [1], np.array([1], np.uint32)))


def _heavy_chunk(frame_shape, scan_shape, counts_at, n_random, seed, bad=()):
    """One chunk, raster positions, flyback-free, events shuffled within frames: pixel p hit
    ``counts_at[p]`` times (spread over the frames, all of them in frame 0 for the first),
    ``n_random`` uniform events, and the out-of-range ``bad`` indices in the last frame."""
    rng = np.random.default_rng(seed)
    n_pos = scan_shape[0] * scan_shape[1]
    n_pix = frame_shape[0] * frame_shape[1]
    idx, frame = [], []
    for k, (p, c) in enumerate(counts_at.items()):
        idx.append(np.full(c, p))
        frame.append(np.zeros(c, np.int64) if k == 0 else rng.integers(0, n_pos, c))
    idx.append(rng.integers(0, n_pix, n_random))
    frame.append(rng.integers(0, n_pos, n_random))
    idx.append(np.asarray(bad, np.int64))
    frame.append(np.full(len(bad), n_pos - 1))
    idx, frame = np.concatenate(idx), np.concatenate(frame)
    order = np.lexsort((rng.random(len(idx)), frame))
    counts = np.bincount(frame, minlength=n_pos)
    chunk = Chunk.from_counts(np.arange(n_pos), np.zeros(n_pos, np.int16), np.arange(n_pos),
                              counts, idx[order].astype(np.uint32))
    return chunk, frame[order], idx[order]


def _numpy_state(frame, idx, frame_shape, n_pos, masks, inside):
    """The state every fused configuration below must hold, from plain numpy."""
    h, w = frame_shape
    ok = idx < h * w
    frame, idx = frame[ok], idx[ok]
    images = np.array([np.bincount(frame, weights=m.reshape(-1)[idx], minlength=n_pos)
                       for m in masks], np.int64).reshape(len(masks), n_pos)
    i = inside.reshape(-1)[idx]
    return dict(images=images, sum=np.bincount(idx, minlength=h * w),
                n=np.bincount(frame[i], minlength=n_pos),
                sum_y=np.bincount(frame[i], weights=idx[i] // w, minlength=n_pos).astype(np.int64),
                sum_x=np.bincount(frame[i], weights=idx[i] % w, minlength=n_pos).astype(np.int64))


CELL_CASES = {  # name -> (number of masks, CoM radius or None, with virtual detectors)
    "sum alone": (0, None),
    "2 annuli, all-in CoM, sum (packed)": (2, None),
    "3 annuli, CoM in 5 px, sum (packed)": (3, 5.0),
    "10 rings, CoM in 7.5 px, sum (histogram)": (10, 7.5),
}


@pytest.mark.parametrize("case", list(CELL_CASES))
def test_summed_pattern_exact_when_cells_wrap(case):
    """The summed pattern counts in uint16 cells during a chunk (1024 electrons per pixel
    before a wrap on the packed path, 256 with a histogram) and adds them to its int64 total
    at the end: pixels hit 2**16 + 5 times in one frame, 2**16 - 1 and exactly at and around
    the wrap points across frames, and thousands of random events, in two chunks and a
    third whose bad index raises, must all be counted exactly, in every task together."""
    frame_shape, scan_shape = FRAME, (3, 4)
    n_masks, radius = CELL_CASES[case]
    c = (11.25, 14.5)
    masks = [annulus_mask(frame_shape, c, 1.5 * i, 1.5 * (i + 1)) for i in range(n_masks)]
    vd = (VirtualDetectors(np.stack(masks), [f"m{i}" for i in range(n_masks)], scan_shape)
          if masks else None)
    com = CenterOfMass(scan_shape, frame_shape, center=c, radius=radius) if masks else None
    op = FusedStreaming(vd, com, DiffractionSum(frame_shape))
    assert (op.n_codes > 8) == ("histogram" in case)
    wrap = 1 << (16 - (HIST_BITS if op.n_codes > 8 else PACKED_BITS))
    centre, n_pix = 11 * 31 + 14, frame_shape[0] * frame_shape[1]
    counts_at = {centre: 2**16 + 5, 0: 2**16 - 1, n_pix - 1: wrap, 37: wrap - 1, 38: wrap + 1,
                 39: 2 * wrap, 40: 3 * wrap + 1}
    n_pos = scan_shape[0] * scan_shape[1]
    inside = np.ones(frame_shape, bool)
    if radius is not None:
        yy, xx = np.mgrid[:frame_shape[0], :frame_shape[1]]
        inside = (yy - c[0]) ** 2 + (xx - c[1]) ** 2 <= radius ** 2
    state = op.new_state()
    frames, idxs = [], []
    for seed, bad in ((1, ()), (2, ()), (3, (n_pix, 2**32 - 1))):
        chunk, f, i = _heavy_chunk(frame_shape, scan_shape, counts_at, 5000, seed, bad)
        assert chunk.n_events >= n_pix  # counted in the cells (smaller chunks: the total)
        frames.append(f)
        idxs.append(i)
        if bad:
            with pytest.raises(ValueError, match=r"2 event\(s\) with a pixel index >= 744"):
                op.process(state, chunk)
        else:
            op.process(state, chunk)
        want = _numpy_state(np.concatenate(frames), np.concatenate(idxs), frame_shape, n_pos,
                            masks, inside)
        assert want["sum"][centre] >= len(frames) * (2**16 + 5)
        for k, v in state.items():
            np.testing.assert_array_equal(v, want[k], err_msg=f"{k} after chunk {seed}")
    # the cells went back to zero counts for the next call, on a fresh state too
    fresh = op.new_state()
    op.process(fresh, chunk.select(np.arange(chunk.n_frames) < n_pos - 1))
    keep = frames[-1] < n_pos - 1
    want = _numpy_state(frames[-1][keep], idxs[-1][keep], frame_shape, n_pos, masks, inside)
    for k, v in fresh.items():
        np.testing.assert_array_equal(v, want[k], err_msg=k)


def test_chunks_without_events_or_frames_change_nothing():
    scan_shape = (2, 3)
    virtual, com, ds, _ = configs(scan_shape)["2annuli+com_r+sum"]
    op = FusedStreaming(virtual, com, ds)
    state = op.new_state()
    op.process(state, Chunk.from_counts(np.arange(6), np.zeros(6, np.int16), np.arange(6),
                                        np.zeros(6, np.int64), np.zeros(0, np.uint32)))
    op.process(state, Chunk.from_counts(np.zeros(0, np.int64), np.zeros(0, np.int16),
                                        np.zeros(0, np.int64), np.zeros(0, np.int64),
                                        np.zeros(0, np.uint32)))
    for k, v in state.items():
        assert not v.any(), k
    chunk = Chunk.from_counts([0], [0], [4], [3], np.array([5, 5, 700], np.uint32))
    op.process(state, chunk)
    assert state["sum"].sum() == 3 and state["sum"][5] == 2 and state["sum"][700] == 1


@pytest.mark.parametrize("bits", [0, PACKED_BITS, HIST_BITS])
def test_fold_cells_equals_numpy(bits):
    """fold_cells moves each cell's count to the total and keeps the class bits."""
    rng = np.random.default_rng(bits)
    n_pix = 745  # not a multiple of a vector's lanes
    cls = rng.integers(0, 1 << bits, n_pix)
    count = rng.integers(0, 1 << (16 - bits), n_pix)
    count[[0, -1]] = (1 << (16 - bits)) - 1  # the largest count, at both ends
    cells = (cls | (count << bits)).astype(np.uint16)
    total = rng.integers(-(2**40), 2**40, n_pix)
    want = total + count
    fold_cells(cells, bits, total)
    np.testing.assert_array_equal(total, want)
    np.testing.assert_array_equal(cells, cls)
    fold_cells(cells, bits, total)  # nothing left to move
    np.testing.assert_array_equal(total, want)


def test_concurrent_calls_and_pickling_keep_the_cells_apart():
    """Kernels release the GIL: threads processing into their own states each get their
    own cells; an operator that travels (pickle) takes none along."""
    import pickle
    import threading

    frame_shape, scan_shape = FRAME, (3, 4)
    ds = DiffractionSum(frame_shape)
    op = FusedStreaming(None, CenterOfMass(scan_shape, frame_shape), ds)
    n_pix, n_pos = 744, 12
    chunks = [_heavy_chunk(frame_shape, scan_shape, {s: 3000 + s}, 20000, s)
              for s in range(8)]
    states = [op.new_state() for _ in range(4)]
    start = threading.Barrier(4)

    def work(t):
        start.wait()
        for _ in range(5):
            for chunk, _, _ in chunks[2 * t:2 * t + 2]:
                op.process(states[t], chunk)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for t in range(4):
        idx = np.concatenate([chunks[k][2] for k in (2 * t, 2 * t + 1)])
        frame = np.concatenate([chunks[k][1] for k in (2 * t, 2 * t + 1)])
        np.testing.assert_array_equal(states[t]["sum"], 5 * np.bincount(idx, minlength=n_pix))
        np.testing.assert_array_equal(states[t]["n"], 5 * np.bincount(frame, minlength=n_pos))
    assert 1 <= len(op._cells_free) <= 4
    twin = pickle.loads(pickle.dumps(op))
    assert twin._cells_free == []
    state = twin.new_state()
    twin.process(state, chunks[0][0])
    np.testing.assert_array_equal(state["sum"], np.bincount(chunks[0][2], minlength=n_pix))


def test_bad_configurations():
    scan_shape = (3, 4)
    vd = VirtualDetectors(np.random.default_rng(0).random((7, *FRAME)) < 0.5,
                          list("abcdefg"), scan_shape)
    assert vd.kernel == "bits"
    with pytest.raises(ValueError, match="keep it as a separate operator"):
        FusedStreaming(vd, None, DiffractionSum(FRAME))
    with pytest.raises(ValueError, match="nothing to fuse"):
        FusedStreaming()
    with pytest.raises(ValueError, match="detector shape"):
        FusedStreaming(None, CenterOfMass(scan_shape, FRAME), DiffractionSum((8, 8)))
    with pytest.raises(ValueError, match="scan shape"):
        FusedStreaming(VirtualDetectors(disk_mask(FRAME, radius=3), ["bf"], (2, 2)),
                       CenterOfMass(scan_shape, FRAME))
    with pytest.raises(ValueError, match="names must be distinct"):
        FusedStreaming(None, CenterOfMass(scan_shape, FRAME, name="x"), DiffractionSum(FRAME),
                       name="x")
    # 16 rings x 16 wedges: each operator has 17 pixel combinations, together over 256
    frame = (64, 64)
    yy, xx = np.mgrid[0:64, 0:64] - 31.5
    wedge = ((np.arctan2(yy, xx) + np.pi) / (2 * np.pi) * 16).astype(int) % 16
    rings = VirtualDetectors(np.stack([annulus_mask(frame, inner=2 * i, outer=2 * i + 2)
                                       for i in range(16)]), [f"r{i}" for i in range(16)],
                             scan_shape, name="rings")
    wedges = VirtualDetectors(np.stack([wedge == i for i in range(16)]),
                              [f"w{i}" for i in range(16)], scan_shape, name="wedges")
    assert rings.kernel == wedges.kernel == "combos"
    with pytest.raises(ValueError, match="more than 256"):
        FusedStreaming([rings, wedges], CenterOfMass(scan_shape, frame, radius=20.5))
    assert FusedStreaming([rings], CenterOfMass(scan_shape, frame, radius=20.5)).n_codes == 18


def test_fuse_operators_keeps_order_and_results():
    scan = edge_scan(3)
    virtual, com, ds, _ = configs(scan.scan_shape)["2annuli+com_r+sum"]
    bits = VirtualDetectors(np.random.default_rng(0).random((7, *FRAME)) < 0.5,
                            list("abcdefg"), scan.scan_shape, name="masks_random")
    done = [Completeness(1, scan.scan_shape, 2, 1), EventStore(scan.scan_shape, FRAME, 2, 1)]
    ops = virtual + [com, ds] + done
    fused = fuse_operators(ops)
    assert len(fused) == 3 and isinstance(fused[0], FusedStreaming) and fused[1:] == done
    assert fused[0].parts == virtual + [com, ds]
    # a non-fusable operator between: only the run after it fuses, so results keep their order
    ops2 = virtual + [bits, com, ds] + done
    fused2 = fuse_operators(ops2)
    assert fused2[:2] == virtual + [bits] and fused2[2].parts == [com, ds]
    assert fuse_operators([bits, com] + done[:1])[:2] == [bits, com]  # nothing to fuse
    chunks = scan.chunks(np.random.default_rng(0), n_sources=2)
    for plain, new in ((ops, fused), (ops2, fused2)):
        want = separate_results(plain[:-2], chunks, 1, 0)
        assert_same_results(separate_results(new[:-2], chunks, 2, 1), want)


def test_fuse_operators_on_the_default_pipeline():
    """What stream.config.build_operators makes, fused, gives the same results."""
    from stream.config import build_operators, load_config
    scan = edge_scan(9, scan_shape=(6, 5), frame_shape=(40, 36))
    g = Geometry(scan.scan_shape, scan.frame_shape, frames_per_position=2, flyback=1,
                 mrad_per_px=0.5, convergence_mrad=3.0)
    built = build_operators(load_config(None), g)  # the pipeline fuses already
    assert [type(o) for o in built] == [FusedStreaming, Completeness, EventStore]
    ops = [p for o in built for p in getattr(o, "parts", [o])]  # the operators it fused, apart
    fused = fuse_operators(ops)
    assert any(isinstance(o, FusedStreaming) for o in fused) and len(fused) < len(ops)
    keep = [o for o in ops if not isinstance(o, (Completeness, EventStore))]
    keep_f = [o for o in fused if not isinstance(o, (Completeness, EventStore))]
    chunks = scan.chunks(np.random.default_rng(2), n_sources=4)
    assert_same_results(separate_results(keep_f, chunks, 3, 1),
                        separate_results(keep, chunks, 1, 0))


@pytest.mark.parametrize("w", [1, 2, 3, 7, 31, 576, 1000, 1023, 1024, 1025])
def test_division_without_division(w):
    """(idx * M) >> s == idx // w for every index of a detector of width w."""
    h = max(1, 1_200_000 // w)
    m, s = _division_magic(h * w, w)
    idx = np.arange(h * w, dtype=np.uint64)
    np.testing.assert_array_equal((idx * m) >> s, idx // np.uint64(w))


@pytest.mark.parametrize("shape", [(46340, 46341), (2, 2**30), (2**15, 2**16), (3, 715827882)])
def test_division_without_division_at_2_31_pixels(shape):
    h, w = shape
    n_pix = h * w
    assert n_pix <= 2**31
    m, s = _division_magic(n_pix, w)
    rows = np.unique(np.r_[np.arange(min(h, 50)), np.arange(max(0, h - 50), h)]).astype(np.uint64)
    uw = np.uint64(w)
    # both sides of every row boundary, where a rounding error would show first
    idx = np.concatenate([rows * uw, rows * uw + uw - np.uint64(1), rows * uw + uw // 2])
    np.testing.assert_array_equal((idx * m) >> s, idx // uw)


def test_fuse_operators_builds_the_pixel_classes_once(monkeypatch):
    """Building the class table is a pass over the detector per operator, at every scan
    start on every receiver: the usual run (virtual, CoM, sum) is built once, not once per
    prefix."""
    import operators.fused as fused_mod
    scan = edge_scan(4)
    virtual, com, ds, _ = configs(scan.scan_shape)["2annuli+com_r+sum"]
    builds = []
    real = fused_mod.FusedStreaming._build_codes
    monkeypatch.setattr(fused_mod.FusedStreaming, "_build_codes",
                        lambda self: builds.append(1) or real(self))
    out = fuse_operators(virtual + [com, ds])
    assert len(out) == 1 and out[0].parts == virtual + [com, ds]
    assert len(builds) == 1
