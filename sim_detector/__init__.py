"""Detector emulator: specimens, a fast forward model, and a ZeroMQ publisher.

Knows nothing of dask or operators; it imports only the wire protocol (``stream.transport.protocol``).
"""

# Importing the protocol runs stream/__init__.py, which points numba's cache at the right
# directory (operators/numba_cache.py) before any kernel here is defined.
import stream.transport.protocol  # noqa: F401, E402
