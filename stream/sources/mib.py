"""Quantum Detectors Merlin: the MIB format (acquisition header, MQ1 frame headers, pixel
payloads) and the MPX framing of its TCP ports. Encoding and decoding, numpy and numba only.

Layouts (cross-checked against LiberTEM's MIB reader and RosettaSciIO in
``tests/test_sources_mib.py``; docs/MERLIN.md):

* On the data port every message is ``b"MPX," + b"%010d" % (len(body) + 1) + b"," + body``.
  The first message of an acquisition is the acquisition header (``HDR,`` text, the ``.hdr``
  file), then one message per frame: an ASCII ``MQ1`` header NUL-padded to its stated size
  (384 bytes for one chip, 768 for four), then the pixels.
* ``U08`` / ``U16`` / ``U32`` payloads: big-endian unsigned integers, row-major, assembled.
* ``R64`` ("raw") payloads: 64-bit big-endian words of 64/s pixels each (s = 1, 8, 16 stored
  bits for 1-, 6-, 12-bit counters), the group's first pixel in the least significant bits;
  24 bit is two 12-bit frames, high bits first, and the header states double width. Raw quad
  (2x2): each of the 256 stream rows is one row of every chip, [Q4 | Q3 | Q2 | Q1]; Q1 and Q2
  are the top half as is, Q3 and Q4 the bottom half rotated by 180°.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass

import numpy as np
from numba import njit

MPX_PREFIX_LEN = 15  # b"MPX," + 10 digits + b","
COUNTER_DEPTHS = (1, 6, 12, 24)
NONRAW_CODE = {1: "U08", 6: "U08", 12: "U16", 24: "U32"}
WIRE_DTYPE = {"U08": np.dtype("u1"), "U16": np.dtype(">u2"), "U32": np.dtype(">u4")}
# dense values as stemstream carries them: little-endian, the smallest type that holds the counter
VALUE_DTYPE = {1: np.dtype("<u1"), 6: np.dtype("<u1"), 12: np.dtype("<u2"), 24: np.dtype("<u4")}
STORED_BITS = {1: 1, 6: 8, 12: 16, 24: 32}


class MibError(ValueError):
    """Bytes that are not what the MIB format says; the message names what is wrong."""


def mpx_prefix(body_len: int) -> bytes:
    """The MPX framing of a message body (the length counts the comma before the body)."""
    return b"MPX,%010d," % (body_len + 1)


def parse_mpx_prefix(prefix: bytes) -> int:
    """Body length from a 15-byte MPX prefix; MibError if it is not one."""
    if len(prefix) != MPX_PREFIX_LEN or prefix[:4] != b"MPX," or prefix[14:15] != b"," \
            or not prefix[4:14].isdigit():
        raise MibError(f"not an MPX message prefix: {bytes(prefix)!r} (lost sync with the stream?)")
    return int(prefix[4:14]) - 1


# ------------------------------------------------------------------ acquisition header

@dataclass
class AcquisitionHeader:
    """The ``HDR`` text Merlin sends first (also the ``.hdr`` file): ``fields`` maps each
    ``key:`` to its value as text."""

    fields: dict

    def _int(self, key: str) -> int:
        try:
            return int(self.fields[key])
        except (KeyError, ValueError):
            raise MibError(f"acquisition header: {key!r} missing or not a number") from None

    @property
    def n_frames(self) -> int:
        return self._int("Frames in Acquisition (Number)")

    @property
    def frames_per_trigger(self) -> int:
        return self._int("Frames per Trigger (Number)")

    @property
    def counter_depth(self) -> int:
        return self._int("Counter Depth (number)")

    @property
    def scan_shape(self) -> tuple[int, int] | None:
        """(ny, nx) from ScanY/ScanX (newer Merlin software), else None."""
        if "ScanX" in self.fields and "ScanY" in self.fields:
            return (self._int("ScanY"), self._int("ScanX"))
        return None

    @classmethod
    def parse(cls, raw: bytes) -> "AcquisitionHeader":
        text = bytes(raw).decode("latin1")
        if not text.startswith("HDR,"):
            raise MibError(f"not an acquisition header: starts with {text[:16]!r}")
        fields = {}
        for line in text.split("\n")[1:]:
            if line.strip().startswith("End"):
                break
            sep = "\t" if "\t" in line else ":"
            if sep in line:
                key, value = line.split(sep, 1)
                fields[key.strip().rstrip(":").strip()] = value.strip()
        return cls(fields)


def acquisition_header(n_frames: int, frames_per_trigger: int, bits: int, quad: bool = False,
                       scan_shape: tuple[int, int] | None = None, pad_to: int = 0) -> bytes:
    """An acquisition header (latin-1 bytes) as Merlin writes it; ``scan_shape`` (ny, nx)
    adds ScanX/ScanY as newer software does."""
    lines = [
        ("Time and Date Stamp (day, mnth, yr, hr, min, s)", "01/01/2024 12:00:00"),
        ("Chip ID", "W000_A1,W000_A2,W000_A3,W000_A4" if quad else "W000_A1,-,-,-"),
        ("Chip Type (Medipix 3.0, Medipix 3.1, Medipix 3RX)", "Medipix 3RX"),
        ("Assembly Size (NX1, 2X2)", "   2x2" if quad else "   1x1"),
        ("Chip Mode  (SPM, CSM, CM, CSCM)", "SPM"),
        ("Counter Depth (number)", str(bits)),
        ("Gain", "SLGM"),
        ("Active Counters", "Alternating"),
        ("Thresholds (keV)", ",".join(_kev(t) for t in (120.0, 511.0, 0, 0, 0, 0, 0, 0))),
        ("DACs", "; ".join([_DACS] * (4 if quad else 1))),
        ("Gap Fill Mode", "None"),
        ("Flat Field File", "None"),
        ("Dead Time File", "Dummy (C:\\<NUL>\\)"),
        ("Acquisition Type (Normal, Th_scan, Config)", "Normal"),
        ("Frames in Acquisition (Number)", str(n_frames)),
        ("Frames per Trigger (Number)", str(frames_per_trigger)),
        ("Trigger Start (Positive, Negative, Internal)", "Rising Edge"),
        ("Trigger Stop (Positive, Negative, Internal)", "Rising Edge"),
        ("Sensor Bias (V)", "120 V"),
        ("Sensor Polarity (Positive, Negative)", "Positive"),
        ("Temperature (C)", "Board Temp 37.000000 Deg C"),
        ("Humidity (%)", "Board Humidity 1.000000 "),
        ("Medipix Clock (MHz)", "120MHz"),
        ("Readout System", "Merlin Quad" if quad else "Merlin"),
        ("Software Version", "stemstream emulator"),
    ]
    if scan_shape is not None:
        lines += [("ScanX", str(scan_shape[1])), ("ScanY", str(scan_shape[0]))]
    raw = ("HDR,\t\n" + "".join(f"{k}:\t{v}\n" for k, v in lines) + "End\t").encode("latin1")
    return raw + b" " * max(0, pad_to - len(raw))


def _kev(v: float) -> str:
    """Thresholds as Merlin writes them: 1.200000E+2 (one exponent digit)."""
    if v == 0:
        return "0.000000E+0"
    exp = int(np.floor(np.log10(abs(v))))
    return f"{v / 10 ** exp:.6f}E{exp:+d}"


_DACS = ("175,511,000,000,000,000,000,000,125,255,125,125,100,100,082,100,087,"
         "030,128,004,255,129,128,176,168,511,511")


# ------------------------------------------------------------------ frame header

@dataclass(frozen=True)
class FrameHeader:
    """One MQ1 frame header. ``width``/``height`` are as stated (raw quad: 1024x256, raw
    24-bit: double width); ``frame_shape`` is the assembled frame's (h, w)."""

    seq: int
    header_size: int
    n_chips: int
    width: int
    height: int
    code: str  # U08 / U16 / U32 / R64
    layout: str  # 1x1, 2x2, 2x2G, Nx1, Nx1G
    counter_depth: int

    @property
    def raw(self) -> bool:
        return self.code == "R64"

    @property
    def quad(self) -> bool:
        return self.n_chips == 4 and self.layout.startswith("2x2")

    @property
    def frame_shape(self) -> tuple[int, int]:
        if self.raw:
            if self.quad:
                return (512, 512)
            return (self.height, self.width // 2 if self.counter_depth == 24 else self.width)
        return (self.height, self.width)

    @property
    def payload_size(self) -> int:
        h, w = self.frame_shape
        if self.raw:
            return h * w * STORED_BITS[self.counter_depth] // 8
        return h * w * WIRE_DTYPE[self.code].itemsize

    @property
    def value_dtype(self) -> np.dtype:
        return VALUE_DTYPE[self.counter_depth]

    def same_layout(self, other: "FrameHeader") -> bool:
        """True when frames of both headers decode the same way (only ``seq`` differs)."""
        return (self.header_size, self.n_chips, self.width, self.height, self.code, self.layout,
                self.counter_depth) == (other.header_size, other.n_chips, other.width,
                                        other.height, other.code, other.layout, other.counter_depth)


def parse_frame_header(buf) -> FrameHeader:
    """The MQ1 header at the start of ``buf`` (bytes or memoryview, payload may follow)."""
    head = bytes(buf[:16])
    if head[:4] != b"MQ1," or not head[11:16].isdigit():
        raise MibError(f"not an MQ1 frame header: starts with {head!r}")
    size = int(head[11:16])
    text = bytes(buf[:size]).split(b"\x00", 1)[0].decode("ascii", "replace")
    parts = text.split(",")
    if parts and parts[-1] == "":
        parts = parts[:-1]
    try:
        code = parts[6]
        if "MQ1A" in parts:
            depth = int(parts[-1])
        elif code in ("U08", "U16", "U32"):  # old software without MQ1A: guess from the type
            depth = {"U08": 6, "U16": 12, "U32": 24}[code]
        else:
            raise MibError("raw frame header without the MQ1A counter-depth field")
        fh = FrameHeader(int(parts[1]), size, int(parts[3]), int(parts[4]), int(parts[5]), code,
                         parts[7].strip(), depth)
    except (IndexError, ValueError) as e:
        if isinstance(e, MibError):
            raise
        raise MibError(f"malformed MQ1 frame header {text[:80]!r}: {e}") from None
    if fh.code not in ("U08", "U16", "U32", "R64"):
        raise MibError(f"MQ1 pixel type {fh.code!r} is not supported (U08, U16, U32, R64)")
    if fh.counter_depth not in COUNTER_DEPTHS:
        raise MibError(f"MQ1 counter depth {fh.counter_depth} is not one of {COUNTER_DEPTHS}")
    if fh.raw and fh.quad and fh.counter_depth == 24:
        raise MibError("24-bit raw quad frames are not supported (nor by LiberTEM); "
                       "set Merlin to 12 bit or to a non-raw file format")
    return fh


def frame_header(seq: int, bits: int, raw: bool, quad: bool = False, gap: bool = False,
                 shutter_s: float = 0.001) -> bytes:
    """One MQ1 header as Merlin writes it, NUL-padded to 384 (one chip) or 768 bytes (quad)."""
    n_chips, size = (4, 768) if quad else (1, 384)
    if raw:
        code, (w, h) = "R64", ((1024, 256) if quad else (256, 256))
        w *= 2 if bits == 24 else 1
    else:
        code = NONRAW_CODE[bits]
        w = h = (514 if gap else 512) if quad else 256
    layout = ("2x2G" if gap else "2x2") if quad else "1x1"
    when = _dt.datetime(2024, 1, 1, 12, 0, 0)
    parts = ["MQ1", f"{seq % 1000000:06d}", f"{size:05d}", f"{n_chips:02d}", f"{w:04d}", f"{h:04d}",
             code, f"{layout:>6}", f"{0x0F if quad else 0x01:02X}",
             when.strftime("%Y-%m-%d %H:%M:%S.%f"), f"{shutter_s:.6f}", "0", "0", "0"]
    if raw:
        parts.append("")  # raw headers carry no thresholds and DACs, only an empty field
    else:
        parts += [_kev(t) for t in (120.0, 511.0, 0, 0, 0, 0, 0, 0)]
        for _ in range(n_chips):
            parts += ["3RX", _DACS]
    parts += ["MQ1A", when.strftime("%Y-%m-%dT%H:%M:%S.%f") + "000Z",
              f"{int(round(shutter_s * 1e9))}ns", str(bits)]
    text = (",".join(parts) + ",").encode("ascii")
    return text + b"\x00" * (size - len(text))


# ------------------------------------------------------------------ payloads

@njit(cache=True, nogil=True)
def _unpack_r1(words, out):
    """Raw 1-bit: byte 8k+7-m of the (n, nbytes) ``words`` holds pixels 64k+8m … 64k+8m+7,
    the first in bit 0. ``out`` (n, 8·nbytes) uint8."""
    n, nbytes = words.shape
    for f in range(n):
        for k in range(nbytes // 8):
            for m in range(8):
                b = words[f, 8 * k + 7 - m]
                base = 64 * k + 8 * m
                for j in range(8):
                    out[f, base + j] = (b >> j) & 1


def _decode_raw_rows(rows: np.ndarray, bits: int, n_px: int) -> np.ndarray:
    """(n, bytes) raw R64 rows → (n, n_px) pixel values in stream order."""
    n = len(rows)
    if bits == 1:
        out = np.empty((n, n_px), np.uint8)
        _unpack_r1(np.ascontiguousarray(rows), out)
        return out
    if bits == 6:
        return np.ascontiguousarray(rows.reshape(n, -1, 8)[:, :, ::-1]).reshape(n, n_px)
    # 12 bit (and each half of 24 bit): big-endian u16, four per word, last pixel first
    words = np.ascontiguousarray(rows).view(">u2").reshape(n, -1, 4)[:, :, ::-1]
    return words.astype("<u2").reshape(n, n_px)


def _unquad(stream: np.ndarray) -> np.ndarray:
    """(n, 256, 1024) raw quad stream order → (n, 512, 512) assembled frames."""
    s = stream.reshape(len(stream), 256, 4, 256)
    out = np.empty((len(stream), 512, 512), stream.dtype)
    out[:, :256, :256] = s[:, :, 3]
    out[:, :256, 256:] = s[:, :, 2]
    out[:, 256:, :256] = s[:, ::-1, 1, ::-1]
    out[:, 256:, 256:] = s[:, ::-1, 0, ::-1]
    return out


def decode_payloads(payloads: np.ndarray, fh: FrameHeader) -> np.ndarray:
    """Pixel payloads of frames that share ``fh``'s layout → (n, h, w) counts.

    payloads: (n, fh.payload_size) uint8 (a strided view of a receive buffer is fine).
    Returns a new C-ordered array of ``fh.value_dtype`` (little-endian u1, u2 or u4)."""
    payloads = np.asarray(payloads, np.uint8)
    n = len(payloads)
    h, w = fh.frame_shape
    if payloads.shape[1:] != (fh.payload_size,):
        raise MibError(f"{payloads.shape[1:]} payload bytes per frame; the header says {fh.payload_size}")
    if not fh.raw:
        wire = WIRE_DTYPE[fh.code]
        values = np.ascontiguousarray(payloads).view(wire).reshape(n, h, w)
        return values.astype(fh.value_dtype)
    bits = fh.counter_depth
    if bits == 24:
        half = fh.payload_size // 2
        hi = _decode_raw_rows(payloads[:, :half], 12, h * w).astype(np.uint32)
        lo = _decode_raw_rows(payloads[:, half:], 12, h * w).astype(np.uint32)
        return ((hi << 12) | lo).astype("<u4").reshape(n, h, w)
    values = _decode_raw_rows(payloads, bits, h * w)
    if fh.quad:
        return _unquad(values.reshape(n, 256, 1024))
    return values.reshape(n, h, w)


def decode_frame(message, fh: FrameHeader | None = None) -> tuple[FrameHeader, np.ndarray]:
    """One frame message (MQ1 header + payload, without the MPX prefix) → (header, (h, w))."""
    fh = fh or parse_frame_header(message)
    payload = np.frombuffer(message, np.uint8, fh.payload_size, fh.header_size)
    return fh, decode_payloads(payload[None], fh)[0]


def encode_payload(frame: np.ndarray, bits: int, raw: bool, quad: bool = False,
                   gap: bool = False) -> bytes:
    """The payload Merlin sends for one (h, w) frame of counts (values must fit ``bits``)."""
    frame = np.asarray(frame)
    if not raw:
        if quad and gap:  # 2x2G: two gap rows and columns between the chips, zero
            full = np.zeros((514, 514), frame.dtype)
            full[:256, :256], full[:256, 258:] = frame[:256, :256], frame[:256, 256:]
            full[258:, :256], full[258:, 258:] = frame[256:, :256], frame[256:, 256:]
            frame = full
        return frame.astype(WIRE_DTYPE[NONRAW_CODE[bits]]).tobytes()
    if bits == 24:
        v = frame.astype(np.uint32)
        return encode_payload((v >> 12) & 0xFFF, 12, True, quad) + encode_payload(v & 0xFFF, 12, True, quad)
    if quad:
        s = np.empty((256, 4, 256), frame.dtype)
        s[:, 3], s[:, 2] = frame[:256, :256], frame[:256, 256:]
        s[:, 1], s[:, 0] = frame[256:, :256][::-1, ::-1], frame[256:, 256:][::-1, ::-1]
        frame = s
    px = np.ascontiguousarray(frame).ravel()
    if bits == 1:
        groups = px.reshape(-1, 64).astype(np.uint64) & np.uint64(1)
        return (groups << np.arange(64, dtype=np.uint64)).sum(axis=1, dtype=np.uint64).astype(">u8").tobytes()
    if bits == 6:
        return px.astype(np.uint8).reshape(-1, 8)[:, ::-1].tobytes()
    return px.astype(">u2").reshape(-1, 4)[:, ::-1].tobytes()


def frame_message(seq: int, frame: np.ndarray, bits: int, raw: bool, quad: bool = False,
                  gap: bool = False) -> bytes:
    """One frame as a MIB file holds it: MQ1 header + payload."""
    return frame_header(seq, bits, raw, quad, gap) + encode_payload(frame, bits, raw, quad, gap)


def write_mib(base: str, frames: np.ndarray, bits: int, raw: bool, scan_shape: tuple[int, int],
              quad: bool = False, gap: bool = False, scan_in_header: bool = True) -> tuple[str, str]:
    """Write ``base.hdr`` and ``base.mib`` holding (n, h, w) frames of counts; returns both paths.

    Frames per trigger is the scan's row length (one trigger per scan row)."""
    hdr, mib = base + ".hdr", base + ".mib"
    with open(hdr, "wb") as f:
        f.write(acquisition_header(len(frames), scan_shape[1], bits, quad,
                                   scan_shape if scan_in_header else None))
    with open(mib, "wb") as f:
        for i, frame in enumerate(frames):
            f.write(frame_message(i + 1, frame, bits, raw, quad, gap))
    return hdr, mib


def read_mib(path: str) -> np.ndarray:
    """Every frame of a ``.mib`` file as (n, h, w) counts (frames of one layout)."""
    data = np.fromfile(path, np.uint8)
    if not len(data):
        raise MibError(f"{path}: empty file")
    fh = parse_frame_header(data[:1024].tobytes())
    stride = fh.header_size + fh.payload_size
    if len(data) % stride:
        raise MibError(f"{path}: {len(data)} bytes is not a whole number of {stride}-byte frames")
    rows = data.reshape(-1, stride)
    return decode_payloads(rows[:, fh.header_size:], fh)
