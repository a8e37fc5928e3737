"""Specimens: crystallography of the built-in models, rotation, and the file readers."""

import numpy as np
import pytest
import scipy.io
from scipy.spatial import cKDTree

from conftest import TA_MODEL as TA_MAT, needs_shared_data
from sim_detector.specimens import SPECIMENS, Specimen, make_specimen

A_MGO, A_PT = 4.212, 3.924


def _neighbours(pos, r):
    t = cKDTree(pos)
    return t, t.query_ball_point(pos, r)


def test_mgo_rocksalt_lattice_and_coordination():
    s = make_specimen("mgo", cells=6, thickness=(6, 12))
    pos, Z = s.positions, s.Z
    assert set(np.unique(Z)) == {8, 12}
    t, nb = _neighbours(pos, A_MGO / 2 + 0.01)
    d, _ = t.query(pos, 2)
    np.testing.assert_allclose(d[:, 1], A_MGO / 2, atol=1e-9)  # nearest neighbour a/2
    n_nb = np.array([len(n) - 1 for n in nb])
    interior = n_nb == 6
    assert interior.sum() > 50
    for i in np.nonzero(interior)[0]:
        others = [j for j in nb[i] if j != i]
        assert all(Z[j] != Z[i] for j in others)  # rocksalt: 6 neighbours of the other kind
    # second shell: 12 like neighbours at a/sqrt(2) for atoms with a full second shell
    nb2 = t.query_ball_point(pos, A_MGO / np.sqrt(2) + 0.01)
    full = [i for i in np.nonzero(interior)[0] if len(nb2[i]) == 1 + 6 + 12]
    assert len(full) > 10
    for i in full:
        like = [j for j in nb2[i] if j != i and Z[j] == Z[i]]
        assert len(like) == 12
    g = s.grains[0]
    np.testing.assert_allclose(np.linalg.norm(g.lattice, axis=1), A_MGO)
    # all atoms sit on the grain's lattice + basis
    frac = (pos - g.origin) @ np.linalg.inv(g.lattice)
    np.testing.assert_allclose(frac * 2, np.round(frac * 2), atol=1e-9)


def test_mgo_columns_vary_and_alternate():
    s = make_specimen("mgo")  # default: [001], 3..12 atoms per column
    key = np.round(s.positions[:, :2] / (A_MGO / 2)).astype(int)
    cols, inv, counts = np.unique(key, axis=0, return_inverse=True, return_counts=True)
    inv = inv.ravel()
    assert counts.min() >= 3 and counts.max() <= 12
    assert len(np.unique(counts)) >= 6  # a wide range of column counts
    # columns on the a/2 grid; along [001] each column alternates Mg and O along z
    for c in range(0, len(cols), 37):
        z = s.Z[inv == c][np.argsort(s.positions[inv == c, 2])]
        assert np.all(z[1:] != z[:-1])
        np.testing.assert_allclose(np.diff(np.sort(s.positions[inv == c, 2])), A_MGO / 2, atol=1e-9)
    # terraces: a column's neighbours usually have the same count (regions, not noise)
    grid = {tuple(k): n for k, n in zip(cols, counts)}
    same = sum(grid.get((k[0] + 1, k[1])) == n for k, n in grid.items())
    assert same > 0.7 * len(grid)


def test_mgo_110_has_pure_alternating_columns():
    s = make_specimen("mgo", zone="110", cells=5)
    xy = s.positions[:, :2]
    key = np.round(xy / 1e-3).astype(int)
    cols, inv = np.unique(key, axis=0, return_inverse=True)
    inv = inv.ravel()
    species = np.array([np.unique(s.Z[inv == c]) for c in range(len(cols))], dtype=object)
    assert all(len(sp) == 1 for sp in species)  # pure columns
    # nearest column of a Mg column at a/(2 sqrt 2) along x is O
    cxy = cols * 1e-3
    t = cKDTree(cxy)
    d, j = t.query(cxy, 2)
    np.testing.assert_allclose(d[:, 1], A_MGO / (2 * np.sqrt(2)), atol=2e-3)
    sp = np.array([s_[0] for s_ in species])
    assert np.all(sp[j[:, 1]] != sp)


@pytest.mark.parametrize("size", [12.0, 20.0, 31.0])
@pytest.mark.parametrize("shape", ["truncated-octahedron", "cuboctahedron"])
def test_pt_particle_fcc_and_size(size, shape):
    s = make_specimen("pt-particle", size_A=size, shape=shape)
    assert np.all(s.Z == 78)
    t = cKDTree(s.positions)
    d, _ = t.query(s.positions, 2)
    np.testing.assert_allclose(d[:, 1], A_PT / np.sqrt(2), atol=1e-9)  # fcc nn distance
    nb = t.query_ball_point(s.positions, A_PT / np.sqrt(2) + 0.01)
    assert max(len(n) - 1 for n in nb) == 12  # fcc coordination inside
    ext = s.positions.max(0) - s.positions.min(0)
    assert np.all(ext <= size + 1e-9) and np.all(ext >= size - A_PT)
    np.testing.assert_allclose(np.linalg.norm(s.grains[0].lattice, axis=1), A_PT)
    if shape == "cuboctahedron":  # {111} cut through the cube's edge midpoints
        assert np.abs(s.positions).sum(1).max() <= size + 1e-9


def test_rotation_preserves_distances_and_lattice():
    s = make_specimen("pt-particle", size_A=14.0, zone=(1, 1, 0))
    r = s.rotated(33.0)
    from scipy.spatial.distance import pdist

    np.testing.assert_allclose(pdist(r.positions), pdist(s.positions), atol=1e-9)
    np.testing.assert_allclose(r.centre, s.centre, atol=1e-9)
    # +tilt about y moves +z towards +x
    p = s.positions - s.centre
    q = r.positions - s.centre
    c, si = np.cos(np.radians(33.0)), np.sin(np.radians(33.0))
    np.testing.assert_allclose(q[:, 0], c * p[:, 0] + si * p[:, 2], atol=1e-9)
    np.testing.assert_allclose(q[:, 1], p[:, 1], atol=1e-12)
    # atoms remain on the rotated grain lattice
    g = r.grains[0]
    frac = (r.positions - g.origin) @ np.linalg.inv(g.lattice)
    np.testing.assert_allclose(frac * 2, np.round(frac * 2), atol=1e-8)
    back = r.rotated(-33.0)
    np.testing.assert_allclose(back.positions, s.positions, atol=1e-9)
    assert r.tilt_deg == 33.0 and back.tilt_deg == 0.0
    with pytest.raises(ValueError, match="tilt axis"):
        s.rotated(10.0, axis="q")


def test_cluster_grains_overlap_and_have_own_regions():
    s = make_specimen("cluster", seed=0)
    n = len(s.grains)
    assert 4 <= n <= 6
    assert np.any(s.grain == -1) and np.all(s.Z[s.grain == -1] == 6)  # carbon support
    names = {g.name for g in s.grains}
    assert names & {"Pt", "Au"}
    # projected footprints on a 1 Å grid: some pair overlaps, every grain has pixels alone
    lo = s.positions[:, :2].min(0)
    fp = []
    for k in range(n):
        xy = np.floor((s.positions[s.grain == k, :2] - lo)).astype(int)
        fp.append({tuple(v) for v in xy})
    overlaps = [len(fp[a] & fp[b]) for a in range(n) for b in range(a + 1, n)]
    assert max(overlaps) > 20
    for k in range(n):
        others = set().union(*[fp[j] for j in range(n) if j != k])
        assert len(fp[k] - others) > 50
    # each grain is a crystal of its lattice: atoms on lattice + basis
    for k, g in enumerate(s.grains):
        frac = (s.positions[s.grain == k] - g.origin) @ np.linalg.inv(g.lattice)
        np.testing.assert_allclose(frac * 2, np.round(frac * 2), atol=1e-8)


def test_amorphous_is_dense_and_disordered():
    s = make_specimen("amorphous", seed=1)
    assert np.all(s.Z == 73) and len(s.grains) == 0 and np.all(s.grain == -1)
    t = cKDTree(s.positions)
    d, _ = t.query(s.positions, 2)
    assert np.percentile(d[:, 1], 5) > 2.2 and np.median(d[:, 1]) < 3.0
    r = 12.0
    vol = 4 / 3 * np.pi * r ** 3
    assert len(s.Z) / vol == pytest.approx(0.0554, rel=0.02)


def test_same_seed_same_atoms():
    for name in SPECIMENS:
        a, b = make_specimen(name, seed=7), make_specimen(name, seed=7)
        np.testing.assert_array_equal(a.positions, b.positions)
    c = make_specimen("mgo", seed=8)
    assert len(c.Z) != len(make_specimen("mgo", seed=7).Z) or \
        not np.array_equal(c.positions, make_specimen("mgo", seed=7).positions)


@needs_shared_data
def test_reads_ta_model():
    s = make_specimen(str(TA_MAT))
    raw = scipy.io.loadmat(TA_MAT)["model"]
    assert raw.shape == (3, 8284)
    assert s.positions.shape == (8284, 3)
    np.testing.assert_array_equal(s.positions, raw.T.astype(np.float64))
    assert np.all(s.Z == 73)  # from the file name
    assert np.all(s.grain == -1)


def test_reads_text_formats(tmp_path):
    pos = np.array([[0.0, 1.0, 2.0], [3.5, -1.0, 0.25], [1.0, 1.0, 1.0]])
    (tmp_path / "a.xyz").write_text("3\ncomment\nAu 0 1 2\nPt 3.5 -1 0.25\n6 1 1 1\n")
    s = make_specimen(str(tmp_path / "a.xyz"))
    np.testing.assert_array_equal(s.positions, pos)
    np.testing.assert_array_equal(s.Z, [79, 78, 6])
    (tmp_path / "b.csv").write_text("x,y,z,Z\n" + "\n".join(
        f"{x},{y},{z},{Z}" for (x, y, z), Z in zip(pos, [8, 12, 8])))
    s = make_specimen(str(tmp_path / "b.csv"))
    np.testing.assert_array_equal(s.positions, pos)
    np.testing.assert_array_equal(s.Z, [8, 12, 8])
    np.savetxt(tmp_path / "c.txt", pos, header="x y z")
    s = make_specimen(str(tmp_path / "c.txt"), Z=47)
    np.testing.assert_array_equal(s.positions, pos)
    assert np.all(s.Z == 47)
    scipy.io.savemat(tmp_path / "d.mat", {"atoms": pos})  # N x 3, other variable name
    s = make_specimen(str(tmp_path / "d.mat"), Z=13)
    np.testing.assert_array_equal(s.positions, pos)


@pytest.mark.parametrize("name, content, problem", [
    ("missing.xyz", None, "no such file"),
    ("bad.csv", "1,2\n3,4\n", "3 .x y z. or 4"),
    ("nan.txt", "1 2 3\nnan 1 2\n", "NaN"),
    ("empty.txt", "# nothing\n", "no numeric rows"),
    ("junk.xyz", "hello\n", "number of atoms"),
    ("short.xyz", "3\nc\nAu 0 0 0\n", "header says 3"),
    ("elem.xyz", "1\nc\nQq 0 0 0\n", "not an element"),
    ("noz.csv", "1,2,3\n", "no atomic numbers"),
])
def test_bad_files_give_clear_errors(tmp_path, name, content, problem):
    p = tmp_path / name
    if content is not None:
        p.write_text(content)
    with pytest.raises(ValueError) as e:
        make_specimen(str(p))
    msg = str(e.value)
    assert str(p) in msg and "built-in specimens: mgo, pt-particle, cluster, amorphous" in msg
    assert __import__("re").search(problem, msg), msg
    assert "\n" not in msg


def test_bad_mat_and_names(tmp_path):
    scipy.io.savemat(tmp_path / "two.mat", {"a": np.zeros((2, 5)), "b": np.ones((5, 2))})
    with pytest.raises(ValueError, match="two.mat.*need a variable 'model'"):
        make_specimen(str(tmp_path / "two.mat"))
    (tmp_path / "broken.mat").write_bytes(b"not a mat file at all")
    with pytest.raises(ValueError, match="broken.mat.*cannot read it"):
        make_specimen(str(tmp_path / "broken.mat"))
    with pytest.raises(ValueError, match="unknown specimen 'graphene'.*mgo, pt-particle, cluster, amorphous"):
        make_specimen("graphene")
    with pytest.raises(ValueError, match="specimen 'mgo': bad parameter"):
        make_specimen("mgo", colour="red")
    with pytest.raises(ValueError, match="zone"):
        make_specimen("mgo", zone="111")
    with pytest.raises(ValueError, match="specimen 'cluster': material 'Cu'"):
        make_specimen("cluster", materials=("Pt", "Cu"))


def test_specimen_validates_arrays():
    with pytest.raises(ValueError, match="positions"):
        Specimen("x", np.zeros((3, 3)), np.ones(2), np.zeros(3))
