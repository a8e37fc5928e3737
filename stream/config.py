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
from operators.electron_counting import (ROW_DARK, SECTOR_EDGES, SEMANTICS, TIES, XRAY_NEIGHBOURS,
                                         ElectronCounter)
from operators.events import EventStore
from operators.fused import fuse_operators
from operators.kernels import load_npy
from operators.virtual import VirtualDetectors, annulus_mask, check_masks, disk_mask, load_masks

from stream.transport.protocol import Geometry
from stream.files.counting_file import Calibration as CountingCalibration
from stream.files.counting_file import CountingFileError, read_calibration
from stream.stages.runner import check_stages
from stream.stages.tomo import check_series_params


class ConfigError(ValueError):
    """A configuration the pipeline cannot run; the message names the key and the fix."""


@dataclass
class DetectorSpec:
    """Overrides of the calibration the stream carries, and which detector feeds the
    receivers: ``stemstream`` (the protocol, default), ``dectris`` or ``merlin``
    (docs/DECTRIS.md, docs/MERLIN.md)."""

    mrad_per_px: float | None = None
    convergence_mrad: float | None = None
    center: list[float] | None = None
    kind: str = "stemstream"  # stemstream | dectris | merlin
    scan: list[int] | None = None  # [ny, nx] probe positions of every scan (dectris, merlin)
    dcu: str | None = None  # DECTRIS: the DCU's REST API, http://HOST:PORT
    data: str | None = None  # the frames: DECTRIS stream (default DCU host, port 9999), Merlin data port
    control: str | None = None  # Merlin: its control port, tcp://HOST:6341
    mode: str = "passive"  # passive: follow what others start; active: we arm (and trigger)
    trigger_mode: str | None = None  # DECTRIS exte (default) | exts | inte | ints; Merlin soft (default) | external
    request_timeout_s: float = 10.0  # a REST or control request without an answer fails after this
    trigger_timeout_s: float = 30.0  # active: no frame this long after arming is an error
    gap_timeout_s: float = 2.0  # Merlin: no frame this long mid-acquisition ends it as aborted


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
    threads_per_worker: int = 3  # a scan's blocks written while it runs overlap their merges, compression and syncs
    memory_limit: str | int | float = "auto"  # per worker, as dask takes it: "4GB", 4e9, 0 (none)
    stop_grace_s: float = 25.0  # a batch system's SIGTERM waits this long for open scans (stream/session/stopping.py)


@dataclass
class MemorySpec:
    events_in_memory_mb: float = 128.0  # per receiver, over its open scans; past it events go to disk
    spill_dir: str = ""  # where they go; "" is the dask worker's local directory
    write_block_mb: float = 16.0  # events (4 B each) per block when the scan file is written
    early_block_mb: float = 4.0  # the same, for blocks written while the scan runs ([output] write_while_scanning)
    handoff_dir: str = "/dev/shm"  # a memory file system through which workers of one host hand events over; "": dask


@dataclass
class OutputSpec:
    dir: str = "out"
    previews: bool = True
    compression_level: int = 2
    fallback_dir: str = ""  # where a scan file goes when dir cannot be written ("" : held on the workers)
    write_while_scanning: bool = True  # events written while the scan runs (docs/CONFIG.md)


@dataclass
class LiveSpec:
    rate_hz: float = 2.0
    publish: str | None = None  # bind address of the live results PUB socket, e.g. tcp://127.0.0.1:6100
    max_side: int = 0  # the publish channel's images: 0 = every position; N = averaged to at most N a side


@dataclass
class SecuritySpec:
    """Who may talk to the session (docs/SECURITY.md)."""

    curve: bool = True  # CURVE on every ZeroMQ channel stemstream opens; false: plain (trusted network only)
    keys: str = ""  # key directory; "" = $XDG_CONFIG_HOME/stemstream/keys (~/.config/stemstream/keys)
    source_key: str = ""  # the sources' public key (Z85 or a .key file); "" = source.key of the key directory
    plain_sources: list[str] = field(default_factory=list)  # source addresses trusted without CURVE
    live_clients: list[str] = field(default_factory=list)  # more public keys the live channel accepts
    dask_tls: bool = True  # the local cluster's dask traffic over TLS (temporary certificates)
    tls_ca_file: str = ""  # joining a tls:// scheduler: CA certificate,
    tls_cert: str = ""  # this client's certificate
    tls_key: str = ""  # and its key (PEM files)


@dataclass
class LimitsSpec:
    """What one message or one scan may cost (docs/SECURITY.md, budgets)."""

    scan_state_mb: float = 0.0  # per-scan state on a receiver or the coordinator; 0 = 1/4 of a worker's memory limit
    max_open_scans: int = 256  # scans receiving at once (a burst of small scans keeps dozens in flight); more are refused
    max_message_mb: float = 0.0  # largest message part a receiver accepts; 0 = [chunking] max_bytes + 1 MB
    unannounced_mb: float = 64.0  # frames of scans no start announced yet, held per receiver
    announce_grace_s: float = 5.0  # how long such frames wait for their scan's start

    def scan_state_bytes(self, memory_limit: float | None) -> int:
        """The per-scan budget in bytes; ``memory_limit``: a worker's memory limit in bytes
        (None or 0: unlimited, then a quarter of this machine's memory)."""
        if self.scan_state_mb > 0:
            return int(self.scan_state_mb * 1e6)
        if not memory_limit:
            import psutil
            memory_limit = psutil.virtual_memory().total
        return int(memory_limit / 4)

    def max_message_bytes(self, chunking: ChunkingSpec) -> int:
        return int(self.max_message_mb * 1e6) if self.max_message_mb > 0 else chunking.max_bytes + 1_000_000


@dataclass
class StagesSpec:
    run: list[str] = field(default_factory=list)  # stages run on every finished scan
    params: dict = field(default_factory=dict)  # stage name -> {parameter: value} ([stages.NAME])


@dataclass
class SeriesSpec:
    reconstruct: bool = False  # reconstruct every tilt series once all its scans are written
    params: dict = field(default_factory=dict)  # reconstruct_series parameters (stream/stages/tomo.py)


@dataclass
class CountingSpec:
    """Electron counting of raw frames (docs/COUNTING.md): where dark and thresholds come from,
    and the parameters of ``stemstream calibrate``."""

    file: str | None = None  # counting file of 'stemstream calibrate': dark, thresholds (+ gain)
    dark: str | None = None  # .npy (h, w) dark reference in ADU, or "zero" (no dark subtraction)
    gain: str | None = None  # .npy (h, w) gain map; values are divided by it
    background_threshold: float | None = None  # ADU above the dark, set by hand
    xray_threshold: float | None = None
    semantics: str = "threaded"  # how a fractional dark rounds: stempy's "threaded" or "classic"
    row_dark: str = "none"  # none | mean | median: stempy's row-dark correction
    ties: str = "first"  # a plateau of equal maxima: one event ("first") or none ("none", stempy)
    sector_edges: str = "top-row-dropped"  # or "kept": see docs/COUNTING.md
    xray_neighbours: str = "dropped"  # or "kept" (stempy): events next to an X-ray pixel
    threads: int = 1  # threads counting one message's frames
    samples: int = 40  # calibrate: sample frames for the thresholds
    background_n_sigma: float = 4.5  # calibrate: NCEM's values (stempy issue 259, PR 152)
    xray_n_sigma: float = 175.0
    seed: int = 0  # calibrate: which frames are sampled
    calibration: CountingCalibration | None = field(default=None, repr=False, metadata={"loaded": True})

    @property
    def enabled(self) -> bool:
        """Raw frames can be counted: a dark (or "zero") and both thresholds are known."""
        return self.calibration is not None


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
    counting: CountingSpec = field(default_factory=CountingSpec)
    security: SecuritySpec = field(default_factory=SecuritySpec)
    limits: LimitsSpec = field(default_factory=LimitsSpec)
    path: str | None = None  # where it was read from, for messages and provenance

    def operators(self, geometry: Geometry) -> list:
        """The operators of one scan (:func:`build_operators`): how a receiver, which knows
        nothing of configuration files, builds them."""
        return build_operators(self, geometry)

    def scan_state_bytes(self, geometry: Geometry) -> int:
        """Memory building one scan's operators and states takes (:func:`scan_state_bytes`)."""
        return scan_state_bytes(self, geometry)

    def to_dict(self) -> dict:
        """Plain values for provenance (mask arrays summarised by shape)."""
        d = asdict(self)
        d["counting"].pop("calibration", None)
        for v in d["virtual"]:
            if v.get("masks") is not None:
                v["masks"] = f"array{list(np.shape(v['masks']))}"
        return d


_SECTIONS = {"detector": DetectorSpec, "com": ComSpec, "diffraction_sum": DiffractionSpec,
             "chunking": ChunkingSpec, "scan": ScanSpec, "cluster": ClusterSpec,
             "memory": MemorySpec, "output": OutputSpec, "live": LiveSpec, "counting": CountingSpec,
             "security": SecuritySpec, "limits": LimitsSpec}
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
    known = {f.name: f.type for f in fields(cls) if f.name != "masks" and not f.metadata.get("loaded")}
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
              (cfg.cluster.stop_grace_s >= 0, "[cluster] stop_grace_s must be >= 0 seconds"),
              (cfg.memory.events_in_memory_mb > 0,
               "[memory] events_in_memory_mb must be > 0 (MB of events a receiver keeps in memory)"),
              (cfg.memory.write_block_mb > 0,
               "[memory] write_block_mb must be > 0 (MB of events per block written to the scan file)"),
              (cfg.memory.early_block_mb > 0,
               "[memory] early_block_mb must be > 0 (MB of events per block written while the scan runs)"),
              (isinstance(cfg.memory.handoff_dir, str)
               and (cfg.memory.handoff_dir == "" or Path(cfg.memory.handoff_dir).is_absolute()),
               "[memory] handoff_dir must be an absolute path (a memory file system such as /dev/shm), "
               "or \"\" to hand events between workers over dask's connections"),
              (0 <= cfg.output.compression_level <= 9, "[output] compression_level must be 0..9"),
              (cfg.live.rate_hz >= 0, "[live] rate_hz must be >= 0 (0 turns live results off)"),
              (isinstance(cfg.live.max_side, int) and not isinstance(cfg.live.max_side, bool)
               and cfg.live.max_side >= 0,
               "[live] max_side must be a whole number >= 0 (0: images at every position; e.g. 256)"),
              (cfg.com.radius_px is None or cfg.com.radius_px > 0, "[com] radius_px must be > 0"),
              (cfg.limits.scan_state_mb >= 0, "[limits] scan_state_mb must be >= 0 (0: a quarter of "
                                              "the worker's memory limit)"),
              (cfg.limits.max_open_scans >= 1, "[limits] max_open_scans must be >= 1"),
              (cfg.limits.max_message_mb >= 0, "[limits] max_message_mb must be >= 0 (0: [chunking] "
                                               "max_bytes + 1 MB)"),
              (cfg.limits.unannounced_mb > 0, "[limits] unannounced_mb must be > 0"),
              (cfg.limits.announce_grace_s > 0, "[limits] announce_grace_s must be > 0"),
              (all(isinstance(a, str) and a.startswith("tcp://") for a in cfg.security.plain_sources),
               "[security] plain_sources must be addresses like \"tcp://10.0.0.5:6001\""),
              (all(isinstance(k, str) for k in cfg.security.live_clients),
               "[security] live_clients must be public keys (40 Z85 characters) or .key files"),
              (cfg.com.radius_mrad is None or cfg.com.radius_mrad > 0, "[com] radius_mrad must be > 0")]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{where}: {message}")
    check_detector(cfg.detector, where)
    _load_counting(cfg.counting, f"{where} [counting]", base)
    try:
        check_stages(cfg.stages.run, cfg.stages.params, f"{where} [stages]")
        check_series_params(cfg.series.params, f"{where} [series]")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return cfg


def _load_counting(c: CountingSpec, where: str, base: Path) -> None:
    """Check [counting] and load its dark, gain and counting file into ``c.calibration``
    (None when nothing says how to count: raw frames are then refused with the fix)."""
    checks = [(c.semantics in SEMANTICS, f"semantics {c.semantics!r} must be one of {', '.join(SEMANTICS)}"),
              (c.row_dark in ROW_DARK, f"row_dark {c.row_dark!r} must be one of {', '.join(ROW_DARK)}"),
              (c.ties in TIES, f"ties {c.ties!r} must be one of {', '.join(TIES)}"),
              (c.sector_edges in SECTOR_EDGES, f"sector_edges {c.sector_edges!r} must be one of {', '.join(SECTOR_EDGES)}"),
              (c.xray_neighbours in XRAY_NEIGHBOURS,
               f"xray_neighbours {c.xray_neighbours!r} must be one of {', '.join(XRAY_NEIGHBOURS)}"),
              (c.threads >= 1, "threads must be >= 1"), (c.samples >= 1, "samples must be >= 1"),
              (c.background_n_sigma > 0 and c.xray_n_sigma > 0, "background_n_sigma and xray_n_sigma must be > 0"),
              ((c.background_threshold is None) == (c.xray_threshold is None),
               "give both background_threshold and xray_threshold (ADU above the dark), or neither")]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{where}: {message}")
    if c.calibration is not None:  # validate() may run again on a checked configuration
        return
    if c.file is None and c.dark is None and c.background_threshold is None and c.gain is None:
        return
    cal = None
    if c.file is not None:
        try:
            cal = read_calibration(base / c.file)
        except CountingFileError as e:
            raise ConfigError(f"{where} file: {e}") from None
    dark, dark_source = (cal.dark, f"{cal.path}") if cal is not None else (None, None)
    if c.dark is not None:
        if c.dark == "zero":
            dark, dark_source = None, "zero (no dark subtraction)"
        else:
            try:
                dark = load_npy(base / c.dark, "dark reference").astype(np.float32)
            except ValueError as e:
                raise ConfigError(f"{where} dark: {e}") from None
            dark_source = str(base / c.dark)
            if dark.ndim != 2:
                raise ConfigError(f"{where} dark: {base / c.dark} holds a {dark.ndim}-D array; a dark "
                                  "reference is one (h, w) frame in ADU")
    if dark_source is None:
        raise ConfigError(f"{where}: no dark reference: set file = 'counting.h5' (stemstream calibrate), "
                          "dark = 'dark.npy', or dark = 'zero' for a detector that subtracts its own pedestal")
    gain = cal.gain if cal is not None else None
    if c.gain is not None:
        try:
            gain = load_npy(base / c.gain, "gain map").astype(np.float32)
        except ValueError as e:
            raise ConfigError(f"{where} gain: {e}") from None
    if c.background_threshold is not None:
        bg, xr, thr_source = c.background_threshold, c.xray_threshold, "set by hand in the configuration"
    elif cal is not None:
        bg, xr, thr_source = cal.background_threshold, cal.xray_threshold, f"{cal.path}"
    else:
        raise ConfigError(f"{where}: no thresholds: set file = 'counting.h5' (stemstream calibrate) or "
                          "background_threshold and xray_threshold (ADU above the dark)")
    attrs = dict(cal.attrs) if cal is not None else {}
    attrs.update(dark_source=dark_source, thresholds_source=thr_source)
    c.calibration = CountingCalibration(dark, float(bg), float(xr), gain, attrs,
                                cal.sample_frames if cal is not None else np.zeros(0, np.int64),
                                cal.path if cal is not None else None)
    try:  # the scalar checks now; the shapes when a scan says what its detector is
        ElectronCounter(c.calibration.frame_shape or (1, 1), None, bg, xr, None, c.row_dark,
                        attrs.get("optimized_mean"), c.semantics)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def counting_operator(c: CountingSpec, g: Geometry) -> ElectronCounter:
    """The counting operator of a scan (its dark and gain are checked against the detector
    when frames arrive, so a scan of counted frames never fails for them)."""
    cal = c.calibration
    record = {k: v for k, v in cal.attrs.items() if not isinstance(v, dict)}
    if len(cal.sample_frames):
        record["sample_frames"] = np.asarray(cal.sample_frames)
    return ElectronCounter(g.frame_shape, cal.dark, cal.background_threshold, cal.xray_threshold,
                           gain=cal.gain, row_dark=c.row_dark,
                           optimized_mean=cal.attrs.get("optimized_mean"), semantics=c.semantics,
                           ties=c.ties, sector_edges=c.sector_edges, xray_neighbours=c.xray_neighbours,
                           threads=c.threads, record=record)
def check_detector(d: DetectorSpec, where: str) -> None:
    """The ``[detector]`` source settings make sense together (docs/CONFIG.md)."""
    def bad(message):
        raise ConfigError(f"{where} [detector]: {message}")
    kinds = ("stemstream", "dectris", "merlin")
    if d.kind not in kinds:
        bad(f"kind {d.kind!r} must be one of {', '.join(kinds)}")
    if d.kind == "stemstream":
        return
    if d.scan is not None and (len(d.scan) != 2 or min(d.scan) < 1):
        bad(f"scan {d.scan} must be [ny, nx], two positive integers (e.g. --scan 256x256)")
    if d.mode not in ("passive", "active"):
        bad(f"mode {d.mode!r} must be passive (follow acquisitions others start) or active (we arm)")
    for name in ("request_timeout_s", "trigger_timeout_s", "gap_timeout_s"):
        if not getattr(d, name) > 0:
            bad(f"{name} must be > 0 seconds")
    if d.kind == "dectris":
        if d.scan is None:
            bad("a DECTRIS detector needs the scan shape: --scan NYxNX (or scan = [ny, nx])")
        if not d.dcu and not d.data:
            bad("give the DCU: --dcu http://HOST:PORT (its REST API; the stream is then HOST:9999)")
        if d.mode == "active" and not d.dcu:
            bad("active mode arms through the DCU's REST API: give --dcu http://HOST:PORT")
        if d.trigger_mode not in (None, "exte", "exts", "inte", "ints"):
            bad(f"trigger_mode {d.trigger_mode!r} must be exte, exts, inte or ints")
    else:
        if not d.data:
            bad("give Merlin's data port: --connect tcp://HOST:6342")
        if d.mode == "active" and not d.control:
            bad("active mode starts acquisitions on Merlin's control port: give --control tcp://HOST:6341")
        if d.mode == "active" and d.scan is None:
            bad("active mode needs the scan shape to set the frame count: --scan NYxNX")
        if d.trigger_mode not in (None, "soft", "external"):
            bad(f"trigger_mode {d.trigger_mode!r} must be soft (we trigger) or external (the scan engine)")


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


def detector_regions(cfg: PipelineConfig, g: Geometry, max_masks: int = 8) -> list[dict]:
    """The virtual detectors of one scan in detector px, as plain values (what the previews
    draw on the summed pattern): ``{"name", "shape": "disk" | "annulus", "center": (cy, cx),
    "inner_px" (0 for a disk), "outer_px"}``, then ``{"name", "shape": "mask", "mask": (h, w)}``
    for the masks of mask stacks (the first ``max_masks``). ConfigError as build_operators."""
    cal = calibration(cfg, g)
    out = []
    for v in cfg.virtual or default_virtual(cal, g.frame_shape):
        label = f"virtual detector {v.name!r}"
        if v.shape == "disk":
            out.append({"name": v.name, "shape": "disk", "center": cal.center, "inner_px": 0.0,
                        "outer_px": cal.px(v.radius_px, v.radius_mrad, label)})
        elif v.shape == "annulus":
            out.append({"name": v.name, "shape": "annulus", "center": cal.center,
                        "inner_px": cal.px(v.inner_px, v.inner_mrad, label),
                        "outer_px": cal.px(v.outer_px, v.outer_mrad, label)})
    n_shapes = len(out)
    for v in cfg.virtual:  # mask stacks that fit the detector (build_operators refuses the others)
        if v.shape == "masks" and v.masks is not None and np.shape(v.masks)[-2:] == tuple(g.frame_shape):
            for n, m in zip(v.names, np.reshape(v.masks, (-1,) + tuple(g.frame_shape))):
                if len(out) < max_masks + n_shapes:
                    out.append({"name": n, "shape": "mask", "mask": m})
    return out
def scan_state_bytes(cfg: PipelineConfig, g: Geometry) -> int:
    """An upper bound of the bytes one receiver allocates to open a scan of geometry ``g``:
    building its operators (masks, tables: the peak while they are made) and their states
    (images per probe position, sums per detector pixel, completeness per frame and source).
    Computed from the geometry alone, so that an oversized scan is refused before anything
    is allocated (``[limits] scan_state_mb``). Events are not included: they are bounded by
    ``[memory] events_in_memory_mb``."""
    per_pos, per_px = _state_coefficients(cfg)
    counting = 16 if cfg.counting.enabled else 0  # the counter's dark and gain maps per pixel
    return (g.n_positions * (per_pos + 9 * len(cfg.aperture))  # aperture masks and indices
            + g.n_pixels * (per_px + 64 + counting)  # radii and masks while they are built
            + g.n_frames * (2 * g.n_sources + 8)  # completeness (uint16) and events per frame
            + 1_000_000)


def coordinator_state_bytes(cfg: PipelineConfig, g: Geometry, n_workers: int) -> int:
    """An upper bound of the bytes the coordinator keeps for one scan: completeness per frame
    and source, and with live results on, every worker's partial images and sums and their
    merge."""
    per_pos, per_px = _state_coefficients(cfg)
    live = (n_workers + 1) * (g.n_positions * per_pos + g.n_pixels * per_px) if cfg.live.rate_hz > 0 else 0
    return g.n_frames * 2 * g.n_sources + live + 1_000_000


def _state_coefficients(cfg: PipelineConfig) -> tuple[int, int]:
    """(bytes per probe position, bytes per detector pixel) of a scan's integer states."""
    n_images = sum(len(v.names or [v.name]) if v.shape == "masks" else 1 for v in cfg.virtual) \
        if cfg.virtual else 2  # bf and adf
    n_weights = sum(len(v.masks) for v in cfg.virtual if v.shape == "masks" and v.masks is not None)
    per_pos = 8 * n_images + (24 if cfg.com.enabled else 0)
    per_px = 8 * (int(cfg.diffraction_sum.enabled) + len(cfg.aperture) + n_weights)
    return per_pos, per_px


def build_operators(cfg: PipelineConfig, g: Geometry) -> list:
    """The operators of one scan, in processing order. Raises ConfigError when the
    configuration does not fit this scan's geometry."""
    cal = calibration(cfg, g)
    shape = g.frame_shape
    masks, names = [], []
    for d in detector_regions(cfg, g, max_masks=0):
        masks.append(annulus_mask(shape, d["center"], d["inner_px"], d["outer_px"]) if d["shape"] == "annulus"
                     else disk_mask(shape, d["center"], d["outer_px"]))
        names.append(d["name"])
    ops = [counting_operator(cfg.counting, g)] if cfg.counting.enabled else []  # first: it makes the events
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
