"""The node's dashboard at ``GET /``: one HTML page, one script, one style sheet, shipped in the wheel (this
package's data) and served from memory. Nothing is built and nothing comes from the network.

The page holds no data: it reads the node's JSON routes and its event stream with ``fetch`` (sending the
token a user gives it, kept in the tab's ``sessionStorage``), and calls the control routes
(:mod:`modeldepot.server.control_routes`) for its buttons. So the three files are served without the
token, even on a node that has one, under a Content-Security-Policy that lets them load nothing but
themselves and talk to nothing but the node.
"""

from __future__ import annotations

import functools
import hashlib
from importlib import resources

from aiohttp import web

__all__ = ["ASSETS", "DASHBOARD_PATHS", "add_dashboard_routes"]

# path -> (file in this package, content type, route name)
ASSETS = {
    "/": ("index.html", "text/html", "dashboard-page"),
    "/dashboard/dashboard.js": ("dashboard.js", "text/javascript", "dashboard-script"),
    "/dashboard/dashboard.css": ("dashboard.css", "text/css", "dashboard-style"),
}
DASHBOARD_PATHS = frozenset(ASSETS)
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@functools.cache
def _asset(name: str) -> tuple[bytes, str]:
    """A file's bytes and its ETag (read once: they are part of the installed package)."""
    data = resources.files(__name__).joinpath(name).read_bytes()
    return data, f'"{hashlib.sha256(data).hexdigest()[:32]}"'


async def _serve(request: web.Request) -> web.Response:
    name, content_type, _ = ASSETS[request.path]
    body, etag = _asset(name)
    headers = {**HEADERS, "ETag": etag}
    if request.headers.get("If-None-Match") == etag:
        return web.Response(status=304, headers=headers)
    return web.Response(body=body, headers=headers, content_type=content_type, charset="utf-8")


def add_dashboard_routes(app: web.Application) -> None:
    for path, (_, _, route_name) in ASSETS.items():
        app.router.add_get(path, _serve, name=route_name)
