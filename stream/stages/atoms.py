"""``stemstream atoms``: the 3D atom statistics of an atomic model file.

Positions traced by ``stemstream tomo``, by another group's pipeline or a simulation: read from
CSV, XYZ, NumPy, MATLAB or HDF5 (below), analysed by ``operators.structure.atom_tables.atom_statistics``
and written as the per-atom table (CSV and HDF5), the per-sample summary (CSV) and histograms
(PNG). Positions are in Å.

Formats (by extension):

- ``.csv`` / ``.txt``: a header naming ``x``, ``y``, ``z`` (and optionally ``intensity``)
  columns, or no header and the first three columns x, y, z; comma, tab or space separated.
- ``.xyz``: the XYZ format: atom count, a comment line, then ``element x y z`` per atom.
- ``.npy``: an (N, 3) or (3, N) array.
- ``.mat``: MATLAB v5 (``scipy.io.loadmat``): the variable ``--variable``, or the only
  numeric (N, 3) / (3, N) array in the file (as the AET data's ``model``, 3 × N).
- ``.h5`` / ``.hdf5``: the dataset ``--variable``, or ``atoms/positions_A`` (with
  ``atoms/peak_intensity``) of a ``SERIES-tomo.h5`` that ``stemstream tomo`` wrote.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import numpy as np

from stream.files.storage import OutputError, cannot_write, output_dir

FORMATS = (".csv", ".txt", ".xyz", ".npy", ".mat", ".h5", ".hdf5")


class AtomFileError(ValueError):
    """An atomic model file that cannot be read; the message names the path and the problem."""


def _as_n3(a, path, what) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind not in "iuf":
        raise AtomFileError(f"{path}: {what} holds {a.dtype} values; expected numbers (Å)")
    if a.ndim == 2 and a.shape[1] != 3 and a.shape[0] == 3:
        a = a.T
    if a.ndim != 2 or a.shape[1] != 3:
        raise AtomFileError(f"{path}: {what} has shape {a.shape}; expected (N, 3) or (3, N) "
                            "positions x, y, z in Å")
    return np.ascontiguousarray(a, dtype=np.float64)


def _read_table(path: Path):
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise AtomFileError(f"{path}: no rows; expected x, y, z per atom")
    sep = "," if "," in lines[0] else None
    first = [c.strip().lower() for c in (lines[0].split(sep) if sep else lines[0].split())]
    try:
        [float(c) for c in first]
        header, rows = None, lines
    except ValueError:
        header, rows = first, lines[1:]
    try:
        data = np.array([[float(c) for c in (ln.split(sep) if sep else ln.split())] for ln in rows])
    except ValueError as e:
        raise AtomFileError(f"{path}: a row is not numbers ({e}); expected x, y, z per atom") from None
    if data.ndim != 2:
        raise AtomFileError(f"{path}: rows have different numbers of columns")
    if header is None:
        if data.shape[1] < 3:
            raise AtomFileError(f"{path}: {data.shape[1]} columns; expected at least x, y, z")
        return data[:, :3], None
    missing = [c for c in ("x", "y", "z") if c not in header]
    if missing:
        raise AtomFileError(f"{path}: the header {header} has no column {', '.join(missing)}; "
                            "name the position columns x, y, z (Å)")
    pos = data[:, [header.index(c) for c in ("x", "y", "z")]]
    return pos, data[:, header.index("intensity")] if "intensity" in header else None


def _read_xyz(path: Path):
    lines = path.read_text().splitlines()
    try:
        n = int(lines[0].split()[0])
        rows = [ln.split() for ln in lines[2:2 + n]]
        pos = np.array([[float(v) for v in r[1:4]] for r in rows])
    except (IndexError, ValueError):
        raise AtomFileError(f"{path}: not an XYZ file; expected the atom count, a comment line, "
                            "then 'element x y z' per atom") from None
    if len(pos) != n:
        raise AtomFileError(f"{path}: the header announces {n} atoms, the file has {len(pos)}")
    return pos, None


def _read_mat(path: Path, variable):
    from scipy.io import loadmat
    try:
        d = loadmat(path)
    except Exception as e:  # noqa: BLE001 - scipy raises several kinds
        raise AtomFileError(f"{path}: not a readable MATLAB file ({e})") from None
    arrays = {k: v for k, v in d.items() if not k.startswith("__") and isinstance(v, np.ndarray)}
    if variable is not None:
        if variable not in arrays:
            raise AtomFileError(f"{path}: no variable {variable!r}; it has {sorted(arrays)}")
        return _as_n3(arrays[variable], path, f"variable {variable!r}"), None
    fits = [k for k, v in arrays.items() if v.dtype.kind in "iuf" and v.ndim == 2 and 3 in v.shape]
    if len(fits) != 1:
        raise AtomFileError(f"{path}: {'no' if not fits else 'several'} (N, 3) / (3, N) arrays "
                            f"({sorted(fits) or sorted(arrays)}); choose one with --variable")
    return _as_n3(arrays[fits[0]], path, f"variable {fits[0]!r}"), None


def _read_hdf5(path: Path, variable):
    import h5py
    try:
        with h5py.File(path, "r") as f:
            name = variable or "atoms/positions_A"
            if name not in f:
                hint = "" if variable else ("; give the dataset of the positions with --variable "
                                            "(this is not a SERIES-tomo.h5 with traced atoms)")
                raise AtomFileError(f"{path}: no dataset {name!r}{hint}")
            pos = _as_n3(f[name][()], path, f"dataset {name!r}")
            inten = None
            if variable is None and "atoms/peak_intensity" in f:
                inten = np.asarray(f["atoms/peak_intensity"][()], np.float64)
            return pos, inten
    except OSError as e:
        raise AtomFileError(f"{path}: not a readable HDF5 file ({e})") from None


def read_atoms(path, variable: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(positions (N, 3) float64 Å, per-atom intensities (N,) or None) from a file in one of
    the formats of this module's docstring. AtomFileError names the path and what is wrong."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise AtomFileError(f"{path}: {'is a directory' if path.is_dir() else 'no such file'}")
    if suffix not in FORMATS:
        raise AtomFileError(f"{path}: unknown format {suffix or '(no extension)'}; expected one of "
                            f"{', '.join(FORMATS)}")
    if suffix in (".csv", ".txt"):
        pos, inten = _read_table(path)
    elif suffix == ".xyz":
        pos, inten = _read_xyz(path)
    elif suffix == ".npy":
        try:
            raw = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise AtomFileError(f"{path}: not a readable .npy array ({e})") from None
        pos, inten = _as_n3(raw, path, "the array"), None
    elif suffix == ".mat":
        pos, inten = _read_mat(path, variable)
    else:
        pos, inten = _read_hdf5(path, variable)
    pos = _as_n3(pos, path, "the positions")
    bad = ~np.isfinite(pos).all(axis=1)
    if bad.any():
        raise AtomFileError(f"{path}: {int(bad.sum())} atoms have NaN or infinite coordinates "
                            f"(the first: row {int(np.flatnonzero(bad)[0])})")
    if len(pos) < 5:
        raise AtomFileError(f"{path}: {len(pos)} atoms; the statistics need at least 5")
    return pos, inten


def add_atoms_args(p) -> None:
    """Arguments of ``stemstream atoms`` (an argparse parser)."""
    p.add_argument("file", metavar="FILE", help=f"atomic model ({', '.join(FORMATS)}), positions in Å")
    p.add_argument("--out", metavar="DIR", required=True, help="output directory")
    p.add_argument("--variable", metavar="NAME", help="MATLAB variable or HDF5 dataset of the positions")
    p.add_argument("--lattice", default="auto",
                   help="auto (default: inferred from the atoms' bond order, refused when it matches no "
                        "lattice), fcc, bcc, bcc14, hcp, sc or amorphous")
    p.add_argument("--lattice-constant", type=float, metavar="Å", help="default: fitted to the first shell")
    p.add_argument("--cutoff", type=float, metavar="Å",
                   help="neighbour shell (default from the lattice; amorphous: first valley of g(r))")
    p.add_argument("--gcn", choices=["calle-vallejo", "single"], default="calle-vallejo",
                   help="generalised coordination convention (default calle-vallejo: / bulk CN)")
    p.add_argument("--pdf-r-max", type=float, default=12.0, metavar="Å", help="g(r) range (default 12)")
    p.add_argument("--no-voronoi", action="store_true", help="skip Voronoi indices (slow for many atoms)")
    p.add_argument("--no-motifs", action="store_true", help="skip tetrahedra and motifs")
    p.add_argument("--no-previews", action="store_true", help="write no PNG histograms")
    p.add_argument("--voronoi-atoms", choices=["amorphous", "all"], default="amorphous",
                   help="cells to index: the amorphous atoms after the crystalline cleaning (default, as "
                        "Yuan et al.) or all")
    p.add_argument("--no-voronoi-recompute", action="store_true",
                   help="drop the small faces without recomputing the cell (not the authors' method)")
    p.add_argument("--motif-selection", choices=["published", "half", "all"], default="published",
                   help="4/5/6-fold motifs that enter sharing and networks (default published: with an "
                        "amorphous tetrahedron, as the authors' Main_4)")
    p.add_argument("--no-cleaning", action="store_true",
                   help="keep the raw crystalline flags (order > 0.5) instead of the authors' cleaning")


def _fresh(path: Path) -> Path:
    if path.exists():
        raise OutputError(f"{path} exists; choose another --out (results are never overwritten)")
    return path


def run_atoms(args) -> int:
    """``stemstream atoms FILE --out DIR``: exit code 0, 2 for bad input or options (one line on
    stderr naming the file and the fix)."""
    import time

    from operators.structure.atom_tables import atom_statistics, write_csv, write_histograms, write_summary_csv

    def fail(text):
        print(f"stemstream atoms: error: {text}", file=sys.stderr)
        return 2

    try:
        pos, inten = read_atoms(args.file, args.variable)
        stem = Path(args.file).stem
        out = output_dir(args.out)
        targets = {k: out / f"{stem}-{k}" for k in ("atoms.csv", "summary.csv", "atoms.h5")}
        for t in targets.values():
            _fresh(t)
        print(f"stemstream atoms: {len(pos):,} atoms from {args.file}; lattice {args.lattice}"
              f"{' (inferred from the atoms)' if args.lattice == 'auto' else ''}", flush=True)
        t0 = time.perf_counter()
        stats = atom_statistics(pos, inten, lattice=args.lattice, lattice_constant=args.lattice_constant,
                                cutoff=args.cutoff, gcn_convention=args.gcn, pdf_r_max=args.pdf_r_max,
                                voronoi=not args.no_voronoi, motifs=not args.no_motifs,
                                voronoi_atoms=args.voronoi_atoms, voronoi_recompute=not args.no_voronoi_recompute,
                                motif_selection=args.motif_selection, clean_crystalline=not args.no_cleaning)
    except (ValueError, FileExistsError) as e:  # AtomFileError and OutputError included
        return fail(str(e))
    seconds = time.perf_counter() - t0
    for name, write in (("atoms.csv", lambda p: write_csv(stats, p)),
                        ("summary.csv", lambda p: write_summary_csv(stats, p)),
                        ("atoms.h5", lambda p: _write_h5(stats, p, args.file, args.lattice))):
        tmp = targets[name].with_name(f".{targets[name].name}.{uuid.uuid4().hex[:8]}.partial")
        try:
            write(tmp)
            os.replace(tmp, targets[name])  # whole files only
        except OSError as e:  # e.g. the disk filled up
            return fail(str(cannot_write(targets[name], e)))
        finally:
            tmp.unlink(missing_ok=True)
    pngs = [] if args.no_previews else write_histograms(stats, out / "previews", stem=stem)
    s = stats.summary()
    lines = [f"{k} = {s[k]:.4g}" if isinstance(s[k], float) else f"{k} = {s[k]}"
             for k in ("n_atoms", "lattice", "lattice_constant", "cutoff", "crystalline_fraction",
                       "crystalline_fraction_raw", "voronoi_n_indexed", "voronoi_top_index", "voronoi_cn_mean",
                       "n_triplets", "n_pentagonal_bipyramids", "pb_network_max")
             if k in s]
    print(f"stemstream atoms: {'; '.join(lines)} ({seconds:.1f} s)", flush=True)
    print(f"  lattice {s['lattice']} ({s['lattice_source']})", flush=True)
    for t in targets.values():
        print(f"  {t}", flush=True)
    if pngs:
        print(f"  {len(pngs)} histograms in {out / 'previews'}", flush=True)
    return 0


def _write_h5(stats, path, source, lattice) -> None:
    import h5py

    from operators.structure.atom_tables import write_hdf5
    with h5py.File(path, "w") as f:
        f.attrs.update(format="stemstream-atoms", source=str(source), lattice_option=lattice)
        write_hdf5(stats, f)
