"""Upkeep of a store: verify (rehash, quarantine), remove, gc and du.

Deleting follows one order everywhere: take the store lock exclusively, delete the rows in one
transaction, COMMIT, then unlink the files. A kill between COMMIT and unlink leaves orphan files that
no row names (invisible, and the next gc removes them); a kill before COMMIT changes nothing. A removed
revision's snapshot is set aside (a hidden name) before its rows go: a whole snapshot of a revision the index
does not know is then no removal's leftover, and gc keeps it and its blobs (an older index put back).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence, Set
from dataclasses import dataclass, field
from pathlib import Path

from modeldepot.errors import (
    CorruptBlobError,
    DepotError,
    IndexDamagedError,
    RevisionNotFoundError,
    StoreError,
)
from modeldepot.store.blobs import (
    STARTING_SESSION_FRESH,
    UNRECORDED_MODE,
    LinkedSource,
    WriteSession,
    give_back_mode,
    give_back_modes,
)
from modeldepot.store.eviction import shared_blobs
from modeldepot.store.holders import holding_processes, removed_files_held
from modeldepot.store.index import index_damage_advice as _advice
from modeldepot.store.layout import os_error
from modeldepot.store.models import (
    DiskUsage,
    GcReport,
    RepoDiskUsage,
    VerifyProblem,
    VerifyReport,
)
from modeldepot.store.partials import partial_key
from modeldepot.store.store import Store
from modeldepot.validation import validate_repo_id, validate_revision

__all__ = [
    "RemoveResult",
    "StoreTotals",
    "disk_usage",
    "drop_quarantine",
    "gc",
    "partial_bytes",
    "quarantine_bytes",
    "remove",
    "remove_revisions",
    "totals",
    "verify",
]

log = logging.getLogger(__name__)

VerifyProgress = Callable[[int, int], None]
"""Called as ``progress(bytes_checked, bytes_total)`` while verify rehashes blobs."""


@dataclass(frozen=True)
class RemoveResult:
    repo_id: str
    commits: tuple[str, ...]
    blobs_removed: int
    bytes_freed: int
    # A branch removed alone, its commit kept because these other refs point at it
    ref_removed: str | None = None
    commit_kept_for: tuple[str, ...] = ()
    # Bytes of deleted blobs whose file has another name (a Hugging Face cache's hard link): not freed
    bytes_still_linked: int = 0
    # Files removed from a revision that stays (a variant's own files: ``rm --quant``), and those revisions
    files_removed: tuple[str, ...] = ()
    revisions_changed: tuple[str, ...] = ()
    # A repo the store held nothing of: its saved scan went (status and the dashboard listed it for good)
    scan_forgotten: bool = False
    # Bytes of deleted blobs processes still map or hold open (not freed until they let go), and those
    bytes_still_held: int = 0
    held_by: tuple[int, ...] = ()
    # The blob files deleted: (device, inode, size), to look for who still holds them
    deleted: tuple[tuple[int, int, int], ...] = field(default=(), repr=False, compare=False)

    def to_dict(self) -> dict[str, object]:
        return {"repo_id": self.repo_id, "commits": list(self.commits),
                "blobs_removed": self.blobs_removed, "bytes_freed": self.bytes_freed,
                "ref_removed": self.ref_removed, "commit_kept_for": list(self.commit_kept_for),
                "bytes_still_linked": self.bytes_still_linked,
                "files_removed": list(self.files_removed), "revisions_changed": list(self.revisions_changed),
                "scan_forgotten": self.scan_forgotten,
                "bytes_still_held": self.bytes_still_held, "held_by": list(self.held_by)}  # fmt: skip

    def seen_held(self) -> RemoveResult:
        """This result with the bytes processes still map or hold open (an idle worker's loaded model, a node's
        answer to a slow client) taken out of ``bytes_freed``: look once this process let go of its own."""
        sizes = {(dev, ino): size for dev, ino, size in self.deleted}
        held = holding_processes(sizes)
        if not held:
            return self
        still = sum(sizes[key] for key in held)
        return dataclasses.replace(self, bytes_freed=self.bytes_freed - still, bytes_still_held=still,
                                   held_by=tuple(sorted(set().union(*held.values()))))  # fmt: skip


def _check_readable(store: Store, sha256: str) -> None:
    """PermissionError when this user may not open the blob's file (a missing one is the check's to say)."""
    with contextlib.suppress(FileNotFoundError):
        os.close(os.open(store.blobs.path(sha256), os.O_RDONLY | os.O_CLOEXEC))


def files_using(store: Store, sha256: str) -> tuple[str, ...]:
    """The files whose content is blob ``sha256``, as ``repo@commit:path``."""
    rows = store.index.read("SELECT repo_id, commit_id, path FROM files WHERE sha256 = ? "
                            "ORDER BY repo_id, commit_id, path", (sha256,))  # fmt: skip
    return tuple(f"{r['repo_id']}@{r['commit_id'][:12]}:{r['path']}" for r in rows)


def verify(store: Store, repo_id: str | None = None, progress: VerifyProgress | None = None) -> VerifyReport:
    """Rehash every blob (of one repo, or all); quarantine the bad ones; repair snapshot links."""
    started = time.monotonic()
    if repo_id is not None:
        validate_repo_id(repo_id)
        store.repo_info(repo_id)  # raises RepoNotFoundError
        scope = "WHERE sha256 IN (SELECT sha256 FROM files WHERE repo_id = ?)"
        params: tuple[object, ...] = (repo_id,)
    else:
        scope, params = "", ()
    index_ok = _check_the_index(store)
    rows = store.index.read(
        f"SELECT sha256, size, chunk_size, state, created_at FROM blobs {scope} ORDER BY sha256", params
    )
    total = sum(r["size"] for r in rows if r["state"] == "ok")
    checked_bytes = 0
    problems: list[VerifyProblem] = []
    recording = True
    passed: list[tuple[str, float]] = []  # (recorded in batches: RECORD_EVERY blobs or seconds)
    recorded = time.monotonic()
    for row in rows:
        sha256 = row["sha256"]
        if row["state"] != "ok":
            problems.append(VerifyProblem(sha256, "quarantined", "failed verification earlier; import or "
                                          "pull it again", None, files_using(store, sha256)))  # fmt: skip
            continue
        found: tuple[str, str] | None = None
        try:
            _check_readable(store, sha256)
        except PermissionError as refused:
            # Not corrupt, not to quarantine: not this user's to read (a copied image's blob of another owner,
            # mode 0400). Said, and verify goes on (a traceback stopped it at the first: an explorer's trial)
            detail = str(os_error(refused, "reading it")).replace("reading it failed: ", "")
            problems.append(VerifyProblem(sha256, "unreadable", f"this user may not read its file: {detail} (its "
                                          "bytes were not checked)", None, files_using(store, sha256)))  # fmt: skip
            continue
        try:
            if store.durability.is_unchecked(sha256) and not store.read_only:
                # Written before a restart, maybe never flushed: checked once, through the store's own check
                # (the background thread's rehash and verify's were two reads of it, and a blob the thread
                # quarantined first was reported "missing": an explorer's trial), which records it durable.
                with contextlib.suppress(CorruptBlobError):
                    store.durability.ensure_checked(sha256)
                if _state_now(store, sha256, row["created_at"]) == "quarantined":
                    found = _AFTER_RESTART
            else:
                found = store.check_blob(sha256, row["size"], row["chunk_size"])
        except StoreError as error:  # (recording it durable: a full disk, say; verify goes on, as ever)
            log.warning("verify: the store's check of blob %s… could not record it (%s): rehashed here",
                        sha256[:16], error)  # fmt: skip
            found = store.check_blob(sha256, row["size"], row["chunk_size"])
        checked_bytes += row["size"]
        if progress is not None:
            progress(checked_bytes, total)
        if found is None:
            passed.append((sha256, time.time()))
            if recording and (
                len(passed) >= RECORD_EVERY or time.monotonic() - recorded >= RECORD_EVERY_SECONDS
            ):
                recording, passed, recorded = _record_verified(store, passed), [], time.monotonic()
            continue
        now = _state_now(store, sha256, row["created_at"])
        if now is None:
            continue  # removed (and maybe published again) while it was checked: not lost, not this one
        if now == "quarantined":  # (by the store's check after a restart, beside this one)
            problems.append(VerifyProblem(sha256, *_AFTER_RESTART, None, files_using(store, sha256)))
            continue
        moved = store.quarantine(sha256, row["created_at"])
        if moved is None:
            continue  # (the same, noticed under the lock)
        problems.append(VerifyProblem(sha256, found[0], found[1], moved or None, files_using(store, sha256)))
    if recording and passed:
        _record_verified(store, passed)
    repaired, not_repaired = _repair_snapshots(store, repo_id)
    return VerifyReport(
        # (those rehashed, as the bytes: one quarantined before is a problem, not checked again)
        blobs_checked=sum(1 for row in rows if row["state"] == "ok"),
        bytes_checked=checked_bytes,
        problems=tuple(problems),
        index_ok=index_ok,
        index_advice="" if index_ok else index_damage_advice(store),
        snapshots_repaired=repaired,
        snapshots_not_repaired=not_repaired,
        seconds=time.monotonic() - started,
        read_only=store.read_only,
    )


_INDEX_ENTRY = re.compile(
    r"(row \d+ missing from index|wrong # of entries in index|non-unique entry in index) \w+"
)


def _check_the_index(store: Store) -> bool:
    """SQLite's whole integrity check of the index (the quick one does not compare an index's entries with its
    table's rows: a flipped bit of ``files_by_blob`` passed it, an explorer's trial). When only the entries of
    indexes are wrong, the tables are whole: the indexes are rebuilt from them (REINDEX), and said."""
    try:
        found = [row[0] for row in store.index.read("PRAGMA integrity_check(20)")]
    except IndexDamagedError:  # (a page SQLite cannot read at all: said in the report, with the way out)
        return False
    if found == ["ok"]:
        return True
    if store.read_only or not all(_INDEX_ENTRY.match(line) for line in found):
        return False
    log.warning(
        "verify: the index's own indexes were damaged (%s): rebuilt from its tables", "; ".join(found[:3])
    )
    try:
        with store.index.write("rebuilding the index's indexes") as con:
            con.execute("REINDEX")
    except StoreError as error:  # (an index file it may not write: reported damaged, with the way out)
        log.warning("verify: the index's indexes could not be rebuilt: %s", error)
        return False
    return [row[0] for row in store.index.read("PRAGMA integrity_check(20)")] == ["ok"]


# (problem, detail) of a blob written before a restart that the store's own check found corrupt
_AFTER_RESTART = ("restart", "written before a restart of the machine and maybe never flushed, it was found "
                  "corrupt and quarantined; import or pull it again")  # fmt: skip


def _state_now(store: Store, sha256: str, seen: float) -> str | None:
    """The blob's state ("ok", "quarantined") if it is still the placement ``seen``; None when it was removed
    (and maybe published again) since."""
    rows = store.index.read("SELECT state, created_at FROM blobs WHERE sha256 = ?", (sha256,))
    if not rows or float(rows[0]["created_at"]) != seen:
        return None
    return str(rows[0]["state"])


RECORD_EVERY = 256  # blobs verify found good, recorded together (at most, or ...)
RECORD_EVERY_SECONDS = 2.0  # ... as often: a verify killed midway loses no more than this of its record


def _record_verified(store: Store, passed: list[tuple[str, float]]) -> bool:
    """Note when these blobs last passed; False once the disk is too full to (the check itself goes on: the
    times only tell when a blob was last checked)."""
    if not store.record_all_verified(passed):
        log.warning("the store's disk is full: verify goes on without recording when each blob passed")
        return False
    return True


def _repair_snapshots(store: Store, repo_id: str | None) -> tuple[int, tuple[str, ...]]:
    """(snapshots rebuilt, "org/name@commit: why" of those that could not be). A snapshot is made of the
    store's own data again at any time: one that cannot be made now (a full disk, no inode left) is said,
    and the others are rebuilt all the same (the first such failure ended verify with no report, the corrupt
    blob it had just quarantined unsaid: an explorer's trial)."""
    # (a read-only store's are looked at, not rebuilt: one a copy that followed links filled with files failed
    # every path read, and verify said ok, an explorer's trial)
    if repo_id is None:
        revisions = store.index.read("SELECT repo_id, commit_id FROM revisions")
    else:
        revisions = store.index.read("SELECT repo_id, commit_id FROM revisions WHERE repo_id = ?", (repo_id,))
    repaired, failed = 0, []
    for rev in revisions:
        try:
            repaired += store.ensure_snapshot(rev["repo_id"], rev["commit_id"])
        except IndexDamagedError:
            raise  # (the index itself: verify says so, with the way out)
        except StoreError as error:
            failed.append(f"{rev['repo_id']}@{rev['commit_id'][:12]}: {error}")
    return repaired, tuple(failed)


KeptBlobs = frozenset[str] | Callable[[], frozenset[str]]
"""Blobs a removal leaves though nothing names them: a set, or a function read under the store's lock."""


def _kept(keep_blobs: KeptBlobs) -> frozenset[str]:
    return keep_blobs() if callable(keep_blobs) else keep_blobs


def remove(store: Store, repo_id: str, revision: str | None = None,
           keep_blobs: KeptBlobs = frozenset()) -> RemoveResult:  # fmt: skip
    """Remove a repo, or one revision of it (by commit id or branch), and free the blobs no one else uses.

    Removing by branch removes the commit the branch points to, with the branch; when other refs point at
    that commit too, only the branch goes (as deleting a git tag leaves the branch at the same commit).
    Removing by commit id removes the commit with every ref to it. ``keep_blobs`` (SHA-256s) stay even
    when nothing references them any more: blobs a writer found in the store and is about to publish again
    (the disk budget's evictions; gc frees them if it never does). A function is read under the store's
    lock: a writer that names a blob it relies on, then reads under the shared lock that it is there, never
    misses a removal that did not keep it.
    """
    validate_repo_id(repo_id)
    if revision is not None:
        validate_revision(revision)
    with store.lock.exclusive():
        if revision is None:
            store.repo_info(repo_id)  # raises RepoNotFoundError
            commits = [r["commit_id"] for r in store.index.read(
                "SELECT commit_id FROM revisions WHERE repo_id = ?", (repo_id,))]  # fmt: skip
        else:
            commits = [store.resolve(repo_id, revision)]
            if store.index.read("SELECT 1 FROM refs WHERE repo_id = ? AND name = ?", (repo_id, revision)):
                others = _other_refs(store, repo_id, commits[0], revision)  # (a branch, not a commit id)
                if others:
                    return RemoveResult(repo_id, (), 0, 0, revision, others)
        _refuse_a_damaged_index(store, f"removing {repo_id}")
        with store.layout.same_folders():
            results = _remove_revisions(
                store, [(repo_id, c) for c in commits], _kept(keep_blobs), f"removing {repo_id}"
            )
        if revision is None and not commits:  # (a row no revision is left of: an older version's crash)
            with store.index.write(f"removing {repo_id}") as con:
                con.execute("DELETE FROM repos WHERE repo_id = ? AND NOT EXISTS (SELECT 1 FROM revisions WHERE "
                            "repo_id = ?)", (repo_id, repo_id))  # fmt: skip
    store.index.reserve.refill()  # from the space just freed (if it was released, else when there is room)
    done = [r for r in results if r is not None]
    return RemoveResult(repo_id, tuple(commits), sum(r.blobs_removed for r in done), sum(r.bytes_freed for r in done),
                        bytes_still_linked=sum(r.bytes_still_linked for r in done),
                        deleted=tuple(d for r in done for d in r.deleted))  # fmt: skip


def remove_revisions(store: Store, revisions: Sequence[tuple[str, str]], keep_blobs: KeptBlobs = frozenset(),
                     failures: list[DepotError] | None = None) -> list[RemoveResult | None]:  # fmt: skip
    """Remove whole revisions, (repo id, commit id) each, with every ref to them, as :func:`remove` removes one
    by commit id, and free the blobs no one else uses: in one transaction, with one look for the blobs no file
    names any more (the disk budget's evictions of many small revisions, one removal each, took 12 ms apiece
    on a store of 24,000 files, most of it that look: explorer 30). A blob several of them used is freed by the
    last of them. None for a revision gone already (another process's removal). A blob file that cannot be
    deleted (a folder a `sudo` pull made: EACCES) stops nothing: the others go, each revision's snapshot goes,
    and the error is raised once all is done, or added to ``failures`` when given (the budget counts what went,
    then raises: a failure midway lost the record of every revision of the batch, a review)."""
    for repo_id, commit_id in revisions:
        validate_repo_id(repo_id)
        validate_revision(commit_id)
    if not revisions:
        return []
    doing = f"removing {len(revisions)} revisions" if len(revisions) > 1 else f"removing {revisions[0][0]}"
    with store.lock.exclusive(), store.layout.same_folders():
        _refuse_a_damaged_index(store, doing)
        results = _remove_revisions(store, list(revisions), _kept(keep_blobs), doing, failures)
    store.index.reserve.refill()
    return results


def _remove_revisions(store: Store, revisions: list[tuple[str, str]], kept: frozenset[str], doing: str,
                      failures: list[DepotError] | None = None) -> list[RemoveResult | None]:  # fmt: skip
    """:func:`remove_revisions` under the store's exclusive lock."""

    def delete_rows(con: sqlite3.Connection) -> tuple[set[int], dict[str, int], list[str]]:
        removed: set[int] = set()  # the revisions removed (their places in ``revisions``)
        last: dict[str, int] = {}  # blob -> the last revision that named it
        for place, (repo_id, commit_id) in enumerate(revisions):
            blobs = [row[0] for row in con.execute(
                "SELECT DISTINCT sha256 FROM files WHERE repo_id = ? AND commit_id = ?", (repo_id, commit_id))]  # fmt: skip
            # (its files and refs go with it: ON DELETE CASCADE)
            if not con.execute("DELETE FROM revisions WHERE repo_id = ? AND commit_id = ?",
                               (repo_id, commit_id)).rowcount:  # fmt: skip
                continue
            con.execute(
                "DELETE FROM revision_access WHERE repo_id = ? AND commit_id = ?", (repo_id, commit_id)
            )
            if not con.execute("SELECT 1 FROM revisions WHERE repo_id = ? LIMIT 1", (repo_id,)).fetchone():
                con.execute("DELETE FROM repos WHERE repo_id = ?", (repo_id,))
            removed.add(place)
            last.update(dict.fromkeys(blobs, place))
            # Its snapshot set aside before the rows go (Snapshots.set_aside: gc keeps a whole snapshot the index
            # does not know, an older index put back, and a killed removal must leave none), in the transaction
            # (a removal that waited on another process's write had it gone for the readers meanwhile, and for
            # nothing when it then failed: review 40)
            if place not in aside and (moved := store.snapshots.set_aside(repo_id, commit_id)) is not None:
                aside[place] = moved
        return removed, last, _delete_unreferenced_rows(con, [b for b in last if b not in kept])

    aside: dict[int, Path] = {}
    try:
        # On a full disk the index takes the room its transaction needs from the store's reserve.
        removed, last, freed = store.index.write_freeing(doing, delete_rows)
    except BaseException:
        # (back only where the rows stayed: a Ctrl-C just after the commit put a removed revision's snapshot
        # back, whole, kept by every gc as an older index's: review 40; the others go with the next gc)
        for place, moved in aside.items():
            with contextlib.suppress(DepotError, OSError, sqlite3.Error):
                if store.index.read("SELECT 1 FROM revisions WHERE repo_id = ? AND commit_id = ?",
                                    revisions[place]):  # fmt: skip
                    store.snapshots.put_back(moved, *revisions[place])
        raise
    problems: list[DepotError] = []
    deleted = _delete_each_blob_file(store, freed, problems)
    results: list[RemoveResult | None] = []
    for place, (repo_id, commit_id) in enumerate(revisions):
        if place not in removed:
            if place in aside:  # (a snapshot of a revision it did not hold: a leftover, as gc takes them)
                with contextlib.suppress(DepotError, OSError):
                    store.snapshots.put_back(aside[place], repo_id, commit_id)
            results.append(None)
            continue
        try:
            if place in aside:
                store.layout.rmtree(aside[place])
            store.snapshots.remove(repo_id, commit_id)
        except (
            DepotError
        ) as error:  # (said as what it is: `rm` said it failed, the repo gone, an explorer's trial)
            problems.append(StoreError(f"{repo_id}@{commit_id[:12]} was removed from the store, but its snapshot "
                                       f"folder was left as it is: {error}"))  # fmt: skip
        mine = [deleted[b] for b in freed if last[b] == place and b in deleted]
        results.append(RemoveResult(
            repo_id, (commit_id,), len(mine), sum(d.freed for d in mine),
            bytes_still_linked=sum(d.still_linked for d in mine),
            deleted=tuple(d.file for d in mine if d.file is not None)))  # fmt: skip
    if failures is not None:
        failures.extend(problems)
    elif problems:
        raise problems[0]
    return results


def drop_unreferenced(store: Store, keep_blobs: KeptBlobs) -> int:
    """Delete the blobs no file names and no writer relies on (``keep_blobs``); the bytes freed. The disk
    budget's first resort, before it evicts a model: a content a pull handed over to another before
    publishing it (transfer/pull.py), whose pull then failed, is counted, and no eviction names it."""
    with store.lock.exclusive():
        kept = _kept(keep_blobs)

        def delete_rows(con: sqlite3.Connection) -> list[str]:
            candidates = [row[0] for row in con.execute(
                "SELECT sha256 FROM blobs WHERE sha256 NOT IN (SELECT sha256 FROM files)")]  # fmt: skip
            return _delete_unreferenced_rows(con, [c for c in candidates if c not in kept])

        if not store.index.read("SELECT 1 FROM blobs WHERE sha256 NOT IN (SELECT sha256 FROM files) LIMIT 1"):
            return 0  # (the common case: one look, no write)
        _refuse_a_damaged_index(store, "freeing the blobs no file names")
        freed = store.index.write_freeing("freeing the blobs no file names", delete_rows)
        return _delete_blob_files(store, freed)[0]


def remove_files(store: Store, repo_id: str, commit_id: str, paths: Iterable[str],
                 keep_blobs: KeptBlobs = frozenset()) -> RemoveResult:  # fmt: skip
    """Remove some files from a revision that stays (one variant's own files), and free the blobs no one
    else uses (but ``keep_blobs``, as :func:`remove` keeps them); the revision's snapshot loses their
    links. Removing every file removes the revision."""
    wanted = set(paths)
    with store.lock.exclusive():
        held = {e.path for e in store.files(repo_id, commit_id)}
        if not held:
            raise RevisionNotFoundError(repo_id, commit_id)
        gone = sorted(wanted & held)
        if not gone:
            return RemoveResult(repo_id, (), 0, 0)
        if held > wanted & held:  # (else nothing would be left of it: the revision goes, below)
            _refuse_a_damaged_index(store, f"removing files of {repo_id}")
            kept = _kept(keep_blobs)

            def delete_rows(con: sqlite3.Connection) -> list[str]:
                candidates = {row[0] for row in con.execute(
                    f"SELECT sha256 FROM files WHERE repo_id = ? AND commit_id = ? AND path IN "
                    f"({','.join('?' * len(gone))})", (repo_id, commit_id, *gone))}  # fmt: skip
                con.execute(
                    f"DELETE FROM files WHERE repo_id = ? AND commit_id = ? AND path IN ({','.join('?' * len(gone))})",
                    (repo_id, commit_id, *gone),
                )
                return _delete_unreferenced_rows(con, sorted(candidates - kept))

            freed = store.index.write_freeing(f"removing files of {repo_id}@{commit_id[:12]}", delete_rows)
            bytes_freed, still_linked, deleted = _delete_blob_files(store, freed)
            store.snapshots.unlink(repo_id, commit_id, gone)
            store.index.reserve.refill()
            return RemoveResult(repo_id, (), len(freed), bytes_freed, bytes_still_linked=still_linked,
                                files_removed=tuple(gone), revisions_changed=(commit_id,), deleted=deleted)  # fmt: skip
    return remove(store, repo_id, commit_id, keep_blobs=keep_blobs)


@dataclass(frozen=True)
class _BlobDeleted:
    freed: int  # bytes given back to the disk
    still_linked: int  # bytes that stay: another name links the file
    file: tuple[int, int, int] | None  # the device, inode and size of a file deleted that nothing else names


def _delete_blob_files(store: Store, digests: list[str]) -> tuple[int, int, tuple[tuple[int, int, int], ...]]:
    """:func:`_delete_each_blob_file`, summed: (bytes freed, bytes still on the disk, the files deleted)."""
    each = _delete_each_blob_file(store, digests).values()
    return (sum(d.freed for d in each), sum(d.still_linked for d in each),
            tuple(d.file for d in each if d.file is not None))  # fmt: skip


def _delete_each_blob_file(store: Store, digests: list[str],
                           failures: list[DepotError] | None = None) -> dict[str, _BlobDeleted]:  # fmt: skip
    """Unlink the files of blobs whose rows are gone (under the exclusive lock): for each, the bytes freed, the
    bytes still on the disk because another name links them (a Hugging Face cache the store adopted or exported
    to, a folder imported with --link), and the device, inode and size of the file deleted if nothing else
    names it. ``failures``: a file that cannot be deleted is added there (and left out), the others deleted;
    without, its error is raised."""
    if digests:  # (a load killed midway left links to its model's blobs in tmp/: they are not "elsewhere")
        try:
            _collect_sessions(store, fresh=STARTING_SESSION_FRESH)
        except OSError as error:
            log.debug("tmp/ left as it is for now: %s", error)
    each: dict[str, _BlobDeleted] = {}
    sources, unrecorded = linked_sources(store, digests), unrecorded_links(store, digests)
    everything_unrecorded = store.index.setting("links_unrecorded") == "1"  # (not noted yet: store.py)
    for sha256 in digests:
        try:
            info = store.blobs.path(sha256).lstat()
        except OSError:
            info = None
        try:
            size = store.blobs.delete(
                sha256, sources.get(sha256), everything_unrecorded or sha256 in unrecorded
            )
        except (DepotError, OSError) as error:
            if failures is None:
                raise
            failures.append(
                error if isinstance(error, DepotError) else os_error(error, f"deleting blob {sha256}")
            )
            continue
        if info is not None and info.st_nlink > 1:
            each[sha256] = _BlobDeleted(0, size, None)
        else:
            each[sha256] = _BlobDeleted(
                size, 0, (info.st_dev, info.st_ino, size) if info is not None and size else None
            )
    # (a row left by a crash or a full disk here is harmless: a file's mode comes back only while it is
    # the one recorded, as the store left it, with no other name; the blob's next placement replaces it)
    _forget_links(store, [*sources, *unrecorded])
    return each


def _forget_links(store: Store, digests: list[str]) -> None:
    """Drop the records of the linked files of blobs let go of."""
    if digests:
        with (
            contextlib.suppress(DepotError),
            store.index.write("forgetting the linked files let go of") as con,
        ):
            con.executemany("DELETE FROM linked_sources WHERE sha256 = ?", [(sha256,) for sha256 in digests])


def linked_sources(store: Store, digests: list[str]) -> dict[str, LinkedSource]:
    """The files of the user's these blobs are hard links of (import --link, an adopted Hugging Face cache),
    by SHA-256, with the modes they had before the store took them (not those linked in before such files
    were recorded: :func:`unrecorded_links`)."""
    found: dict[str, LinkedSource] = {}
    for row in _link_rows(store, digests):
        if row["mode"] != UNRECORDED_MODE:
            found[row["sha256"]] = LinkedSource(
                Path(row["source"]), (row["device"], row["inode"]), row["mode"]
            )
    return found


def unrecorded_links(store: Store, digests: list[str]) -> set[str]:
    """Those of these blobs linked in before the store recorded the files it links (store.py notes them)."""
    return {row["sha256"] for row in _link_rows(store, digests) if row["mode"] == UNRECORDED_MODE}


def _link_rows(store: Store, digests: list[str]) -> list[sqlite3.Row]:
    rows: list[sqlite3.Row] = []
    for start in range(0, len(digests), 500):  # (SQLite's bound on parameters)
        part = digests[start : start + 500]
        rows += store.index.read(
            f"SELECT sha256, source, device, inode, mode FROM linked_sources WHERE sha256 IN "
            f"({','.join('?' * len(part))})", tuple(part))  # fmt: skip
    return rows


def _has_other_names(path: Path) -> bool:
    """Whether the file has a hard link besides ``path`` (deleting ``path`` then frees nothing)."""
    try:
        return path.lstat().st_nlink > 1
    except OSError:
        return False


def _other_refs(store: Store, repo_id: str, commit_id: str, branch: str) -> tuple[str, ...]:
    """The refs besides ``branch`` that point at ``commit_id``; when there are any, ``branch`` is deleted
    (alone) and they are returned."""
    with store.index.write(f"removing {repo_id}@{branch}") as con:
        others = tuple(r[0] for r in con.execute(
            "SELECT name FROM refs WHERE repo_id = ? AND commit_id = ? AND name != ? ORDER BY name",
            (repo_id, commit_id, branch)))  # fmt: skip
        if others:
            con.execute("DELETE FROM refs WHERE repo_id = ? AND name = ?", (repo_id, branch))
    return others


def _delete_unreferenced_rows(con: sqlite3.Connection, candidates: Iterable[str]) -> list[str]:
    """Delete the blob rows of ``candidates`` that no file names; returns them. Whether a file names one is read
    from the table itself, not its index by blob (``files_by_blob``): one flipped bit of that index, which
    SQLite's quick check does not see, left a file's row out of it, and gc deleted the only copy of its
    weights (an explorer's trial). One scan of the table, whatever the candidates (a scan per batch of them
    was quadratic: 33 s for 100,000 of 400,000 files, a review); selecting ``size``, which the index lacks,
    keeps the scan on the table (SQLite 3.40 scanned the covering index of a WITHOUT ROWID table named NOT
    INDEXED). The scan's matching is SQLite's (``+sha256``: no index for the term), not Python's: a removal
    on a store of 70,000 files took 53 ms in Python's loop over every row, 10 ms so, and the disk budget
    evicts unit by unit, each a removal (1,318 evictions took 137 s on a big store: an explorer's trial)."""
    wanted = list(dict.fromkeys(candidates))
    if not wanted:
        return []
    named = {sha256 for sha256, _size in con.execute(
        "SELECT sha256, size FROM files WHERE +sha256 IN (SELECT value FROM json_each(?))", (json.dumps(wanted),))}  # fmt: skip
    freed = [sha256 for sha256 in wanted if sha256 not in named]
    con.executemany("DELETE FROM blobs WHERE sha256 = ?", [(sha256,) for sha256 in freed])
    return freed


def index_damage_advice(store: Store) -> str:
    """How to get out of a damaged index: the blobs and snapshots are intact beside it."""
    return _advice(store.home)


# Seconds a passed quick check of the index stands for the removals that follow (the budget evicts unit by
# unit, each a removal: a check each took 1.3 s apiece on an index of 560 MB, under the exclusive lock)
INDEX_CHECK_STANDS = 30.0
_index_checked: dict[Path, float] = {}


def _refuse_a_damaged_index(store: Store, doing: str, fresh: bool = False) -> None:
    """IndexDamagedError when the index fails SQLite's quick check: SQLite reads a damaged page without a
    word, and gc took 4 of 7 good blobs for orphans after one flipped bit of the index (a trial). A check
    passed in the last INDEX_CHECK_STANDS seconds stands, unless ``fresh`` (gc)."""
    now = time.monotonic()
    if not fresh and now - _index_checked.get(store.index.path, -INDEX_CHECK_STANDS) < INDEX_CHECK_STANDS:
        return
    found = [row[0] for row in store.index.read("PRAGMA quick_check(3)")]
    if found == ["ok"]:
        _index_checked[store.index.path] = now
    else:
        _index_checked.pop(store.index.path, None)
        raise IndexDamagedError(
            f"the index {store.index.path} failed SQLite's check ({'; '.join(found)}): {doing} deleted nothing "
            f"(it would take good files for garbage). {index_damage_advice(store)}"
        )


def gc(store: Store, partials: bool = False) -> GcReport:
    """Free unreferenced blobs, orphan files, abandoned partials, stale snapshots and quarantined files.

    Interrupted downloads in partials/ are kept for a resume unless untouched for a week, or ``partials``
    is True (then every one no process is using goes).
    """

    def delete_rows(con: sqlite3.Connection) -> None:
        unreferenced = [r[0] for r in con.execute(
            "SELECT sha256 FROM blobs WHERE sha256 NOT IN (SELECT sha256 FROM files)")]  # fmt: skip
        # (not those a write under way relies on: an eviction left them for it, a revision is about to name them)
        _delete_unreferenced_rows(con, [sha256 for sha256 in unreferenced if sha256 not in relied_on])
        # The listings kept of commits the store no longer holds, nor is the repo's scan of (a repo removed and
        # never scanned again: a save prunes only the repo it saves)
        con.execute(
            "DELETE FROM commit_listings WHERE NOT EXISTS (SELECT 1 FROM revisions r WHERE commit_listings.repo_id "
            "= r.repo_id AND r.commit_id = commit_listings.commit_id) AND NOT EXISTS (SELECT 1 FROM manifests m "
            "WHERE commit_listings.repo_id = m.repo_id AND m.commit_id = commit_listings.commit_id)"
        )

    with store.lock.exclusive():
        _refuse_a_damaged_index(store, "gc", fresh=True)
        relied_on = store.budget.kept_blobs()
        # On a full disk the index takes the room its transaction needs from the store's reserve.
        store.index.write_freeing("collecting garbage", delete_rows)
        known = {r["sha256"] for r in store.index.read("SELECT sha256 FROM blobs WHERE state = 'ok'")}
        live = {
            (r["repo_id"], r["commit_id"])
            for r in store.index.read("SELECT repo_id, commit_id FROM revisions")
        }
        unknown = store.snapshots.whole_unknown(live)  # (kept, with their blobs: see whole_unknown)
        held_by_unknown = set().union(*unknown.values())
        # A file this user may not delete (another user's, a `sudo` pull's) is passed over, and said at the end:
        # gc stopped at the first, every time, and never reached the rest (a trial)
        refused: list[StoreError] = []
        # (a file of the user's one is a link of gets its mode back: an `rm` killed after its commit left
        # them read-only for good, an explorer's trial)
        orphans = {path: path.name for path in _files_under(store.layout.blobs)
                   if path.name not in known and path.name not in held_by_unknown}  # fmt: skip
        bytes_freed, blobs_removed = _delete_let_go(store, orphans, known, refused)
        partials_removed = kept = resumable = stale = 0
        with _passed_over(refused):
            partials_removed, kept, session_bytes = _collect_sessions(store, orphans_gone=True)
            bytes_freed += session_bytes
        with _passed_over(refused):
            # (and those of a content no commit the store knows of lists any more: a Ctrl-C'd pull of a file
            # the upstream replaced since kept its whole size, outside the budget, for a week, an explorer's
            # trial)
            gone_by = store.partials.keys_on_disk() - _listed_download_keys(store)
            downloads_removed, resumable, running, download_bytes = store.partials.collect(
                remove_all=partials, held=_held_download_keys(store, known) | gone_by, relied_on=relied_on
            )
            partials_removed += downloads_removed
            kept += running
            bytes_freed += download_bytes
        quarantined = _files_under(store.layout.quarantine)
        bytes_freed += _delete_quarantined(store, quarantined, known, refused)[0]
        with _passed_over(refused):
            stale = store.snapshots.remove_stale(live | unknown.keys())
    store.index.reserve.refill()  # from the space just freed (if it was released, else when there is room)
    return GcReport(blobs_removed, bytes_freed, partials_removed, stale, kept, resumable,
                    len(quarantined), tuple(str(error) for error in refused),
                    tuple(f"{repo_id}@{commit_id}" for repo_id, commit_id in sorted(unknown)))  # fmt: skip


def _held_download_keys(store: Store, known: set[str]) -> set[str]:
    """The keys a download of a content the store holds whole goes by (:func:`partial_key`): its SHA-256,
    or for a small file fetched from the Hub (named by its git oid alone), ``git-<oid>``."""
    oids = store.index.read(
        "SELECT DISTINCT f.git_oid FROM files f JOIN blobs b USING (sha256) WHERE b.state = 'ok'"
    )
    return known | {partial_key(None, row["git_oid"]) for row in oids}


def _listed_download_keys(store: Store) -> set[str]:
    """The download keys of every file the store's saved scans and kept commit listings name: what a pull of a
    commit the store knows of may resume."""
    keys: set[str] = set()
    bodies = [row["body"] for row in store.index.read("SELECT body FROM manifests")]
    if store.index.schema >= 10:
        bodies += [
            f'{{"files": {row["files"]}}}' for row in store.index.read("SELECT files FROM commit_listings")
        ]
    for body in bodies:
        with contextlib.suppress(ValueError, TypeError, KeyError, AttributeError):
            for listed in json.loads(body)["files"]:
                keys.add(partial_key(listed.get("sha256"), str(listed.get("git_oid", ""))))
    return keys


@contextlib.contextmanager
def _passed_over(refused: list[StoreError] | None) -> Iterator[None]:
    """A deletion this user may not make (a permission refused) is noted in ``refused``, and gc goes on
    (None: it raises, as any other failure)."""
    try:
        yield
    except StoreError as error:
        if refused is None or not isinstance(error.__cause__, PermissionError):
            raise
        refused.append(error)


def sweep_dead_sessions(store: Store) -> int:
    """Remove the write sessions (tmp/) of writers that are gone (an import killed midway left its staged
    files there until a gc: 129 MiB in a trial), when the store lock is free now (else the next writer
    does); the bytes freed."""
    with store.lock.exclusive_if_free() as free:
        if not free:
            return 0
        try:
            freed = _collect_sessions(store)[2]
        except OSError as error:  # (a session another writer ends or starts meanwhile: the next one does it)
            log.debug("tmp/ left as it is for now: %s", error)
            return 0
    if freed:
        log.info("removed what writers that ended midway left in tmp/ (%d bytes)", freed)
    return freed


def _collect_sessions(store: Store, fresh: float = 0.0, orphans_gone: bool = False) -> tuple[int, int, int]:
    """Remove the write sessions (tmp/) whose writer is gone (one still starting, not if younger than
    ``fresh`` seconds): (partial files removed, sessions kept, bytes freed, as allocated on disk).
    ``orphans_gone``: gc deleted the blobs no row holds just before: a linked file still read-only is
    another's now (a committed blob, another store's), and its session waits no more."""
    removed = kept = freed = 0
    try:
        entries = list(store.layout.tmp.iterdir())
    except FileNotFoundError:
        return 0, 0, 0
    for entry in entries:
        try:
            gone, stays, frees = _collect_session(store, entry, fresh, orphans_gone)
        except FileNotFoundError:
            # A session ends by deleting its folder, then letting go of its lock (store/blobs.py): one that
            # ends as gc looks reads as abandoned, and goes under it (gc raised a bare FileNotFoundError
            # beside a loading thread, 18 of 8,308 calls, an explorer's trial)
            continue
        removed, kept, freed = removed + gone, kept + stays, freed + frees
    return removed, kept, freed


def _collect_session(store: Store, entry: Path, fresh: float, orphans_gone: bool) -> tuple[int, int, int]:
    """:func:`_collect_sessions` for one entry of tmp/."""
    abandoned = WriteSession.is_abandoned(entry, fresh) if entry.is_dir() else True
    if not abandoned:
        return 0, 1, 0
    if not entry.is_dir():
        freed = _allocated(entry)
        store.layout.unlink(entry)
        return 0, 0, freed
    waiting = give_back_modes(entry)
    # (a partial linked from elsewhere too, as an adoption's, frees nothing)
    freed = _allocated(entry)
    removed = sum(1 for p in entry.iterdir() if p.name.endswith(".partial"))
    if waiting and not orphans_gone and not _recorded_links(store, list(waiting.values())):
        # A linked file whose blob the writer placed and never committed (killed between the two): its note
        # of the mode stays, alone, until gc deleted that orphan blob, then gives the mode back (swept first
        # by the next write, the note went, and the user's files stayed 0444 for good: a crash fuzzer's trial)
        for path in entry.iterdir():
            if path not in waiting:
                store.layout.unlink(path)
        return removed, 1, freed
    store.layout.rmtree(entry)
    return removed, 0, freed


def _recorded_links(store: Store, inodes: list[tuple[int, int]]) -> bool:
    """Whether every one of these linked files is a committed blob's (a ``linked_sources`` row names it)."""
    for device, inode in inodes:
        if not store.index.read(
            "SELECT 1 FROM linked_sources WHERE device = ? AND inode = ? LIMIT 1", (device, inode)
        ):
            return False
    return True


def _allocated(entry: Path) -> int:
    """Bytes ``entry`` (a file, or a folder's files) takes on disk: a preallocated partial counts whole."""
    paths = _files_under(entry) if entry.is_dir() else [entry]
    total = 0
    for path in paths:
        with contextlib.suppress(OSError):
            found = path.lstat()
            total += found.st_blocks * 512 if found.st_nlink == 1 else 0
    return total


def drop_quarantine(store: Store) -> int:
    """Delete every quarantined file, as gc does (a user's linked file gets its mode back, its record goes);
    the bytes freed. For a disk short of room: it needs theirs more than anyone needs a corrupt copy."""
    with store.lock.exclusive():
        quarantined = _files_under(store.layout.quarantine)
        digests = sorted({path.name.split(".", 1)[0] for path in quarantined})
        good: set[str] = set()
        for start in range(0, len(digests), 500):  # (SQLite's bound on parameters)
            part = digests[start : start + 500]
            good.update(row[0] for row in store.index.read(
                f"SELECT sha256 FROM blobs WHERE state = 'ok' AND sha256 IN ({','.join('?' * len(part))})",
                tuple(part)))  # fmt: skip
        return _delete_quarantined(store, quarantined, good)[0] if quarantined else 0


def drop_abandoned_downloads(store: Store, spare: Set[str]) -> int:
    """Delete every interrupted download no process is using, but those of ``spare`` (download keys: a
    pull's own, which it resumes), as ``gc --partials`` does; the bytes freed. For a disk short of room: a
    pull killed mid-way kept the whole preallocated size of its files a week, beside the budget, and every
    pull of another model failed for want of that room (an explorer's trial)."""
    with store.lock.exclusive():
        return store.partials.collect(remove_all=True, relied_on=store.budget.kept_blobs(), spare=spare)[3]


def _delete_quarantined(
    store: Store, quarantined: list[Path], good: set[str], refused: list[StoreError] | None = None
) -> tuple[int, int]:
    """Delete the quarantined files, as :func:`_delete_let_go` does (a corrupt one of the user's stayed
    read-only for good); (the bytes freed, the files deleted)."""
    return _delete_let_go(store, {path: path.name.split(".", 1)[0] for path in quarantined}, good, refused)


def _delete_let_go(
    store: Store, files: dict[Path, str], good: set[str], refused: list[StoreError] | None = None
) -> tuple[int, int]:
    """Delete the store's ``files`` no row holds (quarantined, or orphans: a blob whose row went), each of
    the SHA-256 it maps to; (the bytes freed, the files deleted). One that is a hard link of a file of the
    user's (``import --link``, an adopted cache) goes as :func:`_delete_blob_files` deletes a blob: the file
    gets the mode it had back, and its record goes. Not for a blob placed again since (``good``): the record
    is that placement's now."""
    let_go = sorted({sha256 for sha256 in files.values() if sha256 not in good})
    sources = linked_sources(store, let_go)
    freed = deleted = 0
    for path, sha256 in files.items():
        with _passed_over(refused):
            freed += _unlink_freeing(store, path)
            deleted += 1
            source = sources.get(sha256)
            if source is not None:
                give_back_mode(path, source.path, source.mode, source.inode)
    _forget_links(store, [*sources, *unrecorded_links(store, let_go)])
    return freed, deleted


def _unlink_freeing(store: Store, path: Path) -> int:
    """Delete a file of the store; the bytes that frees: none while another name links it (a quarantined
    blob of an ``import --link`` is the user's file still: gc said it freed its size)."""
    linked = _has_other_names(path)
    size = store.layout.unlink(path)
    return 0 if linked else size


def _files_under(root: Path) -> list[Path]:
    found: list[Path] = []
    for directory, _dirs, names in os.walk(root):
        found.extend(Path(directory) / name for name in names)
    return found


def _tree_bytes(root: Path, only_names: bool = False) -> int:
    """The sizes of the files under ``root``; ``only_names``: of those no other name holds (a download's
    file published by a hard link into blobs/, its pull killed before it dropped its own name, is counted
    as a blob already; a linked import's, as the user's file)."""
    sizes = 0
    for path in _files_under(root):
        try:
            info = path.lstat()
        except FileNotFoundError:
            continue
        if not only_names or info.st_nlink == 1:
            sizes += info.st_size
    return sizes


def _write_session_bytes(store: Store) -> tuple[int, int]:
    """What tmp/ holds (files no other name holds): (of writers that are gone, of writes under way)."""
    gone = under_way = 0
    try:
        entries = list(store.layout.tmp.iterdir())
    except FileNotFoundError:
        return 0, 0
    for entry in entries:
        live = entry.is_dir() and not WriteSession.is_abandoned(entry, STARTING_SESSION_FRESH)
        held = _tree_bytes(entry, True) if entry.is_dir() else _tree_bytes_of_file(entry)
        if live:
            under_way += held
        else:
            gone += held
    return gone, under_way


def _tree_bytes_of_file(path: Path) -> int:
    try:
        info = path.lstat()
    except FileNotFoundError:
        return 0
    return info.st_size if info.st_nlink == 1 else 0


def partial_bytes(store: Store) -> int:
    """Disk the store's downloads in progress or kept for a resume take (each has room for its whole file as
    it starts), beside the disk budget."""
    return _tree_bytes(store.layout.partials, True)


def quarantine_bytes(store: Store) -> int:
    """Disk the store's quarantined files (corrupt blobs moved aside) take until `gc` deletes them, beside the
    disk budget (a pull or an import that restores a blob deletes its copies: store/blobs.py)."""
    return _tree_bytes(store.layout.quarantine)


def disk_usage(store: Store) -> DiskUsage:
    blob_row = store.index.read(
        "SELECT COUNT(*) AS n, COALESCE(SUM(size), 0) AS bytes FROM blobs WHERE state = 'ok'"
    )[0]
    # (a file whose blob is quarantined is not held: counted, it made up savings of deduplication)
    logical = store.index.read(
        "SELECT COALESCE(SUM(f.size), 0) AS bytes FROM files f JOIN blobs b USING (sha256) WHERE b.state = 'ok'"
    )[0]["bytes"]
    repos = []
    for row in store.index.read(
        """
        SELECT r.repo_id,
               (SELECT COUNT(*) FROM revisions v WHERE v.repo_id = r.repo_id) AS revisions,
               (SELECT COUNT(*) FROM files f WHERE f.repo_id = r.repo_id) AS files,
               (SELECT COALESCE(SUM(f.size), 0) FROM files f JOIN blobs b USING (sha256)
                WHERE f.repo_id = r.repo_id AND b.state = 'ok') AS logical,
               (SELECT COALESCE(SUM(b.size), 0) FROM blobs b WHERE b.state = 'ok' AND b.sha256 IN
                    (SELECT sha256 FROM files f WHERE f.repo_id = r.repo_id)
                AND NOT EXISTS (SELECT 1 FROM files o WHERE o.sha256 = b.sha256 AND o.repo_id != r.repo_id))
                   AS unique_bytes
        FROM repos r ORDER BY r.repo_id
        """
    ):
        repos.append(
            RepoDiskUsage(row["repo_id"], row["revisions"], row["files"], row["logical"], row["unique_bytes"])
        )
    index_bytes = sum(p.stat().st_size for p in store.layout.home.glob("index.db*") if p.is_file())
    unfinished, writing = _write_session_bytes(store)
    held = removed_files_held([f"{os.path.realpath(folder)}/" for folder in
                               (store.layout.blobs, store.layout.tmp, store.layout.quarantine)])  # fmt: skip
    return DiskUsage(
        home=str(store.home),
        blobs=blob_row["n"],
        blob_bytes=blob_row["bytes"],
        logical_bytes=logical,
        partial_bytes=partial_bytes(store),
        unfinished_write_bytes=unfinished,
        writing_bytes=writing,
        partial_kept_bytes=_kept_for_resumes(store),
        linked_bytes=_linked_bytes(store),
        quarantine_bytes=quarantine_bytes(store),
        index_bytes=index_bytes,
        reserve_bytes=store.index.reserve.held(),
        removed_held_bytes=sum(size for size, _ in held.values()),
        removed_held_by=tuple(sorted(set().union(*(pids for _, pids in held.values())))),
        repos=tuple(repos),
        read_only=store.read_only,
    )


def _linked_bytes(store: Store) -> int:
    """The bytes of the blobs with another name outside the store too (a Hugging Face cache's, an `import
    --link` folder's): on the disk once, and not freed when the store lets them go."""
    return sum(shared_blobs(store).values())


def _kept_for_resumes(store: Store) -> int:
    """The bytes interrupted downloads received and keep for a resume (by their logs; a download of one chunk
    when it came whole: what the Ctrl-C's line and `status` count)."""
    kept = 0
    for key in store.partials.keys_on_disk():
        with contextlib.suppress(DepotError, OSError):  # (a file of another name there: none of ours)
            kept += store.partials.kept_bytes(key) or 0
    return kept


@dataclass(frozen=True)
class StoreTotals:
    """What the store holds, in a few figures (the node's stats)."""

    repo_ids: tuple[str, ...]
    blobs: int  # servable blobs (quarantined ones excluded)
    blob_bytes: int
    logical_bytes: int  # the size of every file of every revision (content shared or not) the store holds
    quarantined_blobs: int = 0  # blobs found corrupt and taken out of service (still listed by their files)


def totals(store: Store, public_only: bool = False) -> StoreTotals:
    """The store's totals, as ``disk_usage`` counts them; ``public_only``: counting only repos that are not
    private and what they use (a blob a public repo shares with a private one counts; one that only private
    repos use does not)."""
    public = "r.private = 0" if public_only else "1"
    used = (
        "AND EXISTS (SELECT 1 FROM files f JOIN repos r USING (repo_id) WHERE f.sha256 = b.sha256 AND r.private = 0)"
        if public_only
        else ""
    )
    repo_ids = tuple(r["repo_id"] for r in store.index.read(
        f"SELECT repo_id FROM repos r WHERE {public} ORDER BY repo_id"))  # fmt: skip
    blobs = store.index.read(
        f"SELECT COUNT(*) AS n, COALESCE(SUM(size), 0) AS bytes FROM blobs b WHERE state = 'ok' {used}"
    )[0]
    logical = store.index.read(
        "SELECT COALESCE(SUM(f.size), 0) AS bytes FROM files f JOIN repos r USING (repo_id) "
        f"JOIN blobs b USING (sha256) WHERE {public} AND b.state = 'ok'"
    )[0]["bytes"]
    quarantined = store.index.read(f"SELECT COUNT(*) AS n FROM blobs b WHERE state != 'ok' {used}")[0]["n"]
    return StoreTotals(repo_ids, blobs["n"], blobs["bytes"], logical, quarantined)
