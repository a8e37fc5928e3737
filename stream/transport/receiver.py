"""A receiver: one PULL socket connected to every source, running inside a dask worker.

It decodes messages without copying, groups the frames of each scan into chunks (bounded by
frames, bytes and latency), runs the scan's operators on each chunk in this process and keeps
the resulting per-scan state here. Only small reports (frame ranges, counters) and, at the
live rate, the partial results that changed go to the coordinator; the events themselves stay
until the scan is closed and the coordinator's finalize task takes this worker's state.

Nothing is allocated for a scan before it is announced (docs/PROTOCOL.md, "Announcement"):
a receiver opens a scan when it receives its ``start`` or when the coordinator says on the
control channel that another receiver did; until then its ``frames`` wait, bounded in bytes
and time (``[limits] unannounced_mb``, ``announce_grace_s``), and are dropped if no ``start``
comes. Before opening, the scan's state is checked against the per-scan budget
(``[limits] scan_state_mb``) and the number of open scans (``max_open_scans``).
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np
import zmq
from dask.sizeof import sizeof

from operators.chunk import Chunk
from operators.dense import counts_to_events
from operators.electron_counting import ElectronCounter
from operators.events import EventStore

from stream.security.curve import ReceiverKeys, as_client
from stream.transport import control
from stream.transport.compact import Narrowed, narrow, narrow_map, widen_map
from stream.transport.links import LinkWatch
from stream.transport.protocol import (MAX_DENSE_EVENTS, Geometry, Message, ProtocolError, decode,
                                       frame_positions)
from stream.transport.spill import SpillFile

log = logging.getLogger("stemstream.receiver")

# Receiver-level reject reasons on top of the protocol's own (docs/PROTOCOL.md).
LATE = "late"  # a message of a scan that is already closed
OPERATOR_ERROR = "operator_error"  # the scan's operators could not be built or failed
INTERNAL_ERROR = "internal_error"  # anything else that went wrong with one message
SPILL_FAILED = "spill_failed"  # events could not go to disk; they stay in memory, none lost
HEARTBEAT_S = 0.25  # a receiver says what it holds and whether its queue is empty this often
OPERATOR_CACHE = 8  # geometries whose operators a receiver keeps built (bursts of similar scans)
OVER_BUDGET = "over_budget"  # the scan's state would exceed [limits] scan_state_mb
TOO_MANY_SCANS = "too_many_scans"  # [limits] max_open_scans scans are open already
UNANNOUNCED = "unannounced"  # frames of a scan no start announced within [limits] announce_grace_s
CONNECTION_DROPPED = "connection_dropped"  # a source's connection failed on a protocol error (too large)
MAX_HELD_SCANS = 1024  # unannounced scans held at once; the oldest is dropped beyond
MAX_REMEMBERED = 4096  # refused or closed scan ids remembered, to reject their later messages


@dataclass
class Held:
    """Frames of a scan no ``start`` announced yet, waiting for one."""

    since: float
    msgs: list = field(default_factory=list)
    nbytes: int = 0


@dataclass
class ScanWork:
    """One scan as seen by one receiver: its operators, their states, and pending messages."""

    scan_id: str
    geometry: Geometry
    operators: list
    states: dict
    pending: list = field(default_factory=list)
    pending_frames: int = 0
    pending_bytes: int = 0
    oldest: float = 0.0
    touched: list = field(default_factory=lambda: [None, None])  # positions changed since the last live snapshot
    errors: list = field(default_factory=list)
    # The EventStore's chunk list: entries [spilled, counted) are the scan's in-memory events
    # (older ones went to disk, newer ones are not counted yet), mem_bytes their bytes.
    store: EventStore | None = None
    counted: int = 0
    spilled: int = 0
    mem_bytes: int = 0
    spill: SpillFile | None = None  # created on the first spill
    spill_failed: bool = False  # after a failure the scan's events stay in memory
    opened: float = field(default_factory=time.monotonic)
    frames_read: int = 0  # frame parts of frames messages read (heartbeats report both)
    frames_processed: int = 0  # ... and processed and reported
    closing: bool = False  # the coordinator closed it: it no longer counts as open
    counter: ElectronCounter | None = None  # counts the scan's raw frames ([counting])


@dataclass
class WorkerScan:
    """What a receiver hands over when a scan closes: its operators and their states."""

    scan_id: str
    worker: str
    geometry: Geometry | None
    operators: list
    states: dict
    errors: list

    def __getstate__(self) -> dict:
        # pickled when dask moves it to the writer: integer sums narrowed (stream.transport.compact)
        return dict(self.__dict__, states=narrow_map(self.states))

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, states=widen_map(state["states"]))


@sizeof.register(Chunk)
def _sizeof_chunk(chunk: Chunk) -> int:
    """Blocks of events travel between workers as chunks: let dask count their bytes."""
    return chunk.nbytes


@sizeof.register(WorkerScan)
def _sizeof_worker_scan(ws: WorkerScan) -> int:
    """Let dask's memory accounting see the events a closed scan holds in memory (bytes;
    chunks spilled to disk do not count)."""
    total = 0
    for state in ws.states.values():
        for value in state.values():
            if isinstance(value, np.ndarray):
                total += value.nbytes
            elif isinstance(value, list):
                total += sum(c.nbytes for c in value if isinstance(c, Chunk))
    return total


class Receiver:
    """Receive, decode, chunk and process frames of every scan that arrives.

    connect: source addresses (``tcp://host:port``), one PULL socket connects to all of them.
    control_address: the coordinator's report socket.
    config: a ``stream.config.PipelineConfig``; the receiver reads its ``chunking``, ``live``
        and ``memory`` sections and builds each scan's operators with ``config.operators(g)``.
    worker: a name for reports and logs (the dask worker address).
    spill_dir: where the events of open scans go past ``[memory] events_in_memory_mb``
        (default: the system's temporary directory).
    keys: CURVE keys per source and for the coordinator (None: plain sockets everywhere).
    announce_address: the coordinator's control channel (announced, dropped and closing scans);
        None: only scans whose ``start`` this receiver sees are opened.
    state_budget: bytes one scan's state may take here (default from ``[limits]``).
    source: a detector source (``stream.sources``) to take messages from instead of decoding
        ``stemstream/1`` from the PULL socket (which then connects to nothing).
    Only the receiver's own thread touches its sockets; other threads queue their reports.
    """

    def __init__(self, connect: list[str], control_address: str, config,
                 worker: str = "receiver", rcvhwm: int = 64, spill_dir: str | None = None,
                 keys: ReceiverKeys | None = None, announce_address: str | None = None,
                 state_budget: int | None = None, source=None):
        self.source = source
        self.connect = list(connect) if source is None else []
        self.control_address = control_address
        self.announce_address = announce_address
        self.keys = keys
        self.config = config
        self.state_budget = state_budget or config.limits.scan_state_bytes(None)
        self._held: OrderedDict[str, Held] = OrderedDict()  # unannounced scans, oldest first
        self._held_bytes = 0
        self._announced: OrderedDict[str, None] = OrderedDict()  # by the coordinator
        self._refused: OrderedDict[str, tuple[str, str]] = OrderedDict()  # scan -> (reason, detail)
        self._ended: OrderedDict[str, None] = OrderedDict()  # every source ended: no live snapshots
        self.worker = worker
        self.rcvhwm = rcvhwm
        self.spill_dir = spill_dir or tempfile.gettempdir()
        self._budget = config.memory.events_in_memory_mb * 1e6  # bytes
        self._mem_bytes = 0  # bytes of in-memory event chunks of the open scans
        self._scans: dict[str, ScanWork] = {}
        self._closed: OrderedDict[str, None] = OrderedDict()  # recently closed scan ids
        self._warned: set[str] = set()
        self._outbox: deque = deque()  # reports, sent by the receiver thread only
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._built: OrderedDict = OrderedDict()  # geometry -> operators (immutable once built)
        self._empty_at = 0.0  # wall-clock time the input queue was last found empty
        self._heartbeats = 0

    # -------------------------------------------------------------- lifecycle
    def start(self, timeout_s: float = 10.0) -> None:
        self._thread = threading.Thread(target=self._run, name="stemstream-receiver", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise RuntimeError(f"receiver on {self.worker} did not start within {timeout_s} s")
        if self._error:
            raise self._error

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout_s)

    @property
    def held_bytes(self) -> int:
        """Bytes of frames waiting for their scan's ``start`` (``[limits] unannounced_mb``)."""
        return self._held_bytes

    @property
    def events_in_memory_bytes(self) -> int:
        """Bytes of events the open scans hold in memory (the budget bounds this)."""
        return self._mem_bytes

    # -------------------------------------------------------------- called from other threads
    def close_scan(self, scan_id: str) -> WorkerScan:
        """Process what is pending for ``scan_id``, forget it here, and return its state.

        Later messages of this scan are rejected as late. A receiver that never saw the scan
        returns an empty WorkerScan."""
        if self.source is not None:
            self.source.scan_closed(scan_id)
        with self._lock:
            self._closed[scan_id] = None
            while len(self._closed) > MAX_REMEMBERED:
                self._closed.popitem(last=False)
            held = self._forget_held(scan_id)
            if held is not None:  # its announcement never came here: they arrived too late to count
                self._reject(LATE, f"{len(held.msgs)} frames message(s) of scan {scan_id} still waiting for "
                             "its announcement when it closed", scan_id, len(held.msgs),
                             ranges=[r for m in held.msgs for r in m.ranges()])
            work = self._scans.pop(scan_id, None)
            if work is None:
                return WorkerScan(scan_id, self.worker, None, [], {}, [])
            self._flush(work, spill=False)  # it leaves: spilling the others would not help
            self._mem_bytes -= work.mem_bytes  # the budget covers open scans only
            return WorkerScan(scan_id, self.worker, work.geometry, work.operators, work.states,
                              work.errors)

    def apply(self, scan_id: str, op) -> tuple[dict, int, int] | None:
        """Run an ad-hoc operator (a virtual detector drawn in the viewer, say) over every
        event this receiver holds of the open scan ``scan_id``, in memory or spilled; returns
        (its state, frame parts, events) or None when the scan is not open here.

        Pending frames are processed first, so the answer covers every frame reported so
        far. The list of stored chunks is copied under the lock; the work runs outside it
        (the receiver goes on meanwhile) on chunks that never change once stored."""
        with self._lock:
            work = self._scans.get(scan_id)
            if work is None or work.store is None:
                return None
            self._flush(work, spill=False)
            chunks = list(work.states[work.store.name]["chunks"])
        state = op.new_state()
        frames = events = 0
        for c in chunks:
            c = c if isinstance(c, Chunk) else c.load()
            op.process(state, c)
            frames += c.n_frames
            events += c.n_events
        return state, frames, events

    def events_in(self, scan_id: str, lo: int, hi: int) -> list[Chunk] | None:
        """The frame parts of stored frames ``[lo, hi)`` this receiver holds of the open scan
        ``scan_id`` (in memory or spilled), as chunks; None when the scan is not open here.
        Every frame already reported is in them. The chunk list is copied under the lock;
        the chunks never change once stored, so they are read outside it."""
        with self._lock:
            work = self._scans.get(scan_id)
            if work is None or work.store is None:
                return None
            state = work.states[work.store.name]
            held = {"chunks": list(state["chunks"]), "spans": list(state["spans"])}
        return work.store.events_in(held, lo, hi)

    # -------------------------------------------------------------- the receive loop
    def _run(self) -> None:
        ctx = zmq.Context.instance()
        keys = self.keys
        try:
            pull = ctx.socket(zmq.PULL)
            pull.setsockopt(zmq.RCVHWM, self.rcvhwm)
            pull.setsockopt(zmq.LINGER, 0)
            # one message part may cost at most this (a larger one drops the connection)
            pull.setsockopt(zmq.MAXMSGSIZE, self.config.limits.max_message_bytes(self.config.chunking))
            # the links the coordinator hears about, and the sources ZeroMQ does not connect
            # again after a protocol error (a part beyond MAXMSGSIZE): the receiver does (_reconnect)
            links = LinkWatch(pull)  # before connecting: no event is missed
            for addr in self.connect:
                self._connect(pull, addr)
            report = ctx.socket(zmq.PUSH)
            report.setsockopt(zmq.LINGER, 2000)
            as_client(report, keys.coordinator if keys is not None else None)
            report.connect(self.control_address)
            sub = None
            if self.announce_address:
                sub = ctx.socket(zmq.SUB)
                sub.setsockopt(zmq.LINGER, 0)
                sub.setsockopt(zmq.SUBSCRIBE, b"")
                as_client(sub, keys.coordinator if keys is not None else None)
                sub.connect(self.announce_address)
            if self.source is not None:
                self.source.open(ctx, self._reject, self._notice)
        except BaseException as e:  # noqa: BLE001 - handed to start()
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self._send(links.report())  # none yet: the coordinator knows this receiver is there
        live_period = 1.0 / self.config.live.rate_hz if self.config.live.rate_hz > 0 else None
        next_live = time.monotonic() + (live_period or 0)
        latency = self.config.chunking.max_latency_ms / 1000
        poll_ms = max(1, int(self.config.chunking.max_latency_ms / 2))
        held_budget = self.config.limits.unannounced_mb * 1e6
        receiving, waiting = zmq.Poller(), zmq.Poller()
        receiving.register(pull, zmq.POLLIN)
        for sock in (sub, links.monitor):
            if sock is not None:
                receiving.register(sock, zmq.POLLIN)
                waiting.register(sock, zmq.POLLIN)
        next_heartbeat = time.monotonic()
        try:
            while not self._stop.is_set():
                # frames held for an announcement fill their budget: stop taking more (the
                # sources are held back) until the coordinator announces or the grace ends
                full = self._held_bytes >= held_budget
                poller = waiting if full else receiving
                # The clock is read *before* looking: found empty, the queue was empty at that
                # time even if this thread is stopped right after (a stopped worker must not
                # claim afterwards to have drained what queued meanwhile).
                looked = time.time()
                # a detector source waits in its own receive (below)
                ready = dict(poller.poll(0 if self.source is not None and not full else poll_ms))
                if links.monitor in ready and links.poll():
                    self._send(links.report())
                self._reconnect(pull, links)
                if sub is not None and sub in ready:
                    while True:
                        try:
                            parts = sub.recv_multipart(flags=zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._on_control_safely(parts)
                empty = False  # while frames wait for an announcement, the input is not read
                if self.source is not None:
                    if not full:
                        empty = not self._receive_from_source(poll_ms, report)
                elif pull in ready:
                    for _ in range(64):  # drain what is queued before looking at the clocks
                        if self._held_bytes >= held_budget:
                            break
                        looked = time.time()
                        try:
                            parts = pull.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            empty = True
                            break
                        self._handle_safely(parts)
                        # a start's report goes out before the next chunk is processed: the
                        # other receivers wait for its announcement to open the scan
                        self._send_reports(report)
                elif not full:
                    empty = True
                if empty:  # every message that reached this process before `looked` has been read
                    self._empty_at = looked
                try:
                    now = time.monotonic()
                    with self._lock:
                        for work in list(self._scans.values()):
                            if work.pending and now - work.oldest >= latency:
                                self._flush(work)
                        self._expire_held(now)
                    if live_period and now >= next_live:
                        self._snapshot_live()
                        next_live = now + live_period
                    if now >= next_heartbeat:
                        next_heartbeat = now + HEARTBEAT_S
                        self._heartbeat(bool(pull.get(zmq.EVENTS) & zmq.POLLIN))
                    if links.poll():
                        self._send(links.report())
                except Exception as e:  # noqa: BLE001 - the loop must go on
                    log.exception("receiver housekeeping failed")
                    self._reject(INTERNAL_ERROR, f"{type(e).__name__}: {e}")
                self._send_reports(report)
        finally:
            links.close()
            if self.source is not None:
                self.source.close()
            pull.close()
            report.close(linger=0)
            if sub is not None:
                sub.close()

    def _send_reports(self, report: zmq.Socket) -> None:
        while self._outbox:
            try:  # never block: stop() must be able to end this thread
                report.send_multipart(self._outbox[0], flags=zmq.NOBLOCK)
            except zmq.Again:
                return  # the coordinator is not reading; try again next turn
            self._outbox.popleft()

    def _connect(self, pull: zmq.Socket, addr: str) -> None:
        """Connect to one source with its security (each connect takes the options set now)."""
        as_client(pull, self.keys.sources.get(addr) if self.keys is not None else None)
        pull.connect(addr)

    def _reconnect(self, pull: zmq.Socket, links: LinkWatch, wait_s: float = 0.5) -> None:
        """Connect again to a source ZeroMQ gave up on: after a protocol error (a message part
        beyond ``[limits] max_message_mb``, a corrupt stream) it does not, and that source's
        later frames would never arrive here. Nor after a failed handshake (a plain source, the
        wrong key): that source is retried too, without a reject (no message was in flight;
        the links report names the failure)."""
        now = time.monotonic()
        for addr, when in list(links.dropped.items()):
            if now - when < wait_s or addr not in self.connect:
                continue
            del links.dropped[addr]
            try:
                pull.disconnect(addr)
            except zmq.ZMQError:
                pass  # already gone
            self._connect(pull, addr)
            if addr not in links.dropped_connected:
                continue
            links.dropped_connected.discard(addr)
            limit = self.config.limits.max_message_bytes(self.config.chunking) / 1e6
            self._reject(CONNECTION_DROPPED, f"the connection to {addr} failed on a protocol error (a "
                         f"message part beyond [limits] max_message_mb = {limit:g} MB, or a corrupt "
                         "stream) and was made again; the message in flight is lost")

    def _send(self, header: dict, arrays=None) -> None:
        """Queue a report; the receiver thread sends it (ZMQ sockets belong to one thread).
        The arrays are copied now: the states keep changing. While the coordinator is not
        reading, live snapshots are not queued (the next one will carry the same)."""
        if header["kind"] == "live" and len(self._outbox) > 100:
            return
        # narrowed (a live snapshot's integer sums fit in 1-4 bytes): a third of the bytes to
        # copy, encrypt and decrypt at 2 snapshots a second of 8 MB at 1024² positions
        arrays = {k: n if isinstance(n := narrow(v), Narrowed) else np.array(v) for k, v in (arrays or {}).items()}
        self._outbox.append(control.encode(dict(header, worker=self.worker), arrays))

    def _heartbeat(self, input_waiting: bool) -> None:
        """Tell the coordinator what this receiver holds and whether it has read everything
        that reached it: ``empty_at`` (wall-clock s) is the last moment its input queue was
        empty, ``pending`` the scans with messages read but not yet processed and reported.
        Reports travel in order, so every frame read before ``empty_at`` of a scan not in
        ``pending`` was reported before this heartbeat (docs/PROTOCOL.md, liveness)."""
        if len(self._outbox) > 1000:  # the coordinator is not reading: the next one says the same
            return
        self._heartbeats += 1
        with self._lock:
            scans = {sid: [w.frames_read, w.frames_processed] for sid, w in self._scans.items()}
            pending = [sid for sid, w in self._scans.items() if w.pending] + list(self._held)  # held: not processed
        self._send({"kind": "heartbeat", "seq": self._heartbeats, "empty_at": self._empty_at,
                    "input_waiting": input_waiting, "pending": pending, "scans": scans,
                    "outbox": len(self._outbox)})

    def _reject(self, reason: str, detail: str, scan_id: str | None = None, count: int = 1,
                ranges: list | None = None) -> None:
        """Report ``count`` rejected messages of one reason (logged once per reason); for late
        frames, their ``ranges`` ([source, first, count] each)."""
        if reason not in self._warned:  # once per reason; the counts tell the rest
            self._warned.add(reason)
            log.warning("rejected message (%s): %s; further rejects of this kind are only counted",
                        reason, detail)
        self._send({"kind": "reject", "reason": reason, "detail": detail, "scan_id": scan_id,
                    "count": count, "ranges": ranges or []})

    def _notice(self, text: str) -> None:
        """One line for the session's console (a detector source's news)."""
        self._send({"kind": "notice", "text": text})

    def _receive_from_source(self, poll_ms: int, report: zmq.Socket) -> int:
        """Messages read from the detector source (0: none reached it, or it failed)."""
        try:
            messages = self.source.receive(poll_ms)
        except Exception as e:  # noqa: BLE001 - a source's bug must not stop the receiver
            if INTERNAL_ERROR not in self._warned:
                log.exception("detector source failed")
            self._reject(INTERNAL_ERROR, f"detector source: {type(e).__name__}: {e}")
            time.sleep(poll_ms / 1000)
            return 0
        for msg in messages:
            self._handle_safely(msg)
            self._send_reports(report)  # a start's report before the next block is processed
        return len(messages)

    def _handle_safely(self, parts) -> None:
        try:
            self._handle(parts)
        except ProtocolError as e:
            if e.scan_id in self._closed:  # whatever is wrong with it, it comes too late
                self._reject(LATE, f"a message of scan {e.scan_id}, which is closed", e.scan_id)
            else:
                self._reject(e.reason, e.detail, e.scan_id)
        except Exception as e:  # noqa: BLE001 - one bad message must never stop the receiver
            log.exception("unexpected error on a message")
            self._reject(INTERNAL_ERROR, f"{type(e).__name__}: {e}")

    def _handle(self, parts) -> None:
        msg = parts if isinstance(parts, Message) else decode(parts)  # a source's are decoded
        sid = msg.scan_id
        with self._lock:
            if sid in self._closed:
                self._reject(LATE, f"{msg.kind} message of scan {sid}, which is closed", sid,
                             ranges=msg.ranges() if msg.kind in ("frames", "dense") else None)
                return
            if sid in self._refused:
                reason, detail = self._refused[sid]
                self._reject(reason, detail, sid)
                return
            if msg.kind == "start":
                report = {"kind": "start", "scan_id": sid, "source": msg.source,
                          "geometry": msg.geometry.to_wire(), "metadata": msg.metadata}
                if sid not in self._scans and sid not in self._announced and self._open_scans() \
                        >= self.config.limits.max_open_scans:
                    # at the limit (a burst of small scans outruns the closing of the earlier
                    # ones): held, not built nor refused; the coordinator admits it or not
                    # (announced / drop), and what is held is bounded ([limits] unannounced_mb,
                    # then the sources are held back)
                    if sid not in self._held:
                        self._hold(msg)
                        self._send(report)
                    return
                if self._open(msg) is not None:
                    self._send(report)
            elif msg.kind in ("frames", "dense"):
                work = self._scans.get(sid)
                if work is None:
                    if sid not in self._announced:
                        self._hold(msg)
                        return
                    work = self._open(msg)
                    if work is None:
                        return
                self._add_frames(work, msg)
            elif msg.kind == "end":
                # t: when it arrived here (the liveness rule counts from it)
                self._send({"kind": "end", "scan_id": sid, "source": msg.source,
                            "frames_sent": msg.header["frames_sent"], "t": time.time()})
            else:
                self._send({"kind": "abort", "scan_id": sid, "source": msg.source,
                            "reason": msg.header.get("reason", ""), "t": time.time()})

    def _add_frames(self, work: ScanWork, msg: Message, flush: bool = True) -> None:
        """Queue a ``frames`` (or ``dense``, as its events) message of an open scan; process
        the queue when it reaches a chunk (``flush``)."""
        if not work.geometry.same_scan(msg.geometry):
            self._reject("bad_geometry", f"scan {msg.scan_id}: geometry {msg.geometry} disagrees "
                         f"with {work.geometry} seen before", msg.scan_id)
            return
        if msg.kind == "dense":
            try:
                msg = self._events_of_dense(work, msg)
            except ProtocolError as e:
                self._reject(e.reason, e.detail, msg.scan_id)
                return
            if msg is None:
                return
        work.pending.append(msg)
        if not work.pending_frames:
            work.oldest = time.monotonic()
        work.pending_frames += msg.count
        work.frames_read += msg.count
        work.pending_bytes += msg.indices.nbytes + msg.counts.nbytes
        chunking = self.config.chunking
        if flush and (work.pending_frames >= chunking.max_frames or work.pending_bytes >= chunking.max_bytes):
            self._flush(work)

    def _refuse(self, scan_id: str, reason: str, detail: str, count: int = 1) -> None:
        """Refuse a scan here: this message and every later one of it are rejected."""
        self._refused[scan_id] = (reason, detail)
        while len(self._refused) > MAX_REMEMBERED:
            self._refused.popitem(last=False)
        self._reject(reason, detail, scan_id, count)

    def _over_budget(self, msg: Message) -> bool:
        """Refuse the scan if its state would exceed the per-scan budget (nothing allocated)."""
        g = msg.geometry
        need = self.config.scan_state_bytes(g)  # the sector does not change it
        if need <= self.state_budget:
            return False
        self._refuse(msg.scan_id, OVER_BUDGET,
                     f"scan {msg.scan_id}: {g.scan_shape[0]}x{g.scan_shape[1]} positions on a "
                     f"{g.frame_shape[0]}x{g.frame_shape[1]} detector need about {need / 1e6:,.0f} MB of "
                     f"state per scan, over the budget of {self.state_budget / 1e6:,.0f} MB ([limits] "
                     "scan_state_mb); raise it (and the workers' memory) or scan fewer positions")
        return True

    def _open(self, msg: Message) -> ScanWork | None:
        """The scan's work, created from the message's geometry on first sight (after the
        budget and open-scan checks), with the frames held for it processed."""
        work = self._scans.get(msg.scan_id)
        if work is not None:
            if not work.geometry.same_scan(msg.geometry):
                self._reject("bad_geometry", f"scan {msg.scan_id}: geometry {msg.geometry} disagrees "
                             f"with {work.geometry} seen before", msg.scan_id)
                return None
            return work
        if self._over_budget(msg):
            self._forget_held(msg.scan_id)
            return None
        # the coordinator admits announced scans within its own limit; this one bounds what a
        # flood of start messages can make this receiver build before the coordinator says no
        n_open = self._open_scans()
        if msg.scan_id not in self._announced and n_open >= self.config.limits.max_open_scans:
            self._forget_held(msg.scan_id)
            self._refuse(msg.scan_id, TOO_MANY_SCANS,
                         f"scan {msg.scan_id}: {n_open} scans are open on this receiver, the most "
                         "[limits] max_open_scans allows; end or abort scans, or raise it")
            return None
        geometry = msg.geometry.for_sector(None)
        try:
            operators = self._operators(geometry)
            states = {op.name: op.new_state() for op in operators}
        except (ValueError, MemoryError) as e:
            self._reject(OPERATOR_ERROR, f"scan {msg.scan_id}: cannot build operators: {e}", msg.scan_id)
            return None
        work = ScanWork(msg.scan_id, geometry, operators, states,
                        store=next((op for op in operators if isinstance(op, EventStore)), None),
                        counter=next((op for op in operators if isinstance(op, ElectronCounter)), None))
        self._scans[msg.scan_id] = work
        self._send({"kind": "geometry", "scan_id": msg.scan_id, "geometry": geometry.to_wire()})
        held = self._forget_held(msg.scan_id)
        for m in held.msgs if held is not None else []:  # processed after this scan's reports went out
            if m.kind in ("frames", "dense"):  # (a start held at the open-scan limit is done)
                self._add_frames(work, m, flush=False)
        return work

    def _open_scans(self) -> int:
        """Scans open here that the coordinator has not closed."""
        return sum(1 for w in self._scans.values() if not w.closing)

    def _operators(self, geometry: Geometry) -> list:
        """The operators of a scan of this geometry: built once per geometry (building takes
        tens of ms; operators hold no per-scan state, their states are separate)."""
        ops = self._built.get(geometry)
        if ops is None:
            ops = self._built[geometry] = self.config.operators(geometry)
            while len(self._built) > OPERATOR_CACHE:
                self._built.popitem(last=False)
        self._built.move_to_end(geometry)
        return ops

    # -------------------------------------------------------------- scans not announced yet
    def _hold(self, msg: Message) -> None:
        """Keep frames of a scan no start announced yet (no state is built for it)."""
        held = self._held.get(msg.scan_id)
        if held is None:
            if self._over_budget(msg):
                return
            while len(self._held) >= MAX_HELD_SCANS:
                oldest = next(iter(self._held))
                self._drop_held(oldest, f"more than {MAX_HELD_SCANS} scans waited for their start")
            held = self._held[msg.scan_id] = Held(time.monotonic())
        nbytes = (msg.dense.nbytes if msg.kind == "dense" else msg.indices.nbytes + msg.counts.nbytes
                  if msg.kind == "frames" else 0) + 200
        held.msgs.append(msg)
        held.nbytes += nbytes
        self._held_bytes += nbytes

    def _forget_held(self, scan_id: str) -> Held | None:
        held = self._held.pop(scan_id, None)
        if held is not None:
            self._held_bytes -= held.nbytes
        return held

    def _drop_held(self, scan_id: str, why: str) -> None:
        held = self._forget_held(scan_id)
        if held is not None:
            self._refuse(scan_id, UNANNOUNCED,
                         f"{len(held.msgs)} frames message(s) of scan {scan_id}, which no source announced "
                         f"with start: {why}; dropped (docs/PROTOCOL.md, announcement)", len(held.msgs))

    def _expire_held(self, now: float) -> None:
        grace = self.config.limits.announce_grace_s
        while self._held:
            sid, held = next(iter(self._held.items()))
            if now - held.since < grace:
                break
            self._drop_held(sid, f"none came within [limits] announce_grace_s = {grace:g} s")

    # -------------------------------------------------------------- the coordinator's control channel
    def _on_control_safely(self, parts) -> None:
        try:
            header, _ = control.decode(parts)
            with self._lock:
                self._on_control(header)
        except Exception as e:  # noqa: BLE001 - a bad control message must not stop the receiver
            log.exception("control message could not be handled")
            self._reject(INTERNAL_ERROR, f"control message: {type(e).__name__}: {e}")

    def _on_control(self, header: dict) -> None:
        """``announced``: another receiver saw the scans' start, open them here too;
        ``closing``: the coordinator closed them (they no longer count as open);
        ``ended``: every source ended (or one aborted): their file comes next, no more live
        snapshots of them;
        ``drop``: the coordinator refused them: free their state, reject their messages."""
        kind, ids = header["kind"], header["scan_ids"]
        if kind == "announced":
            for sid in ids:
                if sid in self._announced:
                    continue
                self._announced[sid] = None
                while len(self._announced) > MAX_REMEMBERED:
                    self._announced.popitem(last=False)
                if self._refused.get(sid, ("",))[0] == TOO_MANY_SCANS:  # admitted after all
                    del self._refused[sid]
                held = self._held.get(sid)
                if held is not None and sid not in self._scans:
                    self._open(held.msgs[0])
        elif kind == "closing":
            for sid in ids:
                if sid in self._scans:
                    self._scans[sid].closing = True
        elif kind == "ended":
            for sid in ids:
                self._ended[sid] = None
            while len(self._ended) > MAX_REMEMBERED:
                self._ended.popitem(last=False)
        elif kind == "drop":
            for sid in ids:
                self._forget_held(sid)
                work = self._scans.pop(sid, None)
                if work is not None:
                    self._mem_bytes -= work.mem_bytes
                    if work.spill is not None:
                        work.spill.close()
                self._refused[sid] = (header["reason"], header.get("detail", ""))
                while len(self._refused) > MAX_REMEMBERED:
                    self._refused.popitem(last=False)

    def _events_of_dense(self, work: ScanWork, msg: Message) -> Message | None:
        """A ``dense`` message as the ``frames`` message it amounts to: electrons per pixel
        become that many events; raw frames are counted by the scan's counting operator
        (docs/COUNTING.md). None, after a reject, when raw frames cannot be counted."""
        row0 = msg.geometry.sector[0]
        if msg.header["values"] == "counts":
            # its events may cost what a frames message of the largest accepted size carries
            limit = min(MAX_DENSE_EVENTS, self.config.limits.max_message_bytes(self.config.chunking) // 4)
            try:
                counts, indices = counts_to_events(msg.dense, row0, limit)
            except ValueError as e:
                raise ProtocolError("too_many_events", str(e), msg.scan_id) from None
        else:
            try:
                if work.counter is None:
                    raise ValueError("raw frames arrived but [counting] gives no dark reference and "
                                     "thresholds: run 'stemstream calibrate' and set [counting] file, or "
                                     "set dark and the thresholds (docs/COUNTING.md)")
                counts, indices = work.counter.count(msg.dense, row0, work.states[work.counter.name])
            except ValueError as e:  # a configuration that cannot count this detector's frames
                detail = f"scan {msg.scan_id}: {e}"
                if detail not in work.errors:
                    work.errors.append(detail)
                self._reject(OPERATOR_ERROR, detail, msg.scan_id)
                return None
        return Message("frames", msg.scan_id, msg.source, msg.header, geometry=msg.geometry,
                       counts=counts, indices=indices)

    def _flush(self, work: ScanWork, spill: bool = True) -> None:
        """Turn the pending messages of a scan into one chunk and run its operators; then, if
        ``spill`` and the open scans' events exceed the budget, move some to disk."""
        if not work.pending:
            return
        msgs, work.pending = work.pending, []
        work.pending_frames = work.pending_bytes = 0
        try:
            chunk = chunk_from_messages(msgs, work.geometry)
        except Exception as e:  # noqa: BLE001 - not even a chunk: these frames count as missing
            self._failed(work, e)
            return
        try:
            for op in work.operators:
                op.process(work.states[op.name], chunk)
        except Exception as e:  # noqa: BLE001 - a bug in one operator must not stop the receiver
            self._failed(work, e)
        self._count_new_events(work)
        if spill and self._mem_bytes > self._budget:
            self._spill_oldest()
        valid = chunk.positions[chunk.positions >= 0]
        if len(valid):
            lo, hi = int(valid.min()), int(valid.max()) + 1
            t = work.touched
            work.touched = [lo if t[0] is None else min(t[0], lo), hi if t[1] is None else max(t[1], hi)]
        work.frames_processed += sum(m.count for m in msgs)
        self._send({"kind": "frames", "scan_id": work.scan_id,
                    "ranges": [r for m in msgs for r in m.ranges()],
                    "events": int(chunk.n_events)})

    def _count_new_events(self, work: ScanWork) -> None:
        """Add the chunks the EventStore stored since the last call to the in-memory bytes."""
        if work.store is None:
            return
        chunks = work.states[work.store.name]["chunks"]
        new = sum(c.nbytes for c in chunks[work.counted:] if isinstance(c, Chunk))
        work.counted = len(chunks)
        work.mem_bytes += new
        self._mem_bytes += new

    def _spill_oldest(self) -> None:
        """Move the oldest in-memory chunks (oldest open scan first) to disk until the open
        scans hold at most 3/4 of the budget: the slack spares a spill after every flush."""
        target = 0.75 * self._budget
        for work in self._scans.values():  # in the order the scans opened
            while self._mem_bytes > target and work.spilled < work.counted and not work.spill_failed:
                self._spill_one(work)
            if self._mem_bytes <= target:
                return

    def _spill_one(self, work: ScanWork) -> None:
        """Replace the scan's oldest in-memory chunk by its copy on disk (spans and counts
        stay). On an OSError the chunk stays in memory and the scan spills no more."""
        chunks = work.states[work.store.name]["chunks"]
        chunk = chunks[work.spilled]
        if isinstance(chunk, Chunk):
            try:
                if work.spill is None:
                    work.spill = SpillFile(self.spill_dir)
                    log.info("scan %s: events past [memory] events_in_memory_mb = %g MB go to "
                             "a file in %s", work.scan_id, self._budget / 1e6, self.spill_dir)
                chunks[work.spilled] = work.spill.write(chunk)
            except OSError as e:
                work.spill_failed = True
                self._reject(SPILL_FAILED, f"scan {work.scan_id}: {e}; its events stay in memory "
                             "(none lost), beyond [memory] events_in_memory_mb")
                return
            work.mem_bytes -= chunk.nbytes
            self._mem_bytes -= chunk.nbytes
        work.spilled += 1

    def _failed(self, work: ScanWork, e: Exception) -> None:
        log.exception("processing failed on scan %s", work.scan_id)
        work.errors.append(f"{type(e).__name__}: {e}")
        self._reject(OPERATOR_ERROR, f"scan {work.scan_id}: {type(e).__name__}: {e}", work.scan_id)

    def _snapshot_live(self) -> None:
        """Partial states of every scan that changed: scan-shaped arrays only over the
        positions that changed since the last snapshot, detector-shaped ones whole. None of
        a scan every source ended (or that closed): its file comes next, and copying and
        sending its detector-sized sums was a quarter of a small scan's cost in a burst."""
        young = time.monotonic() - 1.0 / self.config.live.rate_hz  # scans done sooner need none
        with self._lock:
            for work in self._scans.values():
                lo, hi = work.touched
                if lo is None or work.opened > young or work.closing or work.scan_id in self._ended:
                    continue
                work.touched = [None, None]
                arrays = {}
                for op in work.operators:
                    if not op.live:
                        continue
                    for key, value in work.states[op.name].items():
                        nav = op.state_kinds.get(key) == "nav"
                        arrays[f"{op.name}/{key}"] = value[..., lo:hi] if nav else value
                self._send({"kind": "live", "scan_id": work.scan_id, "lo": lo, "hi": hi,
                            "nav": [f"{op.name}/{k}" for op in work.operators
                                    for k, kind in op.state_kinds.items() if kind == "nav"]}, arrays)


def chunk_from_messages(msgs: list[Message], geometry: Geometry) -> Chunk:
    """One chunk from decoded ``frames`` messages (of one scan, any sources)."""
    counts = np.concatenate([m.counts for m in msgs]) if len(msgs) > 1 else msgs[0].counts
    indices = np.concatenate([m.indices for m in msgs]) if len(msgs) > 1 else msgs[0].indices
    n = np.array([m.count for m in msgs])
    if any(m.frame_ids is not None for m in msgs):  # a detector source's images out of turn
        frames = np.concatenate([m.frame_numbers() for m in msgs])
    else:  # frame = first of its message + its rank inside the message
        firsts = np.repeat(np.array([m.first for m in msgs], np.int64), n)
        frames = firsts + np.arange(len(firsts), dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)
    sources = np.repeat(np.array([m.source for m in msgs], np.int16), n)
    return Chunk.from_counts(frames, sources, frame_positions(frames, geometry), counts, indices)
