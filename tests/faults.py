"""Helpers of the fault tests (tests/test_faults_*.py): file systems that fail on purpose,
worker processes to stop or kill, scan files compared dataset by dataset."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="mounting a small file system needs root "
                                                 "(CI runs the suite as root)")


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A tmpfs of ``size`` (e.g. '5m') mounted at ``path`` for the block; unmounted after."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def set_read_only(path: Path, read_only: bool) -> None:
    """As root, remount the tmpfs at ``path`` (root ignores permission bits); otherwise take
    the write permission away from the directory."""
    if ROOT:
        # a file still open for writing there (a preview being drawn) makes the remount fail
        # with "mount point is busy": try again until it is closed
        deadline = time.monotonic() + 60
        while subprocess.run(["mount", "-o", f"remount,{'ro' if read_only else 'rw'}", str(path)],
                             capture_output=True, check=False).returncode:
            if time.monotonic() > deadline:
                raise RuntimeError(f"could not remount {path} {'ro' if read_only else 'rw'} within 60 s")
            time.sleep(0.2)
    else:
        path.chmod(0o555 if read_only else 0o755)


@contextlib.contextmanager
def writable_dir(tmp_path: Path, name: str = "out"):
    """An output directory that ``set_read_only`` can make read-only: a tmpfs as root."""
    path = tmp_path / name
    if ROOT:
        with tmpfs(path, "64m"):
            yield path
    else:
        path.mkdir()
        try:
            yield path
        finally:
            path.chmod(0o755)


def fill(path: Path, leave_bytes: int) -> Path:
    """A file filling the file system of ``path`` up to ``leave_bytes`` free."""
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    filler = path / "filler.bin"
    with open(filler, "wb") as fh:
        fh.write(b"\0" * max(0, free - leave_bytes))
    return filler


def worker_pids(client) -> dict[str, int]:
    return client.run(os.getpid)


@contextlib.contextmanager
def stopped(pid: int):
    """The process is stopped (SIGSTOP) for the block, continued after, whatever happens."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def scan_datasets(path) -> dict[str, np.ndarray]:
    """Every dataset of /events, /results and /completeness of a scan file, by path."""
    out = {}
    with h5py.File(path, "r") as f:
        for group in ("events", "results", "completeness"):
            f[group].visititems(lambda name, obj, g=group: out.__setitem__(f"{g}/{name}", obj[()])
                                if isinstance(obj, h5py.Dataset) else None)
    return out


def assert_same_scan(path, reference_path) -> None:
    """Bit for bit the same events, results and completeness as the reference file."""
    got, want = scan_datasets(path), scan_datasets(reference_path)
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert got[name].dtype == value.dtype, name
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def file_contents(path, skip=()) -> dict:
    """Everything a reader sees of an HDF5 file, by path: each group's and dataset's
    attributes, each dataset's values, dtype, shape, maxshape, chunking and filters. ``skip``:
    paths of attributes (``/provenance@host``) or whole groups (``/provenance/timings``) to
    leave out."""
    out = {}

    def attrs(name, obj):
        for key, value in obj.attrs.items():
            where = f"/{name}@{key}".replace("//", "/")
            if where not in skip:
                out[where] = value

    def visit(name, obj):
        if any(f"/{name}" == s or f"/{name}".startswith(s + "/") for s in skip):
            return
        attrs(name, obj)
        if isinstance(obj, h5py.Dataset):
            out[f"/{name}"] = (obj[()], obj.dtype, obj.shape, obj.maxshape, obj.chunks, obj.compression,
                               obj.compression_opts, obj.shuffle, obj.fletcher32, obj.scaleoffset)
    with h5py.File(path, "r") as f:
        attrs("", f)
        f.visititems(visit)
    return out


def assert_same_file(path, reference_path, skip=()) -> None:
    """Every dataset (values, dtype, shape, maxshape, chunking, filters) and every attribute
    the same as in the reference file, except ``skip`` (``file_contents``)."""
    got, want = file_contents(path, skip), file_contents(reference_path, skip)
    assert sorted(got) == sorted(want), set(got) ^ set(want)
    for name, value in want.items():
        if isinstance(value, tuple):
            np.testing.assert_array_equal(got[name][0], value[0], err_msg=name)
            assert got[name][1:] == value[1:], (name, got[name][1:], value[1:])
        else:
            np.testing.assert_array_equal(got[name], value, err_msg=name)


def wait_for(predicate, timeout_s: float, every_s: float = 0.1):
    """predicate()'s value once it is truthy; AssertionError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout_s} s: {predicate}")
        time.sleep(every_s)


def rss_and_fds(client) -> dict[str, tuple[int, int]]:
    """Per worker: resident memory (bytes) and open file descriptors."""
    def probe():
        import psutil
        p = psutil.Process()
        return p.memory_info().rss, p.num_fds()
    return client.run(probe)


# ------------------------------------------------------------------ malformed messages
def fuzz_messages(rng: np.random.Generator, n: int, geometry, good: str = "good") -> list[tuple]:
    """``n`` malformed messages, each wrong in exactly one way, built with msgpack alone
    (not our encoder) from docs/PROTOCOL.md: (parts, expected reject reason, whether its
    header names the scan ``good``). Random content everywhere; never a valid message, and
    never a valid geometry other than ``geometry`` (that would be another scan, not junk)."""
    import msgpack

    h, w = geometry.frame_shape
    g = {"scan_shape": list(geometry.scan_shape), "frame_shape": [h, w],
         "frames_per_position": geometry.frames_per_position, "n_sources": 1, "flyback": geometry.flyback}

    def sid():
        return good if rng.random() < 0.5 else f"junk-{rng.integers(1 << 30)}"

    def frames_msg(scan, **change):
        count = int(rng.integers(1, 5))
        first = int(rng.integers(0, geometry.n_frames - count))
        counts = rng.integers(0, 20, count).astype("<u4")
        indices = rng.integers(0, h * w, int(counts.sum())).astype("<u4")
        header = {"proto": "stemstream/1", "kind": "frames", "scan_id": scan, "source": 0,
                  "first": first, "count": count, "events": int(counts.sum()), **g}
        parts = [header, counts.tobytes(), indices.tobytes()]
        for key, value in change.items():
            if key == "part1":
                parts[1] = value
            elif key == "part2":
                parts[2] = value
            elif value is None:
                header.pop(key, None)
            else:
                header[key] = value
        return [msgpack.packb(parts[0])] + parts[1:]

    def make():
        kind = int(rng.integers(0, 15))
        scan = sid()
        if kind == 0:
            return [rng.bytes(int(rng.integers(1, 200)))], "not_msgpack", False
        if kind == 1:
            return [msgpack.packb([scan, int(rng.integers(100))])], "not_msgpack", False
        if kind == 2:
            return frames_msg(scan, proto=f"stemstream/{int(rng.integers(2, 99))}"), "bad_version", scan == good
        if kind == 3:
            return frames_msg(scan, kind=f"k{int(rng.integers(1000))}"), "unknown_kind", scan == good
        if kind == 4:
            bad = "".join(rng.choice(list("!@#$% /\\"), 5)) + str(rng.integers(1000))
            return frames_msg(bad), "bad_header", False
        if kind == 5:
            return frames_msg(scan, part1=rng.bytes(int(rng.integers(0, 3)) * 4 + 2)), "count_mismatch", scan == good
        if kind == 6:  # more index bytes than the header's events (at most 4 * 19 per frame)
            return frames_msg(scan, part2=rng.bytes(4 * int(rng.integers(80, 200)))), "event_mismatch", scan == good
        if kind == 7:
            m = frames_msg(scan)
            idx = np.frombuffer(m[2], "<u4").copy()
            if not len(idx):
                return frames_msg(scan, first="x"), "bad_header", scan == good
            idx[rng.integers(len(idx))] = h * w + int(rng.integers(0, 1 << 20))
            return m[:2] + [idx.tobytes()], "index_out_of_range", scan == good
        if kind == 8:
            return frames_msg(scan, first=geometry.n_frames + int(rng.integers(0, 100))), "frame_out_of_range", scan == good
        if kind == 9:
            m = frames_msg(scan)
            return (m[:1] if rng.random() < 0.5 else m + [b"extra"]), "wrong_parts", scan == good
        if kind == 10:
            return frames_msg(scan, scan_shape=None), "missing_geometry", scan == good
        if kind == 11 and scan == good:  # an impossible geometry (a new scan id would open a failed scan)
            return frames_msg(scan, scan_shape=[-int(rng.integers(1, 9)), 4]), "bad_geometry", True
        if kind == 12:
            return [msgpack.packb({"proto": "stemstream/1", "kind": "end", "scan_id": scan, "source": 0,
                                   "frames_sent": -int(rng.integers(1, 100))})], "bad_header", scan == good
        if kind == 13:
            return [msgpack.packb({"proto": "stemstream/1", "kind": "abort", "scan_id": scan, "source": 0,
                                   "reason": int(rng.integers(100))})], "bad_header", scan == good
        return [msgpack.packb({"proto": "stemstream/1", "kind": "frames", "scan_id": scan,
                               "source": 0})[:-int(rng.integers(1, 8))]], "not_msgpack", False

    return [make() for _ in range(n)]
