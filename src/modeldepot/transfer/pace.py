"""How a download judges the other nodes it takes a file from: too slow (the upstream joins for what they
hold), or silent (dropped), apart from the fetching (transfer/download.py) and the choices
(transfer/choosing.py).

Peers that send a file slower than ``Limits.slow_peer_rate`` all together (one capped with
--max-upload-rate, one behind a slow link) do not hold the pull to their pace: the upstream joins for the
rest. But a node's own narrow link makes every peer look slow too, and then the Hub would only share that
link: so the Hub's pace is the yardstick. While the Hub sends some of the file, its requests must bring
``HUB_FASTER`` times the peers' each; when it sends none (whole holders keep it from every chunk), it is
*tried*: let in for the chunks they hold, one request at a time (one file of a transfer at a time), until
its requests were on the wire ``PACE_MIN``. A Hub no faster here keeps out (its trial's request stopped:
a chunk's only request keeps its bytes for the peer that sends the rest), and for ``OWN_LINK_MEMORY`` no file of the transfer
judges its peers slow; a faster one joins.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import logging
import time
from typing import TYPE_CHECKING, Literal

from modeldepot.errors import UpstreamTimeoutError
from modeldepot.hashing import chunk_span
from modeldepot.store.partials import ResumablePartial
from modeldepot.transfer.choosing import ChunkChooser, ChunkRequest, FileSource, is_silent
from modeldepot.transfer.sources import SILENT_PEER

if TYPE_CHECKING:
    from collections.abc import Callable

    from modeldepot.hub.manifest import RemoteFile
    from modeldepot.transfer.download import Limits
    from modeldepot.transfer.swarm import SwarmFile

log = logging.getLogger("modeldepot.transfer.download")  # (one logger for a download's story)

PACE_TICK = 0.5  # seconds between looks at the pace of the other nodes a file comes from
PACE_MIN = 3.0  # seconds a peer request is outstanding, at least, before its pace is judged slow
# Seconds a look at the peers may come late before this process is taken to have stood still (SIGSTOP, a
# paused container, a stalled VM): what it measured meanwhile is its own silence, not its peers'
STOOD_STILL = 2.0
SLOW_LEFT = 5.0  # ... and only while more is left than the slow pace would bring in these seconds
# ... and only while the Hub's requests of the file bring at least this many times the peers' each (when the
# Hub sent any of it lately): below, the node's own link binds, and the Hub would bring no more
HUB_FASTER = 2.0
PACES_KEPT = 256  # chunks received whose pace is kept, at most (a window's worth, and more)
# ... and, for a Hub on trial, only when the transfer receives at least this many times what it did before the
# trial: a Hub that only takes a share of a narrow link brings nothing (a new request's first seconds on a
# shaped link took twice its share, and healthy holders were judged slow: the fleet benchmark's late node)
TRIAL_GAIN = 1.25
RECEIVED_KEPT = 240  # looks at what the transfer received, at most (two minutes' worth)
# Seconds after its own link was found to bind (its claims given up, or the Hub tried and found no faster)
# that a node judges no peer slow
OWN_LINK_MEMORY = 60.0

Verdict = Literal["fine", "slow", "try"]


class PaceWatch(ChunkChooser, abc.ABC):
    """A download's watch over its peers' pace and silence. :class:`~modeldepot.transfer.download` 's job
    extends it with the fetching; it sets what is measured here (``paces``, ``peer_landed``,
    ``peer_started``) as chunks come in."""

    limits: Limits
    remote: RemoteFile
    fallback: Callable[[], list[FileSource]] | None

    def __init__(self, partial: ResumablePartial, swarm: SwarmFile | None) -> None:
        super().__init__(partial, swarm)
        self.peer_started: float | None = None  # when its first request to another node went on the wire
        # When each look at the peers (pace, silence) last ran, and until when none judges them: this process
        # stood still between two (a node resumed after a SIGSTOP judged every peer slow or silent at once, and
        # had the Hub send what they held, an explorer's trial)
        self.looked: dict[str, float] = {}
        self.judge_from = 0.0
        self.peer_landed: collections.deque[tuple[float, int]] = (
            collections.deque()
        )  # (when, bytes) from them
        # Each chunk received whole: (when it came in, from the Hub, bytes received, seconds on the wire)
        self.paces: collections.deque[tuple[float, bool, int, float]] = collections.deque(maxlen=PACES_KEPT)
        self.trial_at: float | None = None  # when the Hub was let in for the peers' chunks, to be judged
        self.trial_moved = 0.0  # when a request of the Hub's on trial was last seen in flight
        self.no_trial_until = 0.0  # (a trial that could take no chunk: not again before then)
        self.ended_bytes = 0  # what its requests that ended (landed or not) received over the network
        # What the transfer had received, every file from every source, at each look: (when, bytes)
        self.received: collections.deque[tuple[float, int]] = collections.deque(maxlen=RECEIVED_KEPT)

    def bytes_received(self) -> int:
        """What this file's requests received over the network so far, from every source."""
        in_flight = (r.receiving for requests in self.requests.values() for r in requests)
        return self.ended_bytes + sum(got.fetched for got in in_flight)

    def _request_ended(self, request: ChunkRequest) -> None:
        """``request`` is no longer in flight: what it received counts in :meth:`bytes_received`, and, during
        a trial, a Hub request's time on the wire that ended without landing (an endgame copy the peer's beat)
        in its pace: left out, a trial whose copies were cancelled saw its Hub's requests on the wire for less
        than they were, and ran past PACE_MIN (a review). Not outside a trial: there any Hub pace is the
        yardstick at once, and a cancelled copy's first second, a burst on a shaped link, would judge healthy
        peers slow for a window (a review)."""
        received = request.receiving.fetched
        self.ended_bytes += received
        if (
            self.trial_at is not None
            and request.source.kind == "hub"
            and not request.landing
            and on_the_wire(request)
        ):
            now = time.monotonic()
            self.paces.append((now, True, received, max(0.0, now - request.started)))

    @abc.abstractmethod
    async def _start(self, sources: list[FileSource]) -> None:
        """Sources join the download."""

    @abc.abstractmethod
    def _pulse(self) -> None:
        """Wake the workers: something changed."""

    @abc.abstractmethod
    def _drop(self, source: FileSource, error: Exception) -> None:
        """No longer ask ``source`` for this file."""

    @abc.abstractmethod
    def _stop_requests(self, requests: list[tuple[int, ChunkRequest]]) -> None:
        """Stop ``requests`` in flight (chunk, request), their parts kept where they can be (in a swarm,
        their claims withdrawn)."""

    async def _watch_pace(self) -> None:
        """Other nodes that send the file slower than ``slow_peer_rate`` all together do not hold the pull to
        their pace: the upstream joins for the rest (outside a swarm, the fallback is asked now; in one, the
        Hub may take the chunks they hold), once a trial of it showed it faster (see the module). The
        endgame then takes their chunks in flight from it too, if they stay slow."""
        self.looked["pace"] = time.monotonic()
        try:
            while self._work_left() and not self.peers_slow:
                await asyncio.sleep(PACE_TICK)
                now = time.monotonic()
                if self._stood_still("pace", now):
                    continue
                self.received.append((now, self.limits.received()))
                verdict = self._judge_peers(now)
                if verdict == "try":
                    await self._try_hub(now)
                    continue
                if verdict == "fine":
                    continue
                self.peers_slow = True
                # (whole holders only: a swarm's claimers sent little yet because they hold little, not slowly)
                self.limits.slow_peers.update(
                    s.source.name for s in self.live if s.kind != "hub" and self.have.get(s) is None
                )
                log.info("%s: the other nodes send it at less than %s/s: the upstream joins for the rest",
                         self.remote.path, mib(self.limits.slow_peer_rate))  # fmt: skip
                if self.fallback is not None:
                    extra, self.fallback = self.fallback(), None
                    await self._start(extra)
                self._pulse()
        finally:
            self._end_trial()  # (the file is done, or failed: another file of the transfer may try)

    async def _try_hub(self, now: float) -> None:
        """Let the Hub in for chunks the peers hold, one request at a time (:attr:`hub_on_trial`; with none
        free, an endgame copy of one in flight), until its requests have been on the wire PACE_MIN: its pace
        judges theirs. Outside a swarm the upstream joins for that as a gap filler (it takes none they hold
        but its trial's)."""
        self.trial_at = self.trial_moved = now
        self.hub_on_trial = True
        self.limits.trial_by = self
        log.info("%s: the other nodes send it at less than %s/s: the upstream is tried (is it faster here?)",
                 self.remote.path, mib(self.limits.slow_peer_rate))  # fmt: skip
        if self.fallback is not None:
            extra, self.fallback = self.fallback(), None
            self.gaps_only = True
            await self._start(extra)
        self._pulse()

    def _end_trial(self, stop: bool = False) -> None:
        """The trial is over (judged, or given up): the Hub takes no more of the peers' chunks for it. ``stop``:
        its requests in flight are stopped too, their parts kept where they can be (the Hub was no faster, or
        what it measured spanned a stop of this process)."""
        if self.trial_at is None:
            return
        self.trial_at, self.hub_on_trial = None, False
        if self.limits.trial_by is self:
            self.limits.trial_by = None
        if stop:
            self._stop_requests(
                [(i, r) for i, reqs in self.requests.items() for r in reqs if r.trial and not r.landing]
            )

    async def _drop_silent_peers(self) -> None:
        """A fleet peer that has not answered a request SILENT_PEER seconds after it was asked (frozen, or
        advertised at an address that accepts and never answers) is dropped for this file and its requests
        are cancelled: its claims no longer keep the Hub from their chunks, and no worker goes back to it for
        the next chunk (each waited as long: a swarm paid SILENT_PEER per chunk the node had claimed)."""
        self.looked["silence"] = time.monotonic()
        while self._work_left():
            await asyncio.sleep(PACE_TICK)
            now = time.monotonic()
            if self._stood_still("silence", now):
                continue
            silent = {r.source for reqs in self.requests.values() for r in reqs
                      if r.source.kind == "peer" and not r.landing and is_silent(r, now)}  # fmt: skip
            for source in silent:
                self._drop(source, UpstreamTimeoutError(
                    f"did not answer in {SILENT_PEER:g} s (frozen, or not reachable at the address it gave?)",
                    source=source.source.base_url))  # fmt: skip
                for request in [r for reqs in self.requests.values() for r in reqs if r.source is source]:
                    if request.task is not None and not request.landing:
                        request.task.cancel()
            if silent:
                self._pulse()

    def _stood_still(self, look: str, now: float) -> bool:
        """Whether ``look`` must not judge the peers now: this process stood still since its last run (it came
        STOOD_STILL late), or did lately. The pace is then measured afresh (a trial under way is stopped: its
        request's time spans the stop), and the requests in flight get SILENT_PEER to answer from now."""
        last, self.looked[look] = self.looked.get(look, now), now
        if now - last > PACE_TICK + STOOD_STILL:
            if now >= self.judge_from:  # (said once, though both looks see it)
                log.info("%s: this process stood still for %.0f s (stopped, paused?): the other nodes are "
                         "judged again from now", self.remote.path, now - last)  # fmt: skip
            self.judge_from = now + SILENT_PEER
            self.peer_started = now if self.peer_started is not None else None
            self.peer_landed.clear()
            self.paces.clear()  # (the requests' times spanned the stop too)
            self.received.clear()
            self._end_trial(stop=True)
        return now < self.judge_from

    def _own_link_binds(self, now: float) -> bool:
        """Whether this node found its own link to bind lately (OWN_LINK_MEMORY): it gave its swarm claims up
        (its Hub requests landed far behind the fleet's), or a trial found the Hub no faster than its peers.
        Without Hub requests of its own since, nothing would tell its narrow link from slow peers (a review).
        (Not for ever: a Hub hiccup must not leave it to a holder that is throttled later.)"""
        found = [self.limits.link_bound_at, None if self.swarm is None else self.swarm.gave_up_at]
        return any(at is not None and now - at < OWN_LINK_MEMORY for at in found)

    def _judge_peers(self, now: float) -> Verdict:
        """Whether the other nodes send this file too slowly ("slow"), or not ("fine"), or the Hub must be
        tried first ("try"). Slow: slower than ``slow_peer_rate`` allows its share of it (its requests to them
        among every request on the wire to them, this transfer's files together) over the last window, at
        least PACE_MIN and long enough for two chunks to land at that rate, while enough is left to matter
        and an upstream may be brought in; and the Hub faster here (:meth:`_hub_faster`). Or at once, when
        another file of the transfer found every node it has slow."""
        rate = self.limits.slow_peer_rate
        upstream = self.fallback is not None or any(s.kind == "hub" for s in self.live)
        if not upstream or self._own_link_binds(now):
            # (no upstream to bring in: offline, or the upstream is the one being waited for; or this node's own
            # link binds, found by another file's trial, or by its claims given up)
            self._end_trial(stop=upstream)
            return "fine"
        size, chunk = self.remote.size, self.partial.chunk_size
        # Its requests on the wire to them (not those waiting for this pull's slots: their share of the rate
        # is among the requests on the wire, and they have no pace yet, a review)
        mine = sum(
            1 for reqs in self.requests.values() for r in reqs
            if r.source.kind != "hub" and not r.landing and on_the_wire(r)
        )  # fmt: skip
        sharing = max(self.limits.peer_requests, mine, 1)
        # Two chunks' time at that rate, at least: bytes count when a whole chunk lands, and with one chunk
        # per window a peer at 1-2x the rate could land none in one (a trial saw it judged slow at 1.25x)
        window = max(PACE_MIN, 2 * min(chunk, size) * sharing / rate)
        if self.trial_at is not None:
            return self._hub_faster(now, now - window, window)  # (a trial under way ends with a verdict)
        left = sum(chunk_span(i, size, chunk)[1] for i in range(self.low, self.partial.chunks)
                   if i not in self.partial.done)  # fmt: skip
        if left < rate * SLOW_LEFT:
            return "fine"  # (a little left: the endgame's business)
        peers = {s.source.name for s in self.live if s.kind != "hub"}
        if peers and peers <= self.limits.slow_peers:
            return "slow"  # (another file of the transfer measured them: its verdict holds for this one)
        if not mine or self.peer_started is None:
            return "fine"
        if now - self.peer_started < window:
            return "fine"
        while self.peer_landed and self.peer_landed[0][0] < now - window:
            self.peer_landed.popleft()
        if sum(n for _, n in self.peer_landed) >= rate * window * mine / sharing:
            return "fine"
        return self._hub_faster(now, now - window, window)

    def _hub_faster(self, now: float, since: float, window: float) -> Verdict:
        """Peers slow by the fixed rate: whether the Hub's requests of this file, since ``since`` (or since its
        trial), bring at least HUB_FASTER times what the peers' bring, each ("slow": the peers are). Below,
        what binds is this node's own link (or its cores), which the Hub's requests share: bringing the Hub in
        for the peers' chunks would only have it send more (on 200 Mbit links, four nodes pulling together had
        the Hub send 1.0-1.6 times the model with healthy peers judged slow against the fixed rate, 1.00-1.05
        without; a node on 20 Mbit among three whole holders, 0.21-0.23 times for nothing: explorers' and a
        session's trials). With no Hub pace yet, it is tried ("try"): see :meth:`_try_hub`."""
        if self.trial_at is not None:
            since = min(since, self.trial_at)
        hub, peers = self._paces(now, since)
        hub_rate = hub[0] / hub[1] if hub[1] else 0.0
        peer_rate = peers[0] / peers[1] if peers[1] else 0.0
        if self.trial_at is None:
            if not hub[1]:
                if (self._hub_in_flight() or now < self.no_trial_until or self.limits.trial_by is not None
                        or not self.received or now - self.received[0][0] < PACE_MIN + PACE_TICK):  # fmt: skip
                    # (its request waits for a slot; or it could take none lately; or another file of the
                    # transfer is trying it; or what the transfer received before is not known yet: a stop)
                    return "fine"
                return "try"
        # The trial goes on until the Hub's requests were on the wire PACE_MIN (a chunk that lands at once, a
        # burst, tells little), or brought what they would bring in it at twice the peers' pace; and until
        # the peers have a pace to compare (their requests may all wait for slots other files hold)
        elif not peers[1] or (
            hub[1] < PACE_MIN and (not hub[0] or hub[0] < HUB_FASTER * peer_rate * PACE_MIN)
        ):
            if self._hub_in_flight():
                self.trial_moved = now
            elif now - self.trial_moved >= window:
                # The Hub could take no chunk in a window (each has its two copies in flight, or is landing):
                # no verdict, and no trial for a window (the fixed rate alone judged healthy peers slow here)
                self._end_trial()
                self.no_trial_until = now + window
            return "fine"
        faster = hub_rate >= HUB_FASTER * peer_rate  # (peers with no pace: faster, but never in a trial)
        if self.trial_at is not None:
            gain = self._gain(now, self.trial_at)
            if gain is None:
                return "fine"  # (too few looks before or since: the trial goes on)
            faster = faster and gain >= TRIAL_GAIN
            if not faster:
                self.limits.link_bound_at = now
                log.info("%s: the upstream sends no faster than the other nodes here (%s/s a request, theirs %s/s; "
                         "the transfer receives %.2f times what it did before): this node's own link binds, they "
                         "are not slow", self.remote.path, mib(int(hub_rate)), mib(int(peer_rate)), gain)  # fmt: skip
            self._end_trial(stop=not faster)
        return "slow" if faster else "fine"

    def _gain(self, now: float, since: float) -> float | None:
        """How many times what the transfer received before ``since`` (over as long as since, PACE_MIN at
        least) it receives since: bytes a second from every source, every file. A Hub that adds to what the
        peers send raises it; one that takes a share of a link the peers fill does not. (inf: nothing came
        before; None: too few looks to say.)"""
        span = max(PACE_MIN, now - since)
        before = [(t, n) for t, n in self.received if since - span - PACE_TICK <= t <= since]
        during = [(t, n) for t, n in self.received if t >= since]
        if len(before) < 2 or len(during) < 2:
            return None
        rate_before = (before[-1][1] - before[0][1]) / max(before[-1][0] - before[0][0], 1e-6)
        rate_during = (during[-1][1] - during[0][1]) / max(during[-1][0] - during[0][0], 1e-6)
        return rate_during / rate_before if rate_before > 0 else float("inf")

    def _hub_in_flight(self) -> bool:
        return any(r.source.kind == "hub" for reqs in self.requests.values() for r in reqs)

    def _paces(self, now: float, since: float) -> tuple[tuple[int, float], tuple[int, float]]:
        """What the Hub's requests of this file brought since ``since``, and the peers': (bytes, seconds on the
        wire) each, the chunks landed since and the requests on the wire so far (a peer that trickles lands
        nothing in the window)."""
        hub, peers = [0, 0.0], [0, 0.0]
        for when, from_hub, received, took in self.paces:
            if when >= since:
                pace = hub if from_hub else peers
                pace[0] += received
                pace[1] += took
        for request in (r for reqs in self.requests.values() for r in reqs if not r.landing):
            if on_the_wire(request):
                pace = hub if request.source.kind == "hub" else peers
                pace[0] += request.receiving.fetched
                pace[1] += max(0.0, now - request.started)
        return (int(hub[0]), hub[1]), (int(peers[0]), peers[1])


def on_the_wire(request: ChunkRequest) -> bool:
    """Whether ``request`` is asking its server (not waiting for a slot or a thread of this pull's)."""
    attempt = request.receiving.attempt
    return attempt is not None and attempt.began > 0


def mib(rate: int) -> str:
    return f"{rate / (1 << 20):.1f} MiB"
