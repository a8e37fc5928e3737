"""Polytetrahedral packing: distorted tetrahedra, the motifs they build, and the networks of
pentagonal bipyramids (after Yuan et al., Nature Materials 21, 95 (2022)).

Definitions used here
---------------------
- **Tetrahedra** are the Delaunay tetrahedra of the atoms (``scipy.spatial.Delaunay``) whose six
  edges are all bonds (≤ ``bond_cutoff``, the first valley of g(r): 4.12 Å for Ta) and whose
  distortion δ = l_max / l_mean − 1 ≤ ``delta_max`` (0.255), l being the six edge lengths.
  These are the authors' two criteria. Their extra step, dropping tetrahedra whose incentre
  lies outside an α-shape of the sample, is not repeated: a tetrahedron spanning a surface
  concavity has an edge longer than the bond cutoff and is rejected anyway.
- A **bipyramid** of order n (n = 4 quadrilateral, 5 pentagonal, 6 hexagonal) is an interior
  Delaunay edge A–B (its *axis*) whose n surrounding tetrahedra are all accepted: a closed ring
  of n face-sharing tetrahedra sharing the edge A–B, with n + 2 atoms. This is the authors'
  "n-fold motif" (a closed cycle of n face-sharing tetrahedra with a common edge and no
  shortcut); in a Delaunay triangulation the ring of a shared edge is always the whole star
  of that edge, so the two formulations agree. Rings of 3, 7 or more tetrahedra are ignored.
- A **triplet** is three face-sharing accepted tetrahedra around one edge that do not close
  into a ring: a maximal run of exactly three consecutive accepted tetrahedra in the star of
  an edge (a broken bipyramid). As the authors do, triplets that share a tetrahedron with any
  bipyramid are dropped. (Their script finds triplets as dead-end paths in the face-sharing
  graph, so counts can differ slightly; the fractions they report are per tetrahedron.)
- Two pentagonal bipyramids are **edge-sharing** when they share exactly two tetrahedra — in
  the authors' drawing each bipyramid is a pentagon whose vertices are its tetrahedra, so this
  is sharing a pentagon edge (their ``length(intersect(...)) == 2`` test). A
  **pentagonal-bipyramid network** is a connected component of edge-sharing bipyramids; the
  authors discuss networks of ≥ 5 bipyramids. The 13-atom icosahedron is 12 pentagonal
  bipyramids (one per centre–vertex edge) forming one network with 30 shared pentagon edges.

Examples
--------
>>> import numpy as np
>>> from operators.structure.motifs import find_motifs
>>> t = np.arange(5) * 2 * np.pi / 5
>>> ring = np.stack([np.cos(t), np.sin(t), 0 * t], 1) / (2 * np.sin(np.pi / 5))  # edge 1
>>> h = np.sqrt(1 - 1 / (2 * np.sin(np.pi / 5)) ** 2)                           # pole edge 1
>>> m = find_motifs(np.vstack([[0, 0, h], [0, 0, -h], ring]) * 2.8, bond_cutoff=3.5)
>>> len(m.tetrahedra), m.kind.tolist(), m.axis.tolist()
(5, [5], [[0, 1]])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from operators.kernels import NJIT
from operators.structure.neighbors import TETRA_EDGES, check_positions, delaunay_edges, triangulate

KIND_NAMES = {3: "triplet", 4: "quadrilateral", 5: "pentagonal", 6: "hexagonal"}


@dataclass(frozen=True)
class Motifs:
    """Accepted tetrahedra and the motifs built from them.

    tetrahedra : (T, 4) int64 atom indices of the accepted tetrahedra.
    distortion : (T,) float64 δ = l_max / l_mean − 1 of each.
    kind : (K,) int64 3 triplet, 4 / 5 / 6 quadrilateral / pentagonal / hexagonal bipyramid.
    axis : (K, 2) int64 atoms A < B of the shared edge.
    offsets : (K+1,) int64; the tetrahedra (rows of ``tetrahedra``) of motif k are
        ``members[offsets[k]:offsets[k+1]]``.
    members : int64.
    pb_network : (K,) int64 network label of each pentagonal bipyramid, −1 for other motifs.
    network_size : (n_networks,) int64 number of pentagonal bipyramids in each network.
    n_atoms : int; delta_max, bond_cutoff : parameters (bond_cutoff in Å).
    """

    tetrahedra: np.ndarray
    distortion: np.ndarray
    kind: np.ndarray
    axis: np.ndarray
    offsets: np.ndarray
    members: np.ndarray
    pb_network: np.ndarray
    network_size: np.ndarray
    n_atoms: int
    delta_max: float
    bond_cutoff: float

    def motif_atoms(self, k: int) -> np.ndarray:
        """Sorted atoms of motif ``k``."""
        return np.unique(self.tetrahedra[self.members[self.offsets[k]:self.offsets[k + 1]]])


@njit(**NJIT)
def _edge_runs(edge_ptr, edge_a, edge_b, edge_tet, tets, accepted, closed, max_out):
    """Maximal runs of exactly three accepted tetrahedra around each edge that is not a closed
    ring: returns (edge, t0, t1, t2) rows."""
    out = np.empty((max_out, 4), np.int64)
    n_out = 0
    for e in range(len(edge_ptr) - 1):
        if closed[e]:
            continue
        s, f = edge_ptr[e], edge_ptr[e + 1]
        ok = np.empty(f - s, np.int64)
        k = 0
        for t in range(s, f):
            if accepted[edge_tet[t]]:
                ok[k] = edge_tet[t]
                k += 1
        if k < 3:
            continue
        # The two vertices of each tetrahedron off the edge; neighbours around the edge share one.
        a = edge_a[e]
        b = edge_b[e]
        other = np.empty((k, 2), np.int64)
        for q in range(k):
            m = 0
            for j in range(4):
                v = tets[ok[q], j]
                if v != a and v != b:
                    other[q, m] = v
                    m += 1
        parent = np.arange(k)
        for p in range(k):
            for q in range(p + 1, k):
                if (other[p, 0] == other[q, 0] or other[p, 0] == other[q, 1]
                        or other[p, 1] == other[q, 0] or other[p, 1] == other[q, 1]):
                    rp = p
                    while parent[rp] != rp:
                        rp = parent[rp]
                    rq = q
                    while parent[rq] != rq:
                        rq = parent[rq]
                    if rp != rq:
                        parent[rq] = rp
        for p in range(k):
            r = p
            while parent[r] != r:
                r = parent[r]
            parent[p] = r
        for root in range(k):
            size = 0
            for p in range(k):
                if parent[p] == root:
                    size += 1
            if size != 3:
                continue
            members = np.empty(3, np.int64)
            m = 0
            for p in range(k):
                if parent[p] == root:
                    members[m] = p
                    m += 1
            # A path of three has four distinct ring atoms; a closed 3-ring has three.
            ring = np.empty(6, np.int64)
            for m in range(3):
                ring[2 * m] = other[members[m], 0]
                ring[2 * m + 1] = other[members[m], 1]
            ring = np.unique(ring)
            if len(ring) != 4:
                continue
            out[n_out, 0] = e
            for m in range(3):
                out[n_out, 1 + m] = ok[members[m]]
            n_out += 1
    return out[:n_out]


def _tetra_filter(pos, simplices, delta_max, bond_cutoff):
    ends = pos[simplices[:, TETRA_EDGES]]  # (T, 6, 2, 3)
    lengths = np.linalg.norm(ends[:, :, 1] - ends[:, :, 0], axis=2)
    lmax = lengths.max(axis=1)
    delta = lmax / lengths.mean(axis=1) - 1.0
    return (delta <= delta_max) & (lmax <= bond_cutoff), delta


def find_motifs(positions, bond_cutoff: float, delta_max: float = 0.255,
                triangulation=None) -> Motifs:
    """Accepted tetrahedra, triplets, quadrilateral / pentagonal / hexagonal bipyramids and the
    pentagonal-bipyramid networks of a set of atoms (definitions in the module docstring).

    Parameters
    ----------
    positions : (N, 3) Å, N ≥ 5, not all in one plane.
    bond_cutoff : longest tetrahedron edge, Å (first valley of g(r); 4.12 Å for Ta).
    delta_max : largest distortion δ = l_max / l_mean − 1 (0.255, as Yuan et al.).
    triangulation : a ``scipy.spatial.Delaunay`` of these positions to reuse
        (``neighbors.triangulate``), or None.

    Returns
    -------
    Motifs
    """
    pos = check_positions(positions, min_atoms=5)
    if not (np.isfinite(bond_cutoff) and bond_cutoff > 0):
        raise ValueError(f"bond_cutoff must be a positive distance in Å, got {bond_cutoff}")
    if not (np.isfinite(delta_max) and delta_max >= 0):
        raise ValueError(f"delta_max must be a non-negative number, got {delta_max}")
    dt = triangulate(pos) if triangulation is None else triangulation
    if dt.points.shape != pos.shape:
        raise ValueError(f"triangulation has {len(dt.points)} points but positions {len(pos)}")
    simplices = np.ascontiguousarray(dt.simplices, dtype=np.int64)
    accepted, delta = _tetra_filter(pos, simplices, float(delta_max), float(bond_cutoff))
    n = len(pos)
    ed = delaunay_edges(dt)
    n_all = np.diff(ed.offsets)
    n_ok = np.add.reduceat(accepted[ed.tetrahedra].astype(np.int64), ed.offsets[:-1]) \
        if len(n_all) else n_all
    closed = ~ed.on_hull & (n_ok == n_all)
    is_motif = closed & (n_all >= 4) & (n_all <= 6)

    new_id = np.cumsum(accepted) - 1  # simplex -> row of the accepted table
    motif_edges = np.flatnonzero(is_motif)
    m_members = new_id[ed.tetrahedra[np.repeat(is_motif, n_all)]]

    max_trip = int((n_ok[~closed] // 3).sum())
    trip = _edge_runs(ed.offsets, ed.atoms[:, 0], ed.atoms[:, 1], ed.tetrahedra, simplices,
                      accepted, closed, max_trip)
    trip_tets = new_id[trip[:, 1:]]
    in_bipyramid = np.zeros(int(accepted.sum()), bool)
    in_bipyramid[m_members] = True
    alone = ~in_bipyramid[trip_tets].any(axis=1)
    trip, trip_tets = trip[alone], trip_tets[alone]

    edge_ids = np.concatenate([motif_edges, trip[:, 0]])
    kind = np.concatenate([n_all[motif_edges], np.full(len(trip), 3)]).astype(np.int64)
    members = np.concatenate([m_members, trip_tets.ravel()]).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(kind)]).astype(np.int64)
    axis = ed.atoms[edge_ids]
    # Sorted by kind then axis, so the output does not depend on the search order.
    srt = np.lexsort((axis[:, 1], axis[:, 0], kind))
    members = members[_ranges(offsets[srt], kind[srt])]
    kind, axis = kind[srt], axis[srt]
    offsets = np.concatenate([[0], np.cumsum(kind)]).astype(np.int64)
    pb_network, network_size = _networks(kind, offsets, members, int(accepted.sum()), ring=5)
    return Motifs(simplices[accepted], delta[accepted], kind, axis, offsets, members, pb_network,
                  network_size, n, float(delta_max), float(bond_cutoff))


def _ranges(starts, sizes):
    """Concatenated aranges [starts[k], starts[k] + sizes[k])."""
    if len(sizes) == 0:
        return np.zeros(0, np.int64)
    base = np.repeat(starts - np.r_[0, np.cumsum(sizes)[:-1]], sizes)
    return base + np.arange(int(sizes.sum()))


def _networks(kind, offsets, members, n_tets, ring=5):
    """Connected components of the motifs of size ``ring`` that share exactly two tetrahedra."""
    label = np.full(len(kind), -1, np.int64)
    sel = np.flatnonzero(kind == ring)
    if len(sel) == 0:
        return label, np.zeros(0, np.int64)
    motif = np.repeat(np.arange(len(sel)), ring)
    tet = members[_ranges(offsets[sel], kind[sel])]
    # Motif pairs through each tetrahedron (a tetrahedron has 6 edges: at most 6 motifs).
    o = np.lexsort((motif, tet))
    tet, motif = tet[o], motif[o]
    starts = np.flatnonzero(np.r_[True, tet[1:] != tet[:-1]])
    sizes = np.diff(np.r_[starts, len(tet)])
    pa, pb = [], []
    for gsize in np.unique(sizes[sizes > 1]):
        grp = starts[sizes == gsize]
        for i in range(gsize):
            for j in range(i + 1, gsize):
                pa.append(motif[grp + i])
                pb.append(motif[grp + j])
    m = len(sel)
    if pa:
        pkey = np.concatenate(pa) * m + np.concatenate(pb)
        uk, cnt = np.unique(pkey, return_counts=True)
        uk = uk[cnt == 2]
    else:
        uk = np.zeros(0, np.int64)
    graph = coo_matrix((np.ones(len(uk)), (uk // m, uk % m)), shape=(m, m))
    _, comp = connected_components(graph, directed=False)
    # Networks numbered by decreasing size (ties: first appearance).
    size = np.bincount(comp)
    rank = np.empty(len(size), np.int64)
    rank[np.lexsort((np.arange(len(size)), -size))] = np.arange(len(size))
    label[sel] = rank[comp]
    return label, np.sort(size)[::-1].astype(np.int64)


def atom_motif_counts(m: Motifs) -> dict[str, np.ndarray]:
    """Per-atom (N,) int64 counts: accepted tetrahedra holding the atom ('n_tetrahedra'), motifs
    of each kind holding it ('n_triplet', 'n_quadrilateral', 'n_pentagonal', 'n_hexagonal'),
    and the pentagonal-bipyramid network of the atom ('pb_network': label of the largest
    network the atom belongs to, −1 for none; 'pb_network_size': its size, 0 for none)."""
    n = m.n_atoms
    out = {"n_tetrahedra": np.bincount(m.tetrahedra.ravel(), minlength=n).astype(np.int64)}
    motif_of = np.repeat(np.arange(len(m.kind)), m.kind)
    atoms = m.tetrahedra[m.members]  # (sum kind, 4)
    pair = np.unique(np.repeat(motif_of, 4) * n + atoms.ravel())
    p_motif, p_atom = pair // n, pair % n
    for k, name in KIND_NAMES.items():
        out[f"n_{name}"] = np.bincount(p_atom[m.kind[p_motif] == k], minlength=n).astype(np.int64)
    net = np.full(n, -1, np.int64)
    net_size = np.zeros(n, np.int64)
    lab = m.pb_network[p_motif]
    sel = lab >= 0
    if sel.any():
        a, l_ = p_atom[sel], lab[sel]
        # Labels are ranked by decreasing size, so the smallest label is the largest network.
        o = np.lexsort((l_, a))
        a, l_ = a[o], l_[o]
        first = np.r_[True, a[1:] != a[:-1]]
        net[a[first]] = l_[first]
        net_size[a[first]] = m.network_size[l_[first]]
    out["pb_network"] = net
    out["pb_network_size"] = net_size
    return out


def motif_summary(m: Motifs, min_network: int = 5) -> dict[str, float]:
    """Per-sample numbers: counts of tetrahedra and of each motif kind, the fraction of
    tetrahedra in each kind (the authors' measure), the fraction of atoms in at least one
    tetrahedron, and the number and largest size of pentagonal-bipyramid networks with at
    least ``min_network`` bipyramids."""
    n_t = len(m.tetrahedra)
    in_tet = len(np.unique(m.tetrahedra))
    out: dict[str, float] = {"n_tetrahedra": n_t,
                             "tetrahedral_atom_fraction":
                                 in_tet / m.n_atoms if m.n_atoms else float("nan")}
    motif_of = np.repeat(np.arange(len(m.kind)), m.kind)
    for k, name in KIND_NAMES.items():
        out[f"n_{name}"] = int((m.kind == k).sum())
        tets = np.unique(m.members[m.kind[motif_of] == k])
        out[f"{name}_tetrahedron_fraction"] = float(len(tets) / n_t) if n_t else float("nan")
    big = m.network_size[m.network_size >= min_network]
    out["n_pb_networks"] = int(len(big))
    out["pb_network_max"] = int(m.network_size.max()) if len(m.network_size) else 0
    return out
