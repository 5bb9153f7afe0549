"""Running the node until SIGINT, SIGTERM or SIGHUP; in-flight responses get time to finish.

The app is served through :class:`~modeldepot.server.connections.NodeRunner` (a header-read timeout, caps on
concurrent connections, one log line per malformed request), which ``web.run_app`` cannot take, so the
serving loop is here: set up, listen, wait for a signal, clean up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from aiohttp import web

from modeldepot.depot import Depot
from modeldepot.errors import ConfigError, DepotError, ReadOnlyStoreError
from modeldepot.server.app import create_app
from modeldepot.server.connections import (
    BACKLOG,
    ConnectionLimits,
    NodeRunner,
    NodeServer,
    raise_open_file_limit,
)
from modeldepot.server.context import CONTROL_TOKEN, SCRUB
from modeldepot.server.fleet import NodeFleet, advertised_url
from modeldepot.store.scrub import DEFAULT_SCRUB_RATE, Scrubber
from modeldepot.validation import redact_credentials

__all__ = ["SHUTDOWN_GRACE", "dashboard_line", "run_server"]

SHUTDOWN_GRACE = 30.0  # seconds in-flight responses get after SIGINT/SIGTERM/SIGHUP


def run_server(
    depot: Depot,
    host: str,
    port: int,
    token: str | None,
    log_level: str = "info",
    mirror: bool = False,
    preload_top: int = 0,
    limits: ConnectionLimits | None = None,
    scrub_interval: float = 86400.0,
    scrub_rate: float = DEFAULT_SCRUB_RATE,
    advertise: str | None = None,
    repair: bool = False,
    shutdown_grace: float = SHUTDOWN_GRACE,
    public_url: str | None = None,
) -> signal.Signals | None:
    """Serve ``depot`` until SIGINT, SIGTERM or SIGHUP; returns the signal that stopped it (None: Ctrl-C where
    signals are not handled). With ``depot.config.cluster`` the node joins its fleet: it registers at
    ``advertise`` (default: the listening address) once it listens, publishes what it holds, and leaves the
    registry first at shutdown."""
    logging.basicConfig(
        level=log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    log = logging.getLogger("modeldepot.server")
    limits = limits or ConnectionLimits()
    open_files = raise_open_file_limit()  # before the runner sizes its total cap from it
    cluster = depot.config.cluster
    fleet = NodeFleet(depot, cluster, depot.config.cluster_prefix, token=bool(token)) if cluster else None
    if mirror and depot.store.read_only:
        log.warning("not mirroring: the store is %s, so this node serves what it holds and answers 404 for "
                    "the rest (serve a writable store to mirror %s)", depot.store.read_only_reason,
                    depot.config.hub_endpoint)  # fmt: skip
        mirror = False
    app = create_app(depot, token, mirror=mirror, fleet=fleet, public_url=public_url)
    mode = "token required" if token else "no token: reads open; private repos and control: the control token"
    if mirror:
        upstreams = [*depot.config.servers, *(["the fleet"] if cluster else []), depot.config.hub_endpoint]
        mode += f"; mirroring {', '.join(dict.fromkeys(upstreams))}"  # (--upstream may be HF_ENDPOINT)
    # (its access log: NodeAccessLogger on modeldepot.access, one line per request with its body bytes)
    # (an answer under way gets the whole grace, then is cut: NodeRequestHandler.shutdown hands aiohttp, which
    # would wait its timeout twice, only what is left of it; half the grace each cut answers at half the
    # grace the node said, a review)
    runner = NodeRunner(app, limits=limits, shutdown_timeout=shutdown_grace)

    if scrub_interval > 0:
        scrubber = depot.scrubber(scrub_rate)
        app[SCRUB] = scrubber.tally
        app.cleanup_ctx.append(_scrubbing(scrubber, scrub_interval))
    if repair and depot.store.read_only:
        log.warning("not repairing: the store is %s, so files found corrupt stay out of service until pulled "
                    "where it is writable", depot.store.read_only_reason)  # fmt: skip
    elif repair:
        app.cleanup_ctx.append(_repairing(depot))

    stopped_by: list[signal.Signals] = []
    token_file: list[Path | None] = []  # where the control token is kept while the node runs (a service's)

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        # SIGHUP too (the terminal or SSH session that started it closed, a supervisor's reload): by default it
        # killed the node on the spot, downloads cut, nothing logged, the fleet's record left for its lease (an
        # explorer's trial)
        signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

        def on_second_signal(number: signal.Signals) -> None:
            # The default behaviour, said first: it ended the node with no line after "stopping" (an explorer's
            # trial). What was published stays consistent; what was under way resumes.
            server = runner.server
            going = server.answers_under_way() if isinstance(server, NodeServer) else 0
            log.warning("%s again: stopping at once%s", number.name,
                        f", {going} answer{'s' if going != 1 else ''} under way cut" if going else "")  # fmt: skip
            for each in signals:
                loop.remove_signal_handler(each)
            signal.raise_signal(number)

        def on_signal(number: signal.Signals) -> None:
            stop.set()
            stopped_by.append(number)
            for each in signals:  # a second signal stops at once: no more waiting
                loop.add_signal_handler(each, on_second_signal, each)
            server = runner.server
            going = server.answers_under_way() if isinstance(server, NodeServer) else 0
            log.info("stopping (%s): %s under way get%s up to %g s to end (a second signal stops at once)",
                     number.name, f"{going} answer{'s' if going != 1 else ''}", "s" if going == 1 else "",
                     shutdown_grace)  # fmt: skip

        with contextlib.suppress(NotImplementedError):  # Windows: Ctrl-C raises KeyboardInterrupt instead
            for number in signals:
                loop.add_signal_handler(number, on_signal, number)
        if fleet is not None:
            await fleet.start()  # the view first: pulls (a mirror's) read it from the first request on
        try:
            await runner.setup()
            try:
                await listen()
                await stop.wait()
            finally:
                if fleet is not None:
                    await fleet.close()  # out of the registry first, so peers stop choosing this node
                server = runner.server
                await runner.cleanup()  # stops listening, gives in-flight responses shutdown_grace seconds
                if isinstance(server, NodeServer) and server.cut_at_stop:
                    log.warning("%d answer%s still going after %g s %s cut as the node stopped (their clients "
                                "may resume: a Range request)", server.cut_at_stop,
                                "s" if server.cut_at_stop != 1 else "", shutdown_grace,
                                "were" if server.cut_at_stop != 1 else "was")  # fmt: skip
        finally:
            if fleet is not None:
                await fleet.close()  # (when setting up failed)

    async def listen() -> None:
        try:
            await web.TCPSite(runner, host, port, backlog=BACKLOG).start()
        except OSError as error:  # a port in use, an address not this machine's, a name that does not resolve
            # (aiohttp's message repeats the address; a name that does not resolve has no errno of its own)
            number = error.errno
            reason = (
                os.strerror(number) if isinstance(number, int) and number > 0 else (error.strerror or error)
            )
            raise ConfigError(f"cannot listen on {host}:{port}: {reason}") from None
        if preload_top:  # once listening: a node that cannot start does not wait for a preload first
            preloader = depot.preloader
            log.info("preloading the %d most used models (budget %d bytes) in the background", preload_top,
                     preloader.budget)  # fmt: skip
            preloader.auto_preload_in_background(preload_top)
        bound = int(runner.addresses[0][1])
        log.info("serving %s on http://%s:%d (%s); HF_ENDPOINT=http://%s:%d for clients (it pulls from %s%s)",
                 depot.home, _in_url(host), bound, mode, _in_url(_client_host(host)), bound,
                 redact_credentials(depot.config.hub_endpoint),
                 " (offline: no pulls)" if depot.config.offline else "")  # fmt: skip
        if depot.store.made_now:  # (a mistyped --home served an empty store that said it was healthy)
            log.warning("no store was at %s: this node made a new, empty one (check the folder's name if you "
                        "meant another)", depot.home)  # fmt: skip
        if depot.store.read_only:
            log.info("the store is %s: it serves what it holds as it is, and pulls, pins and removals are "
                     "refused (503 ReadOnlyStore)", depot.store.read_only_reason)  # fmt: skip
        budget = depot.store.budget
        if budget.max_bytes is not None:
            log.info("disk budget: %d bytes (the store's: %s; MODELDEPOT_MAX_SIZE: %s)", budget.max_bytes,
                     budget.store_max_size or "none", budget.process_max_bytes or "none")  # fmt: skip
        downloads = await asyncio.to_thread(_kept_downloads, depot)
        # (a node killed mid-pull said nothing, once back, of the download it kept for a resume)
        if downloads:
            log.info("%s", downloads)
        for what, rate in (
            ("downloads", depot.config.max_download_rate),
            ("uploads", depot.config.max_upload_rate),
        ):
            if rate is not None:
                log.info("%s capped at %.1f MiB/s, all connections together", what, rate / 2**20)
        if fleet is not None:  # once listening: peers may come at once
            await fleet.register(advertise or advertised_url(host, int(runner.addresses[0][1])))
        server = runner.server
        assert isinstance(server, NodeServer)
        log.info(
            "connections: a request head within %g s, an answer read within %g s, at most %s per client "
            "address and %d in total (%d open files)",
            limits.header_timeout,
            limits.send_timeout,
            limits.max_per_client or "any number",
            server.max_total,
            open_files,
        )
        control = None if token else app[CONTROL_TOKEN]
        if control is not None and not sys.stderr.isatty():
            # A service's log is read by more than its owner (a journal's readers): the token that removes
            # models goes to a file of the node's user alone, not into it (an explorer's trial)
            token_file.append(await asyncio.to_thread(_keep_control_token, depot, bound, control))
        kept = token_file[0] if token_file else None
        line = dashboard_line(host, bound, control, kept, unkept=bool(token_file) and kept is None)
        if log.isEnabledFor(logging.INFO):
            log.info("%s", line)
        else:  # shown whatever the log level: without it, nobody can control a node without a token
            print(line, file=sys.stderr, flush=True)

    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve())
    finally:
        if token_file and token_file[0] is not None:
            with contextlib.suppress(OSError):
                token_file[0].unlink()  # (in a folder of this user alone)
    # What was written without a flush (deferred) reaches the disk (a read-only store has nothing to flush)
    try:
        flushed = 0 if depot.store.read_only else depot.sync(check=False)
    except ReadOnlyStoreError as error:  # (its disk turned read-only under it: nothing more can be done here)
        log.warning("nothing could be flushed before stopping: %s", error)
        flushed = 0
    if flushed:
        log.info("flushed %d blob(s) to disk before stopping", flushed)
    try:  # (the uses the node counted, written now: on a full disk their warning came after "stopped")
        depot.store.access.close()
    except DepotError as error:
        log.warning("could not record the models' uses before stopping: %s", error)
    # (the last line: a clean stop told from a hang a supervisor killed, an explorer's trial)
    log.info("stopped%s", f" ({stopped_by[0].name})" if stopped_by else "")
    return stopped_by[0] if stopped_by else None


def _client_host(host: str) -> str:
    """The address a client on this machine reaches a node listening on ``host`` at: a wildcard address is
    none, this machine's loopback is."""
    return {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


def _in_url(host: str) -> str:
    """``host`` as a URL names it: an IPv6 address in brackets (`HF_ENDPOINT=http://::1:8980` was printed
    for `serve --host ::1`, which no client reads, an explorer's trial)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def dashboard_line(host: str, port: int, control_token: str | None, kept_in: Path | None = None,
                   unkept: bool = False) -> str:  # fmt: skip
    """Where the dashboard is and how to control the node: with ``control_token`` (a node without a
    token), in the address's fragment, which the page takes and browsers never send, or where it is kept
    (``kept_in``: a node whose log is no terminal; ``unkept``: such a node could not keep it in a file, and
    does not log it); else (a node with a token) the address alone, never the token."""
    url = f"http://{_in_url(_client_host(host))}:{port}/"
    if unkept:
        return (f"dashboard: {url} (its control token could not be kept in a file of this user, and is not "
                "logged: start the node with a token, --token or MODELDEPOT_TOKEN_FILE, to use its controls)")  # fmt: skip
    if control_token is None:
        return f"dashboard: {url} (its controls need the node's token: --token / MODELDEPOT_TOKEN)"
    if kept_in is not None:
        return (f"dashboard: {url}#token=<the control token in {kept_in}, readable by this user alone> (it "
                "unlocks the pulls, pins and removals of this node, until it stops: keep it private)")  # fmt: skip
    return (
        f"dashboard: {url}#token={control_token} (this control token unlocks the pulls, pins and removals "
        "of this node, until it stops: keep it private)"
    )


def _keep_control_token(depot: Depot, port: int, control_token: str) -> Path | None:
    """Write the node's control token to ``locks/control-<uid>/token-<port>`` of its store: a folder of this
    user alone (0700), the file made new (removed when the node stops). In a store a group shares, another
    member could put a file (or a FIFO) at a path in ``locks/`` itself, and read the token a root node wrote
    into it, or hang the node opening it (a review). None when it cannot be (a read-only store, a folder of
    that name that is not this user's)."""
    me = os.geteuid()
    folder = depot.home / "locks" / f"control-{me}"
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder, 0o700)
        # (through the folder's descriptor: a name swapped meanwhile for a link leads nowhere)
        held = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if os.fstat(held).st_uid != me:
                logging.getLogger("modeldepot.server").warning(
                    "%s is not a folder of this user: the control token is not kept there", folder
                )
                return None
            os.fchmod(held, 0o700)
            name = f"token-{port}"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=held)  # (a node's killed before it: in this user's own folder)
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=held)  # fmt: skip
            try:
                os.write(fd, f"{control_token}\n".encode())
            finally:
                os.close(fd)
        finally:
            os.close(held)
    except OSError:
        return None
    return folder / name


def _scrubbing(scrubber: Scrubber, interval: float) -> Callable[[web.Application], AsyncIterator[None]]:
    """The background scrub, on its own thread while the server runs; stopped between two chunks at shutdown."""

    async def scrub(_app: web.Application) -> AsyncIterator[None]:
        stop = threading.Event()
        worker = threading.Thread(target=scrubber.run_every, args=(interval, stop), name="scrub", daemon=True)
        worker.start()
        logging.getLogger("modeldepot.server").info(
            "scrubbing blobs older than %.0f s at up to %d bytes/s in the background", interval, scrubber.rate
        )
        yield
        stop.set()
        await asyncio.to_thread(worker.join, 30)

    return scrub


REPAIR_LOOK = 30.0  # seconds between a node's looks for files found corrupt (serve --repair)
REPAIR_PATIENCE = 3600.0  # the longest a revision whose repair failed waits for the next try


def _repairing(depot: Depot) -> Callable[[web.Application], AsyncIterator[None]]:
    """``serve --repair``: the files found corrupt (a scrub's, a read's, `verify`'s) fetched again in the
    background from the node's sources; a revision whose repair failed is tried again later and later."""

    async def repair(_app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(_repair_now_and_then(depot))
        logging.getLogger("modeldepot.server").info(
            "repairing files found corrupt, from this node's sources (a look every %.0f s)", REPAIR_LOOK
        )
        yield
        task.cancel()
        await asyncio.wait([task])

    return repair


def _kept_downloads(depot: Depot) -> str | None:
    """What the downloads an interrupted pull kept for a resume hold, said at start (None: none)."""
    from modeldepot.store.layout import size_text
    from modeldepot.store.maintenance import partial_bytes

    partials = depot.store.partials
    # (not a pull under way beside the node as it starts: a CLI's download was said kept for a resume)
    keys = [key for key in partials.keys_on_disk() if not partials.downloading(key)]
    if not keys:
        return None
    return (f"{len(keys)} interrupted download{'s' if len(keys) != 1 else ''} kept for a resume take "
            f"{size_text(partial_bytes(depot.store))} (a pull of their files resumes them; `modeldepot gc "
            "--partials` drops them)")  # fmt: skip


async def _repair_now_and_then(depot: Depot, look: float = REPAIR_LOOK) -> None:
    log = logging.getLogger("modeldepot.server")
    # A revision whose repair failed -> (when it is tried next, the wait before that)
    waits: dict[tuple[str, str], tuple[float, float]] = {}
    while True:
        repaired = False
        try:
            broken = await asyncio.to_thread(depot.broken_files)
            now = time.monotonic()
            due = [revision for revision in broken if waits.get(revision, (0.0, 0.0))[0] <= now]
            for outcome in await depot.repair_async(due) if due else ():
                revision = (outcome.repo_id, outcome.commit_id)
                named = f"{outcome.repo_id}@{outcome.commit_id[:12]}: {', '.join(outcome.paths[:3])}" + (
                    f" and {len(outcome.paths) - 3} more" if len(outcome.paths) > 3 else ""
                )
                if outcome.error is None:
                    waits.pop(revision, None)
                    log.info("repaired %s (found corrupt, fetched again and verified)", named)
                    repaired = True
                    continue
                wait = min(REPAIR_PATIENCE, max(look, 2 * waits.get(revision, (0.0, look / 2))[1]))
                waits[revision] = (time.monotonic() + wait, wait)
                log.warning("could not repair %s: %s; tried again in %.0f s", named, outcome.error, wait)
            for gone in set(waits) - set(broken):  # (pulled or removed meanwhile)
                del waits[gone]
            if repaired and depot.has_preloader:  # (a model `--preload-top` skipped as corrupt goes in now)
                depot.preloader.preload_again_after_repair()
        except DepotError as error:  # (a look that failed: the next one is made)
            log.warning("could not look for files to repair: %s", error)
        await asyncio.sleep(look)
