"""How the other nodes a download comes from are doing: slow ones let the upstream in for the rest, silent ones
are dropped, and a node's own narrow link is told from slow peers by trying the upstream for one chunk.

The download job (transfer/download.py) extends :class:`PaceWatch` with the fetching; what it records as
chunks land (``paces``, ``peer_landed``, ``peer_started``) is judged here, every ``PACE_TICK``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from typing import TYPE_CHECKING

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

__all__ = ["PaceWatch", "mib"]

# (the download's own logger: its lines are one file's story, and what users grep for)
log = logging.getLogger("modeldepot.transfer.download")

PACE_TICK = 0.5  # seconds between looks at the pace of the other nodes a file comes from
PACE_MIN = 3.0  # seconds a peer request is outstanding, at least, before its pace is judged slow
# Seconds a look at the peers may come late before this process is taken to have stood still (SIGSTOP, a
# paused container, a stalled VM): what it measured meanwhile is its own silence, not its peers'
STOOD_STILL = 2.0
SLOW_LEFT = 5.0  # ... and only while more is left than the slow pace would bring in these seconds
# ... and only while the Hub's requests of the file bring at least this many times the peers' each (when the
# Hub sent any of it lately): below, the node's own link binds, and the Hub would bring no more
HUB_FASTER = 2.0
TRIAL_SECONDS = 4.0  # a trial request to the upstream runs so long on the wire, at least, before it is judged
RETRY_TRIAL = (
    60.0  # seconds after a trial found this node's own link binding before the upstream is tried again
)
# The trial brings the upstream in when the transfer receives at least this many times as much with it as
# before it: a new connection takes its share of a narrow link from the others (a 20 Mbit node's trial
# brought 0.95 MiB/s where each peer's request brought 0.14: judged per request, the peers were "slow")
TRIAL_GAIN = 1.5
LINK_SAMPLES = 64  # samples of what the transfer received, one a PACE_TICK (32 s)
PACES_KEPT = 256  # chunks received whose pace is kept, at most (a window's worth, and more)


class PaceWatch(ChunkChooser):
    """The pace and silence of a download's other nodes, judged; the download job provides the rest."""

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
        self.compared = ""  # the paces the last verdict compared, for its log line
        self.received = 0  # bytes its requests that ended received (landed or not)
        # (when, bytes the transfer's files received so far), every PACE_TICK: the trial's yardstick
        self.link: collections.deque[tuple[float, int]] = collections.deque(maxlen=LINK_SAMPLES)
        self.trial_asked = 0.0  # when the upstream was last tried
        self.trial_ended: float | None = None  # when the trial's request ended (landed, or cut)
        self.judge_from = 0.0
        self.peer_landed: collections.deque[tuple[float, int]] = (
            collections.deque()
        )  # (when, bytes) from them
        # Each chunk received whole: (when it came in, from the Hub, bytes received, seconds on the wire)
        self.paces: collections.deque[tuple[float, bool, int, float]] = collections.deque(maxlen=PACES_KEPT)

    def _pulse(self) -> None:
        raise NotImplementedError

    async def _start(self, sources: list[FileSource]) -> None:
        raise NotImplementedError

    def _drop(self, source: FileSource, error: Exception) -> None:
        raise NotImplementedError

    async def _watch_pace(self) -> None:
        """Other nodes that send the file slower than ``slow_peer_rate`` all together (one capped with
        --max-upload-rate, one behind a slow link) do not hold the pull to their pace: the upstream joins
        for the rest (outside a swarm, the fallback is asked now; in one, the Hub may take the chunks they
        hold). The endgame then takes their chunks in flight from it too, if they stay slow. Unless this
        node's own link is what binds (:meth:`_judge_peers`)."""
        self.looked["pace"] = time.monotonic()
        while self._work_left() and not self.peers_slow:
            await asyncio.sleep(PACE_TICK)
            now = time.monotonic()
            self.link.append((now, sum(job.bytes_in() for job in list(self.limits.files))))
            if self._stood_still("pace", now):
                continue
            verdict = self._judge_peers(now)
            if verdict == "try":
                await self._try_upstream()
            elif verdict in ("bound", "bound elsewhere"):
                await self._end_trial(now, say=verdict == "bound")
            elif verdict == "slow":
                self.peers_slow = True
                # (whole holders only: a swarm's claimers sent little yet because they hold little, not slowly)
                self.limits.slow_peers.update(
                    s.source.name for s in self.live if s.kind != "hub" and self.have.get(s) is None
                )
                log.info("%s: the other nodes send it at less than %s/s%s: the upstream joins for the rest",
                         self.remote.path, mib(self.limits.slow_peer_rate),
                         f" ({self.compared})" if self.compared else "")  # fmt: skip
                if self.fallback is not None:
                    extra, self.fallback = self.fallback(), None
                    await self._start(extra)
                self._pulse()

    async def _try_upstream(self) -> None:
        """The upstream is tried for one chunk (held back from every other: ``gaps_only`` outside a swarm, the
        swarm's own rules in one), for its pace to be compared with the other nodes'."""
        log.debug("%s: the other nodes send it at less than %s/s: the upstream is tried for a chunk",
                  self.remote.path, mib(self.limits.slow_peer_rate))  # fmt: skip
        self.trial_wanted, self.trial_asked, self.trial_ended = True, time.monotonic(), None
        if self.fallback is not None and self.swarm is None:
            extra, self.fallback = self.fallback(), None
            self.gaps_only = True
            await self._start(extra)
        self._pulse()

    async def _end_trial(self, now: float, say: bool) -> None:
        """This node's own link binds: the upstream's trial request is stopped (its part is kept for the other
        nodes to complete; in a swarm its claim goes too), and no other file of the transfer tries the
        upstream for RETRY_TRIAL seconds."""
        if say:
            self.limits.link_bound_until = now + RETRY_TRIAL
            log.info("%s: the other nodes send it at less than %s/s, but a request to the upstream brings "
                     "no more than one to them (%s): this node's own link binds (the upstream is not brought in)",
                     self.remote.path, mib(self.limits.slow_peer_rate), self.compared)  # fmt: skip
        trial, self.trial, self.trial_wanted = self.trial, None, False
        if trial is None:
            return
        index, request = trial
        if request.task is not None and not request.landing and not request.task.done():
            request.task.cancel()
            if self.swarm is not None:
                await self.swarm.withdraw({index} - self.partial.done.keys())
        self._pulse()

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
        STOOD_STILL late), or did lately. The pace is then measured afresh, and the requests in flight get
        SILENT_PEER to answer from now."""
        last, self.looked[look] = self.looked.get(look, now), now
        if now - last > PACE_TICK + STOOD_STILL:
            if now >= self.judge_from:  # (said once, though both looks see it)
                log.info("%s: this process stood still for %.0f s (stopped, paused?): the other nodes are "
                         "judged again from now", self.remote.path, now - last)  # fmt: skip
            self.judge_from = now + SILENT_PEER
            self.peer_started = now if self.peer_started is not None else None
            self.peer_landed.clear()
            self.paces.clear()  # (the requests' times spanned the stop too)
        return now < self.judge_from

    def _judge_peers(self, now: float) -> str:
        """Whether the other nodes send this file slower than ``slow_peer_rate`` allows its share of it (its
        requests to them among every request on the wire to them, this transfer's files together), over
        the last window (at least PACE_MIN, and long enough for two chunks to land at that rate), while
        enough is left to matter and an upstream may be brought in; or at once, when another file of the
        transfer found every node it has slow. ``"slow"`` then, unless each request to the upstream brings
        less than HUB_FASTER times what one to them brings: this node's own link (or its cores) binds, which
        the upstream's requests would share (``"bound"``: on 200 Mbit links, four nodes pulling together had
        the Hub send 1.0-1.6 times the model with healthy peers judged slow against the fixed rate; a node
        on 20 Mbit among them had it send 0.2 times the model for nothing, an explorer's trials). With no
        pace of the upstream's lately (a whole holder keeps it from every chunk), it is tried for one
        (``"try"``) and judged once that request has run TRIAL_SECONDS. ``"fine"`` otherwise."""
        rate = self.limits.slow_peer_rate
        if self.fallback is None and not any(s.kind == "hub" for s in self.live):
            return "fine"  # (no upstream to bring in: offline, or the upstream is the one being waited for)
        if now < self.limits.link_bound_until:  # (another file of the transfer tried the upstream just now)
            return "bound elsewhere" if self.trial is not None or self.trial_wanted else "fine"
        size, chunk = self.remote.size, self.partial.chunk_size
        left = sum(chunk_span(i, size, chunk)[1] for i in range(self.low, self.partial.chunks)
                   if i not in self.partial.done)  # fmt: skip
        if left < rate * SLOW_LEFT:
            return "fine"  # (a little left: the endgame's business)
        peers = {s.source.name for s in self.live if s.kind != "hub"}
        if peers and peers <= self.limits.slow_peers:
            return "slow"  # (another file of the transfer measured them: its verdict holds for this one)
        mine = sum(
            1 for reqs in self.requests.values() for r in reqs if r.source.kind != "hub" and not r.landing
        )
        if not mine or self.peer_started is None:
            return "fine"
        sharing = max(self.limits.peer_requests, mine)
        # Two chunks' time at that rate, at least: bytes count when a whole chunk lands, and with one chunk
        # per window a peer at 1-2x the rate could land none in one (a trial saw it judged slow at 1.25x)
        window = max(PACE_MIN, 2 * min(chunk, size) * sharing / rate)
        if now - self.peer_started < window:
            return "fine"
        while self.peer_landed and self.peer_landed[0][0] < now - window:
            self.peer_landed.popleft()
        if sum(n for _, n in self.peer_landed) >= rate * window * mine / sharing:
            return "fine"
        if self.trial_wanted or self._trial_runs(now):
            return "fine"  # (judged once the trial has run long enough)
        gain = self._trial_gain(now)
        if gain is not None:
            return "slow" if gain >= TRIAL_GAIN else "bound"
        paces = self._paces(now, now - window)
        if paces is None:
            return "try"
        hub, peers_pace = paces
        self.compared = (
            f"each request to the upstream brought {mib(int(hub))}/s, each to them {mib(int(peers_pace))}/s"
        )
        if not peers_pace or hub >= HUB_FASTER * peers_pace:
            return "slow"
        return "bound" if self.trial is not None else "fine"

    def bytes_in(self) -> int:
        """The bytes this file's requests received so far, those in flight included (landed or not: what came
        over the link)."""
        return self.received + sum(
            max(0, r.receiving.count - r.receiving.in_place)
            for reqs in self.requests.values() for r in reqs if not r.counted
        )  # fmt: skip

    def _count_in(self, request: ChunkRequest) -> None:
        """``request`` ended (landed, failed or stopped): its bytes go to :attr:`received`."""
        if not request.counted:
            request.counted = True
            self.received += max(0, request.receiving.count - request.receiving.in_place)

    def _link_rate(self, start: float, end: float) -> float | None:
        """Bytes a second the transfer received between ``start`` and ``end``, by its samples (None: they
        span less than a second)."""
        inside = [(when, count) for when, count in self.link if start <= when <= end]
        if len(inside) < 2 or inside[-1][0] - inside[0][0] < 1.0:
            return None
        return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])

    def _trial_gain(self, now: float) -> float | None:
        """How many times as much the transfer received a second while the upstream's trial ran (from its
        second second on the wire: a new connection's first is its slow start) as in the TRIAL_SECONDS before
        it was asked for; None without a trial, or with too few samples (one that landed within a second:
        the paces per request judge then)."""
        if self.trial is None:
            return None
        _, request = self.trial
        before = self._link_rate(self.trial_asked - TRIAL_SECONDS, self.trial_asked)
        during = self._link_rate(request.started + 1.0, self.trial_ended or now)
        if before is None or during is None:
            return None
        self.compared = f"the transfer received {mib(int(before))}/s before it, {mib(int(during))}/s with it"
        return during / before if before else math.inf

    def _trial_runs(self, now: float) -> bool:
        """Whether the upstream's trial request is on its way and has not run TRIAL_SECONDS on the wire yet.
        (One that ended without landing, refused or cut, is forgotten: the upstream is tried again.)"""
        if self.trial is None:
            return False
        index, request = self.trial
        if request.landing or request.counted:
            self.trial_ended = self.trial_ended or now
        if request.landing:
            return False
        if request not in self.requests.get(index, ()):
            if now - request.started < 1.0 + 1.0:  # (it never got going: refused, another node's claim)
                self.trial = None
            return False
        attempt = request.receiving.attempt
        return attempt is None or attempt.began <= 0 or now - request.started < TRIAL_SECONDS

    def _paces(self, now: float, since: float) -> tuple[float, float] | None:
        """What each request to the upstream, and each to the other nodes, brought a second since ``since``
        (the chunks landed, and the requests on the wire so far: a peer that trickles lands nothing in the
        window); None when the upstream sent nothing of the file in that time."""
        hub, peers = [0, 0.0], [0, 0.0]  # bytes, seconds
        for when, from_hub, received, took in self.paces:
            if when >= since:
                pace = hub if from_hub else peers
                pace[0] += received
                pace[1] += took
        for request in (r for reqs in self.requests.values() for r in reqs if not r.landing):
            if (attempt := request.receiving.attempt) is not None and attempt.began > 0:
                pace = hub if request.source.kind == "hub" else peers
                pace[0] += max(0, request.receiving.count - request.receiving.in_place)
                pace[1] += max(0.0, now - request.started)
        if not hub[1]:
            return None
        return hub[0] / hub[1], (peers[0] / peers[1] if peers[1] else 0.0)


def mib(rate: int) -> str:
    return f"{rate / 2**20:g} MiB"
