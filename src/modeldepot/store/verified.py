"""Reading a blob chunk by chunk, each chunk checked against its recorded BLAKE3 before it is handed out.

Bytes on disk can rot after they were verified on the way in (a failing disk, a stray write by root), and
the size check every open makes cannot see a flipped byte. Whoever sends a blob to another machine (the
node's resolve and blob routes, a mirror) reads it through :class:`VerifiedBlob`: a chunk is hashed from a
shared mapping of the file (the page cache: no copy) and only then given out, by ``sendfile`` from the
same file or as a view of the same mapping. BLAKE3 runs at several GB/s on one core, so a server that
checks chunk ``i + 1`` on a worker thread while the kernel sends chunk ``i`` loses little. A chunk that
fails quarantines the blob at once: from then on no read path serves it.
"""

from __future__ import annotations

import io
import mmap
import os
import threading
from collections.abc import Callable

import blake3

from modeldepot.errors import ChunkNotAvailableError, CorruptBlobError, InvalidRangeError
from modeldepot.hashing import chunk_count, chunk_span
from modeldepot.store.layout import os_error
from modeldepot.store.models import BlobRecord

__all__ = ["MAPPED_FROM", "PartialChunkReader", "VerifiedBlob"]

# Blobs up to this size are read (``pread``) rather than mapped: for a config or a tokenizer the mapping's
# page faults and its unmapping (which interrupts every core the process runs on) cost more than copying
# the bytes; a node serving 300 files of 4-200 KiB spent a fifth of its time there.
MAPPED_FROM = 256 << 10


class VerifiedBlob:
    """An open blob and its chunk digests; :meth:`check` a chunk before any of its bytes leave.

    ``file`` is a read-only file object over the blob (for ``sendfile``); :meth:`view` gives a chunk's
    bytes as a zero-copy view of the mapping that was hashed. Close it (or use it as a context manager).

    A blob file with another name (a Hugging Face cache's blob it was adopted from, a user's file imported
    with ``--link``, an export) may be written there, truncated even, and a read of a mapping past the end
    of a file kills the process (SIGBUS): such a blob is read with ``pread`` instead, each chunk into bytes
    of its own, and a chunk found short is corrupt like one whose digest fails. So is a small one (up to
    MAPPED_FROM), whose chunks :meth:`view` hands out as the very bytes :meth:`check` read and hashed.
    """

    by_sendfile = True  # whether a sender may send a checked chunk from ``file`` (else from :meth:`view`)

    def __init__(
        self, blob: BlobRecord, fd: int, digests: list[str], quarantine: Callable[[str], object],
        kept_in_place: bool = False,
    ) -> None:  # fmt: skip
        self.blob = blob
        self._kept_in_place = kept_in_place  # (a read-only store: a bad blob is refused, not moved)
        self.file = io.FileIO(fd, "rb", closefd=True)
        self._digests = digests
        self._quarantine = quarantine
        # (a small blob's) chunks checked and not yet handed out: the last two (a sender checks the next one
        # while it sends one; a scrub that only checks keeps no more)
        self._checked: dict[int, bytes] = {}
        self._checked_lock = threading.Lock()
        try:
            self.shared = os.fstat(fd).st_nlink > 1  # (named elsewhere too: read, never mapped)
            mapped = blob.size > MAPPED_FROM and not self.shared
            self._mapping = mmap.mmap(fd, blob.size, prot=mmap.PROT_READ) if mapped else None
        except BaseException:
            self.file.close()
            raise

    @property
    def closed(self) -> bool:
        return self.file.closed

    @property
    def size(self) -> int:
        return self.blob.size

    @property
    def chunk_size(self) -> int:
        return self.blob.chunk_size

    @property
    def chunks(self) -> int:
        return chunk_count(self.blob.size, self.blob.chunk_size)

    def chunks_of(self, start: int, end: int) -> range:
        """The chunks holding bytes ``start..end`` (inclusive); none for an empty range."""
        if end < start:
            return range(0)
        return range(start // self.chunk_size, end // self.chunk_size + 1)

    def span(self, index: int) -> tuple[int, int]:
        """(offset, length) of chunk ``index``."""
        return chunk_span(index, self.blob.size, self.blob.chunk_size)

    @property
    def mapped(self) -> bool:
        """Whether :meth:`view` gives views of a mapping of the file (else bytes of their own)."""
        return self._mapping is not None

    def view(self, index: int) -> memoryview:
        """Chunk ``index`` as a view of the mapping (check it first; :meth:`checked_view` does both). A small
        blob gives the bytes its last :meth:`check` of the chunk hashed, once; otherwise a blob read unmapped
        reads the chunk and checks it (its file may have changed since)."""
        offset, length = self.span(index)
        if self._mapping is not None:
            return memoryview(self._mapping)[offset : offset + length]
        with self._checked_lock:
            checked = self._checked.pop(index, None)
        if checked is not None:
            return memoryview(checked)
        return memoryview(self._read_checked(index)[0]) if length else memoryview(b"")

    def digest(self, index: int) -> str:
        """The BLAKE3 recorded for chunk ``index`` (what :meth:`check` compares with)."""
        self._check_index(index)
        return self._digests[index]

    def checked_view(self, index: int) -> memoryview:
        """Chunk ``index`` checked (:meth:`check`), then its bytes: a view of the mapping that was hashed, or
        the very bytes that were read and hashed."""
        if self._mapping is not None:
            self.check(index)
            return self.view(index)
        return memoryview(self._read_checked(index)[0])

    def check(self, index: int) -> str:
        """Hash chunk ``index`` and compare it with its recorded BLAKE3; returns the digest. A mismatch
        quarantines the blob and raises CorruptBlobError. Blocks for a few milliseconds: call it from a
        worker thread in async code (blake3 releases the GIL)."""
        if self._mapping is None:
            read, digest = self._read_checked(index)
            # (kept for a small blob alone: a big shared one goes by sendfile, its copies would be dead weight)
            if self.size <= MAPPED_FROM:
                with self._checked_lock:
                    self._checked[index] = read
                    while len(self._checked) > 2:
                        del self._checked[next(iter(self._checked))]
            return digest
        self._check_index(index)
        with self.view(index) as data:
            actual = blake3.blake3(data).hexdigest()
        self._compare(index, actual)
        return actual

    def _read_checked(self, index: int) -> tuple[bytes, str]:
        """(Unmapped.) Chunk ``index`` read with ``pread`` and checked: its bytes and their digest."""
        self._check_index(index)
        offset, length = self.span(index)
        try:
            data = os.pread(self.file.fileno(), length, offset)
        except OSError as error:
            raise os_error(error, f"reading chunk {index} of blob {self.blob.sha256[:16]}…") from error
        if len(data) != length:  # (truncated through another name of the file)
            self._quarantine(self.blob.sha256)
            raise CorruptBlobError(self.blob.sha256, f"its file ends before chunk {index} does",
                                   kept_in_place=self._kept_in_place)  # fmt: skip
        actual = blake3.blake3(data).hexdigest()
        self._compare(index, actual)
        return data, actual

    def _compare(self, index: int, actual: str) -> None:
        expected = self._digests[index] if index < len(self._digests) else None
        if actual != expected:
            self._quarantine(self.blob.sha256)
            raise CorruptBlobError(self.blob.sha256, f"chunk {index} does not match its BLAKE3 digest",
                                   kept_in_place=self._kept_in_place)  # fmt: skip

    def _check_index(self, index: int) -> None:
        if isinstance(index, bool) or not isinstance(index, int):
            raise InvalidRangeError(f"a chunk index is a whole number, not {index!r}")
        if not 0 <= index < self.chunks:
            raise InvalidRangeError(f"chunk index {index!r} is outside 0..{self.chunks - 1}")

    def close(self) -> None:
        self.file.close()
        self._mapping = None  # unmapped when the last view of it goes
        with self._checked_lock:
            self._checked.clear()

    def __enter__(self) -> VerifiedBlob:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PartialChunkReader(VerifiedBlob):
    """The logged chunks of a download in progress (``partials/<sha256>.part``, or the one chunk of a
    ``.one`` that already hashes to its key), read beside the process that writes it, without its lock.

    The log is appended without fsync and may name a chunk whose bytes never landed, so :meth:`check`
    reads the chunk and hashes it against the BLAKE3 the log names before any byte may leave; a chunk the
    log does not name, or whose bytes do not match, raises ChunkNotAvailableError (nothing is quarantined:
    the pull fetches such a chunk again). Unlike a complete blob the file is neither mapped nor sent by
    sendfile: the writer may truncate it (a claim that starts over), which would turn a read of a mapping
    into SIGBUS, and a chunk is sent from the very bytes that were hashed (:meth:`view` hands them out
    once), so what leaves is what was checked even if the file changes meanwhile.
    """

    by_sendfile = False

    def __init__(
        self,
        blob: BlobRecord,
        fd: int,
        logged: dict[int, str],
        on_refuted: Callable[[int], None] | None = None,
    ) -> None:
        self.blob = blob
        self.file = io.FileIO(fd, "rb", closefd=True)
        self._logged = dict(logged)
        self._on_refuted = on_refuted  # told of a logged chunk whose bytes on disk do not match
        self._mapping = None
        self._checked = {}  # checked chunks not yet handed out (at most two in flight)
        self._checked_lock = threading.Lock()  # check() of the next chunk runs on a worker thread

    def logged(self, index: int) -> bool:
        """Whether the log names chunk ``index`` (a claim: :meth:`check` proves it)."""
        return index in self._logged

    @property
    def logged_count(self) -> int:
        """How many chunks the log names."""
        return len(self._logged)

    def check(self, index: int) -> str:
        """Read chunk ``index`` and compare it with its logged BLAKE3; returns the digest, and keeps the
        bytes for :meth:`view`. Raises ChunkNotAvailableError when the chunk cannot be served."""
        self._check_index(index)
        expected = self._logged.get(index)
        if expected is None:
            raise ChunkNotAvailableError(self.blob.sha256, index, "it has not been downloaded yet")
        offset, length = self.span(index)
        try:
            data = os.pread(self.file.fileno(), length, offset)
        except OSError:
            data = b""
        if len(data) != length or blake3.blake3(data).hexdigest() != expected:
            if self._on_refuted is not None:
                self._on_refuted(index)
            raise ChunkNotAvailableError(
                self.blob.sha256, index, "its bytes on disk do not match the BLAKE3 its download logged"
            )
        with self._checked_lock:
            self._checked[index] = data
        return expected

    def digest(self, index: int) -> str:
        """The BLAKE3 the log names for chunk ``index``."""
        self._check_index(index)
        if index not in self._logged:
            raise ChunkNotAvailableError(self.blob.sha256, index, "it has not been downloaded yet")
        return self._logged[index]

    def checked_view(self, index: int) -> memoryview:
        self.check(index)
        return self.view(index)

    def view(self, index: int) -> memoryview:
        """The bytes of chunk ``index`` that :meth:`check` hashed (each check gives them out once)."""
        with self._checked_lock:
            data = self._checked.pop(index)
        return memoryview(data)
