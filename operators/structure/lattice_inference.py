"""Which lattice, if any, a set of atom positions has — inferred from the data, never assumed.

:func:`infer_lattice`:

1. the neighbour shell is the first valley of g(r) (or the ``cutoff`` given);
2. the bond-orientational order of every atom (Q̄4, Q̄6, normalised order) in that shell, and
   the authors' cleaning of isolated crystalline atoms (``order3d``; Yuan et al. 2022);
3. fewer than ``min_crystalline`` (half) of the atoms crystalline after cleaning: the sample
   is **amorphous** (the Ta film: 20 %);
4. otherwise the crystalline atoms vote: each one's (Q̄4, Q̄6) is compared with the perfect
   first shells of fcc, hcp, bcc (8 or 14 neighbours) and sc; the lattice within
   ``tolerance`` (0.05) of most of them — and of at least half of the crystalline atoms —
   is the answer. If none is, the sample is crystalline in no lattice this package knows
   (a distorted or mixed structure): :class:`LatticeUnknown`, whose message says to give the
   lattice (``--lattice``).

Examples
--------
>>> import numpy as np
>>> from operators.structure.lattice_inference import infer_lattice
>>> g = np.stack(np.meshgrid(*[np.arange(5)] * 3, indexing="ij"), -1).reshape(-1, 3)
>>> fcc = (g[:, None] + np.array([[0, 0, 0], [.5, .5, 0], [.5, 0, .5], [0, .5, .5]])).reshape(-1, 3)
>>> inf = infer_lattice(fcc * 3.92 + np.random.default_rng(0).normal(0, 0.05, (500, 3)))
>>> inf.lattice, inf.votes["fcc"] > 0.9
('fcc', True)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# (Q̄4, Q̄6) of the perfect first shells (README of the AET data, order3d's tests); the
# lattice name each one means in operators.structure.lattices
REFERENCES = {"fcc": (0.190941, 0.574524, "fcc"), "hcp": (0.097222, 0.484762, "hcp"),
              "bcc8": (0.509175, 0.628539, "bcc"), "bcc14": (0.036370, 0.510688, "bcc14"),
              "sc": (0.763763, 0.353553, "sc")}


class LatticeUnknown(ValueError):
    """The atoms are crystalline but match no known lattice: give the lattice."""


@dataclass(frozen=True)
class LatticeInference:
    """lattice : 'amorphous' or a name of ``operators.structure.lattices``; cutoff : the shell
    used (Å); cutoff_source; crystalline_fraction : after the authors' cleaning (raw:
    crystalline_fraction_raw); votes : {reference: fraction of the crystalline atoms within
    tolerance of it}; reason : one sentence."""

    lattice: str
    cutoff: float
    cutoff_source: str
    crystalline_fraction: float
    crystalline_fraction_raw: float
    votes: dict = field(default_factory=dict)
    reason: str = ""


def infer_lattice(positions, cutoff: float | None = None, min_crystalline: float = 0.5,
                  tolerance: float = 0.05, min_vote: float = 0.5, pdf=None,
                  bond_order=None) -> LatticeInference:
    """Infer the lattice of an atomic model (module docstring).

    Parameters
    ----------
    positions : (N, 3) Å.
    cutoff : neighbour shell (Å), default the first valley of g(r).
    min_crystalline : fraction of crystalline atoms (after cleaning) below which the sample is
        amorphous.
    tolerance : largest distance in the (Q̄4, Q̄6) plane from a reference for an atom's vote.
    min_vote : fraction of the crystalline atoms the winning lattice needs.
    pdf, bond_order : a ready ``PairDistribution`` / ``BondOrder`` of these atoms (skips the
        computation; the bond order must use ``cutoff``).

    Returns
    -------
    LatticeInference; LatticeUnknown (a ValueError) when crystalline but no lattice matches.
    """
    from operators.structure.neighbors import check_positions
    from operators.structure.order3d import bond_orientational_order
    from operators.structure.pair_distribution import first_valley, pair_distribution

    pos = check_positions(positions, min_atoms=5)
    if cutoff is None:
        pdf = pair_distribution(pos, 12.0, 0.05) if pdf is None else pdf
        cutoff = first_valley(pdf)
        source = "first valley of g(r)"
        if not np.isfinite(cutoff):
            raise LatticeUnknown("cannot infer the lattice: g(r) has no valley up to 12 Å; give "
                                 "the lattice (--lattice) or the neighbour cutoff (--cutoff)")
    else:
        source = "given"
    bo = bond_orientational_order(pos, float(cutoff)) if bond_order is None else bond_order
    frac, raw = float(bo.crystalline_fraction), float(bo.crystalline_fraction_raw)
    if frac < min_crystalline:
        return LatticeInference("amorphous", float(cutoff), source, frac, raw, {},
                                f"{frac:.1%} of the atoms crystalline (order > 0.5, isolated ones "
                                "cleaned), fewer than half: amorphous")
    q = np.c_[bo.q4_bar, bo.q6_bar][bo.crystalline]
    votes = {}
    for name, (q4, q6, _) in REFERENCES.items():
        votes[name] = float((np.hypot(q[:, 0] - q4, q[:, 1] - q6) <= tolerance).mean())
    best = max(votes, key=votes.get)
    if votes[best] < min_vote:
        shown = ", ".join(f"{k} {v:.0%}" for k, v in sorted(votes.items(), key=lambda kv: -kv[1]))
        med = np.median(q, axis=0)
        raise LatticeUnknown(
            f"cannot infer the lattice: {frac:.0%} of the atoms are crystalline, but their "
            f"bond order (median Q̄4 {med[0]:.3f}, Q̄6 {med[1]:.3f}) is within {tolerance} of no "
            f"perfect lattice ({shown} of them); give the lattice (--lattice fcc, bcc, bcc14, "
            "hcp, sc or amorphous)")
    name = REFERENCES[best][2]
    return LatticeInference(name, float(cutoff), source, frac, raw, votes,
                            f"{frac:.1%} of the atoms crystalline; {votes[best]:.0%} of them have "
                            f"the bond order of {best}")
