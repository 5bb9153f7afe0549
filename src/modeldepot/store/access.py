"""How often each model is used, persisted in the index, for preloading the hot ones at start, and when each
revision was last used, for the disk budget's order.

A use is counted in memory (a read path must not wait for an fsync) and written in one transaction at
most every few seconds (and at the latest a few seconds after it: a node's last downloads of a burst were
seen by no `gc --max-size` beside it until the node stopped), on close, and when the process exits (a
worker that never closes its Depot, as the README's examples do not, recorded none of its loads); a crash
loses at most the last few seconds of counts, which only tune what is preloaded and evicted.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from dataclasses import asdict, dataclass
from typing import Any

from modeldepot.errors import DepotError
from modeldepot.store.forking import start_over_after_fork
from modeldepot.store.index import Index

CLOCK_SLACK = 60.0  # seconds a recorded time may be ahead of a process's clock and still be one it read

__all__ = ["AccessLog", "ModelAccess"]

FLUSH_INTERVAL = 5.0  # seconds between writes of the counts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelAccess:
    repo_id: str
    variant: str  # '' for the repo as a whole
    count: int
    last_access: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _flush_at_exit(log_ref: weakref.ref[AccessLog]) -> None:
    access = log_ref()
    if access is None:
        return
    try:
        access.flush()
    except Exception as error:  # (a closed or removed store at exit: nothing to keep)
        log.debug("model accesses not recorded at exit: %s", error)


class AccessLog:
    def __init__(self, index: Index, flush_interval: float = FLUSH_INTERVAL, enabled: bool = True) -> None:
        self.index = index
        self.enabled = enabled  # (a read-only store records no use)
        self.flush_interval = flush_interval
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str], tuple[int, float]] = {}
        self._pending_revisions: dict[tuple[str, str], float] = {}  # (repo, commit) -> last use
        self._failing = False  # the last write on the helper thread failed (said once)
        self._last_flush = time.monotonic()
        self._flushing = False
        self._timer: threading.Timer | None = None  # writes what a burst left, once it is over
        self._closed = False
        atexit.register(_flush_at_exit, weakref.ref(self))  # (in a forked child too: its own uses)
        start_over_after_fork(self)

    def after_fork(self) -> None:
        """In a forked child: the parent's pending uses are the parent's to write (a worker wrote them
        again at its exit, each counted twice), and its timer thread is not here (a worker wrote its own
        only when it ended)."""
        self._lock = threading.Lock()
        self._pending = {}
        self._pending_revisions = {}
        self._last_flush = time.monotonic()
        self._flushing = False
        self._timer = None

    def record(self, repo_id: str, variant: str | None = None, count: int = 1, commit_id: str | None = None
               ) -> None:  # fmt: skip
        """Count one use of ``repo_id`` (or of one variant of it); ``count=0`` only marks it as used now
        (an import or a pull: the disk budget's recency, not the preloader's popularity). ``commit_id``: the
        revision used, marked as used now too."""
        if not self.enabled:
            return
        key = (repo_id, variant or "")
        now = time.time()
        with self._lock:
            pending, _ = self._pending.get(key, (0, now))
            self._pending[key] = (pending + count, now)
            if commit_id is not None:
                self._pending_revisions[(repo_id, commit_id)] = now
            waited = time.monotonic() - self._last_flush
            due = not self._flushing and waited >= self.flush_interval
            if due:
                self._flushing = True
            elif self._timer is None and not self._closed:
                self._timer = threading.Timer(max(self.flush_interval - waited, 0.05), self._flush_later)
                self._timer.daemon = True
                self._timer.start()
        if due:  # written on a helper thread: the read that triggered it does not wait for the fsync
            threading.Thread(target=self._flush_in_background, name="access-log", daemon=True).start()

    def _flush_later(self) -> None:
        with self._lock:
            self._timer = None
            if self._flushing or self._closed or not self._pending:
                return
            self._flushing = True
        self._flush_in_background()

    def close(self, wait: float = 30.0) -> None:
        """Write what is pending (after a write already under way on a helper thread, ``wait`` seconds at
        most) and stop writing: the store closes its index next."""
        with self._lock:
            self._closed = True
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with self._lock:
                if not self._flushing:
                    break
            time.sleep(0.01)
        try:
            self.flush()
        except BaseException:
            with self._lock:  # (closed: no later write takes them; a second close said the failure again)
                self._pending, self._pending_revisions = {}, {}
            raise

    def _flush_in_background(self) -> None:
        try:
            self.flush()
            self._failing = False
        except DepotError as error:
            # (once: the uses are kept and tried again every few seconds, a full disk's warning with them)
            (log.debug if self._failing else log.warning)("could not record model accesses: %s", error)
            self._failing = True
        finally:
            with self._lock:
                self._flushing = False
                if self._pending and self._timer is None and not self._closed:  # (came while it wrote)
                    self._timer = threading.Timer(self.flush_interval, self._flush_later)
                    self._timer.daemon = True
                    self._timer.start()

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
            revisions, self._pending_revisions = self._pending_revisions, {}
            self._last_flush = time.monotonic()
        if not pending and not revisions:
            return
        try:
            self._write(pending, revisions)
        except BaseException:
            with self._lock:  # (kept for the next write: a full disk lost every use made meanwhile)
                for key, (count, last) in pending.items():
                    was = self._pending.get(key, (0, 0.0))
                    self._pending[key] = (was[0] + count, max(was[1], last))
                for key, last in revisions.items():
                    self._pending_revisions[key] = max(self._pending_revisions.get(key, 0.0), last)
            raise

    def flush_for_a_read(self) -> None:
        """:meth:`flush` before a read of the uses, which reads them as written when they cannot be (a full
        disk: a node's stats answered 507 for the write of the uses they read, an explorer's trial)."""
        try:
            self.flush()
        except DepotError as error:
            log.debug("model accesses read as written, the latest kept for later: %s", error)

    def _write(self, pending: dict[tuple[str, str], tuple[int, float]],
               revisions: dict[tuple[str, str], float]) -> None:  # fmt: skip
        # (a last use ahead of the clock, by more than CLOCK_SLACK, was recorded under a clock set back since:
        # the new one replaces it, or the model kept a time in the future until the clock caught up with it;
        # the others are set to a minute ago, to age from here: store/eviction.py)
        now = time.time()
        ahead = now + CLOCK_SLACK
        latest = "CASE WHEN last_access > ? THEN excluded.last_access ELSE MAX(last_access, excluded.last_access) END"
        with self.index.write("recording model accesses") as con:
            con.executemany(
                "INSERT INTO access (repo_id, variant, count, last_access) VALUES (?, ?, ?, ?) "
                f"ON CONFLICT (repo_id, variant) DO UPDATE SET count = count + excluded.count, last_access = {latest}",
                [(repo, variant, count, last, ahead) for (repo, variant), (count, last) in pending.items()],
            )
            con.executemany(
                "INSERT INTO revision_access (repo_id, commit_id, last_access) VALUES (?, ?, ?) "
                f"ON CONFLICT (repo_id, commit_id) DO UPDATE SET last_access = {latest}",
                [(repo, commit, last, ahead) for (repo, commit), last in revisions.items()],
            )
            for table in ("access", "revision_access"):
                con.execute(
                    f"UPDATE {table} SET last_access = ? WHERE last_access > ?", (now - CLOCK_SLACK, ahead)
                )

    def last_uses(self) -> dict[str, float]:
        """Each repo's last use, as the disk budget evicts by it (an import or a pull marks one, uncounted)."""
        self.flush_for_a_read()
        rows = self.index.read("SELECT repo_id, MAX(last_access) AS last FROM access GROUP BY repo_id")
        return {r["repo_id"]: r["last"] for r in rows}

    def revision_uses(self) -> dict[tuple[str, str], float]:
        """Each revision's last use, by (repo id, commit id), as written (a store read where it cannot be
        upgraded may predate them: none then)."""
        if self.index.schema < 11:
            return {}
        rows = self.index.read("SELECT repo_id, commit_id, last_access FROM revision_access")
        return {(r["repo_id"], r["commit_id"]): r["last_access"] for r in rows}

    def top(self, limit: int = 10, public_only: bool = False, in_store: bool = False) -> list[ModelAccess]:
        """The most used models first (ties: the most recent first), counts not yet written included.

        ``public_only``: only repos in the store that are not private (not one since removed, which may
        have been private); ``in_store``: only repos in the store (uses outlive a repo: a removed one, used
        the most, named "the most used" and took the places of the models there)."""
        self.flush_for_a_read()
        visible = (
            "AND repo_id IN (SELECT repo_id FROM repos WHERE private = 0)"
            if public_only
            else ("AND repo_id IN (SELECT repo_id FROM repos)" if in_store else "")
        )
        rows = self.index.read(
            f"SELECT repo_id, variant, count, last_access FROM access WHERE count > 0 {visible} "
            "ORDER BY count DESC, last_access DESC LIMIT ?",
            (limit,),
        )
        return [ModelAccess(r["repo_id"], r["variant"], r["count"], r["last_access"]) for r in rows]
