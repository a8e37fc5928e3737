"""Where numba keeps the compiled kernels: one directory per version of the source code.

numba's ``cache=True`` drops a kernel's cached machine code when the kernel's own file
changes, not when a kernel it calls from another file does (numba's documentation, "Cache
invalidation"): after an edit of ``kernels.sort_segments``, the cached ``events`` kernels
would go on running the old sort. So the cache lives in a directory named after a hash of
every source file of ``operators``, ``stream`` and ``sim_detector``: any change compiles
afresh, an unchanged tree reuses what it compiled (a worker starting on it loads its kernels
in milliseconds). ``NUMBA_CACHE_DIR`` set in the environment wins.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

PACKAGES = ("operators", "stream", "sim_detector")
KEEP = 4  # cache directories of other source versions kept (switching branches)


def source_hash(root: Path) -> str:
    """sha1 (16 hex digits) of the names and contents of the packages' .py files."""
    h = hashlib.sha1()
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def configure() -> Path | None:
    """Point numba's cache at ``$XDG_CACHE_HOME/stemstream/numba/<source hash>`` (default
    ``~/.cache``); must run before the kernels are defined. Returns the directory, or None
    when the environment chose one or no directory is writable (numba then caches beside
    the sources, as it does by default)."""
    import numba

    if os.environ.get("NUMBA_CACHE_DIR"):
        return None
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stemstream" / "numba"
    try:
        target = base / source_hash(Path(__file__).resolve().parents[1])
        target.mkdir(parents=True, exist_ok=True)
        os.utime(target)  # the most recently used survive pruning
        others = sorted((d for d in base.iterdir() if d.is_dir() and d != target),
                        key=lambda d: d.stat().st_mtime, reverse=True)
        for old in others[KEEP:]:
            shutil.rmtree(old, ignore_errors=True)
    except OSError:
        return None
    numba.config.CACHE_DIR = str(target)
    return target


def compiled_kernels() -> int:
    """How many kernels numba has cached for this version of the source (0 on a first run:
    everything will be compiled, tens of seconds on a small machine)."""
    import numba

    d = Path(numba.config.CACHE_DIR or "")
    return sum(1 for _ in d.rglob("*.nbi")) if numba.config.CACHE_DIR and d.is_dir() else -1
