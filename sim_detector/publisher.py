"""Publish electron-counted frames with the stemstream/1 wire protocol over ZeroMQ PUSH sockets.

One bound PUSH socket per source; source k binds the port of ``bind`` plus k. With several
sources every frame is split into detector row stripes (sectors), as the 4D Camera reads out
its 4 sectors of 144 rows, and each source sends only its stripe of every frame. Frames are
sent from prepared buffers (no per-frame Python work) in batches of ``batch`` frames, paced to
a target rate or as fast as the receivers take them (PUSH blocks instead of dropping).

With ``curve`` keys every socket is a CURVE server: traffic is encrypted and only receivers
whose public key is listed get a connection (a stray PULL receives nothing; docs/SECURITY.md).
"""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from urllib.parse import urlsplit

import numba
import numpy as np
import zmq
from zmq.utils.monitor import parse_monitor_message

from stream.security.curve import Gatekeeper, SourceKeys, as_server
from stream.transport.links import close_monitor, open_monitor
from stream.transport.protocol import (Geometry, encode_abort, encode_dense, encode_end, encode_frames,
                                       encode_start)


class BindError(RuntimeError):
    """A source could not bind its address (port in use, bad interface, bad URL)."""


class StallError(RuntimeError):
    """No receiver took a frame for longer than the publisher was told to wait."""


def address_ranges(addresses: list[str]) -> str:
    """'tcp://h:6002..6004' for consecutive ports of one host, else the addresses."""
    parts = [urlsplit(a) for a in addresses]
    hosts = {p.hostname for p in parts}
    ports = [p.port for p in parts]
    if len(addresses) > 2 and len(hosts) == 1 and ports == list(range(ports[0], ports[0] + len(ports))):
        return f"tcp://{parts[0].hostname}:{ports[0]}..{ports[-1]}"
    return ", ".join(addresses)


def receivers_hint(addresses: list[str], connected: list[bool]) -> str:
    """What is not connected and what to do, for a publisher whose sources ``addresses``
    have (``connected``) or lack a receiver."""
    n = len(addresses)
    first = urlsplit(addresses[0])
    host = socket.gethostname() if first.hostname in ("*", "0.0.0.0", "::") else first.hostname
    cmd = f"stemstream process --connect tcp://{host}:{first.port}" + (f" --sources {n}" if n > 1 else "")
    py = f"Session(connect=['tcp://{host}:{first.port}']" + (f", sources={n})" if n > 1 else ")")
    missing = [a for a, c in zip(addresses, connected) if not c]
    if len(missing) == n:
        return (f"no receiver has connected to {address_ranges(addresses)}: start '{cmd}' (or {py} in Python); "
                "if it runs, check its host and ports and that this machine is reachable from it")
    have = [a for a, c in zip(addresses, connected) if c]
    return (f"receivers are connected to {address_ranges(have)} but not to {address_ranges(missing)}: every one of the "
            f"{n} sources needs a receiver; start the processing with all of them ('{cmd}', or {py})")


def source_addresses(bind: str, n_sources: int) -> list[str]:
    """``tcp://host:port`` → the n addresses ``tcp://host:port+k``, k = 0..n-1."""
    parts = urlsplit(bind)
    if parts.scheme != "tcp" or parts.port is None:
        raise ValueError(f"--bind {bind!r} must look like tcp://HOST:PORT, e.g. tcp://127.0.0.1:6001")
    if not 0 < parts.port <= 65535 - (n_sources - 1):
        raise ValueError(f"--bind port {parts.port} leaves no room for {n_sources} sources (ports up to 65535)")
    return [f"tcp://{parts.hostname}:{parts.port + k}" for k in range(n_sources)]


def sector_rows(height: int, n_sources: int) -> list[tuple[int, int]]:
    """Row stripes (row0, row1) of the detector for each source; as equal as possible."""
    if not 1 <= n_sources <= height:
        raise ValueError(f"{n_sources} sources cannot split a detector of {height} rows")
    edges = np.linspace(0, height, n_sources + 1).round().astype(int)
    return [(int(edges[k]), int(edges[k + 1])) for k in range(n_sources)]


@numba.njit(cache=True, nogil=True)
def _split_by_rows(counts, indices, width, row_edges):
    """Stable split of every frame's events into row stripes.

    counts (n,) uint32, indices (m,) uint32 → per-source counts (s, n) uint32 and indices
    concatenated source by source (source k's events are out[starts[k]:starts[k+1]]).
    """
    n_src = len(row_edges) - 1
    n = len(counts)
    src_of_row = np.empty(row_edges[-1], np.int64)
    for k in range(n_src):
        src_of_row[row_edges[k]:row_edges[k + 1]] = k
    out_counts = np.zeros((n_src, n), np.uint32)
    pos = 0
    for f in range(n):
        for e in range(pos, pos + counts[f]):
            out_counts[src_of_row[indices[e] // width], f] += 1
        pos += counts[f]
    totals = np.zeros(n_src + 1, np.int64)
    for k in range(n_src):
        totals[k + 1] = totals[k] + out_counts[k].sum()
    cursor = totals[:-1].copy()
    out = np.empty(len(indices), np.uint32)
    pos = 0
    for f in range(n):
        for e in range(pos, pos + counts[f]):
            k = src_of_row[indices[e] // width]
            out[cursor[k]] = indices[e]
            cursor[k] += 1
        pos += counts[f]
    return out_counts, out, totals


@dataclass
class SourceFrames:
    """Prepared per-source buffers for one scan: counts (n_frames,) and indices, uint32,
    with offsets (n_frames + 1,) int64 into indices."""

    geometry: Geometry
    counts: np.ndarray
    indices: np.ndarray
    offsets: np.ndarray = field(init=False)

    def __post_init__(self):
        self.offsets = np.zeros(len(self.counts) + 1, np.int64)
        np.cumsum(self.counts, out=self.offsets[1:])


def prepare_sources(counts: np.ndarray, indices: np.ndarray, geometry: Geometry,
                    n_sources: int) -> list[SourceFrames]:
    """Split a scan's frames (counts (n_frames,), indices) into ``n_sources`` row sectors."""
    counts = np.ascontiguousarray(counts, dtype=np.uint32)
    indices = np.ascontiguousarray(indices, dtype=np.uint32)
    if len(counts) != geometry.n_frames:
        raise ValueError(f"{len(counts)} frames given, the geometry needs {geometry.n_frames}")
    sectors = sector_rows(geometry.frame_shape[0], n_sources)
    geoms = [replace(geometry, n_sources=n_sources, sector=sec) for sec in sectors]
    if n_sources == 1:
        return [SourceFrames(geoms[0], counts, indices)]
    edges = np.array([s[0] for s in sectors] + [sectors[-1][1]], np.int64)
    src_counts, out, totals = _split_by_rows(counts, indices, geometry.frame_shape[1], edges)
    return [SourceFrames(geoms[k], src_counts[k], out[totals[k]:totals[k + 1]])
            for k in range(n_sources)]


def _runs(mask: np.ndarray, offset: int) -> list[tuple[int, int]]:
    """[start, stop) runs of True in ``mask``, shifted by ``offset``."""
    edges = np.diff(np.concatenate(([0], mask.view(np.int8), [0])))
    return [(int(a) + offset, int(b) + offset)
            for a, b in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1))]


@dataclass
class PublishStats:
    scan_id: str
    frames: int = 0
    events: int = 0
    seconds: float = 0.0
    aborted: str | None = None

    @property
    def rate(self) -> float:
        """Achieved frames/s."""
        return self.frames / self.seconds if self.seconds > 0 else float("nan")


class Publisher:
    """Bound PUSH sockets, one per source. Use as a context manager.

    bind: ``tcp://HOST:PORT``; source k binds PORT + k.
    sndhwm: messages queued per socket before ``send`` blocks (back-pressure, never drops).
    heartbeat_s: if > 0, ZeroMQ heartbeats every ``heartbeat_s`` and a receiver that has not
        answered for 5 of them is dropped with the messages queued to it: a receiver whose host
        vanished (link cut) is then left out, but so is one that reads nothing for that long
        (a stall under back-pressure). 0 (default): never drop.
    curve: the source's server keypair and the receivers' public keys it accepts; None binds
        plain sockets that any receiver (anyone who can reach the port) may pull from.
    """

    def __init__(self, bind: str, n_sources: int = 1, sndhwm: int = 64, linger_s: float = 10.0,
                 curve: SourceKeys | None = None, heartbeat_s: float = 0.0):
        self.addresses = source_addresses(bind, n_sources)
        self.n_sources = n_sources
        self.linger_s = float(linger_s)
        self.curve = curve
        self._ctx = zmq.Context()
        self._socks = []
        self._gate = None
        self._monitors = []  # per source: connections accepted and closed, handshakes failed (zmq socket monitor)
        self.receivers = [0] * n_sources  # receivers connected to each source now
        self.accepted = [0] * n_sources  # connections each source accepted so far
        self._failed_handshakes = 0
        try:
            if curve is not None:
                self._gate = Gatekeeper(self._ctx)
                self._gate.allow(SourceKeys.DOMAIN, curve.clients)
            for addr in self.addresses:
                s = self._ctx.socket(zmq.PUSH)
                s.setsockopt(zmq.SNDHWM, sndhwm)
                s.setsockopt(zmq.LINGER, int(linger_s * 1000))
                if heartbeat_s > 0:  # a vanished host sends no FIN: its share would queue unseen
                    s.setsockopt(zmq.HEARTBEAT_IVL, int(heartbeat_s * 1000))
                    s.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(5 * heartbeat_s * 1000))
                events = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED
                if curve is not None:
                    as_server(s, curve.keypair, SourceKeys.DOMAIN)
                    events |= zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                self._socks.append(s)
                self._monitors.append(open_monitor(s, events))  # (one monitor per socket)
                try:
                    s.bind(addr)
                except zmq.ZMQError as e:
                    hint = ("another program (an emulator still running?) uses it; "
                            "pick another --bind port" if e.errno == zmq.EADDRINUSE else
                            "check the host and port")
                    raise BindError(f"cannot bind {addr}: {e.strerror}; {hint}") from None
        except BaseException:
            self.close(linger_s=0)
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def refused(self) -> int:
        """Connections refused so far: receivers whose key this source does not accept, that
        expect another source key, or that speak no CURVE."""
        self._poll_monitors()
        return self._failed_handshakes

    def dropped_note(self, prog: str, hint: str = "") -> str:
        """The line to print when ``close`` returned False."""
        return (f"{prog}: WARNING: messages were still queued to a receiver after {self.linger_s:g} s "
                f"and were dropped at exit (the receivers report those frames missing){hint}")

    def close(self, linger_s: float | None = None) -> bool:
        """Close the sources, waiting up to the linger (``linger_s``, else the one given at
        construction) for the receivers to take what is still queued. False if that time
        ran out: messages still queued then were dropped (ZeroMQ does not say which)."""
        for s, m in zip(self._socks, self._monitors):
            close_monitor(s, m)
        self._monitors = []
        linger = self.linger_s if linger_s is None else linger_s
        for s in self._socks:
            s.setsockopt(zmq.LINGER, int(linger * 1000))
            s.close()
        had = bool(self._socks)
        self._socks = []
        if self._gate is not None:
            self._gate.stop()
            self._gate = None
        t0 = time.monotonic()
        self._ctx.term()  # returns once every queue is empty, or when the linger ran out
        return not (had and linger > 0 and time.monotonic() - t0 >= 0.98 * linger)

    def count_receivers(self) -> list[int]:
        """Receivers connected to each source now (from the sockets' monitors)."""
        self._poll_monitors()
        return list(self.receivers)

    def _poll_monitors(self) -> None:
        failed = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
        for k, m in enumerate(self._monitors):
            while True:
                try:
                    event = parse_monitor_message(m.recv_multipart(zmq.NOBLOCK))["event"]
                except zmq.Again:
                    break
                self.receivers[k] += {zmq.EVENT_ACCEPTED: 1, zmq.EVENT_DISCONNECTED: -1}.get(event, 0)
                self.accepted[k] += event == zmq.EVENT_ACCEPTED
                self._failed_handshakes += bool(event & failed)

    def unconnected(self) -> list[str]:
        """The source addresses without a receiver now."""
        return [a for a, n in zip(self.addresses, self.count_receivers()) if n <= 0]

    def wait_for_receivers(self, timeout_s: float | None = None, notify=None,
                           first_note_s: float = 3.0, every_s: float = 10.0) -> bool:
        """Block until every source has a connected receiver (or ``timeout_s``); True if all
        have. ``notify(text)`` is told after ``first_note_s`` and then every ``every_s``
        which sources still lack a receiver and what to start (:func:`receivers_hint`)."""
        t0 = time.monotonic()
        deadline = None if timeout_s is None else t0 + timeout_s
        next_note = t0 + first_note_s
        while True:
            ready = [bool(s.poll(0, zmq.POLLOUT)) for s in self._socks]
            if all(ready):
                return True
            time.sleep(0.05)  # (a poll on all sockets returns at once while any one is ready)
            now = time.monotonic()
            if notify and now >= next_note:
                refused = (f"; refused {self.refused} connection attempt(s) from receivers with other keys "
                           "(they expect another source key, or present a receiver key this source does not "
                           "accept; docs/SECURITY.md)" if self.refused else "")
                notify(f"waiting: {receivers_hint(self.addresses, ready)}{refused}")
                next_note = now + every_s
            if deadline is not None and now > deadline:
                return False

    def _send(self, k: int, parts, copy: bool = True, notify=None, stall_timeout_s: float | None = None,
              what: str = "") -> None:
        """Send one message on source ``k``, blocking while no receiver takes it (PUSH never
        drops). While blocked, ``notify`` hears after 5 s and then every 15 s whether the
        source's receivers went away or stopped taking frames; StallError after
        ``stall_timeout_s`` (None: wait as long as it takes)."""
        s = self._socks[k]
        t0 = next_note = None
        while True:
            try:
                s.send_multipart(parts, flags=zmq.NOBLOCK, copy=copy)
                return
            except zmq.Again:
                pass
            if t0 is None:  # blocked: from here on, watch the clock
                t0 = time.monotonic()
                next_note = t0 + 5.0
            if s.poll(250, zmq.POLLOUT):
                continue
            now = time.monotonic()
            if now < next_note and (stall_timeout_s is None or now - t0 < stall_timeout_s):
                continue
            next_note = now + 15.0
            n = self.count_receivers()[k]
            why = (f"no receiver is connected to {self.addresses[k]} any more (the processing stopped?)" if n <= 0
                   else f"the {n} receiver(s) of {self.addresses[k]} have taken nothing for {now - t0:.0f} s "
                        "(the processing is stalled or far behind)")
            if stall_timeout_s is not None and now - t0 >= stall_timeout_s:
                raise StallError(f"{why}; gave up after {stall_timeout_s:g} s{what}")
            if notify:
                limit = "" if stall_timeout_s is None else f" (giving up after {stall_timeout_s:g} s)"
                notify(f"WARNING: {why}; waiting{what}{limit}: start or restart the processing "
                       f"(stemstream process --connect {self.addresses[0]}"
                       f"{f' --sources {self.n_sources}' if self.n_sources > 1 else ''}), or Ctrl-C to abort the scan")

    def publish_scan(self, scan_id: str, sources: list[SourceFrames], metadata: dict,
                     rate: float | None = None, batch: int = 512, progress=None,
                     copies: np.ndarray | None = None, frames_sent: list[int] | None = None,
                     notify=None, stall_timeout_s: float | None = None) -> PublishStats:
        """Send start, all frames in batches, then end, on every source.

        rate: target frames/s, or None for as fast as the receivers take them.
        progress: optional callable(frames_sent, n_frames) called about 4 times a second.
        copies: optional (n_sources, n_frames) how many times to send each source's part of each
            frame (replay of a recorded scan: 0 for a part that never arrived, 2 for one that
            arrived twice; extra copies go out after the last batch). None: each part once.
        frames_sent: what each source's ``end`` announces (default: every frame of the scan).
        notify, stall_timeout_s: what to tell, and when to give up (StallError), while no
        receiver takes frames (``_send``).
        On KeyboardInterrupt or any error an ``abort`` goes out on every source, then the
        exception propagates.
        """
        if len(sources) != self.n_sources:
            raise ValueError(f"{len(sources)} prepared sources for {self.n_sources} sockets")

        def send_batch(lo, hi, stats, send):
            for k, src in enumerate(sources):
                runs = [(lo, hi)] if copies is None else _runs(copies[k, lo:hi] > 0, lo)
                for a_f, b_f in runs:
                    a, b = src.offsets[a_f], src.offsets[b_f]
                    send(k, encode_frames(scan_id, k, src.geometry, a_f,
                                          src.counts[a_f:b_f], src.indices[a:b]), copy=False)
                    stats.events += int(b - a)

        def send_copies(send):
            for k, f in zip(*np.nonzero(copies > 1)):
                src = sources[k]
                a, b = src.offsets[f], src.offsets[f + 1]
                for _ in range(int(copies[k, f]) - 1):
                    send(int(k), encode_frames(scan_id, int(k), src.geometry, int(f), src.counts[f:f + 1],
                                               src.indices[a:b]))

        return self._publish(scan_id, [src.geometry for src in sources], metadata, batch, send_batch,
                             rate, progress, send_copies if copies is not None else None, frames_sent,
                             notify, stall_timeout_s)

    def publish_dense(self, scan_id: str, geometries: list[Geometry], make_frames, metadata: dict,
                      values: str = "raw", rate: float | None = None, batch: int = 16,
                      progress=None, notify=None, stall_timeout_s: float | None = None) -> PublishStats:
        """Send start, every frame as ``dense`` messages, then end, on every source.

        geometries: one per source (its ``sector`` rows). make_frames(first, count) → (count,
        h, w) unsigned frames, called one batch ahead in a second thread (generation overlaps
        sending). Each source sends its sector rows of every batch. rate, progress, notify,
        stall_timeout_s, abort on errors: as :meth:`publish_scan`.
        """
        if len(geometries) != self.n_sources:
            raise ValueError(f"{len(geometries)} source geometries for {self.n_sources} sockets")
        n_frames = geometries[0].n_frames
        with ThreadPoolExecutor(1) as pool:
            ahead = {0: pool.submit(make_frames, 0, min(batch, n_frames))} if n_frames else {}

            def send_batch(lo, hi, stats, send):
                frames = ahead.pop(lo).result()
                if hi < n_frames:  # the next batch is made while this one goes out
                    ahead[hi] = pool.submit(make_frames, hi, min(hi + batch, n_frames) - hi)
                for k, g in enumerate(geometries):
                    part = np.ascontiguousarray(frames[:, g.sector[0]:g.sector[1]])
                    send(k, encode_dense(scan_id, k, g, lo, part, values), copy=False)

            return self._publish(scan_id, geometries, metadata, batch, send_batch, rate, progress,
                                 notify=notify, stall_timeout_s=stall_timeout_s)

    def _publish(self, scan_id, geometries, metadata, batch, send_batch, rate, progress,
                 after=None, frames_sent=None, notify=None, stall_timeout_s=None) -> PublishStats:
        """start on every source; send_batch(lo, hi, stats, send) for each batch of frames, paced
        to ``rate``; after(send); end on every source. Every message goes through ``_send``
        (notify, stall_timeout_s). On any error an abort goes out first."""
        n_frames = geometries[0].n_frames
        stats = PublishStats(scan_id)

        def send(k, parts, copy=True):
            self._send(k, parts, copy, notify, stall_timeout_s,
                       f" at {stats.frames:,}/{n_frames:,} frames of scan {scan_id}")

        t0 = time.perf_counter()
        next_report = t0 + 0.25
        try:
            for k, g in enumerate(geometries):
                send(k, encode_start(scan_id, k, g, metadata))
            for lo in range(0, n_frames, batch):
                hi = min(lo + batch, n_frames)
                send_batch(lo, hi, stats, send)
                stats.frames = hi
                now = time.perf_counter()
                if rate:
                    ahead = t0 + stats.frames / rate - now
                    if ahead > 0:
                        time.sleep(ahead)
                if progress and now >= next_report:
                    progress(hi, n_frames)
                    next_report = now + 0.25
            if after is not None:
                after(send)
            for k in range(self.n_sources):
                send(k, encode_end(scan_id, k, stats.frames if frames_sent is None else int(frames_sent[k])))
        except BaseException as e:
            stats.aborted = "interrupted by the operator (Ctrl-C)" if isinstance(e, KeyboardInterrupt) \
                else f"emulator error: {type(e).__name__}: {e}"
            self.abort(scan_id, stats.aborted)
            raise
        finally:
            stats.seconds = time.perf_counter() - t0
        if progress:
            progress(n_frames, n_frames)
        return stats

    def send(self, source: int, parts: list) -> None:
        """Send one message (a list of parts) on ``source``'s socket, as it is."""
        self._socks[source].send_multipart(parts)

    def abort(self, scan_id: str, reason: str) -> None:
        """Tell every receiver that this scan will not complete."""
        for k, s in enumerate(self._socks):
            try:
                s.send_multipart(encode_abort(scan_id, k, reason), flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # a full queue must not hide the original error
