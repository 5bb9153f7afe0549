"""``modeldepot serve``: the store over HTTP, as a mirror with --upstream, in a fleet with --cluster."""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import signal
import socket
import sys
import urllib.parse
from typing import Any

import click

from modeldepot.cli import cli, render
from modeldepot.cli.options import (
    FromEnvironment,
    cluster_options,
    home_option_after,
    max_size_value,
    rate_value,
    server_urls,
    setting,
    upstream_urls_checked,
    use_cluster,
    use_rates,
)
from modeldepot.cli.space import confirm_evictions
from modeldepot.config import DepotConfig, node_token, parse_duration, parse_size, truthy
from modeldepot.depot import Depot
from modeldepot.errors import ConfigError, InvalidInputError


def _the_stores_budget(depot: Depot, max_size: str) -> bool:
    """Whether ``max_size`` is the budget the store has (typed as it was, or otherwise: 200G, 200GiB)."""
    from modeldepot.store.budget import parse_max_size

    saved = depot.store.budget.store_max_size
    return saved is not None and parse_max_size(saved, depot.home) == parse_max_size(max_size, depot.home)


def _ready_to_serve(kwargs: dict[str, Any]) -> None:
    """What ``serve`` checks before its store is opened, or made in a mistyped --home (a ConfigError, exit
    2): --advertise has a cluster, the upstreams (``HF_ENDPOINT``, ``MODELDEPOT_SERVERS``) are URLs (a bad
    one started a mirror whose pulls answered 500), the RAM budget (--preload-budget,
    ``MODELDEPOT_PRELOAD_BUDGET``) can be read, and the port is free."""
    from modeldepot.preload.preloader import parse_budget

    # The node's line shape from its first line on, before its store opens: one said as it opened (its disk
    # full, its reserve released) went out bare, without time or level (an explorer's trial)
    logging.basicConfig(stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parse_budget(kwargs["preload_budget"] or DepotConfig.from_env().preload_budget)
    if (
        kwargs["advertise"] is not None
        and kwargs["cluster"] is None
        and DepotConfig.from_env().cluster is None
    ):
        raise ConfigError("--advertise needs a cluster to advertise in: give --cluster too")
    upstream_urls_checked()
    _listenable(kwargs["host"], kwargs["port"])
    if kwargs["upstreams"]:
        _not_its_own_upstream(kwargs["upstreams"], kwargs["host"], kwargs["port"])
        _not_offline()


def _not_offline() -> None:
    """A mirror in offline mode (ConfigError) fetches nothing: it said "mirroring" at start and answered every
    miss 503, which huggingface_hub retried for 23 s before it said to check the connection (an explorer's
    trial). Easy to do: cluster images export ``HF_HUB_OFFLINE=1`` for every process."""
    if DepotConfig.from_env().offline:
        set_by = [name for name in ("HF_HUB_OFFLINE", "MODELDEPOT_OFFLINE") if truthy(os.environ.get(name))]
        raise ConfigError(f"--upstream given, but {' and '.join(set_by) or 'offline mode'} makes this node fetch "
                          "nothing: a mirror would answer every miss 503. Unset it for `serve` (its clients may "
                          "keep it), or drop --upstream to serve what the store holds")  # fmt: skip


def _not_its_own_upstream(upstreams: tuple[str, ...], host: str, port: int) -> None:
    """A mirror that names itself as an upstream (ConfigError) asks itself for what it lacks: a repo nobody
    has took 30 s to answer 404, a new repo's first file a 504 (an explorer's trial). Easy to do: the README
    exports ``HF_ENDPOINT`` for the clients, and a ``serve`` started from that shell inherits it."""
    hub = DepotConfig.from_env().hub_endpoint
    for url, given_as in [*((u, "--upstream") for u in upstreams), (hub, "HF_ENDPOINT")]:
        if _is_this_node(url, host, port):
            hint = ("unset it for `serve` (its clients keep it) or set it to the Hub the mirror pulls from"
                    if given_as == "HF_ENDPOINT" else "give the node or Hub it should pull from")  # fmt: skip
            raise ConfigError(f"{given_as} {url} is this node's own address ({host}:{port}): a mirror would ask "
                              f"itself for what it lacks; {hint}")  # fmt: skip


def _is_this_node(url: str, host: str, port: int) -> bool:
    """Whether ``url`` reaches the node about to listen on host:port (a name resolved only when the port is
    the node's: the Hub's own name is never looked up on a machine without DNS)."""
    parsed = urllib.parse.urlsplit(url)
    try:
        url_port = parsed.port or (443 if parsed.scheme == "https" else 80)
    except ValueError:
        return False
    if port == 0 or url_port != port or not parsed.hostname:
        return False
    reached = {_as_connected(address) for address in _addresses(parsed.hostname, port)}
    listened = _addresses(host, port, passive=True)
    if reached & listened:
        return True
    # A wildcard listens on every address of its family this machine has (IPv6 apart: V6ONLY, as it binds)
    return any(
        _is_local(address)
        for address in reached
        if ("0.0.0.0" in listened and ":" not in address) or ("::" in listened and ":" in address)
    )


def _addresses(host: str, port: int, passive: bool = False) -> set[str]:
    try:
        found = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE if passive else 0
        )
    except (OSError, UnicodeError):
        return set()
    return {str(address[4][0]) for address in found}


def _as_connected(address: str) -> str:
    """The address a connection to ``address`` reaches: 0.0.0.0 and :: are this host, an IPv4-mapped
    address its IPv4 one."""
    if address == "0.0.0.0":
        return "127.0.0.1"
    if address == "::":
        return "::1"
    if address.lower().startswith("::ffff:") and "." in address:
        return address[len("::ffff:") :]
    return address


def _is_local(address: str) -> bool:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((address, 0))
    except OSError:
        return False
    return True


def _listenable(host: str, port: int) -> None:
    """Whether ``serve`` may listen on host:port: tried before the store is opened (or made, in a mistyped
    --home), so that a port in use or an address not this machine's is said first. (The listen itself
    still says so, if the port is taken between.)"""
    if port == 0:
        return
    try:
        for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                                 flags=socket.AI_PASSIVE):  # fmt: skip
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (as the server binds: asyncio's
                if family == socket.AF_INET6:  # way, IPv6 apart from IPv4)
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind(address)
    except OSError as error:
        reason = (
            os.strerror(error.errno) if isinstance(error.errno, int) and error.errno > 0 else error.strerror
        )
        raise ConfigError(f"cannot listen on {host}:{port}: {reason or error}") from None


@cli.command("serve")
# (not MODELDEPOT_PORT: Kubernetes gives every pod of a namespace with a Service named modeldepot that name, as
# tcp://10.96.0.12:8980, and nodes there stopped starting, a review)
@click.option("--host", cls=FromEnvironment, envvar="MODELDEPOT_LISTEN_HOST", default="127.0.0.1",
              show_default=True, help="Address to listen on ($MODELDEPOT_LISTEN_HOST sets it too).")  # fmt: skip
@click.option("--port", cls=FromEnvironment, envvar="MODELDEPOT_LISTEN_PORT", default=8980, show_default=True,
              type=click.IntRange(0, 65535), help="Port to listen on ($MODELDEPOT_LISTEN_PORT sets it too).")  # fmt: skip
@click.option(
    "--token",
    cls=FromEnvironment,
    envvar="MODELDEPOT_TOKEN",
    default=None,
    callback=lambda c, p, v: _token(v),
    help="Require 'Authorization: Bearer TOKEN' on every route but health (default: $MODELDEPOT_TOKEN). "
    "Without one, reads are open and the control routes need a control token made at start (printed in "
    "the dashboard's address).",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default=None,
    help="What the node logs to stderr [default: $MODELDEPOT_LOG_LEVEL, else info].",
)
@click.option(
    "--upstream",
    "upstreams",
    multiple=True,
    metavar="URL[,URL...]",
    callback=server_urls,
    help="Mirror: pull what the store lacks from these depot nodes (then the Hub at HF_ENDPOINT) while "
    "serving it; --upstream $HF_ENDPOINT mirrors the Hub alone (asked as the Hub). Repeatable or "
    "comma-separated; replaces MODELDEPOT_SERVERS.",
)
@click.option("--preload-budget", default=None, metavar="SIZE|N%",
              help="RAM for preloaded models (default: $MODELDEPOT_PRELOAD_BUDGET, else 50%).")  # fmt: skip
@click.option("--max-size", default=None, metavar="SIZE|N%", callback=lambda c, p, v: max_size_value(v),
              help="Set the store's disk budget (200GiB, or 80% of the disk), as `modeldepot budget` does: kept "
                   "with the store, so a pull beside the node keeps to it too; the least recently used revisions and variants "
                   "are evicted to make room, asked first (--yes) when the store holds more (default: the budget the store has; $MODELDEPOT_MAX_SIZE caps this "
                   "process further).")  # fmt: skip
@click.option("--max-download-rate", default=None, metavar="RATE", callback=lambda c, p, v: rate_value(v, "--max-download-rate"),
              help="What the node's pulls (a mirror's, a swarm's) may download together, at most (50MiB/s, or off; "
                   "default: $MODELDEPOT_MAX_DOWNLOAD_RATE, else no cap).")  # fmt: skip
@click.option("--max-upload-rate", default=None, metavar="RATE", callback=lambda c, p, v: rate_value(v, "--max-upload-rate"),
              help="What the node may send in file bodies, to all its clients together (50MiB/s, or off; default: "
                   "$MODELDEPOT_MAX_UPLOAD_RATE, else no cap).")  # fmt: skip
@click.option("--preload-top", default=0, show_default=True, type=click.IntRange(0, 1000),
              help="Preload the N most used models in the background at start.")  # fmt: skip
@click.option(
    "--header-timeout",
    cls=FromEnvironment,
    envvar="MODELDEPOT_HEADER_TIMEOUT",
    default=None,
    type=click.FloatRange(0, 86400, min_open=True),
    metavar="SECONDS",
    help="Close a connection that has not sent a complete request head this long after it opened or "
    "after its last response (default: $MODELDEPOT_HEADER_TIMEOUT, else 10).",
)
@click.option(
    "--send-timeout",
    cls=FromEnvironment,
    envvar="MODELDEPOT_SEND_TIMEOUT",
    default=None,
    type=click.FloatRange(0.001, 86400),
    metavar="SECONDS",
    help="Close a connection whose client has read nothing of an answer this long (default: "
    "$MODELDEPOT_SEND_TIMEOUT, else 60).",
)
@click.option(
    "--max-connections-per-client",
    cls=FromEnvironment,
    envvar="MODELDEPOT_MAX_CONNECTIONS_PER_CLIENT",
    default=None,
    type=click.IntRange(0),
    metavar="N",
    help="Concurrent connections one client address may hold; more are answered 503 and closed (counted in "
    "/metrics: modeldepot_http_connections_dropped_total), 0 for no cap; behind a reverse proxy every client "
    "has its address: raise it (default: $MODELDEPOT_MAX_CONNECTIONS_PER_CLIENT, else 256).",
)
@click.option("--scrub-interval", cls=FromEnvironment, envvar="MODELDEPOT_SCRUB_INTERVAL", default="1d", show_default=True,
              metavar="DURATION", callback=lambda c, p, v: setting(parse_duration, v),
              help="Rehash every blob this often in the background (1d, 12h, 30m; 0 or off: never), quarantining "
                   "what fails; local reads are guarded by this ($MODELDEPOT_SCRUB_INTERVAL sets it too).")  # fmt: skip
@click.option("--scrub-rate", cls=FromEnvironment, envvar="MODELDEPOT_SCRUB_RATE", default="64MiB", show_default=True, metavar="SIZE",
              callback=lambda c, p, v: setting(_positive_size, v), help="Bytes a second the scrub may read ($MODELDEPOT_SCRUB_RATE sets it too).")  # fmt: skip
@click.option("--shutdown-grace", cls=FromEnvironment, envvar="MODELDEPOT_SHUTDOWN_GRACE", default="30s",
              show_default=True, metavar="DURATION", callback=lambda c, p, v: setting(parse_duration, v),
              help="How long answers under way get to end once the node is told to stop (a few seconds under a "
                   "supervisor's TimeoutStopSec or a pod's terminationGracePeriodSeconds, which must leave it time to "
                   "flush; $MODELDEPOT_SHUTDOWN_GRACE sets it too).")  # fmt: skip
@click.option("--repair/--no-repair", cls=FromEnvironment, envvar="MODELDEPOT_REPAIR", default=False,
              help="Fetch again, in the background, the files found corrupt (by the scrub, a read, `verify`: "
                   "quarantined, not served) from this node's sources: its servers, its fleet, the Hub "
                   "($MODELDEPOT_REPAIR=1 sets it too; default: off, they wait for a pull).")  # fmt: skip
@click.option("--yes", "-y", is_flag=True,
              help="With --max-size below what the store holds: evict without asking (else a node asks on a "
                   "terminal, and without one refuses to start: a mistyped size removed models).")  # fmt: skip
@cluster_options
@click.option("--advertise", default=None, metavar="URL", callback=lambda c, p, v: _node_url(v),
              help="With --cluster: the URL peers reach this node at (default: http://HOST:PORT; for 0.0.0.0, this machine's name, said when it leads to itself alone).")  # fmt: skip
@click.option("--public-url", default=None, metavar="URL", envvar="MODELDEPOT_PUBLIC_URL",
              callback=lambda c, p, v: _node_url(v, "--public-url"),
              help="Where clients reach this node, behind a reverse proxy (https://models.example.com, or "
                   "with the prefix it is mounted under): the links of paged listings point there (default: "
                   "as each request says; $MODELDEPOT_PUBLIC_URL sets it too).")  # fmt: skip
@home_option_after(lambda kwargs: _ready_to_serve(kwargs), shared=False)
def serve_command(
    depot: Depot,
    host: str,
    port: int,
    token: str | None,
    log_level: str | None,
    upstreams: tuple[str, ...],
    preload_budget: str | None,
    max_size: str | None,
    max_download_rate: int | None,
    max_upload_rate: int | None,
    preload_top: int,
    header_timeout: float | None,
    send_timeout: float | None,
    max_connections_per_client: int | None,
    scrub_interval: float,
    scrub_rate: int,
    cluster: str | None,
    cluster_prefix: str | None,
    advertise: str | None,
    public_url: str | None,
    repair: bool,
    shutdown_grace: float,
    yes: bool,
) -> None:
    """Serve the store over HTTP: the Hub's API (HF_ENDPOINT=http://HOST:PORT) and /api/depot/v1.

    With --cluster (or $MODELDEPOT_CLUSTER) the node joins its fleet: it registers itself and publishes
    which contents it holds (by SHA-256 only), and its pulls find holders through the registry."""
    from modeldepot.server.connections import ConnectionLimits
    from modeldepot.server.run import run_server

    # The flag, else the variable (checked by the group), else info: the group's logging set from the variable
    # took the flag's place unseen, `--log-level debug` gave nothing under MODELDEPOT_LOG_LEVEL=warning (an
    # explorer's trial)
    log_level = log_level or os.environ.get("MODELDEPOT_LOG_LEVEL", "").strip().lower() or "info"
    logging.getLogger().setLevel(log_level.upper())
    if upstreams:
        # `--upstream $HF_ENDPOINT` mirrors the Hub alone, asked as the Hub: taken for a depot node, it was asked
        # its /api/depot/v1 routes for every file, each a 404 (an explorer's trial)
        hub = depot.config.hub_endpoint.rstrip("/")
        depot.config = dataclasses.replace(
            depot.config, servers=tuple(u for u in upstreams if u.rstrip("/") != hub)
        )
    use_cluster(depot, cluster, cluster_prefix)
    use_rates(depot, max_download_rate, max_upload_rate)
    if preload_budget is not None:
        depot.config = dataclasses.replace(depot.config, preload_budget=preload_budget)
    if max_size is not None:
        # (not for the budget the store has: over it, a node's start brings the store within it, as ever)
        if not yes and not depot.store.read_only and not _the_stores_budget(depot, max_size):
            # (with its store: without --home the hint previewed, and made, the default one, a review)
            confirm_evictions(depot, max_size, preview=f"`modeldepot budget {shlex.quote(max_size)} --dry-run "
                                                       f"--home {shlex.quote(str(depot.home))}`")  # fmt: skip
        evicted = depot.set_max_size(
            max_size
        )  # (the store's from now on; a store over it is brought within it)
    elif depot.store.budget.max_bytes is not None and not depot.store.read_only:
        cap, budget = depot.config.max_size, depot.store.budget
        if cap is not None and not yes and budget.process_max_bytes == budget.max_bytes:
            # MODELDEPOT_MAX_SIZE binds: asked as --max-size is (a typo in a unit file emptied the store at start,
            # imported models gone for good, and `budget` said "none": an explorer's trial)
            confirm_evictions(depot, cap, preview=f"`modeldepot budget {shlex.quote(cap)} --dry-run --home "
                                                  f"{shlex.quote(str(depot.home))}`, of the size MODELDEPOT_MAX_SIZE "
                                                  "gives,")  # fmt: skip
        evicted = depot.shrink()  # a store already over its budget is brought within it
    else:
        evicted = []
    render.render_evictions_at_start(evicted, depot.store.budget.max_bytes)
    limits = ConnectionLimits()
    if header_timeout is not None:
        limits = dataclasses.replace(limits, header_timeout=header_timeout)
    if send_timeout is not None:
        limits = dataclasses.replace(limits, send_timeout=send_timeout)
    if max_connections_per_client is not None:
        limits = dataclasses.replace(limits, max_per_client=max_connections_per_client)
    stopped_by = run_server(depot, host, port, token, log_level, mirror=bool(upstreams), preload_top=preload_top,
                            limits=limits, scrub_interval=scrub_interval, scrub_rate=scrub_rate,
                            advertise=advertise, repair=repair, shutdown_grace=shutdown_grace,
                            public_url=public_url)  # fmt: skip
    if stopped_by == signal.SIGHUP:
        # Stopped cleanly all the same, but as a process SIGHUP ends says (128 + 1): a supervisor's reload (a
        # unit's `ExecReload=kill -HUP`) stopped the node with 0, and Restart=on-failure never brought it back
        # (an explorer's trial)
        sys.exit(128 + signal.SIGHUP)


def _token(value: str | None) -> str | None:
    """A node token, refused when empty (`--token "$TOKEN"` with TOKEN unset served an open node, said only
    by an info line)."""
    if value is not None and not value.strip():
        raise click.BadParameter("the token is empty: that would serve every route openly. Give a token, or no "
                                 "--token (and no MODELDEPOT_TOKEN) for an open node")  # fmt: skip
    if value is None and "MODELDEPOT_TOKEN" in os.environ and not os.environ["MODELDEPOT_TOKEN"].strip():
        # (click takes an empty variable for an unset one: `-e MODELDEPOT_TOKEN="$TOKEN"`, TOKEN unset)
        raise click.BadParameter("MODELDEPOT_TOKEN is set but empty: that would serve every route openly. Set "
                                 "a token, or unset it for an open node")  # fmt: skip
    if value is None:  # (from a file: a mounted secret, out of `ps` and the environment)
        try:
            value = node_token(os.environ)
        except ConfigError as error:
            raise click.BadParameter(str(error)) from None
    given = value
    if given is not None and not all("!" <= c <= "~" for c in given):
        # (a newline, a space, a letter outside ASCII: no client can send it in an Authorization header,
        # so the node would refuse everyone, itself said nowhere)
        raise click.BadParameter("the token has a space, a control character or a character outside ASCII: no "
                                 "client can send it (`Authorization: Bearer TOKEN`); give printable ASCII alone")  # fmt: skip
    return value


def _node_url(value: str | None, option: str = "--advertise") -> str | None:
    """A click callback's check of ``option`` (--advertise, --public-url): an http(s) URL of a host, without a
    query (InvalidInputError: usage error)."""
    if value is None or (option != "--advertise" and not value.strip()):
        return None
    from modeldepot.discovery.base import validate_node_url

    try:
        return validate_node_url(value.strip()).rstrip("/")
    except InvalidInputError as error:
        raise click.BadParameter(str(error)) from None


def _positive_size(text: str) -> int:
    size = parse_size(text)
    if size <= 0:
        raise ConfigError(f"{text!r} is no rate: give more than 0 bytes a second (e.g. 64MiB)")
    return size
