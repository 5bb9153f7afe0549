"""Mirror mode: a file the store lacks is pulled through the source chain while it is being read.

A reader asks for a byte range of a file at a revision. If the store has the file, the bytes come from
the store. If not, one pull of that file starts (or is joined: every reader of the same file shares it)
and the reader follows the partial file as chunks land, each chunk handed out once it is written and,
from a depot node, checked against the node's BLAKE3. The last chunk of a response that ends at the file's
end, or that holds a chunk no node's digest vouched for (a Hub source's), is held back until the whole file
has matched the upstream's SHA-256 (or git oid): a reader never receives a complete response that is wrong;
if the check fails, the stream breaks instead. (A range inside the file whose every chunk a node vouched
for goes as its chunks land: a header read of a big file must not wait for all of it.) The pull runs to its
end even if every reader leaves, so the next reader finds the file in the store.

A chunk slow to land (a slow upstream: 16 MiB take 16 s at 1 MiB/s, and four chunks at once share the link) is
followed as its bytes come, after AHEAD_PATIENCE, so that a client's read timeout never waits for a whole
chunk; those bytes are unproven, as a Hub source's, and once the chunk lands what went out is compared with
it (checked against its digest, or, the Hub's, by the whole file's check): a difference (a source that lied
and was replaced, a transfer that started over) breaks the answer. A client that left before that check has
its bytes checked later, and the file noted broken only if they are refuted; until then a resume of the file
waits, then is asked to retry (a 429).

A broken response may have handed out bytes the check then refuted, and a client resumes: huggingface_hub
asks for ``Range: bytes=N-`` and joins the answer to what it holds. So a file whose response broke after
sending unvouched bytes, or whose pull failed after any reader had such bytes of it (a client that left
earlier resumes too), is :meth:`Mirror.broke` for a while: a resume (``bytes=N-``) is answered whole, and
huggingface_hub starts the file over. A closed range (``bytes=a-b``, HfFileSystem's reads) is answered as
asked: a client takes a 200 for the range it asked for. The node remembers these files in its home
(:mod:`modeldepot.mirror_marks`), so that a client resuming after the node restarted is answered whole too,
with what each broken answer sent: once the store holds the file, a resume by commit has that checked
against it, and answered as asked when all of it is the file's (:meth:`Mirror.proven_by_store`).

The upstream is untrusted in time as well as in content: requests share one scan per (repo, revision), run
on threads of their own; a request the store could answer waits for it a few seconds (HELD_PATIENCE), and
a pull that failed before a chunk landed, or a scan no upstream answered, answers its failure for FAILED_TTL
instead of being tried again by every retry of every client.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import blake3

from modeldepot.depot import Depot
from modeldepot.errors import (
    AccessDeniedError,
    ChunkNotAvailableError,
    CorruptBlobError,
    DepotError,
    EntryNotFoundError,
    IntegrityError,
    NotFoundError,
    OfflineError,
    RepoNotFoundError,
    StoreFullError,
    UpstreamError,
    UpstreamTimeoutError,
)
from modeldepot.hashing import chunk_span
from modeldepot.hub.manifest import Manifest, RemoteFile
from modeldepot.mirror_marks import BrokenMarks, Sent, Span
from modeldepot.store import FileEntry
from modeldepot.store.forking import ForkSafeExecutor
from modeldepot.store.partials import ResumablePartial
from modeldepot.store.publish import DEFAULT_BRANCH, publish_branch
from modeldepot.transfer.outage import QUICK_REFUSALS
from modeldepot.transfer.pull import PullResult, PullUpdate, revision_spec
from modeldepot.upstream import branch_set_by
from modeldepot.validation import is_commit_id, validate_path

__all__ = ["Mirror"]

READ_BLOCK = 1024 * 1024
SIBLING_LOOK = 0.25  # seconds between looks for another pull writing the content a waiting pull waits for
# Upstream scans at once, on threads of their own: a hung upstream holds them (each for its sources' timeouts,
# a minute), never the loop's default pool that every read of the store uses. More wait their turn: an
# upstream that hangs on some repos only delays the scans of the others once it holds all of them
SCAN_THREADS = 16
# Seconds a file whose pull failed upstream before a chunk landed (or failed its check twice) answers that
# failure: a client's immediate retries each pulled the whole file again, and each got a 200 cut short
FAILED_TTL = 20.0
UNREACHABLE_TTL = 2.0  # ... and one the upstream could not be reached for, this long
REFUTED_MEMORY = 300.0  # seconds a file that failed its check is remembered: a second failure is kept
# Seconds a request for something the store holds waits for the upstream's scan before the store answers (an
# upstream that accepts and never answers: huggingface_hub gives up on a HEAD after 10 s)
HELD_PATIENCE = 5.0
# Seconds an answer's headers wait for the first bytes of a pull (so that a pull failing from its start is a
# 502): under a client's 10 s timeouts
FIRST_BYTES_PATIENCE = 5.0
# Seconds a reader waits for the chunk it reads to land before it follows that chunk's bytes as they come, and
# between two looks at them then (under a client's 10 s read timeout: a slow upstream's chunk takes longer)
AHEAD_PATIENCE = 2.0
AHEAD_LOOK = 0.5
# Seconds a reader following another process's download of its file waits for that download to land a
# chunk (a suspended `modeldepot pull`): then the answer breaks, and its client tries again later
STILL_ELSEWHERE = 60.0

log = logging.getLogger(__name__)


@dataclass
class _Job:
    remote: RemoteFile
    task: asyncio.Task[PullResult] | None = None
    partial: ResumablePartial | None = None
    # The files (repo id, path) whose readers were given bytes of this pull before its whole-file check (its
    # own, or another name of the same content: Mirror._writing), and those readings
    handed_out: dict[tuple[str, str], list[_Reading]] = field(default_factory=dict)
    found_chunks: int = 0  # chunks its partial held when it began (a resume's)
    found_part_bytes: int = 0  # bytes of parts of chunks its partial held when it began
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

    def __init__(self, depot: Depot, deadline: float = 60.0) -> None:
        """``deadline``: the seconds a request may take before its answer (a server's request deadline)."""
        self.depot = depot
        # Seconds a request the store cannot answer waits for the upstream's scan: under the request's
        # deadline, so that it hears 504 UpstreamTimeout (and not the deadline's 408, which says it was slow)
        self.scan_patience = max(1.0, deadline - 5.0)
        self._manifests: dict[tuple[str, str], tuple[float, Manifest]] = {}
        self._scans: dict[tuple[str, str], asyncio.Task[Manifest]] = {}  # the running one per key
        self._scan_began: dict[tuple[str, str], float] = {}  # when it began (monotonic)
        # (repo, revision) -> (when (monotonic), the error) of a scan no upstream answered lately
        self._scan_failed: dict[tuple[str, str], tuple[float, UpstreamError]] = {}
        self._scan_threads = ForkSafeExecutor(SCAN_THREADS, thread_name_prefix="mirror-scan")
        self._stopping = False
        self._jobs: dict[tuple[str, str, str], _Job] = {}
        # (repo id, commit, path) -> (when (monotonic), the failure) of a pull that failed upstream lately
        self._failed: dict[
            tuple[str, str, str], tuple[float, UpstreamError | IntegrityError | StoreFullError]
        ] = {}
        self._refuted: dict[tuple[str, str, str], float] = {}  # -> when its pull's file last failed its check
        self._marks = BrokenMarks(depot.home)
        # The responses of each file (repo id in lower case, path) under way, or ended with bytes a check may
        # still refute and checked later: a resume of the file waits for them (its client may have timed out
        # while its response waited, and resume before that response noticed it left: a review's trial)
        self._readings: dict[tuple[str, str], set[_Reading]] = {}
        self._checks: set[asyncio.Task[None]] = set()
        self._hidden_checked: dict[str, float] = {}  # repo id in lower case -> when (monotonic) asked again

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
            await asyncio.sleep(AHEAD_LOOK)
        return True

    def _note_broken(self, reading: _Reading) -> None:
        self._marks.note(reading.repo_id, reading.path, reading.evidence())

    def _note_handed_out(self, job: _Job) -> None:
        """Mark each file whose readers were given bytes of ``job`` before its check, with all they sent."""
        for (repo_id, path), readings in sorted(job.handed_out.items(), key=lambda item: item[0]):
            sent = Sent()
            for reading in readings:
                sent.merge(reading.evidence())
            self._marks.note(repo_id, path, sent)

    async def proven_by_store(self, repo_id: str, commit_id: str, path: str) -> bool:
        """Whether the store holds the file at ``commit_id`` and every byte its broken answers sent is that
        file's: the mark is lifted then (a resume is answered as asked), and made for good when one is not
        (:mod:`modeldepot.mirror_marks`)."""
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

    async def manifest(self, repo_id: str, revision: str, held: bool = False) -> Manifest:
        """The upstream's view of ``repo_id`` at ``revision`` (a branch's scan is reused briefly). Requests
        for the same (repo, revision) share one scan; one that waited long enough for it (until HELD_PATIENCE
        after the scan began when the store ``held`` an answer, else :attr:`scan_patience`) raises
        UpstreamTimeoutError (504) while the scan goes on, for the requests that follow."""
        key = (repo_id, revision)
        cached = self._manifests.get(key)
        ttl = self.depot.config.mirror_ttl
        if cached is not None and (is_commit_id(revision) or time.monotonic() - cached[0] < ttl):
            return cached[1]
        failed = self._scan_failed.get(key)
        if failed is not None and time.monotonic() - failed[0] < FAILED_TTL:
            # (a hung upstream's scan took each of a client's retries its whole timeout again: 30 s each, a
            # download failing after 200 s, an explorer's trial)
            again = time.monotonic() - failed[0]
            kind = UpstreamTimeoutError if isinstance(failed[1], UpstreamTimeoutError) else UpstreamError
            raise kind(f"{failed[1]} (a scan {again:.0f} s ago; asked again {FAILED_TTL - again:.0f} s from now)",
                       repo_id=repo_id, source=failed[1].source)  # fmt: skip
        if self._stopping:  # (a request that came as the node began to stop: no new scan to wait for)
            raise UpstreamTimeoutError(f"the node is stopping: {repo_id} at {revision} is not looked up upstream",
                                       repo_id=repo_id)  # fmt: skip
        scan = self._scans.get(key)
        if scan is None:
            scan = self._scans[key] = asyncio.get_running_loop().create_task(self._scan(key))
            scan.add_done_callback(_retrieved)
            self._scan_began[key] = time.monotonic()
        patience = self.scan_patience
        if (
            held
        ):  # (counted from the scan's start: a hung upstream costs the store's answers 5 s once, not each)
            began = self._scan_began.get(key, time.monotonic())
            patience = max(0.0, min(HELD_PATIENCE, self.scan_patience) - (time.monotonic() - began))
        try:
            return await asyncio.wait_for(asyncio.shield(scan), patience)
        except TimeoutError:
            raise UpstreamTimeoutError(
                f"no upstream described {repo_id} at {revision} in time (the node goes on asking: try again)",
                repo_id=repo_id,
            ) from None
        except asyncio.CancelledError:
            if not scan.cancelled():  # (this request was cancelled, not the shielded scan)
                raise
            # (the scan was: the node stops, see stop_scans)
            raise UpstreamTimeoutError(
                f"the node is stopping, and no upstream described {repo_id} at {revision} before",
                repo_id=repo_id,
            ) from None

    async def _scan(self, key: tuple[str, str]) -> Manifest:
        try:
            loop = asyncio.get_running_loop()
            try:
                manifest = await loop.run_in_executor(self._scan_threads, self.depot.manifest_for, *key)
            except (RepoNotFoundError, AccessDeniedError) as error:
                # The upstream no longer shows the repo to this node (made private beyond its credentials, or
                # deleted): what the store pulled of it is served behind the node's token alone from now on.
                # Only when the upstream it came from says so: another's "not here", with that one out of
                # reach, hid a public repo for good (an explorer's trial)
                said_by = error.denied_by or ((error.source,) if error.source else ())
                await self._hide(
                    key[0], "no longer shown by the upstream", pulled_from_here=True, said_by=said_by
                )
                raise
            except UpstreamError as error:
                # (no answer at all: an outage, not this node's offline mode, answered at once as it is)
                if error.status is None and not isinstance(error, OfflineError):
                    self._scan_failed[key] = (time.monotonic(), error)
                    if len(self._scan_failed) > 1000:
                        self._scan_failed.pop(next(iter(self._scan_failed)))
                raise
            if manifest.private or manifest.gated:
                # (what the store holds of it answers commit ids and listings: behind the token now, too)
                await self._hide(manifest.repo_id, "private upstream now")
            self._manifests[key] = (time.monotonic(), manifest)
            self._scan_failed.pop(key, None)
            return manifest
        finally:
            if self._scans.get(key) is asyncio.current_task():  # (not a newer scan of the key)
                del self._scans[key]
                self._scan_began.pop(key, None)

    async def recheck_hidden(self, repo_id: str) -> bool:
        """Whether ``repo_id``, hidden on its upstream's word (``repos.hidden_at``: a "not found" once, a
        wrong token, a repo private for a while), is shown again: its upstream is asked again, once a TTL
        at most, before a request that may not see it is refused (hidden for good, only `rm` brought it
        back: an explorer's trial). Shown there, it is public here again (:meth:`Upstream.scan`)."""
        store, key, now = self.depot.store, repo_id.lower(), time.monotonic()
        last = self._hidden_checked.get(key)
        if store.read_only or (last is not None and now - last < self.depot.config.mirror_ttl):
            return False  # (a read-only store: as it is, its schema maybe one before hidden_at)
        if not await asyncio.to_thread(store.hidden_by_upstream, repo_id):
            return False
        self._hidden_checked[key] = now
        if len(self._hidden_checked) > 1000:
            self._hidden_checked.pop(next(iter(self._hidden_checked)))
        with contextlib.suppress(DepotError, TimeoutError):  # (still hidden, or no answer: as it was)
            await asyncio.wait_for(asyncio.shield(self.manifest(repo_id, DEFAULT_BRANCH)), HELD_PATIENCE)
        return not await asyncio.to_thread(store.repo_private, repo_id)

    async def _hide(
        self, repo_id: str, why: str, pulled_from_here: bool = False, said_by: tuple[str, ...] = ()
    ) -> None:
        """Make a repo the store pulled private (not one imported here: the node's own); ``pulled_from_here``:
        only when pulled from one of this node's upstreams (one pulled from elsewhere they need not know),
        and that one is among ``said_by``, the URLs of the answers that said it is gone."""
        store, config = self.depot.store, self.depot.config
        upstreams = {url.rstrip("/") for url in (*config.servers, config.hub_endpoint)}

        def hide() -> bool:
            rows = store.index.read("SELECT origin FROM repos WHERE repo_id = ? COLLATE NOCASE", (repo_id,))
            if not rows or rows[0]["origin"] == "import":
                return False
            origin = rows[0]["origin"].rstrip("/")
            if pulled_from_here and (
                origin not in upstreams
                or not any(url.startswith(f"{origin}/") or url == origin for url in said_by)
            ):
                return False
            return store.hide_repo(repo_id)

        if await asyncio.to_thread(hide):
            log.warning("%s is %s: this node serves it behind its token from now on (without one, to no one)",
                        repo_id, why)  # fmt: skip

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

        await asyncio.to_thread(check)

    def _job(self, manifest: Manifest, remote: RemoteFile) -> _Job:
        key = (manifest.repo_id, manifest.commit_id, remote.path)
        job = self._jobs.get(key)
        if job is not None:
            return job
        self._check_not_failed(key)
        job = self._jobs[key] = _Job(remote)
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
                if job.partial is not None and job.partial.resets:
                    # The file failed its check once, and was fetched again: a client that left before with
                    # bytes of the first fetch resumes onto them (a review's trial)
                    self._note_handed_out(job)
                await self.point_branches(manifest)
                return result
            except Exception as error:
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

    def _branches_at(self, manifest: Manifest) -> list[Manifest]:
        """The scans of branches of ``manifest``'s repo kept now (within ``MODELDEPOT_MIRROR_TTL``) that saw
        them at ``manifest``'s commit, but ``manifest`` itself (a pull by a branch points that one)."""
        ttl, now = self.depot.config.mirror_ttl, time.monotonic()
        repo, found = manifest.repo_id.lower(), {}
        for (_, revision), (when, scan) in self._manifests.items():
            if (now - when < ttl and scan is not manifest and branch_set_by(revision) is not None
                    and scan.revision == revision and scan.commit_id == manifest.commit_id
                    and scan.repo_id.lower() == repo):  # fmt: skip
                found[revision] = scan
        return [found[name] for name in sorted(found)]

    async def point_branches(self, manifest: Manifest, its_own: bool = False) -> None:
        """Point at the commit ``manifest``'s pull published every branch a scan kept now saw there. A client
        describes a branch (huggingface_hub's model_info, a HEAD by the branch) and then fetches its files by
        the commit id it was given: pulled by that id, the commit was held whole with no branch naming it
        when another branch of the repo was scanned in between (the repo's saved scan is its last one), and
        in an upstream outage a request by the branch was a 502 (an explorer's trial). Several branches at
        one commit are each pointed; none moves back over a commit the store learned of after the scan
        that saw it (:func:`publish_branch`). ``its_own``: ``manifest``'s own branch too (a file of it served
        from the store, which held its commit: no pull points it)."""
        scans = self._branches_at(manifest)
        if its_own and branch_set_by(manifest.revision) is not None:
            scans.append(manifest)
        if scans:
            await asyncio.to_thread(self._point, manifest, scans)

    def _point(self, manifest: Manifest, scans: list[Manifest]) -> None:
        store = self.depot.store
        for scan in scans:
            try:
                with contextlib.suppress(NotFoundError):
                    if store.resolve(manifest.repo_id, scan.revision) == manifest.commit_id:
                        continue  # (a read, not a write each file: a snapshot_download of 300 made 300)
                publish_branch(store, revision_spec(scan, scan.revision))
            except (DepotError, OSError) as error:  # (the file is pulled: only the branch is not recorded)
                log.warning("%s: %s is at %s upstream, and could not be recorded so: %s", manifest.repo_id,
                            scan.revision, manifest.commit_id[:12], error)  # fmt: skip

    def check_not_failed(self, manifest: Manifest, remote: RemoteFile) -> None:
        """Raise the failure of the file's last pull if it failed upstream within FAILED_TTL (UpstreamError:
        a 502, or a 504), or could not be recorded for a full disk (StoreFullError: a 507), rather than pull
        it again at once."""
        if not self.pulling(manifest, remote):
            self._check_not_failed((manifest.repo_id, manifest.commit_id, remote.path))

    def _remember_failure(self, key: tuple[str, str, str], job: _Job, error: Exception) -> None:
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
    ) -> _Job:
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
            _wanted(partial, offset // partial.chunk_size)
            if partial is not None
            else contextlib.nullcontext()
        ):
            while (
                not job.task.done()
                and partial is not None
                and not source.task.done()
                and offset // partial.chunk_size not in partial.done
                and not _coming(partial, offset, time.monotonic() - began)
                and (left := deadline - time.monotonic()) > 0
            ):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(source.wait(), min(left, AHEAD_LOOK))
        if job.task.done():
            job.task.result()
        return job

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
            if await asyncio.to_thread(self._held_elsewhere, job):
                return job  # (its bytes are followed in the other process's download: _follow_elsewhere)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(job.wait(), SIBLING_LOOK)
        return job

    def _held_elsewhere(self, job: _Job) -> bool:
        """Whether another process (a `modeldepot pull` on the same store) downloads ``job``'s content, so
        that ``job``'s pull waits for it: a reader waited for that whole download, sent nothing, and heard
        the request deadline's 408 after a minute (a trial, with a pull capped by --max-rate)."""
        sha256 = job.remote.sha256
        return sha256 is not None and self.depot.store.partials.downloading(sha256)

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
        self, manifest: Manifest, remote: RemoteFile, start: int, end: int, job: _Job
    ) -> AsyncIterator[memoryview]:
        """Bytes ``start..end`` (inclusive) of the file, as its pull ``job`` (:meth:`started`'s) lands and
        checks them."""
        reading = _Reading(manifest.repo_id, remote.path, resumes=start > 0 and end == remote.size - 1)
        key = (manifest.repo_id.lower(), remote.path)
        self._readings.setdefault(key, set()).add(reading)
        noted = completed = False
        try:
            async for block in self._read(manifest, remote, start, end, job, reading):
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

    def _forget_reading(self, key: tuple[str, str], reading: _Reading) -> None:
        readings = self._readings.get(key)
        if readings is not None:
            readings.discard(reading)
            if not readings:
                del self._readings[key]

    async def _check_later(self, job: _Job, reading: _Reading, key: tuple[str, str]) -> None:
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

    async def _sent_refuted(self, job: _Job, reading: _Reading) -> bool:
        source = reading.ahead_from
        if reading.ahead_unchecked and source is not None and source.partial is not None:
            partial, index = source.partial, reading.ahead_index
            assert source.task is not None and reading.ahead_hash is not None
            while index not in partial.done and not source.task.done():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(source.wait(), AHEAD_LOOK)
            if source.task.done() and (source.task.cancelled() or source.task.exception() is not None):
                return True
            first, end = reading.ahead_span
            fd = _open(partial) if not source.task.done() else None
            if fd is None:  # (placed in the store: read there)
                if source.remote.sha256 is None:
                    return True  # (a git file: never sent ahead, one small chunk)
                fd = os.open(self.depot.store.blobs.path(source.remote.sha256), os.O_RDONLY | os.O_CLOEXEC)
            landed = blake3.blake3()
            try:
                async for block in _pread_blocks(fd, first, end - 1):
                    landed.update(block)
            finally:
                os.close(fd)
            if landed.digest() != reading.ahead_hash.digest():
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
        self, manifest: Manifest, remote: RemoteFile, start: int, end: int, job: _Job, reading: _Reading
    ) -> AsyncIterator[memoryview]:
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
                async with contextlib.aclosing(self._follow_elsewhere(source, start, end, reading)) as blocks:
                    async for block in blocks:
                        start += len(block)
                        yield block
                continue  # (its pull ended, or took the download over: read on from there)
            fd = _open(partial) if partial is not None and not source.task.done() else None
            if fd is None:
                # Raises what the pull raised. Shielded: a reader that leaves must not cancel the shared pull,
                # which may still be finishing (its partial moved into the store, its task not yet done).
                await asyncio.shield(job.task)
                async for block in self._from_store(manifest, remote, start, end, reading, first):
                    yield block
                return
            try:
                # (another repo's pull of the same content: its scan's node vouches for nothing of this one's)
                async for block in self._follow(source, fd, start, end, reading, own=source is job):
                    yield block
                return
            except Exception:
                if source is job or reading.sent:
                    raise
                # The other name's pull failed before a byte of it went out: this file's own pull goes on
                # (it waited for that one's claim), and is followed now.
            finally:
                os.close(fd)

    async def _follow(
        self, job: _Job, fd: int, start: int, end: int, reading: _Reading, own: bool
    ) -> AsyncIterator[memoryview]:
        """Bytes ``start..end`` of ``job``'s partial as its chunks land, for ``reading``. ``own``: ``job`` is
        the pull of the file read (not another name's, whose vouched chunks vouch for nothing here)."""
        partial = job.partial
        assert partial is not None and job.task is not None
        vouched = partial.vouched if own else frozenset()
        chunk_size = partial.chunk_size
        last = end // chunk_size  # the final chunk of this response, whole file or range
        resets = partial.resets
        for index in range(start // chunk_size, last + 1):
            offset, length = chunk_span(index, partial.size, chunk_size)
            lo, hi = max(start, offset), min(end, offset + length - 1)
            position, waiting_since = lo, time.monotonic()
            ahead: blake3.blake3 | None = None  # what went out of the chunk before it landed
            # The final chunk of a response waits for the whole-file check, the others for their own landing:
            # so no response, a range included, ever completes with bytes the upstream's digests have not
            # vouched for. A range that ends inside the file and whose every chunk the scan's node vouched
            # for goes at once (a header read of a big file waited for all of it: clients timed out).
            was_unproven = reading.unproven
            with _wanted(partial, index):  # (fetched next: see ChunkChooser._pick)
                while True:
                    if partial.resets != resets:  # the whole file failed its check: every chunk was dropped
                        # (the pull may fetch it again and succeed: what was sent stays refuted; and a resume's
                        # client may hold bytes of the refuted fetch, which it would join the rest to)
                        if reading.sent or (reading.resumes and job.handed_out):
                            reading.unproven = True
                            if reading.resumes:  # (what its client holds is not known here: never lifted)
                                reading.went_out.forget()
                            raise IntegrityError(f"{reading.path}: the file failed its check after part of "
                                                 "it was sent; the answer breaks")  # fmt: skip
                        resets = partial.resets
                    # (bytes of this chunk sent ahead are compared with it once it lands, below)
                    early = index in vouched and not was_unproven and end < partial.size - 1
                    if index in partial.done and (index != last or early or job.task.done()):
                        break
                    if job.task.done():
                        job.task.result()
                        if index not in partial.done:
                            raise RuntimeError("the pull ended without this chunk")  # pragma: no cover
                    waited = time.monotonic() - waiting_since
                    if waited >= AHEAD_PATIENCE and index not in partial.done:
                        # A chunk slow to land (a slow upstream: 16 MiB at 1 MiB/s, a quarter of it each for
                        # four at once): its bytes go as they come, unproven, so that a client's read timeout
                        # (10 s) never waits for a whole chunk (huggingface_hub timed out again and again, and
                        # below 1 MiB/s failed: an explorer's trial). Never the response's last byte before
                        # the check.
                        received = partial.receiving.get(index)
                        upto = min(hi, end - 1, offset + (received() if received is not None else 0) - 1)
                        if upto >= position:
                            if ahead is None:
                                ahead = blake3.blake3()
                                reading.unproven = reading.ahead_unchecked = True
                                reading.ahead_from, reading.ahead_index, reading.ahead_hash = (
                                    job,
                                    index,
                                    ahead,
                                )
                                _hand_out(job, reading)
                            async for block in _pread_blocks(fd, position, upto):
                                ahead.update(block)
                                position += len(block)
                                # (before the yield: a client that leaves there has had it)
                                reading.ahead_span, reading.sent = (lo, position), True
                                yield block
                            continue
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(job.wait(), max(AHEAD_PATIENCE - waited, 0.0) + AHEAD_LOOK)
            if ahead is not None:
                # What went ahead must be the chunk as it landed (checked against its digest, or the Hub's
                # bytes, which the file's SHA-256 checks): a transfer that started over, or a source found
                # lying, rewrote them. Else the answer breaks, and a resume of it is sent whole.
                landed = blake3.blake3()
                async for block in _pread_blocks(fd, lo, position - 1):
                    landed.update(block)
                if landed.digest() != ahead.digest():
                    raise IntegrityError(f"{reading.path}: bytes sent as they came are not the chunk that "
                                         "landed; the answer breaks")  # fmt: skip
                reading.ahead_unchecked = False
                # Proven now, as if sent once the chunk landed: a range inside the file still goes with its own
                # chunks, not waiting for the whole file's check (a review's trial)
                if index in vouched:
                    reading.unproven = was_unproven
            if index == last and not early:
                job.task.result()  # (the whole file matched)
                _check_sent_elsewhere(reading.path, reading.elsewhere, partial.done.get)
                reading.elsewhere_checked = True
            elif index not in vouched:
                reading.unproven = True
                _hand_out(job, reading)
            # What of the chunk goes out (or went ahead, and matched it) is the chunk as it landed: recorded
            # before it goes, for a mark of the file should the answer break
            landed_as, digest = partial.resets, partial.done.get(index)
            if digest is None:  # pragma: no cover  (a chunk is done here)
                reading.went_out.forget()
            else:
                reading.went_out.add((offset, offset + length, digest))
            try:
                async for block in _pread_blocks(fd, position, hi):
                    reading.sent = True
                    yield block
            finally:  # (a client that left mid-chunk too)
                if partial.resets != landed_as:  # the chunk was dropped while it went: what went is not known
                    reading.went_out.forget()

    async def _follow_elsewhere(
        self, job: _Job, start: int, end: int, reading: _Reading
    ) -> AsyncGenerator[memoryview, None]:
        """Bytes from ``start`` of ``job``'s content as another process's download of it lands them, each
        chunk checked against the BLAKE3 that download logged, until ``job``'s pull ends or takes the
        download over. Never the chunk that ends the response: that one waits for the whole-file check
        (read from the store then, where every chunk sent is compared with the stored blob's first)."""
        assert job.task is not None and job.remote.sha256 is not None
        sha256, partials = job.remote.sha256, self.depot.store.partials
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
                        _hand_out(job, reading)
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

    async def _from_store(
        self,
        manifest: Manifest,
        remote: RemoteFile,
        start: int,
        end: int,
        reading: _Reading | None = None,
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
                _check_sent_elsewhere(remote.path, reading.elsewhere, reader.digest)
                reading.elsewhere_checked = True
            for index in reader.chunks_of(start, end):
                view = await asyncio.to_thread(reader.checked_view, index)
                offset, length = reader.span(index)
                lo, hi = max(start, offset), min(end, offset + length - 1)
                yield view[lo - offset : hi - offset + 1]
        finally:
            reader.close()

    def stop_scans(self) -> None:
        """Give up the scans under way (the node stops: the requests waiting for them hear a 504 now, not
        when a hung upstream's timeouts end). Their threads end with those timeouts."""
        self._stopping = True
        for scan in self._scans.values():
            scan.cancel()
        self._scans.clear()  # (a scan cancelled before it ran never removes itself)
        self._scan_began.clear()

    async def close(self) -> None:
        """Wait for running pulls to stop (cancelled: their finished chunks stay for a resume); scans still
        waiting for an upstream are left to their threads' timeouts."""
        tasks: list[asyncio.Task[PullResult] | asyncio.Task[Manifest]] = list(self._scans.values())
        tasks += [job.task for job in self._jobs.values() if job.task is not None]
        self._scans.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # (the later checks of bytes sent ahead end with their pulls: unchecked, their files are noted broken)
        await asyncio.gather(*self._checks, return_exceptions=True)
        self._scan_threads.shutdown(wait=False, cancel_futures=True)


def _remembered_for(error: Exception) -> float:
    """Seconds a file's failed pull is the answer for it: an upstream out of reach (restarting, say) is asked
    again sooner (remembered for FAILED_TTL, its 3 s restart made 25 s of errors: an explorer's trial)."""
    return UNREACHABLE_TTL if isinstance(error, UpstreamError) and error.network else FAILED_TTL


def _landed(job: _Job) -> bool:
    """Whether ``job``'s pull landed a chunk, or kept part of one (a link capped or slow lands no 16 MiB
    chunk for seconds: an outage then was remembered as a pull that gave nothing, and every request for the
    file failed for FAILED_TTL after the upstream was back, an explorer's trial)."""
    return job.partial is not None and (
        len(job.partial.done) > job.found_chunks or job.partial.part_bytes() > job.found_part_bytes
    )


@dataclass(eq=False)
class _Reading:
    """One response's reading of a file: whether it was handed bytes of a chunk no digest vouched for."""

    repo_id: str
    path: str
    resumes: bool = False  # it answers a resume (bytes=N- of the file): its client holds what went before
    unproven: bool = False
    sent: bool = False  # bytes went out
    # Chunks sent from another process's download of the file: index -> the BLAKE3 it logged for them
    elsewhere: dict[int, str] = field(default_factory=dict)
    ahead_unchecked: bool = False  # bytes of a chunk went out before it landed, not compared with it yet
    elsewhere_checked: bool = False  # the chunks sent from another process's download matched the file
    # What went out ahead of a chunk's landing, not compared yet: the pull whose partial it was, the chunk,
    # the bytes' span (first, end exclusive) and their BLAKE3
    ahead_from: _Job | None = None
    ahead_index: int = -1
    ahead_span: tuple[int, int] = (0, 0)
    ahead_hash: blake3.blake3 | None = None
    # What it sent but from the store: each chunk as it landed, or as another process's download logged it
    went_out: Sent = field(default_factory=Sent)

    def evidence(self) -> Sent:
        """All it sent but from the store, and what it sent ahead of a chunk's landing (mirror_marks)."""
        sent = Sent()
        sent.merge(self.went_out)
        if self.ahead_hash is not None and self.ahead_span[1] > self.ahead_span[0]:
            sent.add((*self.ahead_span, self.ahead_hash.hexdigest()))
        return sent

    @property
    def unchecked(self) -> bool:
        """Bytes went out that a check may still refute: a resume must not be joined to them."""
        return self.ahead_unchecked or (bool(self.elsewhere) and not self.elsewhere_checked)


def _hand_out(job: _Job, reading: _Reading) -> None:
    """``reading`` was given bytes of ``job`` before its whole-file check (see :attr:`_Job.handed_out`)."""
    readings = job.handed_out.setdefault((reading.repo_id, reading.path), [])
    if not any(known is reading for known in readings):
        readings.append(reading)


@contextlib.contextmanager
def _wanted(partial: ResumablePartial, index: int) -> Iterator[None]:
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


def _coming(partial: ResumablePartial, offset: int, waited: float) -> bool:
    """Whether byte ``offset`` of ``partial`` came in (unchecked, its chunk not landed) and a reader that has
    waited ``waited`` seconds follows it (:data:`AHEAD_PATIENCE`): the upstream answers, headers may go."""
    if waited < AHEAD_PATIENCE:
        return False
    index = offset // partial.chunk_size
    received = partial.receiving.get(index)
    return received is not None and index * partial.chunk_size + received() > offset


async def _pread_blocks(fd: int, first: int, last: int) -> AsyncIterator[memoryview]:
    """Bytes ``first..last`` of the file ``fd``, in blocks of :data:`READ_BLOCK` read on worker threads."""
    position = first
    while position <= last:
        data = await asyncio.to_thread(os.pread, fd, min(READ_BLOCK, last - position + 1), position)
        if not data:
            raise OSError(f"the partial file ended at {position}")
        position += len(data)
        yield memoryview(data)


def _check_sent_elsewhere(path: str, sent: dict[int, str], checked: Callable[[int], str | None]) -> None:
    """Every chunk sent from another process's download (index -> the BLAKE3 it logged) must be the file's
    as checked whole (``checked``: a chunk's digest there): that download may have started over after they
    went. Else the answer breaks."""
    if any(checked(index) != digest for index, digest in sent.items()):
        raise IntegrityError(f"{path}: a chunk sent from another process's download is not the file's as "
                             "checked whole; the answer breaks")  # fmt: skip


def _retrieved(task: asyncio.Task[Manifest]) -> None:
    """A scan every waiter gave up on (their patience ran out) failed: its error was said to them already."""
    if not task.cancelled():
        task.exception()


def _open(partial: ResumablePartial) -> int | None:
    try:
        return os.open(partial.paths.data, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None  # already placed in the store
