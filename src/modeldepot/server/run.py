"""Running the node until SIGINT or SIGTERM; in-flight responses get time to finish."""

from __future__ import annotations

import logging
import sys

from aiohttp import web

from modeldepot.depot import Depot
from modeldepot.server.app import MAX_HEADER, create_app

__all__ = ["SHUTDOWN_GRACE", "run_server"]

SHUTDOWN_GRACE = 30.0  # seconds in-flight responses get after SIGINT/SIGTERM
ACCESS_LOG_FORMAT = '%a "%r" %s %b %Tfs "%{User-Agent}i"'


def run_server(
    depot: Depot,
    host: str,
    port: int,
    token: str | None,
    log_level: str = "info",
    mirror: bool = False,
    preload_top: int = 0,
) -> None:
    logging.basicConfig(
        level=log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    log = logging.getLogger("modeldepot.server")
    app = create_app(depot, token, mirror=mirror)
    mode = "token required" if token else "no token: private repos are not served"
    if mirror:
        upstreams = [*depot.config.servers, depot.config.hub_endpoint]
        mode += f"; mirroring {', '.join(upstreams)}"

    async def announce(_app: web.Application) -> None:
        log.info(
            "serving %s on http://%s:%d (%s); HF_ENDPOINT=http://%s:%d",
            depot.home,
            host,
            port,
            mode,
            host,
            port,
        )

    app.on_startup.append(announce)
    if preload_top:

        async def preload_hot(_app: web.Application) -> None:
            preloader = depot.preloader
            log.info("preloading the %d most used models (budget %d bytes) in the background", preload_top,
                     preloader.budget)  # fmt: skip
            preloader.auto_preload_in_background(preload_top)

        app.on_startup.append(preload_hot)
    web.run_app(
        app,
        host=host,
        port=port,
        access_log=logging.getLogger("modeldepot.access"),
        access_log_format=ACCESS_LOG_FORMAT,
        shutdown_timeout=SHUTDOWN_GRACE,
        max_line_size=MAX_HEADER,
        max_field_size=MAX_HEADER,
        print=None,
    )
