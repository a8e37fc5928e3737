"""Which sources a receiver is connected to, from its PULL socket's ZeroMQ monitor.

ZeroMQ connects in the background and retries for ever, so a wrong port is silent by itself:
the receiver reports its links (``{"kind": "links", "connected": [...], "failed": {...}}``)
whenever they change, and the coordinator says which sources no receiver reaches
(``unreached``) and what to check.
"""

from __future__ import annotations

import itertools
import os
import time

import zmq
from zmq.utils.monitor import parse_monitor_message

_FAILED = {zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "the handshake failed",
           zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "the handshake failed (protocol error)",
           zmq.EVENT_HANDSHAKE_FAILED_AUTH: "the source refused authentication"}


_MONITORS = itertools.count()


def open_monitor(sock: zmq.Socket, events: int) -> zmq.Socket:
    """A PAIR socket that receives ``sock``'s monitor events (``zmq.EVENT_*`` flags).

    ZeroMQ's I/O thread sends each event with a blocking send, so a full monitor queue (an
    unread monitor while a peer reconnects every 100 ms for two minutes, or a stranger's
    failed handshakes) would freeze every socket of the context, and so would a monitor
    closed before monitoring stops (libzmq #3575). Here the queue has no bound (an event is
    about 50 bytes) and :func:`close_monitor` stops monitoring before it closes the PAIR.
    """
    addr = f"inproc://stemstream-monitor-{os.getpid()}-{next(_MONITORS)}"
    sock.monitor(addr, events)
    pair = sock.context.socket(zmq.PAIR)
    pair.setsockopt(zmq.RCVHWM, 0)  # before connect: the inproc pipe takes its bound then
    pair.setsockopt(zmq.LINGER, 0)
    pair.connect(addr)
    return pair


def close_monitor(sock: zmq.Socket, pair: zmq.Socket) -> None:
    """Stop monitoring ``sock``, then close its monitor ``pair`` (this order: see open_monitor)."""
    try:
        if not sock.closed:
            sock.disable_monitor()
    finally:
        pair.close(linger=0)


class LinkWatch:
    """The endpoints of ``sock`` (a connecting socket) that completed the ZeroMQ handshake and
    are still connected, the last handshake failure of each endpoint, and ``dropped``: the
    endpoints whose connection closed and that ZeroMQ has not started connecting again (after
    a protocol error, such as a part beyond MAXMSGSIZE, or a failed handshake, it never does),
    with when (monotonic s), and ``dropped_connected``: those of them whose connection had
    completed its handshake (messages may have been in flight; after a failed handshake none
    were). Call ``poll()`` from the socket's thread; it returns True when the links changed.
    (One monitor per socket: ZeroMQ keeps only the last one.)"""

    def __init__(self, sock: zmq.Socket):
        events = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED
                  | zmq.EVENT_CONNECT_DELAYED)
        for e in _FAILED:
            events |= e
        self._sock = sock
        self.monitor = open_monitor(sock, events)
        self.connected: set[str] = set()
        self.failed: dict[str, str] = {}
        self.dropped: dict[str, float] = {}
        self.dropped_connected: set[str] = set()

    def poll(self) -> bool:
        changed = False
        while True:
            try:
                msg = parse_monitor_message(self.monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return changed
            ep = msg["endpoint"].decode() if isinstance(msg["endpoint"], bytes) else str(msg["endpoint"])
            event = msg["event"]
            if event == zmq.EVENT_DISCONNECTED:
                self.dropped[ep] = time.monotonic()
                if ep in self.connected:
                    self.dropped_connected.add(ep)
            elif event in (zmq.EVENT_CONNECT_RETRIED, zmq.EVENT_CONNECT_DELAYED, zmq.EVENT_HANDSHAKE_SUCCEEDED):
                self.dropped.pop(ep, None)
                self.dropped_connected.discard(ep)
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                changed |= ep not in self.connected or ep in self.failed
                self.connected.add(ep)
                self.failed.pop(ep, None)
            elif event == zmq.EVENT_DISCONNECTED:
                changed |= ep in self.connected
                self.connected.discard(ep)
            elif event in _FAILED:
                changed |= self.failed.get(ep) != _FAILED[event]
                self.failed[ep] = _FAILED[event]

    def report(self) -> dict:
        return {"kind": "links", "connected": sorted(self.connected), "failed": dict(self.failed)}

    def close(self) -> None:
        close_monitor(self._sock, self.monitor)


def unreached(addresses: list[str], links: dict[str, dict]) -> dict[str, str]:
    """The addresses no receiver is connected to, each with what is known of why: ``links``
    is each worker's last links report."""
    out = {}
    for a in addresses:
        if any(a in r.get("connected", ()) for r in links.values()):
            continue
        why = {r.get("failed", {}).get(a) for r in links.values()} - {None}
        out[a] = min(why) if why else "nothing accepts the connection there"
    return out
