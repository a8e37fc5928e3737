"""The counting calibration file: a dark reference and the thresholds of electron counting.

``stemstream calibrate`` writes it from dark frames (and sample frames), ``[counting] file``
reads it, so every worker counts with the same dark and thresholds, known before the first
frame (docs/COUNTING.md). HDF5, root attribute ``format = "stemstream-counting"``:

========================  ==================================================================
``dark``                  (h, w) float32 ADU, the dark reference (absent: no dark subtraction)
``gain``                  (h, w) float32, optional gain map (values are divided by it)
``sample_frames``         (k,) int64, the frames the thresholds were computed from
root attributes           ``background_threshold``, ``xray_threshold`` (ADU above the dark),
                          ``format_version``, ``created``, ``dark_frames``, ``dark_source``,
                          ``samples_source``, ``seed``, and the threshold statistics (``mean``,
                          ``std_dev``, ``optimized_mean``, ``optimized_std_dev``,
                          ``background_n_sigma``, ``xray_n_sigma``, ``n_samples``, ...)
========================  ==================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import h5py
import numpy as np

FORMAT = "stemstream-counting"
FORMAT_VERSION = 1


class CountingFileError(ValueError):
    """A counting file that cannot be used; the message names the path and the reason."""


@dataclass
class Calibration:
    """Dark reference and thresholds for counting, with where they came from.

    dark: (h, w) float32 ADU or None (no dark subtraction, as for a camera that subtracts
    its own pedestal); background_threshold, xray_threshold: ADU above the dark; gain:
    optional (h, w); attrs: the statistics and provenance (plain values); sample_frames:
    the frame numbers the thresholds were computed from.
    """

    dark: np.ndarray | None
    background_threshold: float
    xray_threshold: float
    gain: np.ndarray | None = None
    attrs: dict = field(default_factory=dict)
    sample_frames: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    path: str | None = None

    @property
    def frame_shape(self) -> tuple[int, int] | None:
        return None if self.dark is None else tuple(self.dark.shape)

    def summary(self) -> str:
        """One line for the console: thresholds, their origin, the dark."""
        a = self.attrs
        fit = (f" (background fit: mean {a['optimized_mean']:.2f}, σ {a['optimized_std_dev']:.2f} ADU, "
               f"{a['background_n_sigma']:g}σ; x-ray: mean {a['mean']:.2f} + {a['xray_n_sigma']:g} × "
               f"{a['std_dev']:.2f}; {a['n_samples']:,} samples of {len(self.sample_frames)} frames, "
               f"seed {a.get('seed')})" if "optimized_mean" in a else "")
        dark = "no dark subtraction" if self.dark is None else \
            f"dark {self.dark.shape[0]}x{self.dark.shape[1]} (mean {float(self.dark.mean()):.2f} ADU" + \
            (f", {a['dark_frames']} frames)" if "dark_frames" in a else ")")
        return (f"background {self.background_threshold:.3f} ADU, x-ray {self.xray_threshold:.1f} ADU"
                f"{fit}; {dark}" + ("; gain map" if self.gain is not None else ""))


def write_calibration(path, cal: Calibration) -> Path:
    """Write ``cal`` to ``path`` (replaced if it exists); returns the path."""
    path = Path(path)
    with h5py.File(path, "w") as f:
        f.attrs.update(format=FORMAT, format_version=FORMAT_VERSION,
                       created=datetime.now().isoformat(timespec="seconds"),
                       background_threshold=float(cal.background_threshold),
                       xray_threshold=float(cal.xray_threshold))
        for k, v in cal.attrs.items():
            f.attrs[k] = v if not isinstance(v, dict) else str(v)
        if cal.dark is not None:
            f.create_dataset("dark", data=np.asarray(cal.dark, np.float32), compression="gzip")
        if cal.gain is not None:
            f.create_dataset("gain", data=np.asarray(cal.gain, np.float32), compression="gzip")
        f.create_dataset("sample_frames", data=np.asarray(cal.sample_frames, np.int64))
    return path


def read_calibration(path) -> Calibration:
    """Read a counting file; CountingFileError naming the path and the problem otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CountingFileError(f"{path}: no such counting file (make one with 'stemstream calibrate')")
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT:
                raise CountingFileError(f"{path}: not a counting file (root attribute format is "
                                        f"{f.attrs.get('format')!r}, expected {FORMAT!r}); make one with "
                                        "'stemstream calibrate'")
            attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()
                     if k not in ("format", "background_threshold", "xray_threshold")}
            cal = Calibration(dark=f["dark"][()] if "dark" in f else None,
                              background_threshold=float(f.attrs["background_threshold"]),
                              xray_threshold=float(f.attrs["xray_threshold"]),
                              gain=f["gain"][()] if "gain" in f else None, attrs=attrs,
                              sample_frames=f["sample_frames"][()] if "sample_frames" in f
                              else np.zeros(0, np.int64), path=str(path))
    except CountingFileError:
        raise
    except (OSError, KeyError) as e:
        raise CountingFileError(f"{path}: not a readable counting file ({e})") from None
    return cal


class DarkAccumulator:
    """The dark reference of a stream of dark frames, sector by sector: per pixel the mean of
    its values without its largest (a stray X-ray hit during the dark acquisition would
    otherwise raise that pixel's dark by thousands of ADU / frames).

    frame_shape: (h, w). ``add(frames, row0)`` takes (n, rows, w) frames of rows row0 ..;
    ``dark()`` needs every row at least twice.
    """

    def __init__(self, frame_shape):
        h, w = frame_shape
        self.frame_shape = (int(h), int(w))
        self.total = np.zeros((h, w), np.int64)
        self.top = np.zeros((h, w), np.int64)
        self.n = np.zeros(h, np.int64)

    def add(self, frames: np.ndarray, row0: int = 0) -> None:
        frames = np.asarray(frames)
        rows = frames.shape[1]
        sl = slice(row0, row0 + rows)
        self.total[sl] += frames.sum(axis=0, dtype=np.int64)
        np.maximum(self.top[sl], frames.max(axis=0), out=self.top[sl])
        self.n[sl] += len(frames)

    @property
    def n_frames(self) -> int:
        return int(self.n.min())

    def dark(self) -> np.ndarray:
        if self.n.min() < 2:
            missing = np.flatnonzero(self.n < 2)
            raise CountingFileError(f"the dark frames cover detector rows {missing[0]}..{missing[-1]} fewer "
                                    "than twice; a dark reference needs at least 2 frames of every row")
        return ((self.total - self.top) / (self.n[:, None] - 1)).astype(np.float32)
