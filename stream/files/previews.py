"""PNG previews: one image per scan-shaped result, log-scaled detector-shaped results, and a
one-page summary figure per scan."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# Figures are drawn on an Agg canvas of their own: no pyplot, so neither the user's backend nor
# any global state is touched, and concurrent finalizations do not share a figure.


def _shown(name: str, res) -> bool:
    """2D images worth a look (the raw centre-of-mass sums and mrad copies are not)."""
    return (res.kind in ("nav", "sig") and np.ndim(res.data) == 2 and not name.startswith("com_sum")
            and not name.endswith("_mrad") and name != "com_n")


def _scaled(data: np.ndarray, kind: str) -> tuple[np.ndarray, float, float]:
    """Image to display (log for detector-shaped data, NaN shown as the low end) and the
    0.5 / 99.5 percentile display range."""
    data = np.asarray(data, dtype=np.float64)
    if kind.startswith("sig"):
        data = np.log1p(np.clip(data, 0, None))  # diffraction spans decades
    finite = np.isfinite(data)
    if not finite.any():
        return np.zeros_like(data), 0.0, 1.0
    lo, hi = np.percentile(data[finite], [0.5, 99.5])
    return np.where(finite, data, lo), lo, (hi if hi > lo else lo + 1)


def write_previews(directory: str | Path, stem: str, results: dict) -> list[Path]:
    """``<stem>_<name>.png`` for every 2D result of kind nav or sig; returns the paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, res in results.items():
        if not _shown(name, res):
            continue
        img, vmin, vmax = _scaled(res.data, res.kind)
        path = directory / f"{stem}_{name}.png"
        matplotlib.image.imsave(path, img, cmap="magma" if res.kind == "sig" else "gray",
                                vmin=vmin, vmax=vmax)
        written.append(path)
    return written


def write_summary_figure(path: str | Path, title: str, results: dict, position_frames=None,
                         expected_per_position: int | None = None) -> Path:
    """A single figure: every nav image, the diffraction sum (log) and the completeness map."""
    panels = [(n, r) for n, r in results.items() if _shown(n, r)]
    if position_frames is not None:
        panels.append(("frames received", None))
    ncol = min(4, len(panels)) or 1
    nrow = -(-len(panels) // ncol)
    fig = Figure(figsize=(3.2 * ncol, 3.2 * nrow))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrow, ncol, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, res) in zip(axes.flat, panels):
        if res is None:
            im = ax.imshow(position_frames, cmap="viridis", vmin=0,
                           vmax=expected_per_position or None, interpolation="nearest")
            fig.colorbar(im, ax=ax, fraction=0.046)
        else:
            img, vmin, vmax = _scaled(res.data, res.kind)
            ax.imshow(img, cmap="magma" if res.kind == "sig" else "gray", vmin=vmin, vmax=vmax,
                      interpolation="nearest")
        ax.set_title(name + (" (log)" if res is not None and res.kind == "sig" else ""), fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return Path(path)


def write_scan_previews(r) -> list[str]:
    """Every preview of a finalized scan (a ``ScanResult`` with a path): one PNG per 2D result
    and the summary page, in ``previews/`` beside the scan file."""
    directory = Path(r.path).parent / "previews"
    paths = [str(p) for p in write_previews(directory, r.scan_id, r.result_objects)]
    paths.append(str(write_summary_figure(directory / f"{r.scan_id}_summary.png", f"{r.scan_id} ({r.status})",
                                          r.result_objects, r.position_frames, r.expected_frames_per_position)))
    return paths
