"""Driving the viewer in Debian's headless Chromium with Playwright (tests and benchmarks).

Playwright's own browser download is not used: it launches ``/usr/bin/chromium`` (the
``chromium`` package, .ci/system-packages.txt). Bokeh draws inside shadow roots, so positions
on a figure come from the figure's own scales (``GEOM_JS``), and model state is read from
``Bokeh.documents``.
"""

from __future__ import annotations

import shutil
import time

import numpy as np

CHROMIUM = "/usr/bin/chromium"
# as root Chromium needs --no-sandbox; the rest keeps it from phoning home
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage"]

# page (CSS px) coordinates of data points on the figure of that name
GEOM_JS = """
([name, pts]) => {
  const find = (v) => { if (v.model.name === name) return v;
                        for (const c of (v.child_views ?? [])) { const r = find(c); if (r) return r; } return null; };
  let v = null; for (const r of Bokeh.index.roots) { v = find(r); if (v) break; }
  if (v == null) return null;
  const rect = v.canvas_view.el.getBoundingClientRect();
  const f = v.frame;
  return pts.map(([x, y]) => [rect.left + f.x_scale.compute(x), rect.top + f.y_scale.compute(y)]);
}"""
IMAGE_JS = """
(name) => { const m = Bokeh.documents[0].get_model_by_name(name);
            if (m == null) return null;
            const a = m.data.image[0];
            if (a == null) return null;
            const shape = a.shape ?? [a.length];
            return {shape: Array.from(shape), data: Array.from(a, v => Number.isNaN(v) ? null : v)}; }"""
PROP_JS = "([name, prop]) => { const m = Bokeh.documents[0].get_model_by_name(name); return m == null ? null : m[prop]; }"
SET_JS = "([name, prop, value]) => { Bokeh.documents[0].get_model_by_name(name)[prop] = value; }"


def available() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[test]')"
    if not shutil.which(CHROMIUM):
        return f"{CHROMIUM} not found (apt-get install chromium; .ci/system-packages.txt)"
    return None


class Browser:
    """One headless Chromium; ``page(url)`` opens a tab and waits for the viewer to draw."""

    def __init__(self):
        from playwright.sync_api import sync_playwright
        self._pw = sync_playwright().start()
        self.browser = self._pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        self.errors: list[str] = []

    def page(self, url: str, width: int = 1400, height: int = 1800, timeout_s: float = 120):
        p = self.browser.new_page(viewport={"width": width, "height": height})
        p.on("pageerror", lambda e: self.errors.append(str(e)))
        p.goto(url, timeout=timeout_s * 1000)
        # attached, not visible: the first canvas may be of a panel hidden until it has a result
        p.wait_for_selector("canvas", state="attached", timeout=timeout_s * 1000)
        p.wait_for_function("() => window.Bokeh !== undefined && Bokeh.documents.length > 0",
                            timeout=timeout_s * 1000)
        return Page(p)

    def close(self):
        self.browser.close()
        self._pw.stop()


class Page:
    def __init__(self, page):
        self.p = page

    def js(self, code, arg=None):
        return self.p.evaluate(code, arg)

    def screen(self, fig: str, points) -> list[list[float]]:
        """Page coordinates of data points (x, y) on figure ``fig``."""
        out = self.js(GEOM_JS, [fig, [list(map(float, pt)) for pt in points]])
        if out is None:
            raise LookupError(f"no figure {fig!r} on the page")
        return out

    def image(self, source: str) -> np.ndarray | None:
        """The image a ColumnDataSource of the page holds now (NaN kept)."""
        got = self.js(IMAGE_JS, source)
        if got is None:
            return None
        return np.array([np.nan if v is None else v for v in got["data"]], float).reshape(got["shape"])

    def prop(self, name: str, prop: str):
        return self.js(PROP_JS, [name, prop])

    def set(self, name: str, prop: str, value) -> None:
        self.js(SET_JS, [name, prop, value])

    def drag(self, points, steps: int = 8) -> None:
        m = self.p.mouse
        m.move(*points[0])
        m.down()
        for x, y in points[1:]:
            m.move(x, y, steps=steps)
        m.up()

    def press(self, x, y, hold_s: float = 0.5) -> None:
        """Bokeh's press gesture: the button held ≥ 300 ms without moving."""
        m = self.p.mouse
        m.move(x, y)
        m.down()
        time.sleep(hold_s)
        m.up()

    def click(self, x, y) -> None:
        self.p.mouse.click(x, y)

    def screenshot(self, path) -> None:
        self.p.screenshot(path=str(path), full_page=True)

    def wait_for(self, predicate, timeout_s: float = 60, what: str = "the page", every_s: float = 0.2):
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            v = predicate()
            if v is not None and v is not False:
                return v
            time.sleep(every_s)
        raise TimeoutError(f"{what} did not happen within {timeout_s:g} s")

    def close(self):
        self.p.close()
