"""A damaged index made whole again from what SQLite can still read of it (``modeldepot recover-index``).

The blobs and snapshots beside a damaged ``index.db`` are intact; the index names them. SQLite's own way
out, ``sqlite3 index.db .recover``, failed on Debian 12's sqlite3 (3.40.1) even on a healthy index, and
the ``sqlite3`` shell is not installed on most machines: the advice a damaged index printed could not be
followed (an explorer's trial). Here, with Python's own sqlite3: the damaged file (and its log) is copied
aside first, kept; every table of its schema is made again in a new file and every row still readable is
copied into it, a table read in key order up to a damaged page and from its other end back down to it; the
indexes are built again; the new file is checked whole, and only then takes the old one's place. What is
lost is said; :mod:`modeldepot.recovery` then takes in again what the snapshot folders hold of it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from modeldepot.errors import IndexDamagedError, StoreError
from modeldepot.store.holders import process_command, processes_with_open
from modeldepot.store.layout import StoreLayout, fsync_dir, fsync_file
from modeldepot.store.locks import held_exclusively

__all__ = ["Salvaged", "salvage_index"]

log = logging.getLogger(__name__)


@dataclass
class Salvaged:
    """What :func:`salvage_index` did: rows copied per table, tables it read only in part (or not at all),
    and where the damaged index was kept."""

    kept_at: Path
    rows: dict[str, int] = field(default_factory=dict)
    damaged_tables: dict[str, str] = field(default_factory=dict)  # table -> what SQLite said
    lost_indexes: list[str] = field(default_factory=list)


class _NewIndexFailed(Exception):
    """Writing the new index failed (its disk full, say): no damage of the old one's, and nothing replaced."""


def salvage_index(layout: StoreLayout) -> Salvaged:
    """Replace the store's damaged ``index.db`` with a new one holding every row SQLite can still read.
    Refused while a process (this one too) has the index open: its connection would go on writing the old
    file. The store's lock and the index's setup lock are held throughout, so that no process opens the store
    meanwhile (one that did wrote into the file replaced, and lost what it was told was done: a review).
    Raises IndexDamagedError when not even the index's schema can be read (then import each snapshot folder
    into a new store)."""
    index = layout.index_path
    if not index.is_file():
        raise StoreError(f"no index at {index}: nothing to recover")
    with (
        held_exclusively(layout.lock_path, layout.real_home),
        held_exclusively(layout.lock_path.parent / "index-setup.lock", layout.real_home),
    ):
        holders = sorted(processes_with_open(str(index)) | _this_process_with_open(index))
        if holders:
            named = ", ".join(f"{pid} ({process_command(pid) or '?'})" for pid in holders[:5])
            raise StoreError(
                f"the index {index} is open in process {named}: stop it first, then recover the index"
            )
        kept = _kept_name(index)
        _copy_aside(index, kept)
        fresh = index.with_name("index.db.recovering")
        with contextlib.suppress(FileNotFoundError):
            fresh.unlink()
        try:
            report = _salvage_into(layout, kept, fresh)
        except _NewIndexFailed as failed:
            with contextlib.suppress(OSError):
                fresh.unlink()
            raise StoreError(f"writing the recovered index failed ({failed}): the index was left as it was (a copy "
                             f"of it is at {kept}); make room on the store's disk and run it again") from None  # fmt: skip
        except BaseException:
            with contextlib.suppress(OSError):
                fresh.unlink()
            raise
        _same_owner_and_mode(index, fresh)
        fsync_file(fresh)
        # The old log goes first: a log left beside the new file would be replayed into it (a crash between the
        # two loses the old file's last transactions: the copy kept has them)
        for leftover in (index.with_name("index.db-wal"), index.with_name("index.db-shm")):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
        os.replace(fresh, index)
        fsync_dir(index.parent)
    return report


def _salvage_into(layout: StoreLayout, kept: Path, fresh: Path) -> Salvaged:
    report = Salvaged(kept_at=kept)
    source = sqlite3.connect(f"file:{kept}?mode=ro", uri=True)
    target = sqlite3.connect(fresh, isolation_level=None)
    try:
        try:
            schema = source.execute(
                "SELECT type, name, tbl_name, sql FROM sqlite_master WHERE sql IS NOT NULL AND name NOT LIKE 'sqlite_%'"
            ).fetchall()
            version = int(source.execute("PRAGMA user_version").fetchone()[0])
        except sqlite3.DatabaseError as error:
            raise IndexDamagedError(
                f"not even the schema of the index {layout.index_path} can be read ({error}): import each folder "
                f"under {layout.snapshots}/ORG/NAME/COMMIT into a new store (`modeldepot import FOLDER --repo "
                "ORG/NAME --home NEW`)"
            ) from error
        _write(target, "BEGIN")
        for kind, name, _table, sql in schema:
            if kind == "table":
                _write(target, sql)
                _copy_rows(source, target, name, report)
        for kind, name, _table, sql in schema:
            if kind in ("index", "trigger", "view"):
                try:
                    target.execute(sql)
                except sqlite3.IntegrityError as error:  # (a unique index the rows read no longer satisfy)
                    report.lost_indexes.append(f"{name}: {error}")
                except sqlite3.Error as error:
                    raise _NewIndexFailed(error) from error
        _write(target, f"PRAGMA user_version = {version}")
        _write(target, "COMMIT")
        if target.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
            raise IndexDamagedError(
                f"the index recovered from {layout.index_path} failed its own check: it was not put in place"
            )
        _write(target, "PRAGMA journal_mode=WAL")
    finally:
        source.close()
        target.close()
    return report


def _write(target: sqlite3.Connection, sql: str, values: tuple[object, ...] = ()) -> int:
    """``sql`` run in the new index; the rows it changed (an ignored duplicate: none)."""
    try:
        return int(target.execute(sql, values).rowcount)
    except sqlite3.Error as error:
        raise _NewIndexFailed(error) from error


def _this_process_with_open(index: Path) -> set[int]:
    """This process, when it has ``index`` open (a depot of its own on the store)."""
    wanted = os.path.realpath(index)
    with contextlib.suppress(OSError):
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/self/fd/{fd}") == wanted:
                    return {os.getpid()}
    return set()


def _kept_name(index: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        kept = index.with_name(f"index.db.damaged-{stamp}" + (f".{attempt}" if attempt else ""))
        if not kept.exists():
            return kept
    raise StoreError(f"too many copies of damaged indexes beside {index}: remove the old ones")


def _same_owner_and_mode(index: Path, fresh: Path) -> None:
    """The new index as the old one was: its owner's (a recovery run as root kept the service's user out of
    its own store: a review), and its mode."""
    try:
        old = os.stat(index)
        os.chmod(fresh, stat.S_IMODE(old.st_mode))
        if os.geteuid() == 0:
            os.chown(fresh, old.st_uid, old.st_gid)
    except OSError as error:
        log.warning("the recovered index could not be given the old one's owner and mode: %s", error)


def _copy_aside(index: Path, kept: Path) -> None:
    """``index`` (and its log, under the same suffixes) copied to ``kept``, flushed: the damaged index stays."""
    for suffix in ("", "-wal"):
        source = index.with_name(index.name + suffix)
        if not source.exists():
            continue
        copy = kept.with_name(kept.name + suffix)
        with open(source, "rb") as reading, open(copy, "xb") as writing:
            while block := reading.read(1 << 20):
                writing.write(block)
        fsync_file(copy)
    fsync_dir(index.parent)


def _copy_rows(source: sqlite3.Connection, target: sqlite3.Connection, table: str, report: Salvaged) -> None:
    """Every row of ``table`` SQLite can read, copied: in key order up to a damaged page, then from the last
    key back down to it (the rows beyond are reached from the other end)."""
    quoted = '"' + table.replace('"', '""') + '"'
    info = source.execute(f"PRAGMA table_info({quoted})").fetchall()
    width = len(info)
    keys = [row[1] for row in sorted(info, key=lambda row: row[5]) if row[5] > 0]
    try:
        source.execute(f"SELECT rowid FROM {quoted} LIMIT 0")
        keys, prefix = ["rowid"], "rowid, "  # (a rowid table: its key is the rowid, read beside the columns)
    except sqlite3.DatabaseError:
        prefix = ""  # (WITHOUT ROWID: its primary key's columns)
    if not keys:
        keys = [row[1] for row in info]
    key = ", ".join('"' + name.replace('"', '""') + '"' for name in keys)
    at = [0] if prefix else [next(i for i, row in enumerate(info) if row[1] == name) for name in keys]
    insert = f"INSERT OR IGNORE INTO {quoted} VALUES ({', '.join('?' * width)})"
    copied, last = 0, None
    try:
        for row in source.execute(f"SELECT {prefix}* FROM {quoted} ORDER BY {key}"):
            copied += max(0, _write(target, insert, row[1:] if prefix else row))
            last = tuple(row[i] for i in at)
    except sqlite3.DatabaseError as error:
        report.damaged_tables[table] = str(error)
        after = f"WHERE ({key}) > ({', '.join('?' * len(keys))}) " if last is not None else ""
        try:
            for row in source.execute(
                f"SELECT {prefix}* FROM {quoted} {after}ORDER BY {' DESC, '.join(key.split(', '))} DESC",
                last or (),
            ):
                copied += max(0, _write(target, insert, row[1:] if prefix else row))
        except sqlite3.DatabaseError:
            pass  # (what lies between the two damaged ends is lost)
    report.rows[table] = copied
