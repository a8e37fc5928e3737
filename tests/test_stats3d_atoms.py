"""Per-atom statistics (CN, GCN, bond length, strain, displacement, z-score, depth, g(r)), the
entry function and its writers, against structures and answers worked out by hand."""

import time

import h5py
import numpy as np
import pytest

from operators.structure import (coordination, depth_profile, displacement, lattices,
                                 pair_distribution, sample_windows)
from operators.structure.atom_tables import (COLUMNS, atom_statistics, write_csv, write_hdf5,
                                             write_histograms, write_summary_csv)
from operators.structure.neighbors import neighbor_list

from conftest import TA_MODEL, needs_shared_data

A_PT = 3.924


# ---------------------------------------------------------------- structures

def cuboctahedron(shells, a=A_PT):
    """Mackay cuboctahedron with ``shells`` shells: fcc points (units a/2, even coordinate sum)
    with |x| + |y| + |z| ≤ 2·shells and max |coordinate| ≤ shells."""
    r = np.arange(-shells, shells + 1)
    g = np.stack(np.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    keep = (g.sum(axis=1) % 2 == 0) & (np.abs(g).sum(axis=1) <= 2 * shells)
    return g[keep] * a / 2


def cuboctahedral_number(n):
    return (10 * n ** 3 + 15 * n ** 2 + 11 * n + 3) // 3


def slab_100(a=A_PT, n=8, layers=5):
    """fcc (100) slab: conventional cells, z layers a/2 apart; top layer at the largest z."""
    g = np.stack(np.meshgrid(np.arange(2 * n), np.arange(2 * n), np.arange(layers), indexing="ij"),
                 -1).reshape(-1, 3)
    g = g[g.sum(axis=1) % 2 == 0]
    return g * a / 2


def slab_111(d=A_PT / np.sqrt(2), n=14, layers=5):
    """fcc (111) slab: triangular layers of spacing d, stacked ABC, d·sqrt(2/3) apart."""
    a1, a2 = np.array([d, 0, 0]), np.array([d / 2, d * np.sqrt(3) / 2, 0])
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    layer = i.reshape(-1, 1) * a1 + j.reshape(-1, 1) * a2
    return np.vstack([layer + k * (a1 + a2) / 3 + [0, 0, k * d * np.sqrt(2 / 3)]
                      for k in range(layers)])


def top_interior(pos, margin):
    """Atoms of the top layer farther than ``margin`` from the slab's in-plane edges."""
    top = np.isclose(pos[:, 2], pos[:, 2].max())
    xy = pos[:, :2]
    c = xy[top].mean(axis=0)
    return top & (np.linalg.norm(xy - c, axis=1) < margin)


# ---------------------------------------------------------------- lattice, CN, GCN

def test_cutoffs_and_fit_of_the_lattice_constant():
    assert lattices.lattice_cutoff("fcc", 4.0) == pytest.approx(2 * (1 + 1 / np.sqrt(2)))
    assert lattices.lattice_cutoff("bcc", 4.0) == pytest.approx(2 * (1 + np.sqrt(3) / 2))
    assert lattices.lattice_cutoff("bcc14", 4.0) == pytest.approx(2 * (1 + np.sqrt(2)))
    assert lattices.lattice_density("fcc", 4.0) == pytest.approx(4 / 64)
    rng = np.random.default_rng(0)
    pos = cuboctahedron(5) + rng.normal(0, 0.03, (cuboctahedral_number(5), 3))
    assert lattices.fit_lattice_constant(pos, "fcc") == pytest.approx(A_PT, abs=0.005)
    with pytest.raises(ValueError, match="lattice"):
        lattices.lattice_cutoff("diamond", 3.0)


@pytest.mark.parametrize("shells", [2, 3, 4])
def test_cuboctahedron_cn_histogram(shells):
    """Outer shell of a cuboctahedron: 12 vertices CN 5, (shells−1) atoms on each of 24 edges
    CN 7, (shells−1)² inside each of 6 squares CN 8, (shells−1)(shells−2)/2 inside each of 8
    triangles CN 9; everything inside CN 12."""
    pos = cuboctahedron(shells)
    assert len(pos) == cuboctahedral_number(shells)
    a = lattices.fit_lattice_constant(pos, "fcc")
    assert a == pytest.approx(A_PT, abs=1e-9)
    cn = coordination.coordination_numbers(pos, lattices.lattice_cutoff("fcc", a))
    k = shells - 1
    expected = {5: 12, 7: 24 * k, 8: 6 * k * k, 9: 8 * k * (k - 1) // 2,
                12: cuboctahedral_number(shells - 1)}
    got = dict(zip(*np.unique(cn, return_counts=True)))
    assert {int(c): int(n) for c, n in got.items()} == {c: n for c, n in expected.items() if n}


@pytest.mark.parametrize("slab,cn_top,gcn_top", [(slab_111, 9, 7.5), (slab_100, 8, 20 / 3)],
                         ids=["111", "100"])
def test_terrace_gcn(slab, cn_top, gcn_top):
    pos = slab()
    nb = neighbor_list(pos, lattices.lattice_cutoff("fcc", A_PT))
    gcn = coordination.generalized_coordination(nb, "calle-vallejo", 12)
    sel = top_interior(pos, margin=8.0)
    assert sel.sum() >= 10
    assert (nb.count[sel] == cn_top).all()
    np.testing.assert_allclose(gcn[sel], gcn_top, rtol=1e-12)


def test_gcn_conventions_on_the_13_atom_cluster():
    """Centre CN 12, shell CN 5 (4 shell neighbours + centre). Calle-Vallejo: shell
    (4·5 + 12)/12, centre 12·5/12. SINGLE: the shell's largest neighbour CN is 12 (the same),
    the centre's is 5: 60/5 = 12."""
    pos = cuboctahedron(1)
    nb = neighbor_list(pos, lattices.lattice_cutoff("fcc", A_PT))
    c = int(np.argmin(np.linalg.norm(pos, axis=1)))
    cv = coordination.generalized_coordination(nb, "calle-vallejo", 12)
    single = coordination.generalized_coordination(nb, "single")
    shell = np.arange(13) != c
    np.testing.assert_allclose(cv[shell], 32 / 12)
    np.testing.assert_allclose(single[shell], 32 / 12)
    assert cv[c] == pytest.approx(5.0) and single[c] == pytest.approx(12.0)
    with pytest.raises(ValueError, match="convention"):
        coordination.generalized_coordination(nb, "other")


def test_bond_lengths_brute_force():
    rng = np.random.default_rng(4)
    pos = rng.random((200, 3)) * 10
    nb = neighbor_list(pos, 2.5)
    d = np.linalg.norm(pos[:, None] - pos[None], axis=2)
    inside = (d < 2.5) & (d > 0)
    want = np.array([d[i, inside[i]].mean() if inside[i].any() else np.nan for i in range(200)])
    np.testing.assert_allclose(coordination.bond_lengths(nb), want, equal_nan=True)


# ---------------------------------------------------------------- radial strain

def ball(radius=14.0, a=A_PT):
    pos = cuboctahedron(int(np.ceil(2 * radius / a)) + 1, a)  # large enough to hold the ball
    return pos[np.linalg.norm(pos, axis=1) < radius]


def test_radial_strain_of_a_uniform_expansion():
    pos = ball() * 1.01
    d0 = lattices.nearest_neighbor_distance("fcc", A_PT)
    nb = neighbor_list(pos, lattices.lattice_cutoff("fcc", A_PT * 1.01))
    eps = coordination.radial_strain(pos, nb, d0, center=(0, 0, 0))
    full = (nb.count == 12) & (np.linalg.norm(pos, axis=1) > 1)
    np.testing.assert_allclose(eps[full], 0.01, atol=1e-12)
    assert np.isnan(eps[np.linalg.norm(pos, axis=1) < 1e-9]).all()  # the centre has no direction


def test_radial_strain_of_a_uniaxial_stretch():
    """z stretched by 1 + e: ε = e·ẑẑᵀ to first order, so ε_rr = e·cos²(angle to z)."""
    e = 1e-4
    pos = ball() * [1, 1, 1 + e]
    nb = neighbor_list(pos, lattices.lattice_cutoff("fcc", A_PT))
    eps = coordination.radial_strain(pos, nb, lattices.nearest_neighbor_distance("fcc", A_PT),
                                     center=(0, 0, 0))
    r = np.linalg.norm(pos, axis=1)
    full = (nb.count == 12) & (r > 1)
    cos2 = (pos[:, 2] / np.where(r > 0, r, 1)) ** 2
    np.testing.assert_allclose(eps[full], e * cos2[full], atol=1e-7)


# ---------------------------------------------------------------- displacement from a volume

def gaussian_volume(shape, voxel, centres, covs, amplitude=2.0, reach=3.5):
    """Sum of Gaussians amplitude·exp(−½ xᵀC⁻¹x) sampled at voxel centres i·voxel (Å), each
    evaluated within ``reach`` Å of its centre (beyond, < 1e-10 of the peak for σ ≤ 0.6 Å)."""
    vol = np.zeros(shape)
    for c, cov in zip(centres, covs):
        lo = np.maximum(np.floor((c - reach) / voxel).astype(int), 0)
        hi = np.minimum(np.ceil((c + reach) / voxel).astype(int) + 1, shape)
        idx = np.indices(hi - lo).reshape(3, -1).T + lo
        d = idx * voxel - c
        val = amplitude * np.exp(-0.5 * np.einsum("ni,ij,nj->n", d, np.linalg.inv(cov), d))
        vol[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] += val.reshape(hi - lo)
    return vol


def random_rotation(rng):
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


SIGMAS = [(0.40, 0.40, 0.40), (0.60, 0.40, 0.30), (0.50, 0.50, 0.35), (0.45, 0.30, 0.30)]


def displacement_case(seed=1):
    rng = np.random.default_rng(seed)
    voxel = 0.25
    centres = np.array([[4, 4, 4], [4, 10, 10], [10, 4, 10], [10, 10, 4]], float)
    centres += rng.uniform(-.12, .12, (4, 3))
    rots = [random_rotation(rng) for _ in SIGMAS]
    covs = [q @ np.diag(np.square(s)) @ q.T for q, s in zip(rots, SIGMAS)]
    return gaussian_volume((56, 56, 56), voxel, centres, covs), voxel, centres, rots


def test_displacement_fit_recovers_known_widths():
    vol, voxel, centres, rots = displacement_case()
    fit = displacement.displacement_fit(vol, voxel, centres, radius=1.2, origin=0, axes="xyz")
    np.testing.assert_allclose(fit.sigma_principal, np.array(SIGMAS), rtol=1e-6)
    np.testing.assert_allclose(fit.isotropy, [(s[2] / s[0]) ** 2 for s in SIGMAS], rtol=1e-6)
    np.testing.assert_allclose(fit.center, centres, atol=1e-6)
    np.testing.assert_allclose(fit.amplitude, 2.0, rtol=1e-6)
    assert fit.sigma_iso[0] == pytest.approx(0.40, rel=1e-6)  # isotropic atom: both fits agree
    # the largest principal axis of atom 1 is its rotation's first column
    assert abs(fit.axes[1][:, 0] @ rots[1][:, 0]) == pytest.approx(1.0, abs=1e-6)
    # the reconstruction's blur comes off in quadrature
    blurred = displacement.displacement_fit(vol, voxel, centres, radius=1.2, origin=0, axes="xyz",
                                            blur_sigma=0.2)
    np.testing.assert_allclose(blurred.sigma_principal ** 2, np.array(SIGMAS) ** 2 - 0.04, rtol=1e-5)


def test_displacement_fit_with_noise():
    vol, voxel, centres, _ = displacement_case(seed=2)
    rng = np.random.default_rng(3)
    noisy = vol + rng.normal(0, 0.01, vol.shape)  # 0.5 % of the peak
    fit = displacement.displacement_fit(noisy, voxel, centres, radius=1.2, origin=0, axes="xyz",
                                        floor=0.1)
    np.testing.assert_allclose(fit.sigma_principal, np.array(SIGMAS), rtol=0.03)
    np.testing.assert_allclose(fit.center, centres, atol=0.02)


def test_displacement_fit_in_the_tracing_convention():
    """Volume indexed [z, y, x], positions (x, y, z) Å from the centre voxel (nz//2, ny//2,
    nx//2), as operators.tomography.tracing returns them: the default."""
    vol_xyz, voxel, centres, rots = displacement_case()
    vol = vol_xyz.transpose(2, 1, 0)  # [x, y, z] -> [z, y, x]
    centre_voxel = np.array(vol.shape) // 2  # (z, y, x)
    pos = centres - centre_voxel[::-1] * voxel
    fit = displacement.displacement_fit(vol, voxel, pos, radius=1.2)
    np.testing.assert_allclose(fit.center, pos, atol=1e-6)
    np.testing.assert_allclose(fit.sigma_principal, np.array(SIGMAS), rtol=1e-6)
    assert abs(fit.axes[1][:, 0] @ rots[1][:, 0]) == pytest.approx(1.0, abs=1e-6)  # in x, y, z


def test_displacement_fit_validates_inputs():
    vol = np.zeros((8, 8, 8))
    with pytest.raises(ValueError, match="radius"):
        displacement.displacement_fit(vol, 0.5, np.zeros((1, 3)), radius=0.5)
    with pytest.raises(ValueError, match="volume"):
        displacement.displacement_fit(np.zeros((8, 8)), 0.5, np.zeros((1, 3)), radius=1.0)
    fit = displacement.displacement_fit(vol, 0.5, np.zeros((1, 3)), radius=1.0)  # nothing there
    assert np.isnan(fit.sigma_iso[0]) and np.isnan(fit.sigma_principal[0]).all()


# ---------------------------------------------------------------- z-score, depth, penetration

def test_zscore():
    np.testing.assert_allclose(displacement.zscore([1.0, 2.0, 3.0, np.nan]),
                               [-np.sqrt(1.5), 0, np.sqrt(1.5), np.nan])
    assert (displacement.zscore([4.0, 4.0]) == 0).all()


def test_surface_depth_of_a_cube():
    n = 6
    g = np.stack(np.meshgrid(*[np.arange(2 * n + 1)] * 3, indexing="ij"), -1).reshape(-1, 3)
    pos = g[g.sum(axis=1) % 2 == 0] * A_PT / 2  # fcc filling the cube [0, n·a]³ corner to corner
    side = n * A_PT
    want = np.minimum(pos, side - pos).min(axis=1)
    np.testing.assert_allclose(depth_profile.surface_depth(pos), want, atol=1e-9)


def test_penetration_depth_of_a_step():
    rng = np.random.default_rng(8)
    depth = rng.uniform(0, 20, 3000)
    values = np.where(depth < 4.3, 2.0, 1.0) + rng.normal(0, 0.05, depth.size)
    fit = depth_profile.penetration_depth(depth, values)
    gap = np.diff(np.sort(depth)).max()
    assert fit.depth == pytest.approx(4.3, abs=max(gap, 0.02))
    assert fit.core_value == pytest.approx(1.0, abs=0.01)
    assert fit.surface_value == pytest.approx(2.0, abs=0.03) and abs(fit.slope) < 0.02


def test_penetration_depth_of_a_ramp_into_a_plateau():
    rng = np.random.default_rng(9)
    depth = rng.uniform(0, 25, 4000)
    values = np.where(depth < 7.0, 0.03 - 0.03 * depth / 7.0, 0.0) + rng.normal(0, 0.002, depth.size)
    values[::50] = np.nan  # left out
    fit = depth_profile.penetration_depth(depth, values)
    assert fit.depth == pytest.approx(7.0, abs=0.3)
    assert fit.slope == pytest.approx(-0.03 / 7.0, rel=0.05)
    assert fit.core_value == pytest.approx(0.0, abs=3e-4)


def test_penetration_depth_needs_points():
    with pytest.raises(ValueError, match="atoms"):
        depth_profile.penetration_depth(np.arange(6.0), np.arange(6.0))


# ---------------------------------------------------------------- g(r)

def sphere_mask(radius, voxel=0.25):
    n = int(np.ceil(radius / voxel)) + 1
    ax = np.arange(-n, n + 1) * voxel
    x, y, z = np.meshgrid(ax, ax, ax, indexing="ij")
    return sample_windows.SampleMask(x * x + y * y + z * z <= radius * radius,
                                     np.full(3, -n * voxel), np.full(3, voxel))


def test_window_fraction_of_a_sphere():
    """vol(B ∩ (B + r))/vol(B) = 1 − 3r/(4R) + r³/(16R³) for a ball of radius R."""
    R = 10.0
    r = np.array([0.5, 2.0, 5.0, 9.0, 15.0])
    want = 1 - 3 * r / (4 * R) + r ** 3 / (16 * R ** 3)
    np.testing.assert_allclose(sample_windows.window_fraction(sphere_mask(R), r), want, atol=0.01)


def test_ideal_gas_in_a_sphere_gives_one():
    rng = np.random.default_rng(11)
    R, n = 25.0, 6000
    v = rng.normal(size=(n, 3))
    pos = v / np.linalg.norm(v, axis=1, keepdims=True) * R * rng.random((n, 1)) ** (1 / 3)
    pdf = pair_distribution.pair_distribution(pos, r_max=10.0, dr=0.5, domain=sphere_mask(R, 0.4))
    sel = pdf.r > 1.5
    sigma = pdf.g[sel] / np.sqrt(pdf.pairs[sel] / 2)  # Poisson on unordered pairs
    assert (np.abs(pdf.g[sel] - 1) < 5 * sigma).all()
    assert abs(np.mean(pdf.g[sel]) - 1) < 0.01
    # without the correction the far bins fall towards the window's overlap (0.66 at 9.75 Å)
    shell = 4 / 3 * np.pi * (pdf.edges[1:] ** 3 - pdf.edges[:-1] ** 3)
    raw = pdf.pairs / (n * (n - 1) / pdf.volume * shell)
    assert raw[-1] < 0.75


def test_periodic_fcc_gives_the_shell_counts():
    """Perfect fcc in a periodic box: g in the bin of shell k is n_k·V/((N−1)·bin volume)."""
    a, cells = 3.924, 6
    g = np.stack(np.meshgrid(*[np.arange(2 * cells)] * 3, indexing="ij"), -1).reshape(-1, 3)
    pos = g[g.sum(axis=1) % 2 == 0] * a / 2
    n, vol = len(pos), (cells * a) ** 3
    dr = 0.05
    pdf = pair_distribution.pair_distribution(pos, r_max=8.0, dr=dr, box_size=cells * a)
    # fcc shells up to 8 Å: r/a = sqrt(m/2), m = 1..8, with 12, 6, 24, 12, 24, 8, 48, 6 atoms
    shells = {np.sqrt(m / 2): c for m, c in zip(range(1, 9), (12, 6, 24, 12, 24, 8, 48, 6))}
    want = np.zeros_like(pdf.g)
    for rel, count in shells.items():
        k = int(rel * a // dr)
        want[k] += count * vol / ((n - 1) * 4 / 3 * np.pi * (pdf.edges[k + 1] ** 3 - pdf.edges[k] ** 3))
    np.testing.assert_allclose(pdf.g, want, rtol=1e-12, atol=1e-12)
    assert pdf.density == pytest.approx(4 / a ** 3)


def test_finite_fcc_ball_coordination_from_g():
    """Integrating ρ·g(r)·4πr² over each peak of a finite particle gives the bulk shell counts
    only with the edge correction (surface atoms see fewer neighbours)."""
    pos = ball(radius=20.0)
    d = A_PT / np.sqrt(2)
    pdf = pair_distribution.pair_distribution(pos, r_max=6.0, dr=0.02)  # alpha-shape window
    shell_vol = 4 / 3 * np.pi * (pdf.edges[1:] ** 3 - pdf.edges[:-1] ** 3)
    per_atom = pdf.g * (len(pos) - 1) / pdf.volume * shell_vol
    bounds = [0, (d + A_PT) / 2, (A_PT + A_PT * np.sqrt(1.5)) / 2, (A_PT * np.sqrt(1.5) + 2 * d) / 2]
    counts = [per_atom[(pdf.r > lo) & (pdf.r < hi)].sum() for lo, hi in zip(bounds, bounds[1:])]
    np.testing.assert_allclose(counts, [12, 6, 24], rtol=0.01)
    raw = pdf.pairs[(pdf.r > bounds[2]) & (pdf.r < bounds[3])].sum() / len(pos)
    assert raw < 0.9 * 24


@needs_shared_data
def test_ta_film_first_valley_is_the_published_cutoff():
    """Yuan et al. read the first valley of the Ta film's g(r) (0.1 Å bins, smoothed over 1.5
    bins) at 4.12 Å and use it as the bond cutoff."""
    from scipy.io import loadmat

    pos = loadmat(TA_MODEL)["model"].T.astype(np.float64)
    pdf = pair_distribution.pair_distribution(pos, r_max=8.0, dr=0.1)
    assert pair_distribution.first_valley(pdf) == pytest.approx(4.12, abs=0.1)
    # far from the first shells an amorphous film is uniform: g → 1 with the α-shape window
    assert np.mean(pdf.g[pdf.r > 6.5]) == pytest.approx(1.0, abs=0.05)


# ---------------------------------------------------------------- entry function and writers

def test_atom_statistics_of_a_pt_cuboctahedron(tmp_path):
    pos = cuboctahedron(3)  # centred on 0
    rng = np.random.default_rng(6)
    voxel, sigma, n = 0.3, 0.3, 64
    # volume[z, y, x] with the particle's centre at the centre voxel (32, 32, 32)
    vol = gaussian_volume((n, n, n), voxel, pos[:, ::-1] + n // 2 * voxel,
                          [np.eye(3) * sigma ** 2] * len(pos))
    peaks = rng.uniform(1, 2, len(pos))
    s = atom_statistics(pos, peaks, lattice="fcc", volume=vol, voxel_size=voxel, pdf_r_max=8.0,
                        voronoi_atoms="all")
    assert s.lattice_constant == pytest.approx(A_PT, abs=1e-9)
    assert s.lattice_source == "given" and s.n_crystalline == s.n_crystalline_raw == len(pos)
    assert {int(c): int(n) for c, n in zip(*np.unique(s.cn, return_counts=True))} == \
        {5: 12, 7: 48, 8: 24, 9: 8, 12: 55}
    np.testing.assert_allclose(s.sigma_iso, sigma, rtol=1e-3)
    np.testing.assert_allclose(s.isotropy, 1.0, atol=1e-3)
    np.testing.assert_allclose(s.intensity_z, (peaks - peaks.mean()) / peaks.std())
    assert s.gcn_norm == "/12" and s.cutoff_source.startswith("fcc lattice")
    assert s.voronoi_n_indexed == 55 and (s.voronoi_index[s.voronoi_cn >= 0] == [0, 12, 0, 0]).all()
    assert (s.voronoi_cn[s.voronoi_status == 0] == 12).all()
    np.testing.assert_allclose(s.q4[s.cn == 12], 0.190941, atol=1e-6)
    # the lattice is inferred the same when not given
    assert atom_statistics(pos, pdf_r_max=8.0, voronoi=False, motifs=False).lattice == "fcc"
    np.testing.assert_allclose(s.q6[s.cn == 12], 0.574524, atol=1e-6)
    table = s.table()
    assert list(table) == list(COLUMNS) and all(len(c) == len(pos) for c in table.values())
    summary = s.summary()
    assert all(isinstance(v, (int, float, str)) for v in summary.values())

    # CSV round trip
    path = write_csv(s, tmp_path / "atoms.csv")
    back = np.genfromtxt(path, delimiter=",", names=True)
    assert back.dtype.names == tuple(COLUMNS)
    for name, col in table.items():
        np.testing.assert_allclose(back[name], np.asarray(col, float), rtol=1e-6, equal_nan=True)
    rows = (tmp_path / "summary.csv")
    write_summary_csv(s, rows)
    assert "lattice_constant" in rows.read_text()

    # HDF5 round trip
    with h5py.File(tmp_path / "stats.h5", "w") as f:
        write_hdf5(s, f.create_group("atoms3d"))
    with h5py.File(tmp_path / "stats.h5", "r") as f:
        g = f["atoms3d"]
        np.testing.assert_array_equal(g["atoms/cn"][()], s.cn)
        assert g["atoms/bond_length"].attrs["unit"] == "Å"
        assert g.attrs["lattice"] == "fcc" and g.attrs["n_atoms"] == len(pos)
        np.testing.assert_array_equal(g["pdf/g"][()], s.pdf_g)
        assert g["voronoi/top_labels"][0].decode() == "<0,12,0,0>" and g["voronoi/top_counts"][0] == 55
        assert g["motifs/icosahedral_filling"].shape == (12,)

    # PNGs
    paths = write_histograms(s, tmp_path / "png", stem="pt147")
    names = {p.name for p in paths}
    assert {"pt147_cn.png", "pt147_sigma_iso.png", "pt147_overview.png"} <= names
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_atom_statistics_amorphous_needs_no_lattice():
    rng = np.random.default_rng(12)
    pos = rng.random((400, 3)) * 18
    s = atom_statistics(pos, lattice="amorphous", cutoff=3.0, pdf_r_max=6.0)
    assert np.isnan(s.lattice_constant) and s.cutoff == 3.0 and s.cutoff_source == "given"
    assert np.isnan(s.sigma_iso).all() and np.isnan(s.intensity_z).all()
    with pytest.raises(ValueError, match="lattice"):
        atom_statistics(pos, lattice="glass")
    # never assumed: random atoms are inferred amorphous
    inferred = atom_statistics(pos, cutoff=3.0, pdf_r_max=6.0, voronoi=False, motifs=False)
    assert inferred.lattice == "amorphous" and inferred.lattice_source.startswith("inferred")
    with pytest.raises(ValueError, match="penetration_of"):
        atom_statistics(pos, lattice="amorphous", cutoff=3.0, penetration_of="nope")


@pytest.mark.slow
def test_statistics_of_80000_atoms_under_30_s():
    rng = np.random.default_rng(0)
    m = 35  # 2·35³ ≥ 80,000 bcc sites
    g = np.stack(np.meshgrid(*[np.arange(m)] * 3, indexing="ij"), -1).reshape(-1, 3)
    pos = (np.vstack([g, g + 0.5])[:80_000] * 3.30 + rng.normal(0, 0.25, (80_000, 3)))
    atom_statistics(pos[:2000], lattice="amorphous", cutoff=4.12, pdf_r_max=6.0)  # warm numba
    t = time.perf_counter()
    s = atom_statistics(pos, lattice="amorphous", cutoff=4.12)
    elapsed = time.perf_counter() - t
    print(f"80,000 atoms: {elapsed:.1f} s")
    assert s.n_atoms == 80_000
    assert elapsed < 30.0
