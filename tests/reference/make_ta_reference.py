"""Write tests/data/ta_film_authors_port.npz from the literal port of the authors' MATLAB
(``authors_port.py``, Yuan et al. 2022, AET-AmorphousMaterials/Supplementary-Data-Codes
``7_Data_analysis``) run on the published Ta film. About 2 minutes.

    python tests/reference/make_ta_reference.py [DATA_DIR]

Stored, per atom in the file's order: the raw and cleaned crystalline flags, the Voronoi status
(0 indexed, 1 on the hull, 2 fewer than 5 neighbours kept, 3 recomputed cell unbounded, -1
crystalline: not indexed) and index n3..n6; digests (``digests.py``) and counts of the accepted
tetrahedra and of each motif kind 3..8, their fractions of the amorphous tetrahedra, and the
Main_4 numbers (selected motifs, networks of >= 5, sharing histograms, icosahedral filling).
"""

import sys
from pathlib import Path

import numpy as np
import scipy.io as sio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import authors_port as ap  # noqa: E402
from digests import motif_digest, set_digest  # noqa: E402


def main(data_dir):
    d = sio.loadmat(Path(data_dir) / "Ta_film_BOO_normalized.mat")
    model = d["model"].astype(np.float64).T
    order = d["order"].ravel().astype(np.float64)
    n = len(model)
    crystal, amorphous = ap.clean_crystalline(model, order)
    P = np.vstack([model[amorphous], model[crystal]])     # the authors' [amorphous; crystal]
    orig = np.concatenate([amorphous, crystal])           # row of P -> atom of the file
    n_amor = len(amorphous)
    vr = ap.voronoi_authors(P, n_amor)
    status = np.full(n, -1, np.int8)
    index = np.full((n, 4), -1, np.int8)
    status[orig[:n_amor]] = vr["status"][:n_amor]
    ok = vr["status"][:n_amor] == 0
    index[orig[:n_amor][ok]] = vr["index"][:n_amor][ok][:, 2:]
    T, pairs, f, res, ic_amor = ap.motifs_authors(P, n_amor, 0.255)
    T_atoms = orig[T]
    out = dict(crystalline_raw=order > 0.5, crystalline_clean=np.isin(np.arange(n), crystal),
               voronoi_status=status, voronoi_index=index, n_tetrahedra=len(T),
               tetrahedra_digest=set_digest(T_atoms))
    for k in range(3, 9):
        out[f"n_{k}"] = len(f[k])
        out[f"digest_{k}"] = motif_digest(T_atoms, f[k])
        out[f"fraction_{k}"] = res[f"frac_tet_in_{k}"]
    out["n_amorphous_tetrahedra"] = res["n_amorphous_tetrahedra"]
    out["tetrahedral_atom_fraction"] = res["tetrahedral_atom_fraction"]
    m4 = ap.main4_stats(T, f, ic_amor)    # Main_4, with the authors' selection as they wrote it
    for k in (4, 5, 6):
        out[f"n_selected_{k}"] = m4[f"n_{k}_amorphous_sel"]
        out[f"n_half_amorphous_{k}"] = m4[f"n_{k}_half_amorphous"]   # the rule Main_4 meant
        out[f"networks_{k}_ge5"] = np.array(m4[f"networks_{k}_sizes_ge5"], np.int64)
    for name in ("pb_vertex_sharing_hist", "pb_edge_sharing_hist", "icosahedral_filling_rows"):
        h = m4[name]
        out[name] = np.array([h.get(i, 0) for i in range(max(h) + 1)], np.int64)
    target = HERE.parent / "data" / "ta_film_authors_port.npz"
    np.savez_compressed(target, **out)
    print(target, {k: v for k, v in out.items() if np.ndim(v) == 0})


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/work/shared/data/aet-amorphous")
