"""LiberTEM-live's detector simulators (the peers' own code, not ours), each started in a
process of its own on random ports, for the detector-source tests and the benchmark.

    with merlin_sim(hdr_path, (16, 16)) as sim:     # sim.data, sim.control: tcp://127.0.0.1:PORT
    with dectris_sim(dump_path) as sim:             # sim.dcu (http://…), sim.stream (tcp://…)

Both print their ports as one JSON line; they are stopped by their process group (their own
PID), never by name. DectrisSim gets random ports because a fixed ``--zmqport`` fails to bind
intermittently (libertem-live 0.3.0 builds its replay twice; docs/DECTRIS.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

MERLIN = """
import json, signal, sys, threading
from libertem_live.detectors.merlin.sim import CameraSim
path, ny, nx, cached = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
sim = CameraSim(path=path, nav_shape=(ny, nx) if ny else None, host="127.0.0.1", data_port=0,
                control_port=0, trigger_port=0, wait_trigger=True,
                cached=None if cached == "none" else cached)
sim.start()
sim.wait_for_listen()
print(json.dumps({"data": sim.server_t.sockname[1], "control": sim.control_t.sockname[1]}), flush=True)
done = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: done.set())
signal.signal(signal.SIGINT, lambda *_: done.set())
done.wait()
sim.stop()
"""

DECTRIS = """
import json, signal, sys, threading
from libertem_live.detectors.dectris.sim import DectrisSim
sim = DectrisSim(path=sys.argv[1], port=0, zmqport=0, dwelltime=None, verbose=False)
sim.start()
sim.wait_for_listen()
print(json.dumps({"api": sim.port, "zmq": sim.zmqport}), flush=True)
done = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: done.set())
signal.signal(signal.SIGINT, lambda *_: done.set())
while not done.wait(0.2):
    if not sim.is_alive():
        break
sim.stop()
"""


@dataclass
class Sim:
    proc: subprocess.Popen
    ports: dict

    @property
    def data(self) -> str:
        return f"tcp://127.0.0.1:{self.ports['data']}"

    @property
    def control(self) -> str:
        return f"tcp://127.0.0.1:{self.ports['control']}"

    @property
    def dcu(self) -> str:
        return f"http://127.0.0.1:{self.ports['api']}"

    @property
    def stream(self) -> str:
        return f"tcp://127.0.0.1:{self.ports['zmq']}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def _start(code: str, args: list[str], timeout_s: float = 120.0) -> Sim:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)
    deadline = time.monotonic() + timeout_s
    line = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.strip().startswith("{"):
            return Sim(proc, json.loads(line))
        if proc.poll() is not None:
            break
    err = ""
    if proc.poll() is not None:
        err = proc.stderr.read()[-2000:]
    else:
        os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError(f"simulator did not start: {line!r} {err}")


@contextlib.contextmanager
def merlin_sim(hdr_path: str, scan_shape=None, cached: str = "MEM"):
    """LiberTEM-live's Merlin simulator serving a .hdr/.mib pair; it waits for
    STARTACQUISITION (and SOFTTRIGGER) on its control port like a real Merlin."""
    ny, nx = scan_shape or (0, 0)
    sim = _start(MERLIN, [hdr_path, str(ny), str(nx), cached])
    try:
        yield sim
    finally:
        sim.stop()


@contextlib.contextmanager
def dectris_sim(dump_path: str):
    """LiberTEM-live's DectrisSim (REST API + ZeroMQ replay) serving a stream dump."""
    sim = _start(DECTRIS, [dump_path])
    try:
        yield sim
    finally:
        sim.stop()
