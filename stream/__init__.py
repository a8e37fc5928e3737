"""Transport and orchestration, one package per job (docs/ARCHITECTURE.md):

transport/  the wire protocol, the receiver inside each worker, spill, reports
files/      the scan file, recordings, stempy/LiberTEM exchange, replay, previews
stages/     downstream work on finished scans and tilt series
config.py   the pipeline configuration and the operators it builds for a scan
session/    the dask cluster, the scan coordinator, finalizing, process-file
cli/        the ``stemstream`` command
"""

import operators  # noqa: F401 - sets numba's cache directory before any kernel is defined

__version__ = "0.1.0"
