"""Downloading one file from one or more sources: chunk-aligned ranges in parallel, resumable, verified.

Workers, a few per source (``Limits.per_source``), take the chunk the scheduler chooses for their source
(transfer/choosing.py: rarest first, the endgame, the swarm's claims), fetch its range, check it against
the source's BLAKE3 for that chunk when there is one (a depot node's, or the claimer's in a swarm), and
write it at its offset in the claimed partial (store/partials.py), logging it. A fast source simply takes
more chunks than a slow one. A partial holder's chunk map is read when it joins and again (at most every
``REFRESH_SECONDS``) when it has nothing left to give; a chunk it turns out to lack (404
``ChunkNotAvailable``) goes back to the pool.

The endgame's first copy to land wins and the other request is cancelled, so a slow or stalled source
never holds the last chunk. A source whose chunk fails its digest gets no chunk for ``BAN_SECONDS`` (in
every download of this process) and its other requests go back to the pool. A source that keeps failing
(a stall past the read timeout, after retries) is dropped for this file; when no live source may be asked
for the chunks left, the fallback (the Hub) joins.

In a swarm (transfer/swarm.py) the Hub is a source from the start: this node claims each chunk in the
registry before fetching it from the Hub, and settles the claim with the chunk's BLAKE3 once landed;
claimers and the content's other holders join as sources as they appear.

Memory is bounded by the connection limit, not by the number of files: a request takes a buffer slot
(one of ``Limits.total``) and keeps it until its chunk has landed, so when landing falls behind the
network, requests wait instead of fetched chunks piling up.

The whole-file SHA-256 (and the git SHA-1 of small files) is computed in file order while chunks land,
reading each chunk back from the page cache through a mapping: no second pass over the disk. (The
bytes go to SHA-256 through a small buffer that stays in the CPU's cache: hashing.py says why.) A resumed chunk is hashed the same way. The result must equal what the upstream announced (LFS
SHA-256, or git oid); if not, the partial is reset and nothing is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import mmap
import os
import time
import traceback
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import blake3

from modeldepot.counters import PULLS
from modeldepot.errors import (
    AccessDeniedError,
    DepotError,
    IntegrityError,
    NotFoundError,
    StoreError,
    UpstreamError,
    UpstreamTimeoutError,
)
from modeldepot.hashing import BlobDigest, BlobHasher, chunk_span, digest_bytes
from modeldepot.hub.manifest import RemoteFile
from modeldepot.store.forking import ForkSafeExecutor
from modeldepot.store.partials import ResumablePartial
from modeldepot.transfer.choosing import (
    BANNED_NODES,
    LIARS,
    ChunkRequest,
    FileSource,
)
from modeldepot.transfer.notices import say_now_and_then
from modeldepot.transfer.outage import OUTAGE, OutageClock
from modeldepot.transfer.pace import PaceWatch, on_the_wire
from modeldepot.transfer.sources import ChunkUnavailableError, HttpSource, RangeIgnoredError, Receiving
from modeldepot.transfer.threads import to_thread_to_the_end

if TYPE_CHECKING:
    from modeldepot.transfer.session import LazySession
    from modeldepot.transfer.swarm import SwarmFile

__all__ = ["BAN_SECONDS", "LEFT_IN_PLACE", "FileSource", "Limits", "ban_liars", "download_file", "liars",
           "say_refused_once"]  # fmt: skip

log = logging.getLogger(__name__)

BAN_SECONDS = 30.0  # a source whose chunk failed its digest gets no chunk for so long (in this process)
MAX_BANNED = 256  # nodes the ban list holds before the expired bans are dropped
REFRESH_SECONDS = 2.0  # at most so often a partial holder's chunk map is read again
SWARM_TICK = 0.1  # seconds between reads of the fleet's view of the file's claims and holders
SWARM_IDLE = 0.5  # seconds an idle worker of a swarm waits at most before it looks again
PART_LOG_EVERY = 1.0  # seconds between two notes of how much of each chunk in flight is in the file
PART_LOG_MIN_BYTES = 1 << 20  # ... each once it has received this much more (the log stays small)
SWARM_JOIN_EVERY = 2.0  # seconds between two looks for the swarm of a file that began outside it
# Bytes the buffers of a process's reads aside (see _read_aside) may hold together: a mirror's many readers
# deep inside chunks do not each hold a chunk's worth of memory beside the transfers' own buffers
ASIDE_BYTES_MAX = 64 << 20
YIELD_PACE_AFTER = 1.0  # seconds a late claim's request is on the wire, at least, before its pace judges it
# A file of one chunk below this size is received into a buffer and hashed from a read, not through
# mappings: mapping and unmapping (a TLB shootdown on every core) cost more than copying a small file.
MAP_MIN_BYTES = 1024 * 1024
BytesDone = Callable[[int, str, str], None]  # (bytes, the source's kind, its base URL)
"""Told ``(bytes, kind)`` for each chunk written: ``kind`` is its source's (:attr:`FileSource.kind`), or
:data:`LEFT_IN_PLACE` for the part of it an earlier transfer left in the file."""
LEFT_IN_PLACE = "local"
BytesReceiving = Callable[[], int]
"""Tells the bytes received of chunks that have not landed yet (unchecked: a progress display's)."""


@dataclass
class Limits:
    """Limits shared by every file of a transfer: requests per source, and chunk buffers in total.

    A buffer slot is held from the start of a request until its chunk has landed (or been rejected), so
    at most ``total`` chunk buffers exist at once, and at most ``total`` requests are in flight.
    """

    per_source: int = 4
    total: int = 16
    # Other nodes sending a file slower than this, all together, let the upstream in for the rest (0: never)
    slow_peer_rate: int = 0
    peer_requests: int = field(default=0, init=False, repr=False)  # on the wire to other nodes, every file
    # Other nodes a file of this transfer found slow: its other files need not measure them again
    slow_peers: set[str] = field(default_factory=set, init=False, repr=False)
    # When a file of this transfer found the Hub no faster than the other nodes: this node's own link binds,
    # and its other files need not try the Hub again for a while (transfer/pace.py)
    link_bound_at: float | None = field(default=None, init=False, repr=False)
    trial_by: object | None = field(default=None, init=False, repr=False)  # the file trying the Hub now
    # The transfer's files downloading now, and what those that ended received: what it receives over the
    # network, every file from every source (a trial of the Hub is judged by it: transfer/pace.py)
    files: set[PaceWatch] = field(default_factory=set, init=False, repr=False)
    files_ended_bytes: int = field(default=0, init=False, repr=False)
    _buffers: asyncio.Semaphore | None = field(default=None, init=False, repr=False)
    _spare: list[bytearray] = field(default_factory=list, init=False, repr=False)  # buffers to reuse
    _sources: dict[str, asyncio.Semaphore] = field(default_factory=dict, init=False, repr=False)

    def received(self) -> int:
        """What the transfer received over the network so far, every file from every source."""
        return self.files_ended_bytes + sum(job.bytes_received() for job in self.files)

    def buffer_slot(self) -> asyncio.Semaphore:
        if self._buffers is None:
            self._buffers = asyncio.Semaphore(self.total)
        return self._buffers

    def take_buffer(self, size: int) -> bytearray:
        """A chunk buffer of at least ``size`` bytes: a spare one if there is one (allocating and zeroing
        16 MiB per chunk costs as much as a copy), else a new one. Under a buffer slot."""
        while self._spare:
            buffer = self._spare.pop()
            if len(buffer) >= size:
                return buffer
        return bytearray(size)

    def give_back(self, buffer: bytearray) -> None:
        """A buffer nothing reads any more (never one a cancelled landing's thread may still read)."""
        if len(self._spare) < self.total:
            self._spare.append(buffer)

    def source_slot(self, source: HttpSource) -> asyncio.Semaphore:
        return self._sources.setdefault(source.base_url, asyncio.Semaphore(self.per_source))


async def download_file(
    http: LazySession,
    remote: RemoteFile,
    partial: ResumablePartial,
    sources: list[FileSource],
    limits: Limits,
    fallback: Callable[[], list[FileSource]] | None = None,
    on_bytes: BytesDone | None = None,
    swarm: SwarmFile | None = None,
    on_start: Callable[[BytesReceiving, BytesReceiving], None] | None = None,
    swarm_later: Callable[[], Awaitable[SwarmFile | None]] | None = None,
    claimed: Callable[[], Collection[int]] | None = None,
) -> BlobDigest:
    """Complete ``partial`` with ``remote``'s bytes and return their digests, checked against upstream.

    ``fallback`` is asked once for more sources when every source given has failed (the chain's last
    resort, the Hub). ``on_bytes`` is called with the size of each chunk as it is written, its source's kind and base URL.
    ``swarm``: the file's claims in the fleet (the Hub is then among ``sources``, asked only for what no
    other node holds or claims). ``on_start`` is given, before the first request, what tells the bytes
    received of the chunks that have not landed (a chunk over a slow link takes seconds to be whole), and
    what tells how many of those an earlier pull left. ``swarm_later``, for a file that starts outside the
    fleet's swarm, is asked now and then for its swarm until it joins one (etcd came back, say); ``claimed``,
    for one outside it, tells the chunks the fleet's live nodes claim now (coming to them: not gaps).
    """
    if remote.size == 0:
        digest = digest_bytes(b"", partial.chunk_size)
        _check(remote, digest)
        return digest
    job = _FileJob(http, remote, partial, limits, fallback, on_bytes, swarm, swarm_later)
    job.claimed_by_fleet = claimed if swarm is None else None
    if on_start is not None:
        on_start(job.receiving, job.kept_earlier)
    return await job.run(sources)


# This node's own link down: no route to anywhere (a peer's server gone is ECONNREFUSED: not this)
_NO_ROUTE = frozenset({errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN})
UNANSWERED_LOOK = 1.0  # seconds between two looks for nodes dropped for no answer to ask again (an outage)
PARKED_AT_LEAST = 5.0  # seconds a peer dropped so stays out before bytes from elsewhere bring it back


def _no_route(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is a failure to route a packet out of this machine."""
    seen: BaseException | None = error
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, OSError) and seen.errno in _NO_ROUTE:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class _FileJob(PaceWatch):
    def __init__(self, http: LazySession, remote: RemoteFile, partial: ResumablePartial,
                 limits: Limits, fallback: Callable[[], list[FileSource]] | None,
                 on_bytes: BytesDone | None, swarm: SwarmFile | None = None,
                 swarm_later: Callable[[], Awaitable[SwarmFile | None]] | None = None) -> None:  # fmt: skip
        super().__init__(partial, swarm)
        self.http, self.remote, self.limits = http, remote, limits
        self.fallback, self.on_bytes = fallback, on_bytes
        self.tasks: set[asyncio.Task[Any]] = set()
        # Peers dropped for a failure of this node's own link (no route: a cable pulled, a switch down), asked
        # again once bytes come from anywhere: its pull dropped every peer for good and took the rest of the
        # model from the Hub, three peers holding it whole (an explorer's trial)
        self.parked: dict[FileSource, float] = {}  # -> when (monotonic) it may be asked again
        self.parked_for: dict[FileSource, float] = {}  # -> seconds it was last parked (doubled each time)
        # Nodes dropped for no answer at all (refused, reset, silent: restarting, or the network), asked again
        # while the pull, under an outage clock, hears nothing (-> when (monotonic) they may be; backing off):
        # its Hub's ranges waited the whole patience for an unreachable Hub, and the node, back after 10 s,
        # was never asked again (an explorer's trial, a node-only store behind a firewall)
        self.unanswered: dict[FileSource, float] = {}
        self.landing: set[int] = set()  # chunks being written
        self.counted: set[int] = set()  # chunks landed, told to on_bytes (on the loop)
        self.crediting: dict[int, int] = {}  # a chunk being told to on_bytes: its bytes not told yet
        # Chunks a request receives straight into the file's own pages: its request and the mapping.
        self.in_place: dict[int, tuple[ChunkRequest, mmap.mmap]] = {}
        # Who sent the bytes of the parts this transfer left in the file (chunk -> (kind, base URL, bytes,
        # source's name) in order): credited to them when the chunk lands, not counted as found on disk.
        self.part_origins: dict[int, list[tuple[str, str, int, str]]] = {}
        # The other nodes (not the Hub) that sent each landed chunk's bytes, by their names: when the whole
        # file fails its SHA-256, the chunks that were not the file's name who lied (liars)
        self.senders: dict[int, frozenset[str]] = {}
        # The parts an earlier pull left (chunk -> bytes), found on disk until their chunks land (or they are
        # fetched over): read as this job began, the partial's own parts change as this one adds to them
        self.earlier: dict[int, int] = {index: part.received for index, part in partial.parts.items()}
        self.workers: list[asyncio.Task[None]] = []
        self.refreshed: dict[FileSource, float] = {}  # when a partial holder's chunk map was last read
        self.refreshing: set[FileSource] = set()
        # Woken on every change (a chunk landed, a request ended, a source dropped). A waiter takes the
        # current event *before* it looks at the state, so a change between its look and its wait is
        # never lost (a Condition's lock acquisition could let one slip by).
        self._changed = asyncio.Event()
        self.failure: DepotError | None = None
        # Set with the first error a worker or the swarm's follower ended with, whenever it joined (those
        # that join on the way are not in the list run() is waiting on).
        self.crashed: asyncio.Future[None] | None = None
        self.whole_body = False
        self.small_digest: BlobDigest | None = None  # a small file's digests, computed as it landed
        self.swarm_later = swarm_later
        # Chunks this transfer landed with the Hub's bytes alone: what it may vouch for in a swarm it joins
        # (a chunk from a partial holder outside a swarm was never checked alone; one an earlier pull left
        # is of unknown origin: settled, the fleet would trust a liar's bytes, a review)
        self.from_hub: set[int] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def small(self) -> bool:
        """A config or tokenizer: one chunk, under MAP_MIN_BYTES."""
        return self.partial.chunks == 1 and self.remote.size < MAP_MIN_BYTES

    @property
    def in_flight(self) -> set[int]:
        return set(self.requests)

    def receiving(self) -> int:
        """Bytes received of the chunks that have not landed (the most of any one chunk's requests: the
        endgame's two copies are one chunk), as the loop saw them land (the partial's own set is written on a
        worker thread, before the chunk's bytes are counted done): the parts of chunks an earlier pull left
        included, from the start (:meth:`kept_earlier`: shown only as their chunks landed, a resume of a
        pull stopped at 39 of 64 MiB began at "0 B" and jumped to the end)."""
        in_flight = sum(
            max(request.receiving.count for request in requests)
            for index, requests in self.requests.items()
            if requests and index not in self.counted
        )
        # Parts no request is on yet: an earlier pull's, or this one's from a source it left since (they went,
        # then came back as the next request began from them: the progress fell back by them, a review)
        waiting = sum(
            part.received for index, part in tuple(self.partial.parts.items())
            if not self.requests.get(index) and index not in self.counted
        )  # fmt: skip
        return in_flight + waiting + sum(self.crediting.values())

    def kept_earlier(self) -> int:
        """Of :meth:`receiving`, the bytes of parts an earlier pull left: found, not fetched (no part of the
        rate: a resume's parts made one above --max-rate)."""
        kept = 0
        for index, received in tuple(self.earlier.items()):
            mapped = self.in_place.get(index)
            if index in self.counted or (mapped is not None and not mapped[0].receiving.in_place):
                continue  # (landed: counted resumed; or its range started over, the part fetched over)
            kept += received
        return kept

    async def run(self, sources: list[FileSource]) -> BlobDigest:
        self._loop = asyncio.get_running_loop()
        self.limits.files.add(self)
        crashed = self.crashed = self._loop.create_future()
        self.partial.on_wanted = self._wanted_soon
        self.partial.read_aside = self._read_aside
        hasher = asyncio.create_task(self._hash_in_order())
        follower = None
        if self.swarm is not None:
            follower = self._watch(asyncio.create_task(self._follow_swarm()))
        elif self.swarm_later is not None:
            follower = self._watch(asyncio.create_task(self._join_swarm_later(self.swarm_later)))
        pace = None
        if self.limits.slow_peer_rate and (self.fallback is not None or self.swarm is not None):
            pace = self._watch(asyncio.create_task(self._watch_pace()))
        silence = self._watch(asyncio.create_task(self._drop_silent_peers()))
        clock = OUTAGE.get()
        if clock is not None:
            self.tasks.add(self._watch(asyncio.create_task(self._ask_unanswered_in_outage(clock))))
        self.tasks.add(self._watch(asyncio.create_task(self._write_down_parts())))
        try:
            await self._start(sources)
            # Every source banned (a chunk of another file failed its check from it moments ago): the fallback
            # now, rather than the banned one as a last resort (a liar was asked again 4 s after its ban, for
            # every other file of the pull, an explorer's trial)
            if not self.live or (
                self.fallback is not None and all(self._is_banned(s, time.monotonic()) for s in self.live)
            ):
                await self._fall_back()
            while not hasher.done():
                await asyncio.wait([hasher, crashed, *self.workers], return_when=asyncio.FIRST_COMPLETED)
                if crashed.done():
                    crashed.result()  # a worker's unexpected error (a caller's callback that raised)
                self.workers = [w for w in self.workers if not w.done()]
                if self.failure is not None:
                    raise self.failure
                if not self.workers and self._work_left():
                    await self._fall_back()
            digest = hasher.result()
        finally:
            tasks: list[asyncio.Task[Any]] = [hasher, *self.workers, *self.tasks]
            tasks.extend(task for task in (follower, pace, silence) if task is not None)
            self.partial.on_wanted = None
            self.partial.read_aside = None
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.limits.files.discard(self)
            self.limits.files_ended_bytes += self.bytes_received()
            if crashed.done():
                crashed.exception()  # retrieved: raised above, or a second failure while cancelling
        try:
            _check(self.remote, digest)
        except IntegrityError as error:
            PULLS.reject_file()
            error.chunks_landed = {index: (self.senders.get(index, frozenset()), blake3_hex)
                                   for index, blake3_hex in self.partial.done.items()}  # fmt: skip
            await to_thread_to_the_end(self.partial.reset)
            raise
        return digest

    async def _start(self, sources: list[FileSource]) -> None:
        """Sources join: a partial holder once its chunk map is read (it serves only those chunks)."""
        for source in sources:
            self.have[source] = None if source.chunks_url is None else frozenset()
        self.live.extend(sources)
        await asyncio.gather(*(self._refresh(s) for s in sources if s.chunks_url is not None))
        self._spawn(sources)
        await self._fill_gaps()

    async def _fill_gaps(self) -> None:
        """Outside a swarm, when the other nodes hold parts of the file and some chunk left is held by none,
        the upstream joins now for those (it takes none they hold: :attr:`gaps_only`). It joined only once
        they had sent every chunk they held: a laptop pulling from a fleet whose node was half-way through the
        file took its half, then the Hub's, one after the other."""
        if self.fallback is None or self.swarm is not None or not self.live:
            return
        maps = [self.have.get(s) for s in self.live]
        held: set[int] = set()
        for chunks in maps:
            if chunks is None:
                return  # (a whole holder: it holds them all)
            held.update(chunks)
        done, now = self.partial.done, time.monotonic()
        if all(
            i in done or i in held or self._coming_to_holders(i, now)
            for i in range(self.low, self.partial.chunks)
        ):
            return
        extra, self.fallback = self.fallback(), None
        self.gaps_only = True
        log.info(
            "%s: the other nodes hold part of it: the upstream sends the rest meanwhile", self.remote.path
        )
        await self._start(extra)
        self._pulse()

    def _spawn(self, sources: list[FileSource]) -> None:
        # No more workers per source than chunks left: a source is never asked twice for one chunk (the
        # endgame asks another), so a config's extra workers would only wake and wait at every change.
        workers = max(1, min(self.limits.per_source, self.partial.chunks - len(self.partial.done)))
        for source in sources:
            if source in self.live:
                for _ in range(workers):
                    self.workers.append(self._watch(asyncio.create_task(self._work(source))))

    def _watch(self, task: asyncio.Task[None]) -> asyncio.Task[None]:
        def ended(task: asyncio.Task[None]) -> None:
            crashed = self.crashed
            if crashed is not None and not crashed.done() and not task.cancelled() and task.exception():
                crashed.set_exception(task.exception())  # type: ignore[arg-type]

        task.add_done_callback(ended)
        return task

    async def _fall_back(self) -> None:
        extra = self.fallback() if self.fallback is not None else []
        self.fallback = None
        if extra:
            await self._start(extra)
            if self.live:
                return
        reasons = "; ".join(f"{name}: {why}" for name, why in self.errors.items()) or "no source holds it"
        # The sources left without the chunks they were waited for failed because the others did: the
        # kind of failure is the others' (a Hub gone for the whole swarm is an outage, said as one)
        causes = {
            name: why for name, why in self.errors.items() if name not in self.left_without
        } or self.errors
        kinds = {type(error) for error in causes.values()}
        kind = kinds.pop() if len(kinds) == 1 else UpstreamError
        if kind is ChunkUnavailableError:
            kind = NotFoundError
        if not issubclass(kind, (NotFoundError, AccessDeniedError, IntegrityError, UpstreamTimeoutError)):
            kind = UpstreamError  # one cause everywhere (missing, refused, corrupt) is worth keeping
        failed = kind(f"{self.remote.path}: could not download it ({reasons})", path=self.remote.path)
        if isinstance(failed, UpstreamError):  # (no source answered at all: the network, say)
            failed.network = bool(causes) and all(
                isinstance(error, UpstreamError) and error.network for error in causes.values()
            )
        raise failed

    # -- choosing chunks --------------------------------------------------------------------------------

    def _wanted_soon(self, index: int) -> None:
        """(From any thread.) A reader came to wait for chunk ``index``: :meth:`_give_way_to` on the loop."""
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # (its loop closed: the download ended)
                self._loop.call_soon_threadsafe(self._give_way_to, index)

    def _give_way_to(self, index: int) -> None:
        """A reader waits for chunk ``index`` (a mirror's client reading a range far into the file): a free
        worker takes it next (:meth:`_pick`); with none free, the request in flight that received least, of a
        chunk nobody waits for, is stopped, its part kept for later, and its worker takes it. (Else the read
        waited for a chunk in flight to land, then for its own at a share of the link: 3.9 s of a capped
        link's 8 for the whole file, where its own chunk alone took 2 s.) Not in a swarm, where a stopped
        request's claim would stand for the fleet."""
        if index in self.partial.done or index in self.requests or not self.partial.wanted.get(index):
            return
        self._pulse()
        if self.swarm is not None or self.small:
            return
        now = time.monotonic()
        busy = [
            request for chunk, requests in self.requests.items() if chunk not in self.partial.wanted
            for request in requests
            if not request.landing and request.task is not None and not request.task.done()
            and self._may_take(request.source, index, now)
        ]  # fmt: skip
        working = sum(not worker.done() for worker in self.workers)
        if not busy or working > sum(len(requests) for requests in self.requests.values()):
            return  # (a worker is free: woken above)
        victim = min(busy, key=lambda request: request.receiving.count)
        assert victim.task is not None
        victim.task.cancel()

    def _read_aside(self, first: int, last: int) -> _ReadAside | None:
        """Bytes ``first..last`` of the file (within one chunk) in a ranged request of their own to a source
        that gives their chunk (the one asked for it now, first), unchecked: for a mirror's reader of a range
        that starts deep inside a chunk slow to land (:attr:`ResumablePartial.read_aside`). None when no
        source may be asked, or the process's reads aside hold :data:`ASIDE_BYTES_MAX` already."""
        if _ReadAside.held + (last - first + 1) > ASIDE_BYTES_MAX:
            return None
        index, now = first // self.partial.chunk_size, time.monotonic()
        asked = [
            request.source
            for request in self.requests.get(index, ())
            if not self._is_banned(request.source, now)
        ]
        fitting = asked or [source for source in self.live if self._may_take(source, index, now)]
        return _ReadAside(fitting[0], first, last, self.remote.size) if fitting else None

    def _pulse(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _work(self, source: FileSource) -> None:
        while self._work_left() and source in self.live:
            changed = self._changed
            index, wake = self._pick(source)
            if index is None and self.fallback is not None and self.swarm is None:
                await self._fill_gaps()  # (a holder dropped: the chunks only it held are nobody's now)
                index, wake = self._pick(source)
            if index is None:
                if not self.requests and not any(self._pick(s)[0] is not None for s in self.live):
                    if self._claimed_elsewhere():
                        await self._idle(source, changed, SWARM_TICK)  # another node fetches them
                        continue
                    # A look later, by the clock: a claim that blocked the Hub a moment ago may have lapsed
                    # since (or this node stopped following), and then there is work, not a lack of sources.
                    if any(self._pick(s)[0] is not None for s in self.live):
                        continue
                    if await self._rescue():
                        continue
                    return
                if self.swarm is not None:  # time alone voids claims and unblocks the Hub: look again soon
                    wake = SWARM_IDLE if wake is None else min(wake, SWARM_IDLE)
                await self._idle(source, changed, wake)
                continue
            # (the Hub's, of a chunk a peer holds, while it is on trial: stopped if it is found no faster)
            trial = source.kind == "hub" and self.trial_at is not None and self._held_by_peers(index)
            request = ChunkRequest(source, time.monotonic(), trial=trial)
            if self.swarm is not None:
                request.under = self.swarm.claim_revision(index)
            self.requests.setdefault(index, []).append(request)
            task = request.task = asyncio.create_task(self._request(source, index, request))
            self.tasks.add(task)
            try:
                await asyncio.wait([task])
            finally:
                task.cancel()  # the worker itself is cancelled: so is its request (a no-op once done)
                self.tasks.discard(task)
                requests = self.requests.get(index, [])
                if request in requests:
                    requests.remove(request)
                    self._request_ended(request)
                if not requests:
                    self.requests.pop(index, None)
                self._pulse()
            if not task.cancelled() and not task.result():
                return

    async def _follow_swarm(self) -> None:
        """Keep the swarm's view of the file current: new holders and claimers join as sources, and the
        chunks claimers settled count as held by them."""
        assert self.swarm is not None
        while self._work_left():
            changed = self.swarm.refresh()
            if (
                self.swarm.shares_lost()
            ):  # (claimed again, the chunks this node holds or fetches from the Hub)
                self._share_held()
            joining: list[FileSource] = []
            by_url = {s.source.base_url: s for s in self.live}
            gone = set(self.errors)
            announced = self.swarm.announced()
            for node_id, source in self.swarm.sources().items():
                live = by_url.get(source.source.base_url)
                if live is None and source.source.name not in gone:
                    joining.append(source)
                    live = source
                chunks = announced.get(node_id, frozenset())
                if live is not None and self.announced.get(live, frozenset()) != chunks:
                    self.announced[live] = chunks
                    changed = True
            if joining:
                await self._start(joining)
                changed = True
            changed = await self._yield_late_claims() or changed
            if changed:
                self._pulse()
            await asyncio.sleep(SWARM_TICK)

    async def _yield_late_claims(self) -> bool:
        """This node's claims that the others are about to take over (it lands chunks far slower than the
        swarm: its own narrow link) are given up when their request, on the wire, would not land before the
        others take them over at its pace so far: stopped, its part kept, and this node follows from then
        on: the others fetch them from the Hub at once and it takes them from them. Else it went on
        receiving each from the Hub while a taker fetched it again (a node on 20 Mbit among 200 Mbit ones
        had the Hub send 1.11-1.21 times the model in a rollout, an explorer's trial). True when some were
        given up."""
        assert self.swarm is not None
        now, given_up = time.monotonic(), set()
        for index, overdue_at in self.swarm.own_claims_late().items():
            requests = self.requests.get(index, [])
            if index in self.landing or any(r.landing for r in requests):
                continue  # (a copy is being written: it settles the claim)
            length = chunk_span(index, self.remote.size, self.partial.chunk_size)[1]
            for request in requests:
                task, attempt, count = request.task, request.receiving.attempt, request.receiving.count
                # (on the wire for a while: a request that waited for this node's own slots is no slow link,
                # and its pace is not known at once)
                if (request.source.kind != "hub" or task is None or task.done() or attempt is None
                        or attempt.began <= 0 or now - attempt.began < YIELD_PACE_AFTER):  # fmt: skip
                    continue
                rate = count / (now - attempt.began)
                if not rate or now + (length - count) / rate > overdue_at:
                    task.cancel()
                    given_up.add(index)
        if not given_up:
            return False
        if not self.swarm.follower:
            log.info("%s: this node lands its chunks from the Hub far slower than the fleet (its own link?): it "
                     "leaves them to the others and takes them from them", self.remote.path)  # fmt: skip
        # (for the whole transfer: its other files judged their peers slow a moment later, and had the Hub
        # send them the rest at this node's own pace, an explorer's trial)
        self.swarm.follower, self.swarm.gave_up_at = True, time.monotonic()
        self.limits.link_bound_at = self.swarm.gave_up_at
        for _ in given_up:
            self.swarm.count("claims_given_up")
        await self.swarm.withdraw(given_up)
        return True

    async def _join_swarm_later(self, find: Callable[[], Awaitable[SwarmFile | None]]) -> None:
        """A file that began outside the fleet's swarm (etcd was out of reach as the pull started, or this
        store's server was not in the fleet yet) joins it as soon as it can: what is left comes from the Hub
        once for the fleet, not once per node (an outage at the start of a fleet's pull cost the Hub a copy
        per node for the whole pull). The chunks this node landed from the Hub, or fetches from it, are
        claimed at once, so that the others take them from it (:meth:`_share_held`)."""
        while self._work_left():
            await asyncio.sleep(SWARM_JOIN_EVERY)
            swarm = await find()
            if swarm is None:
                continue
            log.info("%s: the fleet's swarm is in reach: its chunks are shared from now on", self.remote.path)
            self.swarm = swarm
            swarm.refresh()
            if self.fallback is not None:  # (in a swarm, the Hub is a source from the start)
                extra, self.fallback = self.fallback(), None
                await self._start(extra)
            self._share_held()
            self._pulse()
            await self._follow_swarm()
            return

    def _share_held(self) -> None:
        """Claim, in the background, the chunks this pull landed from the Hub (and settle them) or is fetching
        from it: the swarm takes them from this node rather than from the Hub. Only the Hub's: see
        ``from_hub``."""
        assert self.swarm is not None
        held = self._landed_from_hub()
        fetching = {
            index for index, requests in self.requests.items()
            if index not in self.partial.done
            and any(r.source.kind == "hub" and not r.receiving.in_place for r in requests)
        }  # fmt: skip
        self.swarm.unclaimed &= {*held, *fetching}  # (the others: neither held nor fetched here any more)
        if held or fetching:
            task = self._watch(
                asyncio.create_task(self.swarm.claim_held(held, fetching, self._landed_from_hub))
            )
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def _stop_requests(self, requests: list[tuple[int, ChunkRequest]]) -> None:
        stopped = set()
        for index, request in requests:
            if request.task is None or request.task.done() or request.landing:
                continue
            # In a swarm, only a request on the wire (claimed: stopped while it claims, its claim would be
            # made and stand), and not while another copy of its chunk is being written (it settles the claim)
            if self.swarm is not None and (
                not on_the_wire(request)
                or index in self.landing
                or any(r.landing for r in self.requests.get(index, []))
            ):
                continue
            request.task.cancel()  # (its part is kept, when it was the chunk's one request: _fetch_chunk)
            stopped.add(index)
        if stopped and self.swarm is not None:
            withdrawing = self._watch(asyncio.create_task(self.swarm.withdraw(stopped)))
            self.tasks.add(withdrawing)
            withdrawing.add_done_callback(self.tasks.discard)
        if stopped:
            self._pulse()

    def _landed_from_hub(self) -> dict[int, str]:
        return {index: digest for index, digest in self.partial.done.items() if index in self.from_hub}

    async def _rescue(self) -> bool:
        """Nothing is in flight and no live source may be asked for any chunk left: the fallback joins
        (the live sources stay for what they hold). True when the work may go on."""
        left = [i for i in range(self.low, self.partial.chunks) if i not in self.partial.done]
        failed = [i for i in left if self.bad.get(i)]
        if failed:  # the remaining chunks failed their digest from every source that holds them
            bad = IntegrityError(f"chunks kept failing their BLAKE3 check ({failed[:5]})")
            for stuck in list(self.live):
                self._drop(stuck, bad)  # the fallback (the Hub) may still have good bytes
        if self.fallback is not None:
            extra, self.fallback = self.fallback(), None
            await self._start(extra)
            self._pulse()
            return True
        # (each source left is told it holds none of them: "node X: no source left holds chunks [0, 1, 2]"
        # read as the node's fault, when the Hub had failed and the nodes waited on each other's claims)
        shown = f"{left[:5]}"[:-1] + (", …]" if len(left) > 5 else "]")
        missing = NotFoundError(f"holds none of the chunks left ({shown}), and no source that does is left")
        for stuck in list(self.live):
            self.left_without.add(stuck.source.name)
            self._drop(stuck, missing)
        self._pulse()
        return False

    async def _idle(self, source: FileSource, changed: asyncio.Event, wake: float | None) -> None:
        """Nothing for ``source`` now: a partial holder reads its chunk map again (at most every
        REFRESH_SECONDS); otherwise wait for a change, or for its ban, its next refresh or the endgame
        (``wake`` seconds) to come due."""
        now = time.monotonic()
        timeout: float | None = wake
        if source.chunks_url is not None:
            due = self.refreshed.get(source, 0.0) + REFRESH_SECONDS
            if due <= now and source not in self.refreshing:
                await self._refresh(source)
                return
            timeout = max(due - now, 0.05) if timeout is None else min(timeout, max(due - now, 0.05))
        until = self._banned_until(source)
        if until > now:
            timeout = until - now if timeout is None else min(timeout, until - now)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), timeout)

    async def _refresh(self, source: FileSource) -> None:
        """Read a partial holder's chunk map; a holder that cannot say is dropped for this file, one that
        holds none of it now (404: a claimer between its download and its publishing) holds nothing."""
        assert source.chunks_url is not None
        self.refreshing.add(source)
        self.refreshed[source] = time.monotonic()
        try:
            held, digests = await source.source.chunk_map(
                source.chunks_url, self.remote.size, self.partial.chunk_size,
                with_digests=self.swarm is not None and self.swarm.registry_silent(),
            )  # fmt: skip
        except NotFoundError:
            self.have[source] = frozenset()
        except DepotError as error:
            self._drop(source, error)
        else:
            self.map_digests[source] = digests
            refused = {i for i in self.refused.get(source, ()) if self._refusal_stands(source, i)}
            if held is None and refused:
                held = frozenset(range(self.partial.chunks))
            self.have[source] = None if held is None else held - refused
        finally:
            self.refreshing.discard(source)
            self._pulse()

    async def _request(self, source: FileSource, index: int, request: ChunkRequest) -> bool:
        """Fetch and land one chunk; False when the worker should stop."""
        # A chunk is claimed before it is fetched from the Hub. The endgame's second request for it gives
        # up on the peer the first one waits for: that peer's claim on it no longer counts (it is taken
        # over, by one node of the fleet only); another node's claim still does.
        if self.swarm is not None and source.kind == "hub":
            patience = self._patience()
            failed = self._failed_for(index, time.monotonic(), patience)
            failed.update(r.source.source.name for r in self.requests.get(index, []) if r is not request)
            if not await self.swarm.claim(index, failed, patience):
                return True  # another node fetches it from the Hub: it comes from there
            if len(self.requests.get(index, [])) > 1:
                self.swarm.count("hub_endgame")  # a second copy, racing a peer's
        try:
            await self._fetch_chunk(source, index, request)
            if self.swarm is not None and source.kind == "hub":
                self.swarm.count("hub_chunks")
        except RangeIgnoredError:
            if self.whole_body:
                return False  # another worker of this source already streams the whole file
            request.landing = True
            await self._stream_whole(source, index)
        except ChunkUnavailableError:  # a partial holder lacks it: others may have it, it keeps the rest
            self._lacks(source, index, request)
        except StoreError as error:  # our disk, not the source: the file cannot go on
            self._fail(error)
            return False
        except NotFoundError as error:
            if self.swarm is None or source.kind == "hub":
                self._drop(source, error)
            else:
                # A node of the swarm that holds no copy now (it removed the file and pulls it again: what it
                # settled of the copy that went is in the view a moment longer): that chunk is not its, but
                # its fresh claims stand (dropped for the file, its claims were taken for void and fetched from
                # the Hub again: 1.26-1.52 times the model with four nodes, an explorer's trial)
                log.info("%s: %s holds no copy of it now (404): chunk %d is asked elsewhere",
                         self.remote.path, source.source.name, index)  # fmt: skip
                self._lacks(source, index, request)
        except DepotError as error:
            self._drop(source, error)
        return True

    def _lacks(self, source: FileSource, index: int, request: ChunkRequest) -> None:
        """``source`` said it does not hold chunk ``index`` (asked by ``request``): others may, it keeps the
        rest."""
        self.refused.setdefault(source, set()).add(index)
        self.refused_under[(source, index)] = request.under
        have = self.have.get(source)
        self.have[source] = frozenset(range(self.partial.chunks) if have is None else have) - {index}

    async def _fetch_chunk(self, source: FileSource, index: int, request: ChunkRequest) -> None:
        offset, length = chunk_span(index, self.remote.size, self.partial.chunk_size)
        # The source slot comes first so that a worker waiting for a busy source holds no buffer slot
        # that another source could use. The source slot ends with the request; the buffer slot only once
        # the chunk has landed, since landing (on threads) can fall behind the network.
        buffers = self.limits.buffer_slot()
        # A small file's request waits on the round trip, not on bandwidth: a source's limit on ranges in
        # flight would leave the link idle (300 configs over a 20 ms round trip, 4 at a time, took longer
        # than snapshot_download's 8 threads). They are bounded by the buffer slots (the transfer's total).
        per_source = contextlib.nullcontext() if self.small else self.limits.source_slot(source.source)
        async with per_source:
            await buffers.acquire()
            request.started = time.monotonic()  # on the wire now: the endgame measures from here
            to_peer = source.kind != "hub"
            if to_peer and self.peer_started is None:
                self.peer_started = request.started
            mapping: mmap.mmap | None = None
            try:
                self.limits.peer_requests += to_peer  # (undone in the finally, however this ends)
                mapping = self._map_in_place(index, request)
                if mapping is not None and (part := self.partial.parts.get(index)) is not None:
                    # What a transfer that stopped left in these pages: only the rest is asked for (checked
                    # with it when the chunk is whole)
                    request.receiving.kept = request.receiving.in_place = part.received
                    request.part_blake3 = part.blake3
                buffer: bytearray | None = None
                if mapping is None:  # a small file gets its own small buffer, not a pooled chunk-sized one
                    buffer = (
                        bytearray(length) if self.small else self.limits.take_buffer(self.partial.chunk_size)
                    )
                data = await source.source.fetch(
                    source.url, offset, offset + length - 1, self.remote.size,
                    buffer if mapping is None else mapping, request.receiving, source.kind,
                )  # fmt: skip
            except BaseException as error:
                buffers.release()
                self._done_in_place(index, request)
                if mapping is not None:
                    if index not in self.landing and index not in self.partial.done:
                        # (a Ctrl-C, a source that failed: what came is in the file's pages, for the next one)
                        self._keep_part(source, index, request)
                    _let_go_of(error)
                    _close_mapping(mapping)
                raise
            finally:
                self.limits.peer_requests -= to_peer
        request.landing = True
        spent, landed = self.timing.get(source, (0.0, 0))
        took = time.monotonic() - request.started
        self.timing[source] = (spent + took, landed + 1)
        if source.kind != "hub":
            self.peer_times.append(took)
        received = length - request.receiving.in_place
        self.paces.append((request.started + took, source.kind == "hub", received, took))
        try:
            await self._land(source, index, data, request, in_place=mapping is not None)
            try:
                data.release()
            except BufferError:
                pass  # a view of it is still held somewhere: it is not reused
            else:
                if buffer is not None and len(buffer) >= self.partial.chunk_size:
                    self.limits.give_back(buffer)  # landed: no thread reads it any more
        except BaseException as error:
            if mapping is not None:
                _let_go_of(error)
                with contextlib.suppress(BufferError):
                    data.release()
            raise
        finally:
            buffers.release()
            if mapping is not None:
                self._done_in_place(index, request)
                # Unmapping 16 MiB of written pages takes ~2 ms (0.23 s of a 2 GiB pull's event loop): on a
                # thread of its own, not waited for, and never queued ahead of the shared pool's writes.
                UNMAPPER.submit(_close_mapping, mapping)

    def _keep_part(self, source: FileSource, index: int, request: ChunkRequest) -> None:
        """Log what ``request`` (stopped) received into chunk ``index``'s pages for the next request, with
        the BLAKE3 its sender gave for the chunk; a banned source's bytes (it lied) are not kept."""
        receiving = request.receiving
        new = receiving.count - receiving.in_place  # (in_place: 0 once a retry started the chunk over)
        if new <= 0:
            return  # the part it began from stands as logged
        if self._is_banned(source, time.monotonic()):
            self.part_origins.pop(index, None)
            self.earlier.pop(index, None)
            self.partial.forget_part(index)
            return
        earlier = request.part_blake3 if receiving.in_place else None
        if not receiving.in_place:
            self.part_origins.pop(index, None)  # (a part before it, if any, was fetched over)
            self.earlier.pop(index, None)
        self.part_origins.setdefault(index, []).append(
            (source.kind, source.source.base_url, new, source.source.name)
        )
        self.partial.log_part(index, receiving.count, self._expected(source, index) or earlier)

    async def _write_down_parts(self) -> None:
        """Now and then, log how much of each chunk in flight is in the file's pages, as a stop does
        (:meth:`_keep_part`): a SIGKILL (the OOM killer, a preempted machine) then loses the last seconds
        of each, not all of it (five pulls killed after 2 s each kept 2 of the 150 MiB they received: an
        explorer's trial). The pages outlive the process; a power loss voids the parts (their boot id)."""
        logged: dict[int, tuple[ChunkRequest, int]] = {}  # chunk -> (the request, the bytes logged of it)
        while self._work_left():
            await asyncio.sleep(PART_LOG_EVERY)
            now = time.monotonic()
            for index, (request, _) in tuple(self.in_place.items()):
                received = request.receiving.count
                before = logged.get(index)
                # (another request, or this one's range started over: counted from its own start)
                since = (
                    before[1] if before is not None and before[0] is request and before[1] <= received else 0
                )
                if (request.landing or index in self.landing or index in self.partial.done
                        or received - since < PART_LOG_MIN_BYTES
                        or self._is_banned(request.source, now)):  # fmt: skip
                    continue  # (a banned source's bytes are not kept: it lied, see _keep_part)
                logged[index] = (request, received)
                part = request.part_blake3 if request.receiving.in_place else None
                self.partial.log_part(index, received, self._expected(request.source, index) or part)

    def _expected(self, source: FileSource, index: int) -> str | None:
        """The BLAKE3 chunk ``index`` from ``source`` must have: the source's own, or (a node without
        digests, in a swarm) the one its claimer settled from the Hub; None for the Hub's bytes."""
        if source.chunk_blake3 and not (source.own_word and self.swarm is not None):
            return source.chunk_blake3[index]
        if self.swarm is not None and source.kind != "hub":
            settled = self.swarm.digest(index)
            if settled is not None:
                return settled
            if source.chunk_blake3:
                return source.chunk_blake3[index]  # (its own word, when no claimer settled the chunk yet)
            return self.map_digests.get(source, {}).get(index)  # (its chunk map's: the same word)
        return None

    def _on_map_word(self, source: FileSource, index: int) -> bool:
        """Whether chunk ``index`` from ``source`` was checked against the holder's chunk-map digest alone
        (no settlement known, no digests of its own given with the source)."""
        return (
            self.swarm is not None
            and source.kind != "hub"
            and not source.chunk_blake3
            and self.swarm.digest(index) is None
            and index in self.map_digests.get(source, {})
        )

    def _map_in_place(self, index: int, request: ChunkRequest) -> mmap.mmap | None:
        """The chunk's own pages in the file for ``request`` to receive into, unless another request (the
        endgame's other copy) writes there or the chunk is landing: then None, and a buffer is used."""
        if index in self.in_place or index in self.landing or index in self.partial.done:
            return None
        if self.small:
            return None
        mapping = self.partial.map_chunk(index)
        if mapping is not None:
            self.in_place[index] = (request, mapping)
            self.partial.receiving[index] = lambda: request.receiving.count
        return mapping

    def _done_in_place(self, index: int, request: ChunkRequest) -> None:
        """``request`` no longer receives into chunk ``index``'s pages (its mapping is closed apart)."""
        if self.in_place.get(index, (None,))[0] is request:
            del self.in_place[index]
            self.partial.receiving.pop(index, None)

    async def _stop_in_place_writer(self, index: int, request: ChunkRequest | None) -> None:
        """Before a copy from a buffer goes into the file: the request receiving into the chunk's own pages
        (the endgame's other copy) is cancelled, and awaited until its reader thread has let go."""
        while (owner := self.in_place.get(index)) is not None and owner[0] is not request:
            task = owner[0].task
            if task is None or task.done() or owner[0].landing:
                break  # (landing: its bytes are all in, its reader is done)
            task.cancel()
            await asyncio.wait([task])

    async def _land(self, source: FileSource, index: int, data: memoryview, request: ChunkRequest | None = None,
                    in_place: bool = False) -> None:  # fmt: skip
        """Check a fetched chunk against the source's digest, then write and log it (once: an endgame's
        second copy is dropped), and cancel the other request for it. ``in_place``: ``data`` is the chunk's
        own pages in the file (nothing to write, only to log)."""
        vouched = bool(source.chunk_blake3) and source.vouches  # (see FileSource.vouches)
        expected = self._expected(source, index)
        part = request.receiving.in_place if request is not None and in_place else 0
        if expected is None and part and request is not None:
            # A part a node sent (then cut, dropped, or a Ctrl-C) completed by a source that gives no
            # digest: checked against the node's, or its bytes would reach the file's SHA-256 unchecked
            # (which throws every chunk away).
            expected = request.part_blake3
        if self.small and not in_place and index not in self.partial.done and index not in self.landing:
            # A config's whole life on one worker-thread trip (its BLAKE3, the write, its SHA-256 from the
            # same bytes while they are in the cache) instead of three: 300 files made 900 trips.
            self.landing.add(index)
            try:
                digest, whole = await to_thread_to_the_end(self._write_small, data, expected, vouched)
            finally:
                self.landing.discard(index)
            if whole is not None:
                self.small_digest = whole
                self._landed(source, index, len(data))
                if self.swarm is not None:
                    await self.swarm.settle(index, digest, vouched=not self._on_map_word(source, index))
                return
        else:
            digest = await asyncio.to_thread(_blake3, data)
        if expected is not None and digest != expected and part:
            # The part an earlier transfer left is what failed, maybe (written before a crash, say, or by a
            # node that lied): the chunk is fetched whole, and the source is not blamed for it.
            log.info("%s: chunk %d, completed from a part kept in the file, failed its check: fetching it "
                     "whole", self.remote.path, index)  # fmt: skip
            self.part_origins.pop(index, None)
            self.earlier.pop(index, None)
            self.partial.forget_part(index)
            return
        if expected is not None and digest != expected:
            # (said once per ban: the chunks it had in flight, for this file and others, fail too)
            said = log.debug if self._is_banned(source, time.monotonic()) else log.warning
            said("%s: chunk %d from %s failed its BLAKE3 check: not asking it for %g s", self.remote.path,
                 index, source.source.name, BAN_SECONDS)  # fmt: skip
            self.bad.setdefault(index, set()).add(source.source.name)
            PULLS.reject_chunk()
            self.attempts[index] = self.attempts.get(index, 0) + 1
            self._ban(source)
            if in_place:  # the chunk's pages hold the bytes that failed: no part of them is kept (a review)
                self.part_origins.pop(index, None)
                self.earlier.pop(index, None)
                self.partial.forget_part(index)
            if self.fallback is not None and all(self._is_banned(s, time.monotonic()) for s in self.live):
                await self._fall_back()  # (rather than ask the liar again: it was the one source)
            return
        if index in self.partial.done or index in self.landing:
            return
        self.landing.add(index)
        try:
            if not in_place:
                await self._stop_in_place_writer(index, request)
            await to_thread_to_the_end(self.partial.write_chunk, index, data, digest, in_place, vouched)
        finally:
            self.landing.discard(index)
        self._landed(source, index, len(data), part)
        if self.swarm is not None:  # a chunk this node claimed, whoever it came from in the end
            # (the fleet may take it from this node now; not on a holder's chunk-map word alone, taken while the
            # registry was silent: that word would become the fleet's settlement, a review)
            await self.swarm.settle(index, digest, vouched=not self._on_map_word(source, index))

    def _landed(self, source: FileSource, index: int, length: int, part: int = 0) -> None:
        """``part``: bytes at the chunk's start a transfer that stopped left in the file: credited to the
        sources that sent them in this transfer, the rest as found in place (a pull before this one's)."""
        self.counted.add(index)
        if source.kind == "hub" and not part:
            self.from_hub.add(index)
        origins = self.part_origins.pop(index, [])
        # The part's bytes by who sent them, as far as the part goes (one fetched over, the chunk landing from
        # a buffer or a range started again, is none of it); the rest was found in place (an earlier pull's)
        pieces, found = [], part
        for kind, base_url, amount, name in origins:
            if (taken := min(amount, found)) > 0:
                pieces.append((taken, kind, base_url, name))
                found -= taken
        # The other nodes whose bytes are in the chunk (an honest node that sent a cut prefix fetched over was
        # named with the liar that sent the rest, a review)
        self.senders[index] = frozenset(
            [name for _, kind, _, name in pieces if kind != "hub"]
            + ([source.source.name] if source.kind != "hub" else [])
        )
        if source.kind != "hub":
            self.peer_landed.append((time.monotonic(), length - part))
        if self.parked and source not in self.parked:  # (the link works again: the peers may too)
            now = time.monotonic()  # (not a peer whose own host is unreachable, at every chunk landed)
            again = [parked for parked, until in self.parked.items() if now >= until]
            if again:
                for parked in again:
                    del self.parked[parked]
                self._ask_again(again)
        if (on_bytes := self.on_bytes) is not None:
            # A chunk is told done in pieces (its part's senders, then the rest's): what is not told yet stays
            # in receiving(), so that progress shown between two pieces does not fall back by the rest
            self.crediting[index] = length

            def credit(amount: int, kind: str, base_url: str) -> None:
                self.crediting[index] -= amount
                on_bytes(amount, kind, base_url)

            try:
                if found:  # (first: told after the senders', the found bytes were out of `found` a moment)
                    credit(found, LEFT_IN_PLACE, "")
                for taken, kind, base_url, _ in pieces:
                    credit(taken, kind, base_url)
                credit(length - part, source.kind, source.source.base_url)
            finally:
                del self.crediting[index]
        for other in self.requests.get(index, []):
            if other.source != source and not other.landing and other.task is not None:
                other.task.cancel()  # the endgame's loser: its buffer slot and connection are released
        self._pulse()

    def _write_small(
        self, data: memoryview, expected: str | None, vouched: bool
    ) -> tuple[str, BlobDigest | None]:
        """(On a worker thread.) A small file's one chunk: its BLAKE3; unless that differs from
        ``expected``, the write and the file's digests, hashed from ``data`` (the bytes just written).
        Returns (BLAKE3, digests or None when rejected)."""
        digest = _blake3(data)
        if expected is not None and digest != expected:
            return digest, None
        self.partial.write_chunk(0, data, digest, vouched=vouched)
        hasher = BlobHasher(self.remote.size, self.partial.chunk_size)
        hasher.update_sha256(data)
        hasher.update_chunk(data, digest)
        return digest, hasher.finish()

    def _ban(self, source: FileSource) -> None:
        """A source whose bytes failed their digest gets no chunk for BAN_SECONDS (unless no other source
        holds it); its other requests are cancelled, their chunks back in the pool, when another may serve."""
        now = time.monotonic()
        BANNED_NODES[source.source.name] = now + BAN_SECONDS
        if len(BANNED_NODES) > MAX_BANNED:  # (rarely: pruning races with a ban another thread sets)
            for name, until in list(BANNED_NODES.items()):
                if until <= now:
                    BANNED_NODES.pop(name, None)
        if not any(s is not source and not self._is_banned(s, now) for s in self.live):
            return
        for requests in self.requests.values():
            for request in requests:
                if request.source == source and not request.landing and request.task is not None:
                    request.task.cancel()

    async def _stream_whole(self, source: FileSource, own_index: int) -> None:
        """The server ignores ranges: take the whole body once, landing every chunk nobody else has."""
        self.whole_body = True
        chunk_size = self.partial.chunk_size
        state = {"index": 0, "filled": 0}

        async def sink(piece: memoryview) -> None:
            while piece:
                index = state["index"]
                length = chunk_span(index, self.remote.size, chunk_size)[1]
                take = min(len(piece), length - state["filled"])
                buffer[state["filled"] : state["filled"] + take] = piece[:take]
                state["filled"] += take
                piece = piece[take:]
                if state["filled"] == length:
                    if index not in self.partial.done and (index not in self.in_flight or index == own_index):
                        await self._land(source, index, memoryview(buffer)[:length])
                    state["index"], state["filled"] = index + 1, 0

        try:
            async with self.limits.source_slot(source.source), self.limits.buffer_slot():
                buffer = bytearray(chunk_size)  # allocated under the buffer slot, like a fetched chunk's
                session = await self.http.get()
                await source.source.stream_whole(session, source.url, self.remote.size, sink, source.kind)
        except StoreError:
            raise
        except DepotError as error:
            self._drop(source, error)
        finally:
            self.whole_body = False

    async def _ask_unanswered_in_outage(self, clock: OutageClock) -> None:
        """Ask the nodes dropped for no answer again, once due, while the pull hears nothing from anyone."""
        while self._work_left():
            await asyncio.sleep(UNANSWERED_LOOK)
            now = time.monotonic()
            due = [source for source, until in self.unanswered.items() if now >= until]
            if due and clock.outage():
                for source in due:
                    del self.unanswered[source]
                self._ask_again(due, "nothing comes from anywhere")

    def _ask_again(self, sources: list[FileSource], why: str = "the link works again") -> None:
        """Sources dropped for this node's own link (or for no answer, in an outage: ``why``), asked again
        (their chunk maps read anew)."""
        for source in sources:
            self.errors.pop(source.source.name, None)
        log.info("%s: %s: asking %s again", self.remote.path, why, ", ".join(s.source.name for s in sources))

        async def rejoin() -> None:
            live = {s.source.base_url for s in self.live}  # (the swarm's view may have brought one back)
            fresh = [s for s in sources if s.source.base_url not in live]
            if fresh:
                await self._start(fresh)

        task = self._watch(asyncio.create_task(rejoin()))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _drop(self, source: FileSource, error: Exception) -> None:
        if source in self.live:
            self.live.remove(source)
            self.errors[source.source.name] = error
            if source.kind != "hub" and _no_route(error):
                # (a peer unreachable for good, a firewall's reject, waits longer each time: 5, 10, 20... 80 s)
                wait = min(2 * self.parked_for.get(source, PARKED_AT_LEAST / 2), 16 * PARKED_AT_LEAST)
                self.parked_for[source] = wait
                self.parked[source] = time.monotonic() + wait
            elif source.kind != "hub" and getattr(error, "network", False):
                wait = min(2 * self.parked_for.get(source, PARKED_AT_LEAST / 2), 16 * PARKED_AT_LEAST)
                self.parked_for[source] = wait
                self.unanswered[source] = time.monotonic() + wait
            log.info("%s: no longer asking %s for it (%s)", self.remote.path, source.source.name, error)
            if source.kind != "hub" and not isinstance(error, (AccessDeniedError, ChunkUnavailableError)):
                # (a node of the fleet that hangs or fails cost every pull of what it holds seconds, and only
                # the info log said which: an explorer's trial)
                say_now_and_then(f"dropped {source.source.name}", log, "%s fails (%s): pulls go on without it; "
                                 "is it well?", source.source.name, error)  # fmt: skip
            if isinstance(error, AccessDeniedError) and source.kind != "hub":
                say_refused_once(source.source.name, error)
            if source.kind == "hub" and self.swarm is not None:
                withdrawing = self._watch(
                    asyncio.create_task(self.swarm.withdraw_unlanded(set(self.landing)))
                )
                self.tasks.add(withdrawing)
                withdrawing.add_done_callback(self.tasks.discard)

    def _fail(self, error: DepotError) -> None:
        if self.failure is None:
            self.failure = error

    # -- hashing ----------------------------------------------------------------------------------------

    async def _hash_in_order(self) -> BlobDigest:
        size, chunk_size = self.remote.size, self.partial.chunk_size
        hasher = BlobHasher(size, chunk_size)
        fd = self.partial.data_fd
        mapping = None if self.small else mmap.mmap(fd, size, prot=mmap.PROT_READ)
        try:
            for index in range(self.partial.chunks):
                while True:
                    changed = self._changed
                    if index in self.partial.done:
                        break
                    await changed.wait()
                if self.small_digest is not None:  # hashed as it landed (_write_small)
                    return self.small_digest
                offset, length = chunk_span(index, size, chunk_size)
                source = fd if mapping is None else mapping
                await asyncio.to_thread(_hash_chunk, hasher, source, offset, length, self.partial.done[index])
            return hasher.finish()
        finally:
            if mapping is not None:
                with contextlib.suppress(BufferError):  # a cancelled hashing thread may still hold a view
                    mapping.close()


UNMAPPER = ForkSafeExecutor(max_workers=1, thread_name_prefix="modeldepot-unmap")


class _ReadAside:
    """A read aside (:meth:`_FileJob._read_aside`): the bytes into a buffer of their own, as they come. Its
    buffer counts in :attr:`held` (all of the process's) until its request ends."""

    held = 0  # bytes of the buffers of the reads aside of this process

    def __init__(self, source: FileSource, first: int, last: int, size: int) -> None:
        self.first = first
        self._buffer = bytearray(last - first + 1)
        self._receiving = Receiving()
        _ReadAside.held += len(self._buffer)
        # (a buffer of its own: bytes handed out are copies, as a retry that starts over writes it again)
        self._fetch = asyncio.ensure_future(
            source.source.fetch(source.url, first, last, size, self._buffer, self._receiving, source.kind)
        )
        self._fetch.add_done_callback(self._ended)

    def _ended(self, fetch: asyncio.Future[memoryview]) -> None:
        _ReadAside.held -= len(self._buffer)
        if not fetch.cancelled():
            fetch.exception()  # (retrieved: failure() says it)

    def received(self) -> int:
        fetch = self._fetch
        if fetch.done() and not fetch.cancelled() and fetch.exception() is None:
            return len(self._buffer)
        return min(self._receiving.count, len(self._buffer))

    def take(self, start: int, end: int) -> bytes:
        with memoryview(self._buffer) as whole:
            return bytes(whole[start - self.first : end - self.first])

    def failure(self) -> BaseException | None:
        fetch = self._fetch
        return fetch.exception() if fetch.done() and not fetch.cancelled() else None

    def close(self) -> None:
        self._fetch.cancel()  # (its reader thread lets go of the buffer before the fetch ends: see fetch)


def _close_mapping(mapping: mmap.mmap) -> None:
    with contextlib.suppress(BufferError):  # a view still held (a traceback's frame): freed with it
        mapping.close()


def _let_go_of(error: BaseException) -> None:
    """Clear the locals of the frames ``error`` came through (the views of a chunk's mapping they held), so
    that the mapping can be closed now: kept by the traceback of a cancelled pull (its task's, kept as long
    as the depot), a mapping held the partial's data file open, deleted, its whole size taken on the disk,
    after a resumed pull had finished it (an explorer's trial)."""
    traceback.clear_frames(error.__traceback__)


def _blake3(data: memoryview) -> str:
    return blake3.blake3(data).hexdigest()


def _hash_chunk(hasher: BlobHasher, source: mmap.mmap | int, offset: int, length: int, digest: str) -> None:
    """Hash a landed chunk in file order, from the file's mapping or (a small file) read from its fd."""
    if isinstance(source, int):
        read = memoryview(os.pread(source, length, offset))
        if len(read) != length:
            raise IntegrityError(f"the partial file ends early: {len(read)} of {length} bytes at {offset}")
        hasher.update_sha256(read)
        hasher.update_chunk(read, digest)
        return
    with memoryview(source) as whole, whole[offset : offset + length] as data:
        hasher.update_sha256(data, cold=True)  # landed a while ago, by another thread: out of the caches
        hasher.update_chunk(data, digest)


def liars(mismatch: IntegrityError, true: BlobDigest) -> dict[str, int]:
    """The nodes that sent chunks other than the file's, with how many each: by what ``mismatch`` (a file
    that failed the upstream's digest) says landed, against ``true``, its digests fetched again. A node whose
    chunk digests matched its own wrong bytes passed every chunk check, and the file was fetched twice by
    every pull that asked it, never banned nor named (an explorer's trial)."""
    found: dict[str, int] = {}
    for index, (senders, landed_as) in (mismatch.chunks_landed or {}).items():
        if index < len(true.chunk_blake3) and landed_as != true.chunk_blake3[index]:
            for name in senders:
                found[name] = found.get(name, 0) + 1
    return found


def ban_liars(names: Iterable[str], seconds: float) -> None:
    """No chunk is asked of these nodes for ``seconds``, in any download of this process."""
    until = time.monotonic() + seconds
    for name in names:
        BANNED_NODES[name] = max(until, BANNED_NODES.get(name, 0.0))
        LIARS[name] = until
    now = time.monotonic()
    for name, left in list(LIARS.items()):  # (bounded: the bans over are dropped)
        if left <= now:
            LIARS.pop(name, None)


def _check(remote: RemoteFile, digest: BlobDigest) -> None:
    if remote.sha256 is not None and digest.sha256 != remote.sha256:
        raise IntegrityError(
            f"{remote.path}: the bytes received do not match the upstream's SHA-256; nothing was kept"
        )
    if remote.sha256 is None and digest.git_sha1 != remote.git_oid:
        raise IntegrityError(
            f"{remote.path}: the bytes received do not match the upstream's git oid; nothing was kept"
        )


_SAID_REFUSED: set[str] = set()  # the nodes whose refusal was said (once each, in this process)


def say_refused_once(node: str, error: object) -> None:
    """A node of the fleet that refuses this one's requests (another MODELDEPOT_TOKEN) is said once, as a
    warning: what it claimed in a swarm, or holds, is then fetched elsewhere, the Hub's chunks again (a
    fleet with one node's token changed fetched 1.8 times the repo from the Hub, with an info line alone)."""
    if node in _SAID_REFUSED:
        return
    _SAID_REFUSED.add(node)
    log.warning(
        "%s refuses this node's requests (%s): its MODELDEPOT_TOKEN differs from this one's, so what it "
        "holds or has claimed is fetched elsewhere (from the Hub again)",
        node,
        error,
    )
