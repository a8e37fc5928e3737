"""Summed diffraction pattern of the whole scan.

Examples
--------
>>> from operators.diffraction import DiffractionSum
>>> op = DiffractionSum((32, 40))
>>> state = op.new_state()                  # then op.process(state, chunk) per chunk
>>> op.finalize(state)["diffraction_sum"].data.shape
(32, 40)
"""

from __future__ import annotations

import numpy as np
from numba import njit

from operators.base import Operator, Result, State
from operators.chunk import Chunk
from operators.kernels import NJIT, raise_if_bad, shape2


@njit(**NJIT)
def sum_kernel(positions, offsets, indices, n_positions, total):
    """total[idx] += 1 for every event of a non-flyback frame; returns out-of-range counts."""
    n_pix = total.shape[0]
    bad_ev = 0
    bad_fr = 0
    for i in range(positions.shape[0]):
        p = positions[i]
        if p < 0:
            continue
        if p >= n_positions:
            bad_fr += 1
            continue
        for e in range(offsets[i], offsets[i + 1]):
            idx = np.int64(indices[e])
            if idx < n_pix:
                total[idx] += 1
            else:
                bad_ev += 1
    return bad_ev, bad_fr


class DiffractionSum(Operator):
    """Sum of all (non-flyback) frames: electrons per detector pixel.

    Parameters
    ----------
    frame_shape : (h, w) detector pixels.
    name : operator name; the result is ``diffraction_{name}`` ("diffraction_sum").
    n_positions : optional number of scan positions, to reject chunks with positions beyond
        the scan; by default any position >= 0 counts.

    Notes
    -----
    State ``{"sum": (h*w,) int64}``; result ``diffraction_sum`` (h, w) int64 counts, kind "sig".
    """

    fused_role = "diffraction"
    state_kinds = {"sum": "sig"}

    def __init__(self, frame_shape, name="sum", n_positions=None):
        self.name = name
        self.frame_shape = shape2(frame_shape, "frame_shape")
        self.n_positions = np.iinfo(np.int64).max if n_positions is None else int(n_positions)

    def new_state(self) -> State:
        return {"sum": np.zeros(self.frame_shape[0] * self.frame_shape[1], dtype=np.int64)}

    def process(self, state: State, chunk: Chunk) -> None:
        bad = sum_kernel(chunk.positions, chunk.offsets, chunk.indices,
                         np.int64(self.n_positions), state["sum"])
        raise_if_bad(f"DiffractionSum {self.name!r}", *bad, len(state["sum"]),
                     self.n_positions)

    def finalize(self, state: State) -> dict[str, Result]:
        data = state["sum"].reshape(self.frame_shape).copy()
        return {f"diffraction_{self.name}": Result(
            data, "sig", "counts", "electrons per detector pixel summed over all probe positions",
            {"total_counts": int(data.sum())})}
