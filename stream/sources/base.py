"""What every detector source has in common: the interface a receiver drives, the plan the
session hands to the workers, dense counts turned into events, and the detector errors.

A source runs inside a receiver (a thread of a dask worker). The receiver calls
``open`` once in its own thread, then ``receive`` in its loop, and gets decoded protocol
:class:`~stream.transport.protocol.Message` objects (``start``, ``frames``, ``end``,
``abort``) exactly as if they had come over ``stemstream/1``: everything after the chunk is
unchanged, whatever the detector.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import datetime
from urllib.parse import urlsplit

import numpy as np

from stream.security import KeyPair
from stream.transport.protocol import Geometry, Message

KINDS = ("stemstream", "dectris", "merlin")
# Receiver-level reject reasons of the detector sources (docs/PROTOCOL.md lists them)
STALE = "stale_series"  # a message of a series other than the one we armed
UNDECODABLE = "undecodable"  # an image or frame the source could not decode


class DetectorError(RuntimeError):
    """A detector that did not do what we asked (no answer, refused a setting, sent nothing):
    one line naming the address and the fix."""


class DetectorRefused(DetectorError):
    """The detector answered, and said no (busy, a value it does not take)."""


@dataclass
class SourcePlan:
    """What every worker needs to run a detector source: the settings of ``[detector]``
    (plain values: this room does not import the configuration) and what the session
    decided at start (scan id prefix; for Merlin the worker that holds the connection and
    the address it forwards frames on)."""

    kind: str
    scan_shape: tuple[int, int] | None
    data: str  # where the frames come from: tcp://HOST:PORT
    dcu: str | None = None  # DECTRIS REST base URL
    control: str | None = None  # Merlin control port
    mode: str = "passive"
    prefix: str = ""
    leader: str | None = None  # Merlin: the worker address that connects to the data port
    forward: str | None = None  # Merlin: the leader's PUSH address every worker pulls from
    n_workers: int = 1  # Merlin: workers that pull from it (the leader waits for them, a while)
    gap_timeout_s: float = 2.0
    calibration: dict = field(default_factory=dict)  # mrad_per_px, convergence_mrad, center
    max_message_bytes: int = 0  # [limits] max_message_mb: a detector message or frame at most; 0 = no bound
    # Merlin's forwarding channel, made for this session (None: plain, [security] curve = false):
    # the leader binds with forward_server and lets in only forward_client, which every worker has
    forward_server: KeyPair | None = field(default=None, repr=False)
    forward_client: KeyPair | None = field(default=None, repr=False)

    def geometry(self, frame_shape: tuple[int, int], scan_shape=None) -> Geometry:
        """The protocol geometry of one scan of this detector (one source, no flyback)."""
        c = self.calibration
        return Geometry(tuple(scan_shape or self.scan_shape), tuple(frame_shape),
                        mrad_per_px=c.get("mrad_per_px"), convergence_mrad=c.get("convergence_mrad"),
                        center=tuple(c["center"]) if c.get("center") else None)


def budget_error(what: str, nbytes: int, plan: SourcePlan) -> str | None:
    """Why ``nbytes`` of ``what`` are refused under the plan's per-message budget, or None."""
    if plan.max_message_bytes and nbytes > plan.max_message_bytes:
        return (f"{what} of {nbytes:,} bytes is beyond the per-message budget of "
                f"{plan.max_message_bytes:,} bytes ([limits] max_message_mb); raise it if the detector "
                "really sends frames this large")
    return None


def new_prefix() -> str:
    """Scan ids of one session: date-time and a random tag, so two sessions never collide."""
    return f"{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def tcp_address(addr: str, what: str, default_port: int | None = None) -> tuple[str, int]:
    """(host, port) of ``tcp://HOST:PORT``, or ValueError naming ``what`` and the form."""
    parts = urlsplit(addr if "://" in addr else f"tcp://{addr}")
    try:
        port = parts.port or default_port
    except ValueError:
        port = None
    if parts.scheme != "tcp" or not parts.hostname or port is None:
        raise ValueError(f"{what} {addr!r} must look like tcp://HOST:PORT")
    return parts.hostname, port


class Source:
    """Interface of a detector source, driven by one receiver thread.

    open(ctx, reject, notice): connect (in the receiver's thread: ZeroMQ sockets belong to one
        thread). ``reject(reason, detail, scan_id)`` counts a refused message as the receiver
        does; ``notice(text)`` sends one line to the session's console.
    receive(timeout_ms): the messages that arrived, decoded; waits at most ``timeout_ms``.
    scan_closed(scan_id): the session closed this scan (called from another thread).
    command(name, *args): a control request from the session (called from another thread).
    close(): stop and release everything.
    """

    def open(self, ctx, reject, notice) -> None:
        raise NotImplementedError

    def receive(self, timeout_ms: int) -> list[Message]:
        raise NotImplementedError

    def scan_closed(self, scan_id: str) -> None:
        pass

    def command(self, name: str, *args):
        raise ValueError(f"{type(self).__name__} takes no command {name!r}")

    def close(self) -> None:
        pass


# ------------------------------------------------------------------ messages the sources build

def start_message(scan_id: str, geometry: Geometry, metadata: dict) -> Message:
    return Message("start", scan_id, 0, {}, geometry=geometry, metadata=metadata)


def dense_message(scan_id: str, geometry: Geometry, first: int, frames: np.ndarray) -> Message:
    """Frames first … first+len(frames)−1 of electron counts, (n, h, w) unsigned, as a
    decoded ``dense`` message with values "counts" (no encoding: it never leaves this
    process; the receiver turns each count k into k events)."""
    return Message("dense", scan_id, 0, {"first": int(first), "count": len(frames),
                                         "dtype": f"<u{frames.dtype.itemsize}", "values": "counts"},
                   geometry=geometry, dense=frames)


def end_message(scan_id: str, frames_sent: int) -> Message:
    return Message("end", scan_id, 0, {"frames_sent": int(frames_sent)})


def abort_message(scan_id: str, reason: str) -> Message:
    return Message("abort", scan_id, 0, {"reason": reason})
