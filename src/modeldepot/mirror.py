"""Mirror mode: a file the store lacks is pulled through the source chain while it is being read.

A reader asks for a byte range of a file at a revision. If the store has the file, the bytes come from
the store. If not, one pull of that file starts (or is joined: every reader of the same file shares it)
and the reader follows the partial file as chunks land, each chunk handed out once it is written and,
from a depot node, checked against the node's BLAKE3. The last chunk of every response (a whole file or a
range) is held back until the whole file has matched the upstream's SHA-256 (or git oid): a reader never
receives a complete response that is wrong; if the check fails, the stream breaks instead. The pull runs
to its end even if every reader leaves, so the next reader finds the file in the store.

A broken response has still handed out bytes the check then refuted, and a client resumes: huggingface_hub
asks for ``Range: bytes=N-`` and joins the answer to what it holds. So a file whose response broke, or
whose pull failed after any reader had bytes of it (a client that left earlier resumes too), is
:meth:`Mirror.broke` for a while: a resume (``bytes=N-``) is answered whole, and huggingface_hub starts the
file over. A closed range (``bytes=a-b``, HfFileSystem's reads) is answered as asked: a client takes a
200 for the range it asked for. The node remembers these files in its home (``mirror-broken.json``), so
that a client resuming after the node restarted is answered whole too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from modeldepot.depot import Depot
from modeldepot.errors import EntryNotFoundError
from modeldepot.hashing import chunk_span
from modeldepot.hub.manifest import Manifest, RemoteFile
from modeldepot.store.partials import ResumablePartial
from modeldepot.transfer.pull import PullResult, PullUpdate
from modeldepot.validation import is_commit_id, validate_path

__all__ = ["Mirror"]

MANIFEST_TTL = 30.0  # seconds a branch's scan answers misses before the upstream is asked again
READ_BLOCK = 1024 * 1024
# Seconds a file whose response broke is answered whole: longer than clients retry (huggingface_hub
# resumes at once, a user re-running a download within the hour)
BROKEN_TTL = 3600.0
SIBLING_LOOK = 0.25  # seconds between looks for another pull writing the content a waiting pull waits for
# In the store's home: [[repo id in lower case, path, when (seconds since the epoch)], ...]
BROKEN_FILE = "mirror-broken.json"

log = logging.getLogger(__name__)


@dataclass
class _Job:
    remote: RemoteFile
    task: asyncio.Task[PullResult] | None = None
    partial: ResumablePartial | None = None
    # The files (repo id, path) whose readers were given bytes of this pull before its whole-file check (its
    # own, or another name of the same content: Mirror._writing)
    handed_out: set[tuple[str, str]] = field(default_factory=set)
    _event: asyncio.Event = field(default_factory=asyncio.Event)

    def pulse(self) -> None:
        """Wake every reader (called on the loop: a check and a wait never miss a pulse between them)."""
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self) -> None:
        await self._event.wait()


def _said(task: asyncio.Task[PullResult]) -> None:
    """A mirror's pull that failed: its error is what the requests waiting on it answer; one a HEAD started
    and no GET awaited is logged here, once (else asyncio logs it with a traceback, as never retrieved)."""
    if not task.cancelled() and task.exception() is not None:
        log.info("a mirror's pull failed: %s", task.exception())


class Mirror:
    """Pull-through reads for a server. Use from one event loop."""

    def __init__(self, depot: Depot) -> None:
        self.depot = depot
        self._manifests: dict[tuple[str, str], tuple[float, Manifest]] = {}
        self._jobs: dict[tuple[str, str, str], _Job] = {}
        self._broken_file = depot.home / BROKEN_FILE
        self._broken = self._load_broken()  # (repo id in lower case, path) -> when (seconds since the epoch)

    def broke(self, repo_id: str, path: str) -> bool:
        """Whether a response of this file broke lately after handing out bytes (see the module's doc)."""
        when = self._broken.get((repo_id.lower(), path))
        return when is not None and abs(time.time() - when) <= BROKEN_TTL  # (a clock set back: not forever)

    def _note_broken(self, repo_id: str, path: str) -> None:
        now = time.time()
        known = {**self._load_broken(), **self._broken}  # (another node on this store may have written some)
        self._broken = {key: when for key, when in known.items() if abs(now - when) <= BROKEN_TTL}
        self._broken[(repo_id.lower(), path)] = now
        rows = [[repo, file, when] for (repo, file), when in self._broken.items()]
        temporary = self._broken_file.with_name(f".{BROKEN_FILE}.{os.getpid()}.tmp")
        try:  # (rare, and small: written at once, on the loop)
            temporary.write_text(json.dumps(rows))
            os.replace(temporary, self._broken_file)
        except OSError as error:
            log.warning("could not record %s/%s as broken in %s (%s): a resume after a restart would not be "
                        "answered whole", repo_id, path, self._broken_file, error)  # fmt: skip
            with contextlib.suppress(OSError):
                temporary.unlink()

    def _load_broken(self) -> dict[tuple[str, str], float]:
        try:
            rows = json.loads(self._broken_file.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            log.warning("ignoring %s: %s", self._broken_file, error)
            return {}
        broken: dict[tuple[str, str], float] = {}
        for row in rows if isinstance(rows, list) else []:
            if (
                isinstance(row, list)
                and len(row) == 3
                and isinstance(row[0], str)
                and isinstance(row[1], str)
                and isinstance(row[2], (int, float))
            ):
                broken[(row[0], row[1])] = float(row[2])
        return broken

    async def manifest(self, repo_id: str, revision: str) -> Manifest:
        """The upstream's view of ``repo_id`` at ``revision`` (a branch's scan is reused briefly)."""
        key = (repo_id, revision)
        cached = self._manifests.get(key)
        if cached is not None and (is_commit_id(revision) or time.monotonic() - cached[0] < MANIFEST_TTL):
            return cached[1]
        manifest = await asyncio.to_thread(self.depot.manifest_for, repo_id, revision)
        self._manifests[key] = (time.monotonic(), manifest)
        return manifest

    async def remote_file(self, repo_id: str, revision: str, path: str) -> tuple[Manifest, RemoteFile]:
        validate_path(path)
        manifest = await self.manifest(repo_id, revision)
        for remote in manifest.files:
            if remote.path == path:
                return manifest, remote
        raise EntryNotFoundError(repo_id, revision, path, manifest.commit_id)

    def start(self, manifest: Manifest, remote: RemoteFile) -> None:
        """Begin pulling a file (if no pull of it is running) without waiting for it: a HEAD prefetches."""
        self._job(manifest, remote)

    def pulling(self, manifest: Manifest, remote: RemoteFile) -> bool:
        """Whether a pull of the file runs now."""
        return (manifest.repo_id, manifest.commit_id, remote.path) in self._jobs

    async def check_fits(self, manifest: Manifest, remote: RemoteFile) -> None:
        """Refuse (BudgetExceededError: 507) a file the disk budget cannot hold before its pull starts, so
        that a HEAD says what the GET would (a running pull made its room already)."""
        if self.pulling(manifest, remote):
            return
        store, doing = self.depot.store, f"mirroring {remote.path} of {manifest.repo_id}"

        def check() -> None:
            # (content the store holds under another file is reused by the pull: it writes nothing for it)
            held = store.local_digest(remote.sha256, None if remote.sha256 else remote.git_oid)
            # As the pull will write it: the revision it writes into is kept (a HEAD said 200 for a file the
            # GET refused, counting the revision's other files as room)
            with store.budget.writing(manifest.repo_id, manifest.commit_id, [remote.path]) as writer:
                writer.check_fits(0 if held is not None else remote.size, doing)

        await asyncio.to_thread(check)

    def _job(self, manifest: Manifest, remote: RemoteFile) -> _Job:
        key = (manifest.repo_id, manifest.commit_id, remote.path)
        job = self._jobs.get(key)
        if job is not None:
            return job
        job = self._jobs[key] = _Job(remote)
        loop = asyncio.get_running_loop()

        def watch(path: str, partial: ResumablePartial) -> None:
            job.partial = partial
            job.pulse()

        def progress(update: PullUpdate) -> None:
            job.pulse()

        async def run() -> PullResult:
            try:
                return await self.depot.pull_async(manifest.repo_id, None, revision=manifest.revision, progress=progress,
                                                   paths=[remote.path], watch=watch, manifest=manifest)  # fmt: skip
            except Exception:
                # (a client that left before may resume: the bytes it was given were refuted, or unproven)
                for repo_id, path in sorted(job.handed_out):
                    self._note_broken(repo_id, path)
                raise
            finally:
                self._jobs.pop(key, None)
                job.pulse()

        job.task = loop.create_task(run())
        job.task.add_done_callback(_said)
        return job

    async def started(self, manifest: Manifest, remote: RemoteFile) -> None:
        """Wait until the file's pull writes (its partial exists) or ends, and raise what a failed pull raised:
        an answer's headers wait for this, so a pull that cannot start (a full disk) is an error status,
        not a body that ends at 0 bytes."""
        job = self._job(manifest, remote)
        assert job.task is not None
        await self._writing(job)
        if job.task.done():
            job.task.result()

    async def _writing(self, job: _Job) -> _Job:
        """Wait until the bytes of ``job``'s file are being written, by its pull or by another of the same
        content (the same tokenizer under two names: its pull waits for that one's claim, writing nothing
        meanwhile, and a reader waiting for it sent no headers for a minute, then a 408), or the pull
        ended; returns the job whose partial holds them."""
        assert job.task is not None
        while job.partial is None and not job.task.done():
            writing = self._same_content(job)
            if writing is not None:
                return writing
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(job.wait(), SIBLING_LOOK)
        return job

    def _same_content(self, job: _Job) -> _Job | None:
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
        self, manifest: Manifest, remote: RemoteFile, start: int, end: int
    ) -> AsyncIterator[memoryview]:
        """Bytes ``start..end`` (inclusive) of the file, as they become available and checked."""
        sent = False
        try:
            async for block in self._read(manifest, remote, start, end):
                sent = True
                yield block
        except Exception as error:
            if sent:
                self._note_broken(manifest.repo_id, remote.path)
                log.info("%s/%s: the transfer failed after bytes were sent (%s: %s): the response breaks, and "
                            "for an hour the file is answered whole, never a range a client could join to "
                            "them", manifest.repo_id, remote.path, type(error).__name__, error)  # fmt: skip
            raise

    async def _read(
        self, manifest: Manifest, remote: RemoteFile, start: int, end: int
    ) -> AsyncIterator[memoryview]:
        job = self._job(manifest, remote)
        assert job.task is not None
        if remote.size == 0:
            await job.task
            return
        source = await self._writing(job)  # (this pull's, or one of the same content under another name)
        assert source.task is not None
        partial = source.partial
        fd = _open(partial) if partial is not None and not source.task.done() else None
        if fd is None:
            # Raises what the pull raised. Shielded: a reader that leaves must not cancel the shared pull,
            # which may still be finishing (its partial moved into the store, its task not yet done).
            await asyncio.shield(job.task)
            async for block in self._from_store(manifest, remote, start, end):
                yield block
            return
        try:
            async for block in self._follow(source, fd, start, end, (manifest.repo_id, remote.path)):
                yield block
        finally:
            os.close(fd)

    async def _follow(self, job: _Job, fd: int, start: int, end: int,
                      reading: tuple[str, str]) -> AsyncIterator[memoryview]:  # fmt: skip
        """Bytes ``start..end`` of ``job``'s partial as its chunks land, for a reader of ``reading``."""
        partial = job.partial
        assert partial is not None and job.task is not None
        chunk_size = partial.chunk_size
        last = end // chunk_size  # the final chunk of this response, whole file or range
        for index in range(start // chunk_size, last + 1):
            # The final chunk waits for the whole-file check; the others for their own landing. So no
            # response, a range included, ever completes with bytes the upstream's digest has not vouched
            # for (a chunk from a Hub source carries no digest of its own).
            while not (index in partial.done and (index != last or job.task.done())):
                if job.task.done():
                    job.task.result()
                    if index not in partial.done:
                        raise RuntimeError("the pull ended without this chunk")  # pragma: no cover
                await job.wait()
            if index == last:
                job.task.result()
            offset, length = chunk_span(index, partial.size, chunk_size)
            lo, hi = max(start, offset), min(end, offset + length - 1)
            position = lo
            while position <= hi:
                want = min(READ_BLOCK, hi - position + 1)
                data = await asyncio.to_thread(os.pread, fd, want, position)
                if not data:
                    raise OSError(f"the partial file ended at {position}")
                position += len(data)
                job.handed_out.add(reading)
                yield memoryview(data)

    async def _from_store(
        self, manifest: Manifest, remote: RemoteFile, start: int, end: int
    ) -> AsyncIterator[memoryview]:
        """The stored file's bytes, each chunk checked against its BLAKE3 before it is yielded."""
        entry = await asyncio.to_thread(
            self.depot.file_info, manifest.repo_id, remote.path, manifest.commit_id
        )
        reader = await asyncio.to_thread(self.depot.open_verified, entry)
        try:
            for index in reader.chunks_of(start, end):
                view = await asyncio.to_thread(reader.checked_view, index)
                offset, length = reader.span(index)
                lo, hi = max(start, offset), min(end, offset + length - 1)
                yield view[lo - offset : hi - offset + 1]
        finally:
            reader.close()

    async def close(self) -> None:
        """Wait for running pulls to stop (cancelled: their finished chunks stay for a resume)."""
        tasks = [job.task for job in self._jobs.values() if job.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _open(partial: ResumablePartial) -> int | None:
    try:
        return os.open(partial.paths.data, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None  # already placed in the store
