"""ZeroMQ CURVE on our sockets: a server accepts only the client keys it was given (ZAP, with
pyzmq's ``zmq.auth`` authenticator), a client connects only to the server whose public key it
expects. Traffic on both is encrypted (CurveZMQ: Curve25519 keys, XSalsa20-Poly1305)."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable

import zmq
from zmq.auth.thread import ThreadAuthenticator

from stream.security.keys import KeyPair, ensure_keys, read_public

log = logging.getLogger("stemstream.security")


@dataclass(frozen=True)
class ClientKeys:
    """What a connecting socket needs: its own keypair and the public key of the server."""

    keypair: KeyPair
    server: bytes


@dataclass(frozen=True)
class SourceKeys:
    """What a source (the emulator, replay) binds with: its server keypair and the public keys
    of the receivers it lets in."""

    keypair: KeyPair
    clients: frozenset

    DOMAIN = "stemstream-source"


def source_keys(directory=None, clients: Iterable[str] = ()) -> SourceKeys:
    """A source's keys from a key directory (default: the user's, created on first use): its
    ``source`` keypair, accepting the directory's ``receiver`` key and ``clients`` (public
    keys, Z85 or .key files)."""
    kd = ensure_keys(directory, roles=("source", "receiver"))
    return SourceKeys(kd["source"], frozenset({kd["receiver"].public, *(read_public(c) for c in clients)}))


def viewer_keys(directory=None) -> ClientKeys:
    """What a live viewer of this user connects with: the key directory's ``viewer`` keypair
    and the ``live`` server key ``stemstream process --publish`` binds with."""
    kd = ensure_keys(directory, roles=("live", "viewer"))
    return ClientKeys(kd["viewer"], kd["live"].public)


@dataclass(frozen=True)
class ReceiverKeys:
    """What every receiver is given (through the worker plugin): per source address, the
    CURVE client keys to connect with (None: a plain source, ``[security] plain_sources``),
    and the keys for the session's coordinator (reports and control; None: plain)."""

    sources: dict
    coordinator: ClientKeys | None

    def __repr__(self) -> str:
        return f"ReceiverKeys({len(self.sources)} sources, coordinator={'CURVE' if self.coordinator else 'plain'})"


def as_client(sock: zmq.Socket, keys: ClientKeys | None) -> None:
    """Make the next ``connect`` of ``sock`` a CURVE client of ``keys.server`` (None: plain).

    ZeroMQ takes a socket's security options when it connects, so one socket can connect to
    plain peers and to CURVE servers (each with its own key)."""
    if keys is None:
        if sock.get(zmq.MECHANISM) != zmq.NULL:
            sock.curve_server = False  # back to the NULL mechanism
        return
    sock.curve_secretkey = keys.keypair.secret
    sock.curve_publickey = keys.keypair.public
    sock.curve_serverkey = keys.server


def as_server(sock: zmq.Socket, keypair: KeyPair, domain: str) -> None:
    """Make ``sock`` a CURVE server (before ``bind``); the Gatekeeper of its context decides,
    under ``domain``, which clients get in."""
    sock.curve_secretkey = keypair.secret
    sock.curve_publickey = keypair.public
    sock.curve_server = True
    sock.zap_domain = domain.encode()


class _Allowed:
    """pyzmq's credentials provider for one domain: the public keys that may connect."""

    def __init__(self, domain: str, keys: Iterable[bytes], on_refuse):
        self.domain = domain
        self.keys = frozenset(keys)
        self.on_refuse = on_refuse

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.keys:
            return True
        self.on_refuse(self.domain, key)
        return False


class Gatekeeper:
    """The ZAP handler of one zmq.Context: for each domain, the client keys that get in.

    A client whose key is not listed is refused during the handshake: it never receives a
    message and nothing it sends is delivered. ``refused`` counts refusals by domain;
    ``on_refuse(domain, key)`` (optional) is called from the authenticator's thread.
    """

    def __init__(self, ctx: zmq.Context, on_refuse: Callable[[str, bytes], None] | None = None):
        self.refused: Counter = Counter()
        self._lock = threading.Lock()
        self._on_refuse = on_refuse
        self._auth = ThreadAuthenticator(ctx, log=logging.getLogger("stemstream.security.zap"))
        self._auth.start()

    def allow(self, domain: str, keys: Iterable[bytes]) -> None:
        """Let the clients with these public keys (Z85) in under ``domain`` (replaces the list)."""
        self._auth.configure_curve_callback(domain, _Allowed(domain, keys, self._refuse))

    def _refuse(self, domain: str, key: bytes) -> None:
        with self._lock:
            self.refused[domain] += 1
        log.debug("refused a client with key %s on %s", key.decode(errors="replace"), domain)
        if self._on_refuse is not None:
            self._on_refuse(domain, key)

    def stop(self) -> None:
        self._auth.stop()
