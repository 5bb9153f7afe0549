"""A damaged index made whole again from what SQLite can still read of it (``modeldepot recover-index``).

The blobs and snapshots beside a damaged ``index.db`` are intact; the index names them. SQLite's own way
out, ``sqlite3 index.db .recover``, failed on Debian 12's sqlite3 (3.40.1) even on a healthy index, and
the ``sqlite3`` shell is not installed on most machines: the advice a damaged index printed could not be
followed (an explorer's trial). Here, with Python's own sqlite3: the damaged file (and its log) is copied
aside first, kept; every table of its schema is made again in a new file and every row still readable is
copied into it, a table read past a damaged page from the next rows it can reach; the indexes are built
again; the new file is checked whole, and only then takes the old one's place. What is lost is said:
``modeldepot verify`` then finds what the index no longer names.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from modeldepot.errors import IndexDamagedError, StoreError
from modeldepot.store.holders import process_command, processes_with_open
from modeldepot.store.layout import StoreLayout, fsync_dir, fsync_file

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


def salvage_index(layout: StoreLayout) -> Salvaged:
    """Replace the store's damaged ``index.db`` with a new one holding every row SQLite can still read.
    Refused while another process has the store open (its connection would go on writing the old file).
    Raises IndexDamagedError when not even the index's schema can be read (then import each snapshot folder
    into a new store)."""
    index = layout.index_path
    if not index.is_file():
        raise StoreError(f"no index at {index}: nothing to recover")
    holders = sorted(processes_with_open(str(index)))
    if holders:
        named = ", ".join(f"{pid} ({process_command(pid) or '?'})" for pid in holders[:5])
        raise StoreError(
            f"the index {index} is open in process {named}: stop it first, then recover the index"
        )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    kept = index.with_name(f"index.db.damaged-{stamp}")
    _copy_aside(index, kept)
    fresh = index.with_name("index.db.recovering")
    with contextlib.suppress(FileNotFoundError):
        fresh.unlink()
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
                f"not even the schema of the index {index} can be read ({error}): import each folder under "
                f"{layout.snapshots}/ORG/NAME/COMMIT into a new store (`modeldepot import FOLDER --repo ORG/NAME "
                "--home NEW`)"
            ) from error
        target.execute("BEGIN")
        for kind, name, _table, sql in schema:
            if kind == "table":
                target.execute(sql)
                _copy_rows(source, target, name, report)
        for kind, name, _table, sql in schema:
            if kind in ("index", "trigger", "view"):
                try:
                    target.execute(sql)
                except sqlite3.DatabaseError as error:  # (a unique index the rows read no longer satisfy)
                    report.lost_indexes.append(f"{name}: {error}")
        target.execute(f"PRAGMA user_version = {version}")
        target.execute("COMMIT")
        if target.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
            raise IndexDamagedError(
                f"the index recovered from {index} failed its own check: it was not put in place"
            )
        target.execute("PRAGMA journal_mode=WAL")
    finally:
        source.close()
        target.close()
    fsync_file(fresh)
    # The old log goes first: a log left beside the new file would be replayed into it
    for leftover in (index.with_name("index.db-wal"), index.with_name("index.db-shm")):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
    os.replace(fresh, index)
    fsync_dir(index.parent)
    return report


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
            target.execute(insert, row[1:] if prefix else row)
            last = tuple(row[i] for i in at)
            copied += 1
    except sqlite3.DatabaseError as error:
        report.damaged_tables[table] = str(error)
        after = f"WHERE ({key}) > ({', '.join('?' * len(keys))}) " if last is not None else ""
        try:
            for row in source.execute(
                f"SELECT {prefix}* FROM {quoted} {after}ORDER BY {' DESC, '.join(key.split(', '))} DESC",
                last or (),
            ):
                target.execute(insert, row[1:] if prefix else row)
                copied += 1
        except sqlite3.DatabaseError:
            pass  # (what lies between the two damaged ends is lost)
    report.rows[table] = copied
