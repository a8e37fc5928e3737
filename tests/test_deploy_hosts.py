"""Several hosts on one machine: network namespaces joined by a bridge (tests/infra/netns.sh,
as root). A detector host runs ``stemstream simulate``, two worker hosts run ``dask worker``,
a head host runs ``dask scheduler`` and ``stemstream process`` (the coordinator). They share
the file system (as a cluster's hosts share /global/scratch), not the network: every byte
between them crosses the bridge.

dask's traffic is TLS (``stemstream keys --tls``), the detector's frames and the receivers'
reports CURVE (docs/SECURITY.md). A scan is received exactly across the hosts; then one worker host's link is cut mid-scan
(``ip link set ... down``): the session stays up, the scan is written with the frames that
host had taken named as missing and why, and the next scan is complete on the other host.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_checks import ROOT, check_scan_file, console, emulator_args, wait_for_text

pytestmark = pytest.mark.deploy

NETNS = ROOT / "tests/infra/netns.sh"
BIN = Path(sys.executable).parent
PREFIX = f"s{os.getpid() % 10000:04d}-"  # this run's namespaces; interface names stay < 16 chars
IP = {"head": "10.77.0.10", "detector": "10.77.0.20", "worker1": "10.77.0.21", "worker2": "10.77.0.22"}
SCHED = f"tls://{IP['head']}:8786"
DETECTOR = f"tcp://{IP['detector']}:6001"
SOURCES = 2
WORKER_TTL_S = 5  # the scheduler drops a silent worker after this (dask's default is 300 s)


def _netns(*args, check=True) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(NETNS), *args], env={**os.environ, "NETNS_PREFIX": PREFIX},
                          capture_output=True, text=True, timeout=120, check=check)


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, a bridge)"
    for cmd in ("ip", "ping"):
        if shutil.which(cmd) is None:
            return f"{cmd} not installed: apt-get install -y iproute2 iputils-ping (.ci/system-packages.txt)"
    return None


class Hosts:
    """The namespaces and what runs in them (each process its own session: killed as a group)."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen] = {}
        # every host: the same CURVE key directory (docs/SECURITY.md: copied to the detector's host)
        self.env = {**os.environ, "XDG_CONFIG_HOME": str(tmp / "config")}

    def run(self, host: str, name: str, cmd: list[str], **env) -> Path:
        log = self.tmp / f"{name}.log"
        with open(log, "w") as f:
            self.procs[name] = subprocess.Popen(["ip", "netns", "exec", PREFIX + host, *cmd], cwd=self.tmp,
                                                env={**self.env, **env}, stdout=f, stderr=subprocess.STDOUT,
                                                start_new_session=True)
        return log

    def stop(self, name: str, sig=signal.SIGTERM, wait_s: float = 60) -> int | None:
        p = self.procs[name]
        if p.poll() is None:
            os.killpg(p.pid, sig)
            try:
                p.wait(wait_s)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        return p.returncode


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    why = _missing()
    if why:
        pytest.skip(why)
    up = _netns("up", check=False)
    if up.returncode != 0:
        _netns("down", check=False)
        pytest.skip(f"network namespaces refused here: {up.stderr.strip() or up.stdout.strip()}")
    h = Hosts(tmp_path_factory.mktemp("hosts"))
    try:
        yield h
    finally:
        for name in reversed(list(h.procs)):  # the coordinator before the cluster it finalizes on
            h.stop(name, wait_s=40)
        _netns("down", check=False)


def emulate(h: Hosts, scan_id: str, rate: str) -> subprocess.Popen:
    h.run("detector", f"emulator-{scan_id}", [str(BIN / "stemstream"),
                                                     *emulator_args(DETECTOR, SOURCES, scan_id, rate, heartbeat_s=1)])
    return h.procs[f"emulator-{scan_id}"]


@pytest.fixture(scope="module")
def cluster(hosts):
    """Scheduler and coordinator on the head host, a worker on each worker host."""
    h = hosts
    out = h.tmp / "scans"
    keys = subprocess.run([str(BIN / "stemstream"), "keys", "--tls", str(h.tmp / "tls")], capture_output=True,
                          text=True, timeout=120, env=h.env, check=False)
    assert keys.returncode == 0, keys.stderr
    tls = ["--tls-ca-file", str(h.tmp / "tls/ca.pem"), "--tls-cert", str(h.tmp / "tls/cert.pem"),
           "--tls-key", str(h.tmp / "tls/key.pem")]
    h.run("head", "scheduler", [str(BIN / "dask"), "scheduler", "--protocol", "tls", "--host", IP["head"],
                                "--port", "8786", "--no-dashboard", *tls],
          DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL=f"{WORKER_TTL_S}s")
    for w in ("worker1", "worker2"):
        h.run(w, w, [str(BIN / "dask"), "worker", SCHED, "--protocol", "tls", "--host", IP[w], "--nthreads", "1",
                     "--memory-limit", "0", "--no-dashboard", "--death-timeout", "60", *tls])
    log = h.run("head", "coordinator", [str(BIN / "stemstream"), "process", "--scheduler", SCHED, *tls,
                                        "--connect", DETECTOR, "--sources", str(SOURCES), "--out", str(out),
                                        "--timeout", "4"])
    wait_for_text(log, r"processing every scan", 180, "(the coordinator did not start)")
    return {"out": out, "log": log}


def written_after(log: Path, scan_id: str) -> float:
    m = re.search(rf"\[{scan_id}\] .* written (\d+\.\d+) s after the last frame", console(log))
    assert m, console(log)
    return float(m.group(1))


def test_a_scan_across_hosts_is_exact(hosts, cluster):
    text = console(cluster["log"])
    assert f"stemstream: 2 workers receiving from {DETECTOR}, " in text, text
    assert "security: CURVE on every channel; dask over TLS" in text, text
    # from the detector host, a dask client without the cluster's certificate gets nothing
    plain = subprocess.run(["ip", "netns", "exec", PREFIX + "detector", sys.executable, "-c",
                            f"from distributed import Client; Client('{SCHED.replace('tls', 'tcp')}', timeout=5)"],
                           capture_output=True, text=True, timeout=120, check=False)
    assert plain.returncode != 0, plain.stdout
    em = emulate(hosts, "hosts", "max")
    assert em.wait(300) == 0, (hosts.tmp / "emulator-hosts.log").read_text()
    wait_for_text(cluster["log"], r"\[hosts-0000\] (complete|incomplete)", 120)
    check_scan_file(cluster["out"] / "hosts-0000.h5", complete=True)
    lat = written_after(cluster["log"], "hosts-0000")
    print(f"latency to file across hosts: {lat:.2f} s after the last frame")  # deploy/README.md
    assert lat < 30


@pytest.mark.slow  # about 90 s: the scheduler takes worker-ttl + 30 s (a nanny restart attempt) to drop the host
def test_cutting_a_worker_host_names_its_frames_and_the_next_scan_completes(hosts, cluster):
    log = cluster["log"]
    em = emulate(hosts, "cut", "30")  # 384 frames in about 13 s
    wait_for_text(log, r"\[cut-0000\] +\d+/384 frames", 120, "(no progress line of the slow scan)")
    _netns("cut", "worker2")
    assert em.wait(300) == 0, (hosts.tmp / "emulator-cut.log").read_text()
    wait_for_text(log, r"\[cut-0000\] (complete|incomplete|failed)", 180)
    r = check_scan_file(cluster["out"] / "cut-0000.h5", complete=False)
    text = console(log)
    assert re.search(r"WARNING \[cut-0000\] [\d,]+ frames never arrived", text), text
    assert "left the cluster" in text, text  # the cause: a worker host was lost
    assert hosts.procs["coordinator"].poll() is None, "the session must stay up"
    em = emulate(hosts, "after", "max")
    assert em.wait(300) == 0, (hosts.tmp / "emulator-after.log").read_text()
    wait_for_text(log, r"\[after-0000\] (complete|incomplete|failed)", 120)
    check_scan_file(cluster["out"] / "after-0000.h5", complete=True)
    assert r["received"].sum() > 0
