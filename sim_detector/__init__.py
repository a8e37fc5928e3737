"""Detector emulator: specimens, a fast forward model, and a ZeroMQ publisher.

Knows nothing of dask or operators; it imports only the wire protocol (``stream.protocol``).
"""

import stream  # noqa: F401, E402 - numba's cache directory (see operators/numba_cache.py)
