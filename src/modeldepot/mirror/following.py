"""Following a mirror's pull as it lands: one pull of a file (:class:`PullJob`) read by each of its
responses (:class:`Reading`), chunk by chunk as they land and are checked, ahead of a slow chunk's landing
(its bytes unproven, compared with it once it lands), or from another process's download of the same
content. What each response sent unproven is recorded, for the marks of a broken answer
(:mod:`modeldepot.mirror.marks`). See :mod:`modeldepot.mirror` for the rules."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import blake3

from modeldepot.errors import ChunkNotAvailableError, IntegrityError, UpstreamTimeoutError
from modeldepot.hashing import chunk_span
from modeldepot.hub.manifest import RemoteFile
from modeldepot.mirror.marks import Sent
from modeldepot.store.partials import BytesAside, PartialFiles, ResumablePartial
from modeldepot.transfer.pull import PullResult

READ_BLOCK = 1024 * 1024
SIBLING_LOOK = 0.25  # seconds between looks for another pull writing the content a waiting pull waits for
# Seconds a reader waits for the chunk it reads to land before it follows that chunk's bytes as they come, and
# between two looks at them then (under a client's 10 s read timeout: a slow upstream's chunk takes longer)
AHEAD_PATIENCE = 2.0
AHEAD_LOOK = 0.5
# Seconds of silence after which an answer whose last byte waits for its chunk to land sends one more byte
# of the few before it held back for this (TRICKLE_RESERVE): under a client's 10 s read timeout
TRICKLE_EVERY = 4.0
TRICKLE_RESERVE = 64
# Seconds a reader following another process's download of its file waits for that download to land a
# chunk (a suspended `modeldepot pull`): then the answer breaks, and its client tries again later
STILL_ELSEWHERE = 60.0

log = logging.getLogger(__name__)


@dataclass
class PullJob:
    """The mirror's one pull of a file, which every response of the file follows."""

    remote: RemoteFile
    task: asyncio.Task[PullResult] | None = None
    partial: ResumablePartial | None = None
    # The files (repo id, path) whose readers were given bytes of this pull before its whole-file check (its
    # own, or another name of the same content: Mirror's _writing), and those readings
    handed_out: dict[tuple[str, str], list[Reading]] = field(default_factory=dict)
    found_chunks: int = 0  # chunks its partial held when it began (a resume's)
    found_part_bytes: int = 0  # bytes of parts of chunks its partial held when it began
    _event: asyncio.Event = field(default_factory=asyncio.Event)

    def pulse(self) -> None:
        """Wake every reader (called on the loop: a check and a wait never miss a pulse between them)."""
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self) -> None:
        await self._event.wait()


@dataclass(eq=False)
class SentAhead:
    """Bytes of a chunk of ``job``'s partial that went out before the chunk landed: their span (``first``,
    ``end`` exclusive) and BLAKE3, compared with the chunk once it lands."""

    job: PullJob
    index: int
    first: int
    end: int
    hash: blake3.blake3 = field(default_factory=blake3.blake3)

    def add(self, block: memoryview) -> None:
        self.hash.update(block)
        self.end += len(block)


@dataclass(eq=False)
class Reading:
    """One response's reading of a file: whether it was handed bytes of a chunk no digest vouched for."""

    repo_id: str
    path: str
    resumes: bool = False  # it answers a resume (bytes=N- of the file): its client holds what went before
    unproven: bool = False
    sent: bool = False  # bytes went out
    # Chunks sent from another process's download of the file: index -> the BLAKE3 it logged for them
    elsewhere: dict[int, str] = field(default_factory=dict)
    elsewhere_checked: bool = False  # the chunks sent from another process's download matched the file
    # What went out ahead of chunks' landing, not compared with them yet (one chunk followed as it comes, and
    # those read aside whole that the reader went on from)
    ahead: list[SentAhead] = field(default_factory=list)
    # What it sent but from the store: each chunk as it landed, or as another process's download logged it
    went_out: Sent = field(default_factory=Sent)
    # The marks (as wanted: fetched first) of chunks sent ahead that its answer went on from: held until they
    # are compared with what landed (:meth:`let_go`)
    wanted_marks: list[contextlib.AbstractContextManager[None]] = field(default_factory=list)

    def let_go(self) -> None:
        """Drop the marks of :attr:`wanted_marks` (what was sent ahead of them is checked, or never will be)."""
        marks, self.wanted_marks = self.wanted_marks, []
        for mark in marks:
            mark.__exit__(None, None, None)

    def evidence(self) -> Sent:
        """All it sent but from the store, and what it sent ahead of a chunk's landing (mirror.marks)."""
        sent = Sent()
        sent.merge(self.went_out)
        for ahead in self.ahead:
            if ahead.end > ahead.first:
                sent.add((ahead.first, ahead.end, ahead.hash.hexdigest()))
        return sent

    @property
    def ahead_unchecked(self) -> bool:
        """Bytes of a chunk went out before it landed, not compared with it yet."""
        return bool(self.ahead)

    @property
    def unchecked(self) -> bool:
        """Bytes went out that a check may still refute: a resume must not be joined to them."""
        return self.ahead_unchecked or (bool(self.elsewhere) and not self.elsewhere_checked)


def hand_out(job: PullJob, reading: Reading) -> None:
    """``reading`` was given bytes of ``job`` before its whole-file check (see :attr:`PullJob.handed_out`)."""
    readings = job.handed_out.setdefault((reading.repo_id, reading.path), [])
    if not any(known is reading for known in readings):
        readings.append(reading)


async def follow(
    job: PullJob, fd: int, start: int, end: int, reading: Reading, own: bool, since: float | None = None
) -> AsyncIterator[memoryview]:
    """Bytes ``start..end`` of ``job``'s partial as its chunks land, for ``reading``. ``own``: ``job`` is
    the pull of the file read (not another name's, whose vouched chunks vouch for nothing here). ``since``:
    when (``time.monotonic()``) the reader began to wait for its first chunk (its request came)."""
    partial, pull = job.partial, job.task
    assert partial is not None and pull is not None
    vouched = partial.vouched if own else frozenset()
    chunk_size = partial.chunk_size
    last = end // chunk_size  # the final chunk of this response, whole file or range
    resets = partial.resets
    # Unproven bytes went out (chunks no digest vouched for, another process's download's), the chunks sent
    # ahead of their landing and not compared yet aside
    settled_unproven = reading.unproven
    # Chunks whose bytes went out whole, read aside, that the reader went on from before they landed: each
    # with its mark as wanted (fetched next), compared with the chunk once it lands (see below)
    deferred: dict[int, tuple[SentAhead, contextlib.AbstractContextManager[None]]] = {}

    def check_not_reset() -> None:
        nonlocal resets
        if partial.resets != resets:  # the whole file failed its check: every chunk was dropped
            # (the pull may fetch it again and succeed: what was sent stays refuted; and a resume's client may
            # hold bytes of the refuted fetch, which it would join the rest to)
            if reading.sent or (reading.resumes and job.handed_out):
                reading.unproven = True
                if reading.resumes:  # (what its client holds is not known here: never lifted)
                    reading.went_out.forget()
                raise IntegrityError(f"{reading.path}: the file failed its check after part of it was sent; "
                                     "the answer breaks")  # fmt: skip
            resets = partial.resets

    async def settle(sent: SentAhead) -> None:
        """Compare what went ahead of chunk ``sent.index``, landed now, with the chunk as it landed."""
        nonlocal settled_unproven
        # What went ahead must be the chunk as it landed (checked against its digest, or the Hub's bytes,
        # which the file's SHA-256 checks): a transfer that started over, or a source found lying, rewrote
        # them. Else the answer breaks, and a resume of it is sent whole.
        landed = blake3.blake3()
        async for block in pread_blocks(fd, sent.first, sent.end - 1):
            landed.update(block)
        if landed.digest() != sent.hash.digest():
            raise IntegrityError(f"{reading.path}: bytes sent as they came are not the chunk that landed; "
                                 "the answer breaks")  # fmt: skip
        reading.ahead.remove(sent)
        # Proven now, as if sent once the chunk landed: a range inside the file still goes with its own chunks,
        # not waiting for the whole file's check (a review's trial)
        if sent.index not in vouched:
            settled_unproven = True
            hand_out(job, reading)
        reading.unproven = settled_unproven or reading.ahead_unchecked
        record_landed(sent.index)

    def record_landed(index: int) -> None:
        # What of the chunk goes out (or went ahead, and matched it) is the chunk as it landed: recorded
        # before it goes, for a mark of the file should the answer break
        offset, length = chunk_span(index, partial.size, chunk_size)
        digest = partial.done.get(index)
        if digest is None:  # pragma: no cover  (a chunk is done here)
            reading.went_out.forget()
        else:
            reading.went_out.add((offset, offset + length, digest))

    async def settle_landed() -> None:
        """Compare the deferred chunks that landed meanwhile."""
        for index, (sent, mark) in list(deferred.items()):
            if index in partial.done:
                del deferred[index]
                mark.__exit__(None, None, None)
                await settle(sent)

    last_went = time.monotonic() if since is None else since  # when bytes last went (or the headers did)
    try:
        for index in range(start // chunk_size, last + 1):
            offset, length = chunk_span(index, partial.size, chunk_size)
            lo, hi = max(start, offset), min(end, offset + length - 1)
            position, waiting_since = lo, time.monotonic()
            if since is not None and lo == start:
                waiting_since = min(since, waiting_since)
            sent: SentAhead | None = None  # what went out of the chunk before it landed
            aside: BytesAside | None = None  # its bytes read aside (see below), and whether one was made
            went_aside = False
            # Bytes read aside, from ``position`` on, held back to be trickled (the answer's last chunk)
            held = bytearray()
            # The answer's last bytes before its last go ahead of their chunk's landing a byte at a time, when
            # nothing else went for a while (see TRICKLE_EVERY)
            trickled_from = max(lo, end - TRICKLE_RESERVE) if index == last else end
            recorded = False  # its landed digest is in reading.went_out (bytes of it went once it landed)
            received_before, measured_since = received_bytes(partial, index), time.monotonic()  # (its pace)
            # The final chunk of a response waits for the whole-file check, the others for their own landing:
            # so no response, a range included, ever completes with bytes the upstream's digests have not
            # vouched for. A range that ends inside the file and whose every chunk the scan's node vouched
            # for goes at once (a header read of a big file waited for all of it: clients timed out).
            # (fetched next: see ChunkChooser._pick)
            mark: contextlib.AbstractContextManager[None] = wanted(partial, index)
            mark.__enter__()
            try:
                while True:
                    check_not_reset()
                    await settle_landed()
                    # (bytes of this chunk sent ahead are compared with it once it lands, below)
                    early = index in vouched and not settled_unproven and end < partial.size - 1
                    if (
                        index in partial.done
                        and (index != last or early or pull.done())
                        and (index != last or not deferred)  # (compared before the answer's last byte)
                    ):
                        break
                    if pull.done():
                        pull.result()
                        if index not in partial.done:
                            raise RuntimeError("the pull ended without this chunk")  # pragma: no cover
                    if aside is not None and (index in partial.done or aside.failure() is not None):
                        if aside.failure() is not None:  # (the chunk still goes, as it lands)
                            log.debug("%s: a read aside from byte %d failed: %s", reading.path, aside.first,
                                      aside.failure())  # fmt: skip
                        aside.close()  # (landed: what it held back goes from the chunk)
                        aside = None
                    now = time.monotonic()
                    if index == last and position < end and now - last_went >= TRICKLE_EVERY:
                        # A client's read timeout (10 s) must not expire while the answer's last byte waits
                        # for its chunk to land (a safetensors header read, bytes 0-999, through a mirror of
                        # a 2 MiB/s upstream waited 28 s for the rest of its 16 MiB chunk: a trial): a byte
                        # held back goes, as bytes sent ahead do, compared with the chunk once it lands. Not
                        # one of a chunk landed unvouched, whose file's check is under way (soon done): the
                        # check may refute it, where waiting loses nothing (a review's trial).
                        byte = b""
                        if held and index not in partial.done:
                            byte = bytes(held[:1])
                            del held[:1]
                        elif index not in partial.done and offset + received_bytes(partial, index) > position:
                            byte = await asyncio.to_thread(os.pread, fd, 1, position)
                        elif index in partial.done and index in vouched:
                            held.clear()  # (the chunk as it landed goes from here)
                            byte = await asyncio.to_thread(os.pread, fd, 1, position)
                        if byte:
                            if index not in partial.done or sent is not None:
                                sent = sent or going_ahead(job, reading, index, lo)
                                sent.add(memoryview(byte))
                            elif not recorded:  # (recorded before it goes: a mark of the file lists it)
                                record_landed(index)
                                recorded = True
                            position += 1
                            reading.sent, last_went = True, now
                            yield memoryview(byte)
                            continue
                    waited = now - waiting_since
                    if waited >= AHEAD_PATIENCE and index not in partial.done and not held:
                        # A chunk slow to land (a slow upstream: 16 MiB at 1 MiB/s, a quarter of it each for
                        # four at once): its bytes go as they come, unproven, so that a client's read timeout
                        # (10 s) never waits for a whole chunk (huggingface_hub timed out again and again, and
                        # below 1 MiB/s failed: an explorer's trial). Never the response's last byte before
                        # the check.
                        received = received_bytes(partial, index)
                        upto = min(hi, trickled_from - 1, offset + received - 1)
                        if upto >= position and aside is None:
                            sent = sent or going_ahead(job, reading, index, lo)
                            async for block in pread_blocks(fd, position, upto):
                                sent.add(block)
                                position += len(block)
                                # (before the yield: a client that leaves there has had it)
                                reading.sent, last_went = True, time.monotonic()
                                yield block
                            continue
                        # A range that starts deep inside the chunk: its bytes, at the pace the chunk comes
                        # from its start, would come after a client's read timeout (a read of 1000 bytes near
                        # the end of a 16 MiB chunk, through a mirror of a 2 MiB/s upstream, timed out five
                        # times: an explorer's trial). They are read aside, in a request of their own, and
                        # compared with the chunk once it lands, as any bytes sent ahead are; the reader goes
                        # on to the next chunk without waiting for that landing (the rest of the chunk came at
                        # the link's pace: 8 s more of a 2 MiB/s link), and compares them before its last byte.
                        # Only deep inside: a chunk entered at its start comes first (it is wanted), and a
                        # whole read of a small file read it twice (a review's trial).
                        read_aside, aside_end = partial.read_aside, min(hi, end - 1)
                        measured = time.monotonic() - measured_since
                        pace = (received - received_before) / measured if measured >= AHEAD_LOOK else None
                        if (
                            aside is None
                            and not went_aside
                            and read_aside is not None
                            and aside_end >= position > offset + received
                            and pace is not None
                            and position - (offset + received) >= pace * AHEAD_PATIENCE
                        ):
                            aside = read_aside(position, aside_end)
                            went_aside = aside is not None  # (none may be made now: asked again later)
                        if aside is not None:
                            came = aside.first + aside.received()
                            taken = position + len(held)
                            if came > taken:
                                data = aside.take(taken, came)
                                going = max(0, min(len(data), trickled_from - taken))
                                held += data[going:]
                                if going:
                                    sent = sent or going_ahead(job, reading, index, lo)
                                    block = memoryview(data)[:going]
                                    sent.add(block)
                                    position += going
                                    reading.sent, last_went = True, time.monotonic()
                                    yield block
                                    continue
                            if position > hi:  # (all of the chunk this answer takes went, read aside)
                                aside.close()
                                aside = None
                                assert sent is not None
                                deferred[index], mark = (sent, mark), contextlib.nullcontext()
                                break  # (compared once it lands)
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(
                            job.wait(),
                            AHEAD_LOOK
                            if aside is not None
                            else max(AHEAD_PATIENCE - waited, 0.0) + AHEAD_LOOK,
                        )
            finally:
                mark.__exit__(None, None, None)
                if aside is not None:
                    aside.close()
            if index in deferred:
                continue
            if sent is not None:
                await settle(sent)
            if index == last and not early:
                pull.result()  # (the whole file matched)
                check_sent_elsewhere(reading.path, reading.elsewhere, partial.done.get)
                reading.elsewhere_checked = True
            elif index not in vouched:
                settled_unproven = reading.unproven = True
                hand_out(job, reading)
            if sent is None and not recorded:
                record_landed(index)
            landed_as = partial.resets  # (what was held back of bytes read aside goes from the chunk landed)
            try:
                async for block in pread_blocks(fd, position, hi):
                    reading.sent, last_went = True, time.monotonic()
                    yield block
            finally:  # (a client that left mid-chunk too)
                if partial.resets != landed_as:  # the chunk was dropped while it went: what went is not known
                    reading.went_out.forget()
    finally:
        # A client that left with chunks sent ahead of their landing has them checked once they land
        # (Mirror._check_later): they stay wanted until then, or they waited their turn in the pull, and every
        # resume of the file was a 429 meanwhile (a review's trial)
        reading.wanted_marks.extend(mark for _, mark in deferred.values())


async def follow_elsewhere(
    partials: PartialFiles, job: PullJob, start: int, end: int, reading: Reading
) -> AsyncGenerator[memoryview, None]:
    """Bytes from ``start`` of ``job``'s content as another process's download of it lands them, each
    chunk checked against the BLAKE3 that download logged, until ``job``'s pull ends or takes the
    download over. Never the chunk that ends the response: that one waits for the whole-file check
    (read from the store then, where every chunk sent is compared with the stored blob's first)."""
    assert job.task is not None and job.remote.sha256 is not None
    sha256 = job.remote.sha256
    landed, moved = -1, time.monotonic()
    while job.partial is None and not job.task.done():
        reader = await asyncio.to_thread(partials.open_chunks, sha256)
        if reader is not None:
            if reader.logged_count != landed:
                landed, moved = reader.logged_count, time.monotonic()
            try:
                last = end // reader.chunk_size
                for index in range(start // reader.chunk_size, last):
                    if not reader.logged(index):
                        break
                    try:
                        view = await asyncio.to_thread(reader.checked_view, index)
                    except ChunkNotAvailableError:
                        break  # (its bytes not on disk yet, or the download started over)
                    offset, length = reader.span(index)
                    reading.unproven = reading.sent = True  # (only the whole file's check proves them)
                    reading.elsewhere[index] = reader.digest(index)
                    reading.went_out.add((offset, offset + length, reader.digest(index)))
                    hand_out(job, reading)
                    yield view[start - offset : min(end, offset + length - 1) - offset + 1]
                    start = offset + length
            finally:
                reader.close()
        if time.monotonic() - moved > STILL_ELSEWHERE:
            holder = await asyncio.to_thread(partials.holder, sha256)
            raise UpstreamTimeoutError(f"{reading.path}: the download of it another process runs"
                                       f"{'' if holder is None else f' (process {holder})'} has landed "
                                       f"nothing for {STILL_ELSEWHERE:g} s; the answer breaks",
                                       repo_id=reading.repo_id, path=reading.path)  # fmt: skip
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(job.wait(), SIBLING_LOOK)


@contextlib.contextmanager
def wanted(partial: ResumablePartial, index: int) -> Iterator[None]:
    """Chunk ``index`` of ``partial`` is waited for by a reader, while in this block: its download fetches it
    next (a range read far into a big file waited for every chunk before it, longer on a slow upstream than a
    client's read timeout)."""
    partial.wanted[index] += 1
    try:
        told = partial.on_wanted
        if told is not None and partial.wanted[index] == 1:
            told(index)
        yield
    finally:
        partial.wanted[index] -= 1
        if partial.wanted[index] <= 0:
            del partial.wanted[index]


def going_ahead(job: PullJob, reading: Reading, index: int, first: int) -> SentAhead:
    """``reading`` sends bytes of chunk ``index`` of ``job``'s partial, from byte ``first``, before the chunk
    lands: their record, to be compared with the chunk once it does."""
    sent = SentAhead(job, index, first, first)
    reading.ahead.append(sent)
    reading.unproven = True
    hand_out(job, reading)
    return sent


def received_bytes(partial: ResumablePartial, index: int) -> int:
    """The bytes from the start of chunk ``index`` a transfer has received into the file, unchecked."""
    received = partial.receiving.get(index)
    return received() if received is not None else 0


def coming(partial: ResumablePartial, offset: int, waited: float) -> bool:
    """Whether a reader of byte ``offset`` of ``partial`` that has waited ``waited`` seconds
    (:data:`AHEAD_PATIENCE`) is sent bytes before their chunk lands (:func:`follow`): the upstream answers,
    headers may go. So it is when the byte came in (unchecked), or bytes of the file come in and the byte can
    be read aside."""
    if waited < AHEAD_PATIENCE:
        return False
    index = offset // partial.chunk_size
    if index * partial.chunk_size + received_bytes(partial, index) > offset:
        return True
    return partial.read_aside is not None and any(
        received() > 0 for received in tuple(partial.receiving.values())
    )


async def pread_blocks(fd: int, first: int, last: int) -> AsyncIterator[memoryview]:
    """Bytes ``first..last`` of the file ``fd``, in blocks of :data:`READ_BLOCK` read on worker threads."""
    position = first
    while position <= last:
        data = await asyncio.to_thread(os.pread, fd, min(READ_BLOCK, last - position + 1), position)
        if not data:
            raise OSError(f"the partial file ended at {position}")
        position += len(data)
        yield memoryview(data)


def check_sent_elsewhere(path: str, sent: dict[int, str], checked: Callable[[int], str | None]) -> None:
    """Every chunk sent from another process's download (index -> the BLAKE3 it logged) must be the file's
    as checked whole (``checked``: a chunk's digest there): that download may have started over after they
    went. Else the answer breaks."""
    if any(checked(index) != digest for index, digest in sent.items()):
        raise IntegrityError(f"{path}: a chunk sent from another process's download is not the file's as "
                             "checked whole; the answer breaks")  # fmt: skip


def open_partial(partial: ResumablePartial) -> int | None:
    try:
        return os.open(partial.paths.data, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None  # already placed in the store
