"""What every handler may read from the app and the request."""

from __future__ import annotations

import asyncio
import hmac
from typing import TYPE_CHECKING, Any

from aiohttp import web

from modeldepot.depot import Depot
from modeldepot.errors import InvalidInputError, RepoNotFoundError
from modeldepot.store.scrub import ScrubTally
from modeldepot.validation import validate_repo_id

if TYPE_CHECKING:
    from yarl import URL  # (aiohttp's URL type)

__all__ = ["ARRIVED", "CONTROL_TOKEN", "DEPOT", "PUBLIC_URL", "TOKEN", "as_typed", "carries_token", "checked_query",
           "hidden_repo", "is_authorized", "path_matches", "path_repo", "request_url"]  # fmt: skip

DEPOT = web.AppKey("depot", Depot)
TOKEN = web.AppKey("token", str)  # "" when the node has no token
# What unlocks the control routes: the node's token when it has one, else a control token made at start
# (never empty).
CONTROL_TOKEN = web.AppKey("control_token", str)
# Where clients reach the node (``serve --public-url``: behind a reverse proxy, its https URL), "" when they
# reach it as the request says (its Host header, the connection's scheme)
PUBLIC_URL = web.AppKey("public_url", str)
SCRUB = web.AppKey("scrub", ScrubTally)  # the background scrub's tally (serve --scrub-interval), for /metrics
# When the request's handling began (time.monotonic()): a wait that must end under a client's timeout counts
# from there, not from where it is (a mirror's first bytes, after its scan)
ARRIVED: Any = web.RequestKey("arrived", float) if hasattr(web, "RequestKey") else "arrived"


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
    """Whether the request carries the node's token (``Authorization: Bearer``), compared in constant time;
    on a node without one, the control token: whoever may pull, pin and remove may read what a token hides
    (private repos, pins, the budget's and the engines' details), as the dashboard does with it."""
    return carries_token(request, request.app[TOKEN]) or carries_token(request, request.app[CONTROL_TOKEN])


async def path_repo(request: web.Request) -> str:
    """The repo the URL names (``{org}/{name}``), validated, as the store spells it: repo ids match whatever
    their case, as on the Hub."""
    named = validate_repo_id(f"{request.match_info['org']}/{request.match_info['name']}")
    return await asyncio.to_thread(request.app[DEPOT].store.spelled, named)


def hidden_repo(request: web.Request, repo_id: str) -> RepoNotFoundError:
    """RepoNotFound for a repo this request may not see, named as the request typed it, as an absent one
    is: the store's spelling of a private repo told any case variant of a guess that it was there, and how
    it is spelled (a security trial)."""
    return RepoNotFoundError(as_typed(request, repo_id))


def as_typed(request: web.Request, repo_id: str) -> str:
    """The repo id as the URL typed it (its case), else ``repo_id``."""
    org, name = request.match_info.get("org"), request.match_info.get("name")
    return f"{org}/{name}" if org and name and len(org) + len(name) < 200 else repo_id


def checked_query(request: web.Request, takes: tuple[str, ...] = (), hint: str = "") -> dict[str, str]:
    """The query parameters of a route of ``/api/depot/v1`` that takes those named in ``takes`` (most take
    none), each once. A parameter the route does not take is a 400 naming it (:class:`InvalidInputError`),
    never ignored (``?quant=fp16`` on a preload would preload the whole repo; ``?revision=x`` on a repo's
    saved scan answered main's); so is one of its own given twice (which would count?). ``hint`` ends the
    message about an unknown one (where what it asks for is). A bad value of one it takes is the route's
    to refuse, its message naming the parameter first (``after: ...``)."""
    query = request.query
    unknown = sorted(set(query) - set(takes))
    if unknown:
        takes_what = ", ".join(takes) or "no query parameter"
        raise InvalidInputError(
            f"unknown query parameter {unknown[0][:40]!r}: this route takes {takes_what}{hint}"
        )
    for name in takes:
        if len(query.getall(name, [])) > 1:
            raise InvalidInputError(f"{name}: give this query parameter once")
    return {name: query[name] for name in takes if name in query}


def path_matches(resource: web.AbstractResource, path: str) -> bool:
    """Whether ``resource``'s path (plain, or a pattern) takes ``path``, whatever the method."""
    info = resource.get_info()
    if "path" in info:
        return bool(info["path"] == path)
    pattern = info.get("pattern")
    return bool(pattern is not None and pattern.fullmatch(path))


def request_url(request: web.Request) -> URL:
    """The request's absolute URL as its client reaches the node (for links to a next page, which clients
    follow as they are): under the node's public URL when it has one (behind a TLS proxy the request says
    http, and its Host is often the proxy's upstream, 127.0.0.1:8980: huggingface_hub followed such a link
    to its own machine), else as the request says. A Host header that names no host is bad input (a 400),
    not a failure of the node."""
    public = request.app.get(PUBLIC_URL, "")
    if public:
        from yarl import URL

        return URL(public + str(request.rel_url), encoded=True)
    try:
        return request.url
    except ValueError as error:
        raise InvalidInputError(f"the Host header does not name a host ({error})") from None
