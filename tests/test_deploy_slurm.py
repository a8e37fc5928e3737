"""Real SLURM on this machine: munged, slurmctld and slurmd from Debian's packages, started by
tests/infra/slurm_up.sh with a generated slurm.conf (as root; CI runs as root).

(a) ``sbatch deploy/slurm/stemstream.sbatch`` — dask scheduler and workers as job steps, the
coordinator in the batch script — receives a scan from ``stemstream simulate`` and writes it
exactly; then ``scancel`` mid-scan ends the job cleanly: the open scan is written with what
arrived, its missing frames named in the file and on the console, every process gone before
SLURM's SIGKILL. (b) ``deploy/slurm/jobqueue.py`` (dask-jobqueue's SLURMCluster: every worker
its own SLURM job) receives a scan exactly and, stopped, cancels its worker jobs.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from deploy_checks import ROOT, check_scan_file, console, emulator_args, wait_for_text

from stream.transport.net import free_port_block

pytestmark = pytest.mark.deploy

KILLWAIT_S = 40  # SLURM's SIGTERM -> SIGKILL delay here; [cluster] stop_grace_s (25 s) fits in it
PY = sys.executable
VENV = Path(PY).parent.parent


def _slurm_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (slurmd runs jobs as any user; CI runs as root)"
    missing = [c for c in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(c) is None]
    if missing:
        return f"{', '.join(missing)} not installed: apt-get install -y slurm-wlm munge (.ci/system-packages.txt)"
    return None


@pytest.fixture(scope="module")
def slurm():
    """A one-node SLURM cluster of its own (free ports, state in a temporary directory)."""
    why = _slurm_missing()
    if why:
        pytest.skip(why)
    # munged wants every directory above its socket world-executable: not pytest's (0700)
    state = Path(tempfile.mkdtemp(prefix="stemstream-slurm-"))
    state.chmod(0o755)
    port = free_port_block(2)
    env = {**os.environ, "SLURM_CTLD_PORT": str(port), "SLURMD_PORT": str(port + 1),
           "SLURM_KILLWAIT": str(KILLWAIT_S), "SLURM_CPUS": "4",
           # the CURVE key directory the emulator and the coordinator share (docs/SECURITY.md)
           "XDG_CONFIG_HOME": str(state / "config")}
    up = subprocess.run(["bash", str(ROOT / "tests/infra/slurm_up.sh"), str(state)], env=env,
                        capture_output=True, text=True, timeout=120, check=False)
    try:
        assert up.returncode == 0, f"slurm_up.sh failed:\n{up.stdout}\n{up.stderr}"
        env["SLURM_CONF"] = str(state / "etc/slurm.conf")
        yield env
    finally:
        subprocess.run(["bash", str(ROOT / "tests/infra/slurm_down.sh"), str(state)], env=env,
                       capture_output=True, timeout=120, check=False)
        shutil.rmtree(state, ignore_errors=True)


def emulator(tmp: Path, port: int, scan_id: str, rate: str, env) -> subprocess.Popen:
    with open(tmp / f"emulator-{scan_id}.log", "w") as log:  # the child keeps its own descriptor
        return subprocess.Popen([str(VENV / "bin/stemstream"),
                                 *emulator_args(f"tcp://127.0.0.1:{port}", 1, scan_id, rate)],
                                cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def job_state(job: str, env) -> dict:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True, check=False).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def wait_job_gone(job: str, env, timeout_s: float) -> float:
    """Seconds until ``job`` left the queue (no longer RUNNING/COMPLETING)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        st = job_state(job, env).get("JobState", "")
        if st and st not in ("RUNNING", "COMPLETING", "PENDING", "CONFIGURING"):
            return time.monotonic() - t0
        time.sleep(0.2)
    raise AssertionError(f"job {job} still {job_state(job, env).get('JobState')} after {timeout_s} s")


def processes_mentioning(text: str) -> list[str]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and int(p.name) != os.getpid():
            try:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                if text in cmd and " Z " not in (p / "stat").read_text():
                    out.append(f"{p.name}: {cmd}")
            except OSError:
                pass
    return out


@pytest.fixture(scope="module")
def sbatch_run(slurm, tmp_path_factory):
    """The whole sbatch story, once: scan 'whole' streamed at full speed, then scan 'cut'
    streamed slowly and cancelled with scancel once a part of it arrived."""
    tmp = tmp_path_factory.mktemp("sbatch")
    out = tmp / "scans"
    port = free_port_block(1)
    env = dict(slurm)
    job_env = f"ALL,DETECTOR=tcp://127.0.0.1:{port},SOURCES=1,OUT={out},VENV={VENV}"
    job = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--ntasks=3", "--ntasks-per-node=3",
                          "--time=20", f"--output={tmp}/job.out", f"--export={job_env}",
                          str(ROOT / "deploy/slurm/stemstream.sbatch")],
                         env=env, capture_output=True, text=True, timeout=60, check=False)
    assert job.returncode == 0, job.stderr
    job_id = job.stdout.strip().split(";")[0]
    log = tmp / "job.out"
    emulators = []
    try:
        wait_for_text(log, r"processing every scan", 240, "(the coordinator did not start)")
        emulators.append(emulator(tmp, port, "whole", "max", env))
        assert emulators[-1].wait(300) == 0, (tmp / "emulator-whole.log").read_text()
        wait_for_text(log, r"\[whole-0000\] (complete|incomplete)", 120)
        emulators.append(emulator(tmp, port, "cut", "30", env))  # 384 frames in about 13 s
        wait_for_text(log, r"\[cut-0000\] +\d+/384 frames", 120, "(no progress line of the slow scan)")
        t_cancel = time.monotonic()
        subprocess.run(["scancel", job_id], env=env, check=True, timeout=30)
        gone_s = wait_job_gone(job_id, env, KILLWAIT_S + 30)
        sched_file = out / f"scheduler-{job_id}.json"
        leftovers = processes_mentioning(str(sched_file))
        state = job_state(job_id, env)
    finally:
        subprocess.run(["scancel", job_id], env=env, capture_output=True, check=False)
        for e in emulators:
            if e.poll() is None:
                os.killpg(e.pid, signal.SIGKILL)
            e.wait()
    return {"tmp": tmp, "out": out, "log": log, "job": job_id, "gone_s": gone_s, "leftovers": leftovers,
            "state": state, "cancel_to_end_s": time.monotonic() - t_cancel}


def test_sbatch_writes_the_emulated_scan_exactly(sbatch_run):
    r = check_scan_file(sbatch_run["out"] / "whole-0000.h5", complete=True)
    log = sbatch_run["log"].read_text(errors="replace")
    assert re.search(r"Scheduler at:\s+tls://", log), log[-3000:]
    assert "security: CURVE on every channel; dask over TLS" in console(sbatch_run["log"]), log[-3000:]
    assert not (sbatch_run["out"] / f"tls-{sbatch_run['job']}").exists(), "the job's TLS files outlive it"
    assert r["received"].all()
    text = console(sbatch_run["log"])
    assert "stemstream: 2 workers receiving from" in text, text  # both srun workers run a receiver
    assert "[whole-0000] complete: 384/384 frames" in text, text


def test_scancel_mid_scan_writes_what_arrived_and_names_the_rest(sbatch_run):
    r = check_scan_file(sbatch_run["out"] / "cut-0000.h5", complete=False)
    missing = r["n_frames"] - int(r["received"].sum())
    text = console(sbatch_run["log"])
    assert f"WARNING [cut-0000] {missing:,} frames never arrived" in text, text
    assert "stop requested; the coordinator writes the scans still open" in text, text
    assert sbatch_run["state"]["JobState"] == "CANCELLED", sbatch_run["state"]


def test_scancel_ends_every_process_of_the_job_before_sigkill(sbatch_run):
    """The scheduler and the workers held SIGTERM while the scan was written and then closed
    themselves: the job ended well before KillWait, and nothing of it is left running."""
    assert sbatch_run["gone_s"] < KILLWAIT_S - 5, f"job took {sbatch_run['gone_s']:.1f} s to end (KillWait {KILLWAIT_S})"
    assert not sbatch_run["leftovers"], sbatch_run["leftovers"]
    text = sbatch_run["log"].read_text(errors="replace")
    assert text.count("SIGTERM held for up to 25 s") >= 3, text[-3000:]  # scheduler, nannies, workers
    # dask may log its own closing connections; no traceback passes through stemstream's code
    assert f'File "{ROOT}/stream/' not in text and "Traceback" not in console(sbatch_run["log"]).split(
        "stop requested")[0], text[-4000:]


def queued_jobs(env, name: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i %T"], env=env, capture_output=True, text=True,
                         check=True, timeout=30).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def jobqueue_run(slurm, tmp_path_factory):
    """deploy/slurm/jobqueue.py with two worker jobs receives scan 'jq' at full speed, then is
    stopped (SIGTERM) and cancels its worker jobs."""
    tmp = tmp_path_factory.mktemp("jobqueue")
    out = tmp / "scans"
    port = free_port_block(1)
    log = tmp / "jobqueue.out"
    cmd = [PY, str(ROOT / "deploy/slurm/jobqueue.py"), "--connect", f"tcp://127.0.0.1:{port}", "--out", str(out),
           "--jobs", "2", "--cores", "1", "--memory", "2GB", "--walltime", "00:20:00", "--interface", "lo",
           "--log-directory", str(tmp / "logs")]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=tmp, env=slurm, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    em = None
    try:
        wait_for_text(log, r"processing every scan", 300, "(the coordinator did not start)")
        jobs = queued_jobs(slurm, "dask-worker")
        em = emulator(tmp, port, "jq", "max", slurm)
        assert em.wait(300) == 0, (tmp / "emulator-jq.log").read_text()
        wait_for_text(log, r"\[jq-0000\] (complete|incomplete)", 120)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(120)
        deadline = time.monotonic() + 60
        while queued_jobs(slurm, "dask-worker") and time.monotonic() < deadline:
            time.sleep(0.5)
        left = queued_jobs(slurm, "dask-worker")
    finally:
        for p in (proc, em):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        subprocess.run(["scancel", "-n", "dask-worker"], env=slurm, capture_output=True, check=False)
    worker_logs = "".join(f.read_text(errors="replace") for f in (tmp / "logs").glob("*.err"))
    return {"out": out, "log": log, "jobs": jobs, "rc": rc, "left": left, "worker_logs": worker_logs}


def test_jobqueue_workers_are_slurm_jobs_and_write_the_scan_exactly(jobqueue_run):
    assert len(jobqueue_run["jobs"]) == 2, jobqueue_run["jobs"]  # one SLURM job per worker
    check_scan_file(jobqueue_run["out"] / "jq-0000.h5", complete=True)
    text = console(jobqueue_run["log"])
    assert "stemstream: 2 workers receiving from" in text, text
    assert "[jq-0000] complete: 384/384 frames" in text, text


def test_jobqueue_workers_speak_tls(jobqueue_run):
    """dask's traffic is TLS; the workers' certificate directory is gone after the run."""
    assert len(re.findall(r"Start worker at:\s+tls://127\.0\.0\.1:", jobqueue_run["worker_logs"])) == 2, \
        jobqueue_run["worker_logs"][-3000:]
    assert "tcp://" not in jobqueue_run["worker_logs"], jobqueue_run["worker_logs"][-3000:]
    assert not list(jobqueue_run["out"].glob(".jobqueue-tls-*"))


def test_jobqueue_stopped_cancels_its_worker_jobs(jobqueue_run):
    assert jobqueue_run["rc"] == 0, console(jobqueue_run["log"])
    assert not jobqueue_run["left"], f"worker jobs still queued: {jobqueue_run['left']}"
    assert "Traceback" not in console(jobqueue_run["log"]), console(jobqueue_run["log"])
