"""What every handler may read from the app and the request."""

from __future__ import annotations

import hmac

from aiohttp import web

from modeldepot.depot import Depot

__all__ = ["CONTROL_TOKEN", "DEPOT", "TOKEN", "carries_token", "is_authorized"]

DEPOT = web.AppKey("depot", Depot)
TOKEN = web.AppKey("token", str)  # "" when the node has no token
# What unlocks the control routes: the node's token when it has one, else a control token made at start
# (never empty).
CONTROL_TOKEN = web.AppKey("control_token", str)


def carries_token(request: web.Request, token: str) -> bool:
    """Whether the request sends ``token`` (``Authorization: Bearer``), compared in constant time; never
    for an empty ``token``."""
    if not token:
        return False
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    # Header bytes that are not UTF-8 arrive surrogate-escaped: encode them back rather than fail.
    sent = value.strip().encode("utf-8", "surrogateescape")
    return scheme.lower() == "bearer" and hmac.compare_digest(sent, token.encode())


def is_authorized(request: web.Request) -> bool:
    """Whether the request carries the node's token (``Authorization: Bearer``), compared in constant time."""
    return carries_token(request, request.app[TOKEN])
