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
        subprocess.run(["mount", "-o", f"remount,{'ro' if read_only else 'rw'}", str(path)], check=True)
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
