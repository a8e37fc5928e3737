"""Hold a stop request (SIGTERM) in the cluster's processes while a session finalizes its scans.

A batch system stops a job by sending SIGTERM to every process of it at once — SLURM's
``scancel`` and time limit signal the batch script and every task of every step (the dask
scheduler, nannies and worker processes), then SIGKILL ``KillWait`` seconds later; Kubernetes
does the same to every pod it deletes (``terminationGracePeriodSeconds``). Left alone, the
scheduler and the workers would close at once and the open scans' states and events, which
live on the workers, would be gone before the coordinator could write them.

While a session is attached, the processes of its cluster (other than the session's own)
hold SIGTERM for at most ``[cluster] stop_grace_s``: the coordinator, stopped by the same
signal, closes its open scans with what arrived and writes them (incomplete, their missing
frames named), then releases the hold and every process stops as it would have, through the
handler it had before (``dask scheduler`` / ``dask worker`` close cleanly). A second SIGTERM
is honoured at once. A worker process under a nanny leaves its stop to the nanny.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading

from distributed.diagnostics.plugin import NannyPlugin, WorkerPlugin

log = logging.getLogger("stemstream.stopping")


class _Hold:
    """This process's hold: who holds it, the handler it replaced, a deferred signal."""

    def __init__(self):
        self.holders: set[str] = set()
        self.previous = None
        self.deferred: int | None = None
        self.leave_to_nanny = False
        self.grace_s = 0.0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.timer = None


_HOLD = _Hold()


def hold(token: str, grace_s: float, leave_to_nanny: bool = False, skip_pid: int | None = None) -> bool:
    """Hold SIGTERM in this process for ``token`` (at most ``grace_s`` seconds after it
    arrives). Call on the process's event loop, in its main thread. Returns whether it holds."""
    if os.getpid() == skip_pid or threading.current_thread() is not threading.main_thread():
        return False  # the session's own process stops itself; signals belong to the main thread
    h = _HOLD
    if not h.holders:
        h.previous = signal.getsignal(signal.SIGTERM)
        h.deferred, h.leave_to_nanny, h.grace_s = None, leave_to_nanny, grace_s
        try:
            h.loop = asyncio.get_running_loop()
        except RuntimeError:
            h.loop = None
        signal.signal(signal.SIGTERM, _on_term)
    h.holders.add(token)
    return True


def release(token: str) -> None:
    """Drop ``token``'s hold; the last one restores the previous handler and, if a SIGTERM
    came meanwhile, hands it on (the process then stops as it would have)."""
    h = _HOLD
    if token not in h.holders:
        return
    h.holders.discard(token)
    if not h.holders:
        _restore()


def _on_term(signum, frame):
    h = _HOLD
    if h.deferred is not None:  # asked twice: stop now
        h.holders.clear()
        _restore()
        return
    h.deferred = signum
    log.warning("SIGTERM held for up to %.0f s: the stemstream session is finalizing its scans", h.grace_s)
    if h.loop is not None:  # the grace starts now; the loop runs in this (main) thread
        h.loop.call_soon_threadsafe(_arm_timer)


def _arm_timer():
    h = _HOLD
    if h.holders and h.loop is not None:
        h.timer = h.loop.call_later(h.grace_s, _grace_over)


def _grace_over():
    if _HOLD.holders:
        log.warning("the stop grace is over: stopping now")
        _HOLD.holders.clear()
        _restore()


def _restore():
    h = _HOLD
    if h.timer is not None:
        h.timer.cancel()
        h.timer = None
    previous, deferred, h.deferred = h.previous, h.deferred, None
    signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    if deferred is None:
        return
    if callable(previous):  # e.g. dask's CLI handler: it closes the scheduler or worker cleanly
        previous(deferred, None)
    elif h.leave_to_nanny:
        log.info("the held SIGTERM is left to this worker's nanny")
    elif previous in (signal.SIG_DFL, None):
        os.kill(os.getpid(), deferred)


class WorkerStopGrace(WorkerPlugin):
    """The hold in every worker process of the session's cluster."""

    def __init__(self, token: str, grace_s: float, session_pid: int):
        self.token, self.grace_s, self.session_pid = token, grace_s, session_pid

    def setup(self, worker):
        hold(self.token, self.grace_s, leave_to_nanny=worker.nanny is not None, skip_pid=self.session_pid)

    def teardown(self, worker):
        release(self.token)


class NannyStopGrace(NannyPlugin):
    """The hold in every nanny (the ``dask worker`` command's own process)."""

    def __init__(self, token: str, grace_s: float, session_pid: int):
        self.token, self.grace_s, self.session_pid = token, grace_s, session_pid

    def setup(self, nanny):
        hold(self.token, self.grace_s, skip_pid=self.session_pid)

    def teardown(self, nanny):
        release(self.token)


def install(client, token: str, grace_s: float) -> None:
    """Hold SIGTERM on the scheduler, the nannies and the workers of ``client``'s cluster."""
    pid = os.getpid()
    client.register_plugin(WorkerStopGrace(token, grace_s, pid), name=f"{token}-worker")
    client.register_plugin(NannyStopGrace(token, grace_s, pid), name=f"{token}-nanny")
    client.run_on_scheduler(hold, token, grace_s, skip_pid=pid)


def uninstall(client, token: str) -> None:
    """Release the holds (a SIGTERM that came meanwhile now stops those processes)."""
    for name, nanny in ((f"{token}-worker", False), (f"{token}-nanny", True)):
        try:
            client.unregister_worker_plugin(name, nanny=nanny)
        except Exception as e:  # noqa: BLE001 - shutting down anyway: the grace ends the hold
            log.debug("releasing %s failed: %s", name, e)
    try:
        client.run_on_scheduler(release, token)
    except Exception as e:  # noqa: BLE001
        log.debug("releasing the scheduler failed: %s", e)
