"""Order-free digests of sets of tetrahedra and motifs, to compare ours with the literal port of
the authors' code (``authors_port.py``) through a small stored file
(``tests/data/ta_film_authors_port.npz``, made by ``make_ta_reference.py``)."""

import hashlib

import numpy as np


def tetra_keys(tets) -> np.ndarray:
    """(T,) int64 key of each tetrahedron (4 atom indices < 2¹⁴, order-free)."""
    t = np.sort(np.asarray(tets, np.int64).reshape(-1, 4), axis=1)
    return ((t[:, 0] * 2 ** 14 + t[:, 1]) * 2 ** 14 + t[:, 2]) * 2 ** 14 + t[:, 3]


def set_digest(rows) -> str:
    """sha256 of a set of rows (each row a set of integers): rows sorted within and between."""
    a = np.sort(np.asarray(rows, np.int64), axis=1) if len(rows) else np.zeros((0, 1), np.int64)
    a = a[np.lexsort(a.T[::-1])] if len(a) else a
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def motif_digest(tets, member_rows) -> str:
    """Digest of motifs given as rows of tetrahedron indices into ``tets`` (atom indices)."""
    keys = tetra_keys(tets)
    return set_digest([keys[np.asarray(r, np.int64)] for r in member_rows])
