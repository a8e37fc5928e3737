"""The detector formats made here, read by readers no one here wrote.

MIB files (every counter depth, raw and not, single chip and quad) are decoded by LiberTEM's
MIB reader to the frames we encoded; DECTRIS bitshuffle-LZ4 images by DECTRIS' own
``dectris-compression`` (in ``simplon.decode_image``) and by the ``bitshuffle`` package. Only
after that do the end-to-end tests (test_sources_peers.py) serve them with LiberTEM-live's
simulators and compare our scan files with the same frames.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest

from stream.sources import mib, simplon

pytestmark = pytest.mark.peers


def frames_for(bits: int, shape, n: int = 4, seed: int = 0) -> np.ndarray:
    """Sparse counts up to the counter's maximum, one saturated pixel per frame."""
    rng = np.random.default_rng(seed)
    top = (1 << bits) - 1
    f = np.minimum(rng.poisson(0.05, (n,) + shape), top).astype(mib.VALUE_DTYPE[bits])
    for i in range(n):
        f[i, (3 * i) % shape[0], (7 * i + 1) % shape[1]] = top
    f[0, 0, 0] = min(top, 3)  # a multi-electron pixel where the depth allows it
    return f


def libertem_frames(hdr: str, n: int, buffered: bool) -> np.ndarray:
    libertem_api = pytest.importorskip("libertem.api", reason="the peers extra (LiberTEM) is not installed")
    from libertem.udf import UDF

    class Collect(UDF):
        def get_result_buffers(self):
            return {"f": self.buffer(kind="nav", extra_shape=tuple(self.meta.dataset_shape.sig),
                                     dtype=np.uint32)}

        def process_frame(self, frame):
            self.results.f[:] = frame

    ctx = libertem_api.Context.make_with("inline")
    kw = {}
    if buffered:  # LiberTEM's mmap backend asserts on raw 1-bit files (an upstream bug)
        from libertem.io.dataset.base.backend_buffered import BufferedBackend
        kw["io_backend"] = BufferedBackend()
    ds = ctx.load("mib", path=hdr, nav_shape=(1, n), **kw)
    res = ctx.run_udf(dataset=ds, udf=Collect())
    return np.asarray(res["f"].data).reshape((n,) + tuple(ds.shape.sig))


CASES = [(bits, raw, quad) for bits in (1, 6, 12, 24) for raw in (False, True) for quad in (False, True)
         if not (raw and quad and bits in (6, 24))]  # no reader decodes 6- or 24-bit raw quad


@pytest.mark.parametrize("bits,raw,quad", CASES,
                         ids=[f"{b}bit-{'raw' if r else 'u'}-{'quad' if q else 'single'}" for b, r, q in CASES])
def test_mib_we_write_is_what_libertem_reads(tmp_path, bits, raw, quad):
    shape = (512, 512) if quad else (256, 256)
    frames = frames_for(bits, shape, seed=bits)
    hdr, path = mib.write_mib(str(tmp_path / f"d{bits}"), frames, bits, raw, (1, len(frames)), quad=quad)
    ours = mib.read_mib(path)
    np.testing.assert_array_equal(ours, frames)
    if raw and bits == 24:  # LiberTEM decodes frame 0 right and later ones with a wrong stride
        theirs = libertem_frames(hdr, len(frames), buffered=True)
        np.testing.assert_array_equal(theirs[0], frames[0])
        return
    theirs = libertem_frames(hdr, len(frames), buffered=raw and bits == 1)
    np.testing.assert_array_equal(theirs, frames)


def test_mib_headers_parse_what_merlin_writes():
    """A raw 24-bit header as real Merlin software writes it (fpd's notes; the image size is
    doubled, the depth only in the MQ1A field) and a 6-bit U08 one."""
    real = (b"MQ1,000001,00384,01,0512,0256,R64,   1x1,01,2017-11-10 15:41:20.880248,0.005000,0,0,0,,"
            b"MQ1A,2017-11-10T15:41:20.880248165Z,5000000ns,24,")
    fh = mib.parse_frame_header(real + b"\0" * (384 - len(real)))
    assert (fh.raw, fh.counter_depth, fh.frame_shape, fh.payload_size) == (True, 24, (256, 256), 262144)
    fh = mib.parse_frame_header(mib.frame_header(7, 6, raw=False))
    assert (fh.seq, fh.code, fh.counter_depth, fh.value_dtype) == (7, "U08", 6, np.dtype("u1"))
    with pytest.raises(mib.MibError, match="not an MQ1 frame header"):
        mib.parse_frame_header(b"HDR,\tsomething")
    assert mib.parse_mpx_prefix(mib.mpx_prefix(100)) == 100
    with pytest.raises(mib.MibError, match="lost sync"):
        mib.parse_mpx_prefix(b"MPX,00000x0101,")


def test_acquisition_header_round_trip():
    raw = mib.acquisition_header(120, 10, 12, scan_shape=(12, 10), pad_to=2048)
    h = mib.AcquisitionHeader.parse(raw)
    assert (h.n_frames, h.frames_per_trigger, h.counter_depth, h.scan_shape) == (120, 10, 12, (12, 10))
    assert len(raw) == 2048


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32"])
def test_bslz4_images_decode_with_both_maintained_libraries(dtype):
    """Our bitshuffle-LZ4 blobs carry the HDF5 filter's framing: DECTRIS' own decoder and the
    bitshuffle package both give the image back."""
    bitshuffle = pytest.importorskip("bitshuffle")
    rng = np.random.default_rng(1)
    image = rng.poisson(0.05, (192, 200)).astype(dtype)
    image[5, 7] = np.iinfo(dtype).max
    blob, enc = simplon.encode_image(image, "bslz4")
    assert enc == f"bs{image.dtype.itemsize * 8}-lz4<"
    total, block = struct.unpack(">QI", blob[:12])
    assert total == image.nbytes
    d = {"shape": [200, 192], "type": dtype, "encoding": enc}
    np.testing.assert_array_equal(simplon.decode_image(blob, d), image)  # dectris-compression
    other = bitshuffle.decompress_lz4(np.frombuffer(blob, np.uint8, offset=12), (image.size,),
                                      image.dtype, block // image.dtype.itemsize)
    np.testing.assert_array_equal(other.reshape(image.shape), image)


def test_lz4_and_raw_images_and_bad_ones():
    image = np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) % 7
    for compression in ("lz4", "none"):
        blob, enc = simplon.encode_image(image, compression)
        d = {"shape": [64, 48], "type": "uint16", "encoding": enc}
        np.testing.assert_array_equal(simplon.decode_image(blob, d), image)
    with pytest.raises(simplon.SimplonError, match="not supported"):
        simplon.decode_image(b"xx", {"shape": [2, 2], "type": "uint8", "encoding": "cbf"})
    with pytest.raises(simplon.SimplonError, match="bytes"):
        simplon.decode_image(b"\0" * 5, {"shape": [2, 2], "type": "uint8", "encoding": "<"})
    with pytest.raises(simplon.SimplonError, match="shape"):
        simplon.image_shape_dtype({"shape": [2], "type": "uint8"})
