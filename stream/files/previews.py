"""PNG previews a microscopist can read: images with what they show and their units in the
title, a scale bar in Å, colour bars with units, the virtual detectors drawn on the summed
diffraction pattern (log scale, axes in mrad where calibrated), the centre of mass as a colour
wheel and as components, and missing probe positions shown in a colour of their own.

Two layers, so that other front ends (the live viewer's static exports) draw the same pictures:

- ``draw_*(ax, arrays…, calibration…)`` draw one panel on a matplotlib Axes and return what
  they drew; ``*_figure(…, fig=None)`` put one or a few panels on a Figure (a new one unless
  given) and return it. Pure functions of numpy arrays and plain calibration values: scan
  step in Å per position (``step_A``), detector mrad per px and centre (y, x) px, detectors as
  plain dicts (``stream.config.detector_regions``), missing positions as a bool mask.
- ``write_*`` save those figures as PNG files for a scan (``write_scan_previews``) or any set
  of named images (``write_previews``).

Figures are drawn on an Agg canvas of their own: no pyplot, so neither the user's backend nor
any global state is touched, and concurrent finalizations do not share a figure.

Example::

    fig = image_figure(bf, title="bf: bright field", unit="counts", step_A=0.4,
                       missing=position_frames < 4)
    fig.savefig("bf.png")
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, hsv_to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Circle, Patch
from mpl_toolkits.axes_grid1 import make_axes_locatable
from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

# Missing positions: a colour no image colour map here uses (grey scale, magma, RdBu, the
# colour wheel's fully saturated hues), so a gap is seen as a gap and not as a dark pixel.
MISSING_COLOUR = "#39ff14"  # fluorescent green
WHEEL_MISSING_COLOUR = "#7f7f7f"  # on the colour wheel (no hue is grey)
DETECTOR_COLOURS = ("#00e5ff", "#ffd000", "#ff5ce1", "#7dff7a", "#ff8c3a", "#b59bff")
NAMES = {"bf": "bright field", "adf": "annular dark field", "haadf": "high-angle annular dark field",
         "abf": "annular bright field", "com_x": "centre of mass x", "com_y": "centre of mass y",
         "diffraction_sum": "summed diffraction pattern", "phase": "phase"}
DPI = 100


def new_figure(width_in: float, height_in: float) -> Figure:
    """A Figure on its own Agg canvas (nothing global)."""
    fig = Figure(figsize=(width_in, height_in), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def plural(n: int, word: str, words: str | None = None) -> str:
    """'1 position', '3 positions' ('1 class', '2 classes' with ``words``)."""
    return f"{n:,} {word}" if n == 1 else f"{n:,} {words or word + 's'}"


def result_title(name: str) -> str:
    """'bf: bright field' for known result names, the name itself otherwise."""
    what = NAMES.get(name.removesuffix("_mrad"))
    return f"{name.removesuffix('_mrad')}: {what}" if what else name


# ---------------------------------------------------------------- scale bars and colour bars

def nice_length(max_value: float) -> float:
    """The largest of 1, 2, 5 × 10^k not above ``max_value`` (> 0)."""
    k = np.floor(np.log10(max_value))
    for m in (5, 2, 1):
        if m * 10 ** k <= max_value:
            return float(m * 10 ** k)
    return float(10 ** k)


def _length_text(value: float, unit: str) -> str:
    return f"{value:g} {unit}"


def add_scale_bar(ax, step_A: float | None, width_px: int, color: str = "white") -> str:
    """A scale bar of about a fifth of the image width in the lower right corner of ``ax``
    (an image of ``width_px`` columns, one per scan position); in Å when ``step_A`` (Å per
    position) is known, else in px. Returns the bar's label."""
    if step_A is not None and np.isfinite(step_A) and step_A > 0:
        length = nice_length(width_px * step_A / 5)
        label, length_px = _length_text(length, "Å"), length / step_A
    else:
        length_px = nice_length(max(1.0, width_px / 5))
        label = _length_text(length_px, "px")
    bar = AnchoredSizeBar(ax.transData, length_px, label, "lower right", pad=0.3, borderpad=0.4,
                          sep=3, color=color, frameon=True, size_vertical=max(width_px / 120, 0.5),
                          fontproperties={"size": 8})
    bar.patch.set(facecolor="black", alpha=0.45, edgecolor="none")
    ax.add_artist(bar)
    return label


def add_colorbar(ax, mappable, label: str):
    """A colour bar right of ``ax``, labelled with what and the unit."""
    cax = make_axes_locatable(ax).append_axes("right", size="5%", pad=0.05)
    cax.set_label("<colorbar>")  # as matplotlib names the axes of its own colour bars
    cb = ax.figure.colorbar(mappable, cax=cax)
    cb.set_label(label, fontsize=8)
    cb.ax.tick_params(labelsize=7)
    return cb


def _missing_legend(ax, n_missing: int, color: str) -> None:
    if n_missing:
        ax.legend(handles=[Patch(color=color, label=f"missing ({n_missing:,})")], loc="upper right",
                  fontsize=7, framealpha=0.7, handlelength=1.0)


def _display_range(values: np.ndarray, percentiles=(0.5, 99.5), symmetric=False) -> tuple[float, float]:
    """Colour limits from the finite values (percentiles, so that a few hot pixels or gaps do
    not set the contrast); symmetric about 0 for signed quantities."""
    v = values[np.isfinite(values)]
    if v.size == 0:
        return 0.0, 1.0
    if symmetric:
        m = float(np.percentile(np.abs(v), percentiles[1]))
        return (-m, m) if m > 0 else (-1.0, 1.0)
    lo, hi = (float(x) for x in np.percentile(v, percentiles))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def missing_positions(position_frames, expected_per_position: int | None) -> np.ndarray | None:
    """(ny, nx) bool: positions that received fewer frame parts than expected (a part of
    some frame never arrived), or None without a completeness map."""
    if position_frames is None:
        return None
    pf = np.asarray(position_frames)
    return pf < (expected_per_position or max(1, int(pf.max(initial=1))))


# ---------------------------------------------------------------- panels

def draw_scan_image(ax, image, *, title: str, unit: str, step_A: float | None = None,
                    missing=None, cmap: str = "gray", symmetric: bool = False):
    """A scan-shaped image (ny, nx) with a colour bar in ``unit``, a scale bar (Å from
    ``step_A``, else px), and the positions of ``missing`` ((ny, nx) bool) masked in
    MISSING_COLOUR with their number in the title. NaN (e.g. a centre of mass where no
    electron arrived) is shown in the same colour. Returns the AxesImage."""
    img = np.asarray(image, dtype=np.float64)
    miss = np.zeros(img.shape, bool) if missing is None else np.asarray(missing, bool)
    bad = miss | ~np.isfinite(img)
    lo, hi = _display_range(img[~bad], symmetric=symmetric)
    cm = _cmap(cmap, MISSING_COLOUR)
    im = ax.imshow(np.ma.masked_array(img, bad), cmap=cm, vmin=lo, vmax=hi, interpolation="nearest")
    n_missing = int(miss.sum())
    good = img[~bad]
    extra = [f"{plural(n_missing, 'position')} missing"] if n_missing else []
    if good.size and np.ptp(good) == 0:  # a flat image says so instead of looking empty
        extra.append(f"constant {good[0]:g}")
    elif not good.size:
        extra.append("no data")
    ax.set_title(f"{title} ({unit})" + (f"\n{'; '.join(extra)}" if extra else ""), fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    add_colorbar(ax, im, unit)
    add_scale_bar(ax, step_A, img.shape[1])
    if step_A is None:
        ax.set_xlabel("scale in scan px (no scan step in the metadata)", fontsize=7)
    _missing_legend(ax, n_missing, MISSING_COLOUR)
    return im


def _cmap(name: str, bad: str, under: str | None = None):
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad=bad, under=under)


def _detector_artists(ax, detectors, to_axes, scale: float) -> list[str]:
    """Outlines of the virtual detectors: circles for disks and annuli (centre and radii
    through ``to_axes``/``scale``), contours for masks. Returns the names drawn."""
    drawn = []
    for k, d in enumerate(detectors or ()):
        color = DETECTOR_COLOURS[k % len(DETECTOR_COLOURS)]
        name = d["name"]
        if d.get("shape") in ("disk", "annulus"):
            cy, cx = to_axes(d["center"])
            radii = [r for r in (d.get("inner_px") or 0.0, d["outer_px"]) if r > 0]
            for j, r in enumerate(radii):
                ax.add_patch(Circle((cx, cy), r * scale, fill=False, ec=color, lw=1.2,
                                    ls="-" if j == len(radii) - 1 else "--",
                                    label=name if j == len(radii) - 1 else None))
        elif d.get("mask") is not None:
            mask = np.asarray(d["mask"]) != 0
            h, w = mask.shape
            (y0, x0), (y1, x1) = to_axes((0, 0)), to_axes((h - 1, w - 1))
            ax.contour(np.linspace(x0, x1, w), np.linspace(y0, y1, h), mask.astype(float), [0.5],
                       colors=[color], linewidths=1.0)
            ax.plot([], [], color=color, label=name)  # a legend entry for the contour
        else:
            continue
        drawn.append(name)
    if drawn:
        ax.legend(loc="upper right", fontsize=7, framealpha=0.6, title="detectors", title_fontsize=7)
    return drawn


def draw_diffraction(ax, pattern, *, mrad_per_px: float | None = None, center=None, detectors=(),
                     title: str = "summed diffraction pattern", unit: str = "counts"):
    """A detector-shaped pattern (h, w) on a log colour scale (zero counts in the darkest
    colour), axes in mrad from ``center`` (y, x) px when ``mrad_per_px`` is known, else in px;
    the ``detectors`` (``stream.config.detector_regions``) drawn on it. Returns the AxesImage."""
    p = np.asarray(pattern, dtype=np.float64)
    h, w = p.shape
    cy, cx = center if center is not None else ((h - 1) / 2, (w - 1) / 2)
    positive = p[np.isfinite(p) & (p > 0)]
    if positive.size:
        vmin = max(float(np.percentile(positive, 1)), float(positive.min()))
        vmax = max(float(positive.max()), vmin * 10)
    else:
        vmin, vmax = 1.0, 10.0
    cm = _cmap("magma", "black", "black")
    if mrad_per_px:
        s = float(mrad_per_px)
        extent = [(-0.5 - cx) * s, (w - 0.5 - cx) * s, (h - 0.5 - cy) * s, (-0.5 - cy) * s]
        axis_unit = "mrad"

        def to_axes(yx):
            return ((yx[0] - cy) * s, (yx[1] - cx) * s)
    else:
        s, extent, axis_unit = 1.0, None, "px"

        def to_axes(yx):
            return (yx[0], yx[1])
    im = ax.imshow(np.ma.masked_array(p, ~(p > 0)), cmap=cm, norm=LogNorm(vmin=vmin, vmax=vmax),
                   interpolation="nearest", extent=extent)
    ax.set_xlabel(f"detector x ({axis_unit})" if axis_unit == "px" else "scattering angle x (mrad)", fontsize=8)
    ax.set_ylabel(f"detector y ({axis_unit})" if axis_unit == "px" else "scattering angle y (mrad)", fontsize=8)
    ax.tick_params(labelsize=7)
    total = float(np.nansum(p))
    ax.set_title(f"{title} (log scale)\n{total:,.0f} electrons"
                 + ("" if mrad_per_px else "; detector not calibrated: px"), fontsize=9)
    add_colorbar(ax, im, f"{unit} per pixel (log)")
    _detector_artists(ax, detectors, to_axes, s)
    return im


def com_rgb(com_y, com_x, max_magnitude: float | None = None) -> tuple[np.ndarray, float]:
    """The centre of mass as colours: direction as hue (x+ red, y+ … around the wheel),
    magnitude as value (black: no deflection; full at ``max_magnitude``, default the 99th
    percentile). Returns (rgb (ny, nx, 3) float in [0, 1], NaN where either component is NaN;
    the magnitude of full value)."""
    y, x = np.asarray(com_y, np.float64), np.asarray(com_x, np.float64)
    mag = np.hypot(y, x)
    ok = np.isfinite(mag)
    if max_magnitude is None:
        max_magnitude = float(np.percentile(mag[ok], 99)) if ok.any() else 1.0
    max_magnitude = max_magnitude if max_magnitude > 0 else 1.0
    hue = (np.arctan2(y, x) / (2 * np.pi)) % 1.0
    hsv = np.stack([np.where(ok, hue, 0), np.ones_like(mag), np.clip(np.where(ok, mag, 0) / max_magnitude, 0, 1)],
                   axis=-1)
    rgb = hsv_to_rgb(hsv)
    rgb[~ok] = np.nan
    return rgb, max_magnitude


def draw_com_wheel(ax, com_y, com_x, *, unit: str, step_A: float | None = None, missing=None,
                   title: str = "centre of mass"):
    """The centre of mass (ny, nx each, in ``unit``) as a colour wheel image with a legend
    wheel beside it (hue: direction of the deflection; brightness: its magnitude up to the
    99th percentile), missing positions in grey. Returns the legend wheel's Axes."""
    rgb, vmax = com_rgb(com_y, com_x)
    miss = np.zeros(rgb.shape[:2], bool) if missing is None else np.asarray(missing, bool)
    grey = np.array([int(WHEEL_MISSING_COLOUR[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    bad = miss | ~np.isfinite(rgb).all(axis=-1)
    rgb = np.where(bad[..., None], grey, rgb)
    ax.imshow(rgb, interpolation="nearest")
    n_missing = int(miss.sum())
    ax.set_title(f"{title}: direction and magnitude ({unit})"
                 + (f"\n{plural(n_missing, 'position')} missing" if n_missing else ""), fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    add_scale_bar(ax, step_A, rgb.shape[1])
    _missing_legend(ax, n_missing, WHEEL_MISSING_COLOUR)
    wax = make_axes_locatable(ax).append_axes("right", size="28%", pad=0.08)
    n = 101
    yy, xx = np.mgrid[-1:1:n * 1j, -1:1:n * 1j]  # image rows point down, as in the scan
    wheel, _ = com_rgb(yy * vmax, xx * vmax, vmax)
    wheel[np.hypot(yy, xx) > 1] = 1.0
    wax.imshow(wheel, extent=[-vmax, vmax, vmax, -vmax], interpolation="bilinear")
    wax.set_title(f"|CoM| ≤ {vmax:.3g} {unit}", fontsize=7)
    wax.set_xticks([-vmax, 0, vmax], ["−", "x", "+"], fontsize=7)
    wax.set_yticks([-vmax, 0, vmax], ["−", "y", "+"], fontsize=7)
    wax.yaxis.tick_right()  # (on the left they would sit under the image)
    wax.set_aspect("equal")
    return wax


def draw_completeness(ax, position_frames, expected_per_position: int, step_A: float | None = None):
    """Frame parts received per position (ny, nx): expected = frames per position × sources;
    positions short of it are counted in the title. Returns the AxesImage."""
    pf = np.asarray(position_frames)
    short = int((pf < expected_per_position).sum())
    im = ax.imshow(pf, cmap="viridis", vmin=0, vmax=max(1, expected_per_position), interpolation="nearest")
    ax.set_title(f"frame parts received per position (of {expected_per_position})\n"
                 + (f"{plural(short, 'position')} incomplete" if short else "every position complete"), fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    add_colorbar(ax, im, "frame parts")
    add_scale_bar(ax, step_A, pf.shape[1])
    return im


def draw_columns(ax, image, y_px, x_px, *, unit: str, step_A: float | None = None,
                 title: str = "atomic columns", missing=None):
    """Atomic columns (positions in scan px) marked on the image they were found in, with its
    colour bar and a scale bar."""
    draw_scan_image(ax, image, title=f"{title}: {len(y_px):,} found", unit=unit, step_A=step_A,
                    missing=missing)
    ax.plot(x_px, y_px, "+", color="#ff3030", ms=4, mew=0.8, label="column")
    ax.set_xlim(-0.5, np.shape(image)[1] - 0.5)
    ax.set_ylim(np.shape(image)[0] - 0.5, -0.5)


def draw_counting(ax, cross_sections, *, means, weights, sigma: float, class_counts,
                  unit: str = "image units·px²", selection: str = ""):
    """Histogram of the columns' scattering cross-sections with the fitted Gaussian mixture
    (one component per atom count, scaled to columns per bin) and each component's count."""
    xs = np.asarray(cross_sections, np.float64)
    xs = xs[np.isfinite(xs)]
    bins = max(20, int(np.sqrt(len(xs)) * 2)) if len(xs) else 20
    counts, edges, _ = ax.hist(xs, bins=bins, color="0.75", edgecolor="0.55", lw=0.5, label="columns")
    width = edges[1] - edges[0] if len(edges) > 1 else 1.0
    grid = np.linspace(edges[0], edges[-1], 2000)
    total = np.zeros_like(grid)
    top = 1.3 * max(1.0, float(np.max(counts, initial=0)))  # the histogram sets the scale
    for k, (mu, w, n) in enumerate(zip(means, weights, class_counts)):
        g = len(xs) * width * w * np.exp(-0.5 * ((grid - mu) / sigma) ** 2) / (sigma * np.sqrt(2 * np.pi))
        total += g
        ax.plot(grid, g, lw=1.0, color=f"C{k % 10}", label=f"{int(n)} atom{'s' if int(n) != 1 else ''}")
        ax.annotate(str(int(n)), (mu, min(g.max(), 0.92 * top)), textcoords="offset points", xytext=(0, 3),
                    ha="center", fontsize=7)
    if len(means) > 1:
        ax.plot(grid, total, "k--", lw=0.8, label="mixture")
    if total.max(initial=0) > top:  # narrow components would flatten the histogram: clip them
        ax.set_ylim(0, top)
    ax.set_xlabel(f"scattering cross-section ({unit})", fontsize=8)
    ax.set_ylabel(f"columns per bin (bin {width:.3g})", fontsize=8)
    n = len(means)
    ax.set_title(f"atom counting: {len(xs):,} columns in {plural(n, 'class', 'classes')}"
                 + (f" ({selection})" if selection else ""), fontsize=9)
    ax.legend(fontsize=7)
    ax.tick_params(labelsize=7)


def draw_labels(ax, labels, *, title: str = "grains", step_A: float | None = None, missing=None):
    """A label image (ny, nx) int, -1 for background: one colour per label with a colour bar of
    the labels, the background in light grey, a scale bar. Returns the AxesImage."""
    from matplotlib.colors import BoundaryNorm, ListedColormap

    lab = np.asarray(labels).astype(np.int64)
    n = int(lab.max(initial=-1)) + 1
    colours = ["#d9d9d9"] + [f"C{k % 10}" for k in range(max(n, 1))]
    cm = ListedColormap(colours).with_extremes(bad=MISSING_COLOUR)
    miss = np.zeros(lab.shape, bool) if missing is None else np.asarray(missing, bool)
    im = ax.imshow(np.ma.masked_array(lab, miss), cmap=cm, norm=BoundaryNorm(np.arange(-1.5, max(n, 1) + 0.5), cm.N),
                   interpolation="nearest")
    n_missing = int(miss.sum())
    ax.set_title(f"{title}: {plural(n, 'label')} (grey: background)"
                 + (f"\n{plural(n_missing, 'position')} missing" if n_missing else ""), fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    cb = add_colorbar(ax, im, "label")
    cb.set_ticks(np.arange(-1, max(n, 1)))
    add_scale_bar(ax, step_A, lab.shape[1])
    _missing_legend(ax, n_missing, MISSING_COLOUR)
    return im


# ---------------------------------------------------------------- figures

def labels_figure(labels, *, title: str = "grains", step_A: float | None = None, missing=None,
                  fig: Figure | None = None) -> Figure:
    fig = fig or new_figure(5.2, 4.6)
    draw_labels(fig.add_subplot(), labels, title=title, step_A=step_A, missing=missing)
    fig.tight_layout()
    return fig


def image_figure(image, *, title: str, unit: str, step_A: float | None = None, missing=None,
                 cmap: str = "gray", symmetric: bool = False, fig: Figure | None = None) -> Figure:
    """One scan-shaped image (see :func:`draw_scan_image`) on a Figure."""
    fig = fig or new_figure(5.2, 4.6)
    draw_scan_image(fig.add_subplot(), image, title=title, unit=unit, step_A=step_A, missing=missing,
                    cmap=cmap, symmetric=symmetric)
    fig.tight_layout()
    return fig


def diffraction_figure(pattern, *, mrad_per_px=None, center=None, detectors=(),
                       title: str = "summed diffraction pattern", fig: Figure | None = None) -> Figure:
    """The summed pattern with its detectors (see :func:`draw_diffraction`) on a Figure."""
    fig = fig or new_figure(5.6, 5.0)
    draw_diffraction(fig.add_subplot(), pattern, mrad_per_px=mrad_per_px, center=center,
                     detectors=detectors, title=title)
    fig.tight_layout()
    return fig


def com_figure(com_y, com_x, *, unit: str, step_A: float | None = None, missing=None,
               fig: Figure | None = None) -> Figure:
    """The centre of mass as a colour wheel with its legend, and its x and y components."""
    fig = fig or new_figure(14.5, 4.4)
    a, b, c = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.3, 1, 1]})
    draw_com_wheel(a, com_y, com_x, unit=unit, step_A=step_A, missing=missing)
    draw_scan_image(b, com_x, title=result_title("com_x"), unit=unit, step_A=step_A, missing=missing,
                    cmap="RdBu_r", symmetric=True)
    draw_scan_image(c, com_y, title=result_title("com_y"), unit=unit, step_A=step_A, missing=missing,
                    cmap="RdBu_r", symmetric=True)
    fig.tight_layout()
    return fig


def columns_figure(image, y_px, x_px, *, unit: str, step_A: float | None = None,
                   title: str = "atomic columns", fig: Figure | None = None) -> Figure:
    fig = fig or new_figure(6.0, 5.4)
    draw_columns(fig.add_subplot(), image, y_px, x_px, unit=unit, step_A=step_A, title=title)
    fig.tight_layout()
    return fig


def counting_figure(cross_sections, *, means, weights, sigma, class_counts, unit="image units·px²",
                    selection: str = "", fig: Figure | None = None) -> Figure:
    fig = fig or new_figure(6.0, 4.4)
    draw_counting(fig.add_subplot(), cross_sections, means=means, weights=weights, sigma=sigma,
                  class_counts=class_counts, unit=unit, selection=selection)
    fig.tight_layout()
    return fig


def _com_pair(results: dict):
    """(com_y, com_x, unit) of the results, in mrad when calibrated; None without CoM."""
    for suffix in ("_mrad", ""):
        y, x = results.get(f"com_y{suffix}"), results.get(f"com_x{suffix}")
        if y is not None and x is not None:
            return y.data, x.data, (y.unit or ("mrad" if suffix else "px"))
    return None


def _images(results: dict) -> list[tuple[str, object]]:
    """Scan images worth a panel of their own: 2D nav results other than the centre-of-mass
    parts (drawn together) and its raw sums."""
    return [(n, r) for n, r in results.items()
            if r.kind == "nav" and np.ndim(r.data) == 2 and not n.startswith("com_")]


def summary_figure(results: dict, *, title: str, step_A: float | None = None, mrad_per_px=None,
                   center=None, detectors=(), position_frames=None, expected_per_position=None,
                   fig: Figure | None = None) -> Figure:
    """One page per scan: every scan image, the centre of mass (wheel and components), the
    summed pattern with the detectors, and the completeness map when positions are missing.
    ``results``: name → operators.base.Result (data, kind, unit)."""
    missing = missing_positions(position_frames, expected_per_position)
    n_missing = 0 if missing is None else int(missing.sum())
    panels = [("image", n, r) for n, r in _images(results)]
    com = _com_pair(results)
    if com is not None:
        panels += [("wheel", "com", com), ("image", "com_x", None), ("image", "com_y", None)]
    panels += [("sig", n, r) for n, r in results.items() if r.kind == "sig" and np.ndim(r.data) == 2]
    if n_missing:
        panels.append(("completeness", "completeness", None))
    ncol = 3 if len(panels) in (3, 5, 6, 9) else min(4, max(1, len(panels)))
    nrow = -(-len(panels) // ncol)
    fig = fig or new_figure(4.9 * ncol, 4.3 * nrow)
    for k, (what, name, r) in enumerate(panels):
        ax = fig.add_subplot(nrow, ncol, k + 1)
        if what == "image" and r is None:  # a centre-of-mass component
            y, x, unit = com
            draw_scan_image(ax, x if name == "com_x" else y, title=result_title(name), unit=unit, step_A=step_A,
                            missing=missing, cmap="RdBu_r", symmetric=True)
        elif what == "image":
            draw_scan_image(ax, r.data, title=result_title(name), unit=r.unit or "a.u.", step_A=step_A,
                            missing=missing)
        elif what == "wheel":
            draw_com_wheel(ax, r[0], r[1], unit=r[2], step_A=step_A, missing=missing)
        elif what == "sig":
            draw_diffraction(ax, r.data, mrad_per_px=mrad_per_px, center=center,
                             detectors=detectors if name == "diffraction_sum" else (), title=result_title(name),
                             unit=r.unit or "counts")
        else:
            draw_completeness(ax, position_frames, expected_per_position, step_A)
    scale = f"scan step {step_A:.3g} Å" if step_A else "scan step unknown (scale bars in px)"
    state = f"{n_missing:,} of {missing.size:,} positions missing" if n_missing else \
        ("all positions complete" if missing is not None else "")
    fig.suptitle("; ".join(t for t in (title, scale, state) if t), fontsize=11)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- writing PNGs

def save(fig: Figure, path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (its directory is created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def write_previews(directory: str | Path, stem: str, results: dict, *, step_A: float | None = None,
                   mrad_per_px=None, center=None, detectors=(), missing=None, stop=None) -> list[Path]:
    """``<stem>_<name>.png`` for every 2D result of kind nav or sig (name → Result), plus
    ``<stem>_com.png`` when both centre-of-mass components are there; returns the paths.
    ``stop()``, checked before each figure: True ends the writing there."""
    directory = Path(directory)
    written = []
    com = _com_pair(results)
    for name, res in results.items():
        if np.ndim(res.data) != 2 or res.kind not in ("nav", "sig"):
            continue
        if stop is not None and stop():
            return written
        if res.kind == "sig":
            fig = diffraction_figure(res.data, mrad_per_px=mrad_per_px, center=center, title=result_title(name),
                                     detectors=detectors if name == "diffraction_sum" else ())
        elif name in ("com_x", "com_y") and com is not None:  # drawn in the calibrated unit
            y, x, unit = com
            fig = image_figure(x if name == "com_x" else y, title=result_title(name), unit=unit, step_A=step_A,
                               missing=missing, cmap="RdBu_r", symmetric=True)
        elif name.startswith("com_"):
            continue  # raw sums and the mrad copies
        else:
            fig = image_figure(res.data, title=result_title(name), unit=res.unit or "a.u.", step_A=step_A,
                               missing=missing)
        written.append(save(fig, directory / f"{stem}_{name}.png"))
    if com is not None and not (stop is not None and stop()):
        written.append(save(com_figure(com[0], com[1], unit=com[2], step_A=step_A, missing=missing),
                            directory / f"{stem}_com.png"))
    return written


def write_scan_previews(r, detectors=(), mrad_per_px=None, center=None, stop=None) -> list[str]:
    """Every preview of a finalized scan (a ``ScanResult`` with a path): one PNG per image,
    the centre of mass, the completeness map and the summary page, in ``previews/`` beside the
    scan file, named after the file (``SCAN_bf.png``, ``SCAN_summary.png``, ...), as the stage
    previews are. ``detectors``, ``mrad_per_px``, ``center``: the detector calibration in effect
    (``stream.config.calibration`` and ``detector_regions``); default the scan's geometry.
    The summary page comes first; ``stop()``, checked before each figure, True ends the
    writing there (a session told to stop does not wait for the rest)."""
    directory = Path(r.path).parent / "previews"
    stem = Path(r.path).stem  # the file's name: a second scan of the same id (SCAN-2.h5) keeps its own
    g = getattr(r, "geometry", None)
    step_A = _number((getattr(r, "metadata", None) or {}).get("scan_step_A"))
    mrad_per_px = mrad_per_px if mrad_per_px is not None else getattr(g, "mrad_per_px", None)
    center = center if center is not None else getattr(g, "center", None)
    results = r.result_objects
    missing = missing_positions(r.position_frames, r.expected_frames_per_position)
    fig = summary_figure(results, title=f"{r.scan_id} ({r.status})", step_A=step_A, mrad_per_px=mrad_per_px,
                         center=center, detectors=detectors, position_frames=r.position_frames,
                         expected_per_position=r.expected_frames_per_position)
    paths = [save(fig, directory / f"{stem}_summary.png")]
    paths += write_previews(directory, stem, results, step_A=step_A, mrad_per_px=mrad_per_px,
                            center=center, detectors=detectors, missing=missing, stop=stop)
    if r.position_frames is not None and not (stop is not None and stop()):
        fig = new_figure(5.2, 4.6)
        draw_completeness(fig.add_subplot(), r.position_frames, r.expected_frames_per_position, step_A)
        fig.tight_layout()
        paths.append(save(fig, directory / f"{stem}_completeness.png"))
    return [str(p) for p in paths]


def _number(v) -> float | None:
    return float(v) if isinstance(v, (int, float, np.number)) and np.isfinite(v) and v > 0 else None
