"""Start a local dask cluster or join a running scheduler, as the configuration says."""

from __future__ import annotations

import contextlib
import signal
import threading

from stream.config import ClusterSpec


@contextlib.contextmanager
def _workers_ignore_ctrl_c():
    """Worker processes started inside inherit SIGINT ignored: Ctrl-C in a terminal reaches the
    whole process group, and only this process should act on it (it stops them cleanly)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def connect(cl: ClusterSpec):
    """(client, cluster): a Client of ``cl.scheduler``, or of a new LocalCluster of
    ``cl.workers`` processes bound to 127.0.0.1 (then ``cluster`` is it; close both when done)."""
    from distributed import Client, LocalCluster

    if cl.scheduler:
        return Client(cl.scheduler), None
    with _workers_ignore_ctrl_c():
        cluster = LocalCluster(n_workers=cl.workers, threads_per_worker=cl.threads_per_worker,
                               processes=True, host="127.0.0.1", dashboard_address=":0",
                               memory_limit=cl.memory_limit)
    try:
        return Client(cluster), cluster
    except BaseException:
        cluster.close()
        raise
