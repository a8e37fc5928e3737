"""Voronoi indices: the perfect-structure indices of the data README, cell volumes of perfect
lattices, agreement with scipy.spatial.Voronoi on random atoms, the authors' recompute against a
literal port of their MATLAB (per cell: scipy's Voronoi of the atom and its kept neighbours, as
their voronoin), and the Ta film against that port's stored result."""

import numpy as np
import pytest
from scipy.spatial import ConvexHull, Delaunay, Voronoi

from operators.structure.voronoi import index_histogram, voronoi_indices

from conftest import TA_MODEL, needs_shared_data
from test_stats3d_order import bcc, central, fcc, hcp, icosahedron

REFERENCE = __import__("pathlib").Path(__file__).parent / "data" / "ta_film_authors_port.npz"


@pytest.mark.parametrize("name,pos,index,volume", [
    ("fcc", fcc(3.92, n=3), [0, 12, 0, 0], 3.92 ** 3 / 4),
    ("hcp", hcp(2.77, n=3), [0, 12, 0, 0], 2.77 ** 3 / np.sqrt(2)),
    ("bcc", bcc(3.30, n=3), [0, 6, 0, 8], 3.30 ** 3 / 2),
    # the cell of the icosahedron's centre: a regular dodecahedron of inradius d/2 (d = 2.8 Å),
    # edge 2r / sqrt((25 + 11√5)/10), volume (15 + 7√5)/4 · edge³
    ("icosahedron", icosahedron(2.8), [0, 0, 12, 0],
     (15 + 7 * 5 ** 0.5) / 4 * (2.8 / np.sqrt((25 + 11 * 5 ** 0.5) / 10)) ** 3),
], ids=["fcc", "hcp", "bcc", "icosahedron"])
def test_perfect_structures_give_the_readme_indices(name, pos, index, volume):
    cells = voronoi_indices(pos)
    c = central(pos)
    assert cells.valid[c]
    assert cells.index[c].tolist() == index
    assert cells.volume[c] == pytest.approx(volume, rel=1e-9)
    if name != "icosahedron":
        # every bounded cell of the lattice block is the same polyhedron
        inner = np.linalg.norm(pos - pos[c], axis=1) < 5.0
        assert cells.valid[inner].all()
        assert (cells.index[inner] == index).all()
        np.testing.assert_allclose(cells.volume[inner], volume, rtol=1e-9)


def test_surface_cells_are_invalid():
    pos = fcc(3.92, n=2)
    cells = voronoi_indices(pos)
    hull_atoms = np.unique(ConvexHull(pos).simplices)
    assert not cells.valid[hull_atoms].any()
    assert (cells.index[~cells.valid] == -1).all() and np.isnan(cells.volume[~cells.valid]).all()
    assert (cells.index[cells.valid] == [0, 12, 0, 0]).all()


def test_vertex_distance_limit_rejects_cells_reaching_out():
    rng = np.random.default_rng(5)
    pos = rng.normal(size=(600, 3)) * 6.0  # a dense core and sparse outskirts
    cells = voronoi_indices(pos, recompute=False)
    limited = voronoi_indices(pos, max_vertex_distance=4.0, recompute=False)
    vor = Voronoi(pos)
    for i in np.flatnonzero(cells.valid):
        reach = np.linalg.norm(vor.vertices[vor.regions[vor.point_region[i]]] - pos[i], axis=1).max()
        assert limited.valid[i] == (reach <= 4.0)
    assert 0 < limited.valid.sum() < cells.valid.sum()


def reference_cells(pos, area_fraction):
    """Per atom: bounded?, total face area, ⟨n3..n6⟩ from scipy.spatial.Voronoi, each face's area
    taken from the 2D convex hull of its vertices (whatever order qhull lists them in)."""
    vor = Voronoi(pos)
    n = len(pos)
    bounded = np.ones(n, bool)
    faces = [[] for _ in range(n)]
    for (a, b), rv in zip(vor.ridge_points, vor.ridge_vertices):
        if -1 in rv:
            bounded[a] = bounded[b] = False
            continue
        verts = vor.vertices[rv]
        normal = pos[b] - pos[a]
        normal /= np.linalg.norm(normal)
        u = np.cross(normal, [1.0, 0, 0] if abs(normal[0]) < 0.9 else [0, 1.0, 0])
        u /= np.linalg.norm(u)
        w = np.cross(normal, u)
        area = ConvexHull(np.stack([verts @ u, verts @ w], axis=1)).volume  # 2D: volume = area
        for atom in (a, b):
            faces[atom].append((area, len(rv)))
    total = np.full(n, np.nan)
    index = np.full((n, 4), -1)
    for i in np.flatnonzero(bounded):
        t = sum(f[0] for f in faces[i])
        total[i] = t
        index[i] = 0
        for area, k in faces[i]:
            if area >= area_fraction * t and 3 <= k <= 6:
                index[i, k - 3] += 1
    return bounded, total, index


@pytest.mark.parametrize("area_fraction", [0.0, 0.01, 0.05])
def test_random_atoms_match_scipy_voronoi(area_fraction):
    rng = np.random.default_rng(7)
    pos = rng.random((400, 3)) * 20
    cells = voronoi_indices(pos, area_fraction=area_fraction, recompute=False)
    bounded, total, index = reference_cells(pos, area_fraction)
    np.testing.assert_array_equal(cells.valid, bounded)
    np.testing.assert_allclose(cells.area[bounded], total[bounded], rtol=1e-8)
    np.testing.assert_array_equal(cells.index, index)
    # the threshold matters on random atoms (so this test can tell thresholds apart)
    if area_fraction == 0.05:
        _, _, index0 = reference_cells(pos, 0.0)
        assert (index0[bounded] != index[bounded]).any()


def authors_cells(pos, area_fraction=0.01):
    """A literal port of the authors' Main_2 l.123-291: the full tessellation's cell of each
    atom; its faces under area_fraction of the cell's area; the atom and its Delaunay
    neighbours minus those faces' atoms tessellated again (scipy's Voronoi = qhull, as
    MATLAB's voronoin) and the faces of the atom's new cell counted by vertices (≤ 6 into
    the index). Returns (status (0 ok, 1 unbounded, 2 fewer than 5 points, 3 unbounded after),
    index (n, 4), faces (n,))."""
    vor = Voronoi(pos)
    indptr, nbrs = Delaunay(pos).vertex_neighbor_vertices
    n = len(pos)
    status = np.zeros(n, int)
    index = np.full((n, 4), -1)
    faces = np.full(n, -1)

    def cell_faces(v, i):
        out = []
        for (a, b), rv in zip(v.ridge_points, v.ridge_vertices):
            if i not in (a, b):
                continue
            if -1 in rv:
                return None
            other = b if a == i else a
            verts = v.vertices[rv]
            normal = v.points[other] - v.points[i]
            normal = normal / np.linalg.norm(normal)
            u = np.cross(normal, [1.0, 0, 0] if abs(normal[0]) < 0.9 else [0, 1.0, 0])
            u /= np.linalg.norm(u)
            w = np.cross(normal, u)
            hull = ConvexHull(np.stack([verts @ u, verts @ w], axis=1))
            out.append((other, hull.volume, len(hull.vertices)))   # 2D: volume = area
        return out

    for t in range(n):
        if -1 in vor.regions[vor.point_region[t]]:
            status[t] = 1
            continue
        f = cell_faces(vor, t)
        total = sum(a for _, a, _ in f)
        removed = {o for o, a, _ in f if a < area_fraction * total}
        keep = [t] + [j for j in nbrs[indptr[t]:indptr[t + 1]] if j not in removed]
        if len(keep) < 5:
            status[t] = 2
            continue
        f2 = cell_faces(Voronoi(pos[keep]), 0)
        if f2 is None:
            status[t] = 3
            continue
        index[t] = [sum(1 for *_, k in f2 if k == m) for m in (3, 4, 5, 6)]
        faces[t] = len(f2)
    return status, index, faces


def test_recomputed_cells_equal_the_authors_procedure():
    """Random atoms (every cell has small faces at 5 %): the indices and face counts equal the
    literal port's for every atom, and recomputing changes the index of many of them."""
    rng = np.random.default_rng(11)
    pos = rng.random((300, 3)) * 16
    status, index, faces = authors_cells(pos, 0.05)
    cells = voronoi_indices(pos, area_fraction=0.05)
    np.testing.assert_array_equal(cells.status, status)
    np.testing.assert_array_equal(cells.index, index)
    np.testing.assert_array_equal(cells.n_faces, faces)
    shortcut = voronoi_indices(pos, area_fraction=0.05, recompute=False)
    ok = cells.valid & shortcut.valid
    assert (cells.index[ok] != shortcut.index[ok]).any(axis=1).mean() > 0.3
    # select: only those atoms are indexed
    some = np.zeros(len(pos), bool)
    some[::3] = True
    sub = voronoi_indices(pos, area_fraction=0.05, select=some)
    np.testing.assert_array_equal(sub.index[some], cells.index[some])
    assert (sub.status[~some] == 5).all() and (sub.index[~some] == -1).all()


@needs_shared_data
def test_ta_film_indices_equal_the_authors_port():
    """The published Ta film, its amorphous atoms after the authors' cleaning: every atom's
    status (indexed, hull, too few neighbours, unbounded after the recompute) and index equal
    the port's (tests/reference/make_ta_reference.py): 6516 cells, the most frequent index
    <0,3,6,3> 395 times; the Voronoi coordination number (faces of the recomputed cell)
    averages 11.95."""
    from scipy.io import loadmat

    ref = np.load(REFERENCE)
    pos = loadmat(TA_MODEL)["model"].T.astype(np.float64)
    amorphous = ~ref["crystalline_clean"]
    cells = voronoi_indices(pos, select=amorphous)
    np.testing.assert_array_equal(np.where(amorphous, cells.status, -1), ref["voronoi_status"])
    np.testing.assert_array_equal(cells.index, ref["voronoi_index"])
    labels, fractions = index_histogram(cells, top=5)
    assert cells.valid.sum() == 6516 and labels[0] == "<0,3,6,3>"
    assert round(fractions[0] * 6516) == 395
    assert cells.n_faces[cells.valid].mean() == pytest.approx(11.95, abs=0.005)


def test_volumes_of_bounded_cells_fill_their_region():
    """Cells of a random cloud inside a box of mirrored copies tile the box exactly."""
    rng = np.random.default_rng(2)
    inner = rng.random((200, 3)) * 10
    shifts = np.stack(np.meshgrid(*[[-1, 0, 1]] * 3, indexing="ij"), -1).reshape(-1, 3) * 10.0
    pos = np.vstack([inner + s for s in shifts if not s.any()] +
                    [inner + s for s in shifts if s.any()])  # periodic images around the box
    cells = voronoi_indices(pos)
    assert cells.valid[:200].all()
    assert cells.volume[:200].sum() == pytest.approx(1000.0, rel=1e-9)


def test_index_histogram_and_labels():
    pos = fcc(3.92, n=2)
    cells = voronoi_indices(pos)
    labels, fractions = index_histogram(cells)
    assert labels == ["<0,12,0,0>"] and fractions.tolist() == [1.0]
    assert cells.label()[central(pos)] == "<0,12,0,0>"


def test_coplanar_atoms_raise():
    g = np.stack(np.meshgrid(np.arange(4), np.arange(4), [0]), -1).reshape(-1, 3) * 2.5
    with pytest.raises(ValueError, match="coplanar"):
        voronoi_indices(g.astype(float))


def test_bad_area_fraction_raises():
    with pytest.raises(ValueError, match="area_fraction"):
        voronoi_indices(fcc(), area_fraction=1.5)
