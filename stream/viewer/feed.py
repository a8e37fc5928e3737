"""What every open page shows, gathered once for all of them from the session in this process.

The feed reads the coordinator's merged live states (``Session.live``), the scans' progress
(``Session.status``, ``Session.rejects``), the finished scans (``Session.results``) and their
files (results, stage outputs, geometry and metadata for the units), and builds one
:class:`ScanView` per scan at most every ``min_interval`` seconds however many pages are open.
A view keeps its page-ready copies (binned images, contrast samples), so five pages cost about
what one does. Drawn apertures run through ``Session.apply``, on the cluster.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from stream.config import ConfigError, calibration, detector_regions
from stream.files.previews import missing_positions
from stream.files.recording import open_recording
from stream.session.live_view import DOSE_BLOCK, RECEIVED, not_received, unpack_received
from stream.stages.runner import STAGES
from stream.transport.protocol import Geometry
from stream.viewer.display import LIVE_MAX_SIDE, MAX_SIDE, bin_factor, binned, com_rgba
from stream.viewer.dose import LiveAdvisor, dose_line, written_advice
from stream.viewer.shapes import DetectorAxes, ScanAxes

LIVE, CLOSING = "receiving", "closing"
IDLE_REBUILD_S = 1.0  # a live view whose frames did not move is rebuilt this often


@dataclass
class ScanSummary:
    """One line of the scan list (plain values)."""

    scan_id: str
    state: str  # receiving | closing | complete | incomplete | failed
    frames_received: int = 0
    n_frames: int = 0
    events: int = 0
    missing: int = 0  # frames the sources sent that have not arrived (so far, or in the end)
    duplicated: int = 0
    rate: float = 0.0  # frames/s over the last seconds while receiving
    path: str = ""
    reason: str = ""
    stages: str = ""  # one line per stage that ran
    missing_ranges: str = ""


@dataclass
class Image:
    """A 2D array the page draws: ``kind`` nav (scan-shaped), sig (detector-shaped) or rgba
    (scan-shaped colours, uint32)."""

    data: np.ndarray
    kind: str
    unit: str
    title: str


@dataclass
class ScanView:
    """Everything the page shows of one scan at one moment. Built by the feed; never
    changed afterwards except for its display cache."""

    scan_id: str
    summary: ScanSummary
    version: int
    scan_axes: ScanAxes | None
    det_axes: DetectorAxes | None
    images: dict = field(default_factory=dict)  # name -> Image, in display order
    columns: dict | None = None  # atom columns of the 'columns' stage: y, x (page units), atoms
    detectors: list = field(default_factory=list)  # (name, inner, outer) radii, page units
    metadata: dict = field(default_factory=dict)
    not_received: np.ndarray | None = None  # (ny, nx) bool: positions drawn as missing (NaN)
    dose: list = field(default_factory=list)  # the dose and what it can measure (stream/viewer/dose.py)
    _cache: dict = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def fingerprint(self) -> tuple:
        """Changes whenever anything drawn changes (state, stages, every image's content)."""
        return (self.summary.state, self.summary.stages, self.columns is not None, tuple(self.dose),
                tuple((n, img.data.shape, float(np.nansum(img.data)) if img.kind != "rgba" else 0.0)
                      for n, img in self.images.items()))

    @property
    def live(self) -> bool:
        return self.summary.state in (LIVE, CLOSING)

    def display(self, name: str) -> tuple[np.ndarray, int]:
        """(page copy of image ``name`` — float32, binned past 512 px, 256 px while the scan
        runs — , bin factor)."""
        with self._lock:
            hit = self._cache.get(("display", name))
            if hit is None:
                img = self.images[name]
                side = LIVE_MAX_SIDE if self.live else MAX_SIDE
                f = bin_factor(img.data.shape, side)
                # colours are made averaged (scan_images); were they not, every f-th one
                hit = (np.ascontiguousarray(img.data[::f, ::f]), f) if img.kind == "rgba" else binned(img.data, f)
                self._cache[("display", name)] = hit
            return hit

    def sample(self, name: str, positive: bool = False) -> np.ndarray:
        """Sorted finite values (positive ones for a log scale) of the page copy, at most
        65,536 of them: contrast limits for any percentiles without sorting again."""
        with self._lock:
            hit = self._cache.get(("sample", name, positive))
        if hit is None:
            data = self.display(name)[0]
            data = data[np.isfinite(data)]
            if positive:
                data = data[data > 0]
            if data.size > 65536:
                data = data[:: data.size // 65536]
            hit = np.sort(data)
            with self._lock:
                self._cache[("sample", name, positive)] = hit
        return hit

    def limits(self, name: str, low_pct: float, high_pct: float, positive: bool = False,
               symmetric: bool = False) -> tuple[float, float]:
        """Display limits at the given percentiles (symmetric about 0 for signed components)."""
        s = self.sample(name, positive)
        if not s.size:
            return (1.0, 10.0) if positive else (-1.0, 1.0) if symmetric else (0.0, 1.0)
        if symmetric:
            m = float(np.abs(s).max() if high_pct >= 100 else
                      np.sort(np.abs(s))[min(s.size - 1, int(high_pct / 100 * s.size))])
            m = m if m > 0 else 1.0
            return -m, m
        lo = float(s[min(s.size - 1, int(low_pct / 100 * s.size))])
        hi = float(s[min(s.size - 1, int(high_pct / 100 * s.size))])
        if hi <= lo:
            hi = lo * 10 if positive else lo + 1
        return lo, hi


def _com_names(results: dict) -> tuple[str, str, str]:
    """(y, x, unit) of the centre of mass to show: mrad when calibrated, else px."""
    if "com_y_mrad" in results and "com_x_mrad" in results:
        return "com_y_mrad", "com_x_mrad", "mrad"
    return "com_y", "com_x", "px"


def scan_images(results: dict, not_received: np.ndarray | None, stages: dict | None = None,
                colour_side: int = MAX_SIDE) -> dict:
    """The panels of a scan in display order from its results (live or final): every virtual
    image, the centre of mass as colours and as components, stage images (phase, grains),
    then the diffraction sum. Positions in ``not_received`` (ny, nx) bool are NaN. The colours
    are made from the components averaged to at most ``colour_side`` a side (what the page
    shows: colouring a 1024² scan's every position took 0.3 s of each live view)."""
    out = {}
    hide = not_received if not_received is not None and not_received.any() else None

    def nav(a):  # (images averaged for display carry NaN where no position was received already)
        a = np.asarray(a, np.float64)
        return a if hide is None or a.shape != hide.shape else np.where(hide, np.nan, a)
    for name, a in results.items():
        if np.ndim(a) == 2 and not name.startswith(("com_", "aperture_", "diffraction_")) \
                and np.asarray(a).dtype.kind in "iuf":
            out[name] = Image(nav(a), "nav", "counts", f"{name} (virtual detector)")
    ky, kx, unit = _com_names(results)
    if ky in results and kx in results:
        cy, cx = nav(results[ky]), nav(results[kx])
        f = bin_factor(cy.shape, colour_side)
        colours = com_rgba(cy, cx) if f == 1 else com_rgba(binned(cy, f)[0], binned(cx, f)[0])
        out["com"] = Image(colours, "rgba", unit, "centre of mass (direction → colour)")
        out["com_x"] = Image(cx, "nav", unit, f"centre of mass x ({unit})")
        out["com_y"] = Image(cy, "nav", unit, f"centre of mass y ({unit}, down)")
    for name, (a, unit, title) in (stages or {}).items():
        out[name] = Image(np.asarray(a, np.float64), "nav", unit, title)
    if "diffraction_sum" in results:
        out["diffraction_sum"] = Image(np.asarray(results["diffraction_sum"], np.float64), "sig", "counts",
                                       "summed diffraction pattern (log)")
    return out


def live_extras(results: dict, geometry) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(positions without an electron yet (ny, nx) bool or None, the dose block or None) of a
    live snapshot; the display variant's own arrays (``received_positions``, ``dose_block``,
    stream/session/live_view.py) are taken out of ``results``. A snapshot at every position
    has neither: its count images say what was received."""
    bits, block = results.pop(RECEIVED, None), results.pop(DOSE_BLOCK, None)
    if bits is not None and geometry is not None:
        return ~unpack_received(bits, geometry.scan_shape), block
    return not_received(results, geometry.scan_shape if geometry is not None else None), block


def read_stage_outputs(path, step_A: float | None) -> tuple[dict, dict | None, list[str]]:
    """Stage images (phase, grain labels), atom columns, and one line per stage from a scan
    file's /stages (empty when none ran)."""
    images, columns, lines = {}, None, []
    with h5py.File(path, "r") as f:
        if "stages" not in f:
            return images, columns, lines
        st = f["stages"]
        for name, g in st.items():
            status = str(g.attrs.get("status", ""))
            lines.append(f"{name}: {g.attrs.get('headline', '')}" if status == "ok"
                         else f"{name} {status}: {g.attrs.get('error', '')}")
            if status != "ok":
                continue
            if name == "phase" and "phase" in g:
                unit = str(g.attrs.get("unit", "rad"))
                images["phase"] = (g["phase"][()], unit, f"iCoM phase ({unit}, stage phase)")
            if name == "grains" and "labels" in g:
                images["grains"] = (g["labels"][()].astype(np.float64), "grain",
                                    "grains (stage grains: label per position)")
            if name == "columns" and "y_px" in g:
                step = step_A or 1.0
                columns = {"y": (g["y_px"][()] + 0.5) * step, "x": (g["x_px"][()] + 0.5) * step,
                           "atoms": None, "image": str(json_param(g, "image") or "adf")}
        if columns is not None and "counting" in st and st["counting"].attrs.get("status") == "ok" \
                and "counts" in st["counting"]:
            columns["atoms"] = st["counting/counts"][()]
    return images, columns, lines


def json_param(group, key):
    import json
    try:
        return json.loads(group.attrs.get("params", "{}")).get(key)
    except (TypeError, ValueError):
        return None


def _ranges_text(ranges, limit: int = 6) -> str:
    parts = [f"{a}" if b - a == 1 else f"{a}-{b - 1}" for a, b in ranges]
    return ", ".join(parts[:limit]) + (f", … ({len(parts) - limit} more)" if len(parts) > limit else "")


class SessionFeed:
    """The page's data from a running :class:`stream.session.Session` in this process.

    min_interval: seconds a live view is reused before it is rebuilt (all pages share it).
    """

    def __init__(self, session, min_interval: float = 0.2):
        self.session = session
        self.min_interval = min_interval
        self.out_dir = Path(session.config.output.dir)
        self._lock = threading.RLock()
        self._views: dict[str, tuple[float, ScanView]] = {}
        self._history: dict[str, deque] = {}
        self._files: dict[str, tuple] = {}  # path -> (geometry, metadata)
        self._version = 0
        self._summaries: list[ScanSummary] = []
        self._summaries_at = 0.0

    # ------------------------------------------------------------ the scan list
    def scans(self) -> list[ScanSummary]:
        """Every scan of the session, newest first: those receiving, then the finished ones."""
        with self._lock:
            now = time.monotonic()
            if now - self._summaries_at < self.min_interval:
                return self._summaries
            s = self.session
            finished = s.results
            out = []
            for st in s.status():
                sid = st["scan_id"]
                if sid in finished or st["state"] == "done":
                    continue
                hist = self._history.setdefault(sid, deque(maxlen=12))
                hist.append((now, st["frames_received"]))
                t0, f0 = hist[0]
                rate = (st["frames_received"] - f0) / (now - t0) if now - t0 > 0.3 else 0.0
                out.append(ScanSummary(sid, st["state"], st["frames_received"], st["n_frames"], st["events"],
                                       st["missing_so_far"], st["duplicates"], rate))
            out.reverse()
            for sid, r in reversed(list(finished.items())):
                reports = s.stage_reports(sid)
                stages = "; ".join(f"{x.name}: {x.headline}" if x.status == "ok" else f"{x.name} {x.status}"
                                   for x in reports) if reports else \
                    ("running" if s.config.stages.run and r.path is not None else "")
                out.append(ScanSummary(sid, r.status, r.frames_received, r.n_frames, r.events, r.n_missing,
                                       r.n_duplicated, 0.0, str(r.path or ""), r.reason, stages,
                                       _ranges_text(r.missing_ranges)))
            self._summaries, self._summaries_at = out, now
            for sid in list(self._history):
                if sid in finished:
                    del self._history[sid]
            return out

    def current(self) -> str | None:
        """The scan to follow: the newest one receiving, else the newest finished one."""
        scans = self.scans()
        pick = [x for x in scans if x.state in (LIVE, CLOSING)] or scans
        return pick[0].scan_id if pick else None

    def rejects(self) -> dict:
        return self.session.rejects()

    def expected_images(self) -> dict:
        """The panels the next scan will have, empty: the newest scan's, else those of the
        configuration (its virtual detectors, the centre of mass, the diffraction sum). A page
        builds them before the first frames come, which in a browser takes seconds."""
        scans = self.scans()
        if scans:
            v = self.view(scans[0].scan_id)
            if v is not None and v.images:
                return {n: Image(np.full((1, 1), np.nan), img.kind, img.unit, img.title) for n, img in v.images.items()
                        if n not in ("phase", "grains")}
        cfg = self.session.config
        probe = Geometry((2, 2), (64, 64), mrad_per_px=cfg.detector.mrad_per_px or 1.0, convergence_mrad=4.0)
        try:
            names = [d["name"] for d in detector_regions(cfg, probe, max_masks=0)]
        except ConfigError:
            names = []
        names += [n for v in cfg.virtual if v.shape == "masks" for n in (v.names or [])]
        one = np.zeros((1, 1), np.int64)
        results = {n: one for n in names}
        if cfg.com.enabled:
            suffix = "_mrad" if cfg.detector.mrad_per_px else ""
            results.update({f"com_y{suffix}": one.astype(float), f"com_x{suffix}": one.astype(float)})
        if cfg.diffraction_sum.enabled:
            results["diffraction_sum"] = one
        return scan_images(results, np.ones((1, 1), bool))

    # ------------------------------------------------------------ one scan
    def view(self, scan_id: str) -> ScanView | None:
        """The scan as the page shows it now (None for an unknown scan)."""
        with self._lock:
            summary = next((x for x in self.scans() if x.scan_id == scan_id), None)
            if summary is None:
                return None
            now = time.monotonic()
            hit = self._views.get(scan_id)
            if hit is not None:
                t, v = hit
                same = v.summary.state == summary.state and v.summary.stages == summary.stages
                # a finished scan does not change (until its stages arrive); a live one is rebuilt
                # when frames arrived (at most every min_interval), else every IDLE_REBUILD_S for
                # a late live snapshot: rebuilding a 1024² scan's images costs the pages' thread
                moved = (v.summary.frames_received, v.summary.events) != (summary.frames_received, summary.events)
                if same and (not v.live or now - t < (self.min_interval if moved else IDLE_REBUILD_S)):
                    return v
            v = self._build(summary)
            if hit is not None and hit[1].fingerprint == v.fingerprint:
                hit[1].summary = summary  # nothing new to draw: the pages keep what they have
                v = hit[1]
            self._views[scan_id] = (now, v)
            for old in [k for k in self._views if k != scan_id and not self._views[k][1].live][:-8]:
                del self._views[old]  # keep a few finished scans' views
            return v

    def _build(self, summary: ScanSummary) -> ScanView:
        sid = summary.scan_id
        if summary.state in (LIVE, CLOSING):
            info = self.session.scan_info(sid)
            geometry, metadata = (info[1], info[2]) if info else (None, {})
            results = dict(self.session.live(sid)) if summary.state == LIVE else {}
            hidden, block = live_extras(results, geometry)
            images = scan_images(results, hidden, colour_side=LIVE_MAX_SIDE)
            columns = None
        else:
            r = self.session.results.get(sid)
            geometry, metadata = self._file_info(summary.path)
            results = r.results if r is not None and r.results else self._file_results(summary.path)
            pf = r.position_frames if r is not None and r.position_frames is not None else \
                results.pop("position_frames", None)
            stages, columns = {}, None
            if summary.path and summary.stages and summary.stages != "running":
                step = _number(metadata.get("scan_step_A"))
                try:
                    stages, columns, _ = read_stage_outputs(summary.path, step)
                except OSError:
                    pass  # the file is being written by a stage: next time
            # positions short of frame parts are missing (as in the previews); the number expected
            # is the session's, else (a file's map alone) the most any position got
            hidden = missing_positions(pf, r.expected_frames_per_position if r is not None and r.results else None)
            images = scan_images(results, hidden, stages)
            block = None
        scan_axes = det_axes = None
        detectors = []
        if geometry is not None:
            scan_axes = ScanAxes(tuple(geometry.scan_shape), _number(metadata.get("scan_step_A")))
            cal = calibration(self.session.config, geometry)
            det_axes = DetectorAxes(tuple(geometry.frame_shape), cal.center, cal.mrad_per_px)
            detectors = self._detector_outlines(geometry, det_axes)
        self._version += 1
        dose = self._dose(summary, geometry, metadata, results, hidden, block) if geometry is not None else []
        return ScanView(sid, summary, self._version, scan_axes, det_axes, images, columns, detectors, metadata,
                        hidden, dose)

    def _dose(self, summary: ScanSummary, geometry, metadata: dict, results: dict, hidden,
              block=None) -> list[str]:
        """The dose and the science code's advice on it (stream/viewer/dose.py); ``block``: the
        received rows of the advice's image at every position, when the images are averaged."""
        step = _number(metadata.get("scan_step_A"))
        cfg = self.session.config
        if summary.state in (LIVE, CLOSING):
            n_pos = geometry.n_positions - (int(hidden.sum()) if hidden is not None else 0)
            lines = [dose_line(summary.events, n_pos, step, so_far=True)]
            if "columns" in cfg.stages.run and n_pos:
                params = {**STAGES["columns"].params, **cfg.stages.params.get("columns", {})}
                image = results.get(str(params.get("image") or "adf"))
                if block is not None:
                    img = np.asarray(block, np.float64)
                elif image is not None and np.shape(image) == tuple(geometry.scan_shape):
                    img = np.where(hidden, np.nan, np.asarray(image, np.float64)) if hidden is not None else image
                else:
                    img = None  # averaged for display: too coarse for columns
                if img is not None:
                    with self._lock:
                        self._advisor = getattr(self, "_advisor", None) or LiveAdvisor(params)
                    lines += self._advisor.lines(summary.scan_id, img, step, summary.events / n_pos)
            return [x for x in lines if x]
        lines = [dose_line(summary.events, geometry.n_positions, step)]
        if summary.path and summary.stages and summary.stages != "running":
            lines += written_advice(summary.path)
        return [x for x in lines if x]

    def _detector_outlines(self, geometry, ax: DetectorAxes) -> list:
        """(name, inner, outer) radii in page units of the configured disks and annuli (drawn
        dashed on the pattern; stream.config.detector_regions, as the previews draw them)."""
        try:
            regions = detector_regions(self.session.config, geometry)
        except ConfigError:
            return []
        return [(d["name"], d["inner_px"] * ax.scale, d["outer_px"] * ax.scale)
                for d in regions if d["shape"] in ("disk", "annulus")]

    def _file_info(self, path: str):
        if not path:
            return None, {}
        hit = self._files.get(path)
        if hit is None:
            try:
                rec = open_recording(path)
                hit = (rec.geometry, rec.metadata)
            except (ValueError, OSError):
                hit = (None, {})
            self._files[path] = hit
        return hit

    @staticmethod
    def _file_results(path: str) -> dict:
        if not path:
            return {}
        try:
            with h5py.File(path, "r") as f:
                out = {k: d[()] for k, d in f["results"].items() if d.ndim == 2}
                if "position_frames" in f.get("completeness", {}):
                    out["position_frames"] = f["completeness/position_frames"][()]
                return out
        except (OSError, KeyError):
            return {}

    # ------------------------------------------------------------ computations on the cluster
    def apply(self, scan_id: str, op):
        """An ad-hoc operator over the scan's events, where they are (``Session.apply``)."""
        return self.session.apply(scan_id, op)


def _number(v):
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) and v > 0 else None
