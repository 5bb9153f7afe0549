"""Resumable downloads: one named partial file per content, outside any write session, so it outlives
the process that started it.

::

    partials/<key>.part   the file being downloaded, preallocated to its final size
    partials/<key>.log    a header line, then one line per finished chunk: "<index> <blake3>", and one
                          per chunk a transfer left part of: "<index> +<bytes> <boot id> <blake3 | ->"
                          (the BLAKE3 its sender gave for the whole chunk, "-" for none: the Hub's)
    partials/<key>.one    a content of one chunk: the file, and its own lock (no log)
    partials/wanted/<key> an empty mark: a pull in another process (or another pull of this one) waits for
                          the content, and its holder hands it over once it is verified (below)

``key`` is the content's expected SHA-256 (or ``git-<oid>`` for a plain git file), so two pulls of the same
bytes, from any repo and any process, meet at the same pair of files. The log is also the lock: whoever
holds ``flock(LOCK_EX)`` on it is the one process transferring that content; another waits, then finds
the blob in the store, or resumes from where the first stopped.

A content of one chunk (a config, a tokenizer: most files of a repo) has no log: there is nothing to
resume in it, and creating and deleting a log per file was a third of the inodes a pull of 300 small files
made. Its ``.one`` is its own lock (opened read-only for the lock, so a finished, read-only one can still
be waited on). It leaves ``partials/`` once its blob is committed, so a claim that comes after finds no
lock to wait on, and finds the blob. Its own name keeps it apart from a ``.log`` and
``.part`` that a version logging every content left or holds for the same content: the two never share a
file, at worst the content is fetched twice. A reader (a peer asking for it before it is published) finds
it once the whole file is the content its key names (not before), and reads it as it checked it.

A claim is held until its pull publishes its revision, and a pull of a big model runs for minutes after
its small files landed: a load of a small model that shares a tokenizer with it waited for all of it (15 s
for a 1 MiB model, an explorer's trial). So a pull that waits for a content marks it wanted, and the holder
of a wanted content that is whole and verified places its blob in the store at once and lets go of it
(transfer/pull.py): the waiter finds the blob. The mark is the waiter's to make again while it waits; the
content's completed release removes it, and gc removes marks of contents nobody downloads.

Placing a finished download links the blob to its file (store/blobs.py); the download's own names go
only after the index commits the blob, so a reader finds one or the other at every moment. A download
that ended in between leaves a partial file that is also a blob: a claim never writes into it (it starts
a new file), and gc removes it.

The log is appended without fsync, and a chunk's line may reach the disk before its bytes do. That is
why a resume trusts no line blindly: every logged chunk is re-read and checked against its BLAKE3 (a
read at disk speed, far cheaper than refetching), and the ones that fail are fetched again.

A transfer stopped in the middle of a chunk (Ctrl-C, a source that failed) that received into the file's
own pages logs how far it got: the next one asks for the rest of that chunk alone (on a slow link four
16 MiB chunks a file are in flight, a minute of transfer each). Nothing proves those bytes until the chunk
is whole: its BLAKE3 (a node's) or the file's SHA-256 (the Hub's) is checked as ever, a chunk that fails
is fetched again whole, and a part logged under another boot of the kernel is not taken (its pages may not
have reached the disk). A part keeps the BLAKE3 its sender gave for the chunk: a chunk a node began and the
Hub (which gives no chunk digest) completes is checked against it, or a liar's bytes would pass unchecked
to the whole file's SHA-256, which throws every chunk away.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import mmap
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import blake3

from modeldepot.errors import ChunkNotAvailableError, InvalidRangeError, StoreError, StoreFullError
from modeldepot.hashing import chunk_count, chunk_span
from modeldepot.store.blobs import PartialBlob, start_writeback
from modeldepot.store.confined import named, open_within, opened_folder
from modeldepot.store.durability import UNKNOWN_BOOT, current_boot_id
from modeldepot.store.layout import FULL_DISK_ADVICE, StoreLayout, os_error, size_text, writable_mode
from modeldepot.store.locks import (
    flock_holder,
    flock_holders,
    forget_and_close,
    held_exclusively,
    lock_file,
    lock_is_held,
    take_flock,
    unlock_and_close,
)
from modeldepot.store.models import BlobRecord
from modeldepot.store.verified import PartialChunkReader

log = logging.getLogger(__name__)

__all__ = [
    "PARTIAL_MAX_AGE",
    "ChunkPart",
    "PartialFiles",
    "PartialLog",
    "PartialState",
    "ResumablePartial",
    "partial_key",
]

PARTIAL_MAX_AGE = 7 * 24 * 3600.0  # seconds an untouched, unlocked partial is kept for a resume by gc
# How a download's own files are opened by their names: never through a link, never waiting on a FIFO (a
# member's link there to /dev/watchdog, or a FIFO, had root's gc open it: a review)
_OWN_FILE = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
PUBLIC_MARK = "public-mark"  # the empty file every download's ``.public`` mark is a hard link of
# An empty file whose mtime a download that completed sets as it lets go: what a serving node's publisher
# looks at, five times a second, to tell its fleet at once that the store holds one more file
ENDED_MARK = "ended-mark"
TAKES = ".takes"  # a running pull's file of the paths it publishes, beside its repo's pull mark
MADE_TAKES_AGE = 3600.0  # seconds after which such a file left under its making name is a killed pull's
WANTED = "wanted"  # the folder of partials/ whose marks name contents that pulls wait for
_HEADER = "modeldepot-partial 1 size={size} chunk={chunk}\n"
_HEADER_LINE = re.compile(r"modeldepot-partial 1 size=([0-9]{1,19}) chunk=([0-9]{1,12})")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# "+<bytes> <boot id> <blake3 | ->" after a line's chunk index (the BLAKE3 is missing from older logs)
_PART = re.compile(r"\+([0-9]{1,12}) (\S{1,64})(?: ([0-9a-f]{64}|-))?")
_BLAKE3 = re.compile(r"[0-9a-f]{64}")


def partial_key(sha256: str | None, git_oid: str) -> str:
    return sha256 if sha256 else f"git-{git_oid}"


@dataclass(frozen=True)
class PartialState:
    """A download in partials/ as its log tells it, read without taking its lock."""

    sha256: str
    size: int
    chunk_size: int
    chunks_logged: int  # distinct chunks the log names (a resume checks each against its BLAKE3)

    @property
    def chunks(self) -> int:
        return chunk_count(self.size, self.chunk_size)


@dataclass(frozen=True)
class PartialLog:
    """A download's log read without its lock: the chunks it names, each with the BLAKE3 logged for it.
    A claim, never proof: a line may reach the disk before its chunk's bytes (the module docstring), so
    whoever reads a chunk checks it against its digest first (:class:`PartialChunkReader`)."""

    sha256: str
    size: int
    chunk_size: int
    logged: dict[int, str]  # chunk index -> BLAKE3 the log names (the last line for an index wins)
    one_piece: bool = False  # a content of one chunk (no log: ``logged`` is what its whole file proved)
    # chunk index -> bytes of a part of it a stopped transfer kept (written under this boot: a resume's)
    parts: dict[int, int] = field(default_factory=dict)

    @property
    def chunks(self) -> int:
        return chunk_count(self.size, self.chunk_size)


@dataclass(frozen=True)
class _Paths:
    data: Path
    log: Path
    one_piece: bool  # a content of one chunk: no log, the data file is the lock

    @property
    def lock(self) -> Path:
        return self.data if self.one_piece else self.log

    @property
    def names(self) -> tuple[Path, ...]:
        """Every file of the download."""
        return (self.data,) if self.one_piece else (self.data, self.log)

    @property
    def public(self) -> Path:
        """There when the content is a public repo's: its chunks may be served without the node's token."""
        return self.log.with_suffix(".public")

    @property
    def wanted(self) -> Path:
        """There while a pull waits for the content: its holder hands it over once it is verified."""
        return self.log.parent / WANTED / self.log.name[: -len(".log")]


@dataclass(frozen=True)
class ChunkPart:
    """The start of a chunk a transfer that stopped left in the file, unchecked until the chunk is whole."""

    received: int  # bytes at the chunk's start
    blake3: str | None  # what its sender gave as the whole chunk's BLAKE3 (None: no digest, the Hub's)


class BytesAside(Protocol):
    """Bytes of a file from byte ``first`` on, coming in a request of their own (a download's read aside, see
    :attr:`ResumablePartial.read_aside`): unchecked."""

    first: int

    def received(self) -> int:
        """The bytes from ``first`` received so far (it may fall back, as a retry starts over)."""
        ...

    def take(self, start: int, end: int) -> bytes:
        """A copy of bytes ``start`` to ``end`` (exclusive) of the file, received already."""
        ...

    def failure(self) -> BaseException | None:
        """What it failed with (it stopped), or None."""
        ...

    def close(self) -> None:
        """Stop it (its request cancelled), whatever came."""
        ...


class ResumablePartial:
    """A claimed partial: this process holds its lock until :meth:`release` or :meth:`finish`."""

    def __init__(self, layout: StoreLayout, paths: _Paths, lock_fd: int, data_fd: int, size: int, chunk_size: int,
                 done: dict[int, str], resumed_bytes: int, writeback: bool = True,
                 parts: dict[int, ChunkPart] | None = None) -> None:  # fmt: skip
        self.layout = layout
        self.paths = paths
        self.size = size
        self.chunk_size = chunk_size
        self.done = done  # chunk index -> BLAKE3 of the chunk as written
        # Chunk index -> what a transfer that stopped received into the file at its start (not checked yet)
        self.parts: dict[int, ChunkPart] = dict(parts or {})
        # Chunks that landed in this process checked against a BLAKE3 the node that answered the scan gave
        # (its word, as the SHA-256 the whole file is checked against): a reader may have them before that
        self.vouched: set[int] = set()
        self.resets = 0  # times the whole file failed its check and every chunk was dropped (reset)
        # Chunk index -> the bytes from its start a transfer has received into the file's own pages so far (a
        # download in this process tells; nothing checked them: a mirror's reader may follow them, and
        # compares what it sent with the chunk once it lands)
        self.receiving: dict[int, Callable[[], int]] = {}
        # Chunk index -> readers waiting for it (a mirror's): the download fetches these first, told of each
        # as a reader comes to wait for it (``on_wanted``, set by the download in this process)
        self.wanted: collections.Counter[int] = collections.Counter()
        self.on_wanted: Callable[[int], None] | None = None
        # Bytes ``first..last`` of the file straight from a source the download in this process asks, unchecked,
        # as they come (set by that download): a mirror's reader of a range that starts deep inside a chunk
        # slow to land takes them rather than wait for the chunk's bytes before it (and compares them with the
        # chunk once it lands)
        self.read_aside: Callable[[int, int], BytesAside | None] | None = None
        self.resumed_bytes = resumed_bytes  # bytes found already on disk, verified, when claimed
        self._lock_fd = lock_fd  # the log's; a one-chunk content's own data file (read-only)
        self._data_fd = data_fd
        # Start each chunk's writeback as it lands, so that a flush before publishing (durability "sync")
        # waits less. Deferred durability flushes after publishing: writeback during the download only
        # costs the pull (on ext4 it write-protects the mapped pages: a TLB shootdown per chunk).
        self.writeback = writeback

    @property
    def chunks(self) -> int:
        return chunk_count(self.size, self.chunk_size)

    @property
    def data_fd(self) -> int:
        return self._data_fd

    def part_bytes(self) -> int:
        """The bytes of the parts of chunks kept (a resume does not fetch them again)."""
        return sum(part.received for index, part in tuple(self.parts.items()) if index not in self.done)

    def map_chunk(self, index: int) -> mmap.mmap | None:
        """Chunk ``index`` of the file, mapped writable: a download receives into the file's own pages
        (then :meth:`write_chunk` with ``in_place``), no copy between its buffer and the page cache. None
        when the chunk does not start on a page boundary (a chunk size that is no multiple of the page size)
        or the file is closed. The bytes landed there count only once logged, as every chunk's."""
        offset, length = chunk_span(index, self.size, self.chunk_size)
        if self._data_fd < 0 or not length or offset % mmap.ALLOCATIONGRANULARITY:
            return None
        try:
            return mmap.mmap(self._data_fd, length, offset=offset)
        except (OSError, ValueError):
            return None  # (no room for a mapping) the caller reads into a buffer instead

    def write_chunk(
        self, index: int, data: memoryview, digest: str, in_place: bool = False, vouched: bool = False
    ) -> None:
        """Write chunk ``index`` at its offset and log it (call from a worker thread: it blocks).
        ``in_place``: ``data`` is the chunk's own mapping (:meth:`map_chunk`), already there: only log it.
        ``vouched``: ``digest`` matched one the scan's node gave (see :attr:`vouched`)."""
        offset, length = chunk_span(index, self.size, self.chunk_size)
        if len(data) != length:
            raise ValueError(f"chunk {index} must be {length} bytes, got {len(data)}")
        try:
            written = length if in_place else 0
            while written < length:
                written += os.pwrite(self._data_fd, data[written:], offset + written)
            if self.writeback:
                start_writeback(self._data_fd, offset, length)
            if not self.paths.one_piece:
                os.write(self._lock_fd, f"{index} {digest}\n".encode())
        except OSError as error:
            raise os_error(error, "writing a download to the store") from error
        if vouched:
            self.vouched.add(index)  # (before it is done: a reader that sees it done sees this too)
        self.parts.pop(index, None)
        self.done[index] = digest

    def log_part(self, index: int, received: int, blake3_hex: str | None = None) -> None:
        """Chunk ``index``'s first ``received`` bytes are in the file (received into its mapped pages by a
        transfer that stopped): the next transfer of it asks for the rest alone. ``blake3_hex``: the
        digest the bytes' sender gave for the whole chunk (None: it gave none), to check the chunk against
        when a source without digests completes it."""
        length = chunk_span(index, self.size, self.chunk_size)[1]
        if self.paths.one_piece or index in self.done or not 0 <= received < length or self._lock_fd < 0:
            return  # (0: no part, the part logged before is void)
        boot = current_boot_id()
        if boot == UNKNOWN_BOOT:
            return  # (no way to tell a part written before a power loss from one that reached the disk)
        try:
            os.write(self._lock_fd, f"{index} +{received} {boot} {blake3_hex or '-'}\n".encode())
        except OSError:
            return  # (only a resume's shortcut: the chunk is fetched whole instead)
        if received:
            self.parts[index] = ChunkPart(received, blake3_hex)

    def forget_part(self, index: int) -> None:
        """The part of chunk ``index`` did not make a whole chunk that checks out: the chunk is fetched whole,
        here and by a resume."""
        if self.parts.pop(index, None) is not None:
            self.log_part(index, 0)

    def close_data(self) -> None:
        """Close the data file while the lock stays held (a finished file waiting for its publish:
        a repo of many files must not hold two descriptors per file)."""
        if self._data_fd >= 0:
            os.close(self._data_fd)
            self._data_fd = -1

    def finish(self) -> PartialBlob:
        """Hand the complete file over for placing (:meth:`PartialBlob.sync`, then publish); the lock is
        kept until :meth:`release`, so nobody resumes a file that is being placed."""
        if self._data_fd < 0:
            try:  # (never through a link put in its place meanwhile: store/confined.py, a review)
                self._data_fd = open_within(self.paths.data, os.O_RDWR, 0, self.layout.real_home)
            except StoreError:
                raise
            except OSError as error:
                raise os_error(error, "reopening a finished download") from error
        fd, self._data_fd = self._data_fd, -1
        blob = PartialBlob(self.paths.data, fd, self.size)
        blob.written = self.size
        blob.keep_name = True  # served to peers until the index has the blob: then release() unlinks it
        return blob

    def reset(self) -> None:
        """Forget every chunk (the whole file failed its digest check): a retry starts from zero."""
        if not self.paths.one_piece:
            try:
                os.ftruncate(self._lock_fd, 0)
                os.write(self._lock_fd, _HEADER.format(size=self.size, chunk=self.chunk_size).encode())
            except OSError as error:
                raise os_error(error, "resetting a download") from error
        self.vouched.clear()
        self.done.clear()
        self.parts.clear()
        self.resets += 1

    def mark_public(self, public: bool) -> None:
        """Mark the content as a public repo's, or not: peers without the node's token may be given its
        chunks while it downloads (a fleet without a token shares what it pulls). Unmarked, a download in
        progress belongs to no repo yet, a private one maybe, and is shown to token holders alone (a mark
        an earlier public pull of the same content left is taken away by a private one)."""
        try:
            if public:
                _make_mark(self.paths.public.with_name(PUBLIC_MARK), self.paths.public, self.layout.real_home)
            else:
                self.layout.unlink(self.paths.public)
        except OSError as error:
            raise os_error(error, "marking a download as public or not") from error

    def release(self, completed: bool, keep_public: bool = False) -> None:
        """Let go of the lock. ``completed``: the content is in the store now, so the files go; else they
        stay for a resume (by this process later, another process, or a re-run), unless the whole file
        failed its check and nothing was fetched since (:meth:`reset`): its bytes are refuted, none would
        be resumed, and they were shown as kept. ``keep_public``: its public mark stays (a content handed
        over before its pull publishes it: a node without a token still serves it, the index names it in
        no public repo yet; the pull takes the mark away at its end)."""
        gone = completed or (self.resets > 0 and not self.done)
        if self.paths.one_piece and gone:
            # Unless its name is gone already (placed by a version that renamed it): it may be another claim's.
            if _still_linked(self._lock_fd, self.paths.data):
                self.layout.unlink(self.paths.data)
        elif gone:
            for path in self.paths.names:  # unlinked while locked: waiters see it gone
                self.layout.unlink(path)
        if gone and not keep_public:
            self.layout.unlink(self.paths.public)
        if completed:
            # (in the store: nobody waits for the download now; a mark this user may not delete, another's in
            # a shared store, stays for gc, and the lock is let go all the same)
            with contextlib.suppress(StoreError):
                self.layout.unlink(self.paths.wanted)
            _mark_ended(self.layout.partials / ENDED_MARK, self.layout.real_home)
        # Else its files stay as they are: a finished file flushed for placing is read-only, and may be a
        # committed blob's other name (a publish that failed after its commit); the next claim sees to it.
        if self._data_fd >= 0:
            os.close(self._data_fd)
            self._data_fd = -1
        if self._lock_fd >= 0:
            unlock_and_close(self._lock_fd)
            self._lock_fd = -1


def _mark_ended(mark: Path, within: str) -> None:
    """Set the mtime of the store's :data:`ENDED_MARK` to now (made if missing; a store that cannot be
    written, or a full disk, leaves it: the publisher's full looks see the change a moment later). Never
    through a link (one there had root create any file, or touch one: a review; store/confined.py)."""
    try:
        fd = open_within(mark, os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK, 0o666, within)
    except OSError:  # (a StoreError too: a link in its place)
        return
    try:
        os.utime(fd)  # (now, as the kernel says: a group member of a shared store may, where setting given
        # times needs the file's owner)
    except OSError:
        pass
    finally:
        os.close(fd)


class PartialFiles:
    """The store's partials/ folder. ``writeback``: claimed partials start writing each chunk to disk
    as it lands (for a store that flushes before it publishes)."""

    def __init__(self, layout: StoreLayout, chunk_size: int, writeback: bool = True) -> None:
        self.layout = layout
        self._reserving_here = threading.Lock()
        self.root = layout.partials
        self.chunk_size = chunk_size  # the store's: what a download of one chunk is read as by a peer
        self.writeback = writeback
        # kept_bytes' answers by key, with the (size, mtime) of the log they were read from: status is
        # polled (every half second by each dashboard), the logs rarely change between two looks.
        self._kept: dict[str, tuple[tuple[int, int], int]] = {}
        # Logged chunks of downloads whose bytes on disk were found not to match (rot, a power loss): not
        # offered to peers while they stay so (each node asked for one got a 404 and counted a failure)
        self._refuted: dict[str, dict[int, tuple[int, int] | None]] = {}  # -> chunk -> its data file's stamp
        self._refuted_lock = threading.Lock()

    def _pull_mark(self, repo_id: str) -> Path:
        return self.root / f"pull-{hashlib.sha256(repo_id.encode()).hexdigest()[:24]}.lock"

    @contextlib.contextmanager
    def pulling(self, repo_id: str, paths: Collection[str] = ()) -> Iterator[None]:
        """Mark a pull of ``repo_id`` as running in this process (a shared flock: pulls may overlap). gc
        removes a mark no pull holds (:meth:`collect`), so the mark locked must still be the one named.
        ``paths``: the files of the repo it publishes, written beside the mark in a file of this pull's, held
        locked (:meth:`pulls_take`)."""
        mark = self._pull_mark(repo_id)
        with self._taking(mark, paths), self._marked(mark):
            yield

    @contextlib.contextmanager
    def _taking(self, mark: Path, paths: Collection[str]) -> Iterator[None]:
        """The file of what a pull takes: written and locked under a name gc does not look at, then named as
        a pull's (visible unlocked, gc deleted it as a killed pull's, and a removal went by the pull: a
        review)."""
        name = self.root / f"{mark.stem}.{os.getpid()}.{secrets.token_hex(4)}{TAKES}"
        making = name.with_name(f".{name.name}")
        try:
            fd = lock_file(
                open_within, making, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666, self.layout.real_home
            )
        except OSError as error:
            raise os_error(error, "marking a pull as running") from error
        try:
            take_flock(fd, fcntl.LOCK_EX)
            os.write(fd, json.dumps(sorted(paths)).encode())
            try:
                self.layout.rename(making, name)
            except OSError as error:
                raise os_error(error, "marking a pull as running") from error
            yield
        finally:
            self.layout.unlink(name)
            self.layout.unlink(making)  # (when the rename failed)
            unlock_and_close(fd)

    def pulls_take(self, repo_id: str) -> frozenset[str] | None:
        """The paths the pulls of ``repo_id`` running now publish (:meth:`pulling`'s ``paths``); None when a
        pull's are not known (one of an older version, in another pid namespace): a removal of a variant whose
        files none of them takes may go on beside them (`rm -q Q4_K_M` was refused while a pull of Q8_0 ran, an
        explorer's trial)."""
        mark = self._pull_mark(repo_id)
        holders = flock_holders(mark)
        if not holders:
            return None
        taken: set[str] = set()
        told: set[int] = set()
        for name in self.root.glob(f"{mark.stem}.*{TAKES}"):
            try:
                pid = int(name.name.split(".")[1])
                fd = lock_file(os.open, name, os.O_RDONLY | _OWN_FILE)
            except (OSError, ValueError, IndexError):
                continue
            try:
                try:
                    take_flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:  # (held: a live pull's, written whole before it was marked)
                    paths = json.loads(os.pread(fd, min(os.fstat(fd).st_size, 1 << 26), 0) or b"[]")
                    if isinstance(paths, list) and all(isinstance(p, str) for p in paths):
                        taken.update(paths)
                        told.add(pid)
            except (OSError, ValueError):
                continue
            finally:
                unlock_and_close(fd)
        return frozenset(taken) if holders <= told else None

    @contextlib.contextmanager
    def _marked(self, mark: Path) -> Iterator[None]:
        while True:
            try:
                fd = lock_file(open_within, mark, os.O_RDWR | os.O_CREAT, 0o666, self.layout.real_home)
            except OSError as error:
                raise os_error(error, "marking a pull as running") from error
            take_flock(fd, fcntl.LOCK_SH)
            if _still_linked(fd, mark):
                break
            unlock_and_close(fd)  # (gc removed it between our open and our lock: the next one is made anew)
        try:
            yield
        finally:
            unlock_and_close(fd)

    def is_pulling(self, repo_id: str) -> bool:
        """Whether a live process is pulling ``repo_id`` now (a status row saying 'downloading' without
        one is a pull that was killed)."""
        return lock_is_held(self._pull_mark(repo_id)) is True

    def others_pulling(self, repo_id: str) -> bool:
        """Whether a live process (this one too) pulls a repo other than ``repo_id`` now: its downloads not
        claimed yet (a file it waits for another's download of first) are resumes it is about to take."""
        own = self._pull_mark(repo_id)
        try:
            marks = list(self.root.glob("pull-*.lock"))
        except OSError:
            return True  # (cannot be told: taken as running)
        return any(mark != own and lock_is_held(mark) is True for mark in marks)

    def downloading(self, key: str) -> bool:
        """Whether a live process holds the download of ``key`` (its claim's lock)."""
        return any(lock_is_held(paths.lock) is True for paths in (self._paths(key), self._paths(key, True)))

    def pull_holder(self, repo_id: str) -> int | None:
        """The pid of a process pulling ``repo_id`` (one of them), None when none is or it cannot be told."""
        return flock_holder(self._pull_mark(repo_id))

    def holds(self, key: str) -> bool:
        """Whether a partial download of ``key`` is on disk (a pull would resume it)."""
        return any(path.exists() for one_piece in (False, True) for path in self._paths(key, one_piece).names)

    def holder(self, key: str) -> int | None:
        """The pid of the process that holds the download of ``key`` (None: none, or not to be told)."""
        for paths in (self._paths(key), self._paths(key, one_piece=True)):
            pid = flock_holder(paths.lock)
            if pid is not None:
                return pid
        return None

    def want(self, key: str) -> None:
        """Mark the content ``key`` as waited for: the process that holds its download hands it over to the
        store once it is verified, not when its whole pull publishes (made again by the waiter while it waits:
        a completed release removes it). A mark that cannot be made is said in the debug log: the waiter then
        waits for the holder's publish, as before marks."""
        mark = self._paths(key).wanted
        try:
            with opened_folder(mark.parent, self.layout.real_home, create=True) as folder:
                os.close(os.open(mark.name, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666,
                                 dir_fd=folder))  # fmt: skip
        except (OSError, StoreError) as error:
            log.debug("could not mark %s as waited for: %s", key[:16], error)

    def unwant(self, key: str) -> None:
        """Take the mark of :meth:`want` away (a waiter whose wait ended)."""
        with contextlib.suppress(StoreError):
            self.layout.unlink(self._paths(key).wanted)

    def wanted_keys(self) -> frozenset[str]:
        """The contents pulls wait for now (their marks: a look at one small folder, empty most of the time)."""
        try:
            return frozenset(os.listdir(self.root / WANTED))
        except OSError:
            return frozenset()

    def kept_bytes(self, key: str) -> int | None:
        """The bytes a partial download of ``key`` holds by its log (what a resume would not fetch again,
        if each logged chunk checks out), or None when there is no download of it on disk. A download of
        one chunk (no log) counts its size once the whole file is the content (hashed once while it stands:
        counted 0, a Ctrl-C said "30 B of 1.5 MiB kept" of a variant whose file had come whole, and its
        resume "3.1 MiB resumed", an explorer's trial); a part of it is not kept (it starts over)."""
        try:
            info = self._paths(key).log.stat()
        except FileNotFoundError:
            try:
                info = self._paths(key, one_piece=True).data.stat()
            except FileNotFoundError:
                self._kept.pop(key, None)
                return 0 if self.holds(key) else None
            one_piece = True
        else:
            one_piece = False
        if not one_piece and not self._paths(key).data.exists():
            # (a log whose data went: a blob placed by a rename, then taken out as its publish failed; its
            # bytes were counted kept, and the resume fetched them all, a crash fuzzer's trial)
            self._kept.pop(key, None)
            return 0
        stamp = (info.st_size, info.st_mtime_ns)
        cached = self._kept.get(key)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        if one_piece:
            # (a blob's other name, its pull ended before letting go: the store holds it, no resume keeps it)
            placed = info.st_nlink > 1
            whole = self._one_piece_log(key) if not placed and info.st_size <= self.chunk_size else None
            self._kept[key] = (stamp, info.st_size if whole is not None else 0)
            return self._kept[key][1]
        log = self.read_log(key)
        kept = (
            0
            if log is None
            else sum(  # (None: a git-<oid> key, or a log without a valid header)
                chunk_span(index, log.size, log.chunk_size)[1] for index in log.logged if index < log.chunks
            )
            + sum(log.parts.values())  # (parts of chunks a stopped transfer kept: a resume takes them too)
        )
        self._kept[key] = (stamp, kept)
        return kept

    @contextlib.contextmanager
    def _reserving(self) -> Iterator[None]:
        """One look at the disk's room and reservation at a time, in every process: two pulls into the last
        room of a tmpfs both failed half the time though either alone fitted, each failed reservation taking
        every free page for a moment before giving them back (an explorer's trial)."""
        with self._reserving_here, held_exclusively(self.layout.lock_path.parent / RESERVING_LOCK,
                                                     self.layout.real_home, 0o666, or_without=True):  # fmt: skip
            yield

    def room_short(self, sizes: Mapping[str, int]) -> tuple[int, int]:
        """(bytes the disk lacks, bytes free) for downloads of these sizes (by partial key) together, beside
        what their partial files hold already; (0, free) when they fit, or when the disk cannot be asked."""
        try:
            disk = os.statvfs(self.root if self.root.exists() else self.layout.home)
        except OSError:
            return 0, 0  # (the downloads' own checks say)
        needed = 0
        for key, size in sizes.items():
            held = 0
            for suffix in ("part", "one"):
                with contextlib.suppress(OSError):
                    held = max(
                        held,
                        os.stat(self.layout.partial_stem(key).with_name(f"{key}.{suffix}")).st_blocks * 512,
                    )
            needed += max(0, size - held)
        free = disk.f_bavail * disk.f_frsize
        return max(0, needed - free), free

    def check_room(self, sizes: Mapping[str, int], doing: str) -> None:
        """Refuse (StoreFullError, nothing written) downloads of these sizes (by partial key) that the store's
        file system has no room for together, beside what their partial files hold already: a pull of a repo
        larger than the free disk fetched a whole file, failed on the next, and left the first taking the
        room for a download that could never end there (an explorer's trial). Each file's own check stays
        (:func:`_room_for`): others write beside it."""
        short, free = self.room_short(sizes)
        if short:
            raise StoreFullError(f"{doing} needs {size_text(short + free)} more on the store's disk ({len(sizes)} "
                                 f"file{'s' if len(sizes) != 1 else ''}), which has {size_text(free)} free: "
                                 f"nothing was fetched; {FULL_DISK_ADVICE}")  # fmt: skip

    def keys_on_disk(self) -> frozenset[str]:
        """The keys any download has a file of in the folder now (its data or its log; the marks aside)."""
        try:
            with os.scandir(self.root) as entries:
                return frozenset(
                    stem for stem, dot, suffix in (entry.name.rpartition(".") for entry in entries)
                    if dot and suffix in ("part", "log", "one")
                )  # fmt: skip
        except FileNotFoundError:
            return frozenset()

    def signature(self) -> tuple[tuple[str, int, int], ...]:
        """(name, size, mtime in ns) of every download's log, sorted: it changes whenever a download
        starts, logs a chunk, finishes or is dropped (a cheap look, for polling)."""
        found = []
        try:
            with os.scandir(self.root) as entries:
                for entry in entries:
                    if entry.name.endswith(".log"):
                        try:
                            info = entry.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue
                        found.append((entry.name, info.st_size, info.st_mtime_ns))
        except FileNotFoundError:
            return ()
        return tuple(sorted(found))

    def ended_mark(self) -> int:
        """When a download last completed, as its mark says (ns; 0 before any): one stat, a cheap look."""
        try:
            return (self.root / ENDED_MARK).stat().st_mtime_ns
        except OSError:
            return 0

    def state(self, log_name: str) -> PartialState | None:
        """The download whose log is ``partials/<log_name>`` (a ``<sha256>.log``); None for another name, a
        log that is gone, or one without a valid header. Takes no lock: a reader may run beside the writer."""
        key = log_name[: -len(".log")] if log_name.endswith(".log") else ""
        log = self.read_log(key)
        return None if log is None else PartialState(key, log.size, log.chunk_size, len(log.logged))

    def read_log(self, sha256: str) -> PartialLog | None:
        """The log of the download of ``sha256``, read without taking its lock (a pull may hold it); None
        for a key that is no SHA-256 (``git-<oid>``), a log that is gone, or one without a valid header."""
        if not _SHA256.fullmatch(sha256):
            return None
        try:
            text = self._paths(sha256).log.read_bytes().decode("ascii", "replace")
        except (FileNotFoundError, IsADirectoryError):
            return self._one_piece_log(sha256)
        head, _, body = text.partition("\n")
        match = _HEADER_LINE.fullmatch(head)
        if match is None or int(match.group(2)) <= 0:
            return None
        size, chunk_size = int(match.group(1)), int(match.group(2))
        count = chunk_count(size, chunk_size)
        logged: dict[int, str] = {}
        parts: dict[int, int] = {}
        boot = current_boot_id()
        for line in body.split("\n"):
            index, _, digest = line.partition(" ")
            if not (index.isascii() and index.isdigit() and int(index) < count):
                continue
            if _BLAKE3.fullmatch(digest):
                logged[int(index)] = digest
            elif (part := _PART.fullmatch(digest)) is not None and part.group(2) == boot != UNKNOWN_BOOT:
                parts[int(index)] = int(part.group(1))
        return PartialLog(sha256, size, chunk_size, logged,
                          parts={i: n for i, n in parts.items() if i not in logged})  # fmt: skip

    def _one_piece_log(self, sha256: str) -> PartialLog | None:
        """A download of one chunk as a log would tell it once the whole file is the content ``sha256``
        names: its one chunk logged (a reader checks its BLAKE3 again when it reads it). None before (a
        swarm peer asks for it only after its claimer settled it: landed) or without such a download; a
        file being set up is empty for a moment, and its size must never reach a peer as the content's.
        Hashes the file (one chunk at most): read without its lock."""
        try:
            fd = os.open(self._paths(sha256, one_piece=True).data, os.O_RDONLY | _OWN_FILE)
        except (FileNotFoundError, IsADirectoryError):
            return None
        except OSError as error:
            raise os_error(error, "opening a download's partial file") from error
        try:
            size = os.fstat(fd).st_size  # (preallocated to the content's size when claimed)
            if size > self.chunk_size:
                return None  # not a download of one chunk at this store's chunk size
            logged = _whole_content(fd, sha256, size)
        finally:
            os.close(fd)
        return None if logged is None else PartialLog(sha256, size, self.chunk_size, logged, one_piece=True)

    def is_public(self, sha256: str) -> bool:
        """Whether the download of ``sha256`` is a public repo's (:meth:`ResumablePartial.mark_public`), or
        the content was, handed over to the store before its pull publishes it."""
        return self._paths(sha256).public.exists()

    def public_marks(self) -> frozenset[str]:
        """The contents marked a public repo's (:meth:`is_public`) now."""
        try:
            with os.scandir(self.root) as entries:
                return frozenset(e.name[: -len(".public")] for e in entries if e.name.endswith(".public"))
        except FileNotFoundError:
            return frozenset()

    def unmark_public(self, key: str) -> None:
        """Take the public mark of ``key`` away (a content handed over, once its pull ended)."""
        with contextlib.suppress(StoreError):
            self.layout.unlink(self._paths(key).public)

    def open_chunks(self, sha256: str) -> PartialChunkReader | None:
        """The download of ``sha256`` open for reading its logged chunks, each checked against its BLAKE3
        when read (:class:`PartialChunkReader`); None when there is no such download. Takes no lock."""
        log = self.read_log(sha256)
        if log is None:
            return None
        try:
            fd = os.open(self._paths(sha256, log.one_piece).data, os.O_RDONLY | _OWN_FILE)
        except FileNotFoundError:
            return None  # finished (or dropped) between the two reads
        except OSError as error:
            raise os_error(error, "opening a download's partial file") from error
        try:
            return PartialChunkReader(BlobRecord(sha256, log.size, log.chunk_size), fd, log.logged,
                                      on_refuted=lambda index: self._refute(sha256, index))  # fmt: skip
        except BaseException:
            os.close(fd)
            raise

    def _data_stamp(self, sha256: str) -> tuple[int, int] | None:
        for one_piece in (False, True):
            with contextlib.suppress(OSError):
                info = self._paths(sha256, one_piece).data.stat()
                return info.st_size, info.st_mtime_ns
        return None

    def _refute(self, sha256: str, index: int) -> None:
        stamp = self._data_stamp(sha256)
        with self._refuted_lock:
            known = index in self._refuted.get(sha256, {})
            self._refuted.setdefault(sha256, {})[index] = stamp
        if not known:  # (said once: an SRE saw only the access log's 404s of a disk going bad)
            log.warning("chunk %d of the download of %s… does not match the BLAKE3 its download logged (the disk "
                        "may be failing, or the bytes were lost in a power loss): not offered to peers; the "
                        "next pull of it fetches it again", index, sha256[:16])  # fmt: skip

    def offered(self, partial_log: PartialLog) -> set[int]:
        """The logged chunks of a download peers may be offered: those found not to match (:meth:`_refute`)
        left out, until the data file was written since (read and hashed again then: a resume fetched them
        anew; not before, every peer's refresh of the map read 16 MiB of a failing disk, a review)."""
        with self._refuted_lock:
            doubtful = {
                index: stamp
                for index, stamp in self._refuted.get(partial_log.sha256, {}).items()
                if index in partial_log.logged
            }
        if not doubtful:
            return set(partial_log.logged)
        now = self._data_stamp(partial_log.sha256)
        still_bad = {index for index, stamp in doubtful.items() if stamp == now}
        written = set(doubtful) - still_bad
        reader = self.open_chunks(partial_log.sha256) if written else None
        if reader is not None:
            with reader:
                for index in written:
                    try:
                        reader.check(index)
                        reader.view(index).release()
                    except (ChunkNotAvailableError, InvalidRangeError):
                        still_bad.add(index)
        else:
            still_bad |= written
        with self._refuted_lock:
            kept = self._refuted.get(partial_log.sha256, {})
            for index in set(doubtful) - still_bad:
                kept.pop(index, None)
            if not kept:
                self._refuted.pop(partial_log.sha256, None)
        return set(partial_log.logged) - still_bad

    def _paths(self, key: str, one_piece: bool = False) -> _Paths:
        stem = self.layout.partial_stem(key)
        data = stem.with_name(f"{key}.one" if one_piece else f"{key}.part")
        return _Paths(data, stem.with_name(f"{key}.log"), one_piece)

    def claim(self, key: str, size: int, chunk_size: int, wait: bool) -> ResumablePartial | None:
        """Lock the partial of ``key`` and return it with its verified chunks; None if another process
        holds it and ``wait`` is False. With ``wait`` True this blocks until the other process lets go."""
        paths = self._paths(key, one_piece=chunk_count(size, chunk_size) == 1)
        # The lock of a one-chunk content is its data file, opened read-only: it is read-only once
        # finished (and flushed for placing), and waiting on it must not need write access.
        flags = os.O_RDONLY if paths.one_piece else os.O_RDWR | os.O_APPEND
        while True:
            try:
                # (no link in its place leads out of the store: store/confined.py)
                lock_fd = lock_file(open_within, paths.lock, flags | os.O_CREAT, 0o666, self.layout.real_home)
            except OSError as error:
                raise os_error(error, "opening a download's lock") from error
            try:
                take_flock(lock_fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                forget_and_close(lock_fd)
                return None
            if _still_linked(lock_fd, paths.lock):
                if not (paths.one_piece and _placed(lock_fd)):
                    break
                self.layout.unlink(paths.lock)  # a blob's other name: its download ended before letting go
            unlock_and_close(lock_fd)  # its holder finished and unlinked it while we waited: take a fresh one
        try:
            return self._open(key, paths, lock_fd, size, chunk_size)
        except BaseException:
            unlock_and_close(lock_fd)
            raise

    def _open(self, key: str, paths: _Paths, lock_fd: int, size: int, chunk_size: int) -> ResumablePartial:
        header = _HEADER.format(size=size, chunk=chunk_size)
        read = None if paths.one_piece else _read_log_and_parts(lock_fd, header)
        logged, parts = (None, {}) if read is None else read
        try:
            if paths.one_piece and not os.fstat(lock_fd).st_mode & 0o200:
                os.fchmod(lock_fd, writable_mode())  # flushed for placing (read-only), then not placed
            elif not paths.one_piece and _leftover_of_placing(paths.data, self.layout.real_home):
                self.layout.unlink(paths.data)  # a blob's other name (its pull ended before letting go)
                logged = None
            data_fd = open_within(paths.data, os.O_RDWR | os.O_CREAT, 0o666, self.layout.real_home)
        except OSError as error:
            raise os_error(error, "opening a download's partial file") from error
        try:
            if paths.one_piece:  # no log: a leftover counts if it is the whole content, by its key's digest
                logged = _whole_content(data_fd, key, size)
            if logged is None:  # new, or written for another size or chunk size: start over
                logged, parts = {}, {}
                if not paths.one_piece:
                    _empty(lock_fd)
                    os.write(lock_fd, header.encode())
                _empty(data_fd)
            if size:
                with self._reserving():
                    _room_for(data_fd, size, key)
                    try:
                        os.posix_fallocate(data_fd, 0, size)  # a full disk fails here, before any transfer
                    except OSError:
                        # (a failed reservation keeps what it took on ext4: a new file gives it back)
                        if not logged:
                            with contextlib.suppress(OSError):
                                os.ftruncate(data_fd, 0)
                        raise
            done = _verified_chunks(data_fd, size, chunk_size, logged)
        except StoreFullError:
            os.close(data_fd)
            raise
        except OSError as error:
            os.close(data_fd)
            raise os_error(error, f"reserving {size_text(size)} for a download") from error
        resumed = sum(chunk_span(i, size, chunk_size)[1] for i in done)
        boot = current_boot_id()
        count = chunk_count(size, chunk_size)
        taken = {
            index: part
            for index, (part, written_under) in parts.items()
            if index < count and index not in done and written_under == boot != UNKNOWN_BOOT
            and 0 < part.received < chunk_span(index, size, chunk_size)[1]
        }  # fmt: skip
        return ResumablePartial(self.layout, paths, lock_fd, data_fd, size, chunk_size, done, resumed,
                                self.writeback, taken)  # fmt: skip

    def collect(
        self, remove_all: bool, max_age: float = PARTIAL_MAX_AGE, held: Set[str] = frozenset(),
        empty: bool = True, relied_on: Set[str] = frozenset(), spare: Set[str] = frozenset(),
    ) -> tuple[int, int, int, int]:  # fmt: skip
        """gc: delete unlocked partials older than ``max_age`` (every unlocked one with ``remove_all``), and
        those of a content the store holds whole (``held``, download keys: a SHA-256 or ``git-<oid>``; it came in another way, an import, an
        adoption, and no resume will ever need the download: kept a week outside the budget, an operator's
        trial), and (``empty``) those that keep nothing a resume would take (stopped before a chunk landed: a
        node killed as its pulls began left the whole room of its files taken for a week, "resumable: 0 B
        kept", an explorer's trial); returns (removed, kept for a resume, left to the transfers running now,
        bytes freed: the disk space given back). ``spare``: keys kept whatever they hold (a pull's own, whose
        resume is due now)."""
        removed = kept = running = freed = 0
        try:
            logs = sorted(self.root.glob("*.log"))
        except FileNotFoundError:
            return 0, 0, 0, 0
        now = time.time()
        for log in logs:
            key = log.name[: -len(".log")]
            if key in spare:
                kept += 1
                continue
            paths = self._paths(key)
            try:
                fd = lock_file(os.open, log, os.O_RDWR | _OWN_FILE)
            except FileNotFoundError:
                continue
            except OSError as error:
                if error.errno != errno.ELOOP:
                    raise
                continue  # (a link in its place: no download's, left alone)
            try:
                take_flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                running += 1
                forget_and_close(fd)
                continue
            try:
                newest = max(_mtime(paths.data), _mtime(paths.log))
                if (
                    remove_all
                    or key in held
                    or now - newest > max_age
                    or _links(paths.data) > 1  # (> 1: a blob's too)
                    or not paths.data.exists()  # (its data went: nothing to resume)
                    or (empty and _log_names_nothing(fd))
                ):
                    freed += _given_back(paths.data) + _given_back(paths.log)
                    self.layout.unlink(paths.data)
                    self.layout.unlink(paths.log)
                    removed += 1
                else:
                    kept += 1
            finally:
                unlock_and_close(fd)
        for takes in self.root.glob(f"pull-*{TAKES}"):  # (a pull killed: its file no pull holds)
            if lock_is_held(takes) is False:
                self.layout.unlink(takes)
        for making in self.root.glob(f".pull-*{TAKES}"):  # (killed as it made its file: not one being made)
            with contextlib.suppress(OSError):
                if time.time() - making.stat().st_mtime > MADE_TAKES_AGE and lock_is_held(making) is False:
                    self.layout.unlink(making)
        for mark in self.root.glob("pull-*.lock"):  # (one per repo ever pulled: an inode each, for good)
            with contextlib.suppress(OSError):
                fd = lock_file(os.open, mark, os.O_RDONLY | _OWN_FILE)
                try:
                    take_flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # (held shared by every pull running)
                    if _still_linked(fd, mark):
                        self.layout.unlink(mark)
                finally:
                    unlock_and_close(fd)
        logless = [
            *self.root.glob("*.one"),
            *(p for p in self.root.glob("*.part") if not p.with_suffix(".log").exists()),
        ]
        for data in logless:  # a one-chunk download, or (rarely) a data file whose log went
            size, key = _given_back(data), data.name.split(".", 1)[0]
            if key in spare:
                kept += 1
                continue
            outcome = self._collect_logless(data, remove_all or key in held, now - max_age, empty)
            if outcome == "removed":
                removed, freed = removed + 1, freed + size
            elif outcome == "kept":
                kept += 1
            elif outcome == "running":  # (counted as kept for a resume, gc said `gc --partials` drops it)
                running += 1
        for mark in self.root.glob(
            "*.public"
        ):  # of downloads gone (a content handed over keeps its own: relied on)
            if mark.stem not in relied_on and not any(
                mark.with_suffix(suffix).exists() for suffix in (".log", ".part", ".one")
            ):
                self.layout.unlink(mark)
        for key in self.wanted_keys():  # (a waiter killed as it waited: its mark outlived the download)
            with contextlib.suppress(StoreError):
                paths = self._paths(key)
                if not any(path.exists() for path in (*paths.names, self._paths(key, True).data)):
                    self.layout.unlink(paths.wanted)
        shared = self.root / PUBLIC_MARK
        with contextlib.suppress(FileNotFoundError):
            if shared.lstat().st_nlink == 1:  # (no mark links it: made again by the next public pull)
                self.layout.unlink(shared)
        return removed, kept, running, freed

    def _collect_logless(
        self, data: Path, remove_all: bool, older_than: float, empty: bool = False
    ) -> Literal["removed", "kept", "running"] | None:
        """gc of a data file without a log: a one-chunk download (its own lock), or (rarely) data whose
        log went. Left alone while its lock is held ("running"), kept for a resume until ``older_than``
        unless ``remove_all``; deleted while this holds its lock, so a claim that opened it meanwhile finds
        it unlinked once it gets the lock, and starts anew. None when already gone."""
        try:
            fd = lock_file(os.open, data, os.O_RDONLY | _OWN_FILE)
        except FileNotFoundError:
            return None
        except OSError as error:
            if error.errno != errno.ELOOP:
                raise
            return None  # (a link in its place: no download's, left alone)
        try:
            take_flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not _still_linked(fd, data):
                return None
            # (``empty``: a one-chunk download is kept whole or not at all, a part of it starts over; judged
            # under its lock: one that came whole a moment before is kept, a review)
            useless = (empty and data.suffix == ".one" and not _placed(fd)
                       and _whole_content(fd, data.name.split(".", 1)[0], os.fstat(fd).st_size) is None)  # fmt: skip
            if not remove_all and not useless and not _placed(fd) and os.fstat(fd).st_mtime > older_than:
                return "kept"
            self.layout.unlink(data)
            return "removed"
        except BlockingIOError:
            return "running"  # a one-chunk download running now
        finally:
            unlock_and_close(fd)


def _make_mark(shared: Path, path: Path, within: str) -> None:
    """The empty file ``path``, made as a hard link of ``shared`` (made first if need be): a link takes no
    inode and its removal frees none. On an ext4 without a journal a new inode skips every one freed in
    the last 5-35 seconds, and a pull of 300 configs, freeing one mark per file as it ended, made the next
    pull's files and links cost 0.4 ms each instead of 0.02 (benchmarks, the twenty-fifth run). Where the
    link cannot be made (too many links, another user's file under protected_hardlinks), a file of its own."""
    # (in partials/ as opened, ``within`` the home: a link there leads nowhere, store/confined.py)
    with opened_folder(path.parent, within) as folder:
        try:
            for _ in range(2):
                try:
                    os.link(
                        shared.name, path.name, src_dir_fd=folder, dst_dir_fd=folder, follow_symlinks=False
                    )
                    return
                except FileExistsError:
                    return  # (marked already: a leftover a resume keeps, or the same content's other pull)
                except FileNotFoundError:
                    os.close(os.open(shared.name, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666,
                                     dir_fd=folder))  # fmt: skip
                except OSError:
                    break
            os.close(
                os.open(
                    path.name, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666, dir_fd=folder
                )
            )
        except OSError as error:
            # (the whole path named: out of inodes, a pull's error said "no space left" of a disk `df -h` showed
            # free, its folder unknown to the look at the inodes, an explorer's trial)
            raise named(error, path) from None


def _given_back(path: Path) -> int:
    """The disk space deleting ``path`` gives back: its allocated blocks (a download's file is sparse
    until its chunks land), none while another name (a blob) holds them."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return 0
    return info.st_blocks * 512 if info.st_nlink == 1 else 0


def _log_names_nothing(fd: int) -> bool:
    """Whether a download's log (``fd``, locked) names no chunk and no part of one: stopped before anything
    landed, nothing a resume would take (whatever its key: a ``git-<oid>`` download's log reads the same)."""
    size = os.fstat(fd).st_size
    text = os.pread(fd, min(size, 1 << 20), 0).decode("ascii", "replace") if size else ""
    return not any(line[:1].isdigit() for line in text.split("\n")[1:])


def _whole_content(fd: int, key: str, size: int) -> dict[int, str] | None:
    """A one-chunk partial's leftover as a log would name it (``{0: its BLAKE3}``) when it holds exactly
    the content ``key`` names (its SHA-256, or ``git-`` and its git blob id); else None."""
    if os.fstat(fd).st_size != size:
        return None
    data = _pread_exact(fd, size, 0) if size else b""
    if data is None:
        return None
    if key.startswith("git-"):
        matches = hashlib.sha1(b"blob %d\0" % size + data).hexdigest() == key[len("git-") :]
    else:
        matches = hashlib.sha256(data).hexdigest() == key
    return {0: blake3.blake3(data).hexdigest()} if matches else None


RESERVING_LOCK = "reserving.lock"  # in locks/: held while a download's room is looked at and reserved


def _room_for(fd: int, size: int, key: str) -> None:
    """A download of ``size`` bytes (the upstream's word) fits in the free room of the file system, beside
    what its file holds already (StoreFullError, nothing reserved): a size of terabytes filled the disk,
    and the failed reservation left it full (a security trial)."""
    try:
        disk, held = os.fstatvfs(fd), os.fstat(fd).st_blocks * 512
    except OSError:
        return  # (the reservation itself says)
    free = disk.f_bavail * disk.f_frsize
    if size - held > free:
        raise StoreFullError(f"a download of {size_text(size)} (content {key[:16]}…, as its upstream sizes it) needs "
                             f"more than the {size_text(free)} free on the store's disk; {FULL_DISK_ADVICE}")  # fmt: skip


def _links(path: Path) -> int:
    try:
        return os.stat(path).st_nlink
    except FileNotFoundError:
        return 0


def _leftover_of_placing(data: Path, within: str) -> bool:
    """Whether a download's data file is also a blob (placing linked one to it, and its pull ended before
    removing its own name: never to be written again), or no file of a download's (a link in its place: a
    review), and else makes it writable if it was flushed for placing (read-only: a non-root owner could not
    open it for writing)."""
    try:
        fd = open_within(data, os.O_RDONLY | os.O_NONBLOCK, 0, within)
    except FileNotFoundError:
        return False
    except StoreError:
        return True  # (a link: removed, and made anew)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
            return True
        if not info.st_mode & 0o200:
            os.fchmod(fd, writable_mode())
        return False
    finally:
        os.close(fd)


def _placed(fd: int) -> bool:
    """Whether the partial file is also a blob: placing links the blob to it, and its download removes its
    own name once the index has the blob; a download that ended in between leaves it behind."""
    return os.fstat(fd).st_nlink > 1


def _still_linked(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _empty(fd: int) -> None:
    """Truncate a file to nothing, unless it is empty already (a new partial's files). On ext4 a truncate
    to zero marks the file for a flush when it is closed (``auto_da_alloc``, for the truncate-and-rewrite
    pattern): two forced writebacks per downloaded file, the very wait deferred durability removes."""
    if os.fstat(fd).st_size:
        os.ftruncate(fd, 0)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _read_log(fd: int, header: str) -> dict[int, str] | None:
    """Logged chunks, or None when the log is empty or describes another file layout. A torn last line
    (a kill mid-append) and anything unreadable are skipped: those chunks are simply fetched again."""
    read = _read_log_and_parts(fd, header)
    return None if read is None else read[0]


def _read_log_and_parts(
    fd: int, header: str
) -> tuple[dict[int, str], dict[int, tuple[ChunkPart, str]]] | None:
    """Logged chunks, and the parts of chunks logged (index -> (the part, the boot it was written under));
    None as :func:`_read_log`."""
    size = os.fstat(fd).st_size
    text = os.pread(fd, size, 0).decode("ascii", "replace") if size else ""
    if not text.startswith(header):
        return None
    logged: dict[int, str] = {}
    parts: dict[int, tuple[ChunkPart, str]] = {}
    for line in text[len(header) :].split("\n"):
        index, _, rest = line.partition(" ")
        if not index.isdigit():
            continue
        if len(rest) == 64:
            logged[int(index)] = rest
            # (its parts before were completed: one that fails its check must start over, never resume a
            # stale part whose bytes went bad with it, a kept chunk's rot refetched the whole file, a trial)
            parts.pop(int(index), None)
        elif (part := _PART.fullmatch(rest)) is not None:
            digest = part.group(3)
            parts[int(index)] = (
                ChunkPart(int(part.group(1)), None if digest in (None, "-") else digest),
                part.group(2),
            )
    return logged, parts


def _verified_chunks(fd: int, size: int, chunk_size: int, logged: dict[int, str]) -> dict[int, str]:
    done: dict[int, str] = {}
    count = chunk_count(size, chunk_size)
    for index, digest in sorted(logged.items()):
        if index >= count:
            continue
        offset, length = chunk_span(index, size, chunk_size)
        data = _pread_exact(fd, length, offset)
        if data is not None and blake3.blake3(data, max_threads=blake3.blake3.AUTO).hexdigest() == digest:
            done[index] = digest
    return done


def _pread_exact(fd: int, length: int, offset: int) -> bytes | None:
    try:
        data = os.pread(fd, length, offset)
    except OSError as error:
        if error.errno == errno.EIO:
            return None
        raise
    return data if len(data) == length else None
