"""Computation: pure array code and numba kernels (docs/ARCHITECTURE.md).

At this level, the streaming operators over electron events (virtual.py, com.py,
diffraction.py, apertures.py, completeness.py, events.py, fused.py; docs/OPERATORS.md). In
packages by field, the algorithms of the downstream stages over finished scans: imaging/
(phase, columns, atom counting), crystallography/ (grains, Bragg peaks), tomography/
(projector, RESIRE, tracing) and structure/ (3D neighbours, order, Voronoi, motifs, pair
distribution, per-atom tables).

No sockets or dask here (the stage tables' writers in structure/atom_tables.py and
crystallography/peak_table.py take files or h5py groups they are given); ``stream`` decides
where these run.
"""

from operators import numba_cache

numba_cache.configure()  # before any kernel is defined
