"""Shared fixtures: real dask clusters (separate worker processes) and a scripted detector.

Every server binds 127.0.0.1 on free ports and is stopped by the fixture that started it.
The tests use a key directory of their own (XDG_CONFIG_HOME points to a temporary directory,
inherited by the commands they start), never the user's ~/.config/stemstream/keys.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from sim_detector.publisher import Publisher, prepare_sources
from stream.transport.net import free_port_block
from stream.transport.protocol import Geometry, encode_abort, encode_end, encode_frames, encode_start

# ../shared/data of the repo, or $STEMSTREAM_SHARED_DATA (a checkout elsewhere, e.g. a worktree)
SHARED_DATA = Path(os.environ.get("STEMSTREAM_SHARED_DATA",
                                  Path(__file__).resolve().parents[2] / "shared" / "data"))
TA_MODEL = SHARED_DATA / "aet-amorphous" / "Ta_film_atomic_model.mat"
needs_shared_data = pytest.mark.skipif(not TA_MODEL.is_file(),
                                       reason=f"published data not found at {SHARED_DATA}")
os.environ.setdefault("MPLBACKEND", "Agg")
_CONFIG_HOME = tempfile.mkdtemp(prefix="stemstream-test-config-")
os.environ["XDG_CONFIG_HOME"] = _CONFIG_HOME
atexit.register(shutil.rmtree, _CONFIG_HOME, True)


def _cluster(n_workers):
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                           host="127.0.0.1", dashboard_address="127.0.0.1:0", memory_limit="4GB")
    client = Client(cluster)
    return cluster, client


@pytest.fixture(scope="session")
def client2():
    """A LocalCluster with two worker processes, shared by the whole test session."""
    cluster, client = _cluster(2)
    yield client
    client.close()
    cluster.close()


@pytest.fixture(scope="module", params=[1, 3], ids=["1worker", "3workers"])
def client_1_or_3(request):
    cluster, client = _cluster(request.param)
    yield client
    client.close()
    cluster.close()


@contextlib.contextmanager
def external_dask(tmp_path, args=(), n_workers=2):
    """`dask scheduler` and ``n_workers`` `dask worker` programs started by hand on 127.0.0.1
    (``args``: flags for both, e.g. TLS files); yields the scheduler's address."""
    import json
    import subprocess
    import sys

    sched_file = tmp_path / "scheduler.json"
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                               "--port", "0", "--no-dashboard", "--scheduler-file", str(sched_file), *args],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.monotonic() + 60
        while not sched_file.is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        address = json.loads(sched_file.read_text())["address"]
        for _ in range(n_workers):
            procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address,
                                           "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard", *args],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        yield address
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


class ScriptedSource:
    """A detector under the test's control: the emulator's bound PUSH sockets, one per source,
    sending exactly the messages a test asks for (good, duplicated, missing, malformed).
    CURVE with the default key directory's source key (as ``stemstream simulate``), or plain
    with ``curve=False``; ``curve`` may also be a SourceKeys of the test's own."""

    def __init__(self, n_sources: int = 1, curve=True):
        from stream.security import source_keys
        self.n_sources = n_sources
        keys = source_keys() if curve is True else (curve or None)
        self.publisher = Publisher(f"tcp://127.0.0.1:{free_port_block(n_sources)}", n_sources,
                                   sndhwm=1000, linger_s=2.0, curve=keys)
        self.addresses = self.publisher.addresses
        self.send = self.publisher.send

    def close(self):
        self.publisher.close()

    def wait_for_receivers(self, timeout_s=30):
        if not self.publisher.wait_for_receivers(timeout_s):
            raise TimeoutError("no receiver connected")
        time.sleep(0.2)  # let every receiver finish connecting, so that round-robin spreads

    def start(self, scan_id, geometry, metadata=None):
        for k, prepared in enumerate(self._geoms(geometry)):
            self.send(k, encode_start(scan_id, k, prepared, metadata or {}))

    def _geoms(self, geometry):
        return [p.geometry for p in prepare_sources(np.zeros(geometry.n_frames, np.uint32),
                                                    np.zeros(0, np.uint32), geometry, self.n_sources)]

    def frames(self, scan_id, geometry, counts, indices, batch=16, only=None, order=None):
        """Send frames (all, or the frame numbers in ``only``) of every source in batches;
        ``order`` shuffles the batches. Returns the frame numbers sent."""
        sources = prepare_sources(counts, indices, geometry, self.n_sources)
        sel = np.arange(geometry.n_frames) if only is None else np.asarray(sorted(only))
        runs = np.split(sel, np.flatnonzero(np.diff(sel) != 1) + 1) if len(sel) else []
        batches = [(r[i], min(len(r) - i, batch)) for r in runs for i in range(0, len(r), batch)]
        if order is not None:
            batches = [batches[i] for i in order(len(batches))]
        for first, n in batches:
            first = int(first)
            for k, src in enumerate(sources):
                a, b = src.offsets[first], src.offsets[first + n]
                self.send(k, encode_frames(scan_id, k, src.geometry, first,
                                           src.counts[first:first + n], src.indices[a:b]))
        return sel

    def end(self, scan_id, frames_sent):
        for k in range(self.n_sources):
            self.send(k, encode_end(scan_id, k, frames_sent))

    def abort(self, scan_id, reason):
        for k in range(self.n_sources):
            self.send(k, encode_abort(scan_id, k, reason))


@pytest.fixture
def scripted_source():
    made = []

    def make(n_sources=1, curve=True):
        s = ScriptedSource(n_sources, curve)
        made.append(s)
        return s
    yield make
    for s in made:
        s.close()


# ---------------------------------------------------------------- dense references

def dense_frames(counts, indices, frame_shape):
    """(n_frames, h, w) int64 dense frames from CSR events, the plain numpy way."""
    n = len(counts)
    frames = np.zeros((n, frame_shape[0] * frame_shape[1]), np.int64)
    rows = np.repeat(np.arange(n), counts)
    np.add.at(frames, (rows, indices.astype(np.int64)), 1)
    return frames.reshape(n, *frame_shape)


def dense_scan(counts, indices, geometry: Geometry, keep=None):
    """(ny, nx, h, w) int64: the frames of every position summed over frames per position,
    flyback frames dropped; ``keep`` (n_frames,) bool selects frames."""
    frames = dense_frames(counts, indices, geometry.frame_shape)
    if keep is not None:
        frames = frames * keep[:, None, None]
    ny, nxr = geometry.raster_shape
    frames = frames.reshape(ny, nxr, geometry.frames_per_position, *geometry.frame_shape).sum(axis=2)
    return frames[:, :geometry.scan_shape[1]]
