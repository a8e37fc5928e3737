"""The emulator speaking real detectors' protocols: a DECTRIS DCU (SIMPLON REST API and its
ZeroMQ stream of compressed images) and a Quantum Detectors Merlin (control and data TCP
ports, MIB frames). ``stemstream simulate --as dectris|merlin`` (docs/EMULATOR.md).

The scans are the emulator's usual ones (same specimens, same electrons, same ground truth);
each frame is made dense here (electrons per pixel, clipped to the counter's depth) and
encoded as the detector would. Like the instruments, both wait to be started: a DCU by
``arm`` (and ``trigger`` for internal trigger modes), Merlin by ``STARTACQUISITION`` (and
``SOFTTRIGGER``); ``self_start`` starts every scan itself, as an operator at the microscope
would, for passive-mode sessions.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import numpy as np
import zmq

from stream.sources import mib, simplon

API = "1.8.0"


def dense_block(counts: np.ndarray, indices: np.ndarray, offsets: np.ndarray, first: int, n: int,
                shape, dtype, top: int) -> tuple[np.ndarray, int]:
    """Frames first … first+n−1 of a scan's events as (n, h, w) counts clipped to ``top``;
    also the electrons the clipping lost."""
    h, w = shape
    a, b = int(offsets[first]), int(offsets[first + n])
    frame = np.repeat(np.arange(n, dtype=np.int64), counts[first:first + n].astype(np.int64))
    dense = np.bincount(frame * (h * w) + indices[a:b], minlength=n * h * w).reshape(n, h, w)
    lost = int(np.maximum(dense - top, 0).sum())
    return np.minimum(dense, top).astype(dtype), lost


class _Scan:
    """The events of one generated scan, ready to be made dense block by block."""

    def __init__(self, scan_id, counts, indices, frame_shape, metadata):
        self.scan_id, self.counts, self.indices = scan_id, counts, indices
        self.frame_shape, self.metadata = frame_shape, metadata
        self.offsets = np.zeros(len(counts) + 1, np.int64)
        np.cumsum(counts, out=self.offsets[1:])


# ------------------------------------------------------------------ DECTRIS DCU

class DectrisEmulator:
    """A DCU: the REST API on ``api`` (http://HOST:PORT) and the stream's PUSH socket on
    ``stream`` (tcp://HOST:PORT). Series ids count up from 1 with every arm, as a DCU does."""

    def __init__(self, api: str, stream: str, frame_shape, compression: str = "bslz4",
                 bit_depth: int = 16, sndhwm: int = 1000):
        self.frame_shape = tuple(frame_shape)
        self.dtype = np.dtype(f"<u{bit_depth // 8}")
        h, w = self.frame_shape
        self.config = {"x_pixels_in_detector": w, "y_pixels_in_detector": h, "bit_depth_image": bit_depth,
                       "bit_depth_readout": bit_depth, "compression": compression, "trigger_mode": "exte",
                       "nimages": 1, "ntrigger": 1, "count_time": 1e-5, "frame_time": 1e-5,
                       "description": "DECTRIS ARINA (stemstream emulator)"}
        self.stream_config = {"mode": "enabled", "header_detail": "basic"}
        self.series = 0
        self.state = "idle"
        self._lock = threading.Lock()
        self._armed, self._trigger, self._abort = threading.Event(), threading.Event(), threading.Event()
        self._closing, self._idle = threading.Event(), threading.Event()
        self._idle.set()
        self._ctx = zmq.Context()
        self.push = self._ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.SNDHWM, sndhwm)
        self.push.setsockopt(zmq.LINGER, 2000)
        self.push.bind(stream)
        parts = urlsplit(api)
        self.http = ThreadingHTTPServer((parts.hostname, parts.port), self._handler())
        self.api = f"http://{parts.hostname}:{self.http.server_address[1]}"
        self._http_thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self._http_thread.start()

    def close(self) -> None:
        """Stop serving; a scan being sent stops (its thread returns) before the socket closes."""
        self._closing.set()
        self._abort.set()
        self._armed.set()  # a thread waiting to be armed wakes up and finds it closing
        self._idle.wait(5)
        self.http.shutdown()
        self.http.server_close()
        self.push.close(linger=0)
        self._ctx.term()

    def _send(self, parts, patience_s: float | None = None) -> bool:
        """Send one message; keep trying while the receivers are full (back-pressure), give
        up when closing, or after ``patience_s`` (None: only when closing or aborted)."""
        deadline = None if patience_s is None else time.monotonic() + patience_s
        while True:
            try:
                self.push.send_multipart(parts, flags=zmq.NOBLOCK)
                return True
            except zmq.Again:
                if self._closing.is_set() or (deadline is None and self._abort.is_set()) \
                        or (deadline is not None and time.monotonic() > deadline):
                    return False
                time.sleep(0.001)

    # REST ------------------------------------------------------------
    def _handler(self):
        dcu = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet: the emulator prints its own lines
                pass

            def _answer(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._answer(*dcu.rest("GET", self.path, None))

            def do_PUT(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n) or b"{}") if n else {}
                self._answer(*dcu.rest("PUT", self.path, body.get("value")))

        return Handler

    def rest(self, method: str, path: str, value):
        """(HTTP code, JSON body) for one request."""
        p = path.rstrip("/").split("/")
        with self._lock:
            if path.startswith("/detector/api/version"):
                return 200, {"value": API, "value_type": "string"}
            if len(p) == 6 and p[1] in ("detector", "stream") and p[4] == "config":
                table = self.config if p[1] == "detector" else self.stream_config
                if p[5] not in table:
                    return 404, {"error": f"no parameter {p[5]}"}
                if method == "PUT":
                    if self.state != "idle":
                        return 400, {"error": f"cannot change {p[5]} while {self.state}"}
                    table[p[5]] = value
                    return 200, [p[5]]
                return 200, {"value": table[p[5]], "access_mode": "rw"}
            if len(p) == 6 and p[1] == "detector" and p[4] == "status" and p[5] == "state":
                return 200, {"value": self.state}
            if len(p) == 6 and p[1] == "detector" and p[4] == "command" and method == "PUT":
                return self._command(p[5])
        return 404, {"error": f"not implemented: {method} {path}"}

    def _command(self, name: str):
        if name == "arm":
            if self.state != "idle":
                return 400, {"error": f"cannot arm while {self.state}"}
            self.series += 1
            self.state = "ready"
            self._abort.clear()
            self._trigger.clear()
            self._armed.set()
            return 200, {"sequence id": self.series}
        if name == "trigger":
            self._trigger.set()
            return 200, {}
        if name in ("disarm", "abort", "cancel"):
            if self.state != "idle":
                self._abort.set()
            return 200, {"sequence id": self.series}
        if name in ("initialize", "status_update"):
            return 200, {}
        return 400, {"error": f"command {name} not implemented"}

    # acquisitions -----------------------------------------------------
    def start_self(self) -> int:
        """Arm (and trigger) as an operator would; returns the series id."""
        with self._lock:
            series = self._command("arm")[1]["sequence id"]
        self._trigger.set()
        return series

    def wait_armed(self, stop: threading.Event | None = None) -> bool:
        while not self._armed.wait(0.2):
            if stop is not None and stop.is_set():
                return False
        self._armed.clear()
        return not self._closing.is_set()

    def send_scan(self, scan: _Scan, rate: float | None = None, progress=None) -> dict:
        """Send the armed series: header, configuration, images of ``scan`` (as many as the
        detector was configured for, at most the scan's), end. Returns what was sent."""
        with self._lock:
            series, config = self.series, dict(self.config)
            mode = config["trigger_mode"]
            n_conf = int(config["ntrigger"] if mode in ("exte", "inte") else config["nimages"])
            self.state = "acquire"
            self._idle.clear()
        try:
            return self._send_series(scan, series, config, mode, n_conf, rate, progress)
        finally:
            with self._lock:
                self.state = "idle"
            self._idle.set()

    def _send_series(self, scan, series, config, mode, n_conf, rate, progress) -> dict:
        n = min(len(scan.counts), n_conf) if n_conf > 1 else len(scan.counts)
        header = self.stream_config["header_detail"] != "none"
        cfg = simplon.detector_config(n, self.frame_shape, self.dtype, mode, config["compression"],
                                      config["frame_time"])
        for part in simplon.header_parts(series, cfg if header else None):
            self._send([part])
        if mode in ("ints", "inte"):
            while not self._trigger.wait(0.2):
                if self._abort.is_set():
                    break
        sent, lost, t0 = 0, 0, time.perf_counter()
        top = np.iinfo(self.dtype).max
        for lo in range(0, n, 64):
            if self._abort.is_set():
                break
            k = min(64, n - lo)
            block, dropped = dense_block(scan.counts, scan.indices, scan.offsets, lo, k,
                                         self.frame_shape, self.dtype, top)
            lost += dropped
            for i in range(k):
                if self._abort.is_set():
                    break
                if not self._send(simplon.image_parts(series, lo + i, block[i], config["compression"])):
                    break
                sent += 1
            if rate:
                ahead = t0 + sent / rate - time.perf_counter()
                if ahead > 0:
                    time.sleep(ahead)
            if progress:
                progress(sent, n)
        self._send([simplon.end_part(series)], patience_s=1.0 if self._abort.is_set() else None)
        return {"series": series, "frames": sent, "of": n, "aborted": self._abort.is_set(),
                "seconds": time.perf_counter() - t0, "clipped_electrons": lost}


# ------------------------------------------------------------------ Merlin

class MerlinEmulator:
    """A Merlin: the control port (MPX GET/SET/CMD) and the data port, one TCP client each
    at a time, frames sent as MIB (``bits`` 1, 6, 12 or 24; ``raw`` for R64)."""

    def __init__(self, control: str, data: str, frame_shape=(256, 256), bits: int = 12, raw: bool = False):
        if tuple(frame_shape) not in ((256, 256), (512, 512)):
            raise ValueError(f"a Merlin has 256x256 (one chip) or 512x512 (quad) pixels, not "
                             f"{frame_shape[0]}x{frame_shape[1]}")
        self.quad = tuple(frame_shape) == (512, 512)
        self.frame_shape = tuple(frame_shape)
        self.settings = {"COUNTERDEPTH": str(bits), "NUMFRAMESTOACQUIRE": "1", "TRIGGERSTART": "5",
                         "ACQUISITIONTIME": "0.1", "ACQUISITIONPERIOD": "0.1", "CONTINUOUSRW": "1",
                         "IMAGEX": str(frame_shape[1]), "IMAGEY": str(frame_shape[0]),
                         "FILEFORMAT": "2" if raw else "0", "SOFTWAREVERSION": "stemstream emulator",
                         "DETECTORSTATUS": "0"}
        self.raw = raw
        self._lock = threading.Lock()
        self._start, self._trigger, self._stop = threading.Event(), threading.Event(), threading.Event()
        self._closing = threading.Event()
        self.control_sock = self._listen(control)
        self.data_sock = self._listen(data)
        self.control = f"tcp://{self.control_sock.getsockname()[0]}:{self.control_sock.getsockname()[1]}"
        self.data = f"tcp://{self.data_sock.getsockname()[0]}:{self.data_sock.getsockname()[1]}"
        self.client: socket.socket | None = None
        threading.Thread(target=self._serve_control, daemon=True).start()

    @staticmethod
    def _listen(addr: str) -> socket.socket:
        parts = urlsplit(addr)
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((parts.hostname, parts.port))
        s.listen(1)
        return s

    @property
    def bits(self) -> int:
        return int(self.settings["COUNTERDEPTH"])

    def close(self) -> None:
        self._closing.set()
        for s in (self.client, self.control_sock, self.data_sock):
            if s is not None:
                s.close()

    def _serve_control(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self.control_sock.accept()
            except OSError:
                return
            with conn:
                try:
                    while True:
                        prefix = _recv_exact(conn, mib.MPX_PREFIX_LEN)
                        body = _recv_exact(conn, mib.parse_mpx_prefix(prefix)).decode("ascii")
                        answer = self.request(body)
                        conn.sendall(mib.mpx_prefix(len(answer)) + answer.encode("ascii"))
                except (ConnectionError, OSError, mib.MibError):
                    continue

    def request(self, body: str) -> str:
        """Merlin's answer to one control request (return code last: 0 ok, 2 unknown)."""
        f = body.split(",")
        verb, name = f[0], f[1] if len(f) > 1 else ""
        with self._lock:
            if verb == "GET":
                return f"GET,{name},{self.settings.get(name, '')},{0 if name in self.settings else 2}"
            if verb == "SET":
                ok = name in self.settings and len(f) > 2
                if ok and name == "COUNTERDEPTH" and f[2] not in ("1", "6", "12", "24"):
                    return f"SET,{name},3"
                if ok:
                    self.settings[name] = f[2]
                return f"SET,{name},{0 if ok else 2}"
            if verb == "CMD":
                if name == "STARTACQUISITION":
                    self._stop.clear()
                    self._trigger.clear()
                    self._start.set()
                elif name == "SOFTTRIGGER":
                    self._trigger.set()
                elif name in ("STOPACQUISITION", "ABORT"):
                    self._stop.set()
                elif name not in ("RESET",):
                    return f"CMD,{name},2"
                return f"CMD,{name},0"
        return f"{verb},{name},2"

    def accept_data(self, stop: threading.Event | None = None) -> None:
        """Wait for the data client (one at a time, as Merlin serves it)."""
        self.data_sock.settimeout(0.5)
        while self.client is None:
            if stop is not None and stop.is_set():
                return
            try:
                self.client, _ = self.data_sock.accept()
            except socket.timeout:
                continue
            except OSError:  # closed: the emulator stops
                return

    def start_self(self) -> None:
        self._start.set()
        self._trigger.set()

    def wait_started(self, stop: threading.Event | None = None) -> bool:
        while not self._start.wait(0.2):
            if stop is not None and stop.is_set():
                return False
        self._start.clear()
        return True

    def send_scan(self, scan: _Scan, rate: float | None = None, progress=None,
                  drop_after: int | None = None) -> dict:
        """One acquisition: the header at once, the frames after the trigger (at once with
        internal triggering, TRIGGERSTART 0). STOP or ABORT end it silently, as on Merlin.
        ``drop_after``: close the data connection after that many frames (a pulled cable)."""
        with self._lock:
            n_set = int(self.settings["NUMFRAMESTOACQUIRE"])
            bits, internal = self.bits, self.settings["TRIGGERSTART"] == "0"
        n = min(len(scan.counts), n_set) if n_set > 1 else len(scan.counts)
        ny, nx = scan.metadata.get("scan_shape", (1, n))
        self._sendall(mib.acquisition_header(n, nx, bits, self.quad, (ny, nx)))
        if not internal:
            while not self._trigger.wait(0.2):
                if self._stop.is_set():
                    break
        sent, lost, t0 = 0, 0, time.perf_counter()
        dtype, top = mib.VALUE_DTYPE[bits], (1 << bits) - 1
        for lo in range(0, n, 64):
            if self._stop.is_set():
                break
            k = min(64, n - lo, n if drop_after is None else drop_after - lo)
            if k <= 0:
                break
            block, dropped = dense_block(scan.counts, scan.indices, scan.offsets, lo, k,
                                         self.frame_shape, dtype, top)
            lost += dropped
            data = b"".join(_mpx(mib.frame_message(lo + i + 1, block[i], bits, self.raw, self.quad))
                            for i in range(k))
            self._sendall(data)
            sent += k
            if rate:
                ahead = t0 + sent / rate - time.perf_counter()
                if ahead > 0:
                    time.sleep(ahead)
            if progress:
                progress(sent, n)
        if drop_after is not None and sent >= drop_after:  # the cable goes: the stream just ends
            self.client.shutdown(socket.SHUT_RDWR)
            self.client.close()
            self.client = None
        return {"frames": sent, "of": n, "aborted": self._stop.is_set(),
                "seconds": time.perf_counter() - t0, "clipped_electrons": lost}

    def _sendall(self, body: bytes) -> None:
        if body[:4] == b"HDR,":
            body = _mpx(body)
        try:
            self.client.sendall(body)
        except OSError:
            self.client.close()
            self.client = None
            raise ConnectionError("the data client went away") from None


def _mpx(body: bytes) -> bytes:
    return mib.mpx_prefix(len(body)) + body


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf
