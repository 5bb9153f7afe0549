"""The fleet's view and this node's entries in etcd: :class:`EtcdDiscovery` (see the package's docstring)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import aetcd  # type: ignore[import-untyped]

from modeldepot.config import ClusterTls
from modeldepot.discovery.base import (
    ChunkClaim,
    ClusterStatus,
    Holding,
    NodeRecord,
    check_holdings,
    check_node_record,
)
from modeldepot.discovery.etcd.claims import EtcdClaims
from modeldepot.discovery.etcd.wire import (
    MAX_TXN_BYTES,
    MAX_TXN_OPS,
    describe,
    encode,
    is_lease_not_found,
    txn_revision,
)
from modeldepot.errors import InvalidInputError

log = logging.getLogger("modeldepot.discovery.etcd")

MIN_BACKOFF = 0.1
MAX_BACKOFF = 2.0


class EtcdDiscovery(EtcdClaims):
    """The fleet in etcd (see the package's docstring). ``endpoints``: the cluster's members, as (host,
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
        credentials: tuple[str, str] | None = None,
        tls: ClusterTls | None = None,
        reread: Callable[[], tuple[tuple[str, str] | None, ClusterTls | None]] | None = None,
    ) -> None:
        super().__init__(
            endpoints, prefix, ttl, timeout=timeout, credentials=credentials, tls=tls, reread=reread
        )
        # What this node wants in etcd, and what it knows it wrote there (under its lease).
        self._record: NodeRecord | None = None
        self._desired: dict[str, Holding] = {}
        self._record_rev = 0  # the revision that wrote this node's record; 0: not (known to be) there
        # Holdings this node wrote and has not started to delete; None: may be in etcd, value unknown (a
        # failed write). Only a delete of one of these is a lost key (see _own_key_deleted).
        self._written: dict[str, Holding | None] = {}
        self._written_rev: dict[str, int] = {}
        self._checking = False
        # Another process's record under this node's id replaced this one's (two nodes serving one store):
        # its URL, until this node's record is written again
        self._displaced_by: str | None = None
        # The view's position in etcd's history.
        self._rev: int | None = None  # the last revision applied to the view; None: load a snapshot
        self._probe = False
        self._loaded = asyncio.Event()  # the first snapshot is in (or an attempt at every endpoint failed)
        self._failed_in_a_row = 0  # attempts of the view that failed since its last success
        self._tasks: list[asyncio.Task[None]] = []

    # -- the interface ------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self._since = time.time()
        client = await self._first_to_answer()
        if client is None or self._closed:  # (closed during the race: nothing to start)
            if client is not None:
                await self._close_quietly(client)
            await asyncio.gather(*self._old_clients, return_exceptions=True)
            return
        self._client = client
        self._tasks = [
            asyncio.create_task(self._follow(), name="etcd-discovery-follow"),
            asyncio.create_task(self._keep(), name="etcd-discovery-keep"),
        ]
        # The first view, or the first failure (an unreachable etcd is not an error here).
        loaded = asyncio.ensure_future(self._loaded.wait())
        try:
            # (an attempt at each endpoint: three hung before a live one took longer than a fixed bound)
            await asyncio.wait({loaded}, timeout=(len(self.endpoints) + 1) * self.timeout + 2)
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
                    # (a process that registered no node, a pull's, wrote its chunk claims alone)
                    whose = "this node" if self._record is not None else "this process's chunk claims"
                    log.warning("could not withdraw %s from etcd (%s): its keys go when its lease runs out, "
                                "within %g s", whose, describe(error), self._lease_ttl)  # fmt: skip
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
            and self._displaced_by is None
        )
        with self._lock:
            peers = len(self._nodes)
        displaced = self._displaced_by
        return ClusterStatus(
            backend="etcd",
            connected=self._connected,
            registered=registered,
            last_error=self._last_error,
            since=self._since,
            peers=peers,
            conflict=None
            if displaced is None
            else f"another process registered this node's id, at {displaced}: "
            "two nodes serving one store? Peers reach that one; this node is outside the fleet until it leaves",
        )

    # -- the view (the follower) ----------------------------------------------------------------------------

    async def _follow(self) -> None:
        backoff = MIN_BACKOFF
        while not self._closed:
            client = self._client
            try:
                if self._rev is not None and self._probe:  # after an outage: did etcd go back in time?
                    probe = await self._call(client.get_prefix(self._keys.nodes_root, keys_only=True))
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
                    snapshot = await self._call(client.get_prefix(self._keys.root))
                    self._load(snapshot)
                    self._rev = int(snapshot.header.revision)
                # From the last revision applied, not the one after: etcd compacted at revision R keeps
                # R's puts but drops its deletes, and answers a watch from R without an error. From R
                # itself, a compaction at R fails the watch (RevisionCompactedError: reload) instead of
                # losing a delete; R's events, applied again, change nothing.
                watch = await self._call(client.watch_prefix(self._keys.root, start_revision=self._rev))
                self._ok()
                self._answered("read")
                self._failed_in_a_row = 0
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
                self._failed(error, client, during="read")
                self._failed_in_a_row += 1
                # The first view waits for every endpoint: with the first of `etcd://A,B` down, a command's
                # view was empty after A's failure, and `peers` failed and every CLI pull went to the Hub (B
                # up: an explorer's trial). The next endpoint is tried at once (_failed moved to it).
                if self._failed_in_a_row >= len(self.endpoints):
                    self._loaded.set()
                self._probe = True
                if self._failed_in_a_row % len(self.endpoints):
                    continue
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
        self._claims_seen(claims)
        if self._record_rev or self._written:
            self._verify = True  # events were lost: check this node's own keys
            self._wake.set()
        self._changed()

    def _apply(self, event: Any) -> None:
        kv = event.kv
        try:
            parsed = self._keys.parse(kv.key)
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
            self._claim_changed(parsed, entry, revision, kv.lease)
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
            url = entry.url if isinstance(entry, NodeRecord) else "an unreadable record"
            if self._displaced_by != url:
                log.warning("etcd: another process registered this node's id %s, at %s (two nodes serving one "
                            "store?): peers reach that one now; this node serves on, outside the fleet, "
                            "until that one leaves", node_id, url)  # fmt: skip
            self._displaced_by = url
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
                    if self._record is not None:
                        self._answered("write")
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
                # (a registered node's pass checked its keys against its lease's, and wrote what lacked)
                if self._record is not None:
                    self._answered("write")
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
            if not is_lease_not_found(error):
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
            try:
                reply = await self._call(client.refresh_lease(self._lease_id))
            except aetcd.ClientError as error:
                if "lease not found" not in str(error):
                    raise
                expired = True
            else:
                if reply is None:
                    raise aetcd.ClientError("etcd did not answer the lease refresh")
                expired = reply.TTL <= 0
            if expired:
                # (a node that was itself stopped, SIGSTOP or a paused container, blamed etcd: an explorer's trial)
                log.warning(
                    "this node's etcd lease ran out (etcd out of reach, or this process not running, for more "
                    "than its %g s: a SIGSTOP, a paused container, a stalled machine?): registering again",
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
                self._changed()  # (registered again in the status, when nothing was missing: say so)
        if not self._record_rev:
            answer = await self._call(
                client.put(self._keys.node(record.node_id), encode(record.to_dict()), lease=self._lease_id)
            )
            self._record_rev = int(answer.header.revision)
            self._displaced_by = None
            self._set_node(record)
            self._changed()
            log.info("registered in etcd as node %s (%s)", record.node_id, record.url)
        await self._write_holdings(client, record.node_id)
        await self._write_settlements(client)
        self._ok()  # a whole pass went through (a partial one, as with a full etcd, is no recovery)

    async def _reconcile(self, client: Any, node_id: str) -> None:
        """After a failure: learn from the lease's own key list what of this node is in etcd, so that
        what is missing is written again and nothing present is written twice."""
        info = await self._call(client.get_lease_info(self._lease_id, keys=True))
        present = set(info.keys)
        if self._keys.node(node_id) not in present:
            self._record_rev = 0
        for sha256 in list(self._written):
            if self._keys.holding(sha256, node_id) not in present:
                del self._written[sha256]
                self._written_rev.pop(sha256, None)
        holdings_root = self._keys.holdings_root
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
            key = self._keys.holding(sha256, node_id)
            value = None if holding is None else encode(holding.to_dict())
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
        revision = txn_revision(responses)
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
        self._forget_claims()  # claims hang on the lease: gone with it
        self._changed()
