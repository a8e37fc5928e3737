"""Polytetrahedral packing as Yuan et al. (Nature Materials 21, 95 (2022)) compute it in their
published code (``Main_3_polytetrahedral_analysis``, ``Main_4_motifs_connection_and_network``
and ``src/findclustersN``, ``uniqueCluster``, ``smallestCluster``, ``shareAB``): distorted
tetrahedra, the motifs they build, their fractions and the networks of bipyramids.

Definitions, step for step
--------------------------
- **Tetrahedra**: the Delaunay tetrahedra of all atoms (``scipy.spatial.Delaunay``) whose
  incentre lies inside the α-shape of the atoms (α = ``alpha`` = 4 Å; for a Delaunay
  tetrahedron: its circumradius < α), whose longest edge is ≤ ``bond_cutoff`` (the first
  valley of g(r), 4.12 Å for Ta) and ≤ (1 + δ) × the mean of its six edges, δ = ``delta_max``
  (0.255). Two accepted tetrahedra are *face-sharing* when they have three atoms in common:
  the face graph.
- **k-fold bipyramids**, k = 4 … 8 (quadrilateral, pentagonal, hexagonal, heptagonal,
  octagonal): a cycle of k face-sharing tetrahedra without a shortcut (``smallestCluster``)
  whose tetrahedra all share exactly two atoms A–B (``shareAB``; the axis). Such a cycle is
  the whole star of the Delaunay edge A–B: an interior edge whose k tetrahedra are all
  accepted (two tetrahedra of one star share a face only as neighbours around A–B, so a
  star has no shortcut and no proper sub-cycle). That is how they are found here.
- **Triplets**: three face-sharing tetrahedra t1–t2–t3 where t3 has no other accepted
  face-neighbour (``findclustersN``: a walk that stops after three), kept once per set of
  three (``uniqueCluster``), and dropped when any of the three lies on a simple cycle of 4
  to 8 tetrahedra of the face graph (``uniqueCluster`` drops them before the shortcut and
  axis filters, so any such cycle counts, not only bipyramids). Two faces of t2 share an
  edge, so a triplet always shares one, but it need not be a whole run around it.
- **Fractions** (``Main_3`` l.118-130): the amorphous tetrahedra are those with at least
  three amorphous atoms (all tetrahedra when no atom is marked); the fraction of each kind is
  |tetrahedra in a motif of that kind ∩ amorphous tetrahedra| / |amorphous tetrahedra|; the
  tetrahedral-atom fraction is the fraction of the amorphous atoms in any accepted
  tetrahedron.
- **Selection for sharing and networks** (``Main_4`` l.14-35): their test
  ``if intersect(path(i,:), ICamor) >= length(path(i,:))/2`` is, in MATLAB, true when the
  intersection is not empty and every tetrahedron *index* in it is ≥ k/2, i.e. (but for the
  first two tetrahedra of their list) when the motif holds at least one amorphous
  tetrahedron: ``selection="published"`` (default). The evident intent, at least half of
  the motif's tetrahedra amorphous, is ``selection="half"``; ``"all"`` keeps every motif.
- **Sharing** (``Main_4`` l.41-63): two selected pentagonal bipyramids share a vertex when
  they have exactly one tetrahedron in common, an edge when exactly two (in the authors'
  drawing each bipyramid is a pentagon whose vertices are its tetrahedra).
- **Icosahedral filling** (``Main_4`` l.66-80): per atom, N = the number of selected
  pentagonal bipyramids with the atom on their axis (a 13-atom icosahedron is 12 of them
  around its centre); ``icosahedral_filling[N-1]`` counts the atoms with N, except N = 1,
  which counts the distinct bipyramids with such an axis atom (their ``unique``).
- **Networks** (``Main_4`` l.128-214), for the selected 4-, 5- and 6-fold motifs: connected
  components of edge-sharing motifs (exactly two tetrahedra in common); the length of a
  network is the largest distance between two atoms of its tetrahedra (Å). Networks of at
  least 5 motifs are the ones they plot.

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

KIND_NAMES = {3: "triplet", 4: "quadrilateral", 5: "pentagonal", 6: "hexagonal",
              7: "heptagonal", 8: "octagonal"}
SELECTIONS = ("published", "half", "all")
MIN_NETWORK = 5  # networks of at least this many motifs are the ones the authors measure and plot


@dataclass(frozen=True)
class Motifs:
    """Accepted tetrahedra and the motifs built from them (module docstring).

    tetrahedra : (T, 4) int64 atom indices of the accepted tetrahedra.
    distortion : (T,) float64 δ = l_max / l_mean − 1 of each.
    amorphous_tetrahedra : (T,) bool, at least three amorphous atoms.
    kind : (K,) int64 3 triplet, 4 … 8 k-fold bipyramid.
    axis : (K, 2) int64 atoms A < B of the shared edge (of a triplet: the edge its three
        tetrahedra share).
    offsets : (K+1,) int64; the tetrahedra (rows of ``tetrahedra``) of motif k are
        ``members[offsets[k]:offsets[k+1]]``; members : int64.
    selected : (K,) bool, the 4-, 5- and 6-fold motifs ``selection`` keeps for sharing and
        networks.
    network : (K,) int64 network label within the motif's kind (selected 4/5/6-fold motifs;
        labelled by decreasing size), −1 otherwise.
    network_size_4, network_size_5, network_size_6 : (n_networks,) int64 motifs per network,
        decreasing; network_length_4 … _6 : (n_networks,) float64 its length, Å (NaN for
        networks of fewer than ``MIN_NETWORK`` = 5 motifs, which the authors do not measure).
    pb_vertex_sharing, pb_edge_sharing : (S,) int64 per selected pentagonal bipyramid, the
        number of other selected ones sharing one / two tetrahedra with it.
    icosahedral_filling : (12,) int64, see the module docstring.
    n_atoms : int; amorphous : (N,) bool the amorphous atoms used; delta_max, bond_cutoff,
        alpha (Å, inf = no α-shape), selection : parameters.
    """

    tetrahedra: np.ndarray
    distortion: np.ndarray
    amorphous_tetrahedra: np.ndarray
    kind: np.ndarray
    axis: np.ndarray
    offsets: np.ndarray
    members: np.ndarray
    selected: np.ndarray
    network: np.ndarray
    network_size_4: np.ndarray
    network_size_5: np.ndarray
    network_size_6: np.ndarray
    network_length_4: np.ndarray
    network_length_5: np.ndarray
    network_length_6: np.ndarray
    pb_vertex_sharing: np.ndarray
    pb_edge_sharing: np.ndarray
    icosahedral_filling: np.ndarray
    n_atoms: int
    amorphous: np.ndarray
    delta_max: float
    bond_cutoff: float
    alpha: float
    selection: str

    @property
    def pb_network(self) -> np.ndarray:
        """(K,) network label of each selected pentagonal bipyramid, −1 for other motifs."""
        return np.where(self.kind == 5, self.network, -1)

    @property
    def network_size(self) -> np.ndarray:
        """Sizes of the pentagonal-bipyramid networks, decreasing."""
        return self.network_size_5

    def motif_atoms(self, k: int) -> np.ndarray:
        """Sorted atoms of motif ``k``."""
        return np.unique(self.tetrahedra[self.members[self.offsets[k]:self.offsets[k + 1]]])


def _circumradii(pos, simp):
    a = pos[simp[:, 0]]
    b, c, d = (pos[simp[:, k]] - a for k in (1, 2, 3))
    den = 2 * np.einsum("ij,ij->i", b, np.cross(c, d))
    num = (np.einsum("ij,ij->i", b, b)[:, None] * np.cross(c, d)
           + np.einsum("ij,ij->i", c, c)[:, None] * np.cross(d, b)
           + np.einsum("ij,ij->i", d, d)[:, None] * np.cross(b, c))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.linalg.norm(num / den[:, None], axis=1)


def _tetra_filter(pos, simplices, delta_max, bond_cutoff, alpha):
    ends = pos[simplices[:, TETRA_EDGES]]  # (T, 6, 2, 3)
    lengths = np.linalg.norm(ends[:, :, 1] - ends[:, :, 0], axis=2)
    lmax = lengths.max(axis=1)
    delta = lmax / lengths.mean(axis=1) - 1.0
    ok = (lmax <= lengths.mean(axis=1) * (1.0 + delta_max)) & (lmax <= bond_cutoff)
    if np.isfinite(alpha):
        ok &= _circumradii(pos, simplices) < alpha
    return ok, delta


def face_graph(tetrahedra) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i < j) of tetrahedra (rows of a (T, 4) array) with three atoms in common, and
    the face graph as CSR (ptr (T+1,), neighbours)."""
    T = np.sort(np.asarray(tetrahedra, np.int64), axis=1)
    n_t = len(T)
    if n_t == 0:
        return np.zeros((0, 2), np.int64), np.zeros(1, np.int64), np.zeros(0, np.int64)
    faces = np.concatenate([T[:, [0, 1, 2]], T[:, [0, 1, 3]], T[:, [0, 2, 3]], T[:, [1, 2, 3]]])
    owner = np.tile(np.arange(n_t), 4)
    n = int(T.max()) + 1
    key = (faces[:, 0] * n + faces[:, 1]) * n + faces[:, 2]
    o = np.argsort(key, kind="stable")
    k, w = key[o], owner[o]
    same = np.flatnonzero(k[1:] == k[:-1])
    pairs = np.sort(np.stack([w[same], w[same + 1]], axis=1), axis=1)
    both = np.concatenate([pairs, pairs[:, ::-1]])
    both = both[np.lexsort((both[:, 1], both[:, 0]))]
    ptr = np.zeros(n_t + 1, np.int64)
    np.cumsum(np.bincount(both[:, 0], minlength=n_t), out=ptr[1:])
    return pairs, ptr, both[:, 1].astype(np.int64)


@njit(**NJIT)
def _on_short_cycle(ptr, adj, nodes, kmin, kmax):
    """For each node: is it on a simple cycle of kmin … kmax nodes of the graph? (depth-first
    search of simple paths from the node, at most kmax long)."""
    out = np.zeros(len(nodes), np.bool_)
    path = np.empty(kmax, np.int64)
    it = np.empty(kmax, np.int64)
    for q in range(len(nodes)):
        s = nodes[q]
        path[0] = s
        it[0] = ptr[s]
        depth = 1
        found = False
        while depth > 0 and not found:
            v = path[depth - 1]
            if it[depth - 1] >= ptr[v + 1]:
                depth -= 1
                continue
            w = adj[it[depth - 1]]
            it[depth - 1] += 1
            if w == s:
                if depth >= kmin:
                    found = True
                continue
            if depth == kmax:
                continue
            seen = False
            for r in range(depth):
                if path[r] == w:
                    seen = True
                    break
            if seen:
                continue
            path[depth] = w
            it[depth] = ptr[w]
            depth += 1
        out[q] = found
    return out


def _triplets(ptr, adj):
    """The authors' triplets: sets {t1, t2, t3}, t2 the only face-neighbour of t3, t1 another
    face-neighbour of t2, none of them on a simple cycle of 4 … 8 tetrahedra. (M, 3) rows
    (t1, t2, t3), one per set, sorted."""
    deg = np.diff(ptr)
    leaves = np.flatnonzero(deg == 1)
    if len(leaves) == 0:
        return np.zeros((0, 3), np.int64)
    t2 = adj[ptr[leaves]]
    t1 = adj[_ranges(ptr[t2], deg[t2])]
    rows = np.stack([t1, np.repeat(t2, deg[t2]), np.repeat(leaves, deg[t2])], axis=1)
    rows = rows[rows[:, 0] != rows[:, 2]]
    if len(rows) == 0:
        return np.zeros((0, 3), np.int64)
    k = np.sort(rows, axis=1)
    m = np.int64(len(ptr))        # < 2²¹ tetrahedra: the packed key fits in 63 bits
    _, first = np.unique((k[:, 0] * m + k[:, 1]) * m + k[:, 2], return_index=True)
    rows = rows[np.sort(first)]
    check = np.unique(rows[:, :2])
    cyc = np.zeros(len(ptr) - 1, bool)
    cyc[check] = _on_short_cycle(ptr, adj, check, 4, 8)
    rows = rows[~cyc[rows].any(axis=1)]
    return rows[np.lexsort((rows[:, 2], rows[:, 1], rows[:, 0]))]


def _shared_edges(tets, rows):
    """(M, 2) the two atoms the three tetrahedra of each row (M, 3) share, ascending."""
    if len(rows) == 0:
        return np.zeros((0, 2), np.int64)
    a, b, c = tets[rows[:, 0]], tets[rows[:, 1]], tets[rows[:, 2]]
    common = (a[:, :, None] == b[:, None, :]).any(2) & (a[:, :, None] == c[:, None, :]).any(2)
    out = np.sort(np.where(common, a, np.iinfo(np.int64).max), axis=1)[:, :2]
    return out.astype(np.int64)


def find_motifs(positions, bond_cutoff: float, delta_max: float = 0.255, triangulation=None,
                amorphous=None, alpha: float | None = 4.0, selection: str = "published") -> Motifs:
    """Accepted tetrahedra, triplets, 4- to 8-fold bipyramids, their selection, sharing,
    icosahedral filling and networks, as the authors' code (module docstring).

    Parameters
    ----------
    positions : (N, 3) Å, N ≥ 5, not all in one plane.
    bond_cutoff : longest tetrahedron edge, Å (first valley of g(r); 4.12 Å for Ta).
    delta_max : largest distortion δ = l_max / l_mean − 1 (0.255, as Yuan et al.).
    triangulation : a ``scipy.spatial.Delaunay`` of these positions to reuse, or None.
    amorphous : (N,) bool, the amorphous atoms (after the crystalline cleaning,
        ``order3d``), or None: every atom.
    alpha : α-shape radius, Å (4 Å, as the authors), or None for no α-shape filter.
    selection : "published", "half" or "all": which 4/5/6-fold motifs enter sharing and
        networks (module docstring).

    Returns
    -------
    Motifs
    """
    pos = check_positions(positions, min_atoms=5)
    n = len(pos)
    if not (np.isfinite(bond_cutoff) and bond_cutoff > 0):
        raise ValueError(f"bond_cutoff must be a positive distance in Å, got {bond_cutoff}")
    if not (np.isfinite(delta_max) and delta_max >= 0):
        raise ValueError(f"delta_max must be a non-negative number, got {delta_max}")
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
    alpha = np.inf if alpha is None else float(alpha)
    if not alpha > 0:
        raise ValueError(f"alpha must be a positive radius in Å or None, got {alpha}")
    amor = np.ones(n, bool) if amorphous is None else np.asarray(amorphous, bool).reshape(-1)
    if amor.shape != (n,):
        raise ValueError(f"amorphous must be (N,) booleans for the {n} atoms")
    dt = triangulate(pos) if triangulation is None else triangulation
    if dt.points.shape != pos.shape:
        raise ValueError(f"triangulation has {len(dt.points)} points but positions {len(pos)}")
    simplices = np.ascontiguousarray(dt.simplices, dtype=np.int64)
    accepted, delta = _tetra_filter(pos, simplices, float(delta_max), float(bond_cutoff), alpha)
    tets = simplices[accepted]
    amor_tet = amor[tets].sum(axis=1) >= 3

    # k-fold bipyramids: closed interior stars of 4..8 accepted tetrahedra
    ed = delaunay_edges(dt)
    n_all = np.diff(ed.offsets)
    n_ok = np.add.reduceat(accepted[ed.tetrahedra].astype(np.int64), ed.offsets[:-1]) \
        if len(n_all) else n_all
    closed = ~ed.on_hull & (n_ok == n_all)
    is_motif = closed & (n_all >= 4) & (n_all <= 8)
    new_id = np.cumsum(accepted) - 1  # simplex -> row of the accepted table
    motif_edges = np.flatnonzero(is_motif)
    m_members = new_id[ed.tetrahedra[np.repeat(is_motif, n_all)]]

    # triplets
    _, ptr, adj = face_graph(tets)
    trip = _triplets(ptr, adj)
    trip_axis = _shared_edges(tets, trip)

    kind = np.concatenate([n_all[motif_edges], np.full(len(trip), 3)]).astype(np.int64)
    axis = np.concatenate([ed.atoms[motif_edges], trip_axis]).astype(np.int64)
    members = np.concatenate([m_members, trip.ravel()]).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(kind)]).astype(np.int64)
    # sorted by kind then axis, so the output does not depend on the search order
    srt = np.lexsort((axis[:, 1], axis[:, 0], kind))
    members = members[_ranges(offsets[srt], kind[srt])]
    kind, axis = kind[srt], axis[srt]
    offsets = np.concatenate([[0], np.cumsum(kind)]).astype(np.int64)

    motif_of = np.repeat(np.arange(len(kind)), kind)
    n_amor_in = np.bincount(motif_of, amor_tet[members].astype(np.int64), len(kind))
    selected = (kind >= 4) & (kind <= 6)
    if selection == "published":
        selected &= n_amor_in >= 1
    elif selection == "half":
        selected &= n_amor_in >= kind / 2.0
    network = np.full(len(kind), -1, np.int64)
    sizes, lengths = {}, {}
    for k in (4, 5, 6):
        sel = np.flatnonzero(selected & (kind == k))
        lab, sizes[k] = _networks(sel, kind, offsets, members)
        network[sel] = lab
        lengths[k] = np.array([_network_length(pos, tets, members, offsets, sel[lab == q])
                               if sizes[k][q] >= MIN_NETWORK else np.nan
                               for q in range(len(sizes[k]))], np.float64)
    pbs = np.flatnonzero(selected & (kind == 5))
    vertex_share, edge_share = _sharing(pbs, offsets, members)
    filling = _icosahedral_filling(axis[pbs], n)
    return Motifs(tets, delta[accepted], amor_tet, kind, axis, offsets, members, selected,
                  network, sizes[4], sizes[5], sizes[6], lengths[4], lengths[5], lengths[6],
                  vertex_share, edge_share, filling, n, amor, float(delta_max),
                  float(bond_cutoff), float(alpha), selection)


def _ranges(starts, sizes):
    """Concatenated aranges [starts[k], starts[k] + sizes[k])."""
    if len(sizes) == 0:
        return np.zeros(0, np.int64)
    base = np.repeat(starts - np.r_[0, np.cumsum(sizes)[:-1]], sizes)
    return base + np.arange(int(sizes.sum()))


def _common_counts(sel, offsets, members):
    """(pair keys i*m + j (i < j, positions in sel), number of tetrahedra in common) for the
    motifs ``sel`` that share at least one tetrahedron."""
    m = len(sel)
    if m == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    sizes = np.diff(offsets)[sel]
    motif = np.repeat(np.arange(m), sizes)
    tet = members[_ranges(offsets[sel], sizes)]
    o = np.lexsort((motif, tet))
    tet, motif = tet[o], motif[o]
    starts = np.flatnonzero(np.r_[True, tet[1:] != tet[:-1]])
    gsizes = np.diff(np.r_[starts, len(tet)])
    keys = []
    for gsize in np.unique(gsizes[gsizes > 1]):
        grp = starts[gsizes == gsize]
        for i in range(gsize):
            for j in range(i + 1, gsize):
                keys.append(motif[grp + i] * m + motif[grp + j])
    if not keys:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.unique(np.concatenate(keys), return_counts=True)


def _networks(sel, kind, offsets, members):
    """Components of the motifs ``sel`` sharing exactly two tetrahedra: labels (len(sel),)
    numbered by decreasing size (ties: first appearance), and the sizes."""
    m = len(sel)
    if m == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    uk, cnt = _common_counts(sel, offsets, members)
    uk = uk[cnt == 2]
    graph = coo_matrix((np.ones(len(uk)), (uk // m, uk % m)), shape=(m, m))
    _, comp = connected_components(graph, directed=False)
    size = np.bincount(comp)
    rank = np.empty(len(size), np.int64)
    rank[np.lexsort((np.arange(len(size)), -size))] = np.arange(len(size))
    return rank[comp], np.sort(size)[::-1].astype(np.int64)


def _network_length(pos, tets, members, offsets, motifs):
    """Largest distance between two atoms of the tetrahedra of ``motifs`` (Å)."""
    rows = np.concatenate([members[offsets[k]:offsets[k + 1]] for k in motifs])
    atoms = np.unique(tets[rows])
    p = pos[atoms]
    if len(p) > 64:  # the farthest pair is among the convex hull's vertices
        from scipy.spatial import ConvexHull, QhullError
        try:
            p = p[ConvexHull(p).vertices]
        except QhullError:  # flat sets: all points
            pass
    d = np.linalg.norm(p[:, None, :] - p[None, :, :], axis=2)
    return float(d.max())


def _sharing(pbs, offsets, members):
    """Per motif of ``pbs``: the number of others sharing exactly one / two tetrahedra."""
    m = len(pbs)
    vertex = np.zeros(m, np.int64)
    edge = np.zeros(m, np.int64)
    uk, cnt = _common_counts(pbs, offsets, members)
    for c, out in ((1, vertex), (2, edge)):
        k = uk[cnt == c]
        np.add.at(out, k // m, 1)
        np.add.at(out, k % m, 1)
    return vertex, edge


def _icosahedral_filling(axes, n_atoms):
    """(12,) atoms that are the axis end of N = 1 … 12 pentagonal bipyramids; for N = 1 the
    distinct bipyramids with such an end (``Main_4`` l.66-80)."""
    out = np.zeros(12, np.int64)
    if len(axes) == 0:
        return out
    n_per_atom = np.bincount(axes.ravel(), minlength=n_atoms)
    for N in range(2, 13):
        out[N - 1] = int((n_per_atom == N).sum())
    ones = np.flatnonzero(n_per_atom == 1)
    out[0] = int(np.isin(axes, ones).any(axis=1).sum())
    return out


def atom_motif_counts(m: Motifs) -> dict[str, np.ndarray]:
    """Per-atom (N,) int64 counts: accepted tetrahedra holding the atom ('n_tetrahedra'), motifs
    of each kind holding it ('n_triplet', 'n_quadrilateral', … 'n_octagonal'), and the
    pentagonal-bipyramid network of the atom ('pb_network': label of the largest network the
    atom belongs to, −1 for none; 'pb_network_size': its size, 0 for none)."""
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
        # labels are ranked by decreasing size, so the smallest label is the largest network
        o = np.lexsort((l_, a))
        a, l_ = a[o], l_[o]
        first = np.r_[True, a[1:] != a[:-1]]
        net[a[first]] = l_[first]
        net_size[a[first]] = m.network_size_5[l_[first]]
    out["pb_network"] = net
    out["pb_network_size"] = net_size
    return out


def motif_summary(m: Motifs, min_network: int = MIN_NETWORK) -> dict[str, float]:
    """Per-sample numbers (``Main_3`` l.118-130 and ``Main_4``): counts of tetrahedra
    (accepted, amorphous) and of each motif kind; per kind the fraction of the amorphous
    tetrahedra in such a motif (``{name}_tetrahedron_fraction``); the fraction of the
    amorphous atoms in an accepted tetrahedron; per 4/5/6-fold kind the selected motifs,
    the networks of at least ``min_network`` motifs, the largest one and the longest (Å)."""
    n_t = len(m.tetrahedra)
    amor_t = np.flatnonzero(m.amorphous_tetrahedra)
    n_amor = int(m.amorphous.sum())
    in_tet = np.zeros(m.n_atoms, bool)
    in_tet[m.tetrahedra.ravel()] = True
    out: dict[str, float] = {
        "n_tetrahedra": n_t, "n_amorphous_tetrahedra": int(len(amor_t)),
        "tetrahedral_atom_fraction": float((in_tet & m.amorphous).sum() / n_amor) if n_amor
        else float("nan")}
    motif_of = np.repeat(np.arange(len(m.kind)), m.kind)
    for k, name in KIND_NAMES.items():
        out[f"n_{name}"] = int((m.kind == k).sum())
        tets = np.unique(m.members[m.kind[motif_of] == k])
        out[f"{name}_tetrahedron_fraction"] = float(len(np.intersect1d(tets, amor_t)) / len(amor_t)) \
            if len(amor_t) else float("nan")
    for k in (4, 5, 6):
        sizes = getattr(m, f"network_size_{k}")
        lengths = getattr(m, f"network_length_{k}")
        big = sizes >= min_network
        out[f"n_selected_{k}fold"] = int((m.selected & (m.kind == k)).sum())
        out[f"n_networks_{k}fold"] = int(big.sum())
        out[f"network_max_{k}fold"] = int(sizes.max()) if len(sizes) else 0
        out[f"network_length_max_{k}fold"] = float(np.nanmax(lengths[big])) \
            if big.any() and np.isfinite(lengths[big]).any() else float("nan")
    out["n_pb_networks"] = out["n_networks_5fold"]
    out["pb_network_max"] = out["network_max_5fold"]
    return out
