"""PNG previews (stream/files/previews.py): each figure carries what a microscopist needs to
read it: titles with the unit, colour bars labelled with the unit, a scale bar whose length is
the scan step times its pixels, the virtual detectors at their radii in mrad, the centre of
mass as hue = direction, and missing positions masked where the completeness map says so.

Expected values are computed here (numpy, colorsys, the documented geometry), never read back
from the drawing code; no pixel snapshots."""

from __future__ import annotations

import colorsys
from dataclasses import replace

import numpy as np
import pytest
from matplotlib.colors import LogNorm, to_rgba
from matplotlib.image import AxesImage
from matplotlib.patches import Circle
from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

from operators.base import Result
from stream.files import previews as pv


def _scale_bars(ax) -> list:
    return [a for a in ax.artists if isinstance(a, AnchoredSizeBar)]


def _bar(ax):
    (bar,) = _scale_bars(ax)
    text = bar.txt_label.get_text()
    width = bar.size_bar.get_children()[0].get_width()  # data units = scan px
    return text, width


def _colorbar_labels(fig) -> list[str]:
    return [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"]


def _completeness(rng, shape=(24, 32), expected=4):
    pf = np.full(shape, expected, np.int64)
    pf[5, 3:20] = 0          # a lost row piece
    pf[11, 7] = 2            # a position with half its parts
    pf[rng.integers(0, shape[0], 6), rng.integers(0, shape[1], 6)] = 3
    return pf


def test_scan_image_title_colorbar_scale_bar_and_missing_positions():
    rng = np.random.default_rng(0)
    pf = _completeness(rng)
    missing = pf < 4  # independent of the code: fewer parts than frames x sources
    img = rng.poisson(50, pf.shape).astype(float)
    img[missing] = 0  # what an incomplete position holds: no or fewer counts
    fig = pv.image_figure(img, title="bf: bright field", unit="counts", step_A=0.4, missing=missing)
    ax = fig.axes[0]
    assert "bf: bright field (counts)" in ax.get_title()
    assert f"{missing.sum()} positions missing" in ax.get_title()
    assert _colorbar_labels(fig) == ["counts"]
    # scale bar: about a fifth of 32 x 0.4 Å = 2.56 Å → 2 Å, i.e. 5 scan px
    text, width = _bar(ax)
    assert text == "2 Å" and width == pytest.approx(2 / 0.4)
    # the masked pixels are exactly the missing positions, drawn in the missing colour
    (im,) = [a for a in ax.get_images()]
    arr = im.get_array()
    assert np.array_equal(np.ma.getmaskarray(arr), missing)
    rgba = im.to_rgba(arr)
    assert np.allclose(rgba[missing], to_rgba(pv.MISSING_COLOUR))
    assert not np.isclose(rgba[~missing], to_rgba(pv.MISSING_COLOUR)).all(axis=-1).any()
    # the contrast comes from the positions that arrived, not from the zeros of the gaps
    assert im.norm.vmin > 0 and im.norm.vmin >= np.percentile(img[~missing], 0.4)
    # the legend names the count
    assert f"missing ({missing.sum()})" in [t.get_text() for t in ax.get_legend().get_texts()]


@pytest.mark.parametrize("step_A, width_px, text, length_px", [
    (0.398, 128, "10 Å", 10 / 0.398),   # 50.9 Å wide: a fifth is 10.2 Å
    (2.0, 512, "200 Å", 100.0),         # 1024 Å wide
    (0.05, 64, "0.5 Å", 10.0),          # 3.2 Å wide
])
def test_scale_bar_lengths_are_round_and_in_angstrom(step_A, width_px, text, length_px):
    fig = pv.new_figure(3, 3)
    ax = fig.add_subplot()
    ax.imshow(np.zeros((width_px // 2, width_px)))
    assert pv.add_scale_bar(ax, step_A, width_px) == text
    t, w = _bar(ax)
    assert t == text and w == pytest.approx(length_px)
    assert length_px * step_A <= width_px * step_A / 5 + 1e-9


def test_without_a_scan_step_the_scale_bar_is_in_px_and_says_so():
    fig = pv.image_figure(np.arange(100.0).reshape(10, 10), title="adf", unit="counts")
    ax = fig.axes[0]
    text, width = _bar(ax)
    assert text == "2 px" and width == 2
    assert "no scan step" in ax.get_xlabel()


def test_diffraction_pattern_log_scale_mrad_axes_and_detector_circles():
    h, w, mrad_per_px, center = 64, 80, 0.5, (30.0, 41.0)
    yy, xx = np.mgrid[:h, :w]
    pattern = np.exp(-((yy - center[0]) ** 2 + (xx - center[1]) ** 2) / 50.0) * 1e4
    pattern[0, 0] = 0
    detectors = [{"name": "bf", "shape": "disk", "center": center, "inner_px": 0.0, "outer_px": 8.0},
                 {"name": "adf", "shape": "annulus", "center": center, "inner_px": 16.0, "outer_px": 28.0}]
    fig = pv.diffraction_figure(pattern, mrad_per_px=mrad_per_px, center=center, detectors=detectors)
    ax = fig.axes[0]
    assert "(log scale)" in ax.get_title()
    assert "mrad" in ax.get_xlabel() and "mrad" in ax.get_ylabel()
    assert _colorbar_labels(fig) == ["counts per pixel (log)"]
    (im,) = ax.get_images()
    assert isinstance(im.norm, LogNorm)
    # the axes span the detector in mrad from the centre: pixel edges at (-0.5 - c) and (w - 0.5 - c)
    x0, x1, y1, y0 = im.get_extent()
    assert (x0, x1) == pytest.approx(((-0.5 - 41) * 0.5, (w - 0.5 - 41) * 0.5))
    assert (y0, y1) == pytest.approx(((-0.5 - 30) * 0.5, (h - 0.5 - 30) * 0.5))
    circles = sorted((p.get_radius(), p.center) for p in ax.patches if isinstance(p, Circle))
    assert [r for r, _ in circles] == pytest.approx([8 * 0.5, 16 * 0.5, 28 * 0.5])
    assert all(c == pytest.approx((0.0, 0.0)) for _, c in circles)  # the centre is 0 mrad
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["bf", "adf"]


def test_uncalibrated_detector_axes_are_px_and_mask_detectors_are_outlined():
    mask = np.zeros((32, 32), bool)
    mask[4:10, 20:30] = True
    fig = pv.diffraction_figure(np.ones((32, 32)), detectors=[{"name": "roi", "shape": "mask", "mask": mask}])
    ax = fig.axes[0]
    assert "px" in ax.get_xlabel() and "not calibrated" in ax.get_title()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["roi"]
    assert ax.collections  # the mask's outline (a contour)


def test_com_colour_wheel_hue_is_the_direction_and_value_the_magnitude():
    rng = np.random.default_rng(1)
    com_y, com_x = rng.normal(size=(2, 12, 15))
    com_y[3, 4] = np.nan
    rgb, vmax = pv.com_rgb(com_y, com_x)
    mag = np.hypot(com_y, com_x)
    assert vmax == pytest.approx(np.nanpercentile(mag, 99))
    for (i, j) in [(0, 0), (5, 7), (11, 14), (2, 9)]:
        hue = (np.arctan2(com_y[i, j], com_x[i, j]) / (2 * np.pi)) % 1
        expected = colorsys.hsv_to_rgb(hue, 1.0, min(1.0, mag[i, j] / vmax))
        assert rgb[i, j] == pytest.approx(expected, abs=1e-9)
    assert np.isnan(rgb[3, 4]).all()
    # the four directions of the wheel: +x red, +y (down the image) yellow-green, -x cyan, -y violet
    r, _ = pv.com_rgb(np.array([0.0, 1, 0, -1]), np.array([1.0, 0, -1, 0]), max_magnitude=1.0)
    assert r == pytest.approx(np.array([colorsys.hsv_to_rgb(h, 1, 1) for h in (0, 0.25, 0.5, 0.75)]))


def test_com_figure_wheel_legend_components_and_missing_in_grey():
    rng = np.random.default_rng(2)
    pf = _completeness(rng)
    missing = pf < 4
    com_y, com_x = rng.normal(size=(2,) + pf.shape)
    fig = pv.com_figure(com_y, com_x, unit="mrad", step_A=0.5, missing=missing)
    titles = [ax.get_title() for ax in fig.axes]
    assert any(t.startswith("centre of mass: direction and magnitude (mrad)") for t in titles)
    assert any(t.startswith("|CoM| ≤") and t.endswith("mrad") for t in titles)  # the legend wheel
    assert any(t.startswith("com_x: centre of mass x (mrad)") for t in titles)
    assert any(t.startswith("com_y: centre of mass y (mrad)") for t in titles)
    assert _colorbar_labels(fig) == ["mrad", "mrad"]
    wheel_ax = next(ax for ax in fig.axes if ax.get_title().startswith("centre of mass"))
    shown = wheel_ax.get_images()[0].get_array()
    grey = to_rgba(pv.WHEEL_MISSING_COLOUR)[:3]
    assert np.allclose(shown[missing], grey)
    assert not np.isclose(shown[~missing], grey).all(axis=-1).any()
    comp = next(ax for ax in fig.axes if ax.get_title().startswith("com_x"))
    im = comp.get_images()[0]
    assert im.norm.vmin == pytest.approx(-im.norm.vmax)  # zero deflection in the middle of the map


def _results(shape=(24, 32), frame=(48, 48)):
    rng = np.random.default_rng(3)
    return {"bf": Result(rng.poisson(100, shape), "nav", "counts"),
            "adf": Result(rng.poisson(5, shape), "nav", "counts"),
            "com_n": Result(np.ones(shape, np.int64), "nav", "counts"),
            "com_sum_x": Result(np.ones(shape, np.int64), "nav", "px*counts"),
            "com_y": Result(rng.normal(size=shape), "nav", "px"),
            "com_x": Result(rng.normal(size=shape), "nav", "px"),
            "com_y_mrad": Result(rng.normal(size=shape), "nav", "mrad"),
            "com_x_mrad": Result(rng.normal(size=shape), "nav", "mrad"),
            "diffraction_sum": Result(rng.poisson(3, frame), "sig", "counts")}


def _panels(fig):
    """Axes that show data (not colour bars, not legend wheels)."""
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>" and not ax.get_title().startswith("|CoM|")]


def test_summary_has_a_panel_per_image_and_no_empty_panel():
    rng = np.random.default_rng(4)
    res = _results()
    fig = pv.summary_figure(res, title="s (complete)", step_A=0.4, mrad_per_px=0.5,
                            position_frames=np.full((24, 32), 4), expected_per_position=4)
    panels = _panels(fig)
    titles = [ax.get_title().split("\n")[0] for ax in panels]
    assert titles == ["bf: bright field (counts)", "adf: annular dark field (counts)",
                      "centre of mass: direction and magnitude (mrad)", "com_x: centre of mass x (mrad)",
                      "com_y: centre of mass y (mrad)", "diffraction_sum: summed diffraction pattern (log scale)"]
    assert all(ax.get_images() for ax in panels)  # every panel shows an image
    assert "all positions complete" in fig._suptitle.get_text()
    assert "scan step 0.4 Å" in fig._suptitle.get_text()
    # with missing positions the completeness map joins, and every image says how many
    pf = _completeness(rng)
    fig = pv.summary_figure(res, title="s (incomplete)", step_A=0.4, position_frames=pf, expected_per_position=4)
    n = int((pf < 4).sum())
    panels = _panels(fig)
    assert panels[-1].get_title().startswith("frame parts received per position (of 4)")
    assert f"{n} positions incomplete" in panels[-1].get_title()
    assert f"{n} of {pf.size} positions missing" in fig._suptitle.get_text()
    for ax in panels[:-2]:  # the scan images (not the pattern, not the map)
        assert f"{n} positions missing" in ax.get_title()


def test_write_scan_previews_writes_every_file(tmp_path):
    from stream.session.finalize import ScanResult
    from stream.transport.protocol import Geometry

    res = _results()
    pf = np.full((24, 32), 4)
    pf[0, :5] = 0
    r = ScanResult("s1", tmp_path / "s1.h5", "incomplete", "", results={k: v.data for k, v in res.items()},
                   kinds={k: v.kind for k, v in res.items()}, units={k: v.unit for k, v in res.items()},
                   position_frames=pf, expected_frames_per_position=4,
                   geometry=Geometry((24, 32), (48, 48), 1, 4, mrad_per_px=0.5, center=(23.5, 23.5)),
                   metadata={"scan_step_A": 0.4})
    paths = pv.write_scan_previews(r, [{"name": "bf", "shape": "disk", "center": (23.5, 23.5),
                                        "inner_px": 0, "outer_px": 6}])
    names = sorted(p.rsplit("/", 1)[1] for p in paths)
    assert names == sorted(f"s1_{n}.png" for n in ("bf", "adf", "com_x", "com_y", "diffraction_sum", "com",
                                                     "completeness", "summary"))
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # a second scan of the same id has its own file (s1-2.h5) and its own previews, named after it
    again = pv.write_scan_previews(replace(r, path=tmp_path / "s1-2.h5"))
    assert sorted(p.rsplit("/", 1)[1] for p in again) == sorted(n.replace("s1_", "s1-2_") for n in names)
    # a session told to stop: the summary page, then nothing more
    asked = []
    cut = pv.write_scan_previews(replace(r, path=tmp_path / "s1-3.h5"), stop=lambda: asked.append(1) or True)
    assert [p.rsplit("/", 1)[1] for p in cut] == ["s1-3_summary.png"] and asked


def test_counting_histogram_has_labelled_axes_and_the_mixture():
    rng = np.random.default_rng(5)
    xs = np.concatenate([rng.normal(10, 1, 200), rng.normal(20, 1, 100)])
    fig = pv.counting_figure(xs, means=[10, 20], weights=[2 / 3, 1 / 3], sigma=1.0, class_counts=[1, 2],
                             unit="counts·px²", selection="icl")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "scattering cross-section (counts·px²)"
    assert ax.get_ylabel().startswith("columns per bin")
    assert ax.get_title() == "atom counting: 300 columns in 2 classes (icl)"
    heights = [p.get_height() for p in ax.patches]
    assert sum(heights) == 300  # the histogram counts columns
    assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == ["1 atom", "2 atoms", "columns", "mixture"]
    # the mixture is drawn in columns per bin: its area over the bin width is the number of columns
    width = ax.patches[0].get_width()
    (mix,) = [ln for ln in ax.get_lines() if ln.get_label() == "mixture"]
    x, y = mix.get_data()
    assert np.trapezoid(y, x) / width == pytest.approx(300, rel=0.01)


def test_labels_figure_has_one_colour_per_grain_and_a_background():
    lab = -np.ones((20, 20), np.int64)
    lab[2:8, 2:8], lab[10:18, 4:16] = 0, 1
    fig = pv.labels_figure(lab, step_A=1.0)
    ax = fig.axes[0]
    assert ax.get_title().startswith("grains: 2 labels")
    im = ax.get_images()[0]
    colours = im.to_rgba(im.get_array())
    assert len({tuple(c) for c in colours.reshape(-1, 4)}) == 3
    assert _colorbar_labels(fig) == ["label"]
    assert _bar(ax)[0] == "2 Å"


def test_every_drawn_image_panel_is_an_axes_image():
    fig = pv.image_figure(np.ones((4, 4)), title="flat", unit="counts", step_A=1.0)
    ax = fig.axes[0]
    assert isinstance(ax.get_images()[0], AxesImage)
    assert "constant 1" in ax.get_title()  # a flat image says so instead of looking empty
