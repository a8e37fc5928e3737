"""A complete scan is never discarded: output read-only or full mid-session, a fallback
directory, a session stopped while a scan is held, `stemstream pending`.

Each test names what was lost (nothing that arrived) and what survived (every frame, in a
file equal dataset by dataset to a clean run of the same scan)."""

from __future__ import annotations

import logging
import re

import h5py
import numpy as np
import pytest

from faults import ROOT, assert_same_scan, fill, needs_root, set_read_only, tmpfs, wait_for, writable_dir
from stream.session import Session
from test_pipeline import GEOM, assert_matches, config, reference, synthetic_events


def send_scan(src, scan_id, events):
    src.start(scan_id, GEOM)
    src.frames(scan_id, GEOM, *events, batch=8)
    src.end(scan_id, GEOM.n_frames)


def clean_copy(s, src, events, tmp_path):
    """A clean run of the scan (output writable), copied aside as the reference file."""
    send_scan(src, "clean", events)
    r = s.wait("clean", timeout=120)
    assert r.status == "complete", r.reason
    copy = tmp_path / "clean.h5"
    copy.write_bytes(r.path.read_bytes())
    return r, copy


def session(tmp_path, out, src, client, console=True, **output):
    cfg = config(tmp_path, timeout_s=60)
    cfg.output.dir = str(out)
    for key, value in output.items():
        setattr(cfg.output, key, value)
    return Session(src.addresses, config=cfg, client=client, console=console)


def test_read_only_output_holds_the_scan_until_it_is_writable(client2, scripted_source, tmp_path, capsys):
    """Lost: nothing. Survived: the whole scan, held by the workers while the output is
    read-only, written when it is writable again, equal to a clean run."""
    events = synthetic_events(GEOM, seed=31)
    src = scripted_source(2)
    with writable_dir(tmp_path) as out:
        with session(tmp_path, out, src, client2) as s:
            src.wait_for_receivers()
            _, reference_copy = clean_copy(s, src, events, tmp_path)
            set_read_only(out, True)
            try:
                send_scan(src, "held", events)
                held = wait_for(lambda: [p for p in s.pending() if p["scan_id"] == "held" and p["attempts"] >= 2], 120)
                with pytest.raises(TimeoutError):
                    s.wait("held", timeout=0.5)
                assert held[0]["frames_received"] == GEOM.n_frames and "memory" in held[0]["where"]
                assert re.search("Read-only file system|Permission denied", held[0]["error"]), held[0]
                assert not list(out.glob("held*.h5"))
            finally:
                set_read_only(out, False)
            r = s.wait("held", timeout=120)  # retried (backoff <= 60 s; here within seconds)
        assert r.status == "complete" and r.path == out / "held.h5"
        assert_same_scan(r.path, reference_copy)
        assert_matches(r, reference(*events, GEOM), r.path)
        assert not list(out.glob(".*partial"))
    said = capsys.readouterr().out
    assert "ERROR [held] its file cannot be written" in said and "nothing is lost" in said
    assert "stemstream pending --finish held --to DIR" in said
    assert "[held] written after" in said


@needs_root
def test_a_full_file_system_holds_the_scan_until_there_is_room(client2, scripted_source, tmp_path):
    """A 5 MB file system filled up to half the size of the scan's file: it cannot be
    published; the finished file waits in the writer's staging directory and the states in
    memory. Lost: nothing. Survived: the scan, equal to a clean run, once there is room."""
    events = synthetic_events(GEOM, seed=32, dose=400)
    src = scripted_source(1)
    with tmpfs(tmp_path / "small", "5m") as out:
        with session(tmp_path, out, src, client2, console=False) as s:
            src.wait_for_receivers()
            clean, reference_copy = clean_copy(s, src, events, tmp_path)
            size = clean.path.stat().st_size
            clean.path.unlink()
            filler = fill(out, size // 2)
            send_scan(src, "full", events)
            held = wait_for(lambda: [p for p in s.pending() if p["scan_id"] == "full" and p["attempts"] >= 1], 120)
            assert "No space left on device" in held[0]["error"], held[0]
            assert "staging directory" in wait_for(
                lambda: [p["where"] for p in s.pending() if p["scan_id"] == "full" and "staging" in p["where"]], 60)[0]
            assert not list(out.glob("full*.h5")) and not list(out.glob(".*partial"))
            filler.unlink()
            r = s.wait("full", timeout=120)
        assert r.status == "complete" and r.path == out / "full.h5"
        assert_same_scan(r.path, reference_copy)


def test_a_fallback_directory_takes_the_file_and_it_moves_back(client2, scripted_source, tmp_path):
    """Lost: nothing. Survived: the scan, written at once into the fallback directory as a
    normal scan file (the workers' memory is freed), moved into the output directory once
    that is writable, bit for bit the file it was."""
    events = synthetic_events(GEOM, seed=33)
    src = scripted_source(1)
    with writable_dir(tmp_path) as out:
        with session(tmp_path, out, src, client2, console=False, fallback_dir=str(tmp_path / "fallback")) as s:
            src.wait_for_receivers()
            _, reference_copy = clean_copy(s, src, events, tmp_path)
            set_read_only(out, True)
            try:
                send_scan(src, "fell", events)
                r = s.wait("fell", timeout=120)
                assert r.status == "complete" and r.path == tmp_path / "fallback" / "fell.h5"
                assert_same_scan(r.path, reference_copy)
                in_fallback = r.path.read_bytes()
                assert [p["state"] for p in s.pending()] == ["in fallback"]
            finally:
                set_read_only(out, False)
            wait_for(lambda: not s.pending(), 120)
            assert s.results["fell"].path == out / "fell.h5"
        assert (out / "fell.h5").read_bytes() == in_fallback
        assert not (tmp_path / "fallback" / "fell.h5").exists()


@pytest.mark.parametrize("console", [True, False])
def test_stopping_the_session_waits_for_a_held_scan_then_rescues_it(client2, scripted_source, tmp_path,
                                                                    monkeypatch, capsys, caplog, console):
    """The session is asked to stop while a scan is held: it says so and retries; when the
    output stays read-only past the wait, the scan goes to ~/stemstream-rescued. Lost:
    nothing. Survived: the scan, equal to a clean run, in the rescue directory. Without a
    console (a program using the Session) the same lines are warnings in its log."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    caplog.set_level(logging.WARNING, logger="stemstream.session")
    events = synthetic_events(GEOM, seed=34)
    src = scripted_source(1)
    with writable_dir(tmp_path) as out:
        s = session(tmp_path, out, src, client2, console=console).start()
        try:
            src.wait_for_receivers()
            _, reference_copy = clean_copy(s, src, events, tmp_path)
            set_read_only(out, True)
            send_scan(src, "stop", events)
            wait_for(lambda: [p for p in s.pending() if p["attempts"] >= 1], 120)
        finally:
            s.close(wait_held_s=3)
            set_read_only(out, False)
    rescued = tmp_path / "home" / "stemstream-rescued" / "stop.h5"
    assert s.results["stop"].path == rescued and s.results["stop"].status == "complete"
    assert_same_scan(rescued, reference_copy)
    printed = capsys.readouterr().out
    logged = "\n".join(f"{r.levelname} {r.getMessage()}" for r in caplog.records if r.name == "stemstream.session")
    said = printed if console else logged
    assert "stopping: 1 scan(s) not written yet (stop:" in said
    assert "ERROR [stop] its file cannot be written" in said  # the first failed attempt
    assert "[stop] written after" in said  # the retry that wrote it (to the rescue directory)
    assert "LOST" not in said
    if not console:
        assert "[stop]" not in printed
        assert "WARNING stopping: 1 scan(s)" in logged and "ERROR ERROR [stop] its file cannot" in logged


def test_pending_lists_held_scans_and_finishes_one_elsewhere(client2, scripted_source, tmp_path, capsys):
    """`stemstream pending` (another process would do the same) lists the held scan with
    where it is and why; `--finish SCAN --to DIR` writes it there. Lost: nothing."""
    from stream.cli.commands import main
    events = synthetic_events(GEOM, seed=35)
    src = scripted_source(1)
    with writable_dir(tmp_path) as out:
        with session(tmp_path, out, src, client2, console=False) as s:
            src.wait_for_receivers()
            set_read_only(out, True)
            try:
                send_scan(src, "pend", events)
                wait_for(lambda: [p for p in s.pending() if p["attempts"] >= 1], 120)
                capsys.readouterr()
                assert main(["pending"]) == 0
                listed = capsys.readouterr().out
                assert re.search(rf"pend  held for \S+: {GEOM.n_frames:,}/{GEOM.n_frames:,} frames", listed), listed
                assert "last error:" in listed and "--finish pend --to DIR" in listed
                assert main(["pending", "--finish", "pend", "--to", str(tmp_path / "elsewhere")]) == 0
                assert f"pend: written to {tmp_path / 'elsewhere' / 'pend.h5'}" in capsys.readouterr().out
                # a scan no session holds: an error naming it, not a silent success
                assert main(["pending", "--finish", "nosuch", "--to", str(tmp_path / "elsewhere")]) == 2
                err = capsys.readouterr().err
                assert err.startswith("stemstream pending: error:") and "nosuch" in err, err
                r = s.wait("pend", timeout=10)
            finally:
                set_read_only(out, False)
    assert r.path == tmp_path / "elsewhere" / "pend.h5" and r.status == "complete"
    assert_matches(r, reference(*events, GEOM), r.path)
    with h5py.File(r.path) as f:
        assert (f["completeness/received"][()] == 1).all()
    assert main(["pending", "--finish", "pend", "--to", str(tmp_path)]) == 2  # no session now


def test_pending_with_two_sessions_neither_holding_the_scan_is_an_error(monkeypatch, capsys):
    """`pending --finish/--drop/--retry SCAN` asks every session; when each of two refuses, the
    command names the scan and both refusals (exit 2), not a silent success. The sessions'
    control answers are stood in for here (one function's logic; the real sockets are in the
    test above)."""
    import stream.session.ask as ask_mod
    from stream.cli.commands import main
    found = [{"pid": 101, "address": "ipc://a"}, {"pid": 202, "address": "ipc://b"}]
    asked = []

    def ask(address, req):
        asked.append((address, req["op"], req["scan"]))
        return {"ok": False, "error": f"no held scan {req['scan']} here"}
    monkeypatch.setattr(ask_mod, "sessions", lambda: found)
    monkeypatch.setattr(ask_mod, "ask", ask)
    for op in (["--finish", "nosuch", "--to", "/tmp"], ["--drop", "nosuch"], ["--retry", "nosuch"]):
        capsys.readouterr()
        assert main(["pending", *op]) == 2, op
        err = capsys.readouterr().err
        assert err.startswith("stemstream pending: error: no running session holds scan nosuch"), err
        assert "session 101" in err and "session 202" in err, err
    assert {a for a, _, _ in asked} == {"ipc://a", "ipc://b"}


def test_the_publish_step_never_leaves_a_partial_file(tmp_path):
    """storage.publish onto a full file system: a PublishError naming the path and the fix,
    nothing left in the target directory, the staged file intact (plain file I/O: no HDF5
    state is at risk)."""
    from stream.files.storage import PublishError, publish
    staged = tmp_path / "staged.h5"
    staged.write_bytes(np.random.default_rng(0).bytes(2_000_000))
    if not ROOT:
        target = tmp_path / "ro"
        target.mkdir()
        target.chmod(0o555)
        with pytest.raises(PublishError, match="make it writable"):
            publish(staged, target / "x.h5")
        target.chmod(0o755)
        assert not list(target.iterdir())
        return
    with tmpfs(tmp_path / "small", "1m") as small:
        with pytest.raises(PublishError, match=r"No space left on device; free space there"):
            publish(staged, small / "x.h5")
        assert not list(small.iterdir()) and staged.stat().st_size == 2_000_000


def test_the_commands_a_user_runs_while_the_output_is_read_only(tmp_path):
    """Real processes, as a user runs them: `stemstream process` writing into an output
    directory made read-only mid-session, `stemstream simulate` sending a scan, `stemstream
    pending` from another process listing it; once the directory is writable again the file
    appears, dataset by dataset equal to a clean run of the same seed, and the session stops
    cleanly. Lost: nothing."""
    import shutil
    import signal

    from stream.transport.net import free_port_block
    from test_cli import Cli, run_cli

    addr = f"tcp://127.0.0.1:{free_port_block(1)}"
    simulate = ["simulate", "--scan", "24x24", "--detector", "64x64", "--dose", "20", "--seed", "9",
                "--bind", addr, "--rate", "max", "--quiet", "--wait", "120"]
    with writable_dir(tmp_path) as out:
        proc = Cli(["process", "--connect", addr, "--workers", 2, "--out", out], cwd=tmp_path)
        try:
            proc.wait_for("processing every scan", 180)
            assert run_cli(*simulate, "--scan-id", "clean", cwd=tmp_path, timeout=300).returncode == 0
            proc.wait_for(r"\[clean-0000\] complete", 120)
            shutil.copy(out / "clean-0000.h5", tmp_path / "clean.h5")
            set_read_only(out, True)
            try:
                assert run_cli(*simulate, "--scan-id", "held", cwd=tmp_path, timeout=300).returncode == 0
                proc.wait_for(r"ERROR \[held-0000\] nothing is lost", 120)
                listed = run_cli("pending", cwd=tmp_path, timeout=60)
                assert listed.returncode == 0, listed.stderr
                assert re.search(r"held-0000  held for \S+: 576/576 frames", listed.stdout), listed.stdout
                assert not list(out.glob("held*.h5"))
            finally:
                set_read_only(out, False)
            proc.wait_for(r"\[held-0000\] written after \d+ attempts", 120)
            proc.p.send_signal(signal.SIGINT)
            rc = proc.wait(120)
        finally:
            proc.kill()
        assert rc == 0 and "Traceback" not in proc.stderr, proc.stderr
        with h5py.File(out / "held-0000.h5") as f:
            assert f.attrs["status"] == "complete"
        assert_same_scan(out / "held-0000.h5", tmp_path / "clean.h5")
    assert "LOST" not in proc.stdout
