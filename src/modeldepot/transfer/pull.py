"""Pulling variants of an upstream repo into the store: resumable, verified, with live status and progress.

Files whose content the store already holds (by SHA-256, or git oid for plain files) are not downloaded
again, whichever repo they came from. Every other distinct content is claimed in partials/ (one process
transfers it; another pulling the same bytes waits, then finds the blob or resumes where the first
stopped), downloaded from the chain's sources, and the verified files are published as the upstream
commit in one transaction. A failure leaves every completed chunk on disk for the next run.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from modeldepot.counters import PULLS
from modeldepot.errors import (
    ConfigError,
    DepotError,
    IntegrityError,
    OfflineError,
    SharedBlobsRemovedError,
    StoreError,
    UpstreamError,
)
from modeldepot.hashing import BlobDigest
from modeldepot.hub.manifest import IMPORTED_ENDPOINT, INTERRUPTED, Manifest, RemoteFile
from modeldepot.hub.variants import gguf_shard_names, safetensors_shard_names
from modeldepot.modelcard import upstream_card
from modeldepot.openfiles import open_file_limit, raise_open_file_limit
from modeldepot.store.blobs import PartialBlob
from modeldepot.store.budget import BudgetWriter
from modeldepot.store.layout import size_text
from modeldepot.store.locks import process_state
from modeldepot.store.partials import ResumablePartial, partial_key
from modeldepot.store.publish import RevisionSpec, StagedFile, publish, publish_blobs, refuse_nested_branch
from modeldepot.store.store import Store
from modeldepot.transfer.chain import SourceChain
from modeldepot.transfer.choosing import banned
from modeldepot.transfer.download import (
    LEFT_IN_PLACE,
    BytesReceiving,
    FileSource,
    Limits,
    download_file,
)
from modeldepot.transfer.liars import recall_liars
from modeldepot.transfer.outage import run_blocking, run_through_outages
from modeldepot.transfer.progress import STATUS_INTERVAL, PullProgress, PullTracker, PullUpdate
from modeldepot.transfer.ranged import close_idle
from modeldepot.transfer.refetch import FileTry, fetch_again
from modeldepot.transfer.session import LazySession
from modeldepot.transfer.swarm import SwarmFile
from modeldepot.transfer.threads import in_budget_pool, to_thread_to_the_end

log = logging.getLogger(__name__)

__all__ = [
    "PartialWatch",
    "PullProgress",
    "PullResult",
    "PullUpdate",
    "pull_async",
    "revision_spec",
    "run_blocking",
    "run_through_outages",
    "select",
]

T = TypeVar("T")

CLAIM_POLL = 0.25  # seconds between looks at a content another process is transferring
WAIT_SHOWN = 1.0  # seconds between showings of how far that transfer is
STILL_SAID = 120.0  # seconds another process's transfer may stand still before that is said
STANDSTILL_LOOK = 5.0  # seconds a file waits for another process before who holds it is looked at
SAID_AGAIN = 600.0  # seconds before the same holder's standstill is said again (once for all files)
# Seconds between a pull's looks at the contents other pulls wait for (their marks: store/partials.py), once it
# holds some whole and verified: it hands those over to the store rather than at its own publish
HANDOVER_LOOK = 0.5
FILES_AT_ONCE = 32  # files transferring at once (each holds two descriptors; connections are limited apart)
CLAIM_BATCH = 16  # claims taken in one trip to a worker thread


class _Busy:
    """What a try for a claim gets when another process holds it."""


_BUSY = _Busy()
_Taken = ResumablePartial | BlobDigest | _Busy  # a claim, the content's digests (in the store), or _BUSY


PartialWatch = Callable[[str, ResumablePartial], None]
"""Told ``(path, partial)`` when this pull starts writing a file: readers may follow its chunks as they land."""


@dataclass(frozen=True)
class PullResult:
    repo_id: str
    commit_id: str
    variants: tuple[str, ...]
    files: int
    bytes_total: int
    bytes_downloaded: int  # fetched over the network by this pull
    bytes_resumed: int  # found already downloaded in partials/ (an interrupted earlier pull)
    snapshot_path: str
    sources: tuple[str, ...] = field(default=())
    # Bytes of the files by where they came from: "local" (already in the store, resumed, or the same
    # content under another path), "node" (configured servers), "peer" (fleet nodes), "hub". They add
    # up to bytes_total.
    bytes_by_source: dict[str, int] = field(default_factory=dict)
    # In a fleet pulling the same files at once: the claims this pull won and lost, the chunks it fetched
    # from the Hub, and why it fetched one another node had claimed (transfer/swarm.py).
    swarm: dict[str, int] = field(default_factory=dict)
    # False when the snapshot folder could not be made (a full disk, no inode left): the files are published,
    # snapshot_path not made yet (`modeldepot path`, a load or verify makes it once there is room)
    snapshot_built: bool = True

    def to_dict(self) -> dict[str, object]:
        return {**self.__dict__, "variants": list(self.variants), "sources": list(self.sources),
                "bytes_by_source": dict(self.bytes_by_source), "swarm": dict(self.swarm)}  # fmt: skip


def select(
    manifest: Manifest, quants: list[str] | str | None, paths: list[str] | None = None
) -> tuple[list[RemoteFile], list[str]]:
    """The files a pull takes and the variants it completes: ``None`` = the whole repo, ``"all"`` = every
    variant with the shared files, a list = those variants with the shared files; ``paths`` = just those
    files (no variant is completed by them)."""
    if paths is not None:
        return [f for f in manifest.files if f.path in set(paths)], []
    if quants is None:
        return list(manifest.files), [v.name for v in manifest.variants]
    names = (
        [v.name for v in manifest.variants] if quants == "all" else [manifest.variant(q).name for q in quants]
    )
    wanted = {f.path for name in names for f in manifest.files_of(name)}
    wanted.update(manifest.shared)
    return [f for f in manifest.files if f.path in wanted], names


async def pull_async(
    store: Store,
    manifest: Manifest,
    quants: list[str] | str | None,
    branch: str | None,
    chain: SourceChain,
    offline: bool = False,
    progress: PullProgress | None = None,
    limits: Limits | None = None,
    paths: list[str] | None = None,
    watch: PartialWatch | None = None,
) -> PullResult:
    files, names = select(manifest, quants, paths)
    if paths is None and quants is not None and branch is not None:
        files, names = await asyncio.to_thread(_with_held_variants, store, manifest, branch, files, names)
    _say_shards_lacking(manifest, files)
    await asyncio.to_thread(recall_liars, store.layout.home)  # (found by the store's other pulls)
    held: dict[str, int] = {}
    if paths is not None:  # (a mirror's pull of one file: the variants it completes show it)
        names, held = await asyncio.to_thread(_variants_completed, store, manifest, {f.path for f in files})
    with store.budget.writing(manifest.repo_id, manifest.commit_id, (f.path for f in files), names) as writer:
        writer.branch = branch
        return await _pull_writing(store, manifest, files, names, branch, chain, offline, progress, limits,
                                   watch, writer, held)  # fmt: skip


def _with_held_variants(store: Store, manifest: Manifest, branch: str, files: list[RemoteFile],
                        names: list[str]) -> tuple[list[RemoteFile], list[str]]:  # fmt: skip
    """``files`` and ``names``, and the variants the branch's commit in the store held whole whose files the
    store holds at ``manifest``'s commit too (unchanged upstream: nothing to fetch). A pull of one quant
    moved the branch to the new commit without the others: `path` of a file of one failed, and an offline
    load of it said the repo had no such variant, its bytes in the store (an explorer's trial)."""
    try:
        before = store.resolve(manifest.repo_id, branch)
    except DepotError:
        return files, names  # (a repo or a branch new here)
    if before == manifest.commit_id:
        return files, names
    held_before = set(store.file_sizes(manifest.repo_id, before))
    taking = {f.path for f in files}
    more_files, more_names = [], []
    for variant in manifest.variants:
        if variant.name in names or not set(variant.files) <= held_before:
            continue
        needed = [f for f in manifest.files_of(variant.name) if f.path not in taking]
        if all(_stored(store, remote) is not None for remote in needed):
            more_files += needed
            taking.update(f.path for f in needed)
            more_names.append(variant.name)
    if more_names:
        log.info("%s@%s: %s held at %s and unchanged, kept at the new commit (nothing fetched for %s)",
                 manifest.repo_id, manifest.commit_id[:12], ", ".join(more_names), before[:12],
                 "it" if len(more_names) == 1 else "them")  # fmt: skip
    return files + more_files, names + more_names


def _say_shards_lacking(manifest: Manifest, files: list[RemoteFile]) -> None:
    """Warn of a split model whose commit lacks shards (an upload in progress, a shard deleted): its pull
    succeeded and its load failed, saying the store lacked a shard no pull would bring (an explorer's trial)."""
    listed = {f.path for f in manifest.files}
    said: set[str] = set()
    for path in sorted(f.path for f in files):
        shards = gguf_shard_names(path) or safetensors_shard_names(path) or []
        lacking = [shard for shard in shards if shard not in listed]
        if lacking and shards[0] not in said:
            said.add(shards[0])
            log.warning("%s@%s: %s is one of %d shards and the commit lacks %s: no engine loads it until "
                        "the repo has them all", manifest.repo_id, manifest.commit_id[:12], path, len(shards),
                        ", ".join(lacking[:3]) + (" and more" if len(lacking) > 3 else ""))  # fmt: skip


SHARED_REMOVED_TRIES = 3  # publishes a pull tries while files it shares are removed under it

# Descriptors a pull needs besides one per file it fetches: sockets, the index, its status writes, a node's
# connections around it
OTHER_DESCRIPTORS = 256


def _free_room(
    store: Store, repo_id: str, sizes: dict[str, int], short: int, doing: str, repo_keys: set[str]
) -> int:
    """The disk's shortage of room for ``sizes`` (by download key) once the quarantined copies are deleted,
    and, still short, the interrupted downloads of other files: a disk short of room needs theirs more than
    anyone needs a corrupt copy (after a power loss the torn copy of a model kept the room its own pull
    needed, every repair and pull failed for good, until a human ran `gc`: an explorer's trial), or a resume
    of a pull given up (a killed pull's files kept their whole preallocated size a week). Not while another
    repo's pull runs: a download it has not claimed yet is its resume; nor any of this repo's files
    (``repo_keys``), which another pull of it may be about to resume (reviews)."""
    from modeldepot.store.maintenance import drop_abandoned_downloads, drop_quarantine

    freed = drop_quarantine(store)
    if freed:
        log.warning("%s: the disk lacks room: deleted %s of corrupt copies kept in quarantine/", doing,
                    size_text(freed))  # fmt: skip
        short = store.partials.room_short(sizes)[0]
    if (
        short > 0
        and not store.partials.others_pulling(repo_id)
        and (freed := drop_abandoned_downloads(store, spare=set(sizes) | repo_keys))
    ):
        log.warning("%s: the disk lacks room: deleted %s of interrupted downloads of other files (their pulls "
                    "start over)", doing, size_text(freed))  # fmt: skip
        short = store.partials.room_short(sizes)[0]
    return short


def _check_open_file_limit(repo_id: str, fetching: int) -> None:
    """A pull holds each file it fetches open (its lock) until it publishes them together: a repo of more
    files than the process may open failed after minutes ("Too many open files"), 40,000 partial files
    left. Said before a byte moves now (the soft limit raised first, where the hard one allows)."""
    needed = fetching + OTHER_DESCRIPTORS
    if needed <= open_file_limit() or needed <= raise_open_file_limit():
        return
    raise ConfigError(
        f"{repo_id}: a pull holds each of the {fetching} files it fetches open until it publishes them together, "
        f"and this process may hold {open_file_limit()} files (its open-file limit, `ulimit -n`): raise it to "
        f"{needed} or more (the hard limit too, or LimitNOFILE= for a service), or pull part of it at a time (a "
        "variant: --quant; folders or patterns: --include, --exclude; the files pulled stay, and each pull "
        "fetches only what the store lacks)",
        repo_id=repo_id,
    )


def _variants_completed(
    store: Store, manifest: Manifest, pulling: set[str]
) -> tuple[list[str], dict[str, int]]:
    """The variants a pull of ``pulling`` alone completes (every other file of theirs is in the store at the
    commit already), and the bytes each holds already: a mirror fetches a repo file by file, and each
    variant shows as downloading, then downloaded, with the file that completes it."""
    touched = {variant.name: needed for variant in manifest.variants
               if (needed := {f.path for f in manifest.files_of(variant.name)}) & pulling}  # fmt: skip
    # (the sizes of those files alone: a mirror pulls a repo file by file)
    in_store = store.file_sizes(
        manifest.repo_id, manifest.commit_id, set().union(*touched.values()) - pulling
    )
    names: list[str] = []
    held: dict[str, int] = {}
    for name, needed in touched.items():
        if needed <= pulling | in_store.keys():
            names.append(name)
            held[name] = sum(in_store[path] for path in needed - pulling)
    return names, held


async def _pull_writing(store: Store, manifest: Manifest, files: list[RemoteFile], names: list[str],
                        branch: str | None, chain: SourceChain, offline: bool, progress: PullProgress | None,
                        limits: Limits | None, watch: PartialWatch | None, writer: BudgetWriter,
                        held: dict[str, int] | None = None) -> PullResult:  # fmt: skip
    if branch is not None:  # (a branch that cannot sit beside the store's is refused before a byte moves)
        await asyncio.to_thread(refuse_nested_branch, store.index, manifest.repo_id, branch)
    have: dict[str, BlobDigest] = {}
    # (off the loop: a blob not checked since a restart is rehashed before it counts as held)
    found_here = await asyncio.to_thread(lambda: [(remote, _stored(store, remote)) for remote in files])
    for remote, found in found_here:
        if found is not None:
            have[remote.path] = found
    # Kept from eviction, in every process, from here on (publish checks that they stayed)
    await asyncio.to_thread(writer.reuse, [found.sha256 for found in have.values()])
    missing = [f for f in files if f.path not in have]
    if missing and offline:
        named = ", ".join(f.path for f in missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise OfflineError(
            f"offline mode: {len(missing)} file{'s' if len(missing) > 1 else ''} of {manifest.repo_id} "
            f"{'are' if len(missing) > 1 else 'is'} not in the store ({named}): pull it once online "
            "(HF_HUB_OFFLINE and MODELDEPOT_OFFLINE unset)",
            repo_id=manifest.repo_id,
        )
    _check_open_file_limit(manifest.repo_id, len(missing))
    tracker = PullTracker(store, manifest, names, files, progress, held)
    for path, digest in have.items():
        tracker.done[path] = digest.size
        tracker.by_source["local"] = tracker.by_source.get("local", 0) + digest.size
        PULLS.add_bytes("local", digest.size)
        tracker.path_sources[path] = {"local": digest.size}
    new_bytes = {f.sha256 or f.git_oid: f.size for f in missing}
    writer.contents = new_bytes  # (another pull of them shares their downloads: its room is theirs too)
    with store.partials.pulling(manifest.repo_id, [f.path for f in files]):
        doing = f"pulling {manifest.repo_id}"
        sizes = {partial_key(f.sha256, f.git_oid): f.size for f in missing}
        # Room for the new blobs in the budget, and on the disk (all of them together, beside what interrupted
        # downloads of them hold already), before a byte is fetched: the budget evicts for both, or refuses
        # having removed nothing (an imported model went for a pull the disk, another program's files taking
        # it, then could not take: an explorer's trial). (to its end: cancelled, the pull leaves its writer
        # only once the room is made and released)
        short, _free = await asyncio.to_thread(store.partials.room_short, sizes)
        if short > 0:
            repo_keys = {partial_key(f.sha256, f.git_oid) for f in manifest.files}
            short = await asyncio.to_thread(
                _free_room, store, manifest.repo_id, sizes, short, doing, repo_keys
            )
        await in_budget_pool(writer.make_room, sum(new_bytes.values()), doing, short)
        # ... and the disk looked at again, as the evictions left it (a blob linked outside frees nothing)
        await asyncio.to_thread(store.partials.check_room, sizes, doing)
        tracker.write("downloading")
        run = _PullRun(store, manifest, chain, tracker, limits or Limits(), watch, writer)
        tracker.parts_kept = run.parts_kept
        try:
            fetched = await run.fetch(missing)
            spec = revision_spec(manifest, branch)
            # (Both end before a cancelled pull unwinds: its release must not run beside them.)
            partials = await to_thread_to_the_end(run.finish_partials)
            for tried in range(1, SHARED_REMOVED_TRIES + 1):
                staged = [
                    StagedFile(f.path, have.get(f.path) or fetched[f.path], f.git_oid, f.sha256 is not None)
                    for f in files
                ]
                try:
                    await to_thread_to_the_end(run.publish, spec, staged, partials, writer)
                    break
                except SharedBlobsRemovedError as removed:
                    if tried == SHARED_REMOVED_TRIES:
                        raise
                    # Files it found in the store (a config other repos have too) went before it published
                    # (an `rm` of another repo, the disk budget): fetched now, in this pull (it failed at its
                    # end, a 250 MiB pull for a 3-byte config, "run it again": a trial)
                    # (found as the pull began, or while it claimed: handed over by another pull, whose blob
                    # names no file until that one publishes)
                    again = [f for f in files if (have.get(f.path) or fetched[f.path]).sha256 in removed.gone]
                    if offline:  # (nothing is opened offline: they went, and are not fetched again, an explorer's trial)
                        raise OfflineError(
                            f"offline mode: {len(again)} file(s) of {manifest.repo_id} the store held (shared with "
                            "other repos) were removed while it was being made ready: pull it once online",
                            repo_id=manifest.repo_id,
                        ) from removed
                    log.info("%s: %d file(s) it shares with other repos were removed from the store meanwhile (by "
                             "`rm` or the disk budget): fetching them again", manifest.repo_id, len(again))  # fmt: skip
                    for remote in again:
                        tracker.forget_found(
                            remote.path, (have.pop(remote.path, None) or fetched.pop(remote.path)).size
                        )
                    await in_budget_pool(writer.make_room, sum(f.size for f in again),
                                               f"pulling {manifest.repo_id}")  # fmt: skip
                    fetched.update(await run.fetch(again))
                    partials.update(await to_thread_to_the_end(run.finish_partials))
        except BaseException as error:
            await tracker.settle()
            if run.published:  # cancelled while the publish ran, and it completed: the revision is in
                tracker.write("downloaded")
            else:
                stopped = isinstance(error, (asyncio.CancelledError, KeyboardInterrupt))  # (Ctrl-C, a stop)
                try:
                    tracker.write("failed", INTERRUPTED if stopped else f"{type(error).__name__}: {error}"[:500],
                                  run.parts_kept())  # fmt: skip
                except StoreError as unrecorded:  # (the pull's own error is what the caller must see)
                    log.warning("%s: could not record that the pull failed: %s", manifest.repo_id, unrecorded)
            raise
        finally:
            try:
                if run.published:  # hundreds of unlinks for a repo of small files: off the loop
                    await asyncio.to_thread(run.release)
                else:
                    run.release()
            finally:
                # Claims go once the files are published (or the pull failed): peers still downloading
                # keep the digests they saw, and find this node's blobs by its holdings, once they show
                # (a published file's claims stand until then, in the background: SwarmFile.release)
                await asyncio.gather(*(swarm.release(hand_over=run.published) for swarm in run.swarms),
                                     return_exceptions=True)  # fmt: skip
        await tracker.settle()
        # A pull is a use of the repo and of each variant it pulled (the disk budget evicts the least
        # recently used: a quant pulled into a months-old revision must not be the first to go), written
        # before its status says it ended, which ends the protection of a pull in progress for the others
        # (each variant with its revision, at one moment: the revision marked before them was older by
        # microseconds, and went whole where one quant was enough, an explorer's trial)
        store.access.record(manifest.repo_id, count=0, commit_id=manifest.commit_id)
        for name in names:
            store.access.record(manifest.repo_id, name, count=0, commit_id=manifest.commit_id)
        try:
            await asyncio.to_thread(store.access.flush)
        except DepotError as error:  # (the pull is done: only the budget's order would miss it)
            log.warning("%s: could not record the pull as a use: %s", manifest.repo_id, error)
        tracker.write("downloaded")
        try:
            await in_budget_pool(writer.keep_within)
        except DepotError as error:  # (the pull is done: the next writer evicts)
            log.warning("%s: could not keep the store within its disk budget: %s", manifest.repo_id, error)
    return PullResult(
        repo_id=manifest.repo_id,
        commit_id=manifest.commit_id,
        variants=tuple(names),
        files=len(files),
        bytes_total=tracker.total,
        bytes_downloaded=tracker.fetched,
        bytes_resumed=tracker.resumed,
        snapshot_path=str(store.snapshots.path(manifest.repo_id, manifest.commit_id)),
        sources=tuple(sorted(run.used)),
        bytes_by_source=dict(sorted(tracker.by_source.items())),
        swarm=_swarm_counts(run.swarms),
        # (the links of what it published, off the loop: not the whole commit's, see Snapshots.holds)
        snapshot_built=await asyncio.to_thread(
            store.snapshots.holds,
            manifest.repo_id,
            manifest.commit_id,
            [(s.path, s.digest.sha256) for s in staged],
        ),
    )


def revision_spec(manifest: Manifest, branch: str | None) -> RevisionSpec:
    """How a pull of ``manifest`` publishes its revision, pointing ``branch`` at it. A branch the scan was
    of moves only if the store learned of no other commit for it after the scan (its ``scanned_at``): a
    pull that ran on a scan kept a while (a mirror's) must not move the branch back over a newer one."""
    # What was private or gated upstream stays behind this node's token; a repo private here stays so. A
    # gated one is described to anyone, as the Hub describes it (RepoSummary.gated): not a private one.
    # (The upstream's word: ``private`` is the store's too, and a pull of a gated repo held made it private)
    gated = False if manifest.upstream_private else manifest.gated
    card = upstream_card(
        manifest.pipeline_tag, manifest.library_name, manifest.tags, gated, manifest.card_data
    )
    private = True if manifest.private or manifest.gated else None
    seen_at = manifest.scanned_at if branch is not None and branch == manifest.revision else None
    # (offline, the manifest is what the store holds: the repo's origin stays)
    origin = None if manifest.endpoint == IMPORTED_ENDPOINT else manifest.endpoint
    return RevisionSpec(manifest.repo_id, manifest.commit_id, branch, private, origin, card,
                        branch_seen_at=seen_at, private_by_upstream=True, gated_only=bool(gated),
                        branch_is_tag=manifest.revision_is_tag if branch == manifest.revision else False)  # fmt: skip


def _swarm_counts(swarms: list[SwarmFile]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for swarm in swarms:
        for event, count in swarm.events.items():
            totals[event] = totals.get(event, 0) + count
    return dict(sorted(totals.items()))


def _stored(store: Store, remote: RemoteFile) -> BlobDigest | None:
    if remote.sha256:
        return store.local_digest(sha256=remote.sha256)
    return store.local_digest(git_sha1=remote.git_oid)


class _PullRun:
    """The transfers of one pull: claims, sources, and what to release at the end."""

    def __init__(self, store: Store, manifest: Manifest, chain: SourceChain, tracker: PullTracker,
                 limits: Limits, watch: PartialWatch | None, writer: BudgetWriter) -> None:  # fmt: skip
        self.store, self.manifest, self.chain = store, manifest, chain
        self.tracker, self.limits, self.watch, self.writer = tracker, limits, watch, writer
        self.claims: dict[str, ResumablePartial] = {}
        self.claims_lock = threading.Lock()  # claims are taken on worker threads (_take)
        self.standstills_said: dict[int | None, float] = {}  # holder pid -> when its standstill was said
        self.released = False
        self.digests: dict[str, BlobDigest] = {}  # by content key
        self.used: set[str] = set()
        self.published = False
        self.file_slots = asyncio.Semaphore(FILES_AT_ONCE)
        self.swarms: list[SwarmFile] = []  # files whose chunks this pull claims in the fleet
        self.paths: dict[str, list[str]] = {}  # content key -> the paths of it this pull fetches
        self.finished: set[str] = set()  # content keys handed over for publishing
        # Finished downloads flushed for placing (content key -> the blob to place): a handover to the store
        # that failed leaves its blob here for the publish (flushed and read-only, it is not finished again)
        self.flushed: dict[str, PartialBlob] = {}
        self.not_handed: set[str] = set()  # contents whose handover failed: they wait for the publish
        self.handed: set[str] = set()  # contents handed over (their public marks stay until the pull ends)
        # Contents this pull's claims hold whole and verified (a digest alone is not: a content found in the
        # store, gone before the publish, is claimed and fetched again under the digest it had)
        self.verified: set[str] = set()
        # A token-less fleet shares a public repo's downloads alone (what a node without a token serves)
        self.public = not (manifest.private or manifest.gated)

    def parts_kept(self) -> dict[str, int]:
        """Bytes of parts of chunks this pull's claims keep for a resume, by path (read as it stopped)."""
        with self.claims_lock:
            claims = dict(self.claims)
        return {path: part for key, claim in claims.items() if (part := claim.part_bytes())
                for path in self.paths.get(key, ())}  # fmt: skip

    async def fetch(self, missing: list[RemoteFile]) -> dict[str, BlobDigest]:
        unique: dict[str, RemoteFile] = {}
        for remote in missing:  # a repo may hold the same bytes under two paths: fetch them once
            key = partial_key(remote.sha256, remote.git_oid)
            unique.setdefault(key, remote)
            self.paths.setdefault(key, []).append(remote.path)
        if unique:
            async with contextlib.AsyncExitStack() as stack:
                stack.callback(close_idle)  # the ranged reads' kept-alive connections (transfer/ranged.py)
                stack.callback(asyncio.create_task(self._show_receiving()).cancel)
                # (to its end: a handover that runs finishes before the pull publishes or lets go)
                stack.push_async_callback(_stop, asyncio.create_task(self._hand_over_wanted()))
                http = LazySession()  # for servers that ignore ranges (whole bodies): rarely made
                stack.push_async_callback(http.close)
                holders = await self.chain.holders(
                    self.manifest, self.store.chunk_size, list(unique.values())
                )
                outcomes = await self._claim_and_transfer(http, unique, holders)
            errors = [o for o in outcomes if isinstance(o, BaseException)]
            if errors:
                _raise_first(errors, len(unique))
        fetched: dict[str, BlobDigest] = {}
        for remote in missing:
            key = partial_key(remote.sha256, remote.git_oid)
            fetched[remote.path] = self.digests[key]
            if remote is not unique[key]:
                self.tracker.add(remote.path, remote.size)
        return fetched

    async def _show_receiving(self) -> None:
        """Progress between the chunks' landings: their bytes as they arrive (told every so often)."""
        try:
            while True:
                await asyncio.sleep(STATUS_INTERVAL)
                self.tracker.tick()
        except Exception:  # (a caller's progress callback that raised: the transfer goes on without it)
            log.exception("%s: the pull's progress display failed", self.manifest.repo_id)

    async def _hand_over_wanted(self) -> None:
        """Hand over to the store the contents this pull holds whole and verified that other pulls wait for
        (their marks, looked at every HANDOVER_LOOK seconds), not at this pull's publish: a load of a small
        model waited for the whole pull of a big one that shared its tokenizer (15 s for 1 MiB, an
        explorer's trial). Claims are still taken in one order: handing one over early only ends a wait
        sooner."""
        while True:
            await asyncio.sleep(HANDOVER_LOOK)
            with self.claims_lock:
                # (not those flushed for its publish: a retry's fetch runs after that, SharedBlobsRemovedError)
                ready = (self.verified & self.claims.keys()) - self.not_handed - self.finished
            if not ready:
                continue
            for key in sorted(ready & await asyncio.to_thread(self.store.partials.wanted_keys)):
                try:
                    await to_thread_to_the_end(self.hand_over, key)
                except Exception as error:  # (it is published with the revision, as before marks)
                    self.not_handed.add(key)
                    log.warning("%s: could not hand %s over to the pulls waiting for it before this pull "
                                "publishes: %s", self.manifest.repo_id, self.paths[key][0], error)  # fmt: skip

    def hand_over(self, key: str) -> None:
        """(On a worker thread.) Place the verified content ``key`` in the store and let go of its claim, for
        the pulls that wait for it: they find its blob. Its row names no file until this pull publishes it
        with its revision; this pull relies on it meanwhile (gc and evictions leave it). Nothing when this
        pull let go of its claims already."""
        with self.claims_lock:
            if self.released or key not in self.claims:
                return
            claim = self.claims.pop(key)  # (this thread's now: a release meanwhile does not see it)
        digest = self.digests[key]
        try:
            blob = self.flushed.get(key)
            if blob is None:
                blob = claim.finish()
                blob.sync(durable=not self.store.durability.deferred)
                self.flushed[key] = blob
            self.writer.reuse([digest.sha256])
            publish_blobs(self.store, {digest.sha256: (digest, blob)})
            self.writer.written_early(digest.size)
        except BaseException:
            if not self._put_back(key, claim):
                claim.release(completed=False)  # (the pull let go of the others meanwhile)
            raise
        del self.flushed[key]
        with self.claims_lock:
            self.handed.add(key)
        claim.release(completed=True, keep_public=self.public)
        log.debug("%s: handed %s over to the pulls waiting for it", self.manifest.repo_id, self.paths[key][0])

    def _put_back(self, key: str, claim: ResumablePartial) -> bool:
        """Hold ``claim`` among the pull's claims again (a handover that failed), unless it let go of them."""
        with self.claims_lock:
            if self.released:
                return False
            self.claims[key] = claim
            return True

    async def _claim_and_transfer(self, http: LazySession, unique: dict[str, RemoteFile],
                                  holders: dict[str, list[FileSource]]) -> list[BaseException | None]:  # fmt: skip
        """Claim every content and transfer what this process claimed; one outcome per transfer.

        Claims are taken one at a time in one order shared by every process (by content key), and a claim
        is held until its pull publishes. So two processes whose pulls share files never each hold one
        file while waiting for the other's: whoever waits holds only contents that sort before the one it
        waits for, which the other process then no longer needs. Transfers of claimed contents run while
        the next claim waits; the file slots keep the claims from running ahead of the transfers."""
        transfers: list[asyncio.Task[None]] = []
        outcomes: list[BaseException | None] = []

        async def transfer(key: str, remote: RemoteFile, claim: ResumablePartial) -> None:
            try:
                # (not a node banned for lying: alone in the list, it was asked again all the same)
                await self._transfer(
                    http, key, remote, claim, [n for n in holders.get(remote.path, []) if not banned(n)]
                )
            finally:
                self.file_slots.release()

        keys = sorted(unique)
        position = 0
        try:
            while position < len(keys):
                # As many claims at once as there are free file slots: one trip to a worker thread for a
                # batch, not one per file (300 small files spent a second taking claims one by one).
                await self.file_slots.acquire()
                slots = 1
                while slots < CLAIM_BATCH and position + slots < len(keys) and not self.file_slots.locked():
                    await self.file_slots.acquire()
                    slots += 1
                batch = [(key, unique[key]) for key in keys[position : position + slots]]
                taken = await asyncio.to_thread(self._take_in_order, batch)
                for _ in range(slots - len(taken)):  # the batch stopped at a content another process holds
                    self.file_slots.release()
                position += len(taken)
                for (key, remote), outcome in zip(batch, taken, strict=False):
                    claim: ResumablePartial | None = None
                    if isinstance(outcome, Exception):  # e.g. no room for it: this file fails, not the others
                        outcomes.append(outcome)
                    elif isinstance(outcome, _Busy):
                        try:
                            claim = await self._claim(key, remote)
                        except Exception as error:
                            outcomes.append(error)
                    else:
                        claim = self._taken(key, remote, outcome)
                    if claim is None:
                        self.file_slots.release()
                        continue
                    transfers.append(asyncio.create_task(transfer(key, remote, claim)))
        except BaseException:
            for task in transfers:
                task.cancel()
            await asyncio.gather(*transfers, return_exceptions=True)
            raise
        outcomes.extend(await asyncio.gather(*transfers, return_exceptions=True))
        return outcomes

    async def _transfer(self, http: LazySession, key: str, remote: RemoteFile,
                        claim: ResumablePartial, nodes: list[FileSource]) -> None:  # fmt: skip
        if self.watch is not None:
            self.watch(remote.path, claim)
        self.tracker.add(remote.path, claim.resumed_bytes)
        self.tracker.resumed += claim.resumed_bytes
        hub = [self.chain.hub_source(self.manifest, remote)]
        join_swarm = functools.partial(self._join_swarm, remote, claim.chunk_size)
        swarm = await join_swarm()
        swarm_later, claimed = None, None
        if swarm is not None:  # the Hub from the start, for what no other node holds or claims
            sources, fallback = [*nodes, *hub], None
        else:
            sources, fallback = (nodes, lambda: hub) if nodes else (hub, None)
            if self.chain.fleet is not None:

                def claimed() -> frozenset[int]:
                    return self.chain.claimed_chunks(remote, claim.chunk_size)

                swarm_later = join_swarm

        def on_bytes(amount: int, origin: str, base_url: str) -> None:
            if origin == LEFT_IN_PLACE:  # a chunk's part an earlier transfer left: resumed, not fetched
                self.tracker.resumed += amount
                self.tracker.add(remote.path, amount)
                return
            self.tracker.fetched += amount
            self.tracker.add(remote.path, amount, origin=origin)
            self.used.add(
                base_url
            )  # (what sent bytes: the swarm's claimers too, never a source that refused)

        def on_start(receiving: BytesReceiving, kept_earlier: BytesReceiving) -> None:
            self.tracker.receiving_from(remote.path, receiving, kept_earlier)

        try:
            digest = await download_file(
                http,
                remote,
                claim,
                sources,
                self.limits,
                fallback,
                on_bytes,
                swarm,
                on_start,
                swarm_later,
                claimed,
            )
        except IntegrityError as mismatch:
            again = FileTry(http, remote, claim, nodes, hub, self.limits, on_bytes, on_start, join_swarm,
                            self.tracker, self.store.layout.home)  # fmt: skip
            digest = await fetch_again(again, mismatch)
        finally:
            self.tracker.received_all(remote.path)
        claim.close_data()
        self.digests[key] = digest
        with self.claims_lock:
            self.verified.add(key)

    async def _join_swarm(self, remote: RemoteFile, chunk_size: int) -> SwarmFile | None:
        """The file's claims in the fleet, when this pull takes part (kept: released at its end)."""
        joined = await self.chain.swarm_file(remote, chunk_size, self.public)
        if joined is not None:
            self.swarms.append(joined)
        return joined

    async def _claim(self, key: str, remote: RemoteFile) -> ResumablePartial | None:
        """This process's claim on the content, after any other process transferring it lets go; None
        when the content turned up in the store meanwhile (its digests are then recorded)."""
        self.tracker.add(remote.path, 0, waiting=True)
        # (its holder hands it over once it is verified, not at the end of its own pull: marked again while
        # this waits, for a holder that takes the download over)
        await asyncio.to_thread(self.store.partials.want, key)
        began = shown = moved = time.monotonic()
        kept: int | None = None
        while True:
            taken = await asyncio.to_thread(self._take, key, remote)
            if not isinstance(taken, _Busy):
                # (its wait is over: a mark left would have the next holder hand it over for nobody; other
                # waiters mark it again within a second)
                await asyncio.to_thread(self.store.partials.unwant, key)
                return self._taken(key, remote, taken)
            now = time.monotonic()
            if now - shown >= WAIT_SHOWN:  # (what the other's download holds: not silence)
                shown = now
                elsewhere = await asyncio.to_thread(self._waiting_on, key)
                self.tracker.waiting_on(remote.path, elsewhere or 0)
                if elsewhere != kept:
                    kept, moved = elsewhere, now
                if now - began >= STANDSTILL_LOOK:
                    await asyncio.to_thread(self._say_standstill, key, remote, now - moved)
            await asyncio.sleep(CLAIM_POLL)

    def _waiting_on(self, key: str) -> int | None:
        """(On a worker thread.) What the download this pull waits for holds (its mark made again)."""
        self.store.partials.want(key)
        return self.store.partials.kept_bytes(key)

    def _say_standstill(self, key: str, remote: RemoteFile, still: float) -> None:
        """(On a worker thread.) Say who holds the download this pull waits for, when that process is
        suspended (Ctrl-Z: the pull waited without end, and said nothing) or its download has landed
        nothing for STILL_SAID seconds: once for all the files it holds, again after SAID_AGAIN."""
        pid = self.store.partials.holder(key)
        if pid == os.getpid():
            return  # (another pull of this process: it is not stopped from here)
        now = time.monotonic()
        with self.claims_lock:
            if now - self.standstills_said.get(pid, -SAID_AGAIN) < SAID_AGAIN:
                return
            suspended = pid is not None and process_state(pid) == "T"
            if not suspended and still < STILL_SAID:
                return
            self.standstills_said[pid] = now
        who = "another process" if pid is None else f"process {pid}"
        if suspended:
            log.warning("%s: waiting for %s, which downloads %s and is suspended (Ctrl-Z or SIGSTOP): `kill -CONT "
                        "%d` lets it go on; once it is stopped, this pull takes the download over",
                        self.manifest.repo_id, who, remote.path, pid)  # fmt: skip
        else:
            log.warning("%s: waiting for %s, which downloads %s and has landed nothing for %.0f s (a slow link, "
                        "or stuck); once it is stopped, this pull takes the download over",
                        self.manifest.repo_id, who, remote.path, still)  # fmt: skip

    def _taken(
        self, key: str, remote: RemoteFile, taken: ResumablePartial | BlobDigest
    ) -> ResumablePartial | None:
        """The claim taken, or None when the content was found in the store (its digests recorded)."""
        if isinstance(taken, ResumablePartial):
            return taken
        self.digests[key] = taken
        self.tracker.add(remote.path, remote.size - self.tracker.done.get(remote.path, 0))
        return None

    def _take_in_order(self, batch: list[tuple[str, RemoteFile]]) -> list[_Taken | Exception]:
        """(On a worker thread.) :meth:`_take` for each content of ``batch`` in order, up to and including
        the first one another process holds (``_BUSY``): claims are only ever waited for in key order. A
        content that cannot be claimed (its error in its place) does not stop the others."""
        taken: list[_Taken | Exception] = []
        for key, remote in batch:
            try:
                outcome = self._take(key, remote)
            except Exception as error:
                taken.append(error)
                continue
            taken.append(outcome)
            if isinstance(outcome, _Busy):
                break
        return taken

    def _take(self, key: str, remote: RemoteFile) -> _Taken:
        """(On a worker thread.) The claim of ``key``, or its content's digests when the store holds it, or
        ``_BUSY`` when another process holds the claim. A claim is recorded before this returns, under the
        lock :meth:`release` takes: one that lands after the pull was cancelled and released is let go
        at once, never left holding its lock for nobody (``_BUSY`` then: the pull is over anyway)."""
        claim = self.store.partials.claim(key, remote.size, self.store.chunk_size, False)
        try:
            found = _stored(self.store, remote)
        except BaseException:
            if claim is not None:
                claim.release(completed=False)
            raise
        if found is not None:
            if claim is not None:
                claim.release(completed=True)  # the content is in the store: the partial is a leftover
            # (relied on until it publishes: one another pull handed over names no file until that one's publish)
            self.writer.reuse([found.sha256])
            return found
        if claim is None:
            return _BUSY
        with self.claims_lock:
            if self.released:
                claim.release(completed=False)
                return _BUSY
            self.claims[key] = claim
            self.verified.discard(key)  # (fetched again: not verified until its transfer ends)
        claim.mark_public(self.public)
        return claim

    def finish_partials(self) -> dict[str, PartialBlob]:
        """Flush every downloaded file not handed over yet, and hand it over for publishing, by SHA-256."""
        ready: dict[str, PartialBlob] = {}
        for key, claim in self.claims.items():
            if key in self.finished:
                continue
            blob = self.flushed.pop(key, None)
            if blob is None:
                blob = claim.finish()
                blob.sync(durable=not self.store.durability.deferred)
            self.finished.add(key)
            ready[self.digests[key].sha256] = blob
        return ready

    def publish(self, spec: RevisionSpec, staged: list[StagedFile], partials: dict[str, PartialBlob],
                writer: BudgetWriter) -> None:  # fmt: skip
        """(On a worker thread.) Publish the revision, and record that it is: a pull cancelled meanwhile
        waits for this to end, and must then release its claims as completed, not keep them for a resume."""
        publish(self.store, spec, staged, partials, writer.published)
        self.published = True

    def release(self) -> None:
        with self.claims_lock:
            self.released = True
            claims = list(self.claims.values())
        with self.store.layout.same_folders():  # (partials/ resolved once, not twice per file)
            for claim in claims:
                claim.release(completed=self.published)
            for key in self.handed:  # (the index names them in the revision now, or the pull failed)
                self.store.partials.unmark_public(key)
            if self.published:
                self._drop_other_names()

    def _drop_other_names(self) -> None:
        """What is left in partials/ of the contents published, under another name than this pull's claims
        used: a small file an older version downloaded in a data file and a log (now one file of its own), or
        by its git id where this pull knew its SHA-256. No resume needs them now, and they sat in partials/
        until a gc (an explorer's trial, after an upgrade)."""
        others = {*self.digests, *(f"git-{d.git_sha1}" for d in self.digests.values() if d.git_sha1)}
        left = others & self.store.partials.keys_on_disk()
        if left:  # (as gc takes them, those alone: one another process holds stays)
            self.store.partials.collect(False, max_age=math.inf, held=left, empty=False)


async def _stop(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` and wait for it to end (its own cancellation is not this caller's; its failure is
    logged)."""
    task.cancel()
    await asyncio.wait([task])
    if not task.cancelled() and task.exception() is not None:
        log.error("a pull's background task failed", exc_info=task.exception())


def _raise_first(errors: list[BaseException], files: int) -> None:
    for error in errors:
        if not isinstance(error, Exception):
            raise error  # KeyboardInterrupt, cancellation: not a download failure
    first = errors[0]
    if len(errors) > 1 and isinstance(first, UpstreamError):
        # The same error, its type and attributes kept, saying how many more failed.
        first.args = (f"{first} (and {len(errors) - 1} more of {files} files failed)", *first.args[1:])
    raise first
