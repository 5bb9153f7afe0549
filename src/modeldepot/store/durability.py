"""Deferred durability: a blob is published once verified, and made durable in the background.

A killed process cannot lose bytes that reached the page cache; only a power loss or a kernel crash can.
So by default (``MODELDEPOT_DURABILITY=deferred``) an import or a pull publishes a blob as soon as its
SHA-256 and chunk BLAKE3s are checked, without waiting for the disk, and records in its row the kernel's
boot id (``/proc/sys/kernel/random/boot_id``) under which it was written (``blobs.unflushed_boot``). The
index itself stays durable (``synchronous=FULL``): after a power loss it names blobs whose bytes may be
missing, short or zeros, and the boot id tells which.

- **Flushing.** :class:`Durability` makes the blobs written under the current boot durable in batches (an
  ``fsync`` of each file and of its folder), then clears their ``unflushed_boot``: a background thread
  does it about a second after a write, and :meth:`Durability.sync` (``modeldepot sync``,
  ``Depot.sync()``, a server's shutdown) waits for all of it. A process that ends first (a CLI pull) leaves
  the rest to the kernel's own writeback and to the next process that opens the store.
- **After a reboot.** A blob whose ``unflushed_boot`` is another boot's is *unchecked*: every read opens a
  blob through :meth:`Durability.ensure_checked` (called by ``Store.open_fd``), which rehashes an unchecked
  blob before it is read (other readers of it wait), makes it durable and clears its mark, or quarantines
  it (a ``CorruptBlobError``: the next pull fetches it again). The background thread checks them all.
- ``MODELDEPOT_DURABILITY=sync`` keeps the old behaviour: every blob is fsynced before it is published.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from modeldepot.errors import CorruptBlobError, DepotError, StoreClosedError, StoreError
from modeldepot.store.forking import start_over_after_fork
from modeldepot.store.index import Index

__all__ = ["DURABILITY_MODES", "Durability", "current_boot_id"]

log = logging.getLogger(__name__)

DURABILITY_MODES = ("deferred", "sync")
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
UNKNOWN_BOOT = "unknown"
FLUSH_DELAY = 1.0  # seconds after a write before the background flush: writes close together share it
BATCH = 256  # blobs marked durable per index transaction

Checker = Callable[[str, int, int], "tuple[str, str] | None"]
"""``(sha256, size, chunk_size)`` -> None when the blob file matches its digests, else (problem, detail)."""


def current_boot_id() -> str:
    """This boot of the kernel: ``MODELDEPOT_BOOT_ID`` when set (tests simulate a reboot with it), else
    the kernel's boot id; :data:`UNKNOWN_BOOT` where there is none (then a store writes every blob durably
    before publishing it, as ``MODELDEPOT_DURABILITY=sync`` does)."""
    override = os.environ.get("MODELDEPOT_BOOT_ID")
    if override:
        return override.strip()[:64]
    try:
        return BOOT_ID_PATH.read_text().strip()[:64] or UNKNOWN_BOOT
    except OSError:
        return UNKNOWN_BOOT


QUARANTINE_WAIT = 5.0  # seconds a close waits for a quarantine under way (it may wait on another process)


class Durability:
    """The store's unflushed and unchecked blobs (see the module's docstring). Thread-safe."""

    def __init__(self, index: Index, blob_path: Callable[[str], Path], check: Checker,
                 quarantine: Callable[[str, float], str | None], deferred: bool, read_only: bool = False
                 ) -> None:  # fmt: skip
        self.index, self.blob_path, self.check, self.quarantine = index, blob_path, check, quarantine
        self.boot = current_boot_id()
        # Without a boot id (no /proc/sys/kernel/random/boot_id: another system, a sandbox hiding it) a power
        # loss cannot be told from a restart of the process: every blob is made durable before it is published
        self.deferred = deferred and not read_only and self.boot != UNKNOWN_BOOT
        # A store on a read-only mount: an unchecked blob is still checked before it is read (and refused
        # when corrupt), but nothing is flushed or recorded
        self.read_only = read_only
        self._lock = threading.Lock()
        self._checking: dict[str, threading.Lock] = {}
        self._flush_lock = threading.Lock()  # (_flush_and_mark)
        rows = index.read(
            "SELECT sha256, unflushed_boot FROM blobs WHERE unflushed_boot IS NOT NULL AND state = 'ok'"
        )
        self._unchecked = {row["sha256"] for row in rows if row["unflushed_boot"] != self.boot}
        left_unflushed = len(rows) > len(self._unchecked)  # by a process of this boot that ended first
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Held while a blob is quarantined (its file moved, then its row): close waits for it, so that a short
        # command that ends while its background check quarantines does not leave the file moved and the row
        # saying good (the next read said "its file is missing" of a truncated blob: an explorer's trial)
        self._quarantining = threading.Lock()
        if self._unchecked and read_only:  # (each process would rehash the whole store at each start)
            log.warning(
                "%d blob(s) were written under another boot (or machine) and not known to have reached the disk: "
                "the store is read-only, so each is rehashed at its first read by each process. Run `modeldepot "
                "sync` where the store is written before you make it read-only (an image's build step)",
                len(self._unchecked),
            )
        elif self._unchecked:
            log.warning(
                "%d blob(s) were written before the machine last started and may not have reached the disk: "
                "each is checked before it is read (in the background meanwhile)",
                len(self._unchecked),
            )
            self._start()
        if deferred and left_unflushed:
            self.written()  # left by a process that ended before its flush (a CLI import): flushed here
        start_over_after_fork(self)

    def after_fork(self) -> None:
        """In a forked child: the background thread is not here (a worker's writes waited for another
        process's flush), and a lock it held would stay held. Started again by the child's first write."""
        self._lock = threading.Lock()
        self._checking = {}
        self._flush_lock = threading.Lock()
        self._quarantining = threading.Lock()
        self._wake = threading.Event()
        stopped, self._stop = self._stop.is_set(), threading.Event()
        if stopped:
            self._stop.set()
        self._thread = None

    @property
    def unflushed_boot(self) -> str | None:
        """What a new blob's row records: this boot's id (deferred), or None (written durably)."""
        return self.boot if self.deferred else None

    # -- reads ---------------------------------------------------------------------------------------------

    def ensure_checked(self, sha256: str) -> None:
        """Before a blob is read: if it is unchecked (written before a reboot, maybe never flushed), rehash
        it now (a concurrent reader of the same blob waits), then make it durable, or quarantine it and
        raise CorruptBlobError."""
        if sha256 not in self._unchecked:  # the common case: one set lookup
            return
        with self._lock:
            lock = self._checking.setdefault(sha256, threading.Lock())
        with lock:
            if sha256 not in self._unchecked:
                return  # another thread checked it meanwhile
            problem = self._check_one(sha256)
            with self._lock:
                self._unchecked.discard(sha256)
                self._checking.pop(sha256, None)
        if problem is not None:
            raise CorruptBlobError(sha256, f"{problem} (it was written before a restart of the machine)",
                                   kept_in_place=self.read_only)  # fmt: skip

    def _check_one(self, sha256: str) -> str | None:
        rows = self.index.read(
            "SELECT size, chunk_size, state, unflushed_boot, created_at FROM blobs WHERE sha256 = ?",
            (sha256,),
        )
        if not rows or rows[0]["state"] != "ok" or rows[0]["unflushed_boot"] in (None, self.boot):
            return None  # gone, quarantined, or checked by another process
        found = self.check(sha256, rows[0]["size"], rows[0]["chunk_size"])
        if found is None and self.read_only:
            return None
        if found is not None:
            with self._quarantining:
                if self._stop.is_set() and threading.current_thread() is self._thread:
                    # (the background check, as the store closes: the index may go before the row is written)
                    raise StoreClosedError(f"the store was closed while blob {sha256[:16]}… was checked")
                quarantined = self.quarantine(sha256, rows[0]["created_at"])
            if quarantined is None:
                return None  # removed, or removed and published again, while it was checked: not this one
            if not self.read_only:  # (the store said so: it stays in place)
                log.warning("blob %s… written before the restart is corrupt (%s): quarantined; pull it again",
                            sha256[:16], found[1])  # fmt: skip
            return found[1]
        placement = (sha256, rows[0]["created_at"])
        if self._flush_and_mark([placement], rows[0]["unflushed_boot"]) and self._quarantined(*placement):
            return "the disk reported an error while writing it back"
        return None

    # -- flushing ------------------------------------------------------------------------------------------

    def written(self) -> None:
        """A blob was just published without a flush: the background thread flushes it soon."""
        if self.deferred:
            self._start()
            self._wake.set()

    def pending(self) -> list[tuple[str, float]]:
        """The blobs written under this boot that are not yet known durable: (SHA-256, the placement's
        ``created_at``)."""
        rows = self.index.read(
            "SELECT sha256, created_at FROM blobs WHERE unflushed_boot = ? AND state = 'ok'", (self.boot,)
        )
        return [(row["sha256"], row["created_at"]) for row in rows]

    def unchecked(self) -> int:
        return len(self._unchecked)

    def is_unchecked(self, sha256: str) -> bool:
        """Whether the blob waits for its check after a restart (:meth:`ensure_checked` does it)."""
        return sha256 in self._unchecked

    def forget_unchecked(self, digests: list[str]) -> None:
        """These blobs were placed again, from bytes verified now: nothing to check."""
        with self._lock:
            self._unchecked.difference_update(digests)

    def sync(self, check: bool = True) -> int:
        """Make every blob written under this boot durable (first checking every unchecked blob, with
        ``check``: a server stopping leaves those to the next start); returns how many were flushed.
        A read-only store's are flushed and not recorded (only its writer can).
        Raises StoreError when the disk reported an error (the blobs concerned are quarantined, or left to
        the next flush: see :meth:`_flush_and_mark`)."""
        for sha256 in list(self._unchecked) if check else ():
            try:
                self.ensure_checked(sha256)
            except CorruptBlobError:
                pass  # quarantined, and logged
        pending = self.pending()
        if self.read_only:
            # Its writer's blobs (a build step's pull) reach the disk by the kernel's flush of every file
            # system; only the writer can record them durable, so its next start under another boot
            # rehashes them for nothing, never serves them unchecked.
            if pending:
                os.sync()
            return len(pending)
        failed: list[str] = []
        for start in range(0, len(pending), BATCH):
            failed += self._flush_and_mark(pending[start : start + BATCH], self.boot)
        if failed:
            raise StoreError(
                f"{len(failed)} blob(s) could not be made durable: the disk reported an error while writing them "
                f"back (blob {failed[0][:16]}…; see the log). What it could not write is quarantined (pull it "
                "again); check the disk"
            )
        return len(pending) - len(failed)

    def _flush_and_mark(self, placements: list[tuple[str, float]], boot: str) -> list[str]:
        """Flush these blobs and record them durable; returns those that could not be.

        The kernel reports a write-back error to one ``fsync`` only: a retry succeeds and proves nothing,
        and the bytes read back come from the cache (dropping it does not drop what a preload or an engine
        maps). So a blob whose ``fsync`` failed is quarantined at once (the next pull fetches it again);
        one whose folder's ``fsync`` failed keeps its mark (after a power loss a lost entry is found missing,
        never read as good). One flush at a time in a process: another's ``fsync`` of a blob whose error
        this one was told would succeed, and mark it durable before it is quarantined."""
        with self._flush_lock:
            bad_files, bad_folders = self._flush_files([sha256 for sha256, _ in placements])
            for sha256, created_at in placements:
                if sha256 in bad_files:
                    log.warning("blob %s… could not be written back to the disk: quarantined; pull it again",
                                sha256[:16])  # fmt: skip
                    with self._quarantining:
                        if self._stop.is_set() and threading.current_thread() is self._thread:
                            raise StoreClosedError(
                                f"the store was closed while blob {sha256[:16]}… was flushed"
                            )
                        self.quarantine(sha256, created_at)
            self._mark_durable([p for p in placements if p[0] not in bad_files | bad_folders], boot)
        return [sha256 for sha256, _ in placements if sha256 in bad_files | bad_folders]

    def _flush_files(self, digests: list[str]) -> tuple[set[str], set[str]]:
        """``fsync`` each blob and its folders; returns the blobs whose ``fsync`` failed, and those whose
        folder's did (each logged)."""
        folders: dict[Path, set[str]] = {}
        bad_files: set[str] = set()
        for sha256 in digests:
            path = self.blob_path(sha256)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # removed meanwhile (rm, gc): nothing to flush
            try:
                os.fsync(fd)
            except OSError as error:
                log.warning("flushing blob %s… to the disk failed: %s", sha256[:16], error.strerror or error)
                bad_files.add(sha256)
                continue
            finally:
                os.close(fd)
            folders.setdefault(path.parent, set()).add(sha256)
        bad_folders: set[str] = set()
        # (and blobs/ itself, once: a blobs/<ab>/ folder made since the last flush is an entry of it)
        everything = {sha256 for held in folders.values() for sha256 in held}
        for folder, held in [
            *folders.items(),
            *((parent, everything) for parent in {f.parent for f in folders}),
        ]:
            try:
                fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            except OSError as error:
                log.warning("flushing the folder %s to the disk failed: %s", folder, error.strerror or error)
                bad_folders |= held
            finally:
                os.close(fd)
        return bad_files, bad_folders

    def _quarantined(self, sha256: str, created_at: float) -> bool:
        rows = self.index.read("SELECT 1 FROM blobs WHERE sha256 = ? AND created_at = ? AND state = 'quarantined'",
                               (sha256, created_at))  # fmt: skip
        return bool(rows)

    def _mark_durable(self, placements: list[tuple[str, float]], boot: str) -> None:
        """Record these blobs as durable, each only if its row is still the placement that was flushed: one
        removed and published again meanwhile (an `rm` and an import beside the flush) is another file, not
        flushed, and keeps its mark."""
        if not placements:
            return  # (no write transaction: a store read by another user sees its index unchanged)
        with self.index.write("recording blobs as durable") as con:
            con.executemany(
                "UPDATE blobs SET unflushed_boot = NULL WHERE sha256 = ? AND created_at = ? AND unflushed_boot = ?",
                [(sha256, created_at, boot) for sha256, created_at in placements],
            )

    # -- the background thread -------------------------------------------------------------------------------

    def _start(self) -> None:
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name="modeldepot-durability", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for sha256 in list(self._unchecked):
                    if self._stop.is_set():
                        return
                    try:
                        self.ensure_checked(sha256)
                    except CorruptBlobError:
                        pass
                if self.read_only:
                    return  # (checked: nothing to flush, nobody writes)
                woken = self._wake.wait(60.0)  # a write; or once a minute (another process's writes)
                self._wake.clear()
                if self._stop.is_set() or (woken and self._stop.wait(FLUSH_DELAY)):
                    return  # (the delay lets writes close together share one flush)
                self.sync()
            except StoreClosedError:
                return  # (closed under it, as a command ends while it checks: nothing to say, a trial)
            except (DepotError, OSError) as error:  # a full disk, a removed store: retried later
                log.warning("flushing the store in the background: %s", error)
                if self._stop.wait(5.0):
                    return

    def close(self) -> None:
        """Stop the background thread (not waiting for what it has left: the kernel writes it back, and the
        next process that opens the store flushes it), once a quarantine under way is done."""
        self._stop.set()
        self._wake.set()
        # (bounded: a quarantine waits for the store's lock, which a process stopped with Ctrl-Z may hold for
        # good; closing hung with it, a review)
        if self._quarantining.acquire(timeout=QUARANTINE_WAIT):
            self._quarantining.release()
