"""Simulate an electron-counted 4D-STEM scan of a specimen: events, metadata and ground truth.

>>> from sim_detector.specimens import make_specimen
>>> scan = simulate_scan(make_specimen("pt-particle", size_A=10.0), Beam(dose=50.0),
...                      Detector(shape=(64, 64), mrad_per_px=1.0), ScanSpec(shape=(8, 8)))
>>> scan.counts.shape, scan.indices.dtype.name, scan.truth.expected["adf"].shape
((64,), 'uint32', (8, 8))

Frames are in raster order: frame = (row·(nx + flyback) + col)·frames_per_position + k; the
events of frame i are ``indices[offsets[i]:offsets[i+1]]`` with ``offsets`` the cumulative
``counts``. The model is described in :mod:`sim_detector.model` and docs/EMULATOR.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sim_detector import model
from sim_detector.expected import expected_signals
from sim_detector.sampling import FrameSampler, alias_table
from sim_detector.specimens import SPECIMENS, Specimen, make_specimen  # noqa: F401  (re-export)
from sim_detector.truth import Truth, find_columns

MODEL_VERSION = "stemstream-emulator/1"


@dataclass
class Beam:
    """Electron beam. energy_keV; convergence_mrad: probe semi-angle α; probe_fwhm_A: FWHM
    of the Gaussian probe intensity (None: diffraction limit 0.5145 λ/α); dose: mean incident
    electrons per frame."""

    energy_keV: float = 300.0
    convergence_mrad: float = 20.0
    probe_fwhm_A: float | None = None
    dose: float = 100.0


@dataclass
class Detector:
    """Counting detector. shape (h, w) px; mrad_per_px (None: the specimen's preset);
    dark_rate: mean dark counts per frame (uniform); hot_pixels: number of pixels that fire
    with probability hot_rate per frame; dead_pixels: number of pixels that never record."""

    shape: tuple[int, int] = (576, 576)
    mrad_per_px: float | None = None
    dark_rate: float = 0.0
    hot_pixels: int = 0
    hot_rate: float = 0.5
    dead_pixels: int = 0


@dataclass
class ScanSpec:
    """Probe raster. shape (ny, nx); step_A (None: the field of view fits the specimen at
    any tilt, plus fov_margin_A on each side); frames_per_position; flyback: extra frames per
    row recorded while the probe waits at the row's first position; centre_A: (x, y) of the
    scan centre (None: the specimen's centroid); fov_margin_A (None: preset)."""

    shape: tuple[int, int] = (128, 128)
    step_A: float | None = None
    frames_per_position: int = 1
    flyback: int = 0
    centre_A: tuple[float, float] | None = None
    fov_margin_A: float | None = None


@dataclass
class SimulatedScan:
    """A generated scan. counts (n_frames,) uint32 electrons per frame; indices
    (counts.sum(),) uint32 flat detector index y·w + x; metadata: plain msgpack-able dict;
    truth: :class:`~sim_detector.truth.Truth`."""

    counts: np.ndarray
    indices: np.ndarray
    scan_shape: tuple[int, int]
    frame_shape: tuple[int, int]
    frames_per_position: int
    flyback: int
    metadata: dict
    truth: Truth

    @property
    def offsets(self) -> np.ndarray:
        """(n_frames + 1,) int64 start of each frame's events in ``indices``."""
        off = np.zeros(len(self.counts) + 1, np.int64)
        np.cumsum(self.counts, out=off[1:])
        return off

    def frame_index(self, row: int, col: int, k: int = 0) -> int:
        """Frame number of the k-th frame at scan position (row, col)."""
        nx = self.scan_shape[1]
        return (row * (nx + self.flyback) + col) * self.frames_per_position + k


_BEAM_20 = {"energy_keV": 300.0, "convergence_mrad": 20.0, "probe_fwhm_A": None, "dose": 200.0}
_PRESETS = {
    "mgo": {"beam": _BEAM_20, "detector": {"shape": (576, 576), "mrad_per_px": None},
            "scan": {"shape": (128, 128), "step_A": None, "fov_margin_A": 2.0}},
    "pt-particle": {"beam": _BEAM_20, "detector": {"shape": (576, 576), "mrad_per_px": None},
                    "scan": {"shape": (128, 128), "step_A": None, "fov_margin_A": 3.0}},
    "cluster": {"beam": {**_BEAM_20, "convergence_mrad": 2.5},
                "detector": {"shape": (576, 576), "mrad_per_px": None},
                "scan": {"shape": (128, 128), "step_A": None, "fov_margin_A": 0.0}},
    "amorphous": {"beam": _BEAM_20, "detector": {"shape": (576, 576), "mrad_per_px": None},
                  "scan": {"shape": (128, 128), "step_A": None, "fov_margin_A": 3.0}},
}
# Scattering angle at the detector's inscribed edge: the calibration follows the detector size
# (a binned or smaller detector covers the same angles), 0.5 and 0.2 mrad/px at 576 x 576.
EDGE_MRAD = {"mgo": 144.0, "pt-particle": 144.0, "cluster": 57.6, "amorphous": 144.0, "file": 144.0}
_PRESETS["file"] = _PRESETS["amorphous"]


def presets(specimen_name: str) -> dict:
    """Default settings for a specimen: {"beam": {...}, "detector": {...}, "scan": {...}},
    keyword arguments of :class:`Beam`, :class:`Detector` and :class:`ScanSpec` (a file
    specimen gets the "amorphous" preset). Build with e.g. ``Beam(**p["beam"])`` and
    override what the user gave.

    mgo, pt-particle, amorphous: 300 keV, α = 20 mrad (diffraction-limited probe, FWHM
    0.51 Å), 200 e⁻/frame, detector edge at 144 mrad (0.5 mrad/px, r_BF = 40 px on 576²).
    cluster: 300 keV, α = 2.5 mrad (nanobeam diffraction: probe 4.1 Å, disks separated),
    edge at 57.6 mrad (0.2 mrad/px, r_BF = 12.5 px on 576²). The calibration (mrad_per_px
    None) follows the detector size: edge angle / (min(h, w) / 2). Scan step: the field of view fits the
    specimen at any tilt about y, plus a margin (mgo 2 Å, particle/amorphous 3 Å).
    """
    key = str(specimen_name).lower()
    if key not in _PRESETS:
        key = "file"
    p = _PRESETS[key]
    return {k: dict(v) for k, v in p.items()}


def _preset_key(spec: Specimen) -> str:
    return spec.name if spec.name in SPECIMENS else "file"


def fit_step_A(spec: Specimen, scan_shape, margin_A: float) -> float:
    """Scan step (Å) whose field of view holds the specimen at any tilt about y: x extent
    2·max sqrt((x-cx)² + (z-cz)²), y extent 2·max |y-cy|, each plus 2·margin."""
    c = spec.centre
    d = spec.positions - c
    ext_x = 2.0 * float(np.sqrt(d[:, 0] ** 2 + d[:, 2] ** 2).max()) + 2.0 * margin_A
    ext_y = 2.0 * float(np.abs(d[:, 1]).max()) + 2.0 * margin_A
    ny, nx = scan_shape
    return max(ext_x / nx, ext_y / ny, 1e-3)


def _check(beam: Beam, det: Detector, scan: ScanSpec):
    problems = []
    if not (beam.energy_keV > 0):
        problems.append(f"beam energy {beam.energy_keV} keV must be > 0")
    if not (beam.convergence_mrad > 0):
        problems.append(f"convergence {beam.convergence_mrad} mrad must be > 0")
    if beam.probe_fwhm_A is not None and not (beam.probe_fwhm_A > 0):
        problems.append(f"probe FWHM {beam.probe_fwhm_A} Å must be > 0")
    if not (beam.dose >= 0 and math.isfinite(beam.dose)):
        problems.append(f"dose {beam.dose} e/frame must be >= 0")
    if len(det.shape) != 2 or min(det.shape) < 1 or det.shape[0] * det.shape[1] > 2 ** 32:
        problems.append(f"detector shape {det.shape} must be two positive integers")
    if det.mrad_per_px is not None and not (det.mrad_per_px > 0):
        problems.append(f"mrad_per_px {det.mrad_per_px} must be > 0")
    if det.dark_rate < 0 or not (0 <= det.hot_rate <= 1):
        problems.append("dark_rate must be >= 0 and hot_rate in [0, 1]")
    if det.hot_pixels < 0 or det.dead_pixels < 0 or \
            det.hot_pixels + det.dead_pixels > det.shape[0] * det.shape[1]:
        problems.append("hot_pixels and dead_pixels must be >= 0 and fit on the detector")
    if len(scan.shape) != 2 or min(scan.shape) < 1:
        problems.append(f"scan shape {scan.shape} must be two positive integers")
    if scan.step_A is not None and not (scan.step_A > 0):
        problems.append(f"scan step {scan.step_A} Å must be > 0")
    if scan.frames_per_position < 1 or scan.flyback < 0:
        problems.append("frames_per_position must be >= 1 and flyback >= 0")
    if problems:
        raise ValueError("bad simulation settings: " + "; ".join(problems))


@dataclass
class PreparedScan:
    """Everything but the events: draw frames with ``frames(first, count)`` (any range, any
    order, identical results), or all of them with :func:`simulate_scan`."""

    sampler: FrameSampler
    truth: Truth
    metadata: dict
    scan_shape: tuple[int, int]
    frame_shape: tuple[int, int]
    frames_per_position: int
    flyback: int

    @property
    def n_frames(self) -> int:
        return self.sampler.n_frames

    def frames(self, first: int = 0, count: int | None = None):
        """(counts (count,) uint32, indices uint32) of frames first .. first+count-1."""
        return self.sampler.frames(first, count)


def bad_pixels(seed: int, frame_shape, n_dead: int, n_hot: int):
    """(dead, hot) sorted flat pixel indices, disjoint, drawn from the seed."""
    h, w = frame_shape
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0xDE7EC7])
    n_dead, n_hot = int(n_dead), int(n_hot)
    bad = rng.choice(h * w, n_dead + n_hot, replace=False) if n_dead + n_hot \
        else np.zeros(0, np.int64)
    return np.sort(bad[:n_dead]).astype(np.int64), np.sort(bad[n_dead:]).astype(np.int64)


def _reflection_tables(refl):
    """Concatenated per-grain reflection tables: offsets (px), probability within the grain,
    grain start indices and alias tables (indices local to each grain)."""
    G = len(refl)
    starts = np.zeros(G + 1, np.int64)
    dx, dy, p, prob, alias = [np.zeros(0)], [np.zeros(0)], [np.zeros(0)], [np.zeros(0)], \
        [np.zeros(0, np.int64)]
    for gi, rf in enumerate(refl):
        starts[gi + 1] = starts[gi] + len(rf.K)
        if not len(rf.K):
            continue
        dx.append(rf.offset_px[:, 1])
        dy.append(rf.offset_px[:, 0])
        pk = rf.K / rf.total
        p.append(pk)
        a, b = alias_table(pk)
        prob.append(a)
        alias.append(b)
    return (np.concatenate(dx), np.concatenate(dy), np.concatenate(p), starts,
            np.concatenate(prob), np.concatenate(alias).astype(np.int64))


def prepare_scan(specimen: Specimen, beam: Beam = Beam(), detector: Detector = Detector(),
                 scan: ScanSpec = ScanSpec(), seed: int = 0, tilt_deg: float | None = None, *,
                 adf_px: tuple[float, float] | None = None,
                 with_expected: bool = True) -> PreparedScan:
    """Evaluate the model for every probe position (see :func:`simulate_scan`)."""
    _check(beam, detector, scan)
    pre = presets(_preset_key(specimen))
    h, w = (int(v) for v in detector.shape)
    m = float(detector.mrad_per_px if detector.mrad_per_px is not None
              else EDGE_MRAD[_preset_key(specimen)] / (min(h, w) / 2))
    ny, nx = (int(v) for v in scan.shape)
    E, alpha = float(beam.energy_keV), float(beam.convergence_mrad)
    lam = model.wavelength_A(E)
    fwhm = float(beam.probe_fwhm_A) if beam.probe_fwhm_A is not None else \
        model.diffraction_limited_fwhm_A(E, alpha)
    margin = float(scan.fov_margin_A if scan.fov_margin_A is not None
                   else pre["scan"]["fov_margin_A"])
    step = float(scan.step_A) if scan.step_A is not None else fit_step_A(specimen, (ny, nx), margin)
    centre = specimen.centre[:2] if scan.centre_A is None else np.asarray(scan.centre_A, float)
    origin = (float(centre[0] - (nx - 1) / 2 * step), float(centre[1] - (ny - 1) / 2 * step))
    # tilt_deg is the absolute tilt: a specimen already rotated to it is not rotated again
    tilt = float(specimen.tilt_deg if tilt_deg is None else tilt_deg)
    spec = specimen.rotated(tilt - specimen.tilt_deg) if tilt != specimen.tilt_deg else specimen
    axis = ((h - 1) / 2.0, (w - 1) / 2.0)
    r_bf = alpha / m
    G = len(spec.grains)

    # --- probe-weighted maps and per-position component weights
    dens = [g.density_per_A3 for g in spec.grains]
    maps = model.probe_maps(spec.positions, spec.Z, spec.grain, dens, (ny, nx), origin, step, fwhm)
    refl = []
    for gi, g in enumerate(spec.grains):
        sel = spec.grain == gi
        t = model.grain_thickness_A(spec.positions[sel, :2], g.density_per_A3) if sel.sum() else 0.0
        refl.append(model.grain_reflections(g, t, E, m, (h, w), r_bf))
    tau = np.zeros((G, ny * nx))
    for gi, rf in enumerate(refl):
        if rf.total > 0:
            tau[gi] = rf.total * maps["T"][gi].ravel() / rf.thickness_A
    S = maps["S"].ravel()
    lam_u, lam_diff, lam_b = model.component_weights(S, tau, float(beam.dose))
    dx_px = model.DEFLECTION_MRAD_A3 * maps["grad_x"].ravel() / m
    dy_px = model.DEFLECTION_MRAD_A3 * maps["grad_y"].ravel() / m
    cx = axis[1] + dx_px
    cy = axis[0] + dy_px

    dead_pix, hot_pix = bad_pixels(seed, (h, w), detector.dead_pixels, detector.hot_pixels)
    dead = np.zeros(h * w, np.uint8)
    dead[dead_pix] = 1

    # --- diffuse distribution (fixed) restricted to live pixels
    theta0 = model.diffuse_theta0_mrad(spec.Z, E)
    q = model.diffuse_distribution((h, w), axis, r_bf, m, theta0).ravel() * (1 - dead)
    diff_pix = np.nonzero(q > 0)[0]
    lam_d = lam_diff * float(q.sum())
    dprob, dalias = alias_table(q[diff_pix])
    refl_dx, refl_dy, refl_p, starts, refl_prob, refl_alias = _reflection_tables(refl)

    sampler = FrameSampler(seed=seed, scan_shape=(ny, nx), frame_shape=(h, w),
                           frames_per_position=scan.frames_per_position, flyback=scan.flyback,
                           r_bf_px=r_bf, lam_u=lam_u, lam_d=lam_d, lam_b=lam_b.T, cx=cx, cy=cy,
                           refl_dx=refl_dx, refl_dy=refl_dy, refl_start=starts,
                           refl_prob=refl_prob, refl_alias=refl_alias,
                           diff_pix=diff_pix, diff_prob=dprob, diff_alias=dalias, dead=dead,
                           dark_rate=detector.dark_rate, hot_pix=hot_pix,
                           hot_rate=detector.hot_rate)

    # --- truth
    adf_in, adf_out = adf_px if adf_px is not None else (2.0 * r_bf, min(h, w) / 2.0)
    det_geom = {"frame_shape": (h, w), "axis_yx": axis, "mrad_per_px": m,
                "bf_radius_px": r_bf, "adf_inner_px": float(adf_in),
                "adf_outer_px": float(adf_out), "dead_pixels": dead_pix, "hot_pixels": hot_pix,
                "hot_rate": float(detector.hot_rate) if len(hot_pix) else 0.0,
                "dark_rate": float(detector.dark_rate)}
    if with_expected:
        ex = expected_signals(lam_u=lam_u, lam_b=lam_b.T, lam_d=lam_d, cx=cx, cy=cy,
                              refl_dx=refl_dx, refl_dy=refl_dy, refl_start=starts, refl_p=refl_p,
                              r_bf_px=r_bf, frame_shape=(h, w), axis=axis, bf_radius_px=r_bf,
                              adf_inner_px=adf_in, adf_outer_px=adf_out,
                              diffuse_q=q.reshape(h, w), dead=dead, hot_pix=hot_pix,
                              hot_rate=det_geom["hot_rate"], dark_rate=detector.dark_rate)
        expected = {k: v.reshape(ny, nx) for k, v in ex.items()}
    else:
        expected = {}
    T = maps["T"]
    if G:
        gm = np.where(T.max(0) >= model.GRAIN_MAP_MIN_A, T.argmax(0), -1).astype(np.int32)
    else:
        gm = np.full((ny, nx), -1, np.int32)
    cols = find_columns(spec.positions, spec.Z, spec.grain)
    cols["col_px"] = (cols["x_A"] - origin[0]) / step
    cols["row_px"] = (cols["y_A"] - origin[1]) / step
    grains_t = [{"name": g.name, "lattice": g.lattice, "basis_frac": g.basis_frac,
                 "basis_Z": g.basis_Z, "origin": g.origin, "thickness_A": rf.thickness_A,
                 "reflections_hkl": rf.hkl, "reflections_offset_px": rf.offset_px,
                 "reflections_K": rf.K} for g, rf in zip(spec.grains, refl)]
    dose = float(beam.dose)
    with np.errstate(invalid="ignore", divide="ignore"):
        bragg_frac = lam_b / dose if dose > 0 else np.zeros_like(lam_b)
    model_maps = {
        "diffuse_fraction": (-np.expm1(-S)).reshape(ny, nx),
        "unscattered_fraction": (lam_u / dose if dose > 0
                                 else np.zeros_like(lam_u)).reshape(ny, nx),
        "bragg_fraction": bragg_frac.reshape(G, ny, nx),
        "deflection_y_px": dy_px.reshape(ny, nx), "deflection_x_px": dx_px.reshape(ny, nx)}

    meta = {
        "emulator": MODEL_VERSION, "specimen": spec.name, "specimen_params": spec.params,
        "n_atoms": int(len(spec.Z)), "tilt_deg": tilt, "tilt_axis": "y",
        "seed": int(seed), "beam_energy_keV": E, "wavelength_A": lam,
        "convergence_mrad": alpha, "probe_fwhm_A": fwhm,
        "probe_fwhm_source": ("given" if beam.probe_fwhm_A is not None
                              else "diffraction limit 0.5145*lambda/alpha"),
        "dose_e_per_frame": dose, "mrad_per_px": m, "frame_shape": [h, w],
        "optical_axis_yx_px": [axis[0], axis[1]], "bf_radius_px": r_bf,
        "adf_inner_px": float(adf_in), "adf_outer_px": float(adf_out),
        "scan_shape": [ny, nx], "scan_step_A": step,
        "scan_origin_A": [origin[0], origin[1]],
        "frames_per_position": int(scan.frames_per_position),
        "flyback": int(scan.flyback),
        "detector_effects": {"dark_rate": float(detector.dark_rate),
                             "hot_pixels": [int(v) for v in hot_pix],
                             "hot_rate": float(detector.hot_rate),
                             "dead_pixels": [int(v) for v in dead_pix]},
        "diffuse_theta0_mrad": theta0, "kappa_A2": model.KAPPA_A2,
        "grains": [{"name": g.name, "thickness_A": rf.thickness_A,
                    "n_reflections": int(len(rf.K)), "bragg_K_total": rf.total}
                   for g, rf in zip(spec.grains, refl)],
    }
    truth = Truth(positions=spec.positions, Z=spec.Z, grain=spec.grain, grains=grains_t,
                  columns=cols, grain_map=gm, grain_thickness_A=T.reshape(G, ny, nx),
                  scan={"scan_shape": (ny, nx), "step_A": step, "origin_x_A": origin[0],
                        "origin_y_A": origin[1],
                        "frames_per_position": int(scan.frames_per_position),
                        "flyback": int(scan.flyback), "tilt_deg": tilt},
                  expected=expected, detector=det_geom, model=model_maps, metadata=meta)
    return PreparedScan(sampler, truth, meta, (ny, nx), (h, w), int(scan.frames_per_position),
                        int(scan.flyback))


def simulate_scan(specimen: Specimen, beam: Beam = Beam(), detector: Detector = Detector(),
                  scan: ScanSpec = ScanSpec(), seed: int = 0, tilt_deg: float | None = None,
                  progress=None, *, adf_px: tuple[float, float] | None = None,
                  with_expected: bool = True) -> SimulatedScan:
    """Simulate one scan of ``specimen`` at tilt ``tilt_deg`` about y.

    tilt_deg: the absolute tilt (degrees) of the specimen model: the specimen is rotated by
    tilt_deg - specimen.tilt_deg, so passing ``make_specimen(...)`` with tilt_deg=30 and
    passing ``make_specimen(...).rotated(30)`` with tilt_deg=30 (or None) give the same scan.
    None: image the specimen as it is.

    beam, detector, scan: settings; None fields take the specimen's :func:`presets`.
    seed: the same seed gives identical events, bad pixels and truth.
    progress: optional callable(fraction_done) called during event generation.
    adf_px: (inner, outer) radii of the truth's ADF detector in px (default 2·r_BF and
    min(h, w)/2). with_expected=False skips the truth's expected images (faster).
    """
    prep = prepare_scan(specimen, beam, detector, scan, seed, tilt_deg, adf_px=adf_px,
                        with_expected=with_expected)
    n = prep.n_frames
    if progress is None:
        counts, indices = prep.frames(0, n)
    else:
        n_chunks = max(1, min(50, n // 4096))
        edges = np.linspace(0, n, n_chunks + 1).astype(np.int64)
        parts = []
        progress(0.0)
        for a, b in zip(edges[:-1], edges[1:]):
            parts.append(prep.frames(int(a), int(b - a)))
            progress(float(b) / n)
        counts = np.concatenate([p[0] for p in parts])
        indices = np.concatenate([p[1] for p in parts])
    return SimulatedScan(counts=counts, indices=indices, scan_shape=prep.scan_shape,
                         frame_shape=prep.frame_shape,
                         frames_per_position=prep.frames_per_position, flyback=prep.flyback,
                         metadata=prep.metadata, truth=prep.truth)
