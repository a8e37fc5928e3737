"""Computation: pure array code and numba kernels.

Streaming operators over electron events (virtual.py, com.py, diffraction.py, apertures.py,
completeness.py, events.py; docs/OPERATORS.md) and the algorithms of the downstream stages over
finished scans: phase.py, columns.py, counting.py, grains.py, bragg.py (2D), projector.py,
tomography.py, tracing.py and the 3D atom statistics (neighbors.py, order3d.py, voronoi.py,
motifs.py, lattices.py, coordination.py, displacement.py, pair_distribution.py, ...).

No sockets or dask here (the stage tables' writers in atom_tables.py and peak_table.py take
files or h5py groups they are given); ``stream`` decides where these run.
"""

from . import numba_cache

numba_cache.configure()  # before any kernel is defined
