"""TLS for dask's own traffic (scheduler, workers, this client): ``distributed.security``.

The local cluster gets a temporary self-signed certificate held in memory only
(``Security.temporary()``). A cluster started elsewhere (``dask scheduler --tls-…``, the
SLURM script) is joined with a CA file, a certificate and its key; ``write_tls_files`` makes a
set for such a cluster. ``distributed`` is imported only when one of these is called: the
emulator imports this room too and must stay free of dask.
"""

from __future__ import annotations

import os
from pathlib import Path

from stream.security.keys import SecurityError


def temporary_security():
    """A Security with a new self-signed certificate for every role, in memory only."""
    from distributed.security import Security
    try:
        return Security.temporary()
    except ImportError as e:  # the 'cryptography' package
        raise SecurityError(f"dask TLS needs the 'cryptography' package: {e}") from None


def client_security(scheduler: str, ca_file: str = "", cert: str = "", key: str = ""):
    """The Security to join ``scheduler`` with: from the files given, else dask's configuration
    (``distributed.comm.tls.*``). A ``tls://`` address without any of them is refused with
    the fix; a ``tcp://`` one needs none (and is not encrypted)."""
    from distributed.security import Security

    given = [v for v in (ca_file, cert, key) if v]
    if given and not all((ca_file, cert, key)):
        raise SecurityError("TLS needs all three of --tls-ca-file, --tls-cert and --tls-key "
                            "([security] tls_ca_file, tls_cert, tls_key)")
    if given:
        for name, path in (("--tls-ca-file", ca_file), ("--tls-cert", cert), ("--tls-key", key)):
            if not Path(path).is_file():
                raise SecurityError(f"{name} {path}: no such file")
        return Security(tls_ca_file=ca_file, tls_client_cert=cert, tls_client_key=key,
                        require_encryption=True)
    sec = Security()  # dask's configuration, if it names certificates
    if scheduler.startswith("tls://") and not sec.get_connection_args("client").get("ssl_context"):
        raise SecurityError(f"the scheduler {scheduler} speaks TLS: give --tls-ca-file, --tls-cert "
                            "and --tls-key (or [security] tls_ca_file, tls_cert, tls_key); "
                            "'stemstream keys --tls DIR' makes a set for a new cluster")
    return sec


def write_tls_files(directory: str | os.PathLike) -> dict[str, Path]:
    """A CA certificate, a certificate signed by it and its key, for every role of a dask
    cluster started by hand: ``ca.pem``, ``cert.pem``, ``key.pem`` (0600) in ``directory``
    (created 0700). Returns the three paths by name."""
    sec = temporary_security()
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    files = {"ca": (directory / "ca.pem", sec.tls_ca_file, 0o644),
             "cert": (directory / "cert.pem", sec.tls_scheduler_cert, 0o644),
             "key": (directory / "key.pem", sec.tls_scheduler_key, 0o600)}
    for path, _, _ in files.values():
        if path.exists():
            raise SecurityError(f"{path} exists; give an empty directory (or remove the old files)")
    for path, text, mode in files.values():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
    return {name: path for name, (path, _, _) in files.items()}
