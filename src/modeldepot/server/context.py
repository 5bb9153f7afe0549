"""What every handler may read from the app and the request."""

from __future__ import annotations

from aiohttp import web

from modeldepot.depot import Depot

__all__ = ["AUTHORIZED", "DEPOT", "TOKEN", "is_authorized"]

DEPOT = web.AppKey("depot", Depot)
TOKEN = web.AppKey("token", str)  # "" when the node has no token
AUTHORIZED = "modeldepot.authorized"  # request key: the request carried the node's token


def is_authorized(request: web.Request) -> bool:
    return bool(request.get(AUTHORIZED))
