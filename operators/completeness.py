"""Frame completeness: which (source, frame) parts of a scan arrived, and how often.

Frames are numbered in raster order with flyback: frame = (row*(nx+flyback) + col)*fpp + k,
k < frames_per_position. Every source (detector sector) sends its part of every frame, so a
frame is complete when all ``n_sources`` parts arrived (a part that arrived more than once is
duplicated, and counted once).

Examples
--------
>>> import numpy as np
>>> from operators.completeness import Completeness
>>> op = Completeness(n_sources=2, scan_shape=(2, 3))
>>> state = op.new_state()
>>> op.add_range(state, source=0, first=0, count=6)
>>> op.add_range(state, source=1, first=0, count=4)
>>> op.add_range(state, source=1, first=3, count=1)      # frame 3 of source 1 twice
>>> s = op.summary(state)
>>> s["missing_frames"], s["duplicated_frames"]
([4, 5], [3])
"""

from __future__ import annotations

import numpy as np
from numba import njit

from operators.base import Operator, Result, State
from operators.chunk import Chunk
from operators.kernels import NJIT, shape2

SATURATED = np.iinfo(np.uint16).max


@njit(**NJIT)
def _count_kernel(frames, sources, received):
    for i in range(frames.shape[0]):
        s = sources[i]
        f = frames[i]
        if received[s, f] < 65535:
            received[s, f] += 1


@njit(**NJIT)
def _repeat_kernel(frames, sources, seen, out):
    for i in range(frames.shape[0]):
        s = sources[i]
        f = frames[i]
        if seen[s, f]:
            out[i] = True
        else:
            seen[s, f] = True


@njit(**NJIT)
def _tally_kernel(received, nx, flyback, fpp, per_source, frame_flags, position_frames):
    """One pass over ``received`` (n_sources, n_frames): per source [parts received, parts
    received more than once, extra copies]; per frame bit 1 if some part is missing, bit 2 if
    some part came more than once; per position (flyback excluded) the distinct parts."""
    n_sources, n_frames = received.shape
    cols = nx + flyback
    f = 0
    for row in range(n_frames // (cols * fpp)):
        for col in range(cols):
            for _ in range(fpp):
                got = 0
                flags = 0
                for s in range(n_sources):
                    r = received[s, f]
                    if r == 0:
                        flags |= 1
                    else:
                        got += 1
                        per_source[s, 0] += 1
                        if r > 1:
                            flags |= 2
                            per_source[s, 1] += 1
                            per_source[s, 2] += r - 1
                frame_flags[f] = flags
                if col < nx:
                    position_frames[row * nx + col] += got
                f += 1


def _check_parts(frames, sources, n_sources, n_frames, where):
    frames = np.asarray(frames, dtype=np.int64)
    sources = np.asarray(sources, dtype=np.int64)
    if frames.shape != sources.shape or frames.ndim != 1:
        raise ValueError(f"{where}: frames {frames.shape} and sources {sources.shape} must be "
                         f"1-d of equal length")
    if len(frames):
        if frames.min() < 0 or frames.max() >= n_frames:
            raise ValueError(f"{where}: frame numbers {frames.min()}..{frames.max()} outside "
                             f"the scan's 0..{n_frames - 1}")
        if sources.min() < 0 or sources.max() >= n_sources:
            raise ValueError(f"{where}: sources {sources.min()}..{sources.max()} outside "
                             f"0..{n_sources - 1}")
    return frames, sources


def repeat_mask(frames, sources, seen) -> np.ndarray:
    """Mark frame parts already seen, to drop duplicate copies.

    Parameters
    ----------
    frames, sources : (n,) frame numbers and sources of n frame parts, in arrival order.
    seen : (n_sources, n_frames) bool, updated in place: every part of this call is marked.

    Returns
    -------
    (n,) bool, True where (source, frame) was already in ``seen`` or occurs earlier in these
    arrays; keeping the False parts keeps exactly one copy of each.
    """
    if seen.dtype != bool or seen.ndim != 2:
        raise ValueError(f"repeat_mask: seen must be a 2-d bool (n_sources, n_frames), got "
                         f"{seen.dtype} {seen.shape}")
    frames, sources = _check_parts(frames, sources, seen.shape[0], seen.shape[1], "repeat_mask")
    out = np.zeros(len(frames), dtype=bool)
    _repeat_kernel(frames, sources, seen, out)
    return out


def runs(sorted_frames: np.ndarray) -> list[list[int]]:
    """Sorted frame numbers -> [[first, stop), ...] runs of consecutive frames."""
    if len(sorted_frames) == 0:
        return []
    breaks = np.nonzero(np.diff(sorted_frames) != 1)[0] + 1
    starts = sorted_frames[np.r_[0, breaks]]
    stops = sorted_frames[np.r_[breaks - 1, len(sorted_frames) - 1]] + 1
    return [[int(a), int(b)] for a, b in zip(starts, stops)]


class Completeness(Operator):
    """Counts the arrivals of every (source, frame) part of a scan, flyback frames included.

    Parameters
    ----------
    n_sources : sources (detector sectors) each frame is split over.
    scan_shape : (ny, nx) probe positions (flyback excluded).
    frames_per_position : detector frames per probe position (fpp).
    flyback : extra frames-per-row columns recorded during flyback.
    name : operator name.
    max_listed : frame lists in :meth:`summary` are cut at this length (the counts and the
        ranges stay complete).

    Notes
    -----
    n_frames = ny*(nx+flyback)*fpp. State ``{"received": (n_sources, n_frames) uint16}``:
    arrivals per part, saturating at 65535 (merge never wraps). Results: ``received`` (table)
    ``position_frames`` (ny, nx): distinct frame parts received per position (duplicates
    counted once), fpp*n_sources when complete; ``missing_frames`` and ``duplicated_frames``
    (sorted int64 frame numbers, complete); attrs hold the :meth:`summary` numbers.
    """

    live = False

    def __init__(self, n_sources, scan_shape, frames_per_position=1, flyback=0,
                 name="completeness", max_listed=100_000):
        self.name = name
        self.n_sources = int(n_sources)
        self.scan_shape = shape2(scan_shape, "scan_shape")
        self.fpp = int(frames_per_position)
        self.flyback = int(flyback)
        if self.n_sources < 1 or self.fpp < 1 or self.flyback < 0:
            raise ValueError(f"Completeness: need n_sources >= 1, frames_per_position >= 1, "
                             f"flyback >= 0; got {n_sources}, {frames_per_position}, {flyback}")
        ny, nx = self.scan_shape
        self.n_frames = ny * (nx + self.flyback) * self.fpp
        self.max_listed = int(max_listed)

    def new_state(self) -> State:
        return {"received": np.zeros((self.n_sources, self.n_frames), dtype=np.uint16)}

    def process(self, state: State, chunk: Chunk) -> None:
        frames, sources = _check_parts(chunk.frames, chunk.sources, self.n_sources,
                                       self.n_frames, f"Completeness {self.name!r}")
        _count_kernel(frames, sources, state["received"])

    def add_range(self, state: State, source: int, first: int, count: int) -> None:
        """Count one arrival of frames first .. first+count-1 of ``source``."""
        source, first, count = int(source), int(first), int(count)
        if not (0 <= source < self.n_sources and count >= 0 and first >= 0
                and first + count <= self.n_frames):
            raise ValueError(f"Completeness {self.name!r}: range source={source}, first={first}, "
                             f"count={count} outside {self.n_sources} sources x "
                             f"{self.n_frames} frames")
        row = state["received"][source, first:first + count]
        row += row < SATURATED

    def merge(self, dest: State, src: State) -> None:
        """Saturating dest += src."""
        total = dest["received"].astype(np.uint32)
        total += src["received"]
        np.minimum(total, SATURATED, out=total)
        dest["received"][...] = total

    def _tally(self, state: State):
        """(per source [received, duplicated, extra copies] (n_sources, 3) int64, per frame
        flags (1 missing, 2 duplicated) uint8, position_frames (ny, nx) int64): one pass."""
        ny, nx = self.scan_shape
        rec = np.ascontiguousarray(state["received"])
        per_source = np.zeros((self.n_sources, 3), np.int64)
        flags = np.empty(self.n_frames, np.uint8)
        pf = np.zeros(ny * nx, np.int64)
        _tally_kernel(rec, nx, self.flyback, self.fpp, per_source, flags, pf)
        return per_source, flags, pf.reshape(ny, nx)

    def position_frames(self, state: State) -> np.ndarray:
        """(ny, nx) int64 distinct frame parts received per position (flyback excluded)."""
        return self._tally(state)[2]

    def summary(self, state: State) -> dict:
        """Plain-Python report: counts, missing and duplicated frames.

        Keys: n_frames, n_sources, complete (bool: every part of every frame arrived at least
        once; duplicates are counted once and do not make a scan incomplete),
        n_frames_received (frames of which every source's part arrived), per_source (list of
        dicts: source, received / missing / duplicated frame counts, extra_copies),
        n_missing, missing_frames (sorted list; only the first max_listed when
        missing_truncated), missing_ranges ([first, stop) runs, always complete), the same
        for duplicated, and incomplete_positions (positions with fewer than fpp*n_sources
        distinct parts). A frame is missing if any source's part is missing, duplicated if
        any part arrived more than once. Use n_missing / n_duplicated for the numbers.
        """
        return self.report(state)[1]

    def report(self, state: State) -> tuple[dict[str, Result], dict]:
        """(``finalize``'s results, ``summary``) from one pass over the arrivals."""
        per, flags, pf = self._tally(state)
        missing = np.flatnonzero(flags & 1).astype(np.int64, copy=False)  # sorted frame numbers
        duplicated = np.flatnonzero(flags & 2).astype(np.int64, copy=False)
        out = {"n_frames": self.n_frames, "n_sources": self.n_sources,
               "complete": bool(len(missing) == 0),
               "per_source": [{"source": s, "received": int(per[s, 0]),
                               "missing": self.n_frames - int(per[s, 0]),
                               "duplicated": int(per[s, 1]), "extra_copies": int(per[s, 2])}
                              for s in range(self.n_sources)]}
        out["n_frames_received"] = self.n_frames - len(missing)
        for key, frames in (("missing", missing), ("duplicated", duplicated)):
            out[f"n_{key}"] = len(frames)
            out[f"{key}_frames"] = frames[:self.max_listed].tolist()
            out[f"{key}_truncated"] = bool(len(frames) > self.max_listed)
            out[f"{key}_ranges"] = runs(frames)
        out["incomplete_positions"] = int(np.count_nonzero(pf < self.fpp * self.n_sources))
        return self._results(state, out, pf, missing, duplicated), out

    def finalize(self, state: State) -> dict[str, Result]:
        return self.report(state)[0]

    def _results(self, state: State, s: dict, pf, missing, duplicated) -> dict[str, Result]:
        attrs = {"n_frames": s["n_frames"], "n_sources": s["n_sources"],
                 "frames_per_position": self.fpp, "flyback": self.flyback,
                 "complete": s["complete"], "n_frames_received": s["n_frames_received"],
                 "n_missing": s["n_missing"], "n_duplicated": s["n_duplicated"],
                 "incomplete_positions": s["incomplete_positions"],
                 "received_per_source": [p["received"] for p in s["per_source"]],
                 "missing_per_source": [p["missing"] for p in s["per_source"]],
                 "duplicated_per_source": [p["duplicated"] for p in s["per_source"]]}
        return {
            "received": Result(state["received"].copy(), "table", "arrivals",
                               "arrivals of each (source, frame) part; frame = "
                               "(row*(nx+flyback)+col)*fpp + k; saturates at 65535", attrs),
            "position_frames": Result(pf, "nav", "frame parts",
                                      f"distinct frame parts received per position; "
                                      f"{self.fpp * self.n_sources} when complete", dict(attrs)),
            "missing_frames": Result(missing,
                                     "table", "frame", "frames of which some source's part never "
                                     "arrived, sorted", {"n_missing": s["n_missing"]}),
            "duplicated_frames": Result(duplicated,
                                        "table", "frame", "frames of which some source's part "
                                        "arrived more than once, sorted",
                                        {"n_duplicated": s["n_duplicated"]}),
        }
