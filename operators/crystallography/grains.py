"""Per-grain diffraction: segment the grains of a scan from its sparse events, sum each
grain's patterns through a real-space aperture, find and index its Bragg peaks.

Works on a completed scan in CSR form (per stored frame offsets + flat uint32 detector
indices, stored frame = position * fpp + k, as written by ``EventStore.finalize`` and
``/events`` in docs/FORMAT.md) and never builds the dense 4D array. The method and its
parameters are described in docs/STAGES_GRAINS.md.

Examples
--------
>>> from operators.crystallography.grains import grain_diffraction           # doctest: +SKIP
>>> res = grain_diffraction(offsets, indices, (128, 128), (576, 576), 1,
...                         diffraction_sum, mrad_per_px=0.2, energy_keV=300.0)  # doctest: +SKIP
>>> res.labels.shape, res.grain_phase, res.peak_hkl.shape              # doctest: +SKIP
((128, 128), array(['Pt', 'Au', ...]), (n_peaks, 3))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit
from scipy import ndimage

from operators.apertures import RealSpaceApertures
from operators.crystallography.bragg import (PHASES, convolve_same, direct_beam, electron_wavelength_A,
                                             find_bragg_peaks, index_peaks, inv_A_per_px, li_ma_significance)
from operators.chunk import Chunk
from operators.kernels import NJIT, center_of, raise_if_bad, shape2
from operators.virtual import _lists_kernel

# Spots closer than this many disk radii to the direct beam overlap it (and its edge, which
# moves with the beam deflection): not used.
DIRECT_EXCLUSION_RADII = 2.0


# ------------------------------------------------------------------ events in, checked

def check_events(offsets, indices, scan_shape, frame_shape, frames_per_position,
                 check_pixels=True):
    """Validate a scan's CSR events; returns (offsets int64, indices uint32, fpp).

    offsets : (ny*nx*fpp + 1,) integer, non-decreasing, from 0 to len(indices).
    indices : (n_events,) uint32 flat detector pixel y*w + x, each < h*w (checked when
        ``check_pixels``; the kernels also skip and count pixels out of range).
    Raises ValueError naming the problem.
    """
    ny, nx = shape2(scan_shape, "scan_shape")
    h, w = shape2(frame_shape, "frame_shape")
    fpp = int(frames_per_position)
    if fpp < 1:
        raise ValueError(f"frames_per_position must be >= 1, got {frames_per_position}")
    offsets = np.asarray(offsets)
    if offsets.ndim != 1 or not np.issubdtype(offsets.dtype, np.integer):
        raise ValueError(f"offsets must be a 1-D integer array, got {offsets.dtype} "
                         f"shape {offsets.shape}")
    offsets = offsets.astype(np.int64, copy=False)
    n_frames = ny * nx * fpp
    if len(offsets) != n_frames + 1:
        raise ValueError(f"offsets has {len(offsets)} entries but a {ny}x{nx} scan with "
                         f"{fpp} frame(s) per position needs {n_frames + 1} (stored frames "
                         f"+ 1; flyback frames must be dropped, see docs/FORMAT.md)")
    indices = np.asarray(indices)
    if indices.dtype != np.uint32:
        raise ValueError(f"indices must be uint32 flat detector indices, got {indices.dtype}")
    if offsets[0] != 0 or offsets[-1] != len(indices) or np.any(np.diff(offsets) < 0):
        raise ValueError(f"offsets must start at 0, never decrease and end at len(indices) = "
                         f"{len(indices)}; got {offsets[0]}..{offsets[-1]}")
    if check_pixels and len(indices) and int(indices.max()) >= h * w:
        raise ValueError(f"indices hold pixel {int(indices.max())} >= {h * w} (the {h}x{w} "
                         f"detector): wrong frame_shape?")
    return offsets, indices, fpp


def _chunk(offsets, positions, indices) -> Chunk:
    n = len(positions)
    return Chunk(np.arange(n, dtype=np.int64), np.zeros(n, np.int16), positions, offsets,
                 indices)


def binned_positions(scan_shape, frames_per_position, bin_px) -> np.ndarray:
    """(ny*nx*fpp,) int64: the position of every stored frame on the scan binned by
    ``bin_px`` x ``bin_px`` (row // bin_px) * ceil(nx / bin_px) + col // bin_px."""
    ny, nx = scan_shape
    pos = np.arange(ny * nx, dtype=np.int64)
    row, col = np.divmod(pos, nx)
    nxb = -(-nx // bin_px)
    return np.repeat((row // bin_px) * nxb + col // bin_px, int(frames_per_position))


# ------------------------------------------------------------------ spots: local excess

@njit(**NJIT)
def _tile_hist_kernel(offsets, indices, tile_of_frame, w, n_pix, f, wc, hist):
    """hist[tile, (y // f) * wc + x // f] += 1 for every event; returns the number of
    events with a pixel index >= n_pix (skipped)."""
    bad = 0
    for i in range(tile_of_frame.shape[0]):
        t = tile_of_frame[i]
        for e in range(offsets[i], offsets[i + 1]):
            idx = np.int64(indices[e])
            if idx >= n_pix:
                bad += 1
                continue
            y = idx // w
            x = idx - y * w
            hist[t, (y // f) * wc + x // f] += 1
    return bad


def _ring_kernel(r_in, r_out):
    """Pixels with r_in <= distance < r_out of the centre (r_in 0: a closed disk)."""
    k = int(math.ceil(r_out))
    yy, xx = np.mgrid[-k:k + 1, -k:k + 1]
    d2 = yy * yy + xx * xx
    inside = d2 <= r_out * r_out if r_in <= 0 else d2 < r_out * r_out
    return (inside & (d2 >= r_in * r_in)).astype(np.float64)


def _windows(a):
    """(nty, ntx, ...) tile sums -> windows of 2x2 tiles (overlapping by one tile)."""
    if a.shape[0] > 1:
        a = a[:-1] + a[1:]
    if a.shape[1] > 1:
        a = a[:, :-1] + a[:, 1:]
    return a


@dataclass
class Spots:
    """Bragg spots of the whole scan.

    yx : (S, 2) float64 detector px of each spot centre.
    significance : (S,) float64, σ of the strongest local excess (see :func:`find_spots`).
    """

    yx: np.ndarray
    significance: np.ndarray


def find_spots(offsets, indices, scan_shape, frame_shape, frames_per_position, center,
               disk_radius_px, window_px, min_significance=6.0, max_spots=128) -> Spots:
    """Bragg disks anywhere in the scan, from their local excess in windows of the scan.

    A disk of a small grain is diluted in the whole-scan sum, so the scan is cut into
    windows of about ``window_px`` x ``window_px`` positions (tiles of window_px // 2,
    windows of 2 x 2 tiles, overlapping by half). In every window, on a detector binned so
    that a disk is about 3 coarse px across its radius, the counts in a disk of
    ``disk_radius_px`` around each pixel are compared with those in a ring from radius + 2
    to 2·radius around it (the local, mostly diffuse, background) by the Li & Ma
    significance. Spots are the local maxima, over the detector, of the largest
    significance over windows, at least ``min_significance`` σ, and at least 2 radii (+ a
    margin for the moving edge of the direct beam) from the direct beam at ``center``
    (y, x) px.

    Parameters
    ----------
    offsets, indices, scan_shape, frame_shape, frames_per_position : the scan's events, as
        for :func:`grain_diffraction`.
    center : (y, x) px of the direct beam; disk_radius_px : disk radius px.
    window_px : window side, scan px (about the smallest grain to find).
    min_significance, max_spots : detection threshold (σ) and at most this many spots.

    Returns
    -------
    :class:`Spots`, strongest first. Positions are good to about a coarse pixel (the
    per-grain peaks are measured later on full-resolution patterns).
    """
    ny, nx = shape2(scan_shape, "scan_shape")
    h, w = shape2(frame_shape, "frame_shape")
    offsets, indices, fpp = check_events(offsets, indices, (ny, nx), (h, w),
                                         frames_per_position, check_pixels=False)
    r = float(disk_radius_px)
    if not r > 0:
        raise ValueError(f"disk_radius_px must be > 0, got {disk_radius_px!r}")
    f = max(1, int(r // 3))
    hc, wc = -(-h // f), -(-w // f)
    b = max(1, int(window_px) // 2)
    nty, ntx = -(-ny // b), -(-nx // b)
    if nty * ntx * hc * wc > 80_000_000:
        raise ValueError(f"window_px={window_px} cuts the {ny}x{nx} scan into {nty * ntx} "
                         f"tiles of a {hc}x{wc} binned detector: too much memory; use a "
                         f"larger window_px")
    hist = np.zeros((nty * ntx, hc * wc), np.int32)
    bad = _tile_hist_kernel(offsets, indices, binned_positions((ny, nx), fpp, b), np.int64(w),
                            np.int64(h * w), np.int64(f), np.int64(wc), hist)
    raise_if_bad("find_spots", bad, 0, h * w, ny * nx)
    hist = hist.reshape(nty, ntx, hc, wc).astype(np.float64)
    # Disk and ring sums are linear: filter the tiles, then add 2x2 tiles into windows.
    disk = _ring_kernel(0.0, r / f)
    ring = _ring_kernel((r + 2.0) / f, 2.0 * r / f)
    z = li_ma_significance(_windows(convolve_same(hist, disk)),
                           _windows(convolve_same(hist, ring)), disk.sum() / ring.sum())
    yy, xx = np.mgrid[:hc, :wc]
    rho = np.hypot(yy - ((center[0] + 0.5) / f - 0.5), xx - ((center[1] + 0.5) / f - 0.5)) * f
    outside = rho >= DIRECT_EXCLUSION_RADII * r + max(3.0, 0.25 * r)
    zmax = np.where(outside, z.reshape(-1, hc, wc).max(axis=0), 0.0)
    # Disks of different grains may lie closer than a diameter: local maxima within half
    # a radius; a plateau's twin maxima closer than that are merged.
    rc = max(1, int(math.ceil(0.5 * r / f)))
    peak = (zmax == ndimage.maximum_filter(zmax, size=2 * rc + 1)) & (zmax >= min_significance)
    py, px = np.nonzero(peak)
    order = np.argsort(-zmax[py, px], kind="stable")
    kept = []
    for i in order:
        if all((py[i] - py[j]) ** 2 + (px[i] - px[j]) ** 2 > rc * rc for j in kept):
            kept.append(i)
        if len(kept) == max_spots:
            break
    py, px = py[kept], px[kept]
    zpad = np.pad(zmax, 1)
    yx = np.zeros((len(py), 2))
    for i, (a, c) in enumerate(zip(py, px)):  # a few dozen spots: sub-coarse-pixel centroid
        win = np.maximum(zpad[a:a + 3, c:c + 3], 0.0)
        s = win.sum()
        dy = (win.sum(1) @ np.arange(-1, 2)) / s
        dx = (win.sum(0) @ np.arange(-1, 2)) / s
        yx[i] = ((a + dy + 0.5) * f - 0.5, (c + dx + 0.5) * f - 0.5)
    return Spots(yx, zmax[py, px])


def _pixel_lists(spots_yx, frame_shape, r_disk, r_in, r_out):
    """Per detector pixel, the images it adds to: 2s for the disk of spot s (d <= r_disk),
    2s + 1 for its background ring (r_in <= d < r_out). CSR (ptr (h*w+1,), ids)."""
    h, w = frame_shape
    k = int(math.ceil(r_out))
    pix, ids = [], []
    for s, (cy, cx) in enumerate(np.asarray(spots_yx, float)):  # one small window per spot
        y0, y1 = max(0, int(cy) - k), min(h, int(cy) + k + 2)
        x0, x1 = max(0, int(cx) - k), min(w, int(cx) + k + 2)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        d2 = (yy - cy) ** 2 + (xx - cx) ** 2
        for sel, j in ((d2 <= r_disk ** 2, 2 * s),
                       ((d2 >= r_in ** 2) & (d2 < r_out ** 2), 2 * s + 1)):
            pix.append((yy[sel] * w + xx[sel]).astype(np.int64))
            ids.append(np.full(int(sel.sum()), j, np.int64))
    pix = np.concatenate(pix) if pix else np.zeros(0, np.int64)
    ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    order = np.argsort(pix, kind="stable")
    ptr = np.zeros(h * w + 1, np.int64)
    np.cumsum(np.bincount(pix, minlength=h * w), out=ptr[1:])
    return ptr, ids[order]


def spot_images(offsets, indices, scan_shape, frame_shape, frames_per_position, spots_yx,
                radius_px, bin_px=1):
    """Virtual dark-field images of the disks around spots and of their background rings,
    in one pass over the events.

    Parameters
    ----------
    spots_yx : (S, 2) spot centres, px. radius_px : disk radius px; the ring spans
        radius + 2 to 2·radius.
    bin_px : positions are summed in blocks of bin_px x bin_px.

    Returns
    -------
    (disk (S, nyb, nxb) int64, ring (S, nyb, nxb) int64, alpha) with nyb = ceil(ny/bin_px):
    electrons in each spot's disk and ring, and alpha (S,) = disk area / ring area (so
    disk - alpha·ring is the spot's excess over the local, mostly diffuse, background).
    """
    ny, nx = shape2(scan_shape, "scan_shape")
    h, w = shape2(frame_shape, "frame_shape")
    offsets, indices, fpp = check_events(offsets, indices, (ny, nx), (h, w),
                                         frames_per_position, check_pixels=False)
    spots_yx = np.asarray(spots_yx, np.float64).reshape(-1, 2)
    r = float(radius_px)
    if not r > 0:
        raise ValueError(f"radius_px must be > 0, got {radius_px!r}")
    ptr, ids = _pixel_lists(spots_yx, (h, w), r, r + 2.0, 2.0 * r)
    n_img = 2 * len(spots_yx)
    nyb, nxb = -(-ny // bin_px), -(-nx // bin_px)
    images = np.zeros((n_img, nyb * nxb), np.int64)
    bad = _lists_kernel(binned_positions((ny, nx), fpp, bin_px), offsets, indices, ptr, ids,
                        np.ones(len(ids), np.int64), images)
    raise_if_bad("spot_images", *bad, len(ptr) - 1, nyb * nxb)
    area = np.bincount(ids, minlength=n_img).astype(np.float64)
    alpha = area[0::2] / np.maximum(area[1::2], 1.0)
    images = images.reshape(n_img, nyb, nxb)
    return images[0::2], images[1::2], alpha


# ------------------------------------------------------------------ segmentation

@dataclass
class Segmentation:
    """Grains of a scan found from its spot images.

    labels : (ny, nx) int32 grain of each position, -1 for support / background.
    presence : (G, ny, nx) float32, each grain's presence map scaled to 1 at its maximum.
    spot_weights : (S, G) float64, how strongly each spot belongs to each grain: its
        smoothed excess counts per (binned) position where the grain's presence is 1.
    """

    labels: np.ndarray
    presence: np.ndarray
    spot_weights: np.ndarray


def _component(mask, seed):
    lab, _ = ndimage.label(mask)
    return lab == lab[seed] if lab[seed] else np.zeros_like(mask)


def _presence(Rc, res, members, amp, seed, shape):
    """A grain's presence map (scaled to 1 at its maximum) and every spot's weight on it.

    Rank one by alternating least squares, so the strong spots, measured best, shape the
    map; the map is kept on the seed's connected support (>= 2 % of the seed value); the
    weights are least-squares amplitudes of the unexplained excess ``res`` on the map's
    core (presence >= 0.5). None if the map vanishes at the seed.
    """
    w = np.where(members, amp, 0.0)
    for _ in range(3):
        wm = w[members]
        if not wm @ wm > 0:
            return None
        T = (wm @ Rc[members]) / (wm @ wm)
        # Where a minority of the members lights up (a spot shared with another grain),
        # the least-squares map would grow a lobe: no more than the members' lower
        # quartile (weighted by w², the better measured count more) there.
        n = Rc[members] / np.maximum(wm, 1e-300)[:, None]
        order = np.argsort(n, axis=0)
        cum = np.cumsum((wm ** 2)[order], axis=0)
        q = np.take_along_axis(n, order, 0)[(cum >= 0.25 * cum[-1]).argmax(0),
                                            np.arange(n.shape[1])]
        T = np.minimum(T, np.maximum(q, 0.0)).reshape(shape)
        if not T[seed] > 0:
            return None
        T = np.where(_component(T >= 0.02 * T[seed], seed), np.maximum(T, 0.0), 0.0)
        T /= T.max()
        t = T.ravel()
        core = t >= 0.5
        w = np.maximum(res[:, core] @ t[core] / (t[core] @ t[core]), 0.0)
    return T, w


def segment_grains(disk, ring, alpha, scan_shape, bin_px=1, smooth_px=1.5, seed_sigma=6.0,
                   member_fraction=0.2, min_spots=2, presence_threshold=0.15,
                   min_positions=None, max_grains=64) -> Segmentation:
    """Group the probe positions into grains by which Bragg spots light up there.

    Parameters
    ----------
    disk, ring, alpha : spot images from :func:`spot_images`, (S, nyb, nxb) and (S,).
    scan_shape : (ny, nx) of the full scan; bin_px : the binning of the spot images.
    smooth_px : Gaussian σ (binned px) applied to the spot images against shot noise.
    seed_sigma : a new grain needs a spot whose unexplained excess is this many σ above
        what background and the grains found so far predict.
    member_fraction : a spot shapes a grain's presence map when its unexplained excess in
        the seed region is at least this fraction of the seed spot's, and at least twice
        its excess in a band around the region.
    min_spots : grains shaped by fewer spots are dropped (a real grain shows ±g pairs)
        unless their seed reaches 3·seed_sigma.
    presence_threshold : a position belongs to the grain of highest presence there when
        that is at least this fraction of the grain's maximum; else label -1.
    min_positions : smaller grains (full-scan positions) are dropped; default the
        kernel's footprint 4π·smooth_px² binned positions.
    max_grains : at most this many extraction steps.

    Returns
    -------
    :class:`Segmentation`.

    Notes
    -----
    Each spot's excess over its local background (disk - alpha·ring counts, Gaussian
    smoothed) forms a matrix spots x positions, explained as a sum of grains (a greedy
    non-negative factorisation, weights x presence), strongest grain first:

    1. seed: the largest excess not yet explained, in σ of the Poisson noise of what is
       explained (background plus grains found so far), at a local maximum of the
       spot's map; stop below ``seed_sigma``;
    2. the seed spot's half-maximum region around it; members: spots whose unexplained
       excess is high there and low around it (see ``member_fraction``);
    3. presence map: the members' common map by rank-one least squares, kept on the
       seed's connected support, scaled to 1 at its maximum; every spot's weight is its
       least-squares amplitude on the map's core (presence >= 0.5), and weight x map is
       taken off its unexplained excess.

    A spot shared by two grains (two reflections on the same place of the detector) is so
    explained by both, and a grain whose spots are all shared is still found. A grain is
    kept when it has ``min_spots`` members and more than half of its core is not within
    the presence >= 0.25 region of a grain kept before (leftovers of a strong grain lie
    inside it; grains overlapping in projection by less than that still count).
    """
    ny, nx = shape2(scan_shape, "scan_shape")
    disk = np.asarray(disk, np.float64)
    ring = np.asarray(ring, np.float64)
    alpha = np.asarray(alpha, np.float64)
    if disk.ndim != 3 or ring.shape != disk.shape or alpha.shape != disk.shape[:1]:
        raise ValueError(f"segment_grains: disk and ring must be (S, nyb, nxb) and alpha (S,), "
                         f"got {disk.shape}, {ring.shape}, {alpha.shape}")
    S, nyb, nxb = disk.shape
    if (nyb, nxb) != (-(-ny // bin_px), -(-nx // bin_px)):
        raise ValueError(f"segment_grains: spot images are {nyb}x{nxb} but a {ny}x{nx} scan "
                         f"binned by {bin_px} is {-(-ny // bin_px)}x{-(-nx // bin_px)}")
    if min_positions is None:  # a grain smaller than the smoothing kernel is not resolved
        min_positions = int(math.ceil(4.0 * math.pi * smooth_px ** 2)) * bin_px * bin_px
    if S == 0:
        return Segmentation(np.full((ny, nx), -1, np.int32), np.zeros((0, ny, nx), np.float32),
                            np.zeros((0, 0)))
    X = np.stack([ndimage.gaussian_filter(e, smooth_px, mode="nearest")
                  for e in disk - alpha[:, None, None] * ring]).reshape(S, -1)
    X -= np.median(X, axis=1)[:, None]
    # Null hypothesis for a seed: background (median disk + alpha² ring counts) plus the
    # grains explained so far; Poisson variance of a smoothed map = Σk² · counts, with
    # Σk² = 1/(4πσ²), and at least one count per kernel footprint.
    k2 = 1.0 / (4.0 * math.pi * smooth_px ** 2)
    tot = disk + (alpha ** 2)[:, None, None] * ring
    # Median of the smoothed counts: sparse raw counts have a median of 0.
    mu = np.median(np.stack([ndimage.gaussian_filter(t, smooth_px, mode="nearest")
                             for t in tot]).reshape(S, -1), axis=1)[:, None]
    Xm = X.reshape(S, nyb, nxb)
    bumps = (Xm == ndimage.maximum_filter(Xm, size=(1, 3, 3))).reshape(S, -1)
    res = X.copy()
    grains, weights = [], []
    covered = np.zeros((nyb, nxb), bool)
    for _ in range(max_grains):
        noise = np.sqrt(np.maximum(mu + np.maximum(X - res, 0.0), k2) * k2)
        # Inside a grain found already, what is left is its misfit, not a new grain.
        cand = np.where(bumps & ~covered.ravel(), res / noise, 0.0)
        s0, p0 = np.unravel_index(np.argmax(cand), cand.shape)
        if cand[s0, p0] < seed_sigma:
            break
        bumps[s0, p0] = False  # never the same seed twice
        Rc = np.maximum(res, 0.0)
        seed = np.unravel_index(p0, (nyb, nxb))
        seed_map = Rc[s0].reshape(nyb, nxb)
        region = _component(seed_map >= 0.5 * Rc[s0, p0], seed)
        # A spot of an overlapping neighbour grain is higher in the band around the region.
        grow = max(2, int(round(math.sqrt(region.sum() / math.pi))))
        band = ndimage.binary_dilation(region, iterations=2 * grow) & \
            ~ndimage.binary_dilation(region, iterations=grow)
        amp = Rc[:, region.ravel()].mean(1)
        around = Rc[:, band.ravel()].mean(1) if band.any() else np.zeros(S)
        members = (amp >= member_fraction * amp[s0]) & (amp >= 2.0 * around)
        members[s0] = True
        fit = _presence(Rc, res, members, amp, seed, (nyb, nxb))
        if fit is None:
            continue
        T, w = fit
        res -= w[:, None] * T.ravel()[None, :]
        core = T >= 0.5
        own = core & ~covered
        # A grain seen in one spot only (its Friedel mate off the detector, or shared with
        # another grain's reflection) must be strong; weak single-spot leftovers are misfit.
        enough = members.sum() >= min_spots or cand[s0, p0] >= 3.0 * seed_sigma
        if enough and own.sum() > 0.5 * core.sum():
            grains.append(T)
            weights.append(w)
            covered |= T >= 0.25
    if not grains:
        return Segmentation(np.full((ny, nx), -1, np.int32), np.zeros((0, ny, nx), np.float32),
                            np.zeros((S, 0)))
    # Back to the full scan grid: bilinear between binned position centres.
    rr, cc = np.meshgrid((np.arange(ny) + 0.5) / bin_px - 0.5,
                         (np.arange(nx) + 0.5) / bin_px - 0.5, indexing="ij")
    full = np.stack([ndimage.map_coordinates(g, [rr, cc], order=1, mode="nearest")
                     for g in grains])
    best = full.argmax(0)
    ok = np.take_along_axis(full, best[None], 0)[0] >= presence_threshold
    labels = np.where(ok, best, -1).astype(np.int32)
    keep = [g for g in range(len(grains)) if (labels == g).sum() >= min_positions]
    remap = np.full(len(grains) + 1, -1, np.int32)
    remap[keep] = np.arange(len(keep))
    labels = remap[labels]  # label -1 reads the last entry, which stays -1
    return Segmentation(labels, full[keep].astype(np.float32), np.stack(weights, 1)[:, keep])


# ------------------------------------------------------------------ the feature

@dataclass
class GrainDiffraction:
    """Per-grain diffraction of one scan (every field a numpy array, a number or a string).

    Scan (G grains): labels (ny, nx) int32, grain of each position, -1 for support /
    background; masks (G, ny, nx) bool, each grain's real-space aperture (its positions
    without those it shares with an overlapping grain, see :func:`aperture_masks`);
    presence (G, ny, nx) float32, each grain's map, 1 at its maximum; patterns (G, h, w)
    int64, summed diffraction pattern of each aperture.

    Spots of the whole scan (S): spot_yx (S, 2) px; spot_significance (S,) σ; spot_weights
    (S, G) each spot's smoothed excess counts per (binned) position at each grain's maximum.

    Calibration: center_yx (2,) px and disk_radius_px of the direct beam of the whole scan;
    wavelength_A; inv_A_per_px (Å⁻¹ per detector px).

    Per grain (G,): grain_n_positions (aperture size); grain_center_yx (G, 2) direct beam
    in its pattern, px; grain_phase (str, see bragg.Indexing); grain_a_ref_A, grain_a_fit_A
    Å; grain_orientation (G, 3, 3) rotation crystal -> specimen; grain_lattice (G, 3, 3) Å,
    rows a1..a3 in the specimen frame; grain_zone_axis (G, 3) int; grain_zone_angle_deg;
    grain_n_peaks; grain_n_indexed; grain_rms_inv_A (RMS |q - q_model|).

    Peaks (P,), grain by grain, strongest first: peak_grain int32; peak_yx, peak_sigma_yx
    (P, 2) px; peak_q_yx (P, 2) Å⁻¹ from the grain's direct beam; peak_q Å⁻¹; peak_d_A =
    1/peak_q (in-plane spacing); peak_hkl (P, 3) int, (0, 0, 0) if not indexed;
    peak_indexed bool; peak_d_ideal_A = a_ref/|hkl|; peak_q_model_yx (P, 2) Å⁻¹ in the fit;
    peak_excitation_error Å⁻¹; peak_intensity, peak_sigma counts; peak_significance σ.

    Parameters used: window_px, bin_px (scan px).
    """

    labels: np.ndarray
    masks: np.ndarray
    presence: np.ndarray
    patterns: np.ndarray
    spot_yx: np.ndarray
    spot_significance: np.ndarray
    spot_weights: np.ndarray
    center_yx: np.ndarray
    disk_radius_px: float
    wavelength_A: float
    inv_A_per_px: float
    grain_n_positions: np.ndarray
    grain_center_yx: np.ndarray
    grain_phase: np.ndarray
    grain_a_ref_A: np.ndarray
    grain_a_fit_A: np.ndarray
    grain_orientation: np.ndarray
    grain_lattice: np.ndarray
    grain_zone_axis: np.ndarray
    grain_zone_angle_deg: np.ndarray
    grain_n_peaks: np.ndarray
    grain_n_indexed: np.ndarray
    grain_rms_inv_A: np.ndarray
    peak_grain: np.ndarray
    peak_yx: np.ndarray
    peak_sigma_yx: np.ndarray
    peak_q_yx: np.ndarray
    peak_q: np.ndarray
    peak_d_A: np.ndarray
    peak_hkl: np.ndarray
    peak_indexed: np.ndarray
    peak_d_ideal_A: np.ndarray
    peak_q_model_yx: np.ndarray
    peak_excitation_error: np.ndarray
    peak_intensity: np.ndarray
    peak_sigma: np.ndarray
    peak_significance: np.ndarray
    window_px: int
    bin_px: int

    @property
    def n_grains(self) -> int:
        return len(self.grain_phase)

    def summary(self) -> str:
        """One line per grain: phase, fitted a, zone axis, peaks indexed, positions."""
        lines = [f"{self.n_grains} grain(s), {len(self.spot_yx)} Bragg spot(s) in the scan"]
        for g in range(self.n_grains):
            z = "".join(str(int(v)) if v >= 0 else f"-{-int(v)}" for v in self.grain_zone_axis[g])
            lines.append(
                f"grain {g}: {self.grain_phase[g] or '(not indexed)'} a = "
                f"{self.grain_a_fit_A[g]:.3f} Å (ref {self.grain_a_ref_A[g]:.3f}), near [{z}] "
                f"({self.grain_zone_angle_deg[g]:.1f}°), {self.grain_n_indexed[g]}/"
                f"{self.grain_n_peaks[g]} peaks indexed, {self.grain_n_positions[g]} positions")
        return "\n".join(lines)


def aperture_masks(seg: Segmentation, purity=0.25) -> np.ndarray:
    """(G, ny, nx) bool real-space aperture of each grain: its positions (labels == g)
    where every other grain's presence is below ``purity`` times its own, so that a grain
    overlapping another in projection is summed without the other's reflections. Where
    that leaves fewer than a quarter of the grain's positions, all of them are used."""
    G = len(seg.presence)
    lab = seg.labels[None] == np.arange(G)[:, None, None]
    if G < 2:
        return lab
    pres = seg.presence
    other = np.stack([np.delete(pres, g, axis=0).max(0) for g in range(G)])
    pure = lab & (other < purity * pres)
    enough = pure.reshape(G, -1).sum(1) >= 0.25 * lab.reshape(G, -1).sum(1)
    return np.where(enough[:, None, None], pure, lab)


def grain_diffraction(offsets, indices, scan_shape, frame_shape, frames_per_position,
                      diffraction_sum, mrad_per_px, energy_keV=300.0, center=None,
                      disk_radius_px=None, phases=PHASES, window_px=None,
                      spot_significance=6.0, max_spots=128, smooth=1.5, seed_sigma=6.0,
                      presence_threshold=0.15, min_spots=2, min_positions=None, purity=0.25,
                      peak_significance=5.0, max_peaks=64, excitation_tol_inv_A=0.05,
                      index_tol=0.015) -> GrainDiffraction:
    """Segment the grains of a scan, sum each grain's patterns and index its Bragg peaks.

    Parameters
    ----------
    offsets : (ny*nx*fpp + 1,) integer CSR offsets of the stored frames (position*fpp + k).
    indices : (n_events,) uint32 flat detector pixel y*w + x.
    scan_shape : (ny, nx); frame_shape : (h, w); frames_per_position : fpp.
    diffraction_sum : (h, w) counts, the whole scan's summed pattern (direct beam).
    mrad_per_px : detector calibration; energy_keV : beam energy (wavelength).
    center : (y, x) px starting guess of the direct beam (default: found in the sum).
    disk_radius_px : disk radius (convergence semi-angle / mrad_per_px); default measured
        from the direct beam in ``diffraction_sum``.
    phases : candidate cubic phases (operators.crystallography.bragg.Phase); default Pt, Au, MgO.
    window_px : side (scan px) of the windows in which spots are searched and about the
        size of the smallest grain to find; default max(4, min(ny, nx) // 8). Spot images
        are binned by window_px // 8 and smoothed with σ = ``smooth`` binned px.
    spot_significance, max_spots : spot detection (see :func:`find_spots`).
    seed_sigma, presence_threshold, min_spots, min_positions : segmentation (see
        :func:`segment_grains`).
    purity : apertures leave out positions where another grain's presence reaches this
        fraction of the grain's own (see :func:`aperture_masks`).
    peak_significance, max_peaks : per-grain peaks (see bragg.find_bragg_peaks).
    excitation_tol_inv_A, index_tol : indexing (see bragg.index_peaks).

    Returns
    -------
    :class:`GrainDiffraction`. The events are read three times (spot windows, spot
    images, grain apertures), each pass a numba kernel; no dense 4D array is built.
    """
    ny, nx = shape2(scan_shape, "scan_shape")
    h, w = shape2(frame_shape, "frame_shape")
    offsets, indices, fpp = check_events(offsets, indices, (ny, nx), (h, w),
                                         frames_per_position)
    dsum = np.asarray(diffraction_sum)
    if dsum.shape != (h, w):
        raise ValueError(f"diffraction_sum is {dsum.shape} but the detector is {h}x{w}")
    lam = electron_wavelength_A(energy_keV)
    k = inv_A_per_px(energy_keV, mrad_per_px)
    start = None if center is None else center_of((h, w), center)
    beam = direct_beam(dsum, start, disk_radius_px)
    r = beam.radius_px
    window = max(4, min(ny, nx) // 8) if window_px is None else int(window_px)
    if window < 2:
        raise ValueError(f"window_px must be >= 2 scan px, got {window_px}")
    sb = max(1, window // 8)
    spots = find_spots(offsets, indices, (ny, nx), (h, w), fpp, beam.yx, r, window,
                       spot_significance, max_spots)
    disk, ring, alpha = spot_images(offsets, indices, (ny, nx), (h, w), fpp, spots.yx, r, sb)
    seg = segment_grains(disk, ring, alpha, (ny, nx), sb, smooth, seed_sigma,
                         min_spots=min_spots, presence_threshold=presence_threshold,
                         min_positions=min_positions)
    masks = aperture_masks(seg, purity)
    G = len(masks)
    if G:
        op = RealSpaceApertures(masks, [f"g{g}" for g in range(G)], (h, w), name="grains")
        state = op.new_state()
        op.process(state, _chunk(offsets, np.repeat(np.arange(ny * nx, dtype=np.int64), fpp),
                                 indices))
        patterns = state["patterns"].reshape(G, h, w)
    else:
        patterns = np.zeros((0, h, w), np.int64)
    found = []
    for g in range(G):
        gb = direct_beam(patterns[g], beam.yx, r)
        found.append((gb, find_bragg_peaks(patterns[g], gb.yx, r, peak_significance,
                                           max_peaks)))
    # A grain is found by its spots, so its summed pattern must show Bragg peaks; one that
    # shows none is a leftover of the segmentation (the faint tails of grains), not a grain.
    keep = [g for g in range(G) if len(found[g][1])]
    if len(keep) < G:
        seg, masks, patterns = _drop_grains(seg, keep), masks[keep], patterns[keep]
    per_grain, peaks = [], []
    for i, g in enumerate(keep):
        gb, pk = found[g]
        q = (pk.yx - gb.yx) * k
        sq = np.sqrt((pk.sigma_yx ** 2).mean(1)) * k
        ix = index_peaks(q, sq, phases, wavelength_A=lam,
                         excitation_tol_inv_A=excitation_tol_inv_A, index_tol=index_tol)
        per_grain.append((gb, ix, len(pk)))
        peaks.append((i, pk, q, ix))
    return _assemble(seg, masks, patterns, spots, beam, lam, k, per_grain, peaks, window, sb)


def _drop_grains(seg: Segmentation, keep) -> Segmentation:
    """The segmentation with only grains ``keep`` (renumbered; the others' positions -1)."""
    remap = np.full(len(seg.presence) + 1, -1, np.int32)
    remap[keep] = np.arange(len(keep))
    return Segmentation(remap[seg.labels], seg.presence[keep], seg.spot_weights[:, keep])


def _assemble(seg, masks, patterns, spots, beam, lam, k, per_grain, peaks, window, sb):
    G = len(per_grain)

    def col(f, shape=(), dtype=np.float64):
        vals = [f(*p) for p in peaks]
        return np.concatenate(vals).astype(dtype) if vals else np.zeros((0,) + shape, dtype)

    q = col(lambda g, pk, q, ix: q, (2,))
    return GrainDiffraction(
        labels=seg.labels, masks=masks, presence=seg.presence, patterns=patterns,
        spot_yx=spots.yx, spot_significance=spots.significance, spot_weights=seg.spot_weights,
        center_yx=np.asarray(beam.yx, float), disk_radius_px=float(beam.radius_px),
        wavelength_A=lam, inv_A_per_px=k,
        grain_n_positions=masks.reshape(G, -1).sum(1).astype(np.int64) if G
        else np.zeros(0, np.int64),
        grain_center_yx=np.array([gb.yx for gb, _, _ in per_grain], float).reshape(G, 2),
        grain_phase=np.array([ix.phase for _, ix, _ in per_grain], dtype="U16"),
        grain_a_ref_A=np.array([ix.a_ref_A for _, ix, _ in per_grain], float),
        grain_a_fit_A=np.array([ix.a_fit_A for _, ix, _ in per_grain], float),
        grain_orientation=np.array([ix.orientation for _, ix, _ in per_grain],
                                   float).reshape(G, 3, 3),
        grain_lattice=np.array([ix.lattice for _, ix, _ in per_grain], float).reshape(G, 3, 3),
        grain_zone_axis=np.array([ix.zone_axis for _, ix, _ in per_grain],
                                 np.int64).reshape(G, 3),
        grain_zone_angle_deg=np.array([ix.zone_angle_deg for _, ix, _ in per_grain], float),
        grain_n_peaks=np.array([n for _, _, n in per_grain], np.int64),
        grain_n_indexed=np.array([ix.n_indexed for _, ix, _ in per_grain], np.int64),
        grain_rms_inv_A=np.array([ix.rms_residual_inv_A for _, ix, _ in per_grain], float),
        peak_grain=col(lambda g, pk, q, ix: np.full(len(pk), g), (), np.int32),
        peak_yx=col(lambda g, pk, q, ix: pk.yx, (2,)),
        peak_sigma_yx=col(lambda g, pk, q, ix: pk.sigma_yx, (2,)),
        peak_q_yx=q,
        peak_q=np.linalg.norm(q, axis=1),
        peak_d_A=1.0 / np.linalg.norm(q, axis=1),
        peak_hkl=col(lambda g, pk, q, ix: ix.hkl, (3,), np.int64),
        peak_indexed=col(lambda g, pk, q, ix: ix.indexed, (), bool),
        peak_d_ideal_A=col(lambda g, pk, q, ix: ix.d_ideal_A),
        peak_q_model_yx=col(lambda g, pk, q, ix: ix.q_model_yx, (2,)),
        peak_excitation_error=col(lambda g, pk, q, ix: ix.excitation_error),
        peak_intensity=col(lambda g, pk, q, ix: pk.intensity),
        peak_sigma=col(lambda g, pk, q, ix: pk.sigma),
        peak_significance=col(lambda g, pk, q, ix: pk.significance),
        window_px=int(window), bin_px=int(sb))
