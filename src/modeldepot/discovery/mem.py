"""A registry inside one process (``mem://NAME``): for tests of the layers above discovery.

Every :class:`MemDiscovery` sharing a :class:`MemRegistry` sees the others at once (its view *is* the
registry, read under the registry's lock), whichever thread or event loop each runs on. The registry can
also play what etcd would do to a node: lose it (:meth:`MemRegistry.drop_node`, a node that died) or be
unreachable for a while (:meth:`MemRegistry.set_available`, an outage: views keep what they had, writes
wait, and everyone is written again when it returns).
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Collection, Mapping

from modeldepot.discovery.base import (
    ChunkClaim,
    ClusterStatus,
    Holding,
    NodeRecord,
    ViewDiscovery,
    check_holdings,
    check_node_record,
    copy_went,
    forget_settlements_of,
)
from modeldepot.errors import InvalidInputError

__all__ = ["MemDiscovery", "MemRegistry", "mem_registry"]

_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


class MemRegistry:
    """The shared state: nodes, and holdings by content then node. Thread-safe."""

    def __init__(self, name: str = "mem") -> None:
        self.name = name
        self._lock = threading.RLock()
        self._nodes: dict[str, NodeRecord] = {}
        self._holdings: dict[str, dict[str, Holding]] = {}
        self._claims: dict[tuple[str, int], dict[int, ChunkClaim]] = {}
        self._settled: dict[tuple[str, int], dict[int, tuple[str, str]]] = {}
        self._claimed_by: dict[tuple[str, int, int], MemDiscovery] = {}  # a claim's owner (its "lease")
        self._revision = 0
        self._members: set[MemDiscovery] = set()
        self.available = True
        self.since = time.time()

    # -- what a test does to the registry -----------------------------------------------------------------

    def drop_node(self, node_id: str) -> None:
        """Remove a node and its holdings, as etcd does when a node dies (its lease runs out). The node's
        :class:`MemDiscovery` does not write it again (a dead process does not come back)."""
        with self._lock:
            for member in self._members:
                if member._record is not None and member._record.node_id == node_id:
                    member._dead = True
                    self._drop_claims_of(member)
            self._remove(node_id)
        self._notify()

    def set_available(self, available: bool) -> None:
        """An outage (False) or its end (True). During an outage writes are kept by each node and the
        views stay as they were; at its end every live node writes its record and holdings again, and every
        member the chunk settlements it kept."""
        with self._lock:
            if available == self.available:
                return
            self.available = available
            self.since = time.time()
            if available:
                for member in self._members:
                    self._write(member)
                    member._send_settlements()
        self._notify()

    # -- for MemDiscovery ---------------------------------------------------------------------------------

    def _join(self, member: MemDiscovery) -> None:
        with self._lock:
            self._members.add(member)

    def _leave(self, member: MemDiscovery) -> None:
        with self._lock:
            self._members.discard(member)
            self._drop_claims_of(member)
            if member._record is not None and not member._dead:
                self._remove(member._record.node_id)  # in an outage too: as a lease that runs out
        self._notify()

    def _update(self, member: MemDiscovery) -> None:
        with self._lock:
            if self.available:
                self._write(member)
        self._notify()

    def _write(self, member: MemDiscovery) -> None:
        record = member._record
        if record is None or member._dead or member not in self._members:
            return  # holdings are written under a node id: only once registered
        self._nodes[record.node_id] = record
        node_id = record.node_id
        for sha256 in [sha for sha, by_node in self._holdings.items() if node_id in by_node]:
            if sha256 not in member._desired:
                self._drop_holding(sha256, node_id)
        for sha256, holding in member._desired.items():
            by_node = self._holdings.setdefault(sha256, {})
            if copy_went(by_node.get(node_id), holding):  # (as the views of etcd do: see copy_went)
                forget_settlements_of(self._settled, node_id, sha256)
            by_node[node_id] = holding

    def _remove(self, node_id: str) -> None:
        self._nodes.pop(node_id, None)
        forget_settlements_of(self._settled, node_id)
        for sha256 in [sha for sha, by_node in self._holdings.items() if node_id in by_node]:
            self._drop_holding(sha256, node_id)

    def _next_revision(self) -> int:
        self._revision += 1
        return self._revision

    def _drop_claims_of(
        self,
        member: MemDiscovery,
        content: tuple[str, int] | None = None,
        chunks: Collection[int] | None = None,
    ) -> None:
        """Remove the claims ``member`` holds (on ``content`` only, when given; and of its ``chunks``
        only, when given): as its lease would go."""
        for key in [k for k, owner in self._claimed_by.items()
                    if owner is member and (content is None or k[:2] == content)
                    and (chunks is None or k[2] in chunks)]:  # fmt: skip
            del self._claimed_by[key]
            sha256, chunk_size, index = key
            by_index = self._claims.get((sha256, chunk_size), {})
            by_index.pop(index, None)
            if not by_index:
                self._claims.pop((sha256, chunk_size), None)

    def _drop_holding(self, sha256: str, node_id: str) -> None:
        by_node = self._holdings[sha256]
        gone = by_node.pop(node_id, None)
        if not by_node:
            del self._holdings[sha256]
        if copy_went(gone, None):  # (as the views of etcd do: see ViewDiscovery._drop_holding)
            forget_settlements_of(self._settled, node_id, sha256)

    def _notify(self) -> None:
        with self._lock:
            members = list(self._members)
        for member in members:
            member._notify_threadsafe()


_REGISTRIES: dict[str, MemRegistry] = {}
_REGISTRIES_LOCK = threading.Lock()


def mem_registry(name: str) -> MemRegistry:
    """The process-wide registry called ``name`` (what ``mem://NAME`` opens), made on first use."""
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        raise InvalidInputError(f"mem registry name {name!r} must be 1-64 of [A-Za-z0-9._-]")
    with _REGISTRIES_LOCK:
        registry = _REGISTRIES.get(name)
        if registry is None:
            registry = _REGISTRIES[name] = MemRegistry(name)
        return registry


class MemDiscovery(ViewDiscovery):
    name = "mem"

    def __init__(self, registry: MemRegistry) -> None:
        super().__init__()
        self.registry = registry
        # The view is the registry itself, under its lock: every member sees every write at once.
        self._nodes = registry._nodes
        self._holdings = registry._holdings
        self._claims = registry._claims
        self._settled = registry._settled
        self._lock = registry._lock
        self._record: NodeRecord | None = None
        self._desired: dict[str, Holding] = {}
        self._dead = False
        self._unsettled: dict[tuple[str, int, int], str] = {}  # settlements kept through an outage
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.registry._join(self)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.registry._leave(self)
            self._loop = None

    async def register(self, record: NodeRecord) -> None:
        check_node_record(record)
        if self._record is not None and self._record.node_id != record.node_id:
            raise InvalidInputError(f"this discovery already registered node {self._record.node_id!r}")
        self._record = record
        if self._loop is not None:
            self.registry._update(self)

    async def publish(self, holdings: Mapping[str, Holding]) -> None:
        self._desired = check_holdings(holdings)
        if self._loop is not None:
            self.registry._update(self)

    claims_supported = True

    async def claim_chunk(
        self, sha256: str, chunk_size: int, index: int, node_id: str, replaces: int = 0
    ) -> ChunkClaim | None:
        registry = self.registry
        with self._lock:
            if not registry.available or self._loop is None or self._dead:
                return None
            by_index = self._claims.setdefault((sha256, chunk_size), {})
            current = by_index.get(index)
            if current is not None and current.revision != replaces:
                return current
            claim = by_index[index] = ChunkClaim(node_id, None, registry._next_revision())
            registry._claimed_by[(sha256, chunk_size, index)] = self
        registry._notify()
        return claim

    async def settle_claim(self, sha256: str, chunk_size: int, index: int, blake3: str) -> None:
        registry = self.registry
        with self._lock:
            if registry._claimed_by.get((sha256, chunk_size, index)) is not self:
                return
            if not registry.available:  # kept, and written when the outage ends (as etcd's writer does)
                self._unsettled[(sha256, chunk_size, index)] = blake3
                return
            self._settle(sha256, chunk_size, index, blake3)
        registry._notify()

    def _settle(self, sha256: str, chunk_size: int, index: int, blake3: str) -> None:
        """Under the registry's lock, with the registry available and the claim this member's."""
        by_index = self._claims[(sha256, chunk_size)]
        claim = ChunkClaim(by_index[index].node_id, blake3, self.registry._next_revision())
        self._set_claim(sha256, chunk_size, index, claim)

    def _send_settlements(self) -> None:
        """Under the registry's lock, as an outage ends: the settlements kept meanwhile, on claims still
        this member's (one taken over or gone is not settled)."""
        pending, self._unsettled = self._unsettled, {}
        for (sha256, chunk_size, index), blake3 in pending.items():
            if self.registry._claimed_by.get((sha256, chunk_size, index)) is self and not self._dead:
                self._settle(sha256, chunk_size, index, blake3)

    async def release_claims(
        self, sha256: str, chunk_size: int, chunks: Collection[int] | None = None
    ) -> None:
        registry = self.registry
        with self._lock:
            registry._drop_claims_of(self, (sha256, chunk_size), chunks)
        registry._notify()

    def status(self) -> ClusterStatus:
        with self._lock:
            registered = (
                self._record is not None
                and self._loop is not None
                and self._nodes.get(self._record.node_id) == self._record
            )
            available = self.registry.available
            return ClusterStatus(
                backend="mem",
                connected=available and self._loop is not None,
                registered=registered,
                last_error=None if available else "the mem registry is unavailable (a simulated outage)",
                since=self.registry.since,
                peers=len(self._nodes),
            )

    def _notify_threadsafe(self) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._changed()
        else:
            try:
                loop.call_soon_threadsafe(self._changed)
            except RuntimeError:  # that loop is closed: its owner is gone
                pass
