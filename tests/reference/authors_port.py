"""Python re-implementation of the authors' 7_Data_analysis pipeline
(AET-AmorphousMaterials/Supplementary-Data-Codes, Yuan et al., Nat. Mater. 21, 95 (2022)).

Mirrors, step for step (line numbers: the MATLAB files of the repository above):
  clean_crystalline  Main_2_pdf_and_voronoi_amorphous_region_Ta_film.m  l.14-48
  qnbar              src/qnbar.m  (BOO, Main_1 l.74-91)
  voronoi_authors    Main_2 l.110-298  (voronoin + 1 % face removal + recompute + index)
  motifs_authors     Main_3 l.49-108 + src/findclustersN.m, uniqueCluster.m,
                     smallestCluster.m, shareAB.m; fractions Main_3 l.111-131
  main4_stats        Main_4 (amorphous selection, edge/vertex sharing, icosahedral
                     filling, networks)

0-based indices everywhere; -1 plays the role of MATLAB's 0 ("no next tetrahedron").
Only numpy / scipy. Written as an independent reference for stemstream's
operators/structure (a research engineer's port, read against the MATLAB line by line; the
line numbers refer to the repository's files at the commits named in the project's notes).
``make_ta_reference.py`` stores its results on the Ta film for the tests;
``python tests/reference/authors_port.py`` prints them (about 2 minutes).
"""
from __future__ import annotations

import json
import sys
import time
from collections import Counter

import numpy as np
import scipy.io as sio
from scipy.spatial import Delaunay, Voronoi, cKDTree

DATA = "/work/shared/data/aet-amorphous/"  # main() only; the functions take arrays


# --------------------------------------------------------------------------- data

def load_ta():
    d = sio.loadmat(DATA + "Ta_film_BOO_normalized.mat")
    model = d["model"].astype(np.float64).T          # (N,3) Å, as MATLAB double(model)
    order = d["order"].ravel().astype(np.float64)
    return model, order


# --------------------------------------------------------------------------- BOO (qnbar.m)

def _sph_harm(l, m, polar, az):
    import scipy.special as sp
    if hasattr(sp, "sph_harm_y"):
        return sp.sph_harm_y(l, m, polar, az)
    return sp.sph_harm(m, l, az, polar)


def qnbar(l, model, cutoff=4.12):
    """src/qnbar.m: q_lm over 0.1 < d < cutoff (l.6-19); Q̄_lm = mean of q_lm over ALL atoms
    with d < cutoff INCLUDING the atom itself (l.20-26, note `% & dis>0.1` commented out)."""
    n = len(model)
    tree = cKDTree(model)
    qlm = np.zeros((n, 2 * l + 1), complex)
    nb = tree.query_ball_point(model, cutoff)
    for i in range(n):
        idx = np.array(nb[i], int)
        d = np.linalg.norm(model[idx] - model[i], axis=1)
        sel = idx[(d < cutoff) & (d > 0.1)]
        if len(sel):
            v = model[sel] - model[i]
            r = np.linalg.norm(v, axis=1)
            polar = np.arccos(np.clip(v[:, 2] / r, -1, 1))
            az = np.arctan2(v[:, 1], v[:, 0])
            for k, m in enumerate(range(-l, l + 1)):
                qlm[i, k] = _sph_harm(l, m, polar, az).mean()
    q = np.zeros(n)
    for i in range(n):
        idx = np.array(nb[i], int)
        d = np.linalg.norm(model[idx] - model[i], axis=1)
        sel = idx[d < cutoff]
        q[i] = (np.abs(qlm[sel].sum(0) / len(sel)) ** 2).sum()
    return np.sqrt(q * 4 * np.pi / (2 * l + 1))


FCC_Q4, FCC_Q6 = 0.190941, 0.574524


def boo_order(model, cutoff=4.12):
    q4, q6 = qnbar(4, model, cutoff), qnbar(6, model, cutoff)
    return np.sqrt(q4 ** 2 + q6 ** 2) / np.sqrt(FCC_Q4 ** 2 + FCC_Q6 ** 2), q4, q6


# --------------------------------------------------------------------------- cleaning

def clean_crystalline(model, order, threshold=0.5, radius=8.0, n_min=13, n_back=1):
    """Main_2 l.14-48 (same in Main_3 l.15-48): returns (crystal, amorphous) index arrays in
    the authors' order.  crystal = order > 0.5; a crystalline atom with < 13 crystalline atoms
    (itself included) within <= 8 Å is a candidate; a candidate with > 1 remaining
    (non-candidate) crystalline atoms within <= 8 Å goes back to the crystal; the others join
    the amorphous atoms (appended at the end).  One pass, not iterated."""
    cry = order > threshold
    ind1 = np.flatnonzero(cry)
    ind2 = np.flatnonzero(~cry)
    P1 = model[ind1]
    d = np.sqrt(((P1[:, None, :] - P1[None, :, :]) ** 2).sum(-1))
    cnt = (d <= radius).sum(1)                      # includes the atom itself
    cand = cnt < n_min
    ind3 = ind1[cand]
    ind1 = ind1[~cand]
    if len(ind3) and len(ind1):
        d2 = np.sqrt(((model[ind3][:, None, :] - model[ind1][None, :, :]) ** 2).sum(-1))
        back = (d2 <= radius).sum(1) > n_back
    else:
        back = np.zeros(len(ind3), bool)
    ind1 = np.concatenate([ind1, ind3[back]])
    ind2 = np.concatenate([ind2, ind3[~back]])
    return ind1, ind2


# --------------------------------------------------------------------------- Voronoi

def _poly_area_and_order(V, normal):
    """Vertices V (k,3) of a planar convex polygon: angular order around the centroid in the
    plane with the given normal (Main_2 l.159-170) and the fan area (l.182-184)."""
    c = V.mean(0)
    p = V - c
    n = normal / np.linalg.norm(normal)
    u = p[0] / np.linalg.norm(p[0])
    w = np.cross(n, u)
    ang = np.arctan2(p @ w, p @ u)
    o = np.argsort(np.mod(ang, 2 * np.pi))
    V = V[o]
    vec = V[1:] - V[0]
    area = 0.5 * np.linalg.norm(np.cross(vec[:-1], vec[1:]), axis=1).sum()
    return V, area


def _cell_faces(vor, i):
    """Faces of point i's cell in a scipy Voronoi: list of (partner, vertex array ordered)."""
    out = []
    rp = vor.ridge_points
    sel = np.flatnonzero((rp[:, 0] == i) | (rp[:, 1] == i))
    for r in sel:
        a, b = rp[r]
        other = b if a == i else a
        vid = vor.ridge_vertices[r]
        if -1 in vid:
            return None
        V = vor.vertices[vid]
        V, area = _poly_area_and_order(V, vor.points[other] - vor.points[i])
        out.append((other, V, area))
    return out


def voronoi_authors(P, n_amor, area_cutoff=0.01, recompute=True, bond_cutoff=None,
                    dedup_tol=0.0):
    """Main_2 l.110-298.  P: (N,3) atoms ordered [amorphous; crystal]; cells of the first
    n_amor atoms are indexed.  Returns dict with per-atom index (N,6) [n1..n6] (-1 rows for
    skipped atoms), number of neighbours kept, number of faces (all / <=6 edges)."""
    N = len(P)
    vor = Voronoi(P)                                   # voronoin(model)       l.123
    tri = Delaunay(P)                                  # delaunayTriangulation l.125
    indptr, nbrs = tri.vertex_neighbor_vertices
    # ridge lookup per atom
    rp = vor.ridge_points
    order_r = np.argsort(np.concatenate([rp[:, 0], rp[:, 1]]), kind="stable")
    ridge_of = np.concatenate([np.arange(len(rp)), np.arange(len(rp))])[order_r]
    owner = np.concatenate([rp[:, 0], rp[:, 1]])[order_r]
    starts = np.searchsorted(owner, np.arange(N + 1))
    index = np.full((N, 6), -1, np.int64)
    n_keep = np.full(N, -1, np.int64)
    n_faces_all = np.full(N, -1, np.int64)
    n_removed = np.full(N, -1, np.int64)
    first_index = np.full((N, 6), -1, np.int64)      # index of the first cell, faces removed, no recompute
    status = np.zeros(N, np.int8)                     # 0 ok, 1 unbounded, 2 <5 nbrs, 3 unbounded after recompute
    for t in range(n_amor):
        reg = vor.regions[vor.point_region[t]]
        if -1 in reg or len(reg) == 0:                 # l.132: isinf -> skipped (hull atom)
            status[t] = 1
            continue
        faces = []
        for r in ridge_of[starts[t]:starts[t + 1]]:
            a, b = rp[r]
            other = b if a == t else a
            vid = vor.ridge_vertices[r]
            V, area = _poly_area_and_order(vor.vertices[vid], P[other] - P[t])
            faces.append((other, V, area))
        areas = np.array([f[2] for f in faces])
        small = areas < area_cutoff * areas.sum()     # l.193
        removed = {faces[k][0] for k in np.flatnonzero(small)}
        n_removed[t] = len(removed)
        # first-pass index (what "remove without recompute" gives), faces <= 6 vertices
        fi = np.zeros(6, np.int64)
        for (o, V, a), s in zip(faces, small):
            if not s and len(V) <= 6:
                fi[len(V) - 1] += 1
        first_index[t] = fi
        # Delaunay neighbours incl. itself (l.194-196), minus the removed faces' atoms (l.197-205)
        ind = np.concatenate([[t], nbrs[indptr[t]:indptr[t + 1]]])
        ind = np.array(sorted(set(ind.tolist()) - removed))
        if bond_cutoff is not None:                    # l.207, commented out by the authors
            dd = np.linalg.norm(P[ind] - P[t], axis=1)
            ind = ind[dd < bond_cutoff]
        n_keep[t] = len(ind) - 1
        if not recompute:
            index[t] = fi
            continue
        if len(ind) < 5:                               # l.212
            status[t] = 2
            continue
        sub = Voronoi(P[ind])                          # l.217
        ts = int(np.flatnonzero(ind == t)[0])
        reg = sub.regions[sub.point_region[ts]]
        if -1 in reg:                                  # l.219
            status[t] = 3
            continue
        f2 = _cell_faces(sub, ts)
        if f2 is None:
            status[t] = 3
            continue
        ix = np.zeros(6, np.int64)
        nf = 0
        for o, V, a in f2:
            if dedup_tol > 0:                          # optional: merge coincident vertices
                keep = [0]
                for k in range(1, len(V)):
                    if np.linalg.norm(V[k] - V[keep[-1]]) > dedup_tol:
                        keep.append(k)
                if len(keep) > 1 and np.linalg.norm(V[keep[-1]] - V[keep[0]]) <= dedup_tol:
                    keep.pop()
                V = V[keep]
            nf += 1
            n = len(V)                                 # l.288: every edge >= 0 -> n = #vertices
            if n <= 6:                                 # l.289
                ix[n - 1] += 1
        index[t] = ix
        n_faces_all[t] = nf
    return dict(index=index, first_index=first_index, n_keep=n_keep, n_faces_all=n_faces_all,
                n_removed=n_removed, status=status)


def index_table(index_rows, top=20):
    c = Counter(map(tuple, index_rows[:, 2:].tolist()))
    tot = sum(c.values())
    return [(f"<{a},{b},{cc},{d}>", n, n / tot) for (a, b, cc, d), n in c.most_common(top)], tot


# --------------------------------------------------------------------------- motifs

def circumradius(P, simp):
    a = P[simp[:, 0]]
    b, c, d = (P[simp[:, k]] - a for k in (1, 2, 3))
    den = 2 * np.einsum("ij,ij->i", b, np.cross(c, d))
    num = (np.einsum("ij,ij->i", b, b)[:, None] * np.cross(c, d)
           + np.einsum("ij,ij->i", c, c)[:, None] * np.cross(d, b)
           + np.einsum("ij,ij->i", d, d)[:, None] * np.cross(b, c))
    with np.errstate(divide="ignore", invalid="ignore"):
        cen = num / den[:, None]
    return np.linalg.norm(cen, axis=1)


def accepted_tetrahedra(P, delta, alpha=4.0, bond=4.12, use_alpha=True):
    """Main_3 l.51-76: Delaunay; keep tetrahedra whose incentre is inside the alpha shape of
    radius 4 Å (for a Delaunay tetrahedron == its circumradius < alpha); then reject
    max(edge) > mean(edge)*(1+delta) or max(edge) > 4.12."""
    tri = Delaunay(P)
    simp = np.sort(tri.simplices.astype(np.int64), axis=1)
    if use_alpha:
        simp = simp[circumradius(P, simp) < alpha]
    E = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    L = np.stack([np.linalg.norm(P[simp[:, i]] - P[simp[:, j]], axis=1) for i, j in E], 1)
    bad = (L.max(1) > L.mean(1) * (delta + 1)) | (L.max(1) > bond)
    return simp[~bad]


def face_pairs(T):
    """Main_3 l.78-98: pairs (i<j) of tetrahedra sharing 3 vertices."""
    faces = np.concatenate([T[:, [0, 1, 2]], T[:, [0, 1, 3]], T[:, [0, 2, 3]], T[:, [1, 2, 3]]])
    owner = np.tile(np.arange(len(T)), 4)
    n = T.max() + 1
    key = (faces[:, 0] * n + faces[:, 1]) * n + faces[:, 2]
    o = np.argsort(key, kind="stable")
    k, w = key[o], owner[o]
    same = np.flatnonzero(k[1:] == k[:-1])
    pr = np.sort(np.stack([w[same], w[same + 1]], 1), axis=1)
    return pr[np.lexsort((pr[:, 1], pr[:, 0]))]


def _sorted_unique_rows(A):
    if len(A) == 0:
        return A
    S = np.sort(A, axis=1)
    _, idx = np.unique(S, axis=0, return_index=True)
    return A[np.sort(idx)]


def findclustersN(n_tet, pairs):
    """src/findclustersN.m with 0-based ids and -1 for MATLAB's 0."""
    adj = [[] for _ in range(n_tet)]
    for a, b in pairs:
        adj[a].append(b)
        adj[b].append(a)
    adj = [sorted(x) for x in adj]
    out = {k: [] for k in range(3, 9)}
    for node1 in range(n_tet):
        chain = [[node1]]
        for i in range(1, 5):                      # MATLAB i = 2..5
            nxt = []
            for row in chain:
                j = row[i - 1]
                temp = [x for x in adj[j]] if j >= 0 else []
                if i > 1:
                    temp = [x for x in temp if x != row[i - 2]]
                if not temp:
                    temp = [-1]
                for x in temp:
                    nxt.append(row + [x])
            chain = nxt
        C = np.array(chain, np.int64)              # (rows, 5)
        # path3: col3 != 0 & col4 == 0   (findclustersN l.46-47)
        sel = (C[:, 2] >= 0) & (C[:, 3] < 0)
        if sel.any():
            out[3].append(C[sel, :3])
        # path4 (l.51-74): values of col3 occurring > 1 times
        vals, cnt = np.unique(C[:, 2], return_counts=True)
        for c in vals[(cnt > 1) & (vals >= 0)]:
            p1 = _sorted_unique_rows(C[C[:, 2] == c, :3])
            for a in range(len(p1) - 1):
                for b in range(a + 1, len(p1)):
                    out[4].append(np.array([[*p1[a], p1[b, 1]]]))
        # path5 (l.77-99): c in col3 ∩ col4
        for c in np.intersect1d(C[:, 2], C[:, 3]):
            if c < 0:
                continue
            p1 = _sorted_unique_rows(C[C[:, 3] == c, :4])
            p2 = np.unique(C[C[:, 2] == c, 1])
            for v in p2:
                out[5].append(np.column_stack([p1, np.full(len(p1), v)]))
        # path6 (l.102-124): col4 values occurring > 1 times, pairs
        vals, cnt = np.unique(C[:, 3], return_counts=True)
        for c in vals[(cnt > 1) & (vals >= 0)]:
            p1 = _sorted_unique_rows(C[C[:, 3] == c, :4])
            for a in range(len(p1) - 1):
                for b in range(a + 1, len(p1)):
                    out[6].append(np.array([[*p1[a], p1[b, 2], p1[b, 1]]]))
        # path7 (l.127-150): c in col4 ∩ col5
        for c in np.intersect1d(C[:, 3], C[:, 4]):
            if c < 0:
                continue
            p1 = _sorted_unique_rows(C[C[:, 4] == c, :5])
            p2 = _sorted_unique_rows(C[C[:, 3] == c, 1:3])
            for v in p2:
                out[7].append(np.column_stack([p1, np.full(len(p1), v[1]),
                                               np.full(len(p1), v[0])]))
        # path8 (l.153-175): col5 values occurring > 1 times, pairs
        vals, cnt = np.unique(C[:, 4], return_counts=True)
        for c in vals[(cnt > 1) & (vals >= 0)]:
            p1 = _sorted_unique_rows(C[C[:, 4] == c, :5])
            for a in range(len(p1) - 1):
                for b in range(a + 1, len(p1)):
                    out[8].append(np.array([[*p1[a], p1[b, 3], p1[b, 2], p1[b, 1]]]))
    return {k: (np.concatenate(v) if v else np.zeros((0, k), np.int64)) for k, v in out.items()}


def uniqueCluster(paths):
    """src/uniqueCluster.m: drop rows with 0 (-1 here) or a repeated tetrahedron; keep one row
    per set of tetrahedra; drop triplets sharing a tetrahedron with any 4..8 candidate."""
    out = {}
    for k, A in paths.items():
        if len(A):
            A = A[(A >= 0).all(1)]
            S = np.sort(A, 1)
            A = A[(np.diff(S, axis=1) != 0).all(1)]
            A = _sorted_unique_rows(A)
        out[k] = A
    p3 = out[3]
    for k in range(4, 9):
        if len(p3) and len(out[k]):
            common = np.intersect1d(p3.ravel(), out[k].ravel())
            p3 = p3[~np.isin(p3, common).any(1)]
    out[3] = p3
    return out


def smallestCluster(paths, pairs):
    """src/smallestCluster.m: drop 4..8-cycles with a chord (a face-sharing pair between
    non-consecutive members).  Quirk: the hexagon block sits inside `if ~isempty(path5)`."""
    key = set(map(tuple, np.sort(pairs, 1).tolist()))

    def has_chord(row, dists):
        k = len(row)
        for d in dists:
            for s in range(k):
                a, b = row[s], row[(s + d) % k]
                if (min(a, b), max(a, b)) in key:
                    return True
        return False
    spec = {4: [2], 5: [2], 6: [3, 2], 7: [3, 2], 8: [3, 2, 4]}
    out = dict(paths)
    for k, dists in spec.items():
        if k == 6 and len(paths[5]) == 0:
            continue
        A = paths[k]
        if len(A):
            out[k] = A[[not has_chord(r, dists) for r in A.tolist()]]
    return out


def shareAB(paths, T):
    """src/shareAB.m: all tetrahedra of a 4..8 motif must share exactly 2 atoms (the axis AB).
    Triplets are not checked (they share an edge automatically)."""
    out = dict(paths)
    for k in range(4, 9):
        A = paths[k]
        if len(A):
            keep = []
            for r in A:
                s = set(T[r[0]].tolist())
                for q in r[1:]:
                    s &= set(T[q].tolist())
                keep.append(len(s) == 2)
            out[k] = A[np.array(keep, bool)]
    return out


def motifs_authors(P, n_amor, delta=0.255, use_alpha=True):
    T = accepted_tetrahedra(P, delta, use_alpha=use_alpha)
    pairs = face_pairs(T)
    raw = findclustersN(len(T), pairs)
    u = uniqueCluster(raw)
    s = smallestCluster(u, pairs)
    f = shareAB(s, T)
    # Main_3 l.118-130 fractions
    ic_amor = np.flatnonzero((T < n_amor).sum(1) > 2)
    res = {"tetrahedral_atom_fraction": len(np.intersect1d(np.unique(T), np.arange(n_amor))) / n_amor}
    for k in range(3, 9):
        res[f"frac_tet_in_{k}"] = len(np.intersect1d(f[k].ravel(), ic_amor)) / len(ic_amor)
        res[f"n_{k}"] = len(f[k])
    res["n_tetrahedra"] = len(T)
    res["n_amorphous_tetrahedra"] = len(ic_amor)
    res["n_face_pairs"] = len(pairs)
    return T, pairs, f, res, ic_amor


def main4_stats(T, f, ic_amor):
    """Main_4: amorphous selection (buggy `if intersect(...) >= len/2`: true when the
    intersection is non-empty and all its (1-based) tetrahedron ids >= len/2), vertex/edge
    sharing of PBs, icosahedral filling, networks of edge-sharing (|common tets| == 2)."""
    out = {}
    sel = {}
    for k in (4, 5, 6):
        A = f[k]
        keep = []
        for r in A:
            common = np.intersect1d(r, ic_amor) + 1          # MATLAB 1-based ids
            keep.append(len(common) > 0 and bool((common >= len(r) / 2).all()))
        sel[k] = A[np.array(keep, bool)] if len(A) else A
        out[f"n_{k}_amorphous_sel"] = len(sel[k])
        # "intended" rule: at least half of the tetrahedra amorphous
        out[f"n_{k}_half_amorphous"] = int(sum(np.isin(r, ic_amor).sum() >= len(r) / 2 for r in A))
    p5 = sel[5]
    # vertex / edge sharing
    cor, edg = Counter(), Counter()
    sets = [set(r.tolist()) for r in p5]
    tet_to = {}
    for i, r in enumerate(p5):
        for t in r:
            tet_to.setdefault(int(t), []).append(i)
    for i, s in enumerate(sets):
        others = set()
        for t in s:
            others.update(tet_to[t])
        others.discard(i)
        nc = sum(1 for j in others if len(s & sets[j]) == 1)
        ne = sum(1 for j in others if len(s & sets[j]) == 2)
        cor[nc] += 1
        edg[ne] += 1
    out["pb_vertex_sharing_hist"] = dict(sorted(cor.items()))
    out["pb_edge_sharing_hist"] = dict(sorted(edg.items()))
    # icosahedral filling: AB atoms of each PB
    AB = []
    for r in p5:
        s = set(T[r[0]].tolist())
        for q in r[1:]:
            s &= set(T[q].tolist())
        AB.append(sorted(s))
    AB = np.array(AB)
    fill = Counter()
    if len(AB):
        cnt = Counter(AB.ravel().tolist())
        for atom, N in cnt.items():
            fill[N] += 1                              # icosfil{N}: one row (of N PB ids) per atom
        # icosfil{1}=unique(...) : isolated PBs counted once
        ones = set()
        for atom, N in cnt.items():
            if N == 1:
                ones.update(np.flatnonzero((AB == atom).any(1)).tolist())
        fill[1] = len(ones)
    out["icosahedral_filling_rows"] = dict(sorted(fill.items()))
    out["n_atoms_axis_of_12_pb"] = int(sum(1 for v in Counter(AB.ravel().tolist()).values() if v >= 12)) if len(AB) else 0
    # networks
    for k in (4, 5, 6):
        A = sel[k]
        sets = [set(r.tolist()) for r in A]
        tet_to = {}
        for i, r in enumerate(A):
            for t in r:
                tet_to.setdefault(int(t), []).append(i)
        parent = list(range(len(A)))

        def find(x):
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x
        for i, s in enumerate(sets):
            for t in s:
                for j in tet_to[t]:
                    if j > i and len(s & sets[j]) == 2:
                        ri, rj = find(i), find(j)
                        if ri != rj:
                            parent[rj] = ri
        sizes = Counter(find(i) for i in range(len(A)))
        sz = sorted(sizes.values(), reverse=True)
        out[f"networks_{k}_sizes_ge5"] = [s for s in sz if s >= 5]
        out[f"networks_{k}_n_ge5"] = sum(1 for s in sz if s >= 5)
        out[f"networks_{k}_max"] = sz[0] if sz else 0
    return out


# --------------------------------------------------------------------------- main

def main():
    t0 = time.time()
    model, order = load_ta()
    N = len(model)
    report = {"n_atoms": N, "n_order_gt_0.5": int((order > 0.5).sum())}
    ind1, ind2 = clean_crystalline(model, order)
    report["n_crystal_after_cleaning"] = len(ind1)
    report["n_amorphous_after_cleaning"] = len(ind2)
    report["crystal_fraction_raw"] = float((order > 0.5).mean())
    report["crystal_fraction_after_cleaning"] = len(ind1) / N
    P = np.vstack([model[ind2], model[ind1]])        # Main_2 l.113: [amorphous, crystal]
    n_amor = len(ind2)
    print(json.dumps(report), flush=True)

    # cutoff coordination numbers
    tree = cKDTree(model)
    cnt = np.array([len(x) - 1 for x in tree.query_ball_point(model, 4.12)])
    report["cn_cutoff_4.12_all_atoms_mean"] = float(cnt.mean())
    report["cn_cutoff_4.12_amorphous_mean"] = float(cnt[ind2].mean())

    if "--no-voronoi" not in sys.argv:
        vr = voronoi_authors(P, n_amor)
        ok = vr["status"][:n_amor] == 0
        idx = vr["index"][:n_amor][ok]
        table, tot = index_table(idx)
        report["voronoi_n_cells"] = int(tot)
        report["voronoi_status_counts"] = {int(k): int(v) for k, v in
                                           zip(*np.unique(vr["status"][:n_amor], return_counts=True))}
        report["voronoi_top20"] = table
        fc = idx[:, 2:].sum(1)
        report["voronoi_mean_faces_le6"] = float(fc.mean())
        report["voronoi_mean_faces_all"] = float(vr["n_faces_all"][:n_amor][ok].mean())
        report["voronoi_mean_neighbours_kept"] = float(vr["n_keep"][:n_amor][ok].mean())
        report["voronoi_face_fractions_n3_n6"] = (idx[:, 2:].sum(0) / idx[:, 2:].sum()).tolist()
        ico = (idx[:, 2:] == [0, 0, 12, 0]).all(1)
        report["voronoi_icosahedral_fraction"] = float(ico.mean())
        # the same atoms without the recompute
        fi = vr["first_index"][:n_amor][ok]
        same = (fi == idx).all(1)
        report["no_recompute_same_index_fraction"] = float(same.mean())
        t2, _ = index_table(fi)
        report["no_recompute_top10"] = t2[:10]
        print(json.dumps({k: report[k] for k in report if k.startswith("voronoi") or
                          k.startswith("no_recompute")}), flush=True)

    if "--no-motifs" not in sys.argv:
        T, pairs, f, res, ic_amor = motifs_authors(P, n_amor, 0.255)
        report["motifs_delta_0.255"] = res
        report["main4"] = main4_stats(T, f, ic_amor)
        print(json.dumps(report["motifs_delta_0.255"]), flush=True)
    report["seconds"] = time.time() - t0
    print(json.dumps(report, default=str, indent=1))


if __name__ == "__main__":
    main()
