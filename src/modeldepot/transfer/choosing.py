"""Which chunk each source of a download asks for next: the scheduler's choices, apart from the fetching.

Among the chunks nobody has or fetches, a source takes one a reader waits for (a mirror's client reading a
range far into the file), else the one the fewest live sources hold (rarest first, ties to the lowest). A source may hold the file in part (a fleet node still downloading it): it is asked only
for the chunks it holds (its chunk map, its settled claims); in a swarm, only for those whose BLAKE3 is known,
so that each is checked before it is written. Endgame: once a source may take none of those
(every chunk left is in flight, or it holds only chunks in flight), it also asks for the one outstanding
longest, once that has been outstanding long enough; the first copy to land wins (transfer/download.py).

A source whose copy of a chunk failed its digest is not asked for it again (unless every live holder failed
it, up to ``MAX_CHUNK_ATTEMPTS`` tries), and a banned source only when no other source holds the chunk.

In a swarm (transfer/swarm.py) the Hub is asked for a chunk only when no live peer that can give it holds
it and no other live node's claim on it stands (nor, for a late node, a chunk nobody claims or holds and
no live node settled, while the others' claims move); in the endgame the peers its requests wait for count
as failed. A claim stands until its claimer leaves, fails here, is stuck, or stays unlanded past the
patience (``SWARM_PATIENCE`` at least, more on a slow Hub; and three times the swarm's typical time from
claim to landing: transfer/swarm.py).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from modeldepot.store.partials import ResumablePartial
from modeldepot.transfer.sources import SILENT_PEER, HttpSource, Receiving

if TYPE_CHECKING:
    from modeldepot.transfer.swarm import SwarmFile

__all__ = [
    "BANNED_NODES",
    "FLEET_REFUSES",
    "LEFT_OUT",
    "LIARS",
    "ChunkChooser",
    "ChunkRequest",
    "FileSource",
    "banned",
    "is_silent",
    "judge_token",
    "left_out",
    "refused_by_the_fleet",
    "token_refused",
]

# Source name (its kind and URL) -> until when (monotonic) it gets no chunk, in every download of this
# process: a liar was banned file by file, and asked again for the next file of the same pull (and the
# files downloading beside). (A claimer that lies about a chunk's digest gets an honest holder banned so:
# it costs a detour by the Hub, never a wrong byte.)
BANNED_NODES: dict[str, float] = {}
# Nodes left out of a file's next try while one of them is suspected of its lie (pull.py): name -> each
# leave-out's token -> until when (monotonic). Kept apart from BANNED_NODES so that each is lifted alone: a
# suspect one file's digests cleared stays out while another file's leave-out of it lasts, and no longer (one
# value restored on a lift brought back another file's lifted leave-out, a review)
LEFT_OUT: dict[str, dict[int, float]] = {}
_LEAVING_OUT = threading.Lock()  # (pulls of one process may run on several threads' loops)
_LEAVE_OUT_TOKENS = itertools.count()
# Nodes whose chunks, vouched for by their own digests, were found not to be a file's by the upstream's bytes:
# name -> until when (monotonic) no new file asks them (download.ban_liars)
LIARS: dict[str, float] = {}
# Whether the fleet's nodes refuse this process's MODELDEPOT_TOKEN, as the last look at a few of them found
# (judge_token, from chain.SourceChain._refused_by): one verdict for the process
FLEET_REFUSES: list[bool] = [False]
MAX_CHUNK_ATTEMPTS = 3  # tries of one chunk that failed its digest before the file is given up
ENDGAME_COPIES = 2  # requests for one chunk at most, in the endgame
ENDGAME_WAIT = 1.0  # seconds a chunk is outstanding, at least, before the endgame asks another source too
ENDGAME_FACTOR = 3.0  # ... and at least this many times the idle source's own time per chunk
PEER_TIMES_KEPT = 64  # peer chunk times kept for the typical one
# A peer's request outstanding this many times the patience makes it stuck (its claims taken over, its
# chunk asked of the Hub again): a chunk from the Hub again is what the swarm saves, so only a peer well
# behind the others' pace counts as stuck, not one of a fleet that is slow as a whole.
STUCK_FACTOR = 2.0
COMING_READ_EVERY = 0.5  # seconds between two reads of the fleet's claims, outside a swarm
# ... and a claim gone counts as its chunk landed at its node so long, for its chunk map here to be read again
# (download.REFRESH_SECONDS, with a read of the claims to spare)
CLAIM_GONE_GRACE = 3.0
SWARM_PATIENCE = 10.0  # seconds, at least, another node's claim may stay unlanded before it is taken over


@dataclass(frozen=True)
class FileSource:
    """A source that holds a file, with the URL to ask and (from a depot node) its chunk digests."""

    source: HttpSource
    url: str
    chunk_blake3: tuple[str, ...] | None = None
    origin: str = ""  # "node" (configured), "peer" (found in the fleet), "hub"; default: the source's kind
    chunks_url: str | None = None  # a holder of part of the file: where its chunk map is read
    # Its chunk digests are the word of the node that answered the scan, whose SHA-256 the file is checked
    # against: a chunk that matches one may be handed to a reader before that check (the mirror)
    vouches: bool = False
    # Its chunk digests are its own word of itself (a peer found by content, asked for them): in a swarm, the
    # digest a claimer settled from the Hub comes first (a liar's own digests match its bad bytes)
    own_word: bool = False

    @property
    def kind(self) -> str:
        return self.origin or self.source.kind


@dataclass(eq=False)
class ChunkRequest:
    """One request for a chunk: who serves it, since when, and its task (cancelled when another lands it)."""

    source: FileSource
    started: float
    task: asyncio.Task[bool] | None = None
    landing: bool = False  # its bytes are in (or it streams the whole file): never cancelled then
    receiving: Receiving = field(default_factory=Receiving)  # its bytes in so far (shown, not yet checked)
    part_blake3: str | None = None  # the BLAKE3 the sender of the part it began from gave (see _land)
    under: int = 0  # (in a swarm) the revision of the chunk's claim when it was asked for
    trial: bool = False  # the Hub's, on trial (transfer/pace.py): stopped when it is found no faster


class ChunkChooser:
    """The state the choices read, and the choices. :class:`~modeldepot.transfer.download` 's job extends
    it with the fetching, landing and hashing; nothing here does I/O."""

    def __init__(self, partial: ResumablePartial, swarm: SwarmFile | None) -> None:
        self.partial, self.swarm = partial, swarm
        self.live: list[FileSource] = []
        self.fallback: Callable[[], list[FileSource]] | None = None  # the upstream, when it is not live yet
        self.have: dict[FileSource, frozenset[int] | None] = {}  # chunks a source can serve (None: all)
        # A partial holder's BLAKE3 of each chunk it offers, from its chunk map (its own word: a claimer's
        # settlement comes first; taken while the registry cannot be read, see _checkable)
        self.map_digests: dict[FileSource, dict[int, str]] = {}
        self.announced: dict[FileSource, frozenset[int]] = {}  # chunks a claimer settled (swarm)
        self.refused: dict[FileSource, set[int]] = {}  # chunks a partial holder said it lacks (404)
        # (in a swarm) the revision of the chunk's claim when a node said it lacks it: its refusal is of that
        # claim's settlement (a copy it removed since), not of a claim it makes afresh
        self.refused_under: dict[tuple[FileSource, int], int] = {}
        self.requests: dict[int, list[ChunkRequest]] = {}  # chunk -> its requests in flight (two: endgame)
        self.bad: dict[int, set[str]] = {}  # chunk -> sources whose bytes failed its digest
        self.attempts: dict[int, int] = {}
        self.timing: dict[FileSource, tuple[float, int]] = {}  # seconds spent on the chunks landed, how many
        self.peer_times: deque[float] = deque(maxlen=PEER_TIMES_KEPT)  # the latest peer chunks' seconds
        self.errors: dict[str, Exception] = {}  # source -> why it was dropped
        self.left_without: set[str] = set()  # sources dropped once nobody was left to give what they lack
        self.low = 0  # the lowest chunk that may not be done yet
        self.peers_slow = False  # the other nodes send it too slowly: the upstream may take what they hold
        # The upstream may take chunks they hold, one at a time, to be judged by its pace against theirs
        # (transfer/pace.py)
        self.hub_on_trial = False
        self._stuck_seen: tuple[float, float, set[str]] | None = None  # (now, patience, stuck): see _stuck
        # Outside a swarm, the upstream joined for the chunks no other node holds (they hold parts of it):
        # it takes none they hold, unless they are slow or it is the endgame
        self.gaps_only = False
        # Outside a swarm (a store that is no node): the chunks live nodes of the fleet claim now, which they
        # fetch from the Hub (a rollout): theirs to give soon, not gaps (the Hub sent a laptop's pull during a
        # rollout the chunks the fleet was fetching: 2.0 times the model in all, an explorer's trial)
        self.claimed_by_fleet: Callable[[], Collection[int]] | None = None
        self._coming: frozenset[int] = frozenset()
        self._coming_read = -math.inf
        self._coming_since: dict[int, float] = {}
        self._claim_gone: dict[int, float] = {}  # a chunk's claim seen go -> when
        self.rotation = random.randrange(1 << 30)  # where the Hub's scan starts: claims collide less

    def _holds(self, source: FileSource, index: int) -> bool:
        """Whether ``source`` holds chunk ``index``: it holds the whole file, its chunk map lists the chunk,
        or (a claimer) it settled it, unless it refused it since (its download was reset, say)."""
        have = self.have.get(source)
        if have is None or index in have:
            return True
        return index in self.announced.get(source, ()) and not self._refusal_stands(source, index)

    def _refusal_stands(self, source: FileSource, index: int) -> bool:
        """Whether ``source`` said it lacks chunk ``index``, and (in a swarm) the chunk's claim is still the one
        it was under then. A node that removed a model and pulls it again at once answers 404 for what it had
        settled of the copy that went; its fresh claims were taken for failed and fetched from the Hub again
        (1.26-1.97 times the model with four nodes: explorers' and a session's trials)."""
        if index not in self.refused.get(source, ()):
            return False
        if self.swarm is None:
            return True
        # (any claim of the chunk since, the refuser's own included, voids it: the latest revision seen, not the
        # claim standing now: one claimed, settled and released since had "no claim" again, a review)
        return self.swarm.claim_revision(index) == self.refused_under.get((source, index), 0)

    def _checkable(self, source: FileSource, index: int) -> bool:
        """Whether a copy of chunk ``index`` from ``source`` can be checked before it is written, where it
        must be: in a swarm, a chunk of a download in progress elsewhere is taken once its BLAKE3 is known
        (the source's digests, or its claimer's settlement). A holder's chunk map runs ahead of the
        registry (it lists a chunk as soon as it is written, the settlement follows), and a chunk
        written unchecked could only be caught by the whole file's SHA-256, failing the whole pull. A
        whole holder's bytes, and a partial holder's outside a swarm, are checked by that SHA-256 alone."""
        if self.swarm is None or source.kind == "hub" or source.chunk_blake3 is not None:
            return True
        if self.have.get(source) is None or self.swarm.digest(index) is not None:
            return True
        # While the registry cannot be read, no settlement shows: the holder's own digest of the chunk (in its
        # chunk map) is the word its settlement would give; without it, every claim's chunks went late and
        # came from the Hub, 2.4 times the model for four nodes through a 25 s etcd outage (an explorer's trial)
        return self.swarm.registry_silent() and index in self.map_digests.get(source, {})

    def _can_give(self, source: FileSource, index: int) -> bool:
        return self._holds(source, index) and self._checkable(source, index)

    def _patience(self, without: Collection[str] = (), peers_in_flight: bool = True) -> float:
        """Seconds another node's claim may stay unlanded, or a peer's request outstanding, before it is
        given up on: SWARM_PATIENCE, or more on a slow Hub or a busy fleet (three times this node's own time
        per Hub chunk, and its typical time per peer chunk; twice the age of its oldest Hub request in
        flight). The requests in flight to the sources ``without`` do not count: a source is judged by the
        others' pace, not its own (a trickling node's four requests outnumbered the one peer chunk landed,
        their own age set the patience at three times it, and they were never stuck: every node of a swarm
        waited on it for ever)."""
        now, patience = time.monotonic(), SWARM_PATIENCE
        for source, (spent, landed) in self.timing.items():
            if source.kind == "hub" and landed:
                patience = max(patience, ENDGAME_FACTOR * spent / landed)
        peer_ages = []
        for requests in self.requests.values():
            for request in requests:
                if request.source.kind == "hub":
                    patience = max(patience, 2 * (now - request.started))
                elif peers_in_flight and not request.landing and request.source.source.name not in without:
                    peer_ages.append(now - request.started)
        if self.peer_times or peer_ages:
            # The typical peer chunk, the requests in flight counted at their age so far: when every peer
            # is slow (a busy fleet, or this node's own narrow link), none is "stuck"; one that stalls while
            # the others answer is. Before any peer chunk lands too: a node on 20 Mbit, asking three holders
            # for twelve 16 MiB chunks at once (80 s each), judged them all stuck at 20 s and had the Hub
            # send a quarter of the model (the fleet benchmark's late node)
            patience = max(patience, ENDGAME_FACTOR * statistics.median([*self.peer_times, *peer_ages]))
        return patience

    def _origin_blocked(self, index: int, now: float, endgame: bool, following: bool = True) -> bool:
        """In a swarm, whether the Hub must not be asked for chunk ``index`` now: a live peer that can give
        it holds it (unless they are judged slow), or another live node's claim on it stands (or,
        ``following``, this node follows the others, nobody claims or holds the chunk, no live node that
        has not failed here settled it, and it is not the endgame). In the endgame the peers its requests wait for count as failed (it duplicates them
        only when no other peer can)."""
        assert self.swarm is not None
        failed = self._failed_for(index, now, self._patience())
        if endgame:
            failed.update(r.source.source.name for r in self.requests.get(index, []))
        patience = self._patience(without=failed)
        held = any(
            s.kind != "hub" and s.source.name not in failed and self._can_give(s, index) for s in self.live
        )
        if held and not self.peers_slow and not self._trial_open():
            return True
        if self.swarm.standing_claim(index, failed, patience) is not None:
            return True
        # Following waits for another node to claim the chunk; nobody will claim one the slow holders hold,
        # nor, in the endgame, one in flight here (every follower had asked a trickling holder for its four
        # last chunks, and each waited the swarm's patience after the claimers stopped, 10 s, in a test; the
        # Hub still takes such a chunk only after _pick's wait: twice the patience, unless peers are slow),
        # nor one settled already by nodes that failed here (a liar, banned) or left: each was its one claimer
        # (a liar's chunks waited 10 s in half the runs of a fleet test). A live settler's, not: its
        # holdings are published a moment after its claims go, and the Hub sent it again meanwhile (a CI run)
        if (not following or endgame or held or index in self.swarm.claims
                or self.swarm.settlers_lost(index, failed)):  # fmt: skip
            return False
        # Whether the others' claims stood still long enough is judged by the pace of what lands, not by this
        # node's requests to them in flight: a trickling holder's four, at their age, set the patience at
        # three times it, and its followers waited 20 s for the Hub, until it was judged stuck (a fleet test)
        return not self.swarm.may_claim_fresh(self._patience(peers_in_flight=False))

    def _held_by_peers(self, index: int) -> bool:
        return any(s.kind != "hub" and self._holds(s, index) for s in self.live)

    def _trial_open(self) -> bool:
        """Whether the Hub, on trial, may take a chunk the peers hold now: none of its requests is in flight
        (its trial is one request at a time: it measures the Hub's pace, it does not race the peers)."""
        return self.hub_on_trial and not any(
            r.source.kind == "hub" for requests in self.requests.values() for r in requests
        )

    def _failed_for(self, index: int, now: float, patience: float) -> set[str]:
        """The sources that cannot give chunk ``index`` now (a claim of theirs no longer counts): its copy
        from them failed its digest, or they said they lack it; they were dropped or are banned; or they are stuck (a request to
        them has been outstanding STUCK_FACTOR times the patience: a peer that stalls or trickles)."""
        failed = self.bad.get(index, set()) | set(self.errors)
        failed.update(s.source.name for s in self.refused if self._refusal_stands(s, index))  # lack it now
        failed.update(s.source.name for s in self.live if self._is_banned(s, now))
        failed.update(self._stuck(now, patience))
        return failed

    def _stuck(self, now: float, patience: float) -> set[str]:
        """The peers with a request outstanding STUCK_FACTOR times the patience, each judged by the others'
        pace (``patience`` is what the caller waits for, its own requests' ages in it; a source's own stuck
        requests are no yardstick for it). The same for every chunk: kept for the ``now`` of a pick, which
        asks it of each chunk (a pick over 640 chunks took 3 times as long, judged afresh per chunk)."""
        if self._stuck_seen is not None and self._stuck_seen[:2] == (now, patience):
            return self._stuck_seen[2]
        oldest: dict[str, float] = {}
        for requests in self.requests.values():
            for r in requests:
                if r.source.kind != "hub" and not r.landing:
                    name = r.source.source.name
                    oldest[name] = min(oldest.get(name, r.started), r.started)
        stuck = {name for name, started in oldest.items()
                 if now - started >= STUCK_FACTOR * min(patience, self._patience(without=(name,)))}  # fmt: skip
        self._stuck_seen = (now, patience, stuck)
        return stuck

    @staticmethod
    def _banned_until(source: FileSource) -> float:
        """Until when (monotonic) ``source`` gets no chunk (BANNED_NODES, LEFT_OUT: in every download of the
        process)."""
        name = source.source.name
        until = BANNED_NODES.get(name, 0.0)
        if LEFT_OUT:
            with _LEAVING_OUT:
                until = max(until, *LEFT_OUT.get(name, {}).values(), 0.0)
        return until

    def _is_banned(self, source: FileSource, now: float) -> bool:
        return self._banned_until(source) > now

    def _may_take(self, source: FileSource, index: int, now: float, endgame: bool = False) -> bool:
        """Whether ``source`` may be asked for chunk ``index``: it holds it; it did not fail its digest
        (unless every live holder did, and tries are left); it is not banned (unless no live holder that
        is not banned has the chunk: one source alone is asked again)."""
        if not self._can_give(source, index):
            return False
        failed_by = self.bad.get(index)
        if failed_by and source.source.name in failed_by:
            holders = {s.source.name for s in self.live if self._can_give(s, index)}
            if not holders <= failed_by or self.attempts.get(index, 0) >= MAX_CHUNK_ATTEMPTS:
                return False
        if self._is_banned(source, now):
            return not any(
                s is not source and not self._is_banned(s, now) and self._can_give(s, index)
                for s in self.live
            )
        if self.swarm is not None and source.kind == "hub":
            return not self._origin_blocked(index, now, endgame)
        if (
            self.gaps_only
            and source.kind == "hub"
            and not endgame
            and not self.peers_slow
            and not self._trial_open()
        ):
            return not self._coming_to_holders(index, now) and not any(
                s.kind != "hub" and self._holds(s, index) and not self._is_banned(s, now) for s in self.live
            )
        return True

    def _coming_to_holders(self, index: int, now: float) -> bool:
        """Outside a swarm: whether a live node of the fleet claims chunk ``index`` (it fetches it from the
        Hub now), and has not held it longer than a stuck claim would (a claimer that stalls is not waited
        for the whole pull)."""
        if self.claimed_by_fleet is None:
            return False
        if now - self._coming_read >= COMING_READ_EVERY:
            self._coming, self._coming_read = frozenset(self.claimed_by_fleet()), now
            for chunk in [
                i for i in self._coming_since if i not in self._coming and i not in self._claim_gone
            ]:
                self._claim_gone[chunk] = now
        if index not in self._coming:
            # A claim released as its chunk landed at its node, whose chunk map here is older: still coming
            # until that map is read again (the Hub was asked for it in the meantime)
            went = self._claim_gone.get(index)
            return went is not None and now - went < CLAIM_GONE_GRACE
        since = self._coming_since.setdefault(index, now)
        return now - since < STUCK_FACTOR * self._patience()

    def _pick(self, source: FileSource) -> tuple[int | None, float | None]:
        """The chunk ``source`` fetches next: among those nobody has or fetches, the one the fewest live
        sources hold (rarest first; ties: the lowest). When it may take none of those (the endgame: every
        chunk left is in flight, or it holds only chunks in flight), the one outstanding longest that it may take, unless it has two requests already, once it has
        been outstanding long enough (ENDGAME_WAIT, and ENDGAME_FACTOR times this source's time per chunk:
        a healthy pull fetches every chunk once). With no chunk, the seconds until the endgame may take
        one (None: only a change will tell)."""
        done, chunks, now = self.partial.done, self.partial.chunks, time.monotonic()
        while self.low in done:  # below it every chunk is done: no scan from 0 per pick
            self.low += 1
        for index in sorted(self.partial.wanted):  # a reader waits for it (a range far into the file)
            if index not in done and index not in self.requests and self._may_take(source, index, now):
                return index, None
        partial_maps = [m for s in self.live if (m := self.have.get(s)) is not None]
        complete = len(self.live) - len(partial_maps)
        best, best_count = None, 0
        order: range | list[int] = range(self.low, chunks)
        if self.swarm is not None and source.kind == "hub" and chunks > self.low:
            start = self.low + self.rotation % (chunks - self.low)  # nodes start their Hub scans apart
            order = [*range(start, chunks), *range(self.low, start)]
        for index in order:
            if index in done or index in self.requests or not self._may_take(source, index, now):
                continue
            count = complete + sum(index in m for m in partial_maps)
            if best is None or count < best_count:
                best, best_count = index, count
                if not partial_maps:
                    break  # every source holds every chunk: the lowest is the rarest
        if best is not None:
            return best, None
        # The Hub held back for the peers' chunks (a swarm's, or the gaps' outside one): it duplicates a peer's
        # request only in the true endgame (all in flight), and then only for one stuck long (a gap filler
        # duplicated a slow holder's every request after 1 s and sent 31 of its 32 chunks: a review)
        origin_held_back = source.kind == "hub" and (
            self.swarm is not None or (self.gaps_only and not self.peers_slow)
        )
        if origin_held_back and any(
            i not in done and i not in self.requests for i in range(self.low, chunks)
        ):
            return None, None
        outstanding = [
            (reqs[0].started, index)
            for index, reqs in self.requests.items()
            if index not in done and len(reqs) < ENDGAME_COPIES
            and not any(r.landing or r.source == source for r in reqs)
            and self._may_take(source, index, now, endgame=True)
        ]  # fmt: skip
        if not outstanding:
            return None, None
        started, index = min(outstanding)
        spent, landed = self.timing.get(source, (0.0, 0))
        patience = max(ENDGAME_WAIT, ENDGAME_FACTOR * spent / landed) if landed else ENDGAME_WAIT
        if origin_held_back and not self.peers_slow and not self._trial_open():
            # a chunk from the Hub again is what the swarm saves: only for a peer stuck that long (unless
            # the peers are slow as a whole: then their chunks in flight are the Hub's as any endgame's),
            # judged by the others' pace (see _stuck)
            asked = {r.source.source.name for r in self.requests[index]}
            patience = max(patience, STUCK_FACTOR * self._patience(without=asked))
        if now - started >= patience:
            return index, None
        return None, started + patience - now

    def _work_left(self) -> bool:
        return len(self.partial.done) < self.partial.chunks

    def _claimed_elsewhere(self) -> bool:
        """In a swarm, whether a chunk left is kept from the Hub by the swarm (claimed by another live node,
        or left to the nodes this one follows): it will come from them, or be free once they stop."""
        if self.swarm is None:  # (a store that is no node: the chunks the fleet's nodes fetch now)
            now = time.monotonic()
            return any(index not in self.partial.done and self._coming_to_holders(index, now)
                       for index in range(self.low, self.partial.chunks))  # fmt: skip
        now = time.monotonic()
        # With no Hub left to this node, a chunk nobody claims comes from nowhere: only a claim that stands
        # (its claimer may land it) or a holder is worth waiting for, not the others' stopping
        hub_left = self.fallback is not None or any(s.kind == "hub" for s in self.live)
        return any(
            index not in self.partial.done
            and self._origin_blocked(index, now, endgame=False, following=hub_left)
            for index in range(self.low, self.partial.chunks)
        )


def left_out(name: str, seconds: float) -> Callable[[], None]:
    """No chunk is asked of ``name`` for ``seconds`` (in any download of this process), as of a node suspected
    of a file's lie: not named a liar. Returns what lifts this leave-out (its suspect cleared), and it alone."""
    token = next(_LEAVE_OUT_TOKENS)
    now = time.monotonic()
    with _LEAVING_OUT:
        for other in list(LEFT_OUT):  # (ones never lifted, their pulls failed: gone once over)
            LEFT_OUT[other] = {t: until for t, until in LEFT_OUT[other].items() if until > now}
            if not LEFT_OUT[other]:
                del LEFT_OUT[other]
        LEFT_OUT.setdefault(name, {})[token] = now + seconds

    def let_back() -> None:
        with _LEAVING_OUT:
            mine = LEFT_OUT.get(name)
            if mine is not None:
                mine.pop(token, None)
                if not mine:
                    del LEFT_OUT[name]

    return let_back


def banned(source: FileSource) -> bool:
    """Whether ``source`` is banned now as a liar (LIARS): not asked for new files. (A ban for one chunk that
    failed its check, a blip maybe, leaves it a source of last resort: air-gapped, it may be the only one.)"""
    return LIARS.get(source.source.name, 0.0) > time.monotonic()


def is_silent(request: ChunkRequest, now: float) -> bool:
    """Whether ``request``'s attempt has asked its server for SILENT_PEER seconds without an answer (its status
    line: the body may then wait on this pull's own rate cap). Not a request waiting for a slot or a thread of
    this pull's (a healthy peer was dropped for the queue of a pull of many files: a review), nor one between
    attempts."""
    attempt = request.receiving.attempt
    return (
        attempt is not None
        and attempt.began > 0
        and attempt.activity < attempt.began
        and now - attempt.began >= SILENT_PEER
    )


def refused_by_the_fleet() -> bool:
    """Whether the fleet's nodes refuse this process (its MODELDEPOT_TOKEN is not theirs). Its claims in a
    swarm would then hold the others up for chunks they cannot take from it, and it would take theirs over as
    void, since it cannot read them either: a node with a wrong token made two good ones fetch 1.4 times a
    file from the Hub between them (an explorer's trial)."""
    return FLEET_REFUSES[0]


def token_refused(answers: Sequence[bool | None]) -> bool | None:
    """What a look at a few peers says of this node's token (each answer True: the peer took it, False: it
    refused it, None: it could not say): taken by one, not refused (False); refused by every one asked, or by
    two, and taken by none, refused (True: a good node that asked the odd one and a busy one was taken for the
    odd one, and pulled alone, a CI run); else nothing (None)."""
    if any(answers):
        return False
    refusals = list(answers).count(False)
    return True if refusals and refusals >= min(2, len(answers)) else None


def judge_token(answers: Sequence[bool | None]) -> None:
    """Take a look at a few peers into the process's verdict (:func:`token_refused`; one that says nothing
    leaves it)."""
    if (verdict := token_refused(answers)) is not None:
        FLEET_REFUSES[0] = verdict
