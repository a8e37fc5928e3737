"""Full garbage collections kept off the stream (stream/session/quiet_gc.py): what a process
holds once set up is exempt from later collections, what comes later is collected as usual.

Each case runs in a fresh interpreter: freezing is once per process. That the session's
workers and its own process are frozen on a real cluster is checked in
tests/test_write_while_scanning.py; what it saves is measured in BENCHMARKS.md."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, check=False,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_freeze_collects_once_then_exempts_what_is_held_and_later_garbage_is_still_collected():
    out = run("""
        import gc, weakref
        from stream.session import quiet_gc

        class Node:
            pass

        def cycle():
            a, b = Node(), Node()
            a.other, b.other = b, a
            return weakref.ref(a)

        gc.disable()  # no automatic collection in between: only what the test calls collects
        before = cycle()           # garbage before the freeze: collected by it
        held = [Node() for _ in range(1000)]
        n = quiet_gc.freeze()
        assert before() is None, "freeze() left garbage behind (it would never be collected)"
        assert n == gc.get_freeze_count() > 1000
        ids = {id(o) for o in gc.get_objects()}
        assert not any(id(o) in ids for o in held), "an object held at the freeze is still walked"
        after = cycle()            # garbage made later: a second freeze() does not collect ...
        assert quiet_gc.freeze() == n and after() is not None
        gc.collect()               # ... the collector does, as usual
        assert after() is None
        print("ok")
    """)
    assert out.strip() == "ok"
