"""Transport and orchestration: wire protocol, receivers, scan lifecycle, storage, CLI."""

__version__ = "0.1.0"
