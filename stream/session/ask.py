"""The session's control socket: how ``stemstream pending`` reaches a running session.

Each session binds a ZeroMQ ROUTER socket on ``ipc://<run dir>/session-<pid>-<id>.sock``
and describes itself in ``session-<pid>-<id>.json`` beside it. The run directory is
``$XDG_RUNTIME_DIR/stemstream`` (else ``/tmp/stemstream-<uid>``), created with mode 0700 and
refused when another user owns it or can enter it: only the session's own user can connect,
and nothing listens on the network. Requests and replies are msgpack maps:

- ``{"op": "list"}`` → ``{"session": {...}, "held": [...], "written": [...]}``
- ``{"op": "retry", "scan": ID or None}`` → write held scans (or one) now
- ``{"op": "finish", "scan": ID, "to": DIR}`` → write a held scan into DIR instead
- ``{"op": "drop", "scan": ID}`` → give a held scan up (its data is lost)
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
import time
import uuid
from pathlib import Path

import msgpack
import zmq


class ControlError(RuntimeError):
    """The run directory cannot be used safely, or a session did not answer."""


def run_dir() -> Path:
    """The per-user directory of session sockets (created 0700; checked)."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    d = Path(base) / "stemstream" if base else Path(tempfile.gettempdir()) / f"stemstream-{os.getuid()}"
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = d.lstat()
    except OSError as e:
        raise ControlError(f"cannot create the session directory {d}: {e.strerror or e}") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ControlError(f"{d} must be a directory of this user with mode 0700 (it holds the "
                           f"sessions' control sockets); remove it or run 'chmod 700 {d}'")
    return d


class ControlServer:
    """The session's end: a ROUTER socket polled by the session's coordinator thread."""

    def __init__(self, ctx: zmq.Context, about: dict):
        d = run_dir()
        name = f"session-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.path = d / f"{name}.sock"
        self.info = d / f"{name}.json"
        self.socket = ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(f"ipc://{self.path}")
        os.chmod(self.path, 0o600)
        self.info.write_text(json.dumps({**about, "pid": os.getpid(), "address": f"ipc://{self.path}",
                                         "started": time.time()}))

    def requests(self) -> list[tuple[list, dict]]:
        """Requests waiting now: (routing id, request) pairs; malformed ones are answered."""
        out = []
        while True:
            try:
                parts = self.socket.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return out
            ident, body = parts[:-1], parts[-1]
            try:
                req = msgpack.unpackb(body, raw=False)
                if not isinstance(req, dict):
                    raise ValueError("not a map")
            except Exception as e:  # noqa: BLE001 - answered, never raised
                self.reply(ident, {"ok": False, "error": f"bad request: {e}"})
                continue
            out.append((ident, req))

    def reply(self, ident: list, answer: dict) -> None:
        self.socket.send_multipart(ident + [msgpack.packb(answer, use_bin_type=True, default=str)])

    def close(self) -> None:
        self.socket.close(0)
        for p in (self.path, self.info):
            p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sessions() -> list[dict]:
    """Running sessions of this user (their .json descriptions); stale files are removed."""
    out = []
    for f in sorted(run_dir().glob("session-*.json")):
        try:
            about = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if not _alive(int(about.get("pid", -1))):
            f.unlink(missing_ok=True)
            f.with_suffix(".sock").unlink(missing_ok=True)
            continue
        out.append(about)
    return out


def ask(address: str, request: dict, timeout_s: float = 10.0) -> dict:
    """Send one request to a session and return its answer; ControlError if none comes."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(address)
        sock.send_multipart([msgpack.packb(request, use_bin_type=True)])
        if not sock.poll(int(timeout_s * 1000)):
            raise ControlError(f"the session at {address} did not answer within {timeout_s:.0f} s")
        return msgpack.unpackb(sock.recv_multipart()[-1], raw=False)
    finally:
        sock.close(0)
