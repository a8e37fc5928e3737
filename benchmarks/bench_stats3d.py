"""Time of the 3D atom statistics (everything but the volume-based displacement fit) on a large
atomic model, on this machine.

    python benchmarks/bench_stats3d.py [--atoms 80000] [--repeats 1]

The model: the measured amorphous Ta film of Yuan et al. (../shared/data/aet-amorphous, 8284
atoms) tiled side by side in x and y (a gap of 6 Å between copies) until it holds ``--atoms``
atoms, so that the structure is a real glass; without the data, a bcc Ta lattice (a = 3.30 Å)
with 0.25 Å Gaussian jitter. numba is warmed on a small model first; each step is timed
separately, then the whole entry function.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from operators.structure.atom_tables import atom_statistics  # noqa: E402
from operators.structure.depth_profile import surface_depth  # noqa: E402
from operators.structure.motifs import find_motifs  # noqa: E402
from operators.structure.neighbors import neighbor_list, triangulate  # noqa: E402
from operators.structure.order3d import bond_orientational_order  # noqa: E402
from operators.structure.pair_distribution import pair_distribution  # noqa: E402
from operators.structure.voronoi import voronoi_indices  # noqa: E402

TA_MODEL = (Path(__file__).resolve().parents[2] / "shared" / "data" / "aet-amorphous"
            / "Ta_film_atomic_model.mat")


def model(n_atoms: int, seed: int = 0) -> tuple[np.ndarray, str]:
    if TA_MODEL.is_file():
        from scipy.io import loadmat

        film = loadmat(TA_MODEL)["model"].T.astype(np.float64)
        film -= film.min(axis=0)
        step = film.max(axis=0) + 6.0
        k = int(np.ceil(n_atoms / len(film)))
        nx = int(np.ceil(np.sqrt(k)))
        tiles = [film + [ix * step[0], iy * step[1], 0] for ix in range(nx) for iy in range(nx)][:k]
        return np.vstack(tiles)[:n_atoms], f"Ta film tiled {k}×"
    rng = np.random.default_rng(seed)
    m = int(np.ceil((n_atoms / 2) ** (1 / 3)))
    g = np.stack(np.meshgrid(*[np.arange(m)] * 3, indexing="ij"), -1).reshape(-1, 3)
    pos = np.vstack([g, g + 0.5])[:n_atoms] * 3.30
    return pos + rng.normal(0, 0.25, pos.shape), "jittered bcc Ta"


def timed(label, fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    dt = time.perf_counter() - t
    print(f"  {label:<34s} {dt:7.2f} s")
    return out, dt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--atoms", type=int, default=80_000)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args(argv)
    pos, what = model(args.atoms)
    cutoff = 4.12
    print(f"{len(pos)} atoms ({what}); {platform.processor() or platform.machine()}, "
          f"python {platform.python_version()}")
    small, _ = model(3000)
    atom_statistics(small, lattice="amorphous", cutoff=cutoff, pdf_r_max=6.0)  # numba warm-up
    print("steps:")
    tri, _ = timed("Delaunay triangulation (qhull)", triangulate, pos)
    nb, _ = timed("neighbour list", neighbor_list, pos, cutoff, 0.1)
    timed("bond-orientational order", bond_orientational_order, pos, cutoff, neighbors=nb)
    timed("Voronoi indices", voronoi_indices, pos, max_vertex_distance=cutoff, triangulation=tri)
    timed("tetrahedra, motifs, networks", find_motifs, pos, cutoff, triangulation=tri)
    timed("g(r) to 12 Å, alpha window", pair_distribution, pos, 12.0, 0.05,
          triangulation=tri)
    timed("surface depth", surface_depth, pos)
    totals = []
    for _ in range(args.repeats):
        _, dt = timed("atom_statistics (everything)", atom_statistics, pos, lattice="amorphous",
                      cutoff=cutoff)
        totals.append(dt)
    print(f"total: {min(totals):.2f} s for {len(pos)} atoms (target < 30 s)")


if __name__ == "__main__":
    main()
