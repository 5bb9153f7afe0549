"""The SQLite index: the single source of truth for what the store holds.

WAL mode so readers never block the writer; ``synchronous=FULL`` so a COMMIT that returned survives a
power cut; ``BEGIN IMMEDIATE`` for every write so two processes serialise on the database lock rather
than failing half-way. Each thread gets its own connection, and a forked child opens a fresh one
(connections must never cross a fork).
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from modeldepot.errors import StoreError, StoreFullError, StoreSchemaError

__all__ = ["SCHEMA_VERSION", "Index", "translate_sqlite_error"]

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
)
SCHEMA_VERSION = len(_MIGRATIONS)
_SQLITE_FULL = 13  # sqlite3.SQLITE_FULL exists only from Python 3.11


def translate_sqlite_error(error: sqlite3.Error, doing: str) -> StoreError:
    """Map an sqlite3 error to the exception tree, keeping the cause."""
    code = getattr(error, "sqlite_errorcode", None)
    if code == _SQLITE_FULL:
        return StoreFullError(f"no space left while {doing}: the change was rolled back; free disk space")
    return StoreError(f"index error while {doing}: {error}")


class Index:
    def __init__(self, path: Path, setup_lock: Path) -> None:
        self.path = path
        self._local = threading.local()
        # Switching to WAL needs a moment with no other connection, and SQLite's busy timeout does not
        # cover it: processes opening a new store together would fail with "database is locked".
        # The switch persists in the file, so it is done once, under a lock, together with migrations.
        fd = os.open(setup_lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o664)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._migrate()
        finally:
            os.close(fd)

    def connection(self) -> sqlite3.Connection:
        pid = os.getpid()
        con: sqlite3.Connection | None = getattr(self._local, "con", None)
        if con is None or getattr(self._local, "pid", None) != pid:
            # A connection inherited across fork() is never used, not even to close it.
            con = self._connect()
            self._local.con = con
            self._local.pid = pid
        return con

    def _connect(self) -> sqlite3.Connection:
        try:
            con = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=True)
            con.row_factory = sqlite3.Row
            con.execute("PRAGMA synchronous=FULL")
            con.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as error:
            raise translate_sqlite_error(error, f"opening the index {self.path}") from error
        return con

    def close(self) -> None:
        con: sqlite3.Connection | None = getattr(self._local, "con", None)
        if con is not None and getattr(self._local, "pid", None) == os.getpid():
            con.close()
        self._local.con = None

    @contextmanager
    def write(self, doing: str = "writing the index") -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction: all or nothing, serialised across processes."""
        con = self.connection()
        try:
            con.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as error:
            raise translate_sqlite_error(error, doing) from error
        try:
            yield con
            con.execute("COMMIT")
        except BaseException as exc:
            if con.in_transaction:
                con.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise translate_sqlite_error(exc, doing) from exc
            raise

    def read(self, sql: str, params: tuple[object, ...] = ()) -> list[sqlite3.Row]:
        try:
            return self.connection().execute(sql, params).fetchall()
        except sqlite3.Error as error:
            raise translate_sqlite_error(error, "reading the index") from error

    def setting(self, key: str) -> str | None:
        rows = self.read("SELECT value FROM settings WHERE key = ?", (key,))
        return str(rows[0]["value"]) if rows else None

    def _migrate(self) -> None:
        con = self.connection()
        try:
            if con.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                con.execute("PRAGMA journal_mode=WAL")
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
            raise translate_sqlite_error(error, f"preparing the index {self.path}") from error
