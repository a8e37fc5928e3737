"""Polytetrahedral motifs: bipyramids and triplets built by hand, the icosahedron, and brute-force
checks of the tetrahedron filter and the pentagonal-bipyramid networks on the Ta film."""

import itertools

import numpy as np
import pytest
from scipy.spatial import Delaunay

from operators.structure.motifs import atom_motif_counts, find_motifs, motif_summary

from conftest import TA_MODEL, needs_shared_data
from test_stats3d_order import icosahedron


def bipyramid(n_ring, ring_edge=2.8, half_axis=None, n_present=None):
    """Poles A (0) and B (1) on the z axis, then ``n_present`` of ``n_ring`` atoms of a regular
    ring with edge ``ring_edge``; ``half_axis`` defaults to poles at one ring edge from the ring."""
    radius = ring_edge / (2 * np.sin(np.pi / n_ring))
    h = np.sqrt(ring_edge ** 2 - radius ** 2) if half_axis is None else half_axis
    t = np.arange(n_ring if n_present is None else n_present) * 2 * np.pi / n_ring
    ring = np.stack([radius * np.cos(t), radius * np.sin(t), 0 * t], axis=1)
    return np.vstack([[0, 0, h], [0, 0, -h], ring])


def distortion(pos, tet):
    e = [np.linalg.norm(pos[a] - pos[b]) for a, b in itertools.combinations(tet, 2)]
    return max(e) / np.mean(e) - 1, max(e)


@pytest.mark.parametrize("n_ring,half_axis,kind", [
    (4, 1.4, 4),    # ring edge 2.8: pole edges 2.42 Å, axis 2.8 Å, δ ≈ 0.10
    (5, None, 5),   # all edges 2.8 Å but the axis, 2.94 Å: δ ≈ 0.02
    (6, 1.4, 6),    # pole edges 3.13 Å, axis 2.8 Å: δ ≈ 0.04
], ids=["quadrilateral", "pentagonal", "hexagonal"])
def test_single_bipyramid(n_ring, half_axis, kind):
    pos = bipyramid(n_ring, half_axis=half_axis)
    m = find_motifs(pos, bond_cutoff=3.5)
    assert len(m.tetrahedra) == n_ring
    assert all(set(t) >= {0, 1} for t in m.tetrahedra.tolist())  # all share the axis A-B
    assert m.kind.tolist() == [kind] and m.axis.tolist() == [[0, 1]]
    assert sorted(m.motif_atoms(0).tolist()) == list(range(n_ring + 2))
    counts = atom_motif_counts(m)
    name = {4: "n_quadrilateral", 5: "n_pentagonal", 6: "n_hexagonal"}[kind]
    assert counts[name].tolist() == [1] * (n_ring + 2)
    assert counts["n_tetrahedra"].tolist() == [n_ring, n_ring] + [2] * n_ring


def test_distortion_limit_rejects_a_flattened_bipyramid():
    """Poles pushed towards the ring until δ exceeds 0.255: nothing is accepted."""
    pos = bipyramid(5, half_axis=0.35)  # axis 0.7 Å, ring 2.8 Å, pole edges 2.41 Å: δ ≈ 0.28
    tets = Delaunay(pos).simplices
    deltas = [distortion(pos, t)[0] for t in tets]
    assert min(deltas) > 0.255
    m = find_motifs(pos, bond_cutoff=3.5)
    assert len(m.tetrahedra) == 0 and len(m.kind) == 0
    # with a looser limit the same atoms form the pentagonal bipyramid
    assert find_motifs(pos, bond_cutoff=3.5, delta_max=max(deltas) + 0.01).kind.tolist() == [5]


def test_bond_cutoff_rejects_long_edges():
    pos = bipyramid(5)
    assert find_motifs(pos, bond_cutoff=2.9).kind.tolist() == []  # the axis is 2.94 Å
    assert find_motifs(pos, bond_cutoff=3.0).kind.tolist() == [5]


def test_broken_pentagon_is_a_triplet():
    """Four of the five ring atoms: three tetrahedra around A-B, the fourth (across the gap)
    far too distorted: one open run of three, i.e. a triplet."""
    pos = bipyramid(5, n_present=4)
    m = find_motifs(pos, bond_cutoff=3.5)
    assert len(m.tetrahedra) == 3
    assert m.kind.tolist() == [3] and m.axis.tolist() == [[0, 1]]
    assert motif_summary(m)["triplet_tetrahedron_fraction"] == 1.0


def test_icosahedron_is_twelve_pentagonal_bipyramids_in_one_network():
    pos = icosahedron(2.8)
    m = find_motifs(pos, bond_cutoff=3.5)
    assert len(m.tetrahedra) == 20
    assert m.kind.tolist() == [5] * 12
    assert sorted(map(tuple, m.axis.tolist())) == [(0, k) for k in range(1, 13)]
    assert m.network_size.tolist() == [12] and (m.pb_network == 0).all()
    # 30 pairs of bipyramids share two tetrahedra: one per edge of the icosahedron
    sets = [set(m.members[m.offsets[k]:m.offsets[k + 1]]) for k in range(12)]
    assert sum(len(a & b) == 2 for a, b in itertools.combinations(sets, 2)) == 30
    s = motif_summary(m)
    assert s["n_pentagonal"] == 12 and s["n_triplet"] == 0 and s["pb_network_max"] == 12
    assert s["n_pb_networks"] == 1 and s["pentagonal_tetrahedron_fraction"] == 1.0
    c = atom_motif_counts(m)
    assert c["n_pentagonal"].tolist() == [12] + [6] * 12  # a vertex: its own + 5 neighbours'
    assert (c["pb_network_size"] == 12).all()


def test_two_distant_icosahedra_are_two_networks():
    pos = np.vstack([icosahedron(2.8), icosahedron(2.8) + [20.0, 0, 0]])
    m = find_motifs(pos, bond_cutoff=3.5)
    assert m.network_size.tolist() == [12, 12]
    c = atom_motif_counts(m)
    assert set(c["pb_network"][:13]) != set(c["pb_network"][13:])


@needs_shared_data
def test_ta_film_against_brute_force():
    from scipy.io import loadmat

    pos = loadmat(TA_MODEL)["model"].T.astype(np.float64)
    m = find_motifs(pos, bond_cutoff=4.12, delta_max=0.255)
    # the accepted tetrahedra are exactly the Delaunay tetrahedra passing both criteria
    tri = Delaunay(pos).simplices
    lengths = np.array([[np.linalg.norm(pos[t[a]] - pos[t[b]]) for a, b in
                         itertools.combinations(range(4), 2)] for t in tri[:3000]])
    ok = (lengths.max(1) / lengths.mean(1) - 1 <= 0.255) & (lengths.max(1) <= 4.12)
    got = {tuple(sorted(t)) for t in m.tetrahedra.tolist()}
    for t, good in zip(tri[:3000], ok):
        assert (tuple(sorted(t)) in got) == good
    assert len(got) == sum(1 for t in tri if tuple(sorted(t)) in got)
    # every motif: its tetrahedra all hold its axis, and a bipyramid has n + 2 atoms
    for k in range(len(m.kind)):
        tets = m.tetrahedra[m.members[m.offsets[k]:m.offsets[k + 1]]]
        assert all({*m.axis[k]} <= set(t) for t in tets.tolist())
        if m.kind[k] >= 4:
            assert len(np.unique(tets)) == m.kind[k] + 2
    # networks: union-find over pentagonal bipyramids sharing exactly two tetrahedra
    pb = np.flatnonzero(m.kind == 5)
    sets = [set(m.members[m.offsets[k]:m.offsets[k + 1]].tolist()) for k in pb]
    by_tet = {}
    for i, s in enumerate(sets):
        for t in s:
            by_tet.setdefault(t, []).append(i)
    parent = list(range(len(pb)))

    def root(i):
        while parent[i] != i:
            i = parent[i]
        return i
    for members in by_tet.values():
        for a, b in itertools.combinations(members, 2):
            if len(sets[a] & sets[b]) == 2:
                parent[root(a)] = root(b)
    roots = [root(i) for i in range(len(pb))]
    sizes = sorted(np.unique(roots, return_counts=True)[1].tolist(), reverse=True)
    assert m.network_size.tolist() == sizes
    # same partition (labels may differ)
    lab = m.pb_network[pb]
    for r in set(roots):
        assert len(set(lab[np.array(roots) == r])) == 1


def test_bad_parameters_raise():
    with pytest.raises(ValueError, match="bond_cutoff"):
        find_motifs(icosahedron(), bond_cutoff=0.0)
    with pytest.raises(ValueError, match="delta_max"):
        find_motifs(icosahedron(), bond_cutoff=3.5, delta_max=-1)
