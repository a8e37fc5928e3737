"""Downstream stages: analyses of a finished scan, run after its file is written.

A stage reads the scan file (results, metadata, events when it needs them) and the outputs of
the stages it depends on, calls a pure function of ``operators/``, and returns a
:class:`StageOutput`. ``run_stages`` runs the configured stages of one scan in dependency order,
writes each output into the same file under ``/stages/<name>`` and PNG previews beside it, and
returns one :class:`StageReport` per stage. A failing stage is recorded with its error (and the
stages depending on it are skipped); the scan's own results are never touched.

Configuration (``[stages]``, docs/CONFIG.md)::

    [stages]
    run = ["phase", "columns", "counting"]
    [stages.columns]
    image = "adf"
    min_distance_px = 4.0
"""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

import h5py
import numpy as np

from operators.base import Result

from stream.files.recording import Recording, open_recording
from stream.files.storage import read_attrs, write_attrs


class StageError(ValueError):
    """A stage cannot run on this scan (missing input, bad parameter); the message says why."""


@dataclass
class StageOutput:
    """What a stage returns: arrays become datasets, scalars and strings attributes of
    ``/stages/<name>``; ``images`` (2D) become PNG previews; ``headline`` is the one line the
    console prints; ``tables`` (name → columns of equal length) are also written as CSV."""

    values: dict
    headline: str
    images: dict = field(default_factory=dict)  # name -> (ny, nx) array, or a Result with its unit
    tables: dict = field(default_factory=dict)
    figures: dict = field(default_factory=dict)  # name -> callable(Figure) drawing a preview
    groups: dict = field(default_factory=dict)  # name -> {key: scalar}: attributes of /stages/<stage>/<name>


@dataclass
class StageReport:
    name: str
    status: str  # ok | failed | skipped
    seconds: float = 0.0
    headline: str = ""
    error: str = ""
    previews: list = field(default_factory=list)


@dataclass
class ScanInput:
    """A finished scan as stages see it."""

    path: Path
    recording: Recording
    results: dict  # name -> array, the scan's /results
    metadata: dict
    outputs: dict  # stage name -> StageOutput.values of the stages already run
    units: dict = field(default_factory=dict)  # name -> unit of a /results array
    missing: np.ndarray | None = None  # (ny, nx) bool: positions with frames missing

    @property
    def geometry(self):
        return self.recording.geometry

    @property
    def step_A(self) -> float | None:
        """Å per scan position, from the metadata (None when unknown)."""
        v = self.number("scan_step_A")
        return v if v is not None and v > 0 else None

    def result(self, name: str, stage: str) -> np.ndarray:
        if name not in self.results:
            raise StageError(f"stage {stage!r} needs the result {name!r}, which this scan does not have "
                             f"(it has {', '.join(sorted(self.results)) or 'none'}); enable it in the configuration")
        return self.results[name]

    def number(self, key: str):
        v = self.metadata.get(key)
        return float(v) if isinstance(v, (int, float, np.number)) and np.isfinite(v) else None

    def dose_per_position(self) -> float | None:
        """Electrons per probe position: the scan's own events (all stored frames) over its
        positions, else the metadata's ``dose_e_per_frame`` × frames per position, else None."""
        g = self.geometry
        if self.recording.n_events >= 0 and g.n_positions:
            return self.recording.n_events / g.n_positions
        d = self.number("dose_e_per_frame")
        return None if d is None else d * g.frames_per_position


def values_of(obj) -> dict:
    """A result dataclass of ``operators`` → {field: value}."""
    return {f.name: getattr(obj, f.name) for f in fields(obj)} if is_dataclass(obj) else dict(obj)


# ---------------------------------------------------------------- the stages

def _phase(scan: ScanInput, p: dict) -> StageOutput:
    from operators.imaging.phase import icom

    mrad = "com_y_mrad" in scan.results
    cy = scan.result("com_y_mrad" if mrad else "com_y", "phase")
    cx = scan.result("com_x_mrad" if mrad else "com_x", "phase")
    adf = scan.results.get("adf")
    if adf is not None and not np.isfinite(adf).all():
        adf = None  # the sign then comes from the phase's skewness
    r = icom(cy, cx, rotation_deg=p["rotation_deg"], flip=p["flip"], adf=adf,
             padding=p["padding"], mrad_per_unit=1.0 if mrad else scan.geometry.mrad_per_px,
             wavelength_A=scan.number("wavelength_A"), step_A=scan.number("scan_step_A"))
    v = values_of(r)
    dose, step = scan.dose_per_position(), scan.number("scan_step_A")
    d_A2 = dose / step ** 2 if dose is not None and step else float("nan")
    advice = {"dose_e_per_position": float("nan") if dose is None else dose, "dose_e_per_A2": d_A2,
              "lines": json.dumps([f"dose {d_A2:.3g} e⁻/Å² ({dose:.3g} e⁻ per probe position); the column "
                                   "precision and atom counting it supports: stages columns and counting"]
                                  if dose is not None and step else [])}
    dose_txt = f"; dose {d_A2:.3g} e⁻/Å²" if np.isfinite(d_A2) else ""
    return StageOutput(v, f"phase {np.ptp(r.phase):.3g} {r.unit} peak to peak; scan rotation "
                          f"{r.rotation_deg:.1f}° ({r.rotation_source}), flip {r.flip}, curl/div {r.curl_residual:.2f}"
                          f"{dose_txt}",
                       images={"phase": Result(r.phase, "nav", r.unit, "phase from the integrated centre of mass")},
                       groups={"dose_advice": advice})


def _advice_group(a) -> dict:
    """A DoseAdvice as the attributes of /stages/<stage>/dose_advice (its console lines as JSON)."""
    d = values_of(a)
    d["lines"] = json.dumps(a.lines())
    return d


def read_dose_advice(path, stage: str | None = None) -> dict | None:
    """The dose advice a 2D stage stored in a scan file: {field: value} of
    ``operators.imaging.dose.DoseAdvice`` plus ``lines`` (list of str, the console text) and
    ``stage``; from ``stage`` or else the most complete one (counting, columns, phase).
    None when no stage stored one. For viewers and scripts."""
    names = [stage] if stage else ["counting", "columns", "phase"]
    with h5py.File(path, "r") as f:
        for name in names:
            key = f"stages/{name}/dose_advice"
            if key in f and f[f"stages/{name}"].attrs.get("status") == "ok":
                d = read_attrs(f[key])
                d["lines"] = json.loads(d.get("lines") or "[]")
                d["stage"] = name
                return d
    return None


def _columns(scan: ScanInput, p: dict) -> StageOutput:
    from operators.imaging.columns import analyze_columns
    from stream.files.previews import columns_figure

    name = p["image"]
    if name == "phase":
        if "phase" not in scan.outputs:
            raise StageError("stage 'columns' on image 'phase' needs the stage 'phase' to run first")
        image = scan.outputs["phase"]["phase"]
    else:
        image = scan.result(name, "columns")
    from operators.imaging.dose import advise

    r = analyze_columns(np.asarray(image, np.float64), min_distance_px=p["min_distance_px"],
                        threshold=p["threshold"], smooth_px=p["smooth_px"], step_A=scan.number("scan_step_A"),
                        noise=p["noise"], false_alarms=p["false_alarms"], p_lattice=p["p_lattice"])
    v = values_of(r)
    v["image"] = name  # the image the columns were found in (its unit is the cross-sections')
    n = len(r.y_px)
    nn = np.nanmedian(r.nn_distance_A if np.isfinite(r.step_A) else r.nn_distance_px) if n > 1 else np.nan
    unit = "Å" if np.isfinite(r.step_A) else "px"
    table = {k: v[k] for k in ("y_px", "x_px", "y_A", "x_A", "sigma1_px", "sigma2_px", "amplitude",
                               "background", "cross_section", "cross_section_shared", "cross_section_sigma",
                               "position_crb_A", "p_value", "detection", "nn_distance_px", "fit_status")}
    a = advise(r, dose_e_per_position=scan.dose_per_position())
    nn_txt = f"median nearest neighbour {nn:.3g} {unit}" if np.isfinite(nn) else "no nearest neighbours"
    return StageOutput(v, f"{n} columns in {name}; {nn_txt}; lattice "
                          f"{'fit' if not r.lattice_error else r.lattice_error}; {_advice_short(a)}",
                       tables={"columns": table}, groups={"dose_advice": _advice_group(a)},
                       figures={"columns": lambda fig: columns_figure(
                           image, r.y_px, r.x_px, unit=_image_unit(scan, name),
                           step_A=scan.step_A, title=f"atomic columns in {name}", fig=fig)})


def _advice_short(a) -> str:
    """The dose advice in a few words, for a headline."""
    if a.noise_model != "poisson":
        return "not a counts image: no dose advice"
    if not np.isfinite(a.position_precision_pm):
        return "no columns to advise on"
    # the counting stage, with its Monte Carlo and the specimen's classes, has the last word
    txt = f"positions ±{a.position_precision_pm:.2g} {a.unit} at this dose; first look: counting {a.counting_status}"
    if a.counting_status == "possible" or a.counting_status == "uncertain":
        txt += f" ({a.predicted_exact:.0%} predicted right)"
    elif a.dose_for_counting_kind == "lower bound" and a.dose_factor_for_counting > 1:
        txt += f" (needs at least ×{a.dose_factor_for_counting:.2g} the dose)"
    elif a.dose_for_counting_kind == "estimate":
        txt += f" (needs ×{a.dose_factor_for_counting:.2g} the dose)"
    else:
        txt += " (needs more dose)"
    return txt


def _counting(scan: ScanInput, p: dict) -> StageOutput:
    if "columns" not in scan.outputs:
        raise StageError("stage 'counting' needs the stage 'columns' to run first")
    from types import SimpleNamespace

    from operators.imaging.dose import count_and_advise
    from stream.files.previews import counting_figure, plural

    c = scan.outputs["columns"]
    xs = np.asarray(c["cross_section_shared"], np.float64)  # NaN where the shared-width fit failed
    cols = SimpleNamespace(y_px=c["y_px"], step_A=c.get("step_A", np.nan),
                           noise_model=c.get("noise_model", "gaussian"), cross_section_shared=xs,
                           cross_section_sigma=c.get("cross_section_sigma"),
                           position_crb_px=c.get("position_crb_px"))
    cc = p["class_counts"]
    res = count_and_advise(cols, dose_e_per_position=scan.dose_per_position(), class_counts=cc,
                           n_mc=p["n_mc"], seed=p["seed"], target_exact=p["target_exact"],
                           atom_cross_section_A2=p["atom_cross_section_A2"],
                           max_components=p["max_components"], n_components=p["n_components"],
                           min_count=p["min_count"], mc_noise=p["mc_noise"])
    r, a, ok, counts = res.counting, res.advice, res.used, res.counts
    if r is None:  # nothing to fit a mixture to: said, not failed
        return StageOutput({"counts": counts, "counted": False},
                           f"{int(ok.sum())} of {len(xs)} columns with a significant cross-section: "
                           "nothing to count",
                           tables={"counts": {"y_px": c["y_px"], "x_px": c["x_px"], "cross_section": xs,
                                              "atoms": counts}},
                           groups={"dose_advice": _advice_group(a)})
    v = values_of(r)
    v["counts"] = counts  # one per column of the columns stage; -1 where not counted
    v["counted"] = res.counted
    if res.counted:
        conf = ", ".join(f"{k}: {c_:.2f}" for k, c_ in zip(r.count_values, r.count_confidence))
        head = (f"{ok.sum()} of {len(xs)} columns in {plural(r.n_components, 'class', 'classes')} ({r.selection}), "
                f"{int(r.count_values.min())}..{int(r.count_values.max())} atoms; Monte Carlo "
                f"confidence per count {conf}; overall {r.confidence_overall:.2f}")
    else:
        head = (f"no counts given ({ok.sum()} of {len(xs)} columns with a cross-section above 3× "
                "its shot noise)")
    head += f"; {a.lines()[-1]}" if a.noise_model == "poisson" else \
        "; not a counts image: the classes are taken as the mixture gives them (no shot-noise check)"
    return StageOutput(v, head,
                       tables={"counts": {"y_px": c["y_px"], "x_px": c["x_px"], "cross_section": xs,
                                          "atoms": counts}},
                       groups={"dose_advice": _advice_group(a)},
                       figures={"counting": lambda fig: counting_figure(
                           xs[ok], means=r.means, weights=r.weights, sigma=r.sigma, class_counts=r.class_counts,
                           unit=f"{_image_unit(scan, c.get('image', 'adf'))}·px²", selection=r.selection, fig=fig)})


def _grains(scan: ScanInput, p: dict) -> StageOutput:
    from operators.crystallography.grains import grain_diffraction
    from operators.crystallography.peak_table import grain_table, peak_table
    from stream.files.previews import labels_figure

    g = scan.geometry
    if g.mrad_per_px is None:
        raise StageError("stage 'grains' needs the detector calibration (mrad per px) in the scan's geometry "
                         "to index Bragg peaks")
    offsets, indices = scan.recording.read()
    r = grain_diffraction(offsets, indices, g.scan_shape, g.frame_shape, g.frames_per_position,
                          scan.result("diffraction_sum", "grains"), g.mrad_per_px,
                          energy_keV=scan.number("beam_energy_keV") or p["energy_keV"],
                          center=g.center, disk_radius_px=p["disk_radius_px"], window_px=p["window_px"])
    v = values_of(r)
    n = len(v["grain_n_positions"])
    return StageOutput(v, f"{n} grain(s): " + "; ".join(r.summary().splitlines()[:6]),
                       figures={"labels": lambda fig: labels_figure(v["labels"], title="grains", step_A=scan.step_A,
                                                                    missing=scan.missing, fig=fig)},
                       tables={"peaks": peak_table(r), "grains": grain_table(r)})


@dataclass
class Stage:
    run: callable
    params: dict  # name -> default
    after: tuple = ()  # stages that must run first when both are configured


STAGES = {
    "phase": Stage(_phase, {"rotation_deg": None, "flip": None, "padding": "mirror"}),
    "columns": Stage(_columns, {"image": "adf", "min_distance_px": 3.0, "threshold": None, "smooth_px": 0.0,
                                "noise": "auto", "false_alarms": 0.2, "p_lattice": 0.01},
                     after=("phase",)),
    "counting": Stage(_counting, {"max_components": None, "n_components": None, "min_count": 1,
                                  "class_counts": None, "mc_noise": "physical", "n_mc": 100, "seed": 0,
                                  "target_exact": 0.95, "atom_cross_section_A2": None},
                      after=("columns",)),
    "grains": Stage(_grains, {"energy_keV": 300.0, "disk_radius_px": None, "window_px": None}),
}


def check_stages(run: list, params: dict, where: str = "[stages]") -> None:
    """ValueError naming the problem for unknown stages or parameters."""
    for name in run:
        if name not in STAGES:
            raise ValueError(f"{where}: unknown stage {name!r}; the stages are {', '.join(STAGES)}")
    for name, table in params.items():
        if name not in STAGES:
            raise ValueError(f"{where}: [stages.{name}] is not a stage; the stages are {', '.join(STAGES)}")
        unknown = set(table) - set(STAGES[name].params)
        if unknown:
            raise ValueError(f"{where}: [stages.{name}] unknown parameter(s) {', '.join(sorted(unknown))}; "
                             f"valid: {', '.join(STAGES[name].params)}")


def order(run: list) -> list:
    """The stages to run, each after the ones it needs (when those are configured)."""
    done, out = set(), []

    def visit(name):
        if name in done:
            return
        done.add(name)
        for dep in STAGES[name].after:
            if dep in run:
                visit(dep)
        out.append(name)
    for name in run:
        visit(name)
    return out


# ---------------------------------------------------------------- running

def load_scan(path) -> ScanInput:
    rec = open_recording(path)
    with h5py.File(path, "r") as f:
        results = {k: d[()] for k, d in f["results"].items()}
        units = {k: str(d.attrs.get("unit", "")) for k, d in f["results"].items()}
        outputs = {k: read_attrs(g) | {n: d[()] for n, d in g.items() if isinstance(d, h5py.Dataset)}
                   for k, g in f["stages"].items() if g.attrs.get("status") == "ok"} if "stages" in f else {}
        pf = f["completeness/position_frames"][()] if "completeness/position_frames" in f else None
    g = rec.geometry
    missing = None if pf is None else pf < g.frames_per_position * g.n_sources
    return ScanInput(Path(path), rec, results, rec.metadata, outputs, units, missing)


def _image_unit(scan: ScanInput, image: str) -> str:
    """The unit of an image the stages read: a /results unit, 'rad' for the phase."""
    return scan.units.get(image) or ("rad" if image == "phase" else "image units")


def run_stages(path, run: list, params: dict | None = None, previews: bool = True) -> list[StageReport]:
    """Run the stages ``run`` (with ``params`` per stage) on the scan file at ``path``; write
    ``/stages/<name>`` and previews; return a report per stage. Never raises for a stage's
    failure (it is in its report); raises ScanFileError when the file cannot be read."""
    params = params or {}
    check_stages(run, params)
    scan = load_scan(path)
    reports = []
    for name in order(run):
        stage = STAGES[name]
        failed_dep = [d for d in stage.after if any(r.name == d and r.status != "ok" for r in reports)]
        if failed_dep:
            reports.append(StageReport(name, "skipped", error=f"needs stage {failed_dep[0]!r}, which did not succeed"))
            _record(path, reports[-1], None, params.get(name, {}))
            continue
        p = {**stage.params, **params.get(name, {})}
        t0 = time.perf_counter()
        try:
            out = stage.run(scan, p)
            report = StageReport(name, "ok", time.perf_counter() - t0, out.headline)
            _record(path, report, out, p)
        except Exception as e:  # noqa: BLE001 - a stage's failure is reported, the scan stays intact
            err = f"{type(e).__name__}: {e}"
            if not isinstance(e, (StageError, ValueError, OSError)):
                err += " | " + traceback.format_exc(limit=-2).strip().splitlines()[-2].strip()
            reports.append(StageReport(name, "failed", time.perf_counter() - t0, error=err))
            try:
                _record(path, reports[-1], None, p)
            except OSError:
                pass  # the file cannot be written at all: the report says why
            continue
        scan.outputs[name] = out.values
        report.previews = _tables(path, name, out)
        if previews:
            try:
                report.previews += _previews(scan, name, out)
            except Exception as e:  # noqa: BLE001 - a preview is not worth a stage
                report.headline += f" (previews failed: {type(e).__name__}: {e})"
        reports.append(report)
    return reports


def _open_for_writing(path, wait_s: float = 60.0) -> h5py.File:
    """The scan file opened r+; waits while another program holds it open (HDF5 locks a file
    that any process reads), then raises OSError saying so."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return h5py.File(path, "r+")
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise OSError(f"{path} stayed open in another program for {wait_s:.0f} s (HDF5 file lock); "
                              "close it and run 'stemstream analyze' again") from None
            time.sleep(0.5)


def _record(path, report: StageReport, out: StageOutput | None, params: dict) -> None:
    """Write one stage's group (replacing an earlier run of the same stage). Everything is
    computed before: the file is open for writing only for this short step."""
    with _open_for_writing(path) as f:
        stages = f.require_group("stages")
        if report.name in stages:
            del stages[report.name]
        g = stages.create_group(report.name)
        g.attrs.update(status=report.status, seconds=report.seconds, headline=report.headline,
                       error=report.error, params=json.dumps(params, default=str), finished=time.time())
        if out is None:
            return
        scalars = {}
        for key, value in out.values.items():
            a = np.asarray(value) if not isinstance(value, str) else None
            if a is not None and a.ndim > 0:
                g.create_dataset(key, data=_storable(a))
            else:
                scalars[key] = value.item() if isinstance(value, np.generic) else value
        write_attrs(g, scalars)
        for tname, cols in out.tables.items():
            t = g.require_group(f"table_{tname}")
            for col, arr in cols.items():
                t.create_dataset(col, data=_storable(np.asarray(arr)))
        for gname, attrs in out.groups.items():
            write_attrs(g.require_group(gname), attrs)


def _storable(a: np.ndarray) -> np.ndarray:
    """Text arrays as HDF5 variable-length UTF-8 strings (h5py refuses numpy's 'U' arrays)."""
    return a.astype(h5py.string_dtype()) if a.dtype.kind == "U" else a


def _write_csv(target: Path, cols: dict) -> None:
    import csv
    keys = list(cols)
    rows = zip(*(np.asarray(cols[k]).tolist() for k in keys))
    with open(target, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(keys)
        for row in rows:
            out.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in row])


def _previews(scan: ScanInput, name: str, out: StageOutput) -> list[str]:
    """PNG previews of a stage's images (colour bar in their unit, scale bar in Å, missing
    positions marked) and figures, in ``previews/`` beside the scan file."""
    from stream.files.previews import image_figure, new_figure, save

    path = scan.path
    directory = path.parent / "previews"
    stem = f"{path.stem}_stage_{name}"
    written = []
    for key, img in out.images.items():
        data, unit = (img.data, img.unit) if isinstance(img, Result) else (np.asarray(img), "")
        title = (img.description if isinstance(img, Result) else "") or (key if key == name else f"{name}: {key}")
        fig = image_figure(data, title=title, unit=unit or "a.u.", step_A=scan.step_A,
                           missing=scan.missing)
        written.append(str(save(fig, directory / f"{stem}_{key}.png")))
    for fname, draw in out.figures.items():
        fig = new_figure(6, 5)
        draw(fig)
        written.append(str(save(fig, directory / f"{stem}_{fname}.png")))
    return written


def _tables(path, name: str, out: StageOutput) -> list[str]:
    """Each table also as DIR/SCAN_STAGE_TABLE.csv, for spreadsheets and scripts."""
    path = Path(path)
    written = []
    for tname, cols in out.tables.items():
        target = path.parent / f"{path.stem}_{name}_{tname}.csv"
        _write_csv(target, cols)
        written.append(str(target))
    return written
