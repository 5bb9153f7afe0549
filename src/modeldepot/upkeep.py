"""The upkeep half of :class:`~modeldepot.depot.Depot`: checking, removing, collecting garbage, and the disk
budget with its pins. A mixin: it works on the depot's own store, tiers and what its process holds."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

from modeldepot.errors import (
    DepotError,
    InvalidInputError,
    NotFoundError,
    PullRunningError,
    RepoNotFoundError,
    RevisionNotFoundError,
    VariantNotFoundError,
)
from modeldepot.guards import any_case, own_store, writes
from modeldepot.hub.manifest import scan_lists
from modeldepot.hub.removal import remove_repo, remove_variant
from modeldepot.hub.variants import group_files
from modeldepot.store import DiskUsage, GcReport, RemoveResult, Store, VerifyReport, disk_usage, gc, verify
from modeldepot.store.budget import BudgetStatus, Eviction
from modeldepot.store.maintenance import VerifyProgress, sweep_dead_sessions
from modeldepot.store.pins import Pin
from modeldepot.store.scrub import DEFAULT_SCRUB_RATE, Scrubber
from modeldepot.validation import SHORT_COMMIT, validate_quant, validate_repo_id, validate_revision

if TYPE_CHECKING:
    from pathlib import Path

    from modeldepot.config import DepotConfig
    from modeldepot.held import HeldModels
    from modeldepot.hub.manifest import Manifest
    from modeldepot.tiers import Tiers
    from modeldepot.transfer.pull import PullResult

__all__ = ["SCAN_SETTLE", "Repair", "Upkeep"]

log = logging.getLogger(__name__)

# Seconds a saved scan is taken for a pull's that may be starting (it saves its scan before it takes the repo's
# pull mark): `rm` of a repo the store holds nothing of leaves so young a scan
SCAN_SETTLE = 10.0


# Origins of repos whose files no pull brings back: a folder imported here (an adopted Hugging Face cache's
# files came from the Hub: they are pulled from there again)
_NOT_PULLED = frozenset({"import"})


@dataclass(frozen=True)
class Repair:
    """A revision's files that failed verification, fetched again (``error`` None) or not (why)."""

    repo_id: str
    commit_id: str
    paths: tuple[str, ...]
    error: str | None = None


class Upkeep:
    """Upkeep of a depot's own store; :class:`~modeldepot.depot.Depot` is the one class made of it."""

    store: Store
    tiers: Tiers
    config: DepotConfig
    _held: HeldModels

    if TYPE_CHECKING:

        @property
        def home(self) -> Path: ...

        def get_manifest(self, repo_id: str) -> Manifest: ...

        async def pull_async(self, repo_id: str, quants: list[str] | str | None = None, *, revision: str = "main",
                             paths: list[str] | None = None) -> PullResult: ...  # fmt: skip

        def check_writable(self, doing: str) -> None: ...

    def scrubber(self, rate: float = DEFAULT_SCRUB_RATE) -> Scrubber:
        """The background check of local blobs (``serve --scrub-interval``): rehashes what is due at
        ``rate`` bytes a second and quarantines what fails. :meth:`verify` checks everything at once."""
        return Scrubber(self.store, rate)

    def sync(self, *, check: bool = True) -> int:
        """Wait until everything the store holds is durable on disk (imports and pulls publish once their
        bytes are verified, and flush in the background: ``MODELDEPOT_DURABILITY``); returns how many blobs
        had to be flushed. Blobs written before the machine restarted are checked first (unless not
        ``check``: a server stopping leaves them to the next start). On a read-only store what its writer
        left unflushed is flushed (by the kernel's flush of every file system) and not recorded."""
        return self.store.sync(check)

    @any_case
    def verify(self, repo_id: str | None = None, *, progress: VerifyProgress | None = None) -> VerifyReport:
        """Rehash blobs and chunks; a corrupt blob is quarantined, reported and never served again."""
        return verify(self.store, repo_id, progress)

    def broken_files(self) -> dict[tuple[str, str], tuple[str, ...]]:
        """The files of the store whose blob failed verification (quarantined: listed, never served; on a
        read-only store, those this process refuses, kept in place), by (repo, commit): what :meth:`repair`
        fetches again."""
        rows = self.store.index.read(
            "SELECT repo_id, commit_id, path FROM files WHERE sha256 IN (SELECT sha256 FROM blobs WHERE state != "
            "'ok') ORDER BY repo_id, commit_id, path"
        )
        refused = sorted(self.store.refused_blobs())
        for start in range(0, len(refused), 500):  # (SQLite's bound on parameters)
            part = refused[start : start + 500]
            rows += self.store.index.read(
                f"SELECT repo_id, commit_id, path FROM files WHERE sha256 IN ({','.join('?' * len(part))}) "
                "ORDER BY repo_id, commit_id, path", tuple(part))  # fmt: skip
        broken: dict[tuple[str, str], list[str]] = {}
        for row in rows:
            broken.setdefault((row["repo_id"], row["commit_id"]), []).append(row["path"])
        return {revision: tuple(paths) for revision, paths in broken.items()}

    async def repair_async(self, only: Collection[tuple[str, str]] | None = None) -> list[Repair]:
        """Fetch again, from the depot's sources (its servers, its fleet, the Hub), every file whose blob failed
        verification (a scrub's find, a read's, `verify`'s), one pull of those files alone per revision: a
        model found corrupt answered 503 until someone pulled it by hand (an explorer's trial; ``serve
        --repair`` runs this in the background). A repo imported here is left: its bytes came from a folder
        (its outcome says to import it again). One outcome per revision, in the order of
        :meth:`broken_files` (``only``: of those revisions, as (repo, commit)); a failure is said in it, not
        raised (the others are tried)."""
        import asyncio

        self.check_writable("repairing files")
        broken = await asyncio.to_thread(self.broken_files)
        if only is not None:
            broken = {revision: paths for revision, paths in broken.items() if revision in only}
        origins = await asyncio.to_thread(self._origins, {repo_id for repo_id, _ in broken})
        outcomes = []
        for (repo_id, commit_id), paths in broken.items():
            if origins.get(repo_id) in _NOT_PULLED:
                outcomes.append(Repair(repo_id, commit_id, paths, f"{repo_id} was imported here, from a folder: "
                                       "import it again to restore its files"))  # fmt: skip
                continue
            try:
                await self.pull_async(repo_id, None, revision=commit_id, paths=list(paths))
            except DepotError as error:
                outcomes.append(Repair(repo_id, commit_id, paths, f"{type(error).__name__}: {error}"))
            else:
                outcomes.append(Repair(repo_id, commit_id, paths))
        return outcomes

    def repair(self, only: Collection[tuple[str, str]] | None = None) -> list[Repair]:
        """:meth:`repair_async`, blocking."""
        from modeldepot.transfer.pull import run_blocking

        return run_blocking(self.repair_async(only))

    def _origins(self, repo_ids: set[str]) -> dict[str, str]:
        rows = self.store.index.read("SELECT repo_id, origin FROM repos")
        return {row["repo_id"]: row["origin"] for row in rows if row["repo_id"] in repo_ids}

    @any_case
    @writes
    @own_store
    def remove(self, repo_id: str, revision: str | None = None, quant: str | None = None) -> RemoveResult:
        """Remove a repo or one revision; blobs nothing else uses are deleted at once. With ``quant``, only
        that variant's own files go from the revision (``main`` unless given): its shared files (config,
        tokenizer) and the other variants stay. Refused (:class:`PullRunningError`) while a pull of the repo
        runs, here or in another process. A repo the store holds nothing of but its saved scan: the scan goes
        (``scan_forgotten``)."""
        validate_repo_id(repo_id)  # (before it names a file)
        if self.store.partials.is_pulling(repo_id) and (
            quant is None or not self._pulls_leave(repo_id, revision, quant)
        ):
            holder = self.store.partials.pull_holder(repo_id)
            who = "" if holder is None else f" (process {holder})"
            what = "" if quant is None else f" that takes {quant}'s files"
            raise PullRunningError(f"a pull of {repo_id}{what} is running{who}: nothing was removed; remove it once "
                                   "the pull ends, or stop the pull first", repo_id=repo_id)  # fmt: skip
        if quant is not None:
            return self._remove_variant(repo_id, revision, quant).seen_held()
        try:
            result = remove_repo(self.store, repo_id, revision)
        except RepoNotFoundError:
            shared = self._shared_holder(repo_id) is not None
            forgotten = None if revision is not None or shared else self._forget_scan(repo_id)
            if forgotten is None:
                raise  # (a shared store's repo is said so, and the scan made of it here stays)
            self.store.budget.forget_history(repo_id)
            return forgotten
        self._held.let_go_of(repo_id, result.commits)
        # (removed by hand: no longer the budget's doing, whatever it evicted of it before)
        if revision is None:
            self.store.budget.forget_history(repo_id)
        for gone in result.commits if revision is not None else ():
            self.store.budget.forget_history(repo_id, gone)
        return result.seen_held()

    def _pulls_leave(self, repo_id: str, revision: str | None, quant: str) -> bool:
        """Whether the pulls of ``repo_id`` running now publish none of the files of variant ``quant`` (at
        ``revision``, or main and the older revisions a removal of it takes it from): removing the old quant to
        make room for the new one is a laptop's natural move, as `ollama rm` of another tag during a pull (`rm
        -q` was refused for any pull of the repo, an explorer's trial). The blobs a pull reuses are kept from
        any removal already (the budget's writers)."""
        taken = self.store.partials.pulls_take(repo_id)
        if taken is None or group_files(taken).find(quant) is not None:  # (a pull of that variant itself)
            return False
        commits = [] if revision is None else [revision]
        if revision is None:
            with contextlib.suppress(NotFoundError):
                commits.append(self.store.resolve(repo_id, "main"))
            commits.extend(self.store.detached_revisions(repo_id))
        for commit in commits:
            try:
                grouping = group_files(
                    e.path for e in self.store.files(repo_id, self.store.resolve(repo_id, commit))
                )
            except NotFoundError:
                continue
            variant = grouping.find(quant)
            if variant is not None and set(grouping.own_files(variant)) & taken:
                return False
        return True

    def _remove_variant(self, repo_id: str, revision: str | None, quant: str) -> RemoveResult:
        """The variant's own files from ``revision``; without one, from main and from every older revision
        no ref names (an update of the upstream's left them behind: `rm --quant` freed main's copy alone,
        and the one it replaced kept its room, shown nowhere but `du` and `info`, an explorer's trial)."""
        results: list[tuple[str, RemoveResult]] = []
        lacking: NotFoundError | None = None
        try:
            results.append(remove_variant(self.store, repo_id, revision or "main", quant))
        except (VariantNotFoundError, RevisionNotFoundError) as error:
            if revision is not None:
                raise
            lacking = error
        for older in self.store.detached_revisions(repo_id) if revision is None else ():
            if older in self._pinned_commits(repo_id):  # (a known-good quant kept by its commit: a review)
                continue
            with contextlib.suppress(VariantNotFoundError, RevisionNotFoundError):  # (gone meanwhile too)
                results.append(remove_variant(self.store, repo_id, older, quant))
        if not results:
            assert lacking is not None
            raise lacking
        for commit_id, result in results:
            self._held.let_go_of(repo_id, [commit_id], result.files_removed)
        done = [result for _, result in results]
        return RemoveResult(
            repo_id, tuple(commit for result in done for commit in result.commits),
            sum(r.blobs_removed for r in done), sum(r.bytes_freed for r in done),
            bytes_still_linked=sum(r.bytes_still_linked for r in done),
            files_removed=tuple(path for result in done for path in result.files_removed),
            revisions_changed=tuple(commit for result in done for commit in result.revisions_changed),
            deleted=tuple(d for result in done for d in result.deleted),
        )  # fmt: skip

    def _pinned_commits(self, repo_id: str) -> set[str]:
        """The commits the repo's pins name (by branch or commit id)."""
        pinned = set()
        for pin in self.store.budget.pins.all(repo_id):
            with contextlib.suppress(NotFoundError):
                pinned.add(self.store.resolve(repo_id, pin.revision))
        return pinned

    def _shared_holder(self, repo_id: str) -> Store | None:
        """The first shared store that holds ``repo_id``, if any."""
        for store in self.tiers.shared:
            if store.index.read("SELECT 1 FROM repos WHERE repo_id = ?", (store.spelled(repo_id),)):
                return store
        return None

    def _forget_scan(self, repo_id: str) -> RemoveResult | None:
        """(A repo the store holds nothing of.) Its saved scan goes, which `status` and the dashboard listed for
        good, with no removal that could take it (a pull that failed, a typo naming a real repo); None without
        one. A scan of the last seconds may be a pull's that starts: PullRunningError."""
        now = time.time()
        scanned = self.store.manifests.forget_repo(repo_id, now - SCAN_SETTLE)
        if scanned is None:
            return None
        if scanned >= now - SCAN_SETTLE:
            raise PullRunningError(f"{repo_id} was scanned {max(0.0, now - scanned):.0f} s ago, and a pull of it may "
                                   "be starting: nothing was removed; remove it again in a few seconds",
                                   repo_id=repo_id)  # fmt: skip
        return RemoveResult(repo_id, (), 0, 0, scan_forgotten=True)

    def let_go_of_removed(self) -> int:
        """Drop this process's preloads and engines of what is no longer whole in the store (removed, a blob
        of it quarantined, or files taken out of it, by another process: a `modeldepot rm` beside a node); a
        server calls this every few seconds, and :meth:`load` every 2 s at most. Returns how many preloads and
        loaded engines went."""
        return self._held.let_go_of_removed()

    @writes
    def gc(self, *, partials: bool = False) -> GcReport:
        """Delete unreferenced and orphan blobs, abandoned partial files, stale snapshots, quarantine.

        Interrupted downloads are kept for a resume (a week), unless ``partials`` is True, or no commit the store
        knows of (a saved scan, a kept listing) lists their content any more (a file the upstream replaced). The notes of shared
        stores' blobs found corrupt go once those are repaired."""
        report = gc(self.store, partials)
        # (every shared store opened: one left out, unmounted for a while, still holds what was noted of it)
        if (
            self.tiers.shared
            and len(self.tiers.shared) == len(self.config.shared)
            and not self.store.read_only
        ):
            try:
                self.tiers.forget_repaired()
            except (
                DepotError,
                OSError,
            ) as error:  # (gc did its work: a shared store that cannot say is told)
                log.warning("could not look which notes of shared stores' corrupt blobs may go: %s", error)
        return report

    def drop_dead_writes(self) -> int:
        """Remove what writers that ended midway (an import killed) left in ``tmp/``, when no other writer
        holds the store lock now (imports do it too; ``gc`` does it always); the bytes freed. Nothing on
        a read-only store."""
        return 0 if self.store.read_only else sweep_dead_sessions(self.store)

    def du(self) -> DiskUsage:
        return disk_usage(self.store)

    # -- the disk budget ----------------------------------------------------------------------------------------

    @any_case
    @writes
    @own_store
    def pin(self, repo_id: str, quant: str | None = None, revision: str = "main") -> Pin:
        """Never evict the revision ``revision`` names (a branch is followed) to keep within the disk budget;
        ``quant``: one variant of it (that variant and the revision's shared files stay; its other
        variants may be evicted)."""
        try:
            if quant is not None:
                commit_id = self.store.resolve(validate_repo_id(repo_id), validate_revision(revision))
                grouping = group_files(e.path for e in self.store.files(repo_id, commit_id))
                variant = grouping.find(validate_quant(quant))
                if variant is None:
                    # (said "has no variant" of one its scan lists)
                    if scan_lists(self.store, repo_id, quant):
                        raise NotFoundError(f"{repo_id}@{commit_id[:12]} holds no file of {quant!r} (it holds: "
                                            f"{grouping.names()}): pull it first", repo_id=repo_id)  # fmt: skip
                    raise VariantNotFoundError(f"{repo_id}@{commit_id[:12]} has no variant {quant!r} (it has: "
                                        f"{grouping.names()})", repo_id=repo_id)  # fmt: skip
                # (kept under the variant's own name, unpin finding it however it is typed; or under the kind's
                # name typed, onnx-fp16, which stays that one variant's when the other kind's fp16 comes back)
                quant = variant.name if quant.lower() == variant.name.lower() else quant
            return self.store.budget.pins.pin(repo_id, quant, revision)
        except NotFoundError as missing:
            if not self.store.partials.is_pulling(repo_id):
                raise
            # (while `status` showed it downloading, the pin said "not in the store", and the node 404)
            holder = self.store.partials.pull_holder(repo_id)
            who = "" if holder is None else f" (process {holder})"
            raise PullRunningError(f"a pull of {repo_id} is running{who} and has not published "
                                   f"{repo_id if quant is None else quant} yet ({missing}): pin it once the pull is "
                                   "done", repo_id=repo_id) from None  # fmt: skip

    @any_case
    @writes
    def unpin(self, repo_id: str, quant: str | None = None, revision: str = "main") -> bool:
        """Remove a pin, named as :meth:`pin` took it (a variant in any case, a commit by its start); False
        when there was none."""
        validate_revision(revision)
        if quant is not None:
            validate_quant(quant)  # ("" matched the whole repo's pin, and took it)
        for pin in self.store.budget.pins.all(repo_id):
            same_variant = (pin.quant or "").lower() == (quant or "").lower()
            if same_variant and (pin.revision == revision or (
                    SHORT_COMMIT.fullmatch(revision) and pin.revision.startswith(revision))):  # fmt: skip
                return self.store.budget.pins.unpin(repo_id, pin.quant, pin.revision)
        return False

    @any_case
    def pins(self, repo_id: str | None = None) -> list[Pin]:
        if repo_id is not None:
            validate_repo_id(repo_id)
        return self.store.budget.pins.all(repo_id)

    def budget_status(self, fresh: bool = True) -> BudgetStatus:
        """The disk budget (the store's, :meth:`set_max_size`, capped by ``MODELDEPOT_MAX_SIZE``), what the
        blobs use, what pins and uses keep, and the evictions so far (``fresh`` False: which blobs files
        outside the store share, as looked at in the last seconds: for what asks often)."""
        return self.store.budget.status(fresh)

    def evictions(self, repo_id: str | None = None, limit: int = 20) -> list[Eviction]:
        """The disk budget's latest evictions, newest first (of ``repo_id`` only, when given), each with when
        it went (``at``) and the write or command it made room for (``doing``)."""
        if repo_id is not None:
            validate_repo_id(repo_id)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise InvalidInputError(f"limit must be a number of evictions, 0 or more, not {limit!r}")
        return self.store.budget.history(repo_id, limit)

    @writes
    def set_max_size(self, max_size: str | int | None) -> list[Eviction]:
        """Save ``max_size`` (``"200GiB"``, ``"80%"``, bytes; None: none) as the store's disk budget, which every
        process on the store keeps to from its next write, and evict the least recently used revisions until
        the store is within it. ``MODELDEPOT_MAX_SIZE`` caps one process further."""
        self.store.budget.save_max_size(max_size)
        return self.shrink() if max_size is not None else []

    def plan_shrink(self, max_size: str | int | None = None) -> list[Eviction]:
        """What :meth:`shrink` (or :meth:`set_max_size`) to ``max_size`` would evict now, in order, with the
        bytes each would free: nothing is removed."""
        from modeldepot.store.budget import parse_max_size

        limit = None if max_size is None else parse_max_size(max_size, self.home)
        return self.store.budget.plan_shrink(limit)

    @writes
    def shrink(self, max_size: str | int | None = None) -> list[Eviction]:
        """Evict the least recently used revisions until the store is within ``max_size`` (``"200GiB"``,
        ``"80%"``; default: the budget), never what is pinned or in use."""
        from modeldepot.store.budget import parse_max_size

        limit = None if max_size is None else parse_max_size(max_size, self.home)
        return self.store.budget.shrink(limit)
