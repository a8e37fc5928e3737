"""The live viewer in the browser: a Bokeh page served by the session (``--view HOST:PORT``).

feed.py gathers what the pages show from the session once for all of them; page.py is one
open page (images, progress, scan list, drawn apertures); panels.py one image with its axes,
colour bar and scale bar; shapes.py turns drawn shapes into masks; display.py prepares images
for the page; exports.py writes drawn apertures and region patterns; server.py the web server
and its token; child.py the process that serves ``--view`` beside the session; attach.py
what it (or ``stemstream view``) reads of a session in another process. docs/VIEWER.md describes it for users.
"""

from stream.viewer.child import ViewerProcess, start_viewer
from stream.viewer.server import ViewerError, ViewerServer

__all__ = ["ViewerError", "ViewerProcess", "ViewerServer", "start_viewer"]
