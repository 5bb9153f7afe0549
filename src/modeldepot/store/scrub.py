"""The background scrub: every blob rehashed now and then, at a bounded rate, so rot found on disk is
quarantined before a local reader meets it.

Local reads (``get_file``, ``map_file``, ``open_file``, file paths) hand out the blob without hashing it:
hashing a 2 GiB file on every open would cost more than the read, and an engine that maps the file
reads only what it touches. What guards them is this scrub (``serve --scrub-interval``, daily by
default) and ``modeldepot verify``: a blob whose chunk no longer matches its BLAKE3 is quarantined, and
from then on every read path refuses it. The scrub checks the blobs checked longest ago first, one chunk
at a time, sleeping between chunks to stay under its byte rate, and stops between chunks when asked.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from modeldepot.errors import BlobRemovedError, CorruptBlobError, DepotError
from modeldepot.store.maintenance import files_using
from modeldepot.store.models import BlobRecord
from modeldepot.store.store import Store

__all__ = ["DEFAULT_SCRUB_RATE", "ScrubReport", "Scrubber"]

log = logging.getLogger(__name__)

DEFAULT_SCRUB_RATE = 64 * 1024 * 1024  # bytes a second: about 1% of one core of BLAKE3, a fraction of a disk


@dataclass(frozen=True)
class ScrubReport:
    blobs_checked: int
    bytes_checked: int
    corrupt: tuple[str, ...]  # SHA-256 of each blob found corrupt (now quarantined)
    stopped: bool  # asked to stop before every due blob was checked
    seconds: float

    def to_dict(self) -> dict[str, object]:
        return {**self.__dict__, "corrupt": list(self.corrupt)}


@dataclass
class ScrubTally:
    """What a scrubber's passes did, since it was made (a node's /metrics: a scrub that stopped running, or
    never ran, could not be told from one that found nothing, an explorer's trial)."""

    passes: int = 0  # passes that ended (stopped with the node or not)
    failed_passes: int = 0
    last_pass_ended: float = 0.0  # seconds since the epoch; 0: none yet
    blobs_checked: int = 0
    bytes_checked: int = 0
    corrupt: int = 0

    def ended(self, when: float) -> None:
        self.passes += 1
        self.last_pass_ended = when


class Scrubber:
    """Rehashes the store's blobs chunk by chunk under a byte rate; quarantines the ones that fail."""

    def __init__(
        self,
        store: Store,
        rate: float = DEFAULT_SCRUB_RATE,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if rate <= 0:
            raise ValueError(f"scrub rate must be positive, got {rate}")
        self.store = store
        self.rate = rate
        self._clock = clock
        self._wall = wall
        self.tally = ScrubTally()

    def due(self, older_than: float) -> list[BlobRecord]:
        """Servable blobs last checked (or written: every blob is verified on its way in) more than
        ``older_than`` seconds ago, oldest first."""
        rows = self.store.index.read(
            "SELECT sha256, size, chunk_size FROM blobs WHERE state = 'ok' "
            "AND COALESCE(verified_at, created_at) <= ? ORDER BY COALESCE(verified_at, created_at), sha256",
            (self._wall() - older_than,),
        )
        since = self._wall() - older_than  # (a read-only store's checks are this process's memory)
        return [BlobRecord(r["sha256"], r["size"], r["chunk_size"]) for r in rows
                if self.store.last_verified(r["sha256"]) <= since]  # fmt: skip

    def scrub(self, older_than: float = 0.0, stop: threading.Event | None = None) -> ScrubReport:
        """Check every blob due (see :meth:`due`); returns what was found. ``stop`` ends it between chunks."""
        started = self._clock()
        checked = checked_bytes = 0
        corrupt: list[str] = []
        budget_start, budget_bytes = self._clock(), 0
        for blob in self.due(older_than):
            try:
                with self.store.open_verified(blob) as reader:
                    for index in range(reader.chunks):
                        if stop is not None and stop.is_set():
                            return self._report(checked, checked_bytes, corrupt, True, started)
                        reader.check(index)
                        length = reader.span(index)[1]
                        checked_bytes += length
                        self.tally.bytes_checked += (
                            length  # (as it goes: a pass that fails keeps what it did)
                        )
                        budget_bytes += length
                        ahead = budget_bytes / self.rate - (self._clock() - budget_start)
                        if ahead <= 0:
                            continue
                        if stop is None:
                            time.sleep(ahead)
                        elif stop.wait(ahead):
                            return self._report(checked, checked_bytes, corrupt, True, started)
            except CorruptBlobError as error:
                if error.found_before:  # (a check quarantined it since the pass listed it, and said why)
                    continue
                # (naming the files and what restores them, as verify does: the blob's id alone sent the operator
                # to the index to learn which model broke, an explorer's trial)
                users = files_using(self.store, blob.sha256)
                repos = sorted({user.split("@", 1)[0] for user in users})
                # (a pull was prescribed for a repo imported here, which no upstream has: an explorer's trial)
                restore = "; ".join(
                    f"importing {repo} again" if self._imported(repo) else f"`modeldepot pull {repo}`"
                    for repo in repos[:3]
                )
                log.error("scrub: %s%s", error, f" Used by {', '.join(users[:5])}{' …' if len(users) > 5 else ''}"
                          f" ({restore} restores it)." if users else "")  # fmt: skip
                corrupt.append(blob.sha256)
                self.tally.corrupt += 1
                continue
            except BlobRemovedError:
                continue  # removed (an `rm`, the budget) since the pass listed it
            checked += 1
            self.tally.blobs_checked += 1
            self.store.record_verified(blob.sha256, self._wall())
        return self._report(checked, checked_bytes, corrupt, False, started)

    def _imported(self, repo_id: str) -> bool:
        try:
            held = self.store.origin(repo_id)
        except DepotError:
            return False
        return held is not None and held.origin == "import"

    def _report(self, checked: int, checked_bytes: int, corrupt: list[str], stopped: bool,
                started: float) -> ScrubReport:  # fmt: skip
        report = ScrubReport(checked, checked_bytes, tuple(corrupt), stopped, self._clock() - started)
        self.tally.ended(self._wall())
        return report

    def run_every(self, interval: float, stop: threading.Event) -> None:
        """Scrub what is due, then again every ``interval`` seconds, until ``stop`` is set (a thread's
        target: the server runs one). A blob is checked at most once per interval."""
        while not stop.is_set():
            try:
                report = self.scrub(older_than=interval, stop=stop)
            except Exception:  # a scrub that fails (a full disk, a locked index) tries again next round
                self.tally.failed_passes += 1
                log.exception("scrub failed; trying again in %.0f s", interval)
            else:
                if report.blobs_checked or report.corrupt:
                    log.info("scrub: %d blobs (%d bytes) checked, %d corrupt and quarantined, in %.1f s",
                             report.blobs_checked, report.bytes_checked, len(report.corrupt), report.seconds)  # fmt: skip
            stop.wait(interval)
