"""Who may talk to stemstream: CURVE keys and key files (``keys``), authenticated and
encrypted ZeroMQ sockets (``curve``), TLS for dask (``tls``, imported on its own: it needs
``distributed``). The lowest room of ``stream``: it imports nothing of the project.
See docs/SECURITY.md."""

from stream.security.curve import ClientKeys, Gatekeeper, ReceiverKeys, SourceKeys, as_client, as_server, source_keys, viewer_keys
from stream.security.keys import (ROLES, KeyPair, SecurityError, default_key_dir, ensure_keys, generate,
                                  key_dir, read_keypair, read_public, write_keypair)

__all__ = ["ClientKeys", "Gatekeeper", "KeyPair", "ROLES", "ReceiverKeys", "SecurityError", "SourceKeys", "as_client",
           "as_server", "default_key_dir", "ensure_keys", "generate", "key_dir", "read_keypair",
           "read_public", "source_keys", "viewer_keys", "write_keypair"]
