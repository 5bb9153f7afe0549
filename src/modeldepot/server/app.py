"""The node's aiohttp application: routes, and the middlewares every request passes through.

Order, outermost first: the metrics (every answer counted by route and status: server/metrics.py), the
request id (echoed, and named in every log line), CORS (headers on every answer, preflights), errors
(library errors become the Hub's error shape in one place; nothing else reaches a client, never a stack
trace), auth (the node token), then the route.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from modeldepot.depot import Depot
from modeldepot.errors import ConfigError, DepotError
from modeldepot.mirror import Mirror
from modeldepot.ratelimit import RateLimit
from modeldepot.server.context import ARRIVED, CONTROL_TOKEN, DEPOT, PUBLIC_URL, TOKEN, is_authorized
from modeldepot.server.control_routes import add_control_routes
from modeldepot.server.dashboard import DASHBOARD_PATHS, add_dashboard_routes
from modeldepot.server.fleet import FLEET, NodeFleet
from modeldepot.server.hub_routes import MAX_PATHS_INFO, add_hub_routes
from modeldepot.server.metrics import add_metrics, metrics_middleware
from modeldepot.server.mirror_routes import MIRROR
from modeldepot.server.native_routes import HEALTH_PATH, add_native_routes
from modeldepot.server.responses import CountedResponse, error_response, response_for_error
from modeldepot.store.holders import LETTING_GO, announce_letting_go, say_sending, stop_letting_go

__all__ = ["MAX_BODY", "MAX_HEADER", "create_app"]

log = logging.getLogger("modeldepot.server")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MAX_BODY = 1 << 20  # paths-info forms and other bodies
MAX_HEADER = 16 * 1024  # one header line (aiohttp answers 400 beyond it)

EXPOSED_HEADERS = ", ".join((
    "X-Repo-Commit", "X-Request-Id", "X-Error-Code", "X-Error-Message", "X-Total-Count", "ETag", "Link",
    "Accept-Ranges", "Content-Range", "Content-Length", "X-Linked-Size", "X-Linked-Etag", "X-Chunk-Blake3",
    "X-Chunk-Size",
))  # fmt: skip
CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Expose-Headers": EXPOSED_HEADERS,
}
PREFLIGHT = {
    **CORS,
    "Access-Control-Allow-Methods": "GET, HEAD, POST, PUT, DELETE, OPTIONS",  # PUT, DELETE: control routes
    "Access-Control-Allow-Headers": "Authorization, Range, If-Range, If-None-Match, Content-Type, Accept, User-Agent, "
    "X-Amzn-Trace-Id",  # (If-None-Match: a browser's conditional GET, answered 304)
    "Access-Control-Max-Age": "86400",
}


@web.middleware
async def cors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        return web.Response(status=204, headers=PREFLIGHT)
    response = await handler(request)
    response.headers.update(CORS)
    # (a file answer is application/octet-stream: no browser may take a model's README or a JSON for a page)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    return response


REQUEST_DEADLINE = web.AppKey("request_deadline", float)
# The key of a request's id in the request's own mapping (typed keys exist from aiohttp 3.13 on).
REQUEST_ID: Any = web.RequestKey("request_id", str) if hasattr(web, "RequestKey") else "request_id"
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every request gets an id (the client's ``X-Request-Id`` when it sent a sane one), echoed in the
    answer and named in every log line about it, so a client's report and the node's log meet."""
    request[ARRIVED] = time.monotonic()
    sent = request.headers.get("X-Request-Id", "")
    request[REQUEST_ID] = sent if _CLIENT_REQUEST_ID.fullmatch(sent) else uuid.uuid4().hex[:16]
    response = await handler(request)
    response.headers["X-Request-Id"] = request[REQUEST_ID]
    return response


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        # The deadline covers reading the request and preparing the answer; file bodies are streamed after
        # the handler returns, so a long download is never cut off by it.
        return await asyncio.wait_for(handler(request), request.app[REQUEST_DEADLINE])
    except asyncio.TimeoutError:
        return error_response(408, None, "the request did not complete in time")
    except DepotError as error:
        response = response_for_error(error)
        if response.status >= 500:
            log.warning("request %s: %s %s answered %d: %s: %s", request[REQUEST_ID], request.method,
                        request.path_qs, response.status, type(error).__name__, error)  # fmt: skip
        return response
    except web.RequestPayloadError as error:  # e.g. a body sent as gzip that is not gzip
        reason = error.__cause__ or error
        return error_response(400, "BadRequest", f"the request's body could not be read: {reason}")
    except web.HTTPException as error:
        if error.status < 400:
            raise
        default = f"{error.status}: {error.reason}"  # (aiohttp's text when it was given none)
        if error.status == 404 and (error.text is None or error.text == default):
            # (as sent: decoded, "main%2Fx" read as a file's URL that works)
            return error_response(404, None, no_route(request.raw_path.split("?", 1)[0]))
        return error_response(
            error.status,
            None,
            error.text if error.text and error.text != default else error.reason,
            {"Allow": error.headers["Allow"]} if "Allow" in error.headers else None,
        )
    except Exception as error:
        if isinstance(error, ConnectionResetError) and (
            request.transport is None or request.transport.is_closing()
        ):
            # The client left mid-request: nothing wrong here, and the answer goes nowhere.
            log.info("request %s: the client left during %s %s", request[REQUEST_ID], request.method,
                     request.path)  # fmt: skip
            return error_response(400, "BadRequest", "the connection was lost before the request was read")
        log.exception(
            "request %s: unexpected error on %s %s", request[REQUEST_ID], request.method, request.path
        )
        return error_response(500, "NodeError", "the node could not complete the request")


_REPO_PAGE = re.compile(r"/([^/]+/[^/]+)(?:/(blob|tree|commit|discussions|settings)(?:/.*)?)?/?")
_FILE_WITHOUT_PATH = re.compile(r"/([^/]+/[^/]+)/(resolve|raw)/([^/]+)/?")


def no_route(path: str) -> str:
    """What a 404 for a path no route takes says: where the nearest thing a client may have meant is (a bare
    "Not Found" left a user who typed the Hub's page URL of a repo, or a file's without its path, guessing)."""
    page, bare = _REPO_PAGE.fullmatch(path), _FILE_WITHOUT_PATH.fullmatch(path)
    if bare is not None:
        repo, kind, revision = bare.groups()
        return (f"this node has no route {path}: a file's URL names its path, "
                f"/{repo}/{kind}/{revision}/PATH")  # fmt: skip
    if page is not None and not path.startswith(("/api/", "/dashboard/")):
        repo = page.group(1)
        return (f"this node has no route {path}: it serves no web pages of a repo; a file is at "
                f"/{repo}/resolve/REVISION/PATH, the repo's info at /api/models/{repo}")  # fmt: skip
    return (
        f"this node has no route {path}: the Hub's API is under /api/models and /ORG/NAME/resolve, the "
        "node's own under /api/depot/v1 (described at /api/depot/v1/openapi.json), the dashboard at /"
    )


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    # Health, and the dashboard's page, script and style sheet (they hold no data), need no token.
    if (
        request.app[TOKEN]
        and request.path != HEALTH_PATH
        and request.path not in DASHBOARD_PATHS
        and not is_authorized(request)
    ):
        if "Authorization" not in request.headers:
            return error_response(
                401, None, "this node needs a token: send Authorization: Bearer <token> (HF_TOKEN)"
            )
        return error_response(401, None, "Invalid credentials in Authorization header")
    return await handler(request)


def create_app(
    depot: Depot,
    token: str | None = None,
    request_deadline: float = 60.0,
    mirror: bool = False,
    fleet: NodeFleet | None = None,
    control_token: str | None = None,
    public_url: str | None = None,
) -> web.Application:
    """The node over ``depot``. With a ``token`` every route but health needs it; private repos always do.
    Without one, the reads are open and the control routes need ``control_token`` (made here, random, when
    not given: ``app[CONTROL_TOKEN]`` holds it); with one, they need the token, and ``control_token`` may
    not be given.

    ``request_deadline`` bounds the seconds a request may take to arrive and be answered (not the time to
    stream a file body). ``mirror``: what the store lacks is pulled through the depot's source chain
    (its servers, the fleet, then the Hub) while it is served. ``fleet``: the node's place in its fleet
    (health shows its state, ``peers`` its view); whoever serves the app starts and closes it.
    ``public_url``: where clients reach the node (behind a reverse proxy), for the links its answers hold.
    """
    if token and control_token:
        raise ValueError(
            "a node with a token is controlled with it: give a token or a control token, not both"
        )
    if depot.tiers.shared:
        raise ConfigError(
            "a node serves its own store only, not the shared stores its depot reads through: serve each "
            "store from a node of its own, and name the shared one's in MODELDEPOT_SERVERS"
        )
    middlewares: list[Middleware] = [
        metrics_middleware,
        request_id_middleware,
        cors_middleware,
        error_middleware,
        auth_middleware,
    ]
    if depot.config.max_upload_rate is not None:
        middlewares.append(_upload_limit_middleware(RateLimit(depot.config.max_upload_rate)))
    try:  # (a paths-info form of the Hub's 1000 paths has an `expand` field too: aiohttp's cap was 1000)
        app = web.Application(
            middlewares=middlewares, client_max_size=MAX_BODY, client_max_fields=MAX_PATHS_INFO + 8
        )
    except TypeError:  # (an aiohttp without the cap: no form's fields are counted)
        app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY)
    app[DEPOT] = depot
    app[TOKEN] = token or ""
    app[PUBLIC_URL] = (public_url or "").rstrip("/")
    app[CONTROL_TOKEN] = token or control_token or secrets.token_urlsafe(32)
    app[REQUEST_DEADLINE] = request_deadline
    if fleet is not None:
        app[FLEET] = fleet
    if mirror:
        app[MIRROR] = Mirror(depot, request_deadline)

        async def stop_scans(app: web.Application) -> None:
            app[MIRROR].scans.stop()  # (as the node begins to stop: the requests waiting for them end)

        async def stop_pulls(app: web.Application) -> None:
            await app[MIRROR].close()

        app.on_shutdown.append(stop_scans)
        app.on_cleanup.append(stop_pulls)
    app.cleanup_ctx.append(_letting_go_of_what_others_removed(depot))
    add_native_routes(app)
    add_control_routes(app)  # before the Hub's routes: their /api/ catch-all refuses writes
    add_dashboard_routes(app)
    add_metrics(app)
    add_hub_routes(app)
    return app


def _upload_limit_middleware(limit: RateLimit) -> Middleware:
    """Every file body the node sends (blobs, chunks, a mirror's streams: the responses that send their own
    body) keeps, with all the others, to ``limit`` (serve --max-upload-rate)."""

    @web.middleware
    async def limited(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        if isinstance(response, CountedResponse):
            response.upload_limit = limit
        return response

    return limited


LET_GO_EVERY = 2.0  # seconds between two looks for revisions another process removed or quarantined
SAY_SENDING_EVERY = 0.25  # seconds between two looks at what the node sends (holders.say_sending)


def _letting_go_of_what_others_removed(depot: Depot) -> Callable[[web.Application], AsyncIterator[None]]:
    """A `modeldepot rm` (or `verify`) beside the node changes the store under it: every LET_GO_EVERY
    seconds the node drops its preloads and engines of revisions no longer whole there, whose mappings
    would keep the deleted files' space taken (and the bad bytes in use)."""

    async def watch(_app: web.Application) -> AsyncIterator[None]:
        # (and at the start, what a killed import left in tmp/: it stayed until a gc, through the node's start)
        try:
            await asyncio.to_thread(depot.drop_dead_writes)
        except Exception as error:  # (upkeep only: the node serves all the same)
            log.warning("could not tidy tmp/: %s: %s", type(error).__name__, error)

        # (said in the store: another process's evictions need not keep what this node maps, its preloads)
        announced = folder = None
        if not depot.store.read_only:
            folder = depot.store.layout.lock_path.parent / LETTING_GO
            announced = await asyncio.to_thread(announce_letting_go, folder)

        async def loop() -> None:
            said: set[str] = set()
            next_look = time.monotonic() + LET_GO_EVERY
            while True:
                await asyncio.sleep(SAY_SENDING_EVERY)
                try:
                    # (... but the blobs it is sending: an answer to a slow client is no preload; said within a
                    # moment of its start, a look now and then, written only when it changed)
                    sending = depot.sending()
                    if announced is not None and sending != said:
                        await asyncio.to_thread(say_sending, announced, sending)
                        said = sending
                    if time.monotonic() < next_look:
                        continue
                    next_look = time.monotonic() + LET_GO_EVERY
                    await asyncio.to_thread(depot.let_go_of_removed)
                except RuntimeError as error:
                    if "interpreter shutdown" in str(error):  # (a node left running as its program ends)
                        return
                    log.warning("could not look for removed revisions: %s: %s", type(error).__name__, error)
                except Exception as error:  # (a busy or full index: next time)
                    log.warning("could not look for removed revisions: %s: %s", type(error).__name__, error)

        task = asyncio.get_running_loop().create_task(loop(), name="let-go-of-removed")
        try:
            yield
        finally:
            if announced is not None and folder is not None:
                stop_letting_go(folder, announced)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return watch
