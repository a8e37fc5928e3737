"""Files the viewer writes: drawn apertures as a pipeline configuration, a region's summed
pattern for other programs.

* ``save_apertures`` → ``NAME.toml`` with a ``[[virtual]]`` detector (``shape = "masks"``, the
  drawn pixels in ``NAME_detector.npy``) and/or an ``[[aperture]]`` (``rect`` when the region
  is a block of positions, else ``NAME_region.npy``): ``stemstream process --config NAME.toml``
  and ``process-file`` take it as it is.
* ``export_pattern`` → ``NAME_pattern.h5`` (the exact int64 counts, the region mask, units and
  provenance) and ``NAME_pattern.tif``, a 32-bit float TIFF: the format ImageJ/Fiji, CrysTBox,
  PETS2, ProcessDiffraction and most diffraction-indexing programs read; counts are exact
  in it up to 2**24 per pixel (the HDF5 copy is exact always).

Examples
--------
>>> import numpy as np, tempfile, tomllib
>>> d = tempfile.mkdtemp()
>>> det = np.zeros((8, 8), bool); det[2:5, 2:5] = True
>>> paths = save_apertures(d, "spot", detector=det, note="a test")
>>> tomllib.loads(paths[0].read_text())["virtual"][0]
{'name': 'spot', 'shape': 'masks', 'file': 'spot_detector.npy'}
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import h5py
import numpy as np

from stream import __version__
from stream.viewer.shapes import rectangle_rows_cols

NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
TIFF_EXACT = 2**24  # float32 holds every integer up to this


class ExportError(ValueError):
    """A name or target the viewer refuses to write; the message says why."""


def check_name(name: str) -> str:
    """A file and result name: a letter, then letters, digits, '_', '.' or '-' (≤ 64)."""
    name = (name or "").strip()
    if not NAME.match(name):
        raise ExportError(f"name {name!r}: use a letter, then letters, digits, '_', '.' or '-' (at most 64)")
    if name.startswith(("com_", "aperture_", "diffraction_")):
        raise ExportError(f"name {name!r}: com_*, aperture_* and diffraction_* are taken by other results")
    return name


def _target(directory, filename: str, overwrite: bool) -> Path:
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create {directory}: {e.strerror or e}") from None
    path = directory / filename
    if path.exists() and not overwrite:
        raise ExportError(f"{path} exists; choose another name")
    return path


def save_apertures(directory, name: str, detector: np.ndarray | None = None,
                   region: np.ndarray | None = None, note: str = "", overwrite: bool = False) -> list[Path]:
    """Write ``NAME.toml`` (and the mask files it names) into ``directory``; returns the paths
    written, the TOML first. ``detector`` (h, w) bool, ``region`` (ny, nx) bool."""
    name = check_name(name)
    if detector is None and region is None:
        raise ExportError("nothing to save: draw a detector on the pattern or a region on an image first")
    toml = _target(directory, f"{name}.toml", overwrite)
    lines = [f"# drawn in the stemstream {__version__} viewer, {time.strftime('%Y-%m-%d %H:%M:%S')}",
             *(f"# {line}" for line in note.splitlines() if line),
             "# stemstream process --config THIS_FILE (or process-file): docs/CONFIG.md", ""]
    written = [toml]
    if detector is not None:
        npy = _target(directory, f"{name}_detector.npy", overwrite)
        np.save(npy, np.asarray(detector, bool))
        written.append(npy)
        lines += ["[[virtual]]", f'name = "{name}"', 'shape = "masks"', f'file = "{npy.name}"', ""]
    if region is not None:
        region = np.asarray(region, bool)
        lines += ["[[aperture]]", f'name = "{name}"']
        rect = rectangle_rows_cols(region)
        if rect is not None:
            lines.append(f"rect = [{', '.join(str(v) for v in rect)}]  # rows y0..y1-1, columns x0..x1-1")
        else:
            npy = _target(directory, f"{name}_region.npy", overwrite)
            np.save(npy, region)
            written.append(npy)
            lines.append(f'file = "{npy.name}"')
        lines.append("")
    toml.write_text("\n".join(lines))
    return written


def export_pattern(directory, name: str, pattern: np.ndarray, region: np.ndarray, scan_id: str,
                   mrad_per_px: float | None = None, center=None, source: str = "",
                   overwrite: bool = False) -> list[Path]:
    """Write a region's summed pattern as ``NAME_pattern.h5`` and ``NAME_pattern.tif``.

    pattern: (h, w) integer counts; region: (ny, nx) bool, the positions summed. Returns the
    paths; a TIFF whose counts exceed 2**24 is still written (rounded) and the HDF5 copy is
    the exact one."""
    import tifffile

    name = check_name(name)
    pattern = np.asarray(pattern)
    h5 = _target(directory, f"{name}_pattern.h5", overwrite)
    tif = _target(directory, f"{name}_pattern.tif", overwrite)
    with h5py.File(h5, "w") as f:
        d = f.create_dataset("pattern", data=pattern.astype(np.int64))
        d.attrs.update(unit="counts", description="summed diffraction pattern of the region's probe positions",
                       scan_id=scan_id, n_positions=int(np.count_nonzero(region)), source=source,
                       software=f"stemstream {__version__}")
        if mrad_per_px:
            d.attrs["mrad_per_px"] = float(mrad_per_px)
        if center is not None:
            d.attrs["center_yx_px"] = np.asarray(center, float)
        f.create_dataset("region", data=np.asarray(region, bool), compression="gzip")
        f["region"].attrs["description"] = "(ny, nx) probe positions summed (row, column of the scan)"
    tifffile.imwrite(tif, pattern.astype(np.float32), photometric="minisblack",
                     description=f"stemstream {__version__}: summed pattern of {int(np.count_nonzero(region))} "
                                 f"positions of scan {scan_id}; counts per pixel"
                                 + (f"; {mrad_per_px:g} mrad/px" if mrad_per_px else ""))
    return [h5, tif]
