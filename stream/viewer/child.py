"""The viewer of ``Session(view=...)`` / ``--view`` in a process of its own.

The pages are served by a child process (``python -m stream.viewer.child``) that attaches to
the session as ``stemstream view`` does (attach.py): the session's live results channel
(CURVE, the key directory's ``viewer`` key), its output directory, and its dask scheduler for
drawn apertures. Serving pages — building images, serialising them, the web server's event
loop — then costs the session's process nothing: its coordinator, which merges the receivers'
states and drives the files, never waits for a page (docs/VIEWER.md, bench_viewer.py).

The parent hands the child its arguments (the PipelineConfig included) pickled on stdin and
keeps stdin open; the child answers ``ready URL PORT`` (or ``error MESSAGE``) on stdout, then
``pages N`` whenever the number of open pages changes, and exits when stdin closes (the
session closed it, or died).
"""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

log = logging.getLogger("stemstream.viewer")
START_TIMEOUT_S = 120.0  # a fresh interpreter importing bokeh and dask on a loaded machine


class ViewerProcess:
    """The viewer served by a child process attached to a session (module docstring).

    subscribe: the session's live channel address; out: its output directory; scheduler: its
    dask scheduler address (None: written scans are read by the child, the running one cannot
    be drawn on) and security the ``distributed.Security`` to join it with (None: config's);
    config: the session's PipelineConfig (calibration, security); address,
    token: as :class:`stream.viewer.server.ViewerServer`. ``url``, ``port``, ``token``,
    ``sessions()`` and ``close()`` as the in-process server has them.
    """

    def __init__(self, config, subscribe: str, out: str, scheduler: str | None, address: str,
                 token: str | None = None, title: str = "stemstream", security=None):
        self._args = {"config": config, "subscribe": subscribe, "out": str(out), "scheduler": scheduler,
                      "address": address, "token": token, "title": title, "security": security}
        self.url = self.token = None
        self.port = None
        self._pages = 0
        self._proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    def start(self, timeout_s: float = START_TIMEOUT_S) -> ViewerProcess:
        from stream.viewer.server import ViewerError
        self._proc = subprocess.Popen([sys.executable, "-m", "stream.viewer.child"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=False, start_new_session=False)
        self._proc.stdin.write(pickle.dumps(self._args))
        self._proc.stdin.flush()  # stays open: its end tells the child to stop
        first = threading.Event()
        answer: list[str] = []

        def read():
            for raw in self._proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                if line.startswith("pages "):
                    self._pages = int(line.split()[1])
                elif not answer and line.startswith(("ready ", "error ")):
                    answer.append(line)
                    first.set()
            first.set()  # the child ended
        self._reader = threading.Thread(target=read, name="stemstream-viewer-child", daemon=True)
        self._reader.start()
        if not first.wait(timeout_s) or not answer:
            self.close()
            raise ViewerError(f"the viewer process did not start within {timeout_s:g} s"
                              if not answer and self._proc.poll() is None else
                              f"the viewer process ended at its start (exit code {self._proc.poll()}); "
                              "its error is above")
        kind, _, rest = answer[0].partition(" ")
        if kind == "error":
            self.close()
            raise ViewerError(rest)
        self.url, port, token = rest.split(" ", 2)
        self.port, self.token = int(port), (token if token != "-" else None)
        return self

    def sessions(self) -> int:
        """Pages open now."""
        return self._pages

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def close(self, timeout_s: float = 15.0) -> None:
        p = self._proc
        if p is None or p.poll() is not None:
            return
        try:
            p.stdin.close()
        except OSError:
            pass
        try:
            p.wait(timeout_s)
        except subprocess.TimeoutExpired:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def start_viewer(session, address: str, token: str | None = None):
    """Serve the viewer of a running Session (its ``view=`` argument) from a process of its
    own, subscribed to the live channel the session binds for it (images at the page's size,
    stream/session/live_view.py); drawn apertures are written into ``OUT/viewer/``. Raises ConfigError for an address it cannot serve."""
    from stream.config import ConfigError
    from stream.viewer.server import ViewerError

    try:
        server = ViewerProcess(session.config, session.view_address, session.config.output.dir,
                               session.scheduler_address, address, token,
                               title=f"stemstream — {', '.join(session.connect)}",
                               security=session.scheduler_security)
        return server.start()
    except ViewerError as e:
        raise ConfigError(str(e)) from None


def _serve(args: dict, say) -> None:
    """The child's work: attach, serve, report the pages, until stdin closes."""
    from stream.config import ConfigError
    from stream.viewer.attach import AttachedSession
    from stream.viewer.feed import SessionFeed
    from stream.viewer.server import ViewerError, ViewerServer

    try:
        attached = AttachedSession(args["subscribe"], args["out"], args["scheduler"], args["config"],
                                   security=args.get("security"))
    except ConfigError as e:
        say(f"error {e}")
        return
    try:
        server = ViewerServer(SessionFeed(attached), args["address"], args["token"],
                              save_dir=Path(args["out"]) / "viewer", title=args["title"]).start()
    except ViewerError as e:
        attached.close()
        say(f"error {e}")
        return
    say(f"ready {server.url} {server.port} {server.token or '-'}")
    ended = threading.Event()

    def watch_stdin():
        try:
            while sys.stdin.buffer.read(65536):
                pass
        finally:
            ended.set()
    threading.Thread(target=watch_stdin, daemon=True, name="stemstream-viewer-stdin").start()
    pages = 0
    try:
        while not ended.wait(0.2):
            n = server.sessions()
            if n != pages:
                pages = n
                say(f"pages {n}")
    finally:
        server.close()
        attached.close()


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="viewer: %(message)s")
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr  # anything else printed goes to the console, not to the parent's reader

    def say(line: str) -> None:
        out.write(line.replace("\n", " ") + "\n")
    args = pickle.load(sys.stdin.buffer)
    try:
        _serve(args, say)
    except Exception as e:  # noqa: BLE001 - the session says it; the child only ends
        log.exception("the viewer process failed")
        say(f"error {type(e).__name__}: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
