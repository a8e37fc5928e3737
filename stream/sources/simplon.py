"""DECTRIS SIMPLON stream (API 1.8, ``stream`` interface, JSON headers): the messages a DCU
sends on its ZeroMQ PUSH socket, image decoding, and, for the emulator and the tests, image
encoding and the dump format LiberTEM-live's DectrisSim replays. No sockets here.

Messages of one series (docs/DECTRIS.md):
1. ``{"htype": "dheader-1.0", "series": S, "header_detail": "basic"}``, then (``basic``)
   the detector configuration as one JSON map (no htype): bit depth, compression,
   count/frame time, nimages, ntrigger, trigger_mode, x/y_pixels_in_detector, …
2. per image one 4-part message: ``{"htype": "dimage-1.0", "series", "frame", "hash"}``,
   ``{"htype": "dimage_d-1.0", "shape": [x, y], "type": "uint16", "encoding": "bs16-lz4<",
   "size"}``, the pixel blob, ``{"htype": "dconfig-1.0", "start_time", "stop_time",
   "real_time"}`` (ns).
3. ``{"htype": "dseries_end-1.0", "series": S}``.

Encodings: ``bs<bits>-lz4<`` (bitshuffle + LZ4 with the HDF5 filter's framing: uint64 BE
byte count, uint32 BE block size in bytes, then per block a uint32 BE length and an LZ4
block), ``lz4<`` (one LZ4 block; the HDF5-framed form is accepted too), ``<`` (raw).
Decoding uses DECTRIS' own ``dectris-compression`` for bitshuffle-LZ4 and ``lz4`` for LZ4.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct

import numpy as np

DTYPES = {"uint8": np.dtype("<u1"), "uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
COMPRESSIONS = ("bslz4", "lz4", "none")
TRIGGER_MODES = ("exte", "exts", "inte", "ints")
REQUIRED_CONFIG = ("x_pixels_in_detector", "y_pixels_in_detector", "bit_depth_image")


class SimplonError(ValueError):
    """A message or image that is not what the SIMPLON stream says."""


def _need(module: str, package: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise SimplonError(f"decoding DECTRIS images needs the {package!r} package: "
                           "pip install 'stemstream[dectris]'") from None


def parse_json(part) -> dict:
    """A JSON part as a dict; SimplonError if it is not one."""
    try:
        d = json.loads(bytes(getattr(part, "buffer", part)))
    except (ValueError, UnicodeDecodeError) as e:
        raise SimplonError(f"not a JSON part: {e}") from None
    if not isinstance(d, dict):
        raise SimplonError(f"JSON part is a {type(d).__name__}, not a map")
    return d


def image_shape_dtype(dimage_d: dict) -> tuple[tuple[int, int], np.dtype]:
    """((h, w), dtype) of an image from its ``dimage_d-1.0`` part (shape is [x, y])."""
    try:
        x, y = (int(v) for v in dimage_d["shape"])
        dtype = DTYPES[dimage_d["type"]]
    except (KeyError, TypeError, ValueError):
        raise SimplonError(f"dimage_d part without a valid shape and type: {dimage_d}") from None
    if x < 1 or y < 1:
        raise SimplonError(f"image shape {dimage_d['shape']} is empty")
    return (y, x), dtype


def decode_image(blob, dimage_d: dict) -> np.ndarray:
    """An image blob → (h, w) little-endian unsigned counts."""
    (h, w), dtype = image_shape_dtype(dimage_d)
    enc = str(dimage_d.get("encoding", "<"))
    buf = memoryview(getattr(blob, "buffer", blob))
    nbytes = h * w * dtype.itemsize
    if enc.startswith("bs") and "lz4" in enc:
        # the frame's first 8 bytes give the size it decompresses to: checked first, so a
        # forged size never allocates more than the image
        declared = struct.unpack(">Q", buf[:8])[0] if len(buf) >= 12 else None
        if declared != nbytes:
            raise SimplonError(f"bitshuffle-LZ4 image declares {declared} bytes; a {h}x{w} "
                               f"{dtype.name} image has {nbytes}")
        decompress = _need("dectris.compression", "dectris-compression").decompress
        try:
            raw = decompress(bytes(buf), "bslz4", elem_size=dtype.itemsize)
        except Exception as e:  # noqa: BLE001 - the library raises several types
            raise SimplonError(f"bitshuffle-LZ4 image does not decompress: {type(e).__name__}: {e}") from None
    elif enc.startswith("lz4"):
        raw = _lz4(buf, nbytes)
    elif enc in ("<", ""):
        raw = buf
    else:
        raise SimplonError(f"image encoding {enc!r} is not supported (bs8/16/32-lz4<, lz4<, <)")
    if len(raw) != nbytes:
        raise SimplonError(f"image decodes to {len(raw)} bytes; a {h}x{w} {dtype.name} image has {nbytes}")
    return np.frombuffer(raw, dtype).reshape(h, w)


def _lz4(buf: memoryview, nbytes: int) -> bytes:
    """One LZ4 block (what LiberTEM-rs decodes) or the HDF5-framed form (what
    dectris-compression decodes): framed when the first 8 bytes are the byte count."""
    if len(buf) >= 16 and struct.unpack(">Q", buf[:8])[0] == nbytes:
        decompress = _need("dectris.compression", "dectris-compression").decompress
        return decompress(bytes(buf), "lz4", elem_size=1)
    block = _need("lz4.block", "lz4")
    try:
        return block.decompress(bytes(buf), uncompressed_size=nbytes)
    except Exception as e:  # noqa: BLE001
        raise SimplonError(f"LZ4 image does not decompress: {e}") from None


# ------------------------------------------------------------------ encoding (emulator, tests)

def _bitshuffle():
    # the bitshuffle wheel is built with OpenMP: one thread is 10-50x faster on small images
    # than the default (one per core); it must be set before the library loads
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return _need("bitshuffle", "bitshuffle")


def bslz4_block_size(itemsize: int) -> int:
    """bitshuffle's default block, in elements: 8192 bytes, a multiple of 8, at least 128."""
    return max(128, (8192 // itemsize) // 8 * 8)


def encode_image(frame: np.ndarray, compression: str) -> tuple[bytes, str]:
    """(blob, encoding) of one (h, w) image as a DCU sends it."""
    frame = np.ascontiguousarray(frame, frame.dtype.newbyteorder("<"))
    bits = frame.dtype.itemsize * 8
    if compression == "bslz4":
        bs = bslz4_block_size(frame.dtype.itemsize)
        body = _bitshuffle().compress_lz4(frame.ravel(), bs)
        return struct.pack(">QI", frame.nbytes, bs * frame.dtype.itemsize) + body.tobytes(), f"bs{bits}-lz4<"
    if compression == "lz4":
        return _need("lz4.block", "lz4").compress(frame.tobytes(), store_size=False), "lz4<"
    if compression == "none":
        return frame.tobytes(), "<"
    raise ValueError(f"compression {compression!r} must be one of {', '.join(COMPRESSIONS)}")


def detector_config(n_images: int, frame_shape, dtype, trigger_mode: str = "exte",
                    compression: str = "bslz4", frame_time_s: float = 1e-5,
                    description: str = "DECTRIS ARINA (stemstream emulator)") -> dict:
    """The configuration a DCU sends after the series header (``header_detail`` basic)."""
    h, w = frame_shape
    ntrigger, nimages = (n_images, 1) if trigger_mode in ("exte", "inte") else (1, n_images)
    bits = np.dtype(dtype).itemsize * 8
    return {"auto_summation": True, "beam_center_x": w / 2, "beam_center_y": h / 2,
            "bit_depth_image": bits, "bit_depth_readout": bits, "compression": compression,
            "count_time": frame_time_s * 0.99, "countrate_correction_applied": False,
            "description": description, "detector_number": "E-00-0000",
            "detector_readout_time": 1e-7, "flatfield_correction_applied": False,
            "frame_time": frame_time_s, "nimages": nimages, "ntrigger": ntrigger,
            "number_of_excluded_pixels": 0, "pixel_mask_applied": False, "roi_mode": "",
            "sensor_material": "Si", "sensor_thickness": 0.00045, "software_version": "1.8.0",
            "trigger_mode": trigger_mode, "x_pixel_size": 0.0001, "y_pixel_size": 0.0001,
            "x_pixels_in_detector": w, "y_pixels_in_detector": h}


def header_parts(series: int, config: dict | None) -> list[bytes]:
    """The series header and (header_detail basic) the configuration, one part each."""
    parts = [json.dumps({"htype": "dheader-1.0", "series": series,
                         "header_detail": "basic" if config is not None else "none"}).encode()]
    if config is not None:
        parts.append(json.dumps(config).encode())
    return parts


def image_parts(series: int, frame: int, image: np.ndarray, compression: str,
                frame_time_ns: int = 10_000) -> list[bytes]:
    """The 4 parts of one image message."""
    blob, enc = encode_image(image, compression)
    h, w = image.shape
    t0 = frame * frame_time_ns
    return [json.dumps({"htype": "dimage-1.0", "series": series, "frame": frame,
                        "hash": hashlib.md5(blob).hexdigest()}).encode(),
            json.dumps({"htype": "dimage_d-1.0", "shape": [w, h], "type": image.dtype.name,
                        "encoding": enc, "size": len(blob)}).encode(),
            blob,
            json.dumps({"htype": "dconfig-1.0", "start_time": t0, "stop_time": t0 + frame_time_ns - 100,
                        "real_time": frame_time_ns - 100}).encode()]


def end_part(series: int) -> bytes:
    return json.dumps({"htype": "dseries_end-1.0", "series": series}).encode()


def write_dump(path: str, frames: np.ndarray, series: int = 1, trigger_mode: str = "exte",
               compression: str = "bslz4") -> None:
    """A stream dump as LiberTEM-live's DectrisSim replays it (LiberTEM-rs ``bin_fmt``):
    every message part as an int64 little-endian length and its bytes, in stream order."""
    config = detector_config(len(frames), frames.shape[1:], frames.dtype, trigger_mode, compression)
    with open(path, "wb") as f:
        parts = header_parts(series, config)
        for i, image in enumerate(frames):
            parts += image_parts(series, i, image, compression)
        parts.append(end_part(series))
        for part in parts:
            f.write(struct.pack("<q", len(part)))
            f.write(part)
