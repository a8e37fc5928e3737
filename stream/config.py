"""Pipeline configuration: a TOML file, overridable by command-line flags, and the operators
it builds for each scan.

Every section and key is optional; see ``docs/CONFIG.md`` and ``deploy/pipeline.example.toml``.
Unknown keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from operators.apertures import RealSpaceApertures, load_aperture_masks, rect_mask
from operators.com import CenterOfMass
from operators.completeness import Completeness
from operators.diffraction import DiffractionSum
from operators.events import EventStore
from operators.fused import fuse_operators
from operators.virtual import VirtualDetectors, annulus_mask, check_masks, disk_mask, load_masks

from stream.transport.protocol import Geometry
from stream.stages.runner import check_stages
from stream.stages.tomo import check_series_params


class ConfigError(ValueError):
    """A configuration the pipeline cannot run; the message names the key and the fix."""


@dataclass
class DetectorSpec:
    """Overrides of the calibration the stream carries."""

    mrad_per_px: float | None = None
    convergence_mrad: float | None = None
    center: list[float] | None = None


@dataclass
class VirtualSpec:
    """One virtual detector: a disk, an annulus, or a stack of masks from a .npy file."""

    name: str = ""
    shape: str = "disk"  # disk | annulus | masks
    radius_px: float | None = None
    radius_mrad: float | None = None
    inner_px: float | None = None
    inner_mrad: float | None = None
    outer_px: float | None = None
    outer_mrad: float | None = None
    file: str | None = None
    names: list[str] | None = None
    masks: np.ndarray | None = field(default=None, repr=False)  # loaded from ``file``


@dataclass
class ComSpec:
    enabled: bool = True
    radius_px: float | None = None
    radius_mrad: float | None = None
    rotation_deg: float = 0.0
    flip: bool = False


@dataclass
class DiffractionSpec:
    enabled: bool = True


@dataclass
class ApertureSpec:
    """A real-space aperture: a rectangle [y0, y1, x0, x1) of probe positions or a mask file."""

    name: str = ""
    rect: list[int] | None = None
    file: str | None = None


@dataclass
class ChunkingSpec:
    max_frames: int = 4096
    max_bytes: int = 32_000_000
    max_latency_ms: float = 50.0


@dataclass
class ScanSpec:
    timeout_s: float = 5.0  # a scan whose sources did not all end closes this long after its last message
    finalize_timeout_s: float = 600.0  # an attempt to write a scan ends after this long (then it is retried)


@dataclass
class ClusterSpec:
    scheduler: str | None = None  # address of a running scheduler; None starts a LocalCluster
    workers: int = 2
    threads_per_worker: int = 1
    memory_limit: str | int | float = "auto"  # per worker, as dask takes it: "4GB", 4e9, 0 (none)


@dataclass
class MemorySpec:
    events_in_memory_mb: float = 128.0  # per receiver, over its open scans; past it events go to disk
    spill_dir: str = ""  # where they go; "" is the dask worker's local directory
    write_block_mb: float = 16.0  # events (4 B each) per block when the scan file is written


@dataclass
class OutputSpec:
    dir: str = "out"
    previews: bool = True
    compression_level: int = 2
    fallback_dir: str = ""  # where a scan file goes when dir cannot be written ("" : held on the workers)


@dataclass
class LiveSpec:
    rate_hz: float = 2.0
    publish: str | None = None  # bind address of the live results PUB socket, e.g. tcp://127.0.0.1:6100


@dataclass
class StagesSpec:
    run: list[str] = field(default_factory=list)  # stages run on every finished scan
    params: dict = field(default_factory=dict)  # stage name -> {parameter: value} ([stages.NAME])


@dataclass
class SeriesSpec:
    reconstruct: bool = False  # reconstruct every tilt series once all its scans are written
    params: dict = field(default_factory=dict)  # reconstruct_series parameters (stream/stages/tomo.py)


@dataclass
class PipelineConfig:
    detector: DetectorSpec = field(default_factory=DetectorSpec)
    virtual: list[VirtualSpec] = field(default_factory=list)
    com: ComSpec = field(default_factory=ComSpec)
    diffraction_sum: DiffractionSpec = field(default_factory=DiffractionSpec)
    aperture: list[ApertureSpec] = field(default_factory=list)
    chunking: ChunkingSpec = field(default_factory=ChunkingSpec)
    scan: ScanSpec = field(default_factory=ScanSpec)
    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    memory: MemorySpec = field(default_factory=MemorySpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    live: LiveSpec = field(default_factory=LiveSpec)
    stages: StagesSpec = field(default_factory=StagesSpec)
    series: SeriesSpec = field(default_factory=SeriesSpec)
    path: str | None = None  # where it was read from, for messages and provenance

    def operators(self, geometry: Geometry) -> list:
        """The operators of one scan (:func:`build_operators`): how a receiver, which knows
        nothing of configuration files, builds them."""
        return build_operators(self, geometry)

    def to_dict(self) -> dict:
        """Plain values for provenance (mask arrays summarised by shape)."""
        d = asdict(self)
        for v in d["virtual"]:
            if v.get("masks") is not None:
                v["masks"] = f"array{list(np.shape(v['masks']))}"
        return d


_SECTIONS = {"detector": DetectorSpec, "com": ComSpec, "diffraction_sum": DiffractionSpec,
             "chunking": ChunkingSpec, "scan": ScanSpec, "cluster": ClusterSpec,
             "memory": MemorySpec, "output": OutputSpec, "live": LiveSpec}
_LISTS = {"virtual": VirtualSpec, "aperture": ApertureSpec}


_TOML_TYPES = {"float": (int, float), "int": (int,), "bool": (bool,), "str": (str,), "list": (list,)}


def _type_ok(value, annotation: str) -> bool:
    """Does a TOML value fit a field annotated like 'float | None' or 'list[int] | None'?"""
    if value is None:
        return "None" in annotation
    for part in annotation.split("|"):
        allowed = _TOML_TYPES.get(part.strip().split("[")[0])
        if allowed and isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed):
            return True
    return False


def _build(cls, table: dict, where: str):
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table, got {type(table).__name__}")
    known = {f.name: f.type for f in fields(cls) if f.name != "masks"}
    unknown = set(table) - set(known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; "
                          f"valid keys are {', '.join(sorted(known))}")
    for key, value in table.items():
        if not _type_ok(value, known[key]):
            raise ConfigError(f"{where}: {key} = {value!r} has the wrong type; expected "
                              f"{known[key].replace(' | None', '').replace('str', 'a string')}")
    return cls(**table)


def _build_stages(table, where: str) -> StagesSpec:
    """[stages] run = [...] plus one [stages.NAME] table of parameters per stage."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    run = table.get("run", [])
    if not isinstance(run, list) or not all(isinstance(n, str) for n in run):
        raise ConfigError(f"{where}: run must be a list of stage names, e.g. run = [\"phase\", \"columns\"]")
    params = {k: v for k, v in table.items() if k != "run"}
    for k, v in params.items():
        if not isinstance(v, dict):
            raise ConfigError(f"{where}: {k} = {v!r}: only run = [...] and [stages.NAME] tables of "
                              "parameters belong here")
    return StagesSpec(run, params)


def load_config(path: str | Path | None = None) -> PipelineConfig:
    """Read a pipeline TOML file (None: all defaults) and check it; raises ConfigError."""
    if path is None:
        return validate(PipelineConfig())
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    cfg = PipelineConfig(path=str(path))
    for key, value in doc.items():
        where = f"{path} [{key}]"
        if key == "stages":
            cfg.stages = _build_stages(value, where)
        elif key == "series":
            if not isinstance(value, dict) or not isinstance(value.get("reconstruct", False), bool):
                raise ConfigError(f"{where}: a table with reconstruct = true|false and parameters of "
                                  "the reconstruction (docs/SERIES.md)")
            cfg.series = SeriesSpec(value.get("reconstruct", False),
                                    {k: v for k, v in value.items() if k != "reconstruct"})
        elif key in _SECTIONS:
            setattr(cfg, key, _build(_SECTIONS[key], value, where))
        elif key in _LISTS:
            if not isinstance(value, list):
                raise ConfigError(f"{where} must be an array of tables: write [[{key}]]")
            setattr(cfg, key, [_build(_LISTS[key], v, f"{path} [[{key}]] #{i + 1}")
                               for i, v in enumerate(value)])
        else:
            homes = [name for name, c in {**_SECTIONS, **_LISTS}.items()
                     if key in {f.name for f in fields(c)}]
            hint = f" (did you mean {key} under [{homes[0]}]?)" if homes else ""
            raise ConfigError(f"{path}: unknown section [{key}]{hint}; valid sections are "
                              f"{', '.join(sorted([*_SECTIONS, *_LISTS, 'stages', 'series']))}")
    return validate(cfg, base=path.parent)


def validate(cfg: PipelineConfig, base: Path | None = None) -> PipelineConfig:
    """Check values and load mask files (relative paths are relative to the config file)."""
    where = cfg.path or "configuration"
    base = base or Path.cwd()
    names = set()
    for i, v in enumerate(cfg.virtual):
        label = f"{where} [[virtual]] #{i + 1} ({v.name or 'unnamed'})"
        if not v.name:
            raise ConfigError(f"{label}: needs a name (it becomes the result's name)")
        if v.shape not in ("disk", "annulus", "masks"):
            raise ConfigError(f"{label}: shape {v.shape!r} must be disk, annulus or masks")
        if v.shape == "disk" and (v.radius_px is None) == (v.radius_mrad is None):
            raise ConfigError(f"{label}: a disk needs exactly one of radius_px, radius_mrad")
        if v.shape == "annulus":
            for edge in ("inner", "outer"):
                if (getattr(v, f"{edge}_px") is None) == (getattr(v, f"{edge}_mrad") is None):
                    raise ConfigError(f"{label}: an annulus needs exactly one of {edge}_px, {edge}_mrad")
        if v.shape == "masks":
            if not v.file:
                raise ConfigError(f"{label}: shape 'masks' needs file = 'masks.npy' ((k, h, w) or (h, w))")
            if v.masks is None:  # validate() may run again on a checked configuration
                try:
                    v.masks = load_masks(base / v.file)
                except (ValueError, OSError) as e:
                    raise ConfigError(f"{label}: {e}") from None
            if v.masks.ndim == 2:
                v.masks = v.masks[None]
            k = len(v.masks)
            v.names = v.names or ([v.name] if k == 1 else [f"{v.name}_{j}" for j in range(k)])
            if len(v.names) != k:
                raise ConfigError(f"{label}: {len(v.names)} names for {k} masks")
        for n in (v.names if v.shape == "masks" else [v.name]):
            if n.startswith(("com_", "aperture_")) or n == "diffraction_sum":
                raise ConfigError(f"{label}: the name {n!r} is taken by another result "
                                  "(com_*, diffraction_sum, aperture_*); choose another")
            if n in names:
                raise ConfigError(f"{where}: two virtual detectors are named {n!r}")
            names.add(n)
    for i, a in enumerate(cfg.aperture):
        label = f"{where} [[aperture]] #{i + 1} ({a.name or 'unnamed'})"
        if not a.name:
            raise ConfigError(f"{label}: needs a name")
        if (a.rect is None) == (a.file is None):
            raise ConfigError(f"{label}: give exactly one of rect = [y0, y1, x0, x1] or file = 'mask.npy'")
        if a.rect is not None and (len(a.rect) != 4 or a.rect[0] >= a.rect[1] or a.rect[2] >= a.rect[3]):
            raise ConfigError(f"{label}: rect {a.rect} must be [y0, y1, x0, x1] with y0 < y1 and x0 < x1")
        if a.file:
            a.file = str(base / a.file)
            if not Path(a.file).is_file():
                raise ConfigError(f"{label}: mask file {a.file} does not exist")
    if len({a.name for a in cfg.aperture}) != len(cfg.aperture):
        raise ConfigError(f"{where}: aperture names must be distinct")
    checks = [(cfg.chunking.max_frames >= 1, "[chunking] max_frames must be >= 1"),
              (cfg.chunking.max_bytes >= 1, "[chunking] max_bytes must be >= 1"),
              (cfg.chunking.max_latency_ms > 0, "[chunking] max_latency_ms must be > 0"),
              (cfg.scan.timeout_s > 0, "[scan] timeout_s must be > 0"),
              (cfg.scan.finalize_timeout_s > 0, "[scan] finalize_timeout_s must be > 0"),
              (cfg.cluster.workers >= 1, "[cluster] workers must be >= 1"),
              (cfg.cluster.threads_per_worker >= 1, "[cluster] threads_per_worker must be >= 1"),
              (cfg.memory.events_in_memory_mb > 0,
               "[memory] events_in_memory_mb must be > 0 (MB of events a receiver keeps in memory)"),
              (cfg.memory.write_block_mb > 0,
               "[memory] write_block_mb must be > 0 (MB of events per block written to the scan file)"),
              (0 <= cfg.output.compression_level <= 9, "[output] compression_level must be 0..9"),
              (cfg.live.rate_hz >= 0, "[live] rate_hz must be >= 0 (0 turns live results off)"),
              (cfg.com.radius_px is None or cfg.com.radius_px > 0, "[com] radius_px must be > 0"),
              (cfg.com.radius_mrad is None or cfg.com.radius_mrad > 0, "[com] radius_mrad must be > 0")]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{where}: {message}")
    try:
        check_stages(cfg.stages.run, cfg.stages.params, f"{where} [stages]")
        check_series_params(cfg.series.params, f"{where} [series]")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return cfg


# ------------------------------------------------------------------ operators per scan

@dataclass(frozen=True)
class Calibration:
    """Detector calibration in effect for one scan: configuration overrides the stream."""

    center: tuple[float, float]
    mrad_per_px: float | None
    convergence_mrad: float | None

    def px(self, value_px, value_mrad, what: str) -> float:
        if value_px is not None:
            return float(value_px)
        if self.mrad_per_px is None:
            raise ConfigError(f"{what} is given in mrad but neither the stream nor [detector] "
                              "gives mrad_per_px; set [detector] mrad_per_px or give it in px")
        return float(value_mrad) / self.mrad_per_px

    @property
    def bf_radius_px(self) -> float | None:
        if self.mrad_per_px and self.convergence_mrad:
            return self.convergence_mrad / self.mrad_per_px
        return None


def calibration(cfg: PipelineConfig, g: Geometry) -> Calibration:
    h, w = g.frame_shape
    d = cfg.detector
    center = d.center or g.center or ((h - 1) / 2, (w - 1) / 2)
    return Calibration((float(center[0]), float(center[1])), d.mrad_per_px or g.mrad_per_px,
                       d.convergence_mrad or g.convergence_mrad)


def default_virtual(cal: Calibration, frame_shape) -> list[VirtualSpec]:
    """Bright field: the disk of the convergence angle. Annular dark field: from twice the
    bright-field radius (or halfway between the disk and the detector edge, when twice does
    not fit) to the detector's inscribed circle; none when the disk fills the detector.
    Without a calibration the bright-field radius is an eighth of the detector's smaller side."""
    edge = min(frame_shape) / 2
    r_bf = cal.bf_radius_px or edge / 4
    out = [VirtualSpec(name="bf", shape="disk", radius_px=r_bf)]
    if r_bf < edge - 1:
        out.append(VirtualSpec(name="adf", shape="annulus", inner_px=min(2 * r_bf, (r_bf + edge) / 2),
                               outer_px=edge))
    return out


def build_operators(cfg: PipelineConfig, g: Geometry) -> list:
    """The operators of one scan, in processing order. Raises ConfigError when the
    configuration does not fit this scan's geometry."""
    cal = calibration(cfg, g)
    shape = g.frame_shape
    masks, names = [], []
    for v in cfg.virtual or default_virtual(cal, shape):
        label = f"virtual detector {v.name!r}"
        if v.shape == "disk":
            masks.append(disk_mask(shape, cal.center, cal.px(v.radius_px, v.radius_mrad, label)))
            names.append(v.name)
        elif v.shape == "annulus":
            masks.append(annulus_mask(shape, cal.center, cal.px(v.inner_px, v.inner_mrad, label),
                                      cal.px(v.outer_px, v.outer_mrad, label)))
            names.append(v.name)
    ops = []
    if masks:
        ops.append(VirtualDetectors(np.stack(masks), names, g.scan_shape, name="virtual"))
    for i, v in enumerate(m for m in cfg.virtual if m.shape == "masks"):
        try:
            check_masks(v.masks, shape, v.file)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        ops.append(VirtualDetectors(v.masks, v.names, g.scan_shape, name=f"masks_{v.name}"))
    if cfg.com.enabled:
        c = cfg.com
        radius = None if c.radius_px is None and c.radius_mrad is None else \
            cal.px(c.radius_px, c.radius_mrad, "[com] radius")
        ops.append(CenterOfMass(g.scan_shape, shape, center=cal.center, radius=radius,
                                mrad_per_px=cal.mrad_per_px, rotation_deg=c.rotation_deg, flip=c.flip))
    if cfg.diffraction_sum.enabled:
        ops.append(DiffractionSum(shape))
    if cfg.aperture:
        ap_masks = []
        for a in cfg.aperture:
            try:
                mask = rect_mask(g.scan_shape, *a.rect) if a.rect is not None \
                    else load_aperture_masks(a.file, g.scan_shape)
            except ValueError as e:
                raise ConfigError(f"aperture {a.name!r}: {e}") from None
            if mask.ndim == 3 and len(mask) != 1:
                raise ConfigError(f"aperture {a.name!r}: {a.file} holds {len(mask)} masks; give "
                                  "one (ny, nx) mask per [[aperture]]")
            ap_masks.append(mask.reshape(g.scan_shape))
        ops.append(RealSpaceApertures(np.stack(ap_masks), [a.name for a in cfg.aperture], shape))
    ops.append(Completeness(g.n_sources, g.scan_shape, g.frames_per_position, g.flyback))
    ops.append(EventStore(g.scan_shape, shape, g.frames_per_position, g.flyback))
    return fuse_operators(ops)  # virtual images, centre of mass and sum in one pass over the events
