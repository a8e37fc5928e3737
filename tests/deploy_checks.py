"""What the deployment tests (SLURM, several hosts) check in a scan file written far away:
every received frame's electrons equal the emulator's, regenerated here through its Python API;
the images equal dense numpy sums over exactly those frames; the frames that did not arrive are
the ones the file names as missing (or lost)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import h5py
import numpy as np
from conftest import dense_frames
from test_cli import (
    csr_sorted,
    default_masks,
    emulator_events,
    preset_mrad_per_px,
    sector_of_row,
)

ROOT = Path(__file__).resolve().parents[1]
# the scans the deployment tests stream: small, so that a loaded 2-core machine sends them fast
SCAN = {"specimen": "mgo", "seed": 5, "scan": (16, 24), "detector": (64, 64), "dose": 50.0}


def emulator_args(bind: str, sources: int, scan_id: str, rate: str, wait_s: int = 300,
                  heartbeat_s: float = 0) -> list[str]:
    """``stemstream simulate`` arguments for the SCAN above."""
    ny, nx = SCAN["scan"]
    h, w = SCAN["detector"]
    return ["simulate", "--specimen", SCAN["specimen"], "--seed", str(SCAN["seed"]), "--scan", f"{ny}x{nx}",
            "--detector", f"{h}x{w}", "--dose", str(SCAN["dose"]), "--sources", str(sources), "--bind", bind,
            "--rate", rate, "--batch", "8", "--scan-id", scan_id, "--wait", str(wait_s), "--quiet",
            "--heartbeat", str(heartbeat_s)]


_REFERENCE = {}


def reference_events():
    """(counts, indices) of the SCAN, regenerated here (cached: it is the same in every test)."""
    if "events" not in _REFERENCE:
        counts, indices, _ = emulator_events(SCAN["specimen"], SCAN["seed"], SCAN["scan"], SCAN["detector"],
                                             SCAN["dose"])
        _REFERENCE["events"] = (counts, indices)
    return _REFERENCE["events"]


def check_scan_file(path: Path, complete: bool) -> dict:
    """Compare the scan file with the regenerated SCAN. A complete file must hold every frame;
    an incomplete one must hold some, name every other one in /completeness/missing_frames (or
    lost_frames), and be exact on the ones it holds. Returns what it read (status, reason, the
    received mask)."""
    counts, indices = reference_events()
    n = len(counts)
    h, w = SCAN["detector"]
    with h5py.File(path, "r") as f:
        status, reason = f.attrs["status"], f.attrs["reason"]
        parts = f["completeness/received"][()] > 0  # (sources, frames): which parts arrived
        named = set(f["completeness/missing_frames"][()].tolist())
        if "lost_frames" in f["completeness"]:
            named |= set(f["completeness/lost_frames"][()].tolist())
        off, idx = f["events/offsets"][()], f["events/indices"][()]
        bf, adf, dsum = (f["results"][k][()] for k in ("bf", "adf", "diffraction_sum"))
    received = parts.all(axis=0)
    if complete:
        assert status == "complete", (status, reason)
        assert received.all() and not named
    else:
        assert status == "incomplete", (status, reason)
        assert 0 < received.sum() < n, received.sum()
        assert named == set(np.flatnonzero(~received).tolist()), "the file names exactly the frames it lacks"
    # the reference keeps, of every frame, the electrons of the sources whose part arrived
    frame_of = np.repeat(np.arange(n), counts)
    source_of = sector_of_row(h, parts.shape[0])[indices // w]
    keep = parts[source_of, frame_of]
    kept_counts = np.bincount(frame_of[keep], minlength=n)
    want_off, want_idx = csr_sorted(kept_counts, indices[keep])
    np.testing.assert_array_equal(off, want_off)  # electrons per frame, frame by frame
    np.testing.assert_array_equal(idx, want_idx)  # and their pixels
    dense = dense_frames(kept_counts, indices[keep], (h, w))
    bf_mask, adf_mask = default_masks((h, w), preset_mrad_per_px((h, w)), 20.0)
    np.testing.assert_array_equal(bf, (dense * bf_mask).sum((1, 2)).reshape(SCAN["scan"]))
    np.testing.assert_array_equal(adf, (dense * adf_mask).sum((1, 2)).reshape(SCAN["scan"]))
    np.testing.assert_array_equal(dsum, dense.sum(0))
    return {"status": status, "reason": reason, "received": received, "n_frames": n}


def wait_for_text(path: Path, pattern: str, timeout_s: float, what: str = "") -> re.Match:
    """The first match of ``pattern`` in the file at ``path`` (polled), or an AssertionError
    with the file's tail."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        m = re.search(pattern, text)
        if m:
            return m
        time.sleep(0.2)
    tail = path.read_text(errors="replace")[-4000:] if path.exists() else "(no file)"
    raise AssertionError(f"no /{pattern}/ in {path} within {timeout_s} s {what}\n{tail}")


def console(path: Path) -> str:
    """The coordinator's own lines of a log that also holds dask's (dask's all start with a date)."""
    return "\n".join(line for line in path.read_text(errors="replace").splitlines()
                     if not re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", line))
