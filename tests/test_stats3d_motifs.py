"""Polytetrahedral motifs: bipyramids and triplets built by hand, the icosahedron, brute-force
checks of the tetrahedron filter and the pentagonal-bipyramid networks on the Ta film, and the
Ta film against the literal port of the authors' MATLAB (tests/reference, stored result)."""

import itertools

import numpy as np
import pytest
from scipy.spatial import Delaunay

from operators.structure.motifs import atom_motif_counts, find_motifs, motif_summary

from conftest import TA_MODEL, needs_shared_data
from reference.digests import motif_digest, set_digest
from test_stats3d_order import icosahedron

REFERENCE = __import__("pathlib").Path(__file__).parent / "data" / "ta_film_authors_port.npz"


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
    (7, 1.4, 7),    # pole edges 3.52 Å: δ ≈ 0.07
    (8, 1.4, 8),    # pole edges 3.92 Å: δ ≈ 0.10
], ids=["quadrilateral", "pentagonal", "hexagonal", "heptagonal", "octagonal"])
def test_single_bipyramid(n_ring, half_axis, kind):
    pos = bipyramid(n_ring, half_axis=half_axis)
    m = find_motifs(pos, bond_cutoff=4.0)
    assert len(m.tetrahedra) == n_ring
    assert all(set(t) >= {0, 1} for t in m.tetrahedra.tolist())  # all share the axis A-B
    assert m.kind.tolist() == [kind] and m.axis.tolist() == [[0, 1]]
    assert sorted(m.motif_atoms(0).tolist()) == list(range(n_ring + 2))
    counts = atom_motif_counts(m)
    name = {4: "n_quadrilateral", 5: "n_pentagonal", 6: "n_hexagonal", 7: "n_heptagonal",
            8: "n_octagonal"}[kind]
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


def test_open_run_of_four_is_two_triplets():
    """Five of six ring atoms: four tetrahedra in an open run around A-B. The authors' triplet
    is a walk t1-t2-t3 that ends at a tetrahedron with no other neighbour: both ends of the
    run give one, so two triplets (a maximal run of exactly three, the old definition here,
    gave none)."""
    pos = bipyramid(6, half_axis=1.4, n_present=5)
    m = find_motifs(pos, bond_cutoff=3.5)
    assert len(m.tetrahedra) == 4 and m.kind.tolist() == [3, 3]
    sets = [set(m.members[m.offsets[k]:m.offsets[k + 1]].tolist()) for k in range(2)]
    assert len(sets[0] & sets[1]) == 2 and len(sets[0] | sets[1]) == 4
    assert m.axis.tolist() == [[0, 1], [0, 1]]


def test_a_triplet_touching_a_short_cycle_is_dropped():
    """A pentagonal bipyramid with one more tetrahedron on an outer face: that tetrahedron is
    a leaf whose walks run into the bipyramid's 5-cycle, so no triplet is counted."""
    pos = bipyramid(5)
    # an atom above the outer face (A, ring0, ring1), at edge length from all three
    a, r0, r1 = pos[0], pos[2], pos[3]
    c = (a + r0 + r1) / 3
    nrm = np.cross(r0 - a, r1 - a)
    nrm /= np.linalg.norm(nrm)
    if nrm @ (c - pos.mean(axis=0)) < 0:
        nrm = -nrm
    pos = np.vstack([pos, c + nrm * 2.8 * np.sqrt(2 / 3)])
    m = find_motifs(pos, bond_cutoff=3.5)
    assert len(m.tetrahedra) == 6 and m.kind.tolist() == [5]


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
    # every bipyramid shares an edge (two tetrahedra) with the 5 of its neighbouring vertices
    # and nothing with the others; the centre is the axis end of all 12 (a filled
    # icosahedron), each vertex of one
    assert m.pb_edge_sharing.tolist() == [5] * 12 and m.pb_vertex_sharing.tolist() == [0] * 12
    assert m.icosahedral_filling[11] == 1 and m.icosahedral_filling[0] == 12
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
    # networks: union-find over the selected pentagonal bipyramids sharing two tetrahedra
    pb = np.flatnonzero((m.kind == 5) & m.selected)
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


@needs_shared_data
def test_ta_film_equals_the_authors_port():
    """The published Ta film with its amorphous atoms after the authors' cleaning: the accepted
    tetrahedra, the triplets and every k-fold bipyramid (k = 4..8) are the same sets as the
    literal port of the authors' findclustersN / uniqueCluster / smallestCluster / shareAB
    finds (tests/reference/make_ta_reference.py), with the same fractions of the amorphous
    tetrahedra; Main_4's selection, sharing, icosahedral filling and networks agree too."""
    from scipy.io import loadmat

    ref = np.load(REFERENCE)
    pos = loadmat(TA_MODEL)["model"].T.astype(np.float64)
    m = find_motifs(pos, bond_cutoff=4.12, delta_max=0.255, amorphous=~ref["crystalline_clean"])
    assert len(m.tetrahedra) == ref["n_tetrahedra"] == 19655
    assert set_digest(m.tetrahedra) == str(ref["tetrahedra_digest"])
    s = motif_summary(m)
    for k, name in ((3, "triplet"), (4, "quadrilateral"), (5, "pentagonal"), (6, "hexagonal"),
                    (7, "heptagonal"), (8, "octagonal")):
        rows = [m.members[m.offsets[q]:m.offsets[q + 1]] for q in np.flatnonzero(m.kind == k)]
        assert len(rows) == ref[f"n_{k}"], name
        assert motif_digest(m.tetrahedra, rows) == str(ref[f"digest_{k}"]), name
        assert s[f"{name}_tetrahedron_fraction"] == pytest.approx(float(ref[f"fraction_{k}"]), abs=1e-12)
    assert (s["n_triplet"], s["n_heptagonal"], s["n_octagonal"]) == (1336, 95, 5)
    assert s["n_amorphous_tetrahedra"] == ref["n_amorphous_tetrahedra"]
    assert s["tetrahedral_atom_fraction"] == pytest.approx(float(ref["tetrahedral_atom_fraction"]))
    for k in (4, 5, 6):
        assert s[f"n_selected_{k}fold"] == ref[f"n_selected_{k}"]
        sizes = getattr(m, f"network_size_{k}")
        np.testing.assert_array_equal(sizes[sizes >= 5], ref[f"networks_{k}_ge5"])
    np.testing.assert_array_equal(np.bincount(m.pb_vertex_sharing), ref["pb_vertex_sharing_hist"])
    np.testing.assert_array_equal(np.bincount(m.pb_edge_sharing), ref["pb_edge_sharing_hist"])
    fill = ref["icosahedral_filling_rows"][1:]
    np.testing.assert_array_equal(m.icosahedral_filling[:len(fill)], fill)
    assert s["pb_network_max"] == 135 and s["network_length_max_5fold"] == pytest.approx(28.73, abs=0.01)
    # the selection Main_4 evidently meant (at least half of the tetrahedra amorphous)
    half = motif_summary(find_motifs(pos, bond_cutoff=4.12, amorphous=~ref["crystalline_clean"],
                                     selection="half"))
    assert [half[f"n_selected_{k}fold"] for k in (4, 5, 6)] == \
        [int(ref[f"n_half_amorphous_{k}"]) for k in (4, 5, 6)]


def test_bad_parameters_raise():
    with pytest.raises(ValueError, match="bond_cutoff"):
        find_motifs(icosahedron(), bond_cutoff=0.0)
    with pytest.raises(ValueError, match="delta_max"):
        find_motifs(icosahedron(), bond_cutoff=3.5, delta_max=-1)
    with pytest.raises(ValueError, match="selection"):
        find_motifs(icosahedron(), bond_cutoff=3.5, selection="most")
    with pytest.raises(ValueError, match="amorphous"):
        find_motifs(icosahedron(), bond_cutoff=3.5, amorphous=[True])
