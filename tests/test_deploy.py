"""A facility-style cluster: `dask scheduler` and `dask worker` started as separate programs,
and the session joining it by address (the `--scheduler` path)."""

from __future__ import annotations

import pytest

from conftest import external_dask
from test_pipeline import GEOM, assert_matches, config, reference, synthetic_events


@pytest.fixture
def external_cluster(tmp_path):
    with external_dask(tmp_path) as address:
        yield address


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
