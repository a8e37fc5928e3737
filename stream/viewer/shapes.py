"""Shapes drawn in the viewer → masks of detector pixels or probe positions.

Two coordinate systems, both as the page draws them (y down, as the images are shown):

* scan images: the probe position (row, col) is the square ``[col·step, (col+1)·step) ×
  [row·step, (row+1)·step)``, its centre at ``((row + ½)·step, (col + ½)·step)``; ``step`` in Å
  from the scan's metadata (``scan_step_A``), else 1 (axes in positions);
* the diffraction pattern: pixel (row, col) has its centre at ``((row − cy)·s, (col − cx)·s)``
  with ``(cy, cx)`` the beam centre in px and ``s`` mrad per px from the calibration, else 1
  (axes in px from the centre).

A position or pixel belongs to a shape when its centre does: disks are closed (distance ≤ r),
annuli half-open (inner ≤ r < outer), as ``operators.virtual.disk_mask``/``annulus_mask``, so
a drawn disk and a ``[[virtual]]`` disk of the same radius select the same pixels.

Examples
--------
>>> ax = DetectorAxes((8, 8), center=(3.5, 3.5), mrad_per_px=2.0)
>>> int(disk(ax, 0.0, 0.0, 3.0).sum())          # radius 1.5 px around the centre
4
>>> sa = ScanAxes((4, 6), step_A=0.5)
>>> rectangle(sa, 0.0, 1.0, 0.0, 1.5).astype(int)    # y0, y1, x0, x1 in Å
array([[1, 1, 1, 0, 0, 0],
       [1, 1, 1, 0, 0, 0],
       [0, 0, 0, 0, 0, 0],
       [0, 0, 0, 0, 0, 0]])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from matplotlib.path import Path as _MplPath

from operators.virtual import annulus_mask, disk_mask

MAX_VERTICES = 20_000  # a drawn polygon or brush stroke; beyond it the drawing is refused


class ShapeError(ValueError):
    """A drawn shape that selects nothing or cannot be a mask; the message says why."""


@dataclass(frozen=True)
class ScanAxes:
    """Scan image coordinates: ``shape`` (ny, nx) positions, ``step_A`` Å per position (None:
    unknown, the axes are in positions)."""

    shape: tuple[int, int]
    step_A: float | None = None

    @property
    def step(self) -> float:
        return self.step_A if self.step_A else 1.0

    @property
    def unit(self) -> str:
        return "Å" if self.step_A else "positions"

    def index(self, y, x) -> tuple[np.ndarray, np.ndarray]:
        """Fractional (row, col) of page coordinates; position centres are at integers."""
        return np.asarray(y, float) / self.step - 0.5, np.asarray(x, float) / self.step - 0.5

    def extent(self) -> tuple[float, float, float, float]:
        """(x0, y0, width, height) of the image in page units."""
        ny, nx = self.shape
        return 0.0, 0.0, nx * self.step, ny * self.step


@dataclass(frozen=True)
class DetectorAxes:
    """Diffraction-pattern coordinates: ``shape`` (h, w) px, beam ``center`` (cy, cx) px,
    ``mrad_per_px`` (None: uncalibrated, the axes are in px from the centre)."""

    shape: tuple[int, int]
    center: tuple[float, float]
    mrad_per_px: float | None = None

    @property
    def scale(self) -> float:
        return self.mrad_per_px if self.mrad_per_px else 1.0

    @property
    def unit(self) -> str:
        return "mrad" if self.mrad_per_px else "px"

    def index(self, y, x) -> tuple[np.ndarray, np.ndarray]:
        """Fractional (row, col) px of page coordinates; pixel centres are at integers."""
        return (np.asarray(y, float) / self.scale + self.center[0],
                np.asarray(x, float) / self.scale + self.center[1])

    def coords(self, row, col) -> tuple[float, float]:
        """Page coordinates of a pixel position (row, col) px."""
        return (float(row) - self.center[0]) * self.scale, (float(col) - self.center[1]) * self.scale

    def extent(self) -> tuple[float, float, float, float]:
        h, w = self.shape
        s = self.scale
        return (-0.5 - self.center[1]) * s, (-0.5 - self.center[0]) * s, w * s, h * s


def _finite(what: str, *values) -> None:
    for v in values:
        if not np.all(np.isfinite(np.asarray(v, float))):
            raise ShapeError(f"{what}: coordinates must be finite numbers")


def _nonempty(mask: np.ndarray, what: str) -> np.ndarray:
    if not mask.any():
        raise ShapeError(f"{what} contains no pixel or position centre; draw it larger or inside the image")
    return mask


def disk(ax: DetectorAxes, ky: float, kx: float, radius: float) -> np.ndarray:
    """(h, w) bool: pixels whose centre is within ``radius`` of (ky, kx) (page units)."""
    return annulus(ax, ky, kx, 0.0, radius)


def annulus(ax: DetectorAxes, ky: float, kx: float, inner: float, outer: float) -> np.ndarray:
    """(h, w) bool: pixels at a distance r from (ky, kx) with inner ≤ r < outer (inner 0:
    a closed disk of radius ``outer``); all in page units (mrad or px)."""
    _finite("disk/annulus", ky, kx, inner, outer)
    if not 0 <= inner < outer:
        raise ShapeError(f"annulus: need 0 <= inner < outer, got inner {inner:g}, outer {outer:g} {ax.unit}")
    cy, cx = ax.index(ky, kx)
    s = ax.scale
    if inner == 0:
        mask = disk_mask(ax.shape, (float(cy), float(cx)), outer / s)
    else:
        mask = annulus_mask(ax.shape, (float(cy), float(cx)), inner / s, outer / s)
    return _nonempty(mask, "the drawn detector")


def _polygon(shape, rows, cols, what: str) -> np.ndarray:
    rows, cols = np.asarray(rows, float).ravel(), np.asarray(cols, float).ravel()
    if len(rows) != len(cols) or len(rows) < 3:
        raise ShapeError(f"{what}: a polygon needs at least 3 vertices, got {len(rows)}")
    if len(rows) > MAX_VERTICES:
        raise ShapeError(f"{what}: {len(rows)} vertices; at most {MAX_VERTICES}")
    _finite(what, rows, cols)
    h, w = shape
    # only the bounding box is tested, so a small polygon on a large image costs little
    r0, r1 = max(0, int(np.floor(rows.min()))), min(h, int(np.ceil(rows.max())) + 1)
    c0, c1 = max(0, int(np.floor(cols.min()))), min(w, int(np.ceil(cols.max())) + 1)
    mask = np.zeros((h, w), bool)
    if r1 > r0 and c1 > c0:
        yy, xx = np.mgrid[r0:r1, c0:c1]
        inside = _MplPath(np.column_stack([cols, rows])).contains_points(
            np.column_stack([xx.ravel(), yy.ravel()]))
        mask[r0:r1, c0:c1] = inside.reshape(r1 - r0, c1 - c0)
    return _nonempty(mask, what)


def detector_polygon(ax: DetectorAxes, ys, xs) -> np.ndarray:
    """(h, w) bool: pixels whose centre is inside the polygon of vertices (ys, xs) (page units)."""
    rows, cols = ax.index(ys, xs)
    return _polygon(ax.shape, rows, cols, "the drawn detector polygon")


def scan_polygon(ax: ScanAxes, ys, xs) -> np.ndarray:
    """(ny, nx) bool: positions whose centre is inside the polygon (ys, xs) (page units)."""
    rows, cols = ax.index(ys, xs)
    return _polygon(ax.shape, rows, cols, "the drawn region")


def rectangle(ax: ScanAxes, y0: float, y1: float, x0: float, x1: float) -> np.ndarray:
    """(ny, nx) bool: positions whose centre c has y0 ≤ c_y < y1 and x0 ≤ c_x < x1 (page
    units, corners in any order)."""
    _finite("rectangle", y0, y1, x0, x1)
    (y0, y1), (x0, x1) = sorted((y0, y1)), sorted((x0, x1))
    ny, nx = ax.shape
    cy = (np.arange(ny) + 0.5) * ax.step
    cx = (np.arange(nx) + 0.5) * ax.step
    mask = ((cy >= y0) & (cy < y1))[:, None] & ((cx >= x0) & (cx < x1))[None, :]
    return _nonempty(mask, "the drawn rectangle")


def rectangle_rows_cols(mask: np.ndarray) -> list[int] | None:
    """[y0, y1, x0, x1] (end exclusive) when ``mask`` is exactly that block of positions (the
    ``[[aperture]] rect`` of the configuration), else None."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return None
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    return [y0, y1, x0, x1] if mask[y0:y1, x0:x1].all() and mask.sum() == (y1 - y0) * (x1 - x0) else None


def brush(ax: ScanAxes, ys, xs, radius: float) -> np.ndarray:
    """(ny, nx) bool: positions whose centre is within ``radius`` of the stroke through the
    points (ys, xs) (page units): the region a round brush of that radius paints."""
    ys, xs = np.asarray(ys, float).ravel(), np.asarray(xs, float).ravel()
    if len(ys) != len(xs) or not len(ys):
        raise ShapeError("brush: the stroke has no points")
    if len(ys) > MAX_VERTICES:
        raise ShapeError(f"brush: {len(ys)} points in the stroke; at most {MAX_VERTICES}")
    _finite("brush", ys, xs, radius)
    if not radius > 0:
        raise ShapeError(f"brush: the radius must be > 0, got {radius:g} {ax.unit}")
    rows, cols = ax.index(ys, xs)
    r = radius / ax.step
    ny, nx = ax.shape
    mask = np.zeros((ny, nx), bool)
    a = np.column_stack([rows, cols])
    b = np.vstack([a[1:], a[-1:]])  # segments a[i] → a[i+1]; the last one a point
    for (ay, axx), (by, bx) in zip(a, b):
        r0, r1 = max(0, int(np.floor(min(ay, by) - r))), min(ny, int(np.ceil(max(ay, by) + r)) + 1)
        c0, c1 = max(0, int(np.floor(min(axx, bx) - r))), min(nx, int(np.ceil(max(axx, bx) + r)) + 1)
        if r1 <= r0 or c1 <= c0:
            continue
        yy, xx = np.mgrid[r0:r1, c0:c1].astype(float)
        dy, dx = by - ay, bx - axx
        length2 = dy * dy + dx * dx
        t = np.clip(((yy - ay) * dy + (xx - axx) * dx) / length2, 0, 1) if length2 > 0 else 0.0
        d2 = (yy - (ay + t * dy)) ** 2 + (xx - (axx + t * dx)) ** 2
        mask[r0:r1, c0:c1] |= d2 <= r * r
    return _nonempty(mask, "the brushed region")
