"""The ``stemstream`` command line, run for real in separate processes.

Every process is started by the test with ``python -m stream.cli ...``, binds only 127.0.0.1 on
ports found free (``stream.transport.net.free_port_block``), runs in its own session (process group) and
is killed, with everything it started, in a ``finally``.

Expected numbers never come from the code under test: events are regenerated in this process
through the emulator's Python API with the arguments the command line was given; images and
sums are dense numpy sums over masks built here from the documented geometry; completeness is
recomputed from the stored ``/completeness/received`` array.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from conftest import dense_frames
from stream.transport.net import free_port_block

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "stream.cli"]
ENV = {**os.environ, "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
ENV.pop("COLUMNS", None)


# ------------------------------------------------------------------ process helpers

def _child_setup():
    # A child inherits an ignored SIGINT (pytest started from a non-interactive background
    # shell); restore the default so that the CLI's Ctrl-C handling is what is tested.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _group_alive(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, read from /proc."""
    alive = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(d.name))
    return alive


def _kill_group(p: subprocess.Popen) -> None:
    """SIGKILL a child started with start_new_session=True and everything in its group."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        pass


class Cli:
    """A ``stemstream`` command running in the background; stdout and stderr are collected
    line by line by reader threads (so that the pipes never fill)."""

    def __init__(self, args, cwd=ROOT):
        self.args = [str(a) for a in args]
        self.p = subprocess.Popen(CLI + self.args, cwd=cwd, env=ENV, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, bufsize=1,
                                  start_new_session=True, preexec_fn=_child_setup)
        self.out: list[str] = []
        self.err: list[str] = []
        self._threads = [threading.Thread(target=self._read, args=(s, buf), daemon=True)
                         for s, buf in ((self.p.stdout, self.out), (self.p.stderr, self.err))]
        for t in self._threads:
            t.start()

    @staticmethod
    def _read(stream, buf):
        for line in stream:
            buf.append(line.rstrip("\n"))

    @property
    def stdout(self) -> str:
        return "\n".join(self.out)

    @property
    def stderr(self) -> str:
        return "\n".join(self.err)

    def wait_for(self, pattern: str, timeout: float) -> str:
        """The first stdout line matching ``pattern``; fails if the process ends or the time
        runs out first."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.out):
                if rx.search(line):
                    return line
            if self.p.poll() is not None:
                time.sleep(0.2)  # let the readers drain
                for line in list(self.out):
                    if rx.search(line):
                        return line
                pytest.fail(f"{' '.join(self.args[:1])} exited ({self.p.returncode}) before "
                            f"printing /{pattern}/\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}")
            time.sleep(0.05)
        pytest.fail(f"no /{pattern}/ within {timeout} s\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}")

    def wait(self, timeout: float) -> int:
        rc = self.p.wait(timeout)
        for t in self._threads:
            t.join(5)
        return rc

    def kill(self) -> None:
        _kill_group(self.p)


def run_cli(*args, cwd=ROOT, timeout=60) -> subprocess.CompletedProcess:
    """Run a command to its end (killed with its whole group after ``timeout``)."""
    p = subprocess.Popen(CLI + [str(a) for a in args], cwd=cwd, env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True,
                         preexec_fn=_child_setup)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(p)
        out, err = p.communicate()
        pytest.fail(f"stemstream {' '.join(map(str, args))} still running after {timeout} s\n"
                    f"stdout:\n{out}\nstderr:\n{err}")
    finally:
        _kill_group(p)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 2, no traceback, exactly one line on stderr that contains every needle."""
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{r.stderr}"
    assert r.returncode == 2, (r.returncode, r.stderr)
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


def start_processor(port: int, n_sources: int, out: Path, timeout_s: float, cwd) -> Cli:
    proc = Cli(["process", "--connect", f"tcp://127.0.0.1:{port}", "--sources", n_sources,
                "--workers", 2, "--out", out, "--timeout", timeout_s], cwd=cwd)
    return proc


# ------------------------------------------------------------------ independent references

def emulator_events(specimen: str, seed: int, scan, detector, dose: float):
    """The events ``stemstream simulate`` publishes for these arguments, regenerated through
    the emulator's Python API (presets overridden by the arguments, as the CLI documents)."""
    from sim_detector.simulate import Beam, Detector, ScanSpec, prepare_scan, presets
    from sim_detector.specimens import make_specimen

    spec = make_specimen(specimen, seed=seed)
    pre = presets(spec.name)
    beam = Beam(**{**pre["beam"], "dose": dose})
    det = Detector(**{**pre["detector"], "shape": tuple(detector)})
    sc = ScanSpec(**{**pre["scan"], "shape": tuple(scan)})
    prep = prepare_scan(spec, beam, det, sc, seed=seed, with_expected=False)
    counts, indices = prep.frames(0, prep.n_frames)
    return np.asarray(counts, np.int64), np.asarray(indices, np.uint32), prep.metadata


def csr_sorted(counts, indices):
    """(offsets, indices sorted within each frame): the stored layout, by numpy."""
    frame = np.repeat(np.arange(len(counts)), counts)
    order = np.lexsort((indices, frame))
    return np.r_[0, np.cumsum(counts)].astype(np.uint64), indices[order]


def radius_map(frame_shape, center):
    h, w = frame_shape
    yy, xx = np.mgrid[0:h, 0:w]
    return np.hypot(yy - center[0], xx - center[1])


def default_masks(frame_shape, mrad_per_px, convergence_mrad):
    """The default virtual detectors as docs/CONFIG.md defines them: bf is the closed disk
    r <= alpha/m about ((h-1)/2, (w-1)/2); adf is inner <= r < min(h, w)/2 with inner twice
    the bf radius, or halfway between the disk and the edge when twice does not fit."""
    h, w = frame_shape
    r = radius_map(frame_shape, ((h - 1) / 2, (w - 1) / 2))
    r_bf = convergence_mrad / mrad_per_px
    edge = min(h, w) / 2
    inner = 2 * r_bf if 2 * r_bf <= (r_bf + edge) / 2 else (r_bf + edge) / 2
    return r <= r_bf, (r >= inner) & (r < edge)


# docs/EMULATOR.md: the mgo preset puts the detector's inscribed edge at 144 mrad
def preset_mrad_per_px(frame_shape):
    return 144.0 / (min(frame_shape) / 2)


def sector_of_row(h: int, n_sources: int) -> np.ndarray:
    """Which source sends each detector row: equal stripes, edges rounded (docs/PROTOCOL.md)."""
    edges = np.rint(np.linspace(0, h, n_sources + 1)).astype(int)
    src = np.empty(h, np.int64)
    for k in range(n_sources):
        src[edges[k]:edges[k + 1]] = k
    return src


# ------------------------------------------------------------------ 1. simulate: bad arguments

SIM_SMALL = ["--scan", "4x4", "--detector", "32x32", "--rate", "max", "--wait", "2"]


def _garbage_files(d: Path) -> dict[str, Path]:
    xyz = d / "garbage.xyz"
    xyz.write_bytes(b"not a number of atoms\n\x00\x01\x02 \xff\xfe junk\n")
    mat = d / "garbage.mat"
    mat.write_bytes(b"MATLAB? no.\x00\x01\x02" * 7)
    csv = d / "two_columns.csv"
    csv.write_text("1 2\n3 4\n")
    return {"xyz": xyz, "mat": mat, "csv": csv}


@pytest.mark.parametrize("case", ["unknown-specimen", "scan-0x0", "dose-negative", "missing-file",
                                  "garbage-xyz", "garbage-mat", "garbage-csv", "sources-0",
                                  "tilts-two-fields", "tilts-reversed", "tilts-negative-two-fields"])
def test_simulate_bad_argument_is_one_line_exit_2(tmp_path, case):
    port = free_port_block(1)
    files = _garbage_files(tmp_path)
    missing = tmp_path / "no_such_model.xyz"
    args, needles = {
        "unknown-specimen": (["--specimen", "unobtainium"], ["unobtainium", "mgo"]),
        "scan-0x0": (["--scan", "0x0"], ["--scan", "0x0"]),
        "dose-negative": (["--dose", "-1"], ["--dose", "-1"]),
        "missing-file": (["--specimen", missing], [str(missing)]),
        "garbage-xyz": (["--specimen", files["xyz"]], [str(files["xyz"])]),
        "garbage-mat": (["--specimen", files["mat"]], [str(files["mat"])]),
        "garbage-csv": (["--specimen", files["csv"]], [str(files["csv"])]),
        "sources-0": (["--sources", "0"], ["--sources"]),
        "tilts-two-fields": (["--tilts", "0:30"], ["--tilts", "0:30", "START:STOP:STEP"]),
        "tilts-reversed": (["--tilts", "60:-60:3"], ["--tilts", "60:-60:3"]),
        "tilts-negative-two-fields": (["--tilts", "-60:60"], ["--tilts", "-60:60"]),
    }[case]
    scan_args = SIM_SMALL if case != "scan-0x0" else SIM_SMALL[2:]
    r = run_cli("simulate", "--bind", f"tcp://127.0.0.1:{port}", *scan_args, *args, cwd=tmp_path)
    line = assert_one_line_error(r, *needles)
    assert line.startswith("stemstream simulate: error:"), line
    assert "generated" not in r.stdout  # rejected before any work


@pytest.mark.parametrize("busy", [0, 2], ids=["first-source", "third-source"])
def test_simulate_port_in_use_is_one_line_exit_2(tmp_path, busy):
    port = free_port_block(4)
    blocker = socket.socket()
    try:
        blocker.bind(("127.0.0.1", port + busy))
        blocker.listen(1)
        r = run_cli("simulate", "--bind", f"tcp://127.0.0.1:{port}", "--sources", "4", *SIM_SMALL,
                    cwd=tmp_path)
    finally:
        blocker.close()
    assert_one_line_error(r, f"127.0.0.1:{port + busy}", "in use", "--bind")


@pytest.mark.parametrize("args", [["--dose", "inf"], ["--energy", "inf"], ["--detector", "70000x70000"]],
                         ids=["dose-inf", "energy-inf", "detector-too-large"])
def test_simulate_out_of_range_values_are_one_line_exit_2(tmp_path, args):
    port = free_port_block(1)
    r = run_cli("simulate", "--bind", f"tcp://127.0.0.1:{port}", *SIM_SMALL, *args, cwd=tmp_path)
    assert_one_line_error(r, args[0])


def test_simulate_help_exits_0_and_shows_the_example():
    r = run_cli("simulate", "--help")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    text = " ".join(r.stdout.split())  # argparse wraps the epilog
    assert "Example: stemstream simulate --specimen mgo --scan 128x128" in text
    assert "stemstream process --connect tcp://127.0.0.1:6001 --sources 4" in text
    for opt in ("--specimen", "--scan", "--dose", "--bind", "--sources", "--rate", "--truth", "--tilts"):
        assert opt in text


# ------------------------------------------------------------------ 2. end to end, real processes

E2E = dict(specimen="mgo", scan=(24, 32), detector=(96, 96), sources=4, dose=50.0, seed=3)


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """process (4 sources, 2 workers) + simulate, both real commands; stopped with SIGINT."""
    d = tmp_path_factory.mktemp("e2e")
    port = free_port_block(E2E["sources"])
    out = d / "out"
    proc = start_processor(port, E2E["sources"], out, 3, cwd=d)
    try:
        proc.wait_for(r"processing every scan", 120)
        sim = run_cli("simulate", "--specimen", E2E["specimen"], "--scan", "24x32", "--detector", "96x96",
                      "--sources", E2E["sources"], "--bind", f"tcp://127.0.0.1:{port}", "--rate", "max",
                      "--scan-id", "e2e", "--truth", "truth.h5", "--dose", "50", "--seed", E2E["seed"],
                      "--wait", "60", cwd=d, timeout=120)
        assert sim.returncode == 0, sim.stderr
        path = out / "e2e-0000.h5"
        deadline = time.monotonic() + 60
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert path.exists(), f"no {path}\n{proc.stdout}\n{proc.stderr}"
        done_line = proc.wait_for(r"\[e2e-0000\] (complete|incomplete|failed)", 30)
        t0 = time.monotonic()
        proc.p.send_signal(signal.SIGINT)  # `kill -INT PID`
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            rc = None
        stop_s = time.monotonic() - t0
        time.sleep(0.3)
        leftovers = _group_alive(proc.p.pid)
    finally:
        proc.kill()
    counts, indices, meta = emulator_events(E2E["specimen"], E2E["seed"], E2E["scan"], E2E["detector"],
                                            E2E["dose"])
    return SimpleNamespace(dir=d, path=path, sim=sim, proc=proc, rc=rc, stop_s=stop_s, done_line=done_line,
                           leftovers=leftovers, counts=counts, indices=indices, meta=meta)


def test_e2e_scan_file_complete_and_console(e2e):
    with h5py.File(e2e.path, "r") as f:
        assert f.attrs["status"] == "complete", f"{f.attrs['reason']}\n{e2e.proc.stdout[-4000:]}"
        assert f.attrs["scan_id"] == "e2e-0000"
        np.testing.assert_array_equal(f["completeness/received"][()], np.ones((4, 24 * 32)))
        assert len(f["completeness/missing_frames"]) == 0
    # the processor's console names the scan file and says complete
    assert "[e2e-0000] complete:" in e2e.done_line and str(e2e.path) in e2e.done_line, e2e.done_line
    assert "WARNING" not in e2e.proc.stdout and "ERROR" not in e2e.proc.stdout
    # the emulator's own report agrees with the regenerated events
    assert f"{len(e2e.indices):,} electrons" in e2e.sim.stdout
    assert f"{len(e2e.counts):,} frames" in e2e.sim.stdout


def test_e2e_regenerated_events_match_the_emulator_truth(e2e):
    """Guard for the reference: the scan regenerated here is the one the CLI simulated (the
    truth file the CLI wrote describes the same model, and the electron count fits it)."""
    with h5py.File(e2e.dir / "truth.h5", "r") as f:
        truth_meta = json.loads(f["e2e-0000"].attrs["metadata_json"])
        expected_total = f["e2e-0000/expected/total"][()].sum()
    regen = json.loads(json.dumps(e2e.meta, default=lambda v: v.tolist()))
    assert truth_meta == regen
    assert truth_meta["seed"] == E2E["seed"] and truth_meta["dose_e_per_frame"] == E2E["dose"]
    # Poisson count of all frames: within 5 sigma of the truth's expected total
    assert abs(len(e2e.indices) - expected_total) < 5 * np.sqrt(expected_total)


def test_e2e_stored_events_equal_regenerated_emulator_events(e2e):
    want_off, want_idx = csr_sorted(e2e.counts, e2e.indices)
    with h5py.File(e2e.path, "r") as f:
        off = f["events/offsets"][()]
        idx = f["events/indices"][()]
        assert f["events"].attrs["n_events"] == len(want_idx)
    assert len(off) == 24 * 32 + 1
    np.testing.assert_array_equal(off, want_off)   # electrons per frame, frame by frame
    np.testing.assert_array_equal(idx, want_idx)   # the pixels of every frame, sorted


def test_e2e_virtual_images_and_diffraction_sum_equal_dense_sums(e2e):
    h, w = E2E["detector"]
    with h5py.File(e2e.path, "r") as f:
        g = f["geometry"].attrs
        # the calibration the stream carried: mgo preset, edge at 144 mrad, 20 mrad (docs/EMULATOR.md)
        assert float(g["mrad_per_px"]) == preset_mrad_per_px((h, w)) and float(g["convergence_mrad"]) == 20.0
        np.testing.assert_array_equal(g["center"], [(h - 1) / 2, (w - 1) / 2])
        bf, adf, dsum = (f["results"][k][()] for k in ("bf", "adf", "diffraction_sum"))
    bf_mask, adf_mask = default_masks((h, w), preset_mrad_per_px((h, w)), 20.0)
    dense = dense_frames(e2e.counts, e2e.indices, (h, w))  # (frames, h, w)
    ref_bf = (dense * bf_mask).sum((1, 2)).reshape(E2E["scan"])
    ref_adf = (dense * adf_mask).sum((1, 2)).reshape(E2E["scan"])
    assert ref_adf.sum() > 0 and ref_bf.sum() > 0 and ref_bf.sum() < len(e2e.indices)
    np.testing.assert_array_equal(bf, ref_bf)
    np.testing.assert_array_equal(adf, ref_adf)
    np.testing.assert_array_equal(dsum, dense.sum(0))


def test_e2e_process_stops_cleanly_on_sigint(e2e):
    assert e2e.rc == 0, (e2e.rc, e2e.proc.stderr)
    assert e2e.stop_s < 5, f"took {e2e.stop_s:.1f} s to stop"
    assert "Traceback" not in e2e.proc.stderr, e2e.proc.stderr
    assert e2e.proc.out[-1] == "stopping", e2e.proc.stdout
    assert not e2e.leftovers, f"processes left running: {e2e.leftovers}"


def test_process_ctrl_c_to_the_process_group_is_quiet(tmp_path):
    port = free_port_block(1)
    proc = start_processor(port, 1, tmp_path / "out", 3, cwd=tmp_path)
    try:
        proc.wait_for(r"processing every scan", 120)
        time.sleep(0.5)
        os.killpg(proc.p.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        rc = proc.wait(30)
    finally:
        proc.kill()
    assert rc == 0
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


# ------------------------------------------------------------------ 3. emulator killed mid-scan

def test_emulator_killed_mid_scan_is_finalized_incomplete(tmp_path):
    n_src, scan, det, dose, seed = 2, (40, 40), (64, 64), 30.0, 5
    n_frames = scan[0] * scan[1]
    port = free_port_block(n_src)
    out = tmp_path / "out"
    proc = start_processor(port, n_src, out, 2, cwd=tmp_path)
    sim = None
    try:
        proc.wait_for(r"processing every scan", 120)
        sim = Cli(["simulate", "--specimen", "mgo", "--scan", "40x40", "--detector", "64x64",
                   "--sources", n_src, "--bind", f"tcp://127.0.0.1:{port}", "--rate", "1000",
                   "--batch", "64", "--dose", dose, "--seed", seed, "--scan-id", "kill"], cwd=tmp_path)
        sim.wait_for(r"\[kill-0000\] streaming", 60)  # printed 0.25 s into the 1.6 s scan
        time.sleep(0.3)
        sim.p.send_signal(signal.SIGKILL)  # no abort, no end: the detector just goes silent
        sim.wait(10)
        t_kill = time.monotonic()
        done = proc.wait_for(r"\[kill-0000\] (complete|incomplete|failed)", 60)
        closed_after = time.monotonic() - t_kill
        proc.wait_for(r"WARNING \[kill-0000\]", 10)
        proc.p.send_signal(signal.SIGTERM)  # what a batch system sends
        rc = proc.wait(30)
    finally:
        if sim is not None:
            sim.kill()
        proc.kill()
    assert rc == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "[kill-0000] incomplete:" in done, done
    assert closed_after >= 1.5, f"closed {closed_after:.2f} s after the kill, before the 2 s timeout"

    path = out / "kill-0000.h5"
    with h5py.File(path, "r") as f:
        status = f.attrs["status"]
        received = f["completeness/received"][()]
        missing = f["completeness/missing_frames"][()]
        off = f["events/offsets"][()]
        idx = f["events/indices"][()]
        dsum = f["results/diffraction_sum"][()]
        bf = f["results/bf"][()]
    assert status == "incomplete"
    assert received.shape == (n_src, n_frames)
    assert received.max() <= 1, "a frame arrived twice"
    want_missing = np.flatnonzero((received == 0).any(axis=0))
    assert 0 < len(want_missing) < n_frames, "the emulator was not killed mid-scan"
    np.testing.assert_array_equal(missing, want_missing)
    # a publisher that sends in order leaves a tail: every source received a prefix of the scan
    np.testing.assert_array_equal(missing, np.arange(missing[0], n_frames))
    for s in range(n_src):
        got = received[s] > 0
        k = int(got.sum())
        assert got[:k].all() and not got[k:].any(), f"source {s} did not receive a prefix"
    # the console names the missing range
    warning = next(line for line in proc.out if line.startswith("WARNING [kill-0000]"))
    assert f"{len(missing):,} frames never arrived" in warning, warning
    assert f"{missing[0]}-{n_frames - 1}" in warning, warning

    # stored events: exactly the regenerated events of the parts that arrived
    counts, indices, _ = emulator_events("mgo", seed, scan, det, dose)
    frame = np.repeat(np.arange(n_frames), counts)
    src = sector_of_row(det[0], n_src)[indices // det[1]]
    keep = received[src, frame] > 0
    assert keep.any() and not keep.all()
    kept_counts = np.bincount(frame[keep], minlength=n_frames)
    want_off, want_idx = csr_sorted(kept_counts, indices[keep])
    np.testing.assert_array_equal(off, want_off)
    np.testing.assert_array_equal(idx, want_idx)
    dense = dense_frames(kept_counts, indices[keep], det)
    np.testing.assert_array_equal(dsum, dense.sum(0))
    bf_mask, _ = default_masks(det, preset_mrad_per_px(det), 20.0)
    np.testing.assert_array_equal(bf, (dense * bf_mask).sum((1, 2)).reshape(scan))

    # and `stemstream info` says so
    r = run_cli("info", path)
    assert r.returncode == 0, r.stderr
    assert re.search(r"kill-0000 \S+ incomplete\b", r.stdout.splitlines()[0]), r.stdout
    assert f"{len(missing):,} missing" in r.stdout, r.stdout


# ------------------------------------------------------------------ 4. info

def test_info_text_names_scan_and_status(e2e):
    r = run_cli("info", e2e.path)
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[0]
    assert "e2e-0000" in first and re.search(r"\bcomplete\b", first), first
    assert str(e2e.path) in first


def test_info_json_counts_events(e2e):
    r = run_cli("info", "--json", e2e.path)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    with h5py.File(e2e.path, "r") as f:
        n_events = f["events/indices"].shape[0]
        n_frames = f["events/offsets"].shape[0] - 1
    assert n_events == len(e2e.indices)  # and the file holds every electron of the emulator
    assert d["events"]["n_events"] == n_events
    assert d["events"]["n_frames"] == n_frames
    assert d["scan_id"] == "e2e-0000" and d["status"] == "complete"


@pytest.mark.parametrize("kind", ["not-hdf5", "missing"])
def test_info_bad_file_is_one_line_exit_2(tmp_path, kind):
    path = tmp_path / ("notes.h5" if kind == "not-hdf5" else "nowhere.h5")
    if kind == "not-hdf5":
        path.write_text("this is a text file, not HDF5\n")
    r = run_cli("info", path)
    line = assert_one_line_error(r, str(path))
    assert line.startswith("stemstream info: error:"), line


def test_info_foreign_hdf5_file_is_one_line_exit_2(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "something-else"
        f["data"] = np.arange(3)
    r = run_cli("info", path)
    assert_one_line_error(r, str(path), "stemstream")


# ------------------------------------------------------------------ 5. process --config

@pytest.mark.parametrize("text, needles", [
    ("[scan]\ntimeout_s = 2\ntimout_s = 3\n", ["timout_s", "[scan]"]),
    ("[[virtual]]\nname = 'ring'\nshape = 'disk'\nradius_px = 3\nradius = 4\n", ["radius", "[[virtual]]"]),
    ("[sacn]\ntimeout_s = 2\n", ["sacn"]),
], ids=["key-in-section", "key-in-virtual", "section"])
def test_process_config_unknown_key_is_one_line_exit_2(tmp_path, text, needles):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    port = free_port_block(1)
    r = run_cli("process", "--config", cfg, "--connect", f"tcp://127.0.0.1:{port}",
                "--out", tmp_path / "out", timeout=60)
    line = assert_one_line_error(r, str(cfg), *needles)
    assert line.startswith("stemstream process: error:"), line
    assert not (tmp_path / "out").exists()


def test_process_config_wrong_value_type_is_one_line_exit_2(tmp_path):
    cfg = tmp_path / "typo.toml"
    cfg.write_text('[scan]\ntimeout_s = "2"\n')
    port = free_port_block(1)
    r = run_cli("process", "--config", cfg, "--connect", f"tcp://127.0.0.1:{port}",
                "--out", tmp_path / "out", timeout=60)
    assert_one_line_error(r, str(cfg), "timeout_s")


# ------------------------------------------------------------------ 6. demo

@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    # the Pt scan at 48² samples the particle at 0.54 Å: about half its 81 columns are
    # resolved, enough for the counting stage
    r = run_cli("demo", "--scan", "24x24", "--counting-scan", "48x48", "--detector", "64x64", "--out", d / "out",
                "--rate", "max", cwd=d, timeout=300)
    return SimpleNamespace(dir=d, out=d / "out", r=r)


def test_demo_small_scan_end_to_end(demo):
    r = demo.r
    assert r.returncode == 0, r.stdout + r.stderr
    path = demo.out / "demo-0000.h5"
    m = re.search(r"scan file\s*:\s*(\S+)", r.stdout)
    assert m, r.stdout
    assert Path(m.group(1)).resolve() == path.resolve()
    assert path.is_file()
    assert re.search(r"scan demo-0000 \(mgo, 500 e⁻/frame\) complete", r.stdout), r.stdout
    with h5py.File(path, "r") as f:
        assert f.attrs["status"] == "complete"
        assert f["events/offsets"].shape == (24 * 24 + 1,)
        assert tuple(f["results/diffraction_sum"].shape) == (64, 64)
        # every electron the emulator said it sent is in the file
        n_events = f["events/indices"].shape[0]
    assert f"{n_events:,} electrons" in r.stdout
    previews = demo.out / "previews"
    for name in ("demo-0000_summary.png", "demo-0000_bf.png", "demo-0000_adf.png",
                 "demo-0000_diffraction_sum.png", "demo-0000_com.png", "demo-0000_completeness.png"):
        p = previews / name
        assert p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", p
    assert (demo.out / "truth.h5").is_file()
    assert "Traceback" not in r.stderr
    # the downstream stages ran on the scan and said what they found
    for stage in ("phase", "columns", "counting"):
        assert re.search(rf"^    {stage} +\S", r.stdout, re.M), r.stdout
    assert re.search(r"vs truth +\d+/\d+ true columns found", r.stdout), r.stdout
    with h5py.File(path, "r") as f:
        assert {k: f["stages"][k].attrs["status"] for k in f["stages"]} == \
            {"phase": "ok", "columns": "ok", "counting": "ok"}
        # the dose advice of each 2D stage, in the stage's group
        # the dose is the file's electrons over its positions (and per Å² with the truth's step)
        adv = f["stages/phase/dose_advice"].attrs
        assert adv["dose_e_per_position"] == pytest.approx(n_events / (24 * 24), rel=1e-9)
        from sim_detector.truth import Truth
        with h5py.File(demo.out / "truth.h5", "r") as t:
            step = float(Truth.read(t["demo-0000"]).scan["step_A"])
        assert adv["dose_e_per_A2"] == pytest.approx(n_events / (24 * 24) / step ** 2, rel=1e-6)
        assert f["stages/counting/dose_advice"].attrs["counting_status"] in ("not possible", "possible",
                                                                              "uncertain")
    # the second scan: the Pt particle where counting can work; the demo's comparison with
    # the emulator's truth finds its columns, and where the stage gives counts their
    # measured exact fraction is what the stage predicted, within 10 points
    second = demo.out / "demo-counting-0000.h5"
    assert second.is_file() and "scan demo-counting-0000 (pt-particle" in r.stdout
    assert (demo.out / "truth-counting.h5").is_file()
    assert r.stdout.count("  stages    :") == 2
    pt = r.stdout[r.stdout.index("scan demo-counting-0000 (pt-particle"):]
    m = re.search(r"vs truth +(\d+)/(\d+) true columns found within 1 Å .*, (\d+) found columns match none", pt)
    assert m and int(m.group(1)) >= 0.4 * int(m.group(2)) > 0 and int(m.group(3)) <= 1, pt
    with h5py.File(second, "r") as f:
        counted = bool(f["stages/counting"].attrs["counted"])
    m = re.search(r"atom counts exact for (\d+)% of the found true columns \(predicted by the stage: (\d+)%\)", pt)
    assert (m is not None) == counted, pt
    if m:
        assert abs(int(m.group(1)) - int(m.group(2))) <= 10, pt
    # `stemstream info` shows the stored dose advice of the most complete 2D stage; --json has it
    info = run_cli("info", second)
    assert info.returncode == 0 and "dose advice (stage counting): dose " in info.stdout, info.stdout + info.stderr
    d = json.loads(run_cli("info", "--json", second).stdout)
    with h5py.File(second, "r") as f:
        n = f["events/indices"].shape[0]
    assert d["dose_advice"]["dose_e_per_position"] == pytest.approx(n / 48 ** 2, rel=1e-9)


def test_demo_summary_has_no_nan_and_no_warnings(demo):
    assert demo.r.returncode == 0
    assert "nan" not in demo.r.stdout, demo.r.stdout
    assert "Warning" not in demo.r.stderr, demo.r.stderr


def test_demo_reports_an_emulator_failure_promptly(tmp_path):
    p = subprocess.Popen(CLI + ["demo", "--scan", "4x4", "--detector", "32x32", "--out", str(tmp_path / "out"),
                                "--specimen", "nosuch"], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=_child_setup)
    try:
        # promptly: a demo that missed the failure would wait for its scan (600 s); the 90 s
        # are a cluster's start and stop on a loaded 2-core machine (about 10 s quiet)
        out, err = p.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        _kill_group(p)
        p.communicate()
        pytest.fail("demo still running 90 s after it started, with an emulator that fails at once")
    finally:
        _kill_group(p)
    assert p.returncode not in (0, None)
    assert "unknown specimen" in err or "nosuch" in err, err  # the emulator's own one-line error
    assert "demo: FAILED (emulator exit code 2" in err, err


# ------------------------------------------------------------------ series and interruption

def test_a_tilt_series_arrives_as_one_scan_per_tilt_with_its_angle(client2, tmp_path):
    """`simulate --tilts` publishes one scan per tilt angle; each file carries the angle, the
    series id and its place in the series, and the truth file has the same tilt."""
    from stream.session import Session
    port = free_port_block(2)
    with Session([f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{port + 1}"], out=tmp_path / "out",
                 client=client2, console=False) as s:
        r = run_cli("simulate", "--specimen", "pt-particle", "--size", "10", "--scan", "12x12",
                    "--detector", "48x48", "--tilts", "-20:20:20", "--sources", "2", "--bind",
                    f"tcp://127.0.0.1:{port}", "--rate", "max", "--scan-id", "ts", "--truth", "truth.h5",
                    "--dose", "20", "--wait", "60", cwd=tmp_path, timeout=120)
        assert r.returncode == 0, r.stderr
        results = [s.wait(f"ts-{k:04d}", timeout=60) for k in range(3)]
    series = set()
    with h5py.File(tmp_path / "truth.h5", "r") as truth:
        for k, (res, tilt) in enumerate(zip(results, (-20.0, 0.0, 20.0))):
            assert res.status == "complete"
            with h5py.File(res.path, "r") as f:
                md = f["metadata"].attrs
                assert (md["tilt_deg"], md["series_index"], md["series_length"]) == (tilt, k, 3)
                series.add(md["series_id"])
            assert truth[f"ts-{k:04d}"].attrs["tilt_deg"] == tilt
    assert len(series) == 1
    assert "3 scan(s)" in r.stdout


def test_ctrl_c_on_the_emulator_aborts_the_scan(client2, tmp_path):
    """Ctrl-C mid-scan sends `abort` on every source: the scan is written at once (not after
    the timeout) as incomplete, with the reason, and the emulator exits 130."""
    from stream.config import PipelineConfig, ScanSpec
    from stream.session import Session
    port = free_port_block(1)
    only_abort_closes = PipelineConfig(scan=ScanSpec(timeout_s=120.0))  # within the test's time
    with Session([f"tcp://127.0.0.1:{port}"], out=tmp_path / "out", client=client2, console=False,
                 config=only_abort_closes) as s:
        emu = Cli(["simulate", "--scan", "40x40", "--detector", "48x48", "--dose", "10", "--rate", "1000",
                   "--bind", f"tcp://127.0.0.1:{port}", "--scan-id", "cc"], cwd=tmp_path)
        try:
            emu.wait_for(r"streaming", 60)
            time.sleep(0.3)
            os.kill(emu.p.pid, signal.SIGINT)
            assert emu.wait(20) == 130
            r = s.wait("cc-0000", timeout=30)
        finally:
            emu.kill()
    assert "interrupted" in " ".join(emu.err)
    assert r.status == "incomplete" and "aborted by the source" in r.reason and "Ctrl-C" in r.reason
    assert 0 < r.frames_received < 1600 and r.n_missing == 1600 - r.frames_received
