"""The store: content-addressed blobs, their chunk digests, and the repos, revisions and files that use them.

It knows nothing of HTTP or the Hub. Writing lives in :mod:`.importer`, upkeep (verify, gc, remove,
du) in :mod:`.maintenance`; this module opens the store and answers reads.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import mmap
import os
import re
import socket
import sqlite3
import time
import uuid
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from modeldepot.config import DEFAULT_CHUNK_SIZE, DepotConfig
from modeldepot.errors import (
    BlobRemovedError,
    ConfigError,
    CorruptBlobError,
    DepotError,
    EntryNotFoundError,
    InvalidInputError,
    InvalidRevisionError,
    NotFoundError,
    ReadOnlyStoreError,
    RepoNotFoundError,
    RevisionNotFoundError,
    StoreClosedError,
    StoreError,
    StoreFullError,
)
from modeldepot.hashing import BlobDigest, chunk_count, digest_stream
from modeldepot.store.access import AccessLog
from modeldepot.store.blobs import UNRECORDED_MODE, BlobFiles, WriteSession
from modeldepot.store.budget import DiskBudget
from modeldepot.store.confined import folders_in, opened_folder
from modeldepot.store.durability import Durability
from modeldepot.store.filesystem import shared_filesystem
from modeldepot.store.index import Index, index_damage_advice
from modeldepot.store.layout import REFUSES_WRITES, StoreLayout, keeps_the_group_out, os_error
from modeldepot.store.locks import StoreLock
from modeldepot.store.manifests import ManifestStore
from modeldepot.store.models import BlobRecord, FileEntry, HeldRepo, RepoInfo, RepoSummary, RevisionInfo
from modeldepot.store.partials import PartialFiles
from modeldepot.store.snapshots import Snapshots
from modeldepot.store.verified import VerifiedBlob
from modeldepot.validation import (
    SHORT_COMMIT,
    is_commit_id,
    validate_path,
    validate_repo_id,
    validate_revision,
)

__all__ = ["Store"]

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"[0-9a-f]{64}")
# A condition on blobs ``b``: a public repo's file has the content (it may be served without the node's token)
# A repo private on its upstream's word only because that upstream gates it (RepoSummary.gated)
_GATED = "(r.private = 1 AND r.hidden_at IS NOT NULL AND r.gated_only = 1)"
_PUBLIC = " AND EXISTS (SELECT 1 FROM files f JOIN repos r USING (repo_id) WHERE f.sha256 = b.sha256 AND r.private = 0)"
_FILE_COLUMNS = "f.repo_id, f.commit_id, f.path, f.size, f.sha256, f.git_oid, f.lfs, b.chunk_size, b.state"


def _entry(row: sqlite3.Row) -> FileEntry:
    return FileEntry(
        repo_id=row["repo_id"],
        commit_id=row["commit_id"],
        path=row["path"],
        size=row["size"],
        sha256=row["sha256"],
        git_oid=row["git_oid"],
        lfs=bool(row["lfs"]),
        chunk_size=row["chunk_size"],
    )


def node_id_of(store_id: str, home: Path) -> str:
    """The id a node serving the store is known by in its fleet: the store's, on this machine, at this path.
    A copy of a store (`cp -a`, an image with models baked in run twice, a cloned machine) is another node:
    known by the store's id alone, a copy's node pushed the original out of the fleet (a trial). Two
    processes serving one store here are one node (the second is told so), and so are a node and a `pull`
    beside it on its store (the swarm takes them for one)."""
    where = f"{store_id} {socket.gethostname()} {os.path.realpath(home)}"
    return hashlib.blake2b(where.encode("utf-8", "surrogateescape"), digest_size=16).hexdigest()


def _naming(error: CorruptBlobError | NotFoundError, entry: FileEntry) -> DepotError:
    """``error`` about a blob, said of the file a loader's folder needed (it named a digest alone)."""
    if not isinstance(error, CorruptBlobError):
        return error
    named = CorruptBlobError(error.sha256, f"{entry.path} of {entry.repo_id}@{entry.commit_id[:12]}: {error.detail}",
                             kept_in_place=error.kept_in_place)  # fmt: skip
    named.found_before = error.found_before
    return named


def _removed(blob: BlobRecord | FileEntry) -> BlobRemovedError:
    if isinstance(blob, FileEntry):
        return BlobRemovedError(f"{blob.repo_id}@{blob.commit_id[:12]}: {blob.path} was removed from the store "
                                "while it was being opened", repo_id=blob.repo_id, path=blob.path)  # fmt: skip
    return BlobRemovedError(f"blob {blob.sha256[:16]}… was removed from the store while it was being opened")


class _AnyPlacement:
    """:meth:`Store.quarantine` without a placement seen: whatever the index holds now."""


ANY_PLACEMENT = _AnyPlacement()

_WARNED_SHARED: set[Path] = set()
_WARNED_GROUP: set[Path] = set()


def _warn_if_shared(home: Path) -> None:
    """A store on a file system several machines may share is one machine's all the same (store/filesystem.py):
    said once per process."""
    shared = shared_filesystem(home)
    if shared is None or home in _WARNED_SHARED:
        return
    _WARNED_SHARED.add(home)
    log.warning("the store %s is on %s (mounted at %s), a file system several machines may share: use it from "
                "this machine alone (its index needs one machine's shared memory, and the locks of such file "
                "systems may not hold between machines). To share its models, serve it from here (modeldepot "
                "serve) and point the other machines at it (MODELDEPOT_SERVERS, or HF_ENDPOINT), or give each "
                "machine a MODELDEPOT_HOME on its own disk", home, shared[1], shared[0])  # fmt: skip


def _warn_if_keeping_the_group_out(home: Path) -> None:
    """A store a group shares, written under a umask that takes the group's write away: said once per process
    (the command line sets the umask itself: cli/options.py)."""
    if home in _WARNED_GROUP or not keeps_the_group_out(home):
        return
    _WARNED_GROUP.add(home)
    log.warning("the store %s is shared by its folder's group, and this process's umask takes the group's write "
                "away from what it makes: the other members' rm, gc and pulls of it will fail. Set umask 002 "
                "(os.umask(0o002) before opening it; UMask=0002 for a service)", home)  # fmt: skip


T = TypeVar("T")


def _weakly(method: Callable[..., T]) -> Callable[..., T]:
    """``method``, called through a weak reference to its object (StoreClosedError once it is gone)."""
    held = weakref.WeakMethod(method)

    def call(*args: Any) -> T:
        bound = held()
        if bound is None:
            raise StoreClosedError("the store was dropped and closed")
        return bound(*args)

    return call


def _close_store(durability: Durability, access: AccessLog, index: Index) -> None:
    """Close a store's parts (its close, or its collection when nothing holds it)."""
    durability.close()
    try:
        access.close()
    except DepotError as error:  # counts only tune preloading: a store that cannot take them still closes
        log.warning("could not record model accesses on close: %s", error)
    finally:
        index.close()


def _refuse_a_folder_not_the_stores(layout: StoreLayout) -> None:
    """ConfigError unless a store may be made in the home (a new or empty folder): StoreLayout.not_the_stores."""
    theirs, filled = layout.not_the_stores()
    if theirs:
        shown = ", ".join(theirs[:5]) + (f" and {len(theirs) - 5} more" if len(theirs) > 5 else "")
        raise ConfigError(f"{layout.home} holds files and no store ({shown}): a store is made only in a new or "
                          "empty folder, so that nothing of yours is taken for its own; give it a folder of its own "
                          "(--home, MODELDEPOT_HOME)")  # fmt: skip
    if filled:
        raise ConfigError(f"{layout.home} holds a store's files ({', '.join(f'{name}/' for name in filled)}) but no "
                          f"index ({layout.index_path} is missing): a new one would take them all for garbage. Put "
                          f"the index back; else {index_damage_advice(layout.home)}")  # fmt: skip


class Store:
    """A store at ``config.home``, created on first use (unless ``create`` is false: then a folder that holds
    no store is a :class:`ConfigError`, so a mistyped home is not taken for a new, empty store)."""

    def __init__(self, config: DepotConfig, *, create: bool = True, read_only: str | None = None) -> None:
        """``read_only``: open the store read-only whatever it is, for that reason (as in "the store at X is
        ..."; a store read through by another: tiers.py)."""
        self.layout = StoreLayout(config.home)
        held = self.layout.holds_a_store()
        self.made_now = not held  # (no store was there: this one made it)
        if not create and not held:
            raise ConfigError(f"no store at {config.home}: nothing was imported, pulled or served there "
                              "(check the folder's name)")  # fmt: skip
        if not held and read_only is None:
            _refuse_a_folder_not_the_stores(self.layout)
        # A store on a read-only mount (a container's read-only root, a read-only volume or export), or one
        # this user may not write (another user's), is read and served as it is: nothing is created, locked,
        # recorded or flushed there, every write is a ReadOnlyStoreError, and what a check finds corrupt is
        # refused by this process, left in place.
        self.read_only_reason = read_only or (self.layout.read_only_reason() if held else None)
        self.read_only = self.read_only_reason is not None
        if not self.read_only:
            self.layout.create()
            _warn_if_shared(self.layout.home)
            _warn_if_keeping_the_group_out(self.layout.home)
        self.index = Index(self.layout.index_path, self.layout.lock_path.parent / "index-setup.lock",
                           read_only=self.read_only, why=self.read_only_reason)  # fmt: skip
        self.blobs = BlobFiles(self.layout)
        self.snapshots = Snapshots(self.layout)
        self.lock = StoreLock(self.layout.lock_path, read_only=self.read_only)
        self.manifests = ManifestStore(self.index)
        self.access = AccessLog(self.index, enabled=not self.read_only)
        # What the process holds of this store in memory (a depot's held.HeldModels, set by the depot whose own
        # store it is): a RAM tier built on the store alone tells it of what it maps
        self.held_models: Any = None
        self.chunk_size = self._settle_chunk_size(config.chunk_size, config.chunk_size_required)
        self.partials = PartialFiles(self.layout, self.chunk_size, writeback=config.durability == "sync")
        self.store_id = self._setting_or_default("store_id", uuid.uuid4().hex)
        self.node_id = node_id_of(self.store_id, self.home)
        if not self.read_only and self.index.setting("links_unrecorded") == "1":
            self._note_links_made_before_records()
        # (read-only) blobs found corrupt, by the placement found so: never served, left in place; a repair
        # where the store is writable (verify, then an import or a pull) is a new placement, served again
        self._refused: dict[str, float] = {}
        self.refusals = 0  # blobs this process came to refuse (what it tells its fleet it holds changed)
        self._checked: dict[str, float] = {}  # (read-only) blob -> when this process found it good
        self._said_rehashing = False  # (read-only) whether a blob newer than its record was said
        # (its flusher, a running thread, reaches the store weakly: a store nothing else holds is collected, and
        # closes, its thread ended; a dropped depot's stayed open for good, a review)
        self.durability = Durability(self.index, self.blobs.path, _weakly(self.check_blob), _weakly(self.quarantine),
                                     deferred=config.durability == "deferred", read_only=self.read_only)  # fmt: skip
        self._closer = weakref.finalize(self, _close_store, self.durability, self.access, self.index)
        self._closer.atexit = False  # (at exit, as before: what is unflushed is the next open's to check)
        self.budget = DiskBudget(self, config.max_size)
        self._quarantine_hooks: list[Callable[[str], None]] = []

    @property
    def home(self) -> Path:
        return self.layout.home

    def close(self) -> None:
        self._closer()

    def _note_links_made_before_records(self) -> None:
        """(Once, on a store upgraded from before schema 9, which linked files in without recording them.)
        The blobs another name links now are noted as linked in, their files unknown (a ``linked_sources``
        row without a source); the rest are the store's own. A flag for the whole store, kept for good, made
        every blob exported to a Hugging Face cache after the upgrade go uncounted by the disk budget (a
        store past its budget said 3% used: an explorer's trial)."""
        folder, linked = str(self.layout.blobs), []
        for row in self.index.read("SELECT sha256 FROM blobs"):
            sha256 = str(row["sha256"])
            if re.fullmatch(r"[0-9a-f]{64}", sha256) is None:
                continue  # (a row no write makes: no path built from it)
            with contextlib.suppress(OSError):
                if os.stat(f"{folder}/{sha256[:2]}/{sha256}", follow_symlinks=False).st_nlink > 1:
                    linked.append((sha256,))
        with self.index.write("noting the files linked in before they were recorded") as con:
            con.executemany("INSERT OR IGNORE INTO linked_sources (sha256, source, device, inode, mode) "
                            f"VALUES (?, '', 0, 0, {UNRECORDED_MODE})", linked)  # fmt: skip
            con.execute("DELETE FROM settings WHERE key = 'links_unrecorded'")

    def _setting_or_default(self, key: str, default: str) -> str:
        """The stored setting; the first process to ask records ``default`` (later ones read the winner's)."""
        stored = self.index.setting(key)
        if stored is None:
            with self.index.write("recording the store's settings") as con:
                con.execute("INSERT OR IGNORE INTO settings VALUES (?, ?)", (key, default))
            stored = self.index.setting(key)
            assert stored is not None
        return stored

    def _settle_chunk_size(self, requested: int | None, required: bool) -> int:
        stored = self._setting_or_default("chunk_size", str(requested or DEFAULT_CHUNK_SIZE))
        self._setting_or_default("created_at", repr(time.time()))
        if requested is not None and requested != int(stored) and not required:
            log.debug(
                "%s keeps its %d-byte chunks (MODELDEPOT_CHUNK_SIZE shapes new stores)",
                self.home,
                int(stored),
            )
        elif requested is not None and requested != int(stored):
            raise ConfigError(
                f"the store at {self.home} uses {int(stored)}-byte chunks, not {requested}: "
                "chunk size is fixed when a store is created (use another MODELDEPOT_HOME)"
            )
        return int(stored)

    # -- resolving names ------------------------------------------------------------------------------

    def spelled(self, repo_id: str) -> str:
        """``repo_id`` as this store spells it. The Hub matches repo ids whatever their case
        (``qwen/qwen2-0.5b`` is ``Qwen/Qwen2-0.5B``), so a repo is found here under any case and is never
        pulled or stored twice; an id the store does not know is returned as given. (Repo ids are ASCII, so
        SQLite's NOCASE is exactly the Hub's match.)"""
        validate_repo_id(repo_id)
        for table in ("repos", "manifests"):  # what the store holds first, then what it only scanned
            rows = self.index.read(  # (by the NOCASE index: one lookup; the exact spelling first)
                f"SELECT repo_id FROM {table} WHERE repo_id = ?1 COLLATE NOCASE ORDER BY repo_id = ?1 DESC LIMIT 1",
                (repo_id,),
            )
            if rows:
                return str(rows[0]["repo_id"])
        return repo_id

    def resolve(self, repo_id: str, revision: str = "main") -> str:
        """The commit id a branch name or commit id stands for in this store."""
        validate_repo_id(repo_id)
        validate_revision(revision)
        if is_commit_id(revision):
            rows = self.index.read(
                "SELECT commit_id FROM revisions WHERE repo_id = ? AND commit_id = ?", (repo_id, revision)
            )
        else:
            rows = self.index.read(
                "SELECT commit_id FROM refs WHERE repo_id = ? AND name = ?", (repo_id, revision)
            )
        if rows:
            return str(rows[0]["commit_id"])
        if not self.index.read("SELECT 1 FROM repos WHERE repo_id = ?", (repo_id,)):
            raise RepoNotFoundError(repo_id)
        lowered = revision.lower()
        if lowered != revision and (is_commit_id(lowered) or SHORT_COMMIT.fullmatch(lowered)):
            # a commit id in capitals, as git takes it (no branch has that name)
            return self.resolve(repo_id, lowered)
        if SHORT_COMMIT.fullmatch(revision):  # an abbreviated commit id, as git and `info` print them
            found = self.index.read(
                "SELECT commit_id FROM revisions WHERE repo_id = ? AND substr(commit_id, 1, ?) = ? LIMIT 2",
                (repo_id, len(revision), revision),
            )
            if len(found) == 1:
                return str(found[0]["commit_id"])
            if found:
                raise InvalidRevisionError(f"{revision!r} is the start of more than one commit of {repo_id}: "
                                           "give more of it")  # fmt: skip
        raise RevisionNotFoundError(repo_id, revision)

    def entry(
        self, repo_id: str, path: str, revision: str = "main", *, corrupt_ok: bool = False
    ) -> FileEntry:
        """The record of one file; raises if it is absent or (unless ``corrupt_ok``: its listing alone, never
        its bytes) its blob is quarantined."""
        validate_path(path)
        commit_id = self.resolve(repo_id, revision)
        rows = self.index.read(
            f"SELECT {_FILE_COLUMNS} FROM files f JOIN blobs b USING (sha256) "
            "WHERE f.repo_id = ? AND f.commit_id = ? AND f.path = ?",
            (repo_id, commit_id, path),
        )
        if not rows:
            raise EntryNotFoundError(repo_id, revision, path, commit_id)
        if rows[0]["state"] != "ok" and not corrupt_ok:
            raise CorruptBlobError.found_earlier(rows[0]["sha256"])
        return _entry(rows[0])

    def has_file(self, repo_id: str, path: str, revision: str = "main") -> bool:
        """Whether the store can serve the file now (present and not quarantined)."""
        try:
            self.entry(repo_id, path, revision)
        except (RepoNotFoundError, RevisionNotFoundError, EntryNotFoundError, CorruptBlobError):
            return False
        return True

    def holds_revision(self, repo_id: str, commit_id: str) -> bool:
        """Whether the store holds the commit (some file of it, at least) under that repo id as spelled."""
        return bool(self.index.read(
            "SELECT 1 FROM revisions WHERE repo_id = ? AND commit_id = ?", (repo_id, commit_id)
        ))  # fmt: skip

    def revision_time(self, repo_id: str, commit_id: str) -> float:
        """When the revision was imported or pulled into this store."""
        rows = self.index.read(
            "SELECT created_at FROM revisions WHERE repo_id = ? AND commit_id = ?", (repo_id, commit_id)
        )
        if not rows:
            raise RevisionNotFoundError(repo_id, commit_id)
        return float(rows[0]["created_at"])

    def files(self, repo_id: str, commit_id: str) -> list[FileEntry]:
        rows = self.index.read(
            f"SELECT {_FILE_COLUMNS} FROM files f JOIN blobs b USING (sha256) "
            "WHERE f.repo_id = ? AND f.commit_id = ? ORDER BY f.path",
            (repo_id, commit_id),
        )
        return [_entry(row) for row in rows]

    def revision_files(self, repo_id: str, commit_id: str) -> list[FileEntry]:
        """:meth:`files` of a commit the caller resolved, which an ``rm`` may have removed since: that is a
        :class:`RevisionNotFoundError`, not an empty list (a preload of it kept a model of no file, for good,
        and a load linked an empty folder: a trial)."""
        entries = self.files(repo_id, commit_id)
        if not entries and not self.index.read(
            "SELECT 1 FROM revisions WHERE repo_id = ? AND commit_id = ?", (repo_id, commit_id)
        ):
            raise RevisionNotFoundError(repo_id, commit_id, f"{repo_id}@{commit_id[:12]} was removed from the "
                                        "store meanwhile (an rm as it was read)", in_store=True)  # fmt: skip
        return entries

    def file_sizes(
        self, repo_id: str, commit_id: str, paths: Collection[str] | None = None
    ) -> dict[str, int]:
        """The paths of a commit's files the store holds (of ``paths`` alone, when given), and their sizes (what
        a mirror's pull of one file asks: a pull per file of a 300-file repo spent 7 ms on :meth:`files` each,
        a profile; and of a 1,200-file one, the whole commit's rows read for each, an explorer's)."""
        query = "SELECT path, size FROM files WHERE repo_id = ? AND commit_id = ?"
        params: tuple[str, ...] = (repo_id, commit_id)
        if paths is not None and len(paths) <= 400:
            if not paths:
                return {}
            query += f" AND path IN ({', '.join('?' * len(paths))})"
            params = (*params, *paths)
        rows = self.index.read(query, params)
        return {row["path"]: row["size"] for row in rows if paths is None or row["path"] in paths}

    def origin(self, repo_id: str) -> HeldRepo | None:
        """Where a repo came from (``import``, a pull's endpoint, ...), whether it is private, and whether
        only because its upstream gates it; None when the store does not hold it (one indexed lookup: a
        mirror asks at every request)."""
        validate_repo_id(repo_id)
        rows = self.index.read(f"SELECT origin, private, {self._gated()} AS gated FROM repos r WHERE repo_id = ?",
                               (repo_id,))  # fmt: skip
        return (
            HeldRepo(str(rows[0]["origin"]), bool(rows[0]["private"]), bool(rows[0]["gated"]))
            if rows
            else None
        )

    def _gated(self) -> str:
        """The SQL of RepoSummary.gated, of a row of ``repos r`` (none before ``gated_only``: a store read
        where it cannot be upgraded)."""
        return _GATED if self.index.schema >= 17 else "0"

    # -- reading bytes --------------------------------------------------------------------------------

    def open_fd(self, blob: BlobRecord | FileEntry) -> int:
        """A read-only descriptor on the blob (the caller closes it): the one way every read opens a blob.
        A missing or wrong-sized blob is quarantined on the spot; one written before the machine restarted
        and not known to have reached the disk is rehashed first (store/durability.py)."""
        return self._open_fd_seen(blob)[0]

    def _open_fd_seen(self, blob: BlobRecord | FileEntry, again: bool = True) -> tuple[int, float | None]:
        """:meth:`open_fd`, and the placement (:meth:`placement`) it opened."""
        self.durability.ensure_checked(blob.sha256)
        self._refuse_if_found_corrupt(blob.sha256)  # (after the check: one another thread made may have)
        seen = self._check_if_changed(blob)
        try:
            return self.blobs.open(blob.sha256, blob.size), seen
        except CorruptBlobError as error:
            if self._quarantined_at(blob.sha256, seen):  # (by another thread's check since it was looked up)
                raise CorruptBlobError.found_earlier(blob.sha256) from None
            if self.quarantine(blob.sha256, seen) is None:
                now = self.placement(blob.sha256)
                if now is None:  # removed (an `rm`, the budget) since it was looked up: not corrupt
                    raise _removed(blob) from None
                if again and now != seen:
                    # removed and published again since it was looked at: the new file is another placement
                    return self._open_fd_seen(blob, again=False)
            if self.read_only:
                raise CorruptBlobError(error.sha256, error.detail, kept_in_place=True) from None
            raise error from None

    def refuse(self, sha256: str, placement: float) -> None:
        """(A read-only store.) Refuse the blob's placement ``placement`` from now on, as one this process
        found corrupt: another process of the same depot found it so (tiers.py keeps such notes)."""
        if self.read_only and self.placement(sha256) == placement:
            self._refused[sha256] = placement
            self.refusals += 1

    def refused(self, sha256: str) -> bool:
        """(A read-only store.) Whether this process refuses the blob (found corrupt, kept in place)."""
        refused = self._refused.get(sha256)
        return refused is not None and self.placement(sha256) == refused

    def refused_blobs(self) -> set[str]:
        """(A read-only store.) The blobs this process refuses (found corrupt, kept in place)."""
        return {sha256 for sha256 in tuple(self._refused) if self.refused(sha256)}

    def _refuse_if_found_corrupt(self, sha256: str) -> None:
        """(A read-only store.) A blob this process found corrupt stays in place: it is never handed out."""
        refused = self._refused.get(sha256)
        if refused is not None:
            if self.placement(sha256) == refused:
                raise CorruptBlobError(sha256, "found so before", kept_in_place=True)
            # (repaired where the store is writable: a node refused it until restarted; threads may race here)
            self._refused.pop(sha256, None)

    def check_if_changed(self, blob: BlobRecord | FileEntry) -> None:
        """Rehash a blob whose file was modified after it was published or last verified (its mtime is
        later: a write in place, as through a Hugging Face cache's hard link to an adopted blob); one stat
        and one indexed read otherwise. A blob that no longer matches is quarantined: CorruptBlobError. (Rot
        that leaves the mtime alone is the scrub's and `verify`'s to find.)"""
        self._check_if_changed(blob)

    def _check_if_changed(self, blob: BlobRecord | FileEntry) -> float | None:
        """:meth:`check_if_changed`; returns the placement it saw (:meth:`placement`)."""
        rows = self.index.read("SELECT created_at, verified_at FROM blobs WHERE sha256 = ?", (blob.sha256,))
        seen = float(rows[0]["created_at"]) if rows else None
        try:
            info = os.stat(self.blobs.path(blob.sha256))
        except OSError:
            return seen  # (missing: opening it says so, and quarantines it)
        # (Not the change time, which no one can set back: every link made or dropped moves it too, a load's
        # hard links among them, and each read after one would hash the whole file again. A write that puts
        # the mtime back is the scrub's and `verify`'s to find, as rot is.)
        modified = info.st_mtime
        checked = max(rows[0]["created_at"], rows[0]["verified_at"] or 0.0, self._checked.get(blob.sha256, 0.0)
                      ) if rows else 0.0  # fmt: skip
        if not rows or modified <= checked:
            return seen
        if self.read_only and not self._said_rehashing:
            # (a copy that did not keep file times, `cp -r`, rsync without -t: every blob rehashed at its first
            # read in every process, unsaid, 15 GB at each worker's start: an explorer's trial)
            self._said_rehashing = True
            log.warning("blob %s…'s file at %s is newer than the store's record of it: rehashed before it is read, "
                        "as is each such blob in each process on this read-only store (a copy that did not keep "
                        "file times? copy a store with `cp -a`, or run `modeldepot verify` where it is writable)",
                        blob.sha256[:16], self.home)  # fmt: skip
        found = self.check_blob(blob.sha256, blob.size, blob.chunk_size)
        if found is not None:
            if self.quarantine(blob.sha256, seen) is None and self.placement(blob.sha256) != seen:
                return self.placement(blob.sha256)  # published again meanwhile: that one is checked on open
            raise CorruptBlobError(blob.sha256, f"{found[1]} (its file was changed after it was stored)",
                                   kept_in_place=self.read_only)  # fmt: skip
        # (never before the mtime it was checked at: a clock set back must not make every read rehash)
        self.record_verified(blob.sha256, max(time.time(), modified))
        return seen

    def record_verified(self, sha256: str, checked: float) -> bool:
        """The blob was found good at ``checked`` (its ``verified_at``). A read-only store keeps it in this
        process's memory. False when the disk is too full to record it (it is checked again next time: the
        check itself went through)."""
        return self.record_all_verified([(sha256, checked)])

    def record_all_verified(self, found: list[tuple[str, float]]) -> bool:
        """:meth:`record_verified` for many blobs, in one transaction (verify's: one each took 69 s of the
        index's flushes for 61,500 small blobs, an explorer's trial)."""
        if self.read_only:
            self._checked.update(found)
            return True
        try:
            with self.index.write("recording a verification") as con:
                con.executemany(
                    "UPDATE blobs SET verified_at = ? WHERE sha256 = ?", [(t, s) for s, t in found]
                )
        except StoreFullError:
            return False
        return True

    def last_verified(self, sha256: str) -> float:
        """When this process found a blob good, on a read-only store (0: not yet)."""
        return self._checked.get(sha256, 0.0)

    def map(self, entry: FileEntry) -> mmap.mmap | None:
        """A read-only shared mapping of the file's blob (``None`` for an empty file)."""
        fd = self.open_fd(entry)
        try:
            return mmap.mmap(fd, entry.size, prot=mmap.PROT_READ) if entry.size else None
        finally:
            os.close(fd)

    def open(self, entry: FileEntry) -> BinaryIO:
        """A seekable binary stream over the blob; reads go straight to the file, nothing is held. Its
        ``name`` is the file's path in the revision's snapshot (a descriptor's number said nothing to code that
        logs it, or that tells a format by its suffix)."""
        raw = io.FileIO(self.open_fd(entry), "rb", closefd=True)
        raw.name = str(
            self.layout.snapshot_file(self.snapshots.path(entry.repo_id, entry.commit_id), entry.path)
        )
        return io.BufferedReader(raw, buffer_size=1 << 20)

    def chunk(self, entry: FileEntry, index: int) -> memoryview:
        """Chunk ``index`` of a file as a zero-copy view, checked against its BLAKE3 digest first."""
        return self.verified_chunk(BlobRecord(entry.sha256, entry.size, entry.chunk_size), index)[0]

    def verified_chunk(self, blob: BlobRecord, index: int) -> tuple[memoryview, str]:
        """Chunk ``index`` of a blob as a view of its mapping, and the BLAKE3 it was just checked against;
        a bad chunk quarantines the blob."""
        with self.open_verified(blob) as reader:
            return reader.checked_view(index), reader.digest(index)

    def open_verified(self, blob: BlobRecord) -> VerifiedBlob:
        """The blob open for reading chunk by chunk, each chunk checked before it is handed out (what the
        node sends to other machines goes through this)."""
        # The digests first: read after the open, they may be gone (an `rm` between), and every chunk then
        # fails its check. They are the content's, whichever placement the open finds.
        digests = self.chunk_digests(blob.sha256)
        if len(digests) != chunk_count(blob.size, blob.chunk_size):  # (not corrupt: a 404, not a 503)
            raise _removed(blob)
        fd, seen = self._open_fd_seen(blob)
        try:
            return VerifiedBlob(
                blob, fd, digests, functools.partial(self.quarantine, seen=seen), self.read_only
            )
        except OSError as error:
            raise os_error(error, f"mapping blob {blob.sha256[:16]}…") from error

    def blob(self, sha256: str, public_only: bool = False) -> BlobRecord:
        """A servable blob by digest; ``public_only`` hides blobs that only private repos use."""
        if not _SHA256.fullmatch(sha256):
            raise InvalidInputError(f"{sha256!r} is not a SHA-256 digest (64 lowercase hex digits)")
        rows = self.index.read(
            "SELECT sha256, size, chunk_size, state FROM blobs WHERE sha256 = ?", (sha256,)
        )
        # (marked public: a public repo's content a pull handed over to another before it publishes it)
        if not rows or (public_only and not self._is_public(sha256) and not self.partials.is_public(sha256)):
            raise NotFoundError(f"blob {sha256} is not in the store")
        if rows[0]["state"] != "ok":
            raise CorruptBlobError.found_earlier(sha256)
        return BlobRecord(sha256, rows[0]["size"], rows[0]["chunk_size"])

    def _is_public(self, sha256: str) -> bool:
        return bool(
            self.index.read(
                "SELECT 1 FROM files f JOIN repos r USING (repo_id) WHERE f.sha256 = ? AND r.private = 0 LIMIT 1",
                (sha256,),
            )
        )

    def inventory(self, after: str = "", limit: int = 1000, public_only: bool = False) -> list[BlobRecord]:
        """Servable blobs in digest order, starting after ``after`` (a cursor for paging)."""
        visible = _PUBLIC if public_only else ""
        rows = self.index.read(
            f"SELECT sha256, size, chunk_size FROM blobs b WHERE state = 'ok' AND sha256 > ?{visible} "
            "ORDER BY sha256 LIMIT ?",
            (after, limit),
        )
        return [BlobRecord(r["sha256"], r["size"], r["chunk_size"]) for r in rows]

    def held_blobs(self, public_only: bool = False) -> list[BlobRecord]:
        """Every servable blob (``public_only``: of a public repo), by digest: what a node tells its fleet it
        holds."""
        rows = self.index.read(
            "SELECT sha256, size, chunk_size FROM blobs b WHERE state = 'ok'"
            + (_PUBLIC if public_only else "")
        )
        if public_only:  # (and those of a public repo's pull handed over before it publishes them)
            marked = sorted(self.partials.public_marks() - {row["sha256"] for row in rows})
            for start in range(0, len(marked), 500):
                part = marked[start : start + 500]
                rows += self.index.read("SELECT sha256, size, chunk_size FROM blobs WHERE state = 'ok' AND sha256 "
                                        f"IN ({','.join('?' * len(part))})", tuple(part))  # fmt: skip
        # (not those this process refuses, on a read-only store: the fleet asked a node for them, and got 503s)
        refused = self.refused_blobs()
        return [
            BlobRecord(r["sha256"], r["size"], r["chunk_size"]) for r in rows if r["sha256"] not in refused
        ]

    def local_digest(self, sha256: str | None = None, git_sha1: str | None = None) -> BlobDigest | None:
        """The digests of a servable blob found by SHA-256 or by git blob SHA-1; None if the store lacks it."""
        if sha256 is not None:
            query, key = "SELECT * FROM blobs WHERE sha256 = ? AND state = 'ok'", sha256
        elif git_sha1 is not None:
            query, key = "SELECT * FROM blobs WHERE git_sha1 = ? AND state = 'ok' LIMIT 1", git_sha1
        else:
            return None
        rows = self.index.read(query, (key,))
        if rows and rows[0]["unflushed_boot"] not in (None, self.durability.boot):
            # Written before the machine restarted and not known to have reached the disk: a writer must not
            # take it as held before it is checked (else its revision names bytes a power loss damaged).
            try:
                self.durability.ensure_checked(rows[0]["sha256"])
            except CorruptBlobError:
                return None  # quarantined: the writer fetches or places its own bytes
            rows = self.index.read(query, (key,))  # (checked, maybe by another thread: as it is now)
        if rows and not os.path.lexists(self.blobs.path(rows[0]["sha256"])):
            # (a quarantine killed between moving the file and writing its row): out of service now, so
            # that the writer fetches or places its own bytes
            self.quarantine(rows[0]["sha256"], rows[0]["created_at"])
            return None
        if not rows:
            return None
        row = rows[0]
        return BlobDigest(
            row["sha256"],
            row["size"],
            row["chunk_size"],
            tuple(self.chunk_digests(row["sha256"])),
            row["git_sha1"],
        )

    def chunk_digests(self, sha256: str) -> list[str]:
        rows = self.index.read("SELECT blake3 FROM chunks WHERE sha256 = ? ORDER BY idx", (sha256,))
        return [row["blake3"] for row in rows]

    def chunk_digests_of(self, sha256s: Iterable[str]) -> dict[str, list[str]]:
        """:meth:`chunk_digests` of many blobs, a few queries in all (a node's manifest of 300 files took
        40 ms asking one blob at a time)."""
        wanted = sorted(set(sha256s))
        found: dict[str, list[str]] = {sha256: [] for sha256 in wanted}
        for start in range(0, len(wanted), 500):  # (within any build's limit on bound parameters)
            batch = wanted[start : start + 500]
            marks = ",".join("?" * len(batch))
            rows = self.index.read(
                f"SELECT sha256, blake3 FROM chunks WHERE sha256 IN ({marks}) ORDER BY sha256, idx",
                tuple(batch),
            )
            for row in rows:
                found[row["sha256"]].append(row["blake3"])
        return found

    def check_blob(self, sha256: str, size: int, chunk_size: int) -> tuple[str, str] | None:
        """Rehash a blob's file: None if it matches every recorded digest, else (problem, detail)."""
        path = self.blobs.path(sha256)
        try:
            handle = open(path, "rb", buffering=0)  # noqa: SIM115
        except FileNotFoundError:
            return "missing", "its file is missing"
        with handle:
            actual = os.fstat(handle.fileno()).st_size
            if actual != size:
                return "size", f"its file holds {actual} bytes, the index says {size}"
            try:
                digest = digest_stream(handle.readinto, size, chunk_size)
            except OSError as error:
                return "read", f"reading it failed: {error}"
        expected = self.chunk_digests(sha256)
        if digest.sha256 == sha256:
            if expected != list(digest.chunk_blake3):
                # The bytes are their content address's: the index's chunk rows are what is wrong (a flipped bit
                # of it had verify quarantine, and gc delete, a store's only good copy: an explorer's trial)
                self._rewrite_chunk_digests(sha256, digest.chunk_blake3)
            return None
        for number, (want, got) in enumerate(zip(expected, digest.chunk_blake3, strict=False)):
            if want != got:
                return "chunk", f"chunk {number} does not match its BLAKE3 digest"
        if len(expected) != len(digest.chunk_blake3):
            return (
                "chunk",
                f"the index has {len(expected)} chunk digests, the file {len(digest.chunk_blake3)} chunks",
            )
        return "sha256", "its SHA-256 does not match its name"

    def _rewrite_chunk_digests(self, sha256: str, digests: Sequence[str]) -> None:
        """The index's chunk digests of a blob whose bytes match its SHA-256, made those of its bytes."""
        log.warning("the index's chunk digests of blob %s… were not its bytes' (which match their SHA-256): the "
                    "index was damaged; they are rewritten (`modeldepot verify` checks the rest)", sha256[:16])  # fmt: skip
        try:
            with self.index.write("rewriting a blob's chunk digests") as con:
                con.execute("DELETE FROM chunks WHERE sha256 = ?", (sha256,))
                con.executemany("INSERT INTO chunks (sha256, idx, blake3) VALUES (?, ?, ?)",
                                [(sha256, i, b3) for i, b3 in enumerate(digests)])  # fmt: skip
        except (
            StoreError
        ) as error:  # (a read-only store, a full disk: its chunks are refused as they are read)
            log.warning("the chunk digests of blob %s… could not be rewritten: %s", sha256[:16], error)

    def read_only_said(self) -> str:
        """Why the store is read-only here, as a refusal says it; and, when the file system has turned
        writable since this process opened it (remounted read-write, checked and mounted again), that it
        must start again to write there (a node kept refusing for good, saying the file system was read-only
        when it no longer was: an explorer's trial)."""
        reason = self.read_only_reason or ""
        if (
            reason in ("on a read-only file system", REFUSES_WRITES)
            and self.layout.read_only_reason() is None
        ):
            return f"{reason} when this process opened it (it is writable now: start it again to write there)"
        return reason

    def sync(self, check: bool = True) -> int:
        """Wait until every blob is durable (and, with ``check``, every one written before a restart
        checked), and every snapshot folder; returns how many blobs were flushed."""
        flushed = self.durability.sync(check)
        if not self.read_only:
            self.snapshots.sync()
        return flushed

    def quarantine(self, sha256: str, seen: float | _AnyPlacement | None = ANY_PLACEMENT) -> str | None:
        """Take a bad blob out of service: moved to quarantine/, marked in the index, never served; then
        tell the hooks (:meth:`add_quarantine_hook`: a depot drops its engines and preloads of it).

        ``seen`` is the blob row's ``created_at`` when the caller looked at the blob that failed (None: it
        had no row). A blob removed and published again since (an `rm` and an import beside a reader) is
        another placement, good, and is left alone: None is returned, as when the blob is gone. Else where
        the file went ("" when it was missing already). On a read-only store the blob stays where it is
        and this process refuses it ("" is returned)."""
        if self.read_only:
            rows = self.index.read("SELECT created_at FROM blobs WHERE sha256 = ?", (sha256,))
            if not rows or (seen is not ANY_PLACEMENT and rows[0]["created_at"] != seen):
                return None
            placement = float(rows[0]["created_at"])
            if self._refused.get(sha256, -1.0) != placement:
                self._refused[sha256] = placement
                self.refusals += 1
                log.error("blob %s… is corrupt: the store is read-only, so it stays in place, and this process "
                          "does not serve it (repair the store where it is writable: modeldepot verify)", sha256[:16])  # fmt: skip
                for hook in self._quarantine_hooks:
                    hook(sha256)
            return ""
        with self.lock.exclusive():
            rows = self.index.read("SELECT created_at FROM blobs WHERE sha256 = ?", (sha256,))
            if not rows or (seen is not ANY_PLACEMENT and rows[0]["created_at"] != seen):
                return None
            moved = self.blobs.quarantine(sha256)
            with self.index.write("quarantining a blob") as con:
                con.execute("UPDATE blobs SET state = 'quarantined' WHERE sha256 = ?", (sha256,))
        for hook in self._quarantine_hooks:
            hook(sha256)
        return str(moved) if moved else ""

    def _quarantined_at(self, sha256: str, seen: float | None) -> bool:
        """Whether the blob's placement ``seen`` is quarantined."""
        rows = self.index.read("SELECT created_at, state FROM blobs WHERE sha256 = ?", (sha256,))
        return bool(rows) and rows[0]["state"] == "quarantined" and float(rows[0]["created_at"]) == seen

    def placement(self, sha256: str) -> float | None:
        """The blob row's ``created_at`` (None: no row): what :meth:`quarantine` is told was seen."""
        rows = self.index.read("SELECT created_at FROM blobs WHERE sha256 = ?", (sha256,))
        return float(rows[0]["created_at"]) if rows else None

    def add_quarantine_hook(self, hook: Callable[[str], None]) -> None:
        """Call ``hook(sha256)`` after each blob this process quarantines."""
        self._quarantine_hooks.append(hook)

    # -- paths ----------------------------------------------------------------------------------------

    def snapshot_path(self, repo_id: str, revision: str = "main") -> Path:
        """The snapshot folder of a revision, rebuilt from the index if it is missing or damaged."""
        commit_id = self.resolve(repo_id, revision)
        for entry in self.files(repo_id, commit_id):  # the caller reads them by path: checked first
            self.durability.ensure_checked(entry.sha256)
            self._refuse_if_found_corrupt(entry.sha256)
            self.check_if_changed(entry)
        self.ensure_snapshot(repo_id, commit_id)
        return self.snapshots.path(repo_id, commit_id)

    def snapshot_complete(self, repo_id: str, commit_id: str) -> bool:
        """Whether a revision's snapshot holds a right link for each of its files (a folder that stood
        before a pull whose links a full disk refused was said built: a review)."""
        return self.snapshots.is_complete(
            repo_id, commit_id, [(f.path, f.sha256) for f in self.files(repo_id, commit_id)]
        )

    def _copied_whole_said(self, repo_id: str, commit_id: str, entries: Iterable[FileEntry]) -> str:
        """What to say of a snapshot that holds files where links belong (see Snapshots.copied_whole)."""
        if not self.snapshots.copied_whole(repo_id, commit_id, [(e.path, e.sha256) for e in entries]):
            return ""
        return (" (its folder holds files where links to the blobs belong: a copy of the store that followed "
                "links, `cp -rL` or a bucket sync? copy a store with `cp -a`)")  # fmt: skip

    def ensure_snapshot(self, repo_id: str, commit_id: str) -> bool:
        """Rebuild a revision's snapshot if any link is missing or wrong; True if it had to."""
        pairs = [(f.path, f.sha256) for f in self.files(repo_id, commit_id)]
        if self.snapshots.is_complete(repo_id, commit_id, pairs):
            return False
        if self.read_only:  # (no rebuild can be made here: said, with what a copy that followed links did)
            raise ReadOnlyStoreError(
                f"the snapshot folder of {repo_id}@{commit_id[:12]} is incomplete, and the store is read-only"
                f"{self._copied_whole_said(repo_id, commit_id, self.files(repo_id, commit_id))}: repair it where "
                "it is writable (modeldepot verify)"
            )
        for _ in range(5):
            with self.lock.shared():  # gc and removals (exclusive) never see a snapshot half-built
                # (the files read again under the lock: a removal between the look and the build had its
                # snapshot built again whole, and a kill then left one the index did not know: review 40)
                pairs = [(f.path, f.sha256) for f in self.files(repo_id, commit_id)]
                if not pairs:
                    return False  # (removed meanwhile)
                self.snapshots.build(repo_id, commit_id, pairs)
            # A pull that added files to the commit between our look and our build has built its snapshot,
            # which ours (of the files before it) just replaced: built again, of the files now
            if [(f.path, f.sha256) for f in self.files(repo_id, commit_id)] == pairs:
                break
        return True

    @contextlib.contextmanager
    def linked_folder(
        self, repo_id: str, commit_id: str, folder: str, others: Collection[str] = frozenset()
    ) -> Iterator[Path]:
        """One folder of a revision, its subfolders included (external data may be kept in one), as hard
        links (real files, not symlinks) in a private folder under tmp/, removed on exit. For loaders that
        refuse a path leading out of the model's folder: onnxruntime resolves symlinks and rejects external
        data that "escapes" the model directory. On a read-only store, where no link can be made, it is the
        folder in the revision's snapshot (symbolic links to the blobs).

        A file of the folder itself that is missing or corrupt fails the view (it may be the model's, or
        its external data); a subfolder's is left out. ``others`` (another variant's files, which the loader
        does without) are not linked: one quant's rotted weights must not stop every quant beside it, and a
        load killed midway left links to every variant's weights in tmp/ (until the next writer swept them,
        their bytes stayed when the repo was removed)."""
        if self.read_only:
            with self._snapshot_folder(repo_id, commit_id, folder, others) as view:
                yield view
            return
        with WriteSession(self.layout) as session:
            view = self.layout.snapshot_file(session.path, f"view/{folder}" if folder else "view")
            prefix = f"{folder}/" if folder else ""
            try:
                # (made in the session's folder as opened: a member's link in place of view/ had root link a blob
                # into any folder, between a check of the path and its use: a review; store/confined.py)
                with opened_folder(session.path, self.layout.real_home) as session_folder:
                    root = folders_in(session_folder, f"view/{folder}" if folder else "view")
                    try:
                        for entry in self.revision_files(repo_id, commit_id):
                            if not entry.path.startswith(prefix) or entry.path in others:
                                continue  # (another model's, not the loader's business)
                            name = entry.path[len(prefix) :]
                            try:
                                os.close(self.open_fd(entry))  # there, with the right size
                            except (CorruptBlobError, NotFoundError) as error:
                                if "/" not in name:
                                    raise _naming(error, entry) from None  # the model's, or its external data
                                continue
                            self.layout.snapshot_file(view, name)  # (a name a snapshot may hold)
                            parent, _, base = name.rpartition("/")
                            at = folders_in(root, parent)
                            blob = self.blobs.path(entry.sha256)
                            try:
                                with self.layout.folder(blob.parent) as blobs_at:
                                    try:
                                        os.link(blob.name, base, src_dir_fd=blobs_at, dst_dir_fd=at,
                                                follow_symlinks=False)  # fmt: skip
                                    except OSError as error:  # (both named, not the names in their folders)
                                        raise OSError(error.errno, error.strerror, os.fspath(blob), None,
                                                      os.fspath(view / name)) from None  # fmt: skip
                            finally:
                                os.close(at)
                    finally:
                        os.close(root)
            except StoreError:
                raise
            except OSError as error:
                raise os_error(error, f"linking {repo_id}@{commit_id[:12]}/{folder} for a loader") from error
            yield view

    @contextlib.contextmanager
    def _snapshot_folder(
        self, repo_id: str, commit_id: str, folder: str, others: Collection[str]
    ) -> Iterator[Path]:
        """(A read-only store.) The folder in the revision's own snapshot: its links to the blobs are what
        a view made of links would be, and nothing need be made (a read-only container's /tmp may be
        read-only too)."""
        prefix = f"{folder}/" if folder else ""
        entries = self.revision_files(repo_id, commit_id)
        for entry in entries:
            if not entry.path.startswith(prefix):
                continue
            try:
                os.close(self.open_fd(entry))  # there, with the right size, not found corrupt
            except (CorruptBlobError, NotFoundError) as error:
                if "/" not in entry.path[len(prefix) :] and entry.path not in others:
                    raise _naming(error, entry) from None  # the model's, or its external data
        if not self.snapshots.is_complete(repo_id, commit_id, [(e.path, e.sha256) for e in entries]):
            raise StoreError(f"the snapshot folder of {repo_id}@{commit_id[:12]} is incomplete, and the store is "
                             f"read-only{self._copied_whole_said(repo_id, commit_id, entries)}: repair it where it is "
                             "writable (modeldepot verify)")  # fmt: skip
        root = self.snapshots.path(repo_id, commit_id)
        yield self.layout.snapshot_file(root, folder) if folder else root

    def file_path(self, repo_id: str, path: str, revision: str = "main") -> Path:
        """A real path to the file, with its repo-relative name (engines find sibling files by name)."""
        return self.entry_path(self.entry(repo_id, path, revision))

    def entry_path(self, entry: FileEntry) -> Path:
        """:meth:`file_path` of a file already looked up."""
        repo_id, path = entry.repo_id, entry.path
        fd = self.open_fd(entry)  # the blob behind the link must be there, with the right size
        os.close(fd)
        link = self.layout.snapshot_file(self.snapshots.path(repo_id, entry.commit_id), path)
        try:
            if os.readlink(link) == self.layout.link_target(link, entry.sha256):
                return link
        except OSError:
            pass
        self.ensure_snapshot(repo_id, entry.commit_id)
        return link

    # -- listing --------------------------------------------------------------------------------------

    def ref_time(self, repo_id: str, name: str) -> float | None:
        """When the branch ``name`` last moved here (None: no such branch)."""
        rows = self.index.read("SELECT updated_at FROM refs WHERE repo_id = ? AND name = ?", (repo_id, name))
        return float(rows[0]["updated_at"]) if rows else None

    def _refs(self, repo_id: str) -> dict[str, str]:
        rows = self.index.read("SELECT name, commit_id FROM refs WHERE repo_id = ? ORDER BY name", (repo_id,))
        return {row["name"]: row["commit_id"] for row in rows}

    def list_repos(self) -> list[RepoSummary]:
        """Every repo's summary, sorted by repo id."""
        return self._summaries(None)

    def repo_private(self, repo_id: str) -> bool:
        """Whether a repo was imported as private (one indexed lookup: the server asks on every request)."""
        validate_repo_id(repo_id)
        rows = self.index.read("SELECT private FROM repos WHERE repo_id = ?", (repo_id,))
        if not rows:
            raise RepoNotFoundError(repo_id)
        return bool(rows[0]["private"])

    def hide_repo(self, repo_id: str, gated: bool | str = False) -> bool:
        """Make a held repo private on its upstream's word (its upstream made it so: a mirror must not go on
        serving it to anyone); ``gated``: the upstream's flag when it gates the repo rather than hides it
        (described to anyone, its files behind the node's token), False when it hides it. Whether that
        changed what anyone without the token sees. Nothing when the store does not hold it, or its operator
        made it private."""
        validate_repo_id(repo_id)
        rows = self.index.read(
            "SELECT repo_id, private, gated_only FROM repos WHERE repo_id = ? COLLATE NOCASE AND (private = 0 "
            "OR hidden_at IS NOT NULL)",
            (repo_id,),
        )
        if not rows or (rows[0]["private"] and bool(rows[0]["gated_only"]) == bool(gated)):
            return False  # (private already as said, its operator's, or not held: no write)
        with self.index.write(f"making {repo_id} private") as con:
            con.execute(
                "UPDATE repos SET private = 1, hidden_at = COALESCE(hidden_at, ?), gated_only = ?, "
                "card = json_set(card, '$.gated', json(?)) WHERE repo_id = ? AND (private = 0 OR hidden_at "
                "IS NOT NULL)",
                (time.time(), bool(gated), json.dumps(gated), rows[0]["repo_id"]),
            )
        return True

    def hidden_by_upstream(self, repo_id: str) -> bool:
        """Whether the repo is private on its upstream's word (:meth:`show_repo_again` may undo it)."""
        validate_repo_id(repo_id)
        return bool(self.index.read("SELECT 1 FROM repos WHERE repo_id = ? COLLATE NOCASE AND private = 1 "
                                    "AND hidden_at IS NOT NULL", (repo_id,)))  # fmt: skip

    def show_repo_again(self, repo_id: str, said_by: str) -> bool:
        """Make public again a repo made private on its upstream's word (:meth:`hide_repo`, a pull of a
        private repo), now that ``said_by``, the upstream it came from, shows it to anyone; whether it was
        hidden. Not one its operator made private (``import --private``), nor one another source says is
        public (the upstream's word alone hid it)."""
        validate_repo_id(repo_id)
        rows = self.index.read("SELECT repo_id, origin FROM repos WHERE repo_id = ? COLLATE NOCASE AND private = 1 "
                               "AND hidden_at IS NOT NULL", (repo_id,))  # fmt: skip
        if not rows or rows[0]["origin"].rstrip("/") != said_by.rstrip("/"):
            return False
        with self.index.write(f"showing {repo_id} again") as con:
            done = con.execute(  # (gated no longer either: it would say so of a file served to anyone)
                "UPDATE repos SET private = 0, hidden_at = NULL, gated_only = 0, card = json_set(card, '$.gated', "
                "json('false')) WHERE repo_id = ? AND hidden_at IS NOT NULL",
                (rows[0]["repo_id"],),
            )
            return done.rowcount > 0

    def repo_summary(self, repo_id: str) -> RepoSummary:
        """One repo's refs, counts and its newest revision's size, without listing every file."""
        validate_repo_id(repo_id)
        found = self._summaries(repo_id)
        if not found:
            raise RepoNotFoundError(repo_id)
        return found[0]

    def _summaries(self, repo_id: str | None) -> list[RepoSummary]:
        """Summaries of one repo (or of all, sorted by repo id): in two queries, whatever the number of
        repos (the server lists them all on every page of ``/api/models``)."""
        only = "WHERE repo_id = ?" if repo_id is not None else ""
        params: tuple[object, ...] = (repo_id,) if repo_id is not None else ()
        rows = self.index.read(
            f"""
            WITH newest AS (
                SELECT repo_id, commit_id, COUNT(*) OVER (PARTITION BY repo_id) AS revisions,
                       ROW_NUMBER() OVER (PARTITION BY repo_id ORDER BY created_at DESC, commit_id) AS rank
                FROM revisions {only}
            )
            SELECT r.repo_id, r.private, r.origin, r.card, r.created_at, r.updated_at, {self._gated()} AS gated,
                   COALESCE(n.revisions, 0) AS revisions,
                   (SELECT COUNT(*) FROM files f WHERE f.repo_id = r.repo_id AND f.commit_id = n.commit_id) AS n,
                   (SELECT COALESCE(SUM(size), 0) FROM files f
                     WHERE f.repo_id = r.repo_id AND f.commit_id = n.commit_id) AS bytes,
                   (SELECT COUNT(*) FROM files f JOIN blobs b USING (sha256)
                     WHERE f.repo_id = r.repo_id AND f.commit_id = n.commit_id AND b.state != 'ok') AS lost
            FROM (SELECT * FROM repos {only}) r LEFT JOIN newest n ON n.repo_id = r.repo_id AND n.rank = 1
            ORDER BY r.repo_id
            """,
            params * 2,
        )
        refs: dict[str, dict[str, str]] = {}
        tags: dict[str, list[str]] = {}
        tag = "tag" if self.index.schema >= 16 else "0 AS tag"  # (a store read where it cannot be upgraded)
        for ref in self.index.read(
            f"SELECT repo_id, name, commit_id, {tag} FROM refs {only} ORDER BY repo_id, name", params
        ):
            refs.setdefault(ref["repo_id"], {})[ref["name"]] = ref["commit_id"]
            if ref["tag"]:
                tags.setdefault(ref["repo_id"], []).append(ref["name"])
        return [
            RepoSummary(
                repo_id=row["repo_id"],
                private=bool(row["private"]),
                origin=row["origin"],
                refs=refs.get(row["repo_id"], {}),
                revisions=row["revisions"],
                files=row["n"],
                size=row["bytes"],
                quarantined=row["lost"],
                gated=bool(row["gated"]),
                tag_refs=tuple(tags.get(row["repo_id"], ())),
                card=json.loads(row["card"]),
                created_at=row["created_at"],
                updated_at=row["updated_at"],
            )
            for row in rows
        ]

    def left_behind_by(self, repo_id: str, branch: str) -> list[tuple[str, float]]:
        """The commits ``branch`` named before it moved that the store still holds, and when it left each,
        newest first (none recorded before schema 18)."""
        validate_repo_id(repo_id)
        if self.index.schema < 18:  # (a store read where it cannot be upgraded)
            return []
        rows = self.index.read(
            "SELECT h.commit_id, h.left_at FROM ref_history h JOIN revisions v USING (repo_id, commit_id) "
            "WHERE h.repo_id = ? AND h.name = ? ORDER BY h.left_at DESC",
            (repo_id, branch),
        )
        return [(row["commit_id"], float(row["left_at"])) for row in rows]

    def detached_revisions(self, repo_id: str) -> list[str]:
        """The commits of a repo no ref names (a branch moved on, or a pull by commit id), newest first."""
        validate_repo_id(repo_id)
        rows = self.index.read(
            "SELECT commit_id FROM revisions v WHERE repo_id = ? AND NOT EXISTS (SELECT 1 FROM refs r WHERE "
            "r.repo_id = v.repo_id AND r.commit_id = v.commit_id) ORDER BY created_at DESC, commit_id",
            (repo_id,),
        )
        return [row["commit_id"] for row in rows]

    def revisions(self, repo_id: str) -> list[tuple[str, float]]:
        """A repo's revisions as (commit id, when it was imported or pulled), newest first."""
        validate_repo_id(repo_id)
        rows = self.index.read(
            "SELECT commit_id, created_at FROM revisions WHERE repo_id = ? ORDER BY created_at DESC, commit_id",
            (repo_id,),
        )
        if not rows and not self.index.read("SELECT 1 FROM repos WHERE repo_id = ?", (repo_id,)):
            raise RepoNotFoundError(repo_id)
        return [(row["commit_id"], float(row["created_at"])) for row in rows]

    def repo_info(self, repo_id: str) -> RepoInfo:
        validate_repo_id(repo_id)
        rows = self.index.read("SELECT * FROM repos WHERE repo_id = ?", (repo_id,))
        if not rows:
            raise RepoNotFoundError(repo_id)
        repo = rows[0]
        refs = self._refs(repo_id)
        revisions = []
        for rev in self.index.read(
            "SELECT commit_id, created_at FROM revisions WHERE repo_id = ? ORDER BY created_at DESC, commit_id",
            (repo_id,),
        ):
            names = tuple(name for name, commit in refs.items() if commit == rev["commit_id"])
            files = tuple(self.files(repo_id, rev["commit_id"]))
            quarantined = tuple(row["path"] for row in self.index.read(
                "SELECT f.path FROM files f JOIN blobs b USING (sha256) WHERE f.repo_id = ? AND f.commit_id = ? "
                "AND b.state != 'ok' ORDER BY f.path", (repo_id, rev["commit_id"])))  # fmt: skip
            revisions.append(RevisionInfo(rev["commit_id"], names, rev["created_at"], files, quarantined))
        return RepoInfo(
            repo_id=repo_id,
            private=bool(repo["private"]),
            origin=repo["origin"],
            refs=refs,
            created_at=repo["created_at"],
            updated_at=repo["updated_at"],
            revisions=tuple(revisions),
        )
