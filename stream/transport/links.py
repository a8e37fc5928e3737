"""Which sources a receiver is connected to, from its PULL socket's ZeroMQ monitor.

ZeroMQ connects in the background and retries for ever, so a wrong port is silent by itself:
the receiver reports its links (``{"kind": "links", "connected": [...], "failed": {...}}``)
whenever they change, and the coordinator says which sources no receiver reaches
(``unreached``) and what to check.
"""

from __future__ import annotations

import time

import zmq
from zmq.utils.monitor import parse_monitor_message

_FAILED = {zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "the handshake failed",
           zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "the handshake failed (protocol error)",
           zmq.EVENT_HANDSHAKE_FAILED_AUTH: "the source refused authentication"}


class LinkWatch:
    """The endpoints of ``sock`` (a connecting socket) that completed the ZeroMQ handshake and
    are still connected, the last handshake failure of each endpoint, and ``dropped``: the
    endpoints whose connection closed and that ZeroMQ has not started connecting again (after
    a protocol error, such as a part beyond MAXMSGSIZE, it never does), with when (monotonic
    s). Call ``poll()`` from the socket's thread; it returns True when the links changed.
    (One monitor per socket: ZeroMQ keeps only the last one.)"""

    def __init__(self, sock: zmq.Socket):
        events = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED
                  | zmq.EVENT_CONNECT_DELAYED)
        for e in _FAILED:
            events |= e
        self._sock = sock
        self.monitor = sock.get_monitor_socket(events)
        self.connected: set[str] = set()
        self.failed: dict[str, str] = {}
        self.dropped: dict[str, float] = {}

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
            elif event in (zmq.EVENT_CONNECT_RETRIED, zmq.EVENT_CONNECT_DELAYED, zmq.EVENT_HANDSHAKE_SUCCEEDED):
                self.dropped.pop(ep, None)
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
        try:
            self._sock.disable_monitor()
        finally:
            self.monitor.close(linger=0)


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
