"""Persisted manifests of upstream repos and the status of each of their variants.

The store keeps them as opaque JSON plus status rows: what a manifest means belongs to the hub layer.
Statuses survive restarts; the transfer engine updates them live.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from dataclasses import dataclass, field

from modeldepot.errors import NotFoundError, StoreFullError
from modeldepot.store.index import Index
from modeldepot.validation import validate_repo_id

log = logging.getLogger(__name__)

__all__ = ["STATUSES", "ManifestRecord", "ManifestStore", "VariantStatusRecord"]

STATUSES = ("available", "downloading", "downloaded", "failed")
LISTING_KEPT = 86400.0  # seconds the listing of a commit the store does not hold is kept (ManifestStore.save)


def _by_source(text: str | None) -> dict[str, int]:
    """The stored JSON of a status row's bytes by source ({} when unreadable: a row is never lost to it)."""
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str) and type(v) is int and v >= 0}


def _keep_listing(con: sqlite3.Connection, repo_id: str, commit_id: str, listing: str, now: float,
                  replace: bool = False) -> None:  # fmt: skip
    """A commit's listing kept (a commit id names one tree: the first listing of it stays, unless
    ``replace``), and the repo's listings of commits the store does not hold let go (a mirror following a
    busy repo), once old enough that no pull of theirs is still on its way to publishing."""
    update = (
        "DO UPDATE SET files = excluded.files, saved_at = excluded.saved_at WHERE files != excluded.files"
    )
    con.execute("INSERT INTO commit_listings (repo_id, commit_id, files, saved_at) VALUES (?, ?, ?, ?) ON CONFLICT "
                f"(repo_id, commit_id) {update if replace else 'DO NOTHING'}", (repo_id, commit_id, listing, now))  # fmt: skip
    con.execute(
        "DELETE FROM commit_listings WHERE repo_id = ? AND commit_id != ? AND saved_at < ? AND NOT EXISTS "
        "(SELECT 1 FROM revisions r WHERE commit_listings.repo_id = r.repo_id AND r.commit_id = "
        "commit_listings.commit_id)", (repo_id, commit_id, now - LISTING_KEPT),
    )  # fmt: skip


@dataclass(frozen=True)
class VariantStatusRecord:
    variant: str
    status: str
    bytes_done: int
    error: str | None
    started_at: float | None
    finished_at: float | None
    updated_at: float
    bytes_by_source: dict[str, int] = field(default_factory=dict)  # local | node | peer | hub -> bytes


@dataclass(frozen=True)
class ManifestRecord:
    repo_id: str
    revision: str
    commit_id: str
    body: str  # JSON, the hub layer's
    scanned_at: float
    statuses: dict[str, VariantStatusRecord]


class ManifestStore:
    def __init__(self, index: Index) -> None:
        self.index = index
        # This process's scans the index could not record, by repo: a read-only store's, or one whose disk is
        # full (until a scan is recorded again: a mirror answered 507 for models it held, each time its scan
        # of a branch was due, because the scan's record found no room: an explorer's trial)
        self._scanned: dict[str, ManifestRecord] = {}

    def save(self, repo_id: str, revision: str, commit_id: str, body: str, statuses: dict[str, str],
             listing: str | None = None, replace: bool = False, unrecorded_ok: bool = False) -> None:  # fmt: skip
        """Record a fresh scan. Variants keep their status unless the scan says otherwise (a new commit
        resets them); variants that disappeared are dropped. ``listing``: the commit's files (the hub
        layer's JSON), kept for the commit after the repo's scan moves on (:meth:`listing`), over one kept
        before when ``replace``. ``unrecorded_ok``: a scan the index has no room for is kept in this process
        (a mirror's, to answer reads by: a full disk stops writes, not them), not a StoreFullError."""
        validate_repo_id(repo_id)
        now = time.time()
        if self.index.read_only:  # (kept by this process alone: nothing is written, nor pulled, there)
            records = {name: VariantStatusRecord(name, status, 0, None, None, None, now)
                       for name, status in statuses.items()}  # fmt: skip
            self._scanned[repo_id] = ManifestRecord(repo_id, revision, commit_id, body, now, records)
            return
        try:
            self._record(repo_id, revision, commit_id, body, statuses, listing, replace, now)
        except StoreFullError as full:
            if not unrecorded_ok:
                raise
            log.warning("%s: the scan of %s is used unrecorded (%s)", repo_id, commit_id[:12], full)
            records = {name: VariantStatusRecord(name, status, 0, None, None, None, now)
                       for name, status in statuses.items()}  # fmt: skip
            self._scanned[repo_id] = ManifestRecord(repo_id, revision, commit_id, body, now, records)
            return
        self._scanned.pop(repo_id, None)

    def _record(self, repo_id: str, revision: str, commit_id: str, body: str, statuses: dict[str, str],
                listing: str | None, replace: bool, now: float) -> None:  # fmt: skip
        with self.index.write(f"recording the manifest of {repo_id}") as con:
            if listing is not None:
                _keep_listing(con, repo_id, commit_id, listing, now, replace)
            old = con.execute("SELECT commit_id FROM manifests WHERE repo_id = ?", (repo_id,)).fetchone()
            if old is not None and old[0] != commit_id:
                con.execute("DELETE FROM variant_status WHERE repo_id = ?", (repo_id,))
            con.execute(
                "INSERT INTO manifests VALUES (?, ?, ?, ?, ?) ON CONFLICT (repo_id) DO UPDATE SET "
                "revision = excluded.revision, commit_id = excluded.commit_id, body = excluded.body, "
                "scanned_at = excluded.scanned_at",
                (repo_id, revision, commit_id, body, now),
            )
            marks = ",".join("?" * len(statuses))
            con.execute(
                f"DELETE FROM variant_status WHERE repo_id = ? AND variant NOT IN ({marks})",
                (repo_id, *statuses),
            )
            for variant, status in statuses.items():
                con.execute(
                    "INSERT INTO variant_status (repo_id, variant, status, updated_at) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (repo_id, variant) DO UPDATE SET status = excluded.status, "
                    "updated_at = excluded.updated_at WHERE variant_status.status != 'downloading'",
                    (repo_id, variant, status, now),
                )

    def forget(self, repo_id: str, commit_id: str) -> None:
        """Drop the repo's saved scan (and its variants' rows) if it is still of ``commit_id``."""
        if repo_id in self._scanned and self._scanned[repo_id].commit_id == commit_id:
            del self._scanned[repo_id]
        with self.index.write(f"forgetting the listing of {repo_id}") as con:
            if con.execute(
                "DELETE FROM manifests WHERE repo_id = ? AND commit_id = ?", (repo_id, commit_id)
            ).rowcount:
                con.execute("DELETE FROM variant_status WHERE repo_id = ?", (repo_id,))

    def forget_repo(self, repo_id: str, scanned_before: float) -> float | None:
        """Drop the repo's saved scan and its variants' rows, whatever commit it is of, when it was made before
        ``scanned_before`` (a later one may be a pull's that starts: it saves its scan before it takes the
        repo's pull mark). When the scan was made, or None when there was none."""
        self._scanned.pop(repo_id, None)
        with self.index.write(f"forgetting the scan of {repo_id}") as con:
            row = con.execute("SELECT scanned_at FROM manifests WHERE repo_id = ?", (repo_id,)).fetchone()
            if row is None or float(row[0]) >= scanned_before:
                return None if row is None else float(row[0])
            con.execute("DELETE FROM manifests WHERE repo_id = ?", (repo_id,))
            con.execute("DELETE FROM variant_status WHERE repo_id = ?", (repo_id,))
            return float(row[0])

    def keep_listing(self, repo_id: str, commit_id: str, listing: str) -> None:
        """Keep the files of a commit (the hub layer's JSON), for :meth:`listing`."""
        validate_repo_id(repo_id)
        if self.index.read_only:
            return
        with self.index.write(f"keeping the listing of {repo_id}@{commit_id[:12]}") as con:
            _keep_listing(con, repo_id, commit_id, listing, time.time())

    def listing(self, repo_id: str, commit_id: str) -> str | None:
        """The files of a commit as its scan listed them (the hub layer's JSON), or None: never scanned, or
        its listing was let go (gc: the store holds nothing of it), or the store's schema keeps none."""
        if self.index.schema < 10:  # (a store read where it cannot be upgraded)
            return None
        rows = self.index.read("SELECT files FROM commit_listings WHERE repo_id = ? AND commit_id = ?",
                               (repo_id, commit_id))  # fmt: skip
        return str(rows[0]["files"]) if rows else None

    def scanned_commit(self, repo_id: str) -> tuple[str, float] | None:
        """(commit id, when scanned) of the repo's saved scan, or None: a look without reading its body."""
        if repo_id in self._scanned:
            return self._scanned[repo_id].commit_id, self._scanned[repo_id].scanned_at
        rows = self.index.read("SELECT commit_id, scanned_at FROM manifests WHERE repo_id = ?", (repo_id,))
        return (str(rows[0]["commit_id"]), float(rows[0]["scanned_at"])) if rows else None

    def load(self, repo_id: str) -> ManifestRecord:
        validate_repo_id(repo_id)
        if repo_id in self._scanned:
            return self._scanned[repo_id]
        rows = self.index.read("SELECT * FROM manifests WHERE repo_id = ?", (repo_id,))
        if not rows:
            raise NotFoundError(f"{repo_id} has not been scanned yet: run `modeldepot scan {repo_id}`")
        row = rows[0]
        statuses = {
            s["variant"]: VariantStatusRecord(
                s["variant"],
                s["status"],
                s["bytes_done"],
                s["error"],
                s["started_at"],
                s["finished_at"],
                s["updated_at"],
                _by_source(s["bytes_by_source"]),
            )
            for s in self.index.read(
                "SELECT * FROM variant_status WHERE repo_id = ? ORDER BY variant", (repo_id,)
            )
        }
        return ManifestRecord(
            row["repo_id"], row["revision"], row["commit_id"], row["body"], row["scanned_at"], statuses
        )

    def set_statuses(
        self,
        repo_id: str,
        bytes_done: dict[str, int],
        status: str,
        error: str | None = None,
        by_source: dict[str, dict[str, int]] | None = None,
    ) -> None:
        """Record the progress of several variants (name -> bytes done, and name -> bytes by kind of
        source) in one transaction; starting ('downloading') and ending set their timestamps."""
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        if not bytes_done:
            return
        now = time.time()
        rows = [
            (status, done, error, now, json.dumps((by_source or {}).get(name, {}), sort_keys=True), status, now,
             status, now, repo_id, name)
            for name, done in bytes_done.items()
        ]  # fmt: skip

        def record(con: sqlite3.Connection) -> None:
            con.executemany(
                "UPDATE variant_status SET status = ?, bytes_done = ?, error = ?, updated_at = ?, bytes_by_source = ?, "
                "started_at = CASE WHEN ? = 'downloading' AND status != 'downloading' THEN ? ELSE started_at END, "
                "finished_at = CASE WHEN ? IN ('downloaded', 'failed') THEN ? ELSE finished_at END "
                "WHERE repo_id = ? AND variant = ?",
                rows,
            )

        doing = f"recording the status of {repo_id}"
        if status not in ("downloaded", "failed"):
            with self.index.write(doing) as con:
                record(con)
            return
        # A pull's end is written with the room the store's reserve keeps, if the disk has none: a pull that
        # filled the disk left its row "downloading", shown as "interrupted", and raised the row's error in
        # place of its own (an explorer's trial). A row's few pages, then the reserve taken back (as the
        # disk allows: what the user frees next).
        try:
            self.index.write_freeing(doing, record)
        finally:
            self.index.reserve.refill()

    def scanned(self) -> list[str]:
        return [row["repo_id"] for row in self.index.read("SELECT repo_id FROM manifests ORDER BY repo_id")]
