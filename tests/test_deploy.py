"""A facility-style cluster: `dask scheduler` and `dask worker` started as separate programs,
and the session joining it by address (the `--scheduler` path)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from test_pipeline import GEOM, assert_matches, config, reference, synthetic_events

@pytest.fixture
def external_cluster(tmp_path):
    sched_file = tmp_path / "scheduler.json"
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                               "--port", "0", "--no-dashboard", "--scheduler-file", str(sched_file)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.monotonic() + 60
        while not sched_file.is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        address = json.loads(sched_file.read_text())["address"]
        for _ in range(2):
            procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address,
                                           "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard"],
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


def test_a_session_joins_a_running_cluster_by_address(external_cluster, scripted_source, tmp_path):
    from distributed import Client
    from stream.session import Session
    with Client(external_cluster) as c:
        c.wait_for_workers(2, timeout=60)
    counts, indices = synthetic_events(GEOM, seed=31)
    src = scripted_source(2)
    cfg = config(tmp_path)
    with Session(src.addresses, config=cfg, scheduler=external_cluster, console=False) as s:
        assert len(s.workers) == 2
        src.wait_for_receivers()
        src.start("facility", GEOM)
        src.frames("facility", GEOM, counts, indices, batch=6)
        src.end("facility", GEOM.n_frames)
        r = s.wait("facility", timeout=60)
    assert r.status == "complete"
    assert_matches(r, reference(counts, indices, GEOM), r.path)
