"""Freed memory kept for reuse (stream/session/heap.py): with dask's nanny setting
``MALLOC_TRIM_THRESHOLD_``, every array of 128 kB or more is mapped afresh and faulted in page
by page; after ``keep_freed_memory`` the next one reuses the freed memory. The kernel's count
of this process's page faults (``getrusage``) is the measure.

Each case runs in a fresh interpreter started as dask's nanny starts a worker; that the
session's workers do it is checked on the real cluster in tests/test_write_while_scanning.py.
What it saves end to end is in BENCHMARKS.md."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAULTS_PER_ARRAY = """
    import resource
    import numpy as np

    def faults_per_array(n_bytes=1 << 20, times=20):  # (below numpy's huge-page size)
        np.ones(n_bytes // 8).sum()  # the first one may fault in any case
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(times):
            np.ones(n_bytes // 8).sum()  # made, touched, freed: a chunk's array
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / times
"""


def run(code: str) -> str:
    env = dict(os.environ, MALLOC_TRIM_THRESHOLD_="65536")  # as distributed.nanny.pre-spawn-environ
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(FAULTS_PER_ARRAY) + textwrap.dedent(code)],
                          cwd=ROOT, env=env, capture_output=True, check=False, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_arrays_are_reused_instead_of_faulted_in_again():
    out = run("""
        from stream.session import heap
        before = faults_per_array()
        assert heap.keep_freed_memory() is True
        assert heap.keep_freed_memory() is True  # once per process; again does nothing
        after = faults_per_array()
        print(before, after)
    """)
    before, after = map(float, out.split())
    pages = (1 << 20) / 4096
    assert before > 0.9 * pages, "dask's setting no longer maps every large array afresh?"
    assert after < 0.02 * pages
