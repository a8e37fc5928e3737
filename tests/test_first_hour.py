"""The first hour at the console (issue 16): what a new user runs from the README, and every
mistake they can make there, answered with one line naming the problem and the fix (exit code
2, no traceback), in real processes.

Expected values come from the test's own computation (file sizes from the file system, array
sizes from numpy, ports from the test's socket), never from the code under test."""

from __future__ import annotations

import json
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import zmq
from test_cli import Cli, _kill_group, assert_one_line_error, run_cli
from test_interop import GEOM, recorded  # noqa: F401 - a fixture

from operators.base import Result
from stream.files.storage import write_scan
from stream.transport.net import free_port_block

SYS = Path("/sys/stemstream-test")  # cannot be created, even by root
SYSFILE = Path("/sys")  # a directory that exists, in which no file can be created


def _sys_is_unwritable():
    try:
        SYS.mkdir()
    except OSError:
        return True
    SYS.rmdir()
    return False


unwritable = pytest.mark.skipif(not _sys_is_unwritable(), reason="/sys is writable here")


# ------------------------------------------------------------------ unwritable targets

@unwritable
@pytest.mark.parametrize("fmt, name, extra", [("stempy", "x.h5", []), ("libertem-csr", "x.toml", []),
                                              ("npy", "x.npy", ["--region", "0:2,0:2"])])
def test_export_to_an_unwritable_place_is_one_line(recorded, tmp_path, fmt, name, extra):  # noqa: F811
    path, _, _ = recorded
    r = run_cli("export", path, SYSFILE / name, "--format", fmt, *extra)
    target = SYSFILE / (name if fmt != "libertem-csr" else "x.indptr.raw")  # the first file it writes
    assert_one_line_error(r, f"cannot write {target}", "choose a directory you can write to")
    assert ".partial" not in r.stderr  # the name the user gave, not a temporary one


@unwritable
def test_import_stempy_to_an_unwritable_place_is_one_line(recorded, tmp_path):  # noqa: F811
    from stream.files.interop import export_stempy

    path, _, _ = recorded
    st = export_stempy(path, tmp_path / "st.h5")
    r = run_cli("import-stempy", st, SYSFILE / "y.h5")
    assert_one_line_error(r, f"cannot write {SYSFILE / 'y.h5'}", "choose a directory")


def test_demo_and_atoms_out_an_existing_file_is_one_line(tmp_path):
    existing = tmp_path / "results"
    existing.write_text("not a directory")
    r = run_cli("demo", "--out", existing, timeout=120)
    assert_one_line_error(r, f"--out {existing} is a file, not a directory", "give a directory")
    model = tmp_path / "m.csv"
    model.write_text("x,y,z\n" + "".join(f"{i},{2 * i % 7},{3 * i % 5}\n" for i in range(8)))
    r = run_cli("atoms", model, "--out", existing)
    assert_one_line_error(r, f"--out {existing} is a file, not a directory")


@unwritable
@pytest.mark.parametrize("command", ["demo", "atoms"])
def test_demo_and_atoms_out_an_unwritable_place_is_one_line(tmp_path, command):
    model = tmp_path / "m.csv"
    model.write_text("x,y,z\n" + "".join(f"{i},{2 * i % 7},{3 * i % 5}\n" for i in range(8)))
    args = ["demo", "--out", SYS] if command == "demo" else ["atoms", model, "--out", SYS]
    r = run_cli(*args, timeout=120)
    assert_one_line_error(r, f"--out {SYS} cannot be written", "choose a directory you can write to")


def test_atoms_out_with_results_there_already_names_out(tmp_path):
    model = tmp_path / "m.csv"
    model.write_text("x,y,z\n" + "".join(f"{i},{2 * i % 7},{3 * i % 5}\n" for i in range(8)))
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "m-atoms.csv").write_text("earlier results")
    r = run_cli("atoms", model, "--out", tmp_path / "o")
    assert_one_line_error(r, "m-atoms.csv exists", "choose another --out")


@unwritable
def test_tomo_out_an_unwritable_place_is_one_line_before_reconstructing(tmp_path):
    from test_series import md, scan_file

    paths = [scan_file(tmp_path / f"t{i}.h5", np.ones((8, 8)) * (1 + i), md("t", i, 3, t))
             for i, t in enumerate((-30.0, 0.0, 30.0))]
    r = run_cli("tomo", *paths, "--iterations", "2")  # these scans do not say their step
    assert_one_line_error(r, "no scan_step_A in the metadata", "--voxel-size")  # the option it has
    r = run_cli("tomo", *paths, "--out", SYS, "--iterations", "2", "--voxel-size", "0.4")
    assert_one_line_error(r, f"the output directory {SYS} cannot be written")
    assert "projections" not in r.stdout  # nothing was reconstructed first


# ------------------------------------------------------------------ info

def _scan_with_stages(path: Path) -> Path:
    """A scan file with centre-of-mass images, and the phase stage run on it."""
    from stream.stages.runner import run_stages

    rng = np.random.default_rng(0)
    ny, nx = 96, 128
    results = {"adf": Result(rng.poisson(5, (ny, nx)), "nav", "counts"),
               "com_y": Result(rng.normal(size=(ny, nx)), "nav", "px"),
               "com_x": Result(rng.normal(size=(ny, nx)), "nav", "px")}
    geometry = {"scan_shape": [ny, nx], "frame_shape": [8, 8], "frames_per_position": 1, "n_sources": 1,
                "flyback": 0, "mrad_per_px": 0.5}
    write_scan(path, scan_id=path.stem, status="complete", reason="test", geometry=geometry,
               metadata={"scan_step_A": 0.4, "wavelength_A": 0.0197}, results=results,
               offsets=np.zeros(ny * nx + 1, np.uint64), indices=np.zeros(0, np.uint32),
               completeness={"received": Result(np.ones((1, ny * nx), np.uint16), "table"),
                             "position_frames": Result(np.ones((ny, nx), np.uint16), "nav")},
               completeness_summary={"n_missing": 0}, provenance={}, compression_level=1)
    (rep,) = run_stages(path, ["phase"], {"phase": {"rotation_deg": 0.0, "flip": False}})
    assert rep.status == "ok", rep.error
    return path


def test_info_lists_the_stages_and_its_json_holds_no_arrays(tmp_path):
    path = _scan_with_stages(tmp_path / "s.h5")
    with h5py.File(path) as f:
        phase = f["stages/phase/phase"][()]
        headline = f["stages/phase"].attrs["headline"]
    r = run_cli("info", path)
    assert r.returncode == 0, r.stderr
    assert "stages" in r.stdout and "phase      ok in " in r.stdout and headline in r.stdout
    r = run_cli("info", "--json", path)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["stages"]["phase"]["status"] == "ok"
    assert d["stages"]["phase"]["arrays"]["phase"]["shape"] == list(phase.shape)
    assert d["stages"]["phase"]["params"]["rotation_deg"] == 0.0
    # the description is small whatever the scan's size: not one image inlined
    one_image = len(json.dumps(phase.tolist()))
    assert len(r.stdout) < one_image / 4, (len(r.stdout), one_image)


def test_info_on_a_stempy_file_suggests_import_stempy(recorded, tmp_path):  # noqa: F811
    from stream.files.interop import export_stempy

    path, _, _ = recorded
    st = export_stempy(path, tmp_path / "st.h5")
    r = run_cli("info", st)
    assert_one_line_error(r, str(st), "stempy sparse file", f"stemstream import-stempy {st}")


def test_libertem_export_reports_the_size_of_every_file(recorded, tmp_path):  # noqa: F811
    path, _, _ = recorded
    r = run_cli("export", path, tmp_path / "lt.toml", "--format", "libertem-csr")
    assert r.returncode == 0, r.stderr
    total = sum(p.stat().st_size for p in tmp_path.glob("lt.*"))
    assert len(list(tmp_path.glob("lt.*"))) == 4
    shown = f"{total / 1e6:.1f} MB" if total >= 1e6 else (f"{total / 1e3:.0f} kB" if total >= 1e3 else f"{total} bytes")
    assert f"and 3 raw files beside it (libertem-csr, {shown}," in r.stdout, r.stdout
    assert "0.0 MB" not in r.stdout


# ------------------------------------------------------------------ the emulator and its receivers

SMALL = ["--specimen", "mgo", "--scan", "8x8", "--detector", "32x32", "--dose", "20"]


def test_emulator_names_the_sources_without_a_receiver(tmp_path):
    """A receiver for the first of 3 sources only (the README's Python snippet without
    sources=3): the emulator says, within seconds and once it gives up, which ports lack one
    and which command connects all."""
    port = free_port_block(3)
    pull = zmq.Context.instance().socket(zmq.PULL)  # a plain receiver (simulate --insecure)
    pull.connect(f"tcp://127.0.0.1:{port}")
    try:
        r = run_cli("simulate", *SMALL, "--sources", "3", "--bind", f"tcp://127.0.0.1:{port}", "--wait", "6", "--insecure",
                    timeout=300)
    finally:
        pull.close(0)
    line = assert_one_line_error(r, "after 6 s", f"connected to tcp://127.0.0.1:{port} but not to "
                                 f"tcp://127.0.0.1:{port + 1}, tcp://127.0.0.1:{port + 2}",
                                 f"stemstream process --connect tcp://127.0.0.1:{port} --sources 3", "sources=3")
    assert line.startswith("stemstream simulate: error:")
    waiting = [ln for ln in r.stdout.splitlines() if ln.startswith("waiting:")]
    assert 1 <= len(waiting) <= 2, r.stdout  # said after 3 s, not in a loop


def test_emulator_says_when_the_processing_stops_mid_scan(tmp_path):
    """The processing goes away at the start of a scan: the emulator warns that no receiver is
    connected any more (instead of hanging silently at "streaming 62 %"), and with --wait it
    gives up with one line."""
    port = free_port_block(1)
    sim = Cli(["simulate", "--specimen", "mgo", "--scan", "64x64", "--detector", "32x32", "--dose", "20",
               "--rate", "2000", "--batch", "32", "--bind", f"tcp://127.0.0.1:{port}", "--wait", "12", "--insecure"],
              cwd=tmp_path)  # (plain: the test's own PULL socket plays the receiver)
    pull = zmq.Context.instance().socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 4)
    pull.connect(f"tcp://127.0.0.1:{port}")
    try:
        got, deadline = 0, time.monotonic() + 300
        while got < 6 and time.monotonic() < deadline:  # the start and a few batches
            if pull.poll(200):
                pull.recv_multipart()
                got += 1
        assert got == 6, sim.stdout + sim.stderr
        pull.close(0)  # the processing stops
        t0 = time.monotonic()
        code = sim.p.wait(60)
        took = time.monotonic() - t0
    finally:
        pull.close(0)
        _kill_group(sim.p)
    time.sleep(0.2)  # the reader threads
    assert code == 2, sim.stdout + sim.stderr
    assert 10 <= took < 45
    warnings = [ln for ln in sim.out if ln.startswith("WARNING:")]
    assert warnings and f"no receiver is connected to tcp://127.0.0.1:{port} any more" in warnings[0]
    assert "Ctrl-C to abort the scan" in warnings[0] and "giving up after 12 s" in warnings[0]
    assert len(sim.err) == 1 and "gave up after 12 s" in sim.err[0] and "Traceback" not in sim.stderr


@pytest.mark.parametrize("stalled", [True, False])
def test_emulator_says_when_it_drops_what_a_stalled_receiver_never_took(tmp_path, stalled):
    """The whole scan fits in the sockets' queues (64 messages of 400 kB) but the receiver
    takes none of it: at exit the emulator waits --linger 1 s, then says that what was still
    queued was dropped. A receiver that takes everything gets no such line."""
    port = free_port_block(1)
    pull = zmq.Context.instance().socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 1)
    pull.connect(f"tcp://127.0.0.1:{port}")
    sim = Cli(["simulate", "--specimen", "mgo", "--scan", "32x960", "--detector", "64x64", "--dose", "200",
               "--rate", "max", "--batch", "512", "--bind", f"tcp://127.0.0.1:{port}", "--wait", "60",
               "--linger", "1", "--insecure"], cwd=tmp_path)  # (plain: the test's PULL is the receiver)
    try:
        got = 0
        while sim.p.poll() is None and (not stalled or got < 1):  # stalled: the start only
            if pull.poll(100):
                pull.recv_multipart()
                got += 1
        code = sim.p.wait(120)
        while not stalled and pull.poll(500):  # what reached this socket before the emulator ended
            pull.recv_multipart()
            got += 1
    finally:
        pull.close(0)
        _kill_group(sim.p)
    time.sleep(0.2)  # the reader threads
    assert code == 0, sim.stdout + sim.stderr
    dropped = [ln for ln in sim.out if "were dropped at exit" in ln]
    if stalled:
        assert len(dropped) == 1 and dropped[0].startswith("simulate: WARNING: messages were still queued to a "
                                                           "receiver after 1 s"), sim.stdout
        assert "raise --linger" in dropped[0]
    else:
        assert not dropped and got == 2 + 32 * 960 // 512, sim.stdout  # start, every batch, end


# ------------------------------------------------------------------ small helpers with a big effect

def test_rates_and_counts_read_right():
    from stream.cli.commands import rate_text
    from stream.files.previews import plural

    assert rate_text(87_000, 1.0) == "87 kframes/s"
    assert rate_text(2_500, 1.0) == "2.5 kframes/s"
    assert rate_text(330, 1.0) == "330 frames/s"  # not "0 kframes/s"
    assert plural(1, "worker") == "1 worker" and plural(2, "worker") == "2 workers"
    assert plural(1, "class", "classes") == "1 class" and plural(3, "class", "classes") == "3 classes"


@pytest.mark.parametrize("voxel, fitted", [(0.80, "default"), (0.87, "raised"), (1.0, "skipped")])
def test_the_displacement_fit_radius_fits_the_voxels(voxel, fitted):
    """`tomo` on coarse voxels: the default fit radius (0.45 × nearest neighbour) is raised to
    the 1.5 voxels the fit needs while that stays within half the neighbour distance, and the
    fit is skipped with a note beyond; the statistics never fail for it."""
    from operators.structure.atom_tables import atom_statistics

    a = 3.92  # Pt, Å; nearest neighbours a/√2 = 2.772 Å
    g = np.arange(-2, 3)
    cubic = np.array([(x, y, z) for x in g for y in g for z in g], float)
    base = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    pos = (cubic[:, None] + base[None]).reshape(-1, 3) * a
    pos = pos[np.linalg.norm(pos, axis=1) < 6.5]
    n = int(np.ceil(16 / voxel)) * 2 + 1
    ax = (np.arange(n) - n // 2) * voxel
    zz, yy, xx = np.meshgrid(ax, ax, ax, indexing="ij")
    vol = np.zeros((n, n, n))
    for x, y, z in pos:
        vol += np.exp(-((xx - x) ** 2 + (yy - y) ** 2 + (zz - z) ** 2) / (2 * 0.5 ** 2))
    s = atom_statistics(pos, lattice="fcc", volume=vol, voxel_size=voxel, voronoi=False, motifs=False)
    nn = a / np.sqrt(2)
    if fitted == "default":
        assert s.fit_radius == pytest.approx(0.45 * nn) and s.displacement_note == ""
        assert np.isfinite(s.sigma_iso).mean() > 0.9
    elif fitted == "raised":
        assert 0.45 * nn < 1.5 * voxel <= 0.5 * nn
        assert s.fit_radius == pytest.approx(1.5 * voxel) and "raised" in s.displacement_note
        assert np.isfinite(s.sigma_iso).mean() > 0.9
    else:
        assert 1.5 * voxel > 0.5 * nn
        assert np.isnan(s.fit_radius) and np.isnan(s.sigma_iso).all()
        assert "not fitted" in s.displacement_note and f"at most {nn / 3:.2f} Å" in s.displacement_note
    assert s.cn_mean > 0  # the rest of the statistics is there either way
