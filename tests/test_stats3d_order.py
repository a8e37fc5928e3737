"""Bond-orientational order: the published Ta values, the perfect-structure values of the
data README, and the neighbour lists underneath."""

import numpy as np
import pytest

from operators.structure.neighbors import nearest_distance, neighbor_list
from operators.structure.order3d import bond_orientational_order

from conftest import TA_MODEL, needs_shared_data

BOO_FILE = TA_MODEL.parent / "Ta_film_BOO_normalized.mat"


def load_boo():
    if not BOO_FILE.is_file():
        pytest.skip(f"published order values not found at {BOO_FILE}")
    from scipy.io import loadmat

    return loadmat(BOO_FILE)


# ---------------------------------------------------------------- structures from lattice vectors

def lattice_block(vectors, basis, n):
    """Points (frac + basis) @ vectors for integer cells in [-n, n]³."""
    g = np.stack(np.meshgrid(*[np.arange(-n, n + 1)] * 3, indexing="ij"), -1).reshape(-1, 3)
    frac = (g[:, None, :] + np.asarray(basis, float)[None]).reshape(-1, 3)
    return frac @ np.asarray(vectors, float)


def fcc(a=3.92, n=2):
    return lattice_block(np.eye(3) * a, [[0, 0, 0], [.5, .5, 0], [.5, 0, .5], [0, .5, .5]], n)


def bcc(a=3.30, n=2):
    return lattice_block(np.eye(3) * a, [[0, 0, 0], [.5, .5, .5]], n)


def hcp(d=2.77, n=2):
    """Ideal hcp: a = d, c = d·sqrt(8/3)."""
    vec = [[d, 0, 0], [d / 2, d * np.sqrt(3) / 2, 0], [0, 0, d * np.sqrt(8 / 3)]]
    return lattice_block(vec, [[0, 0, 0], [1 / 3, 1 / 3, 1 / 2]], n)


def icosahedron(d=2.8):
    """Centre + 12 vertices (0, ±1, ±φ) cyclic, scaled to centre-vertex distance d."""
    phi = (1 + 5 ** 0.5) / 2
    v = []
    for s1 in (1, -1):
        for s2 in (phi, -phi):
            v += [[0, s1, s2], [s1, s2, 0], [s2, 0, s1]]
    v = np.array(v, float)
    return np.vstack([[0, 0, 0], v * d / np.linalg.norm(v[0])])


def central(pos):
    return int(np.argmin(np.linalg.norm(pos - pos.mean(axis=0), axis=1)))


# README table (first neighbour shell): structure, positions, cutoff, Q4, Q6
PERFECT = [
    ("fcc", fcc(), 3.92 * 0.85, 0.190941, 0.574524),
    ("hcp", hcp(), 2.77 * 1.2, 0.097222, 0.484762),
    ("bcc8", bcc(), 3.30 * 0.93, 0.509175, 0.628539),
    ("bcc14", bcc(), 3.30 * 1.2, 0.036370, 0.510688),
    ("icosahedron", icosahedron(), 2.8 * 1.2, 0.0, 0.663325),
]


@pytest.mark.parametrize("name,pos,cutoff,q4,q6", PERFECT, ids=[p[0] for p in PERFECT])
def test_perfect_structures_give_the_readme_q4_q6(name, pos, cutoff, q4, q6):
    bo = bond_orientational_order(pos, cutoff)
    c = central(pos)
    expected_n = {"bcc8": 8, "bcc14": 14}.get(name, 12)
    assert bo.n_neighbors[c] == expected_n
    assert bo.q4[c] == pytest.approx(q4, abs=1e-6)  # the README gives 6 decimals
    assert bo.q6[c] == pytest.approx(q6, abs=1e-6)


def test_averaged_order_of_bulk_fcc_is_one():
    """Every fcc atom has the same q_lm, so Q̄ = q and the normalised order is exactly 1."""
    a = 3.92
    pos = fcc(a, n=3)
    bo = bond_orientational_order(pos, 0.85 * a)
    inner = np.abs(pos).max(axis=1) < a + 0.01  # atoms whose neighbours' shells are complete
    np.testing.assert_allclose(bo.q4_bar[inner], 0.190941, atol=1e-6)
    np.testing.assert_allclose(bo.q6_bar[inner], 0.574524, atol=1e-6)
    np.testing.assert_allclose(bo.order[inner], 1.0, atol=2e-6)
    assert bo.crystalline[inner].all()


def test_periodic_box_makes_every_atom_bulk():
    a, n = 3.92, 4
    g = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), -1).reshape(-1, 3)
    pos = (g[:, None] + np.array([[0, 0, 0], [.5, .5, 0], [.5, 0, .5], [0, .5, .5]])).reshape(-1, 3) * a
    bo = bond_orientational_order(pos - 0.3, 0.85 * a, box_size=n * a)  # wrapped into the box
    assert (bo.n_neighbors == 12).all()
    np.testing.assert_allclose(bo.order, 1.0, atol=2e-6)
    assert bo.crystalline_fraction == 1.0


@needs_shared_data
def test_ta_film_order_equals_published():
    data = load_boo()
    pos = data["model"].T  # 3 × N float32 → (N, 3)
    published = data["order"].ravel()
    bo = bond_orientational_order(pos, cutoff=4.12, min_distance=0.1)
    diff = np.abs(bo.order - published)
    assert diff.max() < 1e-5, f"max |order - published| = {diff.max():.3g}"
    assert int((bo.order > 0.5).sum()) == 1832
    assert int(bo.crystalline_raw.sum()) == 1832 and bo.crystalline_fraction_raw == 1832 / 8284
    # the authors' cleaning (Main_2/Main_3 l.14-48): 163 isolated ones back to amorphous
    assert int(bo.crystalline.sum()) == 1669
    ref = np.load(__import__("pathlib").Path(__file__).parent / "data" / "ta_film_authors_port.npz")
    np.testing.assert_array_equal(bo.crystalline, ref["crystalline_clean"])
    # the two atoms without a neighbour carry 0 in the published file, as here
    assert set(np.flatnonzero(bo.n_neighbors == 0)) == set(np.flatnonzero(published == 0))


@needs_shared_data
def test_ta_film_positions_file_is_the_same_model():
    from scipy.io import loadmat

    a = loadmat(TA_MODEL)["model"]
    b = load_boo()["model"]
    np.testing.assert_array_equal(a, b)


def test_cleaning_returns_isolated_crystalline_atoms():
    """The authors' rule by hand: a block of 27 crystalline atoms 2.5 Å apart stays; a lone
    crystalline atom far away goes back; a square of 4 next to the block (10 or 13
    crystalline atoms within 8 Å, but 6 or more of the block) stays, the same square far from
    the block goes back."""
    from operators.structure.order3d import clean_crystalline

    g = np.stack(np.meshgrid(*[np.arange(3)] * 3, indexing="ij"), -1).reshape(-1, 3) * 2.5
    square = np.array([[0, 0, 0], [0, 2.5, 0], [0, 0, 2.5], [0, 2.5, 2.5]])
    pos = np.vstack([g, [[40.0, 0, 0]], square + [11.0, 0, 0], square + [0, 60.0, 0],
                     [[0, 0, -30.0]]])
    cry = np.ones(len(pos), bool)
    cry[-1] = False                                    # an amorphous atom stays amorphous
    out = clean_crystalline(pos, cry)
    assert out[:27].all() and not out[27]
    assert out[28:32].all() and not out[32:36].any() and not out[-1]
    # three of the square have fewer than 13 crystalline atoms within 8 Å (10, 11, 11; the
    # fourth 13): without the rescue they go back, the fourth stays
    assert clean_crystalline(pos, cry, rescue=100)[28:32].tolist() == [False, False, False, True]


def test_isolated_atom_gets_zero_order():
    pos = np.vstack([icosahedron(), [[30.0, 0, 0]]])
    bo = bond_orientational_order(pos, 3.5)
    assert bo.n_neighbors[-1] == 0
    assert bo.q4[-1] == 0 and bo.q6_bar[-1] == 0 and bo.order[-1] == 0


# ---------------------------------------------------------------- neighbour lists

def test_neighbor_list_matches_brute_force():
    rng = np.random.default_rng(3)
    pos = rng.random((300, 3)) * 12
    nb = neighbor_list(pos, 3.0, min_distance=0.5)
    d = np.linalg.norm(pos[:, None] - pos[None], axis=2)
    want = (d < 3.0) & (d > 0.5)
    assert nb.count.tolist() == want.sum(axis=1).tolist()
    for i in (0, 17, 299):
        got = nb.index[nb.offsets[i]:nb.offsets[i + 1]]
        np.testing.assert_array_equal(got, np.flatnonzero(want[i]))  # sorted
        np.testing.assert_allclose(nb.distance[nb.offsets[i]:nb.offsets[i + 1]], d[i, got])
        np.testing.assert_allclose(nb.vector[nb.offsets[i]:nb.offsets[i + 1]], pos[got] - pos[i])
    np.testing.assert_allclose(nearest_distance(pos), np.sort(d, axis=1)[:, 1])


def test_periodic_neighbors_use_minimum_image():
    pos = np.array([[0.2, 5, 5], [9.9, 5, 5], [5, 5, 5]])
    nb = neighbor_list(pos, 1.0, box_size=10.0)
    assert nb.count.tolist() == [1, 1, 0]
    np.testing.assert_allclose(nb.vector[0], [-0.3, 0, 0], atol=1e-12)
    np.testing.assert_allclose(nb.distance, 0.3)


@pytest.mark.parametrize("bad", [np.zeros((3, 5)), np.zeros(9), np.array([[0, 0, np.nan]])])
def test_bad_positions_raise(bad):
    with pytest.raises(ValueError, match="positions"):
        bond_orientational_order(bad, 3.0)


def test_bad_cutoff_raises():
    with pytest.raises(ValueError, match="cutoff"):
        neighbor_list(np.zeros((4, 3)), -1.0)
