"""Wire protocol ``stemstream/1``: message definitions, encoding and validated decoding.

Used by both ends: the detector emulator encodes, the receivers decode. See
``docs/PROTOCOL.md`` for the normative description. Every message is a ZeroMQ multipart
message whose part 0 is a msgpack map; ``frames`` messages carry two more parts, the events
per frame and the flat detector pixel indices, both little-endian uint32, sent and decoded
without copies; ``dense`` messages carry one more, frames as pixel arrays (raw detector signal
or electron counts per pixel), also without copies.

Decoding never trusts the sender: anything malformed raises :class:`ProtocolError` with a
short machine-readable ``reason`` (used to count rejects) and a human-readable detail.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import msgpack
import numpy as np
from numba import njit

PROTO = "stemstream/1"
KINDS = ("start", "frames", "end", "abort", "dense")
EVENT_DTYPE = np.dtype("<u4")
SCAN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Sanity bounds: beyond them a geometry is a corrupt header, not an instrument. What a scan
# within them may cost is the receivers' per-scan budget ([limits] scan_state_mb).
MAX_FRAMES = 2**28  # frames per scan, flyback included (16384 x 16384 positions, 1 frame each)
MAX_PIXELS = 2**26  # detector pixels (8192 x 8192; a K3 is 5760 x 4092)
MAX_SIDE = 2**16  # rows or columns of the scan or the detector
MAX_SOURCES = 256
# dense frames: little-endian unsigned pixel types, and what the values mean
DENSE_DTYPES = ("<u1", "<u2", "<u4")
DENSE_VALUES = ("raw", "counts")  # raw detector signal (to be counted) | electrons per pixel
MAX_DENSE_EVENTS = 2**26  # electrons one 'counts' message may expand to (256 MB of events)

# Reasons a message is rejected; receivers count rejects by these keys.
REJECT_REASONS = {
    "not_msgpack": "part 0 is not a msgpack map",
    "bad_version": "unknown protocol version",
    "unknown_kind": "unknown message kind",
    "bad_header": "header field missing or of the wrong type",
    "wrong_parts": "wrong number of message parts for this kind",
    "missing_geometry": "frames message without scan geometry",
    "bad_geometry": "scan geometry is inconsistent",
    "count_mismatch": "events-per-frame part does not match 'count'",
    "event_mismatch": "events part does not match 'events' or the per-frame counts",
    "index_out_of_range": "pixel index outside the detector or the source's sector",
    "frame_out_of_range": "frame numbers outside the scan",
    "dense_truncated": "dense part holds fewer bytes than count x sector rows x width values",
    "dense_mismatch": "dense part holds more bytes than count x sector rows x width values",
    "bad_dtype": "dense dtype is not one of <u1, <u2, <u4",
    "bad_values": "dense values is not 'raw' or 'counts'",
    "too_many_events": "a 'counts' message holds more electrons than one message may carry",
}


class ProtocolError(ValueError):
    """A message that violates the protocol. ``reason`` is one of :data:`REJECT_REASONS`;
    ``scan_id`` is set when the header was readable enough to name the scan."""

    def __init__(self, reason: str, detail: str, scan_id: str | None = None):
        assert reason in REJECT_REASONS, reason
        super().__init__(f"{REJECT_REASONS[reason]}: {detail}")
        self.reason = reason
        self.detail = detail
        self.scan_id = scan_id


@dataclass(frozen=True)
class Geometry:
    """Scan and detector geometry, as carried by ``start`` and every ``frames`` message.

    scan_shape: (ny, nx) probe positions of the image (flyback columns excluded).
    frame_shape: (h, w) detector pixels.
    frames_per_position: detector frames recorded at each probe position.
    n_sources: number of sources (detector sectors) the frames are split over.
    sector: (row0, row1) detector rows this source covers, row1 exclusive.
    flyback: extra raster columns per scan row that the detector records during flyback;
        their frames are counted for completeness but belong to no position.
    mrad_per_px, convergence_mrad, center: optional detector calibration (scattering angle
        per pixel, beam convergence semi-angle, unscattered-beam centre (y, x) in px). They
        travel with every message so that a receiver can build angle-based virtual detectors
        for a scan whose ``start`` it never saw.
    """

    scan_shape: tuple[int, int]
    frame_shape: tuple[int, int]
    frames_per_position: int = 1
    n_sources: int = 1
    sector: tuple[int, int] | None = None
    flyback: int = 0
    mrad_per_px: float | None = None
    convergence_mrad: float | None = None
    center: tuple[float, float] | None = None

    def __post_init__(self):
        if self.sector is None:
            object.__setattr__(self, "sector", (0, self.frame_shape[0]))
        problems = []
        if len(self.scan_shape) != 2 or not 1 <= min(self.scan_shape) <= max(self.scan_shape) <= MAX_SIDE:
            problems.append(f"scan_shape {self.scan_shape} must be two integers 1..{MAX_SIDE}")
        if len(self.frame_shape) != 2 or not 1 <= min(self.frame_shape) <= max(self.frame_shape) <= MAX_SIDE:
            problems.append(f"frame_shape {self.frame_shape} must be two integers 1..{MAX_SIDE}")
        elif self.frame_shape[0] * self.frame_shape[1] > MAX_PIXELS:
            problems.append(f"frame_shape {self.frame_shape} has more than {MAX_PIXELS} pixels")
        if not 1 <= self.frames_per_position <= MAX_FRAMES:
            problems.append(f"frames_per_position {self.frames_per_position} must be 1..{MAX_FRAMES}")
        if not 1 <= self.n_sources <= MAX_SOURCES:
            problems.append(f"n_sources {self.n_sources} must be 1..{MAX_SOURCES}")
        if not 0 <= self.flyback <= MAX_SIDE:
            problems.append(f"flyback {self.flyback} must be 0..{MAX_SIDE}")
        # (math, not numpy: every frames message builds a Geometry, at thousands per second)
        for name in ("mrad_per_px", "convergence_mrad"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                problems.append(f"{name} {v} must be a positive number")
        if self.center is not None and (len(self.center) != 2 or
                                        not all(math.isfinite(c) for c in self.center)):
            problems.append(f"center {self.center} must be two finite numbers (y, x) in px")
        if not problems and self.n_frames > MAX_FRAMES:
            problems.append(f"{self.n_frames} frames per scan is beyond {MAX_FRAMES}")
        r0, r1 = self.sector
        if not (0 <= r0 < r1 <= self.frame_shape[0]):
            problems.append(f"sector rows {self.sector} must satisfy 0 <= row0 < row1 <= {self.frame_shape[0]}")
        if problems:
            raise ProtocolError("bad_geometry", "; ".join(problems))

    @property
    def raster_shape(self) -> tuple[int, int]:
        """(ny, nx + flyback): the positions the probe visits, flyback included."""
        return (self.scan_shape[0], self.scan_shape[1] + self.flyback)

    @property
    def n_frames(self) -> int:
        """Frames the detector records for one scan, flyback frames included."""
        ny, nxr = self.raster_shape
        return ny * nxr * self.frames_per_position

    @property
    def n_positions(self) -> int:
        return self.scan_shape[0] * self.scan_shape[1]

    @property
    def n_pixels(self) -> int:
        return self.frame_shape[0] * self.frame_shape[1]

    def same_scan(self, other: "Geometry") -> bool:
        """True when both describe the same scan (the sector may differ between sources)."""
        # field by field: building two geometries per message (for_sector) cost more than
        # decoding the message
        return all(getattr(self, f) == getattr(other, f) for f in _SCAN_FIELDS)

    def for_sector(self, sector: tuple[int, int] | None) -> "Geometry":
        """The same geometry for another source's sector (None: the whole detector)."""
        return replace(self, sector=sector)

    def to_wire(self) -> dict:
        wire = {"scan_shape": list(self.scan_shape), "frame_shape": list(self.frame_shape),
                "frames_per_position": self.frames_per_position, "n_sources": self.n_sources,
                "sector": list(self.sector), "flyback": self.flyback}
        for name in ("mrad_per_px", "convergence_mrad"):
            if getattr(self, name) is not None:
                wire[name] = float(getattr(self, name))
        if self.center is not None:
            wire["center"] = [float(c) for c in self.center]
        return wire

    @classmethod
    def from_wire(cls, h: dict) -> "Geometry":
        if "scan_shape" not in h or "frame_shape" not in h:
            raise ProtocolError("missing_geometry", "needs 'scan_shape' and 'frame_shape'")
        try:
            return cls(scan_shape=_int_pair(h["scan_shape"]),
                       frame_shape=_int_pair(h["frame_shape"]),
                       frames_per_position=_int(h.get("frames_per_position", 1)),
                       n_sources=_int(h.get("n_sources", 1)),
                       sector=_int_pair(h["sector"]) if h.get("sector") is not None else None,
                       flyback=_int(h.get("flyback", 0)),
                       mrad_per_px=_opt_float(h.get("mrad_per_px")),
                       convergence_mrad=_opt_float(h.get("convergence_mrad")),
                       center=_float_pair(h["center"]) if h.get("center") is not None else None)
        except (TypeError, ValueError) as e:
            if isinstance(e, ProtocolError):
                raise
            raise ProtocolError("bad_geometry", str(e)) from None


_SCAN_FIELDS = tuple(f for f in Geometry.__dataclass_fields__ if f != "sector")


def frame_positions(frames: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Flat scan index (row·nx + column) of each frame number; -1 for flyback frames."""
    ny, nxr = geometry.raster_shape
    nx = geometry.scan_shape[1]
    raster = np.asarray(frames, dtype=np.int64) // geometry.frames_per_position
    row, col = np.divmod(raster, nxr)
    return np.where(col < nx, row * nx + col, -1)


@dataclass
class Message:
    """A decoded message. ``counts`` and ``indices`` are set for ``frames`` only, ``dense``
    (count, sector rows, w) for ``dense`` only; all are read-only views of the received
    buffers (no copy)."""

    kind: str
    scan_id: str
    source: int
    header: dict
    geometry: Geometry | None = None
    counts: np.ndarray | None = None
    indices: np.ndarray | None = None
    metadata: dict = field(default_factory=dict)
    dense: np.ndarray | None = None
    # a detector source's ``frames`` message whose frames are not first .. first+count−1 (a
    # DCU hands its images to the workers in turn): their frame numbers, int64; never on the wire
    frame_ids: np.ndarray | None = None

    @property
    def first(self) -> int:
        return self.header["first"]

    @property
    def count(self) -> int:
        return self.header["count"]

    def frame_numbers(self) -> np.ndarray:
        """The frame number of each frame of a ``frames`` or ``dense`` message, int64."""
        if self.frame_ids is not None:
            return self.frame_ids
        return np.arange(self.first, self.first + self.count, dtype=np.int64)

    def ranges(self) -> list[list[int]]:
        """[source, first, count] of each run of consecutive frame numbers."""
        if self.frame_ids is None:
            return [[self.source, self.first, self.count]]
        ids = self.frame_ids
        cuts = np.flatnonzero(np.diff(ids) != 1) + 1
        starts, stops = np.r_[0, cuts], np.r_[cuts, len(ids)]
        return [[self.source, int(ids[a]), int(b - a)] for a, b in zip(starts.tolist(), stops.tolist())]


# ---------------------------------------------------------------- encoding

def _header(kind: str, scan_id: str, source: int, **fields) -> bytes:
    if not SCAN_ID_PATTERN.match(scan_id):
        raise ValueError(f"scan_id {scan_id!r} must be 1-128 characters of A-Z a-z 0-9 . _ - "
                         "starting with a letter or digit")
    return msgpack.packb({"proto": PROTO, "kind": kind, "scan_id": scan_id,
                          "source": int(source), **fields}, use_bin_type=True)


def encode_start(scan_id: str, source: int, geometry: Geometry, metadata: dict) -> list:
    """``start``: geometry and free-form metadata (beam energy, calibration, tilt, ...)."""
    return [_header("start", scan_id, source, **geometry.to_wire(), metadata=metadata)]


def encode_frames(scan_id: str, source: int, geometry: Geometry, first: int,
                  counts: np.ndarray, indices: np.ndarray) -> list:
    """``frames``: frames ``first .. first+len(counts)-1`` of this source.

    counts: (n,) uint32 events per frame. indices: (sum(counts),) uint32 flat detector pixel
    index y·w + x in full-detector coordinates. Both are sent without a copy; keep them
    unchanged until the message has left.
    """
    counts = np.ascontiguousarray(counts, dtype=EVENT_DTYPE)
    indices = np.ascontiguousarray(indices, dtype=EVENT_DTYPE)
    header = _header("frames", scan_id, source, first=int(first), count=len(counts),
                     events=len(indices), **geometry.to_wire())
    return [header, counts, indices]


def encode_dense(scan_id: str, source: int, geometry: Geometry, first: int, frames: np.ndarray,
                 values: str) -> list:
    """``dense``: frames ``first .. first+len(frames)-1`` of this source as pixel arrays.

    frames: (n, row1 - row0, w) of this source's sector rows, unsigned 8, 16 or 32 bit;
    sent without a copy when C-contiguous and little-endian (keep it unchanged until the
    message has left). values: ``"raw"`` (detector signal, counted by the receivers) or
    ``"counts"`` (electrons per pixel).
    """
    frames = np.asarray(frames)
    if frames.dtype.kind != "u" or frames.dtype.itemsize not in (1, 2, 4):
        raise ValueError(f"dense frames must be unsigned 8, 16 or 32 bit integers, got {frames.dtype}")
    if values not in DENSE_VALUES:
        raise ValueError(f"values {values!r} must be one of {', '.join(DENSE_VALUES)}")
    r0, r1 = geometry.sector
    if frames.ndim != 3 or frames.shape[1:] != (r1 - r0, geometry.frame_shape[1]):
        raise ValueError(f"dense frames of shape {frames.shape} do not match sector rows {r0}..{r1 - 1} "
                         f"of a {geometry.frame_shape[0]}x{geometry.frame_shape[1]} detector "
                         f"(expected (n, {r1 - r0}, {geometry.frame_shape[1]}))")
    frames = np.ascontiguousarray(frames, dtype=frames.dtype.newbyteorder("<"))
    header = _header("dense", scan_id, source, first=int(first), count=len(frames),
                     dtype=f"<u{frames.dtype.itemsize}", values=values, **geometry.to_wire())
    return [header, frames]


def encode_end(scan_id: str, source: int, frames_sent: int) -> list:
    """``end``: ``frames_sent`` distinct frames of the scan this source sent (a frame sent
    again counts once)."""
    return [_header("end", scan_id, source, frames_sent=int(frames_sent))]


def encode_abort(scan_id: str, source: int, reason: str) -> list:
    return [_header("abort", scan_id, source, reason=str(reason))]


# ---------------------------------------------------------------- decoding

def _int(v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ProtocolError("bad_header", f"expected an integer, got {v!r}")
    return int(v)


def _opt_float(v) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ProtocolError("bad_header", f"expected a number, got {v!r}")
    return float(v)


def _float_pair(v) -> tuple[float, float]:
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise ProtocolError("bad_header", f"expected two numbers, got {v!r}")
    return (_opt_float(v[0]), _opt_float(v[1]))


def _int_pair(v) -> tuple[int, int]:
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise ProtocolError("bad_header", f"expected two integers, got {v!r}")
    return (_int(v[0]), _int(v[1]))


def _buffer(part) -> memoryview:
    """The bytes of a message part: zmq.Frame (zero-copy), bytes or any buffer."""
    buf = getattr(part, "buffer", part)
    return memoryview(buf)


def decode(parts: Sequence[Any], check_events: bool = True) -> Message:
    """Decode and validate one multipart message.

    parts: the list from ``socket.recv_multipart(copy=False)`` (zmq.Frame) or of bytes.
    check_events: verify that every pixel index lies on the detector and in the source's
    sector (one pass over the indices; keep it on for anything that is not trusted).
    Raises ProtocolError naming what is wrong.
    """
    if len(parts) == 0:
        raise ProtocolError("wrong_parts", "empty message")
    try:
        h = msgpack.unpackb(_buffer(parts[0]), raw=False)
    except Exception as e:  # msgpack raises several unrelated types
        raise ProtocolError("not_msgpack", f"{type(e).__name__}: {e}") from None
    if not isinstance(h, dict):
        raise ProtocolError("not_msgpack", f"part 0 decodes to {type(h).__name__}, not a map")
    scan_id = h.get("scan_id")
    named = scan_id if isinstance(scan_id, str) and SCAN_ID_PATTERN.match(scan_id) else None
    if h.get("proto") != PROTO:  # a reject whose header names a scan counts in that scan's file
        raise ProtocolError("bad_version", f"proto {h.get('proto')!r}, this receiver speaks {PROTO!r}", named)
    kind = h.get("kind")
    if kind not in KINDS:
        raise ProtocolError("unknown_kind", f"kind {kind!r}, expected one of {', '.join(KINDS)}", named)
    if named is None:
        raise ProtocolError("bad_header", f"scan_id {scan_id!r} is not a valid scan id")
    try:
        source = _int(h.get("source"))
        return _decode_kind(Message(kind, scan_id, source, h), parts, check_events)
    except ProtocolError as e:
        e.scan_id = scan_id
        raise


def _decode_kind(msg: Message, parts, check_events: bool) -> Message:
    h, kind, source = msg.header, msg.kind, msg.source
    expected_parts = {"frames": 3, "dense": 2}.get(kind, 1)
    if len(parts) != expected_parts:
        raise ProtocolError("wrong_parts", f"{kind} message has {len(parts)} parts, expects {expected_parts}")
    if kind == "start":
        msg.geometry = Geometry.from_wire(h)
        md = h.get("metadata", {})
        if not isinstance(md, dict):
            raise ProtocolError("bad_header", "metadata must be a map")
        msg.metadata = md
    elif kind == "end":
        h["frames_sent"] = _int(h.get("frames_sent"))
        if h["frames_sent"] < 0:
            raise ProtocolError("bad_header", f"frames_sent {h['frames_sent']} must be >= 0")
    elif kind == "abort":
        if not isinstance(h.get("reason", ""), str):
            raise ProtocolError("bad_header", "abort reason must be a string")
    elif kind == "dense":
        _decode_dense(msg, parts)
    else:
        _decode_frames(msg, parts, check_events)
    if not (0 <= source < (msg.geometry.n_sources if msg.geometry else MAX_SOURCES)):
        raise ProtocolError("bad_header", f"source {source} outside 0..n_sources-1")
    return msg


_GEOMETRY_FIELDS = tuple(Geometry.__dataclass_fields__)
_geometries: dict[str, Geometry] = {}


def _geometry_of(h: dict) -> Geometry:
    """Geometry.from_wire(h), remembered: every frames message of a source carries the same
    geometry, and validating it again costs more than the rest of the message's header. The
    key is the fields' repr, so values that compare equal but are not (True and 1, 1.0 and 1)
    stay apart; a geometry that does not validate raises and is not remembered."""
    key = repr([h.get(k) for k in _GEOMETRY_FIELDS])
    g = _geometries.get(key)
    if g is None:
        g = Geometry.from_wire(h)
        if len(_geometries) >= 256:
            _geometries.clear()
        _geometries[key] = g
    return g


@njit(cache=True, nogil=True)
def _sum_min_max(counts, indices):
    """(sum of counts, smallest index, largest index) in one call: three numpy reductions
    cost more than the message's pass over its events (0, 0 for no events)."""
    total = np.uint64(0)
    for k in range(np.uint64(counts.shape[0])):  # (unsigned: contiguous vector loads)
        total += counts[k]
    lo = indices[0] if indices.shape[0] else np.uint32(0)
    hi = lo
    for k in range(np.uint64(indices.shape[0])):
        lo = min(lo, indices[k])
        hi = max(hi, indices[k])
    return total, lo, hi


def _decode_frames(msg: Message, parts, check_events: bool) -> None:
    h = msg.header
    g = _geometry_of(h)
    first, count, events = _int(h.get("first")), _int(h.get("count")), _int(h.get("events"))
    if first < 0 or count < 0 or first + count > g.n_frames:
        raise ProtocolError("frame_out_of_range",
                            f"frames {first}..{first + count - 1} but the scan has {g.n_frames}")
    cbuf, ibuf = _buffer(parts[1]), _buffer(parts[2])
    if cbuf.nbytes != 4 * count:
        raise ProtocolError("count_mismatch", f"count={count} needs {4 * count} bytes, got {cbuf.nbytes}")
    if ibuf.nbytes != 4 * events:
        raise ProtocolError("event_mismatch", f"events={events} needs {4 * events} bytes, got {ibuf.nbytes}")
    counts = np.frombuffer(cbuf, dtype=EVENT_DTYPE)
    indices = np.frombuffer(ibuf, dtype=EVENT_DTYPE)
    counts.flags.writeable = indices.flags.writeable = False  # views of the received buffers
    total, imin, imax = _sum_min_max(counts, indices)
    if total != events:
        raise ProtocolError("event_mismatch", f"per-frame counts sum to {total}, header says events={events}")
    if check_events and events:
        lo, hi = g.sector[0] * g.frame_shape[1], g.sector[1] * g.frame_shape[1]
        imin, imax = int(imin), int(imax)
        if imin < lo or imax >= hi:
            bad = imax if imax >= hi else imin
            raise ProtocolError("index_out_of_range",
                                f"pixel index {bad} outside rows {g.sector[0]}..{g.sector[1] - 1} "
                                f"of a {g.frame_shape[0]}x{g.frame_shape[1]} detector")
    msg.geometry, msg.counts, msg.indices = g, counts, indices


def _decode_dense(msg: Message, parts) -> None:
    h = msg.header
    g = Geometry.from_wire(h)
    first, count = _int(h.get("first")), _int(h.get("count"))
    if first < 0 or count < 0 or first + count > g.n_frames:
        raise ProtocolError("frame_out_of_range",
                            f"frames {first}..{first + count - 1} but the scan has {g.n_frames}")
    dtype, values = h.get("dtype"), h.get("values")
    if dtype not in DENSE_DTYPES:
        raise ProtocolError("bad_dtype", f"dtype {dtype!r}, expected one of {', '.join(DENSE_DTYPES)}")
    if values not in DENSE_VALUES:
        raise ProtocolError("bad_values", f"values {values!r}, expected one of {', '.join(DENSE_VALUES)}")
    rows, w = g.sector[1] - g.sector[0], g.frame_shape[1]
    itemsize = int(dtype[2])
    need = count * rows * w * itemsize
    buf = _buffer(parts[1])
    if buf.nbytes != need:
        reason = "dense_truncated" if buf.nbytes < need else "dense_mismatch"
        raise ProtocolError(reason, f"count={count} frames of rows {g.sector[0]}..{g.sector[1] - 1} x {w} "
                                    f"px as {dtype} need {need} bytes, got {buf.nbytes}")
    dense = np.frombuffer(buf, dtype=np.dtype(dtype)).reshape(count, rows, w)
    dense.flags.writeable = False  # a view of the received buffer
    msg.geometry, msg.dense = g, dense
