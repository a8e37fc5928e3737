"""Voronoi indices ⟨n3, n4, n5, n6⟩ of atoms, as Yuan et al. (Nature Materials 21, 95 (2022))
compute them in their published code (``Main_2_pdf_and_voronoi_amorphous_region``).

n_k is the number of faces of the atom's Voronoi cell with k edges. The authors' steps, for
every atom to index (by default all; their pipeline indexes the amorphous atoms of a
tessellation of all atoms):

1. the atom's cell in the tessellation of **all** atoms; an atom on the convex hull (an
   unbounded cell) is not indexed (status 1);
2. faces smaller than ``area_fraction`` (1 %) of the cell's total face area are small: thermal
   and measurement noise, not topology;
3. the atoms across the small faces are dropped from the atom's Delaunay neighbours and the
   cell is **recomputed** from the remaining neighbours: the faces next to a dropped one
   grow and gain or lose edges. Fewer than 4 neighbours left: not indexed (status 2); an
   unbounded recomputed cell: not indexed (status 3);
4. every face of the recomputed cell is counted by its number of edges (= vertices); faces
   with more than 6 edges are not in the index (their code keeps n ≤ 6), but they are in
   ``n_faces``, the atom's Voronoi coordination number.

``recompute=False`` is the shortcut of counting the edges of the remaining faces of the
original cell (this module's behaviour before; on the Ta film only 11 % of the atoms then get
the authors' index). ``max_vertex_distance`` additionally rejects cells with a vertex farther
than that from the atom (status 4), which the authors do not do.

Cells are computed by clipping: face j of atom t is the bisector plane of t and its neighbour
j, a large square in that plane clipped by the half-spaces of all the other neighbours
(Sutherland–Hodgman); the cell is the intersection ∩_j {x : (x − r_t)·(r_j − r_t) ≤
|r_j − r_t|²/2} over the Delaunay neighbours (the whole tessellation's cell) or over the kept
ones (the recomputed cell: exactly the cell of t in the Voronoi tessellation of t and its kept
neighbours, which the authors compute with ``voronoin``). Consecutive vertices closer than
``edge_tolerance`` × |r_j − r_t| are one vertex (coincident vertices of cospherical atoms, as
qhull merges them); a face needs three distinct vertices and a positive area.

Examples
--------
>>> import numpy as np
>>> from operators.structure.voronoi import voronoi_indices
>>> g = np.stack(np.meshgrid(*[np.arange(-2, 3)] * 3, indexing="ij"), -1).reshape(-1, 3)
>>> bcc = np.vstack([g, g + 0.5]) * 3.3                  # atom 62 sits at the centre
>>> v = voronoi_indices(bcc)
>>> v.index[62].tolist(), int(v.n_faces[62]), round(float(v.volume[62]), 4), round(3.3 ** 3 / 2, 4)
([0, 6, 0, 8], 14, 17.9685, 17.9685)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from operators.structure.neighbors import check_positions, triangulate

OK, ON_HULL, TOO_FEW, UNBOUNDED_AFTER, TOO_FAR, NOT_SELECTED = 0, 1, 2, 3, 4, 5
STATUS = {OK: "indexed", ON_HULL: "on the convex hull (unbounded cell)",
          TOO_FEW: "fewer than 4 neighbours after removing the small faces",
          UNBOUNDED_AFTER: "recomputed cell unbounded",
          TOO_FAR: "a vertex beyond max_vertex_distance", NOT_SELECTED: "not selected"}


@dataclass(frozen=True)
class VoronoiCells:
    """Voronoi cells of every atom.

    index : (N, 4) int32 ⟨n3, n4, n5, n6⟩ of the (recomputed) cell; −1 where not indexed.
    n_faces : (N,) int32 faces of that cell, any number of edges: the Voronoi coordination
        number; −1 where not indexed.
    n_removed : (N,) int32 small faces removed (their atoms dropped); −1 where not indexed.
    area : (N,) float64 total face area of the atom's cell in the whole tessellation, Å²;
        volume : (N,) its volume, Å³; NaN for hull atoms and atoms not selected.
    status : (N,) int8, see ``STATUS`` (0 indexed, 1 on the hull, 2 fewer than 4 neighbours
        left, 3 recomputed cell unbounded, 4 a vertex beyond max_vertex_distance, 5 not
        selected). valid : (N,) bool, status == 0.
    area_fraction, recompute, max_vertex_distance : parameters used (Å; inf = none).
    """

    index: np.ndarray
    n_faces: np.ndarray
    n_removed: np.ndarray
    area: np.ndarray
    volume: np.ndarray
    status: np.ndarray
    valid: np.ndarray
    area_fraction: float
    recompute: bool
    max_vertex_distance: float

    def label(self) -> np.ndarray:
        """(N,) str '<n3,n4,n5,n6>' per atom, '' where not indexed."""
        return np.array([f"<{a},{b},{c},{d}>" if a >= 0 else "" for a, b, c, d in self.index])


@njit(cache=True, inline="always")
def _dot(a, b):
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


@njit(cache=True)
def _face(vec, nb, j, big, tol_rel, poly, tmp):
    """Face of the cell (at the origin) on the bisector plane of neighbour vector vec[nb[j]],
    clipped by the half-spaces of the other neighbours nb[k]. Returns (area, distinct
    vertices, farthest vertex distance, touches the bounding square)."""
    n = vec[nb[j]]
    nn = _dot(n, n)
    dn = np.sqrt(nn)
    e = n / dn
    h = np.array([1.0, 0.0, 0.0]) if abs(e[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    u = h - _dot(h, e) * e
    u = u / np.sqrt(_dot(u, u))
    w = np.array([e[1] * u[2] - e[2] * u[1], e[2] * u[0] - e[0] * u[2],
                  e[0] * u[1] - e[1] * u[0]])
    c = 0.5 * n
    L = big * dn
    m = 4
    for q in range(4):
        su = L if q == 0 or q == 3 else -L
        sw = L if q < 2 else -L
        for a in range(3):
            poly[q, a] = c[a] + su * u[a] + sw * w[a]
    for kk in range(nb.shape[0]):
        if kk == j or m == 0:
            continue
        p = vec[nb[kk]]
        off = 0.5 * _dot(p, p)
        r = 0
        for q in range(m):
            q2 = (q + 1) % m
            s1 = _dot(p, poly[q]) - off
            s2 = _dot(p, poly[q2]) - off
            if s1 <= 0.0:
                for a in range(3):
                    tmp[r, a] = poly[q, a]
                r += 1
            if (s1 <= 0.0) != (s2 <= 0.0):
                t = s1 / (s1 - s2)
                for a in range(3):
                    tmp[r, a] = poly[q, a] + t * (poly[q2, a] - poly[q, a])
                r += 1
        m = r
        for q in range(m):
            for a in range(3):
                poly[q, a] = tmp[q, a]
    if m < 3:
        return 0.0, 0, 0.0, False
    # merge coincident consecutive vertices (cyclically)
    tol2 = (tol_rel * dn) ** 2
    keep = np.empty(m, np.int64)
    k = 0
    for q in range(m):
        if k == 0:
            keep[k] = q
            k += 1
            continue
        d = poly[q] - poly[keep[k - 1]]
        if _dot(d, d) > tol2:
            keep[k] = q
            k += 1
    while k > 1:
        d = poly[keep[k - 1]] - poly[keep[0]]
        if _dot(d, d) > tol2:
            break
        k -= 1
    far = 0.0
    touches = False
    acc = 0.0
    for q in range(k):
        v0 = poly[keep[q]]
        v1 = poly[keep[(q + 1) % k]]
        x0, y0 = _dot(v0 - c, u), _dot(v0 - c, w)
        x1, y1 = _dot(v1 - c, u), _dot(v1 - c, w)
        acc += x0 * y1 - x1 * y0
        far = max(far, np.sqrt(_dot(v0, v0)))
        if max(abs(x0), abs(y0)) > 0.5 * L:
            touches = True
    area = 0.5 * abs(acc)
    if k < 3 or area <= 1e-12 * nn:
        return 0.0, 0, 0.0, touches
    return area, k, far, touches


@njit(cache=True)
def _cell(vec, nb, big, tol_rel, area, nvert, poly, tmp):
    """Faces of the cell of the origin among the neighbour vectors vec[nb]: area[j] and
    nvert[j] per neighbour (0 where no face); returns (bounded, farthest vertex).

    Each face starts as a square of half-size big × |r_j|; a cell reaching that far is
    computed again from a square 10⁴ times larger (cells of atoms just inside a sample's
    surface can reach 10⁵ Å), and unbounded when it still does."""
    for scale in (big, big * 1e4):
        bounded = True
        far = 0.0
        for j in range(nb.shape[0]):
            a, k, f, touches = _face(vec, nb, j, scale, tol_rel, poly, tmp)
            area[j] = a
            nvert[j] = k
            if touches:
                bounded = False
            far = max(far, f)
        if bounded:
            break
    return bounded, far


@njit(cache=True, parallel=True)
def _all_cells(pos, indptr, indices, on_hull, todo, frac, recompute, max_reach, tol_rel,
               index, n_faces, n_removed, total, volume, status):
    n = pos.shape[0]
    big = 1e4
    for t in prange(n):
        if not todo[t]:
            continue
        s, e = indptr[t], indptr[t + 1]
        m = e - s
        vec = np.empty((m, 3))
        for q in range(m):
            for a in range(3):
                vec[q, a] = pos[indices[s + q], a] - pos[t, a]
        nb = np.arange(m)
        area = np.zeros(m)
        nvert = np.zeros(m, np.int64)
        poly = np.empty((m + 8, 3))
        tmp = np.empty((m + 8, 3))
        if on_hull[t]:
            status[t] = 1
            continue
        bounded, far = _cell(vec, nb, big, tol_rel, area, nvert, poly, tmp)
        if not bounded:
            status[t] = 1
            continue
        a_tot = area.sum()
        vol = 0.0
        for q in range(m):
            vol += area[q] * np.sqrt(_dot(vec[q], vec[q])) / 6.0  # pyramid: area × (d/2) / 3
        total[t] = a_tot
        volume[t] = vol
        small = np.zeros(m, np.bool_)
        n_small = 0
        for q in range(m):
            if nvert[q] > 0 and area[q] < frac * a_tot:
                small[q] = True
                n_small += 1
        n_removed[t] = n_small
        if recompute and n_small > 0:
            kept = np.empty(m, np.int64)
            r = 0
            for q in range(m):
                if not small[q]:
                    kept[r] = q
                    r += 1
            if r < 4:
                status[t] = 2
                continue
            kept = kept[:r]
            area2 = np.zeros(r)
            nvert2 = np.zeros(r, np.int64)
            bounded, far = _cell(vec, kept, big, tol_rel, area2, nvert2, poly, tmp)
            if not bounded:
                status[t] = 3
                continue
            use = nvert2
        else:
            use = nvert.copy()
            for q in range(m):
                if small[q]:
                    use[q] = 0
        if far > max_reach:
            status[t] = 4
            continue
        nf = 0
        for q in range(use.shape[0]):
            k = use[q]
            if k >= 3:
                nf += 1
                if k <= 6:
                    index[t, k - 3] += 1
        n_faces[t] = nf
        status[t] = 0


def voronoi_indices(positions, area_fraction: float = 0.01, *, select=None,
                    recompute: bool = True, max_vertex_distance: float | None = None,
                    edge_tolerance: float = 1e-6, triangulation=None) -> VoronoiCells:
    """Voronoi index ⟨n3, n4, n5, n6⟩ and Voronoi coordination number of atoms, the authors'
    way (module docstring), with the cell area and volume of the whole tessellation.

    Parameters
    ----------
    positions : (N, 3) Å, N ≥ 5 and not all in one plane; all of them are tessellated.
    area_fraction : faces with area < area_fraction × (cell's total face area) are removed
        (0.01 = 1 %, as Yuan et al.).
    select : (N,) bool, the atoms to index (e.g. the amorphous ones), or None for all.
    recompute : recompute the cell without the atoms of the removed faces (the authors'
        step; default) or only drop those faces.
    max_vertex_distance : also reject cells with a vertex farther than this from the atom
        (Å), or None (the authors' behaviour: only hull atoms and failed recomputes).
    edge_tolerance : vertices closer than this × interatomic distance are one vertex.
    triangulation : a ``scipy.spatial.Delaunay`` of these positions to reuse, or None.

    Returns
    -------
    VoronoiCells
    """
    pos = check_positions(positions, min_atoms=5)
    if not (0 <= area_fraction < 1):
        raise ValueError(f"area_fraction must be in [0, 1), got {area_fraction}")
    max_reach = np.inf if max_vertex_distance is None else float(max_vertex_distance)
    if not max_reach > 0:
        raise ValueError(f"max_vertex_distance must be positive (Å) or None, "
                         f"got {max_vertex_distance}")
    n = len(pos)
    todo = np.ones(n, bool) if select is None else np.asarray(select, bool).reshape(-1)
    if todo.shape != (n,):
        raise ValueError(f"select must be (N,) booleans for the {n} atoms, got shape {np.shape(select)}")
    tri = triangulate(pos) if triangulation is None else triangulation
    if tri.points.shape != pos.shape:
        raise ValueError(f"triangulation has {len(tri.points)} points but positions {len(pos)}")
    indptr, indices = tri.vertex_neighbor_vertices
    on_hull = np.zeros(n, bool)
    on_hull[np.unique(tri.convex_hull)] = True
    index = np.zeros((n, 4), np.int32)
    n_faces = np.full(n, -1, np.int32)
    n_removed = np.full(n, -1, np.int32)
    total = np.full(n, np.nan)
    volume = np.full(n, np.nan)
    status = np.full(n, NOT_SELECTED, np.int8)
    _all_cells(pos, indptr.astype(np.int64), indices.astype(np.int64), on_hull, todo,
               float(area_fraction), bool(recompute), max_reach, float(edge_tolerance),
               index, n_faces, n_removed, total, volume, status)
    valid = status == OK
    index[~valid] = -1
    n_faces[~valid] = -1
    n_removed[~valid & (status != TOO_FAR)] = -1
    return VoronoiCells(index, n_faces, n_removed, total, volume, status, valid,
                        float(area_fraction), bool(recompute), float(max_reach))


def index_histogram(cells: VoronoiCells, top: int = 10) -> tuple[list[str], np.ndarray]:
    """The ``top`` most frequent indices among indexed cells: labels '<n3,n4,n5,n6>' and
    fractions (of the indexed cells), most frequent first (ties: lowest index first)."""
    idx = cells.index[cells.valid]
    if len(idx) == 0:
        return [], np.zeros(0)
    uniq, counts = np.unique(idx, axis=0, return_counts=True)
    order = np.argsort(-counts, kind="stable")[:top]
    labels = [f"<{a},{b},{c},{d}>" for a, b, c, d in uniq[order]]
    return labels, counts[order] / len(idx)
