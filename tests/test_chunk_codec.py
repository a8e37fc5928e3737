"""HDF5 chunks through shuffle + gzip written by ``stream.files.chunk_codec``: checked against
numpy's byte transposition (the shuffle filter's definition), zlib's own decoder, the deflate
format's block headers (RFC 1951) and the HDF5 library reading them back."""

from __future__ import annotations

import zlib

import h5py
import numpy as np
import pytest

from stream.files.chunk_codec import SAMPLE, shuffle, shuffle_deflate

rng = np.random.default_rng(7)


def numpy_shuffle(data: np.ndarray) -> bytes:
    """The shuffle filter by its definition: byte k of every element, then byte k + 1."""
    a = np.ascontiguousarray(data).reshape(-1)
    return np.ascontiguousarray(a.view(np.uint8).reshape(a.size, a.itemsize).T).tobytes()


ARRAYS = {
    "uint8": rng.integers(0, 255, 1000).astype(np.uint8),
    "int16": rng.integers(-300, 300, 5001).astype(np.int16),
    "uint32 events": np.sort(rng.integers(0, 576 * 576, (2000, 100)), axis=1).astype(np.uint32),
    "float32": rng.random(3333).astype(np.float32),
    "float64 image": rng.normal(100, 10, (64, 80)),
    "int64 offsets": np.cumsum(rng.poisson(100, 70_000)).astype(np.int64),
    "complex128": (rng.random(500) + 1j * rng.random(500)),
    "one element": np.array([123456789], np.uint32),
}


@pytest.mark.parametrize("name", ARRAYS)
def test_shuffle_is_the_byte_transposition(name):
    data = ARRAYS[name]
    assert shuffle(data).tobytes() == numpy_shuffle(data)


@pytest.mark.parametrize("level", [1, 2, 6])
@pytest.mark.parametrize("name", ARRAYS)
def test_a_chunk_inflates_to_the_shuffled_bytes(name, level):
    data = ARRAYS[name]
    assert zlib.decompress(shuffle_deflate(data, level)) == numpy_shuffle(data)


def _first_block_type(stream: bytes) -> int:
    """BTYPE of the first deflate block after the 2-byte zlib header (RFC 1951, 3.2.3)."""
    return (stream[2] >> 1) & 3


def test_random_planes_are_stored_and_structured_ones_compressed():
    n = 1 << 18
    low = rng.integers(0, 256, n).astype(np.uint32)  # byte 0 random, bytes 1-3 zero
    out = shuffle_deflate(low, 2)
    assert _first_block_type(out) == 0  # plane 0 in stored blocks
    # the three zero planes shrink to almost nothing: the chunk is about plane 0's size
    assert n < len(out) < n * 1.01
    shifted = (low << 24).astype(np.uint32)  # planes 0-2 zero, plane 3 random
    out = shuffle_deflate(shifted, 2)
    assert _first_block_type(out) != 0  # the zero planes come first, compressed
    assert zlib.decompress(out) == numpy_shuffle(shifted)


def test_a_plane_is_stored_only_when_deflate_saves_less_than_the_margin():
    n = 4 * SAMPLE
    # plane 0 drawn from 16 values: deflate saves half of it, far more than 1 - KEEP
    few = rng.integers(0, 16, n).astype(np.uint8).astype(np.uint16)
    assert _first_block_type(shuffle_deflate(few, 1)) != 0
    assert len(shuffle_deflate(few, 1)) < 0.6 * n


@pytest.mark.parametrize("name", ["uint32 events", "float64 image", "int64 offsets", "int16"])
def test_hdf5_reads_the_chunks_back(tmp_path, name):
    data = ARRAYS[name].reshape(-1)
    path = tmp_path / "c.h5"
    half = (len(data) + 1) // 2
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("x", shape=data.shape, dtype=data.dtype, chunks=(half,),
                              compression="gzip", compression_opts=2, shuffle=True)
        for i in range(0, len(data), half):
            block = data[i:i + half]
            if len(block) < half:  # HDF5 chunks are whole: the dataset's extent cuts the last
                block = np.concatenate([block, np.zeros(half - len(block), data.dtype)])
            ds.id.write_direct_chunk((i,), shuffle_deflate(block, 2))
    with h5py.File(path, "r") as f:
        assert f["x"].compression == "gzip" and f["x"].shuffle
        np.testing.assert_array_equal(f["x"][()], data)
