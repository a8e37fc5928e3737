"""Computation over electron events: pure array code and numba kernels.

No sockets, files or dask here; ``stream`` decides where these run.
"""
