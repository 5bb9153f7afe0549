"""The fleet in etcd, through aetcd (imported only by this module, and this module only for ``etcd://``).

Keys, all under ``{prefix}/`` (``/modeldepot`` by default), values compact JSON::

    {prefix}/nodes/{node_id}               a NodeRecord       {"node_id", "url", "version", "started_at"}
    {prefix}/holdings/{sha256}/{node_id}   a Holding          {"size", "complete", "chunks_done", "chunks"}
    {prefix}/claims/{sha256}/{chunk_size}/{index}
                                           a ChunkClaim       {"node_id", "blake3"}

Every key this node writes hangs on one lease (``ttl``, 10 s by default), refreshed every ttl/3: when the
process dies its keys go within ``ttl``; :meth:`EtcdDiscovery.close` revokes the lease, which removes them
at once. Holdings are keyed by content first, so "who holds X" is one prefix of the view.

A claim is taken by a transaction that puts it only if the key does not exist (``create_revision == 0``) or
still is the claim being taken over (``mod_revision`` equal to the one named), and otherwise reads the
winner's; it hangs on the claiming process's lease (a process that only pulls, and never registers, gets a
lease of its own on its first claim), so a claimer's claims go with it. Settling a claim (its BLAKE3) and
releasing it compare the ``mod_revision`` too: a claim taken over is never overwritten or deleted.

Two tasks run on the caller's loop:

- the **writer** grants the lease, writes the record, writes the differences between the holdings
  :meth:`~EtcdDiscovery.publish` asked for and those it last wrote (transactions of at most 128 operations),
  refreshes the lease, sends the claim settlements etcd missed during an outage, and after any failure
  checks (by the lease's key list) what really is in etcd before writing again: a lease that ran out is
  granted anew and everything written again (its claims went with it: their settlements are dropped).
- the **follower** keeps the view: a snapshot of ``{prefix}/``, then one prefix watch; after an error it
  watches again from the last revision it applied (no event missed), or reloads a snapshot when etcd has
  compacted that revision away (or its revision went back: a cluster restored from a backup). It watches
  from the last revision applied, not the next one, because etcd compacted *at* a revision R keeps R's
  puts but not its deletes and still answers a watch from R without an error; R's events applied twice
  change nothing.

Everything read from etcd is input from outside: keys and values are checked (node ids, URLs, SHA-256,
sizes, JSON shapes) and a malformed one is skipped with a warning (once per key), never trusted.

When etcd is out of reach, reads answer from the last view, :meth:`~EtcdDiscovery.status` says so (with the
error and since when), one warning is logged per outage, and both tasks retry (backoff from 0.1 s, at most
2 s). Every call has a deadline (``timeout``), so a hung etcd stalls nothing; gRPC keepalive pings find a
dead connection within ~6 s. Several endpoints: after a failure the next one is tried.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar

import aetcd  # type: ignore[import-untyped]

from modeldepot.discovery.base import (
    ChunkClaim,
    ClusterStatus,
    Holding,
    NodeRecord,
    ViewDiscovery,
    check_holdings,
    check_node_record,
    validate_node_id,
)
from modeldepot.errors import InvalidInputError
from modeldepot.validation import (
    validate_blake3,
    validate_cluster_prefix,
    validate_endpoint,
    validate_sha256,
    validate_size,
)

__all__ = ["CHANNEL_OPTIONS", "MAX_TXN_OPS", "EtcdDiscovery"]

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_TXN_OPS = 128  # etcd's --max-txn-ops default
MAX_TXN_BYTES = 1 << 20  # under etcd's 1.5 MiB request limit
MAX_VALUE_BYTES = 4096  # a record or a holding is ~100 bytes: a far larger value is not ours
MIN_BACKOFF = 0.1
MAX_BACKOFF = 2.0
_MAX_WARNED_KEYS = 1000

# gRPC channel options: reconnect quickly (backoff 0.1-1 s, not gRPC's default of up to 120 s); find a
# dead or hung etcd by keepalive pings (every 5 s, also without calls: etcd answers GOAWAY to pings more
# often than every 5 s); no limit on the size of an answer (a snapshot of a large fleet).
CHANNEL_OPTIONS: dict[str, int] = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
    "grpc.keepalive_time_ms": 5000,
    "grpc.keepalive_timeout_ms": 1000,
    "grpc.keepalive_permit_without_calls": 1,
    "grpc.http2.max_pings_without_data": 0,
    "grpc.http2.ping_timeout_ms": 3000,
    "grpc.max_receive_message_length": -1,
}


def _describe(error: BaseException) -> str:
    text = str(error) or ("no answer in time" if isinstance(error, asyncio.TimeoutError) else "")
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= 300 else text[:297] + "…"


def _is_lease_not_found(error: BaseException) -> bool:
    return isinstance(error, aetcd.ClientError) and "lease not found" in str(error)


def _encode(data: Mapping[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":"), sort_keys=True).encode()


def _decode(value: bytes) -> object:
    if len(value) > MAX_VALUE_BYTES:
        raise InvalidInputError(f"the value is {len(value)} bytes (at most {MAX_VALUE_BYTES})")
    try:
        return json.loads(value)
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
        raise InvalidInputError(f"the value is not JSON: {error}") from None


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark an abandoned call's outcome as seen (no "exception was never retrieved" at exit)."""
    if not task.cancelled():
        task.exception()


class _Key(NamedTuple):
    """A key of the fleet, parsed: ``kind`` is node, holding or claim."""

    kind: str
    sha256: str = ""
    node_id: str = ""
    chunk_size: int = 0
    chunk: int = 0


def _number(text: str) -> int:
    """A decimal number in a key (no sign, no leading zero, no other digit than ASCII)."""
    if not text.isascii() or not text.isdigit() or (len(text) > 1 and text[0] == "0") or len(text) > 12:
        raise InvalidInputError(f"{text[:20]!r} is not a plain decimal number")
    return validate_size(int(text))


def _txn_revision(responses: Sequence[Any]) -> int:
    """The revision a transaction made (each operation's answer carries the header)."""
    for response in responses:
        kind = response.WhichOneof("response")
        if kind is not None:
            return int(getattr(response, kind).header.revision)
    return 0


class EtcdDiscovery(ViewDiscovery):
    """The fleet in etcd (see the module's docstring). ``endpoints``: the cluster's members, as (host,
    port); ``prefix``: where the keys live; ``ttl``: seconds a dead node's keys outlive it; ``timeout``:
    the deadline of each call to etcd.

    Use on one loop (the one that calls :meth:`start`); reads work from any thread. With etcd answering,
    an awaited :meth:`register` or :meth:`publish` returns once written; without, at once (the writer
    writes it when etcd is back). Holdings published before :meth:`register` wait for it."""

    name = "etcd"
    claims_supported = True

    def __init__(
        self,
        endpoints: Sequence[tuple[str, int]],
        prefix: str = "/modeldepot",
        ttl: float = 10.0,
        *,
        timeout: float = 3.0,
    ) -> None:
        super().__init__()
        if not endpoints:
            raise InvalidInputError("an etcd registry needs at least one endpoint (host, port)")
        self.endpoints = [validate_endpoint(host, port) for host, port in endpoints]
        self.prefix = validate_cluster_prefix(prefix)
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 1 <= ttl <= 3600:
            raise InvalidInputError(f"lease TTL {ttl!r} must be from 1 to 3600 seconds")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 300:
            raise InvalidInputError(f"etcd call timeout {timeout!r} must be more than 0 and at most 300 s")
        self.ttl = float(ttl)
        self.timeout = float(timeout)
        self._root = f"{self.prefix}/".encode()
        self._endpoint = 0
        self._client: Any = None
        self._old_clients: set[asyncio.Task[None]] = set()
        # What this node wants in etcd, and what it knows it wrote there (under its lease).
        self._record: NodeRecord | None = None
        self._desired: dict[str, Holding] = {}
        self._lease_id: int | None = None
        self._lease_ttl = self.ttl
        self._refresh_due = 0.0  # loop time of the next lease refresh
        self._record_rev = 0  # the revision that wrote this node's record; 0: not (known to be) there
        # Holdings this node wrote and has not started to delete; None: may be in etcd, value unknown (a
        # failed write). Only a delete of one of these is a lost key (see _own_key_deleted).
        self._written: dict[str, Holding | None] = {}
        self._written_rev: dict[str, int] = {}
        self._mine: dict[tuple[str, int], dict[int, ChunkClaim]] = {}  # this process's claims, by chunk
        # Settlements (a claimed chunk's BLAKE3) etcd did not take yet: an outage must not lose one (peers
        # take a claimed chunk only once its BLAKE3 is known), so the writer sends them when etcd is back.
        self._unsettled: dict[tuple[str, int], dict[int, str]] = {}
        self._verify = False  # something failed or vanished: check the lease and its keys before writing
        self._checking = False
        self._write_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        # The view's position in etcd's history.
        self._rev: int | None = None  # the last revision applied to the view; None: load a snapshot
        self._probe = False
        self._loaded = asyncio.Event()  # the first snapshot is in (or the first attempt failed)
        # Health.
        self._connected = False
        self._since: float | None = None
        self._last_error: str | None = None
        self._outage_logged = False
        self._warned: set[bytes] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._closed = False

    # -- the interface ------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self._since = time.time()
        self._client = self._new_client()
        self._tasks = [
            asyncio.create_task(self._follow(), name="etcd-discovery-follow"),
            asyncio.create_task(self._keep(), name="etcd-discovery-keep"),
        ]
        # The first view, or the first failure (an unreachable etcd is not an error here).
        loaded = asyncio.ensure_future(self._loaded.wait())
        try:
            await asyncio.wait({loaded}, timeout=2 * self.timeout + 2)
        finally:
            loaded.cancel()
        if self._record is not None:
            await self._push()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True  # the tasks' loops end on it too (a cancellation can be lost on 3.10/3.11)
        self._wake.set()
        for task in self._tasks:
            task.cancel()
        pending: set[asyncio.Task[None]] = set()
        if self._tasks:
            _done, pending = await asyncio.wait(self._tasks, timeout=self.timeout + 2)
        client = self._client
        async with self._write_lock:  # a write in flight ends first (within its deadline)
            if self._lease_id is not None and client is not None:
                try:
                    await self._call(client.revoke_lease(self._lease_id))
                except Exception as error:
                    log.warning(
                        "could not withdraw this node from etcd (%s): its keys go when its lease runs out, "
                        "within %g s",
                        _describe(error),
                        self._lease_ttl,
                    )
            self._lease_id = None
            self._record_rev = 0
            self._written.clear()
        if client is not None:
            await self._close_quietly(client)  # also ends a watch still being read
        if pending:
            _done, pending = await asyncio.wait(pending, timeout=self.timeout)
            if pending:
                log.warning("etcd discovery: %d task(s) did not end on close", len(pending))
        if self._old_clients:
            await asyncio.gather(*self._old_clients, return_exceptions=True)
        if self._record is not None:  # this node is no longer in the fleet, as others now see
            node_id = self._record.node_id
            with self._lock:
                self._drop_node(node_id)
                for sha256 in list(self._holdings):
                    self._drop_holding(sha256, node_id)
        self._connected = False
        self._since = time.time()
        self._changed()

    async def register(self, record: NodeRecord) -> None:
        check_node_record(record)
        if self._record is not None and record.node_id != self._record.node_id:
            raise InvalidInputError(f"this discovery already registered node {self._record.node_id!r}")
        if record != self._record:
            self._record = record
            self._record_rev = 0
        await self._push()

    async def publish(self, holdings: Mapping[str, Holding]) -> None:
        self._desired = check_holdings(holdings)
        await self._push()

    def status(self) -> ClusterStatus:
        registered = (
            self._connected
            and not (self._verify or self._checking)
            and self._lease_id is not None
            and self._record_rev > 0
        )
        with self._lock:
            peers = len(self._nodes)
        return ClusterStatus(
            backend="etcd",
            connected=self._connected,
            registered=registered,
            last_error=self._last_error,
            since=self._since,
            peers=peers,
        )

    # -- keys -----------------------------------------------------------------------------------------------

    def _node_key(self, node_id: str) -> bytes:
        return self._root + f"nodes/{node_id}".encode()

    def _holding_key(self, sha256: str, node_id: str) -> bytes:
        return self._root + f"holdings/{sha256}/{node_id}".encode()

    def _claim_key(self, sha256: str, chunk_size: int, index: int) -> bytes:
        return self._root + f"claims/{sha256}/{chunk_size}/{index}".encode()

    def _parse_key(self, key: bytes) -> _Key | None:
        """The key's kind and parts; None for a kind of key this version does not know (a newer one's).
        Raises InvalidInputError for a malformed key of a known kind."""
        try:
            parts = key[len(self._root) :].decode("ascii").split("/")
        except UnicodeDecodeError:
            raise InvalidInputError("the key is not ASCII") from None
        if parts[0] == "nodes" and len(parts) == 2:
            return _Key("node", node_id=validate_node_id(parts[1]))
        if parts[0] == "holdings" and len(parts) == 3:
            return _Key("holding", validate_sha256(parts[1]), validate_node_id(parts[2]))
        if parts[0] == "claims" and len(parts) == 4:
            return _Key(
                "claim", validate_sha256(parts[1]), chunk_size=_number(parts[2]), chunk=_number(parts[3])
            )
        if parts[0] in ("nodes", "holdings", "claims"):
            raise InvalidInputError(f"a {parts[0]} key has {len(parts) - 1} parts after it")
        return None

    def _warn(self, key: bytes, error: Exception) -> None:
        if key in self._warned:
            return
        if len(self._warned) < _MAX_WARNED_KEYS:
            self._warned.add(key)
        log.warning("etcd: skipping %r, which is not a valid fleet entry: %s", key[:200], error)

    # -- the view (the follower) ----------------------------------------------------------------------------

    async def _follow(self) -> None:
        backoff = MIN_BACKOFF
        while not self._closed:
            client = self._client
            try:
                if self._rev is not None and self._probe:  # after an outage: did etcd go back in time?
                    probe = await self._call(client.get_prefix(self._root + b"nodes/", keys_only=True))
                    if probe.header.revision < self._rev:
                        log.warning(
                            "etcd's revision went back (to %d, after %d: restored from a backup?): "
                            "reloading the fleet's view",
                            probe.header.revision,
                            self._rev,
                        )
                        self._rev = None
                    self._probe = False
                if self._rev is None:
                    snapshot = await self._call(client.get_prefix(self._root))
                    self._load(snapshot)
                    self._rev = int(snapshot.header.revision)
                # From the last revision applied, not the one after: etcd compacted at revision R keeps
                # R's puts but drops its deletes, and answers a watch from R without an error. From R
                # itself, a compaction at R fails the watch (RevisionCompactedError: reload) instead of
                # losing a delete; R's events, applied again, change nothing.
                watch = await self._call(client.watch_prefix(self._root, start_revision=self._rev))
                self._ok()
                self._loaded.set()
                backoff = MIN_BACKOFF
                async for event in watch:
                    if self._stopping():
                        break
                    self._apply(event)
                    self._rev = max(self._rev, int(event.kv.mod_revision))
                # The stream ended without an error: its client was closed (another endpoint, or close()).
                await asyncio.sleep(MIN_BACKOFF)
            except aetcd.RevisionCompactedError as error:
                log.info(
                    "etcd compacted its history past revision %s: reloading the fleet's view",
                    error.compacted_revision,
                )
                self._rev = None
            except Exception as error:
                self._failed(error, client)
                self._loaded.set()
                self._probe = True
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, MAX_BACKOFF)

    def _load(self, snapshot: Any) -> None:
        nodes: dict[str, NodeRecord] = {}
        holdings: dict[str, dict[str, Holding]] = {}
        claims: dict[tuple[str, int], dict[int, ChunkClaim]] = {}
        for kv in snapshot:
            parsed = self._parse(kv.key, kv.value, int(kv.mod_revision))
            if parsed is None:
                continue
            key, entry = parsed
            if isinstance(entry, NodeRecord):
                nodes[entry.node_id] = entry
            elif isinstance(entry, Holding):
                holdings.setdefault(key.sha256, {})[key.node_id] = entry
            else:
                claims.setdefault((key.sha256, key.chunk_size), {})[key.chunk] = entry
        self._replace_view(nodes, holdings, claims)
        for content, mine in list(self._mine.items()):  # a claim of ours that went (a lease ran out)
            held = claims.get(content, {})
            for index, claim in list(mine.items()):
                if index not in held or held[index].revision != claim.revision:
                    del mine[index]
        if self._record_rev or self._written:
            self._verify = True  # events were lost: check this node's own keys
            self._wake.set()
        self._changed()

    def _parse(
        self, key: bytes, value: bytes, revision: int
    ) -> tuple[_Key, NodeRecord | Holding | ChunkClaim] | None:
        """The key and the entry it holds, or None (skipped with a warning when malformed)."""
        try:
            parsed = self._parse_key(key)
            if parsed is None:
                return None
            if parsed.kind == "node":
                record = NodeRecord.from_dict(_decode(value))
                if record.node_id != parsed.node_id:
                    raise InvalidInputError(f"the record names node {record.node_id!r}")
                return parsed, record
            if parsed.kind == "claim":
                return parsed, ChunkClaim.from_dict(_decode(value), revision)
            return parsed, Holding.from_dict(_decode(value))
        except InvalidInputError as error:
            self._warn(key, error)
            return None

    def _apply(self, event: Any) -> None:
        kv = event.kv
        try:
            parsed = self._parse_key(kv.key)
        except InvalidInputError as error:
            if event.kind != "DELETE":
                self._warn(kv.key, error)
            return
        if parsed is None:
            return
        kind, sha256, node_id = parsed.kind, parsed.sha256, parsed.node_id
        revision = int(kv.mod_revision)
        found = self._parse(kv.key, kv.value, revision) if event.kind == "PUT" else None
        entry = None if found is None else found[1]
        if kind == "claim":
            content = (sha256, parsed.chunk_size)
            if isinstance(entry, ChunkClaim):
                self._set_claim(sha256, parsed.chunk_size, parsed.chunk, entry)
            else:
                self._drop_claim(sha256, parsed.chunk_size, parsed.chunk, revision)
            mine = self._mine.get(content)
            if mine is not None and parsed.chunk in mine and mine[parsed.chunk].revision < revision:
                if (
                    isinstance(entry, ChunkClaim)
                    and self._lease_id is not None
                    and kv.lease == self._lease_id
                ):
                    mine[parsed.chunk] = entry  # ours, settled (the answer to our write may come later)
                else:
                    del mine[parsed.chunk]  # gone with a lease, or taken over: no longer ours
            self._changed()
            return
        if kind == "node":
            if isinstance(entry, NodeRecord):
                self._set_node(entry)
            else:  # deleted (or now malformed: what it held is no longer trusted)
                self._drop_node(node_id)
        elif isinstance(entry, Holding):
            self._set_holding(sha256, node_id, entry)
        else:
            self._drop_holding(sha256, node_id)
        if event.kind == "DELETE":
            self._own_key_deleted(kind, sha256, node_id, kv.mod_revision)
        elif (
            kind == "node"
            and self._record is not None
            and node_id == self._record.node_id
            and kv.mod_revision > self._record_rev
            and kv.lease != self._lease_id
        ):
            self._warn(kv.key, InvalidInputError("another process registers this node id"))
        self._changed()

    def _own_key_deleted(self, kind: str, sha256: str, node_id: str, revision: int) -> None:
        """One of this node's keys was deleted after it wrote it (its lease ran out, or someone deleted
        it): write it again. A holding this node deletes itself left ``_written`` before the delete was
        sent, so its delete is never taken for a loss, whether the watch or the answer comes first."""
        if self._closed or self._record is None or node_id != self._record.node_id:
            return
        if kind == "node" and 0 < self._record_rev < revision:
            self._record_rev = 0
        elif kind == "holding" and sha256 in self._written and self._written_rev.get(sha256, 0) < revision:
            del self._written[sha256]
            self._written_rev.pop(sha256, None)
        else:
            return
        self._verify = True
        self._wake.set()

    # -- what this node writes (the writer) -----------------------------------------------------------------

    async def _push(self) -> None:
        """Write what changed now when etcd answers (so that an awaited register or publish is in etcd),
        else leave it to the writer's retries."""
        if not self._started or self._closed:
            return
        if not self._connected:
            self._wake.set()
            return
        client = self._client
        try:
            async with self._write_lock:
                if not self._closed:
                    await self._sync(client)
        except Exception as error:
            self._failed(error, client)

    async def _keep(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = MIN_BACKOFF
        while not self._closed:
            self._wake.clear()
            client = self._client
            try:
                async with self._write_lock:
                    await self._sync(client)
                backoff = MIN_BACKOFF
            except Exception as error:
                self._failed(error, client)
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, MAX_BACKOFF)
                continue
            if self._wake.is_set():
                continue
            # Until woken, or until the lease's next refresh: a timer, not asyncio.wait_for (which can
            # swallow a cancellation on Python 3.10 and 3.11).
            delay = None if self._lease_id is None else max(0.0, self._refresh_due - loop.time())
            timer = None if delay is None else loop.call_later(delay, self._wake.set)
            try:
                await self._wake.wait()
            finally:
                if timer is not None:
                    timer.cancel()

    async def _sync(self, client: Any) -> None:
        """Bring etcd in line with what this node wants there. Under the write lock."""
        try:
            await self._sync_once(client)
        except aetcd.ClientError as error:
            if not _is_lease_not_found(error):
                raise
            log.info("this node's etcd lease is gone: registering again under a new one")
            self._drop_lease()
            await self._sync_once(client)

    async def _sync_once(self, client: Any) -> None:
        record = self._record
        if self._closed or (record is None and self._lease_id is None):
            return  # keys are named by the node id: nothing is written before register() (or a claim)
        loop = asyncio.get_running_loop()
        verify, self._verify = self._verify, False  # a failure from here on sets it again
        if self._lease_id is not None and (verify or loop.time() >= self._refresh_due):
            reply = await self._call(client.refresh_lease(self._lease_id))
            if reply is None:
                raise aetcd.ClientError("etcd did not answer the lease refresh")
            if reply.TTL <= 0:
                log.warning(
                    "this node's etcd lease ran out (etcd was out of reach for more than its %g s?): "
                    "registering again",
                    self._lease_ttl,
                )
                self._drop_lease()
            else:
                self._refresh_due = loop.time() + self._lease_ttl / 3
        if record is None:  # a process that only claims chunks: its lease kept alive, its settlements sent
            await self._write_settlements(client)
            self._ok()
            return
        if self._lease_id is None:
            await self._grant_lease(client)
        elif verify:
            self._checking = True  # status: not "registered" until this node's keys are known to be there
            try:
                await self._reconcile(client, record.node_id)
            finally:
                self._checking = False
        if not self._record_rev:
            answer = await self._call(
                client.put(self._node_key(record.node_id), _encode(record.to_dict()), lease=self._lease_id)
            )
            self._record_rev = int(answer.header.revision)
            self._set_node(record)
            self._changed()
            log.info("registered in etcd as node %s (%s)", record.node_id, record.url)
        await self._write_holdings(client, record.node_id)
        await self._write_settlements(client)
        self._ok()  # a whole pass went through (a partial one, as with a full etcd, is no recovery)

    async def _grant_lease(self, client: Any) -> None:
        lease = await self._call(client.lease(math.ceil(self.ttl)))
        self._lease_id, self._lease_ttl = int(lease.id), max(1.0, float(lease.ttl))
        self._refresh_due = asyncio.get_running_loop().time() + self._lease_ttl / 3
        self._wake.set()  # the keeper refreshes it from now on

    # -- chunk claims ------------------------------------------------------------------------------------------

    async def claim_chunk(
        self, sha256: str, chunk_size: int, index: int, node_id: str, replaces: int = 0
    ) -> ChunkClaim | None:
        validate_sha256(sha256)
        validate_node_id(node_id)
        key = self._claim_key(sha256, validate_size(chunk_size), validate_size(index))
        if not self._started or self._closed:
            return None
        client = self._client
        try:
            if self._lease_id is None:
                async with self._write_lock:
                    if self._lease_id is None:
                        await self._grant_lease(client)
            lease = self._lease_id
            tx = client.transactions
            guard = tx.create(key) == 0 if replaces == 0 else tx.mod(key) == replaces
            value = _encode(ChunkClaim(node_id, None, 0).to_dict())
            won, responses = await self._call(
                client.transaction(
                    compare=[guard], success=[tx.put(key, value, lease=lease)], failure=[tx.get(key)]
                )
            )
        except Exception as error:
            self._failed(error, client)
            return None
        if won:
            revision = _txn_revision(responses)
            claim = ChunkClaim(node_id, None, revision)
            if lease == self._lease_id:
                self._mine.setdefault((sha256, chunk_size), {})[index] = claim
            self._set_claim(sha256, chunk_size, index, claim)
            self._changed()
            return claim
        found = responses[0] if responses else []
        if not found:  # the claim taken over is gone already (its lease ran out): nobody holds it now
            return await self.claim_chunk(sha256, chunk_size, index, node_id) if replaces else None
        value_found, meta = found[0]
        parsed = self._parse(key, value_found, int(meta.mod_revision))
        if parsed is None:
            return None  # malformed (warned): the caller fetches it itself
        winner = parsed[1]
        assert isinstance(winner, ChunkClaim)
        self._set_claim(sha256, chunk_size, index, winner)
        self._changed()
        return winner

    async def settle_claim(self, sha256: str, chunk_size: int, index: int, blake3: str) -> None:
        """Write the chunk's BLAKE3 into this process's claim. When etcd does not take it (an outage), the
        settlement is kept and the writer sends it once etcd answers again: a claim left unsettled keeps
        every peer from taking the chunk from this node, and the Hub from being asked for it, until the
        claim goes late (what an etcd restart mid-swarm did to every pull)."""
        validate_blake3(blake3)
        ours = self._mine.get((sha256, chunk_size), {}).get(index)
        if ours is None or self._closed or self._lease_id is None:
            return
        content = (sha256, chunk_size)
        if self._unsettled or not self._connected:
            # etcd is out of reach, or settlements wait already: queued behind them, not a deadline each
            # (a pull's workers await this), the writer sends them in order when etcd answers.
            self._unsettled.setdefault(content, {})[index] = blake3
            self._wake.set()
            return
        client = self._client
        try:
            await self._settle(client, content, index, blake3)
        except Exception as error:
            self._unsettled.setdefault(content, {})[index] = blake3
            self._failed(error, client)

    async def _settle(self, client: Any, content: tuple[str, int], index: int, blake3: str) -> None:
        """Settle one claim of this process, if it still is ours: a compare on its ``mod_revision`` (a claim
        taken over is never overwritten). Raises when etcd does not answer."""
        mine = self._mine.get(content, {})
        ours = mine.get(index)
        if ours is None or self._lease_id is None:
            return  # gone with its lease, taken over, or released
        sha256, chunk_size = content
        key = self._claim_key(sha256, chunk_size, index)
        claim = ChunkClaim(ours.node_id, blake3, 0)
        tx = client.transactions
        won, responses = await self._call(client.transaction(
            compare=[tx.mod(key) == ours.revision],
            success=[tx.put(key, _encode(claim.to_dict()), lease=self._lease_id)], failure=[tx.get(key)],
        ))  # fmt: skip
        if won:
            revision = _txn_revision(responses)
        else:
            # A settlement retried after a lost answer finds its own write there (this node's claim with
            # this BLAKE3, on this lease): it is settled. Anything else: the claim was taken over.
            found = responses[0] if responses else []
            if not found:  # gone (its lease ran out): nothing to settle
                mine.pop(index, None)
                return
            value, meta = found[0]
            revision = int(meta.mod_revision)
            parsed = self._parse(key, value, revision)
            if (
                parsed is None
                or parsed[1] != ChunkClaim(ours.node_id, blake3, revision)
                or int(meta.lease) != self._lease_id
            ):
                mine.pop(index, None)
                return
        settled = ChunkClaim(claim.node_id, claim.blake3, revision)
        mine[index] = settled
        self._set_claim(sha256, chunk_size, index, settled)
        self._changed()

    async def _write_settlements(self, client: Any) -> None:
        """Send the settlements etcd did not take (in the order they came), each dropped once written or
        once its claim is no longer this process's; raises at the first that etcd does not answer."""
        for content in list(self._unsettled):
            pending = self._unsettled.get(content, {})  # (a release meanwhile drops a content's)
            for index in list(pending):
                await self._settle(client, content, index, pending[index])
                pending.pop(index, None)
            if not pending and self._unsettled.get(content) is pending:
                del self._unsettled[content]

    async def release_claims(self, sha256: str, chunk_size: int) -> None:
        mine = self._mine.pop((sha256, chunk_size), {})
        self._unsettled.pop((sha256, chunk_size), None)  # released: nothing left to settle
        if not mine or self._closed:
            return
        client = self._client
        tx = client.transactions

        async def release(index: int, revision: int) -> None:
            key = self._claim_key(sha256, chunk_size, index)
            await self._call(client.transaction(compare=[tx.mod(key) == revision], success=[tx.delete(key)],
                                                failure=[]))  # fmt: skip
            self._drop_claim(sha256, chunk_size, index, revision)

        results = await asyncio.gather(
            *(release(i, c.revision) for i, c in mine.items()), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, Exception)]
        if errors:  # left to the lease: they go when this process ends
            self._failed(errors[0], client)
        self._changed()

    async def _reconcile(self, client: Any, node_id: str) -> None:
        """After a failure: learn from the lease's own key list what of this node is in etcd, so that
        what is missing is written again and nothing present is written twice."""
        info = await self._call(client.get_lease_info(self._lease_id, keys=True))
        present = set(info.keys)
        if self._node_key(node_id) not in present:
            self._record_rev = 0
        for sha256 in list(self._written):
            if self._holding_key(sha256, node_id) not in present:
                del self._written[sha256]
                self._written_rev.pop(sha256, None)
        holdings_root = self._root + b"holdings/"
        for key in present:
            if key.startswith(holdings_root):
                sha256 = key[len(holdings_root) :].split(b"/")[0].decode("ascii", "replace")
                self._written.setdefault(sha256, None)  # ours, but which value? (a lost answer)

    async def _write_holdings(self, client: Any, node_id: str) -> None:
        desired = self._desired
        changes: list[tuple[str, Holding | None]] = [
            (sha256, holding) for sha256, holding in desired.items() if self._written.get(sha256) != holding
        ]
        changes += [(sha256, None) for sha256 in self._written if sha256 not in desired]
        batch: list[tuple[str, Holding | None, bytes, bytes | None]] = []
        size = 0
        for sha256, holding in changes:
            key = self._holding_key(sha256, node_id)
            value = None if holding is None else _encode(holding.to_dict())
            cost = len(key) + len(value or b"") + 32
            if batch and (len(batch) >= MAX_TXN_OPS or size + cost > MAX_TXN_BYTES):
                await self._write_batch(client, node_id, batch)
                batch, size = [], 0
            batch.append((sha256, holding, key, value))
            size += cost
        if batch:
            await self._write_batch(client, node_id, batch)

    async def _write_batch(
        self, client: Any, node_id: str, batch: list[tuple[str, Holding | None, bytes, bytes | None]]
    ) -> None:
        ops = [
            client.transactions.delete(key)
            if value is None
            else client.transactions.put(key, value, lease=self._lease_id)
            for _sha, _holding, key, value in batch
        ]
        # A key this node deletes is no longer one it wrote from before the delete is sent: the watch may
        # show the delete before the transaction's answer comes, and an own delete is no lost key.
        for sha256, holding, _key, _value in batch:
            if holding is None:
                self._written.pop(sha256, None)
                self._written_rev.pop(sha256, None)
        try:
            _succeeded, responses = await self._call(client.transaction(compare=[], success=ops, failure=[]))
        except BaseException:
            for sha256, _holding, _key, _value in batch:  # applied or not: unknown until checked
                self._written[sha256] = None
                self._written_rev.pop(sha256, None)
            raise
        revision = _txn_revision(responses)
        with self._lock:
            for sha256, holding, _key, _value in batch:
                if holding is None:
                    self._drop_holding(sha256, node_id)
                else:
                    self._written[sha256] = holding
                    self._written_rev[sha256] = revision
                    self._set_holding(sha256, node_id, holding)
        self._changed()

    def _drop_lease(self) -> None:
        self._lease_id = None
        self._record_rev = 0
        self._written.clear()
        self._written_rev.clear()
        self._mine.clear()  # claims hang on the lease: gone with it
        self._unsettled.clear()  # (and so is what there was to settle)
        self._changed()

    def _stopping(self) -> bool:
        return self._closed

    # -- calls, health, endpoints -----------------------------------------------------------------------

    def _new_client(self) -> Any:
        host, port = self.endpoints[self._endpoint]
        return aetcd.Client(host, port, timeout=self.timeout, options=dict(CHANNEL_OPTIONS))

    def _endpoint_name(self) -> str:
        host, port = self.endpoints[self._endpoint]
        return f"{host}:{port}"

    async def _call(self, awaitable: Awaitable[T]) -> T:
        """One call to etcd, under a deadline of our own too (gRPC's is ``timeout``): a timer that cancels
        it (not asyncio.wait_for, which can swallow the caller's cancellation on Python 3.10 and 3.11)."""
        task = asyncio.ensure_future(awaitable)
        task.add_done_callback(_retrieve)
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            task.cancel()

        timer = asyncio.get_running_loop().call_later(self.timeout + 1.0, expire)
        try:
            return await task
        except asyncio.CancelledError:
            if expired:
                raise asyncio.TimeoutError(f"etcd did not answer in {self.timeout + 1:g} s") from None
            raise
        finally:
            timer.cancel()

    def _ok(self) -> None:
        if self._connected:
            return
        if self._outage_logged:
            log.info(
                "etcd %s answers again after %.1f s: checking this node's registration, resuming the watch",
                self._endpoint_name(),
                time.time() - (self._since or time.time()),
            )
        self._outage_logged = False
        self._connected = True
        self._since = time.time()
        self._last_error = None
        self._changed()

    def _failed(self, error: BaseException, client: Any) -> None:
        text = _describe(error)
        self._verify = True
        if not self._outage_logged:
            log.warning(
                "etcd %s is out of reach (%s): answering from the last view of the fleet (%d nodes) and "
                "retrying",
                self._endpoint_name(),
                text,
                len(self._nodes),
                exc_info=None if isinstance(error, (aetcd.ClientError, asyncio.TimeoutError)) else error,
            )
            self._outage_logged = True
            self._since = time.time()
        else:
            log.debug("etcd %s: still out of reach: %s", self._endpoint_name(), text)
        self._connected = False
        self._last_error = text
        self._wake.set()
        self._changed()
        if len(self.endpoints) > 1 and client is self._client and not self._closed:
            self._endpoint = (self._endpoint + 1) % len(self.endpoints)
            self._client = self._new_client()
            task = asyncio.create_task(self._close_quietly(client))
            self._old_clients.add(task)
            task.add_done_callback(self._old_clients.discard)

    async def _close_quietly(self, client: Any) -> None:
        try:
            await self._call(client.close())
        except Exception as error:
            log.debug("closing an etcd client: %s", _describe(error))
