"""Shared by bench_peers.py and bench_storage.py: the synthetic scan, timing, two-process runs,
and the output (markdown table on stdout, JSON under benchmarks/results/).

The scan is benchmarks/bench_operators.py's (Poisson electrons per frame, a share of them in a
bright-field disk that moves a little per position, the rest uniform), with repeated pixels of
a frame dropped: a counted frame has each pixel at most once, and stempy's ``SparseArray.sum``
counts a repeated pixel once, so every implementation must see the same electrons.
"""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from numba import njit

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_operators import make_chunks, synthetic_scan  # noqa: E402

RESULTS = HERE / "results"
SCAN_SHAPE = (256, 256)
QUICK_SCAN_SHAPE = (64, 64)
FRAME_SHAPE = (576, 576)
DOSES = (100, 1000)
BF_FRACTION = 0.6
BF_RADIUS = 40.0  # px
CHUNK_FRAMES = 8192


@njit(cache=True, nogil=True)
def read_pass(positions, offsets, indices, out):
    """The least a one-pass kernel does: read every event of every frame once (a sum per
    frame into ``out``). Unsigned event indices, so that numba emits contiguous vector loads
    (with signed ones it must allow negative indices and gathers every event instead)."""
    for i in range(positions.shape[0]):
        s = np.uint64(0)
        for e in range(np.uint64(offsets[i]), np.uint64(offsets[i + 1])):
            s += indices[e]
        out[positions[i]] += np.int64(s)


def sparse_scan(scan_shape, frame_shape, mean_events, seed=0):
    """A synthetic counted scan in CSR form.

    Returns
    -------
    counts : (ny*nx,) int64 electrons per frame (one frame per position, raster order).
    indices : (counts.sum(),) uint32 flat pixel y*w + x, sorted within each frame, no pixel
        twice in a frame.
    """
    counts, idx = synthetic_scan(scan_shape, frame_shape, mean_events, BF_FRACTION, BF_RADIUS, seed)
    frame_of = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    keep = np.ones(len(idx), bool)
    keep[1:] = (idx[1:] != idx[:-1]) | (frame_of[1:] != frame_of[:-1])
    counts = np.bincount(frame_of[keep], minlength=len(counts)).astype(np.int64)
    return counts, np.ascontiguousarray(idx[keep])


def offsets_of(counts) -> np.ndarray:
    """(n+1,) int64 CSR offsets of per-frame counts."""
    off = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=off[1:])
    return off


def write_stemstream_scan(path, counts, indices, scan_shape, frame_shape, level=1, results=None) -> Path:
    """The scan as a stemstream scan file (``stream.files.storage.write_scan``, every frame received,
    gzip ``level`` after the shuffle filter as the pipeline writes it; ``results``: name ->
    operators.base.Result, none by default): the path written."""
    from operators.completeness import Completeness
    from stream.files.storage import write_scan
    ny, nx = scan_shape
    geo = dict(scan_shape=[ny, nx], frame_shape=list(frame_shape), frames_per_position=1,
               n_sources=1, sector=[0, frame_shape[0]], flyback=0)
    comp = Completeness(1, scan_shape)
    state = comp.new_state()
    comp.add_range(state, 0, 0, ny * nx)
    return write_scan(path, scan_id="bench", status="complete", reason="benchmark", geometry=geo,
                      metadata={}, results=results or {}, offsets=offsets_of(counts).astype(np.uint64),
                      indices=indices, completeness=comp.finalize(state),
                      completeness_summary={}, provenance={}, compression_level=level)


def stempy_sparse_array(counts, indices, scan_shape, frame_shape):
    """stempy's SparseArray of the scan, one frame per position (stempy must be installed)."""
    import stempy.io as sio
    data = np.empty((len(counts), 1), object)
    for i, part in enumerate(np.split(indices, offsets_of(counts)[1:-1])):
        data[i, 0] = part
    return sio.SparseArray(data, scan_shape=scan_shape, frame_shape=frame_shape)


def chunks_in_halves(counts, indices, frame_shape, chunk_frames=CHUNK_FRAMES):
    """Chunks of at most ``chunk_frames`` frames that never straddle the middle of the scan:
    (all chunks, [first half's, second half's])."""
    n = len(counts)
    size = min(chunk_frames, n // 2)
    while (n // 2) % size:
        size -= 1
    chunks = make_chunks(counts, indices, size, 1, frame_shape)
    k = len(chunks) // 2
    return chunks, [chunks[:k], chunks[k:]]


def machine_busy_s() -> float | None:
    """CPU seconds every process of the machine has used since boot (/proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def time_runs(fn, repeats, warmup=1, pair=None, check=None, own_cpu_known=True, retries=0,
              max_other_cpu=0.3, wait_s=20.0, min_time_s=0.5):
    """Call ``fn()`` ``warmup`` times untimed (numba compiling or loading, caches), pass the
    first result to ``check`` if given, then call it ``repeats`` times, timed, or more until
    the timed runs last ``min_time_s`` (so that other_cpu, counted in 10 ms ticks, means
    something).

    Returns ({median_s, min_s, max_s, n_runs, runs_s (up to 50), cpu_per_wall, other_cpu,
    attempts}, first result).
    cpu_per_wall: CPU time of this process (and of ``pair``'s two worker processes, if given)
    over wall time: about 1 for one busy thread, 2 when both cores really worked.
    other_cpu: cores used meanwhile by every other process of the machine (/proc/stat, 10 ms
    ticks; None when ``own_cpu_known`` is False, e.g. with LiberTEM's worker processes). While
    it exceeds ``max_other_cpu``, the timed runs are repeated up to ``retries`` times after
    waiting ``wait_s``, and the quietest attempt is kept.
    """
    first = fn()
    for _ in range(warmup - 1):
        fn()
    if check is not None:
        check(first)

    def cpu_now():
        return time.process_time() + (pair.cpu_s if pair is not None else 0.0)

    best = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(wait_s)
        runs, cpu = [], []
        busy0, own0, wall0 = machine_busy_s(), cpu_now(), time.perf_counter()
        while len(runs) < repeats or time.perf_counter() - wall0 < min_time_s:
            c0, t0 = cpu_now(), time.perf_counter()
            out = fn()
            t = time.perf_counter() - t0
            runs.append(t)
            cpu.append((cpu_now() - c0) / t if t > 0 else float("nan"))
            del out
        busy1, own1, wall1 = machine_busy_s(), cpu_now(), time.perf_counter()
        other = None if not own_cpu_known or busy0 is None else \
            max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall1 - wall0)
        result = summary(runs, statistics.median(cpu), other)
        result["attempts"] = attempt + 1
        if best is None or (other is not None and other < (best["other_cpu"] or 0)):
            best = result
        if other is None or other <= max_other_cpu:
            break
    best["attempts"] = result["attempts"]
    return best, first


def summary(runs, cpu_per_wall=None, other_cpu=None) -> dict:
    return {"median_s": statistics.median(runs), "min_s": min(runs), "max_s": max(runs),
            "n_runs": len(runs), "runs_s": [round(r, 6) for r in runs[:50]],
            "cpu_per_wall": None if cpu_per_wall is None else round(cpu_per_wall, 3),
            "other_cpu": None if other_cpu is None else round(other_cpu, 2)}


def _serve(tasks, part, conn):
    while True:
        name = conn.recv()
        if name is None:
            conn.close()
            return
        try:
            conn.send(("ok", tasks[name](part)))
        except BaseException as e:  # the parent re-raises it with the child's traceback
            conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


class TwoProcesses:
    """Two worker processes forked from this one, so each already holds the data its tasks
    read (nothing is sent but the task's name). ``run(name)`` starts ``tasks[name](part)``
    in process part 0 and 1 at once and returns both results (pickled back); ``cpu_s`` is the
    CPU seconds the two processes have used so far.

    Fork before starting threads in this process (LiberTEM executors, dask)."""

    def __init__(self, tasks: dict):
        ctx = mp.get_context("fork")
        self.conns, self.procs = [], []
        for part in (0, 1):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_serve, args=(tasks, part, child), daemon=True)
            p.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(p)

    def run(self, name):
        for c in self.conns:
            c.send(name)
        out = [c.recv() for c in self.conns]
        for status, value in out:
            if status == "error":
                raise RuntimeError(f"task {name!r} failed in a worker process:\n{value}")
        return [value for _, value in out]

    @property
    def cpu_s(self) -> float:
        total = 0.0
        for p in self.procs:
            try:
                with open(f"/proc/{p.pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except (OSError, IndexError, ValueError):
                return float("nan")
        return total

    def close(self):
        for c, p in zip(self.conns, self.procs):
            try:
                c.send(None)
            except (BrokenPipeError, OSError):
                pass
            p.join(10)
            if p.is_alive():
                p.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def wait_for_load(max_load: float | None, timeout_s: float = 600.0) -> list[float]:
    """Wait (at most ``timeout_s``) until the 1-minute load average is at most ``max_load``:
    the machine is shared, and two-core figures mean little while another job holds a core.
    Returns the load average when it stopped waiting."""
    t0 = time.monotonic()
    while max_load is not None and os.getloadavg()[0] > max_load and time.monotonic() - t0 < timeout_s:
        print(f"waiting for the load average ({os.getloadavg()[0]:.2f}) to fall to {max_load}",
              file=sys.stderr)
        time.sleep(15)
    return load_average()


def machine() -> dict:
    import numba
    return {"cpus": os.cpu_count(), "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "numpy": np.__version__, "numba": numba.__version__}


def command_line(script: str, argv) -> str:
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join([".venv/bin/python", f"benchmarks/{script}"] + args)


def now() -> str:
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


def write_json(name: str, payload: dict, out_dir: Path | None = None) -> Path:
    out_dir = Path(out_dir) if out_dir is not None else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(json.dumps(payload, indent=1, default=_plain) + "\n")
    tmp.replace(path)
    return path


def emit_report(report, payload: dict, name: str, out_dir: Path | None = None) -> Path:
    """Print what ``report(payload)`` prints and write the same markdown to ``name`` (in
    benchmarks/results/ or ``out_dir``): the path written."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        report(payload)
    text = buf.getvalue()
    print(text, end="")
    out_dir = Path(out_dir) if out_dir is not None else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / name).write_text(text)
    return out_dir / name


def printed_old_report(args, report) -> bool:
    """``--report JSON``: print the markdown of an earlier run's JSON file; True if it did
    (the script then ends without measuring)."""
    if args.report:
        report(json.loads(Path(args.report).read_text()))
    return bool(args.report)


def save_results(args, payload: dict, report, name: str) -> Path:
    """With ``--json PATH`` (make bench): the JSON there and the markdown report on stdout
    only (the caller tees it); otherwise ``name``.json and ``name``.md in ``args.out``.
    Returns the JSON's path."""
    if args.json:
        path = write_json(Path(args.json).name, payload, Path(args.json).parent)
        report(payload)
        print(f"JSON: {path}", file=sys.stderr)
    else:
        path = write_json(f"{name}.json", payload, args.out)
        md = emit_report(report, payload, f"{name}.md", args.out)
        print(f"JSON: {path}; markdown: {md}", file=sys.stderr)
    return path


def _plain(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"not JSON: {type(v)}")


def markdown_table(headers, rows, align=None) -> str:
    """A markdown table; ``align`` is a string of 'l'/'r' per column (default: first left)."""
    align = align or "l" + "r" * (len(headers) - 1)
    sep = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def fmt_time(t: dict) -> str:
    """'median (min..max)' in ms below 1 s, else s."""
    if t["median_s"] < 1:
        return f"{t['median_s'] * 1e3:.1f} ms ({t['min_s'] * 1e3:.1f}..{t['max_s'] * 1e3:.1f})"
    return f"{t['median_s']:.2f} s ({t['min_s']:.2f}..{t['max_s']:.2f})"


def fmt_rate(v: float) -> str:
    if v >= 1e9:
        return f"{v / 1e9:.2f} G"
    if v >= 1e6:
        return f"{v / 1e6:.2f} M"
    if v >= 1e3:
        return f"{v / 1e3:.1f} k"
    return f"{v:.0f}"


def add_output_args(ap, name: str) -> None:
    """--json and --report, as every make-bench script takes them."""
    ap.add_argument("--json", default=None, metavar="PATH",
                    help=f"write the JSON to PATH and the markdown report to stdout only (instead of "
                         f"{name}.json and {name}.md in --out)")
    ap.add_argument("--report", metavar="JSON", default=None,
                    help="only print the markdown report of an earlier run's JSON file")
