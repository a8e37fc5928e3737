"""Transport and orchestration: wire protocol, receivers, scan lifecycle, storage, CLI."""

import operators  # noqa: F401 - sets numba's cache directory before any kernel is defined

__version__ = "0.1.0"
