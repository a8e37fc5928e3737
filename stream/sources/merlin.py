"""Quantum Detectors Merlin (MerlinEM, single chip and quad): the control-port client the
session uses, and the source the workers run on its TCP data stream.

Merlin's data port takes one TCP consumer. One worker, the *leader*, holds that connection
(one thread): it splits the stream into frames, turns their pixel payloads straight into
events (``mib_events``: a pixel that counted k electrons gives k events; no dense frame is
made) and forwards blocks of consecutive frames as ``frames`` messages on a ZeroMQ PUSH
socket. Every worker's source, the leader's included, pulls from it (ZeroMQ hands each
block to one of them in turn) and hands them to its receiver, so the electrons and the
operators are shared by all workers (docs/MERLIN.md). The data channel gives no sign of a stopped or aborted acquisition: a gap
of ``gap_timeout_s`` without a frame, a new acquisition header or a closed connection ends
the acquisition as aborted, with the frames that did not come named in the scan file.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time

import numpy as np
import zmq

from stream.security import ClientKeys, Gatekeeper, as_client, as_server
from stream.sources.base import DetectorError, Source, SourcePlan, budget_error, tcp_address
from stream.sources.mib import (MPX_PREFIX_LEN, AcquisitionHeader, FrameHeader, MibError, mpx_prefix,
                                parse_frame_header, parse_mpx_prefix)
from stream.sources.mib_events import PayloadEvents
from stream.transport.links import close_monitor, open_monitor
from stream.transport.protocol import (MAX_DENSE_EVENTS, ProtocolError, decode, encode_abort, encode_end,
                                       encode_frames, encode_start)

log = logging.getLogger("stemstream.sources.merlin")
RC_TEXT = {0: "ok", 1: "system busy", 2: "command not recognised", 3: "parameter out of range"}
# frames per forwarded block, at most: 64 makes a message's fixed cost (a few hundred µs of CPU,
# both ends) small per frame; a scan is cut into at least 4 blocks per worker, so small ones are
# still shared by all workers.
BLOCK_FRAMES = 64
BLOCK_BYTES = 8 << 20  # and at most this many bytes of frame messages
# A leader faster than Merlin would forward every frame alone, as it comes, at a message's cost
# per frame: it waits up to this long for a block to fill (the latency it adds, at most)
HOLD_S = 0.01
FIRST_EVENTS = 1 << 16  # room for the events of a block, to start with (it grows as frames need)
FORWARD_DOMAIN = "stemstream-merlin-forward"  # the ZAP domain of the leader's PUSH socket


class MerlinControl:
    """Merlin's control port (TCP, default 6341): ``MPX,<len>,GET|SET|CMD,...``.

    Every request times out after ``timeout_s``; failures raise DetectorError naming the
    address, the request and Merlin's answer."""

    def __init__(self, address: str, timeout_s: float = 10.0):
        self.address = address
        self.host, self.port = tcp_address(address, "--control", 6341)
        self.timeout_s = timeout_s
        try:
            self.sock = socket.create_connection((self.host, self.port), timeout=timeout_s)
        except OSError as e:
            raise DetectorError(f"Merlin control port {address} did not accept a connection within "
                                f"{timeout_s:g} s ({e.strerror or e}); check --control and that "
                                "the Merlin software is running") from None

    def close(self) -> None:
        self.sock.close()

    def _request(self, body: str) -> list[str]:
        raw = body.encode("ascii")
        try:
            self.sock.sendall(mpx_prefix(len(raw)) + raw)
            prefix = _recv_exact(self.sock, MPX_PREFIX_LEN)
            n = parse_mpx_prefix(prefix)
            answer = _recv_exact(self.sock, max(n, 0))
            # LiberTEM-live's simulator counts one byte less than Merlin: take what follows
            if select.select([self.sock], [], [], 0.01)[0]:
                answer += self.sock.recv(4096)
        except (OSError, ConnectionError, MibError) as e:
            raise DetectorError(f"Merlin control port {self.address} did not answer {body!r} within "
                                f"{self.timeout_s:g} s ({e}); check that Merlin is running") from None
        fields = answer.decode("ascii", "replace").strip().lstrip(",").split(",")
        try:
            rc = int(fields[-1])
        except ValueError:
            raise DetectorError(f"Merlin control port {self.address} answered {body!r} with "
                                f"{answer[:60]!r}") from None
        if rc != 0:
            raise DetectorError(f"Merlin {self.address} refused {body!r}: code {rc} "
                                f"({RC_TEXT.get(rc, 'unknown')})")
        return fields

    def get(self, name: str) -> str:
        return self._request(f"GET,{name}")[2]

    def set(self, name: str, value) -> None:
        self._request(f"SET,{name},{value}")

    def cmd(self, name: str) -> None:
        self._request(f"CMD,{name}")

    def read_settings(self) -> dict:
        """The settings we record in the scan file (those Merlin answers)."""
        out = {}
        for name in ("IMAGEX", "IMAGEY", "COUNTERDEPTH", "NUMFRAMESTOACQUIRE", "ACQUISITIONTIME",
                     "ACQUISITIONPERIOD", "TRIGGERSTART", "CONTINUOUSRW", "SOFTWAREVERSION"):
            try:
                out[name] = self.get(name)
            except DetectorError:
                continue
        return out

    def start_acquisition(self, n_frames: int, soft_trigger: bool = True) -> None:
        """Arm for ``n_frames`` (the acquisition header follows at once) and, with
        ``soft_trigger``, start it (otherwise the scan engine's trigger starts it)."""
        self.set("NUMFRAMESTOACQUIRE", n_frames)
        self.cmd("STARTACQUISITION")
        if soft_trigger:
            self.cmd("SOFTTRIGGER")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("the connection closed")
        got += k
    return bytes(buf)


class MpxReader:
    """Buffered reader of MPX messages from a TCP socket; frames of one layout are taken
    many at a time straight from the buffer (no per-frame copy). The views ``body`` and
    ``frames`` return are valid until the next ``fill``."""

    def __init__(self, sock: socket.socket, size: int = 32 << 20, max_body: int = 1 << 30):
        self.sock = sock
        self.buf = bytearray(size)
        self.lo = self.hi = 0
        self.max_body = max_body  # a longer message is refused before it is buffered

    @property
    def available(self) -> int:
        return self.hi - self.lo

    def fill(self, timeout_s: float) -> bool:
        """Receive what is there (waiting up to ``timeout_s``); False if nothing came.
        Raises ConnectionError when Merlin closed the connection."""
        n = self.available
        if n > len(self.buf) // 2:  # a message larger than half the buffer: a bigger one (a
            # new bytearray: one that numpy views still point into cannot be resized)
            buf = bytearray(2 * len(self.buf))
            buf[:n] = self.buf[self.lo:self.hi]
            self.buf, self.lo, self.hi = buf, 0, n
        elif self.lo and (self.hi == len(self.buf) or self.lo > len(self.buf) // 2):
            self.buf[:n] = self.buf[self.lo:self.hi]  # views handed out before are stale now
            self.lo, self.hi = 0, n
        if not select.select([self.sock], [], [], timeout_s)[0]:
            return False
        k = self.sock.recv_into(memoryview(self.buf)[self.hi:])
        if k == 0:
            raise ConnectionError("Merlin closed the data connection")
        self.hi += k
        return True

    def peek(self) -> int | None:
        """The body length of the next message if it is all here, else None."""
        if self.available < MPX_PREFIX_LEN:
            return None
        n = parse_mpx_prefix(bytes(self.buf[self.lo:self.lo + MPX_PREFIX_LEN]))
        if n > self.max_body:
            raise MibError(f"an MPX message of {n:,} bytes, beyond {self.max_body:,} ([limits] "
                           "max_message_mb, or lost sync with the stream)")
        return n if self.available >= MPX_PREFIX_LEN + n else None

    def body(self, n: int) -> memoryview:
        start = self.lo + MPX_PREFIX_LEN
        return memoryview(self.buf)[start:start + n]

    def frames(self, n_body: int, limit: int) -> np.ndarray:
        """(k, 15 + n_body) uint8 rows of the next k ≤ ``limit`` frame messages of body
        length ``n_body`` that are all here (k ≥ 1: the first was checked by ``peek``)."""
        stride = MPX_PREFIX_LEN + n_body
        k = max(1, min(limit, self.available // stride))
        rows = np.frombuffer(self.buf, np.uint8, k * stride, self.lo).reshape(k, stride)
        # every row must start like the first: same MPX length and an MQ1 header
        same = (rows[:, :MPX_PREFIX_LEN + 4] == rows[0, :MPX_PREFIX_LEN + 4]).all(axis=1)
        if not same.all():
            k = int(np.argmin(same))
            rows = rows[:k]
        return rows

    def consume(self, n: int) -> None:
        self.lo += n


class _Acquisition:
    def __init__(self, scan_id, header, geometry, n_frames):
        self.scan_id, self.header, self.geometry, self.n_frames = scan_id, header, geometry, n_frames
        self.received = 0
        self.fh: FrameHeader | None = None
        self.events: PayloadEvents | None = None  # the payload decoder of ``fh``'s layout
        self.overflow = False
        self.refused = False  # its frames are beyond the per-message budget


class MerlinLeader(threading.Thread):
    """The leader's thread: holds Merlin's data connection (reconnecting when it drops)
    and forwards every acquisition to the workers as protocol messages."""

    def __init__(self, plan: SourcePlan, ctx, notice, reconnect_s: float = 1.0):
        super().__init__(name="stemstream-merlin", daemon=True)
        self.plan = plan
        self.ctx = ctx
        self.notice = notice
        self.reconnect_s = reconnect_s
        self.host, self.port = tcp_address(plan.data, "--connect", 6342)
        self._stop_event = threading.Event()
        self._count = 0
        self._forwarded = 0.0  # when the last block left
        self.acq: _Acquisition | None = None
        self.error: BaseException | None = None

    def stop(self) -> None:
        self._stop_event.set()

    def _forward_socket(self):
        """(context, gatekeeper, PUSH socket) of the forwarding channel: with this session's
        keys a CURVE server that lets in only the workers' key (a context of its own: one
        ZAP handler per context); without them plain. Not bound yet."""
        ctx, gate = self.ctx, None
        if self.plan.forward_server is not None:
            ctx = zmq.Context()
            gate = Gatekeeper(ctx, on_refuse=self._refused)
            gate.allow(FORWARD_DOMAIN, [self.plan.forward_client.public])
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.SNDHWM, 16)
        push.setsockopt(zmq.LINGER, 0)
        if self.plan.forward_server is not None:
            as_server(push, self.plan.forward_server, FORWARD_DOMAIN)
        return ctx, gate, push

    def _refused(self, domain: str, key: bytes) -> None:
        if not getattr(self, "_warned_refused", False):
            self._warned_refused = True
            self.notice(f"WARNING: the Merlin forwarding socket {self.plan.forward} refused a program "
                        f"without this session's key ({key.decode(errors='replace')}); it gets no frames "
                        "(docs/SECURITY.md; further refusals are not shown)")

    def run(self) -> None:
        ctx, gate, push = self._forward_socket()
        # set before bind: no worker's handshake is missed
        monitor = open_monitor(push, zmq.EVENT_HANDSHAKE_SUCCEEDED)
        try:
            push.bind(self.plan.forward)
        except zmq.ZMQError as e:
            self.error = e
            self.notice(f"ERROR: Merlin leader cannot bind {self.plan.forward}: {e.strerror}; "
                        "restart the session (it picks another port)")
            close_monitor(push, monitor)
            self._close_forward(ctx, gate, push)
            return
        self.push = push
        self._wait_for_workers(push, monitor)
        failing = False
        try:
            while not self._stop_event.is_set():
                try:
                    sock = socket.create_connection((self.host, self.port), timeout=5)
                except OSError as e:
                    if not failing:
                        self.notice(f"WARNING: cannot connect to the Merlin data port {self.plan.data} "
                                    f"({e.strerror or e}); check that the Merlin software runs and "
                                    "the data address (--connect; port 6342 by default); retrying "
                                    f"every {self.reconnect_s:g} s")
                        failing = True
                    self._stop_event.wait(self.reconnect_s)
                    continue
                if failing:
                    self.notice(f"connected to the Merlin data port {self.plan.data}")
                failing = False
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
                    limit = self.plan.max_message_bytes
                    # a frame's wire size never exceeds its decoded values (decoding only widens)
                    self._serve(MpxReader(sock, max_body=limit + (64 << 10) if limit else 1 << 30))
                except Exception as e:  # noqa: BLE001 - lost connection, lost sync, or a bug: reconnect
                    if not isinstance(e, (ConnectionError, OSError, MibError)):
                        log.exception("Merlin leader failed")
                    why = str(e) if isinstance(e, MibError) else f"{type(e).__name__}: {e}"
                    self._end_acquisition(f"Merlin data connection lost ({why})")
                    self.notice(f"WARNING: Merlin data port {self.plan.data}: {why}; reconnecting "
                                "(the session goes on)")
                    self._stop_event.wait(self.reconnect_s)
                finally:
                    sock.close()
        finally:
            self._close_forward(ctx, gate, push)

    def _close_forward(self, ctx, gate, push) -> None:
        push.close(0)
        if gate is not None:
            gate.stop()
        if ctx is not self.ctx:
            ctx.term()

    def _wait_for_workers(self, push, monitor, timeout_s: float = 10.0) -> None:
        """Before the first frame is read: every worker's PULL connected (its CURVE handshake
        done), so that the first blocks are shared, not all taken by the first to connect.
        After ``timeout_s`` it goes on with those that are there, and says so."""
        from zmq.utils.monitor import recv_monitor_message
        ready, deadline = 0, time.monotonic() + timeout_s
        try:
            while ready < self.plan.n_workers and time.monotonic() < deadline and not self._stop_event.is_set():
                if monitor.poll(100):
                    recv_monitor_message(monitor)
                    ready += 1
        finally:
            close_monitor(push, monitor)
        if ready < self.plan.n_workers and not self._stop_event.is_set():
            self.notice(f"WARNING: {ready} of {self.plan.n_workers} workers connected to the Merlin "
                        f"forwarding socket {self.plan.forward} within {timeout_s:g} s; the frames go to "
                        "those that are (the others join when they connect)")

    def _send(self, parts) -> None:
        while not self._stop_event.is_set():
            try:
                self.push.send_multipart(parts, copy=False, flags=zmq.NOBLOCK)
                return
            except zmq.Again:  # every worker is full: wait (back-pressure reaches Merlin's TCP)
                time.sleep(0.001)

    def _end_acquisition(self, why: str) -> None:
        acq, self.acq = self.acq, None
        if acq is not None and acq.geometry is not None \
                and acq.received < min(acq.n_frames, acq.geometry.n_frames):
            self._send(encode_abort(acq.scan_id, 0, f"{why} after {acq.received} of "
                                    f"{acq.n_frames} frames"))

    def _serve(self, reader: MpxReader) -> None:
        last = time.monotonic()
        waiting = False  # frames are here, but fewer than a block: wait a little for more
        while not self._stop_event.is_set():
            try:
                came = reader.fill(HOLD_S if waiting else 0.1)
            except ConnectionError:
                self._take(reader, flush=True)  # the whole frames that came before it closed
                raise
            if came:
                last = time.monotonic()
            elif self.acq is not None and self.acq.received and \
                    time.monotonic() - last > self.plan.gap_timeout_s:  # (before the first frame
                # Merlin waits for its trigger, as long as it takes)
                self._end_acquisition(f"no frame from Merlin for {self.plan.gap_timeout_s:g} s "
                                      "(the acquisition was stopped or aborted)")
            waiting = self._take(reader, flush=not came)

    def _take(self, reader: MpxReader, flush: bool) -> bool:
        """Handle the whole messages in the buffer; True when a part block of frames is
        left there to wait for the rest (not ``flush``)."""
        while (n := reader.peek()) is not None:
            head = bytes(reader.body(n)[:4])
            if head == b"HDR,":
                self._header(bytes(reader.body(n)))
                reader.consume(MPX_PREFIX_LEN + n)
            elif head == b"MQ1,":
                taken = self._frames(reader, n, flush)
                if not taken:
                    return True
                reader.consume(taken)
            else:
                raise MibError(f"a message that is neither an acquisition header nor a frame "
                               f"({head!r}): lost sync")
        return False

    def _header(self, raw: bytes) -> None:
        if self.acq is not None:
            self._end_acquisition("a new acquisition header arrived")
        hdr = AcquisitionHeader.parse(raw)
        n = hdr.n_frames
        shape = self.plan.scan_shape or hdr.scan_shape
        if shape is None:
            fpt = hdr.frames_per_trigger
            shape = (max(1, n // fpt), fpt) if fpt and n % fpt == 0 else (1, n)
        scan_id = f"{self.plan.prefix}-{self._count:04d}"
        self._count += 1
        self.acq = _Acquisition(scan_id, hdr, None, n)
        self._shape = shape
        if n != shape[0] * shape[1]:
            self.notice(f"WARNING [{scan_id}] Merlin acquires {n} frames but the scan is "
                        f"{shape[0]}x{shape[1]} = {shape[0] * shape[1]} positions; check "
                        "--scan against NUMFRAMESTOACQUIRE")

    def _frames(self, reader: MpxReader, n_body: int, flush: bool = True) -> int:
        """Forward the frames at the head of the buffer; returns the bytes taken: none when
        fewer than a block are here and not ``flush`` (more are coming) and the last block
        left less than HOLD_S ago."""
        acq = self.acq
        body = reader.body(n_body)
        if acq is None:
            if not getattr(self, "_warned_orphans", False):
                self._warned_orphans = True
                self.notice(f"WARNING: Merlin {self.plan.data} sends frames without an acquisition "
                            "header (the acquisition started before stemstream connected); they "
                            "are dropped until the next acquisition")
            return MPX_PREFIX_LEN + n_body
        if acq.fh is None or acq.fh.header_size + acq.fh.payload_size != n_body:
            fh = parse_frame_header(body)
            if fh.header_size + fh.payload_size != n_body:
                raise MibError(f"frame message of {n_body} bytes; its header says "
                               f"{fh.header_size + fh.payload_size}")
            too_big = budget_error(f"a {fh.frame_shape[0]}x{fh.frame_shape[1]} Merlin frame",
                                   fh.frame_shape[0] * fh.frame_shape[1] * fh.value_dtype.itemsize, self.plan)
            if too_big:  # refused before it is decoded or a scan is opened for it
                if not acq.refused:
                    acq.refused = True
                    self.notice(f"ERROR [{acq.scan_id}] {too_big}; this acquisition is dropped")
                return MPX_PREFIX_LEN + n_body
            if acq.geometry is None:
                acq.geometry = self.plan.geometry(fh.frame_shape, self._shape)
                meta = {"detector": "merlin", "data": self.plan.data, "control": self.plan.control or "",
                        "mode": self.plan.mode, "counter_depth": fh.counter_depth,
                        "pixel_type": fh.code, "layout": fh.layout, "frames_in_acquisition": acq.n_frames,
                        "acquisition_header": acq.header.fields}
                self._send(encode_start(acq.scan_id, 0, acq.geometry, meta))
            elif fh.frame_shape != acq.geometry.frame_shape:
                raise MibError(f"frame shape changed from {acq.geometry.frame_shape} to "
                               f"{fh.frame_shape} within an acquisition")
            acq.fh, acq.events = fh, PayloadEvents(fh)
        fh, g = acq.fh, acq.geometry
        block = max(1, min(BLOCK_FRAMES, BLOCK_BYTES // n_body, acq.n_frames // (4 * max(1, self.plan.n_workers)),
                           acq.n_frames - acq.received))
        if not flush and reader.available // (MPX_PREFIX_LEN + n_body) < block \
                and time.monotonic() - self._forwarded < HOLD_S:
            return 0
        self._forwarded = time.monotonic()
        rows = reader.frames(n_body, block)
        k = len(rows)
        first = acq.received
        acq.received += k
        usable = max(0, min(k, g.n_frames - first))  # frames beyond the scan are dropped
        if usable:
            self._forward_events(acq, rows[:usable], MPX_PREFIX_LEN + fh.header_size, first)
        if usable < k and not acq.overflow:
            acq.overflow = True
            self.notice(f"WARNING [{acq.scan_id}] Merlin sends more frames ({acq.n_frames}) than the "
                        f"scan has positions ({g.n_frames}); the extra ones are dropped")
        if acq.received >= acq.n_frames:
            self._send(encode_end(acq.scan_id, 0, min(acq.n_frames, g.n_frames)))
            self.acq = None
        return k * (MPX_PREFIX_LEN + n_body)

    def _forward_events(self, acq: _Acquisition, rows: np.ndarray, offset: int, first: int) -> None:
        """The events of frame messages ``rows`` (frames ``first ..``), as ``frames``
        messages of at most the per-message budget of events; a frame whose events alone
        exceed it is not sent (the scan names it missing) and the console says so once."""
        budget = MAX_DENSE_EVENTS
        if self.plan.max_message_bytes:
            budget = max(1, min(budget, self.plan.max_message_bytes // 4))
        counts = np.zeros(len(rows), np.uint32)
        f = 0
        while f < len(rows):
            out = np.empty(min(budget, getattr(self, "_room", FIRST_EVENTS)), np.uint32)
            done, e = acq.events.events(rows, offset, f, counts, out, 0)
            if done > f:
                self._send(encode_frames(acq.scan_id, 0, acq.geometry, first + f, counts[f:done], out[:e]))
                f = done
            elif len(out) < budget:  # frame f alone needs more room
                self._room = min(budget, 4 * len(out))
            else:
                if not acq.refused:
                    acq.refused = True
                    self.notice(f"ERROR [{acq.scan_id}] frame {first + f} holds more than {budget:,} "
                                "electrons, beyond the per-message budget ([limits] max_message_mb); "
                                "it is not processed (the scan names it missing; further ones are not shown)")
                f += 1


class MerlinSource(Source):
    """One worker's share of a Merlin acquisition: pulls the leader's blocks, makes events."""

    def __init__(self, plan: SourcePlan, worker: str):
        self.plan = plan
        self.worker = worker
        self.leader_thread: MerlinLeader | None = None
        self._pull = None

    def open(self, ctx, reject, notice) -> None:
        self._reject = reject
        if self.worker == self.plan.leader:
            self.leader_thread = MerlinLeader(self.plan, ctx, notice)
            self.leader_thread.start()
        self._pull = ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.RCVHWM, 4)
        self._pull.setsockopt(zmq.LINGER, 0)
        if self.plan.max_message_bytes:
            self._pull.setsockopt(zmq.MAXMSGSIZE, self.plan.max_message_bytes + (64 << 10))
        if self.plan.forward_server is not None:
            as_client(self._pull, ClientKeys(self.plan.forward_client, self.plan.forward_server.public))
        self._pull.connect(self.plan.forward)

    def close(self) -> None:
        if self.leader_thread is not None:
            self.leader_thread.stop()
            self.leader_thread.join(5)
        if self._pull is not None:
            self._pull.close(0)

    def receive(self, timeout_ms: int) -> list:
        """The leader's messages, decoded; the receiver turns each block of counts into
        events (a pixel that counted k electrons gives k events)."""
        out = []
        if not self._pull.poll(timeout_ms):
            return out
        for _ in range(16):
            try:
                parts = self._pull.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            try:
                out.append(decode(parts))
            except ProtocolError as e:
                self._reject(e.reason, e.detail, e.scan_id)
        return out
