"""Neighbour lists of atoms in 3D, as CSR arrays built with ``scipy.spatial.cKDTree``.

Atom j is a neighbour of atom i when ``min_distance < |r_j - r_i| < cutoff`` (both strict, as
in Yuan et al. 2022, whose Ta analysis uses 0.1 Å < r < 4.12 Å). The list is symmetric and
sorted: the neighbours of atom i are ``index[offsets[i]:offsets[i + 1]]`` in ascending order.

Examples
--------
>>> import numpy as np
>>> from operators.structure.neighbors import neighbor_list
>>> nb = neighbor_list(np.array([[0., 0, 0], [2.5, 0, 0], [9, 0, 0]]), cutoff=3.0)
>>> nb.count.tolist(), nb.index.tolist(), nb.distance.tolist()
([1, 1, 0], [1, 0], [2.5, 2.5])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import Delaunay, QhullError, cKDTree


def check_positions(positions, what: str = "positions", min_atoms: int = 1) -> np.ndarray:
    """``positions`` as a C-contiguous (N, 3) float64 array of finite values (Å), or ValueError."""
    pos = np.asarray(positions)
    if pos.ndim != 2 or pos.shape[1] != 3:
        raise ValueError(f"{what} must be an (N, 3) array of x, y, z in Å, got shape {pos.shape}; "
                         "transpose a (3, N) array first")
    if not np.issubdtype(pos.dtype, np.number) or np.iscomplexobj(pos):
        raise ValueError(f"{what} must be real numbers, got dtype {pos.dtype}")
    pos = np.ascontiguousarray(pos, dtype=np.float64)
    if not np.isfinite(pos).all():
        raise ValueError(f"{what}: {int((~np.isfinite(pos).any(axis=1)).sum())} atom(s) have "
                         "NaN or infinite coordinates; drop them first")
    if len(pos) < min_atoms:
        raise ValueError(f"{what}: need at least {min_atoms} atoms, got {len(pos)}")
    return pos


def check_per_atom(values, n_atoms: int, what: str) -> np.ndarray:
    """``values`` as an (N,) float64 array matching ``n_atoms``, or ValueError."""
    v = np.asarray(values, dtype=np.float64)
    if v.shape != (n_atoms,):
        raise ValueError(f"{what} must have one value per atom, shape ({n_atoms},), got {v.shape}")
    return v


@dataclass(frozen=True)
class Neighbors:
    """Symmetric neighbour list in CSR form.

    offsets : (N+1,) int64; the neighbours of atom i are entries offsets[i]:offsets[i+1].
    index : (M,) int64 neighbour atom, ascending within each atom.
    distance : (M,) float64 Å.
    vector : (M, 3) float64 Å, r_neighbour − r_atom (minimum image in a periodic box).
    cutoff, min_distance : the shell used, Å.
    """

    offsets: np.ndarray
    index: np.ndarray
    distance: np.ndarray
    vector: np.ndarray
    cutoff: float
    min_distance: float

    @property
    def n_atoms(self) -> int:
        return len(self.offsets) - 1

    @property
    def count(self) -> np.ndarray:
        """(N,) int64 number of neighbours of each atom."""
        return np.diff(self.offsets)

    @property
    def center(self) -> np.ndarray:
        """(M,) int64 the atom each entry belongs to."""
        return np.repeat(np.arange(self.n_atoms), self.count)


def _box(box_size, pos):
    if box_size is None:
        return None
    box = np.broadcast_to(np.asarray(box_size, dtype=np.float64), (3,)).copy()
    if not (np.isfinite(box).all() and (box > 0).all()):
        raise ValueError(f"box_size must be positive lengths in Å, got {box_size!r}")
    return box


def wrap(pos: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Positions wrapped into [0, box) (np.mod can round a tiny negative up to box itself)."""
    pos = np.mod(pos, box)
    return np.where(pos >= box, 0.0, pos)


def neighbor_list(positions, cutoff: float, min_distance: float = 0.0,
                  box_size=None) -> Neighbors:
    """All neighbours within a spherical shell, for every atom.

    Parameters
    ----------
    positions : (N, 3) Å.
    cutoff : outer radius, Å (strict: neighbours have distance < cutoff).
    min_distance : inner radius, Å (strict: distance > min_distance); 0.1 Å drops duplicates.
    box_size : None, or the edge lengths (Å, scalar or 3) of a periodic box [0, L)³; positions
        are wrapped into it and vectors use the minimum image (cutoff must be < L/2).

    Returns
    -------
    Neighbors, sorted by atom then neighbour index.
    """
    pos = check_positions(positions)
    cutoff = float(cutoff)
    min_distance = float(min_distance)
    if not (np.isfinite(cutoff) and cutoff > 0):
        raise ValueError(f"cutoff must be a positive distance in Å, got {cutoff}")
    if not (0 <= min_distance < cutoff):
        raise ValueError(f"min_distance must be in [0, cutoff), got {min_distance} "
                         f"(cutoff {cutoff})")
    box = _box(box_size, pos)
    if box is not None:
        if cutoff >= box.min() / 2:
            raise ValueError(f"cutoff {cutoff} Å must be below half the box ({box.min() / 2} Å)")
        pos = wrap(pos, box)
    tree = cKDTree(pos, boxsize=box)
    pairs = tree.query_pairs(cutoff, output_type="ndarray").astype(np.int64)
    i, j = pairs[:, 0], pairs[:, 1]
    vec = pos[j] - pos[i]
    if box is not None:
        vec -= box * np.round(vec / box)
    dist = np.sqrt(np.einsum("ij,ij->i", vec, vec))
    keep = (dist < cutoff) & (dist > min_distance)
    i, j, vec, dist = i[keep], j[keep], vec[keep], dist[keep]
    ii = np.concatenate([i, j])
    jj = np.concatenate([j, i])
    order = np.lexsort((jj, ii))
    counts = np.bincount(ii, minlength=len(pos))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return Neighbors(offsets, jj[order], np.concatenate([dist, dist])[order],
                     np.concatenate([vec, -vec])[order], cutoff, min_distance)


def nearest_distance(positions, box_size=None) -> np.ndarray:
    """(N,) float64 distance (Å) from each atom to its nearest other atom; inf for a lone atom."""
    pos = check_positions(positions)
    box = _box(box_size, pos)
    if box is not None:
        pos = wrap(pos, box)
    if len(pos) < 2:
        return np.full(len(pos), np.inf)
    d, _ = cKDTree(pos, boxsize=box).query(pos, k=2)
    return d[:, 1]


def triangulate(positions) -> Delaunay:
    """Delaunay triangulation of the atoms (qhull), or ValueError for degenerate input. One
    triangulation can serve ``motifs.find_motifs`` and ``sample_windows.sample_window``."""
    pos = check_positions(positions, min_atoms=5)
    try:
        return Delaunay(pos)
    except QhullError as exc:
        raise ValueError(f"Delaunay triangulation failed (atoms coplanar or duplicated?): "
                         f"{str(exc).splitlines()[0]}") from None


@dataclass(frozen=True)
class DelaunayEdges:
    """The edges of a Delaunay triangulation with the tetrahedra around each.

    atoms : (E, 2) int64, a < b. offsets : (E+1,) int64; the tetrahedra (rows of
    ``triangulation.simplices``) around edge e are ``tetrahedra[offsets[e]:offsets[e+1]]``.
    on_hull : (E,) bool, edge on the convex hull (its star is open, its Voronoi face unbounded).
    """

    atoms: np.ndarray
    offsets: np.ndarray
    tetrahedra: np.ndarray
    on_hull: np.ndarray


TETRA_EDGES = np.array([(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)])  # vertex pairs


def delaunay_edges(tri: Delaunay) -> DelaunayEdges:
    """Every edge of the triangulation and its star of tetrahedra (sorted by atom pair)."""
    simplices = np.asarray(tri.simplices, dtype=np.int64)
    n = len(tri.points)
    ea = simplices[:, TETRA_EDGES[:, 0]].ravel()
    eb = simplices[:, TETRA_EDGES[:, 1]].ravel()
    keys = np.minimum(ea, eb) * n + np.maximum(ea, eb)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    edge_keys = sorted_keys[starts]
    hull = np.asarray(tri.convex_hull, dtype=np.int64)
    hull_keys = np.concatenate([np.minimum(hull[:, p], hull[:, q]) * n
                                + np.maximum(hull[:, p], hull[:, q])
                                for p, q in ((0, 1), (0, 2), (1, 2))])
    return DelaunayEdges(np.stack([edge_keys // n, edge_keys % n], axis=1),
                         np.r_[starts, len(keys)].astype(np.int64), (order // 6).astype(np.int64),
                         np.isin(edge_keys, hull_keys))
