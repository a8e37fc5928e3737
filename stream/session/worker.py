"""What runs inside each dask worker: the receiver plugin, and the task that takes a closed
scan's state from the receiver that holds it."""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from distributed import get_worker
from distributed.diagnostics.plugin import WorkerPlugin

from operators.dense import counts_to_events
from operators.electron_counting import ElectronCounter

from stream.config import PipelineConfig, build_operators
from stream.files.chunk_codec import shuffle
from stream.security import ReceiverKeys
from stream.session import heap, quiet_gc
from stream.session.finalize import portable
from stream.sources.build import build_source
from stream.transport import handoff
from stream.transport.protocol import Geometry, decode, encode_frames
from stream.transport.receiver import Receiver, WorkerScan, chunk_from_messages

log = logging.getLogger("stemstream.worker")
STAGE_EXECUTOR = "stemstream-stages"  # the worker executor (one thread) downstream stages run in


class ReceiverPlugin(WorkerPlugin):
    """Starts a :class:`Receiver` in every worker (also in workers that join later).

    keys: the receivers' CURVE keys (stream.security.ReceiverKeys: for the sources, and this
        session's own keypair for the coordinator); they travel to the workers with the plugin,
        over dask's connections (TLS, docs/SECURITY.md). None: plain sockets.
    announce_address: the coordinator's control channel.
    source_plan: a detector source's SourcePlan (stream/sources), or None.
    """

    def __init__(self, name: str, connect: list[str], control_address: str, config: PipelineConfig,
                 keys: ReceiverKeys | None = None, announce_address: str | None = None,
                 source_plan=None):
        self.name = name
        self.connect = connect
        self.control_address = control_address
        self.config = config
        self.keys = keys
        self.announce_address = announce_address
        self.source_plan = source_plan  # a detector source's SourcePlan (stream/sources), or None
        self.receiver: Receiver | None = None

    async def setup(self, worker):
        heap.keep_freed_memory()  # the chunks' arrays reused, not faulted in afresh (dask's nanny trims)
        # compile the kernels before the first frame, off the worker's event loop
        await asyncio.get_running_loop().run_in_executor(None, warm_up, self.config)
        memory_limit = getattr(getattr(worker, "memory_manager", None), "memory_limit", None)
        budget = self.config.limits.scan_state_bytes(memory_limit)
        source = build_source(self.source_plan, worker.address)
        self.receiver = Receiver(self.connect, self.control_address, self.config, worker=worker.address,
                                 spill_dir=self.config.memory.spill_dir or worker.local_directory,
                                 keys=self.keys, announce_address=self.announce_address,
                                 state_budget=budget, source=source)
        self.receiver.start()
        if STAGE_EXECUTOR not in worker.executors:  # one thread for downstream stages
            worker.executors[STAGE_EXECUTOR] = ThreadPoolExecutor(1, thread_name_prefix=STAGE_EXECUTOR)
        quiet_gc.freeze()  # set up: no full collection walks all this again (a receiver's pause)

    def teardown(self, worker):
        if self.receiver is not None:
            self.receiver.stop()


def _receiver(plugin_name: str) -> Receiver:
    plugin = get_worker().plugins.get(plugin_name)
    if plugin is None or plugin.receiver is None:
        raise RuntimeError(f"no stemstream receiver {plugin_name!r} on worker {get_worker().address}")
    return plugin.receiver


def close_on_worker(plugin_name: str, scan_id: str, travel: bool = False) -> WorkerScan:
    """Close ``scan_id`` on this worker's receiver; the result stays on this worker.
    ``travel``: ready to go to another worker that writes the file (stream.session.finalize.portable).
    The scan's events handed off here for blocks that were cancelled are removed."""
    handoff.release(scan_id)
    ws = _receiver(plugin_name).close_scan(scan_id)
    return portable(ws) if travel else ws


def apply_on_worker(plugin_name: str, scan_id: str, op):
    """An ad-hoc operator over this worker's events of the open scan ``scan_id``
    (``Receiver.apply``): (state, frame parts, events), or None if the scan is not open here."""
    return _receiver(plugin_name).apply(scan_id, op)


def early_events_on_worker(plugin_name: str, scan_id: str, lo: int, hi: int, handoff_dir: str = ""):
    """The chunks of stored frames ``[lo, hi)`` of the open scan ``scan_id`` this worker's
    receiver holds (``Receiver.events_in``), for ``finalize.write_early``; None when the
    scan is not open here or they cannot be read (never raises: the file written while the
    scan runs is then dropped, the scan is written at its end). With ``handoff_dir`` (the
    block's builder runs on this host) they go into a file there (``transport.handoff``) and
    this returns its Handoff; if that fails, the chunks themselves."""
    try:
        parts = _receiver(plugin_name).events_in(scan_id, lo, hi)
    except Exception:  # noqa: BLE001 - reported by write_early as a part that is not there
        log.warning("scan %s: events of stored frames %d..%d could not be read", scan_id, lo, hi,
                    exc_info=True)
        return None
    return handoff.offer(parts, handoff_dir, scan_id) if handoff_dir and parts else parts


def source_command(plugin_name: str, name: str, *args, dask_worker=None):
    """Pass a control request to this worker's detector source (e.g. DECTRIS hold/expect);
    run with ``client.run``, which gives ``dask_worker``."""
    plugin = dask_worker.plugins.get(plugin_name)
    source = plugin.receiver.source if plugin is not None and plugin.receiver is not None else None
    if source is None:
        raise RuntimeError(f"worker {dask_worker.address} runs no detector source")
    return source.command(name, *args)


def warm_up(config: PipelineConfig) -> float:
    """Compile (or load from numba's cache) the kernels of this configuration's operators on a
    tiny synthetic scan; returns the seconds it took.

    Without it the first chunk of the first scan waits for the compiler (seconds, tens of
    seconds on a busy machine with a cold cache) while frames queue at the detector and the
    coordinator hears nothing from this receiver. A configuration that does not fit the
    synthetic scan (apertures drawn for a larger scan, say) warms the default operators,
    which share the kernels."""
    t0 = time.perf_counter()
    g = Geometry((8, 8), (64, 64), center=(32.0, 32.0), mrad_per_px=1.0, convergence_mrad=10.0)
    try:
        operators = build_operators(config, g)
    except ValueError:
        operators = build_operators(PipelineConfig(), g)
    rng = np.random.default_rng(0)
    half = g.n_frames // 2
    counts = rng.integers(0, 20, g.n_frames).astype(np.uint32)
    cut = int(counts[:half].sum())
    indices = rng.integers(0, g.n_pixels, int(counts.sum())).astype(np.uint32)
    msgs = [decode(encode_frames("warm-up", 0, g, 0, counts[:half], indices[:cut])),
            decode(encode_frames("warm-up", 0, g, half, counts[half:], indices[cut:]))]
    # one message makes a chunk of read-only buffers, several a concatenated copy: numba
    # compiles each kind
    chunks = [chunk_from_messages(msgs[:1], g), chunk_from_messages(msgs, g)]
    for op in operators:
        state, other = op.new_state(), op.new_state()
        for chunk in chunks:
            op.process(state, chunk)
        op.merge(state, other)
        op.finalize(state)
    for dtype in (np.uint16, np.uint32, np.float64):  # the scan file's chunks
        shuffle(np.zeros(2, dtype))
    warm_up_dense(config)
    if config.detector.kind != "stemstream":  # raw Merlin bits
        warm_up_sources()
    return time.perf_counter() - t0


def warm_up_sources() -> None:
    """Compile the detector sources' kernels (MIB payloads to events, one kernel for every
    counter depth; DECTRIS bitshuffle-LZ4 images to events, one for every bit depth)."""
    from stream.sources import mib
    from stream.sources.bslz4_events import bslz4_events
    from stream.sources.mib_events import payload_events

    fh = mib.parse_frame_header(mib.frame_header(1, 1, raw=True))
    payload_events(np.zeros((1, fh.payload_size), np.uint8), fh)
    # 8 uint16 pixels, one in-line LZ4 block of 16 literal bytes (bit plane 0: pixel 0 is 1)
    blob = struct.pack(">QII", 16, 16, 18) + bytes([0xF0, 1, 1]) + bytes(15)
    bslz4_events([blob], 8, 2, 1 << 20)


def warm_up_dense(config: PipelineConfig) -> None:
    """Compile the kernels of ``dense`` messages: electrons per pixel to events, and, with
    [counting], the counting kernels, on read-only frames as they come off the wire."""
    for dtype in ("<u1", "<u2", "<u4"):
        frames = np.zeros((2, 3, 8), dtype)
        frames[0, 1, 2] = 1
        frames.flags.writeable = False
        counts_to_events(frames, 0)
    if config.counting.enabled:
        c = config.counting
        frames = np.zeros((2, 3, 8), np.uint16)
        frames.flags.writeable = False
        cal = config.counting.calibration
        ElectronCounter((3, 8), None if cal.dark is None else np.zeros((3, 8)), cal.background_threshold,
                        cal.xray_threshold, None if cal.gain is None else np.ones((3, 8)), c.row_dark,
                        cal.attrs.get("optimized_mean"), c.semantics, c.ties, c.sector_edges,
                        c.xray_neighbours).count(frames)
