"""The SQLite index: the single source of truth for what the store holds.

WAL mode so readers never block the writer; ``synchronous=FULL`` so a COMMIT that returned survives a
power cut; ``BEGIN IMMEDIATE`` for every write so two processes serialise on the database lock rather
than failing half-way. Each thread gets its own connection, and a forked child opens a fresh one
(connections must never cross a fork).

SQLite needs free space even to delete: opening a WAL database creates its ``-wal`` and ``-shm`` files
(the latter grown by writing), and a COMMIT appends pages to the WAL. So the store keeps a small
:class:`SpaceReserve` that opening the index and the transactions of deletions (``rm``, ``gc``) release
when the disk is full, and that is taken back once there is room again.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import os
import sqlite3
import stat
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TypeVar

from modeldepot.errors import (
    IndexDamagedError,
    ReadOnlyStoreError,
    StoreClosedError,
    StoreError,
    StoreFullError,
    StoreSchemaError,
)
from modeldepot.store.confined import folder_within, open_within, opened_folder
from modeldepot.store.forking import INDEX_GATE, ForkGate
from modeldepot.store.holders import processes_with_open
from modeldepot.store.layout import FULL_DISK_ADVICE, REFUSES_WRITES, refuses_writes, writable_mode
from modeldepot.store.locks import lock_file, take_flock, unlock_and_close

__all__ = ["SCHEMA_VERSION", "ChangeCounter", "Index", "SpaceReserve", "translate_sqlite_error"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_MIGRATIONS: tuple[str, ...] = (
    # 1: repos, revisions, refs, files, blobs and their chunk digests.
    """
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
    CREATE TABLE blobs (
        sha256      TEXT PRIMARY KEY,
        size        INTEGER NOT NULL CHECK (size >= 0),
        chunk_size  INTEGER NOT NULL CHECK (chunk_size > 0),
        git_sha1    TEXT,
        state       TEXT NOT NULL DEFAULT 'ok' CHECK (state IN ('ok', 'quarantined')),
        created_at  REAL NOT NULL,
        verified_at REAL
    ) WITHOUT ROWID;
    CREATE TABLE chunks (
        sha256 TEXT NOT NULL REFERENCES blobs (sha256) ON DELETE CASCADE,
        idx    INTEGER NOT NULL CHECK (idx >= 0),
        blake3 TEXT NOT NULL,
        PRIMARY KEY (sha256, idx)
    ) WITHOUT ROWID;
    CREATE TABLE repos (
        repo_id    TEXT PRIMARY KEY,
        private    INTEGER NOT NULL DEFAULT 0,
        origin     TEXT NOT NULL DEFAULT 'import',
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE revisions (
        repo_id    TEXT NOT NULL REFERENCES repos (repo_id) ON DELETE CASCADE,
        commit_id  TEXT NOT NULL,
        tree_oid   TEXT,
        created_at REAL NOT NULL,
        PRIMARY KEY (repo_id, commit_id)
    ) WITHOUT ROWID;
    CREATE TABLE refs (
        repo_id    TEXT NOT NULL,
        name       TEXT NOT NULL,
        commit_id  TEXT NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (repo_id, name),
        FOREIGN KEY (repo_id, commit_id) REFERENCES revisions (repo_id, commit_id) ON DELETE CASCADE
    ) WITHOUT ROWID;
    CREATE TABLE files (
        repo_id   TEXT NOT NULL,
        commit_id TEXT NOT NULL,
        path      TEXT NOT NULL,
        sha256    TEXT NOT NULL REFERENCES blobs (sha256),
        size      INTEGER NOT NULL,
        git_oid   TEXT NOT NULL,
        lfs       INTEGER NOT NULL,
        PRIMARY KEY (repo_id, commit_id, path),
        FOREIGN KEY (repo_id, commit_id) REFERENCES revisions (repo_id, commit_id) ON DELETE CASCADE
    ) WITHOUT ROWID;
    CREATE INDEX files_by_blob ON files (sha256);
    CREATE INDEX refs_by_commit ON refs (repo_id, commit_id);
    """,
    # 2: what a repo's model card says about it (pipeline_tag, library_name, tags), as JSON.
    """
    ALTER TABLE repos ADD COLUMN card TEXT NOT NULL DEFAULT '{}'
    """,
    # 3: scanned upstream repos (the manifest body is the hub layer's JSON) and each variant's status.
    """
    CREATE TABLE manifests (
        repo_id    TEXT PRIMARY KEY,
        revision   TEXT NOT NULL,
        commit_id  TEXT NOT NULL,
        body       TEXT NOT NULL,
        scanned_at REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE variant_status (
        repo_id     TEXT NOT NULL REFERENCES manifests (repo_id) ON DELETE CASCADE,
        variant     TEXT NOT NULL,
        status      TEXT NOT NULL CHECK (status IN ('available', 'downloading', 'downloaded', 'failed')),
        bytes_done  INTEGER NOT NULL DEFAULT 0,
        error       TEXT,
        started_at  REAL,
        finished_at REAL,
        updated_at  REAL NOT NULL,
        PRIMARY KEY (repo_id, variant)
    ) WITHOUT ROWID
    """,
    # 4: how often each model (a repo, or one variant of it: '' for the whole repo) is used.
    """
    CREATE TABLE access (
        repo_id     TEXT NOT NULL,
        variant     TEXT NOT NULL,
        count       INTEGER NOT NULL,
        last_access REAL NOT NULL,
        PRIMARY KEY (repo_id, variant)
    ) WITHOUT ROWID
    """,
    # 5: where a pull's bytes came from, per variant (JSON: local, node, peer, hub -> bytes).
    """
    ALTER TABLE variant_status ADD COLUMN bytes_by_source TEXT NOT NULL DEFAULT '{}'
    """,
    # 6: deferred durability: the boot id under which a blob not yet known durable was written (NULL:
    # durable). See store/durability.py.
    """
    ALTER TABLE blobs ADD COLUMN unflushed_boot TEXT
    """,
    # 7: pins: what the disk budget never evicts (store/budget.py); variant '' for the whole repo.
    """
    CREATE TABLE pins (
        repo_id    TEXT NOT NULL,
        variant    TEXT NOT NULL,
        revision   TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (repo_id, variant, revision)
    ) WITHOUT ROWID
    """,
    # 8: repo ids looked up whatever their case, as the Hub does (Store.spelled): NOCASE is exact for ASCII.
    """
    CREATE INDEX repos_by_folded_id ON repos (repo_id COLLATE NOCASE);
    CREATE INDEX manifests_by_folded_id ON manifests (repo_id COLLATE NOCASE)
    """,
    # 9: the file of the user's a blob is a hard link of (import --link, an adopted Hugging Face cache), and
    # the mode it had before the store made it read-only: given back, exactly, when the store lets go of it
    # and that file is the last name left (store/blobs.py). No foreign key: read after the blob's row went.
    """
    CREATE TABLE linked_sources (
        sha256 TEXT PRIMARY KEY,
        source TEXT NOT NULL,
        device INTEGER NOT NULL,
        inode  INTEGER NOT NULL,
        mode   INTEGER NOT NULL
    ) WITHOUT ROWID;
    INSERT INTO settings (key, value) SELECT 'links_unrecorded', '1' WHERE EXISTS (SELECT 1 FROM blobs)
    """,
    # 10: each scanned commit's whole listing (the hub layer's JSON of its files), kept while the store holds
    # the commit or it is the repo's scan: a commit held in part is listed whole after the repo's one saved
    # scan moved to another commit (a client caches a commit's listing for good: docs/hub-api.md).
    """
    CREATE TABLE commit_listings (
        repo_id   TEXT NOT NULL COLLATE NOCASE,
        commit_id TEXT NOT NULL,
        files     TEXT NOT NULL,
        saved_at  REAL NOT NULL,
        PRIMARY KEY (repo_id, commit_id)
    ) WITHOUT ROWID
    """,
    # 11: each revision's last use (store/access.py): an old commit a deployment reads by its id every day
    # was judged by the day it was pulled, and the disk budget evicted it before one pulled once and never read.
    # The repos' uses so far count, as they did, for the revisions their refs name (for the newest, when no
    # ref names any).
    """
    CREATE TABLE revision_access (
        repo_id     TEXT NOT NULL,
        commit_id   TEXT NOT NULL,
        last_access REAL NOT NULL,
        PRIMARY KEY (repo_id, commit_id)
    ) WITHOUT ROWID;
    INSERT INTO revision_access (repo_id, commit_id, last_access)
        SELECT r.repo_id, r.commit_id, MAX(a.last_access) FROM refs r JOIN access a USING (repo_id)
        GROUP BY r.repo_id, r.commit_id;
    INSERT OR IGNORE INTO revision_access (repo_id, commit_id, last_access)
        SELECT v.repo_id, v.commit_id, MAX(a.last_access) FROM revisions v JOIN access a USING (repo_id)
        WHERE NOT EXISTS (SELECT 1 FROM refs r WHERE r.repo_id = v.repo_id)
        AND v.created_at = (SELECT MAX(created_at) FROM revisions w WHERE w.repo_id = v.repo_id)
        GROUP BY v.repo_id, v.commit_id
    """,
    # 12: blobs by size: every import asks which of its files' sizes the store holds (the disk budget's check
    # before it writes), a scan of every blob without it (17.6 ms at 61,500 blobs, growing with the store: an
    # explorer's trial). Reads do without it.
    """
    CREATE INDEX blobs_by_size ON blobs (size)
    """,
    # 13: when a repo was made private on its upstream's word (a mirror told the repo is gone or private, a
    # pull of a private or gated repo), NULL when the node's operator made it so or it is public: such a repo
    # is shown again once its upstream does (a mirror that once heard "not found", from a wrong token or a
    # repo briefly gone, hid a public repo for good: an explorer's trial). The private repos pulled so far are
    # taken as made so by their upstream.
    """
    ALTER TABLE repos ADD COLUMN hidden_at REAL;
    UPDATE repos SET hidden_at = updated_at WHERE private = 1 AND origin != 'import'
    """,
    # 14: ... only where the upstream said so: the repo's saved scan, from the upstream it came from, says it is
    # private or gated. A repo its operator made private whose origin became an upstream's (adopted with
    # `hf-cache import --private`, then pulled; a branch imported `--private` onto a pulled repo) was taken
    # so, and a scan that found the upstream public made it public (a review's trial). Left private, a
    # mirror's hide of a public repo stays until the operator shows it (the safe side).
    """
    UPDATE repos SET hidden_at = NULL WHERE hidden_at IS NOT NULL AND NOT EXISTS (
        SELECT 1 FROM manifests m WHERE m.repo_id = repos.repo_id AND CASE WHEN json_valid(m.body) THEN
            json_extract(m.body, '$.endpoint') = repos.origin
            AND (json_extract(m.body, '$.info.private') = 1
                 OR json_extract(m.body, '$.info.gated') IN (1, 'auto', 'manual'))
        ELSE 0 END)
    """,
    # 15: the disk budget's evictions, each with when, what and the write or command that made it (the newest
    # EVICTIONS_KEPT): a model evicted weeks ago was "not in the store" and "available" as if never pulled, the
    # totals alone kept (an explorer's trial). Shown by `budget`, `info`, `status` and the dashboard.
    """
    CREATE TABLE evictions (
        at REAL NOT NULL,
        repo_id TEXT NOT NULL,
        commit_id TEXT NOT NULL,
        variant TEXT,
        bytes_freed INTEGER NOT NULL,
        bytes_still_linked INTEGER NOT NULL DEFAULT 0,
        last_used REAL NOT NULL,
        doing TEXT NOT NULL DEFAULT '',
        pid INTEGER,
        origin TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX evictions_by_repo ON evictions (repo_id COLLATE NOCASE, at);
    CREATE INDEX blobs_not_ok ON blobs (sha256) WHERE state != 'ok'
    """,
    # 16: whether a ref is a git tag upstream (a pull of a tag: `-r v1.0`), listed as one (a tag pulled was
    # listed as a branch, and code picking releases from `list_repo_refs().tags` found none: an explorer's
    # trial). Every ref so far is a branch.
    """
    ALTER TABLE refs ADD COLUMN tag INTEGER NOT NULL DEFAULT 0
    """,
    # 17: a repo private on its upstream's word only because that upstream gates it (not private there):
    # described to anyone, as the Hub describes it, its files behind the node's token (RepoSummary.gated).
    # Set by a scan or pull from this version on: a row before it stays hidden whole until its upstream
    # says so again (a card's `gated` was written for private upstream repos too, a review's trial).
    """
    ALTER TABLE repos ADD COLUMN gated_only INTEGER NOT NULL DEFAULT 0
    """,
    # 18: the commits a branch named before it moved, and when it left them: the revision a pull of another
    # variant left a variant behind in (engines.loading.left_behind; "detached" took a pull request's commit,
    # pulled by its id, for main's old one: a review)
    """
    CREATE TABLE ref_history (
        repo_id TEXT NOT NULL,
        name TEXT NOT NULL,
        commit_id TEXT NOT NULL,
        left_at REAL NOT NULL,
        PRIMARY KEY (repo_id, name, commit_id)
    )
    """,
)
SCHEMA_VERSION = len(_MIGRATIONS)
# A store that cannot be upgraded here (a read-only mount, another user's) is read as it is from this
# version on: the migrations after it add what only writes use (linked_sources), or what a read does
# without (commit_listings, revision_access: Index.schema says which it may ask; blobs_by_size;
# repos.hidden_at, which a mirror's writes alone use, and 14's correction of it; evictions: no history read;
# refs.tag: every ref a branch; repos.gated_only: none described; ref_history: none left behind).
READABLE_FROM = 8
# Result codes (sqlite3.SQLITE_FULL and friends exist only from Python 3.11). Python reports extended codes.
_SQLITE_IOERR = 10
_SQLITE_FULL = 13
_SQLITE_CANTOPEN = 14

RESERVE_MIN = 1 << 20  # 256 pages of WAL; grown to twice the index's size (below)
_RESERVE_SHARE = 16  # the reserve takes at most this fraction of the file system
_SPARE_INODES = 1  # with the folder and the space file, 3 inodes: for the -wal and -shm files, and one more
_NEARLY_FULL = 64 << 10  # fewer free bytes than this: a full disk
_PAGE = 4096


def _disk_full(directory: Path) -> bool:
    """Whether the file system holding ``directory`` has (almost) no free bytes or no free inodes."""
    try:
        fs = os.statvfs(directory)
    except OSError:
        return False
    return fs.f_bavail * fs.f_frsize < _NEARLY_FULL or (fs.f_files > 0 and fs.f_favail == 0)


def is_full_error(error: sqlite3.Error, directory: Path | None = None) -> bool:
    """Whether SQLite failed for lack of disk space (or inodes) in ``directory``, the index's folder.

    SQLITE_FULL is explicit. A -shm file SQLite cannot grow is reported as an I/O error
    (SQLITE_IOERR_SHMSIZE: it grows the file by writing to it), and a -wal or -shm file it cannot create
    as CANTOPEN: those count as a full disk when the file system says it is full.
    """
    code = getattr(error, "sqlite_errorcode", None)
    if code == _SQLITE_FULL:
        return True
    if code is None or code & 0xFF not in (_SQLITE_IOERR, _SQLITE_CANTOPEN) or directory is None:
        return False
    return _disk_full(directory)


_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26
_SQLITE_READONLY = 8


def _refused_a_write(error: sqlite3.Error, directory: Path) -> bool:
    """Whether SQLite failed as the index's file system turned read-only under it ("disk I/O error", or
    "attempt to write a readonly database"; a node answered 500 to every write, its health "ok": an
    explorer's trial)."""
    code = getattr(error, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (_SQLITE_IOERR, _SQLITE_READONLY) and refuses_writes(directory)


def is_damage(error: sqlite3.Error) -> bool:
    """Whether SQLite found the index damaged: a malformed page, or a text value that is no UTF-8 (a flipped
    bit of it, which no check of SQLite's sees)."""
    code = getattr(error, "sqlite_errorcode", None)
    return (
        code is not None and code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    ) or "decode to UTF-8" in str(error)


def index_damage_advice(home: Path) -> str:
    """How to get out of a damaged index: the blobs and snapshots are intact beside it."""
    return (f"the files themselves are intact under {home}/blobs and snapshots: stop what uses the store, then "
            f"`modeldepot recover-index --home {home}` makes the index whole again from what can still be read "
            f"of it (the damaged one is kept beside it), and `modeldepot verify` finds what it no longer names; "
            f"else import each folder under {home}/snapshots/ORG/NAME/COMMIT into a new store (`modeldepot "
            "import FOLDER --repo ORG/NAME --home NEW`)")  # fmt: skip


def translate_sqlite_error(error: sqlite3.Error, doing: str, directory: Path | None = None) -> StoreError:
    """Map an sqlite3 error to the exception tree, keeping the cause. A damaged index says how to get out of
    it (the bare "database disk image is malformed", or "Could not decode to UTF-8", said nothing more: an
    explorer's trial)."""
    if is_full_error(error, directory):
        return StoreFullError(f"no space left while {doing}: nothing was changed; {FULL_DISK_ADVICE}")
    if directory is not None and _refused_a_write(error, directory):
        return ReadOnlyStoreError(f"{doing} failed: the store is {REFUSES_WRITES}")
    if directory is not None and is_damage(error):
        return IndexDamagedError(
            f"the index is damaged ({error}) while {doing}: {index_damage_advice(directory)}"
        )
    return StoreError(f"index error while {doing}: {error}")


# -- the reserve ----------------------------------------------------------------------------------------


class SpaceReserve:
    """Room kept on the store's disk so that the store can free space when the disk is full.

    ``<home>/reserve/``: ``space``, a preallocated file, and an empty file: with the folder, three inodes for
    a disk out of inodes. Its size is twice the index's, at least :data:`RESERVE_MIN`, at most 1/16 of the
    file system: a deletion writes to the WAL the pages it changes, at most the index's pages, so even
    removing everything fits, with a margin.

    Only what has to work on a full disk to give space back releases it (unlinks it): opening the index
    (its -wal and -shm files), and the index transactions of ``rm`` and ``gc``. Imports and pulls never do:
    they fail with StoreFullError and leave the reserve alone.

    Afterwards :meth:`refill` takes it back: all of it when this process released it (the deletion that
    needed the room has freed more), but when it is merely missing (a store created on a nearly full disk)
    only once the disk has as much free again, so a nearly full disk never loses its last free bytes to it.
    Preallocation is best effort: a file system that cannot reserve space (copy-on-write, compression)
    gets a reserve that may not hold.
    """

    def __init__(self, folder: Path, index: Path) -> None:
        self.folder = folder
        self.space = folder / "space"
        self.index = index
        # The store's home: a link in place of reserve/ or of its files leads nowhere out of it (one in place of
        # reserve/space had root pad a config file with 1 MiB of zeros: an explorer's trial; store/confined.py)
        self._within = os.path.realpath(folder.parent)
        self.released = False  # this process released it and has not taken all of it back yet

    def held(self) -> int:
        """The bytes the reserve holds now (its file is only ever grown by preallocation)."""
        try:
            return os.stat(self.space, follow_symlinks=False).st_size
        except OSError:
            return 0

    def release(self) -> bool:
        """Give the reserve's bytes and inodes back to the file system; False if there was nothing to give."""
        try:
            folder = folder_within(self.folder, self._within)
        except (OSError, StoreError):
            return False
        try:
            names = os.listdir(folder)
            for name in names:
                with suppress(OSError):
                    os.unlink(name, dir_fd=folder)
        finally:
            os.close(folder)
        with suppress(OSError):
            os.rmdir(self.folder)  # (a folder alone: a link in its place is not one, and stays)
        if names:
            self.released = True
            log.warning("the store's disk is full: its space reserve was released to let the store work")
        return bool(names)

    def refill(self) -> None:
        """Create or complete the reserve, within the rules above; never raises."""
        try:
            self._refill()
        except StoreError as error:  # (a link in place of reserve/: left alone, said)
            log.warning("could not keep the store's space reserve: %s", error)
        except OSError as error:
            if error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES):
                log.warning("could not keep the store's space reserve at %s: %s", self.folder, error)

    def _refill(self) -> None:
        fs = os.statvfs(self.folder.parent)
        try:
            index_bytes = os.stat(self.index).st_size
        except FileNotFoundError:
            index_bytes = 0
        wanted = max(RESERVE_MIN, 2 * index_bytes)
        target = min(wanted, fs.f_blocks * fs.f_frsize // _RESERVE_SHARE) // _PAGE * _PAGE
        held = self.held()
        try:
            spares = sum(1 for name in os.listdir(self.folder) if name.startswith("inode-"))
        except FileNotFoundError:
            spares = -1  # the folder itself is missing too
        if held >= target and spares == _SPARE_INODES:
            self.released = False
            return
        free = fs.f_bavail * fs.f_frsize
        if not self.released and (
            free - (target - held) < target or (fs.f_files > 0 and fs.f_favail < 4 * (_SPARE_INODES + 2))
        ):
            return  # merely missing, and the disk is (nearly) full: leave its free space to the user
        with opened_folder(self.folder, self._within, create=True) as folder:
            fd = os.open(
                "space", os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=folder
            )
            try:
                size = min(target, held + free // _PAGE * _PAGE)
                if size > held:
                    os.posix_fallocate(fd, 0, size)
            finally:
                os.close(fd)
            for number in range(_SPARE_INODES):
                os.close(os.open(f"inode-{number}", os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                                 dir_fd=folder))  # fmt: skip
        if size >= target:
            self.released = False


def read_only_uri(path: Path, writer_elsewhere: bool) -> str:
    """How an index on a read-only mount is opened. With its shared-memory file there (a writer has it open
    where the store is writable, or left a log to merge), read-only as any reader: what the writer commits is
    seen. Without it (a store closed cleanly: an image's), immutable: no locks and no file to make, which a
    read-only mount could not take; should a writer appear, each connection is made again (Index)."""
    quoted = urllib.parse.quote(str(path))
    return f"file:{quoted}?mode=ro" if writer_elsewhere else f"file:{quoted}?mode=ro&immutable=1"


def immutable_key(path: Path) -> tuple[int, int, int] | None:
    """(A read-only mount.) What an immutable connection to the index at ``path`` may be kept for: the
    file's identity, size and time as it is opened; None when a writer has the index open (its shared-memory
    file is there: connections are not immutable then). A writer that came and went between two looks (a
    CLI import that ended: it removed its -shm file as it closed) changed the file: its identity, size or
    time tells so, and the connection is made again (it kept the old pages for good: a node on another
    user's store served two commits of one branch in turn)."""
    if os.path.exists(f"{path}-shm"):
        return None
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_ino, found.st_size, found.st_mtime_ns


class ChangeCounter:
    """Whether anyone (any connection, any process) committed to the index since the last look, for a
    cheap poll: ``PRAGMA data_version`` on a connection of its own that never writes. Its value changes
    whenever another connection commits; reading it touches no table. Use from one thread at a time."""

    def __init__(self, path: Path, read_only: bool = False) -> None:
        self.path = path
        self.read_only = read_only
        self._con: sqlite3.Connection | None = None
        # (A read-only mount with no writer at the start: the connection is immutable, and its version never
        # moves. Made again once a writer appears, as the index's are; the versions of each connection count
        # apart, so they are told apart by how many connections came before: a value never comes back.)
        self._immutable: tuple[int, int, int] | None = None  # (immutable_key, as the connection was made)
        self._connections = 0
        self._connect()

    def _connect(self) -> None:
        try:
            if self.read_only:
                key = immutable_key(self.path)
                uri = read_only_uri(self.path, key is None)
                con = sqlite3.connect(uri, uri=True, check_same_thread=False)
                self._immutable = key
            else:
                con = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=False)
            con.execute("PRAGMA query_only=ON")
        except sqlite3.Error as error:
            raise translate_sqlite_error(error, f"opening the index {self.path}", self.path.parent) from error
        if self._con is not None:
            self._con.close()
        self._con = con
        self._connections += 1

    def value(self) -> int:
        if self._con is None:
            raise ValueError("the change counter is closed")
        if self._immutable is not None and immutable_key(self.path) != self._immutable:
            self._connect()  # a writer appeared, or came and went: what it committed is read from now on
        try:
            with INDEX_GATE:
                version = int(self._con.execute("PRAGMA data_version").fetchone()[0])
        except sqlite3.Error as error:
            raise translate_sqlite_error(
                error, "reading the index's change counter", self.path.parent
            ) from error
        return (self._connections << 40) + version

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None


class Index:
    def __init__(self, path: Path, setup_lock: Path, read_only: bool = False, why: str | None = None) -> None:
        self.path = path
        self.read_only = read_only
        self.why = why or "on a read-only file system"  # (read-only: as in "the store at X is ...")
        self._wrote = False  # a transaction of this process committed (its close then merges the log)
        self.reserve = SpaceReserve(path.parent / "reserve", path)
        self._local = threading.local()
        # Every thread's connection, by thread (with the process that made it), so that close() closes them
        # all: a pool's threads kept theirs open, with the index's three files, as long as the Index lived (a
        # closed Depot still referenced held ten descriptors). Made with check_same_thread=False for that:
        # each is still used by its own thread alone (``_local``), and closed by another only when its
        # thread ended or is outside the index (``_users`` held alone)
        self._opened: dict[threading.Thread, tuple[int, sqlite3.Connection]] = {}
        # The threads inside this index (always within INDEX_GATE): its close waits for these alone, not for
        # every index of the process (a shared store's close waited out another store's busy write)
        self._users = ForkGate()
        self.closed = False
        if read_only:
            self._check_read_only()
            return
        # Switching to WAL needs a moment with no other connection, and SQLite's busy timeout does not
        # cover it: processes opening a new store together would fail with "database is locked".
        # The switch persists in the file, so it is done once, under a lock, together with migrations.
        # (no link in its place leads out of the store: store/confined.py)
        fd = lock_file(
            open_within, setup_lock, os.O_RDWR | os.O_CREAT, 0o664, os.path.realpath(setup_lock.parent.parent)
        )
        try:
            take_flock(fd, fcntl.LOCK_EX)
            # Made here, as the umask says (SQLite makes it 0o644 whatever the umask; its -wal and -shm take
            # its mode): a store a group shares (a setgid folder, umask 002) was read-only to every member but
            # the one who made it (an explorer's trial)
            with suppress(FileExistsError):
                os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666))
            _share_with_the_group(path)
            self._migrate()
        finally:
            unlock_and_close(fd)
        self.reserve.refill()

    def connection(self) -> sqlite3.Connection:
        if self.closed:
            raise StoreClosedError(
                f"the store at {self.path.parent} was closed (Depot.close(), or the end of its `with` block): "
                "open it again to use it (Depot(home))"
            )
        pid = os.getpid()
        con: sqlite3.Connection | None = getattr(self._local, "con", None)
        immutable = getattr(self._local, "immutable", None)
        if con is not None and immutable is not None and immutable_key(self.path) != immutable:
            # (a writer appeared where the store is writable, or came and went: read what it wrote)
            con.close()
            con = None
        if con is None or getattr(self._local, "pid", None) != pid:
            # A connection inherited across fork() is never used, not even to close it.
            key = immutable_key(self.path) if self.read_only else None  # (before: a change after is seen)
            con = self._connect(key)
            self._remember(con)
            self._local.con = con
            self._local.pid = pid
            self._local.immutable = key
        return con

    def _remember(self, con: sqlite3.Connection) -> None:
        """Record ``con`` as this thread's connection, and close those of threads that ended (their
        thread-locals went, but a connection lives on while anything refers to it)."""
        pid, me = os.getpid(), threading.current_thread()
        for thread, (made_in, old) in self._opened.copy().items():
            if made_in != pid:
                self._opened.pop(thread, None)  # (the parent's, across fork(): never used; let go, as before)
            elif (thread is me or not thread.is_alive()) and self._opened.pop(thread, None) is not None:
                with suppress(sqlite3.Error):
                    old.close()
        self._opened[me] = (pid, con)

    def _connect(self, key: tuple[int, int, int] | None = None) -> sqlite3.Connection:
        """A new connection (on a read-only store, immutable when ``key``, an :func:`immutable_key`, is
        given). On a full disk the room SQLite needs to open the database (its -wal and -shm files) is taken
        from the reserve, and what is left of the reserve is taken back at once."""
        doing = f"opening the index {self.path}"
        try:
            return self._open_connection(key)
        except sqlite3.Error as error:
            if not is_full_error(error, self.path.parent):
                raise self._failure(error, doing) from error
            if not self.reserve.release():
                raise self._reserve_used_up(doing) from error
        try:
            return self._open_connection(key)
        except sqlite3.Error as error:
            if is_full_error(error, self.path.parent):
                raise self._reserve_used_up(doing) from error
            raise self._failure(error, doing) from error
        finally:
            self.reserve.refill()

    def _failure(self, error: sqlite3.Error, doing: str) -> StoreError:
        return translate_sqlite_error(error, doing, self.path.parent)

    def _check_read_only(self) -> None:
        """A store on a read-only mount: its index must be of this schema (nothing can migrate it), and
        readable: an unmerged write-ahead log needs its shared-memory file, which cannot be made here."""
        doing = f"opening the index {self.path} (the store is {self.why})"
        try:
            log_bytes = os.path.getsize(f"{self.path}-wal")
        except FileNotFoundError:
            log_bytes = 0
        except OSError as error:
            raise StoreError(f"{doing}: {error}") from error
        if log_bytes and not self._writer_elsewhere():
            raise ReadOnlyStoreError(
                f"{doing}: the store was not closed cleanly where it was written (its index has a write-ahead "
                "log to merge): open it once where it is writable (any modeldepot command does), then "
                "read it here again"
            )
        try:
            version = self.connection().execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.Error as error:
            raise self._failure(error, doing) from error
        if version > SCHEMA_VERSION:
            raise StoreSchemaError(
                f"the index {self.path} has schema version {version}, newer than this modeldepot understands "
                f"({SCHEMA_VERSION}); upgrade modeldepot"
            )
        if version < READABLE_FROM:
            raise ReadOnlyStoreError(
                f"{doing}: it was written by an older modeldepot (schema {version}, this one reads {SCHEMA_VERSION}):"
                " open it once where it is writable to upgrade it, then read it here again"
            )

    @functools.cached_property
    def schema(self) -> int:
        """The index's schema version (below SCHEMA_VERSION only for a store read where it cannot be
        upgraded: see READABLE_FROM)."""
        return int(self.read("PRAGMA user_version")[0][0])

    def _writer_elsewhere(self) -> bool:
        """(A read-only mount.) Whether the index has its shared-memory file: a process where the store is
        writable has it open (a `:ro` volume another container writes), or left it with a log to merge."""
        return os.path.exists(f"{self.path}-shm")

    def _open_connection(self, key: tuple[int, int, int] | None = None) -> sqlite3.Connection:
        if self.read_only:  # (immutable exactly when ``key`` says so: the connection is kept by it)
            con = sqlite3.connect(read_only_uri(self.path, key is None), uri=True,
                                  isolation_level=None, check_same_thread=False)  # fmt: skip
            con.row_factory = sqlite3.Row
            return con
        con = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=False)
        try:
            con.row_factory = sqlite3.Row
            con.execute("PRAGMA synchronous=FULL")  # the first statement: it maps the -shm file
            con.execute("PRAGMA foreign_keys=ON")
        except BaseException:
            con.close()
            raise
        return con

    def close(self) -> None:
        """Close every thread's connection to the index (this thread's last, merging the write-ahead log
        when this process wrote). A thread inside the index is waited for; any use after is refused
        (StoreClosedError)."""
        self.closed = True  # (first: no thread opens a connection from now on)
        pid, me = os.getpid(), threading.current_thread()
        while True:
            with INDEX_GATE:  # (a fork waits for the closes, as for a transaction)
                if self._users.try_alone():
                    try:
                        for thread, (made_in, other) in self._opened.copy().items():
                            if (
                                thread is not me
                                and self._opened.pop(thread, None) is not None
                                and made_in == pid
                            ):
                                with suppress(sqlite3.Error):
                                    other.close()
                    finally:
                        self._users.end_alone()
                    break
            self._users.wait_for_others()  # (outside the process's gate: one of them may fork meanwhile)
        self._opened.pop(me, None)
        con: sqlite3.Connection | None = getattr(self._local, "con", None)
        if con is not None and getattr(self._local, "pid", None) == pid:
            if self._wrote:
                # The write-ahead log merged into the index now: other threads' connections (a pull's) may
                # stay open until the process ends without one more word (the CLI ends at once), and a store
                # left with a log to merge cannot be read from a read-only mount. (Not after reads alone: a
                # command that only read leaves the index's files as they were.)
                with (
                    suppress(sqlite3.Error),
                    INDEX_GATE,
                ):  # (not waiting on another process: it merges it then)
                    con.execute("PRAGMA busy_timeout = 100")
                    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            with INDEX_GATE:
                con.close()
        self._local.con = None
        if self.reserve.released:  # closing the last connection removed the -wal and -shm files
            self.reserve.refill()

    @contextmanager
    def write(self, doing: str = "writing the index") -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction: all or nothing, serialised across processes."""
        if self.read_only:
            raise ReadOnlyStoreError(
                f"{doing}: the store at {self.path.parent} is {self.why}: it is read and served as it is, never "
                "written (import, pull, remove and pin where it is writable)"
            )
        with INDEX_GATE, self._users:
            con = self.connection()
            try:
                con.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as error:
                raise self._failure(error, doing) from error
            try:
                yield con
                con.execute("COMMIT")
                self._wrote = True
            except BaseException as exc:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise self._failure(exc, doing) from exc
                raise

    def write_freeing(self, doing: str, body: Callable[[sqlite3.Connection], T]) -> T:
        """``body`` in one :meth:`write` transaction, for a change that lets the caller free disk space
        (deleting rows, then their files). On a full disk the reserve is released and ``body`` runs again
        in a new transaction; the caller calls ``reserve.refill()`` once it has freed the space."""
        try:
            with self.write(doing) as con:
                return body(con)
        except StoreFullError as error:
            if not self.reserve.release():
                raise self._reserve_used_up(doing) from error
        try:
            with self.write(doing) as con:
                return body(con)
        except StoreFullError as error:
            raise self._reserve_used_up(doing) from error

    def _reserve_used_up(self, doing: str) -> StoreFullError:
        return StoreFullError(
            f"no space left while {doing}, and the store's space reserve is used up: nothing was changed; "
            "free some space elsewhere on the disk (or move MODELDEPOT_HOME), then run it again"
        )

    def read(self, sql: str, params: tuple[object, ...] = ()) -> list[sqlite3.Row]:
        try:
            with INDEX_GATE, self._users:
                return self.connection().execute(sql, params).fetchall()
        except sqlite3.Error as error:
            raise self._failure(error, "reading the index") from error

    def change_counter(self) -> ChangeCounter:
        """A :class:`ChangeCounter` of this index (a connection of its own: close it when done)."""
        return ChangeCounter(self.path, self.read_only)

    def setting(self, key: str) -> str | None:
        rows = self.read("SELECT value FROM settings WHERE key = ?", (key,))
        return str(rows[0]["value"]) if rows else None

    def _migrate(self) -> None:
        with INDEX_GATE, self._users:
            self._migrate_now()

    def _say_upgraded_under(self) -> None:
        """Warn when another process has the index open as it is upgraded: it is of an older modeldepot (this
        one upgrades an index as it opens it), and goes on by its old rules until it is restarted (a node left
        running while the store was upgraded recorded its uses where the new disk budget does not read them,
        which then evicted the model it served: an explorer's trial)."""
        others = processes_with_open(str(self.path))
        if others:
            log.warning("the store's index %s is upgraded to schema %d while process(es) %s hold it open: a "
                        "modeldepot older than this one goes on by its old rules until it is restarted; "
                        "restart it with this version", self.path, SCHEMA_VERSION,
                        ", ".join(map(str, sorted(others))))  # fmt: skip

    def _migrate_now(self) -> None:
        con = self.connection()
        try:
            if con.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                con.execute("PRAGMA journal_mode=WAL")
            if 0 < con.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
                self._say_upgraded_under()  # (before the lock: the look at every process takes a while)
            con.execute("BEGIN EXCLUSIVE")
            try:
                version = con.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise StoreSchemaError(
                        f"the index {self.path} has schema version {version}, newer than this modeldepot "
                        f"understands ({SCHEMA_VERSION}); upgrade modeldepot"
                    )
                for number in range(version, SCHEMA_VERSION):
                    for statement in _MIGRATIONS[number].split(";"):
                        if statement.strip():
                            con.execute(statement)
                    con.execute(f"PRAGMA user_version = {number + 1}")
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        except sqlite3.Error as error:
            raise self._failure(error, f"preparing the index {self.path}") from error


def _share_with_the_group(path: Path) -> None:
    """In a store a group shares (its folder setgid, this process's umask granting the group write), the
    index files this user made before the store made them as the umask says (SQLite's 0o644) get the
    group's write: every other member of the group found the store read-only, and a `chmod g+w index.db*`
    was the README's advice. Another user's files are theirs to change; nothing else is touched."""
    try:
        if not os.stat(path.parent).st_mode & stat.S_ISGID or not writable_mode() & 0o020:
            return
        for name in (path.name, f"{path.name}-wal", f"{path.name}-shm"):
            # A link is not followed (any member may put one in the group's folder: the maker's next command
            # gave the group write on whatever file of the maker's it named, a review): the file itself is
            # opened, and changed only when it is a regular file of this user's
            try:
                fd = os.open(path.parent / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except (FileNotFoundError, OSError):
                continue
            try:
                found = os.fstat(fd)
                wanted = stat.S_IMODE(found.st_mode | (writable_mode() & 0o060))
                if (
                    stat.S_ISREG(found.st_mode)
                    and found.st_uid == os.geteuid()
                    and stat.S_IMODE(found.st_mode) != wanted
                ):
                    os.fchmod(fd, wanted)
            finally:
                os.close(fd)
    except OSError as error:  # (a store on a file system without modes: the group keeps what it had)
        log.debug("cannot give the group write on %s: %s", path, error)
