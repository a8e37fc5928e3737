"""The NCEM 4D Camera's raw file format, as ``stempy.io.reader`` reads it: the emulator writes
its raw frames this way so that stempy counts the very same frames, and ``stemstream
calibrate`` reads dark and sample frames from such files.

Every record is a little-endian 16-byte header, then uint16 pixels (stempy's reader.cpp and
docs/source/4dCamera_header_versions.rst):

    uint32 scan_number; uint32 frame_number; uint16 scan_width, scan_height, scan_x, scan_y

=======  ==============================  ============================================
version  record data                     files
=======  ==============================  ============================================
3        the whole 576 x 576 frame       one file, any name ending in ``.data``
4        sector m: all rows, columns     one per sector; stempy takes m from the name
         144m .. 144m+143                (``module<m>`` ... ``.data``)
5        sector m: rows 144m .. 144m+143 as version 4
=======  ==============================  ============================================

The image (probe position) stempy files a record under is scan_y · scan_width + scan_x; the
threaded readers assemble a frame's sectors by frame_number, which must be unique.

>>> import tempfile, numpy as np
>>> d = tempfile.mkdtemp()
>>> with RawFileWriter(d, scan_number=1, raster_shape=(1, 2)) as w:
...     w.write(0, np.arange(2 * 576 * 576).reshape(2, 576, 576).astype(np.uint16) % 4096)
>>> r = RawFileReader(w.files)
>>> r.n_frames, int(r.frame(1)[0, 0])
(2, 0)
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

FRAME = 576  # stempy's readers know only the 4D Camera's 576 x 576 frames
SECTOR = 144
HEADER = np.dtype([("scan_number", "<u4"), ("frame_number", "<u4"), ("scan_size", "<u2", (2,)),
                   ("scan_position", "<u2", (2,))])
MODULE = re.compile(r".*module(\d+).*\.data$")


class RawFileError(ValueError):
    """A raw file that cannot be read; the message names the file and the problem."""


def record_dtype(version: int) -> np.dtype:
    if version not in (3, 4, 5):
        raise RawFileError(f"4D Camera raw format version {version}: only 3, 4 and 5 are known")
    n = FRAME * FRAME if version == 3 else FRAME * SECTOR
    return np.dtype(HEADER.descr + [("data", "<u2", (n,))])


def module_file(directory, scan_number: int, module: int) -> Path:
    """The file of one sector: stempy needs 'module<m>' in the name and a '.data' suffix."""
    return Path(directory) / f"data_scan{scan_number:010d}_module{module}.data"


class RawFileWriter:
    """Appends raw frames of one scan to 4D Camera files (version 5: four sector files).

    directory: where the files go (created); scan_number: the header's scan number;
    raster_shape: (ny, nx + flyback) probe positions the frames cover; frames_per_position.
    Frame f lies at raster position f // frames_per_position (x = column, y = row) and gets
    frame_number f + 1 (the camera counts from 1). Use as a context manager.
    """

    def __init__(self, directory, scan_number: int, raster_shape, frames_per_position: int = 1,
                 version: int = 5):
        self.version = int(version)
        self.dtype = record_dtype(self.version)
        self.scan_number = int(scan_number)
        self.raster_shape = (int(raster_shape[0]), int(raster_shape[1]))
        if max(self.raster_shape) > 65535:
            raise RawFileError(f"raster {self.raster_shape} does not fit the 16-bit header fields")
        self.fpp = int(frames_per_position)
        Path(directory).mkdir(parents=True, exist_ok=True)
        if self.version == 3:
            self.files = [Path(directory) / f"data_scan{self.scan_number:010d}.data"]
        else:
            self.files = [module_file(directory, self.scan_number, m) for m in range(FRAME // SECTOR)]
        self._fh = [open(p, "wb") for p in self.files]

    def write(self, first: int, frames: np.ndarray) -> None:
        """Frames ``first .. first+len(frames)-1``: (n, 576, 576) uint16."""
        frames = np.asarray(frames)
        if frames.ndim != 3 or frames.shape[1:] != (FRAME, FRAME):
            raise RawFileError(f"the 4D Camera raw format holds {FRAME}x{FRAME} frames, got "
                               f"{'x'.join(map(str, frames.shape[1:]))} (use --detector 576x576)")
        n = len(frames)
        rec = np.zeros(n, self.dtype)
        f = np.arange(first, first + n, dtype=np.int64)
        raster = f // self.fpp
        rec["scan_number"] = self.scan_number
        rec["frame_number"] = f + 1
        rec["scan_size"] = (self.raster_shape[1], self.raster_shape[0])  # (width, height)
        rec["scan_position"][:, 0] = raster % self.raster_shape[1]  # x
        rec["scan_position"][:, 1] = raster // self.raster_shape[1]  # y
        for m, fh in enumerate(self._fh):
            if self.version == 3:
                rec["data"] = frames.reshape(n, -1)
            elif self.version == 5:
                rec["data"] = frames[:, m * SECTOR:(m + 1) * SECTOR, :].reshape(n, -1)
            else:
                rec["data"] = frames[:, :, m * SECTOR:(m + 1) * SECTOR].reshape(n, -1)
            rec.tofile(fh)

    def close(self) -> None:
        for fh in self._fh:
            fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RawFileReader:
    """Frames of 4D Camera raw files (any number of files per sector, any record order).

    files: the ``.data`` files of one scan; version 3, 4 or 5 (None: 5 when the names carry
    'module<m>', else 3). ``frame(i)`` is the i-th frame in frame-number order, (576, 576)
    uint16; a frame missing a sector raises RawFileError.
    """

    def __init__(self, files, version: int | None = None):
        self.files = [Path(p) for p in files]
        if not self.files:
            raise RawFileError("no raw files given")
        for p in self.files:
            if not p.is_file():
                raise RawFileError(f"{p}: no such file")
        modules = [MODULE.match(p.name) for p in self.files]
        self.version = int(version or (5 if all(modules) else 3))
        dtype = record_dtype(self.version)
        self._maps, where = [], {}
        for k, p in enumerate(self.files):
            size = p.stat().st_size
            if size == 0 or size % dtype.itemsize:
                raise RawFileError(f"{p}: {size} bytes is not a whole number of version-{self.version} "
                                   f"records of {dtype.itemsize} bytes (truncated, or another version?)")
            rec = np.memmap(p, dtype, mode="r")
            m = 0 if self.version == 3 else modules[k] and int(modules[k].group(1))
            if self.version != 3 and not modules[k]:
                raise RawFileError(f"{p}: a version-{self.version} sector file needs 'module<N>' in "
                                   "its name (the sector number)")
            if self.version != 3 and not 0 <= m < FRAME // SECTOR:
                raise RawFileError(f"{p}: module {m} is not a sector of the 4D Camera (0..3)")
            self._maps.append(rec)
            for j, fn in enumerate(np.asarray(rec["frame_number"])):
                where.setdefault(int(fn), {})[m] = (k, j)
        self.frame_numbers = np.array(sorted(where), np.int64)
        self._where = where
        self.n_sectors = 1 if self.version == 3 else FRAME // SECTOR

    @property
    def n_frames(self) -> int:
        return len(self.frame_numbers)

    def frame(self, i: int) -> np.ndarray:
        fn = int(self.frame_numbers[i])
        parts = self._where[fn]
        if len(parts) != self.n_sectors:
            raise RawFileError(f"frame number {fn} lacks sector(s) "
                               f"{sorted(set(range(self.n_sectors)) - set(parts))} in {self.files[0].parent}")
        out = np.empty((FRAME, FRAME), np.uint16)
        for m, (k, j) in parts.items():
            data = self._maps[k][j]["data"]
            if self.version == 3:
                out[:] = data.reshape(FRAME, FRAME)
            elif self.version == 5:
                out[m * SECTOR:(m + 1) * SECTOR] = data.reshape(SECTOR, FRAME)
            else:
                out[:, m * SECTOR:(m + 1) * SECTOR] = data.reshape(FRAME, SECTOR)
        return out
