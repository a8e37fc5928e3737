"""Ad-hoc operators over one scan's events, run where the events are.

While a scan is open its events are in the receivers (memory, or their spill files): one task
per worker runs the operator there (``Receiver.apply``). Once written, they are in the scan
file: the stored frames are cut into ranges, each read and processed by a worker
(``offline.apply_to_range``, as process-file does). Either way only the operator's state (an
image or a pattern) travels, and the states merge here: integer sums, exact.

    op = VirtualDetectors(mask[None], ["drawn"], scan_shape)
    run = on_open_scan(client, plugin_name, scan_id, op)    # None once the scan has closed
    run = on_file(client, "scans/SCAN.h5", op)
    op.finalize(run.state)["drawn"].data                     # (ny, nx) counts
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from stream.files.recording import open_recording
from stream.session.offline import apply_to_range, frame_ranges
from stream.session.worker import apply_on_worker


@dataclass
class AdhocRun:
    """The merged state of an ad-hoc operator and where it came from."""

    state: dict
    source: str  # "receivers" (an open scan) or the scan file's path
    frames: int  # frame parts processed (one per source and frame while open; frames from a file)
    events: int  # electrons processed
    workers: int  # workers that held a part
    seconds: float


def _merge(op, parts: list, source: str, t0: float) -> AdhocRun:
    state, frames, events = None, 0, 0
    for s, f, e in parts:
        if state is None:
            state = s
        else:
            op.merge(state, s)
        frames += f
        events += e
    return AdhocRun(state if state is not None else op.new_state(), source, frames, events, len(parts),
                    time.perf_counter() - t0)


def on_open_scan(client, plugin_name: str, scan_id: str, op, timeout: float = 120) -> AdhocRun | None:
    """``op`` over the events every receiver holds of the open scan; None when no receiver
    has it open (it closed meanwhile: use the file)."""
    t0 = time.perf_counter()
    workers = sorted(client.scheduler_info()["workers"])
    futures = [client.submit(apply_on_worker, plugin_name, scan_id, op, workers=[w],
                             allow_other_workers=False, pure=False) for w in workers]
    parts = [p for p in _gather(client, futures, timeout) if p is not None]
    if not parts:
        return None
    return _merge(op, parts, "receivers", t0)


def on_file(client, path, op, flyback: int | None = None, timeout: float = 600) -> AdhocRun:
    """``op`` over every stored frame of a scan file (or stempy file), read by the workers."""
    t0 = time.perf_counter()
    path = str(path)
    rec = open_recording(path, flyback)
    n_workers = len(client.scheduler_info()["workers"])
    futures = [client.submit(apply_to_range, path, flyback, lo, hi, op, pure=False)
               for lo, hi in frame_ranges(rec.n_stored, n_workers)]
    return _merge(op, _gather(client, futures, timeout), path, t0)


def _gather(client, futures, timeout: float) -> list:
    from distributed import wait

    try:
        wait(futures, timeout=timeout)
    except TimeoutError:
        client.cancel(futures)
        raise TimeoutError(f"the computation did not finish within {timeout:g} s") from None
    return client.gather(futures)
