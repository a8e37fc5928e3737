"""What runs inside each dask worker: the receiver plugin, and the task that takes a closed
scan's state from the receiver that holds it."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from distributed import get_worker
from distributed.diagnostics.plugin import WorkerPlugin

from .config import PipelineConfig
from .receiver import Receiver, WorkerScan, warm_up

STAGE_EXECUTOR = "stemstream-stages"  # the worker executor (one thread) downstream stages run in


class ReceiverPlugin(WorkerPlugin):
    """Starts a :class:`Receiver` in every worker (also in workers that join later)."""

    def __init__(self, name: str, connect: list[str], control_address: str, config: PipelineConfig):
        self.name = name
        self.connect = connect
        self.control_address = control_address
        self.config = config
        self.receiver: Receiver | None = None

    async def setup(self, worker):
        # compile the kernels before the first frame, off the worker's event loop
        await asyncio.get_running_loop().run_in_executor(None, warm_up, self.config)
        self.receiver = Receiver(self.connect, self.control_address, self.config, worker=worker.address,
                                 spill_dir=self.config.memory.spill_dir or worker.local_directory)
        self.receiver.start()
        if STAGE_EXECUTOR not in worker.executors:  # one thread for downstream stages
            worker.executors[STAGE_EXECUTOR] = ThreadPoolExecutor(1, thread_name_prefix=STAGE_EXECUTOR)

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
