"""One image on the page: a Bokeh figure with the image, its colour bar, a scale bar in the
scan's or the detector's units, a hover read-out, and (on scan images) the region tools.

Page coordinates follow ``stream.viewer.shapes``: scan images in Å (or positions) from the
top-left corner, the pattern in mrad (or px) from the beam centre, y down as the images are
shown (the y ranges run from the bottom edge up to the top one).
"""

from __future__ import annotations

import numpy as np
from bokeh.models import (
    BoxSelectTool,
    ColorBar,
    ColumnDataSource,
    FreehandDrawTool,
    HoverTool,
    LassoSelectTool,
    LinearColorMapper,
    LogColorMapper,
    PanTool,
    PolyDrawTool,
    Range1d,
    ResetTool,
    SaveTool,
    ScaleBar,
    WheelZoomTool,
)
from bokeh.models.annotations.dimensional import Metric
from bokeh.palettes import Greys256, Inferno256, Magma256, Turbo256, Viridis256
from bokeh.plotting import figure

PALETTES = {"gray": Greys256, "viridis": Viridis256, "magma": Magma256, "inferno": Inferno256}
DIVERGING = tuple(  # blue - white - red, for signed components
    f"#{int(r):02x}{int(g):02x}{int(b):02x}" for r, g, b in
    np.vstack([np.linspace([33, 102, 172], [247, 247, 247], 128), np.linspace([247, 247, 247], [178, 24, 43], 128)]))
LABELS = tuple(Turbo256[::9])  # grain labels: distinct colours
FRAME = 300  # px, the longer side of an image on the page
# only these units take prefixes on the scale bar: Å stays Å (1 kÅ reads oddly), mrad may become rad
_PREFIXES = ("Q", "R", "Y", "Z", "E", "P", "T", "G", "M", "k", "h", "da", "d", "c", "m", "µ", "n", "p", "f", "a",
             "z", "y", "r", "q")
_NOT_A = [f"{p}Å" for p in _PREFIXES]
_NOT_RAD = [f"{p}rad" for p in _PREFIXES if p not in ("m", "µ")]


def frame_size(width: float, height: float, longest: int = FRAME) -> tuple[int, int]:
    """(frame_width, frame_height) px for an image of this extent, aspect kept, ≥ 80 px."""
    if width >= height:
        return longest, max(80, round(longest * height / width))
    return max(80, round(longest * width / height)), longest


class ImagePanel:
    """A figure showing one 2D image. ``kind``: nav (scan image, counts or a signed component
    when ``signed``), sig (detector image, log scale), rgba (colours), labels (categories)."""

    def __init__(self, name: str, kind: str, title: str, unit: str, signed: bool = False,
                 palette: str = "gray"):
        self.name, self.kind, self.unit, self.signed = name, kind, unit, signed
        self.x_range, self.y_range = Range1d(0, 1), Range1d(1, 0)
        self.fig = figure(name=f"fig-{name}", title=title, x_range=self.x_range, y_range=self.y_range,
                          frame_width=FRAME, frame_height=FRAME, tools="", toolbar_location="right",
                          min_border_left=40, min_border_right=10)
        self.fig.toolbar.logo = None
        self.fig.xaxis.axis_label_text_font_size = self.fig.yaxis.axis_label_text_font_size = "9pt"
        self.source = ColumnDataSource({"image": [np.zeros((1, 1), np.float32)]}, name=f"src-{name}")
        self.extent = (0.0, 0.0, 1.0, 1.0)
        self.overlays = []
        if kind == "rgba":
            self.mapper = None
            self.renderer = self.fig.image_rgba(image="image", source=self.source, x=0, y=0, dw=1, dh=1)
        else:
            if kind == "sig":
                self.mapper = LogColorMapper(palette=PALETTES["magma"], low=1, high=10, nan_color=(0, 0, 0, 0),
                                             low_color="black")
            elif kind == "labels":
                self.mapper = LinearColorMapper(palette=LABELS, low=0, high=1, nan_color=(0, 0, 0, 0))
            else:
                self.mapper = LinearColorMapper(palette=DIVERGING if signed else PALETTES[palette], low=0, high=1,
                                                nan_color=(0, 0, 0, 0))
            self.renderer = self.fig.image(image="image", source=self.source, x=0, y=0, dw=1, dh=1,
                                           color_mapper=self.mapper)
            self.colorbar = ColorBar(color_mapper=self.mapper, title=unit, width=10, padding=4,
                                     title_text_font_size="8pt", major_label_text_font_size="8pt")
            self.fig.add_layout(self.colorbar, "right")
        self.fig.background_fill_color = "#d8d8d8"  # what shows through NaN: not received yet
        self.scalebar = ScaleBar(range=self.x_range, unit="Å", dimensional=Metric(base_unit="Å", exclude=_NOT_A),
                                 location="bottom_left", bar_length=0.25, label_text_font_size="8pt",
                                 background_fill_color="white", background_fill_alpha=0.8, label_text_color="black",
                                 bar_line_color="black", border_line_alpha=0, visible=False)
        self.fig.add_layout(self.scalebar)
        self.pan = PanTool()
        self.fig.add_tools(self.pan, WheelZoomTool(), ResetTool(), SaveTool(),
                           HoverTool(renderers=[self.renderer], tooltips=self._tooltips()))
        self.fig.toolbar.active_scroll = None  # the wheel scrolls the page until the zoom is picked

    def _tooltips(self):
        value = [] if self.kind == "rgba" else [("value", "@image{0.[000]}" + (f" {self.unit}" if self.unit else ""))]
        return [("y, x", "$y{0.[00]}, $x{0.[00]}")] + value

    def place(self, x0: float, y0: float, width: float, height: float, unit: str, scale_unit: str | None) -> None:
        """Put the image at (x0, y0) with this extent (page units, y down), axes labelled in
        ``unit``; a scale bar in ``scale_unit`` ("Å" or "mrad"), none when None."""
        if self.extent == (x0, y0, width, height) and self.fig.xaxis.axis_label == unit:
            return
        self.extent = (x0, y0, width, height)
        for r in [self.renderer, *self.overlays]:
            r.glyph.update(x=x0, y=y0, dw=width, dh=height)
        self.x_range.update(start=x0, end=x0 + width, bounds=(x0, x0 + width))
        self.y_range.update(start=y0 + height, end=y0, bounds=(y0, y0 + height))
        self.fig.frame_width, self.fig.frame_height = frame_size(width, height)
        self.fig.xaxis.axis_label = self.fig.yaxis.axis_label = unit
        # a new Metric is a new model, which makes Bokeh walk the whole document (0.2 s a panel)
        if scale_unit == "mrad" and self.scalebar.unit != "mrad":
            self.scalebar.update(unit="mrad", dimensional=Metric(base_unit="rad", exclude=_NOT_RAD))
        elif scale_unit == "Å" and self.scalebar.unit != "Å":
            self.scalebar.update(unit="Å", dimensional=Metric(base_unit="Å", exclude=_NOT_A))
        self.scalebar.visible = scale_unit in ("mrad", "Å")

    def retitle(self, title: str, unit: str) -> None:
        self.fig.title.text = title
        self.unit = unit
        if self.mapper is not None:
            self.colorbar.title = unit

    def overlay(self, source: ColumnDataSource, name: str | None = None):
        """An RGBA image from ``source`` drawn over this one, placed with it."""
        r = self.fig.image_rgba(image="image", source=source, x=self.extent[0], y=self.extent[1],
                                dw=self.extent[2], dh=self.extent[3], name=name)
        self.overlays.append(r)
        return r

    def show(self, image: np.ndarray, low: float | None = None, high: float | None = None) -> None:
        """New pixels (and display limits); the colour bar follows the limits."""
        self.source.data = {"image": [image]}
        if self.mapper is not None and low is not None:
            self.mapper.update(low=low, high=high)


class RegionTools:
    """The tools that draw a region of probe positions on a scan image (all hidden from the
    toolbar; the page's mode buttons pick one): rectangle, lasso, polygon (press the first
    vertex, tap the next, press the last) and brush (a freehand stroke painted with a radius).
    Polygon and brush share their sources across images, so a region shows on every one."""

    def __init__(self, fig, polygon_source: ColumnDataSource, stroke_source: ColumnDataSource):
        self.rect = BoxSelectTool(description="Rectangle region", visible=False, persistent=False)
        self.lasso = LassoSelectTool(description="Lasso region", visible=False, persistent=False)
        patches = fig.patches("xs", "ys", source=polygon_source, fill_alpha=0.15, fill_color="cyan",
                              line_color="cyan", line_width=1.5)
        strokes = fig.multi_line("xs", "ys", source=stroke_source, line_color="cyan", line_width=2, line_alpha=0.8)
        self.polygon = PolyDrawTool(renderers=[patches], num_objects=1, description="Polygon region", visible=False)
        self.brush = FreehandDrawTool(renderers=[strokes], num_objects=1, description="Brush region", visible=False)
        fig.add_tools(self.rect, self.lasso, self.polygon, self.brush)
