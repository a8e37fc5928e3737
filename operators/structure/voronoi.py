"""Voronoi indices ⟨n3, n4, n5, n6⟩ of every atom.

n_k is the number of faces of the atom's Voronoi cell with k edges. As in Yuan et al.,
Nature Materials 21, 95 (2022), faces smaller than ``area_fraction`` (1 %) of the cell's total
face area are removed first: they come from thermal and measurement noise, not from topology.
The edges of the remaining faces are counted as they are.

The cells are built as the dual of the Delaunay triangulation (qhull through
``scipy.spatial.Delaunay``, the same triangulation the motif search and the g(r) window use):
the Voronoi vertices are the circumcentres of the tetrahedra, and the face between atoms a and
b is the polygon of the circumcentres of the tetrahedra around the Delaunay edge a–b. This is
the tessellation ``scipy.spatial.Voronoi`` computes (the tests compare the two) without a
second qhull run, which costs more than all other statistics together on 80,000 atoms. Where
five or more atoms are cospherical (perfect lattices) qhull splits their cell into tetrahedra,
some flat; a flat tetrahedron takes the circumcentre of a neighbour whose circumsphere holds
all its vertices.

A face's vertices are ordered by their angle around the a–b axis, consecutive vertices closer
than ``edge_tolerance`` × |a–b| are merged (the coincident vertices of cospherical atoms), and
the area is the polygon's shoelace area.

A cell is *valid* when it is bounded (its atom is not on the convex hull) and all its vertices
lie within ``max_vertex_distance`` of its atom: cells at the surface of a finite sample are
unbounded or reach far outside it, and their indices mean nothing. Invalid cells get index −1,
area and volume NaN.

Examples
--------
>>> import numpy as np
>>> from operators.structure.voronoi import voronoi_indices
>>> g = np.stack(np.meshgrid(*[np.arange(-2, 3)] * 3, indexing="ij"), -1).reshape(-1, 3)
>>> bcc = np.vstack([g, g + 0.5]) * 3.3                  # atom 62 sits at the centre
>>> v = voronoi_indices(bcc)
>>> v.index[62].tolist(), round(float(v.volume[62]), 4), round(3.3 ** 3 / 2, 4)
([0, 6, 0, 8], 17.9685, 17.9685)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from operators.kernels import NJIT
from operators.structure.neighbors import check_positions, delaunay_edges, triangulate


@dataclass(frozen=True)
class VoronoiCells:
    """Voronoi cells of every atom.

    index : (N, 4) int32 ⟨n3, n4, n5, n6⟩ after removing small faces; −1 for invalid cells.
    n_faces : (N,) int32 faces kept (of any edge count; faces with > 6 edges are in n_faces
        but not in the index); −1 for invalid cells.
    area : (N,) float64 total face area of the cell, Å² (all faces); NaN if invalid.
    volume : (N,) float64 cell volume, Å³; NaN if invalid.
    valid : (N,) bool.
    area_fraction, max_vertex_distance : parameters used (max_vertex_distance in Å, inf = none).
    """

    index: np.ndarray
    n_faces: np.ndarray
    area: np.ndarray
    volume: np.ndarray
    valid: np.ndarray
    area_fraction: float
    max_vertex_distance: float

    def label(self) -> np.ndarray:
        """(N,) str '<n3,n4,n5,n6>' per atom, '' for invalid cells."""
        return np.array([f"<{a},{b},{c},{d}>" if a >= 0 else "" for a, b, c, d in self.index])


@njit(**NJIT)
def _faces(points, ridge_points, offsets, flat, edge_tol):
    """Per ridge: area (Å²), number of distinct edges and distance of its farthest vertex from
    its atoms; unbounded ridges get area −1."""
    n_r = ridge_points.shape[0]
    area = np.empty(n_r)
    edges = np.zeros(n_r, np.int64)
    reach = np.zeros(n_r)
    for r in range(n_r):
        a = ridge_points[r, 0]
        b = ridge_points[r, 1]
        s, e = offsets[r], offsets[r + 1]
        k = e - s
        unbounded = False
        for t in range(s, e):
            if flat[t] < 0:
                unbounded = True
        if unbounded or k < 3:
            area[r] = -1.0 if unbounded else 0.0
            reach[r] = np.inf if unbounded else 0.0
            continue
        # Basis of the bisecting plane: n along a->b, u and w across it.
        n = points[b] - points[a]
        dab = np.sqrt((n * n).sum())
        n = n / dab
        helper = np.array([1.0, 0.0, 0.0]) if abs(n[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
        u = helper - (helper * n).sum() * n
        u = u / np.sqrt((u * u).sum())
        w = np.array([n[1] * u[2] - n[2] * u[1], n[2] * u[0] - n[0] * u[2],
                      n[0] * u[1] - n[1] * u[0]])
        xs = np.empty(k)
        ys = np.empty(k)
        far = 0.0
        for t in range(k):
            p = points[flat[s + t]]
            d = p - points[a]
            far = max(far, np.sqrt((d * d).sum()))
            xs[t] = (p * u).sum()
            ys[t] = (p * w).sum()
        reach[r] = far
        cx = xs.mean()
        cy = ys.mean()
        ang = np.arctan2(ys - cy, xs - cx)
        order = np.argsort(ang)
        xs = xs[order]
        ys = ys[order]
        tol2 = (edge_tol * dab) ** 2
        # Drop a vertex that sits on the previous kept one (cyclically): degenerate vertices.
        kept = np.empty(k, np.int64)
        m = 0
        for t in range(k):
            if m == 0 or (xs[t] - xs[kept[m - 1]]) ** 2 + (ys[t] - ys[kept[m - 1]]) ** 2 > tol2:
                kept[m] = t
                m += 1
        while m > 1:
            dx = xs[kept[m - 1]] - xs[kept[0]]
            dy = ys[kept[m - 1]] - ys[kept[0]]
            if dx * dx + dy * dy > tol2:
                break
            m -= 1
        acc = 0.0
        for t in range(m):
            p0 = kept[t]
            p1 = kept[(t + 1) % m]
            acc += xs[p0] * ys[p1] - xs[p1] * ys[p0]
        edges[r] = m
        area[r] = 0.5 * abs(acc) if m >= 3 else 0.0
    return area, edges, reach


@njit(**NJIT)
def _cells(n_atoms, ridge_points, area, edges, reach, dist, frac, max_reach):
    total = np.zeros(n_atoms)
    volume = np.zeros(n_atoms)
    far = np.zeros(n_atoms)
    bounded = np.ones(n_atoms, np.bool_)
    for r in range(ridge_points.shape[0]):
        for side in range(2):
            i = ridge_points[r, side]
            if area[r] < 0:
                bounded[i] = False
            else:
                total[i] += area[r]
                volume[i] += area[r] * dist[r] / 6.0  # pyramid: area × (d/2) / 3
                far[i] = max(far[i], reach[r])
    valid = bounded & (far <= max_reach) & (total > 0)
    index = np.zeros((n_atoms, 4), np.int32)
    n_faces = np.zeros(n_atoms, np.int32)
    for r in range(ridge_points.shape[0]):
        for side in range(2):
            i = ridge_points[r, side]
            if valid[i] and area[r] >= frac * total[i] and area[r] > 0:
                n_faces[i] += 1
                e = edges[r]
                if 3 <= e <= 6:
                    index[i, e - 3] += 1
    for i in range(n_atoms):
        if not valid[i]:
            index[i, :] = -1
            n_faces[i] = -1
            total[i] = np.nan
            volume[i] = np.nan
    return index, n_faces, total, volume, valid


def circumcenters(tri) -> np.ndarray:
    """(T, 3) circumcentres of the tetrahedra of a ``scipy.spatial.Delaunay`` (Å): the Voronoi
    vertices. A flat tetrahedron (cospherical atoms) takes the centre of a face-neighbour whose
    circumsphere passes through its four vertices; NaN if there is none."""
    pos = np.asarray(tri.points, dtype=np.float64)
    simp = np.asarray(tri.simplices, dtype=np.int64)
    a = pos[simp[:, 0]]
    b, c, d = (pos[simp[:, k]] - a for k in (1, 2, 3))
    cd, db, bc = np.cross(c, d), np.cross(d, b), np.cross(b, c)
    den = 2 * np.einsum("ij,ij->i", b, cd)
    scale = np.maximum.reduce([np.einsum("ij,ij->i", v, v) for v in (b, c, d)]) ** 1.5
    flat = np.abs(den) <= 1e-10 * scale
    num = (np.einsum("ij,ij->i", b, b)[:, None] * cd + np.einsum("ij,ij->i", c, c)[:, None] * db
           + np.einsum("ij,ij->i", d, d)[:, None] * bc)
    centre = a + num / np.where(flat, 1.0, den)[:, None]
    centre[flat] = np.nan
    todo = np.flatnonzero(flat)
    nbr = np.asarray(tri.neighbors, dtype=np.int64)
    while len(todo):
        found = False
        for k in range(4):
            cand = nbr[todo, k]
            ok = cand >= 0
            cen = np.where(ok[:, None], centre[np.maximum(cand, 0)], np.nan)
            dist = np.linalg.norm(pos[simp[todo]] - cen[:, None, :], axis=2)  # (m, 4)
            rad = np.linalg.norm(pos[simp[np.maximum(cand, 0), 0]] - cen, axis=1)
            off = np.abs(dist - rad[:, None]).max(axis=1)
            good = ok & np.isfinite(rad) & (off <= 1e-6 * (1 + rad))
            centre[todo[good]] = cen[good]
            found |= bool(good.any())
            todo = todo[~good]
            if not len(todo):
                break
        if not found:
            break
    return centre


def voronoi_indices(positions, area_fraction: float = 0.01,
                    max_vertex_distance: float | None = None, edge_tolerance: float = 1e-6,
                    triangulation=None) -> VoronoiCells:
    """Voronoi index ⟨n3, n4, n5, n6⟩, cell area and volume of every atom.

    Parameters
    ----------
    positions : (N, 3) Å, N ≥ 5 and not all in one plane.
    area_fraction : faces with area < area_fraction × (cell's total face area) are removed
        (0.01 = 1 %, as Yuan et al.).
    max_vertex_distance : cells with a vertex farther than this from their atom (Å) are
        invalid; None keeps every bounded cell. About the first-valley distance of g(r)
        rejects the surface cells of a finite sample.
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
    tri = triangulate(pos) if triangulation is None else triangulation
    if tri.points.shape != pos.shape:
        raise ValueError(f"triangulation has {len(tri.points)} points but positions {len(pos)}")
    centre = circumcenters(tri)
    ed = delaunay_edges(tri)
    # A face is unbounded on the hull, and unknown where a flat tetrahedron found no centre.
    vertex = np.where(np.isfinite(centre).all(axis=1), np.arange(len(centre)), -1)[ed.tetrahedra]
    vertex[np.repeat(ed.on_hull, np.diff(ed.offsets))] = -1
    table = np.vstack([np.nan_to_num(centre), pos])
    ridge_points = np.ascontiguousarray(ed.atoms)
    area, edges, reach = _faces(table, ridge_points + len(centre), ed.offsets, vertex,
                                float(edge_tolerance))
    dist = np.linalg.norm(pos[ridge_points[:, 1]] - pos[ridge_points[:, 0]], axis=1)
    index, n_faces, total, volume, valid = _cells(len(pos), ridge_points, area, edges, reach,
                                                  dist, float(area_fraction), max_reach)
    return VoronoiCells(index, n_faces, total, volume, valid, float(area_fraction),
                        float(max_reach))


def index_histogram(cells: VoronoiCells, top: int = 10) -> tuple[list[str], np.ndarray]:
    """The ``top`` most frequent indices among valid cells: labels '<n3,n4,n5,n6>' and fractions."""
    idx = cells.index[cells.valid]
    if len(idx) == 0:
        return [], np.zeros(0)
    uniq, counts = np.unique(idx, axis=0, return_counts=True)
    order = np.argsort(-counts, kind="stable")[:top]
    labels = [f"<{a},{b},{c},{d}>" for a, b, c, d in uniq[order]]
    return labels, counts[order] / len(idx)
