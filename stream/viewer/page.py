"""The viewer page (one Bokeh document per open browser tab).

Every ``REFRESH_MS`` the page asks the feed for the scan it shows (the running one, unless the
user picked another in the list) and draws what changed. Drawn apertures go to the cluster
through the feed in a worker thread of this process; the page shows each result when it comes
back, and while the scan runs recomputes it every ``RECOMPUTE_S`` so that it fills in too.
"""

from __future__ import annotations

import html
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
from bokeh.events import PanEnd, PanStart, Press, PressUp, SelectionGeometry
from bokeh.layouts import column, row
from bokeh.models import (
    Arrow,
    Button,
    Checkbox,
    ColumnDataSource,
    CustomJS,
    DataTable,
    Div,
    PolyDrawTool,
    RadioButtonGroup,
    RangeSlider,
    Select,
    Spinner,
    TableColumn,
    TextInput,
    VeeHead,
    WheelZoomTool,
)

from operators.apertures import RealSpaceApertures
from operators.virtual import VirtualDetectors
from stream.viewer import exports, shapes
from stream.viewer.display import bin_factor, binned, color_wheel, com_arrows, limits
from stream.viewer.panels import PALETTES, ImagePanel, RegionTools

log = logging.getLogger("stemstream.viewer")
REFRESH_MS = 250  # how often a page looks for news (the feed rebuilds a live view at most every 0.2 s)
LIST_S = 2.0  # the scan list's frame counts follow this often while a scan runs
RECOMPUTE_S = 1.0  # drawn apertures of a running scan are recomputed this often
PATTERN_MODES = ["Disk", "Annulus", "Polygon", "Zoom"]
REGION_MODES = ["Rectangle", "Lasso", "Polygon", "Brush", "Zoom"]
COMPUTE = ThreadPoolExecutor(2, thread_name_prefix="stemstream-viewer")  # shared by all pages

# the rubber band while a disk or annulus is dragged on the pattern (the page's own drawing)
_BAND_JS = """
if (mode.active > 1) { return; }
const d = band.data;
if (cb_obj.event_name === 'panstart') {
  band.data = {x: [cb_obj.x], y: [cb_obj.y], inner: [0], outer: [0]};
} else if (d.x.length) {
  const r = Math.hypot(cb_obj.x - d.x[0], cb_obj.y - d.y[0]);
  band.data = {x: d.x, y: d.y, inner: [mode.active == 1 ? r * ratio.value : 0], outer: [r]};
}
"""


_DET_TITLES = {"y": "centre y", "x": "centre x", "inner": "inner", "outer": "outer"}


def _fmt_int(n) -> str:
    return f"{int(n):,}"


class ViewerPage:
    """Builds the page into ``doc`` and keeps it current from ``feed``.

    save_dir: where drawn apertures and exported patterns are written (on the session's
    machine)."""

    def __init__(self, doc, feed, save_dir, title: str = "stemstream"):
        self.doc, self.feed, self.save_dir = doc, feed, save_dir
        self.scan_id: str | None = None
        self.shown_version = None
        self.panels: dict[str, ImagePanel] = {}
        self.detector = None  # (mask (h, w) bool, description) drawn on the pattern
        self.region = None  # (mask (ny, nx) bool, description) drawn on an image
        self.results = {"detector": None, "region": None}  # the last result of each: dict
        self._busy = {"detector": False, "region": False}
        self._again = {"detector": False, "region": False}
        self._pan_start = None
        self._setting = False
        self._closed = threading.Event()
        self._summaries_key = None
        self._list_states, self._list_at = None, 0.0
        self._build(title)
        self._prebuild()
        doc.add_periodic_callback(self.refresh, REFRESH_MS)
        doc.on_session_destroyed(lambda ctx: self._closed.set())
        self.refresh()

    # ------------------------------------------------------------------ layout
    def _build(self, title: str) -> None:
        self.header = Div(text=f"<b>{html.escape(title)}</b>", name="header")
        self.scan_select = Select(title="scan", options=[], width=260, name="scan-select")
        self.follow = Checkbox(label="follow the running scan", active=True, name="follow")
        self.progress = Div(text="waiting for a scan…", name="progress", width=900)
        self.dose = Div(text="", name="dose", width=1300)
        self.alert = Div(text="", name="alert", visible=False, width=900,
                         styles={"color": "white", "background": "#c0392b", "padding": "6px",
                                 "font-weight": "bold"})
        self.contrast = RangeSlider(title="contrast of the images (percentiles)", start=0, end=100,
                                    value=(0.5, 99.5), step=0.5, width=260, name="contrast")
        self.pattern_contrast = RangeSlider(title="contrast of the patterns (percentiles, log)", start=0,
                                            end=100, value=(1, 99.9), step=0.1, width=260, name="pattern-contrast")
        self.palette = Select(title="palette", options=list(PALETTES), value="gray", width=100, name="palette")
        self.pattern_mode = RadioButtonGroup(labels=PATTERN_MODES, active=0, name="pattern-mode")
        self.region_mode = RadioButtonGroup(labels=REGION_MODES, active=0, name="region-mode")
        self.ratio = Spinner(title="annulus inner/outer", low=0.05, high=0.95, step=0.05, value=0.5, width=120,
                             name="ratio")
        self.brush_radius = Spinner(title="brush radius", low=0, step=0.5, value=2.0, width=110, name="brush-radius")
        self.det_inputs = {k: Spinner(title=t, step=0.1, width=90, name=f"det-{k}")
                           for k, t in (("y", "centre y"), ("x", "centre x"), ("inner", "inner"), ("outer", "outer"))}
        for w in self.det_inputs.values():
            w.on_change("value", self._on_det_input)
        self.live_update = Checkbox(label="recompute while the scan runs", active=True, name="live-update")
        self.name_input = TextInput(title="name", value="drawn", width=140, name="name")
        self.save_button = Button(label="Save as configuration", width=170, name="save")
        self.export_button = Button(label="Export region pattern", width=170, name="export")
        self.file_status = Div(text="", name="file-status", width=700)
        self.det_status = Div(text="draw a disk, annulus or polygon on the pattern", name="detector-status", width=420)
        self.region_status = Div(text="draw a region on any scan image", name="region-status", width=420)

        self.band = ColumnDataSource({"x": [], "y": [], "inner": [], "outer": []}, name="band")
        self.det_poly = ColumnDataSource({"xs": [], "ys": []}, name="detector-polygon")
        self.region_poly = ColumnDataSource({"xs": [], "ys": []}, name="region-polygon")
        self.region_stroke = ColumnDataSource({"xs": [], "ys": []}, name="region-stroke")
        self.region_lasso = ColumnDataSource({"xs": [], "ys": []}, name="region-lasso")  # the last lasso drawn
        self.det_overlay = ColumnDataSource({"image": [np.zeros((1, 1), np.uint32)]}, name="detector-overlay")
        self.region_overlay = ColumnDataSource({"image": [np.zeros((1, 1), np.uint32)]}, name="region-overlay")
        self.columns_src = ColumnDataSource({"x": [], "y": [], "atoms": []}, name="columns")

        self.drawn = ImagePanel("drawn", "nav", "drawn detector: image", "counts")
        self.region_pattern = ImagePanel("region", "sig", "region: summed pattern (log)", "counts")
        self.drawn.fig.visible = self.region_pattern.fig.visible = False  # no empty panels: shown with a result
        self.wheel = ImagePanel("wheel", "rgba", "direction", "")
        self.wheel.renderer.glyph.update(x=-1, y=-1, dw=2, dh=2)
        self.wheel.x_range.update(start=-1, end=1)
        self.wheel.y_range.update(start=1, end=-1)
        self.wheel.fig.update(frame_width=80, frame_height=80, toolbar_location=None, min_border=5,
                              background_fill_color="white")
        self.wheel.fig.axis.visible = False
        self.wheel.fig.grid.visible = False
        self.wheel.show(color_wheel(65))

        self.scans_src = ColumnDataSource({k: [] for k in ("scan", "status", "frames", "missing", "electrons",
                                                          "file", "stages")}, name="scans")
        cols = [TableColumn(field="scan", title="scan", width=170), TableColumn(field="status", title="status", width=80),
                TableColumn(field="frames", title="frames", width=130),
                TableColumn(field="missing", title="missing", width=70),
                TableColumn(field="electrons", title="electrons", width=90),
                TableColumn(field="file", title="file", width=260),
                TableColumn(field="stages", title="stage results", width=520)]
        self.table = DataTable(source=self.scans_src, columns=cols, width=1320, height=200, index_position=None,
                               name="scan-table")

        self.grid = column(name="panels")
        controls = row(column(self.contrast, self.pattern_contrast, self.palette),
                       column(Div(text="<b>on the pattern</b>: drag from the centre (disk, annulus), or "
                                       "press–tap–press the corners (polygon)"), self.pattern_mode,
                              row(self.ratio, *self.det_inputs.values()),
                              Div(text="<b>on any image</b>: drag (rectangle, lasso, brush) or "
                                       "press–tap–press (polygon)"),
                              self.region_mode, row(self.brush_radius, self.live_update)),
                       column(self.name_input, self.save_button, self.export_button))
        apertures = row(column(self.det_status, self.drawn.fig), column(self.region_status, self.region_pattern.fig))
        self.root = column(row(self.header, self.scan_select, self.follow), self.progress, self.dose, self.alert,
                           controls,
                           self.file_status, self.grid, apertures, Div(text="<b>scans</b> (click one to show it)"),
                           self.table, name="root")
        self.doc.add_root(self.root)

        self.scan_select.on_change("value", self._on_select)
        self.scans_src.selected.on_change("indices", self._on_table)
        self.follow.on_change("active", lambda attr, old, new: self._force())
        for w in (self.contrast, self.pattern_contrast, self.palette):
            w.on_change("value", lambda attr, old, new: self._force())
        self.pattern_mode.on_change("active", lambda attr, old, new: self._activate_tools())
        self.region_mode.on_change("active", lambda attr, old, new: self._activate_tools())
        self.det_poly.on_change("data", self._on_det_polygon)
        self.region_poly.on_change("data", self._on_region_polygon)
        self.region_stroke.on_change("data", self._on_region_stroke)
        self.save_button.on_click(self._on_save)
        self.export_button.on_click(self._on_export)

    def _prebuild(self) -> None:
        """The panels of the next scan before it starts: building figures is the slow part of
        a page (seconds in the browser), so the first frames only fill them in."""
        expected = getattr(self.feed, "expected_images", None)
        if expected is None or self.feed.current() is not None:
            return
        try:
            images = expected()
        except Exception:  # noqa: BLE001 - only a head start: the first scan builds them anyway
            log.debug("viewer: no panels before the first scan", exc_info=True)
            return
        for name, image in images.items():
            self._panel(name, image)
        if images:
            self._names = list(images)
            self._layout(self._names)

    def _force(self) -> None:
        self.shown_version = None

    # ------------------------------------------------------------------ panels
    def _panel(self, name: str, image) -> ImagePanel:
        p = self.panels.get(name)
        if p is not None:
            return p
        kind = "labels" if name == "grains" else image.kind
        p = ImagePanel(name, kind, image.title, image.unit, signed=name in ("com_x", "com_y"),
                       palette=self.palette.value)
        if name == "com":  # the field as arrows over its colours (display.com_arrows)
            p.arrows = ColumnDataSource({"x0": [], "y0": [], "x1": [], "y1": []}, name="com-arrows")
            p.fig.add_layout(Arrow(end=VeeHead(size=5, fill_color="black", line_color="black"), source=p.arrows,
                                   x_start="x0", y_start="y0", x_end="x1", y_end="y1", line_color="black",
                                   line_width=1.2, name="com-arrows-glyph"))
        if kind in ("nav", "rgba", "labels"):
            p.region_tools = RegionTools(p.fig, self.region_poly, self.region_stroke)
            p.fig.patches("xs", "ys", source=self.region_lasso, fill_alpha=0, line_color="cyan", line_width=1.5)
            p.overlay(self.region_overlay, name=f"overlay-{name}")
            p.fig.on_event(SelectionGeometry, self._on_region_geometry)
            p.fig.on_event(Press, self._on_region_press)
            p.fig.on_event(PressUp, self._on_region_press)
            p.fig.scatter("x", "y", source=self.columns_src, marker="cross", size=7, color="red",
                          visible=name in ("adf", "phase"), name=f"columns-{name}")
        else:  # the pattern: drawing a detector
            p.overlay(self.det_overlay)
            p.fig.annulus("x", "y", inner_radius="inner", outer_radius="outer", source=self.band,
                          fill_color="cyan", fill_alpha=0.2, line_color="cyan")
            patches = p.fig.patches("xs", "ys", source=self.det_poly, fill_alpha=0.15, fill_color="cyan",
                                    line_color="cyan")
            p.det_polygon_tool = PolyDrawTool(renderers=[patches], num_objects=1, description="Polygon detector",
                                              visible=False)
            p.fig.add_tools(p.det_polygon_tool)
            p.outlines = ColumnDataSource({"x": [], "y": [], "r": []})
            p.fig.circle("x", "y", radius="r", source=p.outlines, fill_alpha=0, line_color="white",
                         line_dash="dashed", line_alpha=0.7)
            band = CustomJS(args={"band": self.band, "mode": self.pattern_mode, "ratio": self.ratio}, code=_BAND_JS)
            p.fig.js_on_event("panstart", band)
            p.fig.js_on_event("pan", band)
            p.fig.on_event(PanStart, self._on_pan_start)
            p.fig.on_event(PanEnd, self._on_pan_end)
            # a busy page (or a hand held still first) turns a drag into press + press-up
            p.fig.on_event(Press, self._on_pan_start)
            p.fig.on_event(PressUp, self._on_pan_end)
        self.panels[name] = p
        return p

    def _activate_tools(self) -> None:
        """Make the drawing tool the mode buttons name the active one of every figure (drag
        tools through the toolbar's active_drag, the multi-gesture draw tools through
        active_multi; disk and annulus need neither: the page reads the drag itself)."""
        pmode, rmode = PATTERN_MODES[self.pattern_mode.active], REGION_MODES[self.region_mode.active]
        for p in self.panels.values():
            tb = p.fig.toolbar
            wheel = p.fig.select_one({"type": WheelZoomTool})
            if hasattr(p, "det_polygon_tool"):
                drag, multi, zoom = (None, p.det_polygon_tool if pmode == "Polygon" else None, pmode == "Zoom")
            else:
                t = p.region_tools
                drag = {"Rectangle": t.rect, "Lasso": t.lasso}.get(rmode)
                multi = {"Polygon": t.polygon, "Brush": t.brush}.get(rmode)
                zoom = rmode == "Zoom"
            tb.active_drag = p.pan if zoom else drag
            tb.active_multi = multi
            tb.active_scroll = wheel if zoom else None

    def _layout(self, names: list[str]) -> None:
        figs = [self.panels[n].fig for n in names]
        if "com" in names:
            i = names.index("com")
            figs[i] = row(figs[i], self.wheel.fig)
        rows, per_row = [], 3
        for k in range(0, len(figs), per_row):
            rows.append(row(*figs[k:k + per_row]))
        self.grid.children = rows
        self._activate_tools()

    # ------------------------------------------------------------------ refresh
    def refresh(self) -> None:
        """Periodic: the scan list, progress, and the images if they changed."""
        # every property the refresh sets is one websocket message and one update of the page
        # unless held: combined, the browser gets one message and lays the page out once
        self.doc.hold("combine")
        try:
            self._refresh()
        except Exception:
            log.exception("viewer refresh failed")
        finally:
            self.doc.unhold()

    def _refresh(self) -> None:
        scans = self.feed.scans()
        self._update_list(scans)
        sid = self.feed.current() if self.follow.active or self.scan_id is None else self.scan_id
        if sid is None:
            return
        if sid != self.scan_id:
            self.scan_id = sid
            self._setting = True
            self.scan_select.value = sid
            self._setting = False
            self.shown_version = None
            self.results = {"detector": None, "region": None}
        view = self.feed.view(sid)
        if view is None:
            return
        self._show_progress(view)
        if view.version == self.shown_version:
            self._maybe_recompute(view)
            return
        was_live = self.shown_version is not None and getattr(self, "_shown_live", False)
        self.shown_version = view.version
        self._shown_live = view.live
        self._show_images(view)
        if self.detector is not None or self.region is not None:
            if was_live and not view.live or self.results["detector"] is None and self.results["region"] is None:  # the file is written: the final answer from it
                self._request_all(view)
            else:
                self._maybe_recompute(view)

    def _show_arrows(self, p, view, sa) -> None:
        """The centre of mass as arrows on its colour panel, with their scale in the title."""
        cy, cx = view.images["com_y"], view.images["com_x"]
        # a running scan's components come averaged over f x f positions (stream/session/live_view.py)
        f = bin_factor(sa.shape, max(cy.data.shape))
        a = com_arrows(cy.data, cx.data, sa.step * f)
        p.arrows.data = {k: a[k] for k in ("x0", "y0", "x1", "y1")}
        unit = "Å" if sa.unit == "Å" else "positions"
        title = f"centre of mass; arrow {a['length']:.3g} {unit} = {a['scale']:.3g} {cy.unit}"
        if p.fig.title.text != title:
            p.fig.title.text = title

    def _update_list(self, scans) -> None:
        key = tuple((s.scan_id, s.state, s.frames_received, s.missing, s.stages) for s in scans)
        if key == self._summaries_key:
            return
        # while frames arrive only their count changes: the table (costly for the browser to lay
        # out) follows once every LIST_S, the progress line at every refresh
        states = tuple((s.scan_id, s.state, s.missing, s.stages) for s in scans)
        now = time.monotonic()
        if self._summaries_key is not None and states == self._list_states and now - self._list_at < LIST_S:
            return
        self._list_states, self._list_at = states, now
        self._summaries_key = key
        self.scans_src.data = {
            "scan": [s.scan_id for s in scans], "status": [s.state for s in scans],
            "frames": [f"{s.frames_received:,}/{s.n_frames:,}" for s in scans],
            "missing": [_fmt_int(s.missing) for s in scans], "electrons": [f"{s.events / 1e6:.2f} M" for s in scans],
            "file": [s.path for s in scans], "stages": [s.stages for s in scans]}
        self.table.tags = [len(key), hash(key) & 0xFFFFFFFF]  # the grid re-renders rows of an unchanged count only on this
        self._setting = True
        self.scan_select.options = [s.scan_id for s in scans]
        self._setting = False

    def _show_progress(self, view) -> None:
        s = view.summary
        pct = 100 * s.frames_received / s.n_frames if s.n_frames else 0
        rej = self.feed.rejects()
        rejected = ", ".join(f"{k} {v:,}" for k, v in rej.items()) if rej else "none"
        rate = f" · {s.rate / 1e3:.1f} kframes/s" if s.state == "receiving" else ""
        where = f" · file {html.escape(s.path)}" if s.path else ""
        text = (f"<b>{html.escape(s.scan_id)}</b> {s.state} — {s.frames_received:,} / {s.n_frames:,} "
                              f"frames ({pct:.1f} %) · {s.events / 1e6:.2f} M electrons{rate} · duplicated "
                              f"{s.duplicated:,} · rejected messages: {html.escape(rejected)}{where}")
        if self.progress.text != text:
            self.progress.text = text
        dose = "<br>".join(html.escape(x) for x in view.dose)
        if self.dose.text != dose:
            self.dose.text = dose
        if s.missing:
            what = "have not arrived although their sources ended" if view.live else "never arrived"
            ranges = f" (frames {html.escape(s.missing_ranges)})" if s.missing_ranges else ""
            self.alert.text = f"⚠ {s.missing:,} frames {what}{ranges}: their positions show as missing"
            self.alert.visible = True
        elif s.state == "failed":
            self.alert.text = f"⚠ scan failed: {html.escape(s.reason)}"
            self.alert.visible = True
        else:
            self.alert.visible = False

    def _show_images(self, view) -> None:
        names = list(view.images)
        for name in names:
            self._panel(name, view.images[name])
        if names != [n for n in getattr(self, "_names", [])]:
            self._names = names
            self._layout(names)
        sa, da = view.scan_axes, view.det_axes
        for name in names:
            p, img = self.panels[name], view.images[name]
            if p.fig.title.text != img.title and not hasattr(p, "arrows"):  # built before the scan, other units
                p.retitle(img.title, img.unit)
            if img.kind == "sig" and da is not None:
                p.place(*da.extent(), da.unit, "mrad" if da.unit == "mrad" else None)
            elif img.kind != "sig" and sa is not None:
                p.place(*sa.extent(), sa.unit, "Å" if sa.unit == "Å" else None)
            data, _ = view.display(name)
            if img.kind == "rgba":
                p.show(data)
                if hasattr(p, "arrows") and "com_y" in view.images and sa is not None:
                    self._show_arrows(p, view, sa)
            elif img.kind == "sig":
                lo, hi = view.limits(name, *self.pattern_contrast.value, positive=True)
                p.show(data, lo, hi)
            elif name == "grains":
                p.show(data, float(np.nanmin(data)) if np.isfinite(data).any() else 0,
                       float(np.nanmax(data)) + 1 if np.isfinite(data).any() else 1)
            else:
                p.show(data, *view.limits(name, *self.contrast.value, symmetric=p.signed))
                if not p.signed and p.mapper is not None and list(p.mapper.palette) != list(PALETTES[self.palette.value]):
                    p.mapper.palette = PALETTES[self.palette.value]
        if sa is not None:
            self.drawn.place(*sa.extent(), sa.unit, "Å" if sa.unit == "Å" else None)
        if da is not None:
            self.region_pattern.place(*da.extent(), da.unit, "mrad" if da.unit == "mrad" else None)
            for p in self.panels.values():
                if hasattr(p, "outlines"):
                    radii = [r_ for _, a, b in view.detectors for r_ in (a, b) if r_ > 0]
                    if list(p.outlines.data["r"]) != radii:
                        p.outlines.data = {"x": [0.0] * len(radii), "y": [0.0] * len(radii), "r": radii}
        self.ratio_unit = da.unit if da is not None else "px"
        for k, w in self.det_inputs.items():
            w.title = f"{_DET_TITLES[k]} ({self.ratio_unit})"
        self.brush_radius.title = f"brush radius ({sa.unit if sa else 'positions'})"
        c = view.columns
        cols = {"x": [], "y": [], "atoms": []} if c is None else \
            {"x": list(c["x"]), "y": list(c["y"]), "atoms": list(c["atoms"]) if c["atoms"] is not None
             else [-1] * len(c["x"])}
        if len(cols["x"]) != len(self.columns_src.data["x"]) or cols["x"] != list(self.columns_src.data["x"]):
            self.columns_src.data = cols
        for name, p in self.panels.items():
            for r in p.fig.renderers:
                if r.name == f"columns-{name}":
                    r.visible = c is not None and name == c.get("image", "adf")

    # ------------------------------------------------------------------ selecting a scan
    def _on_select(self, attr, old, new) -> None:
        if self._setting or not new or new == self.scan_id:
            return
        self.follow.active = False
        self.scan_id = new
        self.results = {"detector": None, "region": None}
        self._force()
        self.refresh()

    def _on_table(self, attr, old, new) -> None:
        if new:
            scans = self.scans_src.data["scan"]
            if new[0] < len(scans):
                self._on_select("value", None, scans[new[0]])

    # ------------------------------------------------------------------ drawing
    def _draw(self, kind: str, make, desc: str) -> None:
        """A drawn shape as the detector (kind "detector", on the pattern) or the region
        ("region", on a scan image): ``make(axes)`` builds its mask; then it is computed. A
        shape that selects nothing is reported in its status line instead."""
        view = self.feed.view(self.scan_id) if self.scan_id else None
        ax = None if view is None else view.det_axes if kind == "detector" else view.scan_axes
        if ax is None:
            return
        status = self.det_status if kind == "detector" else self.region_status
        try:
            mask = make(ax)
        except shapes.ShapeError as e:
            status.text = f"⚠ {html.escape(str(e))}"
            return
        setattr(self, kind, (mask, desc.replace("UNIT", ax.unit)))
        (self.det_overlay if kind == "detector" else self.region_overlay).data = {"image": [_overlay(mask)]}
        self.results[kind] = None
        what = f"{int(mask.sum()):,} px" if kind == "detector" else f"{int(mask.sum()):,} positions"
        status.text = f"{kind}: {html.escape(getattr(self, kind)[1])}, {what} — computing…"
        self._request(kind, view)

    def _on_pan_start(self, event) -> None:
        self._pan_start = (event.y, event.x) if self.pattern_mode.active in (0, 1) else None

    def _on_pan_end(self, event) -> None:
        if self._pan_start is None or self.pattern_mode.active not in (0, 1):
            return
        (y0, x0), self._pan_start = self._pan_start, None
        outer = float(np.hypot(event.y - y0, event.x - x0))
        if outer == 0:
            return  # a press without a drag: nothing drawn
        inner = outer * self.ratio.value if self.pattern_mode.active == 1 else 0.0
        self._set_circle(float(y0), float(x0), inner, outer)

    def _set_circle(self, y, x, inner, outer) -> None:
        self._setting = True
        for k, v in (("y", y), ("x", x), ("inner", inner), ("outer", outer)):
            self.det_inputs[k].value = round(v, 6)
        self._setting = False
        self.band.data = {"x": [x], "y": [y], "inner": [inner], "outer": [outer]}
        self.det_poly.data = {"xs": [], "ys": []}
        desc = f"disk at ({y:.3g}, {x:.3g}) UNIT, radius {outer:.3g} UNIT" if inner == 0 else \
            f"annulus at ({y:.3g}, {x:.3g}) UNIT, radii {inner:.3g}–{outer:.3g} UNIT"
        self._draw("detector", lambda ax: shapes.annulus(ax, y, x, inner, outer), desc)

    def _on_det_input(self, attr, old, new) -> None:
        v = {k: w.value for k, w in self.det_inputs.items()}
        if not self._setting and None not in v.values():
            self._set_circle(float(v["y"]), float(v["x"]), float(v["inner"]), float(v["outer"]))

    def _on_det_polygon(self, attr, old, new) -> None:
        pts = _finished_polygon(new)
        if pts is not None:
            self.band.data = {"x": [], "y": [], "inner": [], "outer": []}
            self._draw("detector", lambda ax: shapes.detector_polygon(ax, *pts), f"polygon of {len(pts[0])} vertices")

    def _on_region_geometry(self, event) -> None:
        if event.final:
            self._region_from(event.geometry)

    def _region_from(self, g: dict) -> None:
        """A rectangle or lasso (a SelectionGeometry's geometry, page units) as the region."""
        self.region_poly.data = {"xs": [], "ys": []}
        self.region_stroke.data = {"xs": [], "ys": []}
        self.region_lasso.data = {"xs": [list(g["x"])], "ys": [list(g["y"])]} if g.get("type") == "poly" and \
            {"x", "y"} <= set(g) else {"xs": [], "ys": []}
        if g.get("type") == "rect" and {"x0", "x1", "y0", "y1"} <= set(g):
            (y0, y1), (x0, x1) = sorted((g["y0"], g["y1"])), sorted((g["x0"], g["x1"]))
            self._draw("region", lambda ax: shapes.rectangle(ax, y0, y1, x0, x1),
                       f"rectangle y {y0:.3g}–{y1:.3g}, x {x0:.3g}–{x1:.3g} UNIT")
        elif g.get("type") == "poly" and {"x", "y"} <= set(g):
            self._draw("region", lambda ax: shapes.scan_polygon(ax, g["y"], g["x"]), f"lasso of {len(g['x'])} points")

    def _on_region_press(self, event) -> None:
        """Rectangle mode: a press, a move and the release also draw a rectangle (what a drag
        becomes when the page is too busy to see it start)."""
        if REGION_MODES[self.region_mode.active] != "Rectangle":
            return
        if isinstance(event, Press):
            self._press_start = (event.y, event.x)
            return
        start, self._press_start = getattr(self, "_press_start", None), None
        if start is not None and (start[0], start[1]) != (event.y, event.x):
            self._region_from({"type": "rect", "y0": start[0], "y1": event.y, "x0": start[1], "x1": event.x})

    def _on_region_polygon(self, attr, old, new) -> None:
        pts = _finished_polygon(new)
        if pts is not None:
            self.region_lasso.data = {"xs": [], "ys": []}
            self._draw("region", lambda ax: shapes.scan_polygon(ax, *pts), f"polygon of {len(pts[0])} vertices")

    def _on_region_stroke(self, attr, old, new) -> None:
        xs, ys = (new.get("xs") or [[]])[-1], (new.get("ys") or [[]])[-1]
        radius = float(self.brush_radius.value or 0)
        if len(xs):
            self.region_lasso.data = {"xs": [], "ys": []}
            self._draw("region", lambda ax: shapes.brush(ax, ys, xs, radius),
                       f"brush stroke of {len(xs)} points, radius {radius:g} UNIT")

    # ------------------------------------------------------------------ computing on the cluster
    def _request_all(self, view) -> None:
        for kind in ("detector", "region"):
            if getattr(self, kind) is not None:
                self._request(kind, view)

    def _maybe_recompute(self, view) -> None:
        if not (view.live and self.live_update.active):
            return
        for kind in ("detector", "region"):
            last = self.results[kind]
            if getattr(self, kind) is not None and last is not None and time.monotonic() - last["t"] >= RECOMPUTE_S:
                self._request(kind, view)

    def _request(self, kind: str, view) -> None:
        """Compute the drawn detector's image or the region's pattern on the cluster (in a
        thread: the page goes on); a request while one runs is done once it finishes."""
        if view is None or getattr(self, kind) is None:
            return
        if self._busy[kind]:
            self._again[kind] = True
            return
        self._busy[kind] = True
        self._again[kind] = False
        mask, _ = getattr(self, kind)
        COMPUTE.submit(self._compute, kind, view.scan_id, mask, view)

    def _compute(self, kind: str, scan_id: str, mask: np.ndarray, view) -> None:
        t0 = time.perf_counter()
        try:
            if kind == "detector":
                if view.scan_axes is None or mask.shape != view.det_axes.shape:
                    raise shapes.ShapeError("the detector was drawn for another detector size; draw it again")
                op = VirtualDetectors(mask[None], ["drawn"], view.scan_axes.shape, name="viewer")
            else:
                if view.det_axes is None or mask.shape != view.scan_axes.shape:
                    raise shapes.ShapeError("the region was drawn for another scan size; draw it again")
                op = RealSpaceApertures(mask[None], ["region"], view.det_axes.shape, name="viewer")
            run = self.feed.apply(scan_id, op)
            data = next(iter(op.finalize(run.state).values())).data
            out = {"data": data, "run": run, "scan_id": scan_id, "mask": mask, "seconds": time.perf_counter() - t0,
                   "t": time.monotonic(), "error": None}
        except Exception as e:
            log.warning("viewer computation failed: %s", e, exc_info=not isinstance(e, (ValueError, KeyError)))
            out = {"error": f"{type(e).__name__}: {e}", "scan_id": scan_id, "t": time.monotonic(), "mask": mask}
        if not self._closed.is_set():
            self.doc.add_next_tick_callback(partial(self._computed, kind, out))

    def _computed(self, kind: str, out: dict) -> None:
        self._busy[kind] = False
        current = getattr(self, kind)
        stale = current is None or current[0] is not out["mask"] or out["scan_id"] != self.scan_id
        status = self.det_status if kind == "detector" else self.region_status
        if out["error"] is not None:
            if not stale:
                status.text = f"⚠ {html.escape(out['error'])}"
        elif not stale:
            self.results[kind] = out
            run = out["run"]
            where = "the receivers' memory" if run.source == "receivers" else f"the file {html.escape(run.source)}"
            desc = html.escape(current[1])
            head = f"drawn detector: {desc}" if kind == "detector" else f"region: {desc}, {int(current[0].sum()):,} positions"
            status.text = (f"{head}<br>{run.events:,} electrons of {run.frames:,} frames from {where}, "
                           f"{run.workers} worker(s), {out['seconds'] * 1e3:.0f} ms")
            if kind == "detector":
                img = out["data"].astype(np.float64)
                view = self.feed.view(self.scan_id)
                if view is not None and view.not_received is not None and view.not_received.shape == img.shape:
                    img = np.where(view.not_received, np.nan, img)
                data, _ = binned(img)
                self.drawn.show(data, *limits(data, *self.contrast.value))
                self.drawn.fig.visible = True
                if self.drawn.mapper is not None:
                    self.drawn.mapper.palette = PALETTES[self.palette.value]
            else:
                data = out["data"].astype(np.float32)
                self.region_pattern.show(data, *limits(data, *self.pattern_contrast.value, positive=True))
                self.region_pattern.fig.visible = True
        if self._again[kind] or (stale and current is not None):
            view = self.feed.view(self.scan_id) if self.scan_id else None
            self._request(kind, view)

    # ------------------------------------------------------------------ files
    def _on_save(self) -> None:
        det = self.detector[0] if self.detector is not None else None
        reg = self.region[0] if self.region is not None else None
        note = "; ".join(f"{k}: {v[1]}" for k, v in (("detector", self.detector), ("region", self.region)) if v)
        try:
            paths = exports.save_apertures(self.save_dir, self.name_input.value, detector=det, region=reg,
                                           note=f"scan {self.scan_id}: {note}")
        except exports.ExportError as e:
            self.file_status.text = f"⚠ {html.escape(str(e))}"
            return
        self.file_status.text = (f"saved {html.escape(str(paths[0]))} (+ {len(paths) - 1} mask file(s)): "
                                 f"<code>stemstream process --config {html.escape(str(paths[0]))}</code> or "
                                 f"<code>stemstream process-file SCAN.h5 --config {html.escape(str(paths[0]))}</code>")

    def _on_export(self) -> None:
        out = self.results["region"]
        if out is None or out.get("error") or self.region is None:
            self.file_status.text = "⚠ draw a region on an image and wait for its pattern first"
            return
        view = self.feed.view(out["scan_id"])
        ax = view.det_axes if view is not None else None
        try:
            paths = exports.export_pattern(self.save_dir, self.name_input.value, out["data"], out["mask"],
                                           out["scan_id"], ax.mrad_per_px if ax else None, ax.center if ax else None,
                                           source=out["run"].source)
        except exports.ExportError as e:
            self.file_status.text = f"⚠ {html.escape(str(e))}"
            return
        big = int(np.max(out["data"])) >= exports.TIFF_EXACT
        self.file_status.text = (f"exported {html.escape(str(paths[0]))} (exact counts) and "
                                 f"{html.escape(str(paths[1]))} (32-bit float TIFF"
                                 + (", counts above 2^24 rounded" if big else "") + ")")


def _finished_polygon(data: dict):
    """(ys, xs) of the last polygon of a PolyDrawTool's data once it is closed, else None.
    While a polygon is drawn the tool repeats its last vertex (it follows the pointer); the
    closing press replaces the repeat, and consecutive repeats are dropped."""
    xs, ys = (data.get("xs") or [[]])[-1], (data.get("ys") or [[]])[-1]
    if len(ys) >= 2 and (ys[-1], xs[-1]) == (ys[-2], xs[-2]):
        return None
    pts = []
    for y, x in zip(ys, xs):
        if y is not None and x is not None and (not pts or pts[-1] != (float(y), float(x))):
            pts.append((float(y), float(x)))
    return ([p[0] for p in pts], [p[1] for p in pts]) if len(pts) >= 3 else None


def _overlay(mask: np.ndarray) -> np.ndarray:
    """A mask as translucent cyan where True (uint32 RGBA for image_rgba)."""
    return np.where(mask, np.uint32(0x66FFFF00), np.uint32(0)).astype(np.uint32)
