"""Start a local dask cluster or join a running scheduler, as the configuration says.

The local cluster listens on 127.0.0.1 only (scheduler, workers, nannies, dashboard) and, with
``[security] dask_tls`` (the default), speaks TLS with a temporary certificate held in memory.
A running scheduler is joined with the TLS files of ``[security]`` (docs/SECURITY.md).
"""

from __future__ import annotations

import contextlib
import signal
import threading

import dask

from stream.config import ClusterSpec, ConfigError, SecuritySpec
from stream.security import SecurityError

MONITOR = "distributed.admin.system-monitor.interval"


def _system_monitor() -> dict:
    """dask's system monitor (CPU, memory, network and disk figures for the dashboard) every
    2 s instead of dask's 0.5 s in the local cluster's scheduler, nannies and workers: its
    psutil calls were a few % of the session's CPU in a burst of small scans (BENCHMARKS.md).
    A user's own setting of it wins; memory limits are watched as often as before."""
    interval = dask.config.get(MONITOR)
    return {MONITOR: "2s" if interval == "500ms" else interval}


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


def connect(cl: ClusterSpec, security: SecuritySpec | None = None):
    """(client, cluster): a Client of ``cl.scheduler``, or of a new LocalCluster of
    ``cl.workers`` processes bound to 127.0.0.1 (then ``cluster`` is it; close both when done).
    Raises ConfigError for TLS settings it cannot use."""
    from distributed import Client, LocalCluster

    from stream.security.tls import client_security, temporary_security

    security = security or SecuritySpec()
    try:
        if cl.scheduler:
            sec = client_security(cl.scheduler, security.tls_ca_file, security.tls_cert, security.tls_key)
            return Client(cl.scheduler, security=sec), None
        sec = temporary_security() if security.dask_tls else None
    except SecurityError as e:
        raise ConfigError(str(e)) from None
    with _workers_ignore_ctrl_c(), dask.config.set(_system_monitor()):
        cluster = LocalCluster(n_workers=cl.workers, threads_per_worker=cl.threads_per_worker,
                               processes=True, host="127.0.0.1", dashboard_address="127.0.0.1:0",
                               memory_limit=cl.memory_limit, security=sec)
    try:
        # results come straight from the worker that wrote them, not relayed by the scheduler
        # (in this process: two more TLS passes over every scan's images)
        return Client(cluster, direct_to_workers=True), cluster
    except BaseException:
        cluster.close()
        raise
