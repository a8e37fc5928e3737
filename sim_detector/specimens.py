"""Atomic models of the specimens the emulator images.

A :class:`Specimen` is a list of atoms (positions in Å, atomic numbers, grain ids) plus, for
every crystalline grain, its lattice and basis so that the diffraction model can place Bragg
disks. The beam travels along +z; scan x is the column axis, scan y the row axis.

Built-in specimens (``SPECIMENS``), each from :func:`make_specimen`:

- ``mgo``: rocksalt MgO slab (a = 4.212 Å) on a zone axis ([001] by default) whose top and
  bottom surfaces carry terraces, so atomic columns hold different numbers of atoms (3..12
  by default), as in Jia et al., Nature Materials 13, 1044 (2014).
- ``pt-particle``: an fcc Pt (a = 3.924 Å) truncated octahedron or cuboctahedron.
- ``cluster``: a few small Pt/Au/MgO nanocrystals in random orientations, partly
  overlapping in projection, on an amorphous carbon support.
- ``amorphous``: a random dense packing of one element (Ta by default).

Any other name is read as a file of atom positions (``.mat``, ``.xyz``, ``.csv``, ``.txt``).

Example
-------
>>> s = make_specimen("pt-particle", size_A=12.0)
>>> s.positions.shape[1], int(s.Z[0]), len(s.grains)
(3, 78, 1)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace

import numpy as np

SPECIMENS = ("mgo", "pt-particle", "cluster", "amorphous")
FILE_SUFFIXES = (".mat", ".xyz", ".csv", ".txt")

# Lattice constants (Å) at room temperature.
A_MGO = 4.212
A_PT = 3.924
A_AU = 4.078

_FCC = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
_ROCKSALT_ANION = _FCC + np.array([0.5, 0, 0])

ELEMENTS = (
    "H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge As "
    "Se Br Kr Rb Sr Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe Cs Ba La Ce Pr Nd Pm Sm Eu "
    "Gd Tb Dy Ho Er Tm Yb Lu Hf Ta W Re Os Ir Pt Au Hg Tl Pb Bi Po At Rn Fr Ra Ac Th Pa U Np "
    "Pu Am Cm Bk Cf Es Fm Md No Lr Rf Db Sg Bh Hs Mt Ds Rg Cn Nh Fl Mc Lv Ts Og").split()
Z_OF = {sym: i + 1 for i, sym in enumerate(ELEMENTS)}


@dataclass
class Grain:
    """One crystalline grain.

    name: e.g. "MgO", "Pt".
    lattice: (3, 3) float64, Å; rows are the conventional cell vectors a1, a2, a3 in the
        specimen frame (already rotated).
    basis_frac: (M, 3) fractional coordinates of the basis atoms.
    basis_Z: (M,) int atomic numbers of the basis atoms.
    origin: (3,) Å, position of a lattice point (an atom of basis site 0).
    """

    name: str
    lattice: np.ndarray
    basis_frac: np.ndarray
    basis_Z: np.ndarray
    origin: np.ndarray = field(default_factory=lambda: np.zeros(3))

    @property
    def cell_volume_A3(self) -> float:
        return float(abs(np.linalg.det(self.lattice)))

    @property
    def density_per_A3(self) -> float:
        """Atoms per Å³."""
        return len(self.basis_Z) / self.cell_volume_A3

    def transformed(self, R: np.ndarray, centre: np.ndarray) -> "Grain":
        """The grain after rotating the specimen by R about ``centre``."""
        return replace(self, lattice=self.lattice @ R.T,
                       origin=(self.origin - centre) @ R.T + centre)


@dataclass
class Specimen:
    """Atoms of a specimen.

    positions: (N, 3) float64, Å, columns (x, y, z); the beam travels along +z.
    Z: (N,) int atomic numbers.
    grain: (N,) int index into ``grains``; -1 for amorphous material.
    grains: one :class:`Grain` per crystalline grain.
    tilt_deg: accumulated tilt applied by :meth:`rotated` (for the record).
    params: the parameters it was built with (plain types, for metadata).
    """

    name: str
    positions: np.ndarray
    Z: np.ndarray
    grain: np.ndarray
    grains: list[Grain] = field(default_factory=list)
    tilt_deg: float = 0.0
    params: dict = field(default_factory=dict)

    def __post_init__(self):
        self.positions = np.ascontiguousarray(self.positions, dtype=np.float64).reshape(-1, 3)
        n = len(self.positions)
        self.Z = np.asarray(self.Z, dtype=np.int64).reshape(-1)
        self.grain = np.asarray(self.grain, dtype=np.int64).reshape(-1)
        if len(self.Z) != n or len(self.grain) != n:
            raise ValueError(f"specimen {self.name!r}: {n} positions but {len(self.Z)} Z "
                             f"and {len(self.grain)} grain ids")
        if n and (self.grain.max() >= len(self.grains) or self.grain.min() < -1):
            raise ValueError(f"specimen {self.name!r}: grain ids must be "
                             f"-1..{len(self.grains) - 1}")

    @property
    def centre(self) -> np.ndarray:
        """(3,) Å, centroid of the atoms: the tilt axis passes through it."""
        return self.positions.mean(axis=0)

    def rotated(self, tilt_deg: float, axis: str = "y") -> "Specimen":
        """The specimen tilted by ``tilt_deg`` (right-handed) about an axis through its centre.

        Atoms and grain lattices rotate together. For axis "y", +tilt moves +z towards +x:
        x' = x cos t + z sin t, z' = -x sin t + z cos t (relative to the centre).
        """
        R = rotation_matrix(axis, tilt_deg)
        c = self.centre
        pos = (self.positions - c) @ R.T + c
        grains = [g.transformed(R, c) for g in self.grains]
        return replace(self, positions=pos, grains=grains, tilt_deg=self.tilt_deg + tilt_deg,
                       Z=self.Z.copy(), grain=self.grain.copy(), params=dict(self.params))


def rotation_matrix(axis: str, angle_deg: float) -> np.ndarray:
    """(3, 3) right-handed rotation by ``angle_deg`` about "x", "y" or "z"."""
    t = math.radians(angle_deg)
    c, s = math.cos(t), math.sin(t)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    if axis == "z":
        return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    raise ValueError(f"tilt axis {axis!r} is not one of 'x', 'y', 'z'")


def zone_rotation(zone, in_plane_deg: float = 0.0) -> np.ndarray:
    """Rotation taking crystal direction ``zone`` [uvw] (cubic) onto +z, then about z."""
    u = np.asarray(zone, dtype=float)
    u = u / np.linalg.norm(u)
    z = np.array([0.0, 0.0, 1.0])
    v = np.cross(u, z)
    s, c = np.linalg.norm(v), float(u @ z)
    if s < 1e-12:
        R = np.eye(3) if c > 0 else np.diag([1.0, -1.0, -1.0])
    else:
        k = v / s
        K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
        R = np.eye(3) + s * K + (1 - c) * (K @ K)
    return rotation_matrix("z", in_plane_deg) @ R


def lattice_points(lattice, basis_frac, basis_Z, lo, hi, origin=(0, 0, 0)):
    """Atoms of an infinite crystal inside the box lo <= r <= hi (Å).

    lattice rows a1..a3 (Å, any orientation), basis in fractional coordinates.
    Returns positions (N, 3) and Z (N,).
    """
    A = np.asarray(lattice, float)
    lo, hi, origin = (np.asarray(v, float) for v in (lo, hi, origin))
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1])
                        for z in (lo[2], hi[2])]) - origin
    frac = corners @ np.linalg.inv(A)
    nmin = np.floor(frac.min(0)).astype(int) - 1
    nmax = np.ceil(frac.max(0)).astype(int) + 1
    grid = np.stack(np.meshgrid(*[np.arange(a, b + 1) for a, b in zip(nmin, nmax)],
                                indexing="ij"), -1).reshape(-1, 3)
    fr = (grid[:, None, :] + np.asarray(basis_frac, float)[None]).reshape(-1, 3)
    pos = fr @ A + origin
    Z = np.tile(np.asarray(basis_Z, int), len(grid))
    keep = np.all((pos >= lo - 1e-9) & (pos <= hi + 1e-9), axis=1)
    return pos[keep], Z[keep]


# ------------------------------------------------------------------ built-in specimens

def make_specimen(name: str, seed: int = 0, **params) -> Specimen:
    """Build a specimen by name (one of ``SPECIMENS``) or read one from a file.

    Parameters (all optional, Å unless stated):
      mgo: cells=10 (lateral size in unit cells; or size_A, lateral size in Å),
        thickness=(3, 12) (min, max atoms per
        column), terraces=10 (regions of equal column length; with at least max-min+1 of
        them every count occurs), zone="001" ("001" or "110").
      pt-particle: size_A=20.0 (extent along the cubic axes), shape="truncated-octahedron"
        (or "cuboctahedron"), zone=(0, 0, 1) (crystal direction along the beam),
        in_plane_deg=0.0, element="Pt".
      cluster: n_crystals=5, size_A=(18.0, 26.0) (diameter range, or one size for ±15 %),
        support_thickness_A=20.0
        (0 for none), materials=("Pt", "Au", "Pt", "MgO", "Au").
      amorphous: size_A=24.0 (sphere diameter), element="Ta", density_per_A3=0.0554,
        dmin_A=2.5.
      file: Z=None (atomic number when the file has none; default: element symbol that
        starts the file name, e.g. "Ta_film.mat" -> 73).
    The same seed always gives the same atoms.

    Raises ValueError naming the specimen, the problem and the valid choices.
    """
    builders = {"mgo": _mgo, "pt-particle": _pt_particle, "cluster": _cluster,
                "amorphous": _amorphous}
    key = str(name).lower()
    if key in builders:
        try:
            spec = builders[key](np.random.default_rng(seed), **params)
        except TypeError as e:
            raise ValueError(f"specimen {name!r}: bad parameter ({e}); see make_specimen's "
                             "docstring for the parameters of each specimen") from None
        spec.params = {"seed": int(seed), **_plain(params)}
        return spec
    if os.path.splitext(str(name))[1].lower() in FILE_SUFFIXES or os.path.exists(str(name)):
        extra = sorted(set(params) - {"Z"})
        if extra:
            raise ValueError(f"specimen file {name!r}: parameter(s) {', '.join(extra)} do not "
                             "apply to a file of positions (only Z=...)")
        return read_specimen_file(str(name), **params)
    raise ValueError(f"unknown specimen {name!r}: not a built-in specimen and not a file with "
                     f"a known suffix; valid choices: {', '.join(SPECIMENS)}, or a path to a "
                     f"{'/'.join(FILE_SUFFIXES)} file of atom positions")


def _plain(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, (tuple, list, np.ndarray)):
            v = [x.item() if hasattr(x, "item") else x for x in np.asarray(v).ravel()]
        elif hasattr(v, "item"):
            v = v.item()
        out[k] = v
    return out


def _terrace_levels(rng, n_regions, lo, hi):
    """Evenly spread integer levels lo..hi in random order, so that all occur."""
    levels = np.round(np.linspace(lo, hi, n_regions)).astype(int)
    return rng.permutation(levels)


def _voronoi_label(xy, seeds):
    d2 = ((xy[:, None, :] - seeds[None, :, :]) ** 2).sum(-1)
    return d2.argmin(1)


def _mgo(rng, cells: int = 10, thickness=(3, 12), terraces: int = 10, zone: str = "001",
         size_A: float | None = None):
    if size_A is not None:
        cells = max(1, int(round(float(size_A) / A_MGO)))
    n_min, n_max = (int(v) for v in thickness)
    if not (1 <= n_min <= n_max):
        raise ValueError(f"specimen 'mgo': thickness {thickness} must be (min, max) atoms "
                         "per column with 1 <= min <= max")
    zone = str(zone)
    if zone == "001":
        R = np.eye(3)
        spacing = A_MGO / 2          # atoms along an [001] column (alternating Mg, O)
    elif zone == "110":
        # new axes in crystal coordinates: x' = [-110], y' = [001], z' = [110]
        R = np.array([[-1, 1, 0], [0, 0, math.sqrt(2)], [1, 1, 0]]) / math.sqrt(2)
        spacing = A_MGO / math.sqrt(2)   # atoms along a [110] column (all Mg or all O)
    else:
        raise ValueError(f"specimen 'mgo': zone {zone!r} is not one of '001', '110'")
    L = cells * A_MGO
    lattice = (np.eye(3) * A_MGO) @ R.T
    basis_frac = np.vstack([_FCC, _ROCKSALT_ANION])
    basis_Z = np.array([12] * 4 + [8] * 4)
    depth = (n_max + n_max // 3 + 2) * spacing + 2 * A_MGO
    eps = 1e-6
    pos, Z = lattice_points(lattice, basis_frac, basis_Z, (-eps, -eps, 0.0),
                            (L - A_MGO / 2 + eps if zone == "001" else L, ) * 2 + (depth,))
    # Group atoms into projected columns and keep a contiguous run of atoms per column:
    # its start (bottom terrace) and length (top terrace) come from two Voronoi tilings.
    key = np.round(pos[:, :2] / 1e-3).astype(np.int64)
    _, col, inv_counts = np.unique(key, axis=0, return_inverse=True, return_counts=True)
    col = col.reshape(-1)
    order = np.lexsort((pos[:, 2], col))
    rank = np.empty(len(pos), int)
    starts = np.r_[0, np.cumsum(inv_counts)[:-1]]
    rank[order] = np.arange(len(pos)) - np.repeat(starts, inv_counts)
    # Column length from one Voronoi tiling (every count n_min..n_max gets a region when
    # there are enough terraces), start of the column (the bottom terrace) from another:
    # both surfaces carry steps, and the counts cover the whole range.
    b_max = max(1, (n_max - n_min) // 3)
    seeds_n = rng.uniform(0, L, (terraces, 2))
    seeds_b = rng.uniform(0, L, (terraces, 2))
    n_lv = _terrace_levels(rng, terraces, n_min, n_max)
    b_lv = _terrace_levels(rng, terraces, 0, b_max)
    xy = pos[:, :2]
    bottom = b_lv[_voronoi_label(xy, seeds_b)]
    top = bottom + n_lv[_voronoi_label(xy, seeds_n)]
    keep = (rank >= bottom) & (rank < top)
    pos, Z = pos[keep], Z[keep]
    pos[:, 2] -= pos[:, 2].min()
    grain = Grain("MgO", lattice, basis_frac, basis_Z, origin=np.zeros(3))
    return Specimen("mgo", pos, Z, np.zeros(len(pos), int), [grain])


def _polyhedron_mask(p, size_A, shape):
    half = size_A / 2
    cut = {"truncated-octahedron": 0.75, "cuboctahedron": 1.0, "octahedron": 0.5,
           "cube": 1.5}.get(shape)
    if cut is None:
        raise ValueError(f"specimen 'pt-particle': shape {shape!r} is not one of "
                         "'truncated-octahedron', 'cuboctahedron', 'octahedron', 'cube'")
    a = np.abs(p)
    return np.all(a <= half + 1e-9, axis=1) & (a.sum(1) <= cut * size_A + 1e-9)


def _fcc_element(element):
    if element == "Pt":
        return A_PT, 78
    if element == "Au":
        return A_AU, 79
    raise ValueError(f"fcc element {element!r} is not one of 'Pt', 'Au'")


def _pt_particle(rng, size_A: float = 20.0, shape: str = "truncated-octahedron",
                 zone=(0, 0, 1), in_plane_deg: float = 0.0, element: str = "Pt"):
    if not size_A > 0:
        raise ValueError(f"specimen 'pt-particle': size_A {size_A} must be > 0")
    a, z = _fcc_element(element)
    h = size_A / 2 + a
    pos, Z = lattice_points(np.eye(3) * a, _FCC, [z] * 4, (-h,) * 3, (h,) * 3)
    pos, Z = pos[_polyhedron_mask(pos, size_A, shape)], Z[_polyhedron_mask(pos, size_A, shape)]
    R = zone_rotation(zone, in_plane_deg)
    pos = pos @ R.T
    grain = Grain(element, (np.eye(3) * a) @ R.T, _FCC.copy(), np.array([z] * 4))
    return Specimen("pt-particle", pos, Z, np.zeros(len(pos), int), [grain])


def _random_rotation(rng) -> np.ndarray:
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def _crystal_sphere(material, diameter, R, centre):
    if material == "MgO":
        a, basis, bz = A_MGO, np.vstack([_FCC, _ROCKSALT_ANION]), np.array([12] * 4 + [8] * 4)
    else:
        a, z = _fcc_element(material)
        basis, bz = _FCC.copy(), np.array([z] * 4)
    r = diameter / 2
    pos, Z = lattice_points(np.eye(3) * a, basis, bz, (-r - a,) * 3, (r + a,) * 3)
    keep = (pos ** 2).sum(1) <= r * r
    pos = pos[keep] @ R.T + centre
    grain = Grain(material, (np.eye(3) * a) @ R.T, basis, bz, origin=np.asarray(centre, float))
    return pos, Z[keep], grain


def random_packing(rng, n, inside, dmin, project, iterations=60):
    """n points, spread by pushing apart pairs closer than dmin (a quick random dense
    packing). ``inside`` draws uniform points, ``project`` pulls points back into the body."""
    from scipy.spatial import cKDTree

    p = inside(n)
    for _ in range(iterations):
        pairs = cKDTree(p).query_pairs(dmin, output_type="ndarray")
        if len(pairs) == 0:
            break
        d = p[pairs[:, 1]] - p[pairs[:, 0]]
        r = np.linalg.norm(d, axis=1)
        r = np.where(r < 1e-9, 1e-9, r)
        push = (0.5 * (dmin - r) / r)[:, None] * d * 0.6
        np.add.at(p, pairs[:, 1], push)
        np.add.at(p, pairs[:, 0], -push)
        p = project(p)
    return p


def _cluster(rng, n_crystals: int = 5, size_A=(18.0, 26.0), support_thickness_A: float = 20.0,
             materials=("Pt", "Au", "Pt", "MgO", "Au")):
    n_crystals = int(n_crystals)
    if n_crystals < 1:
        raise ValueError("specimen 'cluster': n_crystals must be >= 1")
    for m in materials:
        if m not in ("Pt", "Au", "MgO"):
            raise ValueError(f"specimen 'cluster': material {m!r} is not one of 'Pt', 'Au', 'MgO'")
    if np.ndim(size_A) == 0:  # one size: diameters within ±15 % of it
        size_A = (0.85 * float(size_A), 1.15 * float(size_A))
    dmin_size, dmax_size = (float(v) for v in size_A)
    diam = rng.uniform(dmin_size, dmax_size, n_crystals)
    # Place crystals in the plane: crystal 1 overlaps crystal 0 in projection (by about a
    # third of its diameter); all others stay clear of each other, so every grain has
    # positions of its own for a real-space aperture.
    centres = np.zeros((n_crystals, 2))
    spread = 0.9 * dmax_size * math.sqrt(n_crystals)
    for i in range(1, n_crystals):
        if i == 1:
            ang = rng.uniform(0, 2 * math.pi)
            centres[1] = centres[0] + 0.62 * (diam[0] + diam[1]) / 2 * np.array(
                [math.cos(ang), math.sin(ang)])
            continue
        need = (diam[:i] + diam[i]) / 2 + 3.0
        for attempt in range(1, 1_000_000):
            c = rng.uniform(-spread / 2, spread / 2, 2)
            if np.all(np.linalg.norm(centres[:i] - c, axis=1) >= need):
                centres[i] = c
                break
            if attempt % 500 == 0:
                spread *= 1.2  # crowded: widen the field
    T = float(support_thickness_A)
    positions, Zs, grain_ids, grains = [], [], [], []
    for i in range(n_crystals):
        material = materials[i % len(materials)]
        z = T + 1.5 + diam[i] / 2 + (diam[0] + 1.5 if i == 1 else 0.0)
        p, Z, g = _crystal_sphere(material, diam[i], _random_rotation(rng),
                                  np.array([centres[i, 0], centres[i, 1], z]))
        positions.append(p)
        Zs.append(Z)
        grain_ids.append(np.full(len(p), i))
        grains.append(g)
    if T > 0:
        lo = centres.min(0) - diam.max() / 2 - 6.0
        hi = centres.max(0) + diam.max() / 2 + 6.0
        box_lo = np.array([lo[0], lo[1], 0.0])
        box_hi = np.array([hi[0], hi[1], T])
        n = int(round(0.1003 * np.prod(box_hi - box_lo)))  # amorphous C at 2.0 g/cm3
        p = random_packing(rng, n, lambda m: rng.uniform(box_lo, box_hi, (m, 3)), 1.35,
                           lambda q: np.clip(q, box_lo, box_hi), iterations=25)
        positions.append(p)
        Zs.append(np.full(n, 6))
        grain_ids.append(np.full(n, -1))
    return Specimen("cluster", np.vstack(positions), np.concatenate(Zs),
                    np.concatenate(grain_ids), grains)


def _amorphous(rng, size_A: float = 24.0, element: str = "Ta", density_per_A3: float = 0.0554,
               dmin_A: float = 2.5):
    if element not in Z_OF:
        raise ValueError(f"specimen 'amorphous': element {element!r} is not an element symbol")
    r = size_A / 2
    n = int(round(density_per_A3 * 4 / 3 * math.pi * r ** 3))

    def inside(m):
        v = rng.normal(size=(m, 3))
        v /= np.linalg.norm(v, axis=1)[:, None]
        return v * (r * rng.uniform(0, 1, (m, 1)) ** (1 / 3))

    def project(p):
        d = np.linalg.norm(p, axis=1)
        return np.where((d > r)[:, None], p * (r / np.maximum(d, 1e-12))[:, None], p)

    p = random_packing(rng, n, inside, dmin_A, project)
    return Specimen("amorphous", p, np.full(n, Z_OF[element]), np.full(n, -1), [])


# ------------------------------------------------------------------ files

def _file_error(path, problem):
    return ValueError(f"specimen file {path!r}: {problem}. Expected a .mat file with one 3xN "
                      "or Nx3 array of x y z in Å (a 4th row/column is Z), an .xyz file, or a "
                      ".csv/.txt table with columns x y z [Z]; built-in specimens: "
                      f"{', '.join(SPECIMENS)}")


def _z_from_filename(path):
    stem = os.path.basename(path)
    for sep in "_-. ":
        stem = stem.split(sep)[0]
    return Z_OF.get(stem[:1].upper() + stem[1:].lower())


def read_specimen_file(path: str, Z: int | None = None) -> Specimen:
    """Read atom positions (Å) from a .mat, .xyz, .csv or .txt file.

    Z: atomic number for files without one; default: the element symbol that starts the file
    name ("Ta_film_atomic_model.mat" -> 73). Raises ValueError with a one-line reason.
    """
    if not os.path.isfile(path):
        raise _file_error(path, "no such file")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".mat":
            arr = _read_mat(path)
        elif ext == ".xyz":
            arr = _read_xyz(path)
        elif ext in (".csv", ".txt"):
            arr = _read_table(path)
        else:
            raise _file_error(path, f"unknown suffix {ext!r}")
    except ValueError as e:
        if str(e).startswith("specimen file"):
            raise
        raise _file_error(path, str(e)) from None
    except Exception as e:  # unreadable file of any kind: say so, in one line
        raise _file_error(path, f"cannot read it ({type(e).__name__}: {e})") from None
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim != 2 or 3 not in arr.shape and 4 not in arr.shape:
        raise _file_error(path, f"array of shape {arr.shape} is not 3xN, Nx3, 4xN or Nx4")
    if arr.shape[1] not in (3, 4) or (arr.shape[0] in (3, 4) and arr.shape[1] > 4):
        arr = arr.T
    if len(arr) == 0:
        raise _file_error(path, "no atoms")
    if not np.all(np.isfinite(arr)):
        raise _file_error(path, "positions contain NaN or infinite values")
    if arr.shape[1] == 4:
        Zs = arr[:, 3]
        if np.any(Zs != np.round(Zs)) or Zs.min() < 1 or Zs.max() > 118:
            raise _file_error(path, "4th column is not atomic numbers 1..118")
        Zs = Zs.astype(int)
    else:
        Zf = Z if Z is not None else _z_from_filename(path)
        if Zf is None:
            raise _file_error(path, "no atomic numbers in the file and none given; pass Z=... "
                              "or start the file name with an element symbol (e.g. Ta_...)")
        Zs = np.full(len(arr), int(Zf))
    return Specimen(os.path.basename(path), arr[:, :3], Zs, np.full(len(arr), -1), [],
                    params={"file": os.path.abspath(path)})


def _read_mat(path):
    from scipy.io import loadmat

    d = {k: v for k, v in loadmat(path).items() if not k.startswith("__")}
    if "model" in d:
        return d["model"]
    cands = [v for v in d.values() if isinstance(v, np.ndarray) and v.ndim == 2
             and v.dtype.kind in "fiu" and (3 in v.shape or 4 in v.shape)]
    if len(cands) != 1:
        raise ValueError(f"found variables {sorted(d)}, need a variable 'model' or exactly one "
                         "3xN/Nx3 numeric array")
    return cands[0]


def _read_xyz(path):
    with open(path) as f:
        lines = [ln for ln in f.read().splitlines()]
    try:
        n = int(lines[0].split()[0])
    except (IndexError, ValueError):
        raise ValueError("first line is not the number of atoms") from None
    rows = []
    for i, ln in enumerate(lines[2:2 + n], start=3):
        parts = ln.split()
        if len(parts) < 4:
            raise ValueError(f"line {i} has fewer than 4 fields (element x y z)")
        sym = parts[0]
        z = int(sym) if sym.isdigit() else Z_OF.get(sym[:1].upper() + sym[1:].lower())
        if z is None:
            raise ValueError(f"line {i}: {sym!r} is not an element")
        rows.append([float(parts[1]), float(parts[2]), float(parts[3]), z])
    if len(rows) != n:
        raise ValueError(f"header says {n} atoms, found {len(rows)}")
    return np.array(rows).reshape(-1, 4)


def _read_table(path):
    with open(path) as f:
        lines = [ln.split("#")[0].strip() for ln in f]
    lines = [ln for ln in lines if ln]
    rows = []
    for i, ln in enumerate(lines):
        parts = ln.replace(",", " ").replace(";", " ").split()
        try:
            rows.append([float(p) for p in parts])
        except ValueError:
            if i == 0:
                continue  # a header line
            raise ValueError(f"non-numeric line {ln[:40]!r}") from None
    if not rows:
        raise ValueError("no numeric rows")
    widths = {len(r) for r in rows}
    if len(widths) != 1 or widths.pop() not in (3, 4):
        raise ValueError("rows must all have 3 (x y z) or 4 (x y z Z) columns")
    return np.array(rows)
