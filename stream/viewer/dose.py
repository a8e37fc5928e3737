"""What the scan's dose can measure, on the page (issue 18's dose advisor where a person decides).

The numbers come from the science code, not from here: a written scan shows the advice its 2D
stages stored (``stream.stages.runner.read_dose_advice``: ``operators.imaging.dose.advise`` on
the scan's own columns — Cramér–Rao position precision, whether atom counting is possible and
at what dose). While a scan runs, the page shows the dose so far and, when the ``columns``
stage is configured, ``operators.imaging.dose.dose_advice`` on the rows of its image already
received (at most every ``LIVE_EVERY_S``, in a thread: it takes about 0.5 s for 128²).
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from stream.session.live_view import received_block

log = logging.getLogger("stemstream.viewer")
LIVE_EVERY_S = 5.0


def dose_line(events: float, positions: float, step_A: float | None, so_far: bool = False) -> str:
    """"dose 1.3e+03 e⁻/Å² (80 e⁻ per probe position)" from electrons, positions and the scan
    step (Å); per position only without a step; empty without positions."""
    if positions <= 0:
        return ""
    per = events / positions
    what = "dose so far" if so_far else "dose"
    if step_A:
        return f"{what} {per / step_A ** 2:.3g} e⁻/Å² ({per:.3g} e⁻ per probe position)"
    return f"{what} {per:.3g} e⁻ per probe position (no scan step: e⁻/Å² unknown)"


def written_advice(path: str) -> list[str]:
    """The advice lines a 2D stage stored in the scan file (counting, else columns, else
    phase), with the stage named; empty when none did."""
    from stream.stages.runner import read_dose_advice
    try:
        d = read_dose_advice(path)
    except (OSError, KeyError, ValueError):
        return []
    if not d:
        return []
    return [f"{line} (stage {d['stage']})" for line in d["lines"]]


class LiveAdvisor:
    """``dose_advice`` on the received part of a running scan's image, in a thread, cached per
    scan: ``lines(scan_id, image, step_A, per_position)`` returns the last advice (empty at
    first) and starts a new one when the last is older than ``LIVE_EVERY_S``.

    params: the ``columns`` stage's parameters (``min_distance_px``, ``smooth_px``)."""

    def __init__(self, params: dict):
        self.params = params
        self._lock = threading.Lock()
        self._last: dict[str, tuple[float, list[str]]] = {}
        self._busy = False

    def lines(self, scan_id: str, image: np.ndarray, step_A: float | None, per_position: float) -> list[str]:
        with self._lock:
            t, lines = self._last.get(scan_id, (0.0, []))
            if self._busy or time.monotonic() - t < LIVE_EVERY_S:
                return lines
            self._busy = True
        threading.Thread(target=self._run, args=(scan_id, image, step_A, per_position), daemon=True,
                         name="stemstream-viewer-dose").start()
        return lines

    def _run(self, scan_id, image, step_A, per_position) -> None:
        lines = []
        try:
            block = received_block(image)  # at most 128 x 128 (stream.session.live_view)
            crop = None if block is None else image[block]
            if crop is not None:
                from operators.imaging.dose import dose_advice
                a = dose_advice(crop, min_distance_px=float(self.params.get("min_distance_px", 3.0)),
                                smooth_px=float(self.params.get("smooth_px") or 0.0) or 1.0, step_A=step_A,
                                dose_e_per_position=per_position)
                lines = [f"{x} (first look: {crop.shape[0]}×{crop.shape[1]} positions received)"
                         for x in a.lines()]
        except Exception as e:  # noqa: BLE001 - advice is not worth the page
            log.info("viewer: no live dose advice: %s", e)
        with self._lock:
            self._last[scan_id] = (time.monotonic(), lines)
            for old in list(self._last)[:-4]:
                del self._last[old]
            self._busy = False
