"""What a node knows of its fleet: who is alive (membership) and who holds which content (holdings).

One interface, three backends: ``etcd`` (the fleet's real registry, through aetcd), ``static`` (a fixed
list of node URLs: what ``--server``/``MODELDEPOT_SERVERS`` give), ``mem`` (one process's shared dict, for
tests). Only :mod:`modeldepot.discovery.etcd` knows etcd.

A node *registers* a :class:`NodeRecord` while it runs and *publishes* its :class:`Holding`\\ s: which
contents it holds, by SHA-256 only (never a repo or file name: a private repo's name must not leak), whole
or in progress. A puller asks :meth:`Discovery.holders` for one content and gets the live nodes holding
it from the backend's local view (kept current by a watch), not by asking every node.

Nodes pulling the same content from the origin at once *claim* its chunks (:class:`ChunkClaim`): one claim
per chunk, taken by compare-and-swap, so one node fetches each chunk from the Hub and the others take it
from that node; a claim lives as long as its claimer (a lease in etcd) and carries the chunk's BLAKE3 once
landed, which the others check the chunk against whoever relays it. Backends without a registry (static)
support no claims (:attr:`Discovery.claims_supported`).
"""

from __future__ import annotations

import abc
import asyncio
import math
import re
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from modeldepot.config import MAX_CHUNK_SIZE
from modeldepot.errors import InvalidInputError
from modeldepot.validation import (
    redact_credentials,
    validate_blake3,
    validate_label,
    validate_sha256,
    validate_size,
)

__all__ = [
    "ChunkClaim",
    "ClusterStatus",
    "Discovery",
    "Holder",
    "Holding",
    "NodeRecord",
    "ViewDiscovery",
    "check_holding",
    "check_holdings",
    "check_node_record",
    "validate_node_id",
    "validate_node_url",
]

T = TypeVar("T")

MAX_NODE_ID_LENGTH = 128
MAX_URL_LENGTH = 2048
MAX_CHUNKS = 1 << 32  # far above any file's chunk count (4 TiB in 64 KiB chunks is 2**26)
SETTLEMENT_TTL = 600.0  # seconds a content's settlements outlive its last claim (then they are pruned)
_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class NodeRecord:
    """A live node, as it registers itself."""

    node_id: str  # the store id: stable across restarts of the same store
    url: str  # where peers reach it (``--advertise``)
    version: str
    started_at: float
    # Its store's chunk size (0: not said, an older node): nodes of other sizes are other swarms, and the Hub
    # sends each content once per size (an explorer's trial: 1.96x with two sizes, said only mid-rollout)
    chunk_size: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object) -> NodeRecord:
        """A record as a registry holds it (input from outside: every field is checked; unknown fields,
        from a newer version, are ignored). Raises InvalidInputError."""
        if not isinstance(data, dict):
            raise InvalidInputError(f"a node record must be a JSON object, not {type(data).__name__}")
        fields: dict[str, Any] = {
            name: data.get(name) for name in ("node_id", "url", "version", "started_at")
        }
        # (shown by `peers` alone: a value not understood is not said, the node stays in the view, a review)
        size = data.get("chunk_size", 0)
        fields["chunk_size"] = size if type(size) is int and 0 <= size <= MAX_CHUNK_SIZE else 0
        return check_node_record(cls(**fields))


@dataclass(frozen=True)
class Holding:
    """One content a node holds: complete (a blob) or in progress (a partial download)."""

    size: int
    complete: bool
    chunks_done: int = 0  # verified chunks, for a partial (for a complete one: every chunk)
    chunks: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object) -> Holding:
        """A holding as a registry holds it (checked like :meth:`NodeRecord.from_dict`)."""
        if not isinstance(data, dict):
            raise InvalidInputError(f"a holding must be a JSON object, not {type(data).__name__}")
        fields: dict[str, Any] = {name: data.get(name) for name in ("size", "complete")}
        fields.update(chunks_done=data.get("chunks_done", 0), chunks=data.get("chunks", 0))
        return check_holding(cls(**fields))


@dataclass(frozen=True)
class ChunkClaim:
    """A node's claim to fetch one chunk of a content from the origin (the Hub) for its fleet: the node
    whose server will hold it, and the chunk's BLAKE3 once it landed there (None until then)."""

    node_id: str
    blake3: str | None
    revision: int  # the registry's revision of the claim (a take-over names the one it replaces)

    def to_dict(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "blake3": self.blake3}

    @classmethod
    def from_dict(cls, data: object, revision: int) -> ChunkClaim:
        """A claim as a registry holds it (checked like :meth:`NodeRecord.from_dict`)."""
        if not isinstance(data, dict):
            raise InvalidInputError(f"a chunk claim must be a JSON object, not {type(data).__name__}")
        digest = data.get("blake3")
        return cls(
            validate_node_id(data.get("node_id")),
            None if digest is None else validate_blake3(digest),
            validate_size(revision),
        )


def validate_node_id(value: object) -> str:
    """A node id (a store id: 32 hex digits): 1-128 of ``[A-Za-z0-9._-]``, starting with a letter or digit.
    It becomes one segment of a registry key, so it never holds a ``/``."""
    if not isinstance(value, str) or _NODE_ID.fullmatch(value) is None:
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "…"
        raise InvalidInputError(
            f"node id {shown} must be 1-{MAX_NODE_ID_LENGTH} letters, digits, '.', '_' or '-' "
            "(starting with a letter or digit)"
        )
    return value


def validate_node_url(value: object) -> str:
    """Where a node is reached: an ``http://`` or ``https://`` URL with a host, no user or password, no
    query or fragment, no whitespace or control character, at most 2048 characters."""
    if not isinstance(value, str):
        raise InvalidInputError(f"node URL must be a string, not {type(value).__name__}")
    redacted = redact_credentials(value)
    shown = repr(redacted) if len(repr(redacted)) <= 80 else repr(redacted)[:77] + "…"
    if len(value) > MAX_URL_LENGTH or not value.isprintable() or any(c.isspace() for c in value):
        raise InvalidInputError(f"node URL {shown} is too long or holds a space or a control character")
    try:
        parts = urlsplit(value)
        port = parts.port  # raises ValueError for a port that is not a number in 0..65535
    except ValueError as error:
        raise InvalidInputError(f"node URL {shown} is not a valid URL: {error}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInputError(f"node URL {shown} must be an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None or parts.query or parts.fragment:
        raise InvalidInputError(f"node URL {shown} may not hold a user, a password, a query or a fragment")
    if port == 0:
        raise InvalidInputError(f"node URL {shown} has port 0")
    return value


def check_node_record(record: NodeRecord) -> NodeRecord:
    """``record`` if every field is valid (see :meth:`NodeRecord.from_dict`), else InvalidInputError."""
    validate_node_id(record.node_id)
    validate_node_url(record.url)
    validate_label(record.version)
    started = record.started_at
    if isinstance(started, bool) or not isinstance(started, (int, float)) or not math.isfinite(started):
        raise InvalidInputError(f"started_at {started!r} is not a finite number")
    if started < 0:
        raise InvalidInputError(f"started_at {started!r} is negative")
    validate_size(record.chunk_size)
    return record


def check_holding(holding: Holding) -> Holding:
    """``holding`` if its fields are valid: a size, a bool, ``0 <= chunks_done <= chunks``."""
    validate_size(holding.size)
    if not isinstance(holding.complete, bool):
        raise InvalidInputError(f"complete {holding.complete!r} is not true or false")
    validate_size(holding.chunks, MAX_CHUNKS)
    validate_size(holding.chunks_done, MAX_CHUNKS)
    if holding.chunks_done > holding.chunks:
        raise InvalidInputError(f"chunks_done {holding.chunks_done} is more than chunks {holding.chunks}")
    return holding


def check_holdings(holdings: Mapping[str, Holding]) -> dict[str, Holding]:
    """A copy of ``holdings`` with every SHA-256 and holding checked (InvalidInputError otherwise)."""
    checked = {}
    for sha256, holding in holdings.items():
        if not isinstance(holding, Holding):
            raise InvalidInputError(f"the holding of {sha256!r} is a {type(holding).__name__}, not a Holding")
        checked[validate_sha256(sha256)] = check_holding(holding)
    return checked


@dataclass(frozen=True)
class Holder:
    """A live node holding a content."""

    node: NodeRecord
    holding: Holding


@dataclass(frozen=True)
class ClusterStatus:
    """How the node's view of the fleet stands (health and ``peers`` show it)."""

    backend: str  # etcd | static | mem
    connected: bool  # the registry answered lately (always True for static and mem)
    registered: bool  # this node's record is in the registry now
    last_error: str | None = None
    since: float | None = None  # when the current state (connected or not) began
    peers: int = 0
    conflict: str | None = None  # another process registered this node's id (etcd), and what to do


class Discovery(abc.ABC):
    """The fleet as one node sees it. Use from one event loop: :meth:`start`, then the rest, then
    :meth:`close`. Reads (:meth:`peers`, :meth:`holders`) answer from a local view at once; writes
    (:meth:`register`, :meth:`publish`) reach the registry in the background, retried across outages."""

    name: str = "discovery"

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect and load the current view (an unreachable registry is not an error: see :meth:`status`)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Withdraw this node's record and holdings (if registered) and disconnect."""

    @abc.abstractmethod
    async def register(self, record: NodeRecord) -> None:
        """Announce this node while it runs; it disappears when :meth:`close` runs or the process dies."""

    @abc.abstractmethod
    async def publish(self, holdings: Mapping[str, Holding]) -> None:
        """Make ``holdings`` (by SHA-256) this node's whole set: what is new or changed is written, what is
        gone is withdrawn, in batches."""

    async def fleets_elsewhere(self) -> dict[str, int]:
        """Other fleets the registry holds nodes of (their prefix: how many), for a node that finds itself
        alone (a mistyped --cluster-prefix); none where the registry has no prefixes."""
        return {}

    @abc.abstractmethod
    def peers(self) -> list[NodeRecord]:
        """The live nodes, this one included when registered, sorted by node id."""

    @abc.abstractmethod
    def holders(self, sha256: str) -> list[Holder]:
        """The live nodes holding ``sha256`` (complete ones first)."""

    @abc.abstractmethod
    def holdings_of(self, node_id: str) -> dict[str, Holding]:
        """Everything one live node holds, by SHA-256."""

    @abc.abstractmethod
    def status(self) -> ClusterStatus: ...

    # -- chunk claims (a fleet pulling one content from the origin) --------------------------------------

    claims_supported: bool = False  # a backend with a shared registry (etcd, mem) says True

    def claims(self, sha256: str, chunk_size: int) -> dict[int, ChunkClaim]:
        """The claims on the chunks (of ``chunk_size`` bytes) of ``sha256``, by chunk index, from the view."""
        return {}

    def claimed_sizes(self, sha256: str) -> set[int]:
        """The chunk sizes in which nodes claim ``sha256`` (a node whose store has another chunk size claims
        the same content under another key: the two cannot share its chunks)."""
        return set()

    def settlements(self, sha256: str, chunk_size: int) -> dict[int, tuple[str, str]]:
        """Every settled claim the view has seen on the content's chunks, as (node id, BLAKE3) by chunk, kept
        after the claim is released (its claimer holds the chunk: it finished, or soon will) while the node
        lives and its whole copy, once it had one, stays. A reader polling :meth:`claims` would miss a claim settled and released between two looks."""
        return {}

    async def claim_chunk(
        self, sha256: str, chunk_size: int, index: int, node_id: str, replaces: int = 0
    ) -> ChunkClaim | None:
        """Claim chunk ``index`` of ``sha256`` for ``node_id``, under this process's lease: only if nobody
        claims it (``replaces`` 0) or the claim there is still the one of revision ``replaces`` (a take-over:
        its claimer died, lied, or is overdue). Returns the claim in force afterwards (this one, or the
        winner's), or None when the registry cannot say (unreachable): the caller fetches the chunk anyway."""
        return None

    async def settle_claim(self, sha256: str, chunk_size: int, index: int, blake3: str) -> None:
        """Record the BLAKE3 of a chunk this process claimed and now holds (nothing if the claim is gone)."""
        return None

    async def release_claims(
        self, sha256: str, chunk_size: int, chunks: Collection[int] | None = None
    ) -> None:
        """Withdraw this process's claims on ``sha256`` (its pull is over; those taken over stay), or only
        those on ``chunks`` (it will not fetch them: its Hub failed)."""
        return None

    # -- waiting for a change (tests, and whoever reacts to the fleet) -----------------------------------

    _waiters: list[asyncio.Future[None]] | None = None  # resolved by _changed(); made by the first waiter

    async def wait_for(self, predicate: Callable[[], T], timeout: float) -> T:
        """Wait until ``predicate()`` (of the view, or of :meth:`status`) is true, and return its value.

        Woken by every change of the view or the status, not by polling; raises TimeoutError after
        ``timeout`` seconds. Any loop may wait (a test's, beside a node's on another thread)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            result = predicate()
            if result:
                return result
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"the fleet's view did not reach the awaited state in {timeout:g} s")
            # A future and a timer, not asyncio.wait_for: on Python 3.10 and 3.11 that can swallow a
            # cancellation arriving as it times out.
            waiter: asyncio.Future[None] = loop.create_future()
            with _WAITERS_LOCK:
                if self._waiters is None:
                    self._waiters = []
                self._waiters.append(waiter)
            timer = loop.call_later(remaining, _wake, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                with _WAITERS_LOCK:  # (one timed out stayed listed until the next change: a quiet fleet's
                    if self._waiters is not None and waiter in self._waiters:  # logger piled them up)
                        self._waiters.remove(waiter)

    def _changed(self) -> None:
        """For backends, on their loop: the view or the status changed; wake :meth:`wait_for`."""
        with _WAITERS_LOCK:
            waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            _wake(waiter)


_WAITERS_LOCK = threading.Lock()


def _wake(waiter: asyncio.Future[None]) -> None:
    """Resolve a waiter of :meth:`Discovery.wait_for`, on its own loop (which may run on another thread)."""
    loop = waiter.get_loop()
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        if not waiter.done():
            waiter.set_result(None)
    else:
        try:
            loop.call_soon_threadsafe(_wake, waiter)
        except RuntimeError:  # that loop is closed: nobody waits any more
            pass


def copy_went(before: Holding | None, after: Holding | None) -> bool:
    """Whether a node's whole copy of a content went (removed, evicted): its holding was complete, and is no
    more or is a download again (a removal and a new pull within one publish: a review). Then what it settled
    of the content is no longer there. (A download's holding that goes is its end: the whole copy's comes.)"""
    return before is not None and before.complete and (after is None or not after.complete)


def forget_settlements_of(
    settled: dict[tuple[str, int], dict[int, tuple[str, str]]], node_id: str, sha256: str | None = None
) -> None:
    """Drop what a node that left had settled (its chunks are gone with it), contents left empty too; of
    ``sha256`` only, when given (the node's whole copy of it went: removed, evicted)."""
    for content, by_index in list(settled.items()):
        if sha256 is not None and content[0] != sha256:
            continue
        for index in [i for i, (holder, _) in by_index.items() if holder == node_id]:
            del by_index[index]
        if not by_index:
            del settled[content]


class ViewDiscovery(Discovery):
    """A backend that keeps a local view of the registry (nodes, and holdings by content) and answers
    reads from it; the backend keeps the view current (etcd: a snapshot, then a watch).

    Reads may come from any thread (a pull on a loop of its own asks :meth:`holders`): the view's dicts
    change and are read under ``_lock``."""

    def __init__(self) -> None:
        self._nodes: dict[str, NodeRecord] = {}
        self._holdings: dict[str, dict[str, Holding]] = {}  # sha256 -> node_id -> holding
        self._claims: dict[tuple[str, int], dict[int, ChunkClaim]] = {}  # (sha256, chunk size) -> index ->
        self._settled: dict[tuple[str, int], dict[int, tuple[str, str]]] = {}  # -> index -> (node, BLAKE3)
        self._unclaimed_since: dict[tuple[str, int], float] = {}  # a settled content with no claim left
        self._lock: threading.RLock = threading.RLock()

    def peers(self) -> list[NodeRecord]:
        with self._lock:
            return sorted(self._nodes.values(), key=lambda n: n.node_id)

    def holders(self, sha256: str) -> list[Holder]:
        with self._lock:
            found = [
                Holder(self._nodes[node_id], holding)
                for node_id, holding in self._holdings.get(sha256, {}).items()
                if node_id in self._nodes  # a holding outlives its node only until the view catches up
            ]
        return sorted(found, key=lambda h: (not h.holding.complete, -h.holding.chunks_done, h.node.node_id))

    def claims(self, sha256: str, chunk_size: int) -> dict[int, ChunkClaim]:
        with self._lock:
            return dict(self._claims.get((sha256, chunk_size), {}))

    def claimed_sizes(self, sha256: str) -> set[int]:
        with self._lock:
            return {size for (sha, size), by_index in self._claims.items() if sha == sha256 and by_index}

    def settlements(self, sha256: str, chunk_size: int) -> dict[int, tuple[str, str]]:
        with self._lock:
            return dict(self._settled.get((sha256, chunk_size), {}))

    def holdings_of(self, node_id: str) -> dict[str, Holding]:
        with self._lock:
            if node_id not in self._nodes:
                return {}
            return {sha: by_node[node_id] for sha, by_node in self._holdings.items() if node_id in by_node}

    # -- for backends: changes to the view ----------------------------------------------------------------

    def _set_node(self, record: NodeRecord) -> None:
        with self._lock:
            self._nodes[record.node_id] = record

    def _drop_node(self, node_id: str) -> None:
        with self._lock:
            self._nodes.pop(node_id, None)
            forget_settlements_of(self._settled, node_id)

    def _set_holding(self, sha256: str, node_id: str, holding: Holding) -> None:
        with self._lock:
            by_node = self._holdings.setdefault(sha256, {})
            if copy_went(by_node.get(node_id), holding):
                forget_settlements_of(self._settled, node_id, sha256)
            by_node[node_id] = holding

    def _drop_holding(self, sha256: str, node_id: str) -> None:
        """Its whole copy gone (removed, evicted), what the node settled of the content goes too: a pull of it
        again within SETTLEMENT_TTL asked the node for every chunk it settled the last time, had 404s and
        voided its fresh claims, and the Hub sent 1.46 times the model (an explorer's trial). (A download's
        holding that goes is its end: the whole copy's comes, and its settlements stay true.)"""
        with self._lock:
            by_node = self._holdings.get(sha256)
            if by_node is not None:
                gone = by_node.pop(node_id, None)
                if not by_node:
                    del self._holdings[sha256]
                if copy_went(gone, None):
                    forget_settlements_of(self._settled, node_id, sha256)

    def _set_claim(self, sha256: str, chunk_size: int, index: int, claim: ChunkClaim) -> None:
        with self._lock:
            by_index = self._claims.setdefault((sha256, chunk_size), {})
            current = by_index.get(index)
            if current is None or current.revision <= claim.revision:  # an older answer never wins
                by_index[index] = claim
                self._unclaimed_since.pop((sha256, chunk_size), None)
                if claim.blake3 is not None:
                    settled = self._settled.setdefault((sha256, chunk_size), {})
                    if len(settled) < MAX_CHUNKS:
                        settled[index] = (claim.node_id, claim.blake3)

    def _drop_claim(self, sha256: str, chunk_size: int, index: int, revision: int | None = None) -> None:
        """Forget a claim (only one not newer than ``revision``, when given: a deletion seen late)."""
        with self._lock:
            by_index = self._claims.get((sha256, chunk_size))
            if by_index is None or index not in by_index:
                return
            if revision is None or by_index[index].revision <= revision:
                del by_index[index]
                if not by_index:
                    del self._claims[(sha256, chunk_size)]
                    if (sha256, chunk_size) in self._settled:
                        self._unclaimed_since[(sha256, chunk_size)] = time.monotonic()
            self._prune_settlements()

    def _prune_settlements(self) -> None:
        """Forget the settlements of contents whose last claim went SETTLEMENT_TTL ago (their pulls are
        long over: their holders say who has them). Under the lock."""
        expired = time.monotonic() - SETTLEMENT_TTL
        for content in [c for c, since in self._unclaimed_since.items() if since <= expired]:
            del self._unclaimed_since[content]
            if content not in self._claims:
                self._settled.pop(content, None)

    def _clear(self) -> None:
        with self._lock:
            self._nodes.clear()
            self._holdings.clear()
            self._claims.clear()
            self._settled.clear()
            self._unclaimed_since.clear()

    def _replace_view(
        self,
        nodes: Mapping[str, NodeRecord],
        holdings: Mapping[str, Mapping[str, Holding]],
        claims: Mapping[tuple[str, int], Mapping[int, ChunkClaim]] | None = None,
    ) -> None:
        """Swap the whole view at once (a reader sees the old view or the new one, never a mix). What a node
        settled of a copy that went meanwhile goes too (a view away while its node removed the file, etcd's
        history compacted since: reloaded, it kept the settlements, a review), as do the settlements of nodes
        that left."""
        with self._lock:
            for sha256, by_node in self._holdings.items():
                for node_id, before in by_node.items():
                    if copy_went(before, holdings.get(sha256, {}).get(node_id)):
                        forget_settlements_of(self._settled, node_id, sha256)
            for node_id in set(self._nodes) - set(nodes):
                forget_settlements_of(self._settled, node_id)
            self._nodes.clear()
            self._nodes.update(nodes)
            self._holdings.clear()
            self._holdings.update({sha: dict(by_node) for sha, by_node in holdings.items() if by_node})
            self._claims.clear()
            self._claims.update({key: dict(by_index) for key, by_index in (claims or {}).items() if by_index})
            for key, by_index in self._claims.items():
                for index, claim in by_index.items():
                    if claim.blake3 is not None:
                        self._settled.setdefault(key, {})[index] = (claim.node_id, claim.blake3)
