"""This node in its fleet (``serve --cluster``): its record in the registry, and what its store holds.

- **Membership.** Once the node listens, it registers a record (node id = the store id, the advertised URL,
  version, start time). The discovery backend keeps it alive under a lease and withdraws it at a clean
  shutdown; a node that is killed disappears when its lease runs out.
- **Holdings.** Every :data:`PUBLISH_INTERVAL` seconds a cheap look tells whether the store changed, by this
  process or any other (a CLI import, pull, ``rm`` or ``gc`` on the same store, a quarantine): the index's
  ``PRAGMA data_version`` on a connection of its own, and the listing of ``partials/``. In between, every
  :data:`ENDED_LOOK` seconds, one stat says whether a download completed (the mtime of the partials'
  ``ENDED_MARK``, set as it lets go, once its blob is in the index): a pull that landed a file keeps its
  claims until the fleet sees the file held (its peers, else, found it neither claimed nor held, and took
  it from the Hub), so that moment is not left to the next look, up to a second later. Only then are the
  holdings computed again (every blob with state ``ok``, whole; every download in ``partials/`` with the
  chunks its log names, in progress; on a node without a token, public repos' contents alone) and handed to the discovery, which writes the difference in batches.
  An idle node does nothing more than those two looks, and the stat. Holdings name contents by SHA-256 alone: no repo
  or file name (a private repo's least of all) ever reaches the registry.
- **Outages.** The discovery keeps its last view and retries; this module logs each change of its state
  (registry lost, back, registered), and health shows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random
import socket
import threading
import time

import aiohttp
from aiohttp import web

from modeldepot._version import node_version
from modeldepot.depot import Depot
from modeldepot.discovery.base import ClusterStatus, Discovery, Holding, NodeRecord
from modeldepot.errors import DepotError
from modeldepot.hashing import chunk_count
from modeldepot.store.partials import PartialState
from modeldepot.store.store import Store
from modeldepot.transfer.chain import FLEET_NODE_SETTING, NODE_API, takes_token
from modeldepot.transfer.choosing import token_refused
from modeldepot.transfer.fleet import FLEET_READ_TIMEOUT, FleetView, PeerRow, other_fleets
from modeldepot.transfer.sources import HttpSource

__all__ = ["FLEET", "PUBLISH_INTERVAL", "HoldingsReader", "NodeFleet", "advertised_url"]

log = logging.getLogger("modeldepot.server")

PUBLISH_INTERVAL = 1.0  # seconds between looks at the store for changes to publish
ENDED_LOOK = 0.2  # seconds between looks, in between, for a download that ended (published at once)
# Seconds the registry may be unsure before it is said out of reach (an etcd member failing over to the next
# takes milliseconds; an etcd restarted, a second or two: said), or this node's record lost (its keys checked:
# two calls, behind a write)
CONNECTION_SETTLES, REGISTRATION_SETTLES = 0.5, 3.0
# A node's look at itself through the URL its peers are given: tries, the time each may take, the pause between
ADVERTISED_TRIES, ADVERTISED_TIMEOUT, ADVERTISED_PAUSE = 3, 5.0, 2.0
# Seconds between looks once it failed (it may answer later: a Service routes to a node once it is ready)
ADVERTISED_RECHECK = 30.0
# Whether the fleet takes this node's MODELDEPOT_TOKEN: a few peers asked for their info with it, soon after
# the node registers, then every so often
TOKEN_CHECK_PEERS, TOKEN_CHECK_FIRST, TOKEN_CHECK_EVERY, TOKEN_CHECK_TIMEOUT = 3, 3.0, 60.0, 5.0
ALONE_CHECK_AFTER = (
    10.0  # seconds after registering: a node still alone looks for fleets under other prefixes
)


def advertised_url(host: str, port: int) -> str:
    """The URL peers reach a node listening on ``host:port`` at, when ``--advertise`` gives none: that
    address, or this machine's name for a wildcard address (0.0.0.0, ::): its full name, or its host name
    when that one is only ``localhost`` (as on many machines: peers fetched from their own localhost)."""
    if host in ("", "0.0.0.0", "::"):
        host = next((n for n in (socket.getfqdn(), socket.gethostname()) if n and not _local_name(n)), "")
        host = host or socket.gethostname() or "localhost"
        if loopback_only(host):
            log.warning("this node listens on every address, and this machine's name (%s) leads to itself "
                        "alone: peers on other machines cannot reach it at http://%s:%d; give --advertise "
                        "http://NAME:%d with a name or address they reach", host, host, port, port)  # fmt: skip
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address
    return f"http://{host}:{port}"


def _local_name(name: str) -> bool:
    return name == "localhost" or name.startswith("localhost.")


def loopback_only(name: str) -> bool:
    """Whether ``name`` resolves to loopback addresses alone (or not at all)."""
    try:
        found = {str(info[4][0]) for info in socket.getaddrinfo(name, None)}
    except OSError:
        return True
    return all(address.startswith("127.") or address == "::1" for address in found)


class HoldingsReader:
    """What a store holds, by SHA-256, computed again only when something changed. Any thread may call it
    (one at a time: a lock sees to it); :meth:`close` when done."""

    def __init__(self, store: Store, public_only: bool = False) -> None:
        self.store = store
        # A node without a token serves peers public repos' contents alone: it names no other (peers that
        # asked for a private repo's blob it named were refused, one 404 after another)
        self.public_only = public_only
        self._lock = threading.Lock()
        self._counter = store.index.change_counter()
        self._version: tuple[int, int] | None = None
        self._signature: tuple[tuple[str, int, int], ...] | None = None
        self._ended = 0  # the partials' ENDED_MARK as the last look found it (ended_only)
        self._last: dict[str, Holding] | None = None  # the holdings the last look that answered returned
        self._blobs: dict[str, Holding] = {}
        self._partials: dict[
            str, tuple[int, int, PartialState | None]
        ] = {}  # log name -> (size, mtime, state)

    def poll(self, ended_only: bool = False) -> dict[str, Holding] | None:
        """The holdings if anything changed since the last call (the first call always answers), else None.
        ``ended_only``: only when a download completed since (the partials' ``ENDED_MARK``, which it sets as
        it lets go, once the index has the blob, changed), else None: one stat.

        The looks come before the reads they guard: a change that lands during a read is seen next time."""
        with self._lock:
            if ended_only and self._signature is not None:
                return self._poll_ended()
            return self._poll()

    def _poll_ended(self) -> dict[str, Holding] | None:
        """What :meth:`poll` says to a quick look: the contents held whole now, with the downloads as the last
        full look found them (their progress is told at the next: five times a second, every download's
        progress rewritten at each file that completed, a review). None when no download completed."""
        ended = self.store.partials.ended_mark()
        if ended == self._ended or self._last is None:
            return None
        version = (self._counter.value(), self.store.refusals)
        if version != self._version:
            self._blobs = self._held_blobs()
        self._ended, self._version = ended, version  # (once read: a look that failed is made again)
        holdings = {sha: held for sha, held in self._last.items() if not held.complete}
        holdings.update(self._blobs)
        if holdings == self._last:
            return None
        self._last = holdings
        return holdings

    def _held_blobs(self) -> dict[str, Holding]:
        blobs = {}
        for blob in self.store.held_blobs(public_only=self.public_only):
            chunks = chunk_count(blob.size, blob.chunk_size)
            blobs[blob.sha256] = Holding(blob.size, True, chunks, chunks)
        return blobs

    def _poll(self) -> dict[str, Holding] | None:
        ended = self.store.partials.ended_mark()  # (first: a download that completes meanwhile is seen next)
        version = (
            self._counter.value(),
            self.store.refusals,
        )  # (a read-only store's refusals change no index)
        signature = self.store.partials.signature()
        if version == self._version and signature == self._signature:
            self._ended = ended
            return None
        if version != self._version:
            self._blobs = self._held_blobs()
        if signature != self._signature:
            known, self._partials = self._partials, {}
            for name, size, mtime in signature:
                cached = known.get(name)
                same = cached is not None and cached[:2] == (size, mtime)
                state = cached[2] if cached is not None and same else self.store.partials.state(name)
                self._partials[name] = (size, mtime, state)
        self._version, self._signature = version, signature
        holdings: dict[str, Holding] = {}
        for _size, _mtime, state in self._partials.values():
            if state is not None and (not self.public_only or self.store.partials.is_public(state.sha256)):
                chunks = state.chunks
                holdings[state.sha256] = Holding(state.size, False, min(state.chunks_logged, chunks), chunks)
        holdings.update(self._blobs)  # a content both whole and downloading (a race) is whole
        self._ended, self._last = ended, holdings
        return holdings

    def close(self) -> None:
        with self._lock:  # after a poll that runs on (a cancelled publisher leaves its thread running)
            self._counter.close()


class NodeFleet:
    """The node's discovery, on the server's loop: :meth:`start` before serving (pulls read the view),
    :meth:`register` once listening, :meth:`close` at shutdown (before in-flight answers finish: peers
    stop choosing a node that leaves)."""

    def __init__(
        self,
        depot: Depot,
        cluster: str,
        prefix: str,
        interval: float = PUBLISH_INTERVAL,
        *,
        token: bool = False,
    ) -> None:
        self.depot = depot
        self.token = token  # whether the node serves with a token (without, it names public contents alone)
        self.cluster = cluster
        self.prefix = prefix
        self.interval = interval
        self.discovery: Discovery | None = None
        self.view: FleetView | None = None
        self.record: NodeRecord | None = None
        self._task: asyncio.Task[None] | None = None
        self._state: tuple[bool, bool] | None = None  # (connected, registered), as last logged
        self._problem: str | None = None  # the publisher's last error, logged once
        # Why this node could not reach itself at the URL its peers are given (None: it did, or not looked yet)
        self.unreachable: str | None = None
        # Why the fleet's nodes refuse this one's requests (None: they take its token, or none was asked)
        self.refused: str | None = None
        self._check: asyncio.Task[None] | None = None
        self._token_check: asyncio.Task[None] | None = None
        self._alone_check: asyncio.Task[None] | None = None
        self._state_teller: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connect and load the view (an unreachable registry is no error: the view starts empty), and let
        the depot's pulls read it."""
        from modeldepot.discovery import open_discovery

        discovery = open_discovery(self.cluster, prefix=self.prefix)
        await discovery.start()
        self.discovery = discovery
        self.view = FleetView(discovery, asyncio.get_running_loop(), self.depot.node_id)
        self.depot.use_fleet(self.view)

    async def register(self, url: str) -> NodeRecord:
        """Announce this node at ``url``, and start publishing what its store holds."""
        assert self.discovery is not None, "start() first"
        self.record = NodeRecord(
            self.depot.node_id, url, node_version(), time.time(), self.depot.store.chunk_size
        )
        await self.discovery.register(self.record)
        log.info("cluster %s (prefix %s): this node is %s at %s", self.cluster, self.prefix,
                 self.record.node_id, url)  # fmt: skip
        # (off the way: the write may wait for another process's transaction, the holdings publisher not)
        self._noting = asyncio.get_running_loop().run_in_executor(None, self._note_fleet_node)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="holdings-publisher")
        self._check = asyncio.get_running_loop().create_task(
            self._check_advertised(url), name="advertised-url"
        )
        self._token_check = asyncio.get_running_loop().create_task(self._check_token(), name="fleet-token")
        self._alone_check = asyncio.get_running_loop().create_task(self._check_alone(), name="fleet-alone")
        self._state_teller = asyncio.get_running_loop().create_task(self._tell_state(), name="fleet-state")
        return self.record

    def _note_fleet_node(self) -> None:
        """Note in the store that it is a fleet node's, and since when (a pull of it while this serve is down
        says it joins no swarm); a store this node may not write (read-only) goes without. Never raises."""
        index = self.depot.store.index
        if index.read_only:
            return
        noted = json.dumps({"prefix": self.prefix, "at": time.time()})
        try:
            with index.write("noting the fleet this store serves in") as con:
                con.execute("INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET "
                            "value = excluded.value", (FLEET_NODE_SETTING, noted))  # fmt: skip
        except (DepotError, OSError) as error:
            log.debug("the store is not noted as this fleet's node: %s", error)

    async def _check_advertised(self, url: str) -> None:
        """Whether this node answers at the URL its peers are given: a node advertised at an address nobody
        reaches (a container's own, a mistyped --advertise) said "ok" in health and nothing in its log, while
        every peer failed to reach it (a trial). Asked as it registers, then (after three failures, said in
        a warning and in health) every ADVERTISED_RECHECK seconds until it answers (a Service that routes
        to the node once it is ready). (A node may fail to reach itself where its peers would not, behind a
        balancer without hairpinning: the warning says so.)"""
        assert self.record is not None
        failures = 0
        while True:
            problem = await self._ask_self(url)
            if problem is None:
                if self.unreachable is not None:
                    log.info("cluster %s: this node answers at %s now", self.cluster, url)
                self.unreachable = None
                return
            failures += 1
            if failures == ADVERTISED_TRIES:
                self.unreachable = (f"this node could not reach itself at {url}, the URL its peers are given "
                                    f"({problem}): peers may not either; check --advertise")  # fmt: skip
                log.warning("cluster %s: %s", self.cluster, self.unreachable)
            await asyncio.sleep(ADVERTISED_PAUSE if failures < ADVERTISED_TRIES else ADVERTISED_RECHECK)

    async def _check_token(self) -> None:
        """Whether the fleet's nodes take this node's MODELDEPOT_TOKEN: a node started with another token (or
        none, in a fleet with one) said "ok" in its health, and in every peer's, while each refused the other's
        requests, its pulls took every byte from the Hub and its claims in a swarm held the others up (an
        explorer's trial). A few live peers are asked for their info with the token; refused
        (:func:`~modeldepot.transfer.choosing.token_refused`), this node's health is degraded, naming them (said
        once in the log too)."""
        await asyncio.sleep(TOKEN_CHECK_FIRST)
        while True:
            peers = [row for row in self.rows() if row.node_id != self.depot.node_id]
            if peers:
                asked = random.sample(peers, min(TOKEN_CHECK_PEERS, len(peers)))
                token = self.depot.config.node_token
                answers = await asyncio.gather(
                    *(asyncio.to_thread(takes_token, HttpSource(url, "node", token), TOKEN_CHECK_TIMEOUT)
                      for url in (row.url.rstrip("/") for row in asked))
                )  # fmt: skip
                refusing = [row.node_id for row, takes in zip(asked, answers, strict=True) if takes is False]
                verdict = token_refused(answers)
                refused = None
                if verdict:
                    refused = (f"the fleet's nodes refuse this node's requests ({', '.join(refusing)} answer 401): "
                               "its MODELDEPOT_TOKEN is not theirs, so it shares nothing with them: give it the "
                               "fleet's token")  # fmt: skip
                if refused and not self.refused:
                    log.warning("cluster %s: %s", self.cluster, refused)
                elif self.refused and not refused and any(answers):
                    log.info("cluster %s: the fleet's nodes take this node's token now", self.cluster)
                if verdict is not None:
                    self.refused = refused
            await asyncio.sleep(TOKEN_CHECK_EVERY)

    async def _check_alone(self) -> None:
        """A node alone under its prefix while etcd holds nodes under others says so, once: a mistyped
        ``--cluster-prefix`` made a fleet of one without a word (an explorer's trial)."""
        await asyncio.sleep(ALONE_CHECK_AFTER)
        if self.discovery is None or any(row.node_id != self.depot.node_id for row in self.rows()):
            return
        elsewhere = await self.discovery.fleets_elsewhere()
        if elsewhere:
            log.warning("cluster %s: no other node is registered under prefix %s, but etcd holds nodes under %s: "
                        "is --cluster-prefix (MODELDEPOT_CLUSTER_PREFIX) the fleet's?", self.cluster, self.prefix,
                        other_fleets(elsewhere))  # fmt: skip

    async def _ask_self(self, url: str) -> str | None:
        """None when this node answers its health at ``url``; else what went wrong."""
        assert self.record is not None
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=ADVERTISED_TIMEOUT)) as session,
                session.get(f"{url.rstrip('/')}{NODE_API}/health", allow_redirects=False) as answer,
            ):
                body = await answer.json(content_type=None) if answer.status == 200 else None
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as error:
            return f"{type(error).__name__}: {error}".rstrip(": ")
        found = body.get("node_id") if isinstance(body, dict) else None
        if found == self.record.node_id:
            return None
        return (
            f"node {found} answers there"
            if isinstance(found, str)
            else f"what answers there is not this node (HTTP {answer.status})"
        )

    async def close(self) -> None:
        """Stop publishing, withdraw the record and holdings, disconnect. Idempotent."""
        for check in (self._check, self._token_check, self._alone_check, self._state_teller):
            if check is not None:
                check.cancel()
                await asyncio.gather(check, return_exceptions=True)
        self._check = self._token_check = self._alone_check = self._state_teller = None
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self.view is not None:
            self.view.detach()  # (no hand-over starts from here on)
            # Claims handed over after pulls: the node leaves, so no holding of theirs will show; cancelled,
            # each releases its claims at once (waited for, the publisher stopped, each ran out its patience)
            if running := self.view.background():
                for future in running:
                    future.cancel()
                await asyncio.wait([asyncio.wrap_future(f) for f in running], timeout=FLEET_READ_TIMEOUT)
            self.depot.use_fleet(None)
        discovery, self.discovery = self.discovery, None
        if discovery is not None:
            try:
                await discovery.close()
            except Exception as error:  # the registry is gone: the lease runs out by itself
                log.warning("cluster %s: could not withdraw this node (%s); it leaves when its lease ends",
                            self.cluster, error)  # fmt: skip

    def status(self) -> ClusterStatus | None:
        return self.discovery.status() if self.discovery is not None else None

    def rows(self) -> list[PeerRow]:
        return self.view.rows() if self.view is not None else []

    async def _run(self) -> None:
        assert self.discovery is not None
        discovery = self.discovery
        reader: HoldingsReader | None = None
        published: dict[str, Holding] | None = None
        pending: dict[str, Holding] | None = None
        look = min(ENDED_LOOK, self.interval)
        full_look_at = 0.0
        try:
            while True:
                try:
                    if reader is None:
                        reader = await asyncio.to_thread(HoldingsReader, self.depot.store, not self.token)
                    now = time.monotonic()
                    ended_only = now - full_look_at < self.interval - look / 2
                    if not ended_only:
                        full_look_at = now
                    found = await asyncio.to_thread(reader.poll, ended_only)
                    if found is not None and found != published:
                        pending = found
                    # (one that failed is tried again at the full looks: a registry in trouble is not asked
                    # five times a second)
                    if pending is not None and (found is not None or not ended_only):
                        await discovery.publish(pending)
                        published, pending = pending, None
                    self._problem = None
                except Exception as error:  # the store or the discovery failed once: try again next time
                    problem = f"{type(error).__name__}: {error}"
                    if problem != self._problem:
                        log.warning("cluster %s: publishing this node's holdings failed (%s); retrying",
                                    self.cluster, problem)  # fmt: skip
                    self._problem = problem
                await asyncio.sleep(look)
        finally:
            if reader is not None:
                await asyncio.to_thread(reader.close)

    async def _tell_state(self) -> None:
        """One log line per change of the registry's state, as it changes (woken by the discovery's changes:
        the publisher's looks, a second apart and held up by a publish or a read of the store, missed an
        outage now and then, and the log said nothing of it)."""
        assert self.discovery is not None
        discovery = self.discovery
        while True:
            status, before = discovery.status(), self._state
            if before is not None and worse(state_of(status), before):
                # (one etcd member of several failing over, a check of this node's keys after events were
                # lost: unsure for a moment, not out of reach or gone; said only if it lasts)
                settles = CONNECTION_SETTLES if before[0] and not status.connected else REGISTRATION_SETTLES
                with contextlib.suppress(TimeoutError):
                    await discovery.wait_for(functools.partial(back_to, discovery, before), settles)
                status = discovery.status()
            self._log_state(status)
            with contextlib.suppress(TimeoutError):
                await discovery.wait_for(functools.partial(changed_from, discovery, self._state), 5.0)

    def _log_state(self, status: ClusterStatus) -> None:
        """One log line per change of the registry's state."""
        state = state_of(status)
        previous, self._state = self._state, state
        if state == previous:
            return
        if not status.connected:
            log.warning(
                "cluster %s: the registry cannot be reached (%s); serving, and pulling from the last known "
                "view of the fleet (%d nodes) and then the Hub, until it answers again",
                self.cluster, status.last_error or "no answer", status.peers,
            )  # fmt: skip
        elif previous is not None and not previous[0]:
            log.info("cluster %s: the registry answers again (%s)", self.cluster,
                     "registered" if status.registered else "registering again")  # fmt: skip
        elif previous is not None and previous[1] and not status.registered:
            if status.conflict:  # (another process registered this node's id: said by the discovery, and
                return  # this node registers again only once that one leaves; "registering again" lied)
            log.warning(
                "cluster %s: this node's record is gone from the registry; registering again", self.cluster
            )
        elif status.registered and previous is not None:
            log.info("cluster %s: registered again", self.cluster)


def state_of(status: ClusterStatus) -> tuple[bool, bool]:
    return status.connected, status.registered


def changed_from(discovery: Discovery, state: tuple[bool, bool] | None) -> bool:
    return state_of(discovery.status()) != state


def back_to(discovery: Discovery, state: tuple[bool, bool]) -> bool:
    return state_of(discovery.status()) == state


def worse(state: tuple[bool, bool], than: tuple[bool, bool]) -> bool:
    """Whether ``state`` lost what ``than`` had: the connection, or the registration."""
    return any(had and not now for now, had in zip(state, than, strict=True))


FLEET = web.AppKey("fleet", NodeFleet)  # in an app served with a cluster only
