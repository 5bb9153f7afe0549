"""A mirror's pulls, and the responses that follow them (see :mod:`modeldepot.mirror`): one pull per file at a
time, shared by every reader; what a pull that failed upstream answers for a while; the marks of files whose
answers broke, and their lifting once the store holds the file."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import os
import time
from collections.abc import AsyncIterator

import blake3

from modeldepot.depot import Depot
from modeldepot.errors import (
    CorruptBlobError,
    DepotError,
    EntryNotFoundError,
    IntegrityError,
    StoreFullError,
    UpstreamError,
    UpstreamTimeoutError,
)
from modeldepot.hub.manifest import Manifest, RemoteFile
from modeldepot.mirror import following
from modeldepot.mirror.following import (
    PullJob,
    Reading,
    check_sent_elsewhere,
    follow,
    follow_elsewhere,
    open_partial,
    pread_blocks,
    wanted,
)
from modeldepot.mirror.marks import BrokenMarks, Sent, Span
from modeldepot.mirror.scans import FAILED_TTL, UpstreamScans
from modeldepot.store import FileEntry
from modeldepot.store.layout import size_text
from modeldepot.store.partials import ResumablePartial
from modeldepot.transfer.outage import QUICK_REFUSALS
from modeldepot.transfer.pull import PullResult, PullUpdate
from modeldepot.transfer.threads import in_budget_pool
from modeldepot.validation import is_commit_id, redact_credentials, validate_path

__all__ = ["Mirror"]

# (FAILED_TTL, from scans: seconds a file whose pull failed upstream before a chunk landed, or failed its check
# twice, answers that failure: a client's immediate retries each pulled the whole file again, and each got a
# 200 cut short)
UNREACHABLE_TTL = 2.0  # ... and one the upstream could not be reached for, this long
REFUTED_MEMORY = 300.0  # seconds a file that failed its check is remembered: a second failure is kept
# Seconds an answer's headers wait for the first bytes of a pull (so that a pull failing from its start is a
# 502): under a client's 10 s timeouts
FIRST_BYTES_PATIENCE = 5.0
COUNT_EVERY = 0.2  # seconds a mirror gathers the files it pulled before it counts their uses together

log = logging.getLogger(__name__)


def _said(task: asyncio.Task[PullResult]) -> None:
    """A mirror's pull that failed: its error is what the requests waiting on it answer; one a HEAD started
    and no GET awaited is logged here, once (else asyncio logs it with a traceback, as never retrieved)."""
    if not task.cancelled() and task.exception() is not None:
        log.info("a mirror's pull failed: %s", task.exception())


class Mirror:
    """Pull-through reads for a server. Use from one event loop."""

    def __init__(self, depot: Depot, deadline: float = 60.0) -> None:
        """``deadline``: the seconds a request may take before its answer (a server's request deadline)."""
        self.depot = depot
        self.scans = UpstreamScans(depot, deadline)
        self._jobs: dict[tuple[str, str, str], PullJob] = {}
        # Answers of files, from the store or through the upstream, and the pulls of files made for them, by
        # how they ended (/metrics)
        self.answers: collections.Counter[str] = collections.Counter()
        self.pulls_ended: collections.Counter[str] = collections.Counter()
        # (repo id, commit, path) -> (when (monotonic), the failure) of a pull that failed upstream lately
        self._failed: dict[
            tuple[str, str, str], tuple[float, UpstreamError | IntegrityError | StoreFullError]
        ] = {}
        self._refuted: dict[tuple[str, str, str], float] = {}  # -> when its pull's file last failed its check
        self._marks = BrokenMarks(depot.home)
        # The responses of each file (repo id in lower case, path) under way, or ended with bytes a check may
        # still refute and checked later: a resume of the file waits for them (its client may have timed out
        # while its response waited, and resume before that response noticed it left: a review's trial)
        self._readings: dict[tuple[str, str], set[Reading]] = {}
        self._checks: set[asyncio.Task[None]] = set()
        # The files pulled whose use is still to count: (repo id, commit) -> paths, counted together (see
        # _count_uncounted), by one task at a time
        self._uncounted: dict[tuple[str, str], list[str]] = {}
        self._counting: asyncio.Task[None] | None = None

    def broke(self, repo_id: str, path: str) -> bool:
        """Whether a response of this file broke lately after handing out bytes a check may refute (see the
        module's doc), or a pull under way handed out bytes of it that its check refuted: a resume of it is
        answered whole, unless :meth:`proven_by_store`."""
        return self._marks.broke(repo_id, path) or self._refuted_under_way(repo_id, path)

    def _refuted_under_way(self, repo_id: str, path: str) -> bool:
        """Whether a pull still running handed out bytes of the file and then failed its whole-file check
        (it fetches the file again): its readers are marked once it returns, and a resume before that was
        answered as asked, joined to the refuted bytes (a review's trial: while the file was fetched again,
        and after it was published, before the pull returned)."""
        key = (repo_id.lower(), path)
        return any(
            job.partial is not None and job.partial.resets
            and any((repo.lower(), file) == key for repo, file in job.handed_out)
            for job in self._jobs.values()
        )  # fmt: skip

    async def settled(self, repo_id: str, path: str, patience: float) -> bool:
        """Wait up to ``patience`` seconds until no response of the file holds bytes a check may still refute
        (sent ahead of a chunk's check, or from another process's download); whether none does. A resume
        waits for this: joined to bytes a check then refutes, a client's file would be wrong, and answered
        whole (a 200 to a ``Range``), a streaming reader (HfFileSystem's) appended the whole file to what it
        had (an explorer's trial)."""
        key, deadline = (repo_id.lower(), path), time.monotonic() + patience
        while any(reading.unchecked for reading in self._readings.get(key, ())):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(following.AHEAD_LOOK)
        return True

    def _note_broken(self, reading: Reading) -> None:
        self._marks.note(reading.repo_id, reading.path, reading.evidence())

    def _note_handed_out(self, job: PullJob) -> None:
        """Mark each file whose readers were given bytes of ``job`` before its check, with all they sent."""
        for (repo_id, path), readings in sorted(job.handed_out.items(), key=lambda item: item[0]):
            sent = Sent()
            for reading in readings:
                sent.merge(reading.evidence())
            self._marks.note(repo_id, path, sent)

    async def proven_by_store(self, repo_id: str, commit_id: str, path: str) -> bool:
        """Whether the store holds the file at ``commit_id`` and every byte its broken answers sent is that
        file's: the mark is lifted then (a resume is answered as asked), and made for good when one is not
        (:mod:`modeldepot.mirror.marks`)."""
        spans = self._marks.spans(repo_id, path)
        if spans is None or not is_commit_id(commit_id) or self._refuted_under_way(repo_id, path):
            return False  # (a branch's file may be another commit's by then)
        try:
            entry = await asyncio.to_thread(self.depot.file_info, repo_id, path, commit_id)
            matches = await asyncio.to_thread(self._matches, entry, spans)
        except (DepotError, OSError) as error:  # (not held, or not readable now: answered whole, as it was)
            log.info("%s/%s: what its broken answers sent was not checked against the store (%s)", repo_id,
                     path, error)  # fmt: skip
            return False
        if matches and not self._marks.lift(repo_id, path, spans):
            return False  # (another answer broke meanwhile, sending more: checked at the next resume)
        if matches:
            log.info("%s/%s: every byte its broken answers sent is the stored file's: resumes of it are answered "
                     "as asked again", repo_id, path)  # fmt: skip
        else:
            self._marks.refute(repo_id, path)
            log.info("%s/%s: bytes its broken answers sent are not the stored file's: resumes of it are answered "
                     "whole", repo_id, path)  # fmt: skip
        return matches

    def _matches(self, entry: FileEntry, spans: frozenset[Span]) -> bool:
        """Whether each span is the stored file's (a whole chunk's by its recorded BLAKE3, others read)."""
        with self.depot.open_verified(entry, counts_as_use=False) as reader:
            for first, end, digest in sorted(spans):
                if end > entry.size:
                    return False
                whole = (
                    first % reader.chunk_size == 0
                    and reader.span(first // reader.chunk_size)[1] == end - first
                )
                if whole:
                    if reader.digest(first // reader.chunk_size) != digest:
                        return False
                    continue
                hashed = blake3.blake3()
                for index in reader.chunks_of(first, end - 1):
                    offset, length = reader.span(index)
                    view = reader.checked_view(index)
                    hashed.update(view[max(first, offset) - offset : min(end, offset + length) - offset])
                if hashed.hexdigest() != digest:
                    return False
        return True

    @staticmethod
    def remote_file(manifest: Manifest, revision: str, path: str) -> RemoteFile:
        """The file ``path`` of the upstream's scan (EntryNotFoundError when its commit lacks it)."""
        validate_path(path)
        for remote in manifest.files:
            if remote.path == path:
                return remote
        raise EntryNotFoundError(manifest.repo_id, revision, path, manifest.commit_id)

    def pulling(self, manifest: Manifest, remote: RemoteFile) -> bool:
        """Whether a pull of the file runs now."""
        return (manifest.repo_id, manifest.commit_id, remote.path) in self._jobs

    async def check_fits(self, manifest: Manifest, remote: RemoteFile) -> None:
        """Refuse (BudgetExceededError: 507) a file the disk budget cannot hold before its pull starts (a
        running pull made its room already). A GET's: its HEAD is answered from the upstream's metadata."""
        if self.pulling(manifest, remote):
            return
        store, doing = self.depot.store, f"mirroring {remote.path} of {manifest.repo_id}"

        def check() -> None:
            # (content the store holds under another file is reused by the pull: it writes nothing for it)
            held = store.local_digest(remote.sha256, None if remote.sha256 else remote.git_oid)
            # As the pull will write it: the revision it writes into is kept (a HEAD said 200 for a file the
            # GET refused, counting the revision's other files as room)
            with store.budget.writing(manifest.repo_id, manifest.commit_id, [remote.path]) as writer:
                # (a pull of the same file beside: its room is this one's too)
                writer.contents = {remote.sha256 or remote.git_oid: remote.size}
                writer.check_fits(0 if held is not None else remote.size, doing)

        await in_budget_pool(check, to_the_end=False)

    def _job(self, manifest: Manifest, remote: RemoteFile) -> PullJob:
        key = (manifest.repo_id, manifest.commit_id, remote.path)
        job = self._jobs.get(key)
        if job is not None:
            return job
        self._check_not_failed(key)
        job = self._jobs[key] = PullJob(remote)
        loop = asyncio.get_running_loop()

        def watch(path: str, partial: ResumablePartial) -> None:
            job.partial, job.found_chunks, job.found_part_bytes = (
                partial,
                len(partial.done),
                partial.part_bytes(),
            )
            job.pulse()

        def progress(update: PullUpdate) -> None:
            job.pulse()

        async def run() -> PullResult:
            QUICK_REFUSALS.set(True)  # (this task's own context: an answer's headers wait on this pull)
            try:
                result = await self.depot.pull_async(manifest.repo_id, None, revision=manifest.revision, progress=progress,
                                                     paths=[remote.path], watch=watch, manifest=manifest)  # fmt: skip
                self._refuted.pop(key, None)
                # (a pull-through that went well said nothing, even at debug: an operator could not tell a
                # mirror's misses from its hits, an explorer's trial)
                if result.bytes_downloaded or result.bytes_resumed:
                    log.info("pulled %s@%s %s (%s) for a client: %s from %s", manifest.repo_id, manifest.commit_id[:12],
                             remote.path, size_text(remote.size), size_text(result.bytes_downloaded),
                             ", ".join(map(redact_credentials, result.sources)) or "this store's downloads")  # fmt: skip
                if job.partial is not None and job.partial.resets:
                    # The file failed its check once, and was fetched again: a client that left before with
                    # bytes of the first fetch resumes onto them (a review's trial)
                    self._note_handed_out(job)
                self.pulls_ended["done"] += 1
                await self.scans.point_branches(manifest)
                return result
            except Exception as error:
                self.pulls_ended["failed"] += 1
                # (a client that left before may resume: the bytes it was given were refuted, or unproven)
                self._note_handed_out(job)
                self._remember_failure(key, job, error)
                raise
            finally:
                self._jobs.pop(key, None)
                job.pulse()

        job.task = loop.create_task(run())
        job.task.add_done_callback(_said)
        return job

    def check_not_failed(self, manifest: Manifest, remote: RemoteFile) -> None:
        """Raise the failure of the file's last pull if it failed upstream within FAILED_TTL (UpstreamError:
        a 502, or a 504), or could not be recorded for a full disk (StoreFullError: a 507), rather than pull
        it again at once."""
        if not self.pulling(manifest, remote):
            self._check_not_failed((manifest.repo_id, manifest.commit_id, remote.path))

    def _remember_failure(self, key: tuple[str, str, str], job: PullJob, error: Exception) -> None:
        """Keep a failed pull's error for FAILED_TTL when pulling again at once would only fail again: an
        upstream that gave nothing (an outage mid-file is not that: what landed stays, a client's resume
        starts a pull from there), or one whose file failed its check twice in a row (once is tried again, a
        transfer garbled on the way; huggingface_hub retries for as long as each attempt gets some bytes,
        and each attempt pulled the whole file again)."""
        now = time.monotonic()
        if isinstance(error, IntegrityError) and not isinstance(error, CorruptBlobError):  # (not the store's)
            refuted_before = self._refuted.pop(key, None)
            if refuted_before is None or now - refuted_before > REFUTED_MEMORY:
                self._refuted[key] = now
                return
            self._failed[key] = (now, error)
        elif isinstance(error, UpstreamError) and not _landed(job):
            self._failed[key] = (now, error)
        elif isinstance(error, StoreFullError):
            # A full disk: the pull of a file whose bytes all landed and matched failed only to record them,
            # and each GET after it began again, answered 200 and cut at the held-back last chunk (a client's
            # retries moved 4 GiB in two minutes for a 60 MiB file, and never saw the 507: an explorer's
            # trial). The next ones are told, before any header, until the disk may have room again. (Kept
            # without its traceback, whose frames held the store's index connections after it closed.)
            self._failed[key] = (now, StoreFullError(str(error), repo_id=key[0], path=key[2]))

    def _check_not_failed(self, key: tuple[str, str, str]) -> None:
        now = time.monotonic()
        for old in [k for k, (when, error) in self._failed.items() if now - when > _remembered_for(error)]:
            del self._failed[old]
        for old in [k for k, when in self._refuted.items() if now - when > REFUTED_MEMORY]:
            del self._refuted[old]
        if key not in self._failed:
            return
        when, error = self._failed[key]
        ttl = _remembered_for(error)
        kind: type[DepotError] = type(error) if isinstance(error, UpstreamTimeoutError) else UpstreamError
        if isinstance(error, IntegrityError):
            kind = IntegrityError
        elif isinstance(error, StoreFullError):  # (507: the node's disk, not its upstream)
            kind = StoreFullError
        raise kind(
            f"the pull of {key[2]} failed {now - when:.0f} s ago ({error}); it is tried again "
            f"{ttl - (now - when):.0f} s from now",
            repo_id=key[0],
            path=key[2],
        )

    async def started(
        self, manifest: Manifest, remote: RemoteFile, offset: int = 0, since: float | None = None
    ) -> PullJob:
        """Start the file's pull (or join it) and wait until it writes (its partial exists) or ends, and
        raise what a failed pull raised: an answer's headers wait for this, so a pull that cannot start (a
        full disk) is an error status, not a body that ends at 0 bytes. Then wait until FIRST_BYTES_PATIENCE
        after ``since`` (a ``time.monotonic()``: when the request came; now by default) for the chunk
        holding byte ``offset`` to land, so that a pull failing upstream from its start is a 502, not a 200
        cut short (after that the headers go: a client's timeouts must not expire). Returns the pull, for
        :meth:`read`."""
        job = self._job(manifest, remote)
        assert job.task is not None
        source = await self._writing(job)
        assert source.task is not None
        began = time.monotonic() if since is None else since
        deadline = began + FIRST_BYTES_PATIENCE
        partial = source.partial
        with (
            wanted(partial, offset // partial.chunk_size) if partial is not None else contextlib.nullcontext()
        ):
            while (
                not job.task.done()
                and partial is not None
                and not source.task.done()
                and offset // partial.chunk_size not in partial.done
                and not following.coming(partial, offset, time.monotonic() - began)
                and (left := deadline - time.monotonic()) > 0
            ):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(source.wait(), min(left, following.AHEAD_LOOK))
        if job.task.done():
            job.task.result()
        return job

    async def _writing(self, job: PullJob) -> PullJob:
        """Wait until the bytes of ``job``'s file are being written, by its pull or by another of the same
        content (the same tokenizer under two names: its pull waits for that one's claim, writing nothing
        meanwhile, and a reader waiting for it sent no headers for a minute, then a 408), or the pull
        ended; returns the job whose partial holds them."""
        assert job.task is not None
        while job.partial is None and not job.task.done():
            writing = self._same_content(job)
            if writing is not None:
                return writing
            if await asyncio.to_thread(self._held_elsewhere, job):
                return job  # (its bytes are followed in the other process's download: follow_elsewhere)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(job.wait(), following.SIBLING_LOOK)
        return job

    def _held_elsewhere(self, job: PullJob) -> bool:
        """Whether another process (a `modeldepot pull` on the same store) downloads ``job``'s content, so
        that ``job``'s pull waits for it: a reader waited for that whole download, sent nothing, and heard
        the request deadline's 408 after a minute (a trial, with a pull capped by --max-rate)."""
        sha256 = job.remote.sha256
        return sha256 is not None and self.depot.store.partials.downloading(sha256)

    def _same_content(self, job: PullJob) -> PullJob | None:
        """A running pull of another name of ``job``'s content that writes it now."""
        mine = job.remote
        for other in self._jobs.values():
            theirs = other.remote
            if (other is not job and other.partial is not None and other.task is not None
                    and not other.task.done() and theirs.size == mine.size
                    and (theirs.sha256, theirs.git_oid if theirs.sha256 is None else None)
                    == (mine.sha256, mine.git_oid if mine.sha256 is None else None)):  # fmt: skip
                return other
        return None

    async def read(
        self,
        manifest: Manifest,
        remote: RemoteFile,
        start: int,
        end: int,
        job: PullJob,
        since: float | None = None,
    ) -> AsyncIterator[memoryview]:
        """Bytes ``start..end`` (inclusive) of the file, as its pull ``job`` (:meth:`started`'s) lands and
        checks them. ``since``: when (``time.monotonic()``) the request came."""
        reading = Reading(manifest.repo_id, remote.path, resumes=start > 0 and end == remote.size - 1)
        key = (manifest.repo_id.lower(), remote.path)
        self._readings.setdefault(key, set()).add(reading)
        noted = completed = False
        try:
            async for block in self._read(manifest, remote, start, end, job, reading, since):
                yield block
            completed = True
        except Exception as error:
            if reading.unproven:
                self._note_broken(reading)
                noted = True
                log.info("%s/%s: the transfer failed after unproven bytes were sent (%s: %s): the response "
                         "breaks, and for an hour a resume of the file is answered whole, never a range a "
                         "client could join to them", manifest.repo_id, remote.path, type(error).__name__,
                         error)  # fmt: skip
            raise
        finally:
            if reading.unchecked and not noted and not completed:
                # The client left (or the answer broke) with bytes a check may still refute: they are checked
                # once their chunk lands (or the pull ends), the file noted broken only if they are refuted
                # (every client that left on a slow link had its next resume answered whole, an explorer's trial)
                task = asyncio.get_running_loop().create_task(self._check_later(job, reading, key))
                self._checks.add(task)
                task.add_done_callback(self._checks.discard)
            else:
                self._forget_reading(key, reading)

    def _forget_reading(self, key: tuple[str, str], reading: Reading) -> None:
        reading.let_go()
        readings = self._readings.get(key)
        if readings is not None:
            readings.discard(reading)
            if not readings:
                del self._readings[key]

    async def _check_later(self, job: PullJob, reading: Reading, key: tuple[str, str]) -> None:
        """Check the bytes ``reading`` sent that a check may still refute (its client left): noted broken when
        they are refuted, or cannot be checked."""
        try:
            refuted = await self._sent_refuted(job, reading)
        except Exception as error:  # (cannot say: taken as refuted)
            log.info(
                "%s: bytes sent before a check could not be checked (%s): taken as refuted",
                reading.path,
                error,
            )
            refuted = True
        finally:
            self._forget_reading(key, reading)
        if refuted:
            self._note_broken(reading)

    async def _sent_refuted(self, job: PullJob, reading: Reading) -> bool:
        for sent in list(reading.ahead):
            source, partial = sent.job, sent.job.partial
            if partial is None:
                continue  # (bytes go ahead of a partial's chunks alone)
            assert source.task is not None
            while sent.index not in partial.done and not source.task.done():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(source.wait(), following.AHEAD_LOOK)
            if source.task.done() and (source.task.cancelled() or source.task.exception() is not None):
                return True
            fd = open_partial(partial) if not source.task.done() else None
            if fd is None:  # (placed in the store: read there)
                if source.remote.sha256 is None:
                    return True  # (a git file: never sent ahead, one small chunk)
                fd = os.open(self.depot.store.blobs.path(source.remote.sha256), os.O_RDONLY | os.O_CLOEXEC)
            landed = blake3.blake3()
            try:
                async for block in pread_blocks(fd, sent.first, sent.end - 1):
                    landed.update(block)
            finally:
                os.close(fd)
            if landed.digest() != sent.hash.digest():
                return True
        if reading.elsewhere and not reading.elsewhere_checked:
            assert job.task is not None
            await asyncio.wait({job.task})
            if job.task.cancelled() or job.task.exception() is not None:
                return True
            digests = await asyncio.to_thread(self.depot.store.chunk_digests, job.remote.sha256 or "")
            return any(
                index >= len(digests) or digests[index] != sent for index, sent in reading.elsewhere.items()
            )
        return False

    async def _read(
        self, manifest: Manifest, remote: RemoteFile, start: int, end: int, job: PullJob, reading: Reading,
        since: float | None,
    ) -> AsyncIterator[memoryview]:  # fmt: skip
        assert job.task is not None
        if remote.size == 0:
            await job.task
            return
        first = start == 0  # (a download's first range: one use of the file, whatever ranges follow)
        while True:
            source = await self._writing(job)  # (this pull's, or one of the same content under another name)
            assert source.task is not None
            partial = source.partial
            if partial is None and not source.task.done():  # another process downloads it (_writing)
                # (closed when this reader stops, at once: the reader it holds between chunks with it)
                async with contextlib.aclosing(
                    follow_elsewhere(self.depot.store.partials, source, start, end, reading)
                ) as blocks:
                    async for block in blocks:
                        start += len(block)
                        yield block
                continue  # (its pull ended, or took the download over: read on from there)
            fd = open_partial(partial) if partial is not None and not source.task.done() else None
            if fd is None:
                # Raises what the pull raised. Shielded: a reader that leaves must not cancel the shared pull,
                # which may still be finishing (its partial moved into the store, its task not yet done).
                await asyncio.shield(job.task)
                async for block in self._from_store(manifest, remote, start, end, reading, first):
                    yield block
                return
            try:
                # (another repo's pull of the same content: its scan's node vouches for nothing of this one's)
                async for block in follow(source, fd, start, end, reading, own=source is job, since=since):
                    yield block
                if first:  # (a use, as a download's first answer from the store counts one as it opens)
                    self._count_when_pulled(job, manifest, remote)
                return
            except Exception:
                if source is job or reading.sent:
                    raise
                # The other name's pull failed before a byte of it went out: this file's own pull goes on
                # (it waited for that one's claim), and is followed now.
            finally:
                os.close(fd)

    def _count_when_pulled(self, job: PullJob, manifest: Manifest, remote: RemoteFile) -> None:
        """Count the use once the file's own pull published it: an answer that followed another name's pull of
        the same content ends before this one's pull recorded the file (its use went uncounted, a review)."""
        assert job.task is not None

        def pulled(task: asyncio.Task[PullResult]) -> None:
            if task.cancelled() or task.exception() is not None:
                return
            self._uncounted.setdefault((manifest.repo_id, manifest.commit_id), []).append(remote.path)
            if self._counting is None or self._counting.done():
                self._counting = asyncio.get_running_loop().create_task(self._count_uncounted())
                self._checks.add(self._counting)
                self._counting.add_done_callback(self._checks.discard)

        job.task.add_done_callback(pulled)

    async def _count_uncounted(self) -> None:
        """Count the uses of the files pulled meanwhile, together, COUNT_EVERY apart: a use names the file's
        variant, which the commit's files grouped tell, read again for each file new to them: counted one by
        one, the files of a repo fetched through the mirror cost its whole listing each (a repo of 2,500 files
        took 230 s through a mirror, 15 s from its node: an explorer's trial)."""
        while self._uncounted:
            await asyncio.sleep(COUNT_EVERY)
            batch, self._uncounted = self._uncounted, {}
            await asyncio.to_thread(self._count_sent, batch)

    def _count_sent(self, batch: dict[tuple[str, str], list[str]]) -> None:
        """Count a use of each file a pull-through answer sent whole or from its start (each file's first answer
        on a mirror is one: `stats` and `--preload-top` missed every model's first use, an explorer's trial)."""
        for (repo_id, commit_id), paths in batch.items():
            for path in paths:
                try:
                    self.depot.count_sent(self.depot.file_info(repo_id, path, commit_id))
                except (DepotError, OSError) as error:  # (removed meanwhile, say: no use to count)
                    log.debug("%s: its use was not counted: %s", path, error)

    async def _from_store(
        self,
        manifest: Manifest,
        remote: RemoteFile,
        start: int,
        end: int,
        reading: Reading | None = None,
        counts_as_use: bool = True,
    ) -> AsyncIterator[memoryview]:
        """The stored file's bytes, each chunk checked against its BLAKE3 before it is yielded. ``reading``:
        its chunks already sent from another process's download (index -> the BLAKE3 it logged) must be the
        stored blob's, or the answer breaks (that download may have started over after they went)."""
        entry = await asyncio.to_thread(
            self.depot.file_info, manifest.repo_id, remote.path, manifest.commit_id
        )
        reader = await asyncio.to_thread(
            functools.partial(self.depot.open_verified, entry, counts_as_use=counts_as_use)
        )
        try:
            if reading is not None:
                check_sent_elsewhere(remote.path, reading.elsewhere, reader.digest)
                reading.elsewhere_checked = True
            for index in reader.chunks_of(start, end):
                view = await asyncio.to_thread(reader.checked_view, index)
                offset, length = reader.span(index)
                lo, hi = max(start, offset), min(end, offset + length - 1)
                yield view[lo - offset : hi - offset + 1]
        finally:
            reader.close()

    async def close(self) -> None:
        """Wait for running pulls to stop (cancelled: their finished chunks stay for a resume); scans still
        waiting for an upstream are left to their threads' timeouts."""
        tasks = [job.task for job in self._jobs.values() if job.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(self.scans.close(), *tasks, return_exceptions=True)
        # (the later checks of bytes sent ahead end with their pulls: unchecked, their files are noted broken)
        await asyncio.gather(*self._checks, return_exceptions=True)


def _remembered_for(error: Exception) -> float:
    """Seconds a file's failed pull is the answer for it: an upstream out of reach (restarting, say) is asked
    again sooner (remembered for FAILED_TTL, its 3 s restart made 25 s of errors: an explorer's trial)."""
    return UNREACHABLE_TTL if isinstance(error, UpstreamError) and error.network else FAILED_TTL


def _landed(job: PullJob) -> bool:
    """Whether ``job``'s pull landed a chunk, or kept part of one (a link capped or slow lands no 16 MiB
    chunk for seconds: an outage then was remembered as a pull that gave nothing, and every request for the
    file failed for FAILED_TTL after the upstream was back, an explorer's trial)."""
    return job.partial is not None and (
        len(job.partial.done) > job.found_chunks or job.partial.part_bytes() > job.found_part_bytes
    )
