"""The viewer's web server: a Bokeh server on its own thread and event loop inside the
session's process, one document (stream/viewer/page.py) per open browser tab.

It binds 127.0.0.1 unless told otherwise. On any other address it requires a token, as
Jupyter does: the printed URL carries ``?token=…``; the first visit with it sets a cookie
(HttpOnly, SameSite=Strict) that the page's websocket presents from then on; without either
the server answers 403 with a form asking for the token. The token comes from ``token=``, else
the environment variable ``STEMSTREAM_VIEW_TOKEN``, else it is made up (and printed).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
import secrets
import socket
import threading
from pathlib import Path

log = logging.getLogger("stemstream.viewer")
TOKEN_ENV = "STEMSTREAM_VIEW_TOKEN"
DEFAULT_PORT = 8800


class ViewerError(ValueError):
    """A viewer address or token the viewer cannot use; the message names it and the fix."""


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[IPv6]:PORT``, ``:PORT``, ``PORT`` or ``HOST`` (port 8800) → (host,
    port); an empty host is 127.0.0.1."""
    text = str(text).strip()
    if "://" in text:
        text = text.split("://", 1)[1].rstrip("/")
    if text.isdigit():
        host, port = "", text
    elif text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":") or str(DEFAULT_PORT)
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:  # a host name, or a bare IPv6 address
        host, port = text, str(DEFAULT_PORT)
    try:
        port_n = int(port)
    except ValueError:
        raise ViewerError(f"viewer address {text!r}: the port must be a number, e.g. 127.0.0.1:8800") from None
    if not 0 <= port_n <= 65535:
        raise ViewerError(f"viewer address {text!r}: port {port_n} is not 0..65535")
    return host or "127.0.0.1", port_n


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _origins(host: str, port: int) -> list[str]:
    """Browser origins whose websockets the server accepts (others are refused: a page of
    another site cannot drive the viewer)."""
    names = {host, "127.0.0.1", "localhost"} if is_loopback(host) else \
        {host, socket.gethostname(), socket.getfqdn(), "127.0.0.1", "localhost"}
    if host in ("0.0.0.0", "::"):
        names.discard(host)
        try:
            names.update(a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None))
        except OSError:
            pass
    return sorted(f"{n}:{port}" for n in names if n)


def _token_auth(token: str, cookie: str):
    """A Bokeh AuthProvider accepting ``?token=`` (then setting the cookie) or the cookie."""
    from bokeh.server.auth_provider import AuthProvider
    from tornado.web import RequestHandler

    def ok(value) -> bool:
        return bool(value) and hmac.compare_digest(str(value).encode(), token.encode())

    def get_user(handler):
        given = handler.get_argument("token", None)
        if ok(given):
            try:
                handler.set_cookie(cookie, token, httponly=True, samesite="Strict", path="/")
            except Exception as e:  # noqa: BLE001 - a websocket after the upgrade cannot set cookies
                log.debug("viewer: no cookie set on %s: %s", type(handler).__name__, e)
            return "viewer"
        if ok(handler.get_cookie(cookie)):
            return "viewer"
        return None

    class Login(RequestHandler):
        def get(self):
            self.set_status(403)
            self.write("<!doctype html><title>stemstream viewer</title><body style='font-family:sans-serif'>"
                       "<h3>stemstream viewer: a token is needed</h3><p>Open the URL the session printed, "
                       "or paste its token:</p><form method='get' action='/'>"
                       "<input name='token' size='50' autofocus> <input type='submit' value='open'></form>")

    class Auth(AuthProvider):
        @property
        def get_user(self):
            return get_user

        @property
        def login_url(self):
            return "/login"

        @property
        def login_handler(self):
            return Login

    return Auth()


class ViewerServer:
    """Serve the viewer for ``feed`` at ``address`` until ``close()``.

    token: required on addresses other than loopback (None: ``$STEMSTREAM_VIEW_TOKEN`` or a
    new random one); on loopback only when given. save_dir: where the page writes drawn
    apertures and exported patterns. Raises ViewerError when the address cannot be served.
    """

    def __init__(self, feed, address: str = f"127.0.0.1:{DEFAULT_PORT}", token: str | None = None,
                 save_dir: str | Path = "viewer", title: str = "stemstream"):
        self.feed = feed
        self.host, self.port = parse_address(address)
        if token is None and not is_loopback(self.host):
            token = os.environ.get(TOKEN_ENV) or secrets.token_urlsafe(24)
        if token is not None and len(token) < 8:
            raise ViewerError("the viewer token must be at least 8 characters")
        self.token = token
        self.save_dir = Path(save_dir)
        self.title = title
        self._server = None
        self._loop = None
        self._thread = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        """The address to open (with the token when one is required)."""
        host = self.host if self.host not in ("0.0.0.0", "::", "") else socket.gethostname()
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/" + (f"?token={self.token}" if self.token else "")

    def start(self, timeout_s: float = 30.0) -> ViewerServer:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="stemstream-viewer", daemon=True)
        self._thread.start()
        if not ready.wait(timeout_s):
            raise ViewerError(f"the viewer did not start within {timeout_s:g} s")
        if self._error is not None:
            raise self._error
        return self

    def _run(self, ready: threading.Event) -> None:
        from bokeh.application import Application
        from bokeh.application.handlers.function import FunctionHandler
        from bokeh.server.server import Server

        from stream.viewer.page import ViewerPage

        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)

        def make_document(doc):
            doc.title = self.title
            ViewerPage(doc, self.feed, self.save_dir, self.title)

        kwargs = {}
        if self.port == 0:  # a free port now, so that the allowed origins can name it
            with socket.socket() as probe:
                probe.bind((self.host, 0))
                self.port = probe.getsockname()[1]
        if self.token:
            kwargs["auth_provider"] = _token_auth(self.token, f"stemstream-viewer-{self.port}")
        try:
            self._server = Server({"/": Application(FunctionHandler(make_document))}, port=self.port,
                                  address=self.host, allow_websocket_origin=_origins(self.host, self.port),
                                  num_procs=1, check_unused_sessions_milliseconds=2000,
                                  unused_session_lifetime_milliseconds=5000, **kwargs)
            self._server.start()
        except OSError as e:
            self._error = ViewerError(f"cannot serve the viewer on {self.host}:{self.port}: "
                                      f"{e.strerror or e}; choose another --view HOST:PORT")
        except Exception as e:  # noqa: BLE001 - handed to start()
            self._error = e
        self._loop = loop
        ready.set()
        if self._error is None:
            try:
                loop.run_forever()
            finally:
                loop.close()

    def sessions(self) -> int:
        """Pages open now."""
        return 0 if self._server is None else len(self._server.get_sessions())

    def close(self) -> None:
        if self._server is None or self._loop is None or not self._thread.is_alive():
            return
        done = threading.Event()

        def stop():
            try:
                self._server.stop()
                self._server.unlisten()
            finally:
                self._loop.stop()
                done.set()
        self._loop.call_soon_threadsafe(stop)
        done.wait(10)
        self._thread.join(10)


def add_view_arg(p) -> None:
    """The ``--view HOST:PORT`` option of ``process`` and ``demo``."""
    p.add_argument("--view", metavar="HOST:PORT",
                   help="serve the live viewer in the browser there, e.g. 127.0.0.1:8800 (docs/VIEWER.md); "
                        "any other host than loopback needs the token printed with the URL "
                        f"(or ${TOKEN_ENV})")
