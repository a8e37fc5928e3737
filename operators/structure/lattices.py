"""Lattice geometry: coordination cutoff, number density, nearest-neighbour distance and bulk
coordination of the common lattices, and the lattice constant fitted to an atomic model.

``a`` is the conventional lattice constant (for hcp: the nearest-neighbour distance, ideal
c/a). The coordination cutoff lies halfway between the last shell counted and the next one:

======  ==================  ===========================  ====
name    shells counted      cutoff                       CN
======  ==================  ===========================  ====
fcc     a/√2                a/2·(1 + 1/√2)               12
bcc     a√3/2               a/2·(1 + √3/2)                8
bcc14   a√3/2 and a         a/2·(1 + √2)                 14
hcp     a                   a/2·(1 + √2)                 12
sc      a                   a/2·(1 + √2)                  6
======  ==================  ===========================  ====

For an amorphous sample give the cutoff directly (the first valley of g(r); 4.12 Å for Ta),
see :func:`operators.structure.pair_distribution.first_valley`.

Examples
--------
>>> from operators.structure.lattices import lattice_cutoff, nearest_neighbor_distance
>>> round(lattice_cutoff("fcc", 3.924), 4)
3.3493
>>> round(nearest_neighbor_distance("fcc", 3.924), 4)
2.7747
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from operators.structure.neighbors import check_positions, nearest_distance, neighbor_list


class _Lattice(NamedTuple):
    first: float      # nearest-neighbour distance / a
    second: float     # second-shell distance / a
    last: float       # outermost shell counted in the CN / a
    beyond: float     # the shell after it / a
    cn: int           # bulk coordination number
    density: float    # atoms per a³


_R2, _R3 = math.sqrt(2), math.sqrt(3)
LATTICES = {
    "fcc": _Lattice(1 / _R2, 1.0, 1 / _R2, 1.0, 12, 4.0),
    "bcc": _Lattice(_R3 / 2, 1.0, _R3 / 2, 1.0, 8, 2.0),
    "bcc14": _Lattice(_R3 / 2, 1.0, 1.0, _R2, 14, 2.0),
    "hcp": _Lattice(1.0, _R2, 1.0, _R2, 12, _R2),  # a = nearest-neighbour distance, ideal c/a
    "sc": _Lattice(1.0, _R2, 1.0, _R2, 6, 1.0),
}


def _lattice(lattice: str) -> _Lattice:
    if lattice not in LATTICES:
        raise ValueError(f"lattice must be one of {sorted(LATTICES)}, got {lattice!r} "
                         "(for an amorphous sample give the cutoff in Å instead)")
    return LATTICES[lattice]


def lattice_cutoff(lattice: str, a: float) -> float:
    """Coordination cutoff (Å) of a lattice with constant ``a`` (Å): see the module table."""
    lat = _lattice(lattice)
    return 0.5 * a * (lat.last + lat.beyond)


def lattice_density(lattice: str, a: float) -> float:
    """Bulk number density (atoms/Å³) of the lattice with constant ``a`` (Å)."""
    return _lattice(lattice).density / a ** 3


def nearest_neighbor_distance(lattice: str, a: float) -> float:
    """Ideal nearest-neighbour distance (Å) of the lattice."""
    return _lattice(lattice).first * a


def bulk_coordination(lattice: str) -> int:
    """Coordination number of a bulk atom with the module's cutoff (12 for fcc)."""
    return _lattice(lattice).cn


def fit_lattice_constant(positions, lattice: str = "fcc", iterations: int = 3) -> float:
    """Lattice constant (Å) fitted to the first-shell distances.

    Starts from the median nearest-neighbour distance; then, ``iterations`` times, takes every
    pair closer than halfway to the second shell and sets a to the least-squares solution of
    d_ij = f·a (f = nearest-neighbour distance / a), i.e. a = mean(d_ij) / f.
    """
    pos = check_positions(positions, min_atoms=2)
    lat = _lattice(lattice)
    f = lat.first
    a = float(np.median(nearest_distance(pos))) / f
    for _ in range(iterations):
        nb = neighbor_list(pos, 0.5 * a * (f + lat.second))
        if len(nb.distance) == 0:
            break
        a = float(nb.distance.mean()) / f
    return a
