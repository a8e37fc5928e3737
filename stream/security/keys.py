"""CURVE keypairs and the files they live in.

A key is a 40-character Z85 string (ZeroMQ's text form of a Curve25519 key). Key files use the
format of ``zmq.auth.create_certificates``: ``NAME.key`` holds the public key and may be handed
to anyone; ``NAME.key_secret`` holds both keys and is readable by its owner only (0600).

A key directory (default ``$XDG_CONFIG_HOME/stemstream/keys``, i.e. ``~/.config/stemstream/keys``)
holds one keypair per role, created on first use:

- ``source``: the server key of the sources this user runs (``stemstream simulate``, ``replay``);
  ``stemstream process`` expects it from every source it connects to;
- ``receiver``: the client key the receivers of ``stemstream process`` present to sources; a
  source accepts it (and nothing else, unless told);
- ``live``: the server key of the live results channel (``process --publish``);
- ``viewer``: a client key the live results channel accepts.

So two terminals of one user share keys without any option. See docs/SECURITY.md.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import zmq
import zmq.auth

ROLES = {
    "source": "server key of the sources (stemstream simulate / replay, a detector bridge)",
    "receiver": "client key the receivers of stemstream process present to the sources",
    "live": "server key of the live results channel (stemstream process --publish)",
    "viewer": "client key the live results channel accepts (a live viewer)",
}
Z85_LENGTH = 40


class SecurityError(ValueError):
    """A key, key file or security setting that cannot be used; the message names it and the fix."""


@dataclass(frozen=True)
class KeyPair:
    """A CURVE keypair, both halves Z85 (40 bytes); ``secret`` is None for a public key alone."""

    public: bytes
    secret: bytes | None = None

    def __repr__(self) -> str:  # never print a secret key into a log
        return f"KeyPair(public={self.public.decode()!r}, secret={'<set>' if self.secret else None})"


def generate() -> KeyPair:
    """A new random keypair."""
    public, secret = zmq.curve_keypair()
    return KeyPair(public, secret)


def default_key_dir() -> Path:
    """``$XDG_CONFIG_HOME/stemstream/keys``, or ``~/.config/stemstream/keys``."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "stemstream" / "keys"


def key_dir(path: str | os.PathLike | None = None) -> Path:
    """The key directory ``path`` (``~`` expanded), or the default one when empty."""
    return Path(os.path.expanduser(str(path))) if path else default_key_dir()


_BANNER = """#   ****  Generated on {now} by stemstream (pyzmq's zmq.auth format)  ****
#   ZeroMQ CURVE {what} Certificate
#   {advice}

metadata
curve
"""


def _write(path: Path, text: str, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w", encoding="utf8") as f:
        f.write(text)


def write_keypair(directory: str | os.PathLike, name: str, kp: KeyPair) -> tuple[Path, Path]:
    """Write ``NAME.key`` (0644) and ``NAME.key_secret`` (0600) in ``directory``; never
    overwrites. Returns (public file, secret file)."""
    directory = Path(directory)
    now = datetime.now().isoformat(timespec="seconds")
    pub, sec = directory / f"{name}.key", directory / f"{name}.key_secret"
    public_line = f'    public-key = "{kp.public.decode()}"\n'
    _write(sec, _BANNER.format(now=now, what="**Secret**",
                               advice="DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.")
           + public_line + f'    secret-key = "{kp.secret.decode()}"\n', 0o600)
    _write(pub, _BANNER.format(now=now, what="Public",
                               advice="Hand this file to the peers that must accept this key.")
           + public_line, 0o644)
    return pub, sec


def _check_z85(key: bytes, where: str) -> bytes:
    try:
        if len(key) != Z85_LENGTH:
            raise ValueError
        zmq.utils.z85.decode(key)
    except (ValueError, KeyError):
        raise SecurityError(f"{where}: not a CURVE key (40 Z85 characters, as 'stemstream keys' "
                        "prints them)") from None
    return key


def read_keypair(path: str | os.PathLike) -> KeyPair:
    """The keypair of a ``NAME.key_secret`` file. Refuses a file others can read (chmod 600)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise SecurityError(f"{path}: cannot read a secret key file: {e}; "
                        "'stemstream keys --dir DIR' creates one") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecurityError(f"{path}: a secret key file must be readable by its owner only; "
                        f"run: chmod 600 {path}")
    if not secret:
        raise SecurityError(f"{path}: holds no secret key (a NAME.key_secret file is needed here)")
    return KeyPair(_check_z85(public, str(path)), _check_z85(secret, str(path)))


def read_public(spec: str | os.PathLike) -> bytes:
    """A public key from a 40-character Z85 string, or from a ``.key`` / ``.key_secret`` file."""
    text = str(spec).strip()
    if len(text) == Z85_LENGTH and not os.path.exists(text):
        return _check_z85(text.encode(), f"key {text!r}")
    path = Path(os.path.expanduser(text))
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise SecurityError(f"{path}: not a key file nor a 40-character Z85 key: {e}") from None
    return _check_z85(public, str(path))


def ensure_keys(directory: str | os.PathLike | None = None, roles=tuple(ROLES)) -> dict[str, KeyPair]:
    """The keypairs of ``roles`` in the key directory, created (directory 0700, secret files
    0600) where missing. Raises SecurityError naming the file for a key it cannot use."""
    directory = key_dir(directory)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise SecurityError(f"cannot create the key directory {directory}: {e.strerror or e}; "
                        "give another with --curve-keys DIR or [security] keys") from None
    out = {}
    for role in roles:
        secret = directory / f"{role}.key_secret"
        if not secret.exists() and (directory / f"{role}.key").exists():
            raise SecurityError(f"{directory / role}.key has no {secret.name} beside it; remove it "
                                "and a new keypair is made (peers given the old public key need the new one)")
        if not secret.exists():
            try:
                write_keypair(directory, role, generate())
            except FileExistsError:  # another process made it meanwhile
                pass
            except OSError as e:
                raise SecurityError(f"cannot write {secret}: {e.strerror or e}") from None
        out[role] = read_keypair(secret)
    return out
