"""Per-atom statistics of the neighbour shell: coordination number, generalised coordination
number, mean bond length and radial strain.

The shell is a cutoff (Å) or an :class:`operators.structure.neighbors.Neighbors` list; the cutoffs and
ideal bond lengths of the common lattices are in :mod:`operators.structure.lattices`.

Examples
--------
>>> import numpy as np
>>> from operators.structure.coordination import coordination_numbers
>>> cn = coordination_numbers(np.array([[0., 0, 0], [2.77, 0, 0], [0, 2.77, 0], [9, 9, 9]]), 3.35)
>>> cn.tolist()
[2, 1, 1, 0]
"""

from __future__ import annotations

import numpy as np
from numba import njit

from operators.kernels import NJIT
from operators.structure.neighbors import Neighbors, check_positions, neighbor_list


def coordination_numbers(positions, cutoff: float) -> np.ndarray:
    """(N,) int64 number of atoms within ``cutoff`` (Å) of each atom."""
    return neighbor_list(positions, cutoff).count


def generalized_coordination(nb: Neighbors, convention: str = "calle-vallejo",
                             cn_max: float = 12.0) -> np.ndarray:
    """(N,) float64 generalised coordination number GCN(i) = Σ_{j ∈ nn(i)} CN(j) / norm.

    convention : 'calle-vallejo' (norm = ``cn_max``, the bulk CN: 12 for fcc, Calle-Vallejo et
        al., Angew. Chem. 53, 8316 (2014)) or 'single' (norm = the largest CN among atom i's
        neighbours, as in the SINGLE papers). Atoms without neighbours get 0.
    """
    cn = nb.count.astype(np.float64)
    s = np.bincount(nb.center, cn[nb.index], minlength=nb.n_atoms)
    if convention == "calle-vallejo":
        if not cn_max > 0:
            raise ValueError(f"cn_max must be positive, got {cn_max}")
        return s / float(cn_max)
    if convention == "single":
        big = np.zeros(nb.n_atoms)
        np.maximum.at(big, nb.center, cn[nb.index])
        return np.divide(s, big, out=np.zeros_like(s), where=big > 0)
    raise ValueError(f"convention must be 'calle-vallejo' or 'single', got {convention!r}")


def bond_lengths(nb: Neighbors) -> np.ndarray:
    """(N,) float64 mean distance (Å) from each atom to its neighbours; NaN without neighbours."""
    s = np.bincount(nb.center, nb.distance, minlength=nb.n_atoms)
    c = nb.count
    return np.divide(s, c, out=np.full(nb.n_atoms, np.nan), where=c > 0)


@njit(**NJIT)
def _strain_tensors(offsets, vector, distance, d0, rcond):
    n = len(offsets) - 1
    out = np.full((n, 6), np.nan)
    for i in range(n):
        m = np.zeros((6, 6))
        rhs = np.zeros(6)
        for k in range(offsets[i], offsets[i + 1]):
            u = vector[k] / distance[k]
            row = np.array([u[0] * u[0], u[1] * u[1], u[2] * u[2],
                            2 * u[0] * u[1], 2 * u[0] * u[2], 2 * u[1] * u[2]])
            s = (distance[k] - d0) / d0
            for p in range(6):
                rhs[p] += row[p] * s
                for q in range(6):
                    m[p, q] += row[p] * row[q]
        if offsets[i + 1] - offsets[i] < 6:
            continue
        ev = np.linalg.eigvalsh(m)
        if ev[0] <= rcond * ev[-1]:
            continue  # bond directions do not determine all six components
        out[i] = np.linalg.solve(m, rhs)
    return out


def radial_strain(positions, nb: Neighbors, d0: float, center=None,
                  rcond: float = 1e-3) -> np.ndarray:
    """(N,) float64 radial strain ε_rr of each atom (dimensionless).

    The local strain tensor ε of atom i is the least-squares solution of
    (d_ij − d0)/d0 = n_ijᵀ ε n_ij over its bonds (n_ij unit bond vector, d0 the ideal bond
    length, e.g. :func:`operators.structure.lattices.nearest_neighbor_distance`); rotations do not
    change bond lengths, so no lattice orientation is needed. ε_rr = r̂ᵀ ε r̂ with r̂ the
    direction from ``center`` (default: the centroid) to the atom. NaN where the bonds do not
    fix ε (fewer than six bond axes, or smallest/largest eigenvalue of the normal matrix ≤
    ``rcond``: corners, edges) and for an atom at the centre.
    """
    pos = check_positions(positions)
    if not d0 > 0:
        raise ValueError(f"d0 must be a positive bond length in Å, got {d0}")
    c = pos.mean(axis=0) if center is None else np.asarray(center, np.float64).reshape(3)
    t = _strain_tensors(nb.offsets, nb.vector, nb.distance, float(d0), float(rcond))
    r = pos - c
    rn = np.linalg.norm(r, axis=1)
    u = np.divide(r, rn[:, None], out=np.full_like(r, np.nan), where=rn[:, None] > 1e-9)
    return (t[:, 0] * u[:, 0] ** 2 + t[:, 1] * u[:, 1] ** 2 + t[:, 2] * u[:, 2] ** 2
            + 2 * (t[:, 3] * u[:, 0] * u[:, 1] + t[:, 4] * u[:, 0] * u[:, 2]
                   + t[:, 5] * u[:, 1] * u[:, 2]))
