"""One file's share of a fleet pulling the same content from the Hub at once: each chunk from the Hub once.

Before a node fetches a chunk from the Hub it *claims* it in the registry (a compare-and-swap: see
:meth:`~modeldepot.discovery.Discovery.claim_chunk`). A chunk another live node claims is not fetched from
the Hub: it comes from that node (its server serves the chunks of a download in progress) or from anyone
who has it since, once the claimer has *settled* the claim with the chunk's BLAKE3, against which the chunk
is then checked whoever relays it. The claimers become sources of the file as their claims appear, and so
do the fleet's other holders of the content (a node that joined late, or relays what it took).

A node that starts on the file when other nodes have already landed a tenth of its chunks (it joined late) is
a *follower*: it claims no fresh chunk from the Hub while the others' claims keep moving, and takes what
they fetch; only when their claims stand still for the patience and for their typical time to land (they
died, or stopped) does it claim chunks itself (or, before that, chunks the holders hold once they are
judged slow, in the endgame a chunk in flight to a peer that failed, and a chunk settled already by a
node that failed here or left: nobody will claim those). A late node thus adds no Hub traffic while the
fleet is healthy; the nodes that start together share the Hub's.

A claim stops counting, and the chunk may be claimed over it (a take-over: another compare-and-swap, so one
node only takes it over), when its claimer has been gone from the fleet for REGISTRATION_GRACE (it died: its
claims go with its lease within the TTL anyway; a registration that lapses under load and comes back voids
nothing), when the claimer's copy failed its digest here, or when it is late: unlanded after ``patience``
seconds and after three times the swarm's typical time from claim to landing (a claimer slow on the Hub
does not hold the file's tail; a fleet that shares a slow uplink is not "late"; claims that never land do
not raise that time with their age). When the registry
does not answer a claim, the chunk is not fetched from the Hub yet (another one is tried, or the same
again), unless the registry has stayed silent for the patience: then chunks are fetched anyway (a pull
never waits on the registry for long; an outage costs duplicate Hub traffic, a busy registry does not).

A pull claims only while its own store's node is in the fleet's view: a claim of a pull whose server
died keeps the others waiting on a node none of them can reach, until they take the chunk over from the
Hub again. Without it, the pull fetches what is left as a plain downloader.

Hub tokens never leave the node: a peer is asked with the node token, and the registry holds SHA-256s,
chunk numbers, node ids and BLAKE3s only.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from modeldepot.discovery.base import ChunkClaim, Discovery, Holding, NodeRecord
from modeldepot.hashing import chunk_count
from modeldepot.store.layout import size_text
from modeldepot.transfer.choosing import SWARM_PATIENCE, refused_by_the_fleet
from modeldepot.transfer.download import FileSource
from modeldepot.transfer.fleet import FleetView
from modeldepot.transfer.notices import say_now_and_then

__all__ = ["LATE_SHARE", "SourceFactory", "SwarmFile"]

log = logging.getLogger(__name__)

LATE_SHARE = 0.1  # a node that first sees this share of the chunks landed by others joined late: it follows
REGISTRATION_GRACE = 15.0  # seconds a claimer may be missing from the view (a lapsed lease) and still count
OVERDUE_FACTOR = (
    3.0  # a claim is late once unlanded this many times the swarm's typical claim-to-landing time
)
FIRST_LANDING_PATIENCE = 60.0  # ... or this many seconds while no claim of the file was seen landing
SERVING_PROBE_EVERY = 1.0  # seconds between two looks at whether this store's own node still listens
# A node whose own claims reach this share of the time after which the others take them over gives them up
# (and follows): the others fetch them from the Hub at once, where they would have fetched them again later
YIELD_SHARE = 0.75
YIELD_WITNESSES = 2  # ... once this many of the others' claims, newer than its own, landed before it
LANDINGS_KEPT = 32  # the swarm's latest claim-to-settlement times kept, for its typical time per chunk
# Seconds a pull that landed the file keeps its claims, at most, until this store's node is seen holding it:
# its serve publishes what the store holds once a second (server/fleet.py), and the write takes a moment
HANDOVER_PATIENCE = 2.5
# Seconds between two claims again of what this pull holds or fetches unclaimed (its lease ran out, or the
# registry did not answer its claims): while the registry answers and they stay unclaimed
SHARE_AGAIN_EVERY = 2.0
HANDOVER_LOOK = 0.05  # seconds between two looks at the view meanwhile (a local read, no request)

SourceFactory = Callable[[NodeRecord, Holding | None], FileSource | None]
"""A fleet node as a source of the file (with its holding, or None for a claimer that publishes none yet),
or None when it may not be one (this node itself, an unusable URL, another size)."""


@dataclass(frozen=True)
class _Seen:
    """What one read of the fleet's view says of the file."""

    claims: dict[int, ChunkClaim]
    settled: dict[int, tuple[str, str]]  # chunk -> (node id, BLAKE3), also of released claims
    nodes: dict[str, NodeRecord]  # live nodes by id
    holders: list[tuple[NodeRecord, Holding]]
    connected: bool = True  # the registry answers the view (False: it shows the fleet as it last was)
    other_sizes: tuple[tuple[int, tuple[str, ...]], ...] = ()  # (chunk size, its claimers) of other sizes


class SwarmFile:
    """The claims of one content (``sha256`` in ``chunk_size`` chunks) as this node's pull sees them.

    :meth:`refresh` reads the fleet's local view (no request); :meth:`claim`, :meth:`settle` and
    :meth:`release` write through the registry. Used from the pull's event loop."""

    def __init__(self, fleet: FleetView, node_id: str, sha256: str, size: int, chunk_size: int,
                 make_source: SourceFactory, slow: bool = False) -> None:  # fmt: skip
        self.fleet, self.node_id, self.sha256, self.chunk_size = fleet, node_id, sha256, chunk_size
        self.chunks = chunk_count(size, chunk_size)
        self.make_source = make_source
        self.claims: dict[int, ChunkClaim] = {}
        self.nodes: dict[str, NodeRecord] = {}
        self.holders: list[tuple[NodeRecord, Holding]] = []
        self.digests: dict[int, str] = {}  # settled BLAKE3s seen, kept after their claims go
        self.settled: dict[str, set[int]] = {}  # node id -> chunks it settled (kept after its claims go)
        self._sources: dict[tuple[str, str], FileSource | None] = {}  # (node id, url) -> as a source
        self.mine: set[int] = set()  # chunks this pull claimed
        # Chunks fetched from the Hub with no claim of this node's (the registry did not answer, or this node
        # was out of the fleet): claimed once it can be (shares_lost)
        self.unclaimed: set[int] = set()
        self._share_again_due = 0.0
        self.landed: set[int] = set()  # chunks this pull landed (and settled, when it claimed them)
        self.withdrawn: set[int] = (
            set()
        )  # claims withdrawn as the Hub failed (the release takes what is left)
        self.given_up: set[int] = (
            set()
        )  # claims this node gave up (``withdraw``): not its own while it follows
        self.gave_up_at: float | None = None  # when it gave claims up for its own slow link (download.py)
        self._first_seen: dict[tuple[int, int], float] = {}  # (chunk, claim revision) -> when first seen
        self._revisions: dict[int, int] = {}  # chunk -> the latest revision of a claim on it seen here
        self._pending: dict[int, tuple[str, float]] = {}  # chunk -> (claimer, when first seen unlanded)
        self._landings: deque[float] = deque(maxlen=LANDINGS_KEPT)  # seconds from claim seen to settled
        # When the other nodes' latest landed claims were first seen: newer ones than this node's landing
        # first tell its own link from a Hub slow for everyone
        self._others_landed: deque[float] = deque(maxlen=LANDINGS_KEPT)
        self._known: dict[str, NodeRecord] = {}  # every node seen live, as last seen
        self._missing_since: dict[str, float] = {}  # node id -> since when it is missing from the view
        self.follower: bool | None = None  # decided at the first read: others had landed chunks already
        self.slow = slow  # this pull keeps to a download cap
        self.last_activity = time.monotonic()  # when the claims on the file last changed, as seen here
        self._unanswered_since: float | None = None  # since when claims go unanswered
        # This store's node is in the view (SourceChain.swarm_file saw it live when the file started).
        self.serving = True
        self._serving_lost_logged = False
        self._probe_due = 0.0  # (_listening: when to look at this node's port again)
        self._listening = True
        self._addresses: tuple[tuple[str, int], list[tuple[str, int]]] | None = None  # (host, port) -> addrs
        self.events: dict[str, int] = {}  # why chunks were fetched from the Hub, and other counts
        self.registry_answers = True  # (refresh) False: claims settled meanwhile cannot be seen to land
        self.view_answered = True  # (refresh) False: the last read of the view had no answer
        self._unreachable_since: float | None = None  # since when the registry does not answer the view
        # Every chunk this file's claims were asked for: what its release withdraws, and nothing else (a
        # release of all the process's claims on the content dropped another pull's, or a retry's being
        # handed over, a review)
        self.asked: set[int] = set()

    # -- reading the view -----------------------------------------------------------------------------------

    def refresh(self) -> bool:
        """Read the claims, live nodes and holders of the content from the view; True when the claims or
        the nodes changed."""
        sha, size = self.sha256, self.chunk_size
        unread = _Seen({}, {}, {}, [])
        seen = self.fleet.read(
            lambda d: _Seen(d.claims(sha, size), d.settlements(sha, size), {n.node_id: n for n in d.peers()},
                            [(h.node, h.holding) for h in d.holders(sha)], d.status().connected,
                            _claimed_otherwise(d, sha, size)),
            unread,
        )  # fmt: skip
        if seen.other_sizes:
            _say_sizes_differ(sha, size, seen.other_sizes)
        claims = seen.claims
        if self.given_up:
            # (a claim this node gave up whose release did not reach the registry is read back: it is no
            # claim of this node's to fetch while it follows; the others take it over when late, a review)
            claims = {i: c for i, c in claims.items()
                      if not (i in self.given_up and c.node_id == self.node_id and c.blake3 is None)}  # fmt: skip
        for index, claim in claims.items():
            self._revisions[index] = max(self._revisions.get(index, 0), claim.revision)
        changed = claims != self.claims or seen.nodes.keys() != self.nodes.keys()
        now = time.monotonic()
        if _others(claims, self.node_id) != _others(self.claims, self.node_id):
            self.last_activity = now  # (this node's own claims say nothing of the others' progress)
        if self.follower is None:
            landed = sum(c.blake3 is not None and c.node_id != self.node_id for c in claims.values())
            # A pull under a download cap (``pull --max-rate``) follows whenever other nodes are live: its
            # claims would land at its pace, far behind the swarm's, and stand until taken over (the trial:
            # one capped node held three others back to its 39 s, and the Hub sent 1.46× the file).
            crowd = self.slow and any(node_id != self.node_id for node_id in seen.nodes)
            self.follower = crowd or landed >= max(1, LATE_SHARE * self.chunks)
        self.claims, self.nodes, self.holders = claims, seen.nodes, seen.holders
        # (a view that did not answer in time, or one detached as the process closes, says nothing of the
        # registry either, nor of claims lost: shares_lost)
        self.view_answered = seen is not unread
        if seen is not unread:
            self.registry_answers = seen.connected
            if seen.connected:
                self._unreachable_since = None
            elif self._unreachable_since is None:
                self._unreachable_since = now
        if seen is not unread:  # (a view that did not answer in time says nothing of this node)
            self._check_serving()
        self._known.update(seen.nodes)
        for node_id in self._known:
            if node_id in seen.nodes:
                self._missing_since.pop(node_id, None)
            else:
                self._missing_since.setdefault(node_id, now)
        for index, (node_id, digest) in seen.settled.items():
            self.digests.setdefault(index, digest)
            if node_id != self.node_id:
                self.settled.setdefault(node_id, set()).add(index)
        for index, claim in claims.items():
            if claim.blake3 is None:
                self._first_seen.setdefault((index, claim.revision), now)
                if self._pending.get(index, ("", 0.0))[0] != claim.node_id:
                    self._pending[index] = (claim.node_id, now)
            elif index in self._pending:
                claimer, since = self._pending.pop(index)
                if claimer == claim.node_id:
                    self._landings.append(now - since)
                    if claimer != self.node_id:
                        self._others_landed.append(since)
        if seen is not unread:
            # A claim gone unlanded (its claimer died, withdrew it, gave it up) lands never: kept, it counted in
            # the typical landing for ever, at three times the landings' median (a review: a follower of a
            # swarm that died waited 90 s where its claims landed in 30)
            for index in [i for i in self._pending if i not in claims]:
                del self._pending[index]
        return changed

    def _check_serving(self) -> None:
        """Whether this store's node is still in the fleet's view: its server is what gives the chunks this
        pull fetches to the others. Once it is gone (its ``serve`` process died, while this pull, on a lease
        of its own, lives on), a claim of this pull would keep the others from the Hub for a chunk none of
        them can get from here, until they take it over: the Hub would send it twice. So the pull claims
        nothing more; it fetches as a plain downloader (what it claimed already, it still settles), and
        claims again if the node comes back."""
        serving = self.node_id in self.nodes
        if serving == self.serving:
            return
        self.serving = serving
        if not serving and not self._serving_lost_logged:
            self._serving_lost_logged = True  # once per file: a node that flaps does not flood the log
            log.warning(
                "%s: this store's node %s is no longer in the fleet (its server stopped?): no peer can take "
                "chunks from it, so this pull claims no more of them and fetches the rest on its own",
                self.sha256[:12],
                self.node_id,
            )
        elif serving and self._serving_lost_logged:
            log.info("%s: this store's node %s is back in the fleet: claiming chunks again", self.sha256[:12],
                     self.node_id)  # fmt: skip

    async def _still_listening(self) -> bool:
        """Whether this store's node still accepts connections, looked at once a second: a ``serve`` that
        died leaves its record in the view until its lease runs out (10 s), and every claim made meanwhile
        is one the others wait on, then fetch from the Hub again. Only a refusal (nothing listens at its
        address) counts: an address this machine cannot reach itself (a proxy, NAT) says nothing."""
        now = time.monotonic()
        record = self.nodes.get(self.node_id)
        if record is None or now < self._probe_due:
            return self._listening
        self._probe_due = now + SERVING_PROBE_EVERY
        listening = await self._accepts(record.url)
        if listening != self._listening:
            self._listening = listening
            if listening:
                log.info("%s: this store's node %s listens again: claiming chunks again", self.sha256[:12],
                         self.node_id)  # fmt: skip
            else:
                log.warning("%s: nothing listens at this store's node %s (%s): its server stopped? This pull "
                            "claims no more chunks and fetches the rest on its own", self.sha256[:12],
                            self.node_id, record.url)  # fmt: skip
        return listening

    async def _accepts(self, url: str) -> bool:
        """False when every address of ``url``'s host refuses a connection (nothing listens there); True
        when one accepts, or when it cannot be told (a timeout, a name that does not resolve). The addresses
        are resolved once (a name like localhost has two: each is tried)."""
        address = urlsplit(url)
        try:
            target = (address.hostname or "", address.port or (443 if address.scheme == "https" else 80))
            if self._addresses is None or self._addresses[0] != target:
                infos = await asyncio.wait_for(
                    asyncio.get_running_loop().getaddrinfo(*target, type=socket.SOCK_STREAM), 0.5
                )
                self._addresses = (target, sorted({(str(info[4][0]), int(info[4][1])) for info in infos}))
        except (OSError, ValueError, asyncio.TimeoutError):
            return True
        refused = 0
        for host, port in self._addresses[1]:
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 0.5)
            except ConnectionRefusedError:
                refused += 1
                continue
            except (OSError, asyncio.TimeoutError):
                continue
            writer.close()
            return True
        return refused == 0 or refused < len(self._addresses[1])

    def typical_landing(self) -> float | None:
        """The swarm's typical seconds from a claim (as first seen here) to its settlement, or None before
        any claim seen unlanded has landed: the median of the latest landings and of the ages of the claims
        still unlanded (at least that long: the first landings alone are the fastest, not the typical).

        An unlanded claim counts at its age only up to OVERDUE_FACTOR times the landings' own median: past
        that it is what is being judged, not a sign of the swarm's pace. Counted at its whole age, claims
        that never settle (a claimer that hangs, settlements lost) would hold the median at their own age
        once they outnumber the landings, and the threshold, three times that, would stay ahead of them for
        ever: nothing would ever be late."""
        if not self._landings:
            return None
        now = time.monotonic()
        cap = OVERDUE_FACTOR * statistics.median(self._landings)
        return statistics.median(
            [*self._landings, *(min(now - since, cap) for _, since in self._pending.values())]
        )

    def _overdue_after(self, patience: float) -> float:
        """Seconds another node's claim may stay unlanded: ``patience``, and a late claim is judged against
        the swarm, not a fixed time: several times what the fleet's claims take to land (when every node
        starts at once, the whole file is claimed at once and its chunks share the uplink: none lands
        before a good part of the whole). Before any is seen landing, only a long silence makes it late."""
        typical = self.typical_landing()
        return max(patience, FIRST_LANDING_PATIENCE if typical is None else OVERDUE_FACTOR * typical)

    def _live_node(self, node_id: str) -> NodeRecord | None:
        """The node, if live: in the view, or missing from it for less than REGISTRATION_GRACE (a serve
        process's lease that lapsed under load, and is granted again; its pull's claims hang on the pull's
        own lease and still stand; the claimer is reached at its last known URL meanwhile)."""
        node = self.nodes.get(node_id)
        if node is not None:
            return node
        missing = self._missing_since.get(node_id)
        if missing is None or time.monotonic() - missing >= REGISTRATION_GRACE:
            return None
        return self._known.get(node_id)

    def digest(self, index: int) -> str | None:
        """The chunk's BLAKE3 as its claimer settled it (what a peer's copy must match), if known."""
        return self.digests.get(index)

    def registry_silent(self) -> bool:
        """Whether the registry does not answer the view now (settlements cannot be seen)."""
        return self._unreachable_since is not None

    def standing_claim(self, index: int, failed: set[str], patience: float) -> ChunkClaim | None:
        """Another live node's claim on the chunk that keeps this node from the Hub for it, or None: the
        chunk is unclaimed, claimed by this node, or its claim is void (its claimer is gone, its copy failed
        here, by ``failed``: the names of the sources whose copy failed; or it is overdue by ``patience``)."""
        claim, _ = self._claim_state(index, failed, patience)
        return claim

    def _claim_state(self, index: int, failed: set[str], patience: float) -> tuple[ChunkClaim | None, str]:
        """The standing claim of another node on the chunk (or None) and, when there is none, why: "free",
        "mine", or why another node's claim is void ("left", "failed", "overdue")."""
        claim = self.claims.get(index)
        if claim is None:
            return None, "free"
        if claim.node_id == self.node_id:
            return None, "mine"
        node = self._live_node(claim.node_id)
        if node is None:
            return None, "left"  # its claimer left the fleet
        source = self._claimer_source(node)
        if source is None or source.source.name in failed:
            return None, "failed"
        if claim.blake3 is None:
            seen = self._first_seen.get((index, claim.revision), time.monotonic())
            # While the registry is out of reach a claim's settlement cannot be seen: its claimer may well
            # have the chunk, but waiting for a landing never seen held every pull of an etcd outage for the
            # minute before the first landing (a trial: 71 s for what the Hub alone sends in 7)
            # (an outage of the patience at least: one call that timed out under load voids nothing)
            now = time.monotonic()
            lost = self._unreachable_since is not None and now - self._unreachable_since >= patience
            if now - seen >= (patience if lost else self._overdue_after(patience)):
                return None, "overdue"
        return claim, "standing"

    def settlers_lost(self, index: int, failed: Collection[str]) -> bool:
        """Whether chunk ``index`` was settled by other nodes, each of which left the fleet or failed here
        (``failed``: the names of sources whose copies failed, or who are banned or stuck). Nobody claims it
        again then; a live settler, by contrast, holds it, or will once its holdings are published."""
        settlers = [node_id for node_id, chunks in self.settled.items() if index in chunks]
        for node_id in settlers:
            node = self._live_node(node_id)
            source = None if node is None else self._claimer_source(node)
            if source is not None and source.source.name not in failed:
                return False
        return bool(settlers)

    def _claimer_source(self, node: NodeRecord) -> FileSource | None:
        key = (node.node_id, node.url)
        if key not in self._sources:
            self._sources[key] = self.make_source(node, None)
        return self._sources[key]

    def may_claim_fresh(self, patience: float) -> bool:
        """Whether this node may claim a chunk nobody claims: it started with the others, or it follows
        a swarm whose claims have stood still for ``patience`` seconds, and for the swarm's typical time from
        claim to landing, a minute at most (a Hub slow for every node lands each claim late: no change for
        the patience alone is no sign that the others stopped)."""
        still = time.monotonic() - self.last_activity
        if (
            self.follower
            and still >= patience
            and still >= min(self.typical_landing() or 0.0, FIRST_LANDING_PATIENCE)
        ):
            self.follower = False  # the others stopped: this node fetches from the Hub like them from now on
        return not self.follower

    def announced(self) -> dict[str, frozenset[int]]:
        """The chunks each live claimer has settled (landed and checked there), by node id: kept after its
        claims are released (its pull is over: it holds them whole, as its holdings soon say)."""
        # (a chunk the node claims again, unsettled, is one it lost: it removed the copy and pulls it again, and
        # its old settlement had it asked, answer 404, and its fresh claim taken for failed: a review)
        again = {(claim.node_id, index) for index, claim in self.claims.items() if claim.blake3 is None}
        return {
            node_id: frozenset(i for i in chunks if (node_id, i) not in again)
            for node_id, chunks in self.settled.items() if self._live_node(node_id)
        }  # fmt: skip

    def sources(self) -> dict[str, FileSource]:
        """The fleet's nodes that are sources of the file now, by node id: the content's holders (whole or
        in part) and the live claimers of its chunks."""
        found: dict[str, FileSource] = {}
        for node, holding in self.holders:
            if node.node_id != self.node_id and (holding.complete or holding.chunks_done > 0):
                source = self.make_source(node, holding)
                if source is not None:
                    found[node.node_id] = source
        for claim in self.claims.values():
            claimer = self._live_node(claim.node_id)
            if claimer is not None and claim.node_id != self.node_id and claim.node_id not in found:
                source = self._claimer_source(claimer)
                if source is not None:
                    found[claim.node_id] = source
        return found

    # -- writing through the registry -------------------------------------------------------------------------

    async def claim(self, index: int, failed: set[str], patience: float) -> bool:
        """Claim the chunk for this node before it is fetched from the Hub (over a void claim, if there is
        one). True when this node may fetch it: the claim is its own, or the registry could not say."""
        current = self.claims.get(index)
        replaces, why = 0, "free"
        if current is not None and current.node_id != self.node_id:
            standing, why = self._claim_state(index, failed, patience)
            if standing is not None:
                return False
            replaces = current.revision
        if not self.serving or refused_by_the_fleet() or not await self._still_listening():
            # No claim: the others may not wait on this node for a chunk they cannot take from it (nor be
            # taken over by it). The Hub gives it here (a chunk another live node claims still comes from that
            # node: see above).
            self.count("unshared")
            self.unclaimed.add(index)
            return True
        sha, size, node_id = self.sha256, self.chunk_size, self.node_id
        self.asked.add(index)
        result = await self.fleet.call(lambda d: d.claim_chunk(sha, size, index, node_id, replaces), None)
        now = time.monotonic()
        if result is None:  # the registry did not answer (down, or too busy to answer in time)
            self._unanswered_since = self._unanswered_since or now
            # A busy registry is waited for (fetching anyway would double the Hub's traffic); one that
            # stays silent for the patience is not (a pull never waits on the registry for long).
            if now - self._unanswered_since >= patience:
                self.count("unanswered")
                self.unclaimed.add(index)
                return True
            return False
        self._unanswered_since = None
        self.claims[index] = result
        if result.node_id != self.node_id:
            self.count("claims_lost")
            self._first_seen.setdefault((index, result.revision), time.monotonic())
            return False
        self.mine.add(index)
        self.unclaimed.discard(index)
        self.given_up.discard(index)
        self._revisions[index] = max(self._revisions.get(index, 0), result.revision)
        self._first_seen.setdefault((index, result.revision), now)
        self.count("claims_won")
        if replaces:
            self.count(f"taken_over_{why}")
            log.info("%s: chunk %d taken over from node %s (its claim is void here: %s)", self.sha256[:12],
                     index, current.node_id if current else "?", why)  # fmt: skip
        return True

    def count(self, event: str) -> None:
        """Count one event of this file's swarm (reported by the pull: why the Hub was asked)."""
        self.events[event] = self.events.get(event, 0) + 1

    async def settle(self, index: int, digest: str, vouched: bool = True) -> None:
        """Tell the fleet the chunk this node claimed has landed, and its BLAKE3 (not when the chunk was
        checked against a holder's own word alone, ``vouched`` False: it lands, unsettled)."""
        self.landed.add(index)
        if index in self.mine and vouched:
            sha, size = self.sha256, self.chunk_size
            await self.fleet.call(lambda d: d.settle_claim(sha, size, index, digest), None)

    async def claim_held(self, held: Mapping[int, str], fetching: Collection[int],
                         landed: Callable[[], Mapping[int, str]]) -> None:  # fmt: skip
        """Claim the chunks this node holds (``held``: their BLAKE3s) or is fetching, where no other node
        claims them, and settle those it holds: the others take them from this node rather than from the
        Hub. For a pull that began outside the swarm; the caller gives only chunks it may vouch for (the
        Hub's). ``landed`` tells such chunks landed since (settled here: their own settlement may have come
        before this claim)."""
        sha, size, node_id = self.sha256, self.chunk_size, self.node_id
        if not self.serving:  # (as claim: the others may not wait on a node none of them can reach)
            return
        # (a claim cut short by the pull's end may stand: release asks the registry, by `asked`)
        for index in sorted({*held, *fetching}):
            current = self.claims.get(index)
            if index in self.mine or (current is not None and current.node_id != node_id):
                continue
            self.asked.add(index)
            result = await self.fleet.call(_claiming(sha, size, index, node_id), None)
            if result is None:  # the registry does not answer: these chunks stay unshared
                return
            self.claims[index] = result
            self.unclaimed.discard(index)  # (claimed: by this node, or another that fetches it)
            if result.node_id != node_id:
                continue
            self.mine.add(index)
            digest = held.get(index) or landed().get(index)
            if digest is not None:
                await self.settle(index, digest)

    def shares_lost(self) -> bool:
        """Whether chunks this pull holds or fetches stand unclaimed by it while the registry answers: claims
        it made that went from the registry (its lease ran out: etcd stalled, or out of this node's reach,
        for longer than the lease, and every claim and settlement on it went with it), or chunks it fetched
        with none (the registry did not answer). The others would claim them and fetch them from the Hub
        again: an etcd stalled for 13 s mid-pull had the Hub send the model 1.75 times, an explorer's trial.
        The lost claims are forgotten as this node's, for :meth:`claim_held` (the pull's ``_share_held``) to
        claim them again; True at most once per SHARE_AGAIN_EVERY."""
        if not (self.registry_answers and self.view_answered and self.serving):
            return False
        now = time.monotonic()
        if now < self._share_again_due:
            return False
        # (a claim another node took over, judging this one late, is no loss: it is that node's chunk now)
        self.mine -= {
            i for i, claim in self.claims.items() if i in self.mine and claim.node_id != self.node_id
        }
        lost = {i for i in self.mine if i not in self.claims}
        self.unclaimed -= self.claims.keys()  # (claimed since: by this node, or by another that fetches it)
        if not lost and not self.unclaimed:
            return False
        self._share_again_due = now + SHARE_AGAIN_EVERY
        self.mine -= lost
        self.unclaimed |= lost  # (until claimed again: retried while the registry answers)
        gone = len(lost)
        if gone:
            self.count("claims_gone")
            log.info("%s: %d of this node's claims went from the registry (its lease ran out?): claimed again, "
                     "so that the fleet takes those chunks from this node", self.sha256[:12], gone)  # fmt: skip
        return True

    def claim_revision(self, index: int) -> int:
        """The latest revision of a claim on chunk ``index`` seen here (0: none yet). It changes whenever a
        node claims the chunk afresh, and stays when the claim is released."""
        return self._revisions.get(index, 0)

    def own_claims_late(self) -> dict[int, float]:
        """This node's unlanded claims that the others are about to judge late (YIELD_SHARE of the time after
        which they take a claim over, at the swarm's typical landing), with when they would take each over:
        this node lands its chunks slower than the swarm (its own narrow link), and they would fetch them
        from the Hub again while it goes on. Only once other nodes' claims newer than it (by a typical
        landing) landed first, YIELD_WITNESSES of them: a Hub slow for everyone, or a node pulling alone,
        makes no claim late (each node gave its claims up then, and one was left claiming for the fleet: a
        review)."""
        typical = self.typical_landing()
        if typical is None:
            return {}
        overdue_after = max(SWARM_PATIENCE, OVERDUE_FACTOR * typical)
        now = time.monotonic()
        late = {}
        for index in self.mine - self.landed:
            claim = self.claims.get(index)
            if claim is None or claim.node_id != self.node_id or claim.blake3 is not None:
                continue
            since = self._first_seen.get((index, claim.revision), now)
            # (newer by a typical landing: claims made with it that landed are no sign of its link's pace)
            if (now - since >= YIELD_SHARE * overdue_after
                    and sum(seen >= since + typical for seen in self._others_landed) >= YIELD_WITNESSES):  # fmt: skip
                late[index] = since + overdue_after
        return late

    async def withdraw(self, chunks: Collection[int]) -> None:
        """Withdraw this node's claims on ``chunks``, which it stopped fetching (they come from the other
        nodes): the others need not wait for them to go late, and this node does not claim them again while
        it follows."""
        mine = self.mine & set(chunks) - self.landed
        if mine:
            self.mine -= mine
            self.withdrawn |= mine
            self.given_up |= mine
            for index in mine:
                self.claims.pop(index, None)
            sha, size = self.sha256, self.chunk_size
            await self.fleet.call(lambda d: d.release_claims(sha, size, mine), None)

    async def withdraw_unlanded(self, landing: Collection[int] = ()) -> None:
        """Withdraw this node's claims on the chunks it has not landed (nor is ``landing``: their bytes are
        in): its Hub failed, and it will not fetch them. (Kept, they held the other nodes until they went
        late: with the Hub gone for all, each waited on the other's claims well past the outage patience, a
        minute before any had landed.) The pull's :meth:`release` releases what this left, if cancelled."""
        unlanded = self.mine - self.landed - set(landing)
        if unlanded:
            self.mine -= unlanded
            self.withdrawn |= unlanded
            sha, size = self.sha256, self.chunk_size
            log.info("%s: withdrawing this node's claims on %d chunk%s it will not fetch", sha[:12], len(unlanded),
                     "" if len(unlanded) == 1 else "s")  # fmt: skip
            await self.fleet.call(lambda d: d.release_claims(sha, size, unlanded), None)

    async def release(self, hand_over: bool = False) -> None:
        """Withdraw this node's claims on the file (its pull is over: it holds the file, or gave up): every
        claim the registry still holds for this process, a withdrawal cut short by the pull's end too.

        ``hand_over``: the pull landed and published the file. Its claims then stand until the view shows
        this store's node holding it whole (at most ``HANDOVER_PATIENCE``), on the fleet's loop, while the
        pull returns: released at once, a node that asked before the holdings this node's serve publishes
        showed the file found it neither claimed nor held, and fetched it from the Hub again (1.25x the model
        in CI). Waited for in the pull, it held every mirrored response's end (a review)."""
        if not self.asked:
            return
        handing = hand_over and bool(self.mine) and self.serving and self._listening and self.registry_answers
        chunks = frozenset(self.asked)
        self.mine.clear()
        self.withdrawn.clear()
        self.asked.clear()
        sha, size, node_id = self.sha256, self.chunk_size, self.node_id
        if handing and self.fleet.in_background(lambda d: _hand_over(d, sha, size, chunks, node_id)):
            return
        await self.fleet.call(lambda d: d.release_claims(sha, size, chunks), None)


async def _hand_over(discovery: Discovery, sha256: str, chunk_size: int, chunks: frozenset[int],
                     node_id: str) -> None:  # fmt: skip
    """(On the fleet's loop.) Release this process's claims on ``chunks`` of ``sha256`` once ``node_id`` is
    seen holding it whole, or after ``HANDOVER_PATIENCE`` (its serve's publishing failed, or it holds what it
    does not publish): released in any case, a cancellation included (a node leaving: at once)."""
    clock = asyncio.get_running_loop()
    deadline = clock.time() + HANDOVER_PATIENCE
    try:
        while not any(h.node.node_id == node_id and h.holding.complete for h in discovery.holders(sha256)):
            if clock.time() >= deadline:
                log.debug("%s: this node's holding of it not seen in %.1f s: its claims go anyway", sha256[:12],
                          HANDOVER_PATIENCE)  # fmt: skip
                return
            await asyncio.sleep(HANDOVER_LOOK)
    finally:
        await discovery.release_claims(sha256, chunk_size, chunks)


def _claiming(
    sha256: str, chunk_size: int, index: int, node_id: str
) -> Callable[[Discovery], Awaitable[ChunkClaim | None]]:
    return lambda discovery: discovery.claim_chunk(sha256, chunk_size, index, node_id)


def _claimed_otherwise(
    discovery: Discovery, sha256: str, chunk_size: int
) -> tuple[tuple[int, tuple[str, ...]], ...]:
    """The other chunk sizes in which nodes claim ``sha256``, each with its claimers."""
    return tuple(
        (other, tuple(sorted({claim.node_id for claim in discovery.claims(sha256, other).values()})))
        for other in sorted(discovery.claimed_sizes(sha256) - {chunk_size})
    )


def _say_sizes_differ(sha256: str, chunk_size: int, others: tuple[tuple[int, tuple[str, ...]], ...]) -> None:
    """A fleet whose stores were made with different chunk sizes claims one content under as many keys: its
    nodes cannot share the chunks, and each size fetches the whole file from the Hub. Said now and then, as an
    operator must learn it from the log (the pulls succeed)."""
    claimers = ", ".join(f"{', '.join(nodes)} in {size_text(size)} chunks" for size, nodes in others)
    say_now_and_then(
        f"chunk sizes of {sha256}", log,
        "%s: other nodes of the fleet pull this content in chunks of another size (%s) than this store's %s: "
        "they cannot share its chunks, and the Hub sends it once per size. The stores of one fleet need one "
        "chunk size (MODELDEPOT_CHUNK_SIZE, when a store is created)",
        sha256[:12], claimers, size_text(chunk_size),
    )  # fmt: skip


def _others(claims: dict[int, ChunkClaim], node_id: str) -> dict[int, ChunkClaim]:
    return {index: claim for index, claim in claims.items() if claim.node_id != node_id}
