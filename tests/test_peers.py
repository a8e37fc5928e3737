"""Interoperability with the peers themselves (the optional ``peers`` extra: stempy, LiberTEM).

A file written by stempy's own writer replays and processes to stempy's own virtual images; a
LiberTEM raw CSR export loads in LiberTEM and its sums equal ours."""

from __future__ import annotations

import subprocess
import sys

import h5py
import numpy as np
import pytest

from stream.config import (ChunkingSpec, ComSpec, DetectorSpec, OutputSpec, PipelineConfig, ScanSpec,
                           VirtualSpec, validate)
from stream.transport.net import free_port_block
from stream.session.offline import process_file
from stream.transport.protocol import Geometry
from stream.session import Session

stempy_io = pytest.importorskip("stempy.io", reason="the peers extra (stempy) is not installed")
stempy_image = pytest.importorskip("stempy.image", reason="the peers extra (stempy) is not installed")
pytestmark = pytest.mark.peers

# square detector, off-centre beam: a swap of x and y anywhere would show
GEOM = Geometry((10, 12), (48, 48), frames_per_position=2, flyback=1, mrad_per_px=0.5, convergence_mrad=4.0)
CENTER_YX = (22.5, 25.5)
RADII = [(0, 8), (12, 22)]  # stempy takes whole-pixel radii; r^2 is never an integer here, so no ties


def emulated():
    from sim_detector.simulate import Beam, Detector, ScanSpec as EmuScan, simulate_scan
    from sim_detector.specimens import make_specimen
    sim = simulate_scan(make_specimen("mgo", seed=2), Beam(convergence_mrad=4.0, dose=60.0),
                        Detector(shape=(48, 48), mrad_per_px=0.5),
                        EmuScan(shape=GEOM.scan_shape, frames_per_position=2, flyback=1), seed=2,
                        with_expected=False)
    return sim.counts, sim.indices


def stempy_file(path, counts, indices):
    """The scan written by stempy's own writer: a SparseArray over the whole raster (flyback
    column included), frames per position on the second axis."""
    off = np.r_[0, np.cumsum(counts.astype(np.int64))]
    ny, nxr = GEOM.raster_shape
    data = np.empty((ny * nxr, 2), object)
    for f in range(GEOM.n_frames):
        data[f // 2, f % 2] = indices[off[f]:off[f + 1]].astype(np.uint32)
    sa = stempy_io.SparseArray(data, scan_shape=(ny, nxr), frame_shape=GEOM.frame_shape)
    stempy_io.save_electron_counts(str(path), sa)
    return path


def stempy_images(path):
    """stempy's create_stem_images on its own file, flyback column cropped by stempy, in
    electrons: stempy weights an electron by its mask value, found from a one-electron array."""
    sa = stempy_io.load_electron_counts(str(path), keep_flyback=False)
    center_xy = (CENTER_YX[1], CENTER_YX[0])
    imgs = stempy_image.create_stem_images(sa, [r[0] for r in RADII], [r[1] for r in RADII], center=center_xy)
    one = np.empty((1, 1), object)
    one[0, 0] = np.array([int(CENTER_YX[0] + 0.5) * 48 + int(CENTER_YX[1] + 0.5)], np.uint32)
    unit = stempy_image.create_stem_images(stempy_io.SparseArray(one, scan_shape=(1, 1), frame_shape=(48, 48)),
                                           [0], [8], center=center_xy)[0, 0, 0]
    assert unit > 0 and np.all(imgs % unit == 0)
    return imgs // unit


def pipeline_config(tmp_path):
    return validate(PipelineConfig(
        detector=DetectorSpec(center=list(CENTER_YX)),
        virtual=[VirtualSpec(name=f"ring{i}", shape="annulus", inner_px=float(a), outer_px=float(b))
                 for i, (a, b) in enumerate(RADII)],
        com=ComSpec(enabled=False), chunking=ChunkingSpec(max_frames=64),
        output=OutputSpec(dir=str(tmp_path / "out"), previews=False), scan=ScanSpec(timeout_s=2.0)))


def test_a_file_written_by_stempy_replays_and_processes_to_stempys_images(client2, tmp_path):
    counts, indices = emulated()
    path = stempy_file(tmp_path / "stempy.h5", counts, indices)
    want = stempy_images(path)
    assert want.shape == (2, 10, 12) and want[0].sum() > 0 and want[1].sum() > 0

    r = process_file(path, pipeline_config(tmp_path / "pf"), client2, flyback=1)
    for i in range(2):
        np.testing.assert_array_equal(r.results[f"ring{i}"], want[i])

    port = free_port_block(4)
    with Session([f"tcp://127.0.0.1:{port + k}" for k in range(4)], config=pipeline_config(tmp_path / "rp"),
                 client=client2, console=False) as s:
        p = subprocess.run([sys.executable, "-m", "stream.cli", "replay", str(path), "--bind",
                            f"tcp://127.0.0.1:{port}", "--sources", "4", "--flyback", "1", "--rate", "max",
                            "--wait", "60"], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        live = s.wait("stempy", timeout=60)
    assert live.status == "complete"
    for i in range(2):
        np.testing.assert_array_equal(live.results[f"ring{i}"], want[i])


def test_libertem_loads_the_csr_export_and_sums_as_we_do(client2, tmp_path):
    from libertem.api import Context
    from libertem.executor.inline import InlineJobExecutor
    from libertem.udf.masks import ApplyMasksUDF
    from libertem.udf.sum import SumUDF

    from stream.files.interop import export_libertem_csr
    from test_recording import write_stempy

    g = Geometry((10, 12), (48, 48))
    counts, indices = emulated()
    keep = (np.arange(GEOM.n_frames) // 2) % 13 < 12  # one frame per position, flyback dropped
    first = (np.arange(GEOM.n_frames) % 2 == 0) & keep
    off = np.r_[0, np.cumsum(counts.astype(np.int64))]
    sel = np.concatenate([indices[off[f]:off[f + 1]] for f in np.flatnonzero(first)])
    path = write_stempy(tmp_path / "one.h5", counts[first], sel, 12, 10, (48, 48))
    r = process_file(path, pipeline_config(tmp_path), client2)
    toml = export_libertem_csr(r.path, tmp_path / "lt.toml")

    ctx = Context(executor=InlineJobExecutor())
    ds = ctx.load("raw_csr", path=str(toml))
    assert tuple(ds.shape.nav) == g.scan_shape and tuple(ds.shape.sig) == g.frame_shape
    total = ctx.run_udf(ds, SumUDF())["intensity"].data
    with h5py.File(r.path, "r") as f:
        np.testing.assert_array_equal(total, f["results/diffraction_sum"][()])
        ring = f["results/ring1"][()]
    yy, xx = np.mgrid[:48, :48]
    rr = np.hypot(yy - CENTER_YX[0], xx - CENTER_YX[1])
    mask = ((rr >= 12) & (rr < 22)).astype(np.float32)
    masked = ctx.run_udf(ds, ApplyMasksUDF(mask_factories=[lambda: mask]))["intensity"].data[..., 0]
    np.testing.assert_array_equal(masked, ring)
