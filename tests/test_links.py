"""Socket monitors that can never freeze their context (stream/transport/links.py).

ZeroMQ's I/O thread sends monitor events with a blocking send. Seen in CI: a DECTRIS source
closed its monitor before its socket while the DCU's end went away, and from then on no socket
of that process's context ever connected again (a receiver's whole stream stops)."""

import time

import pytest
import zmq

from stream.transport.links import LinkWatch, close_monitor, open_monitor


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def _still_connects(ctx, timeout_ms=5000) -> bool:
    """A fresh PUSH/PULL pair of ``ctx`` over TCP passes one message (the I/O thread works)."""
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    try:
        for s in (push, pull):
            s.setsockopt(zmq.LINGER, 0)
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push.setsockopt(zmq.SNDTIMEO, timeout_ms)
        push.connect(f"tcp://127.0.0.1:{port}")
        try:
            push.send(b"x")
        except zmq.Again:
            return False
        return pull.poll(timeout_ms) and pull.recv() == b"x"
    finally:
        push.close(0)
        pull.close(0)


def _retrying_socket(ctx):
    """A PULL retrying every millisecond to reach a port nobody listens on: a monitor event
    (connect delayed, connect retried) every few milliseconds."""
    dead = ctx.socket(zmq.PULL)
    dead.setsockopt(zmq.LINGER, 0)
    dead.setsockopt(zmq.RECONNECT_IVL, 1)
    dead.setsockopt(zmq.RECONNECT_IVL_MAX, 1)
    port = dead.bind_to_random_port("tcp://127.0.0.1")
    dead.unbind(f"tcp://127.0.0.1:{port}")  # a port that was just free: nobody listens there
    time.sleep(0.1)
    return dead, f"tcp://127.0.0.1:{port}"


def test_a_monitor_nobody_reads_does_not_freeze_the_context(ctx):
    """Far more events than ZeroMQ's default queue (1,000) holds, none read: the context still
    makes new connections, and every event is there when the monitor is read at last."""
    dead, address = _retrying_socket(ctx)
    watch = LinkWatch(dead)
    dead.connect(address)
    time.sleep(3)  # a retry every few milliseconds: thousands of events, none read
    assert _still_connects(ctx)
    n = _count_queued(watch.monitor)
    assert n > 1000, n  # the queue did pass ZeroMQ's default bound
    watch.close()
    dead.close(0)


def _count_queued(pair) -> int:
    n = 0
    while True:
        try:
            pair.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return n
        n += 1


def test_a_monitor_closed_then_its_peer_gone_does_not_freeze_the_context(ctx):
    """The order of libzmq #3575: the monitor closed, then the peer disconnects (an event the
    I/O thread must send). close_monitor stops monitoring first, so nothing waits for a reader
    that is gone."""
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    port = push.bind_to_random_port("tcp://127.0.0.1")
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pair = open_monitor(pull, zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED)
    pull.connect(f"tcp://127.0.0.1:{port}")
    assert pair.poll(5000)  # connected
    close_monitor(pull, pair)
    push.close(0)  # the peer goes away: disconnected, then retries, with no monitor to tell
    time.sleep(0.5)
    assert _still_connects(ctx)
    pull.close(0)
