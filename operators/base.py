"""The operator protocol: per-scan state, process, merge, finalize.

An operator owns a *state*: a dict of numpy arrays that a worker accumulates chunk by chunk
(``process`` adds into it in place, so no image-sized partial is allocated per chunk). States
of different workers combine with ``merge``, which must be associative and commutative; for
integer sums it is exact, so results do not depend on how frames were spread over workers,
chunks or sources. ``finalize`` turns the merged state into named results.

    state = op.new_state()
    op.process(state, chunk)          # on the worker that received the chunk
    op.merge(state_a, state_b)        # anywhere, any order
    results = op.finalize(state_a)    # once per scan
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from operators.chunk import Chunk

State = dict  # name -> np.ndarray


@dataclass
class Result:
    """One named result of an operator.

    kind: 'nav' (scan-shaped image, (ny, nx)), 'sig' (detector-shaped, (h, w)),
        'nav_stack' / 'sig_stack' (a leading axis of several), or 'table' (anything else).
    unit: physical unit of the values ('counts', 'px', 'mrad', ...).
    """

    data: np.ndarray
    kind: str
    unit: str = ""
    description: str = ""
    attrs: dict = field(default_factory=dict)


class Operator:
    """Base class; subclasses set ``name`` and implement new_state, process and finalize.

    state_kinds: how each state array is laid out — 'nav' (last axis: scan positions, so a
        live snapshot may send only the positions that changed) or 'sig' (anything else).
    live: whether partial results of this operator are worth showing while a scan runs.
    fused_role: the part this operator can play in the one-pass kernel of
        ``operators.fused`` ('virtual', 'com' or 'diffraction'), None if it cannot.
    """

    name = "operator"
    state_kinds: dict[str, str] = {}
    live = True
    fused_role: str | None = None

    def new_state(self) -> State:
        raise NotImplementedError

    def process(self, state: State, chunk: Chunk) -> None:
        """Accumulate the events of ``chunk`` into ``state`` in place."""
        raise NotImplementedError

    def merge(self, dest: State, src: State) -> None:
        """dest += src, array by array (exact for integer arrays)."""
        for key, value in src.items():
            dest[key] += value

    def finalize(self, state: State) -> dict[str, Result]:
        raise NotImplementedError
