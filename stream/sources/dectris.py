"""DECTRIS SIMPLON detectors (ARINA, QUADRO, EIGER2): the REST client the session uses to
configure, arm and trigger, and the source every worker runs on the DCU's ZeroMQ stream.

Every worker's receiver connects its own PULL socket to the DCU's PUSH socket: ZeroMQ hands
each whole message (one image) to one of them in turn, so the images are shared without an
extra hop, and the series header, configuration and end each reach one worker only. A worker
builds the scan's geometry from the image itself (shape from ``dimage_d``) and the scan
shape it was given, so any worker can open the scan; the one that got the series header and
configuration announces them in a ``start``, the one that got ``dseries_end`` sends ``end``.
Scan ids are ``PREFIX-SERIES`` (docs/DECTRIS.md).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from stream.sources.base import (STALE, UNDECODABLE, DetectorError, DetectorRefused, Source, SourcePlan,
                                 budget_error, dense_message, end_message, start_message)
from stream.sources.bslz4_events import OK, STATUS_TEXT, TOO_MANY, bslz4_events
from stream.sources.simplon import SimplonError, decode_image, image_shape_dtype, parse_json
from stream.transport.links import close_monitor, open_monitor
from stream.transport.protocol import MAX_DENSE_EVENTS, Message, ProtocolError
from stream.transport.receiver import OVER_BUDGET

log = logging.getLogger("stemstream.sources.dectris")
API = "1.8.0"
DEFAULT_STREAM_PORT = 9999
# A worker reads what is already queued on its socket, at most this many messages or this
# long, and converts the bitshuffle-LZ4 images among them in one call: the latency this adds
# to an image is bounded by both (docs/DECTRIS.md, "Speed")
BATCH_MESSAGES = 64
BATCH_S = 0.005  # a tenth of [chunking] max_latency_ms's default


def dcu_url(text: str) -> str:
    """``http://HOST:PORT`` (the REST API's base); ValueError naming the form otherwise."""
    parts = urlsplit(text if "://" in text else f"http://{text}")
    try:
        ok = parts.scheme == "http" and parts.hostname and parts.port is not None
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"--dcu {text!r} must look like http://HOST:PORT (the DCU's REST API)")
    return f"http://{parts.hostname}:{parts.port}"


def default_stream(dcu: str) -> str:
    """The DCU's ZeroMQ stream address: the REST host, port 9999."""
    return f"tcp://{urlsplit(dcu).hostname}:{DEFAULT_STREAM_PORT}"


class SimplonClient:
    """The DCU's REST API (SIMPLON 1.8): configuration, commands, stream settings.

    Every call times out after ``timeout_s`` and raises DetectorError with one line naming
    the address, what was asked and the fix."""

    def __init__(self, url: str, timeout_s: float = 10.0):
        self.url = dcu_url(url)
        self.timeout_s = timeout_s

    def _call(self, method: str, path: str, what: str, value=None) -> dict:
        data = None if value is None else json.dumps({"value": value}).encode()
        req = urllib.request.Request(f"{self.url}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                body = r.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:200].decode("utf-8", "replace").strip()
            raise DetectorRefused(f"DCU {self.url} refused {what}: HTTP {e.code} {detail}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            why = getattr(e, "reason", e)
            raise DetectorError(f"DCU {self.url} did not answer {what} within {self.timeout_s:g} s "
                                f"({why}); check --dcu and that the DCU is on and reachable") from None
        try:
            return json.loads(body) if body.strip() else {}
        except ValueError:
            raise DetectorError(f"DCU {self.url} answered {what} with something that is not JSON: "
                                f"{body[:80]!r}") from None

    def get_config(self, name: str):
        return self._call("GET", f"/detector/api/{API}/config/{name}", f"GET config/{name}").get("value")

    def set_config(self, name: str, value) -> None:
        self._call("PUT", f"/detector/api/{API}/config/{name}", f"config/{name} = {value!r}", value)

    def command(self, name: str) -> dict:
        return self._call("PUT", f"/detector/api/{API}/command/{name}", f"command '{name}'")

    def arm(self) -> int:
        """Arm the detector; returns the series id the DCU gives the acquisition."""
        answer = self.command("arm")
        try:
            return int(answer["sequence id"])
        except (KeyError, TypeError, ValueError):
            raise DetectorError(f"DCU {self.url} armed but gave no series id: {answer}") from None

    def enable_stream(self) -> None:
        """The stream interface on, with the configuration in every series header."""
        self._call("PUT", f"/stream/api/{API}/config/mode", "stream mode = enabled", "enabled")
        self._call("PUT", f"/stream/api/{API}/config/header_detail", "header_detail = basic", "basic")

    def configure(self, n_images: int, trigger_mode: str = "exte", **settings) -> None:
        """Set up one acquisition of ``n_images``, as LiberTEM-live does: counts to 1 first
        (a DCU refuses some changes otherwise), trigger mode, then the count; other
        settings (count_time, frame_time, compression, …) only when given."""
        self.set_config("ntrigger", 1)
        self.set_config("nimages", 1)
        self.set_config("trigger_mode", trigger_mode)
        self.set_config("nimages" if trigger_mode == "ints" else "ntrigger", n_images)
        for name, value in settings.items():
            if value is not None:
                self.set_config(name, value)

    def read_settings(self) -> dict:
        """The settings we record in the scan file (those the DCU answers)."""
        out = {}
        for name in ("x_pixels_in_detector", "y_pixels_in_detector", "bit_depth_image",
                     "count_time", "frame_time", "compression", "trigger_mode", "nimages", "ntrigger"):
            try:
                out[name] = self.get_config(name)
            except DetectorError:
                continue
        return out


class DectrisSource(Source):
    """One worker's share of a DCU's ZeroMQ stream, as protocol messages.

    Passive mode: every series that arrives is a scan. Active mode: the session arms; until
    it tells the series id (``command("expect", series, scan_id)``) the source does not read,
    and then it drops the messages of any other series (``stale_series``)."""

    def __init__(self, plan: SourcePlan, worker: str):
        self.plan = plan
        self.worker = worker
        self._pull = None
        self._monitor = None
        self._reject = self._notice = None
        self._lock = threading.Lock()
        self._hold = plan.mode == "active"  # active: read nothing before the first arm
        self._expect: tuple[int, str] | None = None  # (series, scan id) we armed
        self._epoch: dict[int, int] = {}  # passive: series id -> times a scan of it closed
        self._scan_series: dict[str, int] = {}
        self._pending_meta: dict = {}  # series header / configuration not yet announced
        self._started: set[str] = set()
        self._geometry = {}
        self._warned: set = set()
        self._connected = False
        self._ready = False  # the stream's ZeroMQ handshake done (and not disconnected since)
        self._opened = 0.0
        self._batch = None  # (scan id, geometry, dtype, series, frame numbers, blobs) not yet converted
        self._kinds: dict[bytes, tuple] = {}  # an image's dimage_d part -> what _image_kind makes of it
        self._expect_events = 64  # events per image to allocate for (the last batch's mean)

    connect_grace_s = 5.0  # then one line if the stream never connected (ZeroMQ retries silently)

    # ---------------------------------------------------------------- lifecycle
    def open(self, ctx, reject, notice) -> None:
        self._reject, self._notice = reject, notice
        self._pull = ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.RCVHWM, 256)
        self._pull.setsockopt(zmq.LINGER, 0)
        if self.plan.max_message_bytes:  # a larger part drops the connection (ZeroMQ reconnects)
            self._pull.setsockopt(zmq.MAXMSGSIZE, self.plan.max_message_bytes)
        self._monitor = open_monitor(self._pull, zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED
                                     | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self._pull.connect(self.plan.data)
        self._opened = time.monotonic()

    def close(self) -> None:
        if self._monitor is not None:
            close_monitor(self._pull, self._monitor)
        if self._pull is not None:
            self._pull.close(0)

    def command(self, name: str, *args):
        """From the session (another thread): ``hold`` (stop reading: we are about to arm),
        ``expect`` (series, scan_id): read again and keep only that series; ``connected``:
        whether this worker's stream has completed its handshake with the DCU (ZeroMQ hands
        images only to the workers connected when they are pushed)."""
        with self._lock:
            if name == "connected":
                return self._ready
            if name == "hold":
                self._hold = True
            elif name == "expect":
                self._expect = (int(args[0]), str(args[1]))
                self._hold = False
            else:
                raise ValueError(f"DECTRIS source takes hold, expect or connected, not {name!r}")

    def scan_closed(self, scan_id: str) -> None:
        with self._lock:
            series = self._scan_series.pop(scan_id, None)
            if series is not None and self._expect is None:
                self._epoch[series] = self._epoch.get(series, 0) + 1
            self._started.discard(scan_id)

    # ---------------------------------------------------------------- receiving
    def receive(self, timeout_ms: int) -> list:
        self._watch_connection()
        if self._hold:
            time.sleep(timeout_ms / 1000)
            return []
        out = []
        if not self._pull.poll(timeout_ms):
            return out
        deadline = time.monotonic() + BATCH_S
        for _ in range(BATCH_MESSAGES):
            # under the lock that ``hold`` takes: once the session holds (it is about to
            # arm), not one more message is read until it says which series to expect; else
            # the new series, arriving while this loop runs, went to the previous scan's id
            with self._lock:
                if self._hold:
                    break
                try:  # copy=True: a sparse image's parts are small, and bytes cost less than frames
                    parts = self._pull.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
            try:
                self._handle(parts, out)
            except (SimplonError, ProtocolError, ValueError) as e:
                self._reject(UNDECODABLE, f"DECTRIS stream {self.plan.data}: {e}", None)
            if time.monotonic() > deadline:
                break
        self._flush_batch(out)
        return out

    def _watch_connection(self) -> None:
        """One console line when the DCU's stream goes away and when it is back. ZeroMQ
        reconnects by itself, except after a protocol error (a part beyond [limits]
        max_message_mb): so every lost connection is made again here."""
        while self._monitor is not None and self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)["event"]
            if event in (zmq.EVENT_HANDSHAKE_SUCCEEDED, zmq.EVENT_DISCONNECTED):
                self._ready = event == zmq.EVENT_HANDSHAKE_SUCCEEDED
            if event == zmq.EVENT_DISCONNECTED:
                try:
                    self._pull.disconnect(self.plan.data)
                except zmq.ZMQError:
                    pass  # already gone
                self._pull.connect(self.plan.data)
            if event == zmq.EVENT_DISCONNECTED and self._connected:
                self._connected = False
                self._notice(f"WARNING: DECTRIS stream {self.plan.data} disconnected (worker "
                             f"{self.worker}); reconnecting. A scan that was running closes "
                             "with its missing frames named.")
            elif event == zmq.EVENT_CONNECTED:
                if self._connected is False and "connected" in self._warned:
                    self._notice(f"DECTRIS stream {self.plan.data} connected again (worker {self.worker})")
                elif "never connected" in self._warned:
                    self._notice(f"DECTRIS stream {self.plan.data} connected (worker {self.worker})")
                self._connected = True
                self._warned.add("connected")
        if (not self._warned & {"connected", "never connected"} and self._monitor is not None
                and time.monotonic() - self._opened > self.connect_grace_s):
            self._warned.add("never connected")
            self._notice(f"WARNING: DECTRIS stream {self.plan.data}: not connected after "
                         f"{self.connect_grace_s:g} s (worker {self.worker}); check the DCU's stream "
                         "address ([detector] data, --connect; port 9999 by default) and that "
                         "nothing blocks it; still trying")

    def _scan_id(self, series: int) -> str | None:
        """The scan of a series, or None for a stale one (active mode, not the armed one)."""
        if self._expect is not None:
            return self._expect[1] if series == self._expect[0] else None
        e = self._epoch.get(series, 0)
        return f"{self.plan.prefix}-{series}" + (f".{e}" if e else "")

    def _handle(self, parts, out: list) -> None:
        first = parse_json(parts[0])
        htype = str(first.get("htype", ""))
        if htype.startswith("dimage-"):
            self._image(first, parts, out)
            return
        self._flush_batch(out)  # what came before this message is handed on before it
        if htype.startswith("dheader-"):
            if self._scan_id(int(first.get("series", -1))) is None:  # an earlier series' header
                self._stale(int(first.get("series", -1)))
                return
            self._pending_meta = {"series": first.get("series"),
                                  "header_detail": first.get("header_detail")}
            if len(parts) > 1:  # a DCU may send the configuration in the same message
                self._pending_meta["detector_config"] = parse_json(parts[1])
            return
        if htype.startswith("dseries_end"):
            series = int(first.get("series", -1))
            scan_id = self._scan_id(series)
            if scan_id is None:
                self._stale(series)
                return
            if self.plan.scan_shape is None:
                return
            n = self.plan.scan_shape[0] * self.plan.scan_shape[1]
            self._scan_series[scan_id] = series
            out.append(end_message(scan_id, n))
            return
        if not htype and "x_pixels_in_detector" in first:  # the configuration, on its own
            self._pending_meta["detector_config"] = first
            return
        raise SimplonError(f"unknown message {htype or str(first)[:60]!r}")

    def _stale(self, series: int) -> None:
        self._reject(STALE, f"a message of DECTRIS series {series}, not the armed series "
                     f"{self._expect[0]}: left over from an earlier acquisition, dropped", None)

    def _image(self, head: dict, parts, out: list) -> None:
        if len(parts) < 3:
            raise SimplonError(f"image message of {len(parts)} parts; expected 4")
        series, frame = int(head.get("series", -1)), int(head.get("frame", -1))
        scan_id = self._scan_id(series)
        if scan_id is None:
            self._stale(series)
            return
        dimage_d, shape, dtype, bslz4, too_big = self._image_kind(parts[1])
        if too_big:  # refused before it is decompressed or a scan is opened for it
            self._reject(OVER_BUDGET, f"image {frame} of DECTRIS series {series}: {too_big}", scan_id)
            return
        g = self._geometry.get(shape)
        if g is None:
            g = self._geometry[shape] = self.plan.geometry(shape)
        batch = self._batch
        if batch is not None and (batch[0] != scan_id or batch[1] is not g or batch[2] != dtype or not bslz4):
            self._flush_batch(out)  # one batch holds images of one scan and kind
            batch = None
        self._scan_series[scan_id] = series
        if scan_id not in self._started and self._pending_meta:
            meta = dict(self._pending_meta, detector="dectris", series=series,
                        dcu=self.plan.dcu or "", stream=self.plan.data, mode=self.plan.mode)
            out.append(start_message(scan_id, g, meta))
            self._pending_meta = {}
            self._started.add(scan_id)
        if not 0 <= frame < g.n_frames:
            raise ProtocolError("frame_out_of_range", f"image {frame} of series {series}, but the "
                                f"scan {g.scan_shape[0]}x{g.scan_shape[1]} has {g.n_frames} frames "
                                "(check --scan against the detector's nimages x ntrigger)", scan_id)
        if bslz4:  # converted with the others queued, in _flush_batch
            if batch is None:
                batch = self._batch = (scan_id, g, dtype, series, [], [])
            batch[4].append(frame)
            batch[5].append(parts[2])
            return
        try:
            image = decode_image(parts[2], dimage_d)
        except SimplonError as e:
            self._reject(UNDECODABLE, f"image {frame} of series {series}: {e}", scan_id)
            return
        out.append(dense_message(scan_id, g, frame, image[None]))  # the receiver makes events

    def _image_kind(self, part) -> tuple:
        """(dimage_d, shape, dtype, bitshuffle-LZ4?, why it is over the budget or None) of
        an image's second part; the parts a DCU sends repeat (only ``size`` changes), so
        they are parsed once each."""
        key = bytes(part)
        kind = self._kinds.get(key)
        if kind is None:
            dimage_d = parse_json(part)
            shape, dtype = image_shape_dtype(dimage_d)
            enc = str(dimage_d.get("encoding", "<"))
            too_big = budget_error(f"a {shape[0]}x{shape[1]} {dtype.name} image",
                                   shape[0] * shape[1] * dtype.itemsize, self.plan)
            kind = (dimage_d, shape, dtype, enc.startswith("bs") and "lz4" in enc, too_big)
            if len(self._kinds) >= 1024:
                self._kinds.clear()
            self._kinds[key] = kind
        return kind

    def _flush_batch(self, out: list) -> None:
        """The queued bitshuffle-LZ4 images, as events (one numba call), onto ``out`` as one
        ``frames`` message (with its frame numbers when they are not consecutive: a DCU
        hands its images to the workers in turn)."""
        batch, self._batch = self._batch, None
        if batch is None:
            return
        scan_id, g, dtype, series, frames, blobs = batch
        limit = MAX_DENSE_EVENTS
        if self.plan.max_message_bytes:
            limit = max(1, min(limit, self.plan.max_message_bytes // 4))
        h, w = g.frame_shape
        counts, indices, status = bslz4_events(blobs, h * w, dtype.itemsize, limit, self._expect_events)
        self._expect_events = max(16, int(len(indices) / len(frames) * 1.25))
        ids = np.array(frames, np.int64)
        bad = np.flatnonzero(status != OK)
        for i in bad.tolist():
            reason = "too_many_events" if status[i] == TOO_MANY else UNDECODABLE
            self._reject(reason, f"image {frames[i]} of DECTRIS series {series}: {STATUS_TEXT[status[i]]}", scan_id)
        if len(bad):  # they gave no events (counts 0): their frames stay missing
            keep = status == OK
            ids, counts = ids[keep], counts[keep]
        if not len(ids):
            return
        consecutive = bool((np.diff(ids) == 1).all())
        out.append(Message("frames", scan_id, 0, {"first": int(ids[0]), "count": len(ids), "events": len(indices)},
                           geometry=g, counts=counts, indices=indices, frame_ids=None if consecutive else ids))


class DectrisControl:
    """Active mode, in the session: set up, arm and trigger one acquisition per scan.

    ``workers(name, *args)`` sends a command to every worker's source (hold, expect)."""

    def __init__(self, plan: SourcePlan, client: SimplonClient, workers, trigger_mode: str = "exte",
                 settings: dict | None = None):
        self.plan = plan
        self.client = client
        self.workers = workers
        self.trigger_mode = trigger_mode
        self.settings = settings or {}
        self._armed: dict[int, int] = {}

    def start_acquisition(self) -> tuple[int, str]:
        """Configure, arm (workers told the series before they read again), trigger for
        internal trigger modes; returns (series, scan id)."""
        ny, nx = self.plan.scan_shape
        self.client.enable_stream()
        self.client.configure(ny * nx, self.trigger_mode, **self.settings)
        self.workers("hold")
        series = self.client.arm()
        repeat = self._armed.get(series, 0)  # a DCU that repeats a series id still gets new scans
        self._armed[series] = repeat + 1
        scan_id = f"{self.plan.prefix}-{series}" + (f".{repeat}" if repeat else "")
        self.workers("expect", series, scan_id)
        if self.trigger_mode in ("ints", "inte"):
            self.client.command("trigger")
        return series, scan_id

    def stop(self) -> None:
        """Disarm (after a trigger timeout, or when the session stops mid-acquisition)."""
        try:
            self.client.command("disarm")
        except DetectorError as e:
            log.warning("%s", e)
