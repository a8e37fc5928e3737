"""Cluster orchestration: the session (coordinator.py) starts or joins the dask cluster
(cluster.py), installs the receivers (worker.py), follows every scan (lifecycle.py) and
finalizes it on the workers (finalize.py); process-file runs the operators over recordings
(offline.py).

    from stream.session import Session
"""

from stream.session.coordinator import Session, expand_sources
from stream.session.finalize import ScanResult

__all__ = ["Session", "ScanResult", "expand_sources"]
