"""What runs inside each dask worker: the receiver plugin and the per-scan tasks that take a
closed scan's state from the worker that holds it."""

from __future__ import annotations

import numpy as np
from distributed import get_worker
from distributed.diagnostics.plugin import WorkerPlugin

from operators.completeness import Completeness, repeat_mask
from operators.events import EventStore

from .config import PipelineConfig
from .receiver import Receiver, WorkerScan


class ReceiverPlugin(WorkerPlugin):
    """Starts a :class:`Receiver` in every worker (also in workers that join later)."""

    def __init__(self, name: str, connect: list[str], control_address: str, config: PipelineConfig):
        self.name = name
        self.connect = connect
        self.control_address = control_address
        self.config = config
        self.receiver: Receiver | None = None

    def setup(self, worker):
        self.receiver = Receiver(self.connect, self.control_address, self.config, worker=worker.address)
        self.receiver.start()

    def teardown(self, worker):
        if self.receiver is not None:
            self.receiver.stop()


def _receiver(plugin_name: str) -> Receiver:
    plugin = get_worker().plugins.get(plugin_name)
    if plugin is None or plugin.receiver is None:
        raise RuntimeError(f"no stemstream receiver {plugin_name!r} on worker {get_worker().address}")
    return plugin.receiver


def close_on_worker(plugin_name: str, scan_id: str) -> WorkerScan:
    """Close ``scan_id`` on this worker's receiver; the result stays on this worker."""
    return _receiver(plugin_name).close_scan(scan_id)


def received_counts(ws: WorkerScan) -> np.ndarray | None:
    """(n_sources, n_frames) uint16 copies of each (source, frame) this worker holds."""
    for op in ws.operators:
        if isinstance(op, Completeness):
            return ws.states[op.name]["received"]
    return None


def keep_owned_frames(ws: WorkerScan, own: np.ndarray) -> WorkerScan:
    """Keep one copy of each (source, frame) for which ``own`` (n_sources, n_frames) bool is
    True and none of the others, then recompute every operator from the kept events.

    Used only when a frame arrived more than once, so that duplicated frames count once.
    Completeness keeps counting every copy that arrived."""
    store = next(op for op in ws.operators if isinstance(op, EventStore))
    seen = ~own  # frames owned elsewhere count as already seen: every copy here is dropped
    fresh = {op.name: op.new_state() for op in ws.operators if not isinstance(op, Completeness)}
    for chunk in store.iter_chunks(ws.states[store.name]):
        kept = chunk.select(~repeat_mask(chunk.frames, chunk.sources, seen))
        for op in ws.operators:
            if op.name in fresh:
                op.process(fresh[op.name], kept)
    states = {**ws.states, **fresh}
    return WorkerScan(ws.scan_id, ws.worker, ws.geometry, ws.operators, states, ws.errors)
