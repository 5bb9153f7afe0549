"""One node's session with etcd: the gRPC client (another endpoint after a failure), every call under a
deadline, the lease its keys hang on, and the health :meth:`~EtcdDiscovery.status` reports. The view and
the writer (:mod:`.discovery`) and the chunk claims (:mod:`.claims`) build on it."""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import aetcd  # type: ignore[import-untyped]
from aetcd import rpc

from modeldepot.config import ClusterTls
from modeldepot.discovery.base import ChunkClaim, Holding, NodeRecord, ViewDiscovery
from modeldepot.discovery.etcd.tls import TlsClient
from modeldepot.discovery.etcd.wire import (
    CHANNEL_OPTIONS,
    FleetKey,
    FleetKeys,
    decode,
    describe,
    is_auth_lost,
    is_lease_not_found,
    retrieve,
)
from modeldepot.errors import ConfigError, InvalidInputError
from modeldepot.validation import validate_cluster_prefix, validate_endpoint

log = logging.getLogger("modeldepot.discovery.etcd")

T = TypeVar("T")

_MAX_WARNED_KEYS = 1000
CANCEL_GRACE = 1.0  # seconds a call that timed out is given to end once cancelled
FLEETS_ELSEWHERE_STEPS = 64  # keys read, at most, looking for other fleets' prefixes
_FLEET_KEY = re.compile(rb"(.+)/(?:nodes|holdings|claims)/", re.DOTALL)  # a fleet's key, its prefix first


class EtcdConnection(ViewDiscovery):
    """The client, the lease and the health of a node's link to etcd (see :class:`EtcdDiscovery`)."""

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
        super().__init__()
        # Reads the credentials and the TLS files again (a mounted secret rotated, a certificate renewed on
        # disk): each new client takes them as they are now (read once, a node stayed out of the fleet for
        # good once its certificate expired or its password changed, though the new ones were there)
        self._reread = reread
        # (user, password) of etcd's own authentication (``cluster_credentials``): each client authenticates
        # as it connects, and a token etcd dropped (its TTL ran out, etcd restarted) is had again by a new one
        self._credentials = credentials
        self._tls = tls  # (an etcds:// fleet: every client's channel is TLS)
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
        self._keys = FleetKeys(self.prefix)
        self._endpoint = 0
        self._client: Any = None
        self._old_clients: set[asyncio.Task[None]] = set()
        self._lease_id: int | None = None
        self._lease_ttl = self.ttl
        self._refresh_due = 0.0  # loop time of the next lease refresh
        self._verify = False  # something failed or vanished: check the lease and its keys before writing
        self._write_lock = asyncio.Lock()
        self._wake = asyncio.Event()  # the writer's: something to write, or a failure to recover from
        self._connected = False
        self._since: float | None = None
        self._last_error: str | None = None
        self._outage_logged = False
        self._failed_endpoints: set[int] = set()  # endpoints that failed since etcd last answered
        # etcd's refusal of this node (its role revoked or short), and of what ("read": the view's; "write": the
        # writer's; "claim"), until a call of that kind goes through again: not an outage (it answers, the same
        # on every member), said once, kept in the status
        self._refused: str | None = None
        self._refused_during = ""
        self._warned: set[bytes] = set()
        self._started = False
        self._closed = False

    async def _grant_lease(self, client: Any) -> None:
        lease = await self._call(client.lease(math.ceil(self.ttl)))
        self._lease_id, self._lease_ttl = int(lease.id), max(1.0, float(lease.ttl))
        self._refresh_due = asyncio.get_running_loop().time() + self._lease_ttl / 3
        self._wake.set()  # the keeper refreshes it from now on

    def _stopping(self) -> bool:
        return self._closed

    # -- what etcd holds, read as input from outside -----------------------------------------------------

    def _parse(
        self, key: bytes, value: bytes, revision: int
    ) -> tuple[FleetKey, NodeRecord | Holding | ChunkClaim] | None:
        """The key and the entry it holds, or None (skipped with a warning when malformed)."""
        try:
            parsed = self._keys.parse(key)
            if parsed is None:
                return None
            if parsed.kind == "node":
                record = NodeRecord.from_dict(decode(value))
                if record.node_id != parsed.node_id:
                    raise InvalidInputError(f"the record names node {record.node_id!r}")
                return parsed, record
            if parsed.kind == "claim":
                return parsed, ChunkClaim.from_dict(decode(value), revision)
            return parsed, Holding.from_dict(decode(value))
        except InvalidInputError as error:
            self._warn(key, error)
            return None

    def _warn(self, key: bytes, error: Exception) -> None:
        if key in self._warned:
            return
        if len(self._warned) < _MAX_WARNED_KEYS:
            self._warned.add(key)
        log.warning("etcd: skipping %r, which is not a valid fleet entry: %s", key[:200], error)

    def _new_client(self) -> Any:
        if self._reread is not None and self._client is not None:
            try:
                self._credentials, self._tls = self._reread()
            except ConfigError as error:  # (a file being replaced, say: the last ones, and said)
                log.warning("etcd: the credentials or TLS files could not be read again (%s): the last ones "
                            "are used", error)  # fmt: skip
        host, port = self.endpoints[self._endpoint]
        user, password = self._credentials or (None, None)
        if self._tls is not None:
            return TlsClient(self._tls, host, port, user, password, timeout=self.timeout,
                             options=dict(CHANNEL_OPTIONS))  # fmt: skip
        return aetcd.Client(host, port, user, password, timeout=self.timeout, options=dict(CHANNEL_OPTIONS))

    def _endpoint_name(self, index: int | None = None) -> str:
        host, port = self.endpoints[self._endpoint if index is None else index]
        return f"{host}:{port}"

    async def _first_to_answer(self) -> Any | None:
        """A client of the endpoint that answers first, every endpoint asked at once (etcd's status, which
        needs no permission): one down or hung costs nothing. Tried in turn, a hung first member held every
        command for the call's timeout, ~3 s, and every process of the fleet started on it (an explorer's
        trial). With one endpoint, or none answering in time, a client of the first: its failure is then
        the outage the view reports. None when the discovery was closed meanwhile."""
        if len(self.endpoints) == 1:
            return self._new_client()
        clients = []
        for index in range(len(self.endpoints)):
            self._endpoint = index
            clients.append(self._new_client())

        async def answer(client: Any) -> None:
            await client.connect()
            await client.maintenancestub.Status(
                rpc.StatusRequest(), timeout=self.timeout, metadata=client.metadata
            )

        asking = {asyncio.ensure_future(answer(client)): index for index, client in enumerate(clients)}
        for task in asking:
            task.add_done_callback(retrieve)
        loop, chosen = asyncio.get_running_loop(), None
        deadline = loop.time() + self.timeout + 1.0
        pending = set(asking)
        try:
            while pending and not self._closed:
                done, pending = await asyncio.wait(
                    pending, timeout=max(0.0, deadline - loop.time()), return_when=asyncio.FIRST_COMPLETED
                )
                answered = [asking[t] for t in done if not t.cancelled() and t.exception() is None]
                if answered or not done:
                    chosen = min(answered) if answered else 0
                    break
            else:
                chosen = None if self._closed else 0
        finally:
            for task in pending:
                task.cancel()
            # (every client but the one kept is closed, however this ends: a close() or a cancellation during
            # the race left them all open, a review)
            for index, client in enumerate(clients):
                if index != chosen:
                    closing = asyncio.ensure_future(self._close_quietly(client))
                    self._old_clients.add(closing)
                    closing.add_done_callback(self._old_clients.discard)
        if chosen is None:
            return None
        self._endpoint = chosen
        return clients[chosen]

    async def _call(self, awaitable: Awaitable[T]) -> T:
        """One call to etcd, under a deadline of our own too (gRPC's is ``timeout``): a timer that cancels
        it (not asyncio.wait_for, which can swallow the caller's cancellation on Python 3.10 and 3.11)."""
        task = asyncio.ensure_future(awaitable)
        task.add_done_callback(retrieve)
        try:
            done, _ = await asyncio.wait({task}, timeout=self.timeout + 1.0)
            if not done:
                task.cancel()
                # A call that swallows its cancellation (aetcd's connect waits with asyncio.wait_for, which may, on
                # Python 3.10 and 3.11) is left to end on its own: awaited, it held the writer, and its lock, for
                # good (a node that never registered again after an etcd restart, a review)
                await asyncio.wait({task}, timeout=CANCEL_GRACE)
                raise asyncio.TimeoutError(f"etcd did not answer in {self.timeout + 1:g} s")
        except asyncio.CancelledError:
            task.cancel()  # (the caller's own cancellation: the call goes with it)
            raise
        if task.cancelled():
            # The call's own cancellation, not the caller's: its client was closed under it (another took its
            # place). Raised as it came, it ended the writer's task without a word, and the node never registered
            # again after an etcd restart with authentication on (a review).
            raise ConnectionError("the etcd call was cancelled: its client was closed")
        return task.result()

    async def fleets_elsewhere(self) -> dict[str, int]:
        """The prefixes (but this node's) under which etcd holds node records, and how many: where the fleet
        a node finds itself alone may be (a mistyped ``--cluster-prefix`` made a fleet of one without a word,
        an explorer's trial). etcd's keys are walked a prefix at a time, FLEETS_ELSEWHERE_STEPS reads at most;
        {} when etcd does not answer or lets this node read its own prefix alone (its authentication)."""
        client, found = self._client, dict[str, int]()
        start = b"\0"
        try:
            await self._call(client.connect())
            for _ in range(FLEETS_ELSEWHERE_STEPS):
                # aetcd takes no limit: its request, built as its own calls build it, is given one
                request = client._build_get_range_request(key=start, range_end=b"\0", keys_only=True)
                request.limit = 1
                answer = await self._call(client.kvstub.Range(request, timeout=self.timeout,
                                                              metadata=client.metadata))  # fmt: skip
                if not answer.kvs:
                    break
                key = bytes(answer.kvs[0].key)
                fleet = _FLEET_KEY.match(key)
                if fleet is None:
                    start = key + b"\0"
                    continue
                root = fleet.group(1) + b"/"
                if root != self._keys.root:
                    nodes = await self._call(client.get_prefix(root + b"nodes/", keys_only=True))
                    if len(nodes):
                        found[root[:-1].decode(errors="replace")] = len(nodes)
                start = aetcd.utils.prefix_range_end(root)
        except Exception as error:  # (best effort: a hint, never a failure)
            log.debug("looking for other fleets in etcd: %s", describe(error))
        return found

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
        self._failed_endpoints.clear()
        self._connected = True
        self._since = time.time()
        self._last_error = self._refused
        self._changed()

    def _answered(self, during: str) -> None:
        """A call of the kind etcd refused (``during``: "read", the view's; "write", the writer's; "claim") went
        through: the refusal is over."""
        if self._refused is not None and self._refused_during == during:
            log.info("etcd takes this node's %ss again", during)  # (reads, writes, claims)
            self._refused = None
            self._last_error = None
            self._changed()

    def _failed(self, error: BaseException, client: Any, during: str = "write") -> None:
        text = describe(error)
        if self._tls is None and "Socket closed" in text:
            # (what a plain client of a TLS port is told; an etcd stopped mid-call closes its sockets too)
            text += " (if that etcd serves TLS, give it as etcds://HOST:PORT)"
        elif self._tls is not None and ("handshake" in text.lower() or "TSI_" in text):
            text += (" (TLS: is MODELDEPOT_CLUSTER_CA the CA that signed etcd's certificate, for this host name or"
                     " address? etcd run with --client-cert-auth wants MODELDEPOT_CLUSTER_CERT and _KEY too, "
                     "signed by its --trusted-ca-file)")  # fmt: skip
        self._verify = True
        if is_lease_not_found(error):
            # etcd answered: the lease the call named ran out (etcd stalled, or out of reach, past it). No
            # outage (it was logged as one, just after "answers again": an explorer's trial); the writer's
            # check of the lease, woken now, registers this node again under a new one.
            log.info("etcd: this node's lease ran out (%s during a %s): registering again", text, during)
            self._wake.set()
            return
        if "permission denied" in text:
            # etcd answers, and refuses (this node's role revoked or short): every member would say the same,
            # and the next call that needs no permission (the lease's refresh) is no recovery. Said once, kept
            # in the status (a warning and an "answers again" every 2 s, for ever, and a health without the
            # reason: an explorer's trial).
            if text != self._refused:
                log.warning("etcd %s refuses this node (%s): its peers do not see what it adds or removes until "
                            "its role allows it; retrying", self._endpoint_name(), text)  # fmt: skip
            else:
                log.debug("etcd %s: still refused: %s", self._endpoint_name(), text)
            self._refused = self._last_error = text
            self._refused_during = during
            self._wake.set()
            self._changed()
            return
        failing = self._endpoint if client is self._client else None
        if failing is not None:
            self._failed_endpoints.add(failing)
        others = len(self.endpoints) > 1 and len(self._failed_endpoints) < len(self.endpoints)
        if others and not self._outage_logged and failing is not None:
            # (one member of several down or hung is no outage: the next is tried, and only when every one
            # failed is it one; a CLI command warned "out of reach ... (0 nodes)" with a quorum answering)
            log.info("etcd %s does not answer (%s): trying %s", self._endpoint_name(), text,
                     self._endpoint_name((failing + 1) % len(self.endpoints)))  # fmt: skip
        elif not self._outage_logged:
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
        # (another client: the next endpoint; or the same one again, made anew, where what it was given may have
        # changed since: its token lost, its password or its TLS files refused)
        again = is_auth_lost(error) or (
            self._reread is not None
            and ("authentication failed" in text or "handshake" in text.lower() or "TSI_" in text)
        )
        if client is self._client and not self._closed and (len(self.endpoints) > 1 or again):
            self._endpoint = (self._endpoint + 1) % len(self.endpoints)
            self._client = self._new_client()
            task = asyncio.create_task(self._close_quietly(client))
            self._old_clients.add(task)
            task.add_done_callback(self._old_clients.discard)

    async def _close_quietly(self, client: Any) -> None:
        try:
            await self._call(client.close())
        except Exception as error:
            log.debug("closing an etcd client: %s", describe(error))
