"""A pull's progress: bytes done per file and by kind of source, told to the caller's callback and
written, throttled, as the variants' status rows (what ``modeldepot status`` and the dashboard show)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from modeldepot.counters import PULLS
from modeldepot.hub.manifest import Manifest, RemoteFile
from modeldepot.store.store import Store

log = logging.getLogger(__name__)

__all__ = ["PullProgress", "PullTracker", "PullUpdate"]

STATUS_INTERVAL = 0.5  # seconds between status rows written during a transfer
PARTS_ROW_INTERVAL = 2.0  # seconds between rows written for parts of chunks alone (no chunk landed)


@dataclass(frozen=True)
class PullUpdate:
    """One progress report: the file that moved, and the totals."""

    path: str
    file_done: int
    file_size: int
    done: int
    total: int
    waiting: bool = False  # the file is being transferred by another process; this one waits for it
    # Bytes received of chunks not checked yet (of the file, of the pull): shown, not done (a chunk that
    # fails its check, or a transfer cut, takes them back). A 16 MiB chunk over a slow link takes seconds.
    file_receiving: int = 0
    receiving: int = 0
    # Bytes of the pull found on disk (chunks checked when it began; parts of chunks an interrupted pull kept,
    # once their chunks land): shown, and no part of its rate (a resume's parts, shown as their chunks
    # started, made a rate above --max-rate)
    found: int = 0
    # Bytes of the pull thrown away so far (a file that failed its SHA-256, fetched again): shown once, then
    # taken back (a refetch of 200 MiB showed "200.0/200.0 MiB" all along, an SRE's trial)
    thrown_away: int = 0

    @property
    def file_shown(self) -> int:
        """The file's bytes to show as in: checked and received."""
        return min(self.file_size, self.file_done + self.file_receiving)

    @property
    def shown(self) -> int:
        """The pull's bytes to show as in: checked and received."""
        return min(self.total, self.done + self.receiving)


PullProgress = Callable[[PullUpdate], None]


class Tally(dict[str, int]):
    """Bytes by path, and their sum kept as they change (``total``): every progress update summed every
    file's, and a pull of 10,000 small files spent seconds of its event loop adding (an explorer's
    profile). Change it by item only (``[path] = n``, ``pop``)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __setitem__(self, path: str, amount: int) -> None:
        self.total += amount - self.get(path, 0)
        super().__setitem__(path, amount)

    def __delitem__(self, path: str) -> None:
        self.total -= self.get(path, 0)
        super().__delitem__(path)

    def pop(self, path: str, *default: int) -> int:  # type: ignore[override]
        if path in self:
            amount = super().pop(path)
            self.total -= amount
            return amount
        return super().pop(path, *default)


class PullTracker:
    """Bytes done per file; turns them into progress callbacks and throttled status rows."""

    def __init__(self, store: Store, manifest: Manifest, names: list[str], files: list[RemoteFile],
                 progress: PullProgress | None, held: dict[str, int] | None = None) -> None:  # fmt: skip
        self.store, self.manifest, self.names, self.progress = store, manifest, names, progress
        self.held = held or {}  # variant -> bytes of its files the store held before (not in this pull)
        self.sizes = {f.path: f.size for f in files}
        self.total = sum(self.sizes.values())
        self.done = Tally()
        self.fetched = 0
        self.resumed = 0
        self.by_source: dict[str, int] = {}
        self.path_sources: dict[str, dict[str, int]] = {}  # path -> kind of source -> bytes
        self.last_write = 0.0
        self.pending: asyncio.Future[None] | None = None  # a status write running on a worker thread
        # Files in transfer: what tells the bytes received of their chunks not landed yet, and what it told
        self.receiving: dict[str, Callable[[], int]] = {}
        self.shown_receiving = Tally()
        self.kept_earlier: dict[str, Callable[[], int]] = {}  # of those bytes, parts an earlier pull left
        self.thrown_away = 0  # bytes shown done, then thrown away (see PullUpdate.thrown_away)
        # The parts of chunks in flight written down for a resume, by path (the pull's claims): counted in the
        # rows, as kept, so that they move while a chunk downloads (a 30 MiB pull of two 16 MiB chunks read
        # "downloading 0%" to its end on the dashboard, beside its pull's 49%: an operator's trial)
        self.parts_kept: Callable[[], dict[str, int]] = dict
        self.parts_in_rows = 0  # the parts' bytes the rows last written counted

    def receiving_from(
        self, path: str, receiving: Callable[[], int], kept_earlier: Callable[[], int]
    ) -> None:
        """``path``'s transfer begins: shown at once (with the parts an earlier pull left)."""
        self.receiving[path] = receiving
        self.kept_earlier[path] = kept_earlier
        if now := receiving():
            self._tell(path, now)

    def received_all(self, path: str) -> None:
        """``path``'s transfer ended (its bytes are checked, or it failed)."""
        self.receiving.pop(path, None)
        self.shown_receiving.pop(path, 0)
        self.kept_earlier.pop(path, None)

    def _found(self) -> int:
        """The pull's bytes found on disk: resumed, and kept in parts of chunks not landed yet."""
        return self.resumed + sum(kept() for kept in self.kept_earlier.values())

    def tick(self) -> None:
        """Show the bytes received since the last chunk landed (called every ``STATUS_INTERVAL`` during a
        transfer): each file whose count moved is told. No status row is written: they hold checked bytes,
        which only a landing moves (a tick wrote the same rows, a durable transaction each, twice a second)."""
        for path, receiving in list(self.receiving.items()):
            now = receiving()
            if now != self.shown_receiving.get(path, 0):
                self._tell(path, now)
        if self.receiving and sum(self.parts_kept().values()) != self.parts_in_rows:
            self._write_now_and_then(every=PARTS_ROW_INTERVAL)  # (parts are written down every second)

    def waiting_on(self, path: str, elsewhere: int) -> None:
        """Show a file another process is transferring at the ``elsewhere`` bytes its download holds: only
        shown (its bytes count when it is in the store, as found there)."""
        if self.progress is not None:
            mine = self.done.get(path, 0)
            self.progress(PullUpdate(path, elsewhere, self.sizes.get(path, 0),
                                     self.done.total - mine + elsewhere, self.total, True,
                                     0, self.shown_receiving.total, self._found()))  # fmt: skip

    def forget_found(self, path: str, size: int) -> None:
        """``path``, found in the store as the pull began, went before it published: it is fetched (its bytes
        counted as they come, not twice)."""
        self.done[path] = 0
        left = self.by_source.pop("local", 0) - size
        if left > 0:
            self.by_source["local"] = left
        self.path_sources.get(path, {}).pop("local", None)

    def add(self, path: str, amount: int, waiting: bool = False, origin: str = "local") -> None:
        self.done[path] = self.done.get(path, 0) + amount
        if amount:
            self.by_source[origin] = self.by_source.get(origin, 0) + amount
            if origin == "local":  # (the process's counters, the node's /metrics: fetched bytes as they came)
                PULLS.add_bytes(origin, amount)
            kinds = self.path_sources.setdefault(path, {})
            kinds[origin] = kinds.get(origin, 0) + amount
        receiving = self.receiving.get(path)
        self._tell(path, receiving() if receiving is not None else 0, waiting)
        self._write_now_and_then()

    def _tell(self, path: str, receiving: int, waiting: bool = False) -> None:
        self.shown_receiving[path] = receiving
        if self.progress is not None:
            self.progress(PullUpdate(path, self.done.get(path, 0), self.sizes.get(path, 0),
                                     self.done.total, self.total, waiting, receiving,
                                     self.shown_receiving.total, self._found(),
                                     self.thrown_away))  # fmt: skip

    def _write_now_and_then(self, every: float | None = None) -> None:
        every = STATUS_INTERVAL if every is None else every
        if time.monotonic() - self.last_write >= every and (self.pending is None or self.pending.done()):
            # A status write is a durable transaction (an fsync): off the event loop, so the
            # transfers do not stall behind the disk.
            self.last_write = time.monotonic()
            # The rows are taken here, on the loop, so the thread never reads dicts the transfers change.
            # Checked bytes and the parts written down alone: a row outlives a killed pull, and says what it
            # kept for a resume.
            kept = self.parts_kept()
            self.parts_in_rows = sum(kept.values())
            rows, sources = self._rows(kept)
            self.pending = asyncio.get_running_loop().run_in_executor(
                None,
                self.store.manifests.set_statuses,
                self.manifest.repo_id,
                rows,
                "downloading",
                None,
                sources,
            )
            # (a write that failed, a full disk, and was followed by another was never awaited: asyncio
            # printed its traceback over the pull's one-line error, an explorer's trial)
            self.pending.add_done_callback(self._progress_not_recorded)

    def _progress_not_recorded(self, write: asyncio.Future[None]) -> None:
        if not write.cancelled() and (error := write.exception()) is not None:
            log.debug("%s: the pull's progress was not recorded: %s", self.manifest.repo_id, error)

    def forget(self, path: str) -> None:
        """The bytes of ``path`` so far were thrown away (they failed the file's SHA-256): not counted."""
        sources = self.path_sources.pop(path, {})
        self.thrown_away += self.done.get(path, 0)
        self.resumed -= sources.get("local", 0)  # (a resumed download's chunks count as "local")
        for origin, amount in sources.items():
            self.by_source[origin] -= amount
            if not self.by_source[origin]:
                del self.by_source[origin]
        self.done[path] = 0  # (still counted as fetched: they came over the network)

    async def settle(self) -> None:
        if self.pending is not None:
            await asyncio.gather(self.pending, return_exceptions=True)

    def write(self, status: str, error: str | None = None, kept: dict[str, int] | None = None) -> None:
        """Write the variants' status rows. ``kept``: bytes of parts of chunks kept for a resume, by path (a
        stopped pull's: counted as kept, as the resume counts them)."""
        self.last_write = time.monotonic()
        rows, sources = self._rows(kept or {})
        self.store.manifests.set_statuses(self.manifest.repo_id, rows, status, error, sources)

    def _rows(self, kept: dict[str, int] | None = None) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
        """Each variant's bytes done (and ``kept``), and its bytes by kind of source."""
        rows: dict[str, int] = {}
        sources: dict[str, dict[str, int]] = {}
        kept = kept or {}
        for name in self.names:
            wanted = {f.path for f in self.manifest.files_of(name)}
            rows[name] = self.held.get(name, 0) + sum(
                min(self.sizes.get(path, 0), n + kept.get(path, 0))
                for path, n in self.done.items()
                if path in wanted
            )
            kinds: dict[str, int] = {}
            for path in wanted & self.path_sources.keys():
                for kind, amount in self.path_sources[path].items():
                    kinds[kind] = kinds.get(kind, 0) + amount
            sources[name] = dict(sorted(kinds.items()))
        return rows, sources
